"""``python -m ckpt``: the same as the ``ckpt`` command."""

import sys

from ckpt.cli import main

sys.exit(main())
