"""The dataset-level BIDS files xnat2bids keeps in the real BIDS root.

Owns `dataset_description.json` (our GeneratedBy entries), `participants.tsv`,
`sub-X/sub-X_sessions.tsv` and `.bidsignore`. These files are shared with the user: it adds
and refreshes only its own keys, rows and columns, writes other lines back as they were,
and replaces files atomically (temp file, fsync, rename).
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from reconcile.durable import write_atomic
from reconcile.errors import XnatBidsError
from reconcile.lockparse import conflict_marker_line
from reconcile.workarea import temp_folder

__all__ = [
    "BIDS_VERSION",
    "BIDSIGNORE_PATTERNS",
    "SESSION_COLUMNS",
    "check_dataset_files",
    "check_dataset_level_files",
    "refuse_unfinished_merge",
    "refuse_unresolved_conflicts",
    "unresolved_conflicts",
    "ensure_bidsignore",
    "ensure_dataset_description",
    "ensure_participant",
    "update_sessions_tsv",
]

BIDS_VERSION = "1.10.0"
TOOL_ORDER = ("xnat2bids", "heudiconv", "dcm2niix")
SESSION_COLUMNS = ("session_id", "acq_time", "xnat_experiment_id", "xnat_insert_date")
NA = "n/a"
# Top-level sessions.json applies to every sub-X_sessions.tsv (BIDS inheritance) and keeps
# the validator from flagging our columns as undefined.
SESSION_COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "xnat_experiment_id": {
        "LongName": "XNAT experiment ID",
        "Description": "Accession ID of the XNAT MR session this BIDS session was exported from",
    },
    "xnat_insert_date": {
        "LongName": "XNAT insert date",
        "Description": "When the session was archived in XNAT, as XNAT reports it",
    },
}
# The same for the columns heudiconv adds to every sub-X_ses-Y_scans.tsv beyond BIDS' own
# (its top-level scans.json stays in the conversion's staging folder).
SCANS_COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "operator": {
        "LongName": "Operator",
        "Description": "Who ran the scanner: the DICOM PerformingPhysicianName, as heudiconv records it",
    },
    "randstr": {
        "LongName": "Random string",
        "Description": "The first 8 hex digits of an MD5 of the series' DICOM UIDs, as heudiconv records it",
    },
}
# bids-validator 3.x ignores every dot-file and dot-folder at any depth, and our work area
# (.xnat2bids/), lockfile (.xnat2bids.lock) and state lock (.xnat2bids.lock.info) are all
# dot-named, so nothing needs ignoring today. Kept as the single place to add a pattern.
BIDSIGNORE_PATTERNS: tuple[str, ...] = ()


class DatasetFileError(XnatBidsError):
    """A dataset-level BIDS file exists but cannot be read or safely updated."""


def check_dataset_files(root: Path, bids_subject: str, *, previous_subject: str | None = None) -> None:
    """Read, writing nothing, each dataset file a commit of sub-X will update; raise what the update would.

    apply calls this before moving a converted session into place: a file that only fails once the
    session is in place leaves a half-done commit. `previous_subject` is the subject whose sessions
    file loses a row when the session moved there from another subject. Missing files are fine.
    """
    root = Path(root)
    check_dataset_level_files(root)
    _read_sessions(_sessions_path(root, bids_subject))
    if previous_subject is not None and _sessions_path(root, previous_subject).exists():
        _Tsv.read(_sessions_path(root, previous_subject))


def check_dataset_level_files(root: Path) -> None:
    """Read, writing nothing, the top-level files every commit updates (dataset_description.json,
    participants.tsv, the sessions and scans sidecars); raise what an update would. Before apply
    exports anything: one not UTF-8, or not JSON, would fail every session after its download
    and conversion."""
    _read_description(root / "dataset_description.json")
    _read_participants(root / "participants.tsv")
    for sidecar in ("sessions.json", "scans.json"):
        if (root / sidecar).exists():
            _read_json_object(root / sidecar)


def unresolved_conflicts(root: Path, subjects: Iterable[str]) -> list[tuple[Path, int]]:
    """The dataset files a commit of these subjects' sessions updates that hold git conflict
    markers (a `git pull` where two clones each added a subject), with the line of the first
    marker, in path order. Reads only those files, as bytes; anything else wrong with one is the
    commit's to report."""
    from reconcile.vcs import maybe_in_git

    root = Path(root)
    if not root.is_dir():
        return []
    top = os.fspath(root)
    names = [f"{top}/{name}" for name in ("dataset_description.json", "participants.tsv", "sessions.json", "scans.json")]
    if maybe_in_git(root):  # asked on every plan, of up to every subject: not where no git merge could have been
        names += [f"{top}/sub-{subject}/sub-{subject}_sessions.tsv" for subject in sorted(set(subjects))]
    found = []
    for name in names:
        try:
            with open(name, "rb") as f:
                data = f.read()
        except OSError:  # missing (the commit makes it), or unreadable (the commit says so)
            continue
        line = conflict_marker_line(data.decode("utf-8", errors="replace"))
        if line is not None:
            found.append((Path(name), line))
    return found


def refuse_unresolved_conflicts(root: Path, subjects: Iterable[str]) -> None:
    """Before apply exports anything: a file its commits update that git left conflicted would
    fail every session of the run after its download and conversion (and, written to, would turn
    the marker lines into rows)."""
    found = unresolved_conflicts(root, subjects)
    if len(found) == 1:
        path, line = found[0]
        raise DatasetFileError(f"{path}: unresolved git merge conflict (a conflict marker at line {line}); "
                               "nothing was exported", hint=_resolve_hint([path]))
    if found:
        raise DatasetFileError(f"{len(found)} dataset files hold unresolved git merge conflicts; nothing was exported",
                               detail="\n".join(f"{path}: a conflict marker at line {line}" for path, line in found),
                               hint=_resolve_hint([path for path, _ in found]))


def refuse_unfinished_merge(root: Path, *, nothing: str = "nothing was exported") -> None:
    """Before apply (or forget) writes anything: while a git merge or rebase of the dataset waits
    for the user, its files are half-merged (conflict markers, one side's rows) though the lock the
    merge driver wrote reads well, and what apply wrote would go into the merge's commit."""
    from reconcile.vcs import unfinished_merge, unfinished_way_out

    command = unfinished_merge(root)
    if command is not None:
        raise DatasetFileError(f"a `git {command}` is unfinished in the repository of {root}; {nothing}",
                               hint=f"finish it first: {unfinished_way_out(command)}; xnat2bids writes nothing to "
                                    "a dataset in the middle of a merge")


def _resolve_hint(paths: list[Path]) -> str:
    named = " ".join(shlex.quote(str(path)) for path in paths)
    return (f"finish the merge: keep what both sides hold (in participants.tsv and sessions files, every row), "
            f"delete the marker lines (<<<<<<<, =======, >>>>>>>), then `git add {named}`; "
            "xnat2bids writes nothing to a file with conflict markers")


def _refuse_conflict(path: Path, text: str) -> None:
    """A file of the user's as git left it after a merge it could not finish: its marker lines
    are not rows (or JSON), and writing it back would bury the conflict in the dataset."""
    line = conflict_marker_line(text)
    if line is not None:
        raise DatasetFileError(f"{path}: unresolved git merge conflict (a conflict marker at line {line})",
                               hint=_resolve_hint([path]))


def ensure_dataset_description(root: Path, *, name: str, tools: Mapping[str, str]) -> None:
    """Create dataset_description.json, or add/refresh our GeneratedBy entries in it.

    User keys and other GeneratedBy entries stay as they are; ours (matched by Name) are
    updated in place or appended in a fixed order.
    """
    path = Path(root) / "dataset_description.json"
    ours = [{"Name": tool, "Version": tools[tool]} for tool in _tool_order(tools)]
    if not path.exists():
        data: dict[str, Any] = {
            "Name": name,
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": ours,
        }
        _write(root, path, _json_text(data))
        return
    data, bom = _read_description(path)
    merged = list(data.get("GeneratedBy", []))
    for entry in ours:
        index = next((i for i, e in enumerate(merged) if isinstance(e, dict) and e.get("Name") == entry["Name"]), None)
        if index is None:
            merged.append(entry)
        else:
            merged[index] = {**merged[index], **entry}
    updated = dict(data)
    updated["GeneratedBy"] = merged
    updated.setdefault("Name", name)
    updated.setdefault("BIDSVersion", BIDS_VERSION)
    if updated != data:
        _write(root, path, _json_text(updated, bom=bom))


def _read_description(path: Path) -> tuple[dict[str, Any], bool]:
    """dataset_description.json as (data, had a BOM); ({}, False) when missing."""
    if not path.exists():
        return {}, False
    data, bom = _read_json_object(path)
    if not isinstance(data.get("GeneratedBy", []), list):
        raise DatasetFileError(f"{path}: GeneratedBy is not a list",
                               hint="fix or remove the GeneratedBy key; xnat2bids appends its tools there")
    return data, bom


def update_sessions_tsv(root: Path, bids_subject: str, bids_session: str, *, acq_time: str,
                        xnat_experiment_id: str, xnat_insert_date: str) -> None:
    """Add or update ses-Y's row in sub-X/sub-X_sessions.tsv.

    Other rows, user columns and their order are kept; our columns missing from a user's
    file are appended (n/a in existing rows). Nothing is written when nothing changes.
    """
    path = _sessions_path(Path(root), bids_subject)
    ours = {
        "session_id": f"ses-{bids_session}",
        "acq_time": acq_time or NA,
        "xnat_experiment_id": xnat_experiment_id or NA,
        "xnat_insert_date": xnat_insert_date or NA,
    }
    table = _read_sessions(path)
    missing = [c for c in SESSION_COLUMNS if c not in table.header]
    changed = bool(missing) or not path.exists()
    for column in missing:
        table.add_column(column)
    index = table.find("session_id", ours["session_id"])
    if index is None:
        table.insert_sorted("session_id", ours, ours="xnat_experiment_id")
        changed = True
    else:
        changed |= table.set(index, ours)
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(root, path, table.text())
    _ensure_json_keys(Path(root), "sessions.json", SESSION_COLUMN_DESCRIPTIONS)
    _ensure_json_keys(Path(root), "scans.json", SCANS_COLUMN_DESCRIPTIONS)


def session_acq_time(root: Path, bids_subject: str, bids_session: str, date: str | None) -> str:
    """When the session's first data was acquired: the earliest `acq_time` of its scans.tsv (the
    DICOM's, as heudiconv writes it), else its XNAT date at midnight, else n/a. Not the XNAT date
    alone: labs re-date a session to have it exported again."""
    path = Path(root) / f"sub-{bids_subject}" / f"ses-{bids_session}" / f"sub-{bids_subject}_ses-{bids_session}_scans.tsv"
    try:
        table = _Tsv.read(path)
    except (OSError, UnicodeDecodeError, DatasetFileError):  # missing, not UTF-8, conflicted: not a time to go by
        table = _Tsv([], [])
    times = []
    if "acq_time" in table.header:
        at = table.header.index("acq_time")
        times = [row[at] for row in table.rows if len(row) > at and row[at][:4].isdigit()]
    if times:
        return min(times)
    return f"{date}T00:00:00" if date else NA


def _sessions_path(root: Path, bids_subject: str) -> Path:
    return root / f"sub-{bids_subject}" / f"sub-{bids_subject}_sessions.tsv"


def _read_sessions(path: Path) -> _Tsv:
    """A sessions file, or an empty one with our columns when missing or blank."""
    table = _Tsv.read(path) if path.exists() else _Tsv([], [])
    if not table.header:
        return _Tsv(list(SESSION_COLUMNS), [])
    if "session_id" not in table.header:
        raise DatasetFileError(f"{path}: no session_id column", hint="the first column of a sessions file is session_id")
    return table


def remove_session_row(root: Path, bids_subject: str, bids_session: str, *, xnat_experiment_id: str) -> None:
    """Drop ses-Y's row from sub-X/sub-X_sessions.tsv after the session moved elsewhere.

    Only a row that names this experiment is ours to remove; a file left with nothing but our
    own header goes too. Other rows are written back unchanged.
    """
    path = _sessions_path(Path(root), bids_subject)
    if not path.exists():
        return
    table = _Tsv.read(path)
    if "session_id" not in table.header or "xnat_experiment_id" not in table.header:
        return
    index = table.find("session_id", f"ses-{bids_session}")
    if index is None or table.rows[index][table.header.index("xnat_experiment_id")] != xnat_experiment_id:
        return
    table.remove(index)
    if not table.rows and table.header == list(SESSION_COLUMNS):
        path.unlink()
    else:
        _write(root, path, table.text())


def _ensure_json_keys(root: Path, name: str, entries: Mapping[str, Any]) -> None:
    """Add missing top-level keys to a JSON sidecar; keys already there are the user's to keep."""
    path = root / name
    data, bom = _read_json_object(path) if path.exists() else ({}, False)
    missing = {k: v for k, v in entries.items() if k not in data}
    if missing:
        _write(root, path, _json_text({**data, **missing}, bom=bom))


def ensure_participant(root: Path, bids_subject: str, *, renamed_from: str | None = None) -> str | None:
    """Append sub-X to participants.tsv when missing; existing rows and columns are never rewritten.
    A missing (or blank) participants.tsv is written with a row for every subject folder.

    `renamed_from`: the subject's label before XNAT renamed it (the same XNAT subject). The new
    row then takes that row's values (age, group...), which `drop_participant` lets go of once
    the old label's folder is gone. Returns a warning when the new label's row was there already
    with other values: both are kept, for the user to reconcile.
    """
    path = Path(root) / "participants.tsv"
    participant = f"sub-{bids_subject}"
    table = _read_participants(path)
    if not table.header:  # new, or deleted: every subject folder there is gets its row again
        with os.scandir(root) as entries:
            there = {e.name for e in entries if e.name.startswith("sub-") and e.is_dir()}
        _write(root, path, _Tsv(["participant_id"], [[p] for p in sorted(there | {participant})]).text())
        return None
    old = table.find("participant_id", f"sub-{renamed_from}") if renamed_from is not None else None
    at = table.find("participant_id", participant)
    if at is not None:
        if old is not None and not _same_values(table, old, at):
            return (f"participants.tsv: sub-{renamed_from} is {participant} now, whose row was there already with "
                    f"other values; both rows are kept for you to reconcile")
        return None
    values = table.row(old) if old is not None else {}
    table.insert_sorted("participant_id", {**values, "participant_id": participant})
    _write(root, path, table.text())
    return None


def _same_values(table: _Tsv, a: int, b: int) -> bool:
    """Whether two participants' rows hold the same values (their IDs aside)."""
    return {**table.row(a), "participant_id": ""} == {**table.row(b), "participant_id": ""}


def drop_participant(root: Path, bids_subject: str, *, renamed_to: str | None = None) -> None:
    """Remove sub-X's row from participants.tsv once no sub-X folder is left (its last session moved
    to another subject), so the table names the subjects there are. Only a row that holds nothing
    but n/a goes, or (`renamed_to`: the same XNAT subject's new label) nothing but what that
    subject's row holds too; a row with values of its own stays, for the user to move."""
    root = Path(root)
    path = root / "participants.tsv"
    if os.path.lexists(root / f"sub-{bids_subject}") or not path.exists():
        return
    table = _read_participants(path)
    at = table.find("participant_id", f"sub-{bids_subject}") if table.header else None
    if at is None:
        return
    values = table.row(at)
    if any(v not in (NA, "") for c, v in values.items() if c != "participant_id"):
        new = table.find("participant_id", f"sub-{renamed_to}") if renamed_to is not None else None
        if new is None or not _same_values(table, new, at):
            return
    table.remove(at)
    _write(root, path, table.text())


def _read_participants(path: Path) -> _Tsv:
    """participants.tsv; a table without header when missing or blank."""
    table = _Tsv.read(path) if path.exists() else _Tsv([], [])
    if table.header and "participant_id" not in table.header:
        raise DatasetFileError(f"{path}: no participant_id column",
                               hint="the first column of participants.tsv is participant_id")
    return table


def ensure_bidsignore(root: Path, patterns: Iterable[str] = BIDSIGNORE_PATTERNS) -> None:
    """Make sure `.bidsignore` lists `patterns`; appends only missing lines, never creates an empty file."""
    path = Path(root) / ".bidsignore"
    wanted = list(dict.fromkeys(p.strip() for p in patterns if p.strip()))
    existing, bom = _read_text(path) if path.exists() else ("", False)
    present = {line.strip() for line in existing.split("\n")}
    missing = [p for p in wanted if p not in present]
    if not missing:
        return
    prefix = existing if not existing or existing.endswith("\n") else existing + "\n"
    _write(root, path, ("\ufeff" if bom else "") + prefix + "".join(f"{p}\n" for p in missing))


class _Tsv:
    """A BIDS TSV that remembers each line's text, so lines we do not touch are written back unchanged."""

    def __init__(self, header: list[str], rows: list[list[str]], newline: str = "\n",
                 raw: list[str | None] | None = None, *, bom: bool = False):
        self.header = header
        self.rows = rows
        self.newline = newline
        self.bom = bom
        # raw[0] is the header line, raw[i + 1] row i; None once a line was changed.
        self.raw: list[str | None] = raw if raw is not None else [None] * (len(rows) + 1)

    @classmethod
    def read(cls, path: Path) -> _Tsv:
        text, bom = _read_text(path)
        _refuse_conflict(path, text)
        newline = "\r\n" if "\r\n" in text else "\n"
        # Only \n ends a row: str.splitlines() would also split a user's cell at \x0b, \x0c, \x1c-\x1e,
        # \x85, \u2028 or \u2029 and write one row back as two.
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        # Blank lines are not valid BIDS TSV rows; dropping them is the only normalisation.
        lines = [line for line in lines if line.strip()]
        if not lines:
            return cls([], [], newline, bom=bom)
        return cls(lines[0].split("\t"), [line.split("\t") for line in lines[1:]], newline, list(lines), bom=bom)

    def add_column(self, column: str) -> None:
        self.header.append(column)
        self.raw = [None] * len(self.raw)
        for row in self.rows:
            row.extend([NA] * (len(self.header) - len(row)))

    def find(self, column: str, value: str) -> int | None:
        at = self.header.index(column)
        return next((i for i, row in enumerate(self.rows) if len(row) > at and row[at] == value), None)

    def row(self, index: int) -> dict[str, str]:
        """Row `index` by column (a short row's missing cells n/a)."""
        cells = self.rows[index]
        return {c: cells[i] if i < len(cells) else NA for i, c in enumerate(self.header)}

    def remove(self, index: int) -> None:
        del self.rows[index]
        del self.raw[index + 1]

    def append(self, values: Mapping[str, str]) -> None:
        self.rows.append([values.get(column, NA) for column in self.header])
        self.raw.append(None)

    def insert_sorted(self, column: str, values: Mapping[str, str], ours: str | None = None) -> None:
        """Insert before the first row (of ours: `ours` column set) whose `column` sorts after the new one.

        Existing rows keep their order, and the result does not depend on the order in which
        sessions were committed (apply --jobs N); without a row to go before, the row is appended.
        """
        at = self.header.index(column)
        mine = self.header.index(ours) if ours is not None else None
        key = values[column]
        index = next((i for i, row in enumerate(self.rows) if len(row) > at and row[at] > key
                      and (mine is None or (len(row) > mine and row[mine] not in (NA, "")))), len(self.rows))
        self.rows.insert(index, [values.get(c, NA) for c in self.header])
        self.raw.insert(index + 1, None)

    def set(self, index: int, values: Mapping[str, str]) -> bool:
        row = self.rows[index]
        before = list(row)
        row.extend([NA] * (len(self.header) - len(row)))
        for column, value in values.items():
            row[self.header.index(column)] = value
        if row == before:
            return False
        self.raw[index + 1] = None
        return True

    def text(self) -> str:
        lines = [self.header, *self.rows]
        body = "".join((raw if raw is not None else "\t".join(cells)) + self.newline
                       for raw, cells in zip(self.raw, lines))
        return ("\ufeff" if self.bom else "") + body


def _tool_order(tools: Mapping[str, str]) -> list[str]:
    known = [t for t in TOOL_ORDER if t in tools]
    return known + sorted(t for t in tools if t not in TOOL_ORDER)


def _read_text(path: Path) -> tuple[str, bool]:
    """A user's file as (text without BOM, had a BOM): UTF-8 only, with the BOM Excel and Notepad write.

    Other encodings are refused, not guessed: a wrong guess would be written back as mojibake.
    """
    try:
        data = path.read_bytes()  # bytes: read_text would hide CRLF
    except OSError as exc:
        raise DatasetFileError(f"cannot read {path}: {exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DatasetFileError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})",
            hint="save the file as UTF-8 (Excel: 'CSV UTF-8'; a text editor: encoding UTF-8), then run apply again",
        ) from exc
    bom = text.startswith("\ufeff")
    return text.removeprefix("\ufeff"), bom


def _read_json_object(path: Path) -> tuple[dict[str, Any], bool]:
    """A JSON object file as (data, had a BOM)."""
    text, bom = _read_text(path)
    _refuse_conflict(path, text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetFileError(f"cannot read {path}: {exc}", hint="fix the JSON; xnat2bids will not overwrite it") from exc
    if not isinstance(data, dict):
        raise DatasetFileError(f"{path} is not a JSON object")
    return data, bom


def _write(root: Path, path: Path, text: str) -> None:
    """Replace `path` (a file of the BIDS tree at `root`) atomically, its temp file in the work area."""
    write_atomic(path, text, temps=temp_folder(Path(root)))


def _json_text(data: Mapping[str, Any], *, bom: bool = False) -> str:
    return ("\ufeff" if bom else "") + json.dumps(data, indent=2, ensure_ascii=False) + "\n"
