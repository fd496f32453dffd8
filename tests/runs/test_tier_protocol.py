"""The local tier on the root's protocol (docs/tiers.md): copies serve only saves of the
run's history, removals go under claims, the LINEAGE record is compacted, the exit hook
waits for every tier, a full local disk degrades to root-only saves, and bad set-ups are
refused at construction. Real processes (`tools.launch`), real files, the S3 server the
suite runs; then a randomized sequence of saves, host moves, restarts, deletes, rewinds and
`ckpt gc`, checked after every operation."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from ckpt import _local, _tiers
from ckpt._housekeeping import Lineage, read_lineage, remove_steps
from ckpt.errors import AttemptRemovedError, CommitConflictError
from ckpt.storage import Op, open_store
from tests.children import mp_jobs, script
from tests.conftest import backend_url
from tests.helpers.faults import FaultyStore
from tests.helpers.saves import started
from tools.launch import launch, start


def _state(mesh, value):
    w = np.random.default_rng(value).standard_normal((16, 64)).astype(np.float32)
    return {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))), "id": value}


def _id(mgr, step, mesh):
    """The values a step holds (a whole state of one save, checked)."""
    restored = mgr.restore(step, target=_state(mesh, 0))
    w = np.random.default_rng(restored["id"]).standard_normal((16, 64)).astype(np.float32)
    assert np.asarray(restored["w"]).tobytes() == w.tobytes(), step  # whole, not mixed
    return restored["id"]


# -- which copies serve ---------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_copy_of_an_abandoned_branch_never_serves(request, tmp_path, backend):
    """Run 1 on hosts A saves step 5 to both tiers and 6, 7 on A's disks only; run 2 on
    hosts B resumes from 5 and commits its own step 6 to the root; run 3 back on A must
    serve the root's step 6, and never A's 6 or the 7 that descends from it."""
    root = backend_url(request, tmp_path, backend)
    a, b = str(tmp_path / "A-{process}"), str(tmp_path / "B-{process}")
    launch("tests.children.tier_jobs:save_values", 2,
           args=[root, a, [5, 6, 7], [5, 6, 7], [2, 4], 5])
    launch("tests.children.tier_jobs:save_values", 2, args=[root, b, [6], [106], [2, 4], 1])
    results = launch("tests.children.tier_jobs:check_values", 2,
                     args=[root, a, [2, 4], 5, {"5": 5, "6": 106}])
    for r in results:
        assert r == {"latest": 6, "steps": [5, 6]}, results
    # A's copies of the abandoned branch went at start-up; what is left serves.
    for p in (0, 1):
        assert sorted(os.listdir(a.replace("{process}", str(p)))) <= ["5", "6", "7"]


def test_a_local_step_newer_than_the_root_serves_only_if_it_descends(tmp_path, mesh24):
    """One process, two hosts' folders: a local-only step of host A is offered after a
    restart on A (it descends from the root's step), and no longer once host B committed
    another save of a step between."""
    root, a, b = str(tmp_path / "root"), str(tmp_path / "A"), str(tmp_path / "B")
    with ckpt.CheckpointManager(root, local_dir=a, local_keep=3, persist_every=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(mesh24, step))
    with ckpt.CheckpointManager(root, local_dir=a, local_keep=3, persist_every=2) as mgr:
        assert mgr.steps() == [1, 2, 3]
        assert _id(mgr, 3, mesh24) == 3
    with ckpt.CheckpointManager(root, local_dir=b, persist_every=1) as mgr:
        assert mgr.latest_step() == 2
        mgr.save(3, _state(mesh24, 103))
    with ckpt.CheckpointManager(root, local_dir=a, local_keep=3, persist_every=2) as mgr:
        assert mgr.steps() == [1, 2, 3]
        assert _id(mgr, 3, mesh24) == 103
        mgr.save(4, _state(mesh24, 4))  # local only, descends from the root's 3
    with ckpt.CheckpointManager(root, local_dir=a, local_keep=3, persist_every=2) as mgr:
        assert mgr.latest_step() == 4
        assert _id(mgr, 4, mesh24) == 4


# -- fencing --------------------------------------------------------------------------------

@pytest.mark.parametrize(("where", "backend"), [("claim", "local"), ("commit", "local"),
                                             ("claim", "s3")])
def test_a_process_paused_before_its_local_commit_never_commits_over_a_restart(
        request, tmp_path, where, backend):
    """A process stops (SIGSTOP) just before its local commit claim, or just before its
    local COMMIT; the restarted job cleans up and commits its own step 3; the old process
    then continues: it commits nothing, and step 3 is the restarted job's, whole."""
    root = backend_url(request, tmp_path, backend)
    local = str(tmp_path / "local-{process}")
    # Paused while the restarted job runs (longer on a loaded machine): a heartbeat shorter
    # than the pause makes JAX's coordination service give the paused job up.
    with start("tests.children.tier_jobs:save_and_stop", 1, args=[root, local, [2, 2], where],
               heartbeat_s=120) as job:
        job.wait_for_line(0, "PAUSED")
        steps = launch("tests.children.tier_jobs:save_values", 1,
                       args=[root, local, [3], [303], [2, 2], 2])
        assert steps == [[2, 3]]  # step 1 left the local tier (local_keep=2)
        job.kill(0, signal.SIGCONT)
        outcome = job.wait()[0]
    expected = {"claim": AttemptRemovedError, "commit": CommitConflictError}[where]
    assert outcome.startswith(expected.__name__), outcome
    results = launch("tests.children.tier_jobs:check_values", 1,
                     args=[root, local, [2, 2], 2, {"2": 2, "3": 303}])
    assert results == [{"latest": 3, "steps": [2, 3]}]
    names = sorted(os.listdir(os.path.join(local.replace("{process}", "0"), "3")))
    assert len([n for n in names if n.startswith("attempt-")]) == 1
    assert "COMMIT" in names


def test_a_second_manager_on_one_local_folder_never_lets_an_emptied_copy_commit(
        tmp_path, mesh24, monkeypatch):
    """Two writable managers on one local folder in one process: the second starts while
    the first is about to claim its copy of step 2 for commit and cleans that copy up; the
    first's save then fails, loudly, and nothing of step 2 is listed."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local")
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        mgr.save(1, _state(mesh24, 1))
    second: list[ckpt.CheckpointManager | None] = []

    def before(doing, key, args):
        if key.startswith("2/claims/") and not second:
            second.append(None)  # its own clean-up passes here too
            second[0] = ckpt.CheckpointManager(root, local_dir=local, persist_every=10)

    real = _local.local_store  # what _tiers calls, by the name it imported
    monkeypatch.setattr(_tiers, "local_store",
                        lambda path, p: FaultyStore(real(path, p), before=before))
    first = ckpt.CheckpointManager(root, local_dir=local, persist_every=10)
    with pytest.raises(AttemptRemovedError, match="claimed for removal"):
        started(first.save(2, _state(mesh24, 2))).wait()
    first.close()
    assert second[0] is not None  # opened by the claim of step 2
    second[0].close()
    monkeypatch.setattr(_tiers, "local_store", real)
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=10) as mgr:
        assert mgr.steps() == [1]
        assert _id(mgr, 1, mesh24) == 1


# -- exit -----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_script_returning_with_a_persisted_save_in_flight_commits_both_tiers(
        request, tmp_path, backend):
    """The script returns right after `save` (persist_every=1): the exit hook waits for the
    local commit and for the root commit it starts; nothing is said on stderr."""
    from ckpt._housekeeping import attempts

    root = backend_url(request, tmp_path, backend)
    local = str(tmp_path / "local-{process}")
    with start("tests.children.tier_jobs:exit_with_a_save_in_flight", 1,
               args=[root, local, [2, 2]]) as job:
        assert job.wait() == ["returned"]
        assert not [line for line in job.stderr[0] if line.startswith("ckpt:")], job.stderr
    assert os.path.exists(os.path.join(local.replace("{process}", "0"), "1", "COMMIT"))
    step = open_store(root).child("1")
    assert [a.state for a in attempts(step)] == ["committed"]
    mp_jobs.exact(ckpt.restore(step), 1)


# -- LINEAGE --------------------------------------------------------------------------------

def test_lineage_compacts_and_never_forgets_what_start_up_needs(tmp_path, mesh24):
    """Thousands of removals (what `ckpt gc --keep-last` of a long run records): the
    local-only step is still offered afterwards, the removed one never comes back, and the
    record stays small."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local")
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=3, persist_every=2) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(mesh24, step))
    remove_steps(open_store(root), [1, *range(10_000, 12_500)])
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=3, persist_every=2) as mgr:
        assert mgr.steps() == [2, 3]
        assert _id(mgr, 3, mesh24) == 3
    assert os.path.getsize(os.path.join(root, "LINEAGE")) < 64 * 1024
    # A rewind below those removals folds them away.
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=3, persist_every=2) as mgr:
        mgr.rewind(2)
        assert mgr.steps() == [2]
    lineage = read_lineage(open_store(root))
    assert lineage.deletes == {1: 1}
    assert [to for _, to in lineage.rewinds] == [2]


def test_lineage_record_rules():
    rec = Lineage(origin="o")
    rec = rec.add("delete", 5)                 # 1
    early = rec.mark
    rec = rec.add("rewind", 8).add("rewind", 3)  # 2, 3: the rewind to 3 covers the one to 8
    assert [to for _, to in rec.rewinds] == [3]
    assert rec.deletes == {}
    assert not rec.survives(early, 5)
    assert not rec.survives(early, 4)
    assert rec.survives(early, 3)
    assert rec.survives(rec.mark, 9)
    assert not rec.survives("other:1", 3)
    assert not rec.survives("o:99", 3)
    old = Lineage.from_json({"events": [["aa", "origin", 0], ["bb", "delete", 4],
                                        ["cc", "rewind", 2]]}, "x")
    assert old.survives("cc", 7)
    assert not old.survives("bb", 3)
    assert old.survives("aa", 1)
    assert Lineage.from_json(old.to_json(), "x") == old
    with pytest.raises(ckpt.CorruptCheckpointError, match="x is not a lineage record"):
        Lineage.from_json({"origin": "o", "seq": 1, "deletes": [[1, "a"]], "rewinds": []},
                          "x")


def test_retention_without_a_tier_records_what_it_removed(tmp_path, mesh24):
    """A root reopened with a local tier never offers copies of steps that a manager
    without one removed by retention."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local")
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=1) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(mesh24, step))
    with ckpt.CheckpointManager(root, keep_last=1) as mgr:
        mgr.save(3, _state(mesh24, 3))
    assert set(read_lineage(open_store(root)).deletes) == {1, 2}
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=1) as mgr:
        assert mgr.steps() == [3]
        assert _id(mgr, 3, mesh24) == 3


# -- a full local disk ----------------------------------------------------------------------

@pytest.mark.parametrize("persist_every", [1, 2])
def test_a_full_local_disk_degrades_to_root_only_saves(tmp_path, persist_every):
    """An 8 MiB local disk, copies of 3 MiB: every save commits; with every step persisted
    the oldest copy makes room before the new one is written, else (a local-only copy is
    never removed early) the steps go to the root alone, logged."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    root = str(tmp_path / "root")
    run = subprocess.run(["unshare", "-rm", sys.executable,
                          script("tier_full_disk_child"), str(mnt), root,
                          str(persist_every)], capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(out["outcomes"].values()) == {"ok"}, out
    assert out["steps"] == [1, 2, 3, 4, 5] and out["exact"], out
    if persist_every == 1:
        assert out["root"] == [1, 2, 3, 4, 5] and out["local"] == [4, 5], out
    else:
        assert out["root"] == [2, 3, 4, 5] and out["local"] == [1, 2], out
        assert any("is full" in w and "root alone" in w for w in out["warnings"]), out


# -- refused at construction ----------------------------------------------------------------

def test_a_local_folder_at_or_inside_the_root_is_refused(tmp_path):
    root = str(tmp_path / "root")
    for local in (root, os.path.join(root, "local")):
        with pytest.raises(ValueError, match="local_dir .* the persistent root"):
            ckpt.CheckpointManager(root, local_dir=local)


def test_processes_sharing_one_local_folder_are_refused_on_every_process(tmp_path):
    root, local = str(tmp_path / "root"), str(tmp_path / "shared")
    with start("tests.children.tier_jobs:save_values", 2, args=[root, local, [1], [1], [2, 4], 1]) \
            as job:
        job.wait(check=False)
        for p in (0, 1):
            assert any("share the local folder" in line and local in line
                       for line in job.stderr[p]), job.stderr[p][-5:]


def test_a_failed_constructor_gives_sigterm_back(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    root = str(tmp_path / "root")
    with pytest.raises(ValueError, match="local_dir .* is the persistent root"):
        ckpt.CheckpointManager(root, local_dir=root)
    assert signal.getsignal(signal.SIGTERM) is before


# -- randomized -----------------------------------------------------------------------------

class _Save:
    """One committed save in the model: its step, its values, the save it continued."""

    def __init__(self, step, value, parent):
        self.step, self.value, self.parent = step, value, parent

    def line(self):
        node, out = self, []
        while node is not None:
            out.append(node)
            node = node.parent
        return out


@pytest.mark.parametrize("seed", range(1, 41))
def test_randomized_runs_never_lose_or_mix_a_committed_step(tmp_path, mesh24, seed):
    """Saves, restarts, moves between two hosts' folders, a lost host folder, deletes,
    rewinds and `ckpt gc --keep-last`, in a random order. After every operation: every
    listed step restores exactly a save of that step on the line the newest step descends
    from, the root's newest step is on that line, and every step committed to the root and
    not removed since is listed and restores exactly what its save wrote."""
    from ckpt.cli import main as cli

    rng = random.Random(seed)
    root = str(tmp_path / "root")
    hosts = [str(tmp_path / "host-a"), str(tmp_path / "host-b")]
    host = 0
    saves: dict[int, _Save] = {}   # by value
    on_root: dict[int, _Save] = {}  # what the root holds and nothing removed since
    ids = iter(range(1, 10**6))
    log: list[tuple[str, int, list[int]]] = []

    def manager():
        return ckpt.CheckpointManager(root, local_dir=hosts[host], local_keep=2,
                                      persist_every=2)

    def check(mgr):
        steps, latest = mgr.steps(), mgr.latest_step()
        assert latest == (steps[-1] if steps else None), log
        if latest is None:
            assert not on_root, log
            return None
        head = saves[_id(mgr, latest, mesh24)]
        line = head.line()
        for step in steps:
            found = saves[_id(mgr, step, mesh24)]
            assert found.step == step and found in line, (log, step)
        for step, save in on_root.items():
            assert step in steps and _id(mgr, step, mesh24) == save.value, (log, step)
        if on_root:
            assert on_root[max(on_root)] in line, log
        return head

    mgr = manager()
    head = check(mgr)
    for _ in range(28):
        op = rng.choices(["save", "restart", "move", "lose", "delete", "rewind", "gc"],
                         [6, 1, 2, 1, 1, 1, 1])[0]
        steps = mgr.steps()
        log.append((op, host, steps))
        if op == "save":
            step = (steps[-1] if steps else 0) + rng.choice([1, 1, 2])
            save = _Save(step, next(ids), head)
            saves[save.value] = save
            handle = mgr.save(step, _state(mesh24, save.value))
            handle.wait()
            if handle.remote is not None:
                handle.remote.wait()
                on_root[step] = save
        elif op in ("restart", "move", "lose"):
            mgr.close()
            if op == "move":
                host = 1 - host
            if op == "lose":
                shutil.rmtree(hosts[host], ignore_errors=True)
            mgr = manager()
        elif op == "delete" and steps:
            step = rng.choice(steps)
            mgr.delete(step)
            on_root.pop(step, None)
        elif op == "rewind" and steps:
            step = rng.choice(steps)
            mgr.rewind(step)
            on_root = {s: v for s, v in on_root.items() if s <= step}
        elif op == "gc":
            mgr.close()
            assert cli(["gc", root, "--keep-last", "2"]) == 0
            on_root = {s: on_root[s] for s in sorted(on_root)[-2:]}
            mgr = manager()
        head = check(mgr)
    mgr.close()
    kinds = {op for op, _, _ in log}
    assert len(saves) >= 4 and "save" in kinds, log


# -- from an adversarial review ---------------------------------------------------------------

def test_copies_of_a_run_begun_on_an_empty_root_never_serve_over_another_runs_steps(
        tmp_path, mesh24):
    """Hosts A begin a run on an empty root and keep steps 5 and 6 locally; hosts B begin
    their own run on the empty root and commit steps up to 3; back on A, steps 5 and 6 do
    not descend from the root's history and are never offered."""
    root, a, b = str(tmp_path / "root"), str(tmp_path / "A"), str(tmp_path / "B")
    with ckpt.CheckpointManager(root, local_dir=a, persist_every=100) as mgr:
        for step in (5, 6):
            mgr.save(step, _state(mesh24, step))
    with ckpt.CheckpointManager(root, local_dir=b, persist_every=3) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, _state(mesh24, 100 + step))
    with ckpt.CheckpointManager(root, local_dir=a, persist_every=100) as mgr:
        assert mgr.steps() == [3]
        assert _id(mgr, 3, mesh24) == 103


def test_a_lineage_record_of_the_earlier_form_keeps_local_steps_across_restarts(
        tmp_path, mesh24):
    """A root whose LINEAGE an earlier release wrote (the event list): copies saved under it
    are still offered after restarts (its origin is the same at every reading)."""
    import msgpack

    root, local = str(tmp_path / "root"), str(tmp_path / "local")
    os.makedirs(root)
    with open(os.path.join(root, "LINEAGE"), "wb") as f:
        f.write(msgpack.packb({"events": [["aa11", "origin", 0], ["bb22", "delete", 9]]}))
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=100) as mgr:
        for step in (1, 2):
            mgr.save(step, _state(mesh24, step))
    for _ in range(2):
        with ckpt.CheckpointManager(root, local_dir=local, persist_every=100) as mgr:
            assert mgr.steps() == [1, 2]
            assert _id(mgr, 2, mesh24) == 2


def test_an_attempt_claimed_for_commit_that_never_committed_leaves_the_local_tier(
        tmp_path, mesh24):
    """A process killed between its local commit claim and its COMMIT leaves a whole copy
    claimed for commit: the next start-up removes it (the folder is this process's, its
    committer an earlier run's)."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local")
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=100) as mgr:
        mgr.save(1, _state(mesh24, 1))
        mgr.save(2, _state(mesh24, 2))
    os.remove(os.path.join(local, "2", "COMMIT"))  # the claim stays, says "commit"
    with ckpt.CheckpointManager(root, local_dir=local, persist_every=100) as mgr:
        assert mgr.steps() == [1]
    left = os.listdir(os.path.join(local, "2")) if os.path.isdir(os.path.join(local, "2")) \
        else []
    assert not [n for n in left if n.startswith("attempt-")], left


def test_every_failed_root_commit_is_raised_by_wait_once(tmp_path, mesh24):
    """Step 2's root commit fails, step 4's succeeds: `wait` raises step 2's failure (the
    next save did not, as processes may see a root commit end differently), once."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local")

    def before(doing, key, args):
        if doing == Op.WRITE and key.startswith("2/") and key.endswith("manifest.msgpack"):
            raise OSError(28, "No space left on device")

    with ckpt.CheckpointManager(FaultyStore(root, before=before), local_dir=local,
                                persist_every=2) as mgr:
        for step in (1, 2, 3, 4):
            mgr.save(step, _state(mesh24, step))
        with pytest.raises(ckpt.SaveError, match="No space left"):
            mgr.wait()
        mgr.wait()  # reported once
        assert mgr.steps() == [3, 4]
        assert _id(mgr, 4, mesh24) == 4
