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
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import google_crc32c
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ckpt.errors import CorruptCheckpointError, InvalidArgumentError

# Bytes each process sends in one collective when the caller gives no budget.
DEFAULT_WAVE_BYTES = 64 << 20


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
    twice that (on host and on its device) at any time.

    Raises:
        CorruptCheckpointError: the bytes that arrived do not match the crc32c their sender
            computed (naming both processes).
    """
    if not transfers:
        return
    me = jax.process_index()
    mesh = _mesh()
    sharding = NamedSharding(mesh, _ROWS)
    device = mesh.devices[me]
    count = jax.process_count()
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
            if sending is not None:
                sent_crc = _fill(row[0], sending, start, sent_crc, source)
            moved = perm(jax.make_array_from_single_device_arrays(
                (count, width), sharding, [jax.device_put(row, device)]))
            if receiving is not None:
                got = np.asarray(moved.addressable_data(0))[0]
                n = receiving.nbytes
                if start < n:
                    body = got[:min(width, n - start)]
                    got_crc = google_crc32c.extend(got_crc, body)
                    sink(receiving, start, body)
                lo, hi = max(start, n), min(start + width, n + 4)
                tail += got[lo - start:hi - start].tobytes() if lo < hi else b""
            del moved
        if receiving is not None and int.from_bytes(bytes(tail), "little") != got_crc:
            raise CorruptCheckpointError(
                f"{receiving.nbytes} bytes sent by process {receiving.src} to process "
                f"{receiving.dst} arrived damaged (crc32c mismatch)")


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
