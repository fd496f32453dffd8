"""Child process of the crash tests: saves one step and dies by SIGKILL at a chosen moment.

Usage: python crash_child.py ROOT STEP POINT
POINT is ``none`` (the parent kills at a moment of its choosing), ``chunk:K`` (once the K-th
chunk write is durable), ``after_report``, ``after_manifest``, ``before_commit`` (before the
commit claim), ``after_claim`` (the claim is made, COMMIT is not) or ``after_commit``. The
faults are injected by the store the manager is given (`tests.helpers.faults.FaultyStore`).
Works on every backend: the store is reached through the environment of the parent.
"""

import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import ckpt  # noqa: E402
from ckpt.storage import Op  # noqa: E402
from tests.helpers.crash_state import make_state  # noqa: E402
from tests.helpers.faults import FaultyStore, is_chunk_write  # noqa: E402


def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)


def dying_store(root, point):
    """The manager's store, which kills this process at ``point``."""
    if point.startswith("chunk:"):
        limit, count = int(point.split(":")[1]), [0]

        def after(doing, key, args):
            if is_chunk_write(doing):
                count[0] += 1
                if count[0] == limit:
                    die()

        return FaultyStore(root, after=after)
    if point in ("after_report", "after_manifest"):
        suffix = "hosts/0.msgpack" if point == "after_report" else "manifest.msgpack"
        return FaultyStore(root, after=lambda doing, key, args:
                           die() if doing == Op.WRITE and key.endswith(suffix) else None)
    if point == "before_commit":
        return FaultyStore(root, before=lambda doing, key, args:
                           die() if doing == Op.CREATE else None)
    if point in ("after_claim", "after_commit"):
        return FaultyStore(root, after=lambda doing, key, args: die() if doing == Op.CREATE and (
            point == "after_claim" or key.endswith("COMMIT")) else None)
    if point != "none":
        raise SystemExit(f"unknown point {point}")
    return root


def main():
    root, step, point = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    mgr = ckpt.CheckpointManager(dying_store(root, point), keep_last=None)
    state = make_state(step)
    print("SAVING", flush=True)
    mgr.save(step, state)
    mgr.wait()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
