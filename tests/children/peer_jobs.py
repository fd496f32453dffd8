"""Functions the peer-transport tests (tests/runs/test_peers.py) run in every process of a
`tools.launch` job."""

import hashlib
from unittest import mock

import jax
import numpy as np

from ckpt import _peers
from ckpt.errors import CorruptCheckpointError


def payload(src, dst, nbytes):
    """The bytes process ``src`` sends to ``dst``: different for every pair."""
    seed = int.from_bytes(hashlib.sha256(f"{src}->{dst}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def _run(transfers, wave_bytes):
    me = jax.process_index()
    got = {t.src: bytearray() for t in transfers if t.dst == me}

    def source(t, offset, length):
        assert t.src == me
        return payload(t.src, t.dst, t.nbytes)[offset:offset + length]

    def sink(t, offset, data):
        assert t.dst == me
        buf = got[t.src]
        assert offset == len(buf), (offset, len(buf))
        buf += data.tobytes()

    _peers.exchange(transfers, source, sink, wave_bytes=wave_bytes)
    wrong = [t.src for t in transfers if t.dst == me
             and bytes(got[t.src]) != payload(t.src, t.dst, t.nbytes).tobytes()]
    return {"received": sorted(src for src, buf in got.items() if len(buf)), "wrong": wrong}


def to_holders(replicas, sizes, wave_bytes):
    """Every process sends ``sizes[p]`` bytes to each of its holders; returns what arrived."""
    n = jax.process_count()
    holding = _peers.holders(n, replicas)
    transfers = [_peers.Transfer(p, h, sizes[p]) for p in range(n) for h in holding[p]]
    out = _run(transfers, wave_bytes)
    out["expected"] = [p for p in _peers.held_for(holding, jax.process_index()) if sizes[p]]
    return out


def many_to_one(nbytes, wave_bytes):
    """Every other process sends to process 0 (one round each)."""
    n = jax.process_count()
    return _run([_peers.Transfer(p, 0, nbytes) for p in range(1, n)], wave_bytes)


def damaged_in_transit(nbytes):
    """One byte flipped on its way: the receiver must refuse it, naming the sender."""
    real = _peers._permute

    def flipping(mesh, perm):
        moved = real(mesh, perm)

        def run(x):
            out = moved(x)
            data = np.array(out.addressable_data(0))
            data[0, 0] ^= 1
            return jax.make_array_from_single_device_arrays(
                out.shape, out.sharding, [jax.device_put(data, out.addressable_data(0).device)])
        return run

    with mock.patch.object(_peers, "_permute", flipping):
        try:
            _run([_peers.Transfer(1, 0, nbytes)], 1 << 20)
        except CorruptCheckpointError as exc:
            return str(exc)
    return None
