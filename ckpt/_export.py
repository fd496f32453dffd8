"""Exporting a checkpoint as safetensors, laid out as Hugging Face lays them out.

`export_safetensors` reads any checkpoint this library reads (its own or Orbax's, on any
backend) and writes its array leaves as safetensors files to a folder on any backend: one
``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` files of at most
``max_shard_size`` bytes each plus ``model.safetensors.index.json``. It is an offline
rewrite: one process, no accelerator, host memory bounded by ``memory_budget``.

Each tensor is read in slabs (C-order-contiguous boxes aligned to the source's chunks) through
`ckpt.restore.read_arrays`, which checks every chunk against the checkpoint's checksums, and
streamed into its file (`Store.write_stream`: a file appears whole or not at all). The
index is written last, so a loader never sees an index naming a file not yet written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ckpt._format import DTYPE_SIZES, LeafKind, LeafRecord
from ckpt._leaves import decode_inline, dtype_from_name
from ckpt._names import NameRules, NamesLike, rules_from
from ckpt._reader import Readable, open_readable
from ckpt._safetensors import (
    DTYPES,
    EXPORT_ID,
    INDEX,
    NAMES,
    SINGLE_FILE,
    SUFFIX,
    Tensor,
    encode_header,
    read_file_header,
    store_kvstore,
)
from ckpt._tree import path_text
from ckpt.errors import CheckpointExistsError, InvalidArgumentError, UnsupportedLeafError
from ckpt.restore import read_arrays
from ckpt.restore.boxes import Box
from ckpt.storage import Store, StoreLike, open_store

log = logging.getLogger("ckpt.export")

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # "5GB", Hugging Face's default
DEFAULT_MEMORY_BUDGET = 256 << 20
FLOATS = frozenset({"float16", "bfloat16", "float32", "float64", "float8_e4m3fn",
                    "float8_e5m2"})
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40,
               "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _dtype_name(dtype: Any) -> str | None:
    """``dtype=`` as this library names it: ``"bfloat16"``, ``jnp.bfloat16``,
    ``np.float16`` or safetensors' ``"BF16"``; only floating-point dtypes."""
    if dtype is None:
        return None
    try:
        name = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in FLOATS:
        raise InvalidArgumentError(f"dtype {dtype!r}: floating-point tensors can be cast to "
                                   f"{', '.join(sorted(FLOATS))}")
    return str(name)


def parse_size(size: int | str) -> int:
    """``5GB`` (10^9 bytes, as Hugging Face counts), ``512MiB`` or ``512M`` (2^20, as
    ``--memory-budget`` counts), or bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        unit = found.group(2).upper() if found else "?"
        if found is None or unit not in _SIZE_UNITS:
            raise InvalidArgumentError(f"not a size: {size!r} (e.g. 5GB, 500MB, 2GiB)")
        value = int(float(found.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise InvalidArgumentError(f"size must be positive: {size!r}")
    return value


def size_text(nbytes: float) -> str:
    """``nbytes`` as a person reads it (``1.5 GiB``): what the CLI and `ckpt.diff`'s
    summary print; `parse_size` reads such text back."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What `export_safetensors` wrote.

    Attributes:
        url: the folder (or the file, for a ``.safetensors`` destination).
        files: the safetensors files written, in order (the index is not among them).
        tensors: tensor name -> the key path it came from (``params/w``).
        left_out: key path -> why that leaf is not a tensor.
        nbytes: tensor bytes written.
    """

    url: str
    files: list[str]
    tensors: dict[str, str]
    left_out: dict[str, str]
    nbytes: int


@dataclasses.dataclass(frozen=True)
class _Out:
    """One tensor to write: where it comes from and what it becomes."""

    record: LeafRecord
    name: str
    dtype: str           # as written (after --dtype)

    @property
    def nbytes(self) -> int:
        return math.prod(self.record.shape) * DTYPE_SIZES[self.dtype]


def _select(source: Readable, rules: NameRules, dtype: str | None
            ) -> tuple[list[_Out], dict[str, str]]:
    outs: list[_Out] = []
    left_out: dict[str, str] = {}
    by_name: dict[str, LeafRecord] = {}
    for rec in source.manifest.leaves:
        path = path_text(rec.path)
        if rec.kind not in (LeafKind.ARRAY, LeafKind.INLINE):
            left_out[path] = f"not an array ({rec.kind})"
            continue
        if rec.prng_impl:
            left_out[path] = "a PRNG key"
            continue
        name = rules.name(rec.path)
        if name is None:
            left_out[path] = f"name rule '{rules.left_out_by(rec.path)}'"
            continue
        if name in ("", "__metadata__"):
            raise InvalidArgumentError(
                f"leaf {path} would be tensor {name!r}, a name safetensors "
                "cannot hold: add a rename rule")
        if rec.dtype not in NAMES:
            raise UnsupportedLeafError(f"leaf {path} is {rec.dtype}, which safetensors cannot "
                                       "hold: leave it out with a 'drop' name rule")
        if name in by_name:
            raise InvalidArgumentError(
                f"leaves {path_text(by_name[name].path)} and {path} would both be "
                f"tensor {name!r}: add a rename rule")
        by_name[name] = rec
        outs.append(_Out(rec, name, dtype if dtype is not None and rec.dtype in FLOATS
                         else rec.dtype))
    return outs, left_out


def _shards(outs: Sequence[_Out], limit: int) -> list[list[_Out]]:
    """Tensors in tree order, a new file whenever the next would take one past ``limit``
    (a tensor larger than ``limit`` gets a file of its own), as Hugging Face splits them."""
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        if shards[-1] and size + out.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += out.nbytes
    return shards if shards[0] else []


def _slabs(shape: tuple[int, ...], chunk_shape: tuple[int, ...], itemsize: int,
           limit: int) -> Iterator[Box]:
    """Boxes covering ``shape`` in C order, each contiguous in C order and of at most
    ``limit`` bytes where one row allows it, aligned to the chunk grid where that fits."""
    if not shape:
        yield ()
        return
    if 0 in shape:
        return
    # The first dimension whose trailing block fits: slabs are 1 along the dimensions before
    # it, whole along those after it.
    d = next((i for i in range(len(shape)) if math.prod(shape[i + 1:]) * itemsize <= limit),
             len(shape) - 1)
    inner = math.prod(shape[d + 1:]) * itemsize
    step = max(1, limit // inner)
    chunk = chunk_shape[d] if d < len(chunk_shape) else 1
    if step >= chunk:
        step = step // chunk * chunk
    elif chunk * inner <= 2 * limit:
        step = chunk  # a slab of up to twice the limit beats reading each chunk twice
    tail = tuple((0, n) for n in shape[d + 1:])
    for lead in itertools.product(*(range(n) for n in shape[:d])):
        for start in range(0, shape[d], step):
            yield tuple((i, i + 1) for i in lead) + ((start, min(start + step, shape[d])),) + tail


def _bytes_of(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy, little-endian as written."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _tensor_bytes(source: Readable, out: _Out, slab_limit: int,
                  read_budget: int) -> Iterator[memoryview]:
    """The bytes of one tensor, slab by slab, checked as they are read."""
    rec = out.record
    what = f"{source.store.url} leaf {path_text(rec.path)}"
    target = dtype_from_name(out.dtype, what)
    if rec.kind == LeafKind.INLINE:
        small = decode_inline(rec, what)
        yield _bytes_of(np.ascontiguousarray(small.astype(target, copy=False)))
        return
    itemsize = max(dtype_from_name(rec.dtype, what).itemsize, target.itemsize)
    whole = source.read_job(rec, [])
    for box in _slabs(rec.shape, rec.chunk_shape, itemsize, slab_limit):
        [[slab]] = read_arrays([dataclasses.replace(whole, targets=[box])],
                               memory_budget=read_budget)
        if slab.dtype != target:
            slab = slab.astype(target)
        yield _bytes_of(slab)
        del slab


def _file_parts(source: Readable, tensors: Sequence[_Out], metadata: dict[str, str],
                budget: int, done: Callable[[int], None]) -> Iterator[memoryview | bytes]:
    # Larger items first, so that every tensor starts aligned to its item size (the
    # header is padded to a multiple of 8), as the safetensors package orders them.
    order = sorted(tensors, key=lambda o: -DTYPE_SIZES[o.dtype])
    placed, at = [], 0
    for out in order:
        placed.append(Tensor(out.name, out.dtype, out.record.shape, "", at, at + out.nbytes))
        at += out.nbytes
    yield encode_header(placed, metadata)
    for out in order:
        for part in _tensor_bytes(source, out, budget // 4, budget // 4):
            yield part
            done(len(part))


_OURS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _existing(folder: Store, single: str | None) -> list[str]:
    """What an export into ``folder`` would replace or leave stale: the files of an earlier
    export (``model.safetensors``, ``model-0000i-of-0000N.safetensors``, the index; never
    another model's files beside them, e.g. an adapter's), or ``single`` itself."""
    if single is not None:
        return [single] if folder.exists(single) else []
    return [c for c in folder.list_children() if _OURS.fullmatch(c)]


def export_safetensors(url: StoreLike, dst: StoreLike, *, dtype: Any = None,
                       max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                       names: NamesLike | NameRules = None, only: str | None = None,
                       item: str | None = None, metadata: dict[str, str] | None = None,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET, overwrite: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> ExportResult:
    """Writes the array leaves of the checkpoint at ``url`` as safetensors at ``dst``.

    Called on one process (any machine: no accelerator is used). Also ``ckpt export SRC DST
    --format safetensors``.

    Args:
        url: any checkpoint `ckpt.restore` reads (this library's, Orbax's).
        dst: a folder (Hugging Face layout: ``model.safetensors``, or sharded files and
            ``model.safetensors.index.json``), or a path ending in ``.safetensors`` for
            exactly that one file.
        dtype: cast floating-point tensors to this dtype (``"bfloat16"``, ``jnp.bfloat16``,
            ``"BF16"``, ``np.float16``...); integer and bool tensors are written as they are.
        max_shard_size: most bytes of tensors per file (``5GB``, ``500MB``, bytes); a
            tensor larger than that gets a file of its own.
        names: name rules after the defaults (docs/safetensors.md): how key paths become
            tensor names and which leaves are left out (optimizer and RNG state are, by
            default).
        only: write only the tensors whose final name this regex matches.
        item: export one item of an Orbax step (or one top-level key) only.
        metadata: strings for the files' ``__metadata__`` (default ``{"format": "pt"}``,
            which Hugging Face loaders expect).
        memory_budget: host memory for tensor data (slabs read, cast and written); a source
            chunk larger than a quarter of it is still read whole.
        overwrite: replace safetensors files already at ``dst`` (stale ones are removed
            after the new index is written).
        progress: called with (bytes written, bytes in all) as tensors stream.

    Raises:
        CheckpointNotFoundError: nothing to read at ``url``.
        CheckpointExistsError: ``dst`` already holds safetensors, and not ``overwrite``.
        UnsupportedLeafError: a leaf's dtype has no safetensors name (complex).
        ValueError: a rule that does not parse, two leaves with one name, a bad size.
        CorruptCheckpointError: a chunk failed its checksum (nothing at ``dst`` names the
            file being written: it is never created).
    """
    limit = parse_size(max_shard_size)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise InvalidArgumentError(
            f"metadata={metadata!r:.100}: safetensors metadata maps strings to "
            "strings")
    dtype = _dtype_name(dtype)
    rules = rules_from(names, only)
    source = open_readable(open_store(url), item)
    outs, left_out = _select(source, rules, dtype)
    dst_store = open_store(dst)
    base = dst_store.location.path.rstrip("/").rsplit("/", 1)[-1]
    single = base if base.endswith(SUFFIX) else None
    folder = dst_store.parent() if single is not None else dst_store
    if folder is None:
        raise InvalidArgumentError(f"{dst_store.url}: no folder to write the file in")
    folder.verify_access()
    before = _existing(folder, single)
    if before and not overwrite:
        raise CheckpointExistsError(f"{folder.url} already holds safetensors "
                                    f"({', '.join(before[:4])}): pass overwrite=True to "
                                    "replace them")
    shards = [outs] if single is not None else _shards(outs, limit)
    if single is not None:
        files = [single]
    elif len(shards) <= 1:
        files = [SINGLE_FILE]
    else:
        files = [f"model-{i + 1:05d}-of-{len(shards):05d}{SUFFIX}" for i in range(len(shards))]
    meta = {"format": "pt", **(metadata or {}), EXPORT_ID: secrets.token_hex(8)}
    total = sum(o.nbytes for o in outs)
    written = 0

    def done(n: int) -> None:
        nonlocal written
        written += n
        if progress is not None:
            progress(written, total)

    if INDEX in before:
        # First, so that no reader takes the old index for a description of a folder whose
        # files are being replaced; until the new index is written, the files' export ids
        # tell an interrupted overwrite (`ckpt._safetensors`).
        folder.delete(INDEX)
    kv = store_kvstore(folder)
    for file, shard in zip(files, shards or [[]], strict=True):
        folder.write_stream(file, _file_parts(source, shard, meta, memory_budget, done))
        read_file_header(folder, kv, file)  # the file is whole: its header and last byte
        log.info("wrote %s (%d tensors)", folder.describe(file), len(shard))
    if len(files) > 1:
        index = {"metadata": {"total_size": total, EXPORT_ID: meta[EXPORT_ID]},
                 "weight_map": {o.name: f for f, shard in zip(files, shards, strict=True)
                                for o in shard}}
        folder.write(INDEX, json.dumps(index, indent=2, sort_keys=True).encode())
    for stale in before:
        if stale not in files and stale != INDEX:
            folder.delete(stale)
    return ExportResult(dst_store.url if single is not None else folder.url, files,
                        {o.name: path_text(o.record.path) for o in outs}, left_out, written)
