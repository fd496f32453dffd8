"""The ``ckpt`` command line: inspect, list, verify, diff, reshard, convert, export and gc
checkpoints on any URL.

Each subcommand is a thin layer over the library. Errors print one line on stderr; the exit
status is 0 (all well), 1 (a checkpoint is damaged; for diff: the two differ), 2 (bad
usage) or 3 (any other failure; for diff also a damaged checkpoint, since then nothing can
be said of the difference); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ckpt._codecs import canonical
from ckpt._diff import diff
from ckpt._export import export_safetensors, parse_size
from ckpt._export import size_text as _size
from ckpt._housekeeping import committed_steps, step_store, steps_near
from ckpt._info import CheckpointInfo, metadata
from ckpt._manager import CheckpointManager
from ckpt._orbax import decimal_step, orbax_step_name
from ckpt._reshard import convert, parse_mesh, parse_spec, reshard
from ckpt._roots import age_text, collect_garbage, list_root, switched_note
from ckpt._verify import verify
from ckpt.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptError,
    CorruptCheckpointError,
    InvalidArgumentError,
    InvalidKeyError,
    NotACheckpointError,
    TargetMismatchError,
    UnsupportedURLError,
)
from ckpt.storage import bounded, open_store, settle_google_credentials

EPILOG = "URLs: a path, file://PATH, s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, memory://NAME/PREFIX."


def _parse_budget(text: str) -> int:
    """A --memory-budget: at least 1 MiB, since a chunk (up to 16 MiB when saved here) is
    always read whole, whatever the budget; a smaller one would only look obeyed."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1] if t and t[-1] in units else ""
    number = t[:-1] if unit else t
    try:
        value = int(float(number) * units[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 2G)") from None
    if value < 1 << 20:
        raise argparse.ArgumentTypeError(
            f"{text!r} is below 1M: chunks (up to 16 MiB each) are read whole, so a budget "
            "this small could not be kept")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"not a tolerance: {text!r} (a number, 0 or more)")
    return value


def _count(n: int, one: str, many: str = "") -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


def _progress(what: str, quiet: bool) -> _Progress | None:
    """A progress bar for a long command, only when stderr is a terminal."""
    return None if quiet or not sys.stderr.isatty() else _Progress(what)


class _Progress:
    """A progress bar on stderr (a terminal): bytes done, rate and time left, redrawn in
    place (the rest of the line cleared) at most ten times a second."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = time.monotonic()
        self.drawn = 0.0

    def line(self, done: int, total: int, now: float) -> str:
        pct = 100 if total == 0 else int(100 * done / total)
        bar = "#" * (pct // 5) + "." * (20 - pct // 5)
        elapsed = now - self.started
        rate = done / max(elapsed, 1e-9)
        # The first second's rate says nothing about the rest.
        left = "-" if elapsed < 1 or rate <= 0 or done >= total \
            else age_text((total - done) / rate)
        text = (f"{self.what} [{bar}] {pct:3d}% {_size(done)}/{_size(total)} "
                f"{_size(rate)}/s, {left} left")
        # One terminal row: a wrapped line could not be redrawn in place.
        return text[:shutil.get_terminal_size().columns - 1]

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.drawn < 0.1:
            return
        self.drawn = now
        # "\x1b[K" clears what a longer earlier line left behind.
        print(f"\r{self.line(done, total, now)}\x1b[K", end="", file=sys.stderr, flush=True)
        if done >= total:
            print(file=sys.stderr)


# -- inspect --------------------------------------------------------------------------------

def _spec_json(spec: Any) -> Any:
    return None if spec is None else [list(e) if isinstance(e, tuple) else e for e in spec]


def _is_file_of_tensors(info: CheckpointInfo) -> bool:
    return info.layout.startswith("safetensors")


def _info_json(info: CheckpointInfo) -> dict[str, Any]:
    meta = info.metadata
    try:
        json.dumps(meta, allow_nan=False)  # strict JSON: no NaN or Infinity
    except (TypeError, ValueError):
        meta = repr(meta)
    # A safetensors file records none of a save's facts: null, not made-up values.
    saved = not _is_file_of_tensors(info)
    return {
        "url": info.url, "format_version": info.format_version if saved else None,
        "layout": info.layout, "attempt": info.attempt if saved else None,
        "created_at": info.created_at if saved else None,
        "committed_at": info.committed_at if saved else None,
        "process_count": info.process_count if saved else None,
        "versions": info.versions if saved else None, "metadata": meta,
        "metrics": {k: v if math.isfinite(v) else str(v) for k, v in info.metrics.items()},
        "nbytes": info.nbytes,
        "leaves": [{"path": leaf.name, "keys": [list(entry) for entry in leaf.path],
                    "kind": leaf.kind,
                    "shape": list(leaf.shape), "dtype": leaf.dtype, "nbytes": leaf.nbytes,
                    "mesh": leaf.mesh, "spec": _spec_json(leaf.spec),
                    "chunk_shape": list(leaf.chunk_shape), "compression": leaf.compression}
                   for leaf in info.leaves],
    }


def _step_of(given: str, found: str, orbax_item: bool) -> str:
    """The step number a checkpoint URL names: its folder's, or for an Orbax item (a
    manager step's, which the reader may have gone into) its step folder's; ``-`` when
    none does."""
    urls = [given, found]
    if orbax_item:
        urls.append(found.rstrip("/").rsplit("/", 1)[0])
    for url in urls:
        name = os.path.basename(url.rstrip("/"))
        if (step := decimal_step(name)) is not None:
            return str(step)
        if (named := orbax_step_name(name)) is not None:
            return str(named[1])  # an Orbax run's ckpt_20 or 00000020
    return "-"


def _timeout_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after this long (default: only each request's own deadline "
                   "and retries bound the command)")


def _bounded(url: str, args: argparse.Namespace | None, what: str) -> Any:
    """The store at ``url``, under the command's ``--timeout`` if it has one."""
    return bounded(open_store(url), getattr(args, "timeout", None), what, "--timeout")


def _meant(store: Any, command: str, exc: CkptError) -> CkptError:
    """What to say when ``store`` holds no checkpoint, for every command given one: a run's
    root names the run's newest step; a step folder the run lacks names the steps near it;
    anything else is ``exc`` as it is."""
    url = store.url.rstrip("/")
    try:
        steps = committed_steps(store)
        name, parent = url.rsplit("/", 1)[-1], store.parent()
        around = committed_steps(parent) if parent is not None and name.isdecimal() else []
    except CkptError:
        return exc  # no hint then: the error the command met stands
    if steps:
        shown = ", ".join(map(str, steps[-10:]))
        return NotACheckpointError(
            f"{url} is a run with steps {'..., ' if len(steps) > 10 else ''}{shown}, not one "
            f"checkpoint: `ckpt {command} {url}/{steps[-1]}` for the newest")
    if around and int(name) not in around and parent is not None:
        return CheckpointNotFoundError(
            f"{url}: the run at {parent.url.rstrip('/')} has no committed step "
            f"{int(name)} ({steps_near(around, int(name))})")
    return exc


def _inspect(args: argparse.Namespace) -> int:
    store = _bounded(args.url, args, "inspecting")  # one --timeout for the whole command
    try:
        info = metadata(store)
    except (CheckpointNotFoundError, NotACheckpointError) as exc:
        raise _meant(store, "inspect", exc) from exc
    if args.json:
        print(json.dumps(_info_json(info), indent=2))
        return 0
    # Not recorded (an Orbax item folder given without its step folder): said, not 1970.
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.committed_at)) \
        if info.committed_at > 0 else "- (not recorded)"
    meshes = sorted({str(leaf.mesh) for leaf in info.leaves if leaf.mesh})
    print(f"checkpoint  {info.url}")
    print(f"step        {_step_of(str(args.url), info.url, orbax_item=not info.attempt)}")
    if info.attempt:  # this library's format
        print(f"format      v{info.format_version}, attempt {info.attempt}")
    else:
        print(f"format      {info.layout}")
    if _is_file_of_tensors(info):
        print("committed   - (safetensors records no commit, writer or mesh)")
    else:
        writers = _count(info.process_count, "process", "processes")
        print(f"committed   {stamp}, written by {writers}")
    print(f"saved mesh  {', '.join(meshes) or '-'}")
    print(f"metadata    {info.metadata!r}"
          + ("  (the files' __metadata__)" if _is_file_of_tensors(info) else ""))
    if info.metrics:
        print("metrics     " + ", ".join(f"{k}={v:g}" for k, v in sorted(info.metrics.items())))
    codecs = sorted({leaf.compression for leaf in info.leaves if leaf.compression})
    if codecs:
        arrays = sum(1 for leaf in info.leaves if leaf.compression)
        print(f"compression {', '.join(codecs)} ({_count(arrays, 'array', 'arrays')}; bytes "
              "below are decoded)")
    rows = [(leaf.name, leaf.kind, "x".join(map(str, leaf.shape)) or "()",
             leaf.dtype or "-", _size(leaf.nbytes),
             "-" if leaf.spec is None else str(tuple(leaf.spec)),
             "x".join(map(str, leaf.chunk_shape)) or "-") for leaf in info.leaves]
    header = ("key path (as --spec takes it)", "kind", "shape", "dtype", "bytes", "spec",
              "chunks")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print()
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\ntotal       {_count(len(info.leaves), 'leaf', 'leaves')}, {_size(info.nbytes)} "
          "of array data")
    return 0


# -- list -----------------------------------------------------------------------------------

def _existing_root(url: str, args: argparse.Namespace | None = None) -> Any:
    """The store at ``url``, which must hold something (a missing bucket, a missing folder
    or a mistyped prefix is an error naming it, not an empty answer); bound by
    ``--timeout`` when the command has it."""
    store = _bounded(url, args, "listing")
    store.verify_access()
    if not store.list_children():
        raise CheckpointNotFoundError(f"nothing is stored at {store.url} (a typo?)")
    return store


def _list(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args)
    if args.after is not None or args.idle is not None or args.poll is not None:
        raise _UsageError("--after, --idle and --poll go with --watch")
    store = _existing_root(args.root, args)
    entries = list_root(store)
    if not entries and store.exists("COMMIT"):
        raise _UsageError(f"{store.url} is one checkpoint, not a run's root of steps: "
                          f"`ckpt inspect {store.url}` describes it")
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print(f"no steps under {store.url}")
    for e in entries:
        if "committed_at" in e:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(e["committed_at"]))
            print(f"{e['step']:>10}  {e['state']:<10}  {_size(e['bytes']):>10}  {when}"
                  + ("  (orbax-checkpoint)" if e["layout"] != "ckpt" else ""))
        else:
            print(f"{e['step']:>10}  {e['state']:<10}  {_size(e['bytes']):>10}  "
                  f"{age_text(e['age_s'])} old  {e['attempt']}")
    if note := switched_note(entries):
        print(note)
    return 0


def _watch(args: argparse.Namespace) -> int:
    """``list --watch``: one line (or JSON document) per step as it commits. A root with
    nothing in it yet is waited on (an evaluator may start before its trainer's first
    save); a missing bucket or a root that cannot be read is an error at once."""
    if args.timeout is not None:
        raise _UsageError("--timeout bounds one listing; with --watch, --idle SECONDS ends "
                          "the watch once no step has come for that long")
    store = open_store(args.root)
    store.verify_access()
    mgr = CheckpointManager(store, read_only=True, watch_preemption=False)
    for step in mgr.watch(after=args.after, timeout_s=args.idle,
                          poll_s=5.0 if args.poll is None else args.poll):
        try:
            info = metadata(step_store(store, step))
        except CkptError as exc:  # removed since it was listed: it left the run
            logging.getLogger("ckpt").warning("step %d: not printed: %s", step, exc)
            continue
        metrics = info.metrics
        if args.json:
            print(json.dumps({"step": step, "committed_at": info.committed_at or None,
                              "bytes": info.nbytes,
                              "metrics": {k: v if math.isfinite(v) else str(v)
                                          for k, v in metrics.items()}}), flush=True)
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(info.committed_at)) \
            if info.committed_at > 0 else "-"
        shown = "  " + ", ".join(f"{k}={v:g}" for k, v in sorted(metrics.items())) \
            if metrics else ""
        print(f"{step:>10}  committed   {_size(info.nbytes):>10}  {when}{shown}", flush=True)
    return 0


# -- verify ---------------------------------------------------------------------------------

def _verify(args: argparse.Namespace) -> int:
    store = _bounded(args.url, args, "verifying")
    try:
        report = verify(store, memory_budget=args.memory_budget,
                        progress=_progress("verifying", args.quiet or args.json))
    except (CheckpointNotFoundError, NotACheckpointError) as exc:
        raise _meant(store, "verify", exc) from exc
    if args.json:
        print(json.dumps({"url": report.url, "ok": report.ok, "chunks": report.chunks,
                          "nbytes": report.nbytes, "arrays": report.arrays,
                          "inline": report.inline, "reports": report.reports,
                          "problems": [{"leaf": p.leaf, "chunk": None if p.chunk is None
                                        else list(p.chunk), "what": p.what}
                                       for p in report.problems]}, indent=2))
        return 0 if report.ok else 1
    for problem in report.problems:
        print(f"BAD {problem}")
    state = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    checked = [f"COMMIT, the manifest and {_count(report.reports, 'host report')}"]
    if report.arrays:
        checked.append(f"{_count(report.chunks, 'chunk')} of "
                       f"{_count(report.arrays, 'array leaf', 'array leaves')} "
                       f"({_size(report.nbytes)} read)")
    if report.inline:
        checked.append(f"{_count(report.inline, 'leaf', 'leaves')} held in the manifest")
    if not (report.arrays or report.inline):
        checked.append("no array data: every leaf is a value")
    print(f"{state}: {report.url}: checked " + "; ".join(checked))
    return 0 if report.ok else 1


# -- diff -----------------------------------------------------------------------------------

def _diff(args: argparse.Namespace) -> int:
    _limit_malloc_retention()
    stores = [_bounded(url, args, "comparing") for url in (args.a, args.b)]
    try:
        result = diff(stores[0], stores[1], rtol=args.rtol, atol=args.atol, only=args.only,
                      memory_budget=args.memory_budget, by_checksum=not args.read_all,
                      progress=_progress("comparing", args.quiet or args.json))
    except (CheckpointNotFoundError, NotACheckpointError) as exc:
        given = str(exc)
        store = next((s for s in stores if s.url.rstrip("/") in given), stores[0])
        raise _meant(store, "diff", exc) from exc
    _clear_progress_line()
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        for leaf in result.leaves:
            if args.verbose or leaf.status != "identical":
                print(f"  {leaf.text()}")
        print(result.summary())
    return EXIT_OK if result.equal else EXIT_DAMAGED


# -- reshard --------------------------------------------------------------------------------

def _limit_malloc_retention() -> None:
    """Makes glibc return freed chunk buffers to the system at once.

    By default glibc raises its mmap threshold after large blocks are freed (so later chunk
    buffers come from the heap and stay resident) and keeps an arena per thread of
    TensorStore's pools; both make resident memory drift well above the budget.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)        # M_ARENA_MAX: two arenas
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks >= 1 MiB always mmapped
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def _rewrite(args: argparse.Namespace) -> int:
    """``reshard`` and ``convert``: the same streaming rewrite; convert also verifies."""
    _limit_malloc_retention()
    rules = []
    try:
        canonical(args.compression, "--compression")
        mesh = parse_mesh(args.mesh) if args.mesh else None
        for rule in args.spec:
            pattern, eq, spec = rule.partition("=")
            if not eq or not pattern:
                raise InvalidArgumentError(f"--spec {rule!r}: expected PATTERN=SPEC, e.g. "
                                           "'params/**/kernel=-,model'")
            rules.append((pattern, parse_spec(spec)))
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    run = convert if args.command == "convert" else reshard
    try:
        result = run(args.src, args.dst, mesh=mesh, rules=rules,
                     memory_budget=args.memory_budget, overwrite=args.overwrite,
                     progress=_progress(f"{args.command}ing", args.quiet),
                     compression=args.compression)
    except CheckpointExistsError as exc:
        raise _with_flag(exc) from exc
    laid = ",".join(f"{k}={v}" for k, v in result.mesh.items())
    print(f"wrote {result.url}: {result.chunks} chunks, {_size(result.nbytes)}, "
          + (f"laid out for mesh {laid}" if laid else "unsharded (saved with no mesh)")
          + (f", {canonical(args.compression)}" if args.compression else "")
          + (f"; from {result.source_layout}, verified" if args.command == "convert" else ""))
    return 0


# -- export ---------------------------------------------------------------------------------

def _rules(values: Sequence[str]) -> list[str]:
    """``--names`` values: a rule each, or a file of rules, one per line (``@FILE``, or the
    path of a file that exists)."""
    rules: list[str] = []
    for value in values:
        path = value[1:] if value.startswith("@") else value
        if value.startswith("@") or os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    rules.extend(f.read().splitlines())
            except OSError as exc:
                raise _UsageError(f"--names {value}: {exc.strerror or exc}") from None
        else:
            rules.append(value)
    return rules


def _with_flag(exc: CheckpointExistsError) -> CheckpointExistsError:
    """The library's refusal in the command line's words: the flag, not the keyword."""
    return CheckpointExistsError(str(exc).replace("pass overwrite=True", "add --overwrite"))


def _export(args: argparse.Namespace) -> int:
    _limit_malloc_retention()
    try:
        size = parse_size(args.max_shard_size)
        result = export_safetensors(
            args.src, args.dst, dtype=args.dtype, max_shard_size=size,
            names=_rules(args.names), only=args.only, item=args.item,
            memory_budget=args.memory_budget, overwrite=args.overwrite,
            progress=_progress("exporting", args.quiet or args.json))
    except CheckpointExistsError as exc:
        raise _with_flag(exc) from exc
    except ValueError as exc:
        if isinstance(exc, CkptError):
            raise
        raise _UsageError(str(exc)) from None
    if args.json:
        print(json.dumps(dataclasses.asdict(result), indent=2))
        return 0
    print(f"wrote {result.url}: {_count(len(result.tensors), 'tensor')}, "
          f"{_size(result.nbytes)} in {_count(len(result.files), 'file')}")
    # A real model leaves out thousands of optimizer leaves: one line per reason, each
    # leaf under -v.
    reasons = collections.Counter(result.left_out.values())
    for why, n in reasons.most_common():
        print(f"  left out {_count(n, 'leaf', 'leaves')}: {why}")
    if reasons and not args.verbose:
        print("  (-v lists each leaf left out)")
    if args.verbose:
        for path, why in result.left_out.items():
            print(f"  left out {path}: {why}")
    return 0


# -- gc -------------------------------------------------------------------------------------

def _gc(args: argparse.Namespace) -> int:
    store = _existing_root(args.root)
    actions = collect_garbage(store, dry_run=args.dry_run, grace_s=args.grace,
                              claimed=args.claimed, keep_last=args.keep_last)
    if args.json:
        print(json.dumps({"root": store.url, "dry_run": args.dry_run, "actions": [
            {"action": a.action, "what": a.what, "target": a.target} for a in actions]},
            indent=2))
        return 0
    for a in actions:
        print(a.line)
    if not any(a.action == "remove" for a in actions):
        print("nothing to remove")
    return 0


# -- main -----------------------------------------------------------------------------------

def _rewrite_args(p: argparse.ArgumentParser, *, mesh_help: str, mesh_required: bool) -> None:
    p.add_argument("src", help="the checkpoint to read")
    p.add_argument("dst", help="where to write the new checkpoint")
    p.add_argument("--mesh", required=mesh_required, help=mesh_help)
    p.add_argument("--spec", action="append", default=[], metavar="PATTERN=SPEC",
                   help="PartitionSpec for leaves whose path as `inspect` prints it "
                   "(params/dense/kernel) matches PATTERN: * within one segment, ** across "
                   "segments; SPEC like data,model or -,model ('-' unsharded, a+b for two "
                   "axes, '-' alone replicated). Repeatable; the last match wins; a rule "
                   "matching no leaf is an error.")
    p.add_argument("--memory-budget", type=_parse_budget, default="1G",
                   help="host memory for chunk data (default 1G)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a committed checkpoint at DST (atomically)")
    p.add_argument("--compression", metavar="zstd[:LEVEL]", default=None,
                   help="compress DST's chunks with zstd (level 3 unless given); without it "
                   "DST is uncompressed, whatever SRC is")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_rewrite)


def _global_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log what the library does (INFO) on stderr")


def _version() -> str:
    import ckpt

    return ckpt.__version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt", epilog=EPILOG, allow_abbrev=False,
        description="Inspect, check, convert, export and clean up JAX checkpoints.")
    _global_flags(parser, False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", epilog=EPILOG,
                       help="describe one checkpoint (reads its manifest only)",
                       description="Print a checkpoint's format, commit time, writers, mesh, "
                       "metadata and tree (key path, shape, dtype, bytes, spec, chunks).")
    p.add_argument("url", help="the checkpoint")
    p.add_argument("--json", action="store_true", help="print the documented JSON document")
    _timeout_option(p)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("list", epilog=EPILOG, help="list the steps under a manager root",
                       description="List every attempt of every step, newest first: "
                       "committed, incomplete (with its age and size), claimed (for a "
                       "commit that has not happened), abandoned (by an interrupted "
                       "rewind) or removed (only a deleted attempt's removal record is "
                       "left). With --watch, instead, each committed step as it commits.")
    p.add_argument("root", help="a CheckpointManager root")
    p.add_argument("--json", action="store_true", help="print JSON (with --watch: one "
                   "document a line)")
    p.add_argument("--watch", action="store_true",
                   help="instead, print each committed step as it commits (the ones there "
                   "first), until --idle or Ctrl-C")
    p.add_argument("--after", type=int, default=None, metavar="STEP",
                   help="with --watch: only steps above STEP")
    p.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                   help="with --watch: stop (exit 0) once no new step has come for this long")
    p.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                   help="with --watch: how often to look while waiting (default 5)")
    _timeout_option(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("verify", epilog=EPILOG, help="read and check every chunk",
                       description="Read every chunk, check sizes and checksums against the "
                       "manifest and host reports, report each bad chunk by leaf and chunk "
                       "index. Exit status 0 only when all is well.")
    p.add_argument("url", help="the checkpoint")
    p.add_argument("--memory-budget", type=_parse_budget, default="256M",
                   help="bytes of chunks read at once (default 256M)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the documented JSON document")
    _timeout_option(p)
    p.set_defaults(func=_verify)

    p = sub.add_parser("diff", epilog=EPILOG,
                       help="compare two checkpoints leaf by leaf, streaming",
                       description="Compare A and B (any checkpoints this tool reads: this "
                       "library's, Orbax's, safetensors; any meshes and backends) leaf by leaf, "
                       "with bounded memory: identical, equal within --rtol/--atol, or how "
                       "they differ (elements differing, max absolute and relative "
                       "difference, NaN/inf counts), shape, dtype, and leaves only on one "
                       "side. Chunks whose checksums match on both sides are not read. Exit "
                       "status 0 equal within the tolerance, 1 different, 2 bad usage, 3 "
                       "any other failure (a damaged checkpoint included).")
    p.add_argument("a", help="the first checkpoint")
    p.add_argument("b", help="the second checkpoint, the reference of --rtol")
    p.add_argument("--rtol", type=_tolerance, default=0.0,
                   help="relative tolerance: |a-b| <= atol + rtol*|b| counts as equal "
                   "(default 0)")
    p.add_argument("--atol", type=_tolerance, default=0.0,
                   help="absolute tolerance (default 0)")
    p.add_argument("--only", action="append", default=[], metavar="PATTERN",
                   help="compare only leaves whose key path matches (as --spec: "
                   "'opt/**/mu'); repeatable")
    p.add_argument("--read-all", action="store_true",
                   help="read every chunk, also those whose checksums match")
    p.add_argument("--memory-budget", type=_parse_budget, default="512M",
                   help="host memory for array data read at once (default 512M)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the documented JSON document")
    _timeout_option(p)
    p.set_defaults(func=_diff)

    p = sub.add_parser("reshard", epilog=EPILOG,
                       help="rewrite a checkpoint for another mesh, streaming",
                       description="Rewrite SRC (this library's checkpoint or Orbax's) into "
                       "DST with the chunk layout of a new mesh (--mesh, required) and "
                       "PartitionSpecs (default: the saved specs), chunk by chunk, with "
                       "bounded memory and no accelerators. DST is an ordinary committed "
                       "checkpoint; the two may be on different backends. To move a "
                       "checkpoint into this format keeping its layout, and have every "
                       "written chunk read back, use convert.")
    _rewrite_args(p, mesh_help="the new mesh, e.g. data=2,model=4", mesh_required=True)

    p = sub.add_parser("convert", epilog=EPILOG,
                       help="copy any readable checkpoint into this format, streaming, "
                       "verified",
                       description="Convert SRC (an orbax-checkpoint item folder, or a step "
                       "folder with every item: pytrees, JSON, Grain iterator states; OCDBT or "
                       "not, zarr v2 or v3; or this library's own checkpoint) into this "
                       "library's format at DST, keeping the saved layout unless --mesh is "
                       "given, chunk by chunk with bounded memory, between any two backends, "
                       "then read every written chunk back to verify it. The way off Orbax; "
                       "reshard is the same rewrite for a new mesh, without the read-back.")
    _rewrite_args(p, mesh_help="lay out for this mesh, e.g. data=2,model=4 (default: the "
                  "mesh SRC was saved on, with its PartitionSpecs)", mesh_required=False)

    p = sub.add_parser("export", epilog=EPILOG,
                       help="write a checkpoint's weights as safetensors, streaming",
                       description="Write the array leaves of SRC (this library's checkpoint or "
                       "Orbax's) as safetensors at DST, laid out as Hugging Face lays them out "
                       "(model.safetensors, or model-0000i-of-0000N.safetensors and "
                       "model.safetensors.index.json), with bounded memory and no "
                       "accelerators, each chunk checked as it is read. Tensor names join key "
                       "paths with '.'; optimizer and RNG state are left out (docs/"
                       "safetensors.md).")
    p.add_argument("src", help="the checkpoint to read")
    p.add_argument("dst", help="a folder, or a path ending in .safetensors for one file")
    p.add_argument("--format", choices=["safetensors"], default="safetensors",
                   help="the format to write (default safetensors)")
    p.add_argument("--dtype", default=None,
                   help="cast floating-point tensors to this dtype (e.g. bfloat16)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="most bytes per file: 5GB (10^9), 2GiB (2^30) (default 5GB)")
    p.add_argument("--names", action="append", default=[], metavar="RULES",
                   help="a name rule ('drop REGEX', 'keep REGEX', 'REGEX => REPLACEMENT'), "
                   "or a file of them (PATH or @PATH), one per line; repeatable, applied in order "
                   "after the defaults")
    p.add_argument("--only", default=None, metavar="PATTERN",
                   help="write only tensors whose name this regex matches")
    p.add_argument("--item", default=None, help="export one item of an Orbax step")
    p.add_argument("--memory-budget", type=_parse_budget, default="256M",
                   help="host memory for tensor data (default 256M)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace safetensors files already at DST")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=_export)

    p = sub.add_parser("gc", epilog=EPILOG, help="remove debris and apply retention",
                       description="Remove incomplete attempts older than the grace period "
                       "(under a manager root, or of one checkpoint URL), and with "
                       "--keep-last the oldest committed steps. An attempt is removed only "
                       "under a removal claim, so a save caught mid-way fails instead of "
                       "committing what was removed. Prints what it removes and keeps.")
    p.add_argument("root", help="a CheckpointManager root, or one checkpoint")
    p.add_argument("--dry-run", action="store_true", help="print, remove nothing")
    p.add_argument("--keep-last", type=int, default=None, metavar="N",
                   help="also remove all but the newest N committed steps")
    p.add_argument("--claimed", action="store_true",
                   help="also remove attempts claimed for commit that never committed (a "
                   "committer died between its claim and COMMIT): only when no job can "
                   "still be saving to this root")
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS",
                   help="leave incomplete attempts younger than this alone: a save may still "
                   "be running (default 3600)")
    p.add_argument("--json", action="store_true", help="print the documented JSON document")
    p.set_defaults(func=_gc)
    for p in sub.choices.values():
        p.allow_abbrev = False
        # Global flags are accepted after the subcommand too; SUPPRESS keeps a flag given
        # before it from being reset by the subcommand's default.
        _global_flags(p, argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ckpt`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "keep_last", None) is not None and args.keep_last < 1:
        parser.error("--keep-last must be at least 1")
    logger, level = logging.getLogger("ckpt"), logging.getLogger("ckpt").level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    if args.verbose:
        logger.setLevel(logging.INFO)
    # What the storage clients log (gcsfs's "default credentials were not found" on a public
    # bucket, each retry of a failing request) is for --debug: without it a failure is said
    # once, in the command's own error line. The library's own warnings are always shown,
    # its INFO lines with -v; under --debug the root's handler prints ckpt's records too.
    root, quiet = logging.getLogger(), logging.NullHandler()
    if args.debug:
        root.addHandler(handler)
    else:
        root.addHandler(quiet)
        logger.addHandler(handler)
        handler.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if any(arg.startswith("gs://") for arg in (sys.argv[1:] if argv is None else argv)):
        settle_google_credentials()
    try:
        return _run(args)
    finally:
        for owner in (root, logger):
            owner.removeHandler(handler)
        root.removeHandler(quiet)
        logger.setLevel(level)


# Exit statuses (docs/tools.md).
EXIT_OK, EXIT_DAMAGED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


class _UsageError(ValueError):
    """An argument the command cannot use (a --mesh or --spec that does not parse)."""


# Errors that mean the command line asked for what cannot be.
_USAGE_ERRORS = (_UsageError, TargetMismatchError, UnsupportedURLError, InvalidKeyError,
                 InvalidArgumentError)


def _exit_status(exc: BaseException, command: str) -> int:
    if isinstance(exc, CorruptCheckpointError):
        return EXIT_FAILED if command == "diff" else EXIT_DAMAGED
    return EXIT_USAGE if isinstance(exc, _USAGE_ERRORS) else EXIT_FAILED


def _clear_progress_line() -> None:
    """Ends a progress bar drawn on the terminal, so a message gets a line of its own."""
    if sys.stderr.isatty():
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)


def _wrote_something(url: str) -> bool:
    try:
        return bool(open_store(url).list_children())
    except (CkptError, OSError):
        return True  # cannot tell: say how to clean up


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except (CkptError, ValueError) as exc:
        _clear_progress_line()
        if args.debug:
            traceback.print_exc()
        else:
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"ckpt {args.command}: error: {text}", file=sys.stderr)
        return _exit_status(exc, args.command)
    except KeyboardInterrupt:
        _clear_progress_line()
        hint = ""
        if args.command in ("reshard", "convert") and _wrote_something(args.dst):
            hint = f"; `ckpt gc {args.dst} --grace 0` removes what it wrote"
        print(f"ckpt {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `head`) went away; that is not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
