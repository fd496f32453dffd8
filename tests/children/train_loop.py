"""A small but complete training loop used by the training-loop tests (child processes).

State: a Flax NNX model (with its nnx.Rngs state: typed keys), a Flax Linen model's params,
optax (adamw) states for both, a legacy uint32 key, the step, and data-loader state as plain
Python values. Every step's batch comes from the data-loader state, so a resumed run sees
the same data.

Usage:
    python train_loop.py ROOT run FIRST LAST    # train; save every 3 steps; print losses
    ... with CKPT_TEST_WAIT_SIGTERM=1 the loop announces each step and runs until preempted
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen, nnx  # noqa: E402

import ckpt  # noqa: E402


class NnxMlp(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(8, 16, rngs=rngs)
        self.b = nnx.Linear(16, 1, rngs=rngs)
        self.rngs = rngs  # typed-key RNG state that must round-trip with the model

    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))


class LinenMlp(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(1)(jax.nn.tanh(linen.Dense(16)(x)))


def fresh_state():
    model = NnxMlp(nnx.Rngs(params=0, dropout=1))
    # flax types split with two filters as if it could return any number of states.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    linen_model = LinenMlp()
    lparams = linen_model.init(jax.random.PRNGKey(2), jnp.ones((1, 8)))
    opt = optax.adamw(1e-2)
    state = {"nnx": {"params": params, "rest": rest}, "linen": lparams,
             "opt": {"nnx": opt.init(params), "linen": opt.init(lparams)},
             "legacy_key": jax.random.PRNGKey(7), "typed_key": jax.random.key(9),
             "step": 0, "loader": {"epoch": 0, "position": 0, "seed": 1234}}
    return graphdef, linen_model, opt, state


def batch(loader):
    key = jax.random.fold_in(jax.random.PRNGKey(loader["seed"]),
                             loader["epoch"] * 1000 + loader["position"])
    x = jax.random.normal(key, (32, 8))
    return x, jnp.sum(x, axis=1, keepdims=True) * 0.3


def make_step(graphdef, linen_model, opt):
    @jax.jit
    def step_fn(state, x, y):
        def loss_fn(params, lparams):
            model = nnx.merge(graphdef, params, state["nnx"]["rest"])
            pred = model(x) + linen_model.apply(lparams, x)
            return jnp.mean((pred - y) ** 2)

        loss, (g, lg) = jax.value_and_grad(loss_fn, argnums=(0, 1))(state["nnx"]["params"],
                                                                     state["linen"])
        upd, o1 = opt.update(g, state["opt"]["nnx"], state["nnx"]["params"])
        lupd, o2 = opt.update(lg, state["opt"]["linen"], state["linen"])
        noise = jax.random.normal(state["typed_key"], ()) * 0.0  # keys must round-trip
        new = dict(state)
        new["nnx"] = {"params": optax.apply_updates(state["nnx"]["params"], upd),
                      "rest": state["nnx"]["rest"]}
        new["linen"] = optax.apply_updates(state["linen"], lupd)
        new["opt"] = {"nnx": o1, "linen": o2}
        new["typed_key"] = jax.random.split(state["typed_key"])[0]
        new["legacy_key"] = jax.random.split(state["legacy_key"])[0]
        return new, loss + noise

    return step_fn


def main():
    root, first, last = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
    graphdef, linen_model, opt, state = fresh_state()
    wait_sigterm = os.environ.get("CKPT_TEST_WAIT_SIGTERM") == "1"
    mgr = ckpt.CheckpointManager(root, keep_last=None, save_every=3)
    latest = mgr.latest_step()
    if latest is not None:
        state = mgr.restore(latest, target=state)
        print(f"RESUMED {latest}", flush=True)
    step_fn = make_step(graphdef, linen_model, opt)
    step = state["step"] + 1 if latest is not None else first
    while step <= last or wait_sigterm:
        loader = state["loader"]
        x, y = batch(loader)
        state, loss = step_fn({**state, "loader": None, "step": None}, x, y)
        state["step"] = step
        state["loader"] = {**loader, "position": loader["position"] + 1}
        print(f"LOSS {step} {float(loss):.8f}", flush=True)
        if mgr.should_save(step):
            mgr.save(step, state)
        if mgr.reached_preemption(step):
            print(f"PREEMPTED {step}", flush=True)
            break
        step += 1
    mgr.close()


if __name__ == "__main__":
    main()
