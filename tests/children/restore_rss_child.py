"""Restores the checkpoint at argv[1] (saved on a 2x4 mesh) onto argv[2] -- ``same``, ``4x2``
or ``1dev`` -- in this process (with argv[3], if given, as the restore's ``memory_budget``
in bytes), and prints as its last line how far resident memory rose
above where it stood before the restore (the second one) and the restored state's bytes:
``EXTRA_RSS_BYTES n STATE_BYTES m``."""

import ctypes
import gc
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, SingleDeviceSharding  # noqa: E402

import ckpt  # noqa: E402
from tests.helpers.proc_status import reset_peak, status_bytes  # noqa: E402

url, kind = sys.argv[1], sys.argv[2]
budget = int(sys.argv[3]) if len(sys.argv) > 3 else None
devices = jax.devices()
info = ckpt.metadata(url)
mesh = target = None
if kind == "1dev":
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=SingleDeviceSharding(devices[0]))
        if isinstance(s, jax.ShapeDtypeStruct) else s, info.tree)
else:
    mesh = Mesh(np.array(devices).reshape((2, 4) if kind == "same" else (4, 2)),
                ("data", "model"))
# A first restore pays once for what a fresh process sets up on first use (thread pools,
# device buffers' allocator); the second one measures what a restore itself needs.
jax.block_until_ready(ckpt.restore(url, target, mesh=mesh, memory_budget=budget))
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap must not hide new allocations
reset_peak()
base = status_bytes("VmRSS")
out = jax.block_until_ready(ckpt.restore(url, target, mesh=mesh, memory_budget=budget))
extra = status_bytes("VmHWM") - base
print(f"EXTRA_RSS_BYTES {extra} STATE_BYTES {info.nbytes}")
