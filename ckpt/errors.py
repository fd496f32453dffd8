"""Every error this library raises on purpose, in one hierarchy.

Each class also subclasses the built-in exception a caller would naturally catch, so
``except FileNotFoundError`` works for a missing checkpoint. The classes are defined in the
lowest layer that raises them (``storage`` and ``restore`` cannot import ``ckpt``) and all are
exported here::

    CkptError
    ├── StorageError (OSError)                  an I/O or server error after retries
    │   ├── ObjectNotFoundError (FileNotFoundError)
    │   │   └── BucketNotFoundError             the bucket of an s3:// or gs:// URL
    │   ├── AccessDeniedError (PermissionError) credentials missing, wrong or insufficient
    │   ├── UnreadableObjectError               over a reader's size limit, or not a file
    │   └── DeadlineExceededError (TimeoutError)  a save or restore ran past its timeout_s
    ├── UnsupportedURLError (ValueError)        unknown scheme, malformed URL
    ├── InvalidArgumentError (ValueError)       an option, mesh, spec, size or rule that
    │                                           is not acceptable (names the argument)
    ├── MissingDependencyError (ImportError)    an s3:// or gs:// URL without its extra
    ├── InvalidKeyError (ValueError)            a storage key that could leave its root
    ├── CheckpointNotFoundError (FileNotFoundError)   nothing committed at the URL
    │   ├── NotACheckpointError                 the folder holds something else
    │   └── UncommittedCheckpointError          only attempts, no COMMIT
    ├── CheckpointExistsError (FileExistsError) saving over a committed checkpoint
    ├── StepOrderError (ValueError)             a manager save below its newest step
    ├── ReadOnlyError (PermissionError)         a write through a read-only manager
    ├── ManagerClosedError (RuntimeError)       a save, delete or rewind after close()
    ├── CorruptCheckpointError (ValueError)     digest, checksum or manifest mismatch
    ├── UnsupportedFormatError (ValueError)     a format version, or an Orbax layout or
    │                                           value type, this library cannot read
    ├── UnsupportedLeafError (TypeError)        a pytree leaf that cannot be saved
    ├── InvalidMetadataError (TypeError)        user metadata that is not plain data
    ├── TargetMismatchError (ValueError)        restore target disagrees with the checkpoint
    │   ├── MissingLeafError                    target leaf absent from the checkpoint
    │   ├── ShapeMismatchError
    │   ├── DtypeMismatchError                  a cast across kinds (float to int)
    │   └── MeshMismatchError                   mesh= lacks a saved axis name
    └── SaveError (RuntimeError)                a save failed in the background
        ├── CommitConflictError                 another attempt committed this checkpoint first
        ├── AttemptRemovedError                 a clean-up claimed the attempt before it committed
        ├── SaveCancelledError                  `SaveHandle.cancel` stopped it: nothing committed
        └── CoordinationError (TimeoutError)    processes did not meet in time
            └── CommitOutcomeUnknownError       whether the save committed is not known in
                                                time: its COMMIT decides

One warning: `UnshardedTargetWarning` (UserWarning), a restore target leaf without a sharding
(as `jax.eval_shape` makes them) restored onto the default device.
"""

from __future__ import annotations

from ckpt.restore._errors import CorruptCheckpointError
from ckpt.storage import (
    AccessDeniedError,
    BucketNotFoundError,
    CkptError,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidKeyError,
    MissingDependencyError,
    ObjectNotFoundError,
    StorageError,
    UnreadableObjectError,
    UnsupportedURLError,
)

__all__ = [
    "AccessDeniedError", "AttemptRemovedError", "BucketNotFoundError",
    "CheckpointExistsError", "CheckpointNotFoundError", "CkptError", "CommitConflictError",
    "CommitOutcomeUnknownError", "CoordinationError", "CorruptCheckpointError",
    "DeadlineExceededError", "DtypeMismatchError", "InvalidArgumentError", "InvalidKeyError",
    "InvalidMetadataError", "MeshMismatchError", "MissingDependencyError",
    "ManagerClosedError", "MissingLeafError", "NotACheckpointError", "ObjectNotFoundError",
    "ReadOnlyError",
    "SaveCancelledError", "SaveError", "ShapeMismatchError", "StepOrderError", "StorageError",
    "TargetMismatchError", "UncommittedCheckpointError", "UnreadableObjectError",
    "UnsupportedFormatError", "UnsupportedLeafError", "UnsupportedURLError",
]


class CheckpointNotFoundError(CkptError, FileNotFoundError):
    """No committed checkpoint at the URL (the message names the URL)."""


class NotACheckpointError(CheckpointNotFoundError):
    """The URL exists but holds neither a COMMIT nor checkpoint attempts."""


class UncommittedCheckpointError(CheckpointNotFoundError):
    """The URL holds save attempts but no COMMIT: an interrupted or in-flight save."""


class CheckpointExistsError(CkptError, FileExistsError):
    """A save targets a URL that already holds a committed checkpoint."""


class UnsupportedFormatError(CkptError, ValueError):
    """The checkpoint's format version is unknown to this library (likely newer), or an
    Orbax checkpoint uses a layout or value type it cannot read (the message names the file
    that shows it)."""


class UnsupportedLeafError(CkptError, TypeError):
    """A pytree leaf of a type that cannot be saved (the message names its key path)."""


class TargetMismatchError(CkptError, ValueError):
    """A restore target disagrees with the checkpoint (the message names the leaves)."""


class MissingLeafError(TargetMismatchError):
    """A target leaf has no counterpart in the checkpoint."""


class ShapeMismatchError(TargetMismatchError):
    """A target leaf's shape differs from the saved global shape."""


class MeshMismatchError(TargetMismatchError):
    """``mesh=`` lacks an axis name a saved PartitionSpec uses."""


class SaveError(CkptError, RuntimeError):
    """A save failed after `save_async` returned; raised by `SaveHandle.wait` and the next save."""


class CommitConflictError(SaveError):
    """Another attempt created COMMIT first; this attempt's data was not committed."""


class AttemptRemovedError(SaveError):
    """A clean-up (``ckpt gc``, another manager's debris removal) claimed this save's attempt
    for removal before its committer claimed it for commit; nothing was committed."""


class SaveCancelledError(SaveError):
    """The save was cancelled (`SaveHandle.cancel` or `CheckpointManager.cancel`, on any
    process of the job) before it committed: nothing was committed and its attempt was
    removed."""


class StepOrderError(CkptError, ValueError):
    """`CheckpointManager.save` of a step at or below the newest committed step of the run
    (the message names both and points to `CheckpointManager.rewind`)."""


class ReadOnlyError(CkptError, PermissionError):
    """A save, delete or rewind through a ``read_only=True`` manager."""


class ManagerClosedError(CkptError, RuntimeError):
    """A save, delete or rewind through a `CheckpointManager` after its ``close()``."""


class CoordinationError(SaveError, TimeoutError):
    """Processes did not meet in time (the message names the processes that did not arrive)."""


class CommitOutcomeUnknownError(CoordinationError):
    """Whether a save committed is not known in time: process 0 did not report its outcome
    and COMMIT does not name the save yet, or the save's deadline passed while COMMIT was
    being created. It may still commit: the checkpoint's COMMIT decides (``latest_step``,
    restore)."""


class InvalidMetadataError(CkptError, TypeError):
    """User metadata that is not plain msgpack data."""


class DtypeMismatchError(TargetMismatchError):
    """A target dtype the saved dtype cannot be cast to within its kind (e.g. float to int)."""


class UnshardedTargetWarning(UserWarning):
    """Restore target leaves without a sharding (a `jax.ShapeDtypeStruct` from
    `jax.eval_shape`) were restored as `jax.Array`s on this process's first device."""
