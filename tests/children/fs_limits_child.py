"""Child of the full/read-only disk test; run inside ``unshare -rm`` (a private mount
namespace, as a mapped root) so it can mount a tiny tmpfs without touching the machine.

Usage: python fs_limits_child.py MOUNTPOINT. Prints one JSON line with what happened.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import numpy as np  # noqa: E402

import ckpt  # noqa: E402
from tests.helpers.saves import started  # noqa: E402


def attempt(root, big):
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    out: dict[str, object] = {}
    try:
        started(mgr.save(2, big)).wait()
        out.update(error_type=None, error="")
    except ckpt.CkptError as exc:
        out.update(error_type=type(exc).__name__, error=str(exc))
    mgr = ckpt.CheckpointManager(root, keep_last=None)
    out["steps_after"] = mgr.steps()
    out["commit_2"] = os.path.exists(os.path.join(root, "2", "COMMIT"))
    restored = mgr.restore(1)
    out["step1_exact"] = bool((restored["x"] == np.arange(100_000)).all())
    return out


def main():
    mnt = sys.argv[1]
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", mnt], check=True)
    root = os.path.join(mnt, "run")
    with ckpt.CheckpointManager(root, keep_last=None) as mgr:
        mgr.save(1, {"x": np.arange(100_000)})          # 0.8 MiB: fits
    big = {"x": np.random.default_rng(0).standard_normal(1_000_000)}  # 8 MiB: does not
    result = {"full": attempt(root, big)}
    subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
    result["read_only"] = attempt(root, {"x": np.arange(10)})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
