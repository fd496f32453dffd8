"""The snapshot's accelerator paths, forced on CPU: an on-device copy streamed to host within
a memory budget (``snapshot="device"``), and direct device-to-host copies within the same
budget (``snapshot="host"``). Values at the call, donation, deletion, the budget, a failure
mid-stream, and the choice ``auto`` makes."""

import functools
import gc
import os
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt._snapshot import choose_mode
from ckpt.errors import SaveError
from tests.children import mp_jobs, script
from tests.helpers.faults import FaultyStore, is_chunk_write
from tests.helpers.saves import started, timings
from tools.launch import launch

FORCED = ["device", "host"]


def _state(mesh):
    """Sharded, replicated, gathered-small, bfloat16, typed-key, numpy and scalar leaves."""
    rng = np.random.default_rng(7)
    host = {f"w{i}": rng.standard_normal((256, 512)).astype(np.float32) for i in range(6)}
    host["r"] = rng.standard_normal((512, 512)).astype(np.float32)
    host["small"] = np.arange(64, dtype=np.int32)
    host["b"] = rng.standard_normal((128, 256)).astype(jnp.bfloat16)
    specs = {"r": P(), "small": P("model"), "b": P("model", "data")}
    state = {k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P("data", "model"))))
             for k, v in host.items()}
    state["key"] = jax.random.key(3)
    state["np"] = np.arange(1000.0)
    state["step"] = 12
    return state, host


def _check(url, host, state_np):
    out = ckpt.restore(url)
    for k, v in host.items():
        assert out[k].dtype == v.dtype and out[k].tobytes() == v.tobytes(), k
    np.testing.assert_array_equal(out["np"], state_np)
    assert out["step"] == 12


@functools.partial(jax.jit, donate_argnums=0)
def _update(arrays):
    return jax.tree.map(lambda a: a * 3 + 1, arrays)


@pytest.mark.parametrize("mode", FORCED)
@pytest.mark.parametrize("then", ["donate", "delete"])
def test_the_checkpoint_holds_the_values_at_the_call(tmp_path, mesh24, mode, then):
    state, host = _state(mesh24)
    arrays = {k: v for k, v in host.items()}
    keys = jax.random.key_data(state["key"]).copy()
    np_copy = state["np"].copy()
    handle = ckpt.save_async(tmp_path / "c", state, snapshot=mode, memory_budget=256 << 10)
    live = {k: state.pop(k) for k in arrays}
    if then == "donate":
        updated = _update(live)  # every saved buffer donated and written over
        jax.block_until_ready(updated)
        assert all(v.is_deleted() for v in live.values()), "the snapshot kept a caller buffer"
    else:
        for v in live.values():
            v.delete()
    state["np"][:] = -1
    handle.wait()
    assert timings(handle).snapshot == mode
    _check(tmp_path / "c", host, np_copy)
    out = ckpt.restore(tmp_path / "c")
    assert np.array_equal(jax.random.key_data(out["key"]), keys)


def test_view_snapshot_is_the_cpu_default(tmp_path, mesh24):
    state, host = _state(mesh24)
    handle = ckpt.save_async(tmp_path / "c", state)
    handle.wait()
    assert timings(handle).snapshot == "view"
    assert timings(handle).host_peak_bytes == 0
    _check(tmp_path / "c", host, np.arange(1000.0))


@pytest.mark.parametrize("mode", FORCED)
def test_a_state_larger_than_the_budget_streams_within_it(tmp_path, mesh24, mode):
    state, host = _state(mesh24)
    budget = 300 << 10
    owned = sum(v.nbytes for v in host.values())
    assert owned >= 8 * budget
    handle = ckpt.save_async(tmp_path / "c", state, snapshot=mode, memory_budget=budget)
    handle.wait()
    # The largest unit fetched at once is the replicated array's one shard (1 MiB), let
    # through alone; everything else streams under the budget.
    largest = host["r"].nbytes
    assert 0 < timings(handle).host_peak_bytes <= max(budget, largest)
    _check(tmp_path / "c", host, np.arange(1000.0))


def _foreign_buffers(state, known):
    """Device buffers alive in this process that are not the caller's (JAX makes its own
    per-device views of them) and not in ``known``."""
    caller = {s.data.unsafe_buffer_pointer() for v in state.values()
              if isinstance(v, jax.Array) for s in v.addressable_shards}
    return {a.unsafe_buffer_pointer() for a in jax.live_arrays()
            if not a.is_deleted() and len(a.devices()) == 1} - caller - known


@pytest.mark.parametrize("mode", FORCED)
def test_a_failure_mid_stream_fails_the_save_and_frees_the_copies(tmp_path, mesh24, mode):
    state, host = _state(mesh24)
    written = []

    def before(doing, key, args):
        if is_chunk_write(doing):
            written.append(key)
            if len(written) == 5:
                raise OSError(5, "Input/output error")

    url = tmp_path / "c"
    gc.collect()
    baseline = _foreign_buffers(state, set())
    handle = ckpt.save_async(FaultyStore(url, before=before), state, snapshot=mode,
                             memory_budget=200 << 10)
    with pytest.raises(SaveError, match="Input/output error"):
        handle.wait(timeout=60)
    del handle
    gc.collect()
    # Every on-device copy the snapshot made is gone (the caller's arrays are still there).
    assert _foreign_buffers(state, baseline) == set()
    with pytest.raises(ckpt.CheckpointNotFoundError):
        ckpt.restore(url)
    ckpt.save(url, state, snapshot=mode, memory_budget=200 << 10)
    _check(url, host, np.arange(1000.0))


def _reachable_array_bytes(root, limit=500_000):
    """Bytes of numpy arrays reachable from ``root`` through references the collector sees
    (tracebacks, frames and their locals included)."""
    seen: set[int] = set()
    stack, total = [root], 0
    while stack and len(seen) < limit:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, type) or type(obj).__name__ == "module":
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            total += obj.nbytes
        stack.extend(gc.get_referents(obj))
    return total


def test_a_failed_save_keeps_no_host_copies_with_its_error(tmp_path, mesh24):
    """The handle keeps the error, and the error its traceback: none of the chunks fetched
    for the writer may stay reachable from it."""
    state, _ = _state(mesh24)

    def before(doing, key, args):
        if is_chunk_write(doing):
            raise OSError(5, "Input/output error")

    handle = ckpt.save_async(FaultyStore(tmp_path / "c", before=before), state,
                             snapshot="device", memory_budget=4 << 20)
    assert isinstance(handle.exception(timeout=60), SaveError)
    gc.collect()
    held = _reachable_array_bytes(handle)
    assert held < 64 << 10, f"{held / 2**20:.1f} MiB reachable from the failed save"


def test_the_feed_holds_nothing_once_the_writer_gave_up():
    """A unit fetched after the writer failed (the fetcher learns of it at its next
    reservation) is dropped, and releasing the snapshot empties the feed."""
    from ckpt._snapshot import Cancelled, Feed, Snapshot, Unit

    feed = Feed(1 << 20)
    feed.put(Unit([np.ones(4)], [], [None]), [np.ones(1 << 16)])
    snap = Snapshot("host", [], feed)
    snap.release()
    assert not feed._ready
    feed.put(Unit([np.ones(4)], [], [None]), [np.ones(1 << 16)])
    assert not feed._ready
    with pytest.raises(Cancelled):
        feed.reserve(1)


def test_replicated_shards_are_copied_on_their_planned_devices_and_only_the_owned_chunks(
        mesh24):
    """A fully replicated array's chunks are spread over the devices: each device copies
    the chunks planned for it (not the first device copying the whole array each time)."""
    from ckpt._coord import current
    from ckpt._save import _classify, _plan_chunks
    from ckpt._snapshot import start_fetching, take
    from ckpt.storage import Deadline

    value = np.arange(16 << 20, dtype=np.float32).reshape(4096, 4096)  # 64 MiB
    tree = {"r": jax.device_put(value, NamedSharding(mesh24, P()))}
    records, leaves = _classify(tree, 1)
    plans = _plan_chunks(records, leaves, current())
    planned = {d for d, _ in plans[0].owned.values()}
    assert len(planned) > 1
    snap = take(leaves, plans, "device", 1 << 30)
    try:
        copied = [(u.sources[0], u.devices[0]) for u in snap.units]
        assert {next(iter(s.devices())) for s, _ in copied} == planned
        assert all(next(iter(s.devices())) == d for s, d in copied)
        assert sum(s.nbytes for s, _ in copied) == value.nbytes
        out = np.empty_like(value)
        join = start_fetching(snap, "test-fetch")
        assert join is not None  # the device path fetches on a thread of its own
        for unit, host in snap.items(Deadline(60, "test"), lambda: False):
            for c in unit.chunks:
                out[c.slices] = c.data(host)
        join()
        assert np.array_equal(out, value)
    finally:
        snap.release()


def test_host_path_returns_when_the_writes_fail_while_it_waits_for_room(tmp_path, mesh24):
    """The caller's thread fetching under a full budget is woken by the writer's failure
    instead of waiting for room that never comes."""
    state, _ = _state(mesh24)
    reached = threading.Event()

    def before(doing, key, args):
        if is_chunk_write(doing):
            reached.set()
            raise OSError(28, "No space left on device")

    handle = ckpt.save_async(FaultyStore(tmp_path / "c", before=before), state,
                             snapshot="host", memory_budget=64 << 10)
    assert reached.is_set()
    with pytest.raises(SaveError, match="No space left"):
        handle.wait(timeout=60)


def test_the_manager_passes_the_snapshot_options(tmp_path, mesh24):
    state, host = _state(mesh24)
    with ckpt.CheckpointManager(tmp_path / "run", snapshot="device",
                                memory_budget=256 << 10) as mgr:
        handle = started(mgr.save(1, state))
        mgr.wait()
        assert timings(handle).snapshot == "device"
        assert timings(handle).host_peak_bytes <= max(256 << 10, host["r"].nbytes)
    _check(tmp_path / "run" / "1", host, np.arange(1000.0))
    with pytest.raises(ValueError, match="snapshot must be one of auto, device, host"):
        ckpt.CheckpointManager(tmp_path / "run", snapshot="gpu")
    with pytest.raises(ValueError, match="'nope'"):
        ckpt.save_async(tmp_path / "x", state, snapshot="nope")
    for bad in (0, -1, True, 1.5, "1G"):
        with pytest.raises(ValueError, match="memory_budget must be a positive whole"):
            ckpt.save_async(tmp_path / "x", state,
                            memory_budget=bad)  # type: ignore[arg-type]  # refused on purpose
    with pytest.raises(ValueError, match="memory_budget"):
        ckpt.CheckpointManager(tmp_path / "run", memory_budget=0)
    # save's memory_budget annotation (int) leaves out the numpy integers it takes.
    ckpt.save(tmp_path / "y", state, snapshot="host",
              memory_budget=np.int64(1 << 20))  # type: ignore[arg-type]


def test_auto_chooses_by_platform_and_device_memory():
    gpu0, gpu1 = object(), object()
    assert choose_mode("auto", "cpu", {}, {gpu0: 1 << 40}) == "view"
    assert choose_mode("auto", "gpu", {gpu0: 10, gpu1: 10}, {gpu0: 10, gpu1: 4}) == "device"
    # One device short of room sends the whole save the direct way.
    assert choose_mode("auto", "gpu", {gpu0: 10, gpu1: 3}, {gpu0: 10, gpu1: 4}) == "host"
    # A platform that reports no memory statistics is not trusted with copies.
    assert choose_mode("auto", "tpu", {gpu0: None}, {gpu0: 1}) == "host"
    assert choose_mode("device", "cpu", {}, {}) == "device"
    assert choose_mode("host", "gpu", {gpu0: 1 << 40}, {gpu0: 1}) == "host"
    with pytest.raises(ValueError, match="'pinned'"):
        choose_mode("pinned", "gpu", {}, {})


@pytest.mark.parametrize("mode", FORCED)
@pytest.mark.slow  # starts processes
def test_peak_resident_memory_stays_within_the_budget(tmp_path, mode):
    """In a fresh process: 256 MiB on 8 devices, saved through a 32 MiB budget. The direct
    path's host copies stay within the budget; the device path adds its on-device copies
    (on CPU, host memory too) and nothing more. Without streaming either would hold a
    second copy of the whole state on host."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    run = subprocess.run([sys.executable, script("save_rss_child"),
                          str(tmp_path / "c"), mode], capture_output=True, text=True,
                         timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    fields = run.stdout.strip().splitlines()[-1].split()
    extra, nbytes, budget, peak = (int(f) for f in fields[1::2])
    assert nbytes == 256 << 20
    assert 0 < peak <= budget
    copies = nbytes if mode == "device" else 0
    slack = 24 << 20  # TensorStore's encoded chunks in flight and the allocator's own
    assert extra <= copies + budget + slack, \
        f"{mode}: resident memory rose {extra / 2**20:.0f} MiB"


@pytest.mark.parametrize("mode", FORCED)
@pytest.mark.slow  # starts processes
def test_two_processes_save_through_the_forced_paths(tmp_path, mode):
    """Replicated arrays are split over both processes: each copies only its own chunks."""
    url = str(tmp_path / "c")
    got = launch("tests.children.mp_jobs:save_snapshot", 2, args=[url, 5, [2, 4], mode, 256 << 10])
    assert [g[0] for g in got] == [mode, mode]
    assert all(0 < g[1] <= 4 << 20 for g in got)
    out = ckpt.restore(url)
    for k, v in mp_jobs.host_tree(5).items():
        assert np.asarray(out[k]).tobytes() == np.asarray(v).tobytes(), k
