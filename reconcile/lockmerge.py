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
    lock: Lock | None  # None when there are conflicts
    conflicts: tuple[str, ...] = ()


def merge_locks(base: Lock | None, ours: Lock, theirs: Lock) -> Merged:
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
            conflicts.append(f"{key}: {_what(b, o)} here, {_what(b, t)} in the other clone")
            continue
        if pick is not None:
            sessions[key] = pick
    if conflicts:
        return Merged(None, tuple(conflicts))
    if base is None and ours.lineage != theirs.lineage:  # the side whose lineage is kept: either way the same
        fingerprint = (ours if ours.lineage == lineage else theirs).config_fingerprint
    else:
        base_fingerprint = base.config_fingerprint if base is not None else ours.config_fingerprint
        fingerprint = theirs.config_fingerprint if ours.config_fingerprint == base_fingerprint \
            else ours.config_fingerprint
    return Merged(replace(ours, lineage=lineage, serial=max(ours.serial, theirs.serial) + 1, generator=GENERATOR,
                          config_fingerprint=fingerprint, sessions=sessions))


def _same_export(a: SessionRecord, b: SessionRecord) -> bool:
    """The same session exported in both clones to the same bytes: only the times differ (when it
    was exported, each file's modification time there)."""
    def timeless(r: SessionRecord) -> SessionRecord:
        return replace(r, exported_at="", outputs=tuple(replace(o, mtime_ns=0) for o in r.outputs))

    return timeless(a) == timeless(b)


def _what(base: SessionRecord | None, now: SessionRecord | None) -> str:
    if now is None:
        return "forgotten"
    if base is None:
        return f"exported at {now.address.path} on {now.exported_at}"
    return f"exported again at {now.address.path} on {now.exported_at}"
