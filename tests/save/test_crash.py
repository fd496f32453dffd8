"""SIGKILL of a saving process at many moments, on local disk, S3 and GCS: committed steps
survive, the interrupted step is whole or invisible, and the next manager removes the debris."""

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgpack
import numpy as np
import pytest

import ckpt
from ckpt import cli
from ckpt.storage import open_store
from tests.children import script
from tests.conftest import backend_url
from tests.helpers.crash_state import host_state, make_state
from tests.helpers.faultproxy import FaultProxy

CHILD = script("crash_child")
POINTS = ["chunk:1", "chunk:7", "chunk:20", "after_report", "after_manifest", "before_commit",
          "after_claim", "after_commit"]
DELAY_SEEDS = range(6)


# Where the child's store requests go, per backend (the parent keeps the server's own).
ENDPOINT_VARS = {"s3": ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"),
                 "gcs": ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}


@dataclass
class RunRoot:
    """A root holding committed steps 0 and 1, and how a child process reaches it.

    On an object store the child talks to the server through a proxy. A server may finish a
    PUT whose sender was killed after the restarted job listed the debris (fake-gcs-server
    did, up to ~1 s after the kill): that is the server's property, not the library's, and
    such an object lands only in the dead attempt's folder. Draining the proxy once the
    child is dead makes every request it sent finish before the checks start."""

    url: str
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    proxy: FaultProxy | None = None

    def quiesce(self) -> None:
        """Called once the child is dead: returns when the server has done all it sent."""
        if self.proxy is not None:
            self.proxy.drain()
            assert sum(self.proxy.counts.values()) > 0, "the child bypassed the proxy"


@pytest.fixture(params=["local", "s3", "gcs"])
def run_root(request, tmp_path) -> Iterator[RunRoot]:
    backend = request.param
    run = RunRoot(backend_url(request, tmp_path, backend))
    with ckpt.CheckpointManager(run.url, keep_last=None) as mgr:
        for step in (0, 1):
            mgr.save(step, make_state(step))
    with contextlib.ExitStack() as stack:
        if backend in ENDPOINT_VARS:
            server = request.getfixturevalue(f"{backend}_server")
            run.proxy = stack.enter_context(FaultProxy(server.endpoint))
            run.env.update(dict.fromkeys(ENDPOINT_VARS[backend], run.proxy.endpoint))
        yield run


def _assert_exact(out, step):
    expected = host_state(step)
    assert out["step"] == step
    for k, v in expected.items():
        if isinstance(v, dict):
            for n, a in v.items():
                assert np.asarray(out[k][n]).tobytes() == a.tobytes(), (step, k, n)


def _run_child(run, point, delay=None):
    proc = subprocess.Popen([sys.executable, CHILD, run.url, "2", point], env=run.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = None

    def kill_if_running() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)

    try:
        assert proc.stdout is not None and proc.stderr is not None  # PIPE
        line = proc.stdout.readline()
        assert line.strip() == "SAVING", proc.stderr.read()
        if delay is not None:
            timer = threading.Timer(delay, kill_if_running)
            timer.start()
        out, err = proc.communicate(timeout=120)
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run.quiesce()
    return proc.returncode, out, err


def _claimed_for_commit(store):
    """Whether step 2 is uncommitted with its attempt claimed for commit: a kill at a random
    moment can land between the claim and COMMIT."""
    if store.exists("2/COMMIT"):
        return False
    claims = [store.read(f"2/claims/{name}") for name in store.list_children("2/claims")]
    return any(msgpack.unpackb(raw).get("claim") == "commit" for raw in claims)


def _check_after_crash(root, claimed=False):
    """``claimed``: the dead save had claimed its attempt for commit, so no clean-up may
    remove it (it could still commit, as far as anyone can tell); `ckpt gc --claimed` does.
    One start of a manager removes all the debris."""
    store = open_store(root)

    def leftovers(steps):
        out = {}
        for step in store.list_children():
            attempts = [n for n in store.list_children(step) if n.startswith("attempt-")]
            kept = 1 if int(step) in steps or (claimed and step == "2") else 0
            if len(attempts) != kept:
                out[step] = (attempts, [store.list(f"{step}/{a}") for a in attempts])
        return out

    mgr = ckpt.CheckpointManager(root, keep_last=None)
    mgr.close()  # waits for start-up debris removal
    steps = mgr.steps()
    assert steps in ([0, 1], [0, 1, 2])
    left = leftovers(steps)
    assert not left, left
    for step in steps:
        _assert_exact(mgr.restore(step), step)
    if claimed:
        assert cli.main(["gc", str(root), "--claimed", "--grace", "0"]) == 0
        assert [n for n in store.list_children("2") if n.startswith("attempt-")] == []
    return mgr, steps


def _resume(mgr, steps):
    mgr = ckpt.CheckpointManager(mgr.root_url, keep_last=None)  # the checking one is closed
    if 2 not in steps:
        mgr.save(2, make_state(2)).wait()
    _assert_exact(mgr.restore(), 2)
    mgr.close()


@pytest.mark.parametrize("point", POINTS)
def test_kill_at_protocol_point(run_root, point):
    code, _, err = _run_child(run_root, point)
    assert code == -signal.SIGKILL, err
    mgr, steps = _check_after_crash(run_root.url, claimed=point == "after_claim")
    # A kill before COMMIT exists leaves step 2 invisible; after it, step 2 is whole.
    assert (2 in steps) == (point == "after_commit")
    _resume(mgr, steps)


@pytest.mark.parametrize("seed", DELAY_SEEDS)
def test_kill_at_random_moment(run_root, seed):
    delay = random.Random(seed).uniform(0.0, 0.1)  # a local save here takes ~50 ms
    code, out, err = _run_child(run_root, "none", delay)
    assert code in (0, -signal.SIGKILL), err
    claimed = _claimed_for_commit(open_store(run_root.url))
    mgr, steps = _check_after_crash(run_root.url, claimed=claimed)
    if code == 0:
        assert "DONE" in out
        assert 2 in steps
    _resume(mgr, steps)
