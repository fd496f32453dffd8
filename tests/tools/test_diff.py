"""`ckpt diff` and `ckpt.diff`: equal states found equal (by checksum where it can), every
kind of difference found and named, memory bounded, exit statuses as documented."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.cli import main
from tests.conftest import RSS_OVERHEAD, backend_url, cli_extra_rss, make_mesh
from tests.tools.test_cli import _damage


def _state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    host = {"w": rng.standard_normal((256, 1024)).astype(np.float32),
            "e": rng.standard_normal((512, 64)).astype(jnp.bfloat16),
            "ids": rng.integers(0, 1000, (64, 32)).astype(np.int32)}
    specs = {"w": P("data", "model"), "e": P("model"), "ids": P()}
    return {"params": {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                       for k, v in host.items()},
            "key": jax.random.key(seed), "step": 7, "lr": 0.25, "name": "run"}, host


@pytest.fixture
def pair(tmp_path, mesh24):
    tree, host = _state(mesh24)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ckpt.save(a, tree)
    ckpt.save(b, tree)
    return a, b, tree, host


def _by_path(result):
    return {leaf.path: leaf for leaf in result.leaves}


def test_two_saves_of_one_state_are_equal_reading_nothing(pair):
    a, b, _, _ = pair
    result = ckpt.diff(a, b)
    assert result.equal and not result.differences
    assert {leaf.status for leaf in result.leaves} == {"identical"}
    assert result.bytes_total > 2 * (1 << 20)
    assert result.bytes_read == 0  # every chunk matched by its crc32c
    assert result.summary().startswith("equal: 7 leaves, 7 identical; read 0 B of ")
    full = ckpt.diff(a, b, by_checksum=False)
    assert full.equal and full.bytes_read == full.bytes_total


def test_a_perturbed_leaf_is_found_and_named_reading_only_its_chunk(pair, tmp_path, mesh24):
    a, _, tree, host = pair
    w = host["w"].copy()
    w[3, 5] += 0.5
    w[200, 1000] = np.nan
    w[201, 1000] = np.inf
    changed = dict(tree, params=dict(tree["params"], w=jax.device_put(
        w, NamedSharding(mesh24, P("data", "model")))), lr=0.2500001)
    c = str(tmp_path / "c")
    ckpt.save(c, changed)
    result = ckpt.diff(a, c)
    assert not result.equal
    leaves = _by_path(result)
    lw = leaves["params/w"]
    assert lw.status == "different"
    assert (lw.elements, lw.differing, lw.beyond) == (256 * 1024, 3, 3)
    assert lw.max_abs == pytest.approx(0.5)
    assert lw.max_rel == pytest.approx(0.5 / abs(float(w[3, 5])))
    assert (lw.nan_a, lw.nan_b, lw.inf_a, lw.inf_b) == (0, 1, 0, 1)
    assert leaves["lr"].status == "different"
    assert sorted(x.path for x in result.differences) == ["lr", "params/w"]
    # Only the two chunks whose checksums differ were read, from both sides.
    chunk = 128 * 256 * 4
    assert result.bytes_read == 2 * 2 * chunk
    # Within a tolerance the finite difference passes, NaN and inf never do.
    loose = _by_path(ckpt.diff(a, c, atol=1.0))
    assert loose["params/w"].beyond == 2 and loose["lr"].status == "close"
    assert "params/w: different (float32[256,1024]): 3 of 262,144 elements differ (2 beyond " \
        "tolerance); max abs 0.5" in loose["params/w"].text()


def test_every_kind_of_difference_is_named(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ckpt.save(a, {"x": np.zeros((4, 4), np.float32), "y": np.zeros(3, np.float32),
                  "z": np.zeros(2), "v": 1, "gone": np.ones(2), "k": None})
    ckpt.save(b, {"x": np.zeros((4, 5), np.float32), "y": np.zeros(3, np.float16),
                  "z": 2.0, "v": 1, "new": "s", "k": None})
    result = ckpt.diff(a, b)
    status = {leaf.path: leaf.status for leaf in result.leaves}
    assert status == {"x": "shape", "y": "dtype", "z": "kind", "v": "identical",
                      "gone": "only_a", "new": "only_b", "k": "identical"}
    leaves = _by_path(result)
    assert leaves["x"].text() == "x: shape differs: A float32[4,4], B float32[4,5]"
    assert leaves["gone"].text() == "gone: only in A (float64[2])"
    assert result.summary().startswith(
        "different: 5 of 7 leaves (1 of another shape, 1 of another dtype, 1 of another "
        "kind, 1 only in A, 1 only in B; rtol=0, atol=0)")


def test_signed_zeros_and_nan_payloads_are_equal_but_not_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    x = np.array([0.0, np.nan, 1.0], np.float32)
    y = x.copy()
    y[0] = -0.0
    y.view(np.uint32)[1] |= 1  # another NaN
    ckpt.save(a, {"x": x, "n": float("nan")})
    ckpt.save(b, {"x": y, "n": float("nan")})
    result = ckpt.diff(a, b)
    assert result.equal
    assert sorted((leaf.path, leaf.status, leaf.differing) for leaf in result.leaves) == [
        ("n", "identical", 0), ("x", "close", 0)]


def test_resharded_converted_and_exported_copies_are_equal(pair, tmp_path):
    a, _, _, _ = pair
    resharded, converted = str(tmp_path / "r"), str(tmp_path / "c")
    ckpt.reshard(a, resharded, mesh="data=4,model=2", rules={"params/w": "model,data"})
    ckpt.convert(a, converted, compression="zstd")
    for other in (resharded, converted):
        result = ckpt.diff(a, other, memory_budget=4 << 20)
        assert result.equal, result.summary()
    # Another chunk grid: read in full. Compressed with the same grid: by checksum, since
    # the manifest's crc32c is over the decoded bytes.
    assert ckpt.diff(a, resharded).bytes_read > 0
    assert ckpt.diff(a, converted, only=["params/w"]).bytes_read == 0
    exported = str(tmp_path / "hf")
    ckpt.export_safetensors(a, exported)
    result = ckpt.diff(a, exported, only=["params/**"])
    assert result.equal and len(result.leaves) == 3, result.summary()
    assert {leaf.status for leaf in ckpt.diff(a, exported).differences} == {"only_a"}


def test_an_orbax_checkpoint_against_its_conversion(tmp_path, mesh24):
    tree, _ = _state(mesh24)
    del tree["key"], tree["name"]  # values Orbax's StandardSave does not take
    path = str(tmp_path / "orbax")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, tree)
    converted = str(tmp_path / "ours")
    ckpt.convert(path, converted)
    result = ckpt.diff(path, converted)
    assert result.equal, result.summary()
    assert result.bytes_read == result.bytes_total > 0  # Orbax records no checksums
    assert ckpt.diff(converted, path).equal


def _train(root, until, resume=False):
    """A deterministic loop: parameters, an Adam-like moment and an RNG key, saved at 2
    and 4; ``resume`` restarts from the newest step instead of from scratch."""
    step, w = 0, jnp.ones((64, 32), jnp.float32)
    mu, key = jnp.zeros_like(w), jax.random.key(0)
    with ckpt.CheckpointManager(root, watch_preemption=False) as mgr:
        if resume:
            state = mgr.restore(target={"w": w, "mu": mu, "key": key, "step": 0})
            step, w, mu, key = state["step"], state["w"], state["mu"], state["key"]
        while step < until:
            key, sub = jax.random.split(key)
            grad = jax.random.normal(sub, w.shape) + w
            mu = 0.9 * mu + 0.1 * grad
            w = w - 1e-2 * mu
            step += 1
            if step % 2 == 0:
                mgr.save(step, {"w": w, "mu": mu, "key": key, "step": step})


def test_a_restart_that_reproduces_its_state(tmp_path):
    straight, restarted = str(tmp_path / "straight"), str(tmp_path / "restarted")
    _train(straight, 4)
    _train(restarted, 2)
    _train(restarted, 4, resume=True)
    result = ckpt.diff(f"{straight}/4", f"{restarted}/4")
    assert result.equal and {leaf.status for leaf in result.leaves} == {"identical"}
    assert not ckpt.diff(f"{straight}/2", f"{restarted}/4").equal


def test_the_command_line(pair, tmp_path, capsys):
    a, b, tree, host = pair
    assert main(["diff", a, b]) == 0
    out = capsys.readouterr().out
    assert out.startswith("equal: 7 leaves, 7 identical; read 0 B of"), out
    host_w = host["w"].copy()
    host_w[0, 0] += 1e-3
    c = str(tmp_path / "c")
    ckpt.save(c, dict(tree, params=dict(tree["params"], w=host_w)))
    assert main(["diff", a, c]) == 1
    out = capsys.readouterr().out
    assert "  params/w: different (float32[256,1024]): 1 of 262,144 elements differ" in out
    assert out.splitlines()[-1].startswith("different: 1 of 7 leaves (1 beyond tolerance;")
    assert main(["diff", a, c, "--atol", "0.01"]) == 0
    assert "1 within tolerance (rtol=0, atol=0.01)" in capsys.readouterr().out
    assert main(["diff", a, c, "--only", "params/e", "--only", "step"]) == 0
    assert "equal: 2 leaves" in capsys.readouterr().out
    assert main(["diff", "--json", a, c]) == 1
    doc = json.loads(capsys.readouterr().out)
    from tests.tools.test_cli import _documented_json

    documented = _documented_json()[2]
    assert set(doc) == set(documented) and doc["equal"] is False
    assert all(set(leaf) == set(documented["leaves"][0]) for leaf in doc["leaves"])
    # Usage: 2; a damaged checkpoint: 3 (nothing can be said of the difference).
    assert main(["diff", a, c, "--only", "nope/*"]) == 2
    assert "nope/*" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["diff", a, c, "--rtol", "-1"])
    assert exit_.value.code == 2
    _damage(a, "params.w", "flip")
    assert main(["diff", a, c]) == 3
    assert "params/w" in capsys.readouterr().err
    assert main(["diff", a, str(tmp_path / "missing")]) == 3


@pytest.mark.slow  # starts the object-store servers
@pytest.mark.parametrize("backend", ["s3", "gcs"])
def test_across_backends(request, tmp_path, pair, backend):
    a, _, tree, _ = pair
    remote = backend_url(request, tmp_path, backend) + "/x"
    ckpt.save(remote, ckpt.restore(a, mesh=make_mesh((4, 2))))
    assert ckpt.diff(a, remote).equal
    assert ckpt.diff(remote, a, by_checksum=False).equal


@pytest.mark.slow  # starts processes
def test_memory_stays_within_budget(tmp_path):
    tree = {f"w{i}": np.random.default_rng(i).standard_normal((2048, 4096)).astype(np.float32)
            for i in range(8)}  # 256 MiB a side: 4x the budget below, each side
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ckpt.save(a, tree)
    ckpt.reshard(a, b, mesh="x=2,y=4", rules={"*": "y,x"})  # another grid: all is read
    budget = 64 << 20
    extra = cli_extra_rss(["diff", "-q", a, b, "--memory-budget", "64M"])
    assert extra <= budget + RSS_OVERHEAD, f"resident memory rose {extra / 2**20:.0f} MiB"


def test_integers_complex_nans_keys_and_values_are_compared_exactly(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    big = np.array([2**53, 7], np.int64)
    top = np.array([2**64 - 1], np.uint64)
    cx = np.array([complex(np.nan, 1.0), 1 + 2j], np.complex128)
    ckpt.save(a, {"i": big, "u": top, "c": cx, "n": 10**400, "s": ckpt.PerProcess(
        [float("nan"), 1]), "k": jax.random.key(0, impl="rbg")})
    ckpt.save(b, {"i": big + np.array([1, 0]), "u": top - np.uint64(1),
                  "c": np.array([complex(np.nan, 2.0), 1 + 2j]), "n": 10**400 + 1,
                  "s": ckpt.PerProcess([float("nan"), 1]),
                  "k": jax.random.key(0, impl="unsafe_rbg")})
    leaves = _by_path(ckpt.diff(a, b))
    # Differences of 1 between 64-bit integers beyond 2**53: not lost to float64.
    assert (leaves["i"].status, leaves["i"].differing, leaves["i"].max_abs) == \
        ("different", 1, 1.0)
    assert (leaves["u"].status, leaves["u"].max_abs) == ("different", 1.0)
    assert (leaves["c"].status, leaves["c"].differing) == ("different", 1)  # NaN+1j != NaN+2j
    assert (leaves["n"].status, leaves["n"].max_abs) == ("different", float("inf"))
    assert leaves["s"].status == "identical"  # NaN equals NaN in a per-process value
    assert leaves["k"].status == "dtype"  # keys of two implementations
    assert ckpt.diff(a, a, atol=2.0).equal


def test_leaves_whose_written_paths_coincide_are_both_compared(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    ckpt.save(a, {"a/b": np.zeros(3), "a": {"b": np.zeros(3)}})
    ckpt.save(b, {"a/b": np.zeros(3), "a": {"b": np.ones(3)}})
    result = ckpt.diff(a, b)
    assert len(result.leaves) == 2 and not result.equal
    [changed] = result.differences
    assert changed.path == "['a']['b']"  # a name that says which of the two it is
