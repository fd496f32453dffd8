"""Benchmark: the local tier against the persistent root alone (S3 via moto), 2 processes.

    .venv/bin/python tools/bench_tiers.py [--mib 1024] [--rounds 2] [--out FILE]

A job of 2 processes (4 CPU devices each, one (2, 4) mesh) holds a state of ``--mib`` MiB
(four arrays: split over both processes by rows, by rows and columns, by columns of
devices within a process, and one replicated on every device). Each round, every process:

1. saves it with a `CheckpointManager` on an S3 root alone: time blocked in `save`, time to
   the commit;
2. saves it with a manager on another S3 root with ``local_dir`` (a folder per process,
   every step persisted): time blocked, time to the local commit (`SaveHandle.wait`), time
   to the root's commit (``handle.remote.wait()``);
3. restores it with a new manager from the S3 root alone, then with a new manager with the
   local tier (restarting on the same hosts: every box from the local copy, nothing read of
   the root), both onto the same mesh, timed; every value checked.

Reported: per round the slower process's times, then medians, and the ratio of restore
from the root to restore from the local tier. The local copies are read back while they
are in the page cache, as after a restart on the same hosts that did not reboot (a RAM
disk gives the same); a host that lost its disk reads the root instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.launch import launch  # noqa: E402


def worker(s3_root: str, local: str, mib: int, rounds: int) -> list[dict[str, float]]:
    """Runs in each process of the job: ``rounds`` rounds of the module docstring."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt

    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    specs = [P("data", None), P("data", "model"), P(None, "model"), P()]
    rows = mib * (1 << 20) // (len(specs) * 4 * 4096)
    state = {}
    for i, spec in enumerate(specs):
        host = np.random.default_rng(i).standard_normal((rows, 4096), np.float32)
        state[f"w{i}"] = jax.make_array_from_callback(
            host.shape, NamedSharding(mesh, spec), lambda idx, h=host: h[idx])

    def check(restored: dict[str, Any]) -> None:
        for k, v in state.items():
            for got, want in zip(restored[k].addressable_shards, v.addressable_shards, strict=True):
                assert np.array_equal(np.asarray(got.data), np.asarray(want.data)), k

    out = []
    for r in range(rounds):
        t: dict[str, float] = {}
        plain_root, tier_root = f"{s3_root}/plain-{r}", f"{s3_root}/tier-{r}"
        with ckpt.CheckpointManager(plain_root) as mgr:
            start = time.perf_counter()
            handle = mgr.save(1, state)
            t["root_blocked_s"] = time.perf_counter() - start
            handle.wait()
            t["root_commit_s"] = time.perf_counter() - start
        with ckpt.CheckpointManager(tier_root, local_dir=f"{local}/{r}-{{process}}") as mgr:
            start = time.perf_counter()
            handle = mgr.save(1, state)
            t["tier_blocked_s"] = time.perf_counter() - start
            handle.wait()
            t["tier_local_commit_s"] = time.perf_counter() - start
            assert handle.remote is not None
            handle.remote.wait()
            t["tier_root_commit_s"] = time.perf_counter() - start
        like = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                for k, v in state.items()}
        with ckpt.CheckpointManager(plain_root, read_only=True) as mgr:
            start = time.perf_counter()
            restored = mgr.restore(1, target=like)
            t["restore_root_s"] = time.perf_counter() - start
        check(restored)
        del restored
        with ckpt.CheckpointManager(tier_root, local_dir=f"{local}/{r}-{{process}}",
                                    read_only=True) as mgr:
            start = time.perf_counter()
            restored = mgr.restore(1, target=like)
            t["restore_local_s"] = time.perf_counter() - start
        check(restored)
        del restored
        out.append(t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    from tools.servers import s3_server

    with s3_server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.create_bucket("bench")
        os.environ.update(s3.env)
        results = launch("tools.bench_tiers:worker", 2, timeout=3600,
                         args=["s3://bench/tiers", f"{tmp}/local", args.mib, args.rounds])
    rounds = [{k: max(p[r][k] for p in results) for k in results[0][r]}
              for r in range(args.rounds)]
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    report = {"mib": args.mib, "processes": 2, "rounds": rounds, "median": medians,
              "restore_root_over_local": medians["restore_root_s"] / medians["restore_local_s"],
              "commit_root_over_local": medians["root_commit_s"]
              / medians["tier_local_commit_s"]}
    print(f"state {args.mib} MiB, 2 processes, S3 (moto) root; slower process, median of "
          f"{args.rounds} rounds:")
    for k, v in medians.items():
        print(f"  {k:22s} {v:8.2f} s")
    print(f"  restore: root / local tier = {report['restore_root_over_local']:.1f}x; "
          f"commit: root / local tier = {report['commit_root_over_local']:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
