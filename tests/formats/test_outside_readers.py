"""The format can be read without this library (docs/format.md): the manifest with plain
msgpack, every array with zarr-python 3 (all dtypes it has: not bfloat16 or float8), and
each chunk's crc32c recomputed from what zarr-python decodes."""

import google_crc32c
import msgpack
import numpy as np
import pytest
import zarr
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ckpt
from tests.conftest import make_mesh

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]


def _values(dtype, shape, seed):
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal(shape) * 100
    if dtype == "bool":
        return raw > 0
    if dtype.startswith("complex"):
        return (raw + 1j * raw[::-1]).astype(dtype)
    return raw.astype(dtype)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    import jax

    mesh = make_mesh((2, 4))
    tree = {}
    for i, dtype in enumerate(DTYPES):
        host = _values(dtype, (192, 128), i)  # over 16 KiB: stored as zarr arrays
        tree[f"np_{dtype}"] = host
        if dtype not in ("complex128", "float64", "int64", "uint64"):  # x64 off in JAX
            tree[f"jax_{dtype}"] = jax.device_put(host, NamedSharding(mesh, P("data", "model")))
    url = str(tmp_path_factory.mktemp("outside") / "ck")
    ckpt.save(url, tree)
    return url, {k: np.asarray(v) for k, v in tree.items()}


def test_zarr_python_reads_every_array_it_has_a_dtype_for(saved):
    url, expected = saved
    with open(f"{url}/COMMIT", "rb") as f:
        attempt = msgpack.unpackb(f.read())["attempt"]
    with open(f"{url}/{attempt}/manifest.msgpack", "rb") as f:
        manifest = msgpack.unpackb(f.read())
    arrays = [leaf for leaf in manifest["leaves"] if leaf["kind"] == "array"]
    assert {leaf["dtype"] for leaf in arrays} == set(DTYPES)
    read = 0
    for leaf in arrays:
        name = leaf["path"][0][1]
        arr = zarr.open_array(f"{url}/{attempt}/arrays/{leaf['name']}", mode="r")
        got = arr[...]
        assert isinstance(got, np.ndarray), type(got)  # an array of more than 0 dimensions
        assert got.dtype == expected[name].dtype and got.tobytes() == expected[name].tobytes(), \
            name
        # The manifest's per-chunk crc32c covers the chunk's logical little-endian bytes.
        grid = [-(-n // c) for n, c in zip(leaf["shape"], leaf["chunk_shape"], strict=True)]
        for flat, crc in enumerate(leaf["chunks"]["crc32c"]):
            coord = np.unravel_index(flat, grid)
            box = tuple(slice(i * c, min((i + 1) * c, n))
                        for i, c, n in zip(coord, leaf["chunk_shape"], leaf["shape"], strict=True))
            chunk = np.ascontiguousarray(got[box], dtype=got.dtype.newbyteorder("<"))
            assert google_crc32c.value(chunk.view(np.uint8)) == crc, (name, flat)
        read += 1
    assert read >= len(DTYPES)
