"""Edited checkpoints never restore wrong data: every edit of a zarr.json, of the manifest
(re-signed in COMMIT, as a buggy tool or a forger would) or of chunk bytes gives either the
exact saved values or a `CkptError` (docs/protocol.md, "What is checked where")."""

import contextlib
import json
import shutil
import tracemalloc
from typing import Any

import jax
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt._format import COMMIT, MANIFEST, CommitRecord, sha256
from ckpt.errors import CkptError, CorruptCheckpointError
from ckpt.storage import Op, open_store
from tests.conftest import make_mesh
from tests.helpers.mutation import mutate


@contextlib.contextmanager
def _allocations():
    """Yields a list that holds, once the block ends, the most bytes Python and numpy held
    at once inside it (tracemalloc's peak). It counts a buffer from its allocation, touched
    or not; ``ru_maxrss`` only moves past the process's earlier peak, so after one large
    test it measures nothing, and untouched pages of a huge buffer never count at all."""
    tracemalloc.start()
    peak: list[int] = []
    try:
        yield peak
        peak.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


def _tree(mesh):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 128)).astype(np.float32)
    return {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
            "b": rng.standard_normal(6000).astype(np.float32),
            "i": np.arange(5000, dtype=np.int64).reshape(50, 100), "n": 3}


def _host(tree):
    return {k: np.asarray(v) if k != "n" else v for k, v in tree.items()}


def _zarr_jsons(store):
    return sorted(k for k in store.list() if k.endswith("/zarr.json"))


EDITS = {
    "big-endian": lambda m: m["codecs"][0]["configuration"].update(endian="big"),
    "transpose": lambda m: m["codecs"].insert(0, {"name": "transpose",
                                                 "configuration": {"order": list(
                                                     reversed(range(len(m["shape"]))))}}),
    "dtype": lambda m: m.update(data_type="int32" if m["data_type"] == "float32"
                                else "float32"),
    "fill-value": lambda m: m.update(fill_value=1),
    "chunk-shape": lambda m: m["chunk_grid"]["configuration"].update(
        chunk_shape=[max(1, c // 2) for c in m["chunk_grid"]["configuration"]["chunk_shape"]]),
}


def _edit_zarr_json(store, leaf, edit):
    key = next(k for k in _zarr_jsons(store) if f"/arrays/{leaf}/" in k)
    meta = json.loads(store.read(key))
    EDITS[edit](meta)
    store.write(key, json.dumps(meta).encode())


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_zarr_json_is_named_on_every_read_path(root_url, mesh24, edit):
    """An array read through TensorStore (chunks over 1 MiB, or compressed) has its
    zarr.json compared with the manifest on every read path."""
    url = f"{root_url}/ck"
    large = np.random.default_rng(2).standard_normal(600 * 600).astype(np.float32)
    ckpt.save(url, {"b": large, "n": 3})  # one chunk of 1.4 MiB
    _edit_zarr_json(open_store(url), "b", edit)
    replicated = {"b": jax.ShapeDtypeStruct(large.shape, np.float32,
                                            sharding=NamedSharding(mesh24, P())), "n": 0}
    for how in (lambda: ckpt.restore(url), lambda: ckpt.restore(url, target=replicated),
                lambda: ckpt.restore(url, mesh=mesh24)):
        with pytest.raises(CorruptCheckpointError, match=r"leaf b: its stored zarr.json"):
            how()
    report = ckpt.verify(url)
    assert not report.ok
    assert any(p.leaf == "b" for p in report.problems), report.problems
    with pytest.raises(CorruptCheckpointError):
        ckpt.reshard(url, f"{root_url}/copy", mesh={"data": 4, "model": 2})
    assert not open_store(f"{root_url}/copy").exists(COMMIT)


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_zarr_json_of_small_plain_chunks_changes_no_value(root_url, mesh24, edit):
    """An array of small whole chunks is read as plain objects, decoded by the manifest
    alone: an edited zarr.json changes nothing restore or reshard returns; verify, which
    checks every zarr.json, names it."""
    url = f"{root_url}/ck"
    saved = _tree(mesh24)
    ckpt.save(url, saved)
    _edit_zarr_json(open_store(url), "b", edit)
    replicated = {"b": jax.ShapeDtypeStruct((6000,), np.float32,
                                            sharding=NamedSharding(mesh24, P()))}
    expected = _host(saved)["b"]
    for how in (lambda: ckpt.restore(url), lambda: ckpt.restore(url, target=replicated),
                lambda: ckpt.restore(url, mesh=mesh24)):
        assert np.asarray(how()["b"]).tobytes() == expected.tobytes()
    report = ckpt.verify(url)
    assert not report.ok
    assert any(p.leaf == "b" for p in report.problems), report.problems
    ckpt.reshard(url, f"{root_url}/copy", mesh={"data": 4, "model": 2})
    assert np.asarray(ckpt.restore(f"{root_url}/copy")["b"]).tobytes() == expected.tobytes()
    assert ckpt.verify(f"{root_url}/copy").ok


# -- property: random edits -----------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    mesh = make_mesh((2, 4))
    folder = tmp_path_factory.mktemp("pristine") / "ck"
    tree = _tree(mesh)
    ckpt.save(str(folder), tree)
    return folder, _host(tree), mesh


def _restores_exactly_or_fails_cleanly(url, expected, mesh):
    target = {"w": jax.ShapeDtypeStruct((64, 128), np.float32,
                                        sharding=NamedSharding(mesh, P("model", None))),
              "b": jax.ShapeDtypeStruct((6000,), np.float32, sharding=NamedSharding(mesh, P())),
              "i": jax.ShapeDtypeStruct((50, 100), np.int64,
                                        sharding=NamedSharding(mesh, P(None, "data"))),
              "n": 0}
    for how in (lambda: ckpt.restore(url), lambda: ckpt.restore(url, target=target)):
        try:
            out = how()
        except CkptError:
            continue
        for k, v in expected.items():
            if k not in out:
                continue  # a leaf left out of a re-signed manifest is absent, not wrong
            got = out[k]
            if k == "n":
                assert int(np.asarray(got)) == v
            else:
                # (JAX without x64 gives an int64 target as int32: same values.)
                got = np.asarray(got)
                assert got.dtype.kind == v.dtype.kind
                assert got.shape == v.shape
                assert got.astype(v.dtype).tobytes() == v.tobytes(), f"wrong data for {k!r}"


def _copy(pristine, tmp_path_factory):
    folder, expected, mesh = pristine
    dst = tmp_path_factory.mktemp("edited") / "ck"
    shutil.copytree(folder, dst)
    return str(dst), open_store(str(dst)), expected, mesh


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_zarr_json_and_chunk_edits_never_yield_wrong_data(pristine, tmp_path_factory,
                                                                 data):
    url, store, expected, mesh = _copy(pristine, tmp_path_factory)
    keys = sorted(k for k in store.list() if "/arrays/" in k)
    for key in data.draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
        store.write(key, mutate(data, store.read(key), edits=4, cut=8, insert=4))
    _restores_exactly_or_fails_cleanly(url, expected, mesh)


def _resign(store, manifest_bytes):
    rec = CommitRecord.decode(store.read(COMMIT), COMMIT)
    store.write(f"{rec.attempt}/{MANIFEST}", manifest_bytes)
    store.write(COMMIT, CommitRecord(attempt=rec.attempt, manifest_sha256=sha256(manifest_bytes),
                                     committed_at=rec.committed_at).encode())


leafy = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.text(max_size=8),
                  st.lists(st.integers(-3, 2**33), max_size=4), st.binary(max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_resigned_manifest_edits_never_yield_wrong_data(pristine, tmp_path_factory, data):
    url, store, expected, mesh = _copy(pristine, tmp_path_factory)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    leaves = doc["leaves"]
    how = data.draw(st.sampled_from(["field", "swap-names", "duplicate-path", "drop"]))
    if how == "field":
        # Not a stored value itself ("value", "data"): the manifest is what says what those
        # are, so a re-signed one changes them by definition (docs/protocol.md: checksums
        # detect damage, not forgery).
        leaf = data.draw(st.sampled_from(leaves))
        field = data.draw(st.sampled_from(sorted(set(leaf) - {"value", "data"})))
        leaf[field] = data.draw(leafy)
    elif how == "swap-names":
        arrays = [x for x in leaves if x.get("kind") == "array"]
        a, b = data.draw(st.permutations(arrays))[:2]
        a["name"], b["name"] = b["name"], a["name"]
    elif how == "duplicate-path":
        a, b = data.draw(st.permutations(leaves))[:2]
        b["path"] = a["path"]
    else:
        leaves.remove(data.draw(st.sampled_from(leaves)))
    _resign(store, msgpack.packb(doc))
    if how == "duplicate-path":
        with pytest.raises(CkptError):
            ckpt.restore(url)
    _restores_exactly_or_fails_cleanly(url, expected, mesh)


def _leaf(doc, name):
    return next(x for x in doc["leaves"] if x["path"] == [["key", name]])


SIZE_LIES = {
    # A shape the chunks do not bear out: 2**40 floats in one chunk of ~24 KiB.
    "huge-shape": lambda d: _leaf(d, "b").update(shape=[2**40], chunk_shape=[2**40],
                                                 chunks={**_leaf(d, "b")["chunks"],
                                                         "writer": [0], "nbytes": [24000],
                                                         "crc32c": [0]}),
    # One chunk's size disagrees with its box.
    "chunk-size": lambda d: _leaf(d, "i")["chunks"]["nbytes"].__setitem__(0, 1 << 40),
    # An inline leaf whose shape product wraps around in 64-bit arithmetic.
    "inline-overflow": lambda d: _leaf(d, "s").update(shape=[2**32, 2**32], dtype="uint8",
                                                      data=b""),
    "dtype": lambda d: _leaf(d, "w").update(dtype="float128"),
}


@pytest.mark.parametrize("lie", sorted(SIZE_LIES))
def test_sizes_in_a_resigned_manifest_are_checked_before_allocating(tmp_path, mesh24, lie):

    url = str(tmp_path / "ck")
    tree = _tree(mesh24)
    tree["s"] = np.arange(6, dtype=np.float32)  # small: stored inline in the manifest
    ckpt.save(url, tree)
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    SIZE_LIES[lie](doc)
    _resign(store, msgpack.packb(doc))
    name = {"huge-shape": "b", "chunk-size": "i", "inline-overflow": "s", "dtype": "w"}[lie]
    with _allocations() as peak:
        for read in (ckpt.restore, ckpt.metadata, ckpt.verify):
            with pytest.raises(CorruptCheckpointError, match=rf"leaf \d+ \({name}\)"):
                read(url)
    assert peak[0] < 64 << 20, peak


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_consistent_forgery_of_a_huge_array_is_refused_before_allocating(tmp_path, mesh24,
                                                                            compression):
    """A manifest edited and re-signed so that every size in it agrees (a 1 PiB array of
    one 1 PiB chunk), and the array's zarr.json edited to match: nothing in the manifest
    contradicts itself, so only the stored bytes can tell. Restore compares each chunk
    object's size with the manifest before it allocates anything, and names the chunk
    (compressed, with the least a zstd frame of that many bytes holds: 32 GiB)."""

    url = str(tmp_path / "ck")
    ckpt.save(url, _tree(mesh24), compression=compression)
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    leaf = _leaf(doc, "b")
    leaf.update(shape=[2**48], chunk_shape=[2**48])
    leaf["chunks"].update(writer=[0], nbytes=[2**50], crc32c=[0])
    _resign(store, msgpack.packb(doc))
    zarr_json = f"{attempt}/arrays/{leaf['name']}/zarr.json"
    meta = json.loads(store.read(zarr_json))
    meta["shape"] = [2**48]
    meta["chunk_grid"]["configuration"]["chunk_shape"] = [2**48]
    store.write(zarr_json, json.dumps(meta).encode())
    with _allocations() as peak, pytest.raises(
            CorruptCheckpointError, match=r"leaf b: chunk \(0,\) holds \d+ bytes"):
        ckpt.restore(url)
    assert peak[0] < 64 << 20, peak


@pytest.mark.parametrize("rewrite", ["reshard", "convert"])
def test_rewrites_never_launder_a_damaged_source(root_url, mesh24, rewrite):
    """Two swapped chunks: restore and verify reject the source, so reshard and convert
    must refuse it too instead of writing a copy that passes verify."""
    url = f"{root_url}/ck"
    # 1 MiB: a smaller array one process holds whole is one chunk (`WHOLE_ARRAY_BYTES`).
    w = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)
    ckpt.save(url, {"w": jax.device_put(w, NamedSharding(mesh24, P("data", "model")))})
    store = open_store(url)
    keys = sorted(k for k in store.list() if "/arrays/w/c/" in k)
    a, b = store.read(keys[0]), store.read(keys[1])
    store.write(keys[0], b)
    store.write(keys[1], a)
    run = ckpt.reshard if rewrite == "reshard" else ckpt.convert
    with pytest.raises(CorruptCheckpointError, match=r"leaf w chunk"):
        run(url, f"{root_url}/copy", mesh={"data": 4, "model": 2})
    assert not open_store(f"{root_url}/copy").exists(COMMIT)


# -- what a save snapshots and refuses ------------------------------------------------------

def test_big_endian_numpy_leaves_round_trip(root_url):
    url = f"{root_url}/be"
    big = np.arange(10_000, dtype=">f4") / 7  # 40 KB: a zarr array, not inline
    small = np.arange(10, dtype=">i8")
    ckpt.save(url, {"big": big, "small": small})
    out = ckpt.restore(url)
    assert np.array_equal(out["big"], big)
    assert out["big"].dtype == np.float32
    assert np.array_equal(out["small"], small)
    assert ckpt.verify(url).ok


def test_metadata_changed_after_save_async_returns_is_not_saved(tmp_path):
    from tests.helpers.faults import FaultyStore, hold_background

    url = str(tmp_path / "m")
    meta: dict[str, Any] = {"lr": 0.1, "tags": ["a"]}  # plain msgpack data, of no one type
    gate = __import__("threading").Event()
    handle = ckpt.save_async(FaultyStore(url, before=hold_background(gate)), {"x": np.arange(5)},
                             metadata=meta)
    meta["lr"] = 99.0
    meta["tags"].append("b")
    gate.set()
    handle.wait()
    assert ckpt.metadata(url).metadata == {"lr": 0.1, "tags": ["a"]}


@pytest.mark.parametrize(("tree", "what"), [
    ({"ints": {2**64: np.arange(3)}}, "does not fit in 64 bits"),
    ({"ok\ud800": np.arange(3)}, "lone surrogate"),
    ({"s": "bad\udcff"}, "lone surrogate"),
])
def test_unstorable_names_and_strings_are_refused_before_anything_is_written(tmp_path, tree,
                                                                            what):
    url = str(tmp_path / "k")
    with pytest.raises(ckpt.UnsupportedLeafError, match=what):
        ckpt.save_async(url, {"w": np.zeros(10_000), **tree})
    assert not (tmp_path / "k").exists()
    with pytest.raises(ckpt.errors.InvalidMetadataError):
        ckpt.save_async(url, {"w": 1}, metadata={"note": "x\ud800"})
    assert not (tmp_path / "k").exists()


def test_stray_non_ascii_digit_folders_are_not_steps(tmp_path):
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root)) as mgr:
        mgr.save(1, {"x": 1})
    (root / "²").mkdir()
    (root / "٣").mkdir()
    mgr = ckpt.CheckpointManager(str(root), read_only=True)
    assert mgr.steps() == [1]
    assert mgr.latest_step() == 1
    from ckpt import cli
    assert cli.main(["list", str(root)]) == 0


# -- hostile files on a local disk ----------------------------------------------------------

def _local_checkpoint(tmp_path, mesh):
    url = str(tmp_path / "ck")
    ckpt.save(url, _tree(mesh))
    return url, open_store(url)


@pytest.mark.parametrize("which", ["COMMIT", "manifest", "zarr.json", "chunk", "report"])
def test_a_fifo_in_place_of_any_file_fails_instead_of_blocking(tmp_path, mesh24, which):
    import os

    url, store = _local_checkpoint(tmp_path, mesh24)
    attempt = ckpt.metadata(url).attempt
    key = {"COMMIT": COMMIT, "manifest": f"{attempt}/{MANIFEST}",
           "zarr.json": f"{attempt}/arrays/b/zarr.json",
           "chunk": sorted(k for k in store.list() if "/arrays/b/c/" in k)[0],
           "report": f"{attempt}/hosts/0.msgpack"}[which]
    path = os.path.join(url, *key.split("/"))
    os.unlink(path)
    os.mkfifo(path)
    if which in ("report", "zarr.json"):  # verify reports problems instead of raising
        problems = "; ".join(str(p) for p in ckpt.verify(url).problems)
        assert "not a regular file" in problems, problems
    if which == "report":
        return
    if which == "zarr.json":  # b is read as a plain object: its zarr.json is never opened
        assert np.asarray(ckpt.restore(url)["b"]).shape == (6000,)
        return
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        ckpt.restore(url)


def test_a_socket_in_place_of_a_small_arrays_chunk_is_named_as_damage(tmp_path, mesh24,
                                                                      monkeypatch):
    """A plain chunk's read refuses a socket as it does a FIFO (a socket fails to open)."""
    import os
    import socket

    url, store = _local_checkpoint(tmp_path, mesh24)
    key = sorted(k for k in store.list() if "/arrays/b/c/" in k)[0]
    path = os.path.join(url, *key.split("/"))
    os.unlink(path)
    monkeypatch.chdir(os.path.dirname(path))  # (a socket's path has at most 107 bytes)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.path.basename(path))
        with pytest.raises(CorruptCheckpointError, match="leaf b chunk.*not a regular file"):
            ckpt.restore(url)


@pytest.mark.parametrize("which", ["COMMIT", "manifest"])
def test_oversized_objects_are_refused_while_reading(tmp_path, mesh24, which):
    import os

    url, _ = _local_checkpoint(tmp_path, mesh24)
    attempt = ckpt.metadata(url).attempt
    key = COMMIT if which == "COMMIT" else f"{attempt}/{MANIFEST}"
    path = os.path.join(url, *key.split("/"))
    with open(path, "r+b") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB that cost nothing on disk
    with _allocations() as peak, pytest.raises(CorruptCheckpointError, match="over"):
        ckpt.restore(url)
    assert peak[0] < 64 << 20, peak  # the size is looked at, nothing of it read


@pytest.mark.slow  # servers
def test_oversized_objects_are_refused_on_object_stores(request, tmp_path):
    from tests.conftest import backend_url

    for backend in ("s3", "gcs"):
        store = open_store(backend_url(request, tmp_path, backend))
        store.write("big", b"x" * 100_000)
        assert store.read("big", max_bytes=100_000) == b"x" * 100_000
        with pytest.raises(__import__("storage").UnreadableObjectError, match="over 1000"):
            store.read("big", max_bytes=1000)
        store.write("empty", b"")
        assert store.read("empty", max_bytes=10) == b""


def test_commit_linked_to_dev_zero_is_refused(tmp_path, mesh24):
    import os

    url, _ = _local_checkpoint(tmp_path, mesh24)
    os.unlink(os.path.join(url, COMMIT))
    os.symlink("/dev/zero", os.path.join(url, COMMIT))
    with pytest.raises(CorruptCheckpointError, match="not a regular file"):
        ckpt.restore(url)


def test_a_restore_during_an_overwrite_gets_one_checkpoint_whole(root_url):
    """The overwrite commits and deletes the old attempt after the reader read the old
    manifest and before it read a chunk: the reader gets the new checkpoint, whole."""
    from tests.helpers.faults import FaultyStore

    url = f"{root_url}/ow"
    old = {"w": np.full(20_000, 1.0, np.float32), "n": 1}
    new = {"w": np.full(20_000, 2.0, np.float32), "n": 2}
    ckpt.save(url, old)
    opened: list[str] = []  # the attempts whose manifests the reader read

    def overwritten_first(doing, key, args):
        if doing == Op.READ and key.endswith(f"/{MANIFEST}"):
            if not opened:
                ckpt.save(url, new, overwrite=True)
            opened.append(key.split("/")[0])

    out = ckpt.restore(FaultyStore(url, after=overwritten_first))
    assert len(set(opened)) == 2
    assert out["n"] == 2
    assert np.all(out["w"] == 2.0)
    # Damage that no overwrite explains is still reported, not retried forever.
    store = open_store(url)
    chunk = next(k for k in store.list() if "/arrays/w/c/" in k)
    store.delete(chunk)
    with pytest.raises(CorruptCheckpointError, match=r"leaf w chunk"):
        ckpt.restore(url)


def test_a_metric_name_that_is_not_text_is_refused_before_writing(tmp_path):
    root = tmp_path / "run"
    with ckpt.CheckpointManager(str(root)) as mgr, pytest.raises(ValueError, match="metrics"):
        mgr.save(1, {"w": np.zeros(10_000)}, metrics={"loss\ud800": 1.0})
    assert not (root / "1").exists()


@pytest.mark.parametrize("target", [".", "/"])
def test_array_folder_check_does_not_follow_linked_folders(tmp_path, mesh24, target):
    """A link to a folder (itself: a walk that never ends; the root: a walk of everything)
    is refused as what it is, at once, not followed."""
    import os

    url = str(tmp_path / "ck")
    w = np.arange(512 * 512, dtype=np.float32).reshape(512, 512)  # 8 chunks: its folder is
    ckpt.save(url, {"w": jax.device_put(w, NamedSharding(mesh24, P("data", "model"))),
                    "b": np.arange(6000, dtype=np.float32)})  # listed; b's files are stat'ed
    arrays = os.path.join(url, ckpt.metadata(url).attempt, "arrays")
    os.symlink(target, os.path.join(arrays, "b", "link"))
    assert ckpt.restore(url)["b"][-1] == 5999  # a file no reader opens is not looked at
    os.symlink(target, os.path.join(arrays, "w", "link"))
    with pytest.raises(CorruptCheckpointError, match=r"leaf w: .*link is not a regular file"):
        ckpt.restore(url)


def test_a_file_that_cannot_be_looked_at_is_named_by_its_whole_path(tmp_path):
    """A chunk file replaced by a link to itself: looking at it fails (ELOOP), and the error
    names the file inside the checkpoint, not a path relative to the array's folder."""
    import os

    url = str(tmp_path / "ck")
    ckpt.save(url, {"b": np.arange(6000, dtype=np.float32)})
    attempt = ckpt.metadata(url).attempt
    chunk = os.path.join(url, attempt, "arrays", "b", "c", "0")
    os.remove(chunk)
    os.symlink(chunk, chunk)
    with pytest.raises(ckpt.errors.StorageError, match=f"{attempt}/arrays/b/c/0"):
        ckpt.restore(url)


def test_a_zero_size_array_with_a_huge_other_dimension_costs_nothing(tmp_path, mesh24):
    """Shape [2**40, 0] is 0 bytes and 0 chunks: valid, and checking it must not build
    anything per chunk row of the other dimension."""

    url = str(tmp_path / "ck")
    ckpt.save(url, _tree(mesh24))
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    _leaf(doc, "b").update(shape=[2**40, 0], chunk_shape=[1, 1],
                           chunks={"writer": [], "nbytes": [], "crc32c": []})
    _resign(store, msgpack.packb(doc))
    with _allocations() as peak:
        info = ckpt.metadata(url)
    assert [leaf.shape for leaf in info.leaves if "b" in str(leaf.path)] == [(2**40, 0)]
    assert peak[0] < 64 << 20, peak


@pytest.mark.parametrize(("record", "message"), [
    ({"kind": "empty", "vtype": "set"}, "unknown type 'set'"),
    ({"kind": "empty", "vtype": "dict", "value": 1}, "fields it cannot have"),
    ({"kind": "empty"}, "vtype"),
])
def test_a_malformed_empty_container_record_is_refused(tmp_path, record, message):
    url = str(tmp_path / "e")
    ckpt.save(url, {"a": {}, "n": 1})
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    leaf = next(x for x in doc["leaves"] if x["path"] == [["key", "a"]])
    assert leaf == {"path": [["key", "a"]], "kind": "empty", "vtype": "dict"}
    leaf.clear()
    leaf.update(path=[["key", "a"]], **record)
    _resign(store, msgpack.packb(doc))
    with pytest.raises(CorruptCheckpointError, match=message):
        ckpt.restore(url)


@pytest.mark.parametrize(("record", "message"), [
    ({"kind": "per_process", "vtype": "state", "values": []}, "malformed per-process leaf"),
    ({"kind": "per_process", "vtype": "guess", "values": [1]}, "malformed per-process leaf"),
    ({"kind": "per_process", "vtype": "value", "values": [1], "value": 2},
     "fields it cannot have"),
])
def test_a_malformed_per_process_record_is_refused(tmp_path, record, message):
    url = str(tmp_path / "p")
    ckpt.save(url, {"seed": ckpt.PerProcess(4), "n": 1})
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    leaf = next(x for x in doc["leaves"] if x["path"] == [["key", "seed"]])
    assert leaf == {"path": [["key", "seed"]], "kind": "per_process", "vtype": "value",
                    "values": [4]}
    leaf.clear()
    leaf.update(path=[["key", "seed"]], **record)
    _resign(store, msgpack.packb(doc))
    with pytest.raises(CorruptCheckpointError, match=message) as err:
        ckpt.restore(url)
    assert "(seed)" in str(err.value), err.value


TREE_LIES = {
    # A leaf inside another leaf: "b" moved under "w".
    "inside": (lambda d: _leaf(d, "b").update(path=[["key", "w"], ["key", "x"]]), "w"),
    # A sequence position beside names at the root.
    "mixed": (lambda d: _leaf(d, "b").update(path=[["index", 0]]), "root"),
    # The same name as a key and as an attribute.
    "twice": (lambda d: _leaf(d, "b").update(path=[["attr", "w"]]), "twice"),
}


@pytest.mark.parametrize("lie", sorted(TREE_LIES))
def test_leaf_paths_that_make_no_tree_are_a_corrupt_checkpoint(tmp_path, mesh24, lie):
    url = str(tmp_path / "ck")
    ckpt.save(url, _tree(mesh24))
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    edit, word = TREE_LIES[lie]
    edit(doc)
    _resign(store, msgpack.packb(doc))
    # Where a tree is built from the paths (no target); a target names its leaves itself.
    for read in (ckpt.restore, ckpt.metadata):
        with pytest.raises(CorruptCheckpointError, match=word):
            read(url)


def test_a_pytree_node_without_children_leaves_a_gap_that_restores(tmp_path):
    """A registered node with no children (an `Identity` layer, a dataclass of static fields)
    leaves a gap in its parent's positions: the checkpoint commits and restores, with and
    without a target."""
    class Nothing:
        pass

    jax.tree_util.register_pytree_node(Nothing, lambda n: ((), None), lambda aux, ch: Nothing())
    url = str(tmp_path / "ck")
    tree = {"t": (np.ones(2, np.float32), Nothing(), np.zeros(3, np.float32))}
    ckpt.save(url, tree)
    out = ckpt.restore(url, target=tree)
    assert isinstance(out["t"][1], Nothing)
    assert out["t"][2].tolist() == [0.0] * 3
    bare = ckpt.restore(url)["t"]  # without a target: the leaves in order
    assert [x.tolist() for x in bare] == [[1.0, 1.0], [0.0] * 3]
    assert ckpt.metadata(url).tree["t"][1].shape == (3,)


# -- small arrays read as plain objects -----------------------------------------------------

def _plain_pair(tmp_path):
    url = str(tmp_path / "pp")
    a = np.arange(20_000, dtype=np.float32)  # 80 KB: an array leaf, not inline
    ckpt.save(url, {"a": a, "b": -a, "big": np.ones((600, 600), np.float32)})
    store = open_store(url)
    attempt = ckpt.metadata(url).attempt
    return url, store, {k: f"{attempt}/arrays/{k}/c/0" for k in ("a", "b")}


@pytest.mark.parametrize("damage", ["swapped", "tail", "byte", "truncated", "longer",
                                    "missing"])
def test_a_damaged_plain_chunk_is_named_never_returned(tmp_path, damage):
    url, store, key = _plain_pair(tmp_path)
    a, b = store.read(key["a"]), store.read(key["b"])
    expected = {
        "swapped": (b, "crc32c differs from the manifest"),
        "tail": (a[:-4] + bytes(4), "do not match the crc32c stored with them"),
        "byte": (bytes([a[0] ^ 1]) + a[1:], "do not match the crc32c stored with them"),
        "truncated": (a[:-5], "holds 79999 bytes, 80004 expected"),
        "longer": (a + b"x", "is over 80004 bytes"),
        "missing": (None, "is missing"),
    }
    data, words = expected[damage]
    if data is None:
        store.delete(key["a"])
    else:
        store.write(key["a"], data)
    with pytest.raises(CorruptCheckpointError, match=rf"leaf a chunk \(0,\).*{words}"):
        ckpt.restore(url)
    if damage != "longer":  # (TensorStore, which verify reads through, ignores bytes after
        assert not ckpt.verify(url).ok  # a chunk's checksum: the values are still whole)


def test_a_restore_of_small_arrays_opens_nothing_and_reads_each_chunk_once(tmp_path):
    """Arrays of one small chunk are read as plain objects: one read each, waited for as a
    chunk read (what a wrapper store sees), with no TensorStore array, zarr.json or
    file-type look before it; the large array is opened as before."""
    from tests.helpers.faults import FaultyStore, is_chunk_read

    url, _, _ = _plain_pair(tmp_path)
    seen: list[tuple[str, str]] = []

    def after(doing, key, args):
        if is_chunk_read(doing):
            seen.append(("chunk", doing.leaf))
        elif doing == Op.CHECK_FILES:  # (prefix, the keys below it looked at)
            seen.extend((doing, f"{key}/{k}") for k in args[1] or ["*"])
        else:
            seen.append((doing, key))

    out = ckpt.restore(FaultyStore(url, after=after))
    assert np.asarray(out["b"]).tobytes() == (-np.arange(20_000, dtype=np.float32)).tobytes()
    assert sorted(k for d, k in seen if d == "chunk") == ["a", "b", "big"]
    looked = [k for d, k in seen if d in (Op.OPEN, Op.CHECK_FILES) and "/arrays/" in f"{k}/"]
    assert looked and all("/arrays/big" in k for k in looked), looked


def test_a_forged_bool_chunk_is_refused_on_every_read_path(tmp_path, mesh24):
    """A bool chunk holding a byte other than 0 or 1, its own crc32c and the re-signed
    manifest's made to match: TensorStore refuses it, and so do the reads that check a
    chunk object themselves (a chunk spanning boxes of a resharded restore, read into a
    buffer; a small plain array), naming the leaf and chunk, never returning a bool of 2."""
    import google_crc32c

    url = str(tmp_path / "ck")
    flags = np.zeros((1024, 1024), bool)
    ckpt.save(url, {"f": jax.device_put(flags, NamedSharding(mesh24, P("data", "model"))),
                    "s": np.zeros(200_000, bool)})
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    for name, key in (("f", f"{attempt}/arrays/f/c/0/0"), ("s", f"{attempt}/arrays/s/c/0")):
        data = bytearray(store.read(key)[:-4])
        data[3] = 2
        crc = google_crc32c.value(bytes(data))
        store.write(key, bytes(data) + crc.to_bytes(4, "little"))
        _leaf(doc, name)["chunks"]["crc32c"][0] = crc
    _resign(store, msgpack.packb(doc))
    mesh42 = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    resharded = {"f": jax.ShapeDtypeStruct(flags.shape, bool, sharding=NamedSharding(
        mesh42, P("data", "model")))}
    for target in (resharded, {"f": flags}, {"s": np.zeros(200_000, bool)}):
        with pytest.raises(CorruptCheckpointError, match=r"leaf [fs] chunk"):
            ckpt.restore(url, target)
