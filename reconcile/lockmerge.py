"""Three-way merge of two clones' locks, as a git merge driver (`xnat2bids merge-lock`).

Git merges the lock line by line: two clones that each exported a new session append their
tables at the same place and conflict in interleaved hunks. Merged by session instead, a session
one side changed is taken from that side, and only a session both sides changed differently is a
conflict. Pure: locks in, a lock or the conflicts out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from reconcile.lock import GENERATOR, Lock
from reconcile.model import SessionRecord


@dataclass(frozen=True)
class Merged:
    """The merged lock, and what conflicts: where both sides recorded a session differently, the
    lock holds OURS's record of it (git's %A, whose folders `git checkout --ours` restores), so the
    sessions that did merge are kept whatever the user picks for the rest. `lock` is None only for
    locks of two datasets."""

    lock: Lock | None
    conflicts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Sides:
    """How messages name git's %A and %B: in a merge, this clone and the other one; in a rebase,
    the upstream being rebased onto and the commit being replayed."""

    ours: str = "here"
    theirs: str = "in the other clone"


def merge_locks(base: Lock | None, ours: Lock, theirs: Lock, sides: Sides = Sides()) -> Merged:
    """`ours` and `theirs` merged against their common ancestor `base` (None: none, as for two
    clones that each wrote their first lock, of two lineages: the result keeps the smaller one). The
    serial is past both sides', so a plan saved on
    either side before the merge is stale after it."""
    lineage = ours.lineage
    if ours.lineage != theirs.lineage:
        if base is not None:
            return Merged(None, (f"the locks are of different lineages ({ours.lineage}, {theirs.lineage}): "
                                 "two datasets, not two clones of one",))
        # No lock in common: each clone made the dataset's first export, so each began a lineage.
        # Both merge directions must agree on one.
        lineage = min(ours.lineage, theirs.lineage)
    before: Mapping[str, SessionRecord] = base.sessions if base is not None and base.lineage == ours.lineage else {}
    sessions: dict[str, SessionRecord] = {}
    conflicts = []
    for key in sorted({*before, *ours.sessions, *theirs.sessions}):
        b, o, t = before.get(key), ours.sessions.get(key), theirs.sessions.get(key)
        if o == t or t == b or (o is not None and t is not None and _same_export(o, t)):
            pick = o
        elif o == b:
            pick = t
        else:
            conflicts.append(f"{key}: {_what(b, o, t)} {sides.ours}, {_what(b, t, o)} {sides.theirs}")
            pick = o
        if pick is not None:
            sessions[key] = pick
    conflicts += _one_folder_each(sessions, ours, sides)
    if base is None and ours.lineage != theirs.lineage:  # the side whose lineage is kept: either way the same
        fingerprint = (ours if ours.lineage == lineage else theirs).config_fingerprint
    else:
        base_fingerprint = base.config_fingerprint if base is not None else ours.config_fingerprint
        fingerprint = theirs.config_fingerprint if ours.config_fingerprint == base_fingerprint \
            else ours.config_fingerprint
    return Merged(replace(ours, lineage=lineage, serial=max(ours.serial, theirs.serial) + 1, generator=GENERATOR,
                          config_fingerprint=fingerprint, sessions=sessions), tuple(conflicts))


def _one_folder_each(sessions: dict[str, SessionRecord], ours: Lock, sides: Sides) -> list[str]:
    """Two sessions merged to one BIDS folder (the other side exported a session XNAT replaced by
    another, archived again under a new ID): a lock must not record both. Where one came from
    ours, the other leaves the merged lock (`sessions` is changed) and is named as a conflict."""
    by_folder: dict[str, list[str]] = {}
    for key, record in sessions.items():
        by_folder.setdefault(record.address.path, []).append(key)
    conflicts = []
    for folder, keys in sorted(by_folder.items()):
        if len(keys) < 2:
            continue
        kept = [k for k in keys if ours.sessions.get(k) == sessions[k]] or keys[:1]
        for key in keys:
            if key not in kept:
                del sessions[key]
                conflicts.append(f"{key}: exported at {folder} {sides.theirs}, where {kept[0]} is recorded "
                                 f"{sides.ours}; left out of the lock")
    return conflicts


def _same_export(a: SessionRecord, b: SessionRecord) -> bool:
    """The same session exported in both clones to the same bytes: only the times differ (when it
    was exported, each file's modification time there)."""
    def timeless(r: SessionRecord) -> SessionRecord:
        return replace(r, exported_at="", outputs=tuple(replace(o, mtime_ns=0) for o in r.outputs))

    return timeless(a) == timeless(b)


def _what(base: SessionRecord | None, now: SessionRecord | None, other: SessionRecord | None) -> str:
    if now is None:
        return "forgotten"
    done = f"exported at {now.address.path}" if base is None else f"exported again at {now.address.path}"
    differs = _differences(now, other) if other is not None else ""
    return f"{done} on {now.exported_at}{differs}"


def _differences(a: SessionRecord, b: SessionRecord) -> str:
    """" (date 2024-02-01)": what of `a` the other side recorded otherwise, XNAT's dates by value."""
    shown = [f"{name} {getattr(a, name)}" for name in ("date", "insert_date", "last_modified")
             if getattr(a, name) != getattr(b, name)]
    shown += [name for name in ("scans", "outputs") if getattr(a, name) != getattr(b, name)] if not shown else []
    return f" ({', '.join(shown)})" if shown else ""
