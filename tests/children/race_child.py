"""Child of the commit-race tests: saves its own state to a shared URL when told to.

Usage: python race_child.py URL ID. Prints READY once imported, waits for a line on stdin,
saves, then prints WON or LOST <error type>.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import numpy as np  # noqa: E402

import ckpt  # noqa: E402


def main():
    url, who = sys.argv[1], int(sys.argv[2])
    tree = {"who": who, "x": np.full(300_000, who, dtype=np.int32)}
    print("READY", flush=True)
    sys.stdin.readline()
    try:
        ckpt.save(url, tree)
        print("WON", flush=True)
    except (ckpt.errors.CommitConflictError, ckpt.CheckpointExistsError) as exc:
        print("LOST", type(exc).__name__, flush=True)


if __name__ == "__main__":
    main()
