"""Benchmark against Orbax, side by side: ``tools/bench [--size 1G] [--rounds 5]``.

One process, 8 CPU devices, a training-state-like pytree (a few large and many small
arrays, float32 and bfloat16) sharded on a (2, 4) mesh. Each round saves and restores the
same state with this library and with orbax-checkpoint (alternating which goes first), and
measures the floors in the same run. Prints medians and ratios.

Measured per library: time the caller is blocked in the save call; time to commit; restore
onto the same mesh, onto 4x2, onto one device (page cache dropped before each restore when
running as root); peak resident memory above the phase's start (VmHWM reset via
/proc/self/clear_refs). Floors: one numpy copy of the state (the least a safe snapshot can
block), write + fsync of the same bytes into files, and a cold read of those files.
``--profile DIR`` also writes a pyinstrument report of each of this library's phases of the
first round (docs/performance.md says what they showed).

``--device gpu`` runs the same on this machine's accelerators (mesh 2x(n/2); the state made
on the devices; use ``--size 10G`` or as large as the devices hold twice), adding the floors
an accelerator snapshot is measured against: one on-device copy of the owned shards and
their transfer to host. ``--snapshot`` and ``--memory-budget`` set this library's save
options; the save's peak chunk data on host (`SaveTimings.host_peak_bytes`) and its rise in
resident memory are printed beside the budget.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

# ``--device gpu`` runs on the machine's accelerators; otherwise 8 CPU devices. Decided before
# jax is imported, which reads these variables once.
GPU = "--device=gpu" in sys.argv or any(a == "--device" and b == "gpu"
                                        for a, b in itertools.pairwise(sys.argv))
if not GPU:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def size_arg(text: str) -> int:
    """A benchmark's size argument: ``64M``, ``1G``, ``512K`` (powers of 2), or bytes. The
    benchmarks' one parser of it."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    unit = units.get(text[-1].upper())
    return int(float(text[:-1]) * unit) if unit else int(text)


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def measure(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """Runs ``fn``; returns (seconds, peak bytes of resident memory above the start, result).

    Freed heap is returned to the system first, so that memory an earlier phase freed (and
    malloc kept) cannot absorb this phase's allocations and hide them."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = _status("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, max(0, _status("VmHWM") - base), out


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


# Per-lane throughput of each PCIe generation, bytes/s per direction after line encoding.
_PCIE_LANE = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}


def pcie_bytes_per_s() -> float | None:
    """The first GPU's PCIe link, from nvidia-smi (current generation x width), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pcie.link.gen.current,"
                              "pcie.link.width.current", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        gen, width = (int(x) for x in out.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return _PCIE_LANE.get(gen, 0.0) * width or None


def bench_mesh() -> Any:
    """The benchmark's ("data", "model") mesh: 2x4 of the 8 CPU devices, or 2x(n/2) (1xn when
    n is odd) of the n accelerators."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    devices = jax.devices()
    shape = (2, len(devices) // 2) if len(devices) % 2 == 0 else (1, len(devices))
    return Mesh(np.array(devices).reshape(shape), ("data", "model"))


def make_state(total: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = bench_mesh()
    rng = np.random.default_rng(0)
    state: dict[str, Any] = {"params": {}, "opt": {}}
    big = total * 3 // 4 // 6  # six large arrays: 3/4 of the bytes
    rows = max(8, big // (4 * 4096) // 8 * 8)
    for i in range(6):
        dtype = np.float32 if i % 2 == 0 else jnp.bfloat16
        spec = [P("data", "model"), P("model", "data"), P(None, "model")][i % 3]
        shape = (rows, 4096 if dtype == np.float32 else 8192)
        sharding = NamedSharding(mesh, spec)
        if GPU:  # made on the devices: tens of GiB of random numbers on host would take minutes
            state["params"][f"dense{i}"] = jax.jit(
                lambda k, shape=shape, dtype=dtype: jax.random.normal(k, shape, dtype),
                out_shardings=sharding)(jax.random.key(i))
            continue
        host = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
        state["params"][f"dense{i}"] = jax.device_put(host, sharding)
    small = total // 4 // 200  # two hundred small arrays: the rest
    n = max(64, small // 4 // 64 * 64)
    for i in range(200):
        host = rng.standard_normal(n, dtype=np.float32)
        state["opt"][f"v{i}"] = jax.device_put(host, NamedSharding(mesh, P(("data", "model"))
                                                                  if i % 2 else P()))
    state["step"] = 1234
    return state


def make_many_leaves(count: int) -> dict[str, Any]:
    """``count`` arrays of 32 KiB: half 128x64 float32 sharded over both mesh axes (4 KiB
    per device), half 8192-float vectors replicated (an unscanned model's biases and norms,
    and their optimizer moments)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = bench_mesh()
    rng = np.random.default_rng(0)
    sharded, replicated = NamedSharding(mesh, P("data", "model")), NamedSharding(mesh, P())
    state: dict[str, Any] = {"params": {}, "opt": {}}
    for i in range(count // 2):
        state["params"][f"w{i}"] = jax.device_put(
            rng.standard_normal((128, 64), dtype=np.float32), sharded)
        state["opt"][f"v{i}"] = jax.device_put(rng.standard_normal(8192, dtype=np.float32),
                                               replicated)
    return state


def _file_floor(files: list[tuple[str, list[Any]]]) -> tuple[float, float]:
    """Seconds to write each file of ``files`` (path, the arrays it holds, in order) and
    fsync it, one after another; then, page cache dropped, to read them all back."""
    import numpy as np

    def write_all() -> None:
        for path, parts in files:
            with open(path, "wb") as f:
                for part in parts:
                    f.write(np.ascontiguousarray(part).view(np.uint8))
                f.flush()
                os.fsync(f.fileno())

    def read_all() -> None:
        for path, _ in files:
            with open(path, "rb") as f:
                f.read()

    t_write, _, _ = measure(write_all)
    drop_caches()
    t_read, _, _ = measure(read_all)
    return t_write, t_read


def _per_leaf_floor(base: str, r: int, state: Any) -> tuple[float, float]:
    """What the format's layout costs by itself: one metadata file and one data file per
    array leaf, as one zarr array of one chunk each would be, written by plain Python (16
    threads) and made durable by one syncfs of the file system (the least any per-file
    layout needs); then a cold read of the data files (16 threads)."""
    import concurrent.futures

    import jax
    import numpy as np

    folder = os.path.join(base, f"floor-leaves-{r}")
    data = [np.asarray(x).tobytes() for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]

    def write(i: int) -> None:
        leaf = os.path.join(folder, str(i))
        os.makedirs(os.path.join(leaf, "c"))
        for name, payload in (("zarr.json", b"{}" * 200), ("c/0", data[i])):
            with open(os.path.join(leaf, name), "wb") as f:
                f.write(payload)

    def write_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(write, range(len(data))))
        fd = os.open(folder, os.O_RDONLY)
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).syncfs(fd)
        finally:
            os.close(fd)

    def read(i: int) -> None:
        with open(os.path.join(folder, str(i), "c", "0"), "rb") as f:
            f.read()

    def read_all() -> None:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(read, range(len(data))))

    t_write, _, _ = measure(write_all)
    drop_caches()
    t_read, _, _ = measure(read_all)
    shutil.rmtree(folder, ignore_errors=True)
    return t_write, t_read


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="state size, e.g. 256M, 1G, 4G")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--case", choices=("state", "many-leaves"), default="state",
                        help="state: a training state of --size (six large arrays, 200 small); "
                             "many-leaves: --leaves arrays of 32 KiB")
    parser.add_argument("--leaves", type=int, default=4000)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                        help="cpu: 8 CPU devices; gpu: this machine's accelerators, with the "
                             "on-device-copy and device-to-host floors (use --size 10G or more)")
    parser.add_argument("--snapshot", choices=("auto", "device", "host"), default="auto",
                        help="this library's snapshot= (device/host force the accelerator "
                             "paths, also on CPU)")
    parser.add_argument("--memory-budget", default="1G",
                        help="this library's memory_budget= for saves, e.g. 512M, 2G")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="also profile this library's phases of the first round with "
                             "pyinstrument, writing one text report per phase into DIR")
    args = parser.parse_args()
    total, budget = size_arg(args.size), size_arg(args.memory_budget)

    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

    import ckpt

    state = make_state(total) if args.case == "state" else make_many_leaves(args.leaves)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    base = args.dir or tempfile.mkdtemp(prefix="ckpt-bench-")
    devices = jax.devices()
    meshes: dict[str, Callable[[Any], Any]] = {"same": lambda s: s}
    if len(devices) == 8:
        meshes["4x2"] = lambda s: NamedSharding(Mesh(np.array(devices).reshape(4, 2),
                                                     ("data", "model")), s.spec)
    if len(devices) > 1:
        meshes["1dev"] = lambda s: SingleDeviceSharding(devices[0])

    def target(kind: str) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=meshes[kind](x.sharding))
                            if isinstance(x, jax.Array) else x, state)

    results: dict[str, dict[str, list[float]]] = {"ours": {}, "orbax": {}, "floor": {}}

    def record(who: str, what: str, value: float) -> None:
        results[who].setdefault(what, []).append(value)

    def run(name: str, r: int, fn: Callable[[], Any]) -> tuple[float, int, Any]:
        if args.profile is None or r != 0:
            return measure(fn)
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001)
        profiler.start()
        try:
            return measure(fn)
        finally:
            profiler.stop()
            os.makedirs(args.profile, exist_ok=True)
            with open(os.path.join(args.profile, f"{name}.txt"), "w") as f:
                f.write(profiler.output_text(color=False))

    cold = True
    for r in range(args.rounds):
        order = ["ours", "orbax"] if r % 2 == 0 else ["orbax", "ours"]
        for who in order:
            path = os.path.join(base, f"{who}-{r}")
            if who == "ours":
                t_block, m_block, handle = run("save_blocked", r, lambda: ckpt.save_async(
                    path, state, snapshot=args.snapshot, memory_budget=budget))
                t_rest, m_rest, _ = run("save_commit", r, handle.wait)
                snapshot_mode = handle.timings.snapshot
                record("ours", "host_peak_MiB", handle.timings.host_peak_bytes / 2**20)
            else:
                mgr = ocp.CheckpointManager(path)
                t_block, m_block, _ = measure(
                    lambda: mgr.save(1, args=ocp.args.StandardSave(state)))
                t_rest, m_rest, _ = measure(mgr.wait_until_finished)
            record(who, "blocked_s", t_block)
            record(who, "commit_s", t_block + t_rest)
            record(who, "save_peak_MiB", max(m_block, m_rest) / 2**20)
            # The first restore after a save meets the disk still busy with it (bursty
            # write-back): each round starts with another kind, so no kind always pays it.
            kinds = list(meshes)
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                cold = drop_caches() and cold
                if who == "ours":
                    t, m, out = run(f"restore_{kind}", r, lambda: jax.block_until_ready(
                        ckpt.restore(path, target(kind))))
                else:
                    t, m, out = measure(lambda: jax.block_until_ready(
                        mgr.restore(1, args=ocp.args.StandardRestore(target(kind)))))
                del out
                record(who, f"restore_{kind}_s", t)
                record(who, f"restore_{kind}_peak_MiB", m / 2**20)
            if who == "orbax":
                mgr.close()
            shutil.rmtree(path, ignore_errors=True)
        if GPU:
            # What an accelerator snapshot cannot beat: a copy of the owned shards on the
            # devices, and their transfer to host.
            on_device = [s.data for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
                         for s in x.addressable_shards if s.replica_id == 0]
            t, _, copied = measure(lambda: jax.block_until_ready(jax.device_put(
                on_device, [d.sharding for d in on_device], may_alias=False)))
            record("floor", "device_copy_s", t)

            def to_host(arrays: list[Any]) -> list[Any]:
                for a in arrays:
                    a.copy_to_host_async()
                return [np.asarray(a) for a in arrays]

            t, m, shards = measure(lambda: to_host(copied))
            record("floor", "d2h_s", t)
            del copied
        else:
            shards = [np.asarray(s.data) for x in jax.tree.leaves(state)
                      if isinstance(x, jax.Array) for s in x.addressable_shards
                      if s.replica_id == 0]
        # Floors, same bytes: a numpy copy, write + fsync into files, a cold read.
        t, _, copies = measure(lambda: [np.array(s, copy=True) for s in shards])
        record("floor", "numpy_copy_s", t)
        folder = os.path.join(base, f"floor-{r}")
        os.makedirs(folder)
        t_write, t_read = _file_floor([(os.path.join(folder, str(i)), [c])
                                       for i, c in enumerate(copies)])
        record("floor", "write_fsync_s", t_write)
        record("floor", "cold_read_s", t_read)
        shutil.rmtree(folder, ignore_errors=True)
        if args.case == "many-leaves":
            # The same bytes as one file: the disk's own floor, which no layout of one
            # object per leaf reaches.
            one = os.path.join(base, f"floor-one-{r}")
            t_write, t_read = _file_floor([(one, copies)])
            record("floor", "write_fsync_one_s", t_write)
            record("floor", "cold_read_one_s", t_read)
            os.remove(one)
            t_write, t_read = _per_leaf_floor(base, r, state)
            record("floor", "write_sync_leaf_s", t_write)
            record("floor", "cold_read_leaf_s", t_read)

    med = {who: {k: statistics.median(v) for k, v in d.items()} for who, d in results.items()}
    ours, orbax, floor = med["ours"], med["orbax"], med["floor"]
    mib = nbytes / 2**20
    shape = "x".join(str(n) for n in bench_mesh().devices.shape)
    print(f"state {mib:.0f} MiB ({len(jax.tree.leaves(state))} leaves), mesh {shape} of "
          f"{len(devices)} {devices[0].platform} devices ({devices[0].device_kind}), one "
          f"process; medians of {args.rounds} rounds; page cache "
          f"{'dropped before each restore' if cold else 'NOT dropped (needs root)'}; our "
          f"snapshot {snapshot_mode}, memory budget {budget / 2**20:.0f} MiB")
    print(f"{'':24}{'ours':>10}{'orbax':>10}{'ours/orbax':>12}   ours min-max over rounds")
    for key in ("blocked_s", "commit_s", *(f"restore_{k}_s" for k in meshes), "save_peak_MiB",
                *(f"restore_{k}_peak_MiB" for k in meshes)):
        spread = f"{min(results['ours'][key]):.3f}-{max(results['ours'][key]):.3f}"
        print(f"{key:24}{ours[key]:10.3f}{orbax[key]:10.3f}{ours[key] / orbax[key]:12.2f}"
              f"   {spread}")
    print(f"floors: numpy copy {floor['numpy_copy_s']:.3f} s, write+fsync "
          f"{floor['write_fsync_s']:.3f} s ({mib / floor['write_fsync_s']:.0f} MiB/s), cold read "
          f"{floor['cold_read_s']:.3f} s ({mib / floor['cold_read_s']:.0f} MiB/s)")
    print(f"ours vs floors: blocked {ours['blocked_s'] / floor['numpy_copy_s']:.2f}x the copy "
          f"(orbax {orbax['blocked_s'] / floor['numpy_copy_s']:.2f}x); commit at "
          f"{floor['write_fsync_s'] / ours['commit_s']:.0%} of write+fsync throughput; restore "
          "at " + ", ".join(f"{floor['cold_read_s'] / ours[f'restore_{k}_s']:.0%} ({k})"
                            for k in meshes) + " of cold-read throughput")
    print(f"save's chunk data on host at once: {ours['host_peak_MiB']:.0f} MiB (budget "
          f"{budget / 2**20:.0f} MiB); save's resident memory rose {ours['save_peak_MiB']:.0f} "
          "MiB")
    if GPU:
        print(f"accelerator floors: on-device copy {floor['device_copy_s']:.3f} s, "
              f"device-to-host {floor['d2h_s']:.3f} s ({mib / floor['d2h_s']:.0f} MiB/s); ours "
              f"blocked {ours['blocked_s'] / floor['device_copy_s']:.2f}x the on-device copy, "
              f"{ours['blocked_s'] / floor['d2h_s']:.2f}x the transfer (orbax "
              f"{orbax['blocked_s'] / floor['d2h_s']:.2f}x the transfer)")
        link = pcie_bytes_per_s()
        print("device-to-host against the card's link: " + (
            f"{mib * 2**20 / floor['d2h_s'] / link:.0%} of PCIe {link / 1e9:.1f} GB/s "
            "(nvidia-smi's current generation and width, per direction)" if link else
            "no PCIe figure (nvidia-smi not found or silent)"))
    if args.case == "many-leaves":
        leaves = len(jax.tree.leaves(state))
        print(f"one-file floors: write+fsync {floor['write_fsync_one_s']:.3f} s, cold read "
              f"{floor['cold_read_one_s']:.3f} s; ours: commit "
              f"{ours['commit_s'] / floor['write_fsync_one_s']:.1f}x that write floor, blocked "
              f"{ours['blocked_s'] / leaves * 1000:.3f} s per 1000 leaves, restore (same) "
              f"{ours['restore_same_s'] / floor['cold_read_one_s']:.1f}x that read floor")
        print(f"per-leaf floors (two files a leaf, plain Python, one syncfs): write "
              f"{floor['write_sync_leaf_s']:.3f} s, cold read {floor['cold_read_leaf_s']:.3f} s;"
              f" ours: commit {ours['commit_s'] / floor['write_sync_leaf_s']:.1f}x, restore "
              f"{ours['restore_same_s'] / floor['cold_read_leaf_s']:.1f}x")
    print("peak extra memory / state bytes: save "
          f"{ours['save_peak_MiB'] / mib:.2f}x (orbax {orbax['save_peak_MiB'] / mib:.2f}x), "
          "restore "
          + ", ".join(f"{ours[f'restore_{k}_peak_MiB'] / mib:.2f}x ({k}; orbax "
                      f"{orbax[f'restore_{k}_peak_MiB'] / mib:.2f}x)" for k in meshes))
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
