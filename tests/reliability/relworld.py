"""Shared pieces of the reliability suite: a served emulator world, the CLI as a real subprocess,
and snapshots of a BIDS root that compare "the same final bytes"."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from reconcile.demo import populate
from reconcile.emulator import Archive, EmulatorApp, serve_in_thread
from reconcile.emulator.dicomgen import DEFAULT_SERIES
from reconcile.lock import lock_path, read_lock

USER = "admin"
# A sentinel: the secrets tests look for this exact string everywhere the tool writes or passes on.
SENTINEL = "S3ntinel-Pa55w0rd-7f3a9c"
ONE_SERIES = tuple(s for s in DEFAULT_SERIES if s.description == "anat-T1w_acq-memprage")
SMALL = tuple(s for s in DEFAULT_SERIES if s.description in ("anat-T1w_acq-memprage", "func-bold_task-rest"))


@dataclass
class World:
    url: str
    archive: Archive
    app: EmulatorApp


@contextmanager
def served_world(sessions=(("01", "01_MR1", "2024-01-10"),), series=ONE_SERIES, password: str = SENTINEL) -> Iterator[World]:
    archive = Archive(site="XNAT")
    archive.add_user(USER, password)
    archive.add_project("PROJ", name="Reliability")
    if sessions:
        populate(archive, "PROJ", sessions, series=series)
    app = EmulatorApp(archive)
    with serve_in_thread(app) as url:
        yield World(url, archive, app)


def cli_env(url: str, password: str = SENTINEL, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XNAT_", "XNAT2BIDS_"))}
    env.update(XNAT_HOST=url, XNAT_USER=USER, XNAT_PASS=password, PYTHONUNBUFFERED="1", NO_COLOR="1")
    env.update(extra)
    return env


def xnat2bids(*args: str, url: str, cwd: Path, timeout: float = 180, **extra: str) -> subprocess.CompletedProcess:
    """The real command line in a process of its own (so it can be killed like a real one)."""
    return subprocess.run(
        [sys.executable, "-m", "reconcile", *args], cwd=cwd, env=cli_env(url, **extra),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
    )


def start_xnat2bids(*args: str, url: str, cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "reconcile", *args], cwd=cwd, env=cli_env(url, **extra),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def descendants_using(root: Path) -> list[int]:
    """PIDs of processes whose command line mentions `root` (e.g. a heudiconv orphaned by a SIGKILL)."""
    needle = os.fsencode(str(root))
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_leftovers(root: Path) -> int:
    """A SIGKILLed apply leaves its converter running (own session); a machine crash would not."""
    pids = descendants_using(root)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while descendants_using(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(pids)


WORK_ENTRIES = (".xnat2bids", ".xnat2bids.lock", ".xnat2bids.lock.info")


def bids_files(root: Path) -> dict[str, bytes]:
    """Every file of the dataset proper: the work area, the lock and its temp files excluded."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.split("/")[0].startswith(".xnat2bids"):
            continue
        if path.is_file():
            out[rel] = path.read_bytes()
    return out


def lock_content(root: Path) -> dict[str, object]:
    """The lock's sessions without what legitimately differs between two runs (export time, mtimes)."""
    lock = read_lock(root)
    if lock is None:
        return {}
    return {
        exp_id: replace(rec, exported_at="", outputs=tuple(replace(o, mtime_ns=0) for o in rec.outputs))
        for exp_id, rec in lock.sessions.items()
    }


def snapshot(root: Path) -> tuple[dict[str, bytes], dict[str, object]]:
    return bids_files(root), lock_content(root)


def lock_bytes(root: Path) -> bytes | None:
    p = lock_path(root)
    return p.read_bytes() if p.exists() else None
