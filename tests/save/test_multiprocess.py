"""Real multi-process jobs (2 and 4 processes x 4 CPU devices, `jax.distributed`)."""

import glob
import os
import random
import shutil
import signal
import threading

import numpy as np
import pytest

import ckpt
from ckpt._format import decode_host_report
from tests.children import mp_jobs
from tests.conftest import make_mesh
from tools.launch import launch, start


@pytest.fixture(scope="module")
def saved4(tmp_path_factory):
    """A checkpoint saved by 4 processes on a (4, 4) mesh."""
    url = str(tmp_path_factory.mktemp("mp") / "four")
    assert launch("tests.children.mp_jobs:save", 4, args=[url, 3, [4, 4]]) == [0, 1, 2, 3]
    return url


def _report_bytes(url, leaves=None):
    per_process: dict[int, int] = {}
    seen: set[tuple[str, int]] = set()
    for path in glob.glob(os.path.join(url, "attempt-*", "hosts", "*.msgpack")):
        with open(path, "rb") as f:
            report = decode_host_report(f.read(), path)
            process, rows = report.process, report.chunks
        for name, flat, nbytes, _ in rows:
            assert (name, flat) not in seen, f"chunk {flat} of {name} written twice"
            seen.add((name, flat))
            if leaves is None or name in leaves:
                per_process[process] = per_process.get(process, 0) + nbytes
    return per_process, seen


def test_four_processes_write_each_chunk_once_balanced(saved4):
    info = ckpt.metadata(saved4)
    assert info.process_count == 4
    per_process, seen = _report_bytes(saved4)
    expected = {(leaf.name, i) for leaf in ckpt._reader.open_checkpoint(
        ckpt.storage.open_store(saved4))[1].leaves if leaf.kind == "array"
        for i in range(len(leaf.writers))}
    assert seen == expected
    mean = sum(per_process.values()) / 4
    assert len(per_process) == 4 and max(per_process.values()) <= 1.1 * mean, per_process
    # The replicated leaves alone are spread too, not all written by process 0.
    replicated, _ = _report_bytes(saved4, leaves={"r", "v"})
    mean = sum(replicated.values()) / 4
    assert len(replicated) == 4 and max(replicated.values()) <= 1.1 * mean, replicated


@pytest.mark.parametrize(("nprocs", "mesh"), [(4, [2, 8]), (2, [2, 4]), (2, [4, 2]), (1, [2, 2])])
def test_restore_on_other_process_counts_reads_only_needed_bytes(saved4, nprocs, mesh):
    results = launch("tests.children.mp_jobs:restore_on", nprocs, args=[saved4, 3, mesh])
    total = sum(v.nbytes for k, v in mp_jobs.host_tree(3).items() if k in mp_jobs.SPECS)
    for r in results:
        # Target shards here are unions of saved chunks, so nothing beyond them is read.
        assert r["read"] == r["needed"], r
        if nprocs > 1:
            assert r["read"] < total
    assert sum(r["read"] for r in results) >= total


def test_a_checkpoint_of_one_process_restores_on_two(tmp_path):
    """One process saved it, each small array as one chunk gathered from its shards: two
    processes restore it, each reading the chunks under its shards and placing only the
    part of each chunk its devices hold."""
    path = str(tmp_path / "one")
    ckpt.save(path, mp_jobs.device_tree(5, (2, 4)))
    layout = {leaf.name: leaf for leaf in ckpt.metadata(path).leaves}
    assert layout["pr"].chunk_shape == layout["pr"].shape  # 256 KiB: one chunk
    assert layout["v"].chunk_shape != layout["v"].shape    # 2 MiB: per shard
    for r in launch("tests.children.mp_jobs:restore_on", 2, args=[path, 5, [2, 4]]):
        assert r["needed"] <= r["read"] < 2 * r["needed"], r


def test_restore_as_numpy_in_one_process(saved4):
    out = ckpt.restore(saved4)
    for k, v in mp_jobs.host_tree(3).items():
        if k == "step":
            assert out[k] == 3
        else:
            assert isinstance(out[k], np.ndarray)
            assert out[k].tobytes() == v.tobytes()
    # and onto this process's 8 devices with the saved specs
    mp_jobs.exact(ckpt.restore(saved4, mesh=make_mesh((2, 4))), 3)


@pytest.mark.parametrize(("how", "leaf"), [("numpy", "loader"), ("value", "position"),
                                       ("extra", "extra")])
def test_processes_that_save_different_trees_fail_naming_the_leaf(tmp_path, how, leaf):
    url = str(tmp_path / "d")
    results = launch("tests.children.mp_jobs:diverge", 2, args=[url, how])
    for r in results:
        assert r is not None and leaf in r and "processes [1]" in r, r
    assert not os.path.exists(os.path.join(url, "COMMIT"))


def test_failing_process_fails_the_save_everywhere_naming_it(tmp_path):
    url = str(tmp_path / "c")
    results = launch("tests.children.mp_jobs:fail_one", 2, args=[url, 1])
    for r in results:
        assert r is not None
        assert "process 1" in r
        assert "No space left" in r
    assert not os.path.exists(os.path.join(url, "COMMIT"))


def test_hung_process_times_out_naming_it(tmp_path):
    url = str(tmp_path / "c")
    results = launch("tests.children.mp_jobs:hang_one", 2, args=[url, 3, 1], timeout=120)
    r = results[0]
    assert r["type"] == "CoordinationError" and "[1]" in r["error"], r
    assert r["after"] < 3 * 3, r
    late = results[1]  # the hung process arrives after process 0 gave up: it says so
    assert late["type"] == "CoordinationError" and "process 1 reached" in late["error"] \
        and "stopped waiting" in late["error"], late
    assert not os.path.exists(os.path.join(url, "COMMIT"))


def test_a_commit_slower_than_the_timeout_is_never_reported_as_committed(tmp_path):
    url = str(tmp_path / "slow")
    p0, p1 = launch("tests.children.mp_jobs:slow_commit", 2, args=[url, 3, "claim"], timeout=180)
    assert p0["type"] == "DeadlineExceededError" and "timeout_s=3" in p0["error"], p0
    # Process 1 gave up first: it cannot know, and says so; COMMIT decides.
    assert p1["type"] == "CommitOutcomeUnknownError" and "COMMIT decides" in p1["error"], p1
    assert not os.path.exists(os.path.join(url, "COMMIT"))


def test_a_commit_create_past_the_deadline_is_finished_never_abandoned(tmp_path):
    url = str(tmp_path / "slow")
    p0, p1 = launch("tests.children.mp_jobs:slow_commit", 2, args=[url, 3, "commit"], timeout=180)
    assert p0 == {"error": None}, p0
    assert p1["type"] == "CommitOutcomeUnknownError" and "COMMIT decides" in p1["error"], p1
    assert os.path.exists(os.path.join(url, "COMMIT"))  # and COMMIT did decide: committed
    mp_jobs.exact(ckpt.restore(url, mesh=make_mesh((2, 4))), 0)


def test_a_multi_process_restore_never_mixes_two_checkpoints(tmp_path):
    url = str(tmp_path / "ow")
    ckpt.save(url, {"w": np.full(50_000, 1.0, np.float32)})
    p0, p1 = launch("tests.children.mp_jobs:restore_while_overwritten", 2, args=[url])
    assert p0["type"] == "CheckpointNotFoundError" and "overwritten" in p0["error"], p0
    assert p1["error"] is not None or p1["w"] == 1.0, p1  # never the new one silently


def test_save_follows_the_schedule_on_every_process_alike(tmp_path):
    results = launch("tests.children.mp_jobs:save_by_schedule", 2, args=[str(tmp_path / "r")])
    for r in results:
        assert r == {"saved": [False, False, True, False, False, True], "forced": True,
                     "steps": [3, 6, 7]}, r


def test_wall_clock_policy_keeps_few_coordination_keys(tmp_path):
    results = launch("tests.children.mp_jobs:policy_keys", 2, args=[str(tmp_path / "r"), 300])
    for r in results:
        assert r == {"answers": [False], "left": 0}, r


# -- crashes -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """Steps 0 and 1, committed, as every crash case's starting point."""
    root = tmp_path_factory.mktemp("crash") / "root"
    with ckpt.CheckpointManager(root, keep_last=None) as mgr:
        for step in (0, 1):
            mgr.save(step, mp_jobs.device_tree(step, (2, 4)))
    return root


POINTS = ["hosts/0.msgpack", "hosts/1.msgpack", "manifest.msgpack", "before_commit",
          "after_commit"]
CASES = [(0, p) for p in POINTS if p != "hosts/1.msgpack"] + [(1, "hosts/1.msgpack")] + \
    [(seed % 2, f"parent:{seed}") for seed in range(16)]


def _debris_free(root, committed):
    """Each committed step holds its attempt, and nothing else but attempts ``claimed`` for
    a commit: a committer killed between its claim and COMMIT leaves one, which no cleaner
    can tell from a paused committer (docs/protocol.md, "Failure analysis")."""
    from ckpt._housekeeping import attempts
    from ckpt.storage import open_store

    for step in os.listdir(root):
        states = sorted(a.state for a in attempts(open_store(os.path.join(root, step))))
        assert states.count("committed") == (1 if int(step) in committed else 0), (step, states)
        assert set(states) <= {"committed", "claimed"}, (step, states)


@pytest.mark.parametrize(("victim", "point"), CASES, ids=[f"p{v}-{p}" for v, p in CASES])
def test_sigkill_any_process_then_restart_whole(template, tmp_path, victim, point):
    root = str(tmp_path / "root")
    shutil.copytree(template, root)
    mode = "parent" if point.startswith("parent") else point
    with start("tests.children.mp_jobs:save_then_kill", 2, args=[root, 2, [2, 4], victim, mode],
               heartbeat_s=5) as job:
        job.wait_for_line(victim, "SAVING")
        if mode == "parent":
            rng = random.Random(int(point.split(":")[1]))
            # The moment of the fault (a save takes ~0.1 s).
            threading.Event().wait(rng.uniform(0.0, 0.08))
            job.kill(victim)
            threading.Event().wait(rng.uniform(0.0, 0.05))  # the others run on a moment
        else:
            job.procs[victim].wait(timeout=120)
            assert job.procs[victim].returncode == -signal.SIGKILL, job.stderr[victim][-5:]
        job.kill_all()  # the scheduler restarts the job whole
    before = ckpt.CheckpointManager(root, keep_last=None)
    interrupted_committed = 2 in before.steps()
    if mode in ("after_commit",):
        assert interrupted_committed
    if mode in ("hosts/0.msgpack", "hosts/1.msgpack", "manifest.msgpack", "before_commit"):
        assert not interrupted_committed
    before.close()
    results = launch("tests.children.mp_jobs:resume", 2, args=[root, [4, 2], 2])
    assert results[0]["steps"][:2] == [0, 1]
    assert results[0]["latest"] == (2 if interrupted_committed else 1)
    after = ckpt.CheckpointManager(root, keep_last=None)
    after.close()
    assert after.steps() == [0, 1, 2]
    mp_jobs.exact(after.restore(2), 2)
    _debris_free(root, {0, 1, 2})


def test_zombie_writer_cannot_change_the_new_commit(template, tmp_path):
    """Process 1 of a job stops itself mid-save (its chunks written, its host report not),
    process 0 dies, and a restarted job commits step 2 with other values. Woken, the zombie
    ends on its own (JAX's coordination client terminates a task whose leader is gone; a
    write it makes first can only land in its own, removed attempt), and not one byte of
    the new commit changes."""
    root = str(tmp_path / "root")
    shutil.copytree(template, root)
    with start("tests.children.mp_jobs:save_then_kill", 2, args=[root, 2, [2, 4], 1,
                                                         "stop_before_report"],
               heartbeat_s=60) as old:
        old.wait_for_line(1, "ZOMBIE")
        key = next(x for x in old.lines[1] if x.startswith("ZOMBIE")).split()[1]
        zombie_attempt = key.split("/")[1]
        _wait_until_stopped(old.procs[1].pid)
        old.kill(0)
        old.procs[0].wait()
        # The restarted job commits step 2 with other values while the zombie is frozen.
        launch("tests.children.mp_jobs:resume", 2, args=[root, [2, 4], 2, 77])
        committed = _files(os.path.join(root, "2"), skip=zombie_attempt)
        assert "COMMIT" in committed
        assert len(committed) > 3
        old.kill(1, signal.SIGCONT)  # the zombie wakes and carries on
        old.procs[1].wait(timeout=120)  # it ends, on its own
        assert old.procs[1].returncode != 0, old.lines[1][-20:]
    assert _files(os.path.join(root, "2"), skip=zombie_attempt) == committed
    mp_jobs.exact(ckpt.restore(os.path.join(root, "2")), 77)
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    mgr.close()
    _debris_free(root, {0, 1, 2})


def _files(folder, skip):
    """Every file under ``folder`` (but under ``skip``) and its bytes."""
    out = {}
    for path in glob.glob(os.path.join(folder, "**"), recursive=True):
        rel = os.path.relpath(path, folder)
        if os.path.isfile(path) and rel.split(os.sep)[0] != skip:
            with open(path, "rb") as f:
                out[rel] = f.read()
    return out


def _wait_until_stopped(pid, timeout=60):
    """Waits until process ``pid`` is stopped (state T in /proc), with a deadline."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return
        threading.Event().wait(0.01)  # polling the condition, not waiting it out
    raise AssertionError(f"process {pid} never stopped")


@pytest.mark.parametrize("backend", ["local", "s3", "gcs"])
def test_each_process_reads_only_its_byte_ranges_of_safetensors(request, tmp_path, backend):
    """Two processes restore a safetensors file onto one 2x4 mesh: each reads exactly its
    half of a tensor split by rows and of one split by columns (16 KiB runs, 16 KiB
    holes: each run is its own range), and all of a replicated one; on local disk, S3 and
    GCS alike."""
    from safetensors.numpy import save_file

    from ckpt.storage import open_store
    from tests.conftest import backend_url

    rng = np.random.default_rng(0)
    tensors = {"w": rng.standard_normal((512, 256)).astype(np.float32),   # rows by process
               "v": rng.standard_normal((128, 8192)).astype(np.float32),  # columns
               "r": rng.standard_normal((64, 64)).astype(np.float32)}     # replicated
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    if backend != "local":
        folder = backend_url(request, tmp_path, backend)
        with open(path, "rb") as f:
            open_store(folder).write("model.safetensors", f.read())
        path = f"{folder}/model.safetensors"
    results = launch("tests.children.mp_jobs:restore_safetensors", 2, args=[path])
    for r in results:
        assert r["needed"] == (tensors["w"].nbytes + tensors["v"].nbytes) // 2 \
            + tensors["r"].nbytes
        assert r["read"] == r["needed"], r


def test_processes_restoring_different_checkpoints_all_fail_naming_each(tmp_path):
    """Config drift: process 0 restores step 1 and process 1 step 2 (or another dtype)
    into the same global arrays. Every process fails, naming what each asked for, instead of
    returning arrays holding shards of two states; then a restore they agree on works."""
    results = launch("tests.children.mp_jobs:mixed_restores", 2,
                     args=[str(tmp_path / "run"), [2, 4]])
    for steps, target in results:
        assert "process 0: step 1" in steps and "process 1: step 2" in steps, steps
        assert "process 0: step 2" in target
        assert "different steps or targets" in target
