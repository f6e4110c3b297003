"""Reading and writing the lockfile `.xnat2bids.lock`: what the last apply exported, per session.

Owns the `Lock`, its identity (lineage, serial) and the atomic, validate-before-write save, which
rewrites large locks incrementally (see "files" below); it never decides what to export, it only
records it. A session's document is `lockdoc`'s, parsing `lockparse`'s, validation `lockcheck`'s
and the verified read cache `lockcache`'s, which only accelerates: the TOML file stays the one
source of truth.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import marshal
import os
import secrets
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Union

import tomli_w

from reconcile import __version__
from reconcile.durable import fsync_dir, open_for_flock, take_mode
from reconcile.errors import LockConflictError, LockfileError, write_hint
from reconcile.failpoints import hit
from reconcile.forked import map_forked, split
from reconcile.lockcache import (
    _current,
    _identity,
    _remember_written,
    _Snapshot,
    seen_lock,
)
from reconcile.lockcheck import (
    _consistency_problems,
    _raise_invalid,
    _schema_problems,
    _sessions_valid,
)
from reconcile.lockdoc import (
    FORMAT_VERSION,
    TRAILER_BLOCK,
    _decoded,
    _normalized,
    _record,
    _session_document,
    scan_sort_key,
)
from reconcile.lockparse import _parse, _parse_bytes, gc_paused
from reconcile.model import BidsAddress, SessionRecord

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
# Fewest sessions to serialize for a forked child to pay off: tomli-w takes ~0.8 ms a session.
FORK_MIN_SERIALIZED = 250


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

    def recorded_outputs(self, experiment_id: str) -> tuple[str, list[tuple[str, int, str]]]:
        """A session's folder (`sub-X/ses-Y`) and the (path, size, sha256) of each of its outputs,
        in path order, read from its marshalled document where one is known: `check` reads 200,000
        outputs and no other field, a fifth of the cost of decoding every record (10,000 sessions:
        0.2 s instead of 1.1 s)."""
        sessions = self.sessions
        blob = sessions.blob(experiment_id) if isinstance(sessions, _Sessions) else None
        if blob is not None:
            doc = marshal.loads(blob)
            folder = BidsAddress(doc["bids_subject"], doc["bids_session"]).path
            return folder, [(o["path"], o["size"], o["sha256"]) for o in doc["outputs"]]
        rec = sessions[experiment_id]
        return rec.address.path, [(o.path, o.size, o.sha256) for o in rec.outputs]


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
            record = _decoded(marshal.loads(value))
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


def stale_temp_files(root: Path) -> list[Path]:
    """Temporary files of lock writes killed before their rename (`_atomic_write` names them)."""
    return sorted(Path(root).glob(f"{LOCK_NAME}.*.tmp"))


# --- document <-> Lock -------------------------------------------------------------------------


def _document(lock: Lock) -> dict[str, Any]:
    return {**_header(lock), "sessions": {key: _session_document(lock.sessions[key]) for key in sorted(lock.sessions)}}


def _header(lock: Lock) -> dict[str, Any]:
    """The document without its sessions, in the order `_document` writes it: always in the
    current format (sessions read from an older one are valid in it)."""
    return {
        "format_version": FORMAT_VERSION,
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


def _from_snapshot(snapshot: _Snapshot) -> Lock:
    """The lock a valid file holds, each session decoded from its blob on first access."""
    h = snapshot.header
    return Lock(
        lineage=h["lineage"],
        serial=h["serial"],
        generator=h["generator"],
        config_fingerprint=h["config_fingerprint"],
        sessions=_Sessions(dict(snapshot.blobs), {}),
        format_version=h["format_version"],
    )


# --- text --------------------------------------------------------------------------------------


def dumps_lock(lock: Lock) -> str:
    """Deterministic TOML: sessions by key, scans by numeric-aware ID, outputs by path."""
    with gc_paused():
        return HEADER + tomli_w.dumps(_document(lock)) + TRAILER_BLOCK.decode()


def loads_lock(text: str, source: str = "lock") -> Lock:
    with gc_paused():
        return _from_document(_parse(text, source))


# --- files -------------------------------------------------------------------------------------
#
# tomli-w's text for a lock is the header, then one self-contained fragment per session, joined
# by blank lines (`_assemble`; a test holds it to tomli_w.dumps of the whole document). And the
# schema has no rule across sessions, so a document is valid exactly when its header is and each
# session is. A write therefore serializes and validates only the sessions that changed since
# the lock on disk was read or written, and copies the other fragments from the file's bytes.


def _assemble(header: dict[str, Any], fragments: list[Any]) -> tuple[list[Any], list[tuple[int, int]]]:
    """The lock's bytes, in pieces, from its header and its sessions' fragments (in key order),
    with where each fragment landed. Joined, equal to `dumps_lock` of the lock, byte for byte."""
    if not fragments:
        return [(HEADER + tomli_w.dumps({**header, "sessions": {}})).encode(), TRAILER_BLOCK], []
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
    pieces.append(TRAILER_BLOCK)
    return pieces, spans


def read_lock(root: Path) -> Lock | None:
    """The lock of a BIDS root, or None when there is none yet."""
    snapshot = _current(lock_path(root))
    return None if snapshot is None else _from_snapshot(snapshot)


def vanished_lock(root: Path) -> str | None:
    """What is wrong when `root` (a folder or not) has no lock while this user read or wrote one
    there: most often its file system is not mounted, and an apply would export every session
    again onto the disk underneath. None when there is a lock, or none was ever seen there."""
    path = lock_path(root)
    if os.path.lexists(path):
        return None
    seen = seen_lock(path)
    if seen is None:
        return None
    return (f"{root} had a lock (serial {seen.serial} or later, read on {seen.date}) and has none now: "
            "is its file system mounted?")


def differing_sessions(root: Path, data: bytes, source: str) -> list[tuple[SessionRecord | None, SessionRecord | None]]:
    """(record in `data`, record in the lock of `root`) of each session recorded otherwise in the
    two (None where one lacks it); `data` is another version of the lock file (a commit's).
    LockfileError when `data` is not a valid lock. A session whose fragment has the same bytes in
    both is neither parsed nor decoded: comparing with a commit that differs in a few sessions
    costs a hash of each fragment, not a parse of 10,000 (seconds)."""
    snapshot = _current(lock_path(root))
    mine = _from_snapshot(snapshot).sessions if snapshot is not None else _Sessions({}, {})
    known = snapshot.fragment_digests() if snapshot is not None else None
    with gc_paused():
        parsed = _parse_bytes(data, source, known)
        theirs = parsed.spans.keys() if parsed.spans is not None else parsed.blobs.keys()
        pairs: list[tuple[SessionRecord | None, SessionRecord | None]] = []
        for key in sorted(theirs | mine.keys()):
            blob = parsed.blobs.get(key)
            if key in theirs and blob is None:  # the same bytes as in the lock of `root`
                continue
            ours = mine.blob(key) if key in mine else None
            if blob is not None and ours is not None and marshal.loads(blob) == marshal.loads(ours):
                continue  # other text, same content (marshal's bytes for equal documents may differ)
            old = _Sessions({key: blob}, {})[key] if blob is not None else None
            pairs.append((old, mine[key] if key in mine else None))
    return pairs


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
    with _writers_excluded(lock_path(root)):
        return _write_lock(root, lock, expected_serial)


@contextlib.contextmanager
def _writers_excluded(path: Path) -> Iterator[None]:
    """An exclusive flock on the lock file, held from reading it to renaming the new one over it,
    so that checking `expected_serial` and replacing the file are one step: a writer that read an
    older lock fails instead of overwriting a newer one. The state lock already keeps applies
    apart; this covers what it cannot (a finalize racing the merge of its batch, a holder taken
    over while alive). The file is replaced on every write, so the lock counts only once the
    flocked file is still the one at `path`. Best effort: none before the first write, nor where
    the file system has no flock (some NFS, Lustre mounts)."""
    for _ in range(10):
        try:
            fd = open_for_flock(path)
        except OSError:  # no lock yet, or unreadable (the write itself reports that)
            break
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                current = os.path.samestat(os.fstat(fd), os.stat(path))
            except OSError:
                break
            if current:
                yield
                return
        finally:
            os.close(fd)  # releases the flock
    yield


def _write_lock(root: Path, lock: Lock, expected_serial: int | None) -> Lock:
    path = lock_path(root)
    on_disk = _current(path)  # raises on an invalid file: look at it, never overwrite it
    if expected_serial is not None:
        found = on_disk.header["serial"] if on_disk is not None else 0
        if found != expected_serial:
            raise LockConflictError(
                f"the lock changed on disk since it was read (serial {expected_serial} → {found})",
                hint="another run wrote it; run plan again",
            )
        if on_disk is not None and on_disk.header["lineage"] != lock.lineage:
            raise LockConflictError(
                f"the lock on disk is a different lock (lineage {on_disk.header['lineage']}, not {lock.lineage})",
                hint="another run replaced it; run plan again",
            )
    written = replace(lock, serial=lock.serial + 1, generator=GENERATOR, format_version=FORMAT_VERSION)
    header = _header(written)
    sessions = _Sessions.of(lock.sessions)
    keys = sorted(sessions)
    blobs: dict[str, bytes] = {}
    sums: dict[str, bytes] = {}
    fragments: list[Any] = [None] * len(keys)
    fragment_sums: dict[str, bytes] = {}  # of the fragments copied, where known: for the cache
    changed: list[tuple[int, str, dict[str, Any], bytes | None]] = []  # (position, key, document, blob)
    unchecked: list[tuple[str, dict[str, Any]]] = []  # the changed documents not known valid
    with gc_paused():
        for i, key in enumerate(keys):
            blob = sessions.blob(key)
            on_file = blob is not None and on_disk is not None and on_disk.blobs.get(key) == blob
            if on_file and on_disk.fragments is not None:  # type: ignore[union-attr]
                fragments[i] = on_disk.fragments[key]  # type: ignore[union-attr]
                blobs[key], sums[key] = blob, on_disk.sums[key]  # type: ignore[assignment,union-attr]
                if on_disk.fragment_sums is not None and key in on_disk.fragment_sums:  # type: ignore[union-attr]
                    fragment_sums[key] = on_disk.fragment_sums[key]  # type: ignore[union-attr]
                continue
            # A blob is a canonical document: no need to build the record to get it back.
            doc = marshal.loads(blob) if blob is not None else _session_document(sessions[key])
            changed.append((i, key, doc, blob))
            if not on_file:  # what the file holds was valid when read or written
                unchecked.append((key, doc))
        # Each changed session is checked yes/no where it is serialized (in forked parts when
        # there are many); only if one fails is everything checked again in the whole
        # document's order (the header, then each session), for the messages.
        problems = _schema_problems({**header, "sessions": {}})
        items = [(key, doc) for _, key, doc, _ in changed]
        texts = None if problems else _fragment_texts(path, items, check=True)
        if texts is None:
            problems += _session_problems(unchecked)
            if problems:
                _raise_invalid(f"refusing to write an invalid lock to {path}", problems)
            texts = _fragment_texts(path, items, check=False)  # the yes/no check was stricter
            assert texts is not None
        for (i, key, doc, blob), text in zip(changed, texts):
            fragments[i] = text
            blobs[key] = blob if blob is not None else marshal.dumps(doc)
            sums[key] = hashlib.sha256(blobs[key]).digest()
        pieces, spans = _assemble(header, fragments)
    identity = _atomic_write(path, pieces)
    snapshot = _Snapshot(header, {k: blobs[k] for k in keys}, sums, dict(zip(keys, spans)), pieces,
                         dict(zip(keys, fragments)), identity, fragment_sums=fragment_sums)
    _remember_written(path, snapshot, spans[-1][1] if spans else 0)
    # The returned lock knows which document each of its records is, for the next write.
    items, origin = dict(sessions._items), dict(sessions._origin)
    for _, key, _doc, _blob in changed:
        value = items[key]
        if type(value) is not bytes:
            origin[key] = (value, blobs[key], dict(value.config_digests), dict(value.tools))  # type: ignore[union-attr]
    return replace(written, sessions=_Sessions(items, origin))


def _session_problems(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """What is wrong with these (key, session document), worded as for the whole lock."""
    problems = []
    for key, doc in docs:
        problems += [p for p in _schema_problems({"sessions": {key: doc}}) if p.startswith("sessions/")]
    if not problems:
        for key, doc in docs:
            problems += _consistency_problems({"sessions": {key: doc}})
    return problems


def _fragments(check: bool, items: Sequence[tuple[str, dict[str, Any]]]) -> list[bytes] | str | None:
    """tomli-w's fragment of each (key, session document); None if `check` and one of them is
    not a valid session; the key of one that is not Unicode text. Runs in forked children."""
    if check and not _sessions_valid(dict(items)):
        return None
    texts = []
    for key, doc in items:
        try:
            texts.append(tomli_w.dumps({"sessions": {key: doc}}).encode())
        except UnicodeEncodeError:  # a lone surrogate, e.g. from a file name that is not UTF-8
            return key
    return texts


def _fragment_texts(path: Path, items: list[tuple[str, dict[str, Any]]], check: bool) -> list[bytes] | None:
    """The fragment of each (key, session document), or None if `check` and one is invalid.
    Many sessions at once (a first write, a SLURM batch's finalize) are checked and serialized
    in forked parts, one per core (`forked`)."""
    parts = map_forked(partial(_fragments, check), split(items, FORK_MIN_SERIALIZED))
    if any(part is None for part in parts):
        return None
    for part in parts:
        if isinstance(part, str):
            try:
                tomli_w.dumps({"sessions": {part: dict(items)[part]}}).encode()
            except UnicodeEncodeError as exc:
                _raise_invalid(f"refusing to write an invalid lock to {path}",
                               [f"sessions/{part}: {exc.object[exc.start:exc.end]!r} is not Unicode text"])
    return [text for part in parts for text in part]


def _atomic_write(path: Path, pieces: list[Any]) -> tuple[int, ...]:
    """Temp file in the same directory, fsync, rename over, fsync the directory. Returns the
    `_identity` of the file written."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:  # the pieces are small: fewer system calls
                take_mode(f.fileno(), path)
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
        raise LockfileError(f"cannot write {path}: {exc.strerror or exc}", hint=write_hint(exc, path.parent)) from exc
    return identity
