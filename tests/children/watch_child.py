"""A trainer and an evaluator on one manager root, for the watch tests.

Usage:
    python watch_child.py trainer ROOT BRANCH FIRST LAST [rewind]
        saves steps FIRST..LAST (keep_last=2), each an array of ``step + 1000 * BRANCH``;
        with ``rewind``, rewinds to the oldest step kept first and saves from the step
        after it; prints ``committed STEP`` once each commits.
    python watch_child.py evaluator ROOT OUT LAST
        follows the root with `CheckpointManager.watch` and restores each step it yields,
        appending one JSON line per step to OUT (``value``, or ``removed`` when retention
        removed it meanwhile, or ``error``); stops after step LAST.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import numpy as np  # noqa: E402

import ckpt  # noqa: E402


def trainer(root: str, branch: int, first: int, last: int, rewind: bool) -> None:
    with ckpt.CheckpointManager(root, keep_last=2, watch_preemption=False) as mgr:
        if rewind:
            oldest = mgr.steps()[0]
            mgr.rewind(oldest)
            first = oldest + 1
        for step in range(first, last + 1):
            # Large enough that a save spans many chunk writes (a kill lands inside one).
            mgr.save(step, {"x": np.full((512, 1024), step + 1000 * branch, np.int64)})
            mgr.wait()
            print(f"committed {step}", flush=True)


def evaluator(root: str, out: str, last: int) -> None:
    mgr = ckpt.CheckpointManager(root, read_only=True, watch_preemption=False)
    print("watching", flush=True)
    with open(out, "a") as f:
        for step in mgr.watch(poll_s=0.02, timeout_s=120):
            record: dict = {"step": step}
            try:
                record["value"] = int(mgr.restore(step)["x"][0, 0])
            except ckpt.CheckpointNotFoundError as exc:
                record["removed"] = str(exc)
            except Exception as exc:  # recorded for the test to fail on, with its text
                record["error"] = f"{type(exc).__name__}: {exc}"
            f.write(json.dumps(record) + "\n")
            f.flush()
            if step == last:
                return
    sys.exit(f"the watch ended before step {last}")


if __name__ == "__main__":
    if sys.argv[1] == "trainer":
        trainer(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]),
                sys.argv[6:] == ["rewind"])
    else:
        evaluator(sys.argv[2], sys.argv[3], int(sys.argv[4]))
