"""Saving and restoring trees of every supported leaf type and dtype, bit-exactly."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from tests.conftest import make_mesh

DTYPES = ["float32", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
          "uint16", "uint32", "uint64", "bool", "complex64"]


def _np_dtype(name):
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def _values(name, shape, seed=0):
    rng = np.random.default_rng(seed)
    dt = _np_dtype(name)
    if name == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    if name.startswith("complex"):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dt)
    if name.startswith(("int", "uint")):
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max, shape, dtype=dt, endpoint=True)
    return rng.standard_normal(shape).astype(dt)


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_sharded_and_numpy(tmp_path, mesh24, dtype):
    host = _values(dtype, (16, 1040))  # big enough to be a zarr array, not inline
    arr = jax.device_put(host, NamedSharding(mesh24, P("data", "model")))
    small = _values(dtype, (3,), seed=1)
    ckpt.save(tmp_path / "c", {"sharded": arr, "numpy": host, "small": small})
    out = ckpt.restore(tmp_path / "c")
    _same(out["sharded"], np.asarray(arr))  # jax without x64 narrows 64-bit types
    _same(out["numpy"], host)
    _same(out["small"], small)
    kinds = {leaf.name: leaf.kind for leaf in ckpt.metadata(tmp_path / "c").leaves}
    assert kinds == {"sharded": "array", "numpy": "array", "small": "inline"}


Point = collections.namedtuple("Point", ["x", "y"])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class State:
    params: dict
    step: jax.Array
    label: str = dataclasses.field(metadata=dict(static=True), default="s")


def test_pytree_containers_round_trip_into_target(tmp_path, mesh24):
    sh = NamedSharding(mesh24, P("data"))
    w = jax.device_put(jnp.arange(64.0).reshape(8, 8), sh)
    tree = {
        "list": [w, 1, None, (2.5, "text")],
        "tuple": (np.int32(7), np.float64(2.0)),
        "point": Point(x=w * 2, y=None),
        "state": State(params={"w": w}, step=jnp.int32(5)),
        "scalars": {"i": 2**70, "f": 0.25, "b": True, "c": 1 + 2j, "bytes": b"\x00\x01", "s": "é"},
        "ints": {0: "int key", 7: w},
    }
    ckpt.save(tmp_path / "c", tree)
    like = jax.tree.map(lambda x: x, tree)
    out = ckpt.restore(tmp_path / "c", target=like)
    # jaxlib has no stubs, so mypy cannot resolve jax's PyTreeDef and refuses its ==.
    assert jax.tree.structure(out, is_leaf=lambda x: x is None) == (  # type: ignore[operator]
        jax.tree.structure(tree, is_leaf=lambda x: x is None))
    _same(out["list"][0], w)
    assert out["list"][0].sharding == sh
    assert out["list"][1:3] == [1, None]
    assert out["list"][3] == (2.5, "text")
    assert isinstance(out["point"], Point)
    assert out["point"].y is None
    _same(out["point"].x, w * 2)
    assert isinstance(out["state"], State)
    _same(out["state"].step, jnp.int32(5))
    assert out["scalars"] == tree["scalars"]
    assert out["ints"][0] == "int key"
    _same(out["ints"][7], w)
    # One notation for people (`name`), JAX's for code that matches its own tree (`keystr`).
    leaves = ckpt.metadata(tmp_path / "c").leaves
    pairs, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)
    assert [leaf.keystr for leaf in leaves] == [jax.tree_util.keystr(p) for p, _ in pairs]
    names = [leaf.name for leaf in leaves]
    assert {"list/3/1", "point/x", "state/params/w", "ints/7"} <= set(names), names
    assert out["tuple"][0] == np.int32(7)
    assert out["tuple"][0].dtype == np.int32


def test_no_target_gives_nested_dicts_and_lists_of_numpy(tmp_path, mesh24):
    w = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh24, P("data", "model")))
    ckpt.save(tmp_path / "c", {"a": [w, (None, 3)], "p": Point(1, 2)})
    out = ckpt.restore(tmp_path / "c")
    assert isinstance(out["a"][0], np.ndarray)
    assert out == {"a": [out["a"][0], [None, 3]], "p": {"x": 1, "y": 2}}


def test_optax_state_round_trips(tmp_path, mesh24):
    params = {"w": jax.device_put(jnp.ones((32, 64)), NamedSharding(mesh24, P(None, "model"))),
              "b": jnp.zeros(64)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = opt.init(params)
    grads = jax.tree.map(lambda p: p * 0.5, params)
    _, state = opt.update(grads, state, params)
    ckpt.save(tmp_path / "c", {"params": params, "opt": state})
    out = ckpt.restore(tmp_path / "c", target={"params": params, "opt": state})
    saved = {"params": params, "opt": state}
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(saved), strict=True):
        _same(a, b)
        assert a.sharding == b.sharding
    assert type(out["opt"][1][0]) is type(state[1][0])


def test_replicated_and_partially_replicated_arrays(tmp_path, mesh24):
    full = jax.device_put(jnp.arange(4096.0).reshape(64, 64), NamedSharding(mesh24, P()))
    part = jax.device_put(jnp.arange(4096.0).reshape(64, 64) + 1,
                          NamedSharding(mesh24, P("model")))
    ckpt.save(tmp_path / "c", {"full": full, "part": part})
    out = ckpt.restore(tmp_path / "c", target={"full": full, "part": part})
    _same(out["full"], full)
    _same(out["part"], part)
    info = {leaf.name: leaf for leaf in ckpt.metadata(tmp_path / "c").leaves}
    assert info["part"].spec == P("model")
    assert info["part"].mesh == {"data": 2, "model": 4}


def test_single_device_and_uneven_arrays(tmp_path, devices):
    one = jax.device_put(jnp.arange(10000.0), devices[3])
    mesh = make_mesh((8,), ("x",))
    uneven = jax.device_put(np.arange(10 * 1000.0).reshape(10, 1000),
                            NamedSharding(mesh, P(None, "x")))
    ckpt.save(tmp_path / "c", {"one": one, "uneven": uneven})
    out = ckpt.restore(tmp_path / "c")
    _same(out["one"], one)
    _same(out["uneven"], uneven)
    out = ckpt.restore(tmp_path / "c", mesh=make_mesh((4,), ("x",)))
    _same(out["one"], one)
    assert out["one"].sharding.is_fully_replicated
    _same(out["uneven"], uneven)
    assert out["uneven"].sharding.spec == P(None, "x")


def test_metadata_reads_manifest_only(tmp_path, mesh24):
    w = jax.device_put(jnp.ones((64, 64), jnp.bfloat16), NamedSharding(mesh24, P("data", "model")))
    ckpt.save(tmp_path / "c", {"w": w, "n": 3}, metadata={"step": 9, "note": "hi"})
    # Deleting every chunk proves metadata reads none of them.
    for chunk_dir in (tmp_path / "c").glob("attempt-*/arrays/*/c"):
        for f in chunk_dir.rglob("*"):
            if f.is_file():
                f.unlink()
    info = ckpt.metadata(tmp_path / "c")
    assert info.metadata == {"step": 9, "note": "hi"}
    assert info.process_count == 1
    assert info.format_version == 1
    assert info.tree["w"] == jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    assert info.tree["n"] == 3
    assert info.nbytes == 64 * 64 * 2 + 0
    assert info.committed_at >= info.created_at


def test_each_chunk_written_once_balanced_over_replicas(tmp_path, mesh24):
    # 8 replicated 1 MiB arrays in one process: every chunk has exactly one writer and the
    # bytes are spread evenly over the 8 devices holding replicas.
    import ckpt._ownership as own

    arrays = [own.ArrayInput((512, 512), 4, NamedSharding(mesh24, P())) for _ in range(8)]
    plans = own.plan(arrays, 0, 1)
    devices = [d.id for p in plans for d, _ in p.owned.values()]
    assert sorted(devices) == sorted(d.id for d in mesh24.devices.flat)
    assert all(w == 0 for p in plans for w in p.writers)


def test_small_arrays_one_process_holds_are_one_chunk_each(tmp_path, mesh24, devices):
    """Arrays under 1 MiB whose every shard this process holds are gathered into one chunk
    (one object instead of one per shard), whatever their sharding (uneven, partially
    replicated, a typed key array); the values are those at the call even when the caller
    deletes its arrays at once, and they restore onto any mesh."""
    rng = np.random.default_rng(3)
    mesh8 = make_mesh((8,), ("x",))
    tree = {
        "w": jax.device_put(rng.standard_normal((128, 64), dtype=np.float32),
                            NamedSharding(mesh24, P("data", "model"))),
        "pr": jax.device_put(rng.standard_normal((64, 256)).astype(jnp.bfloat16),
                             NamedSharding(mesh24, P(None, "data"))),
        "uneven": jax.device_put(np.arange(10 * 1000.0).reshape(10, 1000),
                                 NamedSharding(mesh8, P(None, "x"))),
        "keys": jax.device_put(jax.random.split(jax.random.key(1), 4096),
                               NamedSharding(mesh8, P("x"))),
        "big": jax.device_put(np.ones((512, 512), np.float32),
                              NamedSharding(mesh24, P("data", "model"))),  # 1 MiB: per shard
    }
    want = {k: np.asarray(jax.random.key_data(v) if k == "keys" else v) for k, v in tree.items()}
    handle = ckpt.save_async(tmp_path / "c", tree)
    for k in ("w", "pr", "uneven"):
        tree[k].delete()
    handle.wait()
    info = ckpt.metadata(tmp_path / "c")
    chunks = {leaf.path[0][1]: leaf.chunk_shape for leaf in info.leaves}
    assert {k: chunks[k] == want[k].shape for k in want} == {
        "w": True, "pr": True, "uneven": True, "keys": True, "big": False}
    mesh42 = make_mesh((4, 2))
    other = {"w": NamedSharding(mesh42, P("model", "data")), "pr": NamedSharding(mesh42, P("data")),
             "uneven": jax.sharding.SingleDeviceSharding(devices[5]),
             "keys": NamedSharding(make_mesh((2,), ("x",)), P("x")),
             "big": NamedSharding(mesh42, P())}
    target = {k: jax.ShapeDtypeStruct(v.shape, jax.random.key(0).dtype if k == "keys"
                                      else v.dtype, sharding=other[k])
              for k, v in want.items()}
    target["keys"] = jax.ShapeDtypeStruct((4096,), jax.random.key(0).dtype,
                                          sharding=other["keys"])
    for out in (ckpt.restore(tmp_path / "c"), ckpt.restore(tmp_path / "c", target)):
        for k, v in want.items():
            got = jax.random.key_data(out[k]) if k == "keys" and not isinstance(
                out[k], np.ndarray) else out[k]
            assert np.asarray(got).tobytes() == v.tobytes(), k


def test_python_numbers_restore_into_zero_dim_array_targets(tmp_path, mesh24):
    """`jax.eval_shape` turns a step counter into a 0-d ShapeDtypeStruct; such a target gets
    the saved number as an array of its dtype and sharding, a float into an int is refused."""
    url = str(tmp_path / "ck")
    ckpt.save(url, {"step": 41, "lr": 0.5, "flag": True, "big": 2**40})
    replicated = NamedSharding(mesh24, P())
    out = ckpt.restore(url, {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                             "lr": np.zeros((), np.float32), "flag": True})
    assert isinstance(out["step"], jax.Array)
    assert out["step"].sharding == replicated
    assert out["step"].dtype == jnp.int32
    assert int(out["step"]) == 41
    assert isinstance(out["lr"], np.ndarray)
    assert out["lr"].dtype == np.float32
    assert float(out["lr"]) == 0.5
    assert out["flag"] is True
    with pytest.raises(ckpt.errors.DtypeMismatchError, match=r": lr: saved float64, target int32"):
        ckpt.restore(url, {"lr": jax.ShapeDtypeStruct((), jnp.int32)})
    with pytest.raises(ckpt.errors.DtypeMismatchError, match=r"leaf big: \d+ does not fit int32"):
        ckpt.restore(url, {"big": jax.ShapeDtypeStruct((), jnp.int32)})
    with pytest.raises(ckpt.errors.TargetMismatchError, match=r": step: saved "):
        ckpt.restore(url, {"step": np.zeros(3, np.int32)})


def test_empty_containers_round_trip_with_and_without_a_target(tmp_path):
    """Empty dicts, lists and tuples (Grain's prefetch state holds some; optax's EmptyState is
    an empty namedtuple) come back where they were: without a target as {} or [], with one
    as the target's own container; a target's empty container needs nothing saved."""
    import collections

    import optax

    Nothing = collections.namedtuple("Nothing", [])
    grain_like = {"mp_prefetch": {"workers_state": {}, "iterations_to_skip": {}},
                  "last_seen_indices": {"0": 4}, "queue": [], "pair": (), "mark": Nothing()}
    tree = {"loader": grain_like, "opt": optax.sgd(0.1).init({"w": jnp.ones(2)}),
            "w": np.arange(3)}
    ckpt.save(tmp_path / "c", tree)
    out = ckpt.restore(tmp_path / "c")
    assert out["loader"] == {"mp_prefetch": {"workers_state": {}, "iterations_to_skip": {}},
                             "last_seen_indices": {"0": 4}, "queue": [], "pair": [],
                             "mark": {}}
    assert out["opt"] == [{}, {}]
    assert ckpt.metadata(tmp_path / "c").tree["loader"]["mp_prefetch"] == {
        "workers_state": {}, "iterations_to_skip": {}}
    back = ckpt.restore(tmp_path / "c", tree)
    # jaxlib has no stubs, so mypy cannot resolve jax's PyTreeDef and refuses its ==.
    assert jax.tree.structure(back) == jax.tree.structure(tree)  # type: ignore[operator]
    assert type(back["opt"][0]) is optax.EmptyState
    assert back["loader"]["mark"] == Nothing()
    ckpt.save(tmp_path / "root", {})
    assert ckpt.restore(tmp_path / "root") == {}
    # A checkpoint without those records (an older one, Orbax's) restores onto a target
    # that has them; a saved empty container under an array target is a mismatch.
    ckpt.save(tmp_path / "old", {"w": np.arange(3)})
    again = ckpt.restore(tmp_path / "old", {"w": np.zeros(3, np.int64), "extra": {}, "q": []})
    assert again["extra"] == {}
    assert again["q"] == []
    assert again["w"].tolist() == [0, 1, 2]
    with pytest.raises(ckpt.errors.TargetMismatchError, match=r"loader/queue"):
        ckpt.restore(tmp_path / "c", {"loader": {"queue": np.zeros(2)}})
