"""What a save's type leaves open and a test knows: that a manager saved the step, that
a save committed."""

from ckpt import SaveHandle, SaveTimings


def started(handle: SaveHandle | None) -> SaveHandle:
    """``handle``, which the test knows is a save: `CheckpointManager.save` returns None
    for a step its save policy skips, and a handle's ``remote`` is None for a step kept on
    the local tier only."""
    if handle is None:
        raise AssertionError("no save was started: the step was skipped or kept locally")
    return handle


def timings(handle: SaveHandle) -> SaveTimings:
    """The timings of ``handle``'s save, which committed (its ``wait`` returned)."""
    if handle.timings is None:
        raise AssertionError(f"the save of {handle.describe()} has not committed")
    return handle.timings
