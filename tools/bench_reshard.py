"""A restore onto another mesh against the disk's cold-read floor and Orbax, round by round.

Saves the benchmark's training state (`tools/bench.py`'s) on the 2x4 mesh with this library
and with orbax-checkpoint, then, for each round, with the page cache dropped before each:
reads this library's chunk files (the cold-read floor: each read whole, one after another,
as `tools/bench.py` does), reads them again keeping every file's bytes (the floor into
fresh memory: a restore must fault in the memory it returns, which the first floor, reusing
one freed buffer, does not), restores ours onto 4x2, and restores Orbax's onto 4x2, in an
order that alternates between rounds. Each runs in a fresh process, as a restarted job's
restore does, timed around the reading alone (a restore's target is built from metadata,
after an untimed restore of a 1 MiB checkpoint starts JAX and TensorStore): in one
long-lived process, what was allocated and freed before changes how the allocator serves
the next buffers (glibc moves its mmap threshold as large blocks are freed), by as much as
the differences measured. Alternating the floor with the restores keeps this disk's drift
(tens of percent between minutes) out of the ratio, which `tools/bench.py` (one floor, then
rounds of restores in one process) does not. Prints each round's seconds and the medians'
ratios.

    .venv/bin/python tools/bench_reshard.py --size 1G --rounds 6
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _target(ours: str) -> object:
    """The restore target onto 4x2, from our checkpoint's metadata alone: a child that made
    the state first would have warmed its allocator with it, which is what a fresh process
    must not have."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    import ckpt

    info = ckpt.metadata(ours)
    mesh42 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    specs = iter([leaf.spec for leaf in info.leaves])

    def place(x: object) -> object:
        spec = next(specs)
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        entries = [tuple(e) if isinstance(e, list) else e for e in spec or ()]
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=NamedSharding(mesh42, PartitionSpec(*entries)))

    return jax.tree.map(place, info.tree)


def _child(who: str, path: str, ours: str) -> None:
    """One restore in this fresh process, after an untimed one of a 1 MiB checkpoint of the
    same library saved beside it (`<path>-small`), so that what is timed is reading, not
    starting JAX, TensorStore or their thread pools; prints its seconds."""
    import jax
    import orbax.checkpoint as ocp

    import ckpt

    def restore(where: str, target: object) -> None:
        if who == "ours":
            jax.block_until_ready(ckpt.restore(where, target))
        else:
            with ocp.StandardCheckpointer() as checkpointer:
                jax.block_until_ready(checkpointer.restore(where, target))

    if who in ("floor", "kept"):  # the chunk files read whole, one after another
        files = [f for f in glob.glob(os.path.join(path, "**", "c", "**"), recursive=True)
                 if os.path.isfile(f)]
        kept = []
        t0 = time.perf_counter()
        for name in files:
            with open(name, "rb") as f:
                data = f.read()
            if who == "kept":
                kept.append(data)
        print(f"SECONDS {time.perf_counter() - t0}")
        return
    restore(path + "-small", _small_target())
    target = _target(ours)
    t0 = time.perf_counter()
    restore(path, target)
    print(f"SECONDS {time.perf_counter() - t0}")


def _small(mesh: object) -> dict[str, object]:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    return {"w": jax.device_put(np.ones((512, 512), np.float32),
                                NamedSharding(mesh, PartitionSpec("data", "model")))}


def _small_target() -> object:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh42 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    return {"w": jax.ShapeDtypeStruct((512, 512), np.float32, sharding=NamedSharding(
        mesh42, PartitionSpec("data", "model")))}


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="state size, e.g. 64M, 1G")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()

    import orbax.checkpoint as ocp

    import ckpt
    from tools.bench import bench_mesh, drop_caches, make_state, size_arg

    total = size_arg(args.size)

    state = make_state(total)
    base = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-reshard-")
    ours, theirs = os.path.join(base, "ours"), os.path.join(base, "orbax")
    try:
        ckpt.save(ours, state)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(theirs, state)
        small = _small(bench_mesh())
        ckpt.save(ours + "-small", small)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(theirs + "-small", small)
        def timed(name: str) -> float:
            drop_caches()
            run = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name,
                                  theirs if name == "orbax" else ours, ours],
                                 capture_output=True, text=True, check=True)
            return float(run.stdout.split("SECONDS ")[-1])

        names = ["floor", "kept", "ours", "orbax"]
        seconds: dict[str, list[float]] = {name: [] for name in names}
        cold = drop_caches()
        print(f"state {total / 2**20:.0f} MiB, saved on 2x4, restored onto 4x2, each restore "
              f"in a fresh process; "
              f"{'page cache dropped before each' if cold else 'warm cache (cannot drop it)'}")
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else list(reversed(names)):
                seconds[name].append(timed(name))
            print(f"round {r}: " + ", ".join(f"{n} {seconds[n][-1]:.3f} s" for n in names))
        med = {name: statistics.median(v) for name, v in seconds.items()}
        print(f"medians: floor {med['floor']:.3f} s, into fresh memory {med['kept']:.3f} s, "
              f"ours {med['ours']:.3f} s, orbax {med['orbax']:.3f} s; ours at "
              f"{100 * med['floor'] / med['ours']:.0f}% of the cold-read floor "
              f"({100 * med['kept'] / med['ours']:.0f}% of it into fresh memory), orbax at "
              f"{100 * med['floor'] / med['orbax']:.0f}% ({100 * med['kept'] / med['orbax']:.0f}"
              f"%); ours/orbax {med['ours'] / med['orbax']:.2f}")
    finally:
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
