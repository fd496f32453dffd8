"""Runs ``ckpt`` with the given arguments in this process and prints, as the last line of
stderr, how far its resident memory rose above where it stood once everything was imported:
``EXTRA_RSS_KIB n``. The peak is reset first (/proc/self/clear_refs), so import-time spikes
do not count. Used to measure `ckpt reshard`'s memory bound."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402,F401
import tensorstore  # noqa: E402,F401

from ckpt.cli import main  # noqa: E402


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (VmHWM) to the current one
base = status("VmRSS")
code = main(sys.argv[1:])
print(f"EXTRA_RSS_KIB {status('VmHWM') - base}", file=sys.stderr)
sys.exit(code)
