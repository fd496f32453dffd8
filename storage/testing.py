"""The conformance suite of the storage seam: the behaviour every `Store` must show.

Shipped with the package so that a store of your own (a backend, or a `WrapperStore` that
counts, logs or throttles) can be checked with the very tests this library's backends run:
subclass `StoreConformance` in a pytest test module and give it a ``store`` fixture that
returns your store rooted at a fresh, empty location::

    import pytest
    from ckpt.storage.testing import StoreConformance

    class TestMyStore(StoreConformance):
        @pytest.fixture
        def store(self, tmp_path):
            return MyStore(...)

Needs pytest (not a dependency of the library itself). docs/architecture.md, "Storage",
says what a store must provide; tests/storage/test_stores.py runs this suite for the local
file system, memory, S3 and GCS and two wrapper stores.
"""

import threading
from collections.abc import Iterator

import numpy as np
import pytest
import tensorstore as ts

from ckpt.storage import InvalidKeyError, ObjectNotFoundError, Store, UnreadableObjectError


class StoreConformance:
    """Mix into a pytest test class that has a ``store`` fixture (a fresh, empty store)."""

    def test_read_missing_raises_not_found(self, store: Store) -> None:
        with pytest.raises(ObjectNotFoundError) as err:
            store.read("a/missing")
        assert isinstance(err.value, FileNotFoundError)
        assert "a/missing" in str(err.value)

    def test_write_read_replace(self, store: Store) -> None:
        store.write("a/b/c.bin", b"one")
        assert store.read("a/b/c.bin") == b"one"
        store.write("a/b/c.bin", b"two!")
        assert store.read("a/b/c.bin") == b"two!"
        assert store.exists("a/b/c.bin")
        assert not store.exists("a/b/d.bin")

    def test_write_many(self, store: Store) -> None:
        store.write("m/old", b"before")
        items = [(f"m/{i % 7}/x{i}.json", f"object {i}".encode()) for i in range(50)]
        store.write_many([*items, ("m/old", b"after")])
        for key, data in items:
            assert store.read(key) == data
        assert store.read("m/old") == b"after"
        assert len(store.list("m")) == 51  # nothing else: no temporary object is left
        store.write_many([])
        with pytest.raises(InvalidKeyError):
            store.write_many([("m/fine", b"x"), ("../escape", b"x")])
        assert not store.exists("m/fine")  # every key is checked before anything is written

    def test_sync_after_writes_through_a_sync_later_spec(self, store: Store) -> None:
        store.sync()  # nothing written yet: nothing to do, no error
        spec = {"driver": "zarr3", "kvstore": store.kvstore_spec("later", sync_later=True),
                "create": True, "metadata": {"shape": [4], "data_type": "int32"}}
        arr = ts.open(spec, context=store.tensorstore_context()).result()
        arr.write(np.arange(4, dtype=np.int32)).result()
        store.sync()
        assert store.exists("later/zarr.json") and store.exists("later/c/0")

    def test_bounded_read(self, store: Store) -> None:
        store.write("a/big", b"x" * 5000)
        store.write("a/empty", b"")
        assert store.read("a/big", max_bytes=5000) == b"x" * 5000
        with pytest.raises(UnreadableObjectError, match="a/big.*over 4999"):
            store.read("a/big", max_bytes=4999)
        assert store.read("a/empty", max_bytes=0) == b""
        with pytest.raises(ObjectNotFoundError):
            store.read("a/missing", max_bytes=10)

    def test_write_stream(self, store: Store) -> None:
        # Parts larger than an object store's upload part (16 MiB) so that a real
        # multipart / resumable upload is made.
        part = np.arange(5 << 20, dtype=np.int32).tobytes()
        assert store.write_stream("s/big", (memoryview(part) for _ in range(4))) == 4 * len(part)
        assert store.read("s/big") == part * 4
        assert store.write_stream("s/empty", iter(())) == 0
        assert store.read("s/empty") == b""

    def test_failed_write_stream_leaves_the_old_object(self, store: Store) -> None:
        store.write("s/obj", b"old")
        part = b"n" * (17 << 20)

        def parts() -> Iterator[bytes]:
            yield part  # a first part is uploaded before the failure
            yield part
            raise RuntimeError("the source failed")

        for key in ("s/obj", "s/new"):
            with pytest.raises(RuntimeError, match="the source failed"):
                store.write_stream(key, parts())
        assert store.read("s/obj") == b"old"
        assert not store.exists("s/new")
        assert store.list("s") == ["s/obj"]

    def test_write_if_absent_creates_once(self, store: Store) -> None:
        assert store.write_if_absent("x/COMMIT", b"first") is True
        assert store.write_if_absent("x/COMMIT", b"second") is False
        assert store.read("x/COMMIT") == b"first"

    def test_write_if_absent_race_has_one_winner(self, store: Store) -> None:
        results: list[tuple[bool, int]] = []
        barrier = threading.Barrier(8)

        def attempt(i: int) -> None:
            barrier.wait()
            results.append((store.write_if_absent("race/COMMIT", f"w{i}".encode()), i))

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [i for ok, i in results if ok]
        assert len(winners) == 1
        assert store.read("race/COMMIT") == f"w{winners[0]}".encode()

    def test_list_recursive_and_children(self, store: Store) -> None:
        for key in ("s/1/COMMIT", "s/1/a/x", "s/2/a/y", "s/10/z", "top"):
            store.write(key, b"v")
        assert store.list("s") == ["s/1/COMMIT", "s/1/a/x", "s/10/z", "s/2/a/y"]
        assert store.list("s/1") == ["s/1/COMMIT", "s/1/a/x"]
        assert store.list_children("s") == ["1", "10", "2"]
        assert store.list_children("s/1") == ["COMMIT", "a"]
        assert store.list_children("") == ["s", "top"]
        assert store.list_children("nothing") == []
        assert store.list("nothing") == []

    def test_delete_and_delete_prefix(self, store: Store) -> None:
        for key in ("d/1/a", "d/1/b/c", "d/10/a", "e"):
            store.write(key, b"v")
        store.delete("e")
        store.delete("e")  # deleting a missing object is fine
        assert not store.exists("e")
        store.delete_prefix("d/1")
        assert store.list("d") == ["d/10/a"]

    @pytest.mark.parametrize("bad", ["../x", "a/../../x", "/abs", "a//b", "a/./b", "a\x00b",
                                     "a\\b", ""])
    def test_keys_cannot_escape(self, store: Store, bad: str) -> None:
        with pytest.raises(InvalidKeyError):
            store.write(bad, b"v")
        with pytest.raises(InvalidKeyError):
            store.read(bad)
        with pytest.raises(InvalidKeyError):
            store.delete_prefix(bad)

    def test_child_store_shares_objects(self, store: Store) -> None:
        child = store.child("sub/dir")
        child.write("k", b"v")
        assert store.read("sub/dir/k") == b"v"
        assert child.list("") == ["k"]

    def test_read_async_reads_as_read_does(self, store: Store) -> None:
        store.write("ra/a", b"hello")
        store.write("ra/empty", b"")
        reads = [store.read_async(k, max_bytes=5) for k in ("ra/a", "ra/empty")]
        assert [r.result(timeout=60) for r in reads] == [b"hello", b""]
        with pytest.raises(ObjectNotFoundError):
            store.read_async("ra/none", max_bytes=5).result(timeout=60)
        with pytest.raises(UnreadableObjectError):
            store.read_async("ra/a", max_bytes=4).result(timeout=60)
        with pytest.raises(InvalidKeyError):
            store.read_async("ra/../a", max_bytes=5)

    def test_read_async_into_a_buffer(self, store: Store) -> None:
        store.write("ri/a", b"hello")
        buffer = bytearray(b"x" * 8)
        got = store.read_async("ri/a", max_bytes=6, into=memoryview(buffer)).result(timeout=60)
        assert bytes(got) == b"hello" and buffer == b"hellox" + b"xx"
        exact = bytearray(5)
        assert bytes(store.read_async("ri/a", max_bytes=5, into=memoryview(exact))
                     .result(timeout=60)) == b"hello"
        with pytest.raises(UnreadableObjectError):  # over max_bytes: never past the buffer
            store.read_async("ri/a", max_bytes=4, into=memoryview(bytearray(8))).result(
                timeout=60)
        with pytest.raises(ObjectNotFoundError):
            store.read_async("ri/none", max_bytes=4, into=memoryview(bytearray(4))).result(
                timeout=60)
        with pytest.raises(ValueError, match="cannot take"):  # a buffer too small
            store.read_async("ri/a", max_bytes=8, into=memoryview(bytearray(4)))

    def test_kvstore_spec_addresses_same_objects(self, store: Store) -> None:
        spec = {"driver": "zarr3", "kvstore": store.kvstore_spec("arr"), "create": True,
                "metadata": {"shape": [4], "data_type": "int32",
                             "chunk_grid": {"name": "regular",
                                            "configuration": {"chunk_shape": [2]}}}}
        arr = ts.open(spec, context=store.tensorstore_context()).result()
        arr.write(np.arange(4, dtype=np.int32)).result()
        assert "arr/zarr.json" in store.list("arr")
        assert "arr/c/1" in store.list("arr")
        kv = ts.KvStore.open(store.kvstore_spec(""), context=store.tensorstore_context()).result()
        store.write("plain", b"hello")
        assert kv.read("plain").result().value == b"hello"

    def test_concurrent_delete_prefix_removes_everything(self, store: Store) -> None:
        for i in range(40):
            store.write(f"gone/{i % 5}/k{i}", b"v")
        barrier = threading.Barrier(4)

        def delete() -> None:
            barrier.wait()
            store.delete_prefix("gone")

        threads = [threading.Thread(target=delete) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert store.list("gone") == []

    def test_list_sizes(self, store: Store) -> None:
        store.write("sz/a", b"12345")
        store.write("sz/b/c", b"")
        store.write("szz", b"x")
        assert store.list_sizes("sz") == {"sz/a": 5, "sz/b/c": 0}
