"""The benchmarks run and measure what docs/performance.md and docs/scaling.md say they do,
so that none rots between the runs that produce the documents' figures (the accelerator
path included: without a GPU it runs on one CPU device, every branch of it taken)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


def _run(tool, *args):
    run = subprocess.run([sys.executable, str(REPO / "tools" / tool), *args],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow  # a subprocess importing jax and orbax-checkpoint, 9 saves and restores
def test_the_compression_benchmark_measures_all_three_states():
    run = _run("bench_compression.py", "--size", "8M", "--rounds", "1")
    rows = [line.split() for line in run.stdout.splitlines()
            if line.split()[:1] in (["fresh"], ["trained"], ["mixed"])]
    assert [(r[0], r[1]) for r in rows] == [(s, w) for s in ("fresh", "trained", "mixed")
                                            for w in ("plain", "zstd", "orbax")], run.stdout
    ratio = {(r[0], r[1]): float(r[3]) for r in rows}
    assert ratio[("fresh", "plain")] == pytest.approx(1.0, abs=0.02)
    # Two thirds of a fresh state are zeros: compressed, it is well under half its size.
    assert ratio[("fresh", "zstd")] < 0.5, run.stdout
    assert ratio[("trained", "zstd")] < ratio[("trained", "plain")], run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("snapshot", ["device", "host"])
def test_the_accelerator_benchmark_runs_its_gpu_path_on_a_cpu(snapshot):
    run = _run("bench.py", "--device", "gpu", "--size", "16M", "--rounds", "1", "--snapshot",
               snapshot, "--memory-budget", "4M")
    out = run.stdout
    assert f"our snapshot {snapshot}, memory budget 4 MiB" in out, out
    assert "accelerator floors: on-device copy" in out and "the transfer" in out, out
    assert "device-to-host against the card's link: " in out, out
    host = next(line for line in out.splitlines() if line.startswith("save's chunk data"))
    # The save's own account of its host memory: within the budget (one shard may pass).
    assert float(host.split("at once: ")[1].split(" MiB")[0]) <= 4, host


@pytest.mark.slow  # two multi-process jobs
def test_the_process_benchmark_measures_each_phase_per_process_count():
    out = _run("bench_processes.py", "--procs", "1,2", "--mib", "8", "--rounds", "1",
               "--no-kill").stdout
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[0] for r in rows] == ["1", "2"], out
    assert all(len(r) == 11 and float(r[8]) == pytest.approx(1.0) for r in rows), out
    assert rows[0][9] == "0" and int(rows[1][9]) > 0, out  # coordination calls: none alone


@pytest.mark.slow  # a subprocess importing jax, three saves and six comparisons
def test_the_diff_benchmark_reads_only_what_differs():
    out = _run("bench_diff.py", "--size", "16M", "--rounds", "1").stdout
    rows = {line[:26].strip(): line[26:].split() for line in out.splitlines()
            if line.endswith("round 0")}
    assert set(rows) == {"equal, by checksum", "one element changed", "equal, every chunk",
                         "cold-read floor (files)"}, out
    assert float(rows["equal, by checksum"][0]) == 0.0, out
    assert 0 < float(rows["one element changed"][2].rstrip("%")) < 10, out
    assert rows["equal, every chunk"][2] == "100.00%", out


@pytest.mark.slow  # saves with both libraries, then a process per restore
def test_the_resharded_restore_benchmark_measures_floor_ours_and_orbax():
    out = _run("bench_reshard.py", "--size", "16M", "--rounds", "1").stdout
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 1 and all("floor" in r and "kept" in r and "ours" in r
                                    and "orbax" in r for r in rounds), out
    assert "of the cold-read floor (" in out.splitlines()[-1], out
    assert "of it into fresh memory), orbax at" in out.splitlines()[-1], out


@pytest.mark.slow  # a 4-process job and a moto server
def test_the_tier_benchmark_measures_replicas_and_a_replaced_host(tmp_path):
    out = tmp_path / "tiers.json"
    _run("bench_tiers.py", "--mib", "16", "--rounds", "1", "--processes", "4", "--out",
         str(out))
    report = json.loads(out.read_text())
    assert report["processes"] == 4
    for key in ("replica_blocked_s", "replica_local_commit_s", "replaced_root_s",
                "replaced_peer_s", "restore_local_s"):
        assert report["median"][key] > 0, report
    assert report["replaced_root_over_peer"] > 0
