"""The demo: a training loop that checkpoints, is killed mid-save, resumes on another mesh,
is preempted (SIGTERM), and resumes again on a third mesh.

Run it with ``tools/dev demo``. The driver (this file without ``--train``):

1. starts a trainer on a 2x4 mesh of 8 CPU devices and SIGKILLs it while a checkpoint is
   being written; shows what is on disk (the interrupted step is invisible);
2. starts a trainer on a 4x2 mesh: it resumes from the newest committed step, and the loss
   curve continues exactly where it was; then sends it SIGTERM, as a scheduler preempting
   the job would: the trainer saves the step it is at, waits for the commit, and exits;
3. starts a trainer on a 1x8 mesh, which resumes from the preemption step.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM, HIDDEN, BATCH = 256, 2048, 512


def train(args: argparse.Namespace) -> None:
    """One training job: restore the latest committed step if any, train, checkpoint."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import ckpt

    rows, cols = (int(n) for n in args.mesh.split("x"))
    mesh = Mesh(np.array(jax.devices()).reshape(rows, cols), ("data", "model"))
    shard = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
    specs = {"w1": shard(None, "model"), "b1": shard("model"), "w2": shard("model", None),
             "b2": shard()}
    k1, k2, kt = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (DIM, HIDDEN)) / DIM ** 0.5,
              "b1": jnp.zeros(HIDDEN),
              "w2": jax.random.normal(k2, (HIDDEN, DIM)) / HIDDEN ** 0.5,
              "b2": jnp.zeros(DIM)}
    params = {k: jax.device_put(v, specs[k]) for k, v in params.items()}
    teacher = jax.random.normal(kt, (DIM, DIM)) / DIM ** 0.5
    optimizer = optax.adam(1e-3)
    state = {"params": params, "opt": optimizer.init(params), "step": 0}

    def loss_fn(p, x, y):
        h = jax.nn.gelu(x @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

    @jax.jit
    def batch(step):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(1), step), (BATCH, DIM))
        x = jax.lax.with_sharding_constraint(x, shard("data", None))
        return x, jnp.tanh(x @ teacher)

    @jax.jit
    def update(params, opt, step):
        x, y = batch(step)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt = optimizer.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    mgr = ckpt.CheckpointManager(args.root, keep_last=3, save_every=args.every)
    latest = mgr.latest_step()
    if latest is not None:
        t0 = time.perf_counter()
        state = mgr.restore(latest, target=state)
        print(f"resumed from committed step {latest} on a {args.mesh} mesh "
              f"in {time.perf_counter() - t0:.2f} s", flush=True)
    else:
        print(f"starting from scratch on a {args.mesh} mesh", flush=True)
    params, opt = state["params"], state["opt"]
    for step in range(state["step"] + 1, args.steps + 1):
        params, opt, loss = update(params, opt, step)
        print(f"step {step:3d}  loss {float(loss):.6f}", flush=True)
        if mgr.should_save(step):
            t0 = time.perf_counter()
            mgr.save(step, {"params": params, "opt": opt, "step": step})
            print(f"checkpoint {step}: snapshot taken in {1e3 * (time.perf_counter() - t0):.1f} ms,"
                  " writing in the background", flush=True)
        if mgr.reached_preemption(step):
            print(f"preempted: checkpoint {step} is committed; exiting", flush=True)
            return
        if args.pace:
            time.sleep(args.pace)  # a slower "training step", so the driver can preempt
    mgr.close()
    print(f"finished at step {args.steps}; committed steps: {mgr.steps()}", flush=True)


def _start(mesh: str, args: argparse.Namespace, pace: float = 0.0) -> subprocess.Popen[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--train", "--mesh", mesh,
           "--steps", str(args.steps), "--every", str(args.every), "--root", args.root,
           "--pace", str(pace)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)


def _losses(lines: list[str]) -> dict[int, float]:
    out = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 4 and parts[0] == "step" and parts[2] == "loss":
            out[int(parts[1])] = float(parts[3])
    return out


def drive(args: argparse.Namespace) -> int:
    """The driver: run, kill mid-save, inspect, resume on another mesh, compare losses."""
    sys.path.insert(0, ROOT)
    t_start = time.perf_counter()
    shutil.rmtree(args.root, ignore_errors=True)
    print(f"== run 1: 2x4 mesh, checkpoint every {args.every} steps to {args.root}; "
          f"SIGKILL when checkpoint {args.kill_at} starts")
    first = _start("2x4", args)
    lines1 = []
    assert first.stdout is not None
    for line in first.stdout:
        print("   | " + line.rstrip())
        lines1.append(line)
        if line.startswith(f"checkpoint {args.kill_at}:"):
            first.send_signal(signal.SIGKILL)
            break
    first.wait()
    print(f"== run 1 killed (exit status {first.returncode}) while checkpoint {args.kill_at} "
          "was being written")

    import ckpt
    from ckpt.storage import open_store

    store = open_store(args.root)
    for step in sorted(store.list_children(), key=int):
        committed = store.exists(f"{step}/COMMIT")
        print(f"   step {step:>3}: " + ("committed" if committed else
                                        "NOT committed (debris of the killed save, invisible)"))
    latest = ckpt.CheckpointManager(args.root).latest_step()
    print(f"   latest committed step: {latest}")

    print(f"== run 2: 4x2 mesh, resumes from the latest committed step; SIGTERM (preemption) "
          f"after step {args.term_after}")
    second = _start("4x2", args, pace=0.05)
    assert second.stdout is not None
    lines2 = []
    for line in second.stdout:
        print("   | " + line.rstrip())
        lines2.append(line)
        if line.startswith(f"step {args.term_after:3d} "):
            second.send_signal(signal.SIGTERM)
    if second.wait() != 0:
        print("run 2 failed", file=sys.stderr)
        return 1
    preempted = [int(line.split()[2]) for line in lines2 if line.startswith("preempted:")]

    print("== run 3: 1x8 mesh, resumes from the preemption checkpoint")
    third = _start("1x8", args)
    assert third.stdout is not None
    lines3 = []
    for line in third.stdout:
        print("   | " + line.rstrip())
        lines3.append(line)
    if third.wait() != 0:
        print("run 3 failed", file=sys.stderr)
        return 1

    before, after, last = _losses(lines1), _losses(lines2), _losses(lines3)
    overlap = sorted(set(before) & set(after))
    print("== loss curve across the SIGKILL restart")
    for step in overlap:
        print(f"   step {step:3d}: run 1 {before[step]:.6f}   run 2 {after[step]:.6f}")
    worst = max((abs(before[s] - after[s]) / before[s] for s in overlap), default=0.0)
    resumed = min(after) - 1 if after else None
    resumed3 = min(last) - 1 if last else None
    # If the save won the race against SIGKILL, run 2 starts where run 1 stopped and there
    # are no re-run steps to compare; the resume point must still be the latest commit.
    ok = (resumed == latest and worst < 1e-3 and (bool(overlap) or latest == args.kill_at)
          and len(preempted) == 1 and resumed3 == preempted[0] and max(last) == args.steps)
    print(f"== run 2 resumed at step {resumed} (latest committed: {latest}); max relative loss "
          f"difference on re-run steps {worst:.2e}")
    print(f"== run 2 was preempted at step {preempted[0] if preempted else None}; run 3 resumed "
          f"at step {resumed3} and finished at {max(last) if last else None}; "
          f"total {time.perf_counter() - t_start:.0f} s")
    print("== OK: no step lost, the loss curve continues across SIGKILL, SIGTERM and three "
          "meshes" if ok else "== FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--train", action="store_true", help="run one trainer (internal)")
    parser.add_argument("--mesh", default="2x4")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--kill-at", type=int, default=40)
    parser.add_argument("--term-after", type=int, default=45)
    parser.add_argument("--pace", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=os.path.join(os.getcwd(), "checkpoints"))
    args = parser.parse_args()
    if args.train:
        train(args)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
