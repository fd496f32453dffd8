"""Compression of array chunks: the one opt-in codec (zstd) and what follows from it.

A compression is named by a string, ``"zstd"`` (level `DEFAULT_ZSTD_LEVEL`) or
``"zstd:<level>"``; `canonical` turns what a caller passed (`save`, `save_async`,
`CheckpointManager`, `reshard`, `convert`, the CLI's ``--compression``) into the form leaf
records carry (``""`` for none, else ``"zstd:<level>"``). This module owns the three other
forms of the same fact: the zarr v3 codec chain of an array (`zarr_codecs`), the
manifest's map (`to_manifest`, `from_manifest`; docs/format.md), and the least number of
bytes a genuine chunk object can hold (`min_stored_bytes`), which lets a reader refuse a
forged shape before it allocates from it.
"""

from __future__ import annotations

from typing import Any

from ckpt.errors import CorruptCheckpointError, InvalidArgumentError

DEFAULT_ZSTD_LEVEL = 3
# zstd's own range (negative levels are its "fast" ones); TensorStore and zarr-python take it.
ZSTD_LEVELS = range(-131072, 23)
# A zstd block holds at most 128 KiB of data, and the smallest block (one repeated byte)
# takes 4 stored bytes: no valid frame is smaller than this share of what it decodes to.
_ZSTD_BLOCK = 128 << 10
_ZSTD_MIN_BLOCK = 4
# What the crc32c codec appends to each chunk object.
CRC_TAIL = 4


def canonical(compression: str | None, what: str = "compression") -> str:
    """The leaf records' form of a caller's ``compression``: ``""`` for None, else
    ``"zstd:<level>"``.

    Raises:
        InvalidArgumentError: anything else, naming ``what`` and the value.
    """
    if compression is None:
        return ""
    name, sep, level_text = str(compression).partition(":") \
        if isinstance(compression, str) else ("", "", "")
    if name == "zstd":
        try:
            level = int(level_text) if sep else DEFAULT_ZSTD_LEVEL
        except ValueError:
            level = None
        if level is not None and level in ZSTD_LEVELS:
            return f"zstd:{level}"
    raise InvalidArgumentError(
        f"{what}={compression!r}: expected None, 'zstd' or 'zstd:<level>' (a level from "
        f"{ZSTD_LEVELS.start} to {ZSTD_LEVELS.stop - 1}; {DEFAULT_ZSTD_LEVEL} by default)")


def _level(compression: str) -> int:
    return int(compression.partition(":")[2])


def zarr_codecs(compression: str) -> list[dict[str, Any]]:
    """The zarr v3 codec chain of an array: bytes (little-endian; TensorStore drops the byte
    order of single-byte types), then zstd when compressed, then crc32c, so the checksum
    TensorStore and zarr-python verify on every read covers the bytes as stored."""
    codecs: list[dict[str, Any]] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compression:
        codecs.append({"name": "zstd",
                       "configuration": {"level": _level(compression), "checksum": False}})
    codecs.append({"name": "crc32c"})
    return codecs


def to_manifest(compression: str) -> dict[str, Any]:
    """The manifest's ``compression`` map of a compressed leaf."""
    return {"name": "zstd", "level": _level(compression)}


def from_manifest(raw: Any, what: str) -> str:
    """The leaf record's form of a manifest's ``compression`` map.

    Raises:
        CorruptCheckpointError: not a map of a known codec and a level in its range.
    """
    if isinstance(raw, dict) and set(raw) == {"name", "level"} and raw["name"] == "zstd" \
            and type(raw["level"]) is int and raw["level"] in ZSTD_LEVELS:
        return f"zstd:{raw['level']}"
    raise CorruptCheckpointError(f"{what} has an unknown compression {raw!r:.80}")


def min_stored_bytes(compression: str, nbytes: int) -> int:
    """The fewest bytes a genuine chunk object of ``nbytes`` decoded bytes holds: exactly
    ``nbytes`` plus the checksum uncompressed; with zstd, at least one smallest block for
    each 128 KiB it decodes to. Readers compare listed sizes against it (`ckpt._reader`)."""
    if not compression:
        return nbytes + CRC_TAIL
    return -(-nbytes // _ZSTD_BLOCK) * _ZSTD_MIN_BLOCK + CRC_TAIL
