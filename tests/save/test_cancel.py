"""`SaveHandle.cancel` and `CheckpointManager.cancel`: a save stopped at a chunk boundary
commits nothing and leaves no attempt; a cancel racing the commit wins or loses whole, and
says which; with one process and two, on a local disk and an object store."""

import os
import threading

import numpy as np
import pytest

import ckpt
from ckpt._format import COMMIT, MANIFEST
from ckpt.storage import Op, open_store
from tests.helpers.faults import FaultyStore, is_chunk_write, is_commit_claim
from tools.launch import launch


def _tree():
    rng = np.random.default_rng(0)
    # Eight arrays of 2 MiB: TensorStore arrays (not plain objects), one chunk each.
    return {f"w{i}": rng.standard_normal((512, 1024)).astype(np.float32) for i in range(8)}


def _held_at(phase):
    """A store hook that holds the save at ``phase`` (once) until the gate opens."""
    reached, gate, seen = threading.Event(), threading.Event(), []

    def at_phase(doing, key, args):
        hit = {"chunks": is_chunk_write(doing),
               "host report": doing == Op.WRITE and "/hosts/" in f"/{key}",
               "commit claim": is_commit_claim(doing, key, args),
               "manifest": doing == Op.WRITE and key.endswith(MANIFEST),
               "COMMIT": doing == Op.CREATE and key.endswith(COMMIT)}[phase]
        if is_chunk_write(doing):
            seen.append(key)
        if hit and not reached.is_set():
            reached.set()
            assert gate.wait(60)

    return at_phase, reached, gate, seen


def _release_on_cancel(handle, gate):
    """Makes a cancel of ``handle`` open ``gate`` as soon as it is asked for, so that the
    held step goes on knowing it."""
    assert handle is not None and handle.on_cancel is not None
    ask = handle.on_cancel

    def ask_then_release():
        ask()
        gate.set()

    handle.on_cancel = ask_then_release
    return handle


def _cancel_when_held(handle, reached, gate):
    assert reached.wait(60)
    return _release_on_cancel(handle, gate).cancel()


def _attempts(url):
    return [c for c in open_store(url).list_children() if c.startswith("attempt-")]


@pytest.mark.parametrize(("phase", "commits"), [
    ("chunks", False), ("host report", False), ("commit claim", True), ("manifest", True),
    ("COMMIT", True)])
@pytest.mark.parametrize("root_url", ["local", pytest.param("s3", marks=pytest.mark.slow)],
                         indirect=True)
def test_a_cancel_at_each_phase_commits_whole_or_nothing(root_url, phase, commits):
    url = f"{root_url}/ckpt"
    hook, reached, gate, _ = _held_at(phase)
    tree = _tree()
    handle = ckpt.save_async(FaultyStore(url, before=hook), tree)
    assert _cancel_when_held(handle, reached, gate) is (not commits)
    store = open_store(url)
    assert store.exists(COMMIT) is commits
    if commits:
        handle.wait()  # committed: nothing to raise
        out = ckpt.restore(url)
        assert all(out[k].tobytes() == v.tobytes() for k, v in tree.items())
    else:
        with pytest.raises(ckpt.SaveCancelledError, match="was cancelled"):
            handle.wait()
        assert _attempts(url) == []  # removed
        ckpt.save(url, tree)  # the URL takes a new save
        assert ckpt.diff(url, url).equal


def test_a_cancel_stops_at_the_next_chunk_boundary(tmp_path):
    hook, reached, gate, seen = _held_at("chunks")
    url = str(tmp_path / "ckpt")
    # Room for one 2 MiB chunk in flight: the others are not written once cancelled.
    handle = ckpt.save_async(FaultyStore(url, before=hook), _tree(), memory_budget=2 << 20)
    assert _cancel_when_held(handle, reached, gate) is True
    assert len(seen) < 8, seen
    assert not os.path.exists(os.path.join(url, COMMIT)) and _attempts(url) == []


def test_cancel_of_a_committed_or_finished_save_says_so(tmp_path):
    handle = ckpt.save_async(str(tmp_path / "a"), _tree())
    handle.wait()
    assert handle.cancel() is False
    assert handle.cancel() is False  # again: the same answer
    assert ckpt.restore(str(tmp_path / "a"))["w0"].shape == (512, 1024)


def test_a_managers_cancel_lets_the_next_save_go_on(tmp_path):
    root = str(tmp_path / "run")
    hook, reached, gate, _ = _held_at("chunks")
    mgr = ckpt.CheckpointManager(FaultyStore(root, before=hook), watch_preemption=False)
    assert mgr.cancel() is False  # nothing in flight
    handle = mgr.save(1, _tree())
    assert reached.wait(60)
    _release_on_cancel(handle, gate)
    assert mgr.cancel() is True
    assert mgr.steps() == []
    mgr.save(2, _tree())  # the cancelled save's error is not raised here
    mgr.close()
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [2]


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize(("who", "manager"), [(1, False), (0, False), (1, True)])
def test_two_processes_a_cancel_on_one_stops_both(tmp_path, who, manager):
    url = str(tmp_path / ("run" if manager else "ckpt"))
    results = launch("tests.children.mp_jobs:cancel_one", 2, args=[url, who, manager],
                     timeout=240)
    assert results[who]["cancelled"] is True, results
    assert [r["error"] for r in results] == ["SaveCancelledError"] * 2, results
    if not manager:  # (a manager's save writes with its own, larger, budget)
        # Both stopped early, the other process once it saw the cancel: at its next chunk.
        assert all(r["writes"] < r["whole"] for r in results), results
    folder = os.path.join(url, "1") if manager else url  # the cancelled step
    assert not os.path.exists(os.path.join(folder, COMMIT))
    assert _attempts(folder) == []
    if manager:  # the next save went on, on both processes
        assert [r["steps"] for r in results] == [[2], [2]], results


def test_a_managers_cancel_stops_the_commit_to_the_root_of_a_local_step(tmp_path):
    root, local = str(tmp_path / "run"), str(tmp_path / "local")
    hook, reached, gate, _ = _held_at("chunks")  # only the root's writes pass the hook
    mgr = ckpt.CheckpointManager(FaultyStore(root, before=hook), local_dir=local,
                                 watch_preemption=False)
    handle = mgr.save(1, _tree())
    assert handle is not None
    handle.wait()  # committed on the local tier; its commit to the root is held
    assert reached.wait(60)
    _release_on_cancel(handle.remote, gate)
    assert mgr.cancel() is True
    assert mgr.steps() == [1]  # on the local tier only
    assert not open_store(root).exists(f"1/{COMMIT}")
    assert _attempts(os.path.join(root, "1")) == []
    mgr.save(2, _tree())
    mgr.close()  # the cancelled commit's outcome was seen: nothing is raised
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [2]


def test_a_cancel_asked_before_the_save_started_reaches_it():
    # A local step's commit to the root has a handle before its pipeline starts.
    handle = ckpt.SaveHandle("memory://x/1", 1)
    with pytest.raises(TimeoutError):
        handle.cancel(timeout=0)
    asked: list[int] = []
    handle.attach_cancel(lambda: asked.append(1))
    assert asked == [1]


def test_a_cancel_that_cannot_know_the_outcome_says_so():
    handle = ckpt.SaveHandle("memory://x/2", 2)
    handle._finish(ckpt.CommitOutcomeUnknownError("process 0 did not report"))
    with pytest.raises(ckpt.CommitOutcomeUnknownError):
        handle.cancel()
    assert not handle.observed_by_user  # still to be seen: COMMIT decides
