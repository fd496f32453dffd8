"""Steps under a manager root and attempts under a checkpoint: which are committed, what is
debris, what retention removes, and deleting them without racing a committer.

Shared by `CheckpointManager` (debris, retention, delete, rewind; on process 0) and by
``ckpt list`` / ``ckpt gc``. Nothing here is trusted but COMMIT: an attempt folder is debris
when no COMMIT names it, and it is deleted only under a removal claim (`ckpt._claims`).
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

from ckpt._claims import REMOVING, claim_kind, forget, remove_uncommitted, retire
from ckpt._commit import committed_attempt
from ckpt._format import (
    ATTEMPT_PREFIX,
    COMMIT,
    LINEAGE,
    REWIND,
    pack,
    read_object,
    unpack,
)
from ckpt._orbax import (
    ORBAX_STEP,
    STEP_METADATA,
    decimal_step,
    delete_orbax_step,
    is_orbax_step,
    orbax_step_name,
)
from ckpt.errors import CorruptCheckpointError, InvalidArgumentError, UnsupportedFormatError
from ckpt.storage import ObjectNotFoundError, Store

log = logging.getLogger("ckpt.housekeeping")


def step_names(store: Store) -> dict[int, str]:
    """The folder of each step under a manager root (committed or not): ``<step>`` in
    decimal, and under its own name a folder named as an Orbax run saved with
    ``step_prefix`` or ``step_format_fixed_length`` names its steps (``ckpt_20``,
    ``00000020``; whether it is a committed step is `is_committed`'s to say). One listing;
    only where names are ambiguous, one more per named folder (`is_orbax_step`): folders
    that are no committed Orbax step then drop out (a user's ``logs_2024``, an Orbax save
    still in flight beside this library's step).

    Raises:
        UnsupportedFormatError: a run this library cannot understand: one step under two
            folders, or committed Orbax steps named two ways (two runs in one root); names
            them.
    """
    plain: dict[int, str] = {}
    named: dict[int, list[tuple[str, str]]] = {}
    for name in store.list_children():
        if (step := decimal_step(name)) is not None:
            plain[step] = name
        elif (parsed := orbax_step_name(name)) is not None:
            named.setdefault(parsed[1], []).append((parsed[0], name))

    def ambiguous() -> bool:
        return len({p for found in named.values() for p, _ in found}) > 1 or any(
            len(found) + (step in plain) > 1 for step, found in named.items())

    if ambiguous():
        named = {step: kept for step, found in named.items()
                 if (kept := [(p, n) for p, n in found if is_orbax_step(store.child(n))])}
    prefixes = {p: n for step in sorted(named) for p, n in named[step]}
    if len(prefixes) > 1:
        shown = ", ".join(f"{p or '(no prefix)'}: {n}" for p, n in sorted(prefixes.items()))
        raise UnsupportedFormatError(
            f"{store.url} holds Orbax steps named two ways ({shown}): the steps of two runs, "
            "which no manager can order; give each run a root of its own")
    for step, found in named.items():
        folders = sorted([n for _, n in found] + ([plain[step]] if step in plain else []))
        if len(folders) > 1:
            raise UnsupportedFormatError(
                f"{store.url} holds step {step} twice ({', '.join(folders)}): which one is "
                "the run's cannot be told; remove the one that is not")
        plain[step] = found[0][1]
    return dict(sorted(plain.items()))


def step_folders(store: Store) -> list[int]:
    """Steps that have a folder under a manager root (committed or not), ascending."""
    return list(step_names(store))


def step_store(root: Store, step: int, names: dict[int, str] | None = None) -> Store:
    """The folder of ``step`` under ``root``: its Orbax name if an Orbax run named it
    (``names`` from `step_names`, listed here if not given), else ``<step>``, where a new
    step is always written."""
    folder = (step_names(root) if names is None else names).get(step, str(step))
    return root.child(folder)


# -- rewind record ---------------------------------------------------------------------------
# A rewind writes <root>/REWIND, naming every attempt of every step it abandons, before it
# deletes any of them, and removes it once all are deleted. Meanwhile a step whose COMMIT
# names a recorded attempt is not listed, so a crash in the middle of a rewind never lets the
# abandoned branch become the newest step again. An attempt claimed for commit cannot be
# deleted (its committer may be paused); the record keeps naming it, so that if it commits
# later it is still hidden, and the next clean-up deletes it.

Abandoned = dict[int, set[str]]


def _read_rewind(store: Store) -> tuple[int | None, Abandoned]:
    try:
        raw = unpack(read_object(store, REWIND), store.describe(REWIND))
    except ObjectNotFoundError:
        return None, {}
    pairs = raw.get("abandoned") if isinstance(raw, dict) else None
    to = raw.get("to") if isinstance(raw, dict) else None
    if (not isinstance(pairs, list) or not isinstance(to, int) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], int) and isinstance(p[1], str)
            and (p[1].startswith(ATTEMPT_PREFIX) or p[1] == ORBAX_STEP) for p in pairs)):
        raise CorruptCheckpointError(f"{store.describe(REWIND)} is not a rewind record")
    out: Abandoned = {}
    for step, attempt in pairs:
        out.setdefault(step, set()).add(attempt)
    return to, out


def abandoned(store: Store) -> Abandoned:
    """Attempts, by step, that a rewind in progress (or interrupted) abandoned."""
    return _read_rewind(store)[1]


def is_abandoned(store: Store, step: int, gone: Abandoned,
                 names: dict[int, str] | None = None) -> bool:
    """Whether ``step``'s COMMIT names an attempt in ``gone`` (from `abandoned`), or ``step``
    is an Orbax step folder the rewind abandoned."""
    if step not in gone:
        return False
    folder = step_store(store, step, names)
    if ORBAX_STEP in gone[step] and not folder.exists(COMMIT):
        return True
    try:
        return committed_attempt(folder) in gone[step]
    except CorruptCheckpointError:
        return True  # an abandoned step with an unreadable COMMIT is abandoned all the same


def write_rewind(store: Store, to_step: int, gone: Abandoned) -> None:
    pairs = [[s, a] for s in sorted(gone) for a in sorted(gone[s])]
    store.write(REWIND, pack({"to": to_step, "abandoned": pairs, "at": time.time()}))


# -- lineage record ---------------------------------------------------------------------------
# <root>/LINEAGE records every rewind and delete of the run, numbered in order. A local-tier
# copy records the record's mark (origin and number) when it was saved; a copy is offered
# only while no later event removed its step (`Lineage.survives`), so a copy of a step that a
# rewind or delete removed, by any manager or `ckpt gc`, never comes back from a host's disk.
# The record is compacted, never truncated: only events that can no longer decide anything
# are dropped (a delete of a step a later rewind went below; a rewind a later rewind to a
# lower step covers), so it never forgets what start-up needs.


@dataclasses.dataclass(frozen=True)
class Lineage:
    """The root's lineage record (docs/format.md, LINEAGE): ``origin`` (a random id: a
    root emptied and reused begins another history), ``seq`` (the number of the newest
    event), the newest delete of each step (step -> number), the rewinds still deciding
    something ((number, to step), ascending in both), and the ids of a record written in
    the earlier event-list form (id -> number), so that copies that recorded one keep
    their place."""

    origin: str = ""
    seq: int = 0
    deletes: dict[int, int] = dataclasses.field(default_factory=dict)
    rewinds: tuple[tuple[int, int], ...] = ()
    legacy: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def mark(self) -> str:
        """What a local copy saved now records (empty for no record)."""
        return f"{self.origin}:{self.seq}" if self.origin else ""

    def position(self, mark: str) -> int | None:
        """The event number a copy's ``mark`` stands for; None when it is of another
        history (another origin) or unknown."""
        origin, sep, seq = mark.rpartition(":")
        if sep and origin == self.origin and seq.isascii() and seq.isdigit():
            number = int(seq)
            return number if number <= self.seq else None
        return self.legacy.get(mark)

    def survives(self, mark: str, step: int) -> bool:
        """Whether a copy of ``step`` saved at ``mark`` is still a step of the run: the mark
        is of this history and no later rewind went below the step and no later delete
        removed it."""
        at = self.position(mark)
        if at is None:
            return False
        if self.deletes.get(step, -1) > at:
            return False
        return not any(seq > at and to < step for seq, to in self.rewinds)

    def add(self, kind: str, step: int) -> Lineage:
        """The record with one more event (``rewind`` to ``step``, ``delete`` of it),
        compacted."""
        seq = self.seq + 1
        origin = self.origin or secrets.token_hex(8)
        if kind == "delete":
            return dataclasses.replace(self, origin=origin, seq=seq,
                                       deletes={**self.deletes, step: seq})
        if kind != "rewind":
            raise InvalidArgumentError(f"unknown lineage event {kind!r}")
        # What this rewind covers can no longer decide anything: every copy a delete of a
        # higher step, or an earlier rewind to a step at or above this one, removes, this
        # rewind removes too.
        return dataclasses.replace(
            self, origin=origin, seq=seq,
            deletes={s: n for s, n in self.deletes.items() if s <= step},
            rewinds=tuple((n, to) for n, to in self.rewinds if to < step) + ((seq, step),))

    def to_json(self) -> dict[str, Any]:
        """The record as JSON/msgpack data (its on-disk form, and what process 0 shares)."""
        return {"origin": self.origin, "seq": self.seq,
                "deletes": [[s, n] for s, n in sorted(self.deletes.items())],
                "rewinds": [[n, to] for n, to in self.rewinds],
                **({"legacy": dict(self.legacy)} if self.legacy else {})}

    @classmethod
    def from_json(cls, raw: Any, what: str) -> Lineage:
        """Parses ``to_json``'s form, or the earlier ``{"events": [[id, kind, step]]}``.

        Raises:
            CorruptCheckpointError: naming ``what``.
        """
        bad = CorruptCheckpointError(f"{what} is not a lineage record")
        if not isinstance(raw, dict):
            raise bad
        if "events" in raw:
            return cls._from_events(raw["events"], bad)

        def pairs(value: Any) -> list[tuple[int, int]]:
            if not isinstance(value, list) or not all(
                    isinstance(p, list) and len(p) == 2 and all(type(x) is int and x >= 0
                                                                for x in p) for p in value):
                raise bad
            return [(p[0], p[1]) for p in value]

        origin, seq, legacy = raw.get("origin"), raw.get("seq"), raw.get("legacy", {})
        if not isinstance(origin, str) or type(seq) is not int or seq < 0 or not isinstance(
                legacy, dict) or not all(isinstance(k, str) and type(v) is int
                                         for k, v in legacy.items()):
            raise bad
        return cls(origin, seq, dict(pairs(raw.get("deletes"))),
                   tuple(pairs(raw.get("rewinds"))), dict(legacy))

    @classmethod
    def _from_events(cls, events: Any, bad: CorruptCheckpointError) -> Lineage:
        if not isinstance(events, list) or not all(
                isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                and e[1] in ("origin", "rewind", "delete") and type(e[2]) is int
                for e in events):
            raise bad
        # The same origin however often the record is read: copies recording a mark of
        # it stay valid until the next event rewrites it in the new form.
        ids = "".join(e[0] for e in events)
        out = cls(origin=hashlib.sha256(ids.encode()).hexdigest()[:16])
        legacy = {}
        for eid, kind, step in events:
            out = out.add(kind, step) if kind != "origin" else dataclasses.replace(
                out, seq=out.seq + 1)
            legacy[eid] = out.seq
        return dataclasses.replace(out, legacy=legacy)


def read_lineage(store: Store) -> Lineage:
    """The root's lineage record (empty when there never was one)."""
    try:
        raw = unpack(read_object(store, LINEAGE), store.describe(LINEAGE))
    except ObjectNotFoundError:
        return Lineage()
    return Lineage.from_json(raw, store.describe(LINEAGE))


def record_lineage(store: Store, kind: str, *steps: int) -> str:
    """Records a rewind to a step, or deletes of ``steps``, before they happen; returns the
    record's new mark. Called by `remove_steps` and `rewind_root` only."""
    lineage = read_lineage(store)
    for step in steps:
        lineage = lineage.add(kind, step)
    if not lineage.origin:
        lineage = dataclasses.replace(lineage, origin=secrets.token_hex(8))
    store.write(LINEAGE, pack(lineage.to_json()))
    return lineage.mark


def ensure_lineage(store: Store) -> Lineage:
    """The lineage record, begun (a fresh origin) if the root has none: every local copy
    then records a mark of this root's own history, so that a root emptied and reused
    never takes back copies of its old life. Process 0 of a manager with a local tier, at
    start-up."""
    lineage = read_lineage(store)
    if not lineage.origin:
        lineage = Lineage(origin=secrets.token_hex(8))
        store.write(LINEAGE, pack(lineage.to_json()))
    return lineage


def rewind_root(store: Store, to_step: int, steps: Iterable[int]) -> Abandoned:
    """Abandons every attempt of ``steps`` (those above ``to_step``): records them, then
    deletes them; returns the attempts that stay because a committer claimed them.
    Process 0 of a manager."""
    record_lineage(store, "rewind", to_step)
    _, gone = _read_rewind(store)
    folders = step_names(store)
    for step in steps:
        folder = step_store(store, step, folders)
        names = attempt_names(folder)
        if folder.exists(STEP_METADATA):
            names.append(ORBAX_STEP)  # an Orbax step of the run: it goes too
        if names:
            gone.setdefault(step, set()).update(names)
    if gone:
        write_rewind(store, to_step, gone)
    return finish_rewind(store)


def finish_rewind(store: Store) -> Abandoned:
    """Deletes what the rewind record names, newest step first, then the record; an attempt
    claimed for commit stays, and so does its entry. Returns those. Process 0 of a writable
    manager at start-up (before it saves anything), `rewind_root`, and ``ckpt gc``."""
    to, gone = _read_rewind(store)
    if to is None:
        return {}
    kept: Abandoned = {}
    folders = step_names(store)
    for step in sorted(gone, reverse=True):
        left = delete_checkpoint(step_store(store, step, folders), only=gone[step])
        if left:
            kept[step] = set(left)
    if kept:
        write_rewind(store, to, kept)
        log.warning("rewind of %s: attempts %s are claimed for commit by a job that may still "
                    "be running; they stay hidden and are removed by a later clean-up",
                    store.url, {s: sorted(a) for s, a in kept.items()})
    else:
        store.delete(REWIND)
    return kept


def is_committed(store: Store, step: int, gone: Abandoned,
                 names: dict[int, str] | None = None) -> bool:
    """Whether ``step`` is a committed step of the root: this library's (COMMIT) or one an
    Orbax CheckpointManager wrote (a run that switched over continues in place)."""
    folder = step_store(store, step, names)
    committed = folder.exists(COMMIT) or is_orbax_step(folder)
    return committed and not is_abandoned(store, step, gone, names)


def committed_steps(store: Store, above: int | None = None) -> list[int]:
    """Committed steps under a manager root, ascending (one existence check per folder of
    this library's; two or three for an Orbax step); with ``above``, only those above it,
    and only their folders are looked at."""
    gone, names = abandoned(store), step_names(store)
    return [s for s in names
            if (above is None or s > above) and is_committed(store, s, gone, names)]


def is_committed_step(store: Store, step: int) -> bool:
    """Whether ``step`` is a committed step of the root now: one listing, the rewind
    record and one look at the step's folder, whatever the number of steps."""
    names = step_names(store)
    return step in names and is_committed(store, step, abandoned(store), names)


def steps_near(steps: list[int], step: int, around: int = 2) -> str:
    """For an error about ``step``, which is not one of the committed ``steps`` (ascending):
    the committed steps on either side of it, and how many there are."""
    if not steps:
        return "the run has no committed step"
    near = [s for s in steps if s < step][-around:] + [s for s in steps if s > step][:around]
    return (f"committed steps near it: {', '.join(map(str, near))}; {len(steps)} in all, "
            f"the newest {steps[-1]}")


def latest_committed_step(store: Store) -> int | None:
    """The newest committed step: one listing, then existence checks newest first."""
    gone, names = abandoned(store), step_names(store)
    for step in reversed(names):
        if is_committed(store, step, gone, names):
            return step
    return None


# -- attempts of one checkpoint --------------------------------------------------------------

def attempt_time(name: str) -> float | None:
    """The POSIX time an attempt id was made at (ids start ``attempt-YYYYmmddTHHMMSS-``)."""
    try:
        stamp = name[len(ATTEMPT_PREFIX):].split("-", 1)[0]
        return float(calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S")))
    except (ValueError, IndexError):
        return None


@dataclasses.dataclass(frozen=True)
class Attempt:
    """An attempt folder of a checkpoint.

    ``state``: ``committed`` (COMMIT names it), ``incomplete`` (still being written, or
    debris; also what a dead writer's late requests left after a removal), ``claimed``
    (claimed for commit but not committed: its committer is between claim and COMMIT, or
    died there).
    """

    store: Store
    name: str
    state: str
    created_at: float | None

    @property
    def committed(self) -> bool:
        return self.state == "committed"

    def age_s(self, now: float) -> float | None:
        return None if self.created_at is None else max(0.0, now - self.created_at)


def attempt_names(store: Store) -> list[str]:
    """The attempt folders of the checkpoint at ``store`` (whatever their state)."""
    return [n for n in store.list_children() if n.startswith(ATTEMPT_PREFIX)]


def attempts(store: Store) -> list[Attempt]:
    """Every attempt folder of the checkpoint at ``store``; none if COMMIT is unreadable."""
    try:
        winner = committed_attempt(store)
    except CorruptCheckpointError:
        return []
    out = []
    for name in attempt_names(store):
        if name == winner:
            state = "committed"
        else:
            kind = claim_kind(store, name)
            state = "claimed" if kind is not None and kind != REMOVING else "incomplete"
        out.append(Attempt(store, name, state, attempt_time(name)))
    return out


def debris(store: Store, *, grace_s: float = 0.0, now: float | None = None) -> list[Attempt]:
    """Attempts of the checkpoint at ``store`` a cleaner may remove: no COMMIT names them, no
    committer claimed them, they hold more than a tombstone, and they are at least
    ``grace_s`` old (unknown age counts as old)."""
    children = store.list_children()
    names = [n for n in children if n.startswith(ATTEMPT_PREFIX)]
    if not names or (len(names) == 1 and COMMIT in children):
        # Nothing, or a committed checkpoint's own attempt (or, if COMMIT names a vanished
        # one, an attempt left alone, which is the safe way to be wrong): one listing per
        # step, no reads, which is what start-up clean-up costs on a root of many steps.
        return []
    now = time.time() if now is None else now
    out = []
    for a in attempts(store):
        age = a.age_s(now)
        if a.state == "incomplete" and (age is None or age >= grace_s):
            out.append(a)
    return out


def remove_debris(store: Store, *, grace_s: float,
                  keep: Callable[[Attempt], bool] = lambda a: False) -> list[Attempt]:
    """Removes the debris of one checkpoint under removal claims; returns what it removed.
    Called by the manager's start-up clean-up on process 0. ``keep`` is asked about each
    attempt after the listing and before its removal claim."""
    return [a for a in debris(store, grace_s=grace_s)
            if not keep(a) and remove_uncommitted(store, a.name)]


# -- retention and deletion ------------------------------------------------------------------

def retention_victims(steps: list[int], keep_last: int | None, keep_every: int | None,
                      best: Iterable[int] = ()) -> list[int]:
    """Committed steps that ``keep_last``, ``keep_every`` and ``best`` (steps to keep for
    their metric) do not keep. The newest step always stays."""
    keep = set(steps[-keep_last:] if keep_last else steps)
    keep.update(best)
    if steps:
        keep.add(steps[-1])
    if keep_every:
        keep.update(s for s in steps if s % keep_every == 0)
    return [s for s in steps if s not in keep]


def remove_steps(root: Store, steps: Iterable[int], *,
                 then: Callable[[str], None] | None = None) -> dict[int, list[str]]:
    """The one way committed steps leave a run (`CheckpointManager.delete`, retention, and
    ``ckpt gc --keep-last``): records their deletes in LINEAGE (so that no host's local
    copy of them comes back), runs ``then`` with the record's new mark (a manager with a
    local tier removes every host's copies there), then deletes each step folder
    (`delete_checkpoint`: COMMIT first, every attempt under a removal claim). Returns, by
    step, the attempts left because a committer claimed them. Process 0 of a manager, or
    ``ckpt gc``."""
    steps = sorted(steps)
    if not steps:
        return {}
    mark = record_lineage(root, "delete", *steps)
    if then is not None:
        then(mark)
    kept = {}
    folders = step_names(root)
    for step in steps:
        left = delete_checkpoint(step_store(root, step, folders))
        if left:
            kept[step] = left
    return kept


def delete_checkpoint(store: Store, *, only: set[str] | None = None) -> list[str]:
    """Deletes the checkpoint at ``store``: COMMIT first, so it is invisible before any of
    its data goes; then its committed attempt; then every other attempt it may remove.
    With ``only``, touches only those attempts (and COMMIT only if it names one of them).

    Returns the attempts it left because a committer claimed them (it may still commit: then
    the checkpoint reappears, whole). Crash-safe and idempotent. An Orbax step folder (no
    COMMIT, Orbax's step metadata) is deleted whole, its commit marker first.
    """
    # An Orbax step: named by a rewind record (what is left of it after a crash too, which
    # no longer has its step metadata), or a committed one retention or delete removes.
    if (only is not None and ORBAX_STEP in only) or (
            only is None and not store.exists(COMMIT) and store.exists(STEP_METADATA)):
        delete_orbax_step(store)
        if only is None or only == {ORBAX_STEP}:
            return []
    try:
        winner = committed_attempt(store)
    except CorruptCheckpointError:
        winner = None  # an unreadable COMMIT names nothing that could be trusted
    if only is None or winner in only or (winner is None and store.exists(COMMIT)):
        if winner is not None:
            retire(store, winner)
        store.delete(COMMIT)
        if winner is not None:
            store.delete_prefix(winner)
            forget(store, winner)
    kept = [a.name for a in attempts(store)
            if (only is None or a.name in only) and not remove_uncommitted(store, a.name)]
    store.prune()
    return kept
