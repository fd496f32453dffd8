"""What ``ckpt list`` and ``ckpt gc`` decide about a root (or one checkpoint): the entries a
listing shows, and the removals a clean-up makes. The CLI only prints what these return.

Nothing here is trusted but COMMIT (`ckpt._housekeeping`): an attempt no COMMIT names is
removed only under a removal claim, and committed steps leave a run only through
`ckpt._housekeeping.remove_steps`, which records them first.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ckpt._claims import delete_data, remove_uncommitted, retire
from ckpt._format import ATTEMPT_PREFIX, CLAIMS, COMMIT, MAX_COMMIT_BYTES, CommitRecord, read_object
from ckpt._housekeeping import (
    abandoned,
    attempt_time,
    attempts,
    committed_steps,
    finish_rewind,
    is_abandoned,
    remove_steps,
    retention_victims,
    step_names,
)
from ckpt._orbax import is_orbax_step, orbax_step_committed_at
from ckpt.storage import Store


def list_root(store: Store) -> list[dict[str, Any]]:
    """Every attempt of every step under a manager root, newest step first (``ckpt
    list``): step, attempt, bytes, state (``committed``, ``incomplete``, ``claimed``,
    ``abandoned``), layout, and when it was committed or how old it is."""
    now = time.time()
    gone = abandoned(store)
    entries = []
    names = step_names(store)
    for step in sorted(names, reverse=True):
        name, folder = names[step], store.child(names[step])
        sizes = store.list_sizes(name)
        found = sorted(attempts(folder), key=lambda a: a.name, reverse=True)
        if not found and is_orbax_step(folder):
            entries.append({"step": step, "attempt": "", "bytes": sum(sizes.values()),
                            "state": "abandoned" if is_abandoned(store, step, gone, names)
                            else "committed", "layout": "orbax-checkpoint",
                            "committed_at": orbax_step_committed_at(folder), "folder": name})
        elif not found:
            # A deleted step's removal records (tombstones): they stay, so that a save
            # paused before its commit still loses; shown, so that the folder is explained.
            for key in sorted(sizes, reverse=True):
                tomb = key.removeprefix(f"{name}/{CLAIMS}/")
                if tomb != key and "/" not in tomb:
                    born = attempt_time(tomb)
                    entries.append({"step": step, "attempt": tomb, "bytes": sizes[key],
                                    "state": "removed", "layout": "ckpt", "folder": name,
                                    "age_s": None if born is None else now - born})
        for a in found:
            nbytes = sum(v for k, v in sizes.items() if k.startswith(f"{name}/{a.name}/"))
            state = "abandoned" if a.committed and a.name in gone.get(step, ()) else a.state
            entry: dict[str, Any] = {"step": step, "attempt": a.name, "bytes": nbytes,
                                     "state": state, "layout": "ckpt", "folder": name}
            if a.committed:
                rec = CommitRecord.decode(read_object(folder, COMMIT, MAX_COMMIT_BYTES),
                                          folder.describe(COMMIT))
                entry["committed_at"] = rec.committed_at
            else:
                entry["age_s"] = a.age_s(now)
            entries.append(entry)
    return entries


def switched_note(entries: list[dict[str, Any]]) -> str | None:
    """For a root holding committed steps of both Orbax's layout and this library's (an
    Orbax run continued by `ckpt.CheckpointManager`, `list_root`'s entries): what that means
    for going back to Orbax. None for any other root."""
    ours = sorted(e["step"] for e in entries
                  if e["layout"] == "ckpt" and e["state"] == "committed")
    theirs = sorted(e["step"] for e in entries
                    if e["layout"] != "ckpt" and e["state"] == "committed")
    if not ours or not theirs:
        return None
    return (f"note: steps {ours} were written by this library into an Orbax run: Orbax's "
            f"own CheckpointManager lists them as its steps and cannot restore them (its "
            f"retention would count and delete them too). To go back to Orbax, rewind the "
            f"run to its newest Orbax step first (ckpt.CheckpointManager(root).rewind"
            f"({max(theirs)}) removes the steps above it), or delete the others "
            f"(docs/orbax.md)")


@dataclasses.dataclass(frozen=True)
class Action:
    """One thing ``ckpt gc`` did (or would do): ``action`` ``remove`` or ``keep``, what,
    which target, and the line a person reads."""

    action: str
    what: str
    target: str
    line: str


def is_checkpoint(store: Store) -> bool:
    """Whether the URL is one checkpoint (COMMIT or attempts in it), not a manager root."""
    return any(n == COMMIT or n.startswith(ATTEMPT_PREFIX) for n in store.list_children())


def age_text(seconds: float | None) -> str:
    """An age as a person reads it (``3.2 h``)."""
    if seconds is None:
        return "age unknown"
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= span:
            return f"{seconds / span:.1f} {unit}"
    return f"{seconds:.0f} s"


def collect_garbage(store: Store, *, dry_run: bool, grace_s: float, claimed: bool,
                    keep_last: int | None) -> list[Action]:
    """``ckpt gc``: finishes an interrupted rewind, removes uncommitted attempts at least
    ``grace_s`` old (and, with ``claimed``, attempts claimed for commit whose committer the
    user vouches is dead), and with ``keep_last`` all but the newest committed steps
    (`remove_steps`). ``dry_run``: decides, removes nothing. Returns what it did, in
    order."""
    verb = "would remove" if dry_run else "removing"
    out: list[Action] = []

    def say(action: str, what: str, target: str, line: str) -> None:
        out.append(Action(action, what, target, line))

    single = is_checkpoint(store)
    if not single and (gone := abandoned(store)):
        say("remove", "abandoned steps", ",".join(map(str, sorted(gone))),
            f"{verb} what a rewind abandoned in steps {sorted(gone)}")
        if not dry_run and (kept := finish_rewind(store)):
            say("keep", "claimed attempts", ",".join(map(str, sorted(kept))),
                f"keeping attempts claimed for commit in steps {sorted(kept)}: their "
                "committer may still commit them (they stay hidden)")
    targets = ([("", store)] if single else
               [(f"{n}/", store.child(n)) for n in step_names(store).values()])
    now, young = time.time(), 0
    for label, ckpt_store in targets:
        for a in attempts(ckpt_store):
            age = a.age_s(now)
            where = f"{label}{a.name}"
            if a.state == "claimed" and not claimed:
                say("keep", "claimed attempt", where,
                    f"keeping {where}: claimed for commit but not committed (its committer "
                    "may still commit it, or died between claim and COMMIT; --claimed "
                    "removes it once no job can be writing here)")
            elif a.state not in ("incomplete", "claimed"):
                continue
            elif age is not None and age < grace_s:
                young += 1
            else:
                if dry_run or a.state == "claimed" or remove_uncommitted(ckpt_store, a.name):
                    say("remove", f"{a.state} attempt", where,
                        f"{verb} {a.state} attempt {where} ({age_text(age)} old)")
                else:
                    say("keep", "attempt claimed meanwhile", where,
                        f"kept {where}: its committer claimed it first")
                if a.state == "claimed" and not dry_run:
                    retire(ckpt_store, a.name)  # the user vouches that its committer is dead
                    delete_data(ckpt_store, a.name)
    if young:
        say("keep", "young attempts", str(young),
            f"keeping {young} incomplete attempt(s) younger than --grace {grace_s:g} s: "
            "a save may still be running")
    victims = retention_victims(committed_steps(store), keep_last, None) \
        if keep_last and not single else []
    for step in victims:
        say("remove", "committed step", str(step),
            f"{verb} committed step {step} (keeping the newest {keep_last})")
    if victims and not dry_run:
        # The one way steps leave a run: recorded first, so that no host's local copy of
        # them comes back.
        for step, names in remove_steps(store, victims).items():
            for name in names:
                say("keep", "claimed attempt", f"{step}/{name}",
                    f"keeping {step}/{name}: claimed for commit by a job that may still "
                    "be running")
    return out
