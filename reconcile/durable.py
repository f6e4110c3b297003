"""Making renames and new files survive a power loss: the one place that fsyncs directories. Also
the one way to open a file for flock, and the one rule for the mode of a file rewritten or appended
to in a root a lab group shares."""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path

from reconcile.failpoints import hit

_group_shares = False  # see `share_writes_with_group`


def share_writes_with_group(shared: bool) -> None:
    """Whether this process writes into a BIDS root its lab group shares (`workarea.share_with_group`
    tells): the files it rewrites or appends to are then made group-writable, as new ones are."""
    global _group_shares
    _group_shares = shared


def _for_group(mode: int) -> int:
    """`mode` plus group write where the group shares the root and may read the file (one made
    0600 on purpose, as a token's record is, stays so); no other bit is added or taken away."""
    return mode | stat.S_IWGRP if _group_shares and mode & stat.S_IRGRP else mode


def open_to_group(fd: int) -> None:
    """Give the open file `_for_group`'s mode: one that an older version, or a member's umask, made
    0644 would keep the other members from writing it. Best effort: only its owner may chmod a
    file, and another member's is left as it is."""
    try:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
        if _for_group(mode) != mode:
            os.fchmod(fd, _for_group(mode))
    except OSError:
        pass


def take_mode(fd: int, path: Path) -> None:
    """Give the temp file `fd`, about to replace `path`, the mode `path` has (one the user chose),
    else the one it was made with; plus group write where the group shares the root (`_for_group`)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = stat.S_IMODE(os.fstat(fd).st_mode)
    os.fchmod(fd, _for_group(mode))


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk; best effort where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(top: Path) -> None:
    """Flush every regular file and directory below `top` (symlinks are not followed)."""
    for dirpath, _dirs, files in os.walk(top):
        for name in files:
            path = Path(dirpath, name)
            if not path.is_symlink():
                fsync_file(path)
        fsync_dir(Path(dirpath))


def write_atomic(path: Path, text: str, *, mode: int = 0o666, temps: Path | None = None) -> None:
    """Replace `path` by `text`: readers see the old file or the new one, whole, and the new one
    survives a power loss (temp file, fsync, rename, fsync the folder). The temp file is made in
    `temps` (on the same file system; see `workarea.temp_folder`), else beside `path`.

    A new file gets `mode` less the umask; an existing file keeps the mode it has (both plus group
    write in a root the group shares: `take_mode`).
    """
    tmp = (temps if temps is not None else path.parent) / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            take_mode(handle.fileno(), path)
            handle.flush()
            os.fsync(handle.fileno())
        hit(f"atomic-temp-written:{path.name}")
        try:
            os.replace(tmp, path)
        except OSError as exc:
            if exc.errno != errno.EXDEV or temps is None:
                raise
            tmp.unlink(missing_ok=True)  # `path` is on another file system: write beside it
            write_atomic(path, text, mode=mode)
            return
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def open_for_flock(path: Path) -> int:
    """A descriptor of `path` to flock: writable where allowed (NFS emulates flock with fcntl locks,
    which want a writable descriptor for LOCK_EX), else read-only (another user's file, a
    read-only mount: a local flock works so)."""
    flags = getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, os.O_RDWR | flags)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
    return os.open(path, os.O_RDONLY | flags)
