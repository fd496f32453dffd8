"""``ckpt diff``: are two checkpoints the same state, and where do they differ?

Compares any two checkpoints this library reads (its own, Orbax's, safetensors; any meshes,
any backends) leaf by leaf, matched by key path. Arrays are streamed like ``reshard``
streams them: boxes of a common grid are read from both sides with restore's reader (every
chunk checked as restore checks it) in batches that fit ``memory_budget``, and compared in
pieces, so host memory stays bounded whatever the leaf's size (by the budget, or by the
chunks, which are read whole). Two of this library's
checkpoints with the same chunk layout are compared by the manifests' crc32c first: only
chunks whose checksums differ are read. Called on one process, like the other tools.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from ckpt._export import size_text
from ckpt._format import LeafKind, LeafRecord
from ckpt._leaves import decode_inline, decode_value, dtype_from_name
from ckpt._reader import Readable, open_readable
from ckpt._reshard import DEFAULT_BUDGET, path_matches
from ckpt._tree import path_text, python_path, slash_path
from ckpt.errors import InvalidArgumentError
from ckpt.restore import read_arrays
from ckpt.restore.boxes import Box, box_size, chunk_box, grid_shape, to_slices, unflat_index
from ckpt.storage import DeadlineStore, StoreLike, bounded, open_store

# What `LeafDiff.status` says, in the order a summary counts them.
IDENTICAL, CLOSE = "identical", "close"
DIFFERENT, SHAPE, DTYPE, KIND, ONLY_A, ONLY_B = (
    "different", "shape", "dtype", "kind", "only_a", "only_b")
EQUAL_STATUSES = (IDENTICAL, CLOSE)
# Elements compared at once: bounds the float64 temporaries of a comparison (~8 x 8 MiB).
_PIECE = 1 << 20
_ARRAYS = (LeafKind.ARRAY, LeafKind.INLINE)


@dataclasses.dataclass(frozen=True)
class LeafDiff:
    """How one leaf compares.

    Attributes:
        path: its key path as ``ckpt inspect`` prints it.
        status: ``identical`` (the same bytes, or the same value), ``close`` (not the same
            bytes, but every element equal within the tolerance: -0.0 against 0.0, NaNs of
            another payload, or differences within ``rtol``/``atol``), ``different``
            (elements beyond the tolerance, or another value), ``shape``, ``dtype`` or
            ``kind`` (not comparable: what each side holds is in ``a`` and ``b``),
            ``only_a`` or ``only_b``.
        a, b: what each side holds, e.g. ``float32[4,8]`` or ``value 3`` (``-``: nothing).
        elements: elements compared (an array's size; 1 for a value).
        differing: elements whose values differ (NaN equals NaN; -0.0 equals 0.0).
        beyond: of those, elements beyond the tolerance (``|a - b| > atol + rtol * |b|``,
            B the reference as in `numpy.isclose`; a NaN or an infinity against anything
            else is always beyond).
        max_abs, max_rel: the largest ``|a - b|`` and ``|a - b| / |b|`` over the differing
            elements finite on both sides (``inf`` where ``b`` is 0); 0 when none.
        nan_a, nan_b, inf_a, inf_b: NaN and infinite elements of each side among the
            differing ones (a NaN in the same place on both sides is not a difference).
    """

    path: str
    status: str
    a: str
    b: str
    elements: int = 0
    differing: int = 0
    beyond: int = 0
    max_abs: float = 0.0
    max_rel: float = 0.0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0

    @property
    def equal(self) -> bool:
        return self.status in EQUAL_STATUSES

    def text(self) -> str:
        """One line for a person: what differs and by how much."""
        head = f"{self.path}: "
        if self.status == ONLY_A:
            return head + f"only in A ({self.a})"
        if self.status == ONLY_B:
            return head + f"only in B ({self.b})"
        if self.status in (SHAPE, DTYPE, KIND):
            return head + f"{self.status} differs: A {self.a}, B {self.b}"
        if self.status == IDENTICAL:
            return head + f"identical ({self.a})"
        parts = [f"{self.differing:,} of {self.elements:,} elements differ"]
        if self.status == DIFFERENT:
            parts[0] += f" ({self.beyond:,} beyond tolerance)"
        if self.max_abs or self.max_rel:
            parts.append(f"max abs {self.max_abs:.6g}, max rel {self.max_rel:.6g}")
        for label, n_a, n_b in (("NaN", self.nan_a, self.nan_b),
                                ("inf", self.inf_a, self.inf_b)):
            if n_a or n_b:
                parts.append(f"{label} A {n_a:,} / B {n_b:,}")
        word = "different" if self.status == DIFFERENT else "within tolerance"
        return head + f"{word} ({self.a}): " + "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("max_abs", "max_rel"):  # JSON has no infinity
            if not math.isfinite(out[key]):
                out[key] = str(out[key])
        return out


@dataclasses.dataclass(frozen=True)
class DiffResult:
    """What `diff` found.

    Attributes:
        a, b: the URLs compared.
        rtol, atol: the tolerance applied.
        leaves: every leaf of either side (matched by key path), in A's order, then those
            only in B.
        bytes_read: array bytes read from both sides.
        bytes_total: array bytes both sides hold in the compared leaves (what a full
            comparison would read); the rest were matched by checksum.
    """

    a: str
    b: str
    rtol: float
    atol: float
    leaves: list[LeafDiff]
    bytes_read: int = 0
    bytes_total: int = 0

    @property
    def equal(self) -> bool:
        """Whether every leaf is on both sides and equal within the tolerance."""
        return all(leaf.equal for leaf in self.leaves)

    @property
    def differences(self) -> list[LeafDiff]:
        """The leaves that are not equal within the tolerance."""
        return [leaf for leaf in self.leaves if not leaf.equal]

    def summary(self) -> str:
        """One line a person reads at a glance."""
        n = len(self.leaves)
        counts = {s: sum(1 for leaf in self.leaves if leaf.status == s)
                  for s in (IDENTICAL, CLOSE, DIFFERENT, SHAPE, DTYPE, KIND, ONLY_A, ONLY_B)}
        read = (f"read {size_text(self.bytes_read)} of {size_text(self.bytes_total)}"
                + (" (checksums matched the rest)"
                   if self.bytes_read < self.bytes_total else ""))
        tol = f"rtol={self.rtol:g}, atol={self.atol:g}"
        if self.equal:
            close = f", {counts[CLOSE]:,} within tolerance ({tol})" if counts[CLOSE] else ""
            return (f"equal: {n:,} {'leaf' if n == 1 else 'leaves'}, "
                    f"{counts[IDENTICAL]:,} identical{close}; {read}")
        names = {DIFFERENT: "beyond tolerance", SHAPE: "of another shape",
                 DTYPE: "of another dtype", KIND: "of another kind", ONLY_A: "only in A",
                 ONLY_B: "only in B"}
        parts = [f"{counts[s]:,} {names[s]}" for s in names if counts[s]]
        return (f"different: {len(self.differences):,} of {n:,} leaves "
                f"({', '.join(parts)}; {tol}); {read}")

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "equal": self.equal, "rtol": self.rtol,
                "atol": self.atol, "bytes_read": self.bytes_read,
                "bytes_total": self.bytes_total, "summary": self.summary(),
                "leaves": [leaf.to_json() for leaf in self.leaves]}


def _describe(rec: LeafRecord | None) -> str:
    if rec is None:
        return "-"
    if rec.kind in _ARRAYS:
        key = f" (key<{rec.prng_impl}> data)" if rec.prng_impl else ""
        return f"{rec.dtype}[{','.join(map(str, rec.shape))}]{key}"
    if rec.kind == LeafKind.VALUE:
        return f"{rec.vtype} {str(rec.value)[:40]}"
    if rec.kind == LeafKind.EMPTY:
        return f"empty {rec.vtype}"
    if rec.kind == LeafKind.PER_PROCESS:
        return f"per-process {rec.vtype} ({len(rec.value or ())} processes)"
    return str(rec.kind)


class _Tally:
    """The running comparison of one array leaf, box by box."""

    def __init__(self, dtype: np.dtype[Any], rtol: float, atol: float) -> None:
        self.dtype, self.rtol, self.atol = dtype, rtol, atol
        name = dtype.name
        # ml_dtypes' types (bfloat16, float8_*, int4) have numpy kind "V".
        self.kind = ("f" if dtype.kind in "fc" or name.startswith(("float", "bfloat")) else
                     "i" if dtype.kind in "iub" or name.startswith(("int", "uint")) else "v")
        self.same_bytes = True
        self.differing = self.beyond = 0
        self.nan_a = self.nan_b = self.inf_a = self.inf_b = 0
        self.max_abs = self.max_rel = 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        """Compares one box of each side (same shape and dtype)."""
        flat_a, flat_b = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
        for start in range(0, flat_a.size, _PIECE):
            x, y = flat_a[start:start + _PIECE], flat_b[start:start + _PIECE]
            # Piece by piece: a whole box's comparison would be a temporary as large as it.
            if not np.array_equal(x.view(np.uint8), y.view(np.uint8)):
                self.same_bytes = False
                self._piece(x, y)

    def _piece(self, a: np.ndarray, b: np.ndarray) -> None:
        if self.kind == "v":  # no arithmetic: element bytes compared, no tolerance applies
            differ = (a.view(np.uint8).reshape(a.size, -1)
                      != b.view(np.uint8).reshape(b.size, -1)).any(axis=1)
            n = int(np.count_nonzero(differ))
            self.differing += n
            self.beyond += n
            return
        if self.kind == "i":
            self._integers(a, b)
            return
        wide = np.complex128 if self.dtype.kind == "c" else np.float64
        x, y = a.astype(wide), b.astype(wide)
        # Part by part: a complex NaN is NaN whichever part is, so NaN+1j would equal NaN+2j.
        parts = (x.real, y.real, x.imag, y.imag) if self.dtype.kind == "c" else (x, y)
        same = np.ones(x.shape, bool)
        for px, py in zip(parts[::2], parts[1::2], strict=True):
            same &= (px == py) | (np.isnan(px) & np.isnan(py))
        differ = ~same
        n = int(np.count_nonzero(differ))
        if not n:
            return
        self.differing += n
        x, y = x[differ], y[differ]
        self.nan_a += int(np.count_nonzero(np.isnan(x)))
        self.nan_b += int(np.count_nonzero(np.isnan(y)))
        self.inf_a += int(np.count_nonzero(np.isinf(x)))
        self.inf_b += int(np.count_nonzero(np.isinf(y)))
        finite = np.isfinite(x) & np.isfinite(y)
        self._tally(n, np.abs(x[finite] - y[finite]), np.abs(y[finite]))

    def _integers(self, a: np.ndarray, b: np.ndarray) -> None:
        """Compared exactly, and their differences too: in float64 two int64s above 2**53
        would differ by 0."""
        differ = a != b
        n = int(np.count_nonzero(differ))
        if not n:
            return
        self.differing += n
        if self.dtype.kind == "b":
            x, y = a[differ].astype(np.uint64), b[differ].astype(np.uint64)
        else:
            x = a[differ].astype(np.uint64 if self.dtype.kind == "u" else np.int64)
            y = b[differ].astype(x.dtype)
        # |x - y| fits 64 bits unsigned: modular subtraction of the larger minus the smaller.
        xu, yu = x.view(np.uint64), y.view(np.uint64)
        d = np.where(x >= y, xu - yu, yu - xu)
        ref = np.abs(y.astype(np.float64))
        if self.rtol == 0 and self.atol == 0:  # exact: every differing element is beyond
            self._tally(n, d.astype(np.float64), ref, within=0)
        else:
            self._tally(n, d.astype(np.float64), ref)

    def _tally(self, n: int, d: np.ndarray, ref: np.ndarray, within: int | None = None) -> None:
        """Adds ``n`` differing elements, of which ``d`` are the finite differences and
        ``ref`` B's magnitudes there."""
        if d.size:
            self.max_abs = max(self.max_abs, float(d.max()))
            rel = np.divide(d, ref, out=np.full(d.shape, np.inf), where=ref > 0)
            self.max_rel = max(self.max_rel, float(rel.max()))
        if within is None:
            within = int(np.count_nonzero(d <= self.atol + self.rtol * ref))
        self.beyond += n - within

    def result(self, path: str, rec: LeafRecord, other: LeafRecord, size: int) -> LeafDiff:
        status = IDENTICAL if self.same_bytes else CLOSE if not self.beyond else DIFFERENT
        return LeafDiff(path, status, _describe(rec), _describe(other), size, self.differing,
                        self.beyond, self.max_abs, self.max_rel, self.nan_a, self.nan_b,
                        self.inf_a, self.inf_b)


class _Side:
    """One checkpoint being compared: reads boxes of its array leaves."""

    def __init__(self, source: Readable, deadline: Any) -> None:
        self.source, self.deadline = source, deadline
        self.read = 0

    def boxes(self, rec: LeafRecord, boxes: Sequence[Box], budget: int) -> list[np.ndarray]:
        what = f"{self.source.store.url} leaf {path_text(rec.path)}"
        if rec.kind == LeafKind.INLINE:
            whole = decode_inline(rec, what)
            return [whole[to_slices(box)] for box in boxes]
        [out] = read_arrays([self.source.read_job(rec, boxes)], memory_budget=budget,
                            deadline=self.deadline)
        self.read += sum(int(x.nbytes) for x in out)
        return out


def _same_layout(sa: _Side, ra: LeafRecord, sb: _Side, rb: LeafRecord) -> bool:
    """Whether both arrays' chunks can be compared by the manifests' crc32c: both sides
    record one per chunk (of the decoded bytes, whatever the compression) over one grid."""
    return (sa.source.checksummed and sb.source.checksummed
            and ra.kind == rb.kind == LeafKind.ARRAY and bool(ra.chunk_shape)
            and ra.chunk_shape == rb.chunk_shape
            and len(ra.chunk_crc32c) == len(rb.chunk_crc32c) == len(ra.chunk_nbytes)
            == math.prod(grid_shape(ra.shape, ra.chunk_shape)))


def _grid_boxes(shape: tuple[int, ...], chunk_shapes: Sequence[tuple[int, ...]]
                ) -> Iterator[Box]:
    """Boxes covering ``shape``, each as large as the larger of the two sides' chunks along
    every dimension: a chunk is read whole whatever box asks for it, so a smaller box would
    only read it again (once per box), and hold no less while it is read. A chunk is read
    once where the two grids nest, at most twice a dimension where they do not."""
    usable = [c for c in chunk_shapes if len(c) == len(shape) and all(c)]
    box = [max(1, min(n, max((c[i] for c in usable), default=n)))
           for i, n in enumerate(shape)]
    grid = grid_shape(shape, box)
    for flat in range(math.prod(grid)):
        yield chunk_box(unflat_index(flat, grid), box, shape)


def _batches(boxes: Iterable[Box], itemsize: int, limit: int) -> Iterator[list[Box]]:
    batch: list[Box] = []
    held = 0
    for box in boxes:
        nbytes = box_size(box) * itemsize
        if batch and held + nbytes > limit:
            yield batch
            batch, held = [], 0
        batch.append(box)
        held += nbytes
    if batch:
        yield batch


def _compare_arrays(path: str, sa: _Side, ra: LeafRecord, sb: _Side, rb: LeafRecord,
                    rtol: float, atol: float, budget: int, by_checksum: bool,
                    progress: Callable[[int], None]) -> LeafDiff:
    dtype = dtype_from_name(ra.dtype, f"{sa.source.store.url} leaf {path}")
    tally = _Tally(dtype, rtol, atol)
    # A quarter of the budget for each side's boxes of a batch, a quarter for the reader's
    # chunks in flight; comparing adds pieces of `_PIECE` elements.
    limit = max(1, budget // 4)
    counted = (ra.kind == LeafKind.ARRAY, rb.kind == LeafKind.ARRAY)  # as `diff`'s total
    if by_checksum and _same_layout(sa, ra, sb, rb):
        grid = grid_shape(ra.shape, ra.chunk_shape)
        boxes: Iterable[Box] = [
            chunk_box(unflat_index(flat, grid), ra.chunk_shape, ra.shape)
            for flat, (x, y) in enumerate(zip(ra.chunk_crc32c, rb.chunk_crc32c, strict=True))
            if x != y]
        progress(2 * sum(n for n, x, y in zip(ra.chunk_nbytes, ra.chunk_crc32c,
                                              rb.chunk_crc32c, strict=True) if x == y))
    else:
        boxes = _grid_boxes(ra.shape, [ra.chunk_shape, rb.chunk_shape])
    for batch in _batches(boxes, dtype.itemsize, limit):
        xs = sa.boxes(ra, batch, limit)
        ys = sb.boxes(rb, batch, limit)
        for i in range(len(batch)):  # no name outlives the batch: the next is read meanwhile
            tally.add(xs[i], ys[i])
            progress(int(xs[i].nbytes) * counted[0] + int(ys[i].nbytes) * counted[1])
        del xs, ys
    return tally.result(path, ra, rb, math.prod(ra.shape))


def _same(x: Any, y: Any) -> bool:
    """Equality of plain (msgpack) data in which NaN equals NaN."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same(p, q) for p, q in zip(x, y, strict=True))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return type(x) is type(y) and bool(x == y)


def _compare_other(path: str, sa: _Side, ra: LeafRecord, sb: _Side, rb: LeafRecord,
                   rtol: float, atol: float) -> LeafDiff:
    """Leaves that are not arrays: values, empty containers, per-process states."""
    a, b = _describe(ra), _describe(rb)
    if (ra.kind, ra.vtype) != (rb.kind, rb.vtype):
        return LeafDiff(path, KIND, a, b)
    if ra.kind == LeafKind.VALUE:
        x = decode_value(ra, f"{sa.source.store.url} leaf {path}")
        y = decode_value(rb, f"{sb.source.store.url} leaf {path}")
        if _same(x, y):
            return LeafDiff(path, IDENTICAL, a, b, 1)
        if ra.vtype in ("float", "complex", "int"):
            d = abs(x - y)  # exact for ints, however large
            try:
                finite = math.isfinite(d)
                size = float(d)
                rel = float(d / abs(y)) if y else math.inf
                within = d <= atol + rtol * abs(y)
            except OverflowError:  # integers beyond any float
                finite, size, rel, within = True, math.inf, math.inf, False
            if finite:
                status = CLOSE if within else DIFFERENT
                return LeafDiff(path, status, a, b, 1, 1, int(status == DIFFERENT), size, rel)
        return LeafDiff(path, DIFFERENT, a, b, 1, 1, 1)
    if ra.kind == LeafKind.PER_PROCESS:
        xs, ys = list(ra.value or ()), list(rb.value or ())
        if len(xs) != len(ys):
            return LeafDiff(path, KIND, a, b)
        n = sum(1 for x, y in zip(xs, ys, strict=True) if not _same(x, y))
        return LeafDiff(path, DIFFERENT if n else IDENTICAL, a, b, len(xs), n, n)
    return LeafDiff(path, IDENTICAL, a, b)  # none, or an empty container of one type


def _pairs(la: Sequence[LeafRecord], lb: Sequence[LeafRecord]
           ) -> list[tuple[str, LeafRecord | None, LeafRecord | None]]:
    """The leaves of both sides matched by key path, in A's order, then those only in B,
    each with the name it is shown by. Exact key paths first (``python_path``: a dict key
    "0" is not a list position 0); then, among the leaves left on both sides, the same
    path as written (``slash_path``), which is how the formats without a tree of their own
    (safetensors) name leaves, where it names one leaf on each side. A slash path two leaves
    of one side share is shown in Python notation, so the lines say which is which."""
    rest_b = {python_path(r.path): r for r in lb}
    matched: list[tuple[LeafRecord, LeafRecord | None]] = []
    for r in la:
        matched.append((r, rest_b.pop(python_path(r.path), None)))
    slash_a = collections.Counter(slash_path(r.path) for r in la)
    slash_b = collections.Counter(slash_path(r.path) for r in lb)
    loose = {slash_path(r.path): r for r in rest_b.values()
             if slash_b[slash_path(r.path)] == 1}
    for i, (r, other) in enumerate(matched):
        key = slash_path(r.path)
        if other is None and slash_a[key] == 1 and key in loose:
            matched[i] = (r, loose.pop(key))
            del rest_b[python_path(matched[i][1].path)]  # type: ignore[union-attr]
    pairs: list[tuple[str, LeafRecord | None, LeafRecord | None]] = []
    for ra, rb in [*matched, *((None, r) for r in rest_b.values())]:
        rec = ra if ra is not None else rb
        assert rec is not None
        shared = slash_a[slash_path(rec.path)] > 1 or slash_b[slash_path(rec.path)] > 1
        pairs.append((python_path(rec.path) if shared else path_text(rec.path), ra, rb))
    return pairs


def _compare(name: str, sa: _Side, ra: LeafRecord, sb: _Side, rb: LeafRecord, rtol: float,
             atol: float, budget: int, by_checksum: bool,
             advance: Callable[[int], None]) -> LeafDiff:
    """One leaf on both sides."""
    a, b = _describe(ra), _describe(rb)
    if (ra.kind in _ARRAYS) != (rb.kind in _ARRAYS):
        return LeafDiff(name, KIND, a, b)
    if ra.kind not in _ARRAYS:
        return _compare_other(name, sa, ra, sb, rb, rtol, atol)
    if ra.shape != rb.shape:
        return LeafDiff(name, SHAPE, a, b)
    if ra.dtype != rb.dtype or ra.prng_impl != rb.prng_impl:  # a key of another impl
        return LeafDiff(name, DTYPE, a, b)
    return _compare_arrays(name, sa, ra, sb, rb, rtol, atol, budget, by_checksum, advance)


def diff(a: StoreLike, b: StoreLike, *, rtol: float = 0.0, atol: float = 0.0,
         only: Sequence[str] = (), memory_budget: int = DEFAULT_BUDGET,
         by_checksum: bool = True, timeout_s: float | None = None,
         progress: Callable[[int, int], None] | None = None) -> DiffResult:
    """Compares the checkpoints at ``a`` and ``b`` leaf by leaf. `ckpt diff` on the command
    line; called on one process, with no devices.

    Any two checkpoints this library reads, on any meshes and backends. Leaves are matched
    by key path (`_pairs`); arrays are read in boxes as large as the larger of the two
    sides' chunks, each chunk checked as restore checks it, with host memory within
    ``memory_budget`` or about four times the largest chunk where that is more (a chunk is
    read whole). Two of this library's checkpoints whose array
    has the same chunk grid on both sides are compared by the manifests' crc32c first, and
    only chunks whose checksums differ are read (two chunks of different bytes share a
    crc32c with a chance of 1 in 2**32: ``by_checksum=False`` reads everything).

    Args:
        rtol, atol: an element is equal within tolerance when ``|a - b| <= atol + rtol *
            |b|`` (B is the reference); 0 and 0 ask for equal values.
        only: compare only leaves whose key path matches one of these patterns (as
            ``--spec`` takes them: ``opt/**/mu``); a pattern matching no leaf on either
            side is an error.
        memory_budget: bound on host memory for array data read at once.
        by_checksum: skip chunks whose crc32c is the same on both sides.
        timeout_s: give up after this long (`DeadlineExceededError`); None: only each
            request's own deadline and retries bound it.
        progress: called with (bytes compared, bytes in all) as it goes.

    Returns:
        A `DiffResult`: ``.equal``, ``.differences``, ``.summary()``, each leaf's figures.

    Raises:
        InvalidArgumentError: a negative tolerance, or a pattern of ``only`` that matches
            no leaf.
        CheckpointNotFoundError, CorruptCheckpointError: as restore, for either side.
    """
    if not (rtol >= 0 and atol >= 0):  # NaN is refused too
        raise InvalidArgumentError(f"rtol={rtol} and atol={atol} must be 0 or more")
    if memory_budget < 1 << 20:
        raise InvalidArgumentError(f"memory_budget={memory_budget} is below 1 MiB: chunks "
                                   "are read whole, so it could not be kept")
    sides = []
    for url in (a, b):
        store = bounded(open_store(url), timeout_s, "comparing")
        deadline = store.deadline if isinstance(store, DeadlineStore) else None
        sides.append(_Side(open_readable(store), deadline))
    sa, sb = sides
    pairs = _pairs(sa.source.manifest.leaves, sb.source.manifest.leaves)
    if only:
        def wanted(pattern: str, ra: LeafRecord | None, rb: LeafRecord | None) -> bool:
            return any(path_matches(pattern, slash_path(r.path)) for r in (ra, rb)
                       if r is not None)

        unused = [p for p in only if not any(wanted(p, ra, rb) for _, ra, rb in pairs)]
        if unused:
            shown = ", ".join(name for name, _, _ in pairs[:3]) or "nothing: no leaves"
            raise InvalidArgumentError(f"--only pattern(s) {unused} match no leaf of either "
                                       f"checkpoint (key paths look like {shown})")
        pairs = [(n, ra, rb) for n, ra, rb in pairs if any(wanted(p, ra, rb) for p in only)]
    both = [(ra, rb) for _, ra, rb in pairs if ra is not None and rb is not None
            and ra.kind in _ARRAYS and rb.kind in _ARRAYS and ra.shape == rb.shape
            and ra.dtype == rb.dtype]
    total = sum(r.nbytes for pair in both for r in pair if r.kind == LeafKind.ARRAY)
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(min(done, total), total)

    sa.source.check_files([ra for ra, _ in both])
    sb.source.check_files([rb for _, rb in both])
    out: list[LeafDiff] = []
    for name, ra, rb in pairs:
        if ra is None or rb is None:
            out.append(LeafDiff(name, ONLY_B if ra is None else ONLY_A, _describe(ra),
                                _describe(rb)))
        else:
            out.append(_compare(name, sa, ra, sb, rb, rtol, atol, memory_budget, by_checksum,
                                advance))
    return DiffResult(sa.source.store.url, sb.source.store.url, rtol, atol, out,
                      sa.read + sb.read, total)
