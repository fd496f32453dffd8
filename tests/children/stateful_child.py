"""Child of the stateful-leaf tests: a training loop whose state holds a Grain iterator.

Usage: python stateful_child.py ROOT KIND LAST [KILL_AT]
KIND: ``map`` (a MapDataset iterator), ``loader0`` / ``loader2`` (a DataLoader with 0 or 2
worker processes). Resumes from ROOT's latest step if there is one, prints ``BATCH <step>
<values>`` for each step up to LAST, saving every step; with KILL_AT, SIGKILLs itself right
after step KILL_AT is committed.
"""

import os
import signal
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import grain  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

import ckpt  # noqa: E402
from tests.helpers.saves import started  # noqa: E402


def make_iterator(kind):
    if kind == "map":
        return iter(grain.MapDataset.range(1000).shuffle(seed=7).map(lambda x: x * 3).batch(4))
    sampler = grain.samplers.IndexSampler(num_records=400, shuffle=True, seed=11, num_epochs=1,
                                          shard_options=grain.sharding.NoSharding())
    loader = grain.DataLoader(data_source=list(range(400)), sampler=sampler,
                              operations=[grain.transforms.Batch(batch_size=4)],
                              worker_count=int(kind[-1]))
    return iter(loader)


def main():
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; this is not an absl program
    root, kind, last = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else None
    state = {"loader": make_iterator(kind), "step": 0}
    with ckpt.CheckpointManager(root) as mgr:
        if (latest := mgr.latest_step()) is not None:
            state = mgr.restore(latest, target=state)  # set_state on the fresh iterator
            print(f"RESUMED {latest}", flush=True)
        for step in range(state["step"] + 1, last + 1):
            batch = np.asarray(next(state["loader"]))
            print(f"BATCH {step} {' '.join(map(str, batch.tolist()))}", flush=True)
            state["step"] = step
            started(mgr.save(step, state)).wait()
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    sys.stdout.flush()
    os._exit(0)  # grain's worker processes need no orderly shutdown here


if __name__ == "__main__":
    main()
