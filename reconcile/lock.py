"""Reading and writing the lockfile `.xnat2bids.lock`: what the last apply exported, per session.

Owns the lock's TOML layout (via `schemas/lock.schema.json`), its identity (lineage, serial) and
the atomic, validate-before-write save. It never decides what to export; it only records it.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import tomli_w

from reconcile import __version__
from reconcile.errors import LockfileError
from reconcile.model import OutputRecord, ScanRecord, SessionRecord
from reconcile.schema import load_schema

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LOCK_NAME = ".xnat2bids.lock"
FORMAT_VERSION = 1
GENERATOR = f"xnat2bids {__version__}"
HEADER = "# Written by xnat2bids; do not edit by hand.\n"

_DUPLICATE_SESSION = re.compile(r"Cannot declare \('sessions', '([^']*)'\) twice")
_DIGITS = re.compile(r"(\d+)")


def scan_sort_key(scan_id: str) -> tuple[tuple[str | int, ...], str]:
    """Numeric-aware order for XNAT scan IDs: '2' < '10' < '10a' < 'SR1'."""
    # re.split with a capture group alternates text and digits, so positions never mix str and int.
    parts = tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(scan_id)))
    return parts, scan_id


def _normalized(record: SessionRecord) -> SessionRecord:
    """The record with scans, outputs and dict keys in the order the file keeps them."""
    return replace(
        record,
        config_digests=dict(sorted(record.config_digests.items())),
        tools=dict(sorted(record.tools.items())),
        scans=tuple(sorted(record.scans, key=lambda s: scan_sort_key(s.id))),
        outputs=tuple(sorted(record.outputs, key=lambda o: o.path)),
    )


@dataclass(frozen=True)
class Lock:
    """The lock's content. Immutable: `with_session`/`without_session` return new locks.

    `sessions` is keyed by XNAT experiment ID; treat it as read-only. Records that enter through
    `with_session` or `loads_lock` are normalized (sorted scans and outputs), which keeps
    `loads_lock(dumps_lock(lock)) == lock`.
    """

    lineage: str
    serial: int
    generator: str
    config_fingerprint: str
    sessions: Mapping[str, SessionRecord] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(cls) -> Lock:
        return cls(lineage=str(uuid.uuid4()), serial=0, generator=GENERATOR, config_fingerprint="", sessions={})

    def with_session(self, record: SessionRecord) -> Lock:
        sessions = dict(self.sessions)
        sessions[record.experiment_id] = _normalized(record)
        return replace(self, sessions=sessions)

    def without_session(self, experiment_id: str) -> Lock:
        sessions = dict(self.sessions)
        sessions.pop(experiment_id, None)
        return replace(self, sessions=sessions)


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


# --- document <-> Lock -------------------------------------------------------------------------


def _session_document(record: SessionRecord) -> dict[str, Any]:
    # Field order follows the model so a human reading the file sees identity first.
    doc: dict[str, Any] = {
        "experiment_id": record.experiment_id,
        "project": record.project,
        "subject_id": record.subject_id,
        "subject_label": record.subject_label,
        "session_label": record.session_label,
        "bids_subject": record.bids_subject,
        "bids_session": record.bids_session,
    }
    if record.date is not None:  # TOML has no null
        doc["date"] = record.date
    doc.update(
        insert_date=record.insert_date,
        last_modified=record.last_modified,
        xsi_type=record.xsi_type,
        exported_at=record.exported_at,
        config_fingerprint=record.config_fingerprint,
        config_digests=dict(sorted(record.config_digests.items())),
        tools=dict(sorted(record.tools.items())),
        scans=[
            {
                "id": s.id,
                "type": s.type,
                "series_description": s.series_description,
                "file_count": s.file_count,
                "total_size": s.total_size,
                "digest": s.digest,
            }
            for s in sorted(record.scans, key=lambda s: scan_sort_key(s.id))
        ],
        outputs=[
            {"path": o.path, "size": o.size, "sha256": o.sha256, "mtime_ns": o.mtime_ns}
            for o in sorted(record.outputs, key=lambda o: o.path)
        ],
    )
    return doc


def _document(lock: Lock) -> dict[str, Any]:
    return {
        "format_version": lock.format_version,
        "lineage": lock.lineage,
        "serial": lock.serial,
        "generator": lock.generator,
        "config_fingerprint": lock.config_fingerprint,
        "sessions": {key: _session_document(lock.sessions[key]) for key in sorted(lock.sessions)},
    }


def _record(doc: Mapping[str, Any]) -> SessionRecord:
    return SessionRecord(
        experiment_id=doc["experiment_id"],
        project=doc["project"],
        subject_id=doc["subject_id"],
        subject_label=doc["subject_label"],
        session_label=doc["session_label"],
        bids_subject=doc["bids_subject"],
        bids_session=doc["bids_session"],
        date=doc.get("date"),
        insert_date=doc["insert_date"],
        last_modified=doc["last_modified"],
        xsi_type=doc["xsi_type"],
        exported_at=doc["exported_at"],
        config_fingerprint=doc["config_fingerprint"],
        config_digests=dict(sorted(doc["config_digests"].items())),
        tools=dict(sorted(doc["tools"].items())),
        scans=tuple(sorted((ScanRecord(**s) for s in doc["scans"]), key=lambda s: scan_sort_key(s.id))),
        outputs=tuple(sorted((OutputRecord(**o) for o in doc["outputs"]), key=lambda o: o.path)),
    )


def _from_document(doc: Mapping[str, Any]) -> Lock:
    return Lock(
        lineage=doc["lineage"],
        serial=doc["serial"],
        generator=doc["generator"],
        config_fingerprint=doc["config_fingerprint"],
        sessions={key: _record(doc["sessions"][key]) for key in sorted(doc["sessions"])},
        format_version=doc["format_version"],
    )


# --- validation --------------------------------------------------------------------------------


@cache
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema("lock"))


def _schema_problems(doc: Any) -> list[str]:
    out = []
    for err in sorted(_validator().iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        described = err.schema.get("description") if isinstance(err.schema, dict) else None
        if err.validator in ("pattern", "maxLength", "minLength") and described:
            # The raw regex in jsonschema's message tells a user nothing; say what was expected.
            message = f"{err.instance!r} is not {described}"
        else:
            message = err.message
        out.append(f"{where}: {message}")
    return out


def _consistency_problems(doc: Mapping[str, Any]) -> list[str]:
    """What a schema cannot say: keys that must agree with fields, and uniqueness within arrays."""
    out = []
    for key, session in doc["sessions"].items():
        if session["experiment_id"] != key:
            out.append(
                f"sessions/{key}/experiment_id: {session['experiment_id']!r} disagrees with its table key {key!r}"
            )
        for kind, field_name in (("scans", "id"), ("outputs", "path")):
            seen: set[str] = set()
            for i, item in enumerate(session[kind]):
                if item[field_name] in seen:
                    out.append(f"sessions/{key}/{kind}/{i}/{field_name}: {item[field_name]!r} is listed twice")
                seen.add(item[field_name])
    return out


def _problems(doc: Any) -> list[str]:
    return _schema_problems(doc) or _consistency_problems(doc)


def _raise_invalid(summary: str, problems: list[str]) -> None:
    raise LockfileError(
        f"{summary}: {problems[0]}",
        detail="\n".join(problems[1:21]) or None,
        hint="restore the lock from a backup or version control, or move it away to start afresh",
    )


# --- text --------------------------------------------------------------------------------------


def dumps_lock(lock: Lock) -> str:
    """Deterministic TOML: sessions by key, scans by numeric-aware ID, outputs by path."""
    return HEADER + tomli_w.dumps(_document(lock))


def loads_lock(text: str, source: str = "lock") -> Lock:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        duplicate = _DUPLICATE_SESSION.search(str(exc))
        if duplicate:
            raise LockfileError(
                f"{source}: session {duplicate.group(1)} appears twice ({str(exc)[duplicate.end():].strip(' ()')})"
            ) from exc
        raise LockfileError(f"{source}: not valid TOML: {exc}") from exc
    version = doc.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        # Checked before the schema: a newer format may legitimately have fields this one lacks.
        raise LockfileError(
            f"{source}: written by a newer xnat2bids (format {version}); upgrade",
            hint="install a newer xnat2bids to use this BIDS root",
        )
    problems = _problems(doc)
    if problems:
        _raise_invalid(f"{source}: invalid lock", problems)
    return _from_document(doc)


# --- files -------------------------------------------------------------------------------------


def read_lock(root: Path) -> Lock | None:
    """The lock of a BIDS root, or None when there is none yet."""
    path = lock_path(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LockfileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LockfileError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from exc
    return loads_lock(text, source=str(path))


def load_or_new(root: Path) -> Lock:
    """The lock on disk, or a fresh one (not written) when there is none."""
    lock = read_lock(root)
    return lock if lock is not None else Lock.new()


def write_lock(root: Path, lock: Lock, *, expected_serial: int | None = None) -> Lock:
    """Save `lock` with its serial bumped and return what was written.

    Refuses to overwrite a lock file it cannot read, to write a lock that fails validation, and,
    when `expected_serial` is given, to write over a lock whose serial (or lineage) differs from
    what the caller read. A missing file counts as serial 0.
    """
    path = lock_path(root)
    on_disk = read_lock(root)  # raises on an invalid file, which must be looked at, not overwritten
    if expected_serial is not None:
        found = on_disk.serial if on_disk is not None else 0
        if found != expected_serial:
            raise LockfileError(
                f"the lock changed on disk since it was read (serial {expected_serial} → {found})",
                hint="another run wrote it; run plan again",
            )
        if on_disk is not None and on_disk.lineage != lock.lineage:
            raise LockfileError(
                f"the lock on disk is a different lock (lineage {on_disk.lineage}, not {lock.lineage})",
                hint="another run replaced it; run plan again",
            )
    written = replace(lock, serial=lock.serial + 1, generator=GENERATOR)
    doc = _document(written)
    problems = _problems(doc)
    if problems:
        _raise_invalid(f"refusing to write an invalid lock to {path}", problems)
    _atomic_write(path, (HEADER + tomli_w.dumps(doc)).encode("utf-8"))
    return written


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over, fsync the directory."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                try:
                    os.chmod(tmp, path.stat().st_mode & 0o7777)  # keep a mode the user chose
                except FileNotFoundError:
                    pass
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        _fsync_dir(path.parent)
    except OSError as exc:
        raise LockfileError(f"cannot write {path}: {exc.strerror or exc}") from exc


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; directories cannot be opened for fsync on Windows.
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
