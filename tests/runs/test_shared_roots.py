"""Two jobs on one root, exits, rewinds, retention: no committed step that does not restore,
no acknowledged save lost, no silent exit. Real child processes (paused with SIGSTOP, the
way a zombie or a descheduled job is) on local disk, S3 and GCS."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import ckpt
from ckpt import cli
from ckpt.errors import (
    AttemptRemovedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    ReadOnlyError,
    StepOrderError,
    StorageError,
)
from ckpt.storage import Op, open_store
from tests.children import script
from tests.conftest import backend_url
from tests.helpers.crash_state import host_state, make_state
from tests.helpers.faults import FaultyStore, is_commit_claim
from tests.helpers.saves import started

CHILD = script("shared_root_child")


def _child(*args, **kw):
    return subprocess.Popen([sys.executable, CHILD, *map(str, args)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _exact(out, step):
    for k, v in host_state(step).items():
        if isinstance(v, dict):
            for n, a in v.items():
                assert np.asarray(out[k][n]).tobytes() == a.tobytes(), (step, k, n)
        else:
            assert out[k] == v


def _every_committed_step_restores(root):
    mgr = ckpt.CheckpointManager(root, read_only=True)
    for step in mgr.steps():
        _exact(mgr.restore(step), step)
    return mgr.steps()


def _attempts(root, step):
    return [n for n in open_store(root).list_children(str(step)) if n.startswith("attempt-")]


@pytest.fixture(params=["local", "s3", "gcs"])
def run_root(request, tmp_path):
    """A manager root a child process can reach, holding committed steps 0 and 1."""
    root = backend_url(request, tmp_path, request.param)
    with ckpt.CheckpointManager(root) as mgr:
        for step in (0, 1):
            mgr.save(step, make_state(step))
    return root


def _stopped_child(root, when):
    """A job saving step 2 that is paused (SIGSTOP) just before or after its commit claim."""
    proc = _child(f"save-stop-{when}-claim", root, 2)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the child has stopped
    assert os.WIFSTOPPED(status), proc.stderr.read()
    return proc


def _resume(proc):
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0, err
    return out


# -- a cleaner against a paused committer --------------------------------------------------

@pytest.mark.parametrize("cleaner", ["restarted-job", "gc"])
def test_cleaner_first_fails_the_paused_save_loudly(run_root, cleaner):
    old = _stopped_child(run_root, "before")
    try:
        if cleaner == "gc":
            assert cli.main(["gc", run_root, "--grace", "0"]) == 0
        else:
            ckpt.CheckpointManager(run_root).close()  # start-up clean-up, then done
        assert _attempts(run_root, 2) == []
    finally:
        out = _resume(old)
    assert "FAILED AttemptRemovedError" in out
    assert _every_committed_step_restores(run_root) == [0, 1]
    # The restarted job saves the step again; the zombie's late objects change nothing.
    with ckpt.CheckpointManager(run_root) as mgr:
        mgr.save(2, make_state(2))
    assert _every_committed_step_restores(run_root) == [0, 1, 2]


def test_committer_first_is_left_alone_and_commits(run_root):
    old = _stopped_child(run_root, "after")
    try:
        ckpt.CheckpointManager(run_root).close()
        assert cli.main(["gc", run_root, "--grace", "0"]) == 0
        assert len(_attempts(run_root, 2)) == 1  # claimed for commit: it may still commit
    finally:
        out = _resume(old)
    assert "DONE" in out
    assert _every_committed_step_restores(run_root) == [0, 1, 2]


def test_restarted_job_commits_while_the_old_one_is_paused(run_root):
    """The old job claimed its attempt, then paused; the restarted job saves the same step
    and wins COMMIT; the old one then loses loudly and removes its own attempt."""
    old = _stopped_child(run_root, "after")
    try:
        with ckpt.CheckpointManager(run_root) as mgr:
            assert mgr.latest_step() == 1
            mgr.save(2, make_state(2))
    finally:
        out = _resume(old)
    assert "FAILED CommitConflictError" in out
    assert _every_committed_step_restores(run_root) == [0, 1, 2]
    assert len(_attempts(run_root, 2)) == 1


def test_trainer_and_read_only_evaluator(run_root):
    """The evaluator lists and restores while the trainer is paused mid-save; it writes
    nothing, so the trainer's save commits."""
    before = open_store(run_root).list()
    trainer = _stopped_child(run_root, "before")
    try:
        during = open_store(run_root).list()
        evaluator = ckpt.CheckpointManager(run_root, read_only=True)
        assert evaluator.latest_step() == 1
        _exact(evaluator.restore(), 1)
        evaluator.close()
        assert open_store(run_root).list() == during
        for what in (lambda: evaluator.save(3, {"x": 1}), lambda: evaluator.delete(0),
                     lambda: evaluator.rewind(0)):
            with pytest.raises(ReadOnlyError, match="read_only"):
                what()
    finally:
        out = _resume(trainer)
    assert "DONE" in out
    assert set(before) < set(open_store(run_root).list())
    assert _every_committed_step_restores(run_root) == [0, 1, 2]


# -- claims on every backend, in one process ------------------------------------------------

class _Gate:
    """Holds a save's committer just before (or after) its commit claim until released:
    `store` wraps the store that save is given."""

    def __init__(self, after):
        self.reached, self.release = threading.Event(), threading.Event()
        self.after = after

    def _hold(self, doing, key, args):
        if is_commit_claim(doing, key, args):
            self.reached.set()
            assert self.release.wait(60)

    def store(self, url):
        return FaultyStore(url, **{"after" if self.after else "before": self._hold})


def test_gc_on_one_checkpoint_url_during_a_save(root_url, monkeypatch, capsys):
    url = f"{root_url}/one"
    gate = _Gate(after=False)
    handle = ckpt.save_async(gate.store(url), {"x": np.arange(5000)})
    assert gate.reached.wait(60)
    assert cli.main(["gc", url, "--grace", "0"]) == 0
    assert "removing incomplete attempt attempt-" in capsys.readouterr().out
    gate.release.set()
    with pytest.raises(AttemptRemovedError, match="claimed for removal"):
        handle.wait()
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(url)
    assert cli.main(["gc", url, "--grace", "0"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_interrupted_one_off_save_is_removed_by_gc(root_url, capsys):
    url = f"{root_url}/one"

    def interrupted(doing, key, args):  # the chunks are written, then Ctrl-C arrives
        if doing == Op.WRITE and "/hosts/" in key:
            raise KeyboardInterrupt

    with pytest.raises(ckpt.SaveError):
        ckpt.save(FaultyStore(url, before=interrupted), {"x": np.arange(5000)})
    assert open_store(url).list()  # debris: the attempt's arrays
    assert cli.main(["gc", url]) == 0  # default grace: a save may still be running
    assert "keeping 1 incomplete attempt" in capsys.readouterr().out
    assert cli.main(["gc", url, "--grace", "0"]) == 0
    assert "removing incomplete attempt" in capsys.readouterr().out
    assert [k for k in open_store(url).list() if not k.startswith("claims/")] == []


# -- rewind, delete, step order --------------------------------------------------------------

def _tree(step):
    return {"w": np.full(4096, step, np.float32), "step": step}


def test_loss_spike_rewind(root_url):
    with ckpt.CheckpointManager(root_url, keep_last=2, keep_every=5) as mgr:
        for step in range(1, 11):
            mgr.save(step, _tree(step), metrics={"loss": 1.0 / step})
        mgr.wait()
        assert mgr.steps() == [5, 9, 10]
        state = mgr.restore(5)
        with pytest.raises(StepOrderError, match=r"step 6 .*step 10.*rewind"):
            mgr.save(6, _tree(6))
        with pytest.raises(CheckpointExistsError, match="delete"):
            mgr.save(10, _tree(10))
        with pytest.raises(CheckpointNotFoundError):
            mgr.rewind(7)
        mgr.rewind(5)
        assert mgr.steps() == [5]
        assert mgr.latest_step() == 5
        for step in range(state["step"] + 1, 9):  # the new branch, skipping bad batches
            mgr.save(step, _tree(100 + step))
        mgr.wait()
        assert mgr.steps() == [5, 7, 8]
    again = ckpt.CheckpointManager(root_url, keep_last=2, keep_every=5)
    assert again.latest_step() == 8
    assert float(again.restore()["w"][0]) == 108.0
    again.delete(7)
    assert again.steps() == [5, 8]
    with pytest.raises(CheckpointNotFoundError):
        again.delete(7)
    again.close()


def test_interrupted_rewind_is_finished_by_the_next_manager(root_url):
    with ckpt.CheckpointManager(root_url) as mgr:
        for step in range(1, 5):
            mgr.save(step, _tree(step))

    def crash(doing, key, args):
        if doing == Op.DELETE and key.startswith("3/"):  # step 4 is gone, 3 is not: it dies
            raise StorageError(5, "the job died here")

    mgr = ckpt.CheckpointManager(FaultyStore(root_url, before=crash))
    with pytest.raises(StorageError):
        mgr.rewind(2)
    mgr.close()
    # The record is written: listings already leave the abandoned step 3 out.
    assert ckpt.CheckpointManager(root_url, read_only=True).steps() == [1, 2]
    assert "3" in open_store(root_url).list_children()
    with ckpt.CheckpointManager(root_url) as mgr:
        assert mgr.steps() == [1, 2]
        mgr.save(3, _tree(33))
    # The rewind's lineage record stays (local-tier copies of 3 and 4 never come back).
    assert sorted(open_store(root_url).list_children()) == ["1", "2", "3", "LINEAGE"]
    assert float(ckpt.CheckpointManager(root_url).restore()["w"][0]) == 33.0


def test_rewind_past_a_paused_committer_keeps_its_step_hidden(root_url, monkeypatch):
    """A save of step 4 has claimed its commit and is paused when another manager rewinds
    to 2: the attempt cannot be deleted; when it commits later it stays hidden, and the next
    start removes it; the new branch's own step 4 is visible."""
    with ckpt.CheckpointManager(root_url) as mgr:
        for step in range(1, 4):
            mgr.save(step, _tree(step))
    gate = _Gate(after=True)
    old = ckpt.CheckpointManager(gate.store(root_url))
    handle = started(old.save(4, _tree(4)))
    assert gate.reached.wait(60)
    other = ckpt.CheckpointManager(root_url)
    other.rewind(2)
    assert other.steps() == [1, 2]
    gate.release.set()
    handle.wait()  # the paused job commits its step 4 ...
    assert open_store(root_url).exists("4/COMMIT")
    assert other.steps() == [1, 2]  # ... which stays out of the run
    with pytest.raises(CheckpointNotFoundError):
        other.restore(4)
    old.close()
    for step in (3, 4):  # the new branch saves step 4 too: the late one is removed first
        other.save(step, _tree(100 + step))
    other.close()
    assert _every_step(root_url) == {1: 1.0, 2: 2.0, 3: 103.0, 4: 104.0}
    assert not open_store(root_url).exists("REWIND")


def test_a_commit_recreated_by_a_late_retry_after_a_delete_is_undone(root_url):
    """The server applies the create of COMMIT but its answer is lost; the committer pauses;
    the step is deleted meanwhile; the client's retry then creates COMMIT again. The
    committer finds its claim gone, removes that COMMIT and fails loudly."""
    with ckpt.CheckpointManager(root_url) as mgr:
        mgr.save(1, _tree(1))
    reached, release = threading.Event(), threading.Event()

    class LostAnswer(FaultyStore):
        def _delegate(self, doing, key, fn, *args):
            if doing != Op.CREATE or not key.endswith("COMMIT") or reached.is_set():
                return super()._delegate(doing, key, fn, *args)
            assert fn(*args)  # applied; the answer never arrives
            reached.set()
            assert release.wait(60)
            return fn(*args)  # the retry, after the delete below

    writer = ckpt.CheckpointManager(LostAnswer(root_url))
    handle = started(writer.save(2, _tree(2)))
    assert reached.wait(60)
    other = ckpt.CheckpointManager(root_url)
    other.delete(2)
    release.set()
    with pytest.raises(AttemptRemovedError, match="while its COMMIT was being created"):
        handle.wait()
    assert not open_store(root_url).exists("2/COMMIT")
    assert _every_step(root_url) == {1: 1.0}
    writer.close()
    other.close()


def _every_step(root):
    mgr = ckpt.CheckpointManager(root, read_only=True)
    return {s: float(mgr.restore(s)["w"][0]) for s in mgr.steps()}


# -- keep_best, retention failures, defaults -------------------------------------------------

def test_keep_best_ignores_nan_and_refused_saves(tmp_path):
    root = str(tmp_path / "run")
    losses = {1: 1.0, 2: math.nan, 3: 0.5, 4: math.nan, 5: 2.0}
    with ckpt.CheckpointManager(root, keep_last=1, keep_best=1, best_metric="loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, _tree(step), metrics={"loss": loss})
        mgr.wait()
        with pytest.raises(CheckpointExistsError):
            mgr.save(5, _tree(5), metrics={"loss": -100.0})
        mgr.save(6, _tree(6), metrics={"loss": 3.0})
        mgr.wait()
        assert mgr.steps() == [3, 6]


def test_keep_best_skips_retention_when_a_metric_cannot_be_read(tmp_path, caplog):
    """A restarted manager reads the best step's metric from its manifest; if that read
    fails now, retention waits for the next commit instead of deleting the best step."""
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, keep_last=1, keep_best=1, best_metric="loss") as mgr:
        mgr.save(1, _tree(1), metrics={"loss": 0.1})
        mgr.save(2, _tree(2), metrics={"loss": 0.9})
    fail = [True]

    def flaky(doing, key, args):  # the best step's manifest cannot be read, once
        if fail[0] and doing == Op.READ and key.startswith("1/attempt-"):
            fail[0] = False
            raise StorageError(5, "503 from the server, once")

    with ckpt.CheckpointManager(FaultyStore(root, before=flaky), keep_last=1, keep_best=1,
                                best_metric="loss") as mgr:
        with caplog.at_level(logging.ERROR, logger="ckpt"):
            started(mgr.save(3, _tree(3), metrics={"loss": 0.5})).wait()
        assert "housekeeping failed" in caplog.text
        assert not fail[0]
        assert mgr.steps() == [1, 2, 3]  # nothing deleted on a guess
        started(mgr.save(4, _tree(4), metrics={"loss": 0.7})).wait()
        assert mgr.steps() == [1, 4]  # the best, and the newest


def test_start_up_clean_up_never_removes_the_managers_own_new_save(tmp_path, monkeypatch):
    """Debris of a crashed run sits in step 0; the clean-up thread lists step 0 before the
    new save of step 0 registers, and its attempts after that save wrote everything. The new
    save's attempt is kept; the debris is removed all the same (its writer, woken later,
    finds it removed)."""
    root = str(tmp_path / "run")
    crashed = _Gate(after=False)
    handle = ckpt.save_async(crashed.store(f"{root}/0"), _tree(0))
    assert crashed.reached.wait(60)  # a complete attempt, never claimed: the crash's debris
    listing, go = threading.Event(), threading.Event()

    def slow_listing(doing, key, args):  # the clean-up, about to list step 0's attempts
        if doing == Op.LIST and key == "0" and not listing.is_set():
            listing.set()
            assert go.wait(60)

    ours = _Gate(after=False)
    mgr = ckpt.CheckpointManager(FaultyStore(ours.store(root), before=slow_listing))
    assert listing.wait(60)  # the clean-up has listed step 0 and is about to list attempts
    new = started(mgr.save(0, _tree(100)))
    assert ours.reached.wait(60)  # our attempt is written, not yet claimed
    go.set()
    assert mgr._gc is not None  # a writable manager's start-up clean-up
    mgr._gc.join()
    assert os.listdir(os.path.join(root, "0")).count(handle.attempt) == 0  # debris gone
    ours.release.set()
    new.wait()  # not removed from under us
    assert float(mgr.restore(0)["w"][0]) == 100.0
    mgr.close()
    crashed.release.set()
    with pytest.raises(AttemptRemovedError):
        handle.wait()


def test_retention_failure_does_not_fail_the_committed_save(tmp_path, caplog):
    root = str(tmp_path / "run")
    fail = [True]

    def flaky(doing, key, args):
        if fail[0] and doing == Op.DELETE and key.startswith("1/"):
            fail[0] = False
            raise StorageError(5, "delete refused")

    with ckpt.CheckpointManager(FaultyStore(root, before=flaky), keep_last=1) as mgr:
        started(mgr.save(1, _tree(1))).wait()
        with caplog.at_level(logging.ERROR, logger="ckpt"):
            started(mgr.save(2, _tree(2))).wait()  # committed; retention of step 1 fails
        assert "housekeeping failed" in caplog.text
        assert mgr.steps() == [1, 2]
        started(mgr.save(3, _tree(3))).wait()  # retried
        assert mgr.steps() == [3]


def test_default_keeps_every_step(tmp_path):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root) as mgr:
        for step in range(6):
            mgr.save(step, _tree(step))
    assert ckpt.CheckpointManager(root).steps() == list(range(6))


# -- exits, Ctrl-C, SIGTERM -------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["exit-without-wait", "sys-exit"])
def test_exit_with_a_save_in_flight_commits_it(tmp_path, mode):
    url = str(tmp_path / "one")
    run = subprocess.run([sys.executable, CHILD, mode, url], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    out = ckpt.restore(url)
    assert np.array_equal(out["x"], np.arange(1000))
    assert np.asarray(out["y"]["w"]).tobytes() == host_state(3)["layer0"]["w"].tobytes()


def test_exit_with_a_failing_save_says_so(tmp_path):
    url = str(tmp_path / "one")
    run = subprocess.run([sys.executable, CHILD, "exit-failing", url], capture_output=True,
                         text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0] and "not committed" in lines[0], run.stderr
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(url)


def test_ctrl_c_during_wait_propagates_and_the_save_still_commits_whole(tmp_path):
    url = str(tmp_path / "one")
    proc = _child("interrupt-wait", url)
    assert proc.stdout.readline().strip() == "WAITING"
    proc.send_signal(signal.SIGINT)
    seen = []
    for line in proc.stderr:  # the traceback: wait() gave up at once, the save did not
        seen.append(line)
        if line.startswith("KeyboardInterrupt"):
            break
    # Only now let the held commit go on: the exit hook is what waits for it. (Sent
    # together, SIGINT could land inside the SIGUSR1 handler and lose the gate.)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and seen and seen[-1].startswith("KeyboardInterrupt"), seen
    assert np.array_equal(ckpt.restore(url)["x"], np.arange(1000))


def test_cli_ctrl_c_prints_one_line_and_exits_130(tmp_path, monkeypatch, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    ckpt.save(src, {"x": np.arange(10)})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "reshard", interrupted)
    assert cli.main(["reshard", src, dst, "--mesh", "data=1"]) == 130
    err = capsys.readouterr().err  # nothing was written: nothing to clean up
    assert err.count("\n") == 1
    assert "interrupted" in err
    assert "ckpt gc" not in err

    def interrupted_after_writing(*args, **kwargs):
        open_store(dst).write("attempt-20260101T000000-000000000000/x", b"1")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "reshard", interrupted_after_writing)
    assert cli.main(["reshard", src, dst, "--mesh", "data=1"]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "interrupted" in err
    assert f"ckpt gc {dst}" in err


def test_sigterm_handler_chains_and_is_removed_with_the_last_manager(tmp_path):
    run = subprocess.run([sys.executable, CHILD, "sigterm", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"read_only_leaves_handler": True, "installed": True, "chained": True,
                      "preempted": True, "kept_while_one_open": True, "restored": True,
                      "fresh_after_close": True, "chained_after_thread_close": True,
                      "preempted_after_thread_close": True,
                      "restored_after_thread_close": True}


def test_a_second_sigterm_still_terminates(tmp_path):
    run = subprocess.run([sys.executable, CHILD, "sigterm-twice", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == -signal.SIGTERM, run.stderr
    assert run.stdout.split("\n")[:2] == ["PREEMPTED True", ""]
