"""Peers of the local tier (`ckpt._peers`): the placement of replicas, and the transport over
JAX's collectives between real processes (2 and 4, gloo on CPU)."""

import itertools

import pytest

from ckpt import _peers
from ckpt.errors import InvalidArgumentError
from tools.launch import launch


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
@pytest.mark.parametrize("n", [2, 4])
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
@pytest.mark.parametrize(("n", "mesh", "snapshot"), [(2, [2, 4], "auto"), (4, [4, 2], "auto"),
                                                     (2, [2, 4], "host")])
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
