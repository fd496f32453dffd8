"""Saved on a 2x4 mesh, restored bit-exactly onto other meshes, device counts and targets."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.errors import (
    DtypeMismatchError,
    MeshMismatchError,
    MissingLeafError,
    ShapeMismatchError,
)
from tests.conftest import make_mesh

SPECS = {"w": P("data", "model"), "v": P("model", None), "r": P(), "b": P(None, "data")}


@pytest.fixture
def saved(root_url, mesh24):
    rng = np.random.default_rng(0)
    host = {
        "w": rng.standard_normal((64, 256)).astype(np.float32),
        "v": rng.standard_normal((128, 40)).astype(jnp.bfloat16),
        "r": rng.standard_normal((32, 64)).astype(np.float32),
        "b": rng.integers(-9, 9, (8, 2048)).astype(np.int32),
    }
    tree = {k: jax.device_put(v, NamedSharding(mesh24, SPECS[k])) for k, v in host.items()}
    url = f"{root_url}/ckpt"
    ckpt.save(url, {"params": tree, "step": 7})
    return url, host


MESHES = [(2, 4), (4, 2), (1, 8), (8, 1), (1, 2), (1, 1)]


@pytest.mark.parametrize("shape", MESHES, ids=[f"{a}x{b}" for a, b in MESHES])
def test_restore_with_shape_dtype_struct_target(saved, shape):
    url, host = saved
    mesh = make_mesh(shape)
    target: dict[str, Any] = {"params": {k: jax.ShapeDtypeStruct(
        v.shape, v.dtype, sharding=NamedSharding(mesh, SPECS[k])) for k, v in host.items()},
        "step": 0}
    out = ckpt.restore(url, target)
    assert out["step"] == 7
    for k, v in host.items():
        got = out["params"][k]
        assert got.sharding == target["params"][k].sharding
        assert np.asarray(got).tobytes() == v.tobytes()


@pytest.mark.parametrize("shape", MESHES, ids=[f"{a}x{b}" for a, b in MESHES])
def test_restore_with_mesh_reuses_saved_specs(saved, shape):
    url, host = saved
    mesh = make_mesh(shape)
    out = ckpt.restore(url, mesh=mesh)
    for k, v in host.items():
        assert out["params"][k].sharding == NamedSharding(mesh, SPECS[k])
        assert np.asarray(out["params"][k]).tobytes() == v.tobytes()


def test_restore_with_array_target_and_other_specs(saved):
    url, host = saved
    mesh = make_mesh((4, 2))
    like = {k: jax.device_put(np.zeros(v.shape, v.dtype), NamedSharding(mesh, P("model", "data")))
            for k, v in host.items()}
    out = ckpt.restore(url, {"params": like})
    for k, v in host.items():
        assert out["params"][k].sharding == like[k].sharding
        assert np.asarray(out["params"][k]).tobytes() == v.tobytes()


def test_restore_as_numpy_without_target(saved):
    url, host = saved
    out = ckpt.restore(url)
    assert out["step"] == 7
    for k, v in host.items():
        assert isinstance(out["params"][k], np.ndarray)
        assert out["params"][k].tobytes() == v.tobytes()


def test_partial_target_restores_that_part(saved):
    url, host = saved
    mesh = make_mesh((1, 8))
    target = {"params": {"w": jax.ShapeDtypeStruct((64, 256), np.float32,
                                                   sharding=NamedSharding(mesh, P(None, "model")))}}
    out = ckpt.restore(url, target)
    assert list(out) == ["params"]
    assert list(out["params"]) == ["w"]
    assert np.asarray(out["params"]["w"]).tobytes() == host["w"].tobytes()


def test_target_dtype_casts_within_kind(saved):
    url, host = saved
    mesh = make_mesh((2, 4))
    target = {"params": {
        "w": jax.ShapeDtypeStruct((64, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P())),
        "v": jax.ShapeDtypeStruct((128, 40), np.float32, sharding=NamedSharding(mesh, P())),
        "b": np.zeros((8, 2048), np.int64)}}
    out = ckpt.restore(url, target)
    assert out["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out["params"]["w"]), host["w"].astype(jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out["params"]["v"]), host["v"].astype(np.float32))
    assert out["params"]["b"].dtype == np.int64
    np.testing.assert_array_equal(out["params"]["b"], host["b"])


def test_dtype_kind_change_is_an_error_naming_the_leaf(saved):
    url, _ = saved
    with pytest.raises(DtypeMismatchError, match=r"params/w.*float32.*int32"):
        ckpt.restore(url, {"params": {"w": np.zeros((64, 256), np.int32)}})


def test_shape_mismatch_names_the_leaf(saved):
    url, _ = saved
    with pytest.raises(ShapeMismatchError,
                       match=r"params/w: saved \[64, 256\], target \[64, 128\]"):
        ckpt.restore(url, {"params": {"w": jax.ShapeDtypeStruct((64, 128), np.float32)}})


def test_leaf_absent_from_checkpoint_names_all_missing(saved):
    url, _ = saved
    target = {"params": {"w": np.zeros((64, 256), np.float32), "extra": np.zeros(3)},
              "opt": np.zeros(2)}
    with pytest.raises(MissingLeafError) as err:
        ckpt.restore(url, target)
    absent = str(err.value).split(": ", 1)[1].split(";")[0].split(", ")
    assert sorted(absent) == ["opt", "params/extra"], err.value
    assert isinstance(err.value, ValueError)


def test_mesh_lacking_saved_axis_is_an_error(saved):
    url, _ = saved
    mesh = make_mesh((8,), ("batch",))
    with pytest.raises(MeshMismatchError,
                       match=r"params/w uses axes \['data', 'model'\]"):
        ckpt.restore(url, mesh=mesh)


def test_a_restore_reads_each_needed_chunk_once_and_no_other(saved):
    """A target of one leaf of two reads that leaf's chunks, each once, and not one chunk of
    the other. (In one process every device is local, so a whole leaf is always needed;
    that each process of a job reads only its own devices' boxes is
    tests/save/test_multiprocess.py's `restore_on`.)"""
    from tests.helpers.faults import ChunkReads

    url, _ = saved
    # Arrays of 1 MiB: smaller ones are gathered into one chunk when one process holds
    # them whole (`WHOLE_ARRAY_BYTES`).
    w = np.arange(256 * 1024, dtype=np.float32).reshape(256, 1024)
    sharding = NamedSharding(make_mesh((2, 4)), P("data", "model"))
    ckpt.save(f"{url}-big", {"params": {"w": jax.device_put(w, sharding),
                                        "u": jax.device_put(w + 1, sharding)}})
    seen = ChunkReads()
    mesh = make_mesh((1, 2))
    sharding = NamedSharding(mesh, P("data", "model"))
    target = {"params": {"w": jax.ShapeDtypeStruct((256, 1024), np.float32, sharding=sharding)}}
    out = ckpt.restore(seen.store(f"{url}-big"), target)
    assert np.array_equal(np.asarray(out["params"]["w"]), w)
    # w was saved as 2x4 chunks; its (1, 2) target needs all 8 once each, never more; u
    # is not asked for, and nothing of it is read.
    assert list(seen.reads) == ["params/w"]
    assert sorted(seen.reads["params/w"]) == [(i, j) for i in range(2) for j in range(4)]


def test_uncommitted_target_leaf_stays_movable(tmp_path, mesh24):
    w = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh24, P("data", "model")))
    count = jnp.zeros([], jnp.int32) + 3  # uncommitted, like optax's step counts
    ckpt.save(tmp_path / "c", {"w": w, "count": count})
    out = ckpt.restore(tmp_path / "c", {"w": w, "count": jnp.zeros([], jnp.int32)})
    assert int(out["count"]) == 3
    # jit may combine it with arrays on all 8 devices, as it could the target's.
    assert float(jax.jit(lambda a, c: a.sum() * c)(out["w"], out["count"])) == 16 * 16 * 3
