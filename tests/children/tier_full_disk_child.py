"""Child of the local tier's full-disk test (tests/runs/test_tier_protocol.py); run inside
``unshare -rm`` (a private mount namespace, as a mapped root) so it can mount a small tmpfs
as the local tier without touching the machine.

Usage: python tier_full_disk_child.py MOUNTPOINT ROOT PERSIST_EVERY. Saves steps 1-5 of a
3 MiB state into a tier on an 8 MiB disk (room for two copies, not three) and prints one JSON
line: how each save ended, the steps each tier holds, whether every listed step restores
exactly, and the warnings logged.
"""

import json
import logging
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import numpy as np  # noqa: E402

import ckpt  # noqa: E402
from tests.helpers.saves import started  # noqa: E402


def state(step):
    return {"x": np.random.default_rng(step).standard_normal(3 * 2**20 // 8), "step": step}


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main():
    mnt, root, persist_every = sys.argv[1], sys.argv[2], int(sys.argv[3])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt], check=True)
    local = os.path.join(mnt, "local")
    warnings = Warnings()
    logging.getLogger("ckpt").addHandler(warnings)
    outcomes = {}
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=2,
                                persist_every=persist_every) as mgr:
        for step in range(1, 6):
            handle = started(mgr.save(step, state(step)))
            try:
                handle.wait()
                if handle.remote is not None:
                    handle.remote.wait()
                outcomes[step] = "ok"
            except ckpt.CkptError as exc:
                outcomes[step] = f"{type(exc).__name__}: {exc}"
    with ckpt.CheckpointManager(root, local_dir=local, local_keep=2,
                                persist_every=persist_every) as mgr:
        steps = mgr.steps()
        exact = all(np.array_equal(mgr.restore(s)["x"], state(s)["x"]) for s in steps)
    print(json.dumps({
        "outcomes": outcomes, "steps": steps, "exact": exact,
        "root": sorted(int(s) for s in os.listdir(root) if s.isdigit()
                       and os.path.exists(os.path.join(root, s, "COMMIT"))),
        "local": sorted(int(s) for s in os.listdir(local) if s.isdigit()
                        and os.path.exists(os.path.join(local, s, "COMMIT"))),
        "warnings": warnings.lines}))


if __name__ == "__main__":
    main()
