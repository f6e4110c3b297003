"""The state lock: one apply per BIDS root at a time.

A JSON file created with O_EXCL next to the lockfile records who holds it (user, host, pid),
what for and since when. A holder that died on this host is taken over with a warning.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from reconcile.errors import LockHeldError

STATE_LOCK_NAME = ".xnat2bids.lock.info"


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
        text = f"{self.operation} by {self.user}@{self.host} pid {self.pid} since {self.since} (lock ID {self.id})"
        if self.jobs:
            text += f", SLURM jobs {', '.join(self.jobs)}"
        return text


def state_lock_path(root: Path) -> Path:
    return root / STATE_LOCK_NAME


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_holder(root: Path) -> Holder | None:
    try:
        data = json.loads(state_lock_path(root).read_text())
        data["jobs"] = tuple(data.get("jobs", ()))
        return Holder(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise LockHeldError(
            f"the state lock {state_lock_path(root)} is unreadable: {exc}",
            hint="if no apply is running, remove it with `xnat2bids force-unlock`",
        ) from exc


def _write_new(path: Path, holder: Holder) -> bool:
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
    for _ in range(3):
        if _write_new(path, me):
            return me
        holder = read_holder(root)
        if holder is None:
            continue  # released between our attempts
        if holder.host == me.host and not holder.jobs and not _alive(holder.pid):
            warn(f"taking over the state lock left by a process that no longer exists: {holder.describe()}")
            _remove_if(root, holder.id)
            continue
        raise LockHeldError(
            f"another xnat2bids holds {root}: {holder.describe()}",
            hint=f"wait for it to finish; if it is gone for good, run `xnat2bids force-unlock {holder.id} {root}`",
        )
    raise LockHeldError(f"could not take the state lock of {root}")


def _remove_if(root: Path, lock_id: str) -> bool:
    holder = read_holder(root)
    if holder is None or holder.id != lock_id:
        return False
    state_lock_path(root).unlink(missing_ok=True)
    return True


def release(root: Path, holder: Holder) -> None:
    _remove_if(root, holder.id)


def record_jobs(root: Path, holder: Holder, jobs: tuple[str, ...]) -> Holder:
    """Hand the lock to a SLURM batch: the finalize job releases it."""
    updated = Holder(**{**asdict(holder), "jobs": jobs})
    tmp = state_lock_path(root).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(updated), indent=2, sort_keys=True))
    os.replace(tmp, state_lock_path(root))
    return updated


def force_unlock(root: Path, lock_id: str) -> Holder:
    holder = read_holder(root)
    if holder is None:
        raise LockHeldError(f"{root} is not locked")
    if holder.id != lock_id:
        raise LockHeldError(f"the state lock of {root} has ID {holder.id}, not {lock_id}", hint=holder.describe())
    state_lock_path(root).unlink(missing_ok=True)
    return holder


@contextmanager
def held(root: Path, operation: str, *, warn: Callable[[str], None] = lambda m: None) -> Iterator[Holder]:
    holder = acquire(root, operation, warn=warn)
    try:
        yield holder
    finally:
        release(root, holder)
