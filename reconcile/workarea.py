"""The BIDS root's hidden work area, `.xnat2bids/`: staging, logs, journals, trash, history.

On the dataset's own file system, so a staged session enters the tree by rename.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from reconcile.durable import share_writes_with_group
from reconcile.errors import ConfigError, UnsafePathError
from reconcile.model import utc_now
from reconcile.naming import check_accession_id

WORK_DIR = ".xnat2bids"


def uncreatable(root: Path, layout: str) -> ConfigError | None:
    """Why apply would not create the missing BIDS root `root`; None when it exists or would be
    made. No more folders are made above it than the layout adds (a study's `<pi>/study-<study>/`
    and the export root with it in pi-study): beyond those, a missing folder is more likely a file
    system not mounted or a mistyped path than a new dataset's place."""
    import shlex

    missing = [p for p in (root, *root.parents) if not p.exists()]
    above = root.parents[len(missing) - 1] if missing else root
    if missing and not above.is_dir():
        return ConfigError(f"cannot create BIDS root {root}: {above} is not a folder")
    if len(missing) > (4 if layout == "pi-study" else 1):
        return ConfigError(f"BIDS root {root} cannot be created: {missing[-1]} does not exist",
                           hint="is its file system mounted? for a new dataset there, create the folder above it "
                                f"first (mkdir -p {shlex.quote(str(root.parent))})")
    return None


def unconvertible(root: Path) -> ConfigError | None:
    """Why no session could be converted into `root`: nipype reads the files dcm2niix wrote from
    its output split at whitespace, so every session would fail with an assertion deep in heudiconv."""
    if any(c.isspace() for c in os.path.abspath(root)):
        return ConfigError(f"BIDS root {root} has whitespace in its path, where heudiconv cannot convert",
                           hint="give it by a path without any: a link to it, e.g. `ln -s '/project/My Lab/bids' "
                                "~/lab-bids`, works")
    return None


_loosened: tuple[int, int] | None = None  # (the member's umask, the one set for a shared dataset)


def share_with_group(root: Path) -> None:
    """Where a lab group shares the dataset (its folder, or the nearest one above it that exists,
    setgid and group-writable: `chmod 2775`), make what this process creates there writable by the
    group too, whatever the member's umask: as git's core.sharedRepository=group does. Otherwise a
    member with umask 022 leaves folders (a session, the work area's logs and trash) that the next
    member's apply cannot write, nor put back after a crash. Files it rewrites or appends to (made
    0644 by an older version) are opened to the group as well: see `durable.share_writes_with_group`."""
    global _loosened
    shared = _group_shares(root)
    share_writes_with_group(shared)
    umask = os.umask(0)
    # One run walks several datasets (pi-study): one not shared gets the member's own umask back.
    own = _loosened[0] if _loosened is not None and umask == _loosened[1] else umask
    now = own & ~0o070 if shared else own
    os.umask(now)
    _loosened = (own, now) if now != own else None


def _group_shares(root: Path) -> bool:
    for folder in (root, *root.parents):
        try:
            mode = os.stat(folder).st_mode
        except FileNotFoundError:
            continue
        except OSError:
            return False
        return bool(mode & stat.S_ISGID and mode & stat.S_IWGRP)
    return False


def temp_folder(root: Path) -> Path | None:
    """`root/.xnat2bids/tmp`, made if missing: where files of the BIDS tree are written before
    their rename. What a kill leaves there the next apply's recovery removes; beside the file it
    would stay in the dataset (and in git). None where a link stands on the way or the folder
    cannot be made: the temp file then goes beside the file."""
    work = root / WORK_DIR
    folder = work / "tmp"
    if work.is_symlink() or folder.is_symlink():
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder


_safe_id = check_accession_id  # an XNAT accession ID names its files here


def work_path(root: Path, *parts: str) -> Path:
    """`root/.xnat2bids/<parts>`, refused when a symbolic link stands anywhere on the way.

    apply empties staging folders and appends to logs there: through a link it would delete or
    write files outside the dataset. The root itself may be a link (a dataset on other storage).
    """
    path = root
    for part in (WORK_DIR, *parts):
        path = path / part
        if path.is_symlink():
            raise UnsafePathError(
                f"{path} is a symbolic link; xnat2bids keeps its work area in real folders",
                hint="remove the link (apply would otherwise write, and empty folders, where it points)",
            )
        if not path.exists():
            break
    return root.joinpath(WORK_DIR, *parts)


@dataclass(frozen=True)
class WorkArea:
    """The BIDS root's hidden work area (same filesystem, so renames are atomic)."""

    root: Path

    @property
    def base(self) -> Path:
        return work_path(self.root)

    def staging(self, exp_id: str) -> Path:
        return work_path(self.root, "staging", _safe_id(exp_id))

    def log(self, exp_id: str) -> Path:
        return work_path(self.root, "logs", f"{_safe_id(exp_id)}.log")

    def trash(self, exp_id: str, *, dicom: bool = False) -> Path:
        """Where a commit puts the session folder (or, `dicom`, the kept DICOM) it replaces."""
        return work_path(self.root, "trash", _safe_id(exp_id) + (".dicom" if dicom else ""))

    def journal(self, exp_id: str) -> Path:
        return work_path(self.root, "journal", f"{_safe_id(exp_id)}.json")

    def kept(self, exp_id: str) -> Path:
        """Where a commit keeps the user's edits it would otherwise replace (one folder per commit)."""
        return work_path(self.root, "replaced", _safe_id(exp_id), utc_now().replace(":", ""))

    @property
    def history(self) -> Path:
        return work_path(self.root, "history.jsonl")


