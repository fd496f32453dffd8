"""Peers of the local tier (`ckpt._peers`): the placement of replicas, and the transport over
JAX's collectives between real processes (2 and 4, gloo on CPU)."""

import itertools
import os
import shutil
import signal

import pytest

import ckpt
from ckpt import _peers
from ckpt.errors import InvalidArgumentError
from tools.launch import launch, start


def test_one_replica_goes_half_the_job_away():
    assert _peers.holders(4, 1) == [[2], [3], [0], [1]]
    assert _peers.holders(2, 1) == [[1], [0]]
    assert _peers.holders(1, 0) == [[]]
    assert _peers.held_for(_peers.holders(4, 1), 2) == [0]


@pytest.mark.parametrize(("n", "r"), [(n, r) for n in range(2, 13) for r in range(1, min(n, 4))])
def test_replicas_are_distinct_other_processes_and_balanced(n, r):
    holding = _peers.holders(n, r)
    for p, hs in enumerate(holding):
        assert len(hs) == r and len(set(hs)) == r and p not in hs
    # Each replica's placement is a rotation: every process holds exactly r others' copies.
    assert [len(_peers.held_for(holding, q)) for q in range(n)] == [r] * n


def test_failure_domains_never_hold_two_copies_of_one_process():
    # Two hosts of four processes each, numbered host by host and interleaved.
    for domains in (["a"] * 4 + ["b"] * 4, ["a", "b"] * 4, [0, 0, 1, 1, 2, 2, 3, 3]):
        for r in range(1, len(set(domains))):
            holding = _peers.holders(len(domains), r, domains)
            for p, hs in enumerate(holding):
                assert len(hs) == r
                assert len({domains[p], *(domains[h] for h in hs)}) == r + 1, (domains, p, hs)


def test_bad_placements_are_refused_by_name():
    with pytest.raises(InvalidArgumentError, match="needs more than 2 processes"):
        _peers.holders(2, 2)
    with pytest.raises(InvalidArgumentError, match="at least 3 failure domains"):
        _peers.holders(4, 2, ["a", "a", "b", "b"])
    with pytest.raises(InvalidArgumentError, match="one per process"):
        _peers.holders(4, 1, ["a", "b"])
    with pytest.raises(InvalidArgumentError, match="integer >= 0"):
        _peers.holders(4, -1)


def test_rounds_are_permutations_covering_every_transfer():
    transfers = [_peers.Transfer(s, d, 10) for s, d in itertools.permutations(range(4), 2)]
    rounds = _peers.rounds(transfers)
    assert sorted((t.src, t.dst) for r in rounds for t in r) == sorted(
        (t.src, t.dst) for t in transfers)
    for r in rounds:
        assert len({t.src for t in r}) == len(r) == len({t.dst for t in r})
    assert len(rounds) <= 2 * 3 - 1


@pytest.mark.slow
@pytest.mark.parametrize("n", [4])  # 2 processes: every local save test below
def test_bytes_reach_their_holders_exactly_in_waves(n):
    # Uneven sizes, one of them empty, in waves much smaller than a transfer.
    sizes = [100_003, 0, 7, 250_000][:n]
    for out in launch("tests.children.peer_jobs:to_holders", n, args=[1, sizes, 4096],
                      devices_per_process=2, timeout=240):
        assert out["wrong"] == [] and out["received"] == out["expected"], out


@pytest.mark.slow
def test_many_senders_to_one_receiver_and_damage_in_transit():
    outs = launch("tests.children.peer_jobs:many_to_one", 4, args=[70_000, 1 << 16],
                  devices_per_process=1, timeout=240)
    assert outs[0] == {"received": [1, 2, 3], "wrong": []}
    assert all(o == {"received": [], "wrong": []} for o in outs[1:])
    errors = launch("tests.children.peer_jobs:damaged_in_transit", 2, args=[5000],
                    devices_per_process=1, timeout=240)
    assert errors[1] is None  # the sender learns nothing of it
    assert errors[0] is not None and "sent by process 1 to process 0 arrived damaged" in \
        errors[0], errors


@pytest.mark.slow
@pytest.mark.parametrize(("n", "mesh", "snapshot"), [(4, [4, 2], "auto"), (2, [2, 4], "host")])
def test_a_local_save_places_each_process_shards_with_its_holder(tmp_path, n, mesh,
                                                                 snapshot):
    outs = launch("tests.children.peer_jobs:save_with_replicas", n,
                  args=[str(tmp_path / "root"), str(tmp_path / "local-{process}"), [1, 2],
                        mesh, 1, snapshot], devices_per_process=8 // n, timeout=300)
    holding = _peers.holders(n, 1)
    for p, out in enumerate(outs):
        sources = _peers.held_for(holding, p)
        assert out["replicas_of"] == sources, out
        assert out["wrong"] == [] and out["missing"] == [], out
        # Its own chunks and its replicas', named by the process whose devices held them.
        assert set(out["writers"]) == {str(q) for q in [p, *sources]}, out
        assert out["values"][p] == 1000 * p + 2
        assert all(out["values"][q] == 1000 * q + 2 for q in sources), out
        assert all(out["values"][q] is None for q in range(n) if q not in [p, *sources])


def _lose(local, *processes):
    """Replaced hosts: their local folders are gone."""
    for p in processes:
        shutil.rmtree(local.replace("{process}", str(p)))


@pytest.mark.slow
@pytest.mark.parametrize(("n", "mesh", "lost"), [(2, [2, 4], [1]), (4, [4, 2], [1, 2])])
def test_a_replaced_host_restores_the_newest_local_step_from_its_peer(tmp_path, n, mesh,
                                                                     lost):
    """Steps 1-3 saved with one replica each, step 2 persisted, step 3 local only; the lost
    processes' folders removed. The restart rebuilds their copies from their holders and
    restores step 3 exactly (each process's own per-process value included) without
    reading a chunk of the root."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", n,
           args=[root, local, [1, 2, 3], mesh, 2, True, 1], devices_per_process=8 // n,
           timeout=300)
    _lose(local, *lost)
    outs = launch("tests.children.tier_jobs:restore_latest", n, args=[root, local, mesh, 2],
                  devices_per_process=8 // n, timeout=300)
    for out in outs:
        assert out["latest"] == 3 and out["steps"] == [2, 3], out
        assert out["root"]["chunks"] == 0, out
    for p in lost:
        assert os.path.exists(os.path.join(local.replace("{process}", str(p)), "3", "COMMIT"))


@pytest.mark.slow
def test_losing_a_process_and_its_replica_holder_falls_back_to_the_root(tmp_path):
    """Processes 1 and 3 of four hold each other's replica: losing both loses step 3 (local
    only), which is no longer offered; the newest step the root holds is restored."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 4,
           args=[root, local, [1, 2, 3], [4, 2], 2, True, 1], devices_per_process=2,
           timeout=300)
    _lose(local, 1, 3)
    outs = launch("tests.children.tier_jobs:restore_latest", 4, args=[root, local, [4, 2], 2],
                  devices_per_process=2, timeout=300)
    for out in outs:
        assert out["latest"] == 2 and 3 not in out["steps"], out


@pytest.mark.slow
def test_a_kill_during_the_exchange_of_replicas_commits_nothing(tmp_path):
    """Process 1 SIGKILLed inside step 3's exchange (the job then restarted whole): step 3
    is on no tier, every tier is consistent, and the restart restores step 2 exactly."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    with start("tests.children.peer_jobs:save_and_die_replicating", 2,
               args=[root, local, [2, 4], 1], heartbeat_s=5) as job:
        job.wait_for_line(1, "SAVING")
        job.procs[1].wait(timeout=120)
        assert job.procs[1].returncode == -signal.SIGKILL, job.stderr[1][-5:]
        job.kill_all()
    for out in launch("tests.children.tier_jobs:restore_latest", 2,
                      args=[root, local, [2, 4], 2], timeout=300):
        assert out["latest"] == 2 and out["steps"] == [1, 2], out
    for p in (0, 1):
        folder = os.path.join(local.replace("{process}", str(p)), "3")
        assert not os.path.exists(os.path.join(folder, "COMMIT"))


@pytest.mark.slow
def test_a_rebuild_killed_midway_is_finished_by_the_next_start(tmp_path):
    """Process 1's folder lost; the restart that rebuilds it is killed midway (process 1
    dies after writing objects, before its COMMIT); the next restart rebuilds over that
    debris and restores step 3 from the local tier."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 2,
           args=[root, local, [1, 2, 3], [2, 4], 2, True, 1], timeout=300)
    _lose(local, 1)
    with start("tests.children.peer_jobs:rebuild_and_die", 2, args=[root, local, [2, 4]],
               heartbeat_s=5) as job:
        job.wait_for_line(1, "STARTING")
        job.procs[1].wait(timeout=120)
        assert job.procs[1].returncode == -signal.SIGKILL, job.stderr[1][-5:]
        job.kill_all()
    # Killed while rebuilding the first of its two steps: its objects there, no COMMIT.
    lost = local.replace("{process}", "1")
    assert os.listdir(os.path.join(lost, "2")) and not any(
        os.path.exists(os.path.join(lost, s, "COMMIT")) for s in ("2", "3"))
    for out in launch("tests.children.tier_jobs:restore_latest", 2,
                      args=[root, local, [2, 4], 2], timeout=300):
        assert out["latest"] == 3 and out["root"]["chunks"] == 0, out


@pytest.mark.slow
def test_a_failing_writer_stops_the_exchange_on_every_process(tmp_path):
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    outs = launch("tests.children.peer_jobs:failing_writes_during_the_exchange", 2,
                  args=[root, local, [2, 4]], timeout=240)
    for out in outs:
        assert out["error"] is not None and out["steps"] == [1, 2], outs


@pytest.mark.slow
def test_two_replicas_survive_two_lost_hosts(tmp_path):
    """Four processes, two replicas each (chunks several sources hold arrive from each):
    processes 2 and 3 lost together; process 0 holds both replicas and rebuilds both."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 4,
           args=[root, local, [1, 2, 3], [4, 2], 2, True, 2], devices_per_process=2,
           timeout=300)
    _lose(local, 2, 3)
    for out in launch("tests.children.tier_jobs:restore_latest", 4,
                      args=[root, local, [4, 2], 2], devices_per_process=2, timeout=300):
        assert out["latest"] == 3 and out["root"]["chunks"] == 0, out


def test_replicas_without_a_local_tier_are_refused_by_name(tmp_path):
    with pytest.raises(InvalidArgumentError, match="local_replicas and local_domains need "
                                                   "local_dir"):
        ckpt.CheckpointManager(str(tmp_path / "root"), local_replicas=1)


@pytest.mark.slow
def test_processes_given_other_placements_are_refused_on_every_process(tmp_path):
    outs = launch("tests.children.peer_jobs:start_with_replicas", 2,
                  args=[str(tmp_path / "root"), str(tmp_path / "local-{process}"), [1, 0]],
                  devices_per_process=4, timeout=240)
    for out in outs:
        assert out is not None and "processes [1] were given other local_replicas" in out, outs


@pytest.mark.slow
def test_part_of_the_original_save_is_never_rebuilt_over(tmp_path):
    """Process 1's copy of step 3 lost only its COMMIT (its chunks of that save are still
    there: a process of that run could still be finishing it): the restart does not rebuild
    over them; step 3 (local only) is not offered and the root's step 2 is the latest."""
    root, local = str(tmp_path / "root"), str(tmp_path / "local-{process}")
    launch("tests.children.tier_jobs:save_steps", 2,
           args=[root, local, [1, 2, 3], [2, 4], 2, True, 1], timeout=300)
    os.remove(os.path.join(local.replace("{process}", "1"), "3", "COMMIT"))
    for out in launch("tests.children.tier_jobs:restore_latest", 2,
                      args=[root, local, [2, 4], 2], timeout=300):
        assert out["latest"] == 2 and 3 not in out["steps"], out
