"""Child process of tests/runs/test_shared_roots.py: one job on a shared root.

Usage: python shared_root_child.py MODE URL [STEP]

- ``save-stop-before-claim`` / ``save-stop-after-claim``: a manager job saves STEP (state of
  tests/helpers/crash_state.py) and stops itself (SIGSTOP, a paused process) just before its commit
  claim or just after it, until the parent continues it and writes a line to its stdin;
  prints ``DONE`` or ``FAILED <error type>``.
- ``exit-without-wait``: `ckpt.save_async` then return from main; ``sys-exit``: the same
  with `sys.exit(0)`; ``exit-failing``: a save whose chunk writes fail, then return.
- ``interrupt-wait``: the commit waits for SIGUSR1; prints ``WAITING`` and waits for the save
  (the parent sends SIGINT, then SIGUSR1).
- ``sigterm``: SIGTERM handler chaining and removal; prints a JSON report.
- ``sigterm-twice``: the first SIGTERM is a preemption, the second ends the process.
"""

import json
import os
import signal
import sys
import threading

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import numpy as np  # noqa: E402

import ckpt  # noqa: E402
from tests.helpers.crash_state import make_state  # noqa: E402
from tests.helpers.faults import FaultyStore, fail_background, is_commit_claim  # noqa: E402


def stop_around_claim(url, after):
    """``url``'s store, whose committer stops just before (or after) its commit claim."""
    def stop(doing, key, args):
        # Stopped, then held until the parent says go on stdin: a stray SIGCONT (the kernel
        # sends one to stopped processes of a process group that becomes orphaned) must not
        # let the paused job run early.
        if is_commit_claim(doing, key, args):
            os.kill(os.getpid(), signal.SIGSTOP)
            sys.stdin.readline()

    return FaultyStore(url, **{"after" if after else "before": stop})


def sigterm_report():
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGTERM, mine)
    report = {}
    ro = ckpt.CheckpointManager(sys.argv[2], read_only=True)
    report["read_only_leaves_handler"] = signal.getsignal(signal.SIGTERM) is mine
    ro.close()
    a = ckpt.CheckpointManager(sys.argv[2])
    b = ckpt.CheckpointManager(sys.argv[2])
    report["installed"] = signal.getsignal(signal.SIGTERM) is not mine
    os.kill(os.getpid(), signal.SIGTERM)
    report["chained"] = seen == [signal.SIGTERM]
    report["preempted"] = a.reached_preemption(0) and b.reached_preemption(0)
    a.close()
    report["kept_while_one_open"] = signal.getsignal(signal.SIGTERM) is not mine
    b.close()
    report["restored"] = signal.getsignal(signal.SIGTERM) is mine
    # A manager closed off the main thread cannot put the handler back; the next manager
    # must still chain to the user's handler and survive the first SIGTERM.
    c = ckpt.CheckpointManager(sys.argv[2])
    closer = threading.Thread(target=c.close)
    closer.start()
    closer.join()
    d = ckpt.CheckpointManager(sys.argv[2])
    report["fresh_after_close"] = not d.reached_preemption(0)
    os.kill(os.getpid(), signal.SIGTERM)
    report["chained_after_thread_close"] = seen == [signal.SIGTERM] * 2
    report["preempted_after_thread_close"] = d.reached_preemption(1)  # asked once per step
    d.close()
    report["restored_after_thread_close"] = signal.getsignal(signal.SIGTERM) is mine
    print(json.dumps(report), flush=True)


def main():
    mode, url = sys.argv[1], sys.argv[2]
    if mode.startswith("save-stop-"):
        mgr = ckpt.CheckpointManager(stop_around_claim(url, after=mode.endswith("after-claim")))
        try:
            mgr.save(int(sys.argv[3]), make_state(int(sys.argv[3])))
            mgr.wait()
        except ckpt.CkptError as exc:
            print("FAILED", type(exc).__name__, exc, flush=True)
            return
        print("DONE", flush=True)
    elif mode in ("exit-without-wait", "sys-exit"):
        ckpt.save_async(url, {"x": np.arange(1000), "y": make_state(3)["layer0"]})
        if mode == "sys-exit":
            sys.exit(0)
    elif mode == "exit-failing":
        ckpt.save_async(FaultyStore(url, before=fail_background(OSError("disk on fire"))),
                        {"x": np.arange(1000)})
    elif mode == "interrupt-wait":
        gate = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: gate.set())
        def hold(doing, key, args):
            if is_commit_claim(doing, key, args):
                gate.wait()

        handle = ckpt.save_async(FaultyStore(url, before=hold), {"x": np.arange(1000)})
        print("WAITING", flush=True)
        handle.wait()
    elif mode == "sigterm":
        sigterm_report()
    elif mode == "sigterm-twice":
        mgr = ckpt.CheckpointManager(url)
        os.kill(os.getpid(), signal.SIGTERM)
        print("PREEMPTED", mgr.reached_preemption(0), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # ends the process as the default action does
        print("STILL ALIVE", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
