"""Peers of the local tier: which processes hold a replica of each process's copy, and the
transport that moves bytes between processes over JAX's own collectives (docs/tiers.md,
"Peer replicas").

`holders` is a pure function of the job's size, the number of replicas and the processes'
failure domains: every process computes the same placement with nothing exchanged.

`exchange` moves byte strings between processes with jitted permutations (`ppermute`) of
one buffer per process over a mesh of one device per process: the same interconnect the
training step's collectives use (gloo between CPU processes, NCCL between GPUs), and no
transport of this library's own. It is collective: every process of the job calls it with
the same list of transfers, on the caller's thread (never on a background thread: two
threads issuing collectives in different orders on different processes would deadlock).
Each transfer ends with the crc32c of its bytes, checked on arrival.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import google_crc32c
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ckpt._ownership import ArrayPlan
from ckpt._snapshot import Cancelled, ChunkWrite, Feed, Snapshot, Unit
from ckpt.errors import CorruptCheckpointError, InvalidArgumentError
from ckpt.restore.boxes import Box, box_shape, box_size, to_slices
from ckpt.storage import Deadline

# Bytes each process sends in one collective. Measured between two CPU processes (gloo):
# 512 MiB each way took 0.8 s in waves of 4, 8 or 16 MiB, 1.9 s in waves of 32 MiB and 1.6 s
# in waves of 64 MiB (a fresh output buffer faulted in for each larger wave).
DEFAULT_WAVE_BYTES = 16 << 20


def holders(count: int, replicas: int,
            domains: Sequence[Hashable] | None = None) -> list[list[int]]:
    """``holders(n, r, domains)[p]``: the ``r`` processes that hold a replica of process
    ``p``'s copy, in order.

    Without ``domains`` the k-th replica of ``p`` goes to ``(p + k * (n // (r + 1))) % n``
    (one replica: the process half the job away, which with several processes per host and
    hosts numbered in order is another host). ``domains[p]`` names process ``p``'s failure
    domain (a host, a rack, a slice): the processes are then ordered domain by domain and
    each replica goes to the first process at that distance along that order whose domain
    holds no copy of ``p`` yet, so that losing one domain loses at most one copy of anything.

    Raises:
        InvalidArgumentError: ``r`` is negative or not below ``n``; ``domains`` does not
            name one domain per process, or names fewer than ``r + 1`` domains.
    """
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        raise InvalidArgumentError(
            f"local_replicas must be an integer >= 0, got {replicas!r}")
    if replicas >= max(count, 1) and replicas:
        raise InvalidArgumentError(
            f"local_replicas={replicas} needs more than {replicas} processes; this job has "
            f"{count}")
    if domains is None:
        order, of = list(range(count)), list(range(count))
    else:
        domains = list(domains)
        if len(domains) != count:
            raise InvalidArgumentError(
                f"local_domains names {len(domains)} failure domains, one per process is "
                f"needed ({count} processes)")
        distinct = list(dict.fromkeys(domains))
        if len(distinct) < replicas + 1:
            raise InvalidArgumentError(
                f"local_replicas={replicas} needs at least {replicas + 1} failure domains "
                f"so that no domain holds two copies of one process's shards; local_domains "
                f"names {len(distinct)}: {distinct}")
        rank = {d: i for i, d in enumerate(distinct)}
        order = sorted(range(count), key=lambda p: (rank[domains[p]], p))
        of = [rank[d] for d in domains]
    position = {p: i for i, p in enumerate(order)}
    step = max(1, count // (replicas + 1))
    out: list[list[int]] = []
    for p in range(count):
        chosen: list[int] = []
        used = {of[p]}
        for k in range(1, replicas + 1):
            start = position[p] + k * step
            for j in range(count):
                q = order[(start + j) % count]
                if q != p and q not in chosen and of[q] not in used:
                    chosen.append(q)
                    used.add(of[q])
                    break
        out.append(chosen)
    return out


def held_for(holding: list[list[int]], process: int) -> list[int]:
    """The processes whose copies ``process`` holds a replica of, ascending."""
    return sorted(p for p, hs in enumerate(holding) if process in hs)


@dataclasses.dataclass(frozen=True)
class Transfer:
    """``nbytes`` bytes from process ``src`` to process ``dst``."""

    src: int
    dst: int
    nbytes: int


def rounds(transfers: Sequence[Transfer]) -> list[list[Transfer]]:
    """The transfers in rounds in which each process sends at most one and receives at most
    one (each round is one permutation); greedy, in the order given: a pure function, so
    every process computes the same rounds."""
    out: list[tuple[set[int], set[int], list[Transfer]]] = []
    for t in transfers:
        if t.src == t.dst:
            raise InvalidArgumentError(f"a transfer from process {t.src} to itself")
        for senders, receivers, chosen in out:
            if t.src not in senders and t.dst not in receivers:
                senders.add(t.src)
                receivers.add(t.dst)
                chosen.append(t)
                break
        else:
            out.append(({t.src}, {t.dst}, [t]))
    return [chosen for _, _, chosen in out]


def _mesh() -> Mesh:
    """One device per process (its first), in process order."""
    first: dict[int, Any] = {}
    for d in jax.devices():
        if d.process_index not in first or d.id < first[d.process_index].id:
            first[d.process_index] = d
    return Mesh(np.array([first[p] for p in range(jax.process_count())]), ("process",))


# One row per process: the mesh's only axis.
_ROWS = P("process")  # type: ignore[no-untyped-call]  # unannotated in JAX


@functools.lru_cache(maxsize=32)
def _permute(mesh: Mesh, perm: tuple[tuple[int, int], ...]) -> Callable[[jax.Array], Any]:
    """The jitted permutation of the rows over ``mesh`` (compiled once per permutation and
    row width, cached by JAX)."""
    shard_map: Any = getattr(jax, "shard_map", None)
    if shard_map is None:  # jax < 0.7
        from jax.experimental.shard_map import shard_map
    body = functools.partial(jax.lax.ppermute, axis_name="process", perm=perm)
    return jax.jit(shard_map(body, mesh=mesh, in_specs=_ROWS, out_specs=_ROWS))


def exchange(transfers: Sequence[Transfer], source: Callable[[Transfer, int, int], Any],
             sink: Callable[[Transfer, int, np.ndarray], None], *,
             wave_bytes: int = DEFAULT_WAVE_BYTES) -> None:
    """Moves every transfer's bytes from its ``src`` to its ``dst``. Collective: called on
    every process with the same ``transfers``.

    ``source(t, offset, length)`` (on ``t.src``) returns that slice of its bytes (a
    bytes-like object or a uint8 array); ``sink(t, offset, data)`` (on ``t.dst``) takes each
    slice as it arrives, in order; the slice passed to it is valid only during the call.
    At most ``wave_bytes`` of one transfer travel at once, so each process holds about
    twice that (on host and on its device) at any time. An error of ``source`` or ``sink``
    is raised only after the last collective: the other processes are waiting in each of
    them, so this process goes on taking part (sending zeros, dropping what arrives).

    Raises:
        CorruptCheckpointError: the bytes that arrived do not match the crc32c their sender
            computed (naming both processes).
        Exception: the first error of ``source`` or ``sink``.
    """
    if not transfers:
        return
    me = jax.process_index()
    mesh = _mesh()
    sharding = NamedSharding(mesh, _ROWS)
    device = mesh.devices[me]
    count = jax.process_count()
    failed: BaseException | None = None  # raised once every collective has run
    for group in rounds(transfers):
        total = max(t.nbytes + 4 for t in group)  # each transfer's bytes, then its crc32c
        width = max(1, min(wave_bytes, total))
        sending = next((t for t in group if t.src == me), None)
        receiving = next((t for t in group if t.dst == me), None)
        perm = _permute(mesh, tuple((t.src, t.dst) for t in group))
        sent_crc = got_crc = 0
        tail = bytearray()  # the crc32c's bytes as they arrive
        for start in range(0, total, width):
            row = np.zeros((1, width), np.uint8)
            if sending is not None and failed is None:
                try:
                    sent_crc = _fill(row[0], sending, start, sent_crc, source)
                except Exception as exc:  # the others are already in this collective
                    failed = exc
            moved = perm(jax.make_array_from_single_device_arrays(
                (count, width), sharding, [jax.device_put(row, device)]))
            if receiving is not None:
                got = np.asarray(moved.addressable_data(0))[0]
                n = receiving.nbytes
                if start < n:
                    body = got[:min(width, n - start)]
                    got_crc = google_crc32c.extend(got_crc, body)
                    if failed is None:
                        try:
                            sink(receiving, start, body)
                        except Exception as exc:
                            failed = exc
                lo, hi = max(start, n), min(start + width, n + 4)
                tail += got[lo - start:hi - start].tobytes() if lo < hi else b""
            del moved
        if receiving is not None and failed is None and \
                int.from_bytes(bytes(tail), "little") != got_crc:
            failed = CorruptCheckpointError(
                f"{receiving.nbytes} bytes sent by process {receiving.src} to process "
                f"{receiving.dst} arrived damaged (crc32c mismatch)")
    if failed is not None:
        raise failed


def _fill(row: np.ndarray, t: Transfer, start: int, crc: int,
          source: Callable[[Transfer, int, int], Any]) -> int:
    """Puts the bytes of ``t``'s stream (its bytes, then their crc32c) from ``start`` into
    ``row``; returns the crc32c of its bytes so far."""
    n, width = t.nbytes, row.size
    if start < n:
        data = np.frombuffer(memoryview(source(t, start, min(width, n - start))), np.uint8)
        if data.size != min(width, n - start):
            raise InvalidArgumentError(
                f"the source of {n} bytes for process {t.dst} gave {data.size} bytes at "
                f"offset {start}, {min(width, n - start)} expected")
        crc = google_crc32c.extend(crc, data)
        row[:data.size] = data
    lo, hi = max(start, n), min(start + width, n + 4)
    if lo < hi:
        row[lo - start:hi - start] = np.frombuffer(crc.to_bytes(4, "little"),
                                                   np.uint8)[lo - n:hi - n]
    return crc


# -- replicas of a local save ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Piece:
    """One chunk of a replica transfer: ``nbytes`` of record ``record``'s chunk ``flat``
    (global ``box``), in C order, as the sender's devices hold it."""

    record: int
    flat: int
    box: Box
    nbytes: int


def pieces(held: dict[int, dict[int, ArrayPlan]], src: int, dst: int,
           itemsizes: dict[int, int]) -> list[Piece]:
    """The chunks process ``src`` sends to ``dst`` for its replica: those ``src``'s local
    copy holds and ``dst``'s own does not, by record and chunk. ``held[p][r]`` is process
    ``p``'s `ckpt._ownership.held_plan` of array record ``r``. Pure: both ends compute the
    same list, so the bytes need no framing."""
    out = []
    for r in sorted(held[src]):
        mine, theirs = held[src][r], held[dst][r]
        # Shard by shard (then chunk by chunk), so that the sender holds one shard on host
        # at a time.
        for flat in sorted(mine.owned, key=lambda f: (_device_id(mine.owned[f][0]), f)):
            box = mine.chunk_box(flat)
            if flat not in theirs.owned and box_size(box):
                out.append(Piece(r, flat, box, box_size(box) * itemsizes[r]))
    return out


def _device_id(device: Any) -> int:
    return -1 if device is None else int(device.id)


class Replicas:
    """One local save's replicas on this process (docs/tiers.md, "Peer replicas"): what it
    sends to each process holding its replica and what it receives from each process it
    holds one of. Made on the caller's thread by `ckpt._local.LocalTierCopy.layout`; `run`
    runs there too, after the save's background thread started, and hands each chunk that
    arrives to ``feed`` (at most the save's memory budget of them not yet durable)."""

    def __init__(self, holding: list[list[int]], me: int, leaves: list[Any],
                 held: dict[int, dict[int, ArrayPlan]], itemsizes: dict[int, int],
                 budget: int) -> None:
        self.me = me
        self.holding = holding
        self.sources = held_for(holding, me)
        self.sends = {h: pieces(held, me, h, itemsizes) for h in holding[me]}
        self.receives = {q: pieces(held, q, me, itemsizes) for q in self.sources}
        self.feed = Feed(budget)
        self._leaves: list[Any] | None = leaves
        self._owned = held[me]
        self._dtypes = {r: np.dtype(leaves[r].dtype) for r in held[me]}

    def run(self, coord: Any, prefix: str, timeout_s: float,
            before: Callable[[], None] = lambda: None) -> None:
        """Caller's thread, every process: agrees that every process is ready (each tells
        its transfers' sizes; a process that failed before this stops the exchange on every
        process instead of leaving the others inside a collective; ``before`` runs first
        and its failure is one), then moves the replicas. What goes wrong after the
        agreement is the save's failure, raised by its background part; the exchange
        itself always runs to its end on every process."""
        feed = self.feed
        try:
            ready: Any
            try:
                before()
                ready = {str(h): sum(p.nbytes for p in ps) for h, ps in self.sends.items()}
            except Exception as exc:  # told to the others: none enters the exchange
                ready = exc
            sizes = coord.gather_all(f"{prefix}/replicas", ready, timeout_s,
                                     "starting the exchange of replicas: ")
            transfers = [Transfer(src, int(dst), nbytes)
                         for src, sent in sorted(sizes.items())
                         for dst, nbytes in sorted(sent.items(), key=lambda kv: int(kv[0]))]
            sink = _Assembly(self.receives, self._dtypes, feed)
            exchange(transfers, self._source(), sink)
            sink.check()
        except BaseException as exc:
            feed.close(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            feed.close()
        finally:
            self._leaves = None  # the caller may now donate or delete its arrays

    def _source(self) -> Callable[[Transfer, int, int], Any]:
        """The bytes of each transfer this process sends, read from the caller's arrays as
        the exchange asks for them (one shard on host at a time)."""
        assert self._leaves is not None
        leaves, owned = self._leaves, self._owned
        shard: dict[tuple[int, Any], np.ndarray] = {}

        def chunk(ps: list[Piece], i: int) -> np.ndarray:
            piece = ps[i]
            device, shard_box = owned[piece.record].owned[piece.flat]
            key = (piece.record, device)
            if key not in shard:
                shard.clear()
                leaf = leaves[piece.record]
                data = next(s.data for s in leaf.addressable_shards if s.device == device) \
                    if device is not None else leaf
                shard[key] = np.asarray(data)
            part = shard[key][to_slices(piece.box, shard_box)]
            return np.ascontiguousarray(part).reshape(-1).view(np.uint8)

        streams = {h: Concatenation([p.nbytes for p in ps], functools.partial(chunk, ps))
                   for h, ps in self.sends.items()}

        def source(t: Transfer, offset: int, length: int) -> np.ndarray:
            return streams[t.dst].read(offset, length)

        return source


class Concatenation:
    """The sending side of a transfer: items of known sizes read as one stream, front to
    back, each loaded (``load(i)``, a bytes-like object or uint8 array) when the stream
    reaches it and let go once read."""

    def __init__(self, sizes: Sequence[int], load: Callable[[int], Any]) -> None:
        self.sizes, self.load = list(sizes), load
        self.index, self.at = 0, 0  # the item being read, and its first byte's offset
        self.current: np.ndarray | None = None

    def read(self, offset: int, length: int) -> np.ndarray:
        out = np.empty(length, np.uint8)
        filled = 0
        while filled < length:
            n = self.sizes[self.index]
            if self.current is None:
                self.current = np.frombuffer(memoryview(self.load(self.index)), np.uint8)
            start = offset + filled - self.at
            take = min(length - filled, n - start)
            out[filled:filled + take] = self.current[start:start + take]
            filled += take
            if start + take == n:
                self.index, self.at, self.current = self.index + 1, self.at + n, None
        return out


class Division:
    """The receiving side of a transfer: the stream cut back into items of known sizes as
    it arrives; ``done(i, item)`` takes each item whole (a uint8 array, valid only during
    the call unless ``room`` made it), in order. ``room(i)`` gives item ``i``'s buffer when
    it is reached (it may wait for memory); a plain array by default."""

    def __init__(self, sizes: Sequence[int], done: Callable[[int, np.ndarray], None],
                 room: Callable[[int], np.ndarray] | None = None) -> None:
        self.sizes, self.done = list(sizes), done
        self.room = room or (lambda i: np.empty(self.sizes[i], np.uint8))
        self.index, self.filled = 0, 0
        self.buffer: np.ndarray | None = None

    def take(self, data: np.ndarray) -> None:
        used = 0
        self._empty_items()
        while used < data.size:
            if self.index == len(self.sizes):
                raise CorruptCheckpointError(
                    f"more bytes arrived than the {len(self.sizes)} items announced")
            n = self.sizes[self.index]
            if self.buffer is None:
                self.buffer, self.filled = self.room(self.index), 0
            step = min(data.size - used, n - self.filled)
            self.buffer[self.filled:self.filled + step] = data[used:used + step]
            self.filled += step
            used += step
            if self.filled == n:
                buffer, self.buffer = self.buffer, None
                self.done(self.index, buffer)
                self.index += 1
                self._empty_items()

    def _empty_items(self) -> None:
        while self.index < len(self.sizes) and self.sizes[self.index] == 0:
            self.done(self.index, np.empty(0, np.uint8))
            self.index += 1

    def missing(self) -> int:
        """After the stream: how many items never arrived."""
        self._empty_items()
        return len(self.sizes) - self.index


class _Assembly:
    """The receiving side of the exchange: each transfer's bytes cut back into its pieces,
    each piece handed to the feed as a unit of the save's snapshot once whole."""

    def __init__(self, receives: dict[int, list[Piece]], dtypes: dict[int, np.dtype[Any]],
                 feed: Feed) -> None:
        self.receives, self.dtypes, self.feed = receives, dtypes, feed
        self.parts = {q: Division([p.nbytes for p in ps], functools.partial(self._done, ps),
                                  functools.partial(self._room, ps))
                      for q, ps in receives.items()}

    def _room(self, ps: list[Piece], i: int) -> np.ndarray:
        self.feed.reserve(ps[i].nbytes)  # waits for the writer to make room
        return np.empty(ps[i].nbytes, np.uint8)

    def _done(self, ps: list[Piece], i: int, buffer: np.ndarray) -> None:
        piece = ps[i]
        array = buffer.view(self.dtypes[piece.record]).reshape(box_shape(piece.box))
        unit = Unit([array], [ChunkWrite(piece.record, piece.flat, to_slices(piece.box))],
                    [None], nbytes=piece.nbytes, feed=self.feed)
        self.feed.put(unit, [array])

    def __call__(self, t: Transfer, offset: int, data: np.ndarray) -> None:
        self.parts[t.src].take(data)

    def check(self) -> None:
        """After the exchange: says whether a transfer came short."""
        for q, part in self.parts.items():
            if part.missing():
                raise CorruptCheckpointError(
                    f"the replica from process {q} ended after {part.index} of "
                    f"{len(self.receives[q])} chunks")


class WithReplicas(Snapshot):
    """A local save's snapshot followed by the replicas this process receives: the save's
    background part writes its own chunks, then each replica's as the exchange hands them
    over (`Replicas.feed`)."""

    def __init__(self, own: Snapshot, replicas: Replicas) -> None:
        super().__init__(own.mode, own.units, own.feed)
        self.own, self.replicas = own, replicas

    def items(self, deadline: Deadline,
              idle: Callable[[], bool]) -> Iterator[tuple[Unit, list[np.ndarray]]]:
        yield from self.own.items(deadline, idle)
        yield from self.replicas.feed.items(deadline, idle)

    def fetch(self) -> None:
        self.own.fetch()

    def cancel(self, exc: BaseException) -> None:
        # The exchange, waiting for room for a replica's chunk, must stop waiting: the
        # other processes wait for this one inside a collective.
        self.own.cancel(exc)
        self.replicas.feed.cancel(exc)

    def release(self) -> None:
        self.own.release()
        self.units = []
        self.replicas.feed.cancel(Cancelled("the snapshot was released"))
