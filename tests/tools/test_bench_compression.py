"""tools/bench_compression.py runs, and measures what the README says it does."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow  # a subprocess importing jax and orbax-checkpoint, 9 saves and restores
def test_the_compression_benchmark_measures_all_three_states():
    run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_compression.py"),
                          "--size", "8M", "--rounds", "1"], capture_output=True, text=True,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()
            if line.split()[:1] in (["fresh"], ["trained"], ["mixed"])]
    assert [(r[0], r[1]) for r in rows] == [(s, w) for s in ("fresh", "trained", "mixed")
                                            for w in ("plain", "zstd", "orbax")], run.stdout
    ratio = {(r[0], r[1]): float(r[3]) for r in rows}
    assert ratio[("fresh", "plain")] == pytest.approx(1.0, abs=0.02)
    # Two thirds of a fresh state are zeros: compressed, it is well under half its size.
    assert ratio[("fresh", "zstd")] < 0.5, run.stdout
    assert ratio[("trained", "zstd")] < ratio[("trained", "plain")], run.stdout
