"""Property tests of the pure planning functions: restore reads and save ownership."""

import math

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ckpt import _ownership as own
from ckpt.restore import box_shape, box_size, chunk_box, grid_shape, intersect, plan_reads
from ckpt.restore.boxes import box_of_index
from tests.conftest import make_mesh


@st.composite
def layouts(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.integers(1, 12)) for _ in range(ndim))
    chunk = tuple(draw(st.integers(1, n)) for n in shape)
    targets = []
    for _ in range(draw(st.integers(1, 5))):
        box = []
        for n in shape:
            a = draw(st.integers(0, n))
            b = draw(st.integers(a, n))
            box.append((a, b))
        targets.append(tuple(box))
    return shape, chunk, targets


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_plan_reads_tiles_every_target_once_and_reads_each_chunk_once(layout):
    shape, chunk, targets = layout
    plan = plan_reads(shape, chunk, targets)
    coords = [r.coord for r in plan]
    assert len(coords) == len(set(coords))
    source = np.arange(math.prod(shape)).reshape(shape)
    filled = [np.full(box_shape(t), -1) for t in targets]
    for r in plan:
        assert r.box == chunk_box(r.coord, chunk, shape)
        data = source[tuple(slice(a, b) for a, b in r.box)]
        for p in r.pieces:
            assert (filled[p.target][p.dst] == -1).all()  # no piece written twice
            filled[p.target][p.dst] = data[p.src]
    for t, f in zip(targets, filled, strict=True):
        np.testing.assert_array_equal(f, source[tuple(slice(a, b) for a, b in t)])
    # Only chunks overlapping some target are read.
    needed = {c for c in np.ndindex(*grid_shape(shape, chunk))
              if any(intersect(chunk_box(c, chunk, shape), t) for t in targets if box_size(t))}
    assert set(coords) == needed


@st.composite
def shardings(draw):
    mesh_shape = draw(st.sampled_from([(2, 4), (4, 2), (1, 8), (8, 1), (2, 2), (1, 1)]))
    mesh = make_mesh(mesh_shape)
    ndim = draw(st.integers(1, 3))
    axes = [None, "data", "model"]
    spec = [draw(st.sampled_from(axes)) for _ in range(ndim)]
    used = [a for a in spec if a]
    if len(used) != len(set(used)):
        spec = [None] * ndim
    shape = tuple(draw(st.sampled_from([8, 16, 64, 1024])) for _ in range(ndim))
    itemsize = draw(st.sampled_from([1, 2, 4]))
    return own.ArrayInput(shape, itemsize, NamedSharding(mesh, P(*spec)))


class FakeDevice:
    """A device id with a process index of the test's choosing (and the CPU platform)."""

    def __init__(self, device_id, process_index):
        self.id, self.process_index, self.platform = device_id, process_index, "cpu"

    def __hash__(self):
        return hash(self.id)

    def __eq__(self, other):
        return self.id == other.id


class OnProcesses:
    """A sharding whose devices are spread over processes by ``process_of(device id)``."""

    def __init__(self, sharding, process_of):
        self.sharding, self.process_of = sharding, process_of

    def devices_indices_map(self, shape):
        return {FakeDevice(d.id, self.process_of(d.id)): idx
                for d, idx in self.sharding.devices_indices_map(shape).items()}


@settings(max_examples=100, deadline=None)
@given(st.lists(shardings(), min_size=1, max_size=4), st.integers(1, 4))
def test_ownership_covers_every_chunk_once_from_a_holder(arrays, processes):
    # Pretend devices are spread over `processes` processes by id; plans must agree on
    # every process and each chunk must be written by a process holding its data.
    inputs = [own.ArrayInput(a.shape, a.itemsize,
                             OnProcesses(a.sharding, lambda i: i % processes))
              for a in arrays]
    plans = [own.plan(inputs, p, processes) for p in range(processes)]
    for a, arr in enumerate(arrays):
        writers = plans[0][a].writers
        assert all(plans[p][a].writers == writers for p in range(processes))
        assert -1 not in writers
        owned = {}
        for p in range(processes):
            for flat, (dev, shard_box) in plans[p][a].owned.items():
                assert flat not in owned
                owned[flat] = p
                assert dev.process_index == p == writers[flat]
                if plans[p][a].shards:
                    # A small array gathered into one chunk by a process holding all of it:
                    # one replica of each distinct shard, all on that process.
                    boxes = {box_of_index(i, arr.shape)
                             for i in arr.sharding.devices_indices_map(arr.shape).values()}
                    assert len(writers) == 1
                    assert plans[p][a].chunk_shape == arr.shape
                    assert sorted(b for _, b in plans[p][a].shards) == sorted(boxes)
                    assert all(d.process_index == p for d, _ in plans[p][a].shards)
                    assert math.prod(arr.shape) * arr.itemsize < own.WHOLE_ARRAY_BYTES
                    continue
                cbox = plans[p][a].chunk_box(flat)
                assert intersect(cbox, shard_box) == cbox  # chunk inside the writer's shard
        assert sorted(owned) == list(range(len(writers)))
        if not any(plans[p][a].shards for p in range(processes)):
            shard = arr.sharding.shard_shape(arr.shape)
            assert all(s % c == 0 for s, c in zip(shard, plans[0][a].chunk_shape, strict=True))


def test_a_zero_size_array_held_whole_by_one_process_is_not_gathered():
    # Model parallel inside each of two processes: process p holds every shard of an array
    # sharded over its local devices only. A zero-size one keeps a chunk shape of no zeros
    # (readers refuse a zero in it) and has no chunk to write.
    mesh = make_mesh((2, 4))
    sharding = OnProcesses(NamedSharding(mesh, P(None, "model")), lambda i: 0 if i < 4 else 1)
    for shape in ((0, 8), (16, 8)):
        plans = [own.plan([own.ArrayInput(shape, 4, sharding)], p, 2)[0] for p in range(2)]
        assert all(0 not in p.chunk_shape for p in plans)
        assert plans[0].writers == plans[1].writers
        assert len(plans[0].writers) == (
            0 if 0 in shape else 1)


def test_replicated_bytes_spread_over_processes():
    mesh = make_mesh((2, 4))

    def pairs(i):
        return i // 2

    arrays = [own.ArrayInput((4096, 1024), 4, OnProcesses(NamedSharding(mesh, P()), pairs)),
              own.ArrayInput((2048, 512), 4, OnProcesses(NamedSharding(mesh, P("model")), pairs))]
    plans = own.plan(arrays, 0, 4)
    load = [0] * 4
    for p in plans:
        for flat, w in enumerate(p.writers):
            load[w] += box_size(p.chunk_box(flat)) * 4
    assert max(load) <= 1.1 * (sum(load) / 4)


def test_chunk_shape_caps_size_and_divides_shard():
    c = own.choose_chunk_shape((8192, 4096), 4, 1)
    assert math.prod(c) * 4 <= own.MAX_CHUNK_BYTES
    assert 8192 % c[0] == 0
    assert 4096 % c[1] == 0
    assert own.choose_chunk_shape((7, 3), 4, 8) == (7, 3)  # nothing to halve: stays whole
    assert jax.device_count() == 8
