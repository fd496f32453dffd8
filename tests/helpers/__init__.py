"""What several test modules share: fault-injecting stores (``faults``), a fault-injecting
HTTP proxy (``faultproxy``), checkpoint edits (``mutation``), the crash tests' states
(``crash_state``), a process's memory (``proc_status``) and what a save returned
(``saves``)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
"""The repository's root (docs/, tools/, pyproject.toml)."""
