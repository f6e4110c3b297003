"""Reading and writing the lockfile `.xnat2bids.lock`: what the last apply exported, per session.

Owns the lock's TOML layout (via `schemas/lock.schema.json`), its identity (lineage, serial) and
the atomic, validate-before-write save. It never decides what to export; it only records it.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sys
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import tomli_w

from reconcile import __version__
from reconcile.errors import LockfileError
from reconcile.failpoints import hit
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


# jsonschema needs ~7 ms per session here (minutes for a 10,000-session lock), so the schema is
# compiled once into plain closures for the keywords it uses. An unsupported keyword is an error
# at compile time, so the schema cannot gain a rule that is silently not enforced.
_Where = tuple[Any, ...]  # linked (parent, key) pairs, flattened only when reporting an error
_Check = Callable[[Any, _Where, list[tuple[_Where, str]]], None]
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description"})
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # Stricter than JSON Schema, which also accepts 1.0: a float would not round-trip as an int.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
}
_TYPE_NAMES = {"object": "a table", "array": "an array", "string": "a string", "integer": "an integer"}


def _ecma_pattern(pattern: str) -> re.Pattern[str]:
    # ECMA-262 '$' matches only at the very end; Python's also before a final newline.
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


def _compile(schema: Mapping[str, Any], root: Mapping[str, Any]) -> _Check:
    if "$ref" in schema:
        ref = schema["$ref"]
        if set(schema) - {"$ref"} or not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref use: {schema}")
        return _compile(root["$defs"][ref.removeprefix("#/$defs/")], root)
    unknown = set(schema) - _ANNOTATIONS - {
        "type", "const", "pattern", "minLength", "maxLength", "minimum", "maximum",
        "properties", "required", "additionalProperties", "propertyNames", "items",
    }
    if unknown:
        raise ValueError(f"schema keywords not supported by the lock validator: {sorted(unknown)}")
    checks: list[_Check] = []
    described = f"not {schema['description']}" if "description" in schema else None

    if "type" in schema:
        name = schema["type"]
        is_type = _TYPES[name]

        def check_type(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if not is_type(v):
                errs.append((where, f"{v!r} is not {_TYPE_NAMES[name]}"))

        checks.append(check_type)
    if "const" in schema:
        const = schema["const"]

        def check_const(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if v != const or type(v) is not type(const):
                errs.append((where, f"{v!r} is not {const!r}"))

        checks.append(check_const)
    if "pattern" in schema or "minLength" in schema or "maxLength" in schema:
        rx = _ecma_pattern(schema["pattern"]) if "pattern" in schema else None
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", float("inf"))

        if described:
            problem = described
        elif rx is not None:
            problem = f"does not match {schema['pattern']}"
        else:
            problem = "empty" if hi == float("inf") else f"not {lo} to {hi} characters long"

        def check_string(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if isinstance(v, str) and not (lo <= len(v) <= hi and (rx is None or rx.search(v))):
                errs.append((where, f"{v!r} is {problem}"))

        checks.append(check_string)
    if "minimum" in schema or "maximum" in schema:
        low, high = schema.get("minimum", float("-inf")), schema.get("maximum", float("inf"))

        def check_range(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if isinstance(v, int) and not isinstance(v, bool) and not low <= v <= high:
                bound = f"at least {low}" if v < low else f"at most {high}"
                errs.append((where, f"{v!r} must be {bound}"))

        checks.append(check_range)
    if {"properties", "required", "additionalProperties", "propertyNames"} & set(schema):
        props = {k: _compile(s, root) for k, s in schema.get("properties", {}).items()}
        required = tuple(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        extra_check = _compile(extra, root) if isinstance(extra, Mapping) else None
        names = _compile(schema["propertyNames"], root) if "propertyNames" in schema else None

        def check_object(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if not isinstance(v, dict):
                return
            for key in required:
                if key not in v:
                    errs.append((where, f"missing required key {key!r}"))
            for key, item in v.items():
                if names is not None:
                    names(key, (where, key), errs)
                sub = props.get(key, extra_check)
                if sub is not None:
                    sub(item, (where, key), errs)
                elif extra is False and key not in props:
                    errs.append((where, f"unknown key {key!r}"))

        checks.append(check_object)
    if "items" in schema:
        item_check = _compile(schema["items"], root)

        def check_items(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if isinstance(v, list):
                for i, item in enumerate(v):
                    item_check(item, (where, i), errs)

        checks.append(check_items)

    if len(checks) == 1:
        return checks[0]

    def check_all(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
        for check in checks:
            check(v, where, errs)

    return check_all


@cache
def _lock_check() -> _Check:
    schema = load_schema("lock")
    return _compile(schema, schema)


def _flatten(where: _Where) -> str:
    parts: list[str] = []
    while where:
        where, key = where
        parts.append(str(key))
    return "/".join(reversed(parts)) or "(top level)"


def _schema_problems(doc: Any) -> list[str]:
    errs: list[tuple[_Where, str]] = []
    _lock_check()(doc, (), errs)
    return [f"{_flatten(where)}: {message}" for where, message in errs]


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


# Locks this process has read or written and found valid, by path: (sha256 of the bytes, lineage,
# serial). write_lock must know the file on disk is valid before replacing it; re-parsing a large
# lock for that costs far more than hashing it, and equal bytes are equally valid.
_known_valid: dict[str, tuple[str, str, int]] = {}


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LockfileError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _parse_file(path: Path, data: bytes) -> Lock:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LockfileError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from exc
    lock = loads_lock(text, source=str(path))
    _known_valid[os.path.abspath(path)] = (hashlib.sha256(data).hexdigest(), lock.lineage, lock.serial)
    return lock


def read_lock(root: Path) -> Lock | None:
    """The lock of a BIDS root, or None when there is none yet."""
    path = lock_path(root)
    data = _read_bytes(path)
    return None if data is None else _parse_file(path, data)


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
    on_disk = _identity_on_disk(path)  # raises on an invalid file: look at it, never overwrite it
    if expected_serial is not None:
        found = on_disk[1] if on_disk is not None else 0
        if found != expected_serial:
            raise LockfileError(
                f"the lock changed on disk since it was read (serial {expected_serial} → {found})",
                hint="another run wrote it; run plan again",
            )
        if on_disk is not None and on_disk[0] != lock.lineage:
            raise LockfileError(
                f"the lock on disk is a different lock (lineage {on_disk[0]}, not {lock.lineage})",
                hint="another run replaced it; run plan again",
            )
    written = replace(lock, serial=lock.serial + 1, generator=GENERATOR)
    doc = _document(written)
    problems = _problems(doc)
    if problems:
        _raise_invalid(f"refusing to write an invalid lock to {path}", problems)
    data = (HEADER + tomli_w.dumps(doc)).encode("utf-8")
    _atomic_write(path, data)
    _known_valid[os.path.abspath(path)] = (hashlib.sha256(data).hexdigest(), written.lineage, written.serial)
    return written


def _identity_on_disk(path: Path) -> tuple[str, int] | None:
    """(lineage, serial) of the valid lock at `path`, None when absent; LockfileError when invalid."""
    data = _read_bytes(path)
    if data is None:
        return None
    known = _known_valid.get(os.path.abspath(path))
    if known is not None and known[0] == hashlib.sha256(data).hexdigest():
        return known[1], known[2]
    lock = _parse_file(path, data)
    return lock.lineage, lock.serial


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
            hit("lock-temp-written")
            os.replace(tmp, path)
            hit("lock-replaced")
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
