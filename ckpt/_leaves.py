"""What a leaf becomes in a checkpoint, and back: classification, dtypes, inline values.

Called by the save path (`classify`) on the calling thread before anything is written, and
by restore (`decode_inline`, `decode_value`) on every process.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax
import ml_dtypes
import numpy as np

from ckpt._format import DTYPE_SIZES, LeafKind, LeafRecord, pack, unpack
from ckpt._tree import KeyPath, check_text, is_empty_container, leaf_name, path_text
from ckpt.errors import CorruptCheckpointError, UnsupportedLeafError

# Arrays at most this large are stored in the manifest instead of as a zarr array: one
# object fewer per small leaf (optimizer step counts, scalars, biases).
INLINE_LIMIT = 16 << 10

SUPPORTED_DTYPES = frozenset(DTYPE_SIZES)

_VALUE_TYPES: dict[type, str] = {bool: "bool", int: "int", float: "float", complex: "complex",
                                 str: "str", bytes: "bytes"}


def dtype_from_name(name: str, what: str) -> np.dtype[Any]:
    """The numpy dtype of a saved dtype name (``bfloat16`` and float8 come from ml_dtypes)."""
    if name not in SUPPORTED_DTYPES:
        raise CorruptCheckpointError(f"{what} has unsupported dtype {name!r:.40}")
    if hasattr(ml_dtypes, name):
        scalar: type[np.generic] = getattr(ml_dtypes, name)  # a numpy scalar type
        return np.dtype(scalar)
    return np.dtype(name)


def _check_dtype(dtype: Any, path: KeyPath) -> str:
    try:
        name: str = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in SUPPORTED_DTYPES:
        raise UnsupportedLeafError(f"leaf {path_text(path)} has unsupported dtype {name}; "
                                   f"supported: {', '.join(sorted(SUPPORTED_DTYPES))}")
    return name


def mesh_and_spec(sharding: Any) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None,
                                          list[Any] | None]:
    """The saved mesh (shape, axis names) and PartitionSpec of a NamedSharding, else Nones."""
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None, None, None
    mesh = sharding.mesh
    spec: list[Any] = []
    for entry in sharding.spec:
        if entry is None or isinstance(entry, str):
            spec.append(entry)
        else:
            spec.append(list(entry))
    return tuple(mesh.axis_sizes), tuple(mesh.axis_names), spec


def is_typed_key(leaf: Any) -> bool:
    """Whether ``leaf`` is a new-style typed PRNG key array (``jax.random.key``)."""
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and \
        jax.numpy.issubdtype(leaf.dtype, jax.dtypes.prng_key)


class PerProcess:
    """A leaf whose value differs per process (a host's data-loader position, its shard of
    a sampler's seed): each process saves its own ``value`` (plain msgpack data), and a
    restore gives each process the value it saved, as a `PerProcess` (or as the plain value
    under a plain target leaf). Restoring onto a different process count is an error
    naming the leaf, unless the target leaves it out."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:
        return f"PerProcess({self.value!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PerProcess) and bool(self.value == other.value)

    __hash__ = None  # type: ignore[assignment]


def is_array_like(leaf: Any) -> bool:
    """Whether a restore target's leaf asks for an array (it has a shape and a dtype: a
    `jax.Array`, `jax.ShapeDtypeStruct` or numpy array)."""
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype")


def is_stateful(leaf: Any) -> bool:
    """Whether ``leaf`` follows the state protocol (Grain's iterators, a user's class):
    ``get_state()`` returns plain data, ``set_state(state)`` restores it. Saved per process."""
    return (callable(getattr(leaf, "get_state", None))
            and callable(getattr(leaf, "set_state", None))
            and not isinstance(leaf, (jax.Array, np.ndarray, type)))


def per_process_record(path: KeyPath, leaf: Any) -> LeafRecord:
    """The record of a `PerProcess` or stateful leaf, holding (for now) this process's own
    value, snapshotted: ``get_state()`` is called here, in `save_async`'s blocking part."""
    stateful = not isinstance(leaf, PerProcess)
    value = leaf.get_state() if stateful else leaf.value
    what = f"{'get_state() of ' if stateful else 'the PerProcess value of '}leaf {path_text(path)}"
    try:
        value = unpack(pack(value), what)  # a copy: later changes are not saved
    except (TypeError, ValueError, OverflowError, CorruptCheckpointError) as exc:
        raise UnsupportedLeafError(f"{what} is not plain msgpack data (dicts, lists, str, "
                                   f"bytes, numbers, bool, None): {exc}") from exc
    return LeafRecord(path=path, kind=LeafKind.PER_PROCESS,
                      vtype="state" if stateful else "value", value=value)


def saved_state(rec: LeafRecord, index: int, target: Any, what: str) -> Any:
    """Process ``index``'s value of the per-process leaf ``rec``, as it is handed back.

    A state Grain's checkpoint handler wrote as JSON text (vtype ``json``, from an Orbax
    step) is given as Grain's own handler gives it: the text's bytes to an object whose
    ``get_state()`` returns bytes (a `DataLoader`'s iterator), else the parsed JSON (a
    dataset iterator's dict, and what a restore without a target returns).
    Called by restore and `ckpt.metadata` on any process.
    """
    value = rec.value[index] if index < len(rec.value) else None
    if rec.vtype != "json" or value is None:
        return value
    if is_stateful(target) and isinstance(target.get_state(), (bytes, bytearray)):
        return value.encode("utf-8")
    try:
        return json.loads(value)
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{what}: process {index}'s saved state is not JSON: "
                                     f"{exc}"[:300]) from None


def empty_record(path: KeyPath, leaf: Any) -> LeafRecord:
    """The record of an empty container: a dict (or a namedtuple, whose fields come back as
    dict keys) restores as ``{}``, a list or tuple as ``[]``, without a target."""
    mapping = isinstance(leaf, dict) or hasattr(type(leaf), "_fields")
    return LeafRecord(path=path, kind=LeafKind.EMPTY, vtype="dict" if mapping else "list")


def classify(path: KeyPath, leaf: Any, process_count: int) -> LeafRecord:
    """Decides how ``leaf`` is stored; raises `UnsupportedLeafError` naming its key path."""
    if leaf is None:
        return LeafRecord(path=path, kind=LeafKind.NONE)
    if is_empty_container(leaf):
        return empty_record(path, leaf)
    if isinstance(leaf, PerProcess) or is_stateful(leaf):
        return per_process_record(path, leaf)
    if isinstance(leaf, jax.core.Tracer):
        raise UnsupportedLeafError(
            f"leaf {path_text(path)} is a traced value ({type(leaf).__name__}): saving was "
            "called inside jax.jit, grad, vmap or another transformation; save outside "
            "traced code, with the concrete arrays the traced function returns")
    if isinstance(leaf, jax.Array):
        if leaf.is_deleted():
            raise UnsupportedLeafError(f"leaf {path_text(path)} is a deleted (donated) jax.Array")
        if is_typed_key(leaf):
            # Stored as its key data (uint32, trailing implementation dimensions) with the
            # implementation's name; the spec is the key array's own.
            rec = classify(path, jax.random.key_data(leaf), process_count)
            mesh_shape, mesh_axes, spec = mesh_and_spec(leaf.sharding)
            return dataclasses.replace(rec, prng_impl=str(jax.random.key_impl(leaf)),
                                       mesh_shape=mesh_shape, mesh_axes=mesh_axes, spec=spec)
        dtype = _check_dtype(leaf.dtype, path)
        mesh_shape, mesh_axes, spec = mesh_and_spec(leaf.sharding)
        small = leaf.nbytes <= INLINE_LIMIT and (
            process_count == 1 or leaf.sharding.is_fully_replicated)
        return LeafRecord(path=path, kind=LeafKind.INLINE if small else LeafKind.ARRAY,
                          source="jax",
                          shape=tuple(leaf.shape), dtype=dtype, mesh_shape=mesh_shape,
                          mesh_axes=mesh_axes, spec=spec,
                          name="" if small else leaf_name(path))
    if isinstance(leaf, (np.ndarray, np.generic)):
        dtype = _check_dtype(leaf.dtype, path)
        small = leaf.nbytes <= INLINE_LIMIT
        source = "numpy_scalar" if isinstance(leaf, np.generic) else "numpy"
        return LeafRecord(path=path, kind=LeafKind.INLINE if small else LeafKind.ARRAY,
                          source=source,
                          shape=tuple(np.shape(leaf)), dtype=dtype,
                          name="" if small else leaf_name(path))
    vtype = _VALUE_TYPES.get(type(leaf))
    if vtype is None:
        raise UnsupportedLeafError(
            f"leaf {path_text(path)} has type {type(leaf).__module__}.{type(leaf).__qualname__}, "
            "which cannot be saved; leaves must be jax.Array, numpy arrays or scalars, "
            "bool/int/float/complex/str/bytes, or None")
    if isinstance(leaf, str):
        check_text(leaf, f"leaf {path_text(path)}")
    return LeafRecord(path=path, kind=LeafKind.VALUE, vtype=vtype, value=encode_value(leaf))


def encode_value(value: Any) -> Any:
    """A Python scalar or string as plain msgpack data."""
    if isinstance(value, complex):
        return [value.real, value.imag]
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**64:
        return str(value)
    return value


def decode_value(leaf: LeafRecord, what: str) -> Any:
    """Inverse of `encode_value`, validating the stored type."""
    v, t = leaf.value, leaf.vtype
    try:
        if t == "complex" and isinstance(v, list) and len(v) == 2:
            return complex(float(v[0]), float(v[1]))
        if t == "int" and isinstance(v, (int, str)) and not isinstance(v, bool):
            return int(v)
        if t == "float" and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        expected = {"bool": bool, "str": str, "bytes": bytes}.get(t)
        if expected is not None and isinstance(v, expected):
            return v
    except (TypeError, ValueError):
        pass
    raise CorruptCheckpointError(f"{what} holds a malformed {t!r:.20} value")


def encode_inline(array: np.ndarray) -> bytes:
    """The C-order little-endian bytes of a small array."""
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def decode_inline(leaf: LeafRecord, what: str) -> np.ndarray:
    """A small array stored in the manifest, as a fresh numpy array."""
    dtype = dtype_from_name(leaf.dtype, what)
    count = math.prod(leaf.shape)  # Python ints: numpy's product would wrap around
    if count * dtype.itemsize != len(leaf.data):
        raise CorruptCheckpointError(
            f"{what} holds {len(leaf.data)} bytes, its shape and dtype need "
            f"{count * dtype.itemsize}")
    return np.frombuffer(leaf.data, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(leaf.shape)
