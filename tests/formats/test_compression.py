"""compression="zstd": chunks stored compressed, read back unchanged by every reader."""

import json
import os

import jax
import numpy as np
import pytest
import tensorstore as ts
import zarr
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.cli import main
from ckpt.storage import open_store
from tests.formats.test_roundtrip import DTYPES, _same, _values


def _stored_bytes(url):
    store = open_store(url)
    return sum(store.list_sizes(f"{ckpt.metadata(url).attempt}/arrays").values())


def _tree(mesh):
    rng = np.random.default_rng(0)
    return {"params": {"w": jax.device_put(rng.standard_normal((256, 512)).astype(np.float32),
                                           NamedSharding(mesh, P("data", "model")))},
            "opt": {"mu": jax.device_put(np.zeros((256, 512), np.float32),
                                         NamedSharding(mesh, P("data", "model")))},
            "step": 7}


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_compressed(tmp_path, mesh24, dtype):
    host = _values(dtype, (16, 1040))
    arr = jax.device_put(host, NamedSharding(mesh24, P("data", "model")))
    url = str(tmp_path / "c")
    ckpt.save(url, {"sharded": arr, "numpy": host}, compression="zstd")
    out = ckpt.restore(url)
    _same(out["sharded"], np.asarray(arr))
    _same(out["numpy"], host)
    info = ckpt.metadata(url)
    assert {leaf.name: leaf.compression for leaf in info.leaves} == {
        "sharded": "zstd:3", "numpy": "zstd:3"}
    assert ckpt.verify(url).ok


def test_zeros_shrink_and_every_reader_agrees(root_url, mesh24):
    """A freshly initialised optimizer state (zeros) is a fraction of its size stored; the
    restore onto another mesh, `verify`, and the format's version say what was done."""
    tree = _tree(mesh24)
    plain, packed = f"{root_url}/plain", f"{root_url}/packed"
    ckpt.save(plain, tree)
    ckpt.save(packed, tree, compression="zstd:5")
    assert _stored_bytes(packed) < 0.7 * _stored_bytes(plain)
    assert ckpt.metadata(plain).format_version == 1  # readers of version 1 still read it
    assert ckpt.metadata(packed).format_version == 2
    assert {leaf.compression for leaf in ckpt.metadata(packed).leaves
            if leaf.kind == "array"} == {"zstd:5"}
    other = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    out = ckpt.restore(packed, mesh=other)
    _same(out["params"]["w"], np.asarray(tree["params"]["w"]))
    assert out["params"]["w"].sharding.mesh.shape == {"data": 4, "model": 2}
    _same(out["opt"]["mu"], np.zeros((256, 512), np.float32))
    assert out["step"] == 7
    assert ckpt.verify(packed).ok


def test_outside_readers_open_compressed_arrays_from_zarr_json_alone(tmp_path, mesh24):
    """zarr-python and TensorStore, given only an array folder, decode the same values:
    the codec is zarr v3's own zstd, with the crc32c over the bytes as stored."""
    tree = _tree(mesh24)
    url = str(tmp_path / "c")
    ckpt.save(url, tree, compression="zstd")
    folder = os.path.join(url, ckpt.metadata(url).attempt, "arrays", "params.w")
    with open(os.path.join(folder, "zarr.json")) as f:
        codecs = [c["name"] for c in json.load(f)["codecs"]]
    assert codecs == ["bytes", "zstd", "crc32c"]
    want = np.asarray(tree["params"]["w"])
    np.testing.assert_array_equal(zarr.open_array(folder, mode="r")[:], want)
    opened = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": folder}}).result()
    np.testing.assert_array_equal(opened.read().result(), want)


def test_a_damaged_compressed_chunk_is_named(tmp_path, mesh24):
    url = str(tmp_path / "c")
    ckpt.save(url, _tree(mesh24), compression="zstd")
    store = open_store(url)
    keys = sorted(k for k in store.list() if "/arrays/params.w/c/" in k)
    data = bytearray(store.read(keys[0]))
    data[len(data) // 2] ^= 0x10
    store.write(keys[0], bytes(data))
    with pytest.raises(ckpt.CorruptCheckpointError, match=r"leaf params/w chunk \(\d+, \d+\)"):
        ckpt.restore(url)
    report = ckpt.verify(url)
    assert [p.leaf for p in report.problems] == ["params/w"], report.problems


@pytest.mark.parametrize("bad", ["gzip", "zstd:99", "zstd:x", "ZSTD", 3, ""])
def test_an_unknown_compression_is_refused_before_anything_is_written(tmp_path, bad):
    url = tmp_path / "c"
    with pytest.raises(ckpt.InvalidArgumentError, match=r"compression=.*'zstd:<level>'"):
        ckpt.save(url, {"w": np.ones(4)}, compression=bad)
    assert not url.exists()
    with pytest.raises(ckpt.InvalidArgumentError, match="compression="):
        ckpt.CheckpointManager(tmp_path / "run", compression=bad)


def test_a_manager_compresses_both_tiers(tmp_path, mesh24):
    tree = _tree(mesh24)
    with ckpt.CheckpointManager(tmp_path / "run", local_dir=str(tmp_path / "local"),
                                compression="zstd") as mgr:
        mgr.save(1, tree)
        mgr.wait()
        out = mgr.restore(1)
    _same(out["params"]["w"], np.asarray(tree["params"]["w"]))
    for url in (tmp_path / "run" / "1", tmp_path / "local" / "1"):
        arrays = [leaf for leaf in ckpt.metadata(url).leaves if leaf.kind == "array"]
        assert arrays and all(leaf.compression == "zstd:3" for leaf in arrays), url


def test_reshard_and_convert_write_what_they_are_told(tmp_path, mesh24, capsys):
    tree = _tree(mesh24)
    src = str(tmp_path / "src")
    ckpt.save(src, tree, compression="zstd")
    plain = ckpt.reshard(src, str(tmp_path / "plain"), mesh={"data": 4, "model": 2})
    assert {leaf.compression for leaf in ckpt.metadata(plain.url).leaves} == {None}
    assert main(["convert", "-q", plain.url, str(tmp_path / "again"),
                 "--compression", "zstd:7"]) == 0
    assert "zstd:7" in capsys.readouterr().out
    again = ckpt.metadata(str(tmp_path / "again"))
    assert {leaf.compression for leaf in again.leaves if leaf.kind == "array"} == {"zstd:7"}
    _same(ckpt.restore(str(tmp_path / "again"))["params"]["w"], np.asarray(tree["params"]["w"]))
    assert main(["reshard", "-q", src, str(tmp_path / "bad"), "--mesh", "data=8",
                 "--compression", "lz4"]) == 2
    assert "--compression='lz4'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["inspect", src]) == 0
    assert "compression zstd:3 (2 arrays; bytes below are decoded)" in capsys.readouterr().out
    assert main(["inspect", "--json", src]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {x["path"]: x["compression"] for x in doc["leaves"]} == {
        "params/w": "zstd:3", "opt/mu": "zstd:3", "step": None}


def test_a_version_1_manifest_may_not_claim_compression(tmp_path):
    """Compression came with format version 2: a version 1 manifest carrying it was not
    written by this format (a reader of version 1 would refuse the leaf)."""
    import msgpack

    from ckpt._format import COMMIT, MANIFEST, CommitRecord
    from tests.restore.test_tamper import _resign

    url = str(tmp_path / "c")
    ckpt.save(url, {"w": np.zeros(300_000, np.float32)}, compression="zstd")
    store = open_store(url)
    attempt = CommitRecord.decode(store.read(COMMIT), COMMIT).attempt
    doc = msgpack.unpackb(store.read(f"{attempt}/{MANIFEST}"), strict_map_key=False)
    assert doc["format_version"] == 2
    assert doc["leaves"][0]["compression"] == {"name": "zstd", "level": 3}
    doc["format_version"] = 1
    _resign(store, msgpack.packb(doc))
    with pytest.raises(ckpt.CorruptCheckpointError, match="compressed arrays in format "
                       "version 1"):
        ckpt.restore(url)
