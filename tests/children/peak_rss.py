"""Runs ``ckpt`` with the given arguments in this process and prints, as the last line of
stderr, how far its resident memory rose above where it stood once everything was imported:
``EXTRA_RSS_KIB n``. The peak is reset first (/proc/self/clear_refs), so import-time spikes
do not count. Used to measure `ckpt reshard`'s memory bound."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(os.path.join(__file__, "..", "..", "..")))  # the repository

import jax  # noqa: E402,F401
import tensorstore  # noqa: E402,F401

from ckpt.cli import main  # noqa: E402
from tests.helpers.proc_status import reset_peak, status_bytes  # noqa: E402

reset_peak()
base = status_bytes("VmRSS") // 1024
code = main(sys.argv[1:])
print(f"EXTRA_RSS_KIB {status_bytes('VmHWM') // 1024 - base}", file=sys.stderr)
sys.exit(code)
