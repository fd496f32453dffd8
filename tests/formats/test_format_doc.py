"""docs/format.md is the authority on the files: every field its tables describe is checked
against files this library writes (COMMIT, claims, manifest, leaf records of every kind,
host reports, LINEAGE, zarr.json), in both directions: nothing written that the document
does not describe, nothing it requires missing, each of the documented type."""

import json
import re
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import msgpack
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from tests.conftest import make_mesh
from tests.helpers import REPO

DOC = (REPO / "docs" / "format.md").read_text()


@dataclass(frozen=True)
class Row:
    """One documented field: its name, its type (or, in the leaf table, the kinds that hold
    it) and whether the document makes it conditional (optional, or for some leaves only)."""

    field: str
    kind: str
    conditional: bool


def _section(heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = DOC.index(f"\n{heading}\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(rf"\n#{{1,{len(level)}}} ", DOC[start:])]
    return DOC[start:start + ends[0]] if ends else DOC[start:]


def _table(heading: str) -> list[Row]:
    """The first table under ``heading``, one Row per field it names (a row naming several
    fields, ``a``, ``b`` with types ``str, int``, gives one Row each)."""
    text = _section(heading)
    first = re.search(r"(?:^\|.*\n)+", text, re.M)
    assert first is not None, f"no table under {heading!r} in docs/format.md"
    lines = [ln for ln in first.group(0).splitlines() if ln.startswith("| `")]
    rows, previous = [], ""
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        fields = re.findall(r"`([^`]+)`", cells[0])
        second = previous if cells[1] == "same" else cells[1]
        previous = second
        types = [t.strip() for t in second.split(",")] if "," in second else [second]
        for i, name in enumerate(fields):
            kind = types[i] if len(types) == len(fields) and "kinds" not in heading else second
            conditional = "optional" in second or "(" in second or "optional" in cells[2]
            rows.append(Row(name, kind, conditional))
    return rows


def _find(pattern: str, text: str, flags: int = 0) -> re.Match[str]:
    found = re.search(pattern, text, flags)
    assert found is not None, f"docs/format.md no longer says {pattern!r}"
    return found


def _conforms(value: Any, kind: str) -> bool:
    kind = kind.replace(", optional", "").strip()
    if kind in ("", "any"):
        return True
    head = kind.split()[0]
    return {"str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, float),
            "map": isinstance(value, dict),
            "array": isinstance(value, list)}[head]


def _check_record(record: dict[str, Any], rows: list[Row], what: str) -> None:
    documented = {r.field: r for r in rows}
    assert set(record) <= set(documented), (what, set(record) - set(documented))
    required = {r.field for r in rows if not r.conditional}
    assert required <= set(record), (what, required - set(record))
    for name, value in record.items():
        assert _conforms(value, documented[name].kind), (what, name, value,
                                                          documented[name].kind)


class Position:
    """A user object following the state protocol (a data pipeline's position)."""

    def __init__(self) -> None:
        self.n = 7

    def get_state(self) -> dict[str, int]:
        return {"n": self.n}

    def set_state(self, state: dict[str, int]) -> None:
        self.n = state["n"]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """A manager root whose step 2 holds a leaf of every kind and a big array of every
    dtype, with metrics; step 1 is deleted (so LINEAGE exists)."""
    mesh = make_mesh((2, 4))
    big = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)  # > 16 KiB in 1 byte
    tree: dict[str, Any] = {
        "sharded": jax.device_put(big, NamedSharding(mesh, P("data", "model"))),
        "rows": jax.device_put(big, NamedSharding(mesh, P("data"))),
        "replicated": jax.device_put(big, NamedSharding(mesh, P())),
        "small_jax": jnp.ones(3),
        "small_np": np.arange(4, dtype=np.int16),
        "np_scalar": np.float32(1.5),
        "key": jax.random.key(0),
        "keys": jax.random.split(jax.random.key(1), 4096),
        "values": [1, 2.5, 1 + 2j, "s", b"b", True, 2**70],
        "none": None, "empty": {}, "empty_list": [],
        "mine": ckpt.PerProcess(3), "position": Position(),
    }
    for name in ("bool", "int8", "uint8", "int16", "uint32", "float16", "bfloat16", "float64",
                 "complex64", "float8_e4m3fn", "float8_e5m2"):
        dtype = np.dtype(getattr(ml_dtypes, name, name))
        tree[f"big_{name}"] = (big > 5).astype(dtype) if name == "bool" else big.astype(dtype)
    root = str(tmp_path_factory.mktemp("format") / "run")
    with ckpt.CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, {"x": 1})
        mgr.save(2, tree, metrics={"loss": 0.5})
        mgr.wait()
        mgr.delete(1)
    return root, tree


def _read(path: str) -> Any:
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read())


def _step(root: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    step = f"{root}/2"
    commit = _read(f"{step}/COMMIT")
    return step, commit, _read(f"{step}/{commit['attempt']}/manifest.msgpack")


def test_commit_claims_and_lineage_are_as_documented(written):
    root, _ = written
    step, commit, _ = _step(root)
    _check_record(commit, _table("## COMMIT"), "COMMIT")
    _check_record(_read(f"{step}/claims/{commit['attempt']}"),
                  _table("## claims/&lt;attempt&gt;"), "claims")
    lineage = _read(f"{root}/LINEAGE")
    _check_record(lineage, _table("## LINEAGE"), "LINEAGE")
    assert lineage["deletes"] and lineage["deletes"][0][0] == 1, lineage


def test_manifest_and_every_leaf_kind_are_as_documented(written):
    root, tree = written
    _, _, manifest = _step(root)
    _check_record(manifest, _table("## manifest.msgpack"), "manifest")
    leaf_rows = _table("### Leaf records")
    kinds = {leaf["kind"] for leaf in manifest["leaves"]}
    assert kinds == {"array", "inline", "value", "none", "empty", "per_process"}, kinds
    for leaf in manifest["leaves"]:
        held = [r for r in leaf_rows if r.kind.split(" (")[0] == "all"
                or leaf["kind"] in re.split(r"[ ,]+", r.kind.split(" (")[0])]
        assert set(leaf) <= {r.field for r in held}, (leaf["path"], leaf["kind"])
        assert {r.field for r in held if "(" not in r.kind} <= set(leaf), leaf["path"]
    dtypes = _find(r"\| `dtype` \| array, inline \| one of `([^`]+)`", DOC).group(1).split()
    assert {leaf["dtype"] for leaf in manifest["leaves"] if "dtype" in leaf} <= set(dtypes)


def test_spec_has_at_most_one_entry_per_dimension(written):
    """The document's own examples: P("data") on a 2-d array is ["data"], replicated []."""
    row = _find(r"\| `spec` \|.*", DOC)
    assert '`P("data")` on a 2-d array is `["data"]`, a replicated array `[]`' in row.group(0)
    root, _ = written
    _, _, manifest = _step(root)
    specs = {leaf["path"][0][1]: leaf["spec"] for leaf in manifest["leaves"] if "spec" in leaf}
    assert specs["sharded"] == ["data", "model"]
    assert specs["rows"] == ["data"]
    assert specs["replicated"] == []
    for leaf in manifest["leaves"]:
        if "spec" in leaf:
            assert len(leaf["spec"]) <= len(leaf["shape"]) + (1 if "prng_impl" in leaf else 0)
            assert all(e is None or isinstance(e, str)
                       or (isinstance(e, list) and all(isinstance(x, str) for x in e))
                       for e in leaf["spec"]), leaf


def test_zarr_json_is_as_documented(written):
    root, _ = written
    step, commit, manifest = _step(root)
    bullet = _find(r"- `codecs`: (.*?);\n", _section("## Arrays"), re.S).group(1)
    wide, narrow = (json.loads(s) for s in re.findall(r"`(\[.*?\])`", bullet.replace("\n", " ")))
    narrow_dtypes = set(_find(r"single-byte ones \(([^)]*)\)", bullet.replace("\n  ", " "))
                        .group(1).split(":")[0].replace("`", "").split(", "))
    arrays = [leaf for leaf in manifest["leaves"] if leaf["kind"] == "array"]
    assert {leaf["dtype"] for leaf in arrays} >= narrow_dtypes | {"float32", "bfloat16"}
    for leaf in arrays:
        with open(f"{step}/{commit['attempt']}/arrays/{leaf['name']}/zarr.json") as f:
            meta = json.load(f)
        single = np.dtype(getattr(ml_dtypes, leaf["dtype"], leaf["dtype"])).itemsize == 1
        assert (leaf["dtype"] in narrow_dtypes) == single, leaf["dtype"]
        assert meta["codecs"] == (narrow if single else wide), (leaf["dtype"], meta["codecs"])
        assert meta["data_type"] == leaf["dtype"] and meta["shape"] == leaf["shape"]
        assert meta["chunk_grid"] == {"name": "regular",
                                      "configuration": {"chunk_shape": leaf["chunk_shape"]}}
        assert meta["chunk_key_encoding"]["name"] == "default"
        assert set(meta["attributes"]) == {"ckpt_key_path"}
        python = "".join(f".{v}" if k == "attr" else f"[{v!r}]" for k, v in leaf["path"])
        assert meta["attributes"]["ckpt_key_path"] == python, meta["attributes"]


def test_host_reports_are_as_documented(written):
    root, _ = written
    step, commit, manifest = _step(root)
    report = _read(f"{step}/{commit['attempt']}/hosts/0.msgpack")
    _check_record(report, _table("## hosts/<p>.msgpack"), "hosts/0")
    assert report["process"] == 0 and report["attempt"] == commit["attempt"]
    for row in report["chunks"]:
        assert [type(x) for x in row] == [str, int, int, int], row


def test_a_compressed_step_is_as_documented(tmp_path):
    """Version 2, each array's `compression` map, and zstd between the two codecs."""
    big = np.arange(256 * 128, dtype=np.float32).reshape(256, 128)
    url = str(tmp_path / "z")
    ckpt.save(url, {"w": big, "b": big > 5, "n": 1}, compression="zstd:7")
    commit = _read(f"{url}/COMMIT")
    manifest = _read(f"{url}/{commit['attempt']}/manifest.msgpack")
    _check_record(manifest, _table("## manifest.msgpack"), "manifest")
    assert manifest["format_version"] == 2
    row = _find(r"\| `compression` \| array \(version 2, compressed arrays only\) \| "
                r"`(\{[^`]*\})`", DOC)
    documented = json.loads(row.group(1).replace("int", "7"))
    bullet = _find(r"- `codecs`: (.*?);\n", _section("## Arrays"), re.S).group(1)
    zstd = json.loads(_find(r'`(\{"name": "zstd",.*?\}\})`', bullet.replace("\n  ", " "))
                      .group(1).replace("<level>", "7"))
    wide, narrow = (json.loads(s) for s in re.findall(r"`(\[.*?\])`", bullet.replace("\n", " ")))
    for leaf in (x for x in manifest["leaves"] if x["kind"] == "array"):
        assert leaf["compression"] == documented, leaf
        with open(f"{url}/{commit['attempt']}/arrays/{leaf['name']}/zarr.json") as f:
            codecs = json.load(f)["codecs"]
        plain = narrow if leaf["dtype"] == "bool" else wide
        assert codecs == [plain[0], zstd, plain[1]], codecs


@pytest.mark.parametrize("compression", ["", "zstd:3"])
def test_the_zarr_json_written_is_tensorstores_own_byte_for_byte(tmp_path, compression):
    """The library writes each `zarr.json` itself (one batch an attempt); TensorStore,
    creating the same array, writes exactly the same bytes, for every dtype."""
    import tensorstore as ts

    from ckpt._format import DTYPE_SIZES, ChunkLayout, LeafKind, LeafRecord, zarr_json, zarr_spec

    for i, dtype in enumerate(DTYPE_SIZES):
        rec = LeafRecord(path=(("key", "p"), ("index", 0), ("attr", "mu")),
                         kind=LeafKind.ARRAY, shape=(10, 6), dtype=dtype, name=f"a{i}",
                         layout=ChunkLayout((5, 6), (0, 0), (0, 0), (0, 0)),
                         compression=compression)
        folder = tmp_path / rec.name
        spec = zarr_spec({"driver": "file", "path": str(folder)}, rec)
        del spec["assume_metadata"]
        spec.update(create=True, open=False)
        ts.open(spec).result()
        assert (folder / "zarr.json").read_bytes() == zarr_json(rec), dtype


@pytest.mark.parametrize("shape", [(4, 6), ()])
def test_a_plain_chunk_is_the_object_tensorstore_writes(tmp_path, shape):
    """Small whole chunks are encoded by the library (`chunk_object`) and written as plain
    objects; TensorStore writing the same chunk of the same array stores the same bytes,
    for every dtype, and TensorStore and zarr-python read the library's back from its
    zarr.json alone."""
    import ml_dtypes
    import tensorstore as ts
    import zarr

    from ckpt._format import (
        DTYPE_SIZES,
        ChunkLayout,
        LeafKind,
        LeafRecord,
        chunk_object,
        plain_chunks,
        zarr_json,
        zarr_spec,
    )

    rng = np.random.default_rng(4)
    for dtype in DTYPE_SIZES:
        np_dtype = np.dtype(getattr(ml_dtypes, dtype, None) or dtype)
        data = rng.integers(0, 2, shape).astype(np_dtype) if dtype == "bool" else \
            (rng.standard_normal(shape) * 20).astype(np_dtype)
        rec = LeafRecord(path=(("key", dtype),), kind=LeafKind.ARRAY, shape=shape,
                         dtype=dtype, name=dtype, layout=ChunkLayout(shape, (0,), (0,), (0,)))
        assert plain_chunks(rec)
        ours, theirs = tmp_path / "ours" / dtype, tmp_path / "theirs" / dtype
        key = "/".join(["c"] + ["0"] * len(shape))
        (ours / key).parent.mkdir(parents=True)
        little = np.ascontiguousarray(data, dtype=np_dtype.newbyteorder("<"))
        crc = __import__("google_crc32c").value(little.reshape(-1).view(np.uint8))
        (ours / key).write_bytes(chunk_object(little, crc))
        (ours / "zarr.json").write_bytes(zarr_json(rec))
        spec = zarr_spec({"driver": "file", "path": str(theirs)}, rec)
        del spec["assume_metadata"]
        spec.update(create=True, open=False)
        ts.open(spec).result().write(data).result()
        assert (ours / key).read_bytes() == (theirs / key).read_bytes(), dtype
        back = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(ours)}},
                       open=True).result().read().result()
        assert back.tobytes() == data.tobytes(), dtype
        if not dtype.startswith(("bfloat", "float8")):  # types zarr-python has no name for
            read = np.asarray(zarr.open_array(str(ours), mode="r")[...])
            assert read.tobytes() == data.tobytes(), dtype
