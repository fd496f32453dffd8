"""Safetensors out (`ckpt.export_safetensors`, ``ckpt export``) and in (`ckpt.restore` of a
file or a Hugging Face folder), checked against the `safetensors` package itself."""

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import ckpt
from ckpt._names import DEFAULT_RULES, NameRules, default_name
from ckpt._tree import flatten
from ckpt.cli import main as cli
from ckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    DtypeMismatchError,
    MissingLeafError,
    ShapeMismatchError,
    TargetMismatchError,
    UnsupportedLeafError,
)
from ckpt.restore._raw import byte_runs, coalesce
from ckpt.storage import Op, open_store
from tests.conftest import RSS_OVERHEAD, backend_url, cli_extra_rss, make_mesh
from tests.helpers.faults import ChunkReads

OPT_RULE = f"name rule '{DEFAULT_RULES[0]}'"  # why export leaves optimizer state out

BF16 = ml_dtypes.bfloat16


def _host():
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((64, 48)).astype(np.float32),
        "b": rng.standard_normal((48,)).astype(BF16),
        "emb": rng.integers(0, 1000, (96, 16)).astype(np.int32),
        "flag": np.array([True, False, True]),
    }


@pytest.fixture
def saved(tmp_path, mesh24):
    """A checkpoint of params (sharded on 2x4), optimizer state, an RNG key and a step."""
    host = _host()
    specs = {"w": P("data", "model"), "b": P("model"), "emb": P(("data", "model")),
             "flag": P()}
    params = {"layers": [{"w": jax.device_put(host["w"], NamedSharding(mesh24, specs["w"])),
                          "b": jax.device_put(host["b"], NamedSharding(mesh24, specs["b"]))}],
              "emb": jax.device_put(host["emb"], NamedSharding(mesh24, specs["emb"])),
              "flag": host["flag"]}
    tree = {"params": params, "opt_state": {"mu": params["layers"][0]["w"] * 0 + 1},
            "key": jax.random.key(3), "step": 12}
    url = str(tmp_path / "ckpt")
    ckpt.save(url, tree)
    expected = {"params.layers.0.w": host["w"], "params.layers.0.b": host["b"],
                "params.emb": host["emb"], "params.flag": host["flag"]}
    return url, expected


# -- export -------------------------------------------------------------------------------

def test_export_is_read_bit_exactly_by_the_safetensors_package(saved, tmp_path):
    url, expected = saved
    result = ckpt.export_safetensors(url, str(tmp_path / "out"))
    assert result.files == ["model.safetensors"]
    assert set(result.tensors) == set(expected)
    assert result.left_out == {"opt_state/mu": OPT_RULE,
                               "key": "a PRNG key", "step": "not an array (value)"}
    path = str(tmp_path / "out" / "model.safetensors")
    loaded = load_file(path)
    assert set(loaded) == set(expected)
    for name, value in expected.items():
        assert loaded[name].dtype == value.dtype
        assert loaded[name].tobytes() == value.tobytes()
    with safe_open(path, "flax") as f:  # the flax loader, bfloat16 included
        meta = f.metadata()
        assert meta["format"] == "pt"
        assert len(meta["ckpt_export_id"]) == 16
        b = f.get_tensor("params.layers.0.b")
        assert b.dtype == jnp.bfloat16
        assert np.asarray(b).tobytes() == expected["params.layers.0.b"].tobytes()
    assert result.nbytes == sum(v.nbytes for v in expected.values())


def test_export_shards_like_hugging_face(saved, tmp_path):
    url, expected = saved
    limit = 8000
    result = ckpt.export_safetensors(url, str(tmp_path / "out"), max_shard_size=limit)
    out = tmp_path / "out"
    assert len(result.files) > 1
    n = len(result.files)
    assert result.files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in expected.values())
    assert set(index["weight_map"]) == set(expected)
    for file in result.files:
        tensors = load_file(str(out / file))
        assert all(index["weight_map"][k] == file for k in tensors)
        # Only a tensor over the limit would have a file to itself that is larger.
        assert sum(v.nbytes for v in tensors.values()) <= limit or len(tensors) == 1
        for k, v in tensors.items():
            assert v.tobytes() == expected[k].tobytes()
    back = ckpt.restore(str(out))
    assert back["params"]["layers"]["0"]["w"].tobytes() == expected["params.layers.0.w"].tobytes()
    # An export into one named file ignores sharding.
    one = ckpt.export_safetensors(url, str(tmp_path / "one.safetensors"), max_shard_size=limit)
    assert one.files == ["one.safetensors"]
    assert len(load_file(str(tmp_path / "one.safetensors"))) == 4


def test_export_casts_floats_only(saved, tmp_path):
    url, expected = saved
    ckpt.export_safetensors(url, str(tmp_path / "out"), dtype="bfloat16")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "flax") as f:
        w = np.asarray(f.get_tensor("params.layers.0.w"))
        assert w.dtype == BF16
        assert w.tobytes() == expected["params.layers.0.w"].astype(BF16).tobytes()
        assert np.asarray(f.get_tensor("params.emb")).dtype == np.int32
    with pytest.raises(ValueError, match="int8"):
        ckpt.export_safetensors(url, str(tmp_path / "bad"), dtype="int8")
    for same in (jnp.bfloat16, "BF16", np.dtype(BF16)):
        again = ckpt.export_safetensors(url, str(tmp_path / "again"), dtype=same,
                                        overwrite=True, max_shard_size="1G")
        assert again.nbytes < sum(v.nbytes for v in expected.values())


def test_name_rules(saved, tmp_path):
    url, expected = saved
    result = ckpt.export_safetensors(url, str(tmp_path / "a"), names=[
        r"^params\.layers\.(\d+)\. => model.layers.\1.", r"^params\. => model.",
        "drop flag$", r"keep ^opt_state\."])
    assert set(result.tensors) == {"model.layers.0.w", "model.layers.0.b", "model.emb",
                                   "opt_state.mu"}
    mapped = ckpt.export_safetensors(url, str(tmp_path / "m"), names={
        r"^params\.": "model.", r"flag$": None})
    assert set(mapped.tensors) == {"model.layers.0.w", "model.layers.0.b", "model.emb"}
    only = ckpt.export_safetensors(url, str(tmp_path / "b"), only=r"\.w$")
    assert set(only.tensors) == {"params.layers.0.w"}
    with pytest.raises(ValueError, match="would both be tensor"):
        ckpt.export_safetensors(url, str(tmp_path / "c"), names=[r"\.(w|b)$ => .x"])
    with pytest.raises(ValueError, match="none of"):
        NameRules(["what is this"])
    with pytest.raises(ValueError, match="unterminated|missing"):
        NameRules(["drop ("])
    assert not os.path.exists(tmp_path / "c")
    # The default name: dot-joined, without an NNX Variable's last `.value`.
    assert default_name((("key", "a"), ("index", 0), ("attr", "kernel"),
                         ("attr", "value"))) == "a.0.kernel"


def test_export_refuses_what_safetensors_cannot_hold_and_existing_files(tmp_path):
    url = str(tmp_path / "c")
    ckpt.save(url, {"z": np.ones((4, 4), np.complex64), "x": np.ones(3, np.float32)})
    with pytest.raises(UnsupportedLeafError, match=r"leaf z is complex64"):
        ckpt.export_safetensors(url, str(tmp_path / "out"))
    ckpt.export_safetensors(url, str(tmp_path / "out"), names=["drop ^z$"])
    with pytest.raises(CheckpointExistsError, match="model.safetensors"):
        ckpt.export_safetensors(url, str(tmp_path / "out"), names=["drop ^z$"])


def test_overwrite_replaces_a_sharded_export_and_removes_stale_files(saved, tmp_path):
    url, expected = saved
    out = tmp_path / "out"
    ckpt.export_safetensors(url, str(out), max_shard_size=8000)
    ckpt.export_safetensors(url, str(out), overwrite=True, only="emb")
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert list(load_file(str(out / "model.safetensors"))) == ["params.emb"]


def test_a_damaged_chunk_fails_the_export_and_writes_no_file(tmp_path):
    url = str(tmp_path / "c")
    ckpt.save(url, {"w": np.arange(1 << 16, dtype=np.float32)})
    chunk = next(os.path.join(d, f) for d, _, fs in os.walk(url) for f in fs
                 if "/arrays/" in d and f != "zarr.json")
    data = bytearray(pathlib.Path(chunk).read_bytes())
    data[len(data) // 2] ^= 0xFF
    pathlib.Path(chunk).write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError):
        ckpt.export_safetensors(url, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


def test_export_from_orbax(tmp_path, mesh24):
    import orbax.checkpoint as ocp

    host = _host()
    state = {"params": {"w": jax.device_put(host["w"], NamedSharding(mesh24, P("data"))),
                        "b": host["b"]}}
    path = str(tmp_path / "orbax")
    with ocp.StandardCheckpointer() as c:
        c.save(path, state)
    ckpt.export_safetensors(path, str(tmp_path / "out"))
    loaded = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert loaded["params.w"].tobytes() == host["w"].tobytes()
    assert loaded["params.b"].tobytes() == host["b"].tobytes()


@pytest.mark.slow  # starts processes
def test_export_memory_is_bounded_by_the_budget(tmp_path):
    """A 512 MiB checkpoint through a 64 MiB budget (the ratio of 2 GiB through 256 MiB;
    docs/safetensors.md has that run)."""
    rng = np.random.default_rng(0)
    tree = {f"w{i}": rng.standard_normal((4096, 4096), dtype=np.float32) for i in range(8)}
    src = str(tmp_path / "big")
    ckpt.save(src, tree)
    budget = 64 << 20
    extra = cli_extra_rss(["export", "-q", src, str(tmp_path / "out"), "--memory-budget",
                           "64M", "--max-shard-size", "200MB"])
    assert sum(v.nbytes for v in tree.values()) >= 8 * budget
    assert extra <= budget + RSS_OVERHEAD, f"resident memory rose {extra / 2**20:.0f} MiB"
    files = sorted(os.listdir(tmp_path / "out"))
    assert files[-2:] == ["model-00004-of-00004.safetensors", "model.safetensors.index.json"]
    with safe_open(str(tmp_path / "out" / files[-2]), "np") as f:
        key = sorted(f.keys())[-1]
        assert f.get_tensor(key).tobytes() == tree[key].tobytes()


@pytest.mark.slow  # starts processes
def test_cli_export(saved, tmp_path):
    url, expected = saved
    rules = tmp_path / "rules.txt"
    rules.write_text("# rename\n^params\\. => \n\ndrop ^flag$\n")
    run = subprocess.run([sys.executable, "-m", "ckpt", "export", url, str(tmp_path / "out"),
                          "--format", "safetensors", "--names", f"@{rules}", "--dtype",
                          "bfloat16", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert set(doc["tensors"]) == {"layers.0.w", "layers.0.b", "emb"}
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["layers.0.w"].dtype == BF16
    plain = subprocess.run([sys.executable, "-m", "ckpt", "export", url, str(tmp_path / "p"),
                            "--names", str(rules)], capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr  # a rules file by its path, without '@'
    assert set(load_file(str(tmp_path / "p" / "model.safetensors"))) == \
        {"layers.0.w", "layers.0.b", "emb"}
    bad = subprocess.run([sys.executable, "-m", "ckpt", "export", url, str(tmp_path / "x"),
                          "--names", "drop ("], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "drop (" in bad.stderr


# -- import -------------------------------------------------------------------------------

def _targets(mesh, expected, spec_of):
    return {"params": {
        "layers": [{"w": jax.ShapeDtypeStruct((64, 48), np.float32,
                                              sharding=spec_of("w")),
                    "b": jax.ShapeDtypeStruct((48,), BF16, sharding=spec_of("b"))}],
        "emb": jax.ShapeDtypeStruct((96, 16), np.int32, sharding=spec_of("emb")),
        "flag": jax.ShapeDtypeStruct((3,), np.bool_, sharding=spec_of("flag"))}}


def _check(out, expected):
    for name, value in expected.items():
        parts = name.split(".")
        got = out
        for p in parts:
            got = got[int(p)] if isinstance(got, list) else got[p]
        if isinstance(got, jax.Array):
            for shard in got.addressable_shards:
                assert np.asarray(shard.data).tobytes() == value[shard.index].tobytes(), name
        assert np.asarray(got).dtype == value.dtype and np.asarray(got).tobytes() == \
            value.tobytes(), name


def _hf_folder(tmp_path, expected):
    """A sharded folder as Hugging Face writes it, with the safetensors package."""
    folder = tmp_path / "hf"
    folder.mkdir()
    names = sorted(expected)
    files = {"model-00001-of-00002.safetensors": names[:2],
             "model-00002-of-00002.safetensors": names[2:]}
    for file, keys in files.items():
        save_file({k: expected[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 1}, "weight_map": {k: f for f, ks in files.items()
                                                           for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(folder)


@pytest.mark.parametrize("layout", ["file", "folder", "sharded"])
def test_import_onto_a_mesh_and_one_device(tmp_path, devices, layout):
    expected = {f"params.{k}" if k != "w" and k != "b" else f"params.layers.0.{k}": v
                for k, v in _host().items()}
    if layout == "sharded":
        url = _hf_folder(tmp_path, expected)
    else:
        save_file(expected, str(tmp_path / "model.safetensors"))
        url = str(tmp_path / "model.safetensors") if layout == "file" else str(tmp_path)
    mesh = make_mesh((2, 4))
    specs = {"w": P("data", "model"), "b": P("model"), "emb": P(None, "model"), "flag": P()}
    out = ckpt.restore(url, _targets(mesh, expected, lambda k: NamedSharding(mesh, specs[k])))
    assert out["params"]["layers"][0]["w"].sharding.spec == P("data", "model")
    _check(out, expected)
    one = ckpt.restore(url, _targets(mesh, expected,
                                     lambda k: SingleDeviceSharding(devices[3])))
    assert one["params"]["emb"].devices() == {devices[3]}
    _check(one, expected)
    plain = ckpt.restore(url)
    assert plain["params"]["layers"]["0"]["w"].tobytes() == expected["params.layers.0.w"].tobytes()
    assert ckpt.metadata(url).layout.startswith("safetensors")


def test_import_reads_only_the_byte_ranges_of_its_boxes(tmp_path, devices):
    w = np.arange(256 * 1024, dtype=np.float32).reshape(256, 1024)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    mesh = make_mesh((4,), ("data",), devices[:4])
    seen = ChunkReads()
    # Rows 64-128 only: one device's shard of a 4-way split, through a one-device mesh.
    target = {"w": jax.ShapeDtypeStruct((256, 1024), np.float32,
                                        sharding=NamedSharding(mesh, P("data")))}
    out = ckpt.restore(seen.store(str(tmp_path / "model.safetensors")), target)
    assert np.asarray(out["w"]).tobytes() == w.tobytes()
    assert sum(e - b for _, b, e in seen.ranges) == w.nbytes  # each byte once
    # Columns: a 4-way split of 4 KiB rows is 1 KiB runs with 3 KiB holes, read as one
    # range per group of rows (holes under 8 KiB are read through).
    starts, run = byte_runs((256, 1024), ((0, 256), (256, 512)))
    assert run == 256
    assert len(starts) == 256
    assert starts[1] - starts[0] == 1024
    assert coalesce(starts, run * 4, 4) == [(0, 256)]
    wide, run = byte_runs((8, 1 << 16), ((0, 8), (0, 1024)))
    assert coalesce(wide, run * 4, 4) == [(i, i + 1) for i in range(8)]


def test_import_errors_name_the_tensor(tmp_path, mesh24):
    expected = {"a.w": np.ones((4, 8), np.float32), "a.b": np.zeros(8, np.float32)}
    save_file(expected, str(tmp_path / "model.safetensors"))
    url = str(tmp_path)
    ok = {"a": {"w": np.zeros((4, 8), np.float32), "b": np.zeros(8, np.float32)}}
    with pytest.raises(MissingLeafError, match=r"a/c.*'a.c'"):
        ckpt.restore(url, {"a": dict(ok["a"], c=np.zeros(2, np.float32))})
    with pytest.raises(MissingLeafError, match="no target leaf takes: 'a.b'"):
        ckpt.restore(url, {"a": {"w": ok["a"]["w"]}})
    assert set(ckpt.restore(url, {"a": {"w": ok["a"]["w"]}}, names=[r"drop \.b$"])["a"]) \
        == {"w"}
    with pytest.raises(ShapeMismatchError,
                       match=r"'a.w' \(model.safetensors\) is \[4, 8\].*\[8, 4\]"):
        ckpt.restore(url, {"a": dict(ok["a"], w=np.zeros((8, 4), np.float32))})
    with pytest.raises(DtypeMismatchError,
                       match=r"'a.b' \(model.safetensors\) is float32.*bfloat16"):
        ckpt.restore(url, {"a": dict(ok["a"], b=np.zeros(8, BF16))})
    with pytest.raises(TargetMismatchError, match="not arrays"):
        ckpt.restore(url, {"a": dict(ok["a"], n=3)})
    with pytest.raises(MissingLeafError, match="name rules leave out"):
        ckpt.restore(url, {"opt_state": {"w": ok["a"]["w"]}, **ok})
    renamed = ckpt.restore(url, {"model": ok["a"]}, names=[r"^model\. => a."])
    assert renamed["model"]["w"].tobytes() == expected["a.w"].tobytes()
    ckpt.save(str(tmp_path / "ours"), ok)
    with pytest.raises(ValueError, match="safetensors only"):
        ckpt.restore(str(tmp_path / "ours"), ok, names=["drop x"])


@pytest.mark.slow  # servers
def test_round_trip_on_object_stores(saved, request, tmp_path, devices):
    url, expected = saved
    for backend in ("s3", "gcs", "memory"):
        dst = backend_url(request, tmp_path, backend)
        ckpt.export_safetensors(url, dst, max_shard_size=8000)
        store = open_store(dst)
        assert "model.safetensors.index.json" in store.list_children()
        for file in (f for f in store.list_children() if f.endswith(".safetensors")):
            local = tmp_path / f"{backend}-{file}"
            local.write_bytes(store.read(file))
            for k, v in load_file(str(local)).items():
                assert v.tobytes() == expected[k].tobytes()
        mesh = make_mesh((2, 4))
        out = ckpt.restore(dst, _targets(mesh, expected, lambda k, mesh=mesh: NamedSharding(
            mesh, P("data") if k != "flag" else P())))
        _check(out, expected)


# -- untrusted headers --------------------------------------------------------------------

def _file(header, data=b""):
    body = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return len(body).to_bytes(8, "little") + body + data


BAD = {
    "huge header": (10**9).to_bytes(8, "little") + b"{}",
    "short": b"\x05\x00",
    "not json": _file(b"{nope"),
    "not an object": _file([1, 2]),
    "duplicate name": _file(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                            b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
                            b"\0" * 4),
    "unknown dtype": _file({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}},
                           b"\0" * 8),
    "shape vs bytes": _file({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                            b"\0" * 8),
    "negative": _file({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
    "bool shape": _file({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}},
                        b"\0" * 4),
    "past the end": _file({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
                          b"\0" * 8),
    "reversed": _file({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}),
    "overlap": _file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                     b"\0" * 12),
    "extra field": _file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4],
                                "x": 1}}, b"\0" * 4),
    "metadata not strings": _file({"__metadata__": {"a": 1}}),
    "deep": _file(b"[" * 100000 + b"]" * 100000),
    "huge empty": _file({"a": {"dtype": "F32", "shape": [2**62, 2**62, 0],
                               "data_offsets": [0, 0]}}),
    "offset near 2**63": _file({"a": {"dtype": "U8", "shape": [0],
                                      "data_offsets": [2**63 - 1, 2**63 - 1]}}),
    "bool not 0 or 1": _file({"a": {"dtype": "BOOL", "shape": [3], "data_offsets": [0, 3]}},
                             b"\x00\x01\x07"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_headers_are_corrupt_checkpoints(tmp_path, case):
    path = tmp_path / "model.safetensors"
    path.write_bytes(BAD[case])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):  # names the file
        ckpt.restore(str(path))


def test_a_file_replaced_while_it_is_read_is_an_error_not_other_bytes(tmp_path):
    """An export overwriting a file between a restore's header read and its data reads:
    the file's storage generation changed, so the restore fails instead of reading the new
    file's bytes at the old header's offsets."""
    from ckpt._reader import open_readable
    from ckpt.restore import read_arrays
    from ckpt.restore.boxes import full_box

    path = str(tmp_path / "model.safetensors")
    save_file({"w": np.zeros(1024, np.float32)}, path)
    source = open_readable(open_store(path))
    [rec] = source.manifest.leaves
    job = source.read_job(rec, [full_box(rec.shape)])
    save_file({"w": np.ones(1024, np.float32)}, path + ".new")
    os.replace(path + ".new", path)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors was replaced"):
        read_arrays([job])
    assert ckpt.restore(path)["w"].tolist() == [1.0] * 1024  # read afresh: the new file


def test_index_names_stay_in_the_folder(tmp_path):
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "x.safetensors"))
    (tmp_path / "sub").mkdir()
    for bad in ("../x.safetensors", "/etc/x.safetensors", "x.bin"):
        (tmp_path / "sub" / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": bad}}))
        with pytest.raises(ckpt.CkptError):
            ckpt.restore(str(tmp_path / "sub"))
    (tmp_path / "sub" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "y.safetensors"}}))
    save_file({"b": np.ones(2, np.float32)}, str(tmp_path / "sub" / "y.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="index names tensors their files lack"):
        ckpt.restore(str(tmp_path / "sub"))


def test_fuzzed_headers_never_escape_as_other_errors(tmp_path):
    """Random byte flips and truncations of a real file: a restore returns the right data
    or raises one of the library's errors; never another exception, never a hang."""
    from hypothesis import example, given, settings
    from hypothesis import strategies as st

    good = tmp_path / "good.safetensors"
    tensors = {"a.w": np.arange(12, dtype=np.float32).reshape(3, 4),
               "a.b": np.arange(5).astype(BF16), "c": np.arange(6, dtype=np.int64)}
    save_file(tensors, str(good))
    data = good.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    path = tmp_path / "model.safetensors"

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(st.integers(0, header_end - 1), st.integers(1, 255)),
                    max_size=4), st.integers(0, len(data)))
    @example([], len(data))  # the file itself: restored, and checked against itself
    @example([(header_end - 1, ord(" ") ^ ord("\t"))], len(data))  # padding: still valid
    def check(flips, cut):
        mutated = bytearray(data[:max(cut, 0)] if cut < len(data) else data)
        for at, bits in flips:
            if at < len(mutated):
                mutated[at] ^= bits
        path.write_bytes(bytes(mutated))
        try:
            out = ckpt.restore(str(path))
        except ckpt.CkptError:
            return
        # What restore returned is what the file says, read the plain way (header JSON,
        # then each tensor's byte range): the same names, dtypes, shapes and bytes.
        flat = {".".join(k): np.asarray(v) for k, v in _walk(out)}
        reference = _read_plainly(bytes(mutated))
        assert sorted(flat) == sorted(reference)
        for name, value in reference.items():
            assert flat[name].dtype == value.dtype and flat[name].shape == value.shape, name
            assert flat[name].tobytes() == value.tobytes(), name
        if bytes(mutated) == data:
            assert all(flat[n].tobytes() == t.tobytes() for n, t in tensors.items())

    check()


def _read_plainly(raw):
    """A safetensors file's tensors by the format's definition alone (the package's own
    numpy reader does not read bfloat16)."""
    import json

    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    kinds = {"F32": np.float32, "I64": np.int64, "BF16": BF16}
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            out[name] = np.frombuffer(raw[8 + size + begin:8 + size + end],
                                      kinds[info["dtype"]]).reshape(info["shape"])
    return out


def _walk(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _walk(v, prefix + (k,))
    else:
        yield prefix, tree


# -- a Flax NNX model, out and back -------------------------------------------------------

def test_flax_nnx_model_exported_loaded_and_imported_onto_2x4_and_one_device(tmp_path,
                                                                              devices):
    import optax
    from flax import nnx
    from safetensors.flax import load_file as load_flax

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(16, 32, rngs=rngs, param_dtype=jnp.bfloat16)
            self.down = nnx.Linear(32, 16, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(64, 16, rngs=rngs)
            self.layers = nnx.List([Block(rngs) for _ in range(2)])
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    model = Model(nnx.Rngs(params=1, dropout=2))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    url = str(tmp_path / "step-100")
    ckpt.save(url, {"model": nnx.state(model), "optimizer": nnx.state(optimizer), "step": 100})

    out = str(tmp_path / "hf")
    result = ckpt.export_safetensors(url, out, names=[r"^model\. => "])
    params = {default_name(path): value
              for path, value in flatten(nnx.state(model, nnx.Param))[0]}
    assert set(result.tensors) == set(params)  # optimizer and RNG state left out
    loaded = load_flax(os.path.join(out, "model.safetensors"))
    assert set(loaded) == set(params)
    for name, value in params.items():
        assert loaded[name].dtype == value.dtype, name
        assert np.asarray(loaded[name]).tobytes() == np.asarray(value).tobytes(), name
    assert loaded["layers.0.up.kernel"].dtype == jnp.bfloat16

    mesh = make_mesh((2, 4))

    def place(spec_of):
        abstract = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
        state = nnx.state(abstract, nnx.Param)
        return abstract, jax.tree.map(lambda s: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=spec_of(s)), state)

    def on_mesh(s):
        spec = P("data", "model") if len(s.shape) == 2 else P("model")
        return NamedSharding(mesh, spec)

    for spec_of in (on_mesh, lambda s: SingleDeviceSharding(devices[5])):
        abstract, target = place(spec_of)
        restored = ckpt.restore(out, target)
        fresh = Model(nnx.Rngs(params=9, dropout=9))
        nnx.update(fresh, restored)
        for name, value in params.items():
            got: Any = fresh  # walked by attribute names and list indices read at run time
            for part in name.split("."):
                got = got[int(part)] if part.isdigit() else getattr(got, part)
            array = got[...]
            assert array.sharding == spec_of(array), name
            assert array.dtype == value.dtype
            assert np.asarray(array).tobytes() == np.asarray(value).tobytes(), name


def test_inspect_convert_and_restore_with_a_mesh_only(tmp_path, mesh24):
    from ckpt.cli import main

    tensors = {"a.w": np.arange(64, dtype=np.float32).reshape(8, 8),
               "a.b": np.arange(8).astype(BF16)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path, metadata={"source": "test"})
    info = ckpt.metadata(path)
    assert {leaf.name: (leaf.shape, leaf.dtype) for leaf in info.leaves} == \
        {"a/w": ((8, 8), "float32"), "a/b": ((8,), "bfloat16")}
    assert info.metadata == {"source": "test"}
    assert main(["convert", "-q", path, str(tmp_path / "conv")]) == 0
    converted = ckpt.restore(str(tmp_path / "conv"))
    assert converted["a"]["w"].tobytes() == tensors["a.w"].tobytes()
    assert converted["a"]["b"].dtype == BF16
    # mesh= without a target: replicated on it (safetensors record no shardings).
    out = ckpt.restore(path, mesh=mesh24)
    assert out["a"]["w"].sharding == NamedSharding(mesh24, P())
    assert np.asarray(out["a"]["b"]).tobytes() == tensors["a.b"].tobytes()


# -- what an adversarial reading found ---------------------------------------------------

def test_an_interrupted_overwrite_is_never_read_as_one_model(saved, tmp_path):
    from tests.helpers.faults import FaultyStore

    url, expected = saved
    out = str(tmp_path / "out")
    ckpt.export_safetensors(url, out, max_shard_size=8000)
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "out" / "model-00001-of-00002.safetensors").read_bytes())

    def fail_second(doing, key, args):
        if doing == Op.WRITE and key.endswith("-00002-of-00002.safetensors"):
            raise OSError("the disk filled up")

    with pytest.raises(OSError, match="filled up"):
        ckpt.export_safetensors(url, FaultyStore(out, before=fail_second), overwrite=True,
                                max_shard_size=8000, dtype="bfloat16")
    # Shard 1 is the new export's, shard 2 the old one's, and the old index is gone first.
    assert not os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    os.remove(tmp_path / "out" / "adapter_model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="another export"):
        ckpt.restore(out)
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"not ours")
    ckpt.export_safetensors(url, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_model.safetensors", "model.safetensors"]


def test_what_an_export_cannot_write_is_refused_before_writing(tmp_path):
    url = str(tmp_path / "c")
    ckpt.save(url, {"a": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="strings to strings"):
        ckpt.export_safetensors(url, str(tmp_path / "o1"),
                                metadata={"step": 5})  # type: ignore[dict-item]  # on purpose
    with pytest.raises(ValueError, match="cannot hold"):
        ckpt.export_safetensors(url, str(tmp_path / "o2"), names=["^a$ => "])
    with pytest.raises(ValueError, match="cannot hold"):
        ckpt.export_safetensors(url, str(tmp_path / "o3"), names=["^a$ => __metadata__"])
    assert not any(os.path.exists(tmp_path / o) and os.listdir(tmp_path / o)
                   for o in ("o1", "o2", "o3"))


def test_folder_edge_cases(tmp_path):
    save_file({"a.b": np.ones(2, np.float32), "a": np.zeros(1, np.float32),
               "x.y": np.ones(1, np.int8)}, str(tmp_path / "model.safetensors"))
    out = ckpt.restore(str(tmp_path))
    # Only the names that clash stay whole keys.
    assert set(out) == {"a", "a.b", "x"}
    assert out["x"]["y"].tolist() == [1]
    (tmp_path / "extra.safetensors").mkdir()  # a folder with the name of a file: an error
    with pytest.raises(CorruptCheckpointError, match="extra.safetensors is named like a "
                                                     "safetensors file but is not one"):
        ckpt.restore(str(tmp_path))
    os.rmdir(tmp_path / "extra.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model.safetensors"}}))
    with pytest.raises(CorruptCheckpointError, match="ambiguous"):
        ckpt.restore(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.restore(str(tmp_path))


def test_a_none_leaf_of_the_target_comes_back_none(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    out = ckpt.restore(str(tmp_path), {"w": np.zeros(2, np.float32), "bias": None})
    assert out["bias"] is None
    assert out["w"].tolist() == [1.0, 1.0]


def test_a_long_run_is_read_in_bounded_requests(tmp_path):
    from ckpt.restore._raw import MAX_REQUEST_BYTES

    w = np.arange(10 << 20, dtype=np.float32)  # 40 MiB, one run
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    seen = ChunkReads()
    out = ckpt.restore(seen.store(str(tmp_path)))
    assert out["w"].tobytes() == w.tobytes()
    sizes = [e - b for _, b, e in seen.ranges]
    assert w.nbytes > MAX_REQUEST_BYTES  # else one request would be right
    assert sum(sizes) == w.nbytes
    assert max(sizes) <= MAX_REQUEST_BYTES
    assert len(sizes) == -(-w.nbytes // MAX_REQUEST_BYTES)  # as few as the bound allows


def _shards(folder, count, index):
    """A model split into ``count`` files (with its index, if ``index``), as an export
    writes it."""
    weights = {}
    for i in range(1, count + 1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        save_file({f"layer{i}.w": np.full(4, i, np.float32)}, str(folder / name))
        weights[f"layer{i}.w"] = name
    if index:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weights}))


@pytest.mark.parametrize("index", [False, True])
def test_a_model_missing_one_of_its_files_is_refused_everywhere(tmp_path, index):
    """An export killed before its last file (and its index) leaves 2 of 3 files: restore,
    inspect and convert refuse it, naming the missing file, instead of reading a part."""
    folder = tmp_path / "m"
    folder.mkdir()
    _shards(folder, 3, index)
    os.remove(folder / "model-00003-of-00003.safetensors")
    want = "model-00003-of-00003.safetensors" if not index else "missing"
    for call in (lambda: ckpt.restore(str(folder)), lambda: ckpt.metadata(str(folder))):
        with pytest.raises(CorruptCheckpointError, match=want):
            call()
    assert cli(["inspect", str(folder)]) == 1
    assert cli(["convert", str(folder), str(tmp_path / "c")]) == 1
    assert not os.path.exists(tmp_path / "c" / "COMMIT")


@pytest.mark.parametrize("thing", ["dangling", "folder", "loop", "fifo"])
def test_something_named_like_a_model_file_that_is_not_one_is_an_error(tmp_path, thing):
    folder = tmp_path / "m"
    folder.mkdir()
    _shards(folder, 2, index=False)
    odd = folder / ("model.safetensors" if thing == "fifo"
                    else "model-00002-of-00002.safetensors")
    os.remove(folder / "model-00002-of-00002.safetensors")
    if thing == "dangling":
        os.symlink(folder / "gone", odd)
    elif thing == "folder":
        odd.mkdir()
    elif thing == "loop":
        os.symlink(odd, odd)
    else:  # the only file of the folder, a FIFO
        os.remove(folder / "model-00001-of-00002.safetensors")
        os.mkfifo(odd)
    with pytest.raises(ckpt.CkptError) as err:
        ckpt.restore(str(folder))  # returns at once: never blocks, never reads a part
    assert odd.name in str(err.value), err.value


def test_a_tensor_the_file_lacks_is_named_with_the_nearest_names_it_holds(tmp_path):
    save_file({"model.layers.0.attn.q_proj.weight": np.ones((2, 2), np.float32),
               "model.layers.0.mlp.up.weight": np.ones(2, np.float32)},
              str(tmp_path / "model.safetensors"))
    target = {"model": {"layers": {"0": {"attn": {"q": {"weight": np.zeros((2, 2), np.float32)}},
                                         "mlp": {"up": {"weight": np.zeros(2, np.float32)}}}}}}
    with pytest.raises(MissingLeafError, match=r"\(tensor 'model\.layers\.0\.attn\.q\.weight'; "
                       r"the nearest names the file holds: 'model\.layers\.0\.attn\.q_proj"):
        ckpt.restore(str(tmp_path), target)
