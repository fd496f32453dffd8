"""Training loops: save policies, retention by metric, preemption, whole-state resume."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import ckpt
from ckpt._policy import SavePolicy
from tests.children import mp_jobs, script
from tools.launch import start

LOOP = script("train_loop")


def _run_loop(root, first, last, env=None):
    run = subprocess.run([sys.executable, LOOP, str(root), "run", str(first), str(last)],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.splitlines()


def _losses(lines):
    return {int(line.split()[1]): line.split()[2] for line in lines if line.startswith("LOSS")}


@pytest.mark.slow  # starts processes
def test_whole_training_state_resumes_in_a_fresh_process_with_identical_losses(tmp_path):
    straight = _losses(_run_loop(tmp_path / "a", 1, 9))
    first = _run_loop(tmp_path / "b", 1, 6)
    assert sorted(_losses(first)) == [1, 2, 3, 4, 5, 6]
    second = _run_loop(tmp_path / "b", 1, 9)  # a fresh process resumes from step 6
    assert "RESUMED 6" in second
    resumed = _losses(second)
    assert sorted(resumed) == [7, 8, 9]
    assert all(resumed[s] == straight[s] for s in (7, 8, 9)), (resumed, straight)


@pytest.mark.slow  # starts processes
def test_sigterm_saves_the_current_step_and_the_loop_exits(tmp_path):
    root = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, LOOP, str(root), "run", "1", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "CKPT_TEST_WAIT_SIGTERM": "1"})
    try:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            if line.startswith("LOSS 4 "):
                proc.send_signal(signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    preempted = next(line for line in out.splitlines() if line.startswith("PREEMPTED"))
    stopped = int(preempted.split()[1])
    assert stopped >= 4
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    assert mgr.latest_step() == stopped  # saved although not a multiple of save_every=3
    mgr.close()
    again = _run_loop(root, 1, stopped + 2)
    assert f"RESUMED {stopped}" in again
    assert sorted(_losses(again)) == [stopped + 1, stopped + 2]


@pytest.mark.slow  # starts processes
def test_sigterm_to_one_process_stops_every_process_at_one_committed_step(tmp_path):
    root = str(tmp_path / "run")
    with start("tests.children.mp_jobs:train_until_preempted", 2, args=[root, None]) as job:
        job.wait_for_line(0, "STEP 5")
        job.kill(1, signal.SIGTERM)
        results = job.wait(timeout=120)
    stopped = {r["stopped"] for r in results}
    assert len(stopped) == 1, results
    step = stopped.pop()
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    assert mgr.steps() == [step]
    mp_jobs.exact(mgr.restore(step), step)
    mgr.close()
    # The restarted job resumes from that step (and is preempted again, to end it).
    with start("tests.children.mp_jobs:train_until_preempted", 2, args=[root, None]) as job:
        job.wait_for_line(1, f"STEP {step + 2}")
        job.kill(0, signal.SIGTERM)
        results = job.wait(timeout=120)
    assert all(r["resumed_from"] == step for r in results)


def test_save_every_steps_and_seconds():
    """Steps of 7 s on a clock of the test's own: every 10 steps, and whenever 20 s passed
    since the last save. Both triggers fire (a policy that ignored either one, or that
    did not restart the interval at each save, would choose other steps)."""
    clock = [1000.0]
    policy = SavePolicy(10, 20, watch_preemption=False, clock=lambda: clock[0])
    saved = []
    for step in range(1, 25):
        clock[0] += 7.0
        if policy.should_save(step):
            assert policy.should_save(step)  # asked again: the same answer
            policy.saved()
            saved.append(step)
    # 21 s after start (3), after 3 (6), after 6 (9); step 10 by count restarts the
    # interval: 13, 16, 19; 20 by count; 23.
    assert saved == [3, 6, 9, 10, 13, 16, 19, 20, 23]
    assert SavePolicy(10, None, False, clock=lambda: clock[0]).should_save(3) is False


def test_a_manager_saves_when_its_interval_has_passed(tmp_path):
    """On the real clock, with no step schedule: the manager's `should_save` turns true
    once ``save_every_seconds`` passed, and `save` restarts the interval."""
    import itertools
    import time

    began, first = time.monotonic(), None  # before the manager starts its interval
    with ckpt.CheckpointManager(tmp_path / "run", save_every_seconds=0.5) as mgr:
        for step in itertools.count(1):
            assert time.monotonic() - began < 60, "the interval never passed"
            if mgr.should_save(step):
                first = step
                break
        assert first is not None  # the loop ends only by finding it
        assert time.monotonic() - began >= 0.5
        mgr.save(first, {"x": first})
        assert not mgr.should_save(first + 1)  # the interval restarted with the save
    with pytest.raises(ValueError, match="save_every"):
        ckpt.CheckpointManager(tmp_path / "x", save_every=0)


def test_keep_best_by_metric_with_keep_last(tmp_path):
    losses = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.7, 6: 0.8, 7: 0.6}
    with ckpt.CheckpointManager(tmp_path / "run", keep_last=2, keep_best=2,
                                best_metric="loss") as mgr:
        for step, loss in losses.items():
            mgr.save(step, {"x": np.full(100, step)}, metrics={"loss": loss})
    mgr = ckpt.CheckpointManager(tmp_path / "run", keep_last=2, keep_best=2, best_metric="loss")
    assert mgr.steps() == [2, 4, 6, 7]  # best two (4, 2) and the last two (6, 7)
    assert ckpt.metadata(tmp_path / "run" / "4").leaves  # readable
    mgr.close()
    # A new manager (which must read the metrics back from the manifests) keeps applying it.
    with ckpt.CheckpointManager(tmp_path / "run", keep_last=1, keep_best=1,
                                best_metric="loss", best_mode="min") as mgr:
        mgr.save(8, {"x": np.full(100, 8)}, metrics={"loss": 0.05})
    assert ckpt.CheckpointManager(tmp_path / "run").steps() == [8]
    with pytest.raises(ValueError, match="keep_best"):
        ckpt.CheckpointManager(tmp_path / "run", keep_best=2)


def test_save_follows_the_schedule_unless_forced(tmp_path):
    """With a schedule, `save` saves the steps `should_save` picks and returns None for the
    others (as Orbax's `save` does); `force=True` saves anyway; asking both agrees."""
    with ckpt.CheckpointManager(tmp_path / "run", save_every=2) as mgr:
        handles = {step: mgr.save(step, {"x": step}) for step in range(5)}
        assert [s for s, h in handles.items() if h is not None] == [0, 2, 4]
        assert mgr.should_save(5) is False
        assert mgr.save(5, {"x": 5}) is None
        assert mgr.save(5, {"x": 5}, force=True) is not None
    assert ckpt.CheckpointManager(tmp_path / "run").steps() == [0, 2, 4, 5]
    with ckpt.CheckpointManager(tmp_path / "timed", save_every_seconds=3600) as mgr:
        assert mgr.save(1, {"x": 1}) is None  # an hour has not passed
        assert mgr.save(2, {"x": 2}, force=True) is not None
    with ckpt.CheckpointManager(tmp_path / "plain") as mgr:  # no schedule: every call saves
        assert all(mgr.save(step, {"x": step}) is not None for step in range(3))


def test_numpy_and_jax_steps_and_metrics_are_accepted(tmp_path):
    import jax.numpy as jnp

    # The manager's annotations (step: int, metrics: dict[str, float]) are narrower than the
    # numpy and jax numbers it documents and this test passes: each such call is ignored.
    with ckpt.CheckpointManager(tmp_path / "run", best_metric="loss") as mgr:
        mgr.save(np.int64(3), {"x": 3}, metrics={  # type: ignore[arg-type]
            "loss": np.float32(0.5), "acc": jnp.array(0.75)})  # type: ignore[dict-item]
        mgr.save(jnp.array(4), {"x": 4}, metrics={  # type: ignore[arg-type]
            "loss": jnp.float32(0.25), "n": np.int32(7)})  # type: ignore[dict-item]
        mgr.save(np.array(5, np.uint16),  # type: ignore[arg-type]
                 {"x": 5}, metrics={"loss": 0.375})
        mgr.wait()
        assert mgr.steps() == [3, 4, 5]
        assert mgr.metrics(np.int64(3)) == {"loss": 0.5, "acc": 0.75}  # type: ignore[arg-type]
        assert mgr.metrics(4) == {"loss": 0.25, "n": 7.0}
        assert mgr.restore(jnp.array(4)) == {"x": 4}  # type: ignore[arg-type]
        # What is refused is passed on purpose.
        for bad in (True, np.bool_(True), 3.0, -1, jnp.ones(2, jnp.int32), "6"):
            with pytest.raises(ValueError, match="step"):
                mgr.save(bad, {"x": 0})  # type: ignore[arg-type]
        for bad_metrics in ({"loss": True}, {"loss": jnp.ones(2)}, {"loss": "0.1"}, {1: 0.1}):
            with pytest.raises(ValueError, match="metrics"):
                mgr.save(6, {"x": 6}, metrics=bad_metrics)  # type: ignore[arg-type]
        assert mgr.steps() == [3, 4, 5]
        with pytest.raises(ckpt.CheckpointNotFoundError):
            mgr.metrics(6)


def test_best_step_and_metrics_read_back_after_a_restart(tmp_path):
    losses = {1: 0.4, 2: 0.1, 3: float("nan"), 4: 0.1, 5: 0.3}
    with ckpt.CheckpointManager(tmp_path / "run", best_metric="loss") as mgr:
        assert mgr.best_step() is None
        for step, loss in losses.items():
            mgr.save(step, {"x": step}, metrics={"loss": loss, "acc": 1 - step / 10})
        mgr.save(6, {"x": 6})  # no metrics: never the best
        mgr.wait()
        assert mgr.best_step() == 4  # the newest of the two best (NaN never ranks)
    # A new manager reads the metrics back from the manifests.
    again = ckpt.CheckpointManager(tmp_path / "run", best_metric="acc", best_mode="max")
    assert again.best_step() == 1
    assert again.metrics(2) == {"loss": 0.1, "acc": 0.8}
    assert again.metrics(6) == {}
    assert ckpt.metadata(tmp_path / "run" / "2").metrics == {"loss": 0.1, "acc": 0.8}
    with pytest.raises(ValueError, match="best_metric"):
        ckpt.CheckpointManager(tmp_path / "run").best_step()
    again.close()


def test_an_eval_shape_target_restores_jax_arrays_with_one_warning(tmp_path):
    import jax
    import jax.numpy as jnp

    from ckpt.errors import UnshardedTargetWarning

    url = tmp_path / "c"
    ckpt.save(url, {"w": jnp.arange(12.0).reshape(3, 4), "step": 7, "host": np.arange(3)})
    abstract = jax.eval_shape(lambda: {"w": jnp.zeros((3, 4)), "step": jnp.int32(0),
                                       "host": jnp.zeros(3, jnp.int32)})
    with pytest.warns(UnshardedTargetWarning, match=r"3 target leaves have no sharding") as seen:
        out = ckpt.restore(url, abstract)
    assert len(seen) == 1
    assert seen[0].filename == __file__
    for name in ("w", "step", "host"):
        assert isinstance(out[name], jax.Array), name
        assert out[name].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    assert out["w"].tolist() == np.arange(12.0).reshape(3, 4).tolist()
    assert int(out["step"]) == 7
    # A numpy target stays numpy, and a sharded one needs no warning.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(ckpt.restore(url, {"host": np.zeros(3, np.int64)})["host"], np.ndarray)


def test_a_failed_save_surfaces_at_the_next_save_even_a_skipped_one(tmp_path):
    from ckpt.errors import SaveError
    from tests.helpers.faults import FaultyStore, fail_background

    failing = FaultyStore(tmp_path / "run", before=fail_background(OSError(5, "disk gone")))
    with ckpt.CheckpointManager(failing, save_every=2) as mgr:
        assert mgr.save(2, {"x": np.arange(10)}) is not None  # fails in the background
        with pytest.raises(SaveError, match="disk gone"):
            mgr.save(3, {"x": 3})  # not a step to save, but the failure is reported now
        assert mgr.save(5, {"x": 5}) is None
