"""Functions the local-tier tests (tests/runs/test_tiers.py) run in every process of a
`tools.launch` job. ``local`` holds ``{process}``: each process has its own folder."""

import contextlib
import logging
import os
import signal
from unittest import mock

import jax

import ckpt
from ckpt import _local, _tiers
from ckpt.storage import Op
from tests.children.mp_jobs import device_tree, exact, mesh_of
from tests.helpers.faults import FaultyStore, ReadCounter, is_chunk_read, is_chunk_write


def _own(local):
    return local.replace("{process}", str(jax.process_index()))


def _manager(root, local, persist_every, **kw):
    return ckpt.CheckpointManager(root, keep_last=None, local_dir=local,
                                  persist_every=persist_every, timeout_s=60, **kw)


def _mine(step):
    """A per-process leaf's value (a data loader's position): differs on every process."""
    return 1000 * jax.process_index() + step


def save_steps(root, local, steps, mesh_shape, persist_every, per_process=False, replicas=0):
    """Saves ``steps`` (with a per-process leaf ``mine`` if ``per_process``; each copy
    holding ``replicas`` other processes' replicas); returns the step folders of this
    process's local tier."""
    with _manager(root, local, persist_every, local_replicas=replicas) as mgr:
        for step in steps:
            tree = device_tree(step, tuple(mesh_shape))
            if per_process:
                tree["mine"] = ckpt.PerProcess(_mine(step))
            mgr.save(step, tree)
    return sorted(os.listdir(_own(local)))


class _Served(logging.Handler):
    """The manager's "restored step ..." record: MiB each tier served."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.value = None

    def emit(self, record):
        if record.getMessage().startswith("restored step"):
            args = record.args
            self.value = {"local": args[2], "root": args[4]} if len(args) == 6 else "root"


def restore_latest(root, local, mesh_shape, persist_every=None, values_of=None):
    """Restores the newest step onto ``mesh_shape`` (saved specs) and checks it exactly
    (against the values of step ``values_of``, default the step); returns what was read
    of the persistent root (`ReadCounter`) while the manager started (``start``) and while
    it restored (``root``), and what each tier served."""
    counter = ReadCounter(root)
    served = _Served()
    logger = logging.getLogger("ckpt.manager")
    logger.addHandler(served)
    logger.setLevel(logging.INFO)
    with _manager(counter, local, persist_every) as mgr:
        start = dict(counter.counts)
        counter.counts.update(bytes=0, chunks=0, opened=0)
        latest = mgr.latest_step()
        restored = mgr.restore(latest, mesh=mesh_of(tuple(mesh_shape)))
        exact(restored, latest if values_of is None else values_of)
        if "mine" in restored:  # this process's own value, from its own copy
            assert restored["mine"].value == _mine(latest), restored["mine"]
        steps = mgr.steps()
    return {"latest": latest, "steps": steps, "start": start, "root": counter.counts,
            "served": served.value}


def save_and_die(root, local, mesh_shape, victim, phase):
    """Saves step 3 (local only) and step 4 (persisted too: persist_every=2) after a
    template of steps 1 and 2, then restores step 4; process ``victim`` SIGKILLs itself at
    ``phase`` (``stop-local-write``: stops itself there instead, to be a zombie)."""
    me = jax.process_index()
    restoring = False
    paused: list[bool] = []

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def local_after(doing, key, args):
        if phase == "local-write" and is_chunk_write(doing) and key == "3":
            die()
        if phase == "stop-local-write" and is_chunk_write(doing) and key == "3" and paused:
            print("WROTE", flush=True)
        if phase == "local-commit" and doing == Op.CREATE and key == "3/COMMIT":
            die()
        if phase == "retention" and doing == Op.DELETE and key == "1/COMMIT":
            die()
        if (is_chunk_read(doing) and doing.coord is not None) and key == "4" and (
                phase == "remote-read" or (phase == "restore" and restoring)):
            die()  # reading its copy back for the root, or for a restore

    def local_before(doing, key, args):
        if phase == "stop-local-write" and doing == Op.OPEN and key.startswith("3/") \
                and not paused:
            paused.append(True)  # stopped before it opens its arrays: all its writes come late
            print("PAUSED", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    def root_after(doing, key, args):
        if phase == "remote-write" and is_chunk_write(doing) and key == "4":
            die()
        if phase == "remote-commit" and doing == Op.CREATE and key == "4/COMMIT":
            die()

    if me == victim or (victim == -1 and me == 1):
        # _tiers calls local_store by the name it imported; patched for the rest of the job.
        real = _local.local_store
        mock.patch.object(_tiers, "local_store", lambda path, p: FaultyStore(
            real(path, p), before=local_before, after=local_after)).start()
        root = FaultyStore(root, after=root_after)
    with _manager(root, local, 2) as mgr:
        print("SAVING", flush=True)
        for step in (3, 4):
            mgr.save(step, device_tree(step, tuple(mesh_shape)))
        mgr.wait()
        restoring = True
        exact(mgr.restore(4, mesh=mesh_of(tuple(mesh_shape))), 4)
    print("DONE", flush=True)
    return "done"


def resume(root, local, mesh_shape, next_step, values_of=None):
    """The restarted job: restores every step the tiers hold exactly, saves ``next_step``
    (with the values of step ``values_of``, default ``next_step``) and restores it."""
    mesh = mesh_of(tuple(mesh_shape))
    with _manager(root, local, 2) as mgr:
        latest, steps = mgr.latest_step(), mgr.steps()
        for step in steps:
            exact(mgr.restore(step, mesh=mesh), step)
        values = next_step if values_of is None else values_of
        mgr.save(next_step, device_tree(values, tuple(mesh_shape)))
        mgr.wait()
        exact(mgr.restore(next_step, mesh=mesh), values)
        after = mgr.steps()
    return {"latest": latest, "steps": steps, "after": after,
            "local": sorted(os.listdir(_own(local)))}


def save_values(root, local, steps, values, mesh_shape, persist_every):
    """Saves each of ``steps`` with the state of ``values`` (a seed per step: two runs
    saving one step with other values are told apart); returns the steps listed after."""
    with _manager(root, local, persist_every) as mgr:
        for step, value in zip(steps, values, strict=True):
            mgr.save(step, device_tree(value, tuple(mesh_shape)))
        mgr.wait()
        return mgr.steps()


def check_values(root, local, mesh_shape, persist_every, values_by_step):
    """Opens the run and restores every step it lists, checking each exactly against the
    values ``values_by_step`` (str(step) -> seed) names; returns latest and steps."""
    mesh = mesh_of(tuple(mesh_shape))
    with _manager(root, local, persist_every) as mgr:
        latest, steps = mgr.latest_step(), mgr.steps()
        for step in steps:
            exact(mgr.restore(step, mesh=mesh), values_by_step[str(step)])
    return {"latest": latest, "steps": steps}


def save_and_stop(root, local, mesh_shape, where):
    """Saves step 3 (local only, after steps 1 and 2) and stops itself (SIGSTOP) just
    before its local commit claim (``where`` = ``claim``) or its local COMMIT
    (``commit``); once continued, reports how the save ended."""
    def before(doing, key, args):
        if key.startswith("3/") and doing in (Op.CREATE, Op.WRITE) and (
                (where == "claim" and key.startswith("3/claims/"))
                or (where == "commit" and key == "3/COMMIT")):
            print("PAUSED", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)

    with _manager(root, local, 2) as mgr:
        for step in (1, 2):
            mgr.save(step, device_tree(step, tuple(mesh_shape))).wait()
    real = _local.local_store  # what _tiers calls, by the name it imported
    patched = mock.patch.object(_tiers, "local_store",
                                lambda path, p: FaultyStore(real(path, p), before=before))
    patched.start()
    mgr = _manager(root, local, 2)
    try:
        mgr.save(3, device_tree(3, tuple(mesh_shape))).wait()
        outcome = "committed"
    except ckpt.CkptError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    finally:
        patched.stop()
    with contextlib.suppress(ckpt.CkptError):
        mgr.close()
    return outcome


def exit_with_a_save_in_flight(root, local, mesh_shape):
    """Saves step 1 (persisted: persist_every=1) and returns without waiting: the exit
    hook must see both the local commit and the root's through."""
    mgr = _manager(root, local, 1)
    mgr.save(1, device_tree(1, tuple(mesh_shape)))
    return "returned"
