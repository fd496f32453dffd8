"""Sharded, asynchronous, atomically committed checkpoints for JAX.

Public API::

    ckpt.save_async(url, tree, *, metadata=None) -> SaveHandle   # .wait() .done() .cancel()
    ckpt.save(url, tree, *, metadata=None)
    ckpt.restore(url, target=None, *, mesh=None, item=None)   # ours, Orbax, safetensors
    ckpt.metadata(url, *, timeout_s=None) -> CheckpointInfo
    ckpt.verify(url, *, memory_budget=..., timeout_s=None) -> VerifyReport     # ckpt verify
    ckpt.reshard(src, dst, *, mesh=None, rules=(), overwrite=False) -> ReshardResult
    ckpt.convert(src, dst, *, mesh=None, rules=(), overwrite=False) -> ReshardResult
    ckpt.diff(a, b, *, rtol=0, atol=0, only=()) -> DiffResult                     # ckpt diff
    ckpt.export_safetensors(url, dst, *, dtype=None, max_shard_size="5GB", names=None, ...)
    ckpt.PerProcess(value)                              # a leaf whose value differs per process
    ckpt.CheckpointManager(root_url, keep_last=None, keep_every=None, *, read_only=False)
        .save(step, tree, metrics=None) .restore(step=None, target=None, mesh=None, item=None)
        .delete(step) .rewind(step) .latest_step() .steps() .watch(after=None, timeout_s=None)
        .wait() .cancel() .close()
    ckpt.configure_storage("s3" | "gs", **options)   # override endpoint/credential settings

See docs/format.md for the on-disk format, docs/protocol.md for the commit protocol and
docs/safetensors.md for export and import of safetensors.
"""

import importlib as _importlib
import inspect as _inspect
import logging as _logging
import sys as _sys
import types as _types
from importlib import metadata as _metadata
from typing import Any as _Any

from ckpt import errors
from ckpt._diff import DiffResult, LeafDiff, diff
from ckpt._export import ExportResult, export_safetensors
from ckpt._info import CheckpointInfo, LeafInfo, metadata
from ckpt._leaves import PerProcess
from ckpt._manager import CheckpointManager
from ckpt._reshard import ReshardResult, convert, reshard
from ckpt._restore import restore
from ckpt._save import SaveHandle, SaveTimings, save, save_async
from ckpt._verify import VerifyReport, verify

# Every error class of ckpt.errors, also at the top level (ckpt.ShapeMismatchError, ...).
from ckpt.errors import *  # noqa: F403
from ckpt.errors import __all__ as _error_names
from ckpt.storage import configure as configure_storage

# A library logs; the application decides what is shown (nothing, until it configures
# logging: no "last resort" output on stderr).
_logging.getLogger("ckpt").addHandler(_logging.NullHandler())

try:
    __version__ = _metadata.version("shardckpt")
except _metadata.PackageNotFoundError:  # run from a source tree that is not installed
    __version__ = "0+unknown"


class _RestorePackage(_types.ModuleType):
    """The type of `ckpt.restore`, which is two things by design: the subpackage (restore
    planning and reading: ``import ckpt.restore``, ``from ckpt.restore import plan_reads``)
    and the public function (``ckpt.restore(url, target)``). Importing a subpackage binds it
    as its parent's attribute, so one object must be both: calling the subpackage restores."""

    def __call__(self, *args: _Any, **kwargs: _Any) -> _Any:
        return _restore_fn(*args, **kwargs)

    def __reduce__(self) -> tuple[_Any, ...]:
        # Pickled by name (a function handed to a process pool, a deepcopy of a config).
        return (_importlib.import_module, (self.__name__,))


_restore_fn = restore
_sys.modules["ckpt.restore"].__class__ = _RestorePackage
_sys.modules["ckpt.restore"].__signature__ = (  # type: ignore[attr-defined]
    _inspect.signature(_restore_fn))
_sys.modules["ckpt.restore"].__doc__ = (
    f"{_sys.modules['ckpt.restore'].__doc__}\n"
    f"ckpt.restore{_inspect.signature(_restore_fn)}\n\n{_inspect.getdoc(_restore_fn)}")
restore = _sys.modules["ckpt.restore"]  # type: ignore[assignment]  # noqa: F811

__all__ = [
    "__version__", "CheckpointInfo", "CheckpointManager", "configure_storage", "errors",
    "convert", "diff", "DiffResult", "ExportResult", "export_safetensors", "LeafDiff",
    "LeafInfo", "metadata", "PerProcess",
    "reshard", "ReshardResult", "restore", "save", "save_async", "SaveHandle", "SaveTimings",
    "verify", "VerifyReport", *_error_names,
]
