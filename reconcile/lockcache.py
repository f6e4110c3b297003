"""What is known about lock files, so that they need not be read and parsed again: snapshots of
the files this process read or wrote, and a per-user cache file of each large lock. It only
accelerates: nothing is believed that does not match the file on disk now (`_current`). Besides,
it records which lock each root held when this user last saw it (`seen_lock`), so that a lock
gone with its file system's mount is noticed.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import marshal
import os
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconcile import __version__
from reconcile.errors import LockfileError
from reconcile.lockdoc import _HEADER_FIELDS, FORMAT_VERSION
from reconcile.lockparse import _parse_bytes, gc_paused

# What is known about a lock file is a `_Snapshot`, keyed by the SHA-256 of its exact bytes:
# kept in memory for the files this process read or wrote, and for large locks also saved in a
# cache file so the next process skips the TOML parser (seconds per thousand sessions). Nothing
# in a snapshot is believed unless its digest matches the file's bytes now, or the file is still
# the very one this process read or wrote (`_current`); a cache file that is damaged or foreign
# is ignored and the lock parsed and validated again. One of an older version of the file (another
# writer changed it) still vouches for each session whose fragment kept its exact bytes.


@dataclass(eq=False)
class _Snapshot:
    """What a valid lock file holds: the file whose bytes are `pieces`, joined."""

    header: dict[str, Any]  # as `lock._header` returns it
    blobs: dict[str, bytes]  # session key -> its canonical document, marshalled, in key order
    sums: dict[str, bytes]  # session key -> SHA-256 of its blob, to check the blob in a cache file
    # Session key -> (start, end) of its TOML fragment in the file; None when the file is not laid
    # out fragment by fragment (see `lockparse._by_session`).
    spans: dict[str, tuple[int, int]] | None
    pieces: list[Any]
    fragments: dict[str, Any] | None = None  # with spans: session key -> those bytes, in `pieces`
    identity: tuple[int, ...] | None = None  # `_identity` of the file as read or written; None: unknown
    known_digest: bytes | None = None  # SHA-256 of the bytes, once computed
    # With spans: session key -> SHA-256 of its fragment, once computed (`fragment_digests`).
    fragment_sums: dict[str, bytes] | None = None

    def locate(self, spans: dict[str, tuple[int, int]]) -> None:
        """Note where each session's fragment lies in the file's bytes, held in one piece."""
        view = memoryview(self.pieces[0])
        self.spans = spans
        self.fragments = {key: view[start:end] for key, (start, end) in spans.items()}

    def fragment_digests(self) -> dict[str, bytes] | None:
        """Session key -> SHA-256 of its fragment; None when the file is not laid out by session."""
        sums = self.fragment_sums or {}
        if self.spans is not None and len(sums) == len(self.spans):
            return sums
        if self.fragments is None:
            return None
        sha256 = hashlib.sha256
        self.fragment_sums = {key: sums.get(key) or sha256(fragment).digest()
                              for key, fragment in self.fragments.items()}
        return self.fragment_sums

    def sessions_known(self) -> dict[str, tuple[bytes, bytes, bytes]]:
        """Session key -> (SHA-256 of its fragment, its blob, SHA-256 of the blob): what a reader
        of a newer version of this file may take over for each fragment whose bytes are the same."""
        sums = self.fragment_digests()
        if sums is None:
            return {}
        return {key: (sums[key], self.blobs[key], self.sums[key]) for key in sums}

    @property
    def digest(self) -> bytes:
        if self.known_digest is None:
            digest = hashlib.sha256()
            for piece in self.pieces:
                digest.update(piece)
            self.known_digest = digest.digest()
        return self.known_digest


_snapshots: dict[str, _Snapshot] = {}  # by absolute lock path; the newest few only
_SNAPSHOTS_KEPT = 8
_snapshots_guard = threading.Lock()

# Below this size the TOML parser takes milliseconds: no cache file (nor clutter) for small locks.
_CACHE_MIN_BYTES = 1 << 20
# Bumped with the lock's format (a cache is read without the TOML parser's check of the lock's
# format_version, so an older xnat2bids must not take the newer one's caches for its own), and
# with the cache file's own layout. The version is in it too: the sessions a cache vouches for
# were validated by that release's rules.
_CACHE_MAGIC = f"xnat2bids lock cache 5 {__version__}\n".encode()
_CACHE_FORMAT = 5
_NONCE_BYTES = 16
_CACHE_SLACK = 1 << 20  # a cache file grown by this much beyond twice its live blobs is written anew
_CACHE_MAX_AGE = 30 * 86400  # cache files of BIDS roots unused this long are deleted
# Rewriting the cache costs about as much as the lock itself. apply writes the lock after every
# session, so during a burst the cache is saved at most this often, and at exit; a process killed
# in between leaves a stale cache, which only makes the next reader parse the sessions changed since.
_CACHE_SAVE_INTERVAL = 10.0
_unsaved: dict[str, tuple[Path, _Snapshot]] = {}
_last_saved: dict[str, float] = {}


@dataclass(frozen=True)
class _CacheFile:
    """A cache file as this process last read or wrote it: its `_identity`, its nonce, and where
    each blob in it lies, by the blob's SHA-256."""

    identity: tuple[int, ...]
    nonce: bytes
    where: dict[bytes, tuple[int, int]]


_cache_files: dict[str, _CacheFile] = {}  # by cache file path

# Which lock each BIDS root held when this user last read or wrote it, whatever its size: a line
# per root, kept far longer than the caches, so that a root found without its lock (a file system
# not mounted, an empty mount point) is told from a new dataset's place (`seen_lock`).
_SEEN_MAGIC = "xnat2bids-lock-seen-1"
_SEEN_MAX_AGE = 400 * 86400
_seen_noted: dict[str, tuple[str, int, str]] = {}  # lock path -> what this process last recorded


@dataclass(frozen=True)
class SeenLock:
    """The lock a root held when this user last read or wrote it (`date`: that UTC day)."""

    lineage: str
    serial: int
    date: str


def _remember(path: Path, snapshot: _Snapshot) -> None:
    key = os.path.abspath(path)
    with _snapshots_guard:
        _snapshots.pop(key, None)
        _snapshots[key] = snapshot
        while len(_snapshots) > _SNAPSHOTS_KEPT:
            del _snapshots[next(iter(_snapshots))]


def _remember_written(path: Path, snapshot: _Snapshot, size: int) -> None:
    """Note the file of `size` bytes this process just wrote at `path`; a large one gets cached."""
    _remember(path, snapshot)
    _note_seen(path, snapshot.header)
    if size >= _CACHE_MIN_BYTES:
        _cache_soon(path, snapshot)


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
    return None if directory is None else directory / f"{_cache_key(path)}.bin"


def _cache_key(path: Path) -> str:
    """A file name for what is cached about `path` (its absolute form)."""
    return hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _seen_file(path: Path) -> Path | None:
    """Beside the caches' folder, not in it: a record is kept for every root, small locks' too."""
    directory = _cache_dir()
    return None if directory is None else directory.with_name("roots") / f"{_cache_key(path)}.seen"


def seen_lock(path: Path) -> SeenLock | None:
    """What this user last saw at the lock path `path` (absolute or not, the file there or not),
    or None: one small file read, never an error."""
    file = _seen_file(path)
    if file is None:
        return None
    try:
        with open(file, "rb") as f:
            if not private(os.fstat(f.fileno())):
                return None
            magic, lineage, serial, date = f.read(512).decode().split()
        return SeenLock(lineage, int(serial), date) if magic == _SEEN_MAGIC else None
    except (OSError, ValueError):
        return None


def forget_seen(path: Path) -> None:
    """Drop the record of the lock at `path`: its root is to start anew (the demo's, made again)."""
    _seen_noted.pop(os.path.abspath(path), None)
    file = _seen_file(path)
    if file is not None:
        with contextlib.suppress(OSError):
            file.unlink()


def _note_seen(path: Path, header: dict[str, Any]) -> None:
    """Record the lock read or written at `path`; a write only when its lineage or the day changed
    (not on each commit of an apply: its serial is the day's first). Best effort: a record lost only
    leaves a later check without it."""
    record = (str(header["lineage"]), int(header["serial"]), time.strftime("%Y-%m-%d", time.gmtime()))
    key = os.path.abspath(path)
    if _seen_noted.get(key, ())[::2] == record[::2]:
        return
    _seen_noted[key] = record
    file = _seen_file(path)
    if file is None:
        return
    before = seen_lock(path)
    if before is not None and (before.lineage, before.date) == record[::2]:
        return
    tmp = file.with_name(f"{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(tmp, "x", opener=_private_opener) as f:
            f.write(" ".join((_SEEN_MAGIC, *map(str, record))) + "\n")
        os.replace(tmp, file)
        if before is None:  # a root new to this user, now and then: records of roots long unused go
            now = time.time()
            for old in file.parent.iterdir():
                if now - old.stat().st_mtime > _SEEN_MAX_AGE:
                    old.unlink()
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _read_cache(path: Path, digest: bytes, *, older: bool) -> _Snapshot | None:
    """The snapshot in the cache file of the lock at `path`, or None: never an error. With `older`,
    also one of another version of the file (see its digest): that holds no bytes, only what the
    file's sessions were, for `sessions_known`.

    Layout: magic, a random nonce of the file, blobs, then the index (marshalled) and a trailer:
    the index's length (8 bytes) and the SHA-256 of nonce and index. Each blob is checked against
    its SHA-256 in the index. A save appends the blobs it adds and a new index (`_append_cache`);
    what the last index does not name is left over from earlier versions. The nonce keeps a
    trailer-like run of bytes inside a blob (a lock's strings) from passing for the real one.
    """
    file = _cache_file(path)
    if file is None:
        return None
    for _ in range(3):  # read again a file that another process appended to meanwhile
        try:
            with open(file, "rb") as f:
                st = os.fstat(f.fileno())
                if not private(st):
                    return None
                raw = f.read()
        except OSError:
            return None
        found = _decoded_cache(raw, digest, older)
        if found is not None:
            snapshot, known = found
            with _snapshots_guard:
                _cache_files[str(file)] = replace(known, identity=_identity(st))
            return snapshot
        try:
            if _identity(os.stat(file)) == _identity(st):
                return None
        except OSError:
            return None
    return None


def _decoded_cache(raw: bytes, digest: bytes, older: bool) -> tuple[_Snapshot, _CacheFile] | None:
    """`_read_cache` of a cache file's bytes."""
    magic = len(_CACHE_MAGIC)
    first = magic + _NONCE_BYTES
    if raw[:magic] != _CACHE_MAGIC or len(raw) < first + 40:
        return None
    nonce = raw[magic:first]
    size = int.from_bytes(raw[-40:-32], "big")
    start = len(raw) - 40 - size
    if start < first:
        return None
    index = raw[start:-40]
    if hashlib.sha256(nonce + index).digest() != raw[-32:]:
        return None
    try:
        version, cached_digest, header, keys, offsets, lengths, sums, spans, fragment_sums = marshal.loads(index)
        if cached_digest != digest and not older:  # before the blobs are checked: most of the work
            return None
        if version != _CACHE_FORMAT or not isinstance(header, dict) or set(header) != set(_HEADER_FIELDS):
            return None
        if not isinstance(header["format_version"], int) or header["format_version"] > FORMAT_VERSION:
            return None  # written by a newer xnat2bids: the TOML parser says so
        if not len(keys) == len(offsets) == len(lengths) == len(sums) // 32:
            return None
        if (spans is None) != (fragment_sums is None):
            return None
        if spans is not None and (len(spans) != 2 * len(keys) or len(fragment_sums) != 32 * len(keys)):
            return None
        blobs, blob_sums, where = {}, {}, {}
        sha256 = hashlib.sha256
        for i, (key, at, length) in enumerate(zip(keys, offsets, lengths)):
            if at < first or length < 0 or at + length > start:
                return None
            blob, expected = raw[at:at + length], sums[32 * i:32 * i + 32]
            if sha256(blob).digest() != expected:
                return None
            blobs[key], blob_sums[key], where[expected] = blob, expected, (at, length)
        snapshot = _Snapshot(header, blobs, blob_sums, None, [], known_digest=cached_digest)
        if spans is not None:
            snapshot.spans = {k: (spans[2 * i], spans[2 * i + 1]) for i, k in enumerate(keys)}
            snapshot.fragment_sums = {k: fragment_sums[32 * i:32 * i + 32] for i, k in enumerate(keys)}
    except Exception:  # anything unexpected in a cache means: not usable
        return None
    return snapshot, _CacheFile((), nonce, where)


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
    with _snapshots_guard:
        known = _cache_files.pop(str(file), None)
    if known is not None and _append_cache(file, snapshot, known):
        return
    keys = tuple(snapshot.blobs)
    blobs = [snapshot.blobs[k] for k in keys]
    nonce = os.urandom(_NONCE_BYTES)
    offsets, at = [], len(_CACHE_MAGIC) + len(nonce)
    for blob in blobs:
        offsets.append(at)
        at += len(blob)
    index = _index(snapshot, keys, offsets, nonce)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(tmp, "xb", opener=_private_opener) as f:
            f.writelines([_CACHE_MAGIC, nonce, *blobs, *index])
            f.flush()
            os.replace(tmp, file)
            identity = _identity(os.fstat(f.fileno()))  # after the rename, which sets its ctime
        with _snapshots_guard:
            _cache_files[str(file)] = _CacheFile(identity, nonce, {snapshot.sums[k]: (o, len(b)) for k, o, b in
                                                                   zip(keys, offsets, blobs)})
        now = time.time()
        for old in file.parent.iterdir():  # caches of BIDS roots gone or long unused
            if old != file and now - old.stat().st_mtime > _CACHE_MAX_AGE:
                old.unlink()
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def private(st: os.stat_result) -> bool:
    """Whether a cache file is this user's alone: theirs, and writable by no one else. A file
    another member could rewrite (a cache folder a lab shares, a group umask) could say what the
    lock holds, or which outputs were verified, as they please."""
    return os.name != "posix" or (st.st_uid == os.getuid() and not st.st_mode & 0o022)


def _private_opener(path: str, flags: int) -> int:
    """For open(): a new cache file is made 0600, whatever the umask."""
    return os.open(path, flags, 0o600)


def _index(snapshot: _Snapshot, keys: tuple[str, ...], offsets: list[int], nonce: bytes) -> list[bytes]:
    """The index of `snapshot`'s blobs at `offsets`, and the trailer after it."""
    spans = None if snapshot.spans is None else tuple(n for k in keys for n in snapshot.spans[k])
    fragment_sums = snapshot.fragment_digests()
    index = marshal.dumps(
        (_CACHE_FORMAT, snapshot.digest, snapshot.header, keys, tuple(offsets),
         tuple(len(snapshot.blobs[k]) for k in keys), b"".join(snapshot.sums[k] for k in keys), spans,
         None if fragment_sums is None else b"".join(fragment_sums[k] for k in keys))
    )
    return [index, len(index).to_bytes(8, "big"), hashlib.sha256(nonce + index).digest()]


def _append_cache(file: Path, snapshot: _Snapshot, known: _CacheFile) -> bool:
    """Add to the cache file this process last read or wrote only the blobs it lacks, and a new
    index: apply saves the cache of a 74 MB lock every few sessions, and a read after another
    writer's change saves it too, each time for a session or two. False, the file left as it
    was, when it is not that one any more, another process is appending, more than half of it
    would be left over, or the write fails (a full disk): then it is written whole, or not."""
    keys = tuple(snapshot.blobs)
    try:
        fd = os.open(file, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            st = os.fstat(fd)
        except OSError:
            return False
        if _identity(st) != known.identity:
            return False
        where = dict(known.where)
        pieces, at = [], st.st_size
        for key in keys:
            if snapshot.sums[key] not in where:
                blob = snapshot.blobs[key]
                pieces.append(blob)
                where[snapshot.sums[key]] = (at, len(blob))
                at += len(blob)
        if at > 2 * sum(len(snapshot.blobs[k]) for k in keys) + _CACHE_SLACK:
            return False
        pieces += _index(snapshot, keys, [where[snapshot.sums[k]][0] for k in keys], known.nonce)
        try:
            at = st.st_size
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    written = os.pwrite(fd, view, at)
                    view, at = view[written:], at + written
            identity = _identity(os.fstat(fd))
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, st.st_size)  # the older version's cache again, not a torn one
            if isinstance(exc, OSError):
                return False
            raise
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    with _snapshots_guard:
        _cache_files[str(file)] = _CacheFile(identity, known.nonce, where)
    return True


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _current(path: Path) -> _Snapshot | None:
    """What the lock file at `path` holds now; None when there is none, LockfileError when invalid.

    The file is read only when its identity differs from the one this process last read or wrote:
    another writer's file replacing it (as `write_lock`, and editors, write) is a new inode, and
    one written in place has a new mtime and ctime (the same ones only within the same timestamp
    tick as our own write: a far shorter window than the serial check's own, read to rename).
    """
    try:
        with open(path, "rb") as f:
            identity = _identity(os.fstat(f.fileno()))  # before reading: a later change shows
            known = _snapshots.get(os.path.abspath(path))
            if known is not None and known.identity == identity:
                _note_seen(path, known.header)
                return known
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise LockfileError(f"cannot read {path}: {exc.strerror or exc}") from exc
    snapshot = _snapshot_of(path, data)
    snapshot.identity = identity
    _note_seen(path, snapshot.header)
    return snapshot


def _snapshot_of(path: Path, data: bytes) -> _Snapshot:
    """What the lock file with these bytes holds; LockfileError when it is not a valid lock."""
    digest = hashlib.sha256(data).digest()
    known = _snapshots.get(os.path.abspath(path))
    if known is not None and known.digest == digest:
        return known
    in_memory = known is not None and known.fragments is not None
    cached = _read_cache(path, digest, older=not in_memory) if len(data) >= _CACHE_MIN_BYTES else None
    if cached is not None and cached.digest == digest:
        snapshot = cached
        snapshot.pieces = [data]
        if snapshot.spans is not None:
            snapshot.locate(snapshot.spans)
    else:
        # Another writer changed the file (a colleague's apply, a hand edit, a pull): the sessions
        # whose fragments kept their bytes are taken from what was known of the file before.
        before = known if in_memory else cached
        snapshot = _parse_file(path, data, digest, before.sessions_known() if before is not None else None)
        if len(data) >= _CACHE_MIN_BYTES:
            with _snapshots_guard:  # a cache pending from an earlier write of ours is older
                _unsaved.pop(os.path.abspath(path), None)
            _save_cache(path, snapshot)
    if len(data) >= _CACHE_MIN_BYTES:  # the cache file is current now: as good as just saved
        with _snapshots_guard:
            _last_saved[os.path.abspath(path)] = time.monotonic()
    _remember(path, snapshot)
    return snapshot


def _parse_file(
    path: Path, data: bytes, digest: bytes, before: dict[str, tuple[bytes, bytes, bytes]] | None = None
) -> _Snapshot:
    """The slow path: parse and validate the TOML; of the sessions in `before` (see
    `_Snapshot.sessions_known`), only those whose fragment's bytes changed."""
    with gc_paused():
        fragments_before = {key: entry[0] for key, entry in before.items()} if before else None
        header, parsed, spans, fragment_sums = _parse_bytes(data, str(path), fragments_before)
        blobs, sums = {}, {}
        sha256 = hashlib.sha256
        for key in spans if spans is not None else parsed:  # both in key order
            blob = parsed.get(key)
            if blob is not None:
                blobs[key], sums[key] = blob, sha256(blob).digest()
            else:  # left out by `_parse_bytes`: the same bytes as before
                _, blobs[key], sums[key] = before[key]  # type: ignore[index]
    snapshot = _Snapshot(header, blobs, sums, None, [data], known_digest=digest, fragment_sums=fragment_sums)
    if spans is not None:
        snapshot.locate(spans)
    return snapshot
