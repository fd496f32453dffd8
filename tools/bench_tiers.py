"""Benchmark: the local tier against the persistent root alone (S3 via moto), with and
without peer replicas, 2 or 4 processes.

    .venv/bin/python tools/bench_tiers.py [--mib 1024] [--rounds 2] [--processes 2] [--out FILE]

A job of ``--processes`` processes (8 CPU devices in all, one (2, 4) mesh) holds a state of
``--mib`` MiB (four arrays: split over the processes by rows, by rows and columns, by
columns, and one replicated on every device). Each round, every process:

1. saves it with a `CheckpointManager` on an S3 root alone: time blocked in `save`, time to
   the commit;
2. saves it with a manager on another S3 root with ``local_dir`` (a folder per process,
   every step persisted): time blocked, time to the local commit (`SaveHandle.wait`), time
   to the root's commit (``handle.remote.wait()``);
3. the same with ``local_replicas=1`` on a third root: time blocked (the exchange of
   replicas runs inside `save`), time to the local commit;
4. restores it with a new manager from the S3 root alone, then with a new manager with the
   local tier (restarting on the same hosts: every box from the local copy, nothing read of
   the root), both onto the same mesh, timed; every value checked;
5. a replaced host: process 1's local folder removed, then a new manager made and the step
   restored (timed together), once on the tier without replicas (process 1 reads the root)
   and once on the tier with replicas (process 1's copy rebuilt from its peer at start-up,
   then read locally).

Reported: per round the slower process's times, then medians, and the ratios. The local
copies are read back while they are in the page cache, as after a restart on the same hosts
that did not reboot (a RAM disk gives the same).
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
    import shutil

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
        replica_root = f"{s3_root}/replica-{r}"
        with ckpt.CheckpointManager(replica_root, local_dir=f"{local}/r{r}-{{process}}",
                                    local_replicas=1) as mgr:
            start = time.perf_counter()
            handle = mgr.save(1, state)
            t["replica_blocked_s"] = time.perf_counter() - start
            handle.wait()
            t["replica_local_commit_s"] = time.perf_counter() - start
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
        # A replaced host: process 1's folder is gone before the job comes back.
        for name, root, folder in (("replaced_root_s", tier_root, f"{local}/{r}-{{process}}"),
                                   ("replaced_peer_s", replica_root,
                                    f"{local}/r{r}-{{process}}")):
            if jax.process_index() == 1:
                shutil.rmtree(folder.replace("{process}", "1"))
            start = time.perf_counter()
            with ckpt.CheckpointManager(root, local_dir=folder) as mgr:
                restored = mgr.restore(1, target=like)
            t[name] = time.perf_counter() - start
            check(restored)
            del restored
        out.append(t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=2, choices=(2, 4))
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    from tools.servers import s3_server

    with s3_server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.create_bucket("bench")
        os.environ.update(s3.env)
        results = launch("tools.bench_tiers:worker", args.processes, timeout=3600,
                         devices_per_process=8 // args.processes,
                         args=["s3://bench/tiers", f"{tmp}/local", args.mib, args.rounds])
    rounds = [{k: max(p[r][k] for p in results) for k in results[0][r]}
              for r in range(args.rounds)]
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    report = {"mib": args.mib, "processes": args.processes, "rounds": rounds,
              "median": medians,
              "restore_root_over_local": medians["restore_root_s"] / medians["restore_local_s"],
              "commit_root_over_local": medians["root_commit_s"]
              / medians["tier_local_commit_s"],
              "replaced_root_over_peer": medians["replaced_root_s"]
              / medians["replaced_peer_s"],
              "local_commit_replicas_over_none": medians["replica_local_commit_s"]
              / medians["tier_local_commit_s"]}
    print(f"state {args.mib} MiB, {args.processes} processes, S3 (moto) root; slower "
          f"process, median of {args.rounds} rounds:")
    for k, v in medians.items():
        print(f"  {k:22s} {v:8.2f} s")
    print(f"  restore: root / local tier = {report['restore_root_over_local']:.1f}x; "
          f"commit: root / local tier = {report['commit_root_over_local']:.1f}x")
    print(f"  a replaced host's restart: root / peer = "
          f"{report['replaced_root_over_peer']:.1f}x; local commit with one replica / "
          f"without = {report['local_commit_replicas_over_none']:.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
