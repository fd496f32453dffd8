"""Errors raised while reading checkpoint data (see `ckpt.errors` for the whole hierarchy)."""

from __future__ import annotations

from ckpt.storage import CkptError


class CorruptCheckpointError(CkptError, ValueError):
    """Stored bytes do not match what the checkpoint promises (checksum, size, digest, shape).

    The message names the object, and for array data the leaf and chunk index.
    """
