"""Benchmark: one state saved and restored by 1, 2, 4, 8 and 16 processes, and a process
SIGKILLed mid-save at 16.

    .venv/bin/python tools/bench_processes.py [--mib 64] [--rounds 2] [--procs 1,2,4,8,16]
                                              [--no-kill] [--out DIR]

Every process of every job builds the same global state (8 float32 arrays) on a (4, 4) mesh
of 16 CPU devices in all (16 // N devices per process), each process pinned to one core
(round robin over the cores it may use), saves it with `ckpt.save_async` and restores it.
Reported per process count, medians over rounds: each phase of a save
(`SaveTimings`: blocked in `save_async`, the chunk writes, from the writes to the commit),
the restore, process 0's commit phase beside the others' (the difference is process 0's own
work: reading N host reports, the manifest, COMMIT), bytes each process wrote (from the host
reports), and the calls each process made: `Store` calls and coordination-service calls.

The kill run (unless ``--no-kill``): 16 processes save a larger state with ``timeout_s`` 60;
a random process other than 0 (process 0 hosts JAX's coordination service, whose loss ends
every process by JAX's design) SIGKILLs itself a random moment into its writes. Reported:
the victim, the moment, each survivor's error and when it came, and whether the checkpoint
is whole (committed, every value exact) or absent (nothing committed).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.launch import launch, start  # noqa: E402

DEVICES = 16
STORE_METHODS = ("read", "write", "write_if_absent", "exists", "list", "list_children",
                 "delete", "delete_prefix")
COORD_METHODS = ("broadcast", "barrier", "publish", "wait_for", "collect")
KILL_TIMEOUT_S = 60.0


def _count_calls(cls: Any, names: tuple[str, ...], counts: collections.Counter[str]) -> None:
    for name in names:
        real = getattr(cls, name)

        def wrapper(self: Any, *a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            counts[_name] += 1
            return _real(self, *a, **k)

        setattr(cls, name, wrapper)


def _pin() -> None:
    """This process onto one of the cores it may use, round robin by process index."""
    import jax

    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[jax.process_index() % len(cores)]})


def _state(mib: int) -> dict[str, Any]:
    """The global state: 8 float32 arrays of ``mib`` MiB in all, values from their index."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()).reshape(4, 4), ("data", "model"))
    n_arrays = 8
    rows = max(4, mib * (1 << 20) // (n_arrays * 4 * 4096) // 4 * 4)
    specs = [P("data", "model"), P("model", None), P(), P(None, "data")]
    state = {}
    for i in range(n_arrays):
        sh = NamedSharding(mesh, specs[i % len(specs)])
        state[f"w{i}"] = jax.make_array_from_callback(
            (rows, 4096), sh, lambda idx, i=i: _values(i, rows)[idx])
    return state


def _values(i: int, rows: int) -> Any:
    import numpy as np

    return (np.arange(rows * 4096, dtype=np.float32) * (i + 1)).reshape(rows, 4096)


def worker(url: str, mib: int, rounds: int) -> dict[str, Any]:
    """Runs in every process: save and restore ``rounds`` times; returns timings and counts."""
    import jax

    import ckpt
    from ckpt import _coord
    from ckpt.storage import Store

    _pin()
    state = _state(mib)
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
        handle = ckpt.save_async(target, state)
        handle.wait()
        t = handle.timings
        assert t is not None
        for phase in ("blocked_s", "write_s", "commit_s", "total_s"):
            out[phase].append(getattr(t, phase))
        save_counts, save_coord = dict(counts), dict(coord_counts)
        t0 = time.perf_counter()
        restored = ckpt.restore(target, target=state)
        jax.block_until_ready(restored)
        out["restore_s"].append(time.perf_counter() - t0)
    return {"process": jax.process_index(), "times": dict(out), "store_calls": save_counts,
            "coord_calls": save_coord}


def kill_worker(url: str, mib: int, victim: int, delay_s: float) -> dict[str, Any]:
    """Runs in every process of the kill run: ``victim`` dies ``delay_s`` into its writes;
    every other process reports how its save ended, and when."""
    import jax

    import ckpt

    _pin()
    state = _state(mib)
    began = time.monotonic()
    handle = ckpt.save_async(url, state, timeout_s=KILL_TIMEOUT_S)
    if jax.process_index() == victim:
        time.sleep(delay_s)  # the random moment: what this run is about, not a wait
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        handle.wait()
        outcome, error = "committed", ""
    except ckpt.CkptError as exc:
        outcome, error = type(exc).__name__, str(exc)
    return {"process": jax.process_index(), "outcome": outcome, "error": error[:400],
            "after_s": time.monotonic() - began}


def _chunk_counts(url: str) -> dict[int, tuple[int, int]]:
    import msgpack

    out = {}
    for path in glob.glob(os.path.join(url, "0", "attempt-*", "hosts", "*.msgpack")):
        with open(path, "rb") as f:
            report = msgpack.unpackb(f.read())
        out[report["process"]] = (len(report["chunks"]), sum(r[2] for r in report["chunks"]))
    return out


def _scaling_row(base: str, nprocs: int, mib: int, rounds: int) -> dict[str, Any]:
    url = os.path.join(base, f"p{nprocs}")
    shutil.rmtree(url, ignore_errors=True)
    results = launch("tools.bench_processes:worker", nprocs,
                     devices_per_process=DEVICES // nprocs, args=[url, mib, rounds],
                     timeout=900)
    chunks = _chunk_counts(url)
    objects = len([p for p in glob.glob(os.path.join(url, "0", "**"), recursive=True)
                   if os.path.isfile(p)])
    med = [{k: statistics.median(v) for k, v in r["times"].items()} for r in results]
    slowest = {k: max(m[k] for m in med) for k in med[0]}
    others = med[1:] or med
    written = [chunks.get(p, (0, 0))[1] for p in range(nprocs)]
    shutil.rmtree(url, ignore_errors=True)
    return {"processes": nprocs, **{f"{k}_slowest": v for k, v in slowest.items()},
            "commit_s_p0": med[0]["commit_s"],
            "commit_s_others": statistics.median(m["commit_s"] for m in others),
            "bytes_per_process_MiB_max": round(max(written) / 2**20, 2),
            "max_over_mean": max(written) / (sum(written) / nprocs),
            "chunk_writes_per_process": sorted({chunks.get(p, (0, 0))[0]
                                                for p in range(nprocs)}),
            "objects_in_checkpoint": objects,
            "store_calls_p0": results[0]["store_calls"],
            "store_calls_p1": results[1]["store_calls"] if nprocs > 1 else None,
            "coord_calls_p0": results[0]["coord_calls"],
            "coord_calls_p1": results[1]["coord_calls"] if nprocs > 1 else None}


def _kill_run(base: str, mib: int, seed: int) -> dict[str, Any]:
    import threading

    import numpy as np

    import ckpt

    rng = random.Random(seed)
    nprocs, victim = 16, rng.randrange(1, 16)
    delay = rng.uniform(0.0, 0.3)  # a 256 MiB save at 16 processes commits in ~0.3-0.6 s
    url = os.path.join(base, "killed")
    exits: dict[int, float] = {}
    with start("tools.bench_processes:kill_worker", nprocs,
               devices_per_process=DEVICES // nprocs, args=[url, mib, victim, delay],
               heartbeat_s=10) as job:

        def watch(i: int) -> None:
            job.procs[i].wait()
            exits[i] = time.monotonic()

        watchers = [threading.Thread(target=watch, args=(i,), daemon=True)
                    for i in range(nprocs)]
        for w in watchers:
            w.start()
        results = job.wait(timeout=600, check=False)
        for w in watchers:
            w.join(timeout=10)
        codes = [proc.returncode for proc in job.procs]
        said = next((line for i in range(nprocs) if i != victim for line in job.stderr[i]
                     if "Terminating process" in line), "")
    survivors = [i for i in range(nprocs) if i != victim]
    outcomes = collections.Counter(
        results[i]["outcome"] if results[i] is not None else f"ended by signal {-codes[i]}"
        if codes[i] is not None and codes[i] < 0 else f"exit {codes[i]}" for i in survivors)
    try:
        restored = ckpt.restore(url)
    except ckpt.CheckpointNotFoundError:
        state = "absent"
    else:
        rows = next(iter(restored.values())).shape[0]
        exact = all(np.array_equal(restored[f"w{i}"], _values(i, rows)) for i in range(8))
        state = "whole" if exact and ckpt.verify(url).ok else "DAMAGED"
    shutil.rmtree(url, ignore_errors=True)
    return {"victim": victim, "victim_exit": codes[victim], "delay_s": round(delay, 3),
            "checkpoint": state, "survivor_outcomes": dict(outcomes),
            "survivors_ended_s_after_the_victim": round(
                max(exits[i] for i in survivors) - exits[victim], 1),
            "timeout_s": KILL_TIMEOUT_S,
            "first_error": next((results[i]["error"] for i in survivors
                                 if results[i] and results[i]["error"]), "")
            or said[said.find("Terminating"):][:200]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--procs", default="1,2,4,8,16",
                        help="process counts, each dividing 16 (default 1,2,4,8,16)")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill run")
    parser.add_argument("--seed", type=int, default=None, help="of the kill run's victim and "
                        "moment (default: random)")
    parser.add_argument("--out", default=None, help="folder for the checkpoints (temporary)")
    args = parser.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    if any(DEVICES % p for p in procs):
        parser.error(f"--procs: each must divide {DEVICES}")
    base = args.out or tempfile.mkdtemp(prefix="ckpt-bench-")
    table = [_scaling_row(base, n, args.mib, args.rounds) for n in procs]
    print(f"state: {args.mib} MiB in 8 float32 arrays on a (4, 4) mesh of {DEVICES} CPU "
          f"devices; {os.cpu_count()} cores, processes pinned round robin; medians of "
          f"{args.rounds} rounds; slowest process unless named")
    print(f"{'procs':>5} {'blocked':>8} {'writes':>8} {'commit':>8} {'p0 commit':>9} "
          f"{'others':>8} {'total':>8} {'restore':>8} {'max/mean B':>10} {'coord p0':>8} "
          f"{'coord p1':>8}")
    for row in table:
        coord0 = sum(row["coord_calls_p0"].values())
        coord1 = sum((row["coord_calls_p1"] or {}).values())
        print(f"{row['processes']:>5} {row['blocked_s_slowest']:>8.3f} "
              f"{row['write_s_slowest']:>8.3f} {row['commit_s_slowest']:>8.3f} "
              f"{row['commit_s_p0']:>9.3f} {row['commit_s_others']:>8.3f} "
              f"{row['total_s_slowest']:>8.3f} {row['restore_s_slowest']:>8.3f} "
              f"{row['max_over_mean']:>10.3f} {coord0:>8} {coord1:>8}")
    print(json.dumps(table, indent=1))
    if not args.no_kill:
        seed = args.seed if args.seed is not None else random.randrange(1 << 30)
        killed = _kill_run(base, args.mib * 4, seed)
        print(f"kill run (seed {seed}): " + json.dumps(killed, indent=1))
    if args.out is None:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
