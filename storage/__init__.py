"""Storage: URL parsing and one small `Store` interface over local disk, memory, GCS and S3,
with the deadlines and the bounded window of in-flight requests that every caller waits under.

Imported as ``ckpt.storage`` (the folder ``storage/`` is mapped there at install). It knows
nothing about arrays or checkpoints and imports only its own modules. `open_store` is the
only way the layers above get a store.
"""

from __future__ import annotations

import os

from ckpt.storage._base import ChunkIO, Op, Store, check_key
from ckpt.storage._deadline import Deadline, DeadlineExceededError, DeadlineStore, bounded
from ckpt.storage._errors import (
    AccessDeniedError,
    BucketNotFoundError,
    CkptError,
    InvalidArgumentError,
    InvalidKeyError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageError,
    UnreadableObjectError,
    UnsupportedURLError,
    causes,
    tensorstore_code,
)
from ckpt.storage._local import LocalStore
from ckpt.storage._memory import MemoryStore, memory_context
from ckpt.storage._object import ObjectStore, settle_google_credentials
from ckpt.storage._settings import ObjectSettings, configure
from ckpt.storage._url import SCHEMES, Location, parse_url
from ckpt.storage._window import Window
from ckpt.storage._wrapper import WrapperStore

__all__ = [
    "AccessDeniedError", "BucketNotFoundError", "ChunkIO", "CkptError", "Deadline",
    "DeadlineExceededError", "DeadlineStore", "InvalidArgumentError", "InvalidKeyError",
    "LocalStore", "Location",
    "MemoryStore", "MissingDependencyError", "ObjectNotFoundError", "ObjectSettings",
    "ObjectStore", "Op",
    "SCHEMES", "StorageError", "Store", "StoreLike", "UnreadableObjectError",
    "UnsupportedURLError", "Window", "WrapperStore",
    "bounded", "causes", "check_key", "configure", "memory_context", "open_store", "parse_url",
    "settle_google_credentials", "tensorstore_code",
]


# What every public entry point takes where it names a checkpoint or a root: a URL, a path,
# or a store already opened (wrapped, for instance, by the caller's own `WrapperStore`).
StoreLike = str | os.PathLike[str] | Store


def open_store(url: StoreLike) -> Store:
    """Returns the store for ``url`` (a `Store` is returned as it is); performs no I/O
    (credentials are checked lazily).

    Raises:
        UnsupportedURLError: the scheme has no backend (yet) or the URL is malformed.
    """
    if isinstance(url, Store):
        return url
    location = parse_url(url)
    if location.scheme == "file":
        return LocalStore(location)
    if location.scheme == "memory":
        return MemoryStore(location)
    return ObjectStore(location)

