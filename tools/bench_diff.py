"""What `ckpt diff` reads and how long it takes, against the raw disk.

Saves the benchmark's training state (`tools/bench.py`'s, on the 2x4 mesh) twice, as two
separate saves of one state, and once more with one element of one array changed, then
compares: the two equal saves (by checksum: nothing should be read), the changed one (only
the chunk that differs, on both sides), and the equal pair with ``by_checksum=False`` (every
chunk of both, cold cache where the page cache can be dropped), beside the cold-read floor
(reading the same files whole). Prints one row per comparison: bytes read, of all, and
seconds.

    .venv/bin/python tools/bench_diff.py --size 1G --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _files(folder: str) -> list[str]:
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


def _read_all(paths: list[str]) -> None:
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="state size, e.g. 64M, 1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    import jax
    import numpy as np
    from jax.sharding import NamedSharding

    import ckpt
    from tools.bench import drop_caches, make_state, size_arg

    total = size_arg(args.size)

    state = make_state(total)
    base = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-diff-")
    a, b, c = (os.path.join(base, name) for name in ("a", "b", "changed"))
    try:
        ckpt.save(a, state)
        ckpt.save(b, state)
        dense = state["params"]["dense0"]
        host = np.array(dense)
        host[1, 2] += 1.0
        changed = dict(state, params=dict(state["params"], dense0=jax.device_put(
            host, NamedSharding(dense.sharding.mesh, dense.sharding.spec))))
        ckpt.save(c, changed)
        files = _files(a) + _files(b)
        cold = drop_caches()
        size = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        cache = "dropped before each full read" if cold else "warm (cannot drop it here)"
        print(f"state {size / 2**20:.0f} MiB a side; cache {cache}")
        print(f"{'comparison':<26} {'read MiB':>9} {'of MiB':>8} {'read %':>7} {'s':>7}")
        for r in range(args.rounds):
            rows = []
            for name, other, kwargs in (("equal, by checksum", b, {}),
                                        ("one element changed", c, {}),
                                        ("equal, every chunk", b, {"by_checksum": False})):
                if kwargs:
                    drop_caches()
                t0 = time.perf_counter()
                result = ckpt.diff(a, other, **kwargs)
                seconds = time.perf_counter() - t0
                assert result.equal is (other is b), result.summary()
                rows.append((name, result.bytes_read, result.bytes_total, seconds))
            drop_caches()
            t0 = time.perf_counter()
            _read_all(files)
            floor = time.perf_counter() - t0
            nbytes = sum(os.path.getsize(p) for p in files)
            rows.append(("cold-read floor (files)", nbytes, nbytes, floor))
            for name, read, of, seconds in rows:
                print(f"{name:<26} {read / 2**20:>9.1f} {of / 2**20:>8.1f} "
                      f"{100 * read / max(of, 1):>6.2f}% {seconds:>7.3f}   round {r}")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
