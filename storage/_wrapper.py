"""Stores that add behaviour around another store.

`WrapperStore` passes every call to ``inner`` through one method, `WrapperStore._delegate`
(and TensorStore futures, and `Store.read_async`'s, through `Store.wait`), so that a
wrapper adds its behaviour in one place: `DeadlineStore` bounds each call by a deadline; a
caller's own wrapper may count, log, slow or fail calls (the test suite injects its faults
this way). Every public entry point that takes a URL also takes a `Store`, wrapped or not
(`open_store`).
"""

from __future__ import annotations

import concurrent.futures
import copy
import posixpath
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import tensorstore as ts

from ckpt.storage._base import ChunkIO, Keys, Op, Store

T = TypeVar("T")


class WrapperStore(Store):
    """``inner``, with every I/O call made through `_delegate`.

    Subclasses override `_delegate` (and `wait`, for TensorStore's futures on this store's
    data: chunks written and read). `child` copies the wrapper, so a wrapper's state (a
    deadline, a fault plan) covers the whole tree below its root.
    """

    def __init__(self, inner: Store) -> None:
        super().__init__(inner.location)
        self.inner = inner

    def _delegate(self, doing: Op, key: str, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn(*args)``, the inner store's ``doing`` of ``key`` (e.g. `Op.WRITE`,
        ``manifest.msgpack``). Called on whichever thread made the call."""
        return fn(*args)

    def child(self, prefix: str) -> Store:
        wrapped = copy.copy(self)
        wrapped.inner = self.inner.child(prefix)
        wrapped.location = wrapped.inner.location
        return wrapped

    def parent(self) -> Store | None:
        up = self.inner.parent()
        if up is None:
            return None
        wrapped = copy.copy(self)
        wrapped.inner = up
        wrapped.location = up.location
        return wrapped

    def verify_access(self) -> None:
        self._delegate(Op.CHECK_ACCESS, "", self.inner.verify_access)

    def tensorstore_context(self) -> ts.Context:
        return self.inner.tensorstore_context()

    def wait(self, future: Any, doing: str | ChunkIO) -> Any:
        return self.inner.wait(future, doing)

    def read_async(self, key: str, *, max_bytes: int, into: memoryview | None = None
                   ) -> concurrent.futures.Future[bytes | memoryview]:
        # What a wrapper sees of it is its wait (`Store.read_async`).
        return self.inner.read_async(key, max_bytes=max_bytes, into=into)

    def _kvstore_spec(self, prefix: str) -> dict[str, Any]:
        return self._delegate(Op.OPEN, prefix, self.inner._kvstore_spec, prefix)

    def _write_many(self, items: list[tuple[str, bytes]]) -> None:
        # One call, so that the inner store batches it (one sync of a local file system);
        # the key it is delegated as is the objects' common prefix.
        keys = [key for key, _ in items]
        common = keys[0] if len(keys) == 1 else posixpath.commonpath(keys)
        self._delegate(Op.WRITE, common, self.inner._write_many, items)

    def _sync_later_options(self) -> dict[str, Any]:
        return self.inner._sync_later_options()

    def _sync(self) -> None:
        self._delegate(Op.SYNC, "", self.inner._sync)

    def _read(self, key: str, max_bytes: int | None) -> bytes:
        return self._delegate(Op.READ, key, self.inner._read, key, max_bytes)

    def _check_plain_files(self, prefix: str, keys: list[str] | None) -> None:
        self._delegate(Op.CHECK_FILES, prefix, self.inner._check_plain_files, prefix, keys)

    def _write(self, key: str, data: bytes) -> None:
        self._delegate(Op.WRITE, key, self.inner._write, key, data)

    def _write_stream(self, key: str, parts: Iterable[bytes | memoryview]) -> int:
        return self._delegate(Op.WRITE, key, self.inner._write_stream, key, parts)

    def _write_if_absent(self, key: str, data: bytes) -> bool:
        return self._delegate(Op.CREATE, key, self.inner._write_if_absent, key, data)

    def _exists(self, key: str) -> bool:
        return self._delegate(Op.LOOK_UP, key, self.inner._exists, key)

    def _list(self, prefix: str) -> Keys:
        return self._delegate(Op.LIST, prefix, self.inner._list, prefix)

    def _list_sizes(self, prefix: str) -> dict[str, int]:
        return self._delegate(Op.LIST, prefix, self.inner._list_sizes, prefix)

    def _list_children(self, prefix: str) -> Keys:
        return self._delegate(Op.LIST, prefix, self.inner._list_children, prefix)

    def _delete(self, key: str) -> None:
        self._delegate(Op.DELETE, key, self.inner._delete, key)

    def _delete_prefix(self, prefix: str) -> None:
        self._delegate(Op.DELETE, prefix, self.inner._delete_prefix, prefix)

    def _prune(self, prefix: str) -> None:
        self._delegate(Op.PRUNE, prefix, self.inner._prune, prefix)
