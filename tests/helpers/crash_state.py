"""The deterministic training state the crash tests save: a function of the step alone."""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def host_state(step):
    rng = np.random.default_rng(step)
    return {f"layer{i}": {"w": rng.standard_normal((256, 1024)).astype(np.float32),
                          "b": rng.standard_normal(1024).astype(np.float32)}
            for i in range(6)} | {"step": step}


def make_state(step):
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    specs = {"w": P("data", "model"), "b": P()}
    return {k: ({n: jax.device_put(a, NamedSharding(mesh, specs[n])) for n, a in v.items()}
                if isinstance(v, dict) else v) for k, v in host_state(step).items()}
