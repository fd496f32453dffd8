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


# -- backends ---------------------------------------------------------------------------
# Every backend-parametrised test runs against local disk, memory, and real S3 and GCS
# protocol servers started here (child processes on 127.0.0.1, free ports).

BUCKET = "ckpt-tests"
BACKENDS = ["local", "memory", "s3", "gcs"]


def _serve(start):
    with start() as server:
        os.environ.update(server.env)
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def s3_server():
    from tools import servers

    yield from _serve(servers.s3_server)


@pytest.fixture(scope="session")
def gcs_server():
    from tools import servers

    yield from _serve(servers.gcs_server)


def backend_url(request, tmp_path, backend):
    """A fresh, empty root URL on ``backend``. A test that starts a server this way must be
    marked slow (the inner loop starts none): an unmarked one fails, naming itself."""
    import secrets

    if backend in REMOTE_BACKENDS and request.node.get_closest_marker("slow") is None:
        pytest.fail(f"{request.node.nodeid} starts the {backend} server: mark it "
                    "@pytest.mark.slow (tests/conftest.py, speed)", pytrace=False)

    token = secrets.token_hex(6)
    if backend == "local":
        return str(tmp_path / f"root-{token}")
    if backend == "memory":
        return f"memory://mem-{token}/root"
    if backend == "s3":
        request.getfixturevalue("s3_server")
        return f"s3://{BUCKET}/{token}"
    request.getfixturevalue("gcs_server")
    return f"gs://{BUCKET}/{token}"


@pytest.fixture(params=BACKENDS)
def root_url(request, tmp_path):
    return backend_url(request, tmp_path, request.param)


# What a rewrite holds beside the chunk data its --memory-budget bounds: Python objects,
# TensorStore's own buffers, allocator arenas. `ckpt convert` with a 32 MiB budget rose
# 33 MiB here, and by 1 MiB more or less as imports moved the heap.
RSS_OVERHEAD = 4 << 20


def cli_extra_rss(args, timeout=300):
    """Runs ``ckpt ARGS`` in a fresh process (tests/children/peak_rss.py) and returns how
    many bytes its resident memory rose above where it stood once everything was imported."""
    import subprocess
    import sys

    from tests.children import script

    run = subprocess.run([sys.executable, script("peak_rss"), *args],
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr
    return int(run.stderr.strip().splitlines()[-1].split()[1]) * 1024


# -- speed ----------------------------------------------------------------------------------
# `slow`: a test that starts a process or a protocol server, or waits on one. The inner loop
# (`tools/dev test -m "not slow"`, CONTRIBUTING.md) leaves them out; `tools/dev test` runs
# everything. Marked here by what a test uses (a process-starting module, a parameter naming
# a remote backend, a server fixture), so that a new test is classed the same way; a test
# elsewhere that starts a process carries `@pytest.mark.slow` itself.
SLOW_MODULES = {"tests.save.test_multiprocess", "tests.save.test_crash",
                "tests.save.test_deadlines", "tests.runs.test_tier_protocol",
                "tests.runs.test_shared_roots", "tests.storage.test_object_stores",
                "tests.project.test_packaging", "tests.restore.test_memory"}
SERVER_FIXTURES = {"s3_server", "gcs_server", "proxied"}
REMOTE_BACKENDS = {"s3", "gcs"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts processes or servers, or trains a whole "
                                       "run (left out of the inner loop: -m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if (item.module.__name__ in SLOW_MODULES
                or SERVER_FIXTURES & set(getattr(item, "fixturenames", ()))
                or any(isinstance(v, str) and v in REMOTE_BACKENDS for v in params.values())):
            item.add_marker(pytest.mark.slow)
