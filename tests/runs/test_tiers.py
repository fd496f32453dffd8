"""The local tier (`CheckpointManager(local_dir=...)`): one process on 8 CPU devices here,
then real multi-process jobs (2 and 4 processes) with a folder per process and a persistent
root on local disk, S3 and GCS, killed at every phase."""

import logging
import os
import pathlib
import shutil
import signal
from typing import Any

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    SaveError,
    StepOrderError,
)
from ckpt.storage import Op
from tests.children import mp_jobs
from tests.conftest import backend_url
from tests.helpers.faults import ReadCounter, is_chunk_write
from tests.helpers.saves import started
from tools.launch import launch, start


def _tree(mesh, step):
    """A state with sharded, replicated, small-gathered and host leaves."""
    rng = np.random.default_rng(step)
    w = rng.standard_normal((64, 256)).astype(np.float32)
    small = rng.standard_normal(16).astype(np.float32)
    return {
        "w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
        "r": jax.device_put(w[:8], NamedSharding(mesh, P())),
        "small": jax.device_put(small, NamedSharding(mesh, P("model"))),
        "host": rng.integers(0, 9, 7),
        "step": step,
        "name": f"s{step}",
    }


def _same(got, want):
    for k, v in want.items():
        if isinstance(v, (jax.Array, np.ndarray)):
            assert np.asarray(got[k]).tobytes() == np.asarray(v).tobytes(), k
            if isinstance(v, jax.Array):
                assert got[k].sharding == v.sharding, k
        else:
            assert got[k] == v, k


@pytest.fixture
def dirs(tmp_path):
    return str(tmp_path / "root"), str(tmp_path / "local")


def _steps_in(folder):
    """Step folders holding anything but removal claims: the claims of removed attempts
    stay as tombstones (a paused committer must still find them), their data goes."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(s) for s in os.listdir(folder) if s.isdigit()
                  and set(os.listdir(os.path.join(folder, s))) - {"claims"})


def test_every_step_local_and_persisted_steps_at_the_root(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=2, persist_every=2) as mgr:
        for step in range(1, 6):
            handle = started(mgr.save(step, _tree(mesh24, step)))
            # Known when save returns: the root's commit of a persisted step, else None.
            assert (handle.remote is not None) == (step % 2 == 0)
            handle.wait()
            if handle.remote is not None:
                handle.remote.wait()
        assert mgr.steps() == [2, 4, 5]
        assert mgr.latest_step() == 5
    assert _steps_in(root) == [2, 4]
    assert _steps_in(local) == [4, 5]
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=2) as mgr:
        assert mgr.latest_step() == 5
        for step in (5, 4, 2):
            _same(mgr.restore(step, target=_tree(mesh24, 0)), _tree(mesh24, step))
    # The root's copies are ordinary checkpoints: readable without the manager.
    _same(ckpt.restore(os.path.join(root, "4"), target=_tree(mesh24, 0)), _tree(mesh24, 4))


def test_restart_reads_nothing_from_the_root(dirs, mesh24, caplog):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    counter = ReadCounter(root)
    caplog.set_level(logging.INFO, logger="ckpt.manager")
    with ckpt.CheckpointManager(counter, local_dir=local) as mgr:
        # Starting, it read the root's lineage record and the COMMIT of the step its
        # copies hold (which save of it the root holds), and nothing else.
        assert counter.counts == {"bytes": os.path.getsize(os.path.join(root, "LINEAGE"))
                                  + os.path.getsize(os.path.join(root, "1", "COMMIT")),
                                  "chunks": 0, "opened": 0}
        counter.counts.update(bytes=0)
        _same(mgr.restore(target=_tree(mesh24, 0)), _tree(mesh24, 1))
    assert counter.counts == {"bytes": 0, "chunks": 0, "opened": 0}
    line = next(r.getMessage() for r in caplog.records
                if r.getMessage().startswith("restored step 1"))
    assert "0.0 MiB from the persistent root" in line
    assert " 0.0 MiB from the local" not in line


def test_a_lost_local_folder_reads_the_root(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    shutil.rmtree(local)
    counter = ReadCounter(root)
    with ckpt.CheckpointManager(counter, local_dir=local) as mgr:
        assert mgr.latest_step() == 1
        _same(mgr.restore(target=_tree(mesh24, 0)), _tree(mesh24, 1))
    assert counter.counts["chunks"] > 0


def _damage_a_chunk_of_w(folder):
    """Flips a byte in the middle of one stored chunk of leaf ``w`` under ``folder``."""
    chunk = next(os.path.join(d, f) for d, _, fs in os.walk(folder)
                 for f in fs if "/arrays/" in d and f != "zarr.json" and "w" in d.split("/"))
    data = bytearray(pathlib.Path(chunk).read_bytes())
    data[len(data) // 2] ^= 0xFF
    pathlib.Path(chunk).write_bytes(bytes(data))


def test_a_damaged_local_chunk_is_read_from_the_root_instead(dirs, mesh24, caplog):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    _damage_a_chunk_of_w(os.path.join(local, "1"))
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        _same(mgr.restore(target=_tree(mesh24, 0)), _tree(mesh24, 1))
    assert any("failed its checks" in r.getMessage() for r in caplog.records)


def test_a_damaged_local_only_step_is_an_error_not_wrong_data(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    _damage_a_chunk_of_w(os.path.join(local, "1"))
    with (ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr,
          pytest.raises(ckpt.errors.CorruptCheckpointError, match="leaf")):
        mgr.restore(target=_tree(mesh24, 0))


def test_a_step_on_no_tier_is_a_clear_error(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        mgr.save(1, _tree(mesh24, 1))
        with pytest.raises(CheckpointNotFoundError, match="step 7 is on no tier"):
            mgr.restore(7)
    shutil.rmtree(local)
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        assert mgr.latest_step() is None
        assert mgr.steps() == []
        with pytest.raises(CheckpointNotFoundError, match="local tier"):
            mgr.restore()


def test_saving_a_step_the_tiers_hold_is_refused(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        mgr.save(3, _tree(mesh24, 3))
        mgr.wait()
        with pytest.raises(CheckpointExistsError):
            mgr.save(3, _tree(mesh24, 3))
        with pytest.raises(StepOrderError):
            mgr.save(2, _tree(mesh24, 2))


def test_root_retention_removes_the_local_copy_first(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, keep_last=1, local_dir=local, local_keep=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _tree(mesh24, step))
            mgr.wait()
        # keep_last=1 removed 1 and 2 from the root; no local copy outlives them.
        assert _steps_in(root) == [3]
        assert _steps_in(local) == [3]
        assert mgr.steps() == [3]


def test_delete_and_rewind_cover_both_tiers(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=4, persist_every=2) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, _tree(mesh24, step), metrics={"loss": float(step)})
        mgr.wait()
        assert mgr.metrics(3) == {"loss": 3.0}  # a step of the local tier alone
        mgr.delete(4)
        assert mgr.steps() == [1, 2, 3]
        assert _steps_in(root) == [2]
        mgr.rewind(1)
        assert mgr.steps() == [1]
        assert _steps_in(local) == [1]
        assert _steps_in(root) == []
        mgr.save(2, _tree(mesh24, 22))
        mgr.wait()
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=2) as mgr:
        assert mgr.steps() == [1, 2]
        _same(mgr.restore(2, target=_tree(mesh24, 0)), _tree(mesh24, 22))


def test_start_up_removes_local_debris(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    os.makedirs(os.path.join(local, "1", "attempt-20260101T000000-aaaaaaaaaaaa", "x"))
    os.makedirs(os.path.join(local, "5", "attempt-20260101T000000-bbbbbbbbbbbb"))
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        assert mgr.steps() == [1]
    assert _steps_in(local) == [1]
    assert len([n for n in os.listdir(os.path.join(local, "1")) if n.startswith("attempt-")]) == 1


def test_read_only_manager_lists_and_restores_both_tiers(dirs, mesh24):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    os.makedirs(os.path.join(local, "9", "attempt-20260101T000000-cccccccccccc"))
    with ckpt.CheckpointManager(root, local_dir=local, read_only=True) as mgr:
        assert mgr.latest_step() == 1
        _same(mgr.restore(target=_tree(mesh24, 0)), _tree(mesh24, 1))
    assert _steps_in(local) == [1, 9]  # read-only: nothing removed


def test_a_process_placeholder_and_bad_options(dirs, tmp_path):
    root, _ = dirs
    with ckpt.CheckpointManager(root, local_dir=str(tmp_path / "l-{process}")) as mgr:
        mgr.save(1, {"a": np.arange(3)})
    assert _steps_in(str(tmp_path / "l-0")) == [1]
    with pytest.raises(ValueError, match="local_keep"):
        ckpt.CheckpointManager(root, local_dir=str(tmp_path / "l"), local_keep=0)
    with pytest.raises(ValueError, match="persist_every needs local_dir"):
        ckpt.CheckpointManager(root, persist_every=2)
    with pytest.raises(ValueError, match="persist_every"):
        ckpt.CheckpointManager(root, local_dir=str(tmp_path / "l"), persist_every=0)
    with pytest.raises(ValueError, match="own disk"):
        ckpt.CheckpointManager(root, local_dir="s3://bucket/x")


def test_a_failed_root_commit_is_reported_and_the_step_stays_local(dirs, mesh24):
    from tests.helpers.faults import FaultyStore

    root, local = dirs

    def before(doing, key, args):
        if doing == Op.WRITE and key.endswith("manifest.msgpack") and key.startswith("2/"):
            raise OSError(28, "No space left on device")

    with ckpt.CheckpointManager(FaultyStore(root, before=before), local_dir=local) as mgr:
        mgr.save(1, _tree(mesh24, 1))
        handle = started(mgr.save(2, _tree(mesh24, 2)))
        handle.wait()  # the local commit
        with pytest.raises(SaveError, match="No space left"):
            started(handle.remote).wait()
        assert mgr.latest_step() == 2  # from the local tier
        _same(mgr.restore(2, target=_tree(mesh24, 0)), _tree(mesh24, 2))
    assert _steps_in(local) == [1, 2]


def test_an_unwritable_local_folder_or_a_damaged_lineage_record_fails_at_start_up(dirs):
    from ckpt.errors import CkptError

    root, local = dirs
    pathlib.Path(local).write_text("a file, not a folder")
    with pytest.raises(CkptError, match=r"process 0: .*local") as info:
        ckpt.CheckpointManager(root, local_dir=local)
    assert local in str(info.value)
    os.remove(local)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "LINEAGE"), "wb") as f:
        f.write(b"\x93 not a record")
    with pytest.raises(CkptError, match="lineage") as info:
        ckpt.CheckpointManager(root, local_dir=local)
    assert os.path.join(root, "LINEAGE") in str(info.value)


def test_a_local_tier_of_another_root_is_refused(dirs, mesh24, tmp_path):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    other = str(tmp_path / "other-root")
    with pytest.raises(CheckpointExistsError, match="another root") as info:
        ckpt.CheckpointManager(other, local_dir=local)
    assert root in str(info.value)
    assert other in str(info.value)
    assert _steps_in(local) == [1]  # nothing of the other run's copies removed


def _values(step, scale):
    return {"w": np.full((64, 64), float(step * scale)), "step": step}  # chunks, not inline


@pytest.mark.parametrize("other_tier", [False, True], ids=["plain", "other-hosts"])
def test_a_rewind_elsewhere_keeps_old_copies_from_coming_back(dirs, tmp_path, other_tier):
    """Run 1 (hosts A) saves 2-5 with the local tier; run 2 (a manager without it, or one
    on other hosts) rewinds to 2 and saves 3 and 4 anew; run 3 back on hosts A must see the
    new branch: A's copies of 3-5 were made before the rewind."""
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=4, persist_every=2) as mgr:
        for step in (2, 3, 4, 5):
            mgr.save(step, _values(step, 1))
    kw: dict[str, Any] = ({"local_dir": str(tmp_path / "hosts-b"), "persist_every": 2}
                          if other_tier else {})
    with ckpt.CheckpointManager(root, **kw) as mgr:
        mgr.rewind(2)
        for step in (3, 4):
            mgr.save(step, _values(step, 10))
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=2) as mgr:
        assert mgr.latest_step() == 4
        assert mgr.restore(4)["w"][0, 0] == 40.0
        assert _steps_in(local) == [2]  # 3, 4, 5 of the abandoned branch are gone


def test_a_root_emptied_and_reused_does_not_take_back_old_copies(dirs):
    """The root's folder is wiped and a new run starts at the same URL with the same local
    folders: the old run's copies (of another history: the root's lineage began anew) are
    not offered, and the new run saves from step 1."""
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        for step in (10, 11, 12):
            mgr.save(step, _values(step, 1))
    shutil.rmtree(root)
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        assert mgr.latest_step() is None
        assert mgr.steps() == []
        mgr.save(1, _values(1, 5))
        mgr.wait()
        assert mgr.restore()["w"][0, 0] == 5.0
    assert _steps_in(local) == [1]


def test_a_delete_elsewhere_keeps_the_copy_from_coming_back(dirs):
    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _values(step, 1))
    with ckpt.CheckpointManager(root) as mgr:
        mgr.delete(2)
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        assert mgr.steps() == [1, 3]
        assert _steps_in(local) == [1, 3]


def test_gc_retention_keeps_copies_of_what_it_removed_from_coming_back(dirs):
    from ckpt import cli

    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _values(step, 1))
    assert cli.main(["gc", root, "--keep-last", "1", "--grace", "0"]) == 0
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        assert mgr.steps() == [3]
        assert _steps_in(local) == [3]


def test_a_failed_local_save_leaves_nothing_and_the_step_can_be_saved_again(dirs, monkeypatch):
    from ckpt import _local, _tiers
    from tests.helpers.faults import FaultyStore

    root, local = dirs
    failing = [True]

    def before(doing, key, args):
        if failing[0] and is_chunk_write(doing) and key == "2":
            raise OSError(28, "No space left on device")

    real = _local.local_store  # what _tiers calls, by the name it imported
    monkeypatch.setattr(_tiers, "local_store",
                        lambda path, p: FaultyStore(real(path, p), before=before))
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, _values(1, 1))
        failed = started(mgr.save(2, _values(2, 1)))
        with pytest.raises(SaveError, match="No space left") as info:
            failed.wait()
        assert os.path.join(local, "2") in str(info.value)
        assert "process 0" in str(info.value)
        # The root's commit it would have started says so (never left waiting).
        with pytest.raises(SaveError, match="its local commit failed"):
            started(failed.remote).wait(timeout=60)
        assert not [n for n in os.listdir(os.path.join(local, "2"))
                    if n.startswith("attempt-")] if os.path.isdir(os.path.join(local, "2")) \
            else True
        assert mgr.steps() == [1]
        failing[0] = False
        started(mgr.save(2, _values(2, 7))).wait()
        assert mgr.restore(2)["w"][0, 0] == 14.0


# -- multi-process jobs ----------------------------------------------------------------------

def _local_of(local, process):
    return local.replace("{process}", str(process))


def _root_steps(root):
    with ckpt.CheckpointManager(root) as plain:  # the root alone, as any reader sees it
        return plain.steps()


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
@pytest.mark.slow  # starts processes
def test_restart_on_the_same_hosts_reads_nothing_from_the_root(request, tmp_path, backend):
    """Two processes save steps 1-3 (step 2 also to the root); restarted, they restore
    step 3 from their own folders: not one byte, chunk or array of the root is read, and
    each process gets its own per-process value back."""
    root = backend_url(request, tmp_path, backend)
    local = str(tmp_path / "local-{process}")
    kept = launch("tests.children.tier_jobs:save_steps", 2,
                  args=[root, local, [1, 2, 3], [2, 4], 2, True])
    assert kept == [["2", "3"], ["2", "3"]]
    assert _root_steps(root) == [2]
    results = launch("tests.children.tier_jobs:restore_latest", 2, args=[root, local, [2, 4], 2])
    for r in results:
        assert r["latest"] == 3 and r["steps"] == [2, 3], r
        assert r["root"] == {"bytes": 0, "chunks": 0, "opened": 0}, r
        # Starting, process 0 read the root's lineage record and step 2's COMMIT (which
        # save the root holds of it: step 3 descends from it), no other process anything.
        assert r["start"]["chunks"] == r["start"]["opened"] == 0, r
        assert (0 < r["start"]["bytes"] < 400) == (r is results[0]), r
        assert r["served"]["local"] > 0 and r["served"]["root"] == 0, r


@pytest.mark.slow  # starts processes
def test_a_replaced_host_alone_reads_the_root(tmp_path):
    """Four processes; process 2's folder is lost (a replaced machine): it reads the root
    on its own; the others read nothing of the root (process 0 read the step's COMMIT at
    start-up, to know the copies are of the root's save, and told the others)."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 4, args=[root, local, [1, 2], [4, 4], None])
    shutil.rmtree(_local_of(local, 2))
    results = launch("tests.children.tier_jobs:restore_latest", 4, args=[root, local, [4, 4]])
    for p, r in enumerate(results):
        assert r["latest"] == 2, r
        if p == 2:
            assert r["root"]["chunks"] > 0 and r["served"] == "root", r
        else:
            assert r["root"] == {"bytes": 0, "chunks": 0, "opened": 0}, r
            assert r["served"]["root"] == 0 and r["served"]["local"] > 0, r
        assert (0 < r["start"]["bytes"] < 1024) == (p == 0), r  # process 0: COMMIT only


@pytest.mark.slow  # starts processes
def test_another_process_count_reads_what_still_matches_locally(tmp_path):
    """Saved by four processes on a 4x4 mesh, restored by two on a 2x4 mesh: each reads
    the boxes its (old) folder holds from it and the rest from the root. A step only the
    local tier held is not offered: the new job cannot know it is whole."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 4, args=[root, local, [2, 3], [4, 4], 2])
    results = launch("tests.children.tier_jobs:restore_latest", 2, args=[root, local, [2, 4], 2])
    for r in results:
        assert r["latest"] == 2 and r["steps"] == [2], r
        assert r["served"]["local"] > 0 and r["served"]["root"] > 0, r


PHASES = [(1, "local-write"), (1, "local-commit"), (0, "retention"), (1, "remote-read"),
          (1, "remote-write"), (0, "remote-commit"), (1, "restore")]


def _start(tmp_path):
    """Steps 1 (local tier only) and 2 (both tiers), saved by two processes. (Not copied
    from a template: a local copy names its root, and a copy's root is another.)"""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 2, args=[root, local, [1, 2], [2, 4], 2])
    return root, local


def _tiers_clean(root, local, processes):
    """Every local step folder holds COMMIT and the one attempt it names; the root holds
    committed steps and nothing uncommitted (`_debris_free`)."""
    from ckpt._housekeeping import attempts
    from ckpt.storage import open_store

    for p in range(processes):
        folder = _local_of(local, p)
        for step in os.listdir(folder):
            names = sorted(os.listdir(os.path.join(folder, step)))
            if names == ["claims"]:
                continue  # the tombstones of removed attempts (`ckpt._claims`), no data
            assert "COMMIT" in names, (p, step, names)
            assert len([n for n in names if n.startswith("attempt-")]) == 1, (p, step, names)
    committed = _root_steps(root)
    for step in _steps_in(root):
        states = sorted(a.state for a in attempts(open_store(os.path.join(root, str(step)))))
        assert states.count("committed") == (step in committed), (step, states)
        assert set(states) <= {"committed", "claimed"}, (step, states)


@pytest.mark.parametrize(("victim", "phase"), PHASES, ids=[f"p{v}-{p}" for v, p in PHASES])
@pytest.mark.slow  # starts processes
def test_sigkill_in_every_phase_leaves_both_tiers_consistent(tmp_path, victim, phase):
    root, local = _start(tmp_path)
    with start("tests.children.tier_jobs:save_and_die", 2,
               args=[root, local, [2, 4], victim, phase],
               heartbeat_s=5) as job:
        job.wait_for_line(victim, "SAVING")
        job.procs[victim].wait(timeout=120)
        assert job.procs[victim].returncode == -signal.SIGKILL, job.stderr[victim][-5:]
        job.kill_all()  # the scheduler restarts the job whole
    allowed = {"local-write": {2}, "local-commit": {2, 3}, "retention": {3},
               "remote-read": {4}, "remote-write": {4}, "remote-commit": {4},
               "restore": {4}}[phase]
    results = launch("tests.children.tier_jobs:resume", 2, args=[root, local, [4, 2], 5])
    latest = results[0]["latest"]
    assert latest in allowed, results
    assert all(r["latest"] == latest and r["steps"] == results[0]["steps"] for r in results)
    assert results[0]["after"][-1] == 5
    _tiers_clean(root, local, 2)
    # The root alone is a consistent run too: every step it lists restores exactly.
    for step in _root_steps(root):
        mp_jobs.exact(ckpt.restore(os.path.join(root, str(step))), step)


@pytest.mark.slow  # starts processes
def test_a_zombie_never_joins_a_later_runs_step(tmp_path):
    """Process 1 stops in the middle of writing its copy of step 3; the job is restarted
    and saves step 3 with other values; then the zombie wakes and writes on. Step 3 stays
    the new run's, read from the local tier on both processes."""
    root, local = _start(tmp_path)
    with start("tests.children.tier_jobs:save_and_die", 2,
               args=[root, local, [2, 4], -1, "stop-local-write"], heartbeat_s=60) as old:
        old.wait_for_line(1, "PAUSED")
        old.kill(0)
        old.procs[0].wait()
        launch("tests.children.tier_jobs:resume", 2, args=[root, local, [2, 4], 3, 77])
        old.kill(1, signal.SIGCONT)  # the zombie writes on, then finds its job gone
        old.wait_for_line(1, "WROTE")
        old.kill(1)
        old.procs[1].wait()
    # Its late chunks landed beside the new run's copy (the new run's start-up had removed
    # its folder), in an attempt of its own that COMMIT does not name.
    step3 = os.path.join(_local_of(local, 1), "3")
    assert len([n for n in os.listdir(step3) if n.startswith("attempt-")]) == 2
    for r in launch("tests.children.tier_jobs:restore_latest", 2,
                    args=[root, local, [2, 4], 2, 77]):
        assert r["latest"] == 3 and r["root"]["chunks"] == 0, r
    _tiers_clean(root, local, 2)


def test_a_chunk_marked_absent_is_only_valid_in_a_local_copy(dirs, mesh24):
    """Writer -1 (a chunk a local copy does not hold) decodes only in a manifest whose
    ``local`` field says it is a local copy; the field itself is checked."""
    import dataclasses

    from ckpt._format import decode_manifest, encode_manifest
    from ckpt._reader import open_checkpoint
    from ckpt.errors import CorruptCheckpointError
    from ckpt.storage import open_store

    root, local = dirs
    with ckpt.CheckpointManager(root, local_dir=local) as mgr:
        mgr.save(1, _tree(mesh24, 1))
    _, manifest = open_checkpoint(open_store(os.path.join(local, "1")))
    assert manifest.local is not None  # a local copy's manifest says so
    assert {k: v for k, v in manifest.local.items() if k != "lineage"} == \
        {"process": 0, "step": 1, "root": root}
    assert manifest.local["lineage"]  # the root's origin event, made at the first start
    rec = next(r for r in manifest.leaves if r.kind == "array")
    absent = dataclasses.replace(rec, layout=dataclasses.replace(
        rec.layout, writers=(-1,) + rec.writers[1:]))
    leaves = [absent if r is rec else r for r in manifest.leaves]
    as_copy = dataclasses.replace(manifest, leaves=leaves)
    decoded = decode_manifest(encode_manifest(as_copy), "m")
    assert next(r for r in decoded.leaves if r.path == rec.path).writers[0] == -1
    with pytest.raises(CorruptCheckpointError, match="writer"):
        decode_manifest(encode_manifest(dataclasses.replace(as_copy, local=None)), "m")
    with pytest.raises(CorruptCheckpointError, match="local-copy record"):
        decode_manifest(encode_manifest(dataclasses.replace(
            as_copy, local={**manifest.local, "process": -1})), "m")
