"""The journal of a commit: written by apply before it swaps a session's folders, read by the
recovery that finishes or undoes a commit a crash interrupted, and by `check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reconcile.errors import LockfileError
from reconcile.lock import loads_lock
from reconcile.model import SessionRecord


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
