"""Resident memory of this process, for the child scripts that measure it
(tests/children/peak_rss.py, restore_rss_child.py, save_rss_child.py)."""


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (``VmRSS``, ``VmHWM``) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def reset_peak() -> None:
    """Resets the peak resident set size (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
