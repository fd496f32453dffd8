"""Per-process state: objects with get_state()/set_state() (Grain's iterators) and
`ckpt.PerProcess` values, saved by each process for itself and given back to it."""

import contextlib
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import ckpt
from ckpt.cli import main as cli
from ckpt.errors import TargetMismatchError, UnsupportedLeafError
from tests.children import script
from tools.launch import launch, start

CHILD = script("stateful_child")


class Position:
    """A user class following the state protocol."""

    def __init__(self, n=0):
        self.n, self.sets = n, 0

    def get_state(self):
        return {"n": self.n, "raw": b"\x00\x01"}

    def set_state(self, state):
        self.n, self.sets = state["n"], self.sets + 1


def test_a_stateful_object_and_a_per_process_value_round_trip(tmp_path):
    url = tmp_path / "c"
    pos = Position(7)
    ckpt.save(url, {"pos": pos, "seed": ckpt.PerProcess([1, 2]), "w": jnp.ones(3)})
    pos.n = 100  # after the save: not saved (get_state ran in save_async)
    fresh = Position()
    out = ckpt.restore(url, {"pos": fresh, "seed": ckpt.PerProcess(None), "w": jnp.zeros(3)})
    assert out["pos"] is fresh
    assert fresh.n == 7
    assert fresh.sets == 1
    assert out["seed"] == ckpt.PerProcess([1, 2])
    # Without a target: the state, and the PerProcess; under a plain leaf, the plain value.
    plain = ckpt.restore(url)
    assert plain["pos"] == {"n": 7, "raw": b"\x00\x01"}
    assert plain["seed"] == ckpt.PerProcess([1, 2])
    assert ckpt.restore(url, {"seed": 0})["seed"] == [1, 2]
    assert ckpt.metadata(url).tree["pos"] == ckpt.PerProcess({"n": 7, "raw": b"\x00\x01"})
    # A restore that fails sets no state.
    untouched = Position(3)
    with pytest.raises(ckpt.errors.ShapeMismatchError):
        ckpt.restore(url, {"pos": untouched, "w": jnp.zeros(4)})
    assert untouched.n == 3
    assert untouched.sets == 0


def test_state_that_is_not_plain_data_is_refused_naming_the_leaf(tmp_path):
    class Bad(Position):
        def get_state(self):
            return {"f": object()}

    with pytest.raises(UnsupportedLeafError, match=r"get_state\(\) of leaf it"):
        ckpt.save(tmp_path / "c", {"it": Bad()})
    with pytest.raises(UnsupportedLeafError, match=r"PerProcess value of leaf p"):
        ckpt.save(tmp_path / "d", {"p": ckpt.PerProcess({1, 2})})
    assert not (tmp_path / "c").exists()
    assert not (tmp_path / "d").exists()


def _batches(lines):
    return {int(line.split()[1]): line.split(maxsplit=2)[2] for line in lines
            if line.startswith("BATCH")}


def _child(root, kind, last, kill_at=None):
    """Runs the loop in a process group of its own and, once the loop's process is gone,
    ends the group: a DataLoader's worker processes outlive a SIGKILLed parent."""
    args = [sys.executable, CHILD, str(root), kind, str(last)]
    args += [str(kill_at)] if kill_at else []
    out, err = root.parent / f"{root.name}-{last}.out", root.parent / f"{root.name}-{last}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(args, stdout=o, stderr=e, start_new_session=True)
        try:
            code = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return code, out.read_text().splitlines(), err.read_text()


@pytest.mark.parametrize("kind", ["map", "loader0", "loader2"])
@pytest.mark.slow  # starts processes
def test_a_grain_iterator_resumes_bit_for_bit_after_sigkill(tmp_path, kind):
    code, straight, err = _child(tmp_path / "straight", kind, 8)
    assert code == 0 and len(_batches(straight)) == 8, err[-2000:]
    code, first, err = _child(tmp_path / "run", kind, 8, kill_at=5)
    assert code == -9, err[-2000:]  # killed right after step 5 committed
    assert sorted(_batches(first)) == [1, 2, 3, 4, 5]
    code, second, err = _child(tmp_path / "run", kind, 8)
    assert code == 0 and "RESUMED 5" in second, err[-2000:]
    resumed = _batches(second)
    assert sorted(resumed) == [6, 7, 8]
    assert all(resumed[s] == _batches(straight)[s] for s in (6, 7, 8)), (resumed, straight)


@pytest.mark.slow  # starts processes
def test_two_processes_each_get_their_own_state_back(tmp_path):
    root = str(tmp_path / "run")
    results = launch("tests.children.mp_jobs:per_process_states", 2, args=[root])
    for p, r in enumerate(results):
        assert r["value"] == {"process": p} and r["resumed"] == r["expected"], r
    # One process cannot take two processes' state: an error naming the leaf and the
    # counts, unless the target leaves the per-process leaves out.
    with pytest.raises(TargetMismatchError, match=r"loader holds the values of 2 "
                                                  r"processes, and 1 are restoring"):
        ckpt.CheckpointManager(root, read_only=True).restore(target={"loader": Position(),
                                                                      "step": 0})
    rest = ckpt.CheckpointManager(root, read_only=True).restore(target={"step": 0})
    assert rest == {"step": 3}
    # Without a target (inspection, a notebook): every process's value, by process index,
    # and the same after a reshard of the checkpoint.
    for url in (os.path.join(root, "3"), str(tmp_path / "resharded")):
        if url.endswith("resharded"):
            assert cli(["reshard", os.path.join(root, "3"), url, "--mesh", "x=1"]) == 0
        whole = ckpt.restore(url)
        assert whole["who"] == [{"process": 0}, {"process": 1}]
        assert whole["step"] == 3
        assert len(whole["loader"]) == 2
        assert whole["loader"][0] != whole["loader"][1]


def test_metadata_tree_is_a_target_for_per_process_leaves(tmp_path):
    url = tmp_path / "c"
    ckpt.save(url, {"seed": ckpt.PerProcess(5), "pos": Position(4), "n": 1})
    tree = ckpt.metadata(url).tree
    state = ckpt.PerProcess({"n": 4, "raw": b"\x00\x01"})
    assert tree["seed"] == ckpt.PerProcess(5)
    assert tree["pos"] == state
    assert ckpt.restore(url, tree) == {"seed": ckpt.PerProcess(5), "n": 1, "pos": state}


@pytest.mark.parametrize("kind", ["map", "loader0", "loader2"])
@pytest.mark.slow  # starts processes
def test_two_processes_resume_their_grain_iterators_bit_for_bit_after_sigkill(tmp_path, kind):
    """Each process iterates over its own shard; the job is SIGKILLed once step 4 is
    committed everywhere, and the restarted job's batches equal an uninterrupted run's, per
    process, bit for bit (and so does the array the batches fed)."""
    straight = launch("tests.children.mp_jobs:grain_loop", 2,
                      args=[str(tmp_path / "straight"), kind, 6, 0], timeout=240)
    assert straight[0]["batches"] != straight[1]["batches"]  # each its own shard
    run = str(tmp_path / "run")
    with start("tests.children.mp_jobs:grain_loop", 2, args=[run, kind, 6, 4]) as job:
        for p in range(2):
            job.wait_for_line(p, "SAVED 4", timeout=240)
        job.kill_all()
        first = [[line for line in job.lines[p] if line.startswith("BATCH")] for p in range(2)]
    assert [len(lines) for lines in first] == [4, 4]
    resumed = launch("tests.children.mp_jobs:grain_loop", 2, args=[run, kind, 6, 0], timeout=240)
    for p in range(2):
        assert resumed[p]["resumed"] == 4
        assert sorted(resumed[p]["batches"]) == ["5", "6"]
        assert resumed[p]["batches"] == {s: straight[p]["batches"][s] for s in ("5", "6")}
        assert resumed[p]["w"] == straight[p]["w"]


@pytest.mark.slow  # starts processes
def test_an_orbax_jobs_grain_items_restore_per_process(tmp_path):
    """Orbax's manager, two processes, a Grain item: each process restores its own
    iterator state through this library; one process cannot take two processes' states."""
    root = str(tmp_path / "orbax")
    results = launch("tests.children.mp_jobs:orbax_grain_items", 2, args=[root], timeout=240)
    for r in results:
        assert r["next"] == r["expected"], r
    assert results[0]["state"] != results[1]["state"]
    step = os.path.join(root, "5")
    with pytest.raises(TargetMismatchError, match=r"data holds the values of 2 "
                                                  r"processes, and 1 are restoring"):
        ckpt.restore(step, {"data": Position()})
    assert ckpt.restore(step, {"state": {"w": np.zeros((8, 8), np.float32)}})["state"]["w"][
        7, 7] == 63
    converted = str(tmp_path / "ours")
    assert cli(["convert", "-q", step, converted]) == 0
    assert ckpt.metadata(converted).tree["data"] == ckpt.PerProcess(results[0]["state"])
    with pytest.raises(TargetMismatchError, match="holds the values of 2 processes"):
        ckpt.restore(converted, {"data": Position()})


def test_a_stateful_target_meeting_a_plain_saved_value_is_refused_naming_the_leaf(tmp_path):
    """A data iterator in the target whose leaf the checkpoint holds as a plain value (a
    state saved by other code as a dict, a number): its set_state would never be called
    and it would silently keep its own position."""
    url = tmp_path / "c"
    ckpt.save(url, {"it": {"n": 5}, "pos": 3})
    fresh = Position(0)
    with pytest.raises(TargetMismatchError, match=r": pos: the target is an object") as err:
        ckpt.restore(url, {"it": {"n": 0}, "pos": fresh})
    assert isinstance(err.value, ckpt.CkptError)
    assert fresh.sets == 0
    assert fresh.n == 0
