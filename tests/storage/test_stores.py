import math
import os
import secrets

import pytest

from ckpt.storage import (
    Deadline,
    DeadlineStore,
    LocalStore,
    MemoryStore,
    ObjectNotFoundError,
    Op,
    UnsupportedURLError,
    open_store,
    parse_url,
)
from ckpt.storage.testing import StoreConformance
from tests.helpers.faults import FaultyStore, is_chunk_write
from tests.helpers.saves import started


class TestLocalStore(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path):
        return open_store(str(tmp_path / "root"))

    def test_is_local(self, store):
        assert isinstance(store, LocalStore)

    def test_interrupted_write_leaves_no_visible_object(self, store, tmp_path):
        # A crash between the temporary file and the rename leaves only a hidden file.
        store.write("a/real", b"x")
        hidden = tmp_path / "root" / "a" / ".COMMIT.ckpt-tmp-0123"
        hidden.write_bytes(b"partial")
        assert store.list("a") == ["a/real"]
        assert store.list_children("a") == ["real"]
        with pytest.raises(ObjectNotFoundError):
            store.read("a/COMMIT")

    def test_write_if_absent_fsyncs_whole_file_under_name(self, store, tmp_path):
        assert store.write_if_absent("c/COMMIT", b"data" * 1000)
        assert (tmp_path / "root" / "c" / "COMMIT").read_bytes() == b"data" * 1000
        assert [p.name for p in (tmp_path / "root" / "c").iterdir()] == ["COMMIT"]

    def test_unwritable_folder_is_a_storage_error_naming_the_key(self, store, tmp_path):
        if os.geteuid() == 0:
            blocker = tmp_path / "root"
            blocker.parent.mkdir(exist_ok=True)
            blocker.write_bytes(b"a file where a folder should be")
        else:
            (tmp_path / "root").mkdir()
            os.chmod(tmp_path / "root", 0o500)
        with pytest.raises(OSError, match="x/y"):
            store.write("x/y", b"v")


    @pytest.mark.parametrize("one_sync", [True, False])
    def test_write_many_syncs_once_where_it_can_and_leaves_nothing_on_failure(
            self, store, tmp_path, monkeypatch, one_sync):
        """On ext4/xfs/btrfs: two syncs of the file system for the batch (the data, then
        the renames), no fsync per object; elsewhere an fsync each. A failure (a file where
        a folder must be) names the key and leaves no temporary file behind."""
        import ckpt.storage._local as local

        syncs, fsyncs = [], []
        monkeypatch.setattr(local, "_syncfs_durable", lambda path: one_sync)
        real_syncfs, real_fsync = local.SyncPoint.sync, os.fsync

        def syncfs(point):
            syncs.append(point.path)
            real_syncfs(point)

        def fsync(fd):
            fsyncs.append(fd)
            real_fsync(fd)

        monkeypatch.setattr(local.SyncPoint, "sync", syncfs)
        monkeypatch.setattr(os, "fsync", fsync)
        store.write_many([(f"b/{i}/zarr.json", b"{}") for i in range(20)])
        assert store.list("b") == sorted(f"b/{i}/zarr.json" for i in range(20))
        assert (len(syncs), len(fsyncs) > 0) == ((2, False) if one_sync else (0, True))
        (tmp_path / "root" / "b" / "blocker").write_bytes(b"a file")
        with pytest.raises(OSError, match="blocker/zarr.json"):
            store.write_many([("b/0/zarr.json", b"new"), ("b/blocker/zarr.json", b"x")])
        leftovers = [p for p in (tmp_path / "root").rglob("*") if ".ckpt-tmp-" in p.name]
        assert leftovers == []
        assert store.read("b/0/zarr.json") in (b"{}", b"new")  # either, never a torn one

    def test_a_save_makes_its_chunks_durable_with_one_sync(self, tmp_path, monkeypatch):
        """On a file system `syncfs` makes durable, TensorStore writes each chunk without
        fsync (``sync_later``) and the writer syncs once before its host report: three
        syncs for a save of 50 arrays (two for the batch of zarr.json files, one for the
        chunks) where there were 100 fsyncs of chunk files and 50 of zarr.json files."""
        import numpy as np

        import ckpt
        import ckpt.storage._local as local

        monkeypatch.setattr(local, "_syncfs_durable", lambda path: True)
        store = open_store(str(tmp_path / "root"))
        assert isinstance(store, LocalStore)
        assert "file_io_sync" not in store.kvstore_spec("a")
        assert store._sync_point is None
        assert store.kvstore_spec("a", sync_later=True)["file_io_sync"] is False
        # Opened before any write it must make durable: its syncfs reports writeback errors
        # the file system recorded since (a descriptor opened at sync time would not).
        assert store._sync_point is not None
        syncs = []
        real = local.SyncPoint.sync

        def syncfs(point):
            syncs.append(point.path)
            real(point)

        monkeypatch.setattr(local.SyncPoint, "sync", syncfs)
        tree = {f"w{i}": np.full(5000, i, np.float32) for i in range(50)}
        ckpt.save(store, tree)
        assert len(syncs) == 3, syncs
        out = ckpt.restore(store)
        assert all((out[f"w{i}"] == i).all() for i in range(50))

    def test_syncfs_is_trusted_only_on_file_systems_known_to_honour_it(self, tmp_path,
                                                                        monkeypatch):
        import ckpt.storage._local as local

        with monkeypatch.context() as m:  # before 5.8 syncfs reports no writeback error
            m.setattr(local, "_kernel", lambda: (5, 4))
            assert not local._syncfs_durable(str(tmp_path))

        assert local._syncfs_durable(str(tmp_path)) == (
            local._kernel() >= (5, 8)
            and local._fs_type(str(tmp_path)) in (0xEF53, 0x58465342, 0x9123683E))
        if os.path.isdir("/dev/shm"):  # tmpfs: fsync each (a no-op there) rather than trust
            assert not local._syncfs_durable("/dev/shm")


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self):
        return open_store(f"memory://test-{secrets.token_hex(4)}/root")

    def test_is_memory(self, store):
        assert isinstance(store, MemoryStore)

    def test_stores_of_other_names_are_separate(self, store):
        other = open_store(store.url.replace("/root", "/other"))
        store.write("k", b"v")
        assert not other.exists("k")


def test_parse_urls(tmp_path):
    assert parse_url(str(tmp_path)).scheme == "file"
    assert parse_url(f"file://{tmp_path}").path == str(tmp_path)
    loc = parse_url("gs://bucket/a/b/")
    assert (loc.scheme, loc.bucket, loc.path) == ("gs", "bucket", "a/b")
    loc = parse_url("s3://bkt")
    assert (loc.scheme, loc.bucket, loc.path, loc.url) == ("s3", "bkt", "", "s3://bkt")
    assert parse_url("relative/dir").path == os.path.abspath("relative/dir")


@pytest.mark.parametrize("url", ["ftp://host/x", "hdfs://n/x", "gs:///nobucket", "s3://b/../x",
                                 "", "file://relative"])
def test_bad_urls_are_rejected_by_name(url):
    with pytest.raises(UnsupportedURLError) as err:
        parse_url(url)
    assert isinstance(err.value, ValueError)
    if url:
        assert url.split("://")[0] in str(err.value)


@pytest.mark.slow  # a server
class TestS3Store(StoreConformance):
    @pytest.fixture
    def store(self, request, tmp_path):
        from tests.conftest import backend_url

        return open_store(backend_url(request, tmp_path, "s3"))


@pytest.mark.slow  # a server
class TestGcsStore(StoreConformance):
    @pytest.fixture
    def store(self, request, tmp_path):
        from tests.conftest import backend_url

        return open_store(backend_url(request, tmp_path, "gcs"))


class TestDeadlineStore(StoreConformance):
    """A wrapper store behaves as the store it wraps (here with a deadline far away)."""

    @pytest.fixture
    def store(self, tmp_path):
        return DeadlineStore(open_store(str(tmp_path / "root")), Deadline(3600, "testing"))


class TestCountingWrapper(StoreConformance):
    @pytest.fixture
    def store(self):
        return FaultyStore(f"memory://test-{secrets.token_hex(4)}/root")


def test_every_entry_point_takes_a_store_and_a_wrapper_sees_each_chunk_and_read(tmp_path):
    """A `WrapperStore` given in place of a URL carries the whole save, restore, verify and
    manager: its `_delegate` sees every object written, and its `wait` every chunk."""
    import jax
    import numpy as np

    import ckpt

    calls: list[tuple[str, str]] = []
    seen = FaultyStore(tmp_path / "c", after=lambda doing, key, args: calls.append((doing, key)))
    x = np.arange(4 * 2**20, dtype=np.float32).reshape(2048, 2048)  # 16 MiB: several chunks
    ckpt.save(seen, {"x": x, "n": 3})
    chunks = [c for c in calls if is_chunk_write(c[0])]
    [leaf] = [leaf for leaf in ckpt.metadata(tmp_path / "c").leaves if leaf.name == "x"]
    grid = (-(-n // c) for n, c in zip(x.shape, leaf.chunk_shape, strict=True))
    assert len(chunks) == math.prod(grid)
    written = {key.split("/", 1)[1] for doing, key in calls if doing == Op.WRITE}
    assert {"hosts/0.msgpack", "manifest.msgpack"} <= written
    assert any(doing == Op.CREATE and key == "COMMIT" for doing, key in calls)
    calls.clear()
    out = ckpt.restore(seen)
    assert np.array_equal(out["x"], x)
    assert out["n"] == 3
    assert ("reading", "COMMIT") in calls
    assert ckpt.verify(seen).ok
    with ckpt.CheckpointManager(FaultyStore(tmp_path / "run")) as mgr:
        started(mgr.save(1, {"x": jax.numpy.ones(8)})).wait()
        assert mgr.latest_step() == 1
        assert mgr.restore()["x"].sum() == 8


def test_a_read_queued_past_its_deadline_is_refused_naming_the_object(tmp_path):
    """`DeadlineStore.read_async` queues nothing once its deadline has passed (a restore
    whose time ran out starts no more chunk reads)."""
    from ckpt.storage import DeadlineExceededError

    store = open_store(str(tmp_path))
    store.write("a/c/0", b"x")
    spent = DeadlineStore(store, Deadline(1e-9, f"restoring {store.url}"))
    with pytest.raises(DeadlineExceededError, match=r"restoring .* reading .*a/c/0"):
        spent.read_async("a/c/0", max_bytes=1)
    assert DeadlineStore(store, Deadline(60, "x")).read_async(
        "a/c/0", max_bytes=1).result(timeout=60) == b"x"


def test_a_foreign_error_of_a_plain_chunk_read_is_a_storage_error_naming_the_leaf(tmp_path):
    """A store of the caller's own whose read raises something other than a storage error
    fails the restore with a `StorageError` naming the leaf and chunk, not its raw error."""
    import concurrent.futures

    import numpy as np

    import ckpt
    from ckpt.storage import StorageError, WrapperStore

    class Broken(WrapperStore):
        def read_async(self, key, *, max_bytes, into=None):
            future: concurrent.futures.Future[bytes | memoryview] = concurrent.futures.Future()
            future.set_exception(RuntimeError("the driver broke"))
            return future

    url = str(tmp_path / "ck")
    ckpt.save(url, {"w": np.arange(20_000, dtype=np.float32)})
    with pytest.raises(StorageError, match=r"reading leaf w chunk \(0,\) failed: the driver"):
        ckpt.restore(Broken(open_store(url)))
