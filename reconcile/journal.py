"""The journal of a commit: written by apply before it swaps a session's folders, read by the
recovery that finishes or undoes a commit a crash interrupted, and by `check` and `plan`, which
judge the dataset as that recovery will leave it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from reconcile.errors import LockfileError
from reconcile.lock import Lock, loads_lock, stale_temp_files
from reconcile.model import SessionRecord
from reconcile.workarea import WORK_DIR


def read_journal(path: Path) -> tuple[dict[str, Any], SessionRecord]:
    """A commit's journal and the session record it commits; a damaged one is a LockfileError
    naming the file (it decides what recovery does, so it is never guessed at or skipped)."""
    exp_id = path.stem
    try:
        journal = json.loads(path.read_text(encoding="utf-8"))
        if not (isinstance(journal, dict) and isinstance(journal.get("record"), str)
                and isinstance(journal.get("staged"), str)
                and all(isinstance(journal.get(k), (str, type(None))) for k in ("previous", "dicom"))):
            raise ValueError("not a journal of xnat2bids")
        record = loads_lock(journal["record"], source=str(path)).sessions[exp_id]
    except (OSError, ValueError, KeyError) as exc:
        raise LockfileError(
            f"the journal of an interrupted commit cannot be read: {path}",
            detail=str(exc),
            hint=f"an apply stopped while committing {exp_id}; compare the journal with that session's folder, "
                 "then move the journal out of .xnat2bids/journal/ (the next plan shows what is left to do)",
        ) from exc
    return journal, record


def swapped(root: Path, journal: dict[str, Any]) -> bool:
    """Whether the commit's new folder is in place (recovery completes it) or still staged
    (the swap never happened: recovery rolls it back)."""
    return not (root / journal["staged"]).is_dir()


class Settle(Enum):
    """What the next apply's recovery does with an interrupted commit."""

    ROLL_BACK = "roll back"  # the swap never happened: the old folder goes back, the session is applied again
    COMPLETE = "complete"  # the new folder is in place: the lock records it
    ABANDON = "abandon"  # swapped, but files it records are gone since (moved away by hand): applied again


@dataclass(frozen=True)
class Pending:
    exp_id: str
    path: Path  # the journal
    journal: dict[str, Any]
    record: SessionRecord
    settle: Settle
    missing: tuple[str, ...] = ()  # ABANDON: the recorded outputs not there with their size

    def note(self) -> str:
        """What `check` and `plan` say of it."""
        where = f"{self.exp_id}: an interrupted commit of {self.record.address}"
        if self.settle is Settle.COMPLETE:
            return f"{where} will be completed by the next apply"
        if self.settle is Settle.ROLL_BACK:
            return f"{where} will be rolled back by the next apply"
        return (f"{where} cannot be completed ({_files(self.missing)} not in place, e.g. {self.missing[0]}); "
                "the next apply drops it and applies the session again")


def _files(paths: tuple[str, ...]) -> str:
    return f"{len(paths)} of its files" if len(paths) != 1 else "1 of its files"


def pending_commits(root: Path) -> list[Pending]:
    """The interrupted commits in the work area, each with what recovery will do with it. A commit
    is completed only when every output it records is in place with its recorded size: one whose
    folder was moved away meanwhile must not enter the lock."""
    journal_dir = root / WORK_DIR / "journal"
    found = []
    for path in sorted(journal_dir.glob("*.json")) if journal_dir.is_dir() else []:
        try:
            journal, record = read_journal(path)
        except LockfileError:
            if not path.exists():  # settled meanwhile by the apply at work (plan and check take no lock)
                continue
            raise
        if not swapped(root, journal):
            found.append(Pending(path.stem, path, journal, record, Settle.ROLL_BACK))
            continue
        missing = tuple(o.path for o in record.outputs if not _in_place(root / o.path, o.size))
        found.append(Pending(path.stem, path, journal, record, Settle.ABANDON if missing else Settle.COMPLETE, missing))
    return found


def _in_place(path: Path, size: int) -> bool:
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


def as_recovered(root: Path, lock: Lock, pending: list[Pending] | None = None
                 ) -> tuple[Lock, dict[str, tuple[str, Path]], list[str]]:
    """The lock as the next apply's recovery will leave it, where rolled-back session folders sit
    meanwhile (address → (address, trash folder)), and a note per thing that recovery settles.
    `pending`: the root's `pending_commits`, when the caller has read them already."""
    moved: dict[str, tuple[str, Path]] = {}
    notes: list[str] = []
    pending = pending_commits(root) if pending is None else pending
    for p in pending:
        if p.settle is Settle.COMPLETE:
            previous = p.journal.get("previous")
            if previous and previous != p.exp_id and previous in lock.sessions:
                lock = lock.without_session(previous)
            lock = lock.with_session(p.record)
        else:  # the old folder, if any, goes back from the trash
            trash = root / WORK_DIR / "trash" / p.exp_id
            # (A dropped commit's own files at the address go aside first.)
            if trash.is_dir() and (p.settle is Settle.ABANDON or not (root / p.record.address.path).exists()):
                moved[p.record.address.path] = (p.record.address.path, trash)
        notes.append(p.note())
    for temp in stale_temp_files(root):  # the lock itself is whole: replaced by rename
        notes.append(f"{temp.name}: left by an interrupted lock write; the next apply removes it")
    trash = root / WORK_DIR / "trash"
    journalled = {p.exp_id for p in pending}
    for leftover in sorted(trash.iterdir()) if trash.is_dir() else []:
        if leftover.name.removesuffix(".dicom") not in journalled:
            notes.append(f".xnat2bids/trash/{leftover.name}: the old files of a replaced session, which could not "
                         "be removed then; the next apply removes them")
    return lock, moved, notes


def located(rel: str, moved: Mapping[str, tuple[str, Path]]) -> str | None:
    """Where a rolled-back session's output sits meanwhile (`as_recovered`'s `moved`); None for
    one at its place in the root."""
    for prefix, (_, trash) in moved.items():
        if rel.startswith(prefix + "/"):
            return os.path.join(trash, rel[len(prefix) + 1:])
    return None
