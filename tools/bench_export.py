"""Safetensors export against the disk: ``python tools/bench_export.py [--size 2G]
[--memory-budget 256M] [--rounds 3] [--dir PATH]``.

Saves a checkpoint of float32 8192x8192 leaves (``--size`` in all), then per round: the
floor (read every chunk file of it and write the bytes into one file, fsync), and
`ckpt.export_safetensors` of it with ``--memory-budget`` in a fresh process (glibc's malloc
set as ``ckpt export`` sets it), which reports its time and how far its resident memory rose
above where it stood before the export.
Prints one line per round and the ratio export / floor (docs/safetensors.md, "Figures").
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import sys, time
import ckpt
def field(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = field("VmRSS")
t = time.perf_counter()
ckpt.export_safetensors(sys.argv[1], sys.argv[2], memory_budget=int(sys.argv[3]),
                        overwrite=True)
print(time.perf_counter() - t, field("VmHWM") - base)
"""


def _bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def _floor(src: str, dst: str) -> float:
    files = sorted(f for f in glob.glob(os.path.join(src, "attempt-*", "arrays", "**"),
                                        recursive=True) if os.path.isfile(f))
    started = time.perf_counter()
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for name in files:
            with open(name, "rb") as f:
                while block := f.read(64 << 20):
                    os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G")
    parser.add_argument("--memory-budget", default="256M")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to work (default: a temp folder)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import numpy as np

    import ckpt

    work = args.dir or tempfile.mkdtemp(prefix="bench-export-")
    src = os.path.join(work, "ckpt")
    leaf = 8192 * 8192 * 4
    count = max(1, _bytes(args.size) // leaf)
    rng = np.random.default_rng(0)
    shutil.rmtree(src, ignore_errors=True)
    ckpt.save(src, {"params": {f"layer{i}": {"kernel": rng.standard_normal(
        (8192, 8192), dtype=np.float32)} for i in range(count)}})
    budget = _bytes(args.memory_budget)
    print(f"{count * leaf / 2**30:.1f} GiB in {count} leaves, budget {budget >> 20} MiB")
    for rnd in range(args.rounds):
        floor = _floor(src, os.path.join(work, "floor.bin"))
        # glibc set as `ckpt export` sets it (the library leaves a user's process alone:
        # docs/performance.md): freed chunk buffers go back to the system at once.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), MALLOC_ARENA_MAX="2")
        run = subprocess.run([sys.executable, "-c", CHILD, src, os.path.join(work, "out"),
                              str(budget)], capture_output=True, text=True, check=True,
                             env=env)
        seconds, extra = run.stdout.split()
        print(f"round {rnd}: export {float(seconds):.2f} s, floor {floor:.2f} s "
              f"(ratio {float(seconds) / floor:.2f}), resident memory +{int(extra) >> 20} MiB")
    if args.dir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
