"""Errors raised by the storage layer, and the one place TensorStore's errors are told
apart (`tensorstore_code`).

The root of the project's error hierarchy lives here, in the lowest layer, so that every
layer above can subclass it without importing upwards. `ckpt.errors` re-exports all of them
and draws the whole hierarchy. The object-store clients' errors are mapped in
`ckpt.storage._object`.
"""

from __future__ import annotations

from collections.abc import Iterator


class CkptError(Exception):
    """Base class of every error this project raises on purpose."""


class StorageError(CkptError, OSError):
    """A storage operation failed (I/O, permissions, a server error after retries)."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """A key that was read does not exist in the store."""


class UnsupportedURLError(CkptError, ValueError):
    """A URL whose scheme or shape no backend understands."""


class MissingDependencyError(CkptError, ImportError):
    """A URL whose backend needs a package that is not installed (the message names the
    extra to install, e.g. ``shardckpt[s3]``)."""


class InvalidArgumentError(CkptError, ValueError):
    """A call's argument that is not acceptable: an option out of range, a malformed
    mesh, spec, size or name rule (the message names the argument and the value)."""


class InvalidKeyError(CkptError, ValueError):
    """A storage key that could escape the store's root (``..``, absolute, NUL, empty part)."""


class UnreadableObjectError(StorageError):
    """An object a reader refuses to take whole: larger than the limit it reads with, or, on
    a file system, not a regular file (a FIFO or device would block or never end)."""


class AccessDeniedError(StorageError, PermissionError):
    """Credentials are missing or wrong, or lack permission (the message names the bucket)."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket of a ``gs://`` or ``s3://`` URL does not exist."""


# TensorStore reports every failure as a ValueError whose message starts with the status
# code's name (absl's), possibly after a prefix naming the operation.
_TS_CODES = ("CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
             "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
             "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE",
             "DATA_LOSS", "UNAUTHENTICATED")


def tensorstore_code(exc: BaseException) -> str | None:
    """The status code of a TensorStore error (``NOT_FOUND``, ``DATA_LOSS``, ...), None
    for anything else. The one place TensorStore's errors are told apart: its Python
    binding raises them all as ValueError, the code first in the message."""
    if not isinstance(exc, ValueError):
        return None
    text = str(exc)
    head = text.split(":", 1)[0].strip()
    if head in _TS_CODES:
        return head
    # Wrapped ("Error opening ...: NOT_FOUND: ..."): the outermost code that is named.
    found = [(text.find(f" {code}:"), code) for code in _TS_CODES if f" {code}:" in text]
    return min(found)[1] if found else None


def causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its causes (``__cause__``, else ``__context__``), each once: where a
    client's or TensorStore's error that a wrapper raised from is found."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__
