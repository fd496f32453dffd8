"""``ckpt reshard`` and ``ckpt convert``: rewrite a checkpoint in this library's format, laid
out for a mesh, offline.

Runs on one machine with no accelerators and never builds whole arrays: it walks the new
chunk grid in batches that fit the memory budget, reads each batch's boxes with restore's
reader (which checks every source chunk it reads against the source manifest's crc32c, so
a damaged source is never copied into a checkpoint that would then pass `verify`) and writes
them, with host memory bounded by ``memory_budget``. The source is anything `open_readable`
opens: one of this library's checkpoints or an Orbax one. The layout planning is pure (`restore`'s
`spec_shard_shape` and the save path's `choose_chunk_shape`); the result is committed with
the same protocol as a save, so it is an ordinary checkpoint. `convert` then reads it all
back through `verify`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import operator
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from ckpt._attempt import (
    ChunkWriter,
    commit_attempt,
    new_attempt_id,
    open_arrays,
    refusal_if_committed,
    write_report,
)
from ckpt._codecs import canonical
from ckpt._format import ChunkLayout, LeafKind, LeafRecord
from ckpt._leaves import dtype_from_name
from ckpt._ownership import choose_chunk_shape
from ckpt._reader import open_readable
from ckpt._tree import path_text, slash_path
from ckpt._verify import verify
from ckpt.errors import (
    CorruptCheckpointError,
    InvalidArgumentError,
    MeshMismatchError,
    MissingLeafError,
)
from ckpt.restore import read_arrays, spec_shard_shape
from ckpt.restore.boxes import chunk_box, chunk_sizes, grid_shape, to_slices, unflat_index
from ckpt.storage import StoreLike, open_store

DEFAULT_BUDGET = 1 << 30
Spec = tuple[str | tuple[str, ...] | None, ...]


def parse_mesh(text: str) -> dict[str, int]:
    """Parses ``data=2,model=4`` (axis names in mesh order).

    Raises:
        ValueError: naming the part that does not parse.
    """
    mesh: dict[str, int] = {}
    for part in text.split(","):
        name, eq, size = part.strip().partition("=")
        size = size.strip()
        if not eq or not name.isidentifier() or not (size.isascii() and size.isdigit()) \
                or int(size) < 1 or name in mesh:
            raise InvalidArgumentError(
                f"mesh {text!r}: cannot parse {part.strip()!r}; expected "
                "NAME=SIZE,NAME=SIZE (e.g. data=2,model=4)")
        mesh[name] = int(size)
    return mesh


def parse_spec(text: str) -> Spec:
    """Parses a PartitionSpec: ``data,model``; ``-``/``None`` for an unsharded dimension;
    ``data+model`` for several axes on one dimension; ``-`` or empty alone: replicated."""
    if text.strip() in ("", "-", "None"):
        return ()
    out: list[str | tuple[str, ...] | None] = []
    for entry in text.split(","):
        entry = entry.strip()
        if entry in ("-", "None", ""):
            out.append(None)
        elif "+" in entry:
            axes = tuple(a.strip() for a in entry.split("+"))
            if not all(a.isidentifier() for a in axes):
                raise InvalidArgumentError(f"spec {text!r}: bad axis list {entry!r}")
            out.append(axes)
        elif entry.isidentifier():
            out.append(entry)
        else:
            raise InvalidArgumentError(f"spec {text!r}: bad entry {entry!r}")
    return tuple(out)


# What `reshard` and `convert` take for a mesh and for each rule's spec.
MeshLike = Mapping[str, int] | str | jax.sharding.Mesh | None
SpecLike = str | jax.sharding.PartitionSpec | Sequence[str | Sequence[str] | None]
RulesLike = Mapping[str, SpecLike] | Sequence[tuple[str, SpecLike]]


def as_mesh(mesh: MeshLike) -> dict[str, int] | None:
    """``mesh`` as axis name -> size in mesh order: a mapping, ``"data=2,model=4"``, or a
    `jax.sharding.Mesh` (only its axis names and sizes count: no device is needed)."""
    if mesh is None:
        return None
    if isinstance(mesh, str):
        return parse_mesh(mesh)
    shape = getattr(mesh, "shape", None)  # a jax Mesh: an ordered {axis: size}
    axes = dict(shape) if isinstance(shape, Mapping) else dict(mesh)  # type: ignore[arg-type]
    out: dict[str, int] = {}
    for name, size in axes.items():
        try:  # ints of any kind (numpy's too), never a bool or a float
            whole = -1 if isinstance(size, bool) else operator.index(size)
        except TypeError:
            whole = -1
        if not (isinstance(name, str) and name.isidentifier() and whole >= 1):
            out.clear()
            break
        out[name] = whole
    if not out:
        raise InvalidArgumentError(
            f"mesh {mesh!r}: expected axis name -> size (e.g. {{'data': 2, 'model': 4}}), "
            "'data=2,model=4' or a jax.sharding.Mesh")
    return out


def as_spec(spec: SpecLike) -> Spec:
    """One rule's spec: ``"data,model"`` (as the CLI's --spec), a `PartitionSpec`, or a
    tuple of axis names, tuples of them and None."""
    if isinstance(spec, str):
        return parse_spec(spec)
    out: list[str | tuple[str, ...] | None] = []
    for entry in tuple(spec):
        if entry is None or (isinstance(entry, str) and entry.isidentifier()):
            out.append(entry)
        elif isinstance(entry, (tuple, list)) and entry and all(
                isinstance(a, str) and a.isidentifier() for a in entry):
            out.append(tuple(entry))
        else:
            raise InvalidArgumentError(f"spec {spec!r}: bad entry {entry!r}")
    return tuple(out)


def as_rules(rules: RulesLike) -> list[tuple[str, Spec]]:
    """``rules`` as (pattern, spec) pairs, in order (the last match wins)."""
    pairs = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
    out = []
    for pair in pairs:
        # Tuples, or two-item lists as rules read from JSON or YAML come.
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                and isinstance(pair[0], str) and pair[0]):
            raise InvalidArgumentError(
                f"rules: {pair!r} is not a (pattern, spec) pair, e.g. "
                "('params/**/kernel', '-,model')")
        out.append((pair[0], as_spec(pair[1])))
    return out


def path_matches(pattern: str, path: str) -> bool:
    """Whether slash ``path`` matches ``pattern`` segment by segment: ``*``, ``?`` and
    ``[...]`` match within one segment (never across ``/``); a ``**`` segment matches any
    number of whole segments, none included."""
    return _segments_match(pattern.split("/"), path.split("/"))


def _segments_match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_segments_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and \
        _segments_match(pattern[1:], parts[1:])


@dataclasses.dataclass(frozen=True)
class ReshardResult:
    """What `reshard` wrote."""

    url: str
    chunks: int
    nbytes: int
    mesh: dict[str, int] = dataclasses.field(default_factory=dict)
    source_layout: str = ""


def _plan(manifest_leaves: list[LeafRecord], mesh: dict[str, int],
          rules: Sequence[tuple[str, Spec]], max_chunk: int) -> list[LeafRecord]:
    records, errors = [], []
    unused = {pattern for pattern, _ in rules}
    for rec in manifest_leaves:
        records.append(rec)
        if rec.kind not in (LeafKind.ARRAY, LeafKind.INLINE):
            continue
        hits = [(pattern, s) for pattern, s in rules
                if path_matches(pattern, slash_path(rec.path))]
        unused -= {pattern for pattern, _ in hits}
        spec: Spec = hits[-1][1] if hits else rec.spec_entries()
        try:
            shard = spec_shard_shape(rec.shape, mesh, spec)
        except ValueError as exc:
            errors.append(f"{path_text(rec.path)} {list(rec.shape)}: {exc}")
            continue
        changes: dict[str, Any] = {}
        if rec.source == "jax":
            changes.update(mesh_shape=tuple(mesh.values()), mesh_axes=tuple(mesh),
                           spec=[e if e is None or isinstance(e, str) else list(e)
                                 for e in spec])
        if rec.kind == LeafKind.ARRAY:
            itemsize = dtype_from_name(rec.dtype, path_text(rec.path)).itemsize
            chunk_shape = choose_chunk_shape(shard, itemsize, 1, max_chunk_bytes=max_chunk)
            nbytes = [n * itemsize for n in chunk_sizes(rec.shape, chunk_shape)]
            # One writer: this process.
            changes["layout"] = ChunkLayout.planned(chunk_shape, [0] * len(nbytes), nbytes)
        records[-1] = dataclasses.replace(rec, **changes)
    if unused:
        arrays = [slash_path(r.path) for r in manifest_leaves
                  if r.kind in (LeafKind.ARRAY, LeafKind.INLINE)]
        raise MissingLeafError(
            f"--spec rule(s) {sorted(unused)} match no array leaf (key paths look like "
            f"{', '.join(arrays[:3]) or 'nothing: no arrays'}; `ckpt inspect` lists them)")
    if errors:
        raise MeshMismatchError(f"cannot lay out on mesh {mesh}: " + "; ".join(errors))
    return records


def reshard(src_url: StoreLike, dst_url: StoreLike, *, mesh: MeshLike = None,
            rules: RulesLike = (), memory_budget: int = DEFAULT_BUDGET,
            overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None,
            compression: str | None = None) -> ReshardResult:
    """Writes the checkpoint at ``src_url`` (any this library reads) to ``dst_url`` in
    this library's format, laid out for ``mesh``, streaming chunk by chunk: no device is
    needed and host memory stays within ``memory_budget``. `ckpt reshard` on the command
    line; called on one process.

    Args:
        mesh: axis name -> size in mesh order (a mapping, ``"data=2,model=4"`` or a
            `jax.sharding.Mesh`); None for the mesh the source was saved on.
        rules: pattern -> spec (a mapping, or (pattern, spec) pairs): patterns over key
            paths as `ckpt inspect` prints them (``opt/*/mu/**/kernel``); specs as
            ``"-,model"``, a `PartitionSpec` or a tuple; the last match wins; leaves no
            rule matches keep their saved PartitionSpec (unsharded if they had none); a
            rule that matches no array leaf is a `MissingLeafError`.
        memory_budget: bound on host memory for chunk data in flight and cached.
        overwrite: replace a committed checkpoint at ``dst_url`` (atomically).
        compression: the written arrays' (as `ckpt.save_async`'s), whatever the source's:
            None stores them uncompressed, so a compressed source stays compressed only
            when it is given again.

    Raises:
        CheckpointNotFoundError: ``src_url`` holds no committed checkpoint.
        CheckpointExistsError: ``dst_url`` holds one and not ``overwrite``.
        MeshMismatchError: a spec names an axis the mesh lacks, or a dimension is not
            divisible; nothing is written.
    """
    mesh, rules = as_mesh(mesh), as_rules(rules)
    compressed = canonical(compression)
    src, dst = open_store(src_url), open_store(dst_url)
    source = open_readable(src)
    manifest = source.manifest
    if mesh is None:
        mesh = saved_mesh(manifest.leaves, src.url)
    max_chunk = max(1 << 20, min(16 << 20, memory_budget // 8))
    records = [dataclasses.replace(r, compression=compressed) if r.kind == LeafKind.ARRAY
               else r for r in _plan(manifest.leaves, mesh, rules, max_chunk)]
    dst.verify_access()
    refusal = refusal_if_committed(dst, overwrite=overwrite, how="pass overwrite=True")
    if refusal is not None:
        raise refusal
    attempt = new_attempt_id()
    # Budget split: a quarter for the boxes of a batch, a quarter for the reader's chunks in
    # flight, a quarter for writes in flight (a write holds the chunk and its encoded copy).
    writer = ChunkWriter(dst, memory_budget // 8)
    batch_limit = memory_budget // 4
    total = sum(r.nbytes for r in records if r.kind == LeafKind.ARRAY)
    done = chunks = 0
    # Every zarr.json in one batch (one sync of a local file system, not two a leaf).
    targets = open_arrays(dst, attempt, {i: r for i, r in enumerate(records)
                                         if r.kind == LeafKind.ARRAY}, create=True)
    for i, (old, new) in enumerate(zip(manifest.leaves, records, strict=True)):
        if new.kind != LeafKind.ARRAY:
            continue
        target = targets[i]
        grid = grid_shape(new.shape, new.chunk_shape)
        boxes = [chunk_box(unflat_index(flat, grid), new.chunk_shape, new.shape)
                 for flat in range(len(new.chunk_nbytes))]
        whole = source.read_job(old, [])  # checks the source folder: once per array
        for start, stop in _batches(new.chunk_nbytes, batch_limit):
            job = dataclasses.replace(whole, targets=boxes[start:stop])
            [host] = read_arrays([job], memory_budget=batch_limit)
            for flat, data in zip(range(start, stop), host, strict=True):
                writer.put(target, to_slices(boxes[flat]), data, new.name, flat)
                done += data.nbytes
                chunks += 1
                if progress is not None:
                    progress(done, total)
    write_report(dst, attempt, 0, writer.finish())
    commit_attempt(dst, attempt, records, process_count=1, metadata=manifest.metadata,
                   created_at=time.time(), overwrite=overwrite, metrics=manifest.metrics)
    return ReshardResult(dst.url, chunks, done, dict(mesh), source.layout)


def _batches(sizes: Sequence[int], limit: int) -> list[tuple[int, int]]:
    """Consecutive runs of chunks whose bytes fit ``limit`` (at least one chunk each)."""
    out, start, acc = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and acc + n > limit:
            out.append((start, i))
            start, acc = i, 0
        acc += n
    if start < len(sizes):
        out.append((start, len(sizes)))
    return out


def saved_mesh(leaves: list[LeafRecord], url: str) -> dict[str, int]:
    """The one mesh the source's sharded leaves were saved on ({} if none was).

    Raises:
        MeshMismatchError: leaves were saved on different meshes (then a mesh must be named).
    """
    meshes = {tuple(zip(r.mesh_axes, r.mesh_shape, strict=True)) for r in leaves
              if r.mesh_axes is not None and r.mesh_shape is not None}
    if len(meshes) > 1:
        shown = ", ".join(str(dict(m)) for m in sorted(meshes))
        raise MeshMismatchError(f"{url} was saved on several meshes ({shown}): name the "
                                "target mesh")
    return dict(meshes.pop()) if meshes else {}


def convert(src_url: StoreLike, dst_url: StoreLike, *, mesh: MeshLike = None,
            rules: RulesLike = (), memory_budget: int = DEFAULT_BUDGET,
            overwrite: bool = False,
            progress: Callable[[int, int], None] | None = None,
            compression: str | None = None) -> ReshardResult:
    """`reshard`, then `verify` of what was written: for a checkpoint of another kind
    (Orbax, safetensors) that carries no checksums of this library's, the copy is read back
    and checked before it is trusted. `ckpt convert` on the command line.

    Streams like `reshard`, between any two backends, with host memory bounded by
    ``memory_budget``. The layout is ``mesh`` (and ``rules``) if given, else the mesh the
    source was saved on with each leaf's saved PartitionSpec (unsharded where it had none).
    Verification reads every written chunk back and checks it against the crc32c computed
    from the bytes read from the source.

    Raises:
        As `reshard`; and CorruptCheckpointError if the written checkpoint fails
        verification (it is committed, and the message lists the problems).
    """
    result = reshard(src_url, dst_url, mesh=mesh, rules=rules, memory_budget=memory_budget,
                     overwrite=overwrite, progress=progress, compression=compression)
    report = verify(result.url, memory_budget=memory_budget)
    if not report.ok:
        raise CorruptCheckpointError(
            f"{result.url} was written but fails verification: "
            + "; ".join(str(p) for p in report.problems[:10]))
    return result
