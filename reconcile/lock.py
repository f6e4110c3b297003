"""Reading and writing the lockfile `.xnat2bids.lock`: what the last apply exported, per session.

Owns the lock's TOML layout (via `schemas/lock.schema.json`), its identity (lineage, serial) and
the atomic, validate-before-write save. It never decides what to export; it only records it.
Large locks are read through a verified cache and rewritten incrementally (see "speed" below);
both only accelerate: the TOML file stays the one source of truth.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import marshal
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Union

import tomli_w

from reconcile import __version__
from reconcile.durable import fsync_dir
from reconcile.errors import LockfileError
from reconcile.failpoints import hit
from reconcile.lockcheck import _consistency_problems, _raise_invalid, _schema_problems
from reconcile.lockdoc import (
    _HEADER_FIELDS,
    FORMAT_VERSION,
    _canonical_session,
    _normalized,
    _record,
    _session_document,
    scan_sort_key,
)
from reconcile.lockparse import _parse, gc_paused
from reconcile.model import SessionRecord

__all__ = [
    "FORMAT_VERSION",
    "GENERATOR",
    "HEADER",
    "LOCK_NAME",
    "Lock",
    "dumps_lock",
    "gc_paused",
    "load_or_new",
    "loads_lock",
    "lock_path",
    "read_lock",
    "scan_sort_key",
    "write_lock",
]

LOCK_NAME = ".xnat2bids.lock"
GENERATOR = f"xnat2bids {__version__}"
HEADER = "# Written by xnat2bids; do not edit by hand.\n"


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
        return replace(self, sessions=_Sessions.of(self.sessions).updated(record.experiment_id, _normalized(record)))

    def without_session(self, experiment_id: str) -> Lock:
        return replace(self, sessions=_Sessions.of(self.sessions).updated(experiment_id, None))


# What a session was decoded from or last written as: (record, its marshalled canonical document,
# copies of its two dicts). The dicts are the only parts of a frozen record that can still change.
_Origin = tuple[SessionRecord, bytes, dict[str, str], dict[str, str]]


class _Sessions(Mapping[str, SessionRecord]):
    """A lock's sessions, each decoded from its marshalled document on first access.

    Decoding 10,000 sessions (300,000 dataclasses) costs seconds; most callers of a lock touch a
    few. It also remembers which document each record came from, so `write_lock` can tell the
    sessions that are unchanged since the last read or write without comparing their content.
    """

    __slots__ = ("_items", "_origin")

    def __init__(self, items: dict[str, Union[SessionRecord, bytes]], origin: dict[str, _Origin]) -> None:
        self._items = items
        self._origin = origin

    @classmethod
    def of(cls, sessions: Mapping[str, SessionRecord]) -> _Sessions:
        return sessions if isinstance(sessions, _Sessions) else cls(dict(sessions), {})

    def updated(self, key: str, record: SessionRecord | None) -> _Sessions:
        items, origin = dict(self._items), dict(self._origin)
        origin.pop(key, None)
        if record is None:
            items.pop(key, None)
        else:
            items[key] = record
        return _Sessions(items, origin)

    def __getitem__(self, key: str) -> SessionRecord:
        value = self._items[key]
        if type(value) is bytes:
            record = _record(marshal.loads(value), canonical=True)
            self._origin[key] = (record, value, dict(record.config_digests), dict(record.tools))
            self._items[key] = record
            return record
        return value  # type: ignore[return-value]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __repr__(self) -> str:
        return repr(dict(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return dict, (dict(self),)

    def blob(self, key: str) -> bytes | None:
        """The marshalled document `key` is known to equal, without decoding it; None if unknown."""
        value = self._items[key]
        if type(value) is bytes:
            return value
        origin = self._origin.get(key)
        if origin is not None and origin[0] is value and value.config_digests == origin[2] and value.tools == origin[3]:  # type: ignore[union-attr]
            return origin[1]
        return None


def lock_path(root: Path) -> Path:
    return Path(root) / LOCK_NAME


# --- document <-> Lock -------------------------------------------------------------------------


def _document(lock: Lock) -> dict[str, Any]:
    return {**_header(lock), "sessions": {key: _session_document(lock.sessions[key]) for key in sorted(lock.sessions)}}


def _header(lock: Lock) -> dict[str, Any]:
    """The document without its sessions, in the order `_document` writes it."""
    return {
        "format_version": lock.format_version,
        "lineage": lock.lineage,
        "serial": lock.serial,
        "generator": lock.generator,
        "config_fingerprint": lock.config_fingerprint,
    }


def _from_document(doc: Mapping[str, Any]) -> Lock:
    return Lock(
        lineage=doc["lineage"],
        serial=doc["serial"],
        generator=doc["generator"],
        config_fingerprint=doc["config_fingerprint"],
        sessions={key: _record(doc["sessions"][key]) for key in sorted(doc["sessions"])},
        format_version=doc["format_version"],
    )


# --- text --------------------------------------------------------------------------------------


def dumps_lock(lock: Lock) -> str:
    """Deterministic TOML: sessions by key, scans by numeric-aware ID, outputs by path."""
    with gc_paused():
        return HEADER + tomli_w.dumps(_document(lock))


def loads_lock(text: str, source: str = "lock") -> Lock:
    with gc_paused():
        return _from_document(_parse(text, source))


# --- speed -------------------------------------------------------------------------------------
#
# tomli-w's text for a lock is the header, then one self-contained fragment per session, joined
# by blank lines (`_assemble`; a test holds it to tomli_w.dumps of the whole document). And the
# schema has no rule across sessions, so a document is valid exactly when its header is and each
# session is. A write therefore serializes and validates only the sessions that changed since
# the lock on disk was read or written, and copies the other fragments from the file's bytes.
#
# What is known about a lock file is a `_Snapshot`, keyed by the SHA-256 of its exact bytes:
# kept in memory for the files this process read or wrote, and for large locks also saved in a
# cache file so the next process skips the TOML parser (seconds per thousand sessions). Nothing
# in a snapshot is believed unless its digest matches the file's bytes now, or the file is still
# the very one this process read or wrote (`_current`); a cache file that is damaged, foreign or
# stale is ignored and the lock parsed and validated again.


@dataclass(eq=False)
class _Snapshot:
    """What a valid lock file holds: the file whose bytes are `pieces`, joined."""

    header: dict[str, Any]  # as `_header` returns it
    blobs: dict[str, bytes]  # session key -> its canonical document, marshalled, in key order
    sums: dict[str, bytes]  # session key -> SHA-256 of its blob, to check the blob in a cache file
    # Session key -> (start, end) of its TOML fragment in the file; None when the file may not be
    # byte-for-byte what this module writes (parsed from text, e.g. edited by hand).
    spans: dict[str, tuple[int, int]] | None
    pieces: list[Any]
    fragments: dict[str, Any] | None = None  # with spans: session key -> those bytes, in `pieces`
    identity: tuple[int, ...] | None = None  # `_identity` of the file as read or written; None: unknown
    known_digest: bytes | None = None  # SHA-256 of the bytes, once computed

    @property
    def digest(self) -> bytes:
        if self.known_digest is None:
            digest = hashlib.sha256()
            for piece in self.pieces:
                digest.update(piece)
            self.known_digest = digest.digest()
        return self.known_digest

    def lock(self) -> Lock:
        h = self.header
        return Lock(
            lineage=h["lineage"],
            serial=h["serial"],
            generator=h["generator"],
            config_fingerprint=h["config_fingerprint"],
            sessions=_Sessions(dict(self.blobs), {}),
            format_version=h["format_version"],
        )


_snapshots: dict[str, _Snapshot] = {}  # by absolute lock path; the newest few only
_SNAPSHOTS_KEPT = 8
_snapshots_guard = threading.Lock()

# Below this size the TOML parser takes milliseconds: no cache file (nor clutter) for small locks.
_CACHE_MIN_BYTES = 1 << 20
_CACHE_MAGIC = b"xnat2bids lock cache 1\n"
_CACHE_FORMAT = 1
_CACHE_MAX_AGE = 30 * 86400  # cache files of BIDS roots unused this long are deleted
# Rewriting the cache costs about as much as the lock itself. apply writes the lock after every
# session, so during a burst the cache is saved at most this often, and at exit; a process killed
# in between leaves a stale cache, which only makes the next reader parse the TOML.
_CACHE_SAVE_INTERVAL = 10.0
_unsaved: dict[str, tuple[Path, _Snapshot]] = {}
_last_saved: dict[str, float] = {}


def _remember(path: Path, snapshot: _Snapshot) -> None:
    key = os.path.abspath(path)
    with _snapshots_guard:
        _snapshots.pop(key, None)
        _snapshots[key] = snapshot
        while len(_snapshots) > _SNAPSHOTS_KEPT:
            del _snapshots[next(iter(_snapshots))]


def _cache_dir() -> Path | None:
    """Private to the user: the cache is trusted once its checksum and key match, so no one else
    may be able to write it (a BIDS root is often shared by a group)."""
    configured = os.environ.get("XNAT2BIDS_CACHE_DIR")
    if configured:
        return Path(configured) / "locks"
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home directory
        return None
    return base / "xnat2bids" / "locks"


def _cache_file(path: Path) -> Path | None:
    directory = _cache_dir()
    name = hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return None if directory is None else directory / f"{name}.bin"


def _load_cache(path: Path, data: bytes, digest: bytes) -> _Snapshot | None:
    """The cached snapshot of the lock whose bytes have `digest`, or None: never an error.

    Layout: magic, SHA-256 of the index, index length (8 bytes), index (marshalled), then the
    blobs back to back, each checked against its SHA-256 in the index.
    """
    file = _cache_file(path)
    if file is None:
        return None
    try:
        with open(file, "rb") as f:
            if os.name == "posix" and os.fstat(f.fileno()).st_uid != os.getuid():
                return None
            raw = f.read()
    except OSError:
        return None
    at = len(_CACHE_MAGIC)
    if raw[:at] != _CACHE_MAGIC or len(raw) < at + 40:
        return None
    index_sum, size = raw[at:at + 32], int.from_bytes(raw[at + 32:at + 40], "big")
    at += 40
    index = raw[at:at + size]
    if hashlib.sha256(index).digest() != index_sum:
        return None
    at += size
    try:
        version, cached_digest, header, keys, lengths, sums, spans = marshal.loads(index)
        if version != _CACHE_FORMAT or cached_digest != digest:
            return None
        if not isinstance(header, dict) or set(header) != set(_HEADER_FIELDS):
            return None
        if not len(keys) == len(lengths) == len(sums) // 32 or sum(lengths) != len(raw) - at:
            return None
        if spans is not None and len(spans) != 2 * len(keys):
            return None
        blobs, blob_sums = {}, {}
        sha256 = hashlib.sha256
        for i, (key, length) in enumerate(zip(keys, lengths)):
            blob, expected = raw[at:at + length], sums[32 * i:32 * i + 32]
            if sha256(blob).digest() != expected:
                return None
            blobs[key], blob_sums[key] = blob, expected
            at += length
        snapshot = _Snapshot(header, blobs, blob_sums, None, [data], known_digest=digest)
        if spans is not None:
            view = memoryview(data)
            snapshot.spans = {k: (spans[2 * i], spans[2 * i + 1]) for i, k in enumerate(keys)}
            snapshot.fragments = {k: view[start:end] for k, (start, end) in snapshot.spans.items()}
        return snapshot
    except Exception:  # anything unexpected in a cache means: not usable
        return None


def _cache_soon(path: Path, snapshot: _Snapshot) -> None:
    key = os.path.abspath(path)
    with _snapshots_guard:
        _unsaved[key] = (path, snapshot)
        due = time.monotonic() - _last_saved.get(key, float("-inf")) >= _CACHE_SAVE_INTERVAL
    if due:
        _save_unsaved(key)


def _save_unsaved(key: str | None = None) -> None:
    """Save the pending cache of one lock path, or of all (at exit)."""
    with _snapshots_guard:
        todo = [_unsaved.pop(key)] if key in _unsaved else [] if key is not None else list(_unsaved.values())
        if key is None:
            _unsaved.clear()
        for path, _ in todo:
            _last_saved[os.path.abspath(path)] = time.monotonic()
    for path, snapshot in todo:
        _save_cache(path, snapshot)


atexit.register(_save_unsaved)


def _save_cache(path: Path, snapshot: _Snapshot) -> None:
    """Best effort: a cache that cannot be written only costs the next reader time."""
    file = _cache_file(path)
    if file is None:
        return
    keys = tuple(snapshot.blobs)
    blobs = [snapshot.blobs[k] for k in keys]
    spans = None if snapshot.spans is None else tuple(n for k in keys for n in snapshot.spans[k])
    index = marshal.dumps(
        (_CACHE_FORMAT, snapshot.digest, snapshot.header, keys, tuple(map(len, blobs)),
         b"".join(snapshot.sums[k] for k in keys), spans)
    )
    tmp = file.with_name(f"{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            f.writelines([_CACHE_MAGIC, hashlib.sha256(index).digest(), len(index).to_bytes(8, "big"), index])
            f.writelines(blobs)
        os.replace(tmp, file)
        now = time.time()
        for old in file.parent.iterdir():  # caches of BIDS roots gone or long unused
            if old != file and now - old.stat().st_mtime > _CACHE_MAX_AGE:
                old.unlink()
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _current(path: Path) -> _Snapshot | None:
    """What the lock file at `path` holds now; None when there is none, LockfileError when invalid.

    The file is read only when its identity differs from the one this process last read or wrote:
    another writer's file replacing it (as this module, and editors, write) is a new inode, and
    one written in place has a new mtime and ctime (the same ones only within the same timestamp
    tick as our own write: a far shorter window than the serial check's own, read to rename).
    """
    try:
        with open(path, "rb") as f:
            identity = _identity(os.fstat(f.fileno()))  # before reading: a later change shows
            known = _snapshots.get(os.path.abspath(path))
            if known is not None and known.identity == identity:
                return known
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LockfileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    snapshot = _snapshot_of(path, data)
    snapshot.identity = identity
    return snapshot


def _snapshot_of(path: Path, data: bytes) -> _Snapshot:
    """What the lock file with these bytes holds; LockfileError when it is not a valid lock."""
    digest = hashlib.sha256(data).digest()
    known = _snapshots.get(os.path.abspath(path))
    if known is not None and known.digest == digest:
        return known
    snapshot = _load_cache(path, data, digest) if len(data) >= _CACHE_MIN_BYTES else None
    if snapshot is None:
        snapshot = _parse_file(path, data, digest)
        if len(data) >= _CACHE_MIN_BYTES:
            with _snapshots_guard:  # a cache pending from an earlier write of ours is older
                _unsaved.pop(os.path.abspath(path), None)
            _save_cache(path, snapshot)
    if len(data) >= _CACHE_MIN_BYTES:  # the cache file is current now: as good as just saved
        with _snapshots_guard:
            _last_saved[os.path.abspath(path)] = time.monotonic()
    _remember(path, snapshot)
    return snapshot


def _parse_file(path: Path, data: bytes, digest: bytes) -> _Snapshot:
    """The slow path: parse and validate the TOML."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LockfileError(f"{path}: not valid TOML: not UTF-8 text (byte {exc.start})") from exc
    with gc_paused():
        doc = _parse(text, str(path))
        sessions = doc["sessions"]
        blobs = {key: marshal.dumps(_canonical_session(sessions[key])) for key in sorted(sessions)}
    sums = {key: hashlib.sha256(blob).digest() for key, blob in blobs.items()}
    return _Snapshot({key: doc[key] for key in _HEADER_FIELDS}, blobs, sums, None, [data], known_digest=digest)


def _assemble(header: dict[str, Any], fragments: list[Any]) -> tuple[list[Any], list[tuple[int, int]]]:
    """The lock's bytes, in pieces, from its header and its sessions' fragments (in key order),
    with where each fragment landed. Joined, equal to `dumps_lock` of the lock, byte for byte."""
    if not fragments:
        return [(HEADER + tomli_w.dumps({**header, "sessions": {}})).encode()], []
    pieces: list[Any] = [(HEADER + tomli_w.dumps(header) + "\n").encode()]
    spans = []
    at = len(pieces[0])
    for fragment in fragments:
        if len(pieces) > 1:
            pieces.append(b"\n")
            at += 1
        pieces.append(fragment)
        spans.append((at, at + len(fragment)))
        at += len(fragment)
    return pieces, spans


# --- files -------------------------------------------------------------------------------------


def read_lock(root: Path) -> Lock | None:
    """The lock of a BIDS root, or None when there is none yet."""
    snapshot = _current(lock_path(root))
    return None if snapshot is None else snapshot.lock()


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
    on_disk = _current(path)  # raises on an invalid file: look at it, never overwrite it
    if expected_serial is not None:
        found = on_disk.header["serial"] if on_disk is not None else 0
        if found != expected_serial:
            raise LockfileError(
                f"the lock changed on disk since it was read (serial {expected_serial} → {found})",
                hint="another run wrote it; run plan again",
            )
        if on_disk is not None and on_disk.header["lineage"] != lock.lineage:
            raise LockfileError(
                f"the lock on disk is a different lock (lineage {on_disk.header['lineage']}, not {lock.lineage})",
                hint="another run replaced it; run plan again",
            )
    written = replace(lock, serial=lock.serial + 1, generator=GENERATOR)
    header = _header(written)
    sessions = _Sessions.of(lock.sessions)
    keys = sorted(sessions)
    blobs: dict[str, bytes] = {}
    sums: dict[str, bytes] = {}
    fragments: list[Any] = [None] * len(keys)
    changed: list[tuple[int, str, dict[str, Any], bytes | None]] = []  # (position, key, document, blob)
    unchecked: list[tuple[str, dict[str, Any]]] = []  # the changed documents not known valid
    with gc_paused():
        for i, key in enumerate(keys):
            blob = sessions.blob(key)
            on_file = blob is not None and on_disk is not None and on_disk.blobs.get(key) == blob
            if on_file and on_disk.fragments is not None:  # type: ignore[union-attr]
                fragments[i] = on_disk.fragments[key]  # type: ignore[union-attr]
                blobs[key], sums[key] = blob, on_disk.sums[key]  # type: ignore[assignment,union-attr]
                continue
            # A blob is a canonical document: no need to build the record to get it back.
            doc = marshal.loads(blob) if blob is not None else _session_document(sessions[key])
            changed.append((i, key, doc, blob))
            if not on_file:  # what the file holds was valid when read or written
                unchecked.append((key, doc))
        # Validated exactly as the whole document would be: the header, then each other session.
        problems = _schema_problems({**header, "sessions": {}})
        for key, doc in unchecked:
            problems += [p for p in _schema_problems({**header, "sessions": {key: doc}}) if p.startswith("sessions/")]
        if not problems:
            for key, doc in unchecked:
                problems += _consistency_problems({"sessions": {key: doc}})
        if problems:
            _raise_invalid(f"refusing to write an invalid lock to {path}", problems)
        for i, key, doc, blob in changed:
            fragments[i] = tomli_w.dumps({"sessions": {key: doc}}).encode()
            blobs[key] = blob if blob is not None else marshal.dumps(doc)
            sums[key] = hashlib.sha256(blobs[key]).digest()
        pieces, spans = _assemble(header, fragments)
    identity = _atomic_write(path, pieces)
    snapshot = _Snapshot(header, {k: blobs[k] for k in keys}, sums, dict(zip(keys, spans)), pieces,
                         dict(zip(keys, fragments)), identity)
    _remember(path, snapshot)
    if (spans[-1][1] if spans else 0) >= _CACHE_MIN_BYTES:
        _cache_soon(path, snapshot)
    # The returned lock knows which document each of its records is, for the next write.
    items, origin = dict(sessions._items), dict(sessions._origin)
    for _, key, _doc, _blob in changed:
        value = items[key]
        if type(value) is not bytes:
            origin[key] = (value, blobs[key], dict(value.config_digests), dict(value.tools))  # type: ignore[union-attr]
    return replace(written, sessions=_Sessions(items, origin))


def _atomic_write(path: Path, pieces: list[Any]) -> tuple[int, ...]:
    """Temp file in the same directory, fsync, rename over, fsync the directory. Returns the
    `_identity` of the file written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:  # the pieces are small: fewer system calls
                try:
                    os.chmod(tmp, path.stat().st_mode & 0o7777)  # keep a mode the user chose
                except FileNotFoundError:
                    pass
                f.writelines(pieces)
                f.flush()
                os.fsync(f.fileno())
                hit("lock-temp-written")
                os.replace(tmp, path)
                identity = _identity(os.fstat(f.fileno()))  # after the rename, which sets its ctime
            hit("lock-replaced")
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        fsync_dir(path.parent)
    except OSError as exc:
        raise LockfileError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return identity
