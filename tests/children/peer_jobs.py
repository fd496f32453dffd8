"""Functions the peer-transport tests (tests/runs/test_peers.py) run in every process of a
`tools.launch` job."""

import hashlib
import os
import signal
from unittest import mock

import jax
import numpy as np

import ckpt
from ckpt import _peers, _recovery
from ckpt._local import local_store
from ckpt._reader import open_readable
from ckpt._tiers import _holds
from ckpt.errors import CorruptCheckpointError
from ckpt.restore import read_arrays
from ckpt.restore.boxes import box_of_index, chunk_box, grid_shape, to_slices, unflat_index
from tests.children.mp_jobs import device_tree, host_tree
from tests.children.tier_jobs import _manager


def payload(src, dst, nbytes):
    """The bytes process ``src`` sends to ``dst``: different for every pair."""
    seed = int.from_bytes(hashlib.sha256(f"{src}->{dst}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _run(transfers, wave_bytes):
    me = jax.process_index()
    got = {t.src: bytearray() for t in transfers if t.dst == me}

    def source(t, offset, length):
        assert t.src == me
        return payload(t.src, t.dst, t.nbytes)[offset:offset + length]

    def sink(t, offset, data):
        assert t.dst == me
        buf = got[t.src]
        assert offset == len(buf), (offset, len(buf))
        buf += data.tobytes()

    _peers.exchange(transfers, source, sink, wave_bytes=wave_bytes)
    wrong = [t.src for t in transfers if t.dst == me
             and bytes(got[t.src]) != payload(t.src, t.dst, t.nbytes).tobytes()]
    return {"received": sorted(src for src, buf in got.items() if len(buf)), "wrong": wrong}


def to_holders(replicas, sizes, wave_bytes):
    """Every process sends ``sizes[p]`` bytes to each of its holders; returns what arrived."""
    n = jax.process_count()
    holding = _peers.holders(n, replicas)
    transfers = [_peers.Transfer(p, h, sizes[p]) for p in range(n) for h in holding[p]]
    out = _run(transfers, wave_bytes)
    out["expected"] = [p for p in _peers.held_for(holding, jax.process_index()) if sizes[p]]
    return out


def many_to_one(nbytes, wave_bytes):
    """Every other process sends to process 0 (one round each)."""
    n = jax.process_count()
    return _run([_peers.Transfer(p, 0, nbytes) for p in range(1, n)], wave_bytes)


def damaged_in_transit(nbytes):
    """One byte flipped on its way: the receiver must refuse it, naming the sender."""
    real = _peers._permute

    def flipping(mesh, perm):
        moved = real(mesh, perm)

        def run(x):
            out = moved(x)
            data = np.array(out.addressable_data(0))
            data[0, 0] ^= 1
            return jax.make_array_from_single_device_arrays(
                out.shape, out.sharding, [jax.device_put(data, out.addressable_data(0).device)])
        return run

    with mock.patch.object(_peers, "_permute", flipping):
        try:
            _run([_peers.Transfer(1, 0, nbytes)], 1 << 20)
        except CorruptCheckpointError as exc:
            return str(exc)
    return None


def save_with_replicas(root, local, steps, mesh_shape, replicas, snapshot):
    """Saves ``steps`` locally only (with a per-process leaf) with ``replicas`` replicas,
    then checks this process's copy of the last step: every chunk it holds exact, every
    shard of each process it holds a replica of there, their per-process values there."""
    me = jax.process_index()
    with ckpt.CheckpointManager(root, keep_last=None, local_dir=local, persist_every=1000,
                                timeout_s=90, local_replicas=replicas,
                                snapshot=snapshot) as mgr:
        for step in steps:
            tree = device_tree(step, tuple(mesh_shape))
            tree["mine"] = ckpt.PerProcess(1000 * me + step)
            mgr.save(step, tree)
        mgr.wait()
    step = steps[-1]
    tree = device_tree(step, tuple(mesh_shape))
    copy = open_readable(local_store(local, me).child(str(step)))
    manifest = copy.manifest
    assert manifest.local is not None
    replicas_of = manifest.local.get("replicas_of", [])
    writers: dict[int, int] = {}
    wrong, missing = [], []
    for rec in manifest.leaves:
        if rec.kind.value == "per_process":
            values = rec.value
        if rec.kind.value != "array":
            continue
        key = rec.path[0][1]
        expected = host_tree(step)[key]
        held = [f for f, w in enumerate(rec.writers) if w >= 0]
        for f in held:
            writers[rec.writers[f]] = writers.get(rec.writers[f], 0) + 1
        grid = grid_shape(rec.shape, rec.chunk_shape)
        boxes = [chunk_box(unflat_index(f, grid), rec.chunk_shape, rec.shape) for f in held]
        if boxes:
            got = read_arrays([copy.read_job(rec, boxes)])[0]
            wrong += [key for b, g in zip(boxes, got, strict=True) if g.tobytes()
                      != np.ascontiguousarray(expected[to_slices(b)]).tobytes()]
        if isinstance(tree[key], jax.Array):
            for q in [*replicas_of, me]:
                for device, index in tree[key].sharding.devices_indices_map(
                        tree[key].shape).items():
                    if device.process_index == q and not _holds(
                            rec, box_of_index(index, tree[key].shape)):
                        missing.append([key, q])
    return {"writers": {str(k): v for k, v in sorted(writers.items())}, "wrong": wrong,
            "missing": missing, "replicas_of": replicas_of,
            "values": values}


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def save_and_die_replicating(root, local, mesh_shape, victim):
    """Steps 1 and 2 saved with one replica each (2 persisted), then step 3, during whose
    exchange of replicas process ``victim`` SIGKILLs itself at its first wave."""
    real = _peers.exchange

    def dying(transfers, source, sink, **kw):
        return real(transfers, lambda t, at, n: _die(), sink, **kw)

    with _manager(root, local, 2, local_replicas=1) as mgr:
        for step in (1, 2):
            mgr.save(step, device_tree(step, tuple(mesh_shape)))
        mgr.wait()
        if jax.process_index() == victim:
            mock.patch.object(_peers, "exchange", dying).start()
        print("SAVING", flush=True)
        mgr.save(3, device_tree(3, tuple(mesh_shape)))
        mgr.wait()
    return "done"


def rebuild_and_die(root, local, mesh_shape):
    """The restart after process 1's folder was lost: process 1 SIGKILLs itself once the
    first wave of its rebuilt copy's objects was written (after the header), before its
    COMMIT."""
    real = _peers.exchange  # what _recovery calls by the name it imported
    calls = []

    def dying(transfers, source, sink, **kw):
        calls.append(True)

        def dying_sink(t, at, data):
            sink(t, at, data)
            if len(calls) == 2:
                _die()
        return real(transfers, source, dying_sink, **kw)

    if jax.process_index() == 1:
        mock.patch.object(_recovery, "exchange", dying).start()
    print("STARTING", flush=True)
    with _manager(root, local, 2):
        pass
    return "done"


def failing_writes_during_the_exchange(root, local, mesh_shape):
    """Step 3 saved with one replica and a 64 KiB budget (received chunks wait for room)
    while every chunk write of process 1's copy fails: the save must fail on every process,
    not leave the exchange waiting for room that never comes. Returns each process's
    error class and the steps offered afterwards."""
    from ckpt import _local, _tiers
    from tests.helpers.faults import FaultyStore, is_chunk_write

    def refuse(doing, key, args):
        if is_chunk_write(doing) and key == "3":
            raise OSError(28, "No space left on device")

    if jax.process_index() == 1:
        real = _local.local_store
        mock.patch.object(_tiers, "local_store", lambda path, p: FaultyStore(
            real(path, p), before=refuse)).start()
    with _manager(root, local, 2, local_replicas=1, memory_budget=1 << 16) as mgr:
        for step in (1, 2):
            mgr.save(step, device_tree(step, tuple(mesh_shape)))
        mgr.wait()
        handle = mgr.save(3, device_tree(3, tuple(mesh_shape)))
        error = handle.exception(timeout=120)
        steps = mgr.steps()
    return {"error": type(error).__name__ if error is not None else None, "steps": steps}


def start_with_replicas(root, local, replicas_by_process):
    """Makes a manager with this process's entry of ``replicas_by_process``; returns the
    error it raised (its message), or None."""
    try:
        with _manager(root, local, 2, local_replicas=replicas_by_process[jax.process_index()]):
            return None
    except ckpt.CkptError as exc:
        return str(exc)
