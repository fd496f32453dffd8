"""Integrity and untrusted input: damaged checkpoints fail loudly on every backend, names
from a pytree stay inside the checkpoint, and the manifest decoder survives anything."""

import json
import os
import subprocess
import sys
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
from ckpt._format import COMMIT, MANIFEST, CommitRecord, decode_manifest, sha256
from ckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from ckpt.storage import open_store
from tests.children import script
from tests.helpers.mutation import mutate


def _tree(mesh=None):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((256, 1024)).astype(np.float32)
    if mesh is not None:  # 8 chunks, one per shard of the 2x4 mesh
        w = jax.device_put(w, NamedSharding(mesh, P("data", "model")))
    return {"layer": {"w": w}, "b": rng.standard_normal(5000).astype(np.float32), "n": 3}


@pytest.fixture
def damaged(root_url, mesh24):
    url = f"{root_url}/ck"
    ckpt.save(url, _tree(mesh24))
    store = open_store(url)
    attempt = ckpt.metadata(url).attempt
    keys = sorted(store.list(f"{attempt}/arrays/layer.w/c"))
    assert len(keys) >= 2
    return url, store, attempt, keys


@pytest.mark.parametrize("how", ["flip", "truncate", "missing", "swap"])
def test_damaged_chunk_fails_restore_and_verify_naming_leaf_and_chunk(damaged, how):
    url, store, _, keys = damaged
    if how == "flip":
        data = bytearray(store.read(keys[1]))
        data[len(data) // 2] ^= 0x01
        store.write(keys[1], bytes(data))
    elif how == "truncate":
        store.write(keys[1], store.read(keys[1])[:1000])
    elif how == "missing":
        store.delete(keys[1])
    else:
        a, b = store.read(keys[0]), store.read(keys[1])
        store.write(keys[0], b)
        store.write(keys[1], a)
    with pytest.raises(CorruptCheckpointError, match=r"layer/w chunk \(\d+, \d+\)"):
        ckpt.restore(url)
    with pytest.raises(CorruptCheckpointError, match=r"layer/w"):
        ckpt.restore(url, target={"layer": {"w": np.zeros((256, 1024), np.float32)}})
    report = ckpt.verify(url)
    assert not report.ok
    assert all(p.leaf == "layer/w" and p.chunk is not None for p in report.problems)
    # The undamaged leaf still restores on its own.
    out = ckpt.restore(url, target={"b": np.zeros(5000, np.float32)})
    assert out["b"].tobytes() == _tree()["b"].tobytes()


@pytest.mark.parametrize("how", ["swap", "flip"])
def test_damaged_large_chunk_fails_a_same_mesh_restore(tmp_path, mesh24, how):
    """Chunks of 1 MiB and more restored into their own shard on a local disk are checked
    by their stored checksum tail instead of hashed: a swapped chunk (each intact, in the
    wrong place) and a flipped bit are still caught."""
    rng = np.random.default_rng(5)
    sharding = NamedSharding(mesh24, P("data", "model"))
    w = jax.device_put(rng.standard_normal((2048, 2048)).astype(np.float32), sharding)
    url = str(tmp_path / "ck")
    ckpt.save(url, {"w": w})
    store = open_store(url)
    keys = sorted(store.list(f"{ckpt.metadata(url).attempt}/arrays/w/c"))
    assert len(keys) == 8
    assert len(store.read(keys[0])) >= 1 << 20
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding)}
    assert np.asarray(ckpt.restore(url, target)["w"]).tobytes() == np.asarray(w).tobytes()
    if how == "swap":
        a, b = store.read(keys[0]), store.read(keys[1])
        store.write(keys[0], b)
        store.write(keys[1], a)
    else:
        data = bytearray(store.read(keys[1]))
        data[len(data) // 3] ^= 0x10
        store.write(keys[1], bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"leaf w chunk \(\d+, \d+\)"):
        ckpt.restore(url, target)


@pytest.mark.parametrize(("how", "said"), [
    (None, None), ("flip", "do not match the crc32c stored with them"),
    ("swap", "differs from the manifest"), ("truncate", "expected (the chunk and its crc32c)"),
    ("extend", "is over"), ("missing", "is missing")])
def test_chunks_spanning_several_boxes_are_read_whole_and_checked(tmp_path, mesh24, how,
                                                                   said):
    """A resharded restore on a local disk reads each whole chunk that spans several
    target boxes as its object, into a buffer reused from chunk to chunk, and checks it
    (size, its own crc32c, the manifest's) before copying from it: intact, the values are
    exact; damaged in any way, the chunk is named."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((2048, 2048)).astype(np.float32)
    url = str(tmp_path / "ck")
    ckpt.save(url, {"w": jax.device_put(w, NamedSharding(mesh24, P("data", "model")))})
    store = open_store(url)
    keys = sorted(store.list(f"{ckpt.metadata(url).attempt}/arrays/w/c"))
    assert len(keys) == 8  # chunks of 1024 x 512: each spans two boxes of the 4x2 mesh
    mesh42 = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    sharding = NamedSharding(mesh42, P("data", "model"))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=sharding)}
    if how is None:
        for _ in range(2):  # the second time through buffers the first one let go
            assert np.asarray(ckpt.restore(url, target)["w"]).tobytes() == w.tobytes()
        return
    data = store.read(keys[1])
    if how == "flip":
        store.write(keys[1], data[:4096] + bytes([data[4096] ^ 0x04]) + data[4097:])
    elif how == "swap":
        store.write(keys[1], store.read(keys[0]))
        store.write(keys[0], data)
    elif how == "truncate":
        store.write(keys[1], data[:-8])
    elif how == "extend":
        store.write(keys[1], data + b"\0" * 4)
    else:
        store.delete(keys[1])
    with pytest.raises(CorruptCheckpointError, match=r"leaf w chunk \(\d+, \d+\)") as caught:
        ckpt.restore(url, target)
    assert said in str(caught.value)


@pytest.mark.parametrize("dtype", [np.bool_, "bfloat16", np.int8, np.complex64])
def test_spanning_chunks_of_every_width_restore_exactly(tmp_path, mesh24, dtype):
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((1024, 1024)) * 3).astype(jax.numpy.dtype(dtype))
    url = str(tmp_path / "ck")
    ckpt.save(url, {"w": jax.device_put(w, NamedSharding(mesh24, P("data", "model")))})
    mesh42 = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(
        mesh42, P("data", "model")))}
    assert np.asarray(ckpt.restore(url, target)["w"]).tobytes() == w.tobytes()


def test_edited_manifest_fails_before_any_chunk_is_read(damaged):
    url, store, attempt, _ = damaged
    raw = store.read(f"{attempt}/{MANIFEST}")
    doc = msgpack.unpackb(raw)
    doc["leaves"][1]["shape"] = [5001]  # a plausible edit, still valid msgpack
    store.write(f"{attempt}/{MANIFEST}", msgpack.packb(doc))
    for call in (ckpt.restore, ckpt.metadata, ckpt.verify):
        with pytest.raises(CorruptCheckpointError, match="manifest.msgpack.*sha256"):
            call(url)


def test_newer_format_version_is_refused_naming_it(root_url):
    url = f"{root_url}/ck"
    ckpt.save(url, {"x": 1})
    store = open_store(url)
    commit = CommitRecord.decode(store.read(COMMIT), "COMMIT")
    doc = msgpack.unpackb(store.read(f"{commit.attempt}/{MANIFEST}"))
    doc["format_version"] = 3
    data = msgpack.packb(doc)
    store.write(f"{commit.attempt}/{MANIFEST}", data)
    store.write(COMMIT, CommitRecord(commit.attempt, sha256(data), commit.committed_at).encode())
    with pytest.raises(UnsupportedFormatError,
                       match=r"format version 3; this library reads versions 1 to 2 \(upgrade"):
        ckpt.restore(url)
    store.write(COMMIT, msgpack.packb({"format": "ckpt", "format_version": 7}))
    with pytest.raises(UnsupportedFormatError, match="COMMIT has format version 7"):
        ckpt.metadata(url)


NASTY_KEYS = ["a/b", "..", "../../escape", "", "\x00nul", "x" * 500, "日本語", "é/../..", ".",
              "~", "%2F", "@0", "#1"]


def test_nasty_key_paths_round_trip_inside_the_folder(tmp_path):
    tree: dict[str, Any] = {k: np.full(5000, i, np.int32) for i, k in enumerate(NASTY_KEYS)}
    tree["nested"] = {k: [np.full(5000, -i, np.int16)] for i, k in enumerate(NASTY_KEYS)}
    ckpt.save(tmp_path / "inside" / "c", tree)
    everything = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert everything
    assert all(p.startswith(str(tmp_path / "inside" / "c") + os.sep)
                              for p in everything)
    out = ckpt.restore(tmp_path / "inside" / "c")
    for i, k in enumerate(NASTY_KEYS):
        assert (out[k] == i).all()
        assert (out["nested"][k][0] == -i).all()
    out = ckpt.restore(tmp_path / "inside" / "c", target=tree)
    assert sorted(out) == sorted(tree)  # JAX orders dict keys itself
    assert all((out[k] == tree[k]).all() for k in NASTY_KEYS)


# -- untrusted manifests -----------------------------------------------------------------

def _valid_manifest():
    import ckpt._format as fmt

    leaf = fmt.LeafRecord(path=(("key", "w"),), kind=fmt.LeafKind.ARRAY, source="jax",
                          shape=(8, 4), dtype="float32", mesh_shape=(2,), mesh_axes=("d",),
                          spec=["d"], name="w",
                          layout=fmt.ChunkLayout((4, 4), (0, 0), (64, 64), (1, 2)))
    inline = fmt.LeafRecord(path=(("key", "b"), ("index", 0)), kind=fmt.LeafKind.INLINE,
                            source="numpy", shape=(2,), dtype="int8", data=b"\x01\x02")
    value = fmt.LeafRecord(path=(("attr", "s"),), kind=fmt.LeafKind.VALUE, vtype="str",
                           value="hi")
    return fmt.encode_manifest(fmt.Manifest("attempt-x", 1, 0.0, 1.0, {"jax": "x"},
                                            {"m": [1, 2]}, [leaf, inline, value]))


def _clean(data):
    try:
        decode_manifest(data, "manifest under test")
    except (CorruptCheckpointError, UnsupportedFormatError) as exc:
        # Not pytest.raises: random bytes may also decode, which is fine.
        assert "manifest under test" in str(exc)  # noqa: PT017


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_decoder_accepts_only_clean_errors_for_random_bytes(data):
    _clean(data)


@settings(max_examples=600, deadline=None)
@given(st.data())
def test_decoder_accepts_only_clean_errors_for_mutated_manifests(data):
    _clean(mutate(data, _valid_manifest()))


plain = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
                     | st.text() | st.binary(),
                     lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decoder_accepts_only_clean_errors_for_wrong_structures(data):
    doc = msgpack.unpackb(_valid_manifest())
    target = data.draw(st.sampled_from(["top", "leaf", "chunks", "path"]))
    key_pool = ["format", "format_version", "attempt", "leaves", "versions", "kind", "shape",
                "dtype", "name", "chunk_shape", "chunks", "path", "data", "writer", "nbytes",
                "crc32c", "spec", "mesh", "source", "vtype", "value"]
    node = {"top": doc, "leaf": doc["leaves"][0], "chunks": doc["leaves"][0]["chunks"],
            "path": doc["leaves"][1]}[target]
    node[data.draw(st.sampled_from(key_pool))] = data.draw(plain)
    _clean(msgpack.packb(doc))


def test_deep_nesting_and_huge_lengths_are_clean_errors():
    _clean(b"\x91" * 100000 + b"\xc0")
    _clean(b"\xdd\xff\xff\xff\xff")  # an array claiming 4 billion items
    _clean(b"\xdb\xff\xff\xff\xff")  # a string claiming 4 GiB
    doc = msgpack.unpackb(_valid_manifest())
    doc["leaves"][0]["shape"] = [2**40, 2**40]  # a grid far larger than its chunk lists
    with pytest.raises(CorruptCheckpointError, match="chunks"):
        decode_manifest(msgpack.packb(doc), "m")
    doc = msgpack.unpackb(_valid_manifest())
    doc["leaves"][0]["name"] = "../../etc"
    with pytest.raises(CorruptCheckpointError, match="unsafe array name"):
        decode_manifest(msgpack.packb(doc), "m")


# -- full and read-only destinations -----------------------------------------------------

@pytest.mark.slow  # starts processes
def test_full_and_read_only_disk_fail_cleanly_keeping_earlier_steps(tmp_path):
    """In a private mount namespace: a 3 MiB tmpfs, then the same remounted read-only."""
    child = script("fs_limits_child")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    run = subprocess.run(["unshare", "-rm", sys.executable, child, str(mnt)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    full, ro = result["full"], result["read_only"]
    assert full["error_type"] in ("SaveError", "StorageError"), full
    assert "No space left" in full["error"] and str(mnt) in full["error"], full
    assert full["steps_after"] == [1]
    assert full["step1_exact"]
    assert not full["commit_2"]
    assert ro["error_type"] in ("StorageError", "SaveError"), ro
    assert "Read-only" in ro["error"] and str(mnt) in ro["error"], ro
    assert ro["steps_after"] == [1]
    assert ro["step1_exact"]
