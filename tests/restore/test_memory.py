"""Restore's memory: target buffers are adopted by JAX without a copy, replicas share them,
and nothing JAX does afterwards (donation included) writes into a shared buffer."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.restore._read import default_memory_budget
from tests.children import script


def _pointers(x):
    return {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}


def test_donating_restored_replicas_never_writes_into_the_shared_buffer(tmp_path, mesh24):
    rng = np.random.default_rng(0)
    host = {"full": rng.standard_normal(1 << 20, dtype=np.float32),
            "half": rng.standard_normal((256, 1024), dtype=np.float32)}
    specs = {"full": P(), "half": P(None, "model")}
    state = {k: jax.device_put(v, NamedSharding(mesh24, specs[k])) for k, v in host.items()}
    url = str(tmp_path / "ck")
    ckpt.save(url, state)
    out = ckpt.restore(url, mesh=mesh24)
    # Replicas of one box share one adopted host buffer: 1 for "full" (8 replicas), 4 for
    # "half" (4 boxes, 2 replicas each). This is where the memory saving comes from.
    assert len(_pointers(out["full"])) == 1
    assert len(_pointers(out["half"])) == 4
    step = jax.jit(lambda x: x * 2 + 1, donate_argnums=0)
    for k in host:
        before = _pointers(out[k])
        new = step(out[k])
        # Had XLA written into the donated shared buffer, the devices would have raced on
        # it and read each other's results.
        assert not (_pointers(new) & before), f"{k}: output written into the adopted buffer"
        for shard in new.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data),
                                          host[k][shard.index] * 2 + 1)


def test_restores_share_no_buffer_between_calls(tmp_path, mesh24):
    x = jax.device_put(np.arange(4096, dtype=np.float32), NamedSharding(mesh24, P()))
    url = str(tmp_path / "ck")
    ckpt.save(url, {"x": x})
    a = ckpt.restore(url, mesh=mesh24)["x"]
    b = ckpt.restore(url, mesh=mesh24)["x"]
    assert not (_pointers(a) & _pointers(b))
    a2 = jax.jit(lambda v: v.at[0].set(-1.0), donate_argnums=0)(a)
    assert float(a2[0]) == -1.0
    assert float(b[0]) == 0.0


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    from tests.conftest import make_mesh

    mesh = make_mesh((2, 4))
    rng = np.random.default_rng(1)
    state = {
        "a": jax.device_put(rng.standard_normal((2048, 8192), dtype=np.float32),
                            NamedSharding(mesh, P("data", "model"))),
        "b": jax.device_put(rng.standard_normal((2048, 4096), dtype=np.float32)
                            .astype(jax.numpy.bfloat16), NamedSharding(mesh, P(None, "model"))),
        "c": jax.device_put(rng.standard_normal(1 << 20, dtype=np.float32),
                            NamedSharding(mesh, P())),
    }
    url = str(tmp_path_factory.mktemp("big") / "ck")
    ckpt.save(url, state)
    return url


@pytest.mark.parametrize(("kind", "budget"), [("same", None), ("4x2", None), ("1dev", None),
                                             ("4x2", 8 << 20)])
def test_restore_peak_memory_is_the_state_plus_the_read_budget(big_checkpoint, kind, budget):
    # glibc's dynamic mmap threshold otherwise keeps freed chunk buffers in per-thread
    # arenas, by an amount that depends on thread timing (0-90 MiB here under load); fixing
    # the threshold measures what restore itself holds (docs/performance.md).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    run = subprocess.run([sys.executable, script("restore_rss_child"), big_checkpoint, kind,
                          *([str(budget)] if budget else [])], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    fields = run.stdout.strip().splitlines()[-1].split()
    extra, nbytes = int(fields[1]), int(fields[3])
    assert nbytes > 80 << 20
    # One copy of the state's bytes (replicas share it) plus chunks in flight (and 16 MiB
    # for the allocator's and TensorStore's own bookkeeping). A restore
    # that copied each buffer into JAX, or one per replica, would need over twice the state.
    # With a restore budget, chunks in flight are a quarter of it (each counted twice).
    window = default_memory_budget(nbytes) if budget is None else budget // 4
    assert extra <= nbytes + window + (16 << 20), \
        f"{kind}: resident memory rose {extra / 2**20:.0f} MiB for {nbytes / 2**20:.0f} MiB"


def _spy_reads(monkeypatch):
    """Each `read_arrays` call of a restore: (bytes of the boxes it allocates, its window)."""
    from ckpt.restore import read_arrays as real

    calls = []

    def spy(jobs, *, memory_budget=None, deadline=None):
        boxes = sum(int(np.prod([b - a for a, b in box])) * job.dtype.itemsize
                    for job in jobs for box in job.targets)
        calls.append((boxes, memory_budget))
        return real(jobs, memory_budget=memory_budget, deadline=deadline)

    monkeypatch.setattr("ckpt._restore.read_arrays", spy)
    return calls


def test_a_memory_budget_reads_leaves_in_waves_that_fit_it(tmp_path, mesh24, monkeypatch):
    """12 leaves of 256 KiB and one of 2 MiB under a 1 MiB budget: waves of at most 768 KiB
    of boxes (three leaves), chunks in flight within 256 KiB, the big leaf alone; the
    values exact on the saved mesh and on another."""
    rng = np.random.default_rng(3)
    host = {f"l{i:02d}": rng.standard_normal((256, 256), dtype=np.float32) for i in range(12)}
    host["big"] = rng.standard_normal((512, 1024), dtype=np.float32)
    state = {k: jax.device_put(v, NamedSharding(mesh24, P("data", "model")))
             for k, v in host.items()}
    url = str(tmp_path / "ck")
    ckpt.save(url, state)
    calls = _spy_reads(monkeypatch)
    budget = 1 << 20
    for kw in ({"target": state}, {"mesh": jax.sharding.Mesh(
            np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))}):
        calls.clear()
        out = ckpt.restore(url, memory_budget=budget, **kw)
        for k, v in host.items():
            np.testing.assert_array_equal(np.asarray(out[k]), v)
        assert len(calls) == 5, calls  # 4 waves of 3 small leaves, the big one alone
        assert all(window == budget // 4 for _, window in calls), calls
        alone = [boxes for boxes, _ in calls if boxes > budget * 3 // 4]
        assert alone == [host["big"].nbytes], calls
    calls.clear()
    ckpt.restore(url, target=state)
    assert len(calls) == 1 and calls[0][1] is None  # no budget: one wave, default window


@pytest.mark.parametrize("bad", [1000, -1, "1G", True, 1.5e9])
def test_a_restore_budget_below_a_chunk_or_not_bytes_is_refused(tmp_path, bad):
    url = str(tmp_path / "ck")
    ckpt.save(url, {"w": np.ones(10)})
    with pytest.raises(ckpt.InvalidArgumentError, match=r"memory_budget=.*at least 1 MiB"):
        ckpt.restore(url, memory_budget=bad)
    with ckpt.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, {"w": np.ones(10)})
        mgr.wait()
        with pytest.raises(ckpt.InvalidArgumentError, match=r"memory_budget="):
            mgr.restore(1, memory_budget=bad)
        assert mgr.restore(1, memory_budget=1 << 20)["w"].tolist() == [1.0] * 10
