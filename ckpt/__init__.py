"""Sharded, asynchronous, atomically committed checkpoints for JAX.

Public API::

    ckpt.save_async(url, tree, *, metadata=None) -> SaveHandle
    ckpt.save(url, tree, *, metadata=None)
    ckpt.restore(url, target=None, *, mesh=None)
    ckpt.metadata(url) -> CheckpointInfo
    ckpt.CheckpointManager(root_url, keep_last=None, keep_every=None, *, read_only=False)
        .save(step, tree, metrics=None) .restore(step=None, target=None, mesh=None)
        .delete(step) .rewind(step) .latest_step() .steps() .wait() .close()
    ckpt.configure_storage("s3" | "gs", **options)   # override endpoint/credential settings

See docs/format.md for the on-disk format and docs/protocol.md for the commit protocol.
"""

from __future__ import annotations

import os as _os


def _check_own_packages() -> None:
    """Refuses to run against another distribution's ``storage`` or ``restore`` package."""
    import restore as _restore_pkg
    import storage as _storage_pkg

    here = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for module in (_storage_pkg, _restore_pkg):
        where = _os.path.abspath(getattr(module, "__file__", None) or "<namespace>")
        if _os.path.dirname(_os.path.dirname(where)) != here:
            raise ImportError(
                f"the {module.__name__!r} package imported from {where} is not this library's "
                f"own (expected it in {here}); another file or package named "
                f"{module.__name__!r} shadows it on sys.path")


_check_own_packages()

from ckpt import errors  # noqa: E402
from ckpt._info import CheckpointInfo, LeafInfo, metadata  # noqa: E402
from ckpt._manager import CheckpointManager  # noqa: E402
from ckpt._restore import restore  # noqa: E402
from ckpt._save import SaveHandle, save, save_async  # noqa: E402
from storage import configure as configure_storage  # noqa: E402
from ckpt.errors import (  # noqa: E402
    AttemptRemovedError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    DeadlineExceededError,
    ReadOnlyError,
    SaveError,
    StepOrderError,
    TargetMismatchError,
    UnsupportedLeafError,
)

__all__ = [
    "AttemptRemovedError", "CheckpointExistsError", "CheckpointInfo", "CheckpointManager",
    "CheckpointNotFoundError", "CkptError", "CorruptCheckpointError", "DeadlineExceededError",
    "LeafInfo",
    "ReadOnlyError", "SaveError", "SaveHandle", "StepOrderError", "TargetMismatchError",
    "UnsupportedLeafError", "configure_storage", "errors", "metadata", "restore", "save",
    "save_async",
]
