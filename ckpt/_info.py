"""`ckpt.metadata`: what a committed checkpoint holds, from its manifest alone (for an
Orbax checkpoint, from its metadata files and each array's zarr metadata)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from ckpt._format import LeafKind, Manifest, check_tree
from ckpt._leaves import PerProcess, decode_value, dtype_from_name, saved_state
from ckpt._reader import open_readable
from ckpt._tree import KeyPath, nest, path_text, python_path, slash_path
from ckpt.storage import StoreLike, bounded, open_store


@dataclasses.dataclass(frozen=True)
class LeafInfo:
    """One saved leaf: its key path, kind, and for arrays the global layout."""

    path: KeyPath
    kind: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    mesh: dict[str, int] | None
    spec: jax.sharding.PartitionSpec | None
    chunk_shape: tuple[int, ...]
    compression: str | None = None  # an array's chunks': "zstd:<level>", or None

    @property
    def name(self) -> str:
        """The key path as the CLI prints it and ``--spec``, ``--only`` and name rules
        match it: ``opt/0/mu/w`` (``""`` for a leaf at the root)."""
        return slash_path(self.path)

    @property
    def keystr(self) -> str:
        """The key path in Python notation, ``['opt'][0].mu['w']``: what
        ``jax.tree_util.keystr`` gives for the same leaf of the caller's tree."""
        return python_path(self.path)


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What `ckpt.metadata` returns.

    Attributes:
        url: the checkpoint.
        attempt: the committed attempt id.
        format_version: on-disk format version.
        created_at, committed_at: POSIX timestamps of the save call and of the commit.
        process_count: how many processes wrote it.
        versions: library versions of the writer.
        metadata: the user metadata passed to save.
        leaves: every leaf, in tree order.
        tree: nested dicts/lists of `jax.ShapeDtypeStruct` (arrays) and values, usable to
            build a restore target.
        layout: ``ckpt format 1``, or for an Orbax checkpoint ``orbax-checkpoint (OCDBT,
            zarr v2)`` and the like (``attempt`` is then empty).
        metrics: the metrics a `CheckpointManager` saved with the step (name -> number).
    """

    url: str
    attempt: str
    format_version: int
    created_at: float
    committed_at: float
    process_count: int
    versions: dict[str, str]
    metadata: Any
    leaves: list[LeafInfo]
    tree: Any
    layout: str = ""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)


def _info(url: str, manifest: Manifest, layout: str) -> CheckpointInfo:
    leaves, items = [], []
    check_tree(manifest.leaves, url)  # `tree` is built from the leaves' paths
    for rec in manifest.leaves:
        mesh = (dict(zip(rec.mesh_axes or (), rec.mesh_shape, strict=False))
                if rec.mesh_shape is not None else None)
        spec = None
        if rec.spec is not None:
            spec = jax.sharding.PartitionSpec(  # type: ignore[no-untyped-call]  # unannotated in JAX
                *rec.spec_entries())
        leaves.append(LeafInfo(rec.path, str(rec.kind), rec.shape, rec.dtype, rec.nbytes,
                               mesh, spec, rec.chunk_shape, rec.compression or None))
        what = f"{url} leaf {path_text(rec.path)}"
        if rec.kind in (LeafKind.ARRAY, LeafKind.INLINE):
            value: Any = jax.ShapeDtypeStruct(  # type: ignore[no-untyped-call]  # unannotated in JAX
                rec.shape, dtype_from_name(rec.dtype, what))
        elif rec.kind == LeafKind.VALUE:
            value = decode_value(rec, what)
        elif rec.kind == LeafKind.EMPTY:
            value = {} if rec.vtype == "dict" else []
        elif rec.kind == LeafKind.PER_PROCESS:
            # This process's, as a `PerProcess` (a leaf: usable in a restore target, where
            # an object's state would be a subtree); None if no value was saved for it.
            value = PerProcess(saved_state(rec, jax.process_index(), None, what))
        else:
            value = None
        items.append((rec.path, value))
    return CheckpointInfo(url, manifest.attempt, manifest.format_version, manifest.created_at,
                          manifest.committed_at, manifest.process_count, manifest.versions,
                          manifest.metadata, leaves, nest(items) if items else {}, layout,
                          dict(manifest.metrics))


def metadata(url: StoreLike, *, timeout_s: float | None = None) -> CheckpointInfo:
    """Describes the committed checkpoint at ``url``; reads COMMIT and the manifest only.

    ``url`` may also hold an Orbax checkpoint (see `ckpt.restore`); then its metadata files
    and each array's zarr metadata are read, and scalars' values.

    ``timeout_s`` bounds the whole call (None: each request's own deadline,
    ``request_timeout_s``, and its retries); past it `DeadlineExceededError` names the URL
    and what was being read.
    """
    store = open_store(url)
    source = open_readable(bounded(store, timeout_s, "reading the metadata of"))
    return _info(source.store.url, source.manifest, source.layout)
