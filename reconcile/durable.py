"""Making renames and new files survive a power loss: the one place that fsyncs directories. Also
the one way to open a file for flock."""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from reconcile.failpoints import hit


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

    A new file gets `mode` less the umask; an existing file keeps the mode it has.
    """
    tmp = (temps if temps is not None else path.parent) / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        hit(f"atomic-temp-written:{path.name}")
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass
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
