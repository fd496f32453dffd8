"""Benchmark: the same checkpoint saved and restored on local disk, S3 and GCS servers.

    .venv/bin/python tools/bench_backends.py [--mib 256] [--rounds 3]
    .venv/bin/python tools/bench_backends.py --leaves 4000   # objects and requests per save

Starts moto (S3) and fake-gcs-server (GCS) on 127.0.0.1, then alternates the backends
round by round: save to commit and restore (same mesh) of a state of ``--mib`` MiB (8 float32
arrays on a (2, 4) mesh of 8 CPU devices, one process). Prints medians and each object
store's throughput as a ratio to local disk in the same run. The local servers hold objects
in memory and run on the same 2 cores, so the ratios measure the protocol path and the
servers, not a cloud's network.

``--leaves N`` instead saves N arrays of 32 KiB (`tools/bench.py --case many-leaves`) once
to each backend and reports the objects the checkpoint holds and, for S3 and GCS, the HTTP
requests of that save by method, counted by a proxy in front of each server.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--leaves", type=int, default=0,
                        help="count objects and requests of one save of this many leaves")
    args = parser.parse_args()
    if args.leaves:
        return count_requests(args.leaves)

    from tools.servers import gcs_server, s3_server

    with s3_server() as s3, gcs_server() as gcs, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(s3.env)
        os.environ.update(gcs.env)
        s3.create_bucket("bench")
        gcs.create_bucket("bench")
        import jax
        import numpy as np
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        import ckpt

        mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
        sh = NamedSharding(mesh, P("data", "model"))
        rows = args.mib * (1 << 20) // (8 * 4 * 4096)
        state = {f"w{i}": jax.device_put(
            np.random.default_rng(i).standard_normal((rows, 4096), np.float32), sh)
            for i in range(8)}
        roots = {"local": os.path.join(tmp, "ckpt"), "s3": "s3://bench/ckpt",
                 "gcs": "gs://bench/ckpt"}
        times: dict[str, dict[str, list[float]]] = {k: {"save": [], "restore": []}
                                                    for k in roots}
        for r in range(args.rounds):
            for name, root in roots.items():
                url = f"{root}/{r}"
                t0 = time.perf_counter()
                ckpt.save(url, state)
                times[name]["save"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                jax.block_until_ready(ckpt.restore(url, target=state))
                times[name]["restore"].append(time.perf_counter() - t0)
        print(f"state: {args.mib} MiB, 8 float32 arrays on a (2, 4) mesh, one process; "
              f"medians of {args.rounds} rounds")
        print(f"{'backend':8} {'save s':>8} {'MiB/s':>8} {'x local':>8} "
              f"{'restore s':>10} {'MiB/s':>8} {'x local':>8}")
        med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
        for name in roots:
            s, rs = med[name]["save"], med[name]["restore"]
            print(f"{name:8} {s:8.3f} {args.mib / s:8.0f} {med['local']['save'] / s:8.2f} "
                  f"{rs:10.3f} {args.mib / rs:8.0f} {med['local']['restore'] / rs:8.2f}")
    return 0


def count_requests(leaves: int) -> int:
    """Objects and requests of one save of ``leaves`` small arrays, per backend."""
    from tests.helpers.faultproxy import FaultProxy
    from tools.bench import make_many_leaves
    from tools.servers import gcs_server, s3_server

    with s3_server() as s3, gcs_server() as gcs, tempfile.TemporaryDirectory() as tmp, \
            FaultProxy(s3.endpoint) as s3_proxy, FaultProxy(gcs.endpoint) as gcs_proxy:
        os.environ.update(s3.env | {"AWS_ENDPOINT_URL": s3_proxy.endpoint})
        os.environ.update(gcs.env | {"STORAGE_EMULATOR_HOST": gcs_proxy.endpoint,
                                     "TENSORSTORE_GCS_HTTP_URL": gcs_proxy.endpoint})
        s3.create_bucket("bench")
        gcs.create_bucket("bench")
        import ckpt
        from ckpt.storage import open_store

        state = make_many_leaves(leaves)
        print(f"one save of {leaves} arrays of 32 KiB (half sharded 2x4, half replicated)")
        for name, url, proxy in (("local", os.path.join(tmp, "ckpt"), None),
                                 ("s3", "s3://bench/ckpt", s3_proxy),
                                 ("gcs", "gs://bench/ckpt", gcs_proxy)):
            if proxy is not None:
                proxy.counts.clear()
            t0 = time.perf_counter()
            ckpt.save(url, state)
            took = time.perf_counter() - t0
            requests = dict(proxy.counts) if proxy is not None else {}
            objects = len(open_store(url).list())
            shown = ", ".join(f"{k} {v}" for k, v in sorted(requests.items())) or "-"
            print(f"{name:6} {objects:6d} objects, {sum(requests.values()):6d} requests "
                  f"({shown}); {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
