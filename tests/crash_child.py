"""Child process of the crash tests: saves one step and dies by SIGKILL at a chosen moment.

Usage: python crash_child.py ROOT STEP POINT
POINT is ``none`` (the parent kills at a moment of its choosing), ``chunk:K`` (after the K-th
chunk write is issued), ``after_report``, ``after_manifest``, ``before_commit`` (before the commit claim),
``after_claim`` (the claim is made, COMMIT is not) or ``after_commit``. The faults are injected by wrapping library functions here, in the test.
Works on every backend: the store is reached through the environment of the parent.
"""

import os
import signal
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ckpt  # noqa: E402
import ckpt._attempt as attempt_mod  # noqa: E402
from ckpt.storage import Store  # noqa: E402
from tests.crash_state import make_state  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def inject(point):
    if point.startswith("chunk:"):
        limit, count = int(point.split(":")[1]), [0]
        real_crc = attempt_mod.google_crc32c.value

        class Crc:
            @staticmethod
            def value(data):
                count[0] += 1
                if count[0] == limit:
                    die()
                return real_crc(data)

        attempt_mod.google_crc32c = Crc
    elif point in ("after_report", "after_manifest"):
        suffix = "hosts/0.msgpack" if point == "after_report" else "manifest.msgpack"
        real_write = Store.write

        def write(self, key, data):
            real_write(self, key, data)
            if key.endswith(suffix):
                die()

        Store.write = write
    elif point in ("before_commit", "after_claim", "after_commit"):
        real_create = Store.write_if_absent

        def create(self, key, data):
            if point == "before_commit":
                die()
            created = real_create(self, key, data)
            if point == "after_claim" or key.endswith("COMMIT"):
                die()
            return created

        Store.write_if_absent = create
    elif point != "none":
        raise SystemExit(f"unknown point {point}")


def main():
    root, step, point = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    inject(point)
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    state = make_state(step)
    print("SAVING", flush=True)
    mgr.save(step, state)
    mgr.wait()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
