"""The state lock: one apply per BIDS root at a time.

A JSON file next to the lockfile records who holds it (user, host, pid), what for and since
when; it appears complete or not at all (written to a temp file, then hard-linked into place,
which fails if the lock is held). A holder that died on this host is taken over with a warning.
Whoever removes or rewrites the file holds `flock` on it and checks that it is still the file
at that path, so a check-and-remove never removes a lock taken meanwhile by someone else.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from reconcile.durable import fsync_dir
from reconcile.errors import LockHeldError

STATE_LOCK_NAME = ".xnat2bids.lock.info"
UNREADABLE = "unreadable"  # the lock ID `force-unlock` takes to remove a lock file nobody can read
WRITE_GRACE = 3.0  # seconds: an unreadable lock file younger than this is still being written
_POLL = 0.05
_ATTEMPTS = 5
_MAX_SIZE = 1 << 20


@dataclass(frozen=True)
class Holder:
    id: str
    user: str
    host: str
    pid: int
    since: str
    operation: str
    jobs: tuple[str, ...] = field(default=())  # SLURM job IDs when a batch holds the lock

    def describe(self) -> str:
        if self.id == UNREADABLE:
            return f"an unknown holder (the lock file was unreadable, last written {self.since})"
        text = f"{self.operation} by {self.user}@{self.host} pid {self.pid} since {self.since} (lock ID {self.id})"
        if self.jobs:
            text += f", SLURM jobs {', '.join(self.jobs)}"
        return text


@dataclass(frozen=True)
class _Seen:
    """One look at the lock file: its holder, or why it could not be read."""

    holder: Holder | None
    problem: str | None  # set when holder is None
    mtime: float


def state_lock_path(root: Path) -> Path:
    return root / STATE_LOCK_NAME


def _utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse(fd: int) -> _Seen:
    st = os.fstat(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    content = os.read(fd, _MAX_SIZE)
    try:
        data = json.loads(content)
        data["jobs"] = tuple(data.get("jobs", ()))
        holder = Holder(**data)
        if not isinstance(holder.id, str) or not holder.id or type(holder.pid) is not int:
            raise ValueError(f"lock ID {holder.id!r} or pid {holder.pid!r} is not valid")
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return _Seen(None, str(exc) if content else "the file is empty", st.st_mtime)
    return _Seen(holder, None, st.st_mtime)


def _settled(fd: int) -> _Seen:
    """Read the open lock file, giving a writer that has not finished yet WRITE_GRACE to finish.

    Files this module writes appear complete, but a writer that creates the file and then fills
    it (an older xnat2bids, a filesystem without hard links) leaves a moment when it is empty.
    """
    deadline = time.monotonic() + WRITE_GRACE  # bounded even if the file server's clock runs ahead
    while True:
        seen = _parse(fd)
        if seen.holder is not None or time.time() - seen.mtime >= WRITE_GRACE or time.monotonic() >= deadline:
            return seen
        time.sleep(_POLL)


def _unreadable_error(root: Path, seen: _Seen) -> LockHeldError:
    return LockHeldError(
        f"the state lock {state_lock_path(root)} is unreadable ({seen.problem}; last written {_utc(seen.mtime)})",
        hint=f"if no xnat2bids is running on {root}, remove it with `xnat2bids force-unlock {UNREADABLE} {root}`",
    )


def _look(root: Path) -> _Seen | None:
    try:
        fd = os.open(state_lock_path(root), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _settled(fd)
    finally:
        os.close(fd)


def read_holder(root: Path) -> Holder | None:
    seen = _look(root)
    if seen is None:
        return None
    if seen.holder is None:
        raise _unreadable_error(root, seen)
    return seen.holder


def _open_for_flock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR)  # NFS emulates flock with fcntl locks: LOCK_EX wants a writable fd
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY)  # another user's file: a local flock works read-only


@contextmanager
def _pinned(root: Path) -> Iterator[_Seen | None]:
    """Hold `flock` on the lock file now at its path; None when there is none.

    Everyone who removes or replaces the file does so only inside this, so while it is held the
    file stays the one at the path. Waiting for the flock can outlast the file we opened; then
    we look again. The O_EXCL-like create is not inside it: creating needs the path to be free.
    """
    path = state_lock_path(root)
    while True:
        try:
            fd = _open_for_flock(path)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            mine = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                yield _settled(fd)
                return
        finally:
            os.close(fd)  # releases the flock



def _temp_with(path: Path, holder: Holder) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(holder), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _create(path: Path, holder: Holder) -> bool:
    """Make the lock file appear with its whole content, unless one exists; True if we made it."""
    tmp = _temp_with(path, holder)
    try:
        try:
            os.link(tmp, path)  # like O_EXCL: fails if the lock file exists
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            return _create_in_place(path, holder)  # no hard links here; readers wait out the gap
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return True


def _create_in_place(path: Path, holder: Holder) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        json.dump(asdict(holder), fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def acquire(root: Path, operation: str, *, warn: Callable[[str], None] = lambda m: None) -> Holder:
    path = state_lock_path(root)
    me = Holder(
        id=uuid.uuid4().hex[:12],
        user=getpass.getuser(),
        host=socket.gethostname(),
        pid=os.getpid(),
        since=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        operation=operation,
    )
    for _ in range(_ATTEMPTS):
        if _create(path, me):
            return me
        seen = _look(root)
        if seen is None:
            continue  # released between our attempts
        if seen.holder is None:
            raise _unreadable_error(root, seen)
        holder = seen.holder
        if holder.host == me.host and not holder.jobs and not _alive(holder.pid):
            if _remove_if(root, lambda s, dead=holder: s.holder == dead):
                warn(f"taking over the state lock left by a process that no longer exists: {holder.describe()}")
            continue  # removed by us or by another process taking it over: try to create ours
        raise LockHeldError(
            f"another xnat2bids holds {root}: {holder.describe()}",
            hint=f"wait for it to finish; if it is gone for good, run `xnat2bids force-unlock {holder.id} {root}`",
        )
    raise LockHeldError(f"could not take the state lock of {root}: it kept changing hands", hint="try again")


def _remove_if(root: Path, still: Callable[[_Seen], bool]) -> bool:
    """Remove the lock file if, with nobody else able to touch it, `still` holds for it."""
    with _pinned(root) as seen:
        if seen is None or not still(seen):
            return False
        os.unlink(state_lock_path(root))
        return True


def release(root: Path, holder: Holder) -> None:
    _remove_if(root, lambda s: s.holder is not None and s.holder.id == holder.id)


def record_jobs(root: Path, holder: Holder, jobs: tuple[str, ...]) -> Holder:
    """Hand the lock to a SLURM batch: the finalize job releases it."""
    path = state_lock_path(root)
    updated = Holder(**{**asdict(holder), "jobs": jobs})
    with _pinned(root) as seen:
        if seen is None or seen.holder is None or seen.holder.id != holder.id:
            now = "nobody" if seen is None else seen.holder.describe() if seen.holder else "an unreadable lock file"
            raise LockHeldError(
                f"the state lock of {root} is no longer ours (lock ID {holder.id}); it is held by {now}",
                hint="someone ran `xnat2bids force-unlock`; the SLURM jobs were not handed the lock",
            )
        tmp = _temp_with(path, updated)
        try:
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    fsync_dir(root)
    return updated


def force_unlock(root: Path, lock_id: str) -> Holder:
    """Remove the state lock whose ID is `lock_id`; `UNREADABLE` removes a lock file nobody can read.

    An unreadable file (a crash while writing it) has no ID to name, so only the word
    `unreadable` removes it, and that word removes nothing else.
    """
    with _pinned(root) as seen:
        if seen is None:
            raise LockHeldError(f"{root} is not locked")
        if seen.holder is None:
            if lock_id != UNREADABLE:
                error = _unreadable_error(root, seen)
                raise LockHeldError(f"the state lock of {root} has no readable ID: {error.summary}", hint=error.hint)
            holder = Holder(id=UNREADABLE, user="?", host="?", pid=0, since=_utc(seen.mtime), operation="?")
        elif seen.holder.id != lock_id:
            raise LockHeldError(
                f"the state lock of {root} has ID {seen.holder.id}, not {lock_id}", hint=seen.holder.describe()
            )
        else:
            holder = seen.holder
        os.unlink(state_lock_path(root))
        return holder


@contextmanager
def held(root: Path, operation: str, *, warn: Callable[[str], None] = lambda m: None) -> Iterator[Holder]:
    holder = acquire(root, operation, warn=warn)
    try:
        yield holder
    finally:
        release(root, holder)
