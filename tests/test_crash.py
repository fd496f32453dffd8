"""SIGKILL of a saving process at many moments: committed steps survive, the interrupted
step is whole or invisible, and the next manager removes the debris."""

import os
import random
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import ckpt
from tests.crash_state import host_state, make_state

CHILD = os.path.join(os.path.dirname(__file__), "crash_child.py")
POINTS = ["chunk:1", "chunk:7", "chunk:20", "after_report", "after_manifest", "before_commit",
          "after_commit"]
DELAY_SEEDS = range(8)


@pytest.fixture(scope="module")
def committed_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash") / "template"
    with ckpt.CheckpointManager(root, keep_last=None) as mgr:
        for step in (0, 1, 2):
            mgr.save(step, make_state(step))
    return root


def _assert_exact(out, step):
    expected = host_state(step)
    assert out["step"] == step
    for k, v in expected.items():
        if isinstance(v, dict):
            for n, a in v.items():
                assert np.asarray(out[k][n]).tobytes() == a.tobytes(), (step, k, n)


def _run_child(root, point, delay=None):
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, CHILD, str(root), "3", point],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "SAVING", proc.stderr.read()
        if delay is not None:
            timer = threading.Timer(delay, lambda: proc.poll() is None and proc.send_signal(signal.SIGKILL))
            timer.start()
        out, err = proc.communicate(timeout=120)
        if delay is not None:
            timer.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def _check_after_crash(root):
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    mgr.close()  # waits for start-up debris removal
    steps = mgr.steps()
    assert steps[:3] == [0, 1, 2] and steps in ([0, 1, 2], [0, 1, 2, 3])
    for step in steps:
        _assert_exact(mgr.restore(step), step)
    for step in os.listdir(root):
        attempts = [n for n in os.listdir(root / step) if n.startswith("attempt-")]
        assert len(attempts) == (1 if int(step) in steps else 0), (step, attempts)
    return mgr, steps


def _resume(mgr, steps):
    if 3 not in steps:
        mgr.save(3, make_state(3)).wait()
    _assert_exact(mgr.restore(), 3)
    mgr.close()


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_protocol_point(committed_root, tmp_path, point):
    root = tmp_path / "run"
    shutil.copytree(committed_root, root)
    code, _, err = _run_child(root, point)
    assert code == -signal.SIGKILL, err
    mgr, steps = _check_after_crash(root)
    # A kill before COMMIT exists leaves step 3 invisible; after it, step 3 is whole.
    assert (3 in steps) == (point == "after_commit")
    _resume(mgr, steps)


@pytest.mark.parametrize("seed", DELAY_SEEDS)
def test_kill_at_random_moment(committed_root, tmp_path, seed):
    root = tmp_path / "run"
    shutil.copytree(committed_root, root)
    delay = random.Random(seed).uniform(0.0, 0.1)  # a save here takes ~60 ms
    code, out, err = _run_child(root, "none", delay)
    assert code in (0, -signal.SIGKILL), err
    mgr, steps = _check_after_crash(root)
    if code == 0:
        assert "DONE" in out and 3 in steps
    _resume(mgr, steps)
