"""The ``ckpt`` command line: inspect and list checkpoints on any supported URL.

Errors print one line and exit with status 1 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from ckpt._info import CheckpointInfo, metadata
from ckpt._housekeeping import committed_steps
from ckpt.errors import CkptError
from storage import open_store


def _spec_text(spec: Any) -> str:
    return "-" if spec is None else str(tuple(spec))


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    return {
        "url": info.url, "format_version": info.format_version, "attempt": info.attempt,
        "created_at": info.created_at, "committed_at": info.committed_at,
        "process_count": info.process_count, "versions": info.versions,
        "metadata": info.metadata if _jsonable(info.metadata) else repr(info.metadata),
        "nbytes": info.nbytes,
        "leaves": [{"path": leaf.keystr, "kind": leaf.kind, "shape": list(leaf.shape),
                    "dtype": leaf.dtype, "nbytes": leaf.nbytes, "mesh": leaf.mesh,
                    "spec": None if leaf.spec is None else [
                        list(e) if isinstance(e, tuple) else e for e in leaf.spec],
                    "chunk_shape": list(leaf.chunk_shape)} for leaf in info.leaves],
    }


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _inspect(args: argparse.Namespace) -> int:
    info = metadata(args.url)
    if args.json:
        print(json.dumps(_info_json(info), indent=2))
        return 0
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.committed_at))
    print(f"checkpoint  {info.url}")
    print(f"format      v{info.format_version}, attempt {info.attempt}")
    print(f"committed   {stamp}, by {info.process_count} process(es)")
    print(f"metadata    {info.metadata!r}")
    rows = [(leaf.keystr, leaf.kind, "x".join(map(str, leaf.shape)) or "()", leaf.dtype or "-",
             str(leaf.nbytes), _spec_text(leaf.spec),
             "x".join(map(str, leaf.chunk_shape)) or "-") for leaf in info.leaves]
    header = ("key path", "kind", "shape", "dtype", "bytes", "spec", "chunk")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"total       {len(info.leaves)} leaves, {info.nbytes} bytes")
    return 0


def _list(args: argparse.Namespace) -> int:
    steps = sorted(committed_steps(open_store(args.root)), reverse=True)
    if args.json:
        print(json.dumps([{"step": s, "state": "committed"} for s in steps]))
    else:
        for s in steps:
            print(f"{s}\tcommitted")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckpt`` console script."""
    parser = argparse.ArgumentParser(prog="ckpt", description="Inspect JAX checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="describe one checkpoint (reads the manifest only)")
    p.add_argument("url")
    p.add_argument("--json", action="store_true", help="print a JSON document")
    p.set_defaults(func=_inspect)
    p = sub.add_parser("list", help="list the committed steps under a manager root")
    p.add_argument("root")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_list)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CkptError as exc:
        if args.debug:
            raise
        print(f"ckpt: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader (e.g. `head`) went away; that is not an error of ours.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
