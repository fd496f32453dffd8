"""Benchmark: the same state saved and restored by 1, 2 and 4 processes (8 CPU devices).

    .venv/bin/python tools/bench_processes.py [--mib 256] [--rounds 3] [--out DIR]

Every process of every job builds the same global state on a (2, 4) mesh of 8 devices in all
(8, 4 and 2 devices per process), saves it with `ckpt.save_async` and restores it. Reported
per process count, medians over rounds: time blocked in `save_async`, time to commit, restore
time, bytes each process wrote (from the host reports), and the requests each process made:
`Store` calls, chunk writes (TensorStore), coordination-service calls.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.launch import launch  # noqa: E402

STORE_METHODS = ("read", "write", "write_if_absent", "exists", "list", "list_children",
                 "delete", "delete_prefix")
COORD_METHODS = ("broadcast", "barrier", "publish", "wait_for", "collect")


def _count_calls(cls: Any, names: tuple[str, ...], counts: collections.Counter[str]) -> None:
    for name in names:
        real = getattr(cls, name)

        def wrapper(self: Any, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            counts[_name] += 1
            return _real(self, *a, **k)

        setattr(cls, name, wrapper)


def worker(url: str, mib: int, rounds: int) -> dict[str, Any]:
    """Runs in every process: save and restore ``rounds`` times; returns timings and counts."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt
    from ckpt import _coord
    from ckpt.storage import Store

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    n_arrays = 8
    rows = mib * (1 << 20) // (n_arrays * 4 * 4096)
    specs = [P("data", "model"), P("model", None), P(), P(None, "data")]
    state = {}
    for i in range(n_arrays):
        sh = NamedSharding(mesh, specs[i % len(specs)])
        state[f"w{i}"] = jax.make_array_from_callback(
            (rows, 4096), sh,
            lambda idx, i=i: np.random.default_rng(i).standard_normal((rows, 4096),
                                                                       np.float32)[idx])
    counts: collections.Counter[str] = collections.Counter()
    coord_counts: collections.Counter[str] = collections.Counter()
    _count_calls(Store, STORE_METHODS, counts)
    if jax.process_count() > 1:
        _count_calls(_coord.DistributedCoordinator, COORD_METHODS, coord_counts)
    out: dict[str, list[float]] = collections.defaultdict(list)
    for r in range(rounds):
        target = f"{url}/{r}"
        counts.clear()
        coord_counts.clear()
        t0 = time.perf_counter()
        handle = ckpt.save_async(target, state)
        out["blocked_s"].append(time.perf_counter() - t0)
        handle.wait()
        out["commit_s"].append(time.perf_counter() - t0)
        save_counts = dict(counts)
        save_coord = dict(coord_counts)
        t0 = time.perf_counter()
        restored = ckpt.restore(target, target=state)
        jax.block_until_ready(restored)
        out["restore_s"].append(time.perf_counter() - t0)
    return {"process": jax.process_index(), "times": dict(out), "store_calls": save_counts,
            "coord_calls": save_coord}


def _chunk_counts(url: str) -> dict[int, tuple[int, int]]:
    import msgpack

    out = {}
    for path in glob.glob(os.path.join(url, "0", "attempt-*", "hosts", "*.msgpack")):
        with open(path, "rb") as f:
            report = msgpack.unpackb(f.read())
        out[report["process"]] = (len(report["chunks"]), sum(r[2] for r in report["chunks"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for the checkpoints (temporary)")
    args = parser.parse_args()
    base = args.out or tempfile.mkdtemp(prefix="ckpt-bench-")
    table = []
    for nprocs in (1, 2, 4):
        url = os.path.join(base, f"p{nprocs}")
        shutil.rmtree(url, ignore_errors=True)
        results = launch("tools.bench_processes:worker", nprocs,
                         devices_per_process=8 // nprocs, args=[url, args.mib, args.rounds],
                         timeout=600)
        chunks = _chunk_counts(url)
        objects = len([p for p in glob.glob(os.path.join(url, "0", "**"), recursive=True)
                       if os.path.isfile(p)])
        med = {k: statistics.median(v) for k, v in results[0]["times"].items()}
        slowest = {k: max(statistics.median(r["times"][k]) for r in results) for k in med}
        written = [chunks.get(p, (0, 0))[1] for p in range(nprocs)]
        row = {"processes": nprocs, "blocked_s": slowest["blocked_s"],
               "commit_s": slowest["commit_s"], "restore_s": slowest["restore_s"],
               "bytes_per_process_MiB": [round(b / 2**20, 1) for b in written],
               "max_over_mean": max(written) / (sum(written) / nprocs),
               "chunk_writes_per_process": [chunks.get(p, (0, 0))[0] for p in range(nprocs)],
               "objects_in_checkpoint": objects,
               "store_calls_p0": results[0]["store_calls"],
               "store_calls_p1": results[1]["store_calls"] if nprocs > 1 else None,
               "coord_calls_p0": results[0]["coord_calls"],
               "coord_calls_p1": results[1]["coord_calls"] if nprocs > 1 else None}
        table.append(row)
        shutil.rmtree(url, ignore_errors=True)
    print(f"state: {args.mib} MiB in 8 float32 arrays on a (2, 4) mesh of 8 CPU devices; "
          f"medians of {args.rounds} rounds; times of the slowest process")
    print(f"{'procs':>5} {'blocked s':>9} {'commit s':>8} {'restore s':>9} "
          f"{'max/mean bytes':>14}  MiB written per process")
    for row in table:
        print(f"{row['processes']:>5} {row['blocked_s']:>9.3f} {row['commit_s']:>8.3f} "
              f"{row['restore_s']:>9.3f} {row['max_over_mean']:>14.3f}  "
              f"{row['bytes_per_process_MiB']}")
    print(json.dumps(table, indent=1))
    if args.out is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
