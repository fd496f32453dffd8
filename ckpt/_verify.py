"""``ckpt verify``: read every chunk and check it against the manifest and host reports.

Unlike restore, which stops at the first bad chunk, verification reads everything and
reports every problem, each naming its leaf and chunk index.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import google_crc32c
import numpy as np
import tensorstore as ts

from ckpt._format import (
    LeafKind,
    LeafRecord,
    decode_host_report,
    host_report_key,
    read_object,
)
from ckpt._leaves import decode_inline, dtype_from_name
from ckpt._reader import open_readable
from ckpt._tree import path_text
from ckpt.errors import CorruptCheckpointError, UnsupportedFormatError
from ckpt.restore.boxes import box_size, chunk_box, to_slices, unflat_index
from ckpt.storage import (
    DeadlineExceededError,
    DeadlineStore,
    ObjectNotFoundError,
    StoreLike,
    Window,
    bounded,
    open_store,
    tensorstore_code,
)

DEFAULT_BUDGET = 256 << 20


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong: where (leaf key path, chunk grid index or None) and what."""

    leaf: str
    chunk: tuple[int, ...] | None
    what: str

    def __str__(self) -> str:
        where = self.leaf if self.chunk is None else f"{self.leaf} chunk {self.chunk}"
        return f"{where}: {self.what}"


@dataclasses.dataclass
class VerifyReport:
    """What `verify` found: counts and every problem."""

    url: str
    chunks: int = 0
    nbytes: int = 0
    problems: list[Problem] = dataclasses.field(default_factory=list)
    arrays: int = 0
    """Array leaves whose chunks were read (``chunks`` of them, ``nbytes`` in all)."""
    inline: int = 0
    """Leaves held in the manifest itself, whose sizes were checked (no chunk files)."""
    reports: int = 0
    """Host reports read (one per process that wrote the checkpoint)."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _reports(store: Any, attempt: str, processes: int,
             report: VerifyReport) -> dict[tuple[str, int], tuple[int, int]]:
    rows: dict[tuple[str, int], tuple[int, int]] = {}
    for p in range(processes):
        key = host_report_key(attempt, p)
        try:
            found = decode_host_report(read_object(store, key), store.describe(key)).chunks
        except (ObjectNotFoundError, CorruptCheckpointError) as exc:
            report.problems.append(Problem(f"host report {p}", None, str(exc)))
            continue
        report.reports += 1
        for name, flat, nbytes, crc in found:
            rows[(name, flat)] = (nbytes, crc)
    return rows


def verify(url: StoreLike, *, memory_budget: int = DEFAULT_BUDGET,
           progress: Callable[[int, int], None] | None = None,
           timeout_s: float | None = None) -> VerifyReport:
    """Reads every chunk of the checkpoint at ``url`` and checks it.

    Checks: COMMIT and the manifest's sha256 (a failure raises, as nothing else can be
    trusted then); each host report; each array's stored shape and dtype; each chunk's
    presence, its stored crc32c (verified by TensorStore on read), its size against the
    manifest and its crc32c against the host report; each inline leaf's size.

    Raises:
        CheckpointNotFoundError, CorruptCheckpointError: when COMMIT or the manifest fail.
        UnsupportedFormatError: ``url`` holds an Orbax checkpoint.
        DeadlineExceededError: ``timeout_s`` passed first (None: each request's own
            deadline and retries bound it); the chunk reads under way are cancelled.
    """
    store = bounded(open_store(url), timeout_s, "verifying")
    deadline = store.deadline if isinstance(store, DeadlineStore) else None
    source = open_readable(store)
    if not source.checksummed:
        raise UnsupportedFormatError(
            f"{store.url} is {'an' if source.kind[0] in 'AEIOU' else 'a'} {source.kind} "
            f"checkpoint ({source.layout}): verify checks this library's per-chunk "
            f"checksums, which {source.kind} does not record; "
            "`ckpt convert` it (the result is verified) or restore it")
    manifest = source.manifest
    report = VerifyReport(store.url)
    expected = _reports(store, manifest.attempt, manifest.process_count, report)
    ctx = store.tensorstore_context()
    total = sum(leaf.nbytes for leaf in manifest.leaves if leaf.kind == LeafKind.ARRAY)
    done = 0
    for leaf in manifest.leaves:
        name = path_text(leaf.path)
        if leaf.kind == LeafKind.INLINE:
            report.inline += 1
            try:
                decode_inline(leaf, f"{store.url} leaf {name}")
            except CorruptCheckpointError as exc:
                report.problems.append(Problem(name, None, str(exc)))
            continue
        if leaf.kind != LeafKind.ARRAY:
            continue
        report.arrays += 1
        dtype = dtype_from_name(leaf.dtype, f"{store.url} leaf {name}")
        try:
            arr = store.wait(ts.open(source.array_spec(leaf), context=ctx),
                             f"opening leaf {name}")
        except DeadlineExceededError:
            raise
        except Exception as exc:  # TensorStore reports every failure as ValueError
            report.problems.append(Problem(name, None, f"array cannot be opened: {exc}"))
            continue
        if tuple(arr.shape) != leaf.shape or arr.dtype.numpy_dtype != dtype:
            report.problems.append(Problem(name, None, f"stored as {arr.dtype.name}"
                                           f"{list(arr.shape)}, manifest says {leaf.dtype}"
                                           f"{list(leaf.shape)}"))
            continue
        grid = tuple(-(-n // c) for n, c in zip(leaf.shape, leaf.chunk_shape, strict=True))
        window = Window(memory_budget, deadline, f"reading the chunks of leaf {name}")

        def check_one(leaf: LeafRecord, name: str, flat: int, coord: tuple[int, ...],
                      nbytes: int, fut: Any) -> None:
            nonlocal done
            done += nbytes
            report.chunks += 1
            try:
                data = fut.result()
            except Exception as exc:
                what = "missing" if tensorstore_code(exc) == "NOT_FOUND" else \
                    f"unreadable: {str(exc)[:300]}"
                report.problems.append(Problem(name, coord, what))
                return
            raw = np.ascontiguousarray(data).view(np.uint8)
            report.nbytes += raw.nbytes
            if raw.nbytes != leaf.chunk_nbytes[flat]:
                report.problems.append(Problem(name, coord, f"{raw.nbytes} bytes, manifest "
                                               f"says {leaf.chunk_nbytes[flat]}"))
            crc = google_crc32c.value(raw)
            if crc != leaf.chunk_crc32c[flat]:
                report.problems.append(Problem(name, coord, "crc32c differs from the "
                                               "manifest: the chunk holds other data"))
            want = expected.get((leaf.name, flat))
            if want is None:
                report.problems.append(Problem(name, coord, "not in any host report"))
            elif crc != want[1] and crc == leaf.chunk_crc32c[flat]:
                report.problems.append(Problem(name, coord, "crc32c differs from the host "
                                               "report"))
            if progress is not None:
                progress(done, total)

        try:
            for flat in range(len(leaf.writers)):
                coord = unflat_index(flat, grid)
                box = chunk_box(coord, leaf.chunk_shape, leaf.shape)
                nbytes = box_size(box) * dtype.itemsize
                window.add(arr[to_slices(box)].read(), nbytes,
                           functools.partial(check_one, leaf, name, flat, coord, nbytes))
            window.drain()
        except BaseException:
            window.settle()  # no read of this verify outlives it
            raise
    return report
