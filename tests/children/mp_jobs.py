"""Functions the multi-process tests run in every process of a `tools.launch` job.

Each runs after `jax.distributed.initialize`; arguments and results are JSON values.
"""

import os
import signal
from typing import Any
from unittest import mock

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.storage import Op
from tests.helpers.saves import started, timings

SPECS = {"w": P("data", "model"), "v": P("model"), "r": P(), "pr": P(None, "data"),
         "e": P("model", "data")}


def host_tree(step):
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((256, 512)).astype(np.float32),
        "v": rng.standard_normal((1024, 512)).astype(np.float32),     # replicated over "data"
        "r": rng.standard_normal((1024, 1024)).astype(np.float32),    # fully replicated
        "pr": rng.standard_normal((64, 1024)).astype(np.float32),     # partially replicated
        "e": rng.integers(0, 100, (64, 64)).astype(np.int32),
        "small": rng.standard_normal(8).astype(np.float32),
        "step": step,
    }


def mesh_of(shape):
    return Mesh(np.array(jax.devices()).reshape(shape), ("data", "model"))


def device_tree(step, shape):
    mesh = mesh_of(shape)
    out = {}
    for k, v in host_tree(step).items():
        if k in SPECS:
            sh = NamedSharding(mesh, SPECS[k])
            out[k] = jax.make_array_from_callback(v.shape, sh, v.__getitem__)
        else:
            out[k] = v
    return out


def coordination_client() -> Any:
    """The coordination service's client, which `jax.distributed.initialize` (run before
    every job) made."""
    from jax._src.distributed import global_state

    client = global_state.client
    if client is None:
        raise RuntimeError("jax.distributed.initialize has not run in this process")
    return client


def exact(restored, step):
    """Asserts ``restored`` holds exactly the state of ``step`` (each addressable shard)."""
    expected = host_tree(step)
    for k, v in expected.items():
        if k == "step":
            assert restored[k] == v, (k, restored[k], v)
            continue
        got = restored[k]
        if isinstance(got, jax.Array):
            for shard in got.addressable_shards:
                assert np.asarray(shard.data).tobytes() == v[shard.index].tobytes(), k
        else:
            assert np.asarray(got).tobytes() == v.tobytes(), k


def save(url, step, mesh_shape):
    ckpt.save(url, device_tree(step, tuple(mesh_shape)), metadata={"step": step})
    return jax.process_index()


def restore_on(url, step, mesh_shape):
    """Restores onto ``mesh_shape`` with the saved specs; counts the chunk bytes read."""
    from ckpt.restore.boxes import box_size, chunk_box
    from tests.helpers.faults import ChunkReads

    seen = ChunkReads()
    out = ckpt.restore(seen.store(url), mesh=mesh_of(tuple(mesh_shape)))
    layout = {leaf.name: leaf for leaf in ckpt.metadata(url).leaves}
    read = [sum(box_size(chunk_box(c, layout[name].chunk_shape, layout[name].shape))
                * jax.numpy.dtype(layout[name].dtype).itemsize for c in coords)
            for name, coords in seen.reads.items()]
    exact(out, step)
    # Bytes of the distinct boxes this process's devices hold (replicas counted once).
    needed = sum(sum({str(s.index): s.data.nbytes for s in out[k].addressable_shards}.values())
                 for k in SPECS)
    return {"read": sum(read), "needed": needed}


def save_then_kill(url, step, mesh_shape, victim, point):
    """Saves ``step``; process ``victim`` SIGKILLs itself at ``point`` (or the parent kills;
    ``stop_before_report``: it stops itself before writing its host report)."""
    from tests.helpers.faults import FaultyStore

    def before(doing, key, args):
        if doing == Op.CREATE and point == "before_commit":
            os.kill(os.getpid(), signal.SIGKILL)
        if doing == Op.WRITE and point == "stop_before_report" and "/hosts/" in key:
            # Frozen with its chunks written and its report not: the future zombie, which
            # writes that report once it is woken.
            print(f"ZOMBIE {key}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    def after(doing, key, args):
        if (doing == Op.WRITE and key.endswith(point)) or (
                doing == Op.CREATE and point == "after_commit" and key.endswith("COMMIT")):
            os.kill(os.getpid(), signal.SIGKILL)

    if jax.process_index() == victim and point != "parent":
        url = FaultyStore(url, before=before, after=after)
    mgr = ckpt.CheckpointManager(url, keep_last=None)
    tree = device_tree(step, tuple(mesh_shape))
    print("SAVING", flush=True)
    mgr.save(step, tree)
    mgr.wait()
    print("DONE", flush=True)
    return "done"


def resume(url, mesh_shape, next_step, values_of=None):
    """The restarted job: restores every committed step exactly, then saves ``next_step``
    (with the values of step ``values_of``, default ``next_step``) unless it is committed."""
    mgr = ckpt.CheckpointManager(url, keep_last=None)
    latest = mgr.latest_step()
    exact(mgr.restore(latest, mesh=mesh_of(tuple(mesh_shape))), latest)
    steps = mgr.steps()
    for step in steps:
        exact(mgr.restore(step), step)
    if next_step not in steps:
        values = next_step if values_of is None else values_of
        mgr.save(next_step, device_tree(values, tuple(mesh_shape)))
    mgr.close()
    return {"latest": latest, "steps": steps}


def hang_one(url, timeout_s, hung):
    """Process ``hung`` stops responding in the middle of its save; the others must fail
    within ``timeout_s`` with an error naming it. The hung one was given a longer timeout,
    so that it wakes in time to reach the barrier the others left: it must say so."""
    import threading
    import time

    from tests.helpers.faults import FaultyStore, is_background

    if jax.process_index() == hung:
        pause = timeout_s * 2
        stalled: list[str] = []

        def stuck(doing, key, args):
            if is_background(doing, key) and not stalled:
                stalled.append(key)
                threading.Event().wait(pause)  # a hung write: goes on too late

        url = FaultyStore(url, before=stuck)
        timeout_s *= 4
    tree = device_tree(0, (jax.process_count(), 4))
    t0 = time.monotonic()
    try:
        ckpt.save(url, tree, timeout_s=timeout_s)
    except ckpt.errors.CoordinationError as exc:
        return {"error": str(exc), "type": "CoordinationError", "after": time.monotonic() - t0}
    except ckpt.CkptError as exc:
        return {"error": str(exc), "type": type(exc).__name__, "after": time.monotonic() - t0}
    return {"error": None}


def fail_one(url, failing):
    """Process ``failing`` cannot write; every process's save fails at once, naming it."""
    from tests.helpers.faults import FaultyStore, fail_background

    if jax.process_index() == failing:
        url = FaultyStore(url, before=fail_background(OSError(28, "No space left on device")))
    try:
        ckpt.save(url, device_tree(0, (jax.process_count(), 4)), timeout_s=120)
    except ckpt.CkptError as exc:
        return str(exc)
    return None


def diverge(url, how):
    """Processes save trees that disagree (``how``): every process's save must fail, naming
    the leaf and the processes, and nothing is committed."""
    me = jax.process_index()
    tree = device_tree(0, (jax.process_count(), 4))
    if how == "numpy":
        tree["loader"] = np.full(50_000, me, np.int32)   # a zarr array: chunks from both
    elif how == "value":
        tree["position"] = 100 + me
    elif how == "extra" and me == 1:
        tree["extra"] = np.zeros(10, np.float32)
    try:
        ckpt.save(url, tree, timeout_s=120)
    except ckpt.CkptError as exc:
        return str(exc)
    return None


def slow_commit(url, timeout_s, where):
    """Process 0's commit outlasts ``timeout_s``. ``where="claim"``: it stalls before
    COMMIT is written, until process 1 has given up; nothing may be committed, and no
    process may say it was. ``where="commit"``: the COMMIT create itself is under way when
    time runs out: it is not abandoned (a COMMIT write left running could land after a later
    save), so process 0 commits late; process 1, which gave up, says the outcome is unknown
    (COMMIT decides), never that nothing was committed."""
    from tests.helpers.faults import FaultyStore

    client = coordination_client()
    me = jax.process_index()
    if me == 0 and where == "claim":
        # Process 0 itself stalls (descheduled, paging) between two store calls: no store
        # wrapper can stage that, as the deadline bounds every store call.
        import ckpt._commit as commit_mod
        from ckpt._claims import claim_commit as real_claim

        def slow_claim(store, attempt):
            client.blocking_key_value_get("test/p1-gave-up", 120_000)
            real_claim(store, attempt)

        # _commit calls claim_commit by the name it imported; patched for the rest of the job.
        mock.patch.object(commit_mod, "claim_commit", slow_claim).start()
    if me == 0 and where == "commit":
        def slow_create(doing, key, args):
            if doing == Op.CREATE and key.endswith("COMMIT"):
                client.blocking_key_value_get("test/p1-gave-up", 120_000)

        url = FaultyStore(url, before=slow_create)
    try:
        ckpt.save(url, device_tree(0, (jax.process_count(), 4)), timeout_s=timeout_s)
        result: dict[str, str | None] = {"error": None}
    except ckpt.CkptError as exc:
        result = {"error": str(exc), "type": type(exc).__name__}
    if me == 1:
        client.key_value_set("test/p1-gave-up", "1")
    return result


def save_by_schedule(root):
    """`save` on every step, a schedule deciding (every 3 steps, or an hour): each process
    must get the same answer, save together, and a forced save must go through."""
    mgr = ckpt.CheckpointManager(root, save_every=3, save_every_seconds=3600,
                                 watch_preemption=False)
    saved = []
    for step in range(1, 7):
        asked = mgr.should_save(step) if step % 2 else None  # some steps asked twice
        handle = mgr.save(step, device_tree(step, (jax.process_count(), 4)))
        assert asked is None or asked == (handle is not None)
        saved.append(handle is not None)
    forced = mgr.save(7, device_tree(7, (jax.process_count(), 4)), force=True) is not None
    mgr.close()
    return {"saved": saved, "forced": forced,
            "steps": ckpt.CheckpointManager(root, read_only=True).steps()}


def per_process_states(root):
    """Each process's Grain iterator is at its own position, and its PerProcess value its
    own: after a save and a restore into fresh iterators, each gets its own back."""
    import grain

    def fresh():
        return iter(grain.MapDataset.range(100).shuffle(seed=5).batch(2))

    me = jax.process_index()
    loader = fresh()
    for _ in range(me + 1):
        next(loader)
    expected = np.asarray(next(fresh_iter := fresh()))  # the batch after me + 1 of them
    for _ in range(me + 1):
        expected = np.asarray(next(fresh_iter))
    with ckpt.CheckpointManager(root) as mgr:
        mgr.save(3, {"loader": loader, "who": ckpt.PerProcess({"process": me}), "step": 3})
    again = fresh()
    with ckpt.CheckpointManager(root, read_only=True) as mgr:
        out = mgr.restore(target={"loader": again, "who": ckpt.PerProcess(None), "step": 0})
    assert out["loader"] is again
    assert out["step"] == 3
    return {"value": out["who"].value, "resumed": np.asarray(next(again)).tolist(),
            "expected": expected.tolist()}


def policy_keys(root, calls):
    """``should_save`` with a wall-clock interval, ``calls`` times, with the processes as far
    apart as they like: the coordination service must keep none of the answers."""
    mgr = ckpt.CheckpointManager(root, save_every_seconds=3600, watch_preemption=False)
    answers = [mgr.should_save(step) for step in range(1, calls + 1)]
    mgr.close()
    client = coordination_client()
    client.wait_at_barrier("test/counted", 60_000)  # every answer was read
    left = client.key_value_dir_get("ckpt/policy/")
    return {"answers": sorted(set(answers)), "left": len(left)}


def restore_while_overwritten(url):
    """Another job overwrites the checkpoint (a single-process save, run by process 0 just
    before its first chunk read) while both processes restore it: no process may switch
    to the new checkpoint on its own, so process 0 must fail, naming the overwrite."""
    import subprocess
    import sys

    from tests.helpers.faults import FaultyStore

    source = url
    if jax.process_index() == 0:
        done: list[str] = []

        def overwritten_first(doing, key, args):  # the manifest is read, no chunk yet
            if doing == Op.READ and key.endswith("/manifest.msgpack") and not done:
                done.append(key)
                code = ("import sys, numpy as np, ckpt; "
                        "ckpt.save(sys.argv[1], {'w': np.full(50_000, 2.0, np.float32)}, "
                        "overwrite=True)")
                subprocess.run([sys.executable, "-c", code, url], check=True,
                               env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})

        source = FaultyStore(url, after=overwritten_first)
    try:
        out = ckpt.restore(source)
        return {"error": None, "w": float(np.asarray(out["w"])[0])}
    except ckpt.CkptError as exc:
        return {"error": str(exc), "type": type(exc).__name__}


def train_until_preempted(root, values_of_step):
    """A multi-process training loop that runs until the job is preempted (SIGTERM to any
    process); returns the step every process stopped at."""
    import threading

    mgr = ckpt.CheckpointManager(root, keep_last=None, save_every=1000)
    shape = (jax.process_count(), 4)
    start = mgr.latest_step()
    if start is not None:
        exact(mgr.restore(start, mesh=mesh_of(shape)), values_of_step(start)
              if callable(values_of_step) else start)
    step = (start or 0) + 1
    x = jax.numpy.zeros(())
    while True:
        x = x + jax.numpy.ones(())  # stands in for a training step
        print(f"STEP {step}", flush=True)
        if mgr.should_save(step):
            mgr.save(step, device_tree(step, shape))
        if mgr.reached_preemption(step):
            mgr.close()
            return {"stopped": step, "resumed_from": start}
        step += 1
        threading.Event().wait(0.02)  # paces the loop so a SIGTERM lands mid-run


def orbax_save(path, use_ocdbt, use_zarr3):
    """Saves `device_tree(1, (2, 4))` with orbax-checkpoint itself, from every process."""
    import orbax.checkpoint as ocp

    # Naming every process makes Orbax's barriers go through the coordination service: its
    # default barrier is a cross-process computation, which on jax 0.6.0's CPU collectives
    # fails now and then with "Gloo context initialization failed: ... Config key cpu:gloo/...
    # already exists" (a race in that jax release, not in what Orbax writes).
    every = ocp.options.MultiprocessingOptions(active_processes=set(range(jax.process_count())))
    handler = ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt, use_zarr3=use_zarr3,
                                          multiprocessing_options=every)
    with ocp.Checkpointer(handler, multiprocessing_options=every) as checkpointer:
        checkpointer.save(path, args=ocp.args.PyTreeSave(device_tree(1, (2, 4))))
    return jax.process_index()


def _grain_iterator(kind):
    """This process's iterator over its own shard of the data: ``map`` (a MapDataset
    iterator), ``loader0`` / ``loader2`` (a DataLoader with 0 or 2 worker processes)."""
    import grain
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; this is not an absl program
    me, n = jax.process_index(), jax.process_count()
    if kind == "map":
        return iter(grain.MapDataset.range(1000).shuffle(seed=7)[me::n].map(lambda x: x * 3)
                    .batch(4))
    sampler = grain.samplers.IndexSampler(
        num_records=400, shuffle=True, seed=11, num_epochs=1,
        shard_options=grain.sharding.ShardOptions(shard_index=me, shard_count=n))
    return iter(grain.DataLoader(data_source=list(range(400)), sampler=sampler,
                                 operations=[grain.transforms.Batch(batch_size=4)],
                                 worker_count=int(kind[-1])))


def grain_loop(root, kind, last, pause_at):
    """A training loop whose state holds each process's Grain iterator and a global array:
    resumes from ``root``'s latest step, saves every step up to ``last``, and returns the
    batches this process saw. With ``pause_at``, once step ``pause_at`` is committed on
    every process, prints ``SAVED`` and waits to be SIGKILLed (by the test)."""
    import threading

    from jax.experimental import multihost_utils

    mesh = mesh_of((2, 4))
    w = jax.device_put(np.zeros((8, 8), np.float32), NamedSharding(mesh, P("data", "model")))
    state = {"loader": _grain_iterator(kind), "w": w, "step": 0}
    resumed = None
    batches = {}
    with ckpt.CheckpointManager(root) as mgr:
        if (resumed := mgr.latest_step()) is not None:
            state = mgr.restore(resumed, target=state)
        for step in range(state["step"] + 1, last + 1):
            batch = np.asarray(next(state["loader"]))
            batches[step] = batch.tolist()
            print(f"BATCH {step} {batch.tolist()}", flush=True)
            state["w"] = state["w"] + float(batch.sum())
            state["step"] = step
            started(mgr.save(step, state)).wait()
            if step == pause_at:
                coordination_client().wait_at_barrier(f"test/saved-{step}", 60_000)
                print(f"SAVED {step}", flush=True)
                threading.Event().wait()
        total = float(np.asarray(multihost_utils.process_allgather(
            state["w"], tiled=True))[0, 0])
    return {"resumed": resumed, "batches": batches, "w": total}


def orbax_grain_items(root):
    """Orbax's own manager saves a step of two items from two processes: a global array and
    each process's Grain iterator (Grain's checkpoint handler: one JSON file per process).
    Each process then restores its own iterator through this library."""
    import grain
    import orbax.checkpoint as ocp

    every = ocp.options.MultiprocessingOptions(active_processes=set(range(jax.process_count())))
    options = ocp.CheckpointManagerOptions(multiprocessing_options=every, create=False)
    os.makedirs(root, exist_ok=True)  # Orbax does not, with active_processes named
    me = jax.process_index()
    it = _grain_iterator("map")
    for _ in range(me + 1):
        next(it)
    mesh = mesh_of((2, 4))
    w = jax.device_put(np.arange(64, dtype=np.float32).reshape(8, 8),
                       NamedSharding(mesh, P("data", "model")))
    with ocp.CheckpointManager(root, item_names=("state", "data"), options=options) as mgr:
        mgr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": w}),
                                            data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = np.asarray(next(it)).tolist()
    fresh = _grain_iterator("map")
    with ckpt.CheckpointManager(root, read_only=True) as mine:
        out = mine.restore(target={"data": fresh, "state": {"w": w}})
    assert out["data"] is fresh
    assert out["state"]["w"].sharding == w.sharding
    return {"next": np.asarray(next(fresh)).tolist(), "expected": expected,
            "state": ckpt.restore(os.path.join(root, "5"), item="data")}


def save_snapshot(url, step, mesh_shape, mode, budget):
    """Saves with ``snapshot=mode`` and deletes the arrays as soon as `save_async` returns;
    returns how the snapshot was taken and its peak host bytes."""
    tree = device_tree(step, tuple(mesh_shape))
    handle = ckpt.save_async(url, tree, snapshot=mode, memory_budget=budget)
    for v in tree.values():
        if isinstance(v, jax.Array):
            v.delete()
    handle.wait()
    return [timings(handle).snapshot, timings(handle).host_peak_bytes]


def restore_safetensors(path):
    """Restores the tensors of the safetensors file at ``path`` onto a 2x4 mesh across the
    processes; returns the bytes of tensor data this process read and needed."""
    from safetensors.numpy import load as load_bytes

    from ckpt.storage import open_store
    from tests.helpers.faults import ChunkReads

    folder, _, name = path.rpartition("/")
    host = load_bytes(open_store(folder).read(name))
    mesh = mesh_of((2, 4))
    specs = {"w": P("data", None), "v": P(None, "data"), "r": P()}
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, specs[k]))
              for k, v in host.items()}
    seen = ChunkReads()
    out = ckpt.restore(seen.store(path), target)
    needed = 0
    for k, v in host.items():
        boxes = {str(s.index): s for s in out[k].addressable_shards}
        for shard in boxes.values():
            assert np.asarray(shard.data).tobytes() == v[shard.index].tobytes(), k
            needed += shard.data.nbytes
    return {"read": sum(e - b for _, b, e in seen.ranges), "needed": needed}


def mixed_restores(root, mesh_shape):
    """Steps 1 and 2 saved by every process; then each process asks for another step (or,
    second, another dtype) onto the same global arrays: every process must fail, naming
    what each process asked for. Then an agreed restore works."""
    mesh = mesh_of(tuple(mesh_shape))
    me = jax.process_index()
    with ckpt.CheckpointManager(root) as mgr:
        for step in (1, 2):
            mgr.save(step, device_tree(step, tuple(mesh_shape)))
    out = []
    with ckpt.CheckpointManager(root, read_only=True) as mgr:
        try:
            mgr.restore(1 + me, mesh=mesh)  # config drift: each host its own step
            out.append("restored")
        except ckpt.TargetMismatchError as exc:
            out.append(str(exc))
        target = device_tree(0, tuple(mesh_shape))
        if me == 1:
            target["w"] = jax.ShapeDtypeStruct(target["w"].shape, np.float16,
                                               sharding=target["w"].sharding)
        try:
            mgr.restore(2, target=target)
            out.append("restored")
        except ckpt.TargetMismatchError as exc:
            out.append(str(exc))
        exact(mgr.restore(2, mesh=mesh), 2)
    return out


def cancel_one(url, who, manager):
    """Process ``who`` cancels a save once its first chunk write is under way (the save
    held there until the cancel is asked for); the other process holds its own first chunk
    write until it can see the cancel in the coordination service, then must stop at its
    next chunk boundary. Returns this process's outcome: what its cancel returned, the
    error its handle ended with, and the chunk writes it made, against those of a whole
    save of the same tree made first."""
    import threading

    from tests.helpers.faults import FaultyStore, is_chunk_write

    me = jax.process_index()
    tree = device_tree(0, (jax.process_count(), 4))
    whole: list = []
    ckpt.save(FaultyStore(url + "-whole", before=lambda doing, key, args: whole.append(key)
                          if is_chunk_write(doing) else None), tree, timeout_s=120)
    reached, gate, writes = threading.Event(), threading.Event(), []

    def hold_first_write(doing, key, args):
        if not is_chunk_write(doing):
            return
        writes.append(key)
        if reached.is_set():
            return
        reached.set()
        if me == who:
            gate.wait(120)
        else:  # until this process has heard of the cancel (its save's flag is set)
            assert ready.wait(120)
            job = held[0].on_cancel.args[0]  # type: ignore[union-attr]  # request_cancel
            assert job.cancelled.wait(120)

    store = FaultyStore(url, before=hold_first_write)
    ready, held = threading.Event(), []
    mgr = None
    if manager:
        mgr = ckpt.CheckpointManager(store, watch_preemption=False)
        handle = mgr.save(1, tree)
    else:  # 1 MiB of chunk data in flight at most: most chunks are still to write
        handle = ckpt.save_async(store, tree, timeout_s=120, memory_budget=1 << 20)
    assert handle is not None
    held.append(handle)
    ready.set()
    cancelled = None
    if me == who:
        assert reached.wait(120)
        ask = handle.on_cancel
        assert ask is not None

        def ask_then_release():
            ask()
            gate.set()

        handle.on_cancel = ask_then_release
        cancelled = mgr.cancel() if mgr is not None else handle.cancel()
    error = handle.outcome()  # (not marked seen: the process that did not cancel must not
    steps = None              # have to look at it for its next save to go on)
    if mgr is not None:
        mgr.save(2, tree)  # on every process: the cancelled save is not raised here
        mgr.close()
        steps = mgr.steps()
    return {"cancelled": cancelled, "error": type(error).__name__ if error else None,
            "steps": steps, "writes": len(writes), "whole": len(whole)}
