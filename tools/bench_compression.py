"""What ``compression="zstd"`` costs and saves: ``.venv/bin/python tools/bench_compression.py
[--size 256M] [--rounds 3] [--level 3]``.

Three training states of the same size, on a (2, 4) mesh of 8 CPU devices in one process:

- ``fresh``: a freshly initialised model and its Adam state: float32 weights drawn at random,
  both moments zeros (half the bytes zeros), the step a number;
- ``trained``: bfloat16 weights and float32 moments, all drawn at random (nothing repeats);
- ``mixed``: the two halves side by side (a run restarted from a fresh state that has trained
  some layers: some moments zeros, the rest random).

Each is saved and restored by this library uncompressed, by this library with zstd, and by
orbax-checkpoint with its defaults (`CheckpointManager` + `StandardSave`: OCDBT, zarr v2,
zstd-compressed chunks). Measured: bytes on disk (every file under the checkpoint), time to
commit, and time of a restore onto the same mesh with the page cache dropped first (as root).
Medians of the rounds; ratios within one run are what compare.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools.bench import bench_mesh, drop_caches, measure, size_arg  # noqa: E402  (sets XLA_FLAGS first)

STATES = ("fresh", "trained", "mixed")
WHO = ("plain", "zstd", "orbax")


def make(kind: str, total: int) -> dict[str, Any]:
    """A state of about ``total`` bytes: eight layers of weights and their two moments."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(bench_mesh(), P("data", "model"))
    rng = np.random.default_rng(0)
    layers = 8
    cols = 1024
    rows = max(8, total // layers // cols // 12 // 8 * 8)  # float32 w + two moments

    def put(x: Any) -> Any:
        return jax.device_put(x, sharding)

    state: dict[str, Any] = {"params": {}, "mu": {}, "nu": {}, "step": 1000}
    for i in range(layers):
        trained = kind == "trained" or (kind == "mixed" and i % 2 == 1)
        w = rng.standard_normal((rows, cols), dtype=np.float32)
        state["params"][f"l{i}"] = put(w.astype(jnp.bfloat16) if trained else w)
        for moment in ("mu", "nu"):
            value = (np.abs(rng.standard_normal((rows, cols), dtype=np.float32)) * 1e-3
                     if trained else np.zeros((rows, cols), np.float32))
            state[moment][f"l{i}"] = put(value)
    return state


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, name))
               for folder, _, names in os.walk(path) for name in names)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="256M", help="state size, e.g. 64M, 256M, 1G")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    total = size_arg(args.size)

    import jax
    import orbax.checkpoint as ocp

    import ckpt

    base = tempfile.mkdtemp(prefix="bench-zstd-", dir=args.dir)
    results: dict[tuple[str, str, str], list[float]] = {}
    cold = True
    for kind in STATES:
        state = make(kind, total)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
        results[(kind, "state", "bytes")] = [nbytes]
        target = jax.tree.map(lambda x: x, state)
        for r in range(args.rounds):
            for who in WHO[r % 3:] + WHO[:r % 3]:  # each goes first in some round
                path = os.path.join(base, f"{kind}-{who}-{r}")
                if who == "orbax":
                    mgr = ocp.CheckpointManager(path)
                    t, _, _ = measure(lambda mgr=mgr: (
                        mgr.save(1, args=ocp.args.StandardSave(state)),
                        mgr.wait_until_finished()))
                else:
                    compression = f"zstd:{args.level}" if who == "zstd" else None
                    t, _, _ = measure(lambda path=path, c=compression: ckpt.save(
                        path, state, compression=c))
                results.setdefault((kind, who, "commit_s"), []).append(t)
                results.setdefault((kind, who, "bytes"), []).append(disk_bytes(path))
                cold = drop_caches() and cold
                if who == "orbax":
                    t, _, out = measure(lambda mgr=mgr: jax.block_until_ready(
                        mgr.restore(1, args=ocp.args.StandardRestore(target))))
                    mgr.close()
                else:
                    t, _, out = measure(lambda path=path: jax.block_until_ready(
                        ckpt.restore(path, target)))
                del out
                results.setdefault((kind, who, "restore_s"), []).append(t)
                shutil.rmtree(path, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"states of {total / 2**20:.0f} MiB on a 2x4 mesh of CPU devices, one process; "
          f"medians of {args.rounds} rounds; zstd level {args.level}; page cache "
          f"{'dropped before each restore' if cold else 'NOT dropped (needs root)'}")
    print(f"{'state':9}{'who':7}{'on disk':>10}{'of state':>10}{'commit s':>10}"
          f"{'restore s':>11}")
    for kind in STATES:
        state_bytes = med[(kind, "state", "bytes")]
        for who in WHO:
            stored = med[(kind, who, "bytes")]
            print(f"{kind:9}{who:7}{stored / 2**20:8.1f}Mi{stored / state_bytes:10.2f}"
                  f"{med[(kind, who, 'commit_s')]:10.3f}{med[(kind, who, 'restore_s')]:11.3f}")
    shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
