"""Test set-up: 8 CPU devices per process, set before JAX is imported anywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh  # noqa: E402


@pytest.fixture
def devices():
    devs = jax.devices()
    assert len(devs) == 8, "tests need 8 CPU devices"
    return devs


def make_mesh(shape, names=("data", "model"), devices=None):
    devs = devices if devices is not None else jax.devices()
    n = int(np.prod(shape))
    return Mesh(np.array(devs[:n]).reshape(shape), names[:len(shape)])


@pytest.fixture
def mesh24(devices):
    return make_mesh((2, 4))
