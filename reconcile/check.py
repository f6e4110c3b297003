"""`xnat2bids check`: verify offline that the files on disk match what the lock records.

Reads only; the CLI decides the exit status from the returned report. A commit that a crash
interrupted (a journal in the work area) is judged as the next apply's recovery will settle it.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from reconcile.journal import as_recovered, located
from reconcile.localscan import Beneath, hash_files, root_stat
from reconcile.lock import Lock


class CheckCode(Enum):
    """What is wrong with a recorded output (`check --json` gives the value as `code`)."""

    MISSING = "missing"
    SIZE = "size"
    CONTENT = "content"  # --full: its sha256 is not the recorded one
    LINK_OUT = "link_outside_root"
    OUTSIDE_SESSION = "outside_session_folder"  # the lock records it outside its session's folder
    SHARED_FOLDER = "shared_session_folder"  # two sessions recorded at one folder (a hand edit)


@dataclass(frozen=True)
class CheckProblem:
    code: CheckCode
    experiment_id: str
    path: str  # the output's path in the root; the folder for SHARED_FOLDER
    message: str  # one line, as `check` prints it after "problem:"

    def as_json(self) -> dict[str, str]:
        return {"code": self.code.value, "session": self.experiment_id, "path": self.path, "message": self.message}


@dataclass(frozen=True)
class CheckReport:
    sessions: int
    outputs: int
    problems: tuple[CheckProblem, ...]
    pending: tuple[str, ...] = ()  # what the next apply settles: interrupted commits, leftovers

    @property
    def ok(self) -> bool:
        return not self.problems


CRLF_NOTE = " (its lines end in CRLF, as git's core.autocrlf writes them)"
_CRLF_READ_MAX = 1 << 24  # sidecars and tables; an image is never a text file


def _crlf_of(path: str, size: int, recorded: int) -> bool:
    """Whether the file is the recorded one with every LF turned into CRLF (a text file checked out
    by git with core.autocrlf): the size differs by its number of line ends."""
    if not recorded < size <= _CRLF_READ_MAX:
        return False
    try:
        with open(path, "rb") as f:
            data = f.read(_CRLF_READ_MAX + 1)
    except OSError:
        return False
    return data.count(b"\r\n") == size - recorded and b"\n" not in data.replace(b"\r\n", b"")


def _named(lock: Lock, exp_id: str) -> str:
    """A session as check's messages name it; its record is decoded only for these."""
    return f"{exp_id} {lock.sessions[exp_id].address}"


def check_outputs(root: Path, lock: Lock, *, full: bool = False) -> CheckReport:
    """Every recorded output must exist with its size (and, with `full`, its sha256)."""
    lock, moved, notes = as_recovered(root, lock)
    problems: list[CheckProblem] = []

    def problem(code: CheckCode, exp_id: str, path: str, what: str) -> None:
        problems.append(CheckProblem(code, exp_id, path, f"{_named(lock, exp_id)}: {what}"))

    to_hash: dict[str, tuple[str, str, str]] = {}
    total = 0
    beneath = Beneath(root)
    base = beneath.root + os.sep
    # Outputs come in path order, so a folder's come together: each folder is asked once whether
    # it is a link (one lookup per folder instead of a call per output).
    folder, linked = None, False
    at: dict[str, str] = {}  # session folder → the session recorded there
    with root_stat(beneath.root, follow_symlinks=False) as lstat:
        for exp_id in sorted(lock.sessions):
            session_folder, outputs = lock.recorded_outputs(exp_id)
            if session_folder in at:  # only a hand-edited lock has this
                problems.append(CheckProblem(CheckCode.SHARED_FOLDER, exp_id, session_folder,
                                        f"{at[session_folder]} and {exp_id} are both recorded at {session_folder}"))
            at[session_folder] = exp_id
            inside = session_folder + "/"
            for path, size, sha256 in outputs:
                total += 1
                if not path.startswith(inside):
                    problem(CheckCode.OUTSIDE_SESSION, exp_id, path, f"output {path} lies outside its session folder")
                where = located(path, moved) if moved else None
                try:
                    if where is not None:  # rolled back: judged where it waits, links and all
                        st = os.stat(where)
                    else:
                        st = lstat(path)
                        here = path.rpartition("/")[0]
                        if here != folder:
                            folder, linked = here, beneath.linked(here)
                        if linked or stat.S_ISLNK(st.st_mode):
                            outside = beneath.outside(path)
                            if outside is not None:
                                problem(CheckCode.LINK_OUT, exp_id, path, f"{path} is a link out of the BIDS root, to {outside}")
                                continue
                            st = os.stat(base + path)
                except OSError:
                    st = None
                if st is None or not stat.S_ISREG(st.st_mode):
                    problem(CheckCode.MISSING, exp_id, path, f"missing {path}")
                elif st.st_size != size:
                    crlf = CRLF_NOTE if _crlf_of(where or base + path, st.st_size, size) else ""
                    problem(CheckCode.SIZE, exp_id, path, f"size of {path} is {st.st_size}, lock says {size}{crlf}")
                elif full:
                    to_hash[where or base + path] = (exp_id, path, sha256)
    if to_hash:
        for path, digest in sorted(hash_files(to_hash).items()):
            exp_id, rel, expected = to_hash[path]
            if digest != expected:
                problem(CheckCode.CONTENT, exp_id, rel, f"content of {rel} differs from the lock (sha256)")
    return CheckReport(len(lock.sessions), total, tuple(problems), tuple(notes))
