"""Errors raised by the storage layer.

The root of the project's error hierarchy lives here, in the lowest layer, so that every
layer above can subclass it without importing upwards. `ckpt.errors` re-exports all of them
and draws the whole hierarchy.
"""

from __future__ import annotations


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


class InvalidKeyError(CkptError, ValueError):
    """A storage key that could escape the store's root (``..``, absolute, NUL, empty part)."""


class UnreadableObjectError(StorageError):
    """An object a reader refuses to take whole: larger than the limit it reads with, or, on
    a file system, not a regular file (a FIFO or device would block or never end)."""


class AccessDeniedError(StorageError, PermissionError):
    """Credentials are missing or wrong, or lack permission (the message names the bucket)."""


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket of a ``gs://`` or ``s3://`` URL does not exist."""
