"""The state lock: one apply per BIDS root at a time.

A JSON file next to the lockfile records who holds it (user, host, pid and, on Linux, what tells
its process apart from a later one with the same pid), what for and since when; it appears
complete or not at all (written to a temp file, then hard-linked into place, which fails if the
lock is held). A holder that is certainly dead is taken over with a warning; one that may be
running, or whose fate cannot be told from here, is left to `force-unlock`.
Whoever removes or rewrites the file holds `flock` on it and checks that it is still the file
at that path, so a check-and-remove never removes a lock taken meanwhile by someone else.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import socket
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

from reconcile.durable import fsync_dir, open_for_flock
from reconcile.errors import ConfigError, LockHeldError, XnatBidsError, write_hint
from reconcile.model import login_name

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
    # What names the process beyond host and pid (Linux; None where it could not be read, and
    # absent from records written elsewhere or by older versions): a pid is only meaningful in
    # its boot and PID namespace, and a start time only in its boot and time namespace.
    boot_id: str | None = None  # /proc/sys/kernel/random/boot_id
    pidns: int | None = None  # inode of /proc/self/ns/pid
    timens: int | None = None  # inode of /proc/self/ns/time; None also before Linux 5.6
    start_time: int | None = None  # field 22 of /proc/PID/stat: clock ticks after boot

    def describe(self) -> str:
        if self.id == UNREADABLE:
            return f"an unknown holder (the lock file was unreadable, last written {self.since})"
        if self.jobs and self.operation not in (FINALIZE, FINALIZE_JOB):  # its submitter is long gone: the batch holds it
            return (f"SLURM batch {self.id} ({self.operation} by {self.user}@{self.host} since {self.since}), "
                    f"SLURM jobs {', '.join(self.jobs)}")
        return f"{self.operation} by {self.user}@{self.host} pid {self.pid} since {self.since} (lock ID {self.id})"


_TYPES = {"boot_id": str, "pidns": int, "timens": int, "start_time": int}  # the Linux fields of a Holder
_IDENTITY = tuple(_TYPES)
_FIELDS = frozenset(f.name for f in fields(Holder))


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
    """Whether process `pid` runs: a zombie (killed, not yet reaped by its parent) does not; it
    holds nothing and no signal ends it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat's fields from the third (the state) on; [] if /proc cannot tell (or it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        # The command name (field 2) is in parentheses and may itself contain ") ".
        return stat[stat.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return []


def _zombie(pid: int) -> bool:
    return _stat_fields(pid)[:1] == [b"Z"]


def _started(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot; None if /proc cannot tell (or it is gone)."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19])
    except (ValueError, IndexError):
        return None


def _ns_inode(kind: str) -> int | None:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except OSError:
        return None


def _identity() -> dict[str, str | int | None]:
    """This process's boot, PID and time namespaces and start time, as a holder records them."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot_id: str | None = fh.read().strip() or None
    except OSError:
        boot_id = None
    try:
        # A /proc mounted for another PID namespace (`unshare --pid` without --mount-proc, some
        # containers) shows other processes under those numbers: no pid can be looked up in it.
        proc_is_ours = int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        proc_is_ours = False
    if not proc_is_ours:
        return {"boot_id": boot_id}
    return {"boot_id": boot_id, "pidns": _ns_inode("pid"), "timens": _ns_inode("time"), "start_time": _started(os.getpid())}


def _booted_at() -> float | None:
    try:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):
        return None


def _since(holder: Holder) -> float | None:
    try:
        return datetime.strptime(holder.since, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    except (TypeError, ValueError):
        return None


class _Fate(Enum):
    GONE = "gone"  # certainly dead: its lock may be taken over
    RUNNING = "running"  # provably the very process that took the lock, still running here
    UNKNOWN = "unknown"  # on another host, held by SLURM jobs, or cannot be told from here


def _fate(holder: Holder, me: Holder) -> tuple[_Fate, str]:
    """Whether the process that took the lock is gone, running, or neither; and why, for the user.

    Only a holder on this host (and, on Linux, this boot and PID namespace) can be looked up.
    Records without the Linux fields (older versions, other systems) get the old rule: gone
    when the pid is; a live pid then proves nothing, as it may have been reused.
    """
    if holder.jobs or holder.host != me.host:
        return _Fate.UNKNOWN, ""
    pid = holder.pid
    if all(getattr(holder, name) is None for name in _IDENTITY):
        if not _alive(pid):
            return _Fate.GONE, f"pid {pid} is gone"
        return _Fate.UNKNOWN, ""
    if holder.boot_id is not None and me.boot_id is not None and holder.boot_id != me.boot_id:
        booted, since = _booted_at(), _since(holder)
        if booted is not None and since is not None and since < booted:
            return _Fate.GONE, "this machine has restarted since"
        return _Fate.UNKNOWN, (
            f"xnat2bids cannot tell whether it still runs: it names host {holder.host} but another boot "
            f"(boot ID {holder.boot_id}), and took the lock after this machine started, so it may be "
            f"another machine with the same hostname"
        )
    unread = [what for name, what in (("boot_id", "boot ID"), ("pidns", "PID namespace"))
              if getattr(holder, name) is None or getattr(me, name) is None]
    if unread:
        return _Fate.UNKNOWN, (
            f"xnat2bids cannot tell whether it still runs: the {' and '.join(unread)} of the holder or of "
            f"this process could not be read, and pid {pid} alone may name another process"
        )
    if holder.pidns != me.pidns:
        return _Fate.UNKNOWN, (
            f"xnat2bids cannot tell whether it still runs: it runs in another PID namespace on this host "
            f"(another container, or `unshare --pid`), where pid {pid} cannot be looked up from here"
        )
    started = _started(pid)
    if started is None:
        if not _alive(pid):
            return _Fate.GONE, f"pid {pid} is gone"
        return _Fate.UNKNOWN, (
            f"xnat2bids cannot tell whether it still runs: pid {pid} exists but /proc/{pid}/stat cannot be "
            f"read (/proc mounted with hidepid?), so it cannot be told from a later process with that pid"
        )
    if holder.start_time is None or holder.timens != me.timens:
        # A start time is shown shifted by the reader's time namespace: compare only within one.
        return _Fate.UNKNOWN, (
            f"xnat2bids cannot tell whether it still runs: pid {pid} exists but its start time "
            + ("was not recorded" if holder.start_time is None else "was recorded in another time namespace")
            + ", so it cannot be told from a later process with that pid"
        )
    if started != holder.start_time:
        return _Fate.GONE, f"pid {pid} now belongs to another process"
    return _Fate.RUNNING, ""


def _parse(fd: int) -> _Seen:
    st = os.fstat(fd)
    os.lseek(fd, 0, os.SEEK_SET)
    content = os.read(fd, _MAX_SIZE)
    try:
        data = json.loads(content)
        data["jobs"] = tuple(data.get("jobs", ()))
        # Fields a newer version adds are left out: the holder is still known by the rest.
        holder = Holder(**{name: value for name, value in data.items() if name in _FIELDS})
        if not isinstance(holder.id, str) or not holder.id or type(holder.pid) is not int:
            raise ValueError(f"lock ID {holder.id!r} or pid {holder.pid!r} is not valid")
        for name, kind in _TYPES.items():
            value = getattr(holder, name)
            if value is not None and type(value) is not kind:
                raise ValueError(f"{name} {value!r} is not valid")
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


def _folder_error(path: Path) -> LockHeldError:
    return LockHeldError(f"{path} is a folder, not xnat2bids' state lock",
                         hint="nothing of xnat2bids makes it: move it out of the dataset")


def _not_a_folder(fd: int, path: Path) -> None:
    if stat.S_ISDIR(os.fstat(fd).st_mode):  # opened read-only, a folder opens
        raise _folder_error(path)


def _look(root: Path) -> _Seen | None:
    try:
        fd = os.open(state_lock_path(root), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        _not_a_folder(fd, state_lock_path(root))
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


def working_holder(root: Path) -> Holder | None:
    """Who holds the root's state lock, unless that process is certainly gone; for the read-only
    commands to say that what they show may change under them. Never raises."""
    try:
        seen = _look(root)
    except (OSError, KeyError, XnatBidsError):
        return None
    if seen is None or seen.holder is None:
        return None
    return None if gone(seen.holder) else seen.holder


def gone(holder: Holder) -> str | None:
    """Why the process that took the lock is certainly gone (killed, or its machine restarted), so
    that the next command to want the lock takes it over; None while it may still run. Never raises."""
    try:
        fate, why = _fate(holder, _me("look"))
    except (OSError, KeyError, XnatBidsError):  # KeyError: getpass without a passwd entry (a container)
        return None
    return why if fate is _Fate.GONE else None


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
            fd = open_for_flock(path)
        except FileNotFoundError:
            yield None
            return
        except IsADirectoryError:
            raise _folder_error(path) from None
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



def _record(holder: Holder) -> dict:
    """The holder as JSON; fields that could not be read are left out, as older versions did."""
    data = asdict(holder)
    for name in _IDENTITY:
        if data[name] is None:
            del data[name]
    return data


def _temp_with(path: Path, holder: Holder) -> Path:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(_record(holder), fh, indent=2, sort_keys=True)
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
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(_record(holder), fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _me(operation: str) -> Holder:
    return Holder(
        id=uuid.uuid4().hex[:12],
        user=login_name(),
        host=socket.gethostname(),
        pid=os.getpid(),
        since=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        operation=operation,
        **_identity(),
    )


def acquire(root: Path, operation: str, *, warn: Callable[[str], None] = lambda m: None) -> Holder:
    path = state_lock_path(root)
    me = _me(operation)
    _exclude_from_git(root)  # before the file exists: a kill right after its creation leaves it excluded
    for _ in range(_ATTEMPTS):
        try:
            made = _create(path, me)
        except OSError as exc:  # a read-only root, a full disk: not a temp file's problem
            raise ConfigError(f"cannot take the state lock of {root}: {exc.strerror or exc}",
                              hint=write_hint(exc, root, "xnat2bids writes its lock files in the BIDS root: it must "
                                                         "be writable by this user")) from exc
        if made:
            return me
        seen = _look(root)
        if seen is None:
            continue  # released between our attempts
        if seen.holder is None:
            raise _unreadable_error(root, seen)
        holder = seen.holder
        fate, why = _fate(holder, me)
        if fate is _Fate.GONE:
            if _remove_if(root, lambda s, dead=holder: s.holder == dead):
                warn(f"taking over the state lock left by a process that no longer exists ({why}): {holder.describe()}")
            continue  # removed by us or by another process taking it over: try to create ours
        raise LockHeldError(
            f"another xnat2bids holds {root}: {holder.describe()}",
            detail=why or None,
            hint=f"wait for it to finish; if it is gone for good, run `xnat2bids force-unlock {holder.id} {root}`",
        )
    raise LockHeldError(f"could not take the state lock of {root}: it kept changing hands", hint="try again")


def _exclude_from_git(root: Path) -> None:
    """Keep the state lock out of `git add -A` when the root lies in a git work tree: committed
    after a crash and pulled elsewhere, it would hold every clone on other hosts until a
    force-unlock. The pattern has no slash, so it matches at any depth: a root below the
    repository's top (several datasets in one repository, the pi-study layout) needs no prefix,
    which would have to be escaped for git's glob syntax, and the line stays right when the
    dataset's folder is renamed or moved within the repository."""
    from reconcile.vcs import exclude_locally

    exclude_locally(root, STATE_LOCK_NAME, "xnat2bids' state lock: held while a command runs, never committed")


def _remove_if(root: Path, still: Callable[[_Seen], bool]) -> bool:
    """Remove the lock file if, with nobody else able to touch it, `still` holds for it."""
    with _pinned(root) as seen:
        if seen is None or not still(seen):
            return False
        os.unlink(state_lock_path(root))
        return True


def release(root: Path, holder: Holder) -> None:
    _remove_if(root, lambda s: s.holder is not None and s.holder.id == holder.id)


def _rewrite(path: Path, holder: Holder) -> None:
    """Replace the lock file with `holder`'s record; the caller holds `_pinned`."""
    tmp = _temp_with(path, holder)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
        _rewrite(path, updated)
    fsync_dir(root)
    return updated


@contextmanager
def asking(root: Path, holder: Holder) -> Iterator[None]:
    """Say in the lock file, while its holder waits for its user at a confirmation prompt, since
    when: a run refused meanwhile (a cron job) names what keeps the lock. Said in its operation,
    which every version shows as it is (a field of its own would make the file unreadable to older
    ones, whose hint then offers `force-unlock unreadable`). Best effort."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    waiting = f"{holder.operation} (waiting since {since} for its user to answer its confirmation prompt)"
    _mark(root, holder, replace(holder, operation=waiting))
    try:
        yield
    finally:
        _mark(root, holder, holder)


def _mark(root: Path, holder: Holder, updated: Holder) -> None:
    try:
        with _pinned(root) as seen:
            if seen is not None and seen.holder is not None and seen.holder.id == holder.id:
                _rewrite(state_lock_path(root), updated)
    except OSError:  # a full disk, say: the prompt goes on, the lock file says less
        pass


FINALIZE, FINALIZE_JOB = "finalize", "finalize-job"  # the operations of a batch's claimed lock


def claim(root: Path, lock_id: str, operation: str) -> Holder:
    """Make this process the holder of the lock `lock_id` (a SLURM batch's), keeping its ID and
    jobs, so that one process at a time finalizes the batch: its finalize job (`FINALIZE_JOB`),
    or after it `xnat2bids finalize` or an apply merging it (`FINALIZE`). An earlier `FINALIZE`
    claim stands while its process may still run; a `FINALIZE_JOB` claim is over, as callers
    claim only once the batch's jobs have ended."""
    path = state_lock_path(root)
    me = _me(operation)
    with _pinned(root) as seen:
        holder = seen.holder if seen is not None else None
        if holder is None or holder.id != lock_id:
            now = "nobody" if seen is None else holder.describe() if holder else "an unreadable lock file"
            raise LockHeldError(f"the state lock of {root} is no longer batch {lock_id}'s; it is held by {now}")
        if holder.operation == FINALIZE:
            fate, why = _fate(replace(holder, jobs=()), me)  # its batch's jobs have ended: only its process counts
            if fate is not _Fate.GONE:
                raise LockHeldError(
                    f"batch {lock_id} of {root} is being finalized by {holder.describe()}",
                    detail=why or None,
                    hint=f"wait for it to finish; if it is gone for good, run `xnat2bids force-unlock {lock_id} {root}`",
                )
        claimed = replace(me, id=holder.id, jobs=holder.jobs)
        _rewrite(path, claimed)
    fsync_dir(root)
    return claimed


def force_unlock(root: Path, lock_id: str) -> Holder:
    """Remove the state lock whose ID is `lock_id`; `UNREADABLE` removes a lock file nobody can read.

    An unreadable file (a crash while writing it) has no ID to name, so only the word
    `unreadable` removes it, and that word removes nothing else. A holder this process can see
    still running (same host, boot and PID namespace, same pid and start time) is not removed:
    stopping it releases the lock, or leaves one the next apply takes over.
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
            # A finalizer that claimed a batch's lock keeps the batch's job IDs: judged by its process.
            probe = replace(holder, jobs=()) if holder.operation in (FINALIZE, FINALIZE_JOB) else holder
            if _fate(probe, _me("force-unlock"))[0] is _Fate.RUNNING:
                raise LockHeldError(
                    f"the state lock of {root} is held by a process that is still running: {holder.describe()}",
                    hint=(f"stop it (`kill {holder.pid}` on {holder.host})" if holder.user == login_name() else
                          f"ask {holder.user} to stop it (`kill {holder.pid}` on {holder.host}), or an administrator")
                    + ": it releases the lock as it ends, and if it is killed before it can, the next apply takes the "
                      "lock over; no force-unlock is needed",
                )
        os.unlink(state_lock_path(root))
        return holder


@contextmanager
def held(root: Path, operation: str, *, warn: Callable[[str], None] = lambda m: None) -> Iterator[Holder]:
    holder = acquire(root, operation, warn=warn)
    try:
        yield holder
    finally:
        release(root, holder)
