"""Saves 256 MiB (8 arrays on a 2x4 mesh of CPU devices) to argv[1] with ``snapshot=argv[2]``
and a 32 MiB budget, and prints as its last line how far resident memory rose above where it
stood once the state was built, the state's bytes, the budget and the save's
`host_peak_bytes`: ``EXTRA_RSS_BYTES n STATE_BYTES m BUDGET b PEAK p``."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ckpt  # noqa: E402
from tests.helpers.proc_status import reset_peak, status_bytes  # noqa: E402
from tests.helpers.saves import timings  # noqa: E402

url, mode = sys.argv[1], sys.argv[2]
budget = 32 << 20
mesh = jax.make_mesh((2, 4), ("data", "model"))
sharding = NamedSharding(mesh, P("data", "model"))
state = {}
for i in range(8):
    # Built on the devices: no host copy of the state stays behind.
    state[f"w{i}"] = jax.jit(lambda i=i: jax.numpy.full((2048, 4096), float(i), "float32"),
                             out_shardings=sharding)()
jax.block_until_ready(state)
ckpt.save(url + "-warm", {"x": np.ones(4)})  # first-use imports and thread pools
reset_peak()
base = status_bytes("VmRSS")
handle = ckpt.save_async(url, state, snapshot=mode, memory_budget=budget)
handle.wait()
extra = status_bytes("VmHWM") - base
nbytes = sum(v.nbytes for v in state.values())
print(f"EXTRA_RSS_BYTES {extra} STATE_BYTES {nbytes} BUDGET {budget} "
      f"PEAK {timings(handle).host_peak_bytes}")
