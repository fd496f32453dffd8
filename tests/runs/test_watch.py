"""`CheckpointManager.watch` and `ckpt list --watch`: each committed step once, in order,
never one being written or removed; retention, rewinds, timeouts, and a real trainer and
evaluator in processes of their own, the trainer killed mid-save."""

import collections
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt.cli import main
from tests.children import script
from tests.helpers.faults import FaultyStore, is_chunk_read


def _tree(step, branch=0):
    return {"x": np.full(8, step + 1000 * branch)}


def test_each_step_once_in_order_skipping_what_retention_removed(tmp_path, caplog):
    root = str(tmp_path / "run")
    trainer = ckpt.CheckpointManager(root, keep_last=2, watch_preemption=False)
    for step in (1, 2):
        trainer.save(step, _tree(step))
    trainer.wait()
    evaluator = ckpt.CheckpointManager(root, read_only=True)
    steps = evaluator.watch(timeout_s=0, poll_s=0.01)
    assert next(steps) == 1
    for step in (3, 4):  # retention removes 1 and 2 meanwhile
        trainer.save(step, _tree(step))
    trainer.wait()
    with caplog.at_level(logging.WARNING, logger="ckpt"):
        assert next(steps) == 3
    assert "step 2 left the run before it was reached" in caplog.text
    # A save under way (an attempt without COMMIT) is not a step yet.
    os.makedirs(tmp_path / "run" / "5" / "attempt-20260101T000000-000000000000")
    assert next(steps) == 4
    with pytest.raises(StopIteration):  # timeout_s=0: nothing new, the watch ends
        next(steps)
    assert list(evaluator.watch(after=3, timeout_s=0)) == [4]
    assert list(evaluator.watch(after=4, timeout_s=0)) == []
    trainer.close()


def test_a_watch_that_starts_behind_costs_a_few_requests_a_step(tmp_path):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, watch_preemption=False) as trainer:
        for step in range(1, 41):
            trainer.save(step, _tree(step))
    calls: collections.Counter = collections.Counter()
    counted = FaultyStore(root, before=lambda doing, key, args: calls.update([doing]))
    evaluator = ckpt.CheckpointManager(counted, read_only=True)
    calls.clear()
    assert list(evaluator.watch(timeout_s=0)) == list(range(1, 41))
    # One listing of every folder, then a few requests a step: not a look at every folder
    # above each step yielded (820 for 40 steps).
    assert sum(calls.values()) <= 8 * 40, calls


def test_a_rewind_is_followed_onto_the_new_branch(tmp_path):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, watch_preemption=False) as trainer:
        for step in (1, 2, 3):
            trainer.save(step, _tree(step))
        trainer.wait()
        evaluator = ckpt.CheckpointManager(root, read_only=True)
        steps = evaluator.watch(timeout_s=0, poll_s=0.01)
        assert [next(steps) for _ in range(3)] == [1, 2, 3]
        trainer.rewind(1)
        for step in (2, 3, 4):  # the new branch: 2 and 3 again, other checkpoints
            trainer.save(step, _tree(step, branch=1))
        trainer.wait()
        seen = list(steps)
        assert seen == [2, 3, 4]
        assert [int(evaluator.restore(s)["x"][0]) for s in seen] == [1002, 1003, 1004]


def test_timeout_counts_from_the_wait_and_close_ends_a_watch(tmp_path):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, watch_preemption=False) as trainer:
        trainer.save(1, _tree(1))
    evaluator = ckpt.CheckpointManager(root, read_only=True)
    started = time.monotonic()
    assert list(evaluator.watch(timeout_s=0.3, poll_s=0.05)) == [1]
    assert time.monotonic() - started >= 0.3
    got: list[int] = []
    follower = threading.Thread(target=lambda: got.extend(evaluator.watch(poll_s=0.05)))
    follower.start()
    evaluator.close()  # the watch without a timeout ends with the manager
    follower.join(timeout=30)
    assert not follower.is_alive() and got in ([], [1])
    for bad in ({"poll_s": 0}, {"poll_s": float("nan")}, {"timeout_s": -1}):
        with pytest.raises(ckpt.InvalidArgumentError):
            next(iter(evaluator.watch(**bad)))


def test_a_step_removed_while_restored_is_not_found_not_corrupt(tmp_path, mesh24):
    root = str(tmp_path / "run")
    x = np.arange(1 << 20, dtype=np.float32).reshape(256, -1)
    with ckpt.CheckpointManager(root, watch_preemption=False) as trainer:
        # Eight chunks of 512 KiB, read one at a time under a budget of 1 MiB.
        trainer.save(1, {"x": jax.device_put(x, NamedSharding(mesh24, P("data", "model")))})
        trainer.save(2, _tree(2))
    removed = threading.Event()

    def remove_on_first_read(doing, key, args):
        if is_chunk_read(doing) and not removed.is_set():
            removed.set()
            with ckpt.CheckpointManager(root, watch_preemption=False) as other:
                other.delete(1)

    store = FaultyStore(str(tmp_path / "run" / "1"), before=remove_on_first_read)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="was removed while it was read"):
        ckpt.restore(store, memory_budget=1 << 20)
    assert removed.is_set()


def test_list_watch_prints_each_step_as_it_commits(tmp_path, capsys):
    root = str(tmp_path / "run")
    with ckpt.CheckpointManager(root, watch_preemption=False) as trainer:
        for step in (1, 2, 3):
            trainer.save(step, _tree(step), metrics={"loss": step / 10})
    assert main(["list", root, "--watch", "--after", "1", "--idle", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["2", "3"]
    assert "committed" in lines[0] and "loss=0.2" in lines[0]
    assert main(["list", root, "--watch", "--idle", "0", "--json"]) == 0
    docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["step"] for d in docs] == [1, 2, 3]
    assert set(docs[0]) == {"step", "committed_at", "bytes", "metrics"}
    assert docs[2]["metrics"] == {"loss": 0.3}
    empty = tmp_path / "not-yet"  # an evaluator started before its trainer: it waits
    empty.mkdir()
    assert main(["list", str(empty), "--watch", "--idle", "0"]) == 0
    assert capsys.readouterr().out == ""


def test_a_step_removed_between_its_commit_and_manifest_reads_is_not_found(tmp_path):
    url = str(tmp_path / "ckpt")
    ckpt.save(url, _tree(1))
    attempt = ckpt.metadata(url).attempt

    def remove_first(doing, key, args):
        if key.endswith("manifest.msgpack") and os.path.exists(os.path.join(url, "COMMIT")):
            os.remove(os.path.join(url, "COMMIT"))  # as a removal does: COMMIT first,
            os.remove(os.path.join(url, attempt, "manifest.msgpack"))  # then the data

    with pytest.raises(ckpt.CheckpointNotFoundError, match="removed while it was opened"):
        ckpt.restore(FaultyStore(url, before=remove_first))


@pytest.mark.slow  # starts processes
def test_an_evaluator_process_follows_a_trainer_killed_and_rewound(tmp_path):
    root, out = str(tmp_path / "run"), str(tmp_path / "evaluated.jsonl")
    evaluator = subprocess.Popen([sys.executable, script("watch_child"), "evaluator", root,
                                  out, "30"], stdout=subprocess.PIPE, text=True)
    assert evaluator.stdout is not None and evaluator.stdout.readline() == "watching\n"

    def trainer(*args):
        return subprocess.Popen([sys.executable, script("watch_child"), "trainer", root,
                                 *map(str, args)], stdout=subprocess.PIPE, text=True)

    first = trainer(0, 1, 6)
    assert first.wait(timeout=120) == 0
    killed = trainer(0, 7, 50)
    assert killed.stdout is not None
    for line in killed.stdout:
        if line == "committed 8\n":
            break
    killed.send_signal(signal.SIGKILL)  # within the save of step 9 or the next
    killed.wait(timeout=60)
    resumed = trainer(1, 0, 30, "rewind")  # to the oldest step kept, then a new branch
    assert resumed.wait(timeout=120) == 0
    assert evaluator.wait(timeout=120) == 0
    with open(out) as f:
        records = [json.loads(line) for line in f]
    assert not [r for r in records if "error" in r], records
    branch_of = [r["value"] // 1000 for r in records if "value" in r]
    assert branch_of == sorted(branch_of)  # the old branch, then the new one
    for r in records:
        if "value" in r:
            assert r["value"] % 1000 == r["step"], r  # never another step's data
    steps = [r["step"] for r in records]
    drops = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert len(drops) <= 1, steps  # once, when the run was rewound
    assert steps[-1] == 30 and records[-1].get("value") == 1030, records
    assert ckpt.CheckpointManager(root, read_only=True).steps() == [29, 30]
