"""Tree key paths: flattening pytrees, naming leaves, and rebuilding nested containers.

A key path is a tuple of `(kind, value)` entries: ``("key", str | int)`` for a mapping key,
``("index", int)`` for a sequence position, ``("attr", str)`` for a named field (namedtuples,
dataclasses, optax states). Paths are what the manifest records and what restore matches a
target against, so two trees with the same structure match whatever their container types.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax

from ckpt.errors import UnsupportedLeafError

Entry = tuple[str, str | int]
KeyPath = tuple[Entry, ...]

# Leaf folder names longer than this are shortened and made unique by a digest, so that a
# deep or long-named pytree never produces a name a file system or object store refuses.
_MAX_NAME = 120
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def is_empty_container(x: Any) -> bool:
    """An empty dict, list or tuple (namedtuples included): kept as a leaf by `flatten`,
    so that it round-trips (Grain's iterator states hold some)."""
    return isinstance(x, (dict, list, tuple)) and len(x) == 0


def _is_leaf(x: Any) -> bool:
    return x is None or is_empty_container(x)


def _storable(key: str | int, where: str) -> str | int:
    """A dict key the manifest can store: an int that fits msgpack's 64-bit integers, or a
    str that encodes as UTF-8 (not one holding a lone surrogate)."""
    if isinstance(key, int) and not -2**63 <= key < 2**64:
        raise UnsupportedLeafError(
            f"dict key {key} at {where} does not fit in 64 bits; it cannot be saved")
    if isinstance(key, str):
        check_text(key, f"dict key {key!r} at {where}")
    return key


def is_text(value: Any) -> bool:
    """Whether ``value`` is a str the manifest can store as UTF-8 (no lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(text: str, what: str) -> None:
    """Refuses a str the manifest cannot store (`is_text`). Called while a save validates
    its tree, before anything is written."""
    if not is_text(text):
        raise UnsupportedLeafError(f"{what} is not valid Unicode text (it holds a lone "
                                   "surrogate); it cannot be saved")


def _raw_text(raw_path: Sequence[Any]) -> str:
    """`path_text` of a JAX key path that may not convert to ours (the error names it)."""
    parts = [str(next((getattr(raw, a) for a in ("key", "idx", "name") if hasattr(raw, a)),
                      raw)) for raw in raw_path]
    return "/".join(parts) or "the root"


def _entry(raw: Any, where: str) -> Entry:
    tu = jax.tree_util
    if isinstance(raw, tu.DictKey):
        key = raw.key
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise UnsupportedLeafError(
                f"dict key {key!r} of type {type(key).__name__} at {where}: only str and int "
                "keys can be saved")
        return ("key", _storable(key, where))
    if isinstance(raw, tu.SequenceKey):
        return ("index", raw.idx)
    if isinstance(raw, tu.GetAttrKey):
        return ("attr", _storable(raw.name, where))
    if isinstance(raw, tu.FlattenedIndexKey):
        return ("index", raw.key)
    raise UnsupportedLeafError(f"unsupported pytree key {raw!r} at {where}")


def flatten(tree: Any) -> tuple[list[tuple[KeyPath, Any]], Any]:
    """Flattens ``tree`` with `None` and empty containers kept as leaves, so they
    round-trip.

    Returns:
        The (key path, leaf) pairs in JAX's canonical order, and the treedef.
    """
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)
    out = []
    for raw_path, leaf in pairs:
        where = _raw_text(raw_path)
        out.append((tuple(_entry(r, where) for r in raw_path), leaf))
    return out, treedef


def unflatten(treedef: Any, leaves: Iterable[Any]) -> Any:
    """Inverse of `flatten` for the same treedef."""
    return jax.tree_util.tree_unflatten(treedef, list(leaves))


def slash_path(path: KeyPath) -> str:
    """The key path as a person reads and types it: ``opt/0/mu/w`` (positions as numbers,
    ``""`` for the root). The one notation of messages, the CLI, and the patterns of
    ``--spec``, ``--only``, name rules and ``rules=``."""
    return "/".join(str(value) for _, value in path)


def path_text(path: KeyPath) -> str:
    """`slash_path` for a message: the root reads ``<root>``."""
    return slash_path(path) or "<root>"


def python_path(path: KeyPath) -> str:
    """The key path in Python notation, ``['opt'][0].mu['w']`` (what
    ``jax.tree_util.keystr`` gives): injective, so the format keys by it where two leaves
    must never share a key (host reports' ``values``, the ``ckpt_key_path`` attribute).
    Messages use `path_text`."""
    if not path:
        return "<root>"
    parts = []
    for kind, value in path:
        if kind == "attr":
            parts.append(f".{value}")
        else:
            parts.append(f"[{value!r}]")
    return "".join(parts)


def _escape(text: str) -> str:
    if text == "":
        return "~"
    return "".join(c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def leaf_name(path: KeyPath) -> str:
    """The folder name of a leaf's array: an escaped, injective form of its key path.

    The result holds only ``[A-Za-z0-9_%@#~.-]``, never starts with ``.``, and contains no
    ``/``, so it is always a single safe path segment inside the checkpoint folder.
    """
    if not path:
        return "@root"
    parts = []
    for kind, value in path:
        if kind == "index":
            parts.append(f"@{value}")
        elif isinstance(value, int):
            parts.append(f"#{value}")
        else:
            parts.append(_escape(value))
    name = ".".join(parts)
    if len(name) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = f"{name[:_MAX_NAME - 18]}~~{digest}"
    return name


def nest(items: Sequence[tuple[KeyPath, Any]]) -> Any:
    """Builds nested dicts and lists from (key path, value) pairs.

    Mapping keys and attribute names become dict keys; sequence positions become list items.
    Used to restore a checkpoint without a target, on any machine.
    """
    if len(items) == 1 and not items[0][0]:
        return items[0][1]
    root: dict[Any, Any] = {}
    kinds: dict[int, str] = {}
    for path, value in items:
        node = root
        for depth, (kind, key) in enumerate(path):
            kinds[id(node)] = kind
            if depth == len(path) - 1:
                node[key] = value
            else:
                node = node.setdefault(key, {})
    return _listify(root, kinds)


def _listify(node: Any, kinds: dict[int, str]) -> Any:
    if not isinstance(node, dict):
        return node
    kind = kinds.get(id(node))
    children = {k: _listify(v, kinds) for k, v in node.items()}
    if kind == "index":
        return [children[k] for k in sorted(children)]
    return children


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: walking a large tree (the blocking part of a
    save, a restore) allocates tens of objects a leaf and none of them cyclic, so a
    collection there (~0.1 s with a large heap, triggered by the allocations alone) would
    only lengthen the caller's wait. Also a decorator."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
