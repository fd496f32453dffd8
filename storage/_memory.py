"""The in-memory backend (``memory://NAME/PREFIX``), for tests and tools.

Objects live in TensorStore's memory kvstore within one process-wide TensorStore context, so
arrays written through TensorStore and objects written through this store share one
namespace, exactly as on the real backends. Nothing survives the process.
"""

from __future__ import annotations

from typing import Any

import tensorstore as ts

from ckpt.storage._base import Store, shared_context
from ckpt.storage._errors import ObjectNotFoundError

# TensorStore's generation meaning "no value is stored": a write conditioned on it only
# succeeds when the key is absent. (An empty generation would mean "unconditional".)
_NO_VALUE = b"\x02"


def memory_context() -> ts.Context:
    """The one TensorStore context every memory:// store and array of this process shares:
    the data lives in it."""
    return shared_context("memory")


def _successor(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else ""


class MemoryStore(Store):
    """Objects in process memory, addressed like a bucket: ``memory://NAME/PREFIX``."""

    def _root(self) -> str:
        return "/".join(p for p in (self.location.bucket, self.location.path) if p) + "/"

    def _kv(self) -> ts.KvStore:
        return ts.KvStore.open({"driver": "memory", "path": self._root()},
                               context=memory_context()).result()

    def _read(self, key: str, max_bytes: int | None) -> bytes:
        result = self._kv().read(key).result()
        if result.state != "value":
            raise ObjectNotFoundError(f"no object at {self.describe(key)}")
        return bytes(result.value)

    def _write(self, key: str, data: bytes) -> None:
        self._kv().write(key, data).result()

    def _write_if_absent(self, key: str, data: bytes) -> bool:
        stamp = self._kv().write(key, data, if_equal=_NO_VALUE).result()
        # A failed condition does not raise: it returns an empty generation.
        return bool(stamp.generation)

    def _exists(self, key: str) -> bool:
        return self._kv().read(key).result().state == "value"

    def _keys(self, prefix: str) -> list[str]:
        start = f"{prefix}/" if prefix else ""
        rng = ts.KvStore.KeyRange(start, _successor(start))
        return [k.decode() for k in self._kv().list(rng).result()]

    def _list(self, prefix: str) -> list[str]:
        keys = self._keys(prefix)
        if prefix and self._exists(prefix):
            keys.append(prefix)
        return keys

    def _list_sizes(self, prefix: str) -> dict[str, int]:
        kv = self._kv()
        reads = {key: kv.read(key).result() for key in self._list(prefix)}
        return {k: len(r.value) for k, r in reads.items() if r.state == "value"}

    def _list_children(self, prefix: str) -> list[str]:
        cut = len(prefix) + 1 if prefix else 0
        return [k[cut:].split("/", 1)[0] for k in self._keys(prefix)]

    def _delete(self, key: str) -> None:
        self._kv().delete_range(ts.KvStore.KeyRange(key, key + "\x00")).result()

    def _delete_prefix(self, prefix: str) -> None:
        start = f"{prefix}/"
        kv = self._kv()
        kv.delete_range(ts.KvStore.KeyRange(start, _successor(start))).result()
        self._delete(prefix)

    def _kvstore_spec(self, prefix: str) -> dict[str, Any]:
        return {"driver": "memory", "path": self._root() + (f"{prefix}/" if prefix else "")}

    def tensorstore_context(self) -> ts.Context:
        return memory_context()
