"""Looking at the BIDS tree: stat and hash the outputs the lock records.

This is the planner's "actual" input and `check`'s evidence; it reads the disk and writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from stat import S_ISDIR, S_ISLNK, S_ISREG
from typing import Any

from reconcile.lock import Lock
from reconcile.lockcache import _cache_dir, _cache_key, _private_opener, private
from reconcile.model import FileStat, OutputRecord, SessionRecord
from reconcile.plan import LocalState

HASH_CHUNK = 1 << 20


Hashed = Callable[[SessionRecord], bool]  # whose outputs --full hashes


def stat_outputs(root: Path, lock: Lock, *, full: bool | Hashed = False) -> LocalState:
    """Stat every recorded output; paths that do not exist (or are not files) are left out."""
    return stat_records(root, lock.sessions.values(), full=full)


def stat_records(root: Path, records: Iterable[SessionRecord], *, full: bool | Hashed = False) -> LocalState:
    """`stat_outputs` for the outputs of these records only. An output with its recorded size but
    another modification time is hashed, once per change of its stat (`Verified`), to tell a
    copy or clone of the dataset from an edit. An output that is a link is followed only when it
    stays inside the root, and so is one in a subject or session folder that is a link. With `full`
    (for every record, or those it is true for), the outputs whose stat is the recorded one are
    hashed too, and no stat vouches for one (`check --full`'s evidence: bit rot, an edit that kept
    size and time)."""
    files: dict[str, FileStat] = {}
    touched: list[tuple[OutputRecord, os.stat_result, bool]] = []
    unchanged: dict[str, OutputRecord] = {}
    outside: set[str] = set()
    beneath = Beneath(root)
    # Many records: one listing of the root tells which subject folders are links; a few (a commit's
    # own): a look at their folders.
    many = not isinstance(records, Sequence) or len(records) > 64
    linked_subjects = _linked_entries(root) if many else frozenset()
    with root_stat(root, follow_symlinks=False) as lstat:
        for rec in records:
            hashed = full(rec) if callable(full) else full
            # A subject, session or datatype folder that is a link (the folders a user moves and
            # links back), as `check` finds them. One lstat per session and one per datatype
            # folder (`anat/`): plan stats 40,000 outputs.
            linked = False
            folders: dict[str, bool] = {}
            if rec.outputs:
                session = rec.address.path
                linked = (session.partition("/")[0] in linked_subjects or _is_link(lstat, session)
                          if many else beneath.linked(session))
            for out in rec.outputs:
                try:
                    folder = out.path.rpartition("/")[0]
                    through_link = linked or folders.get(folder)
                    if through_link is None:  # a datatype folder not looked at yet
                        through_link = folders[folder] = folder.startswith(session + "/") and _is_link(lstat, folder)
                    st = lstat(out.path)
                    if through_link or S_ISLNK(st.st_mode):  # judged by its target only inside the root (git-annex)
                        if beneath.outside(out.path) is not None:
                            outside.add(out.path)
                            continue
                        st = os.stat(os.path.join(beneath.root, out.path))
                except OSError:
                    continue
                if S_ISREG(st.st_mode):
                    files[out.path] = FileStat(st.st_size, st.st_mtime_ns)
                    if st.st_mtime_ns != out.mtime_ns and st.st_size == out.size:
                        touched.append((out, st, hashed))
                    elif hashed and st.st_size == out.size:
                        unchanged[os.path.join(root, out.path)] = out
    same, hashed_now = _same_content(root, touched) if touched else (frozenset(), 0)
    differs = frozenset(unchanged[p].path for p, digest in hash_files(unchanged).items()
                        if digest != unchanged[p].sha256) if unchanged else frozenset()
    return LocalState(files, same, frozenset(outside), hashed_now, differs)


def _same_content(root: Path, touched: list[tuple[OutputRecord, os.stat_result, bool]]) -> tuple[frozenset[str], int]:
    """The touched outputs whose sha256 is the recorded one, and how many of them were hashed
    now (the others the verified-outputs store vouched for; not for those asked to be hashed in
    full, as bit rot changes nothing the store keys on)."""
    verified = Verified.of(root)
    same = {out.path for out, st, full in touched if not full and verified.vouches(out, st)}
    vouched = len(same)
    to_hash = {os.path.join(root, out.path): (out, st) for out, st, _ in touched if out.path not in same}
    if to_hash:
        for path, digest in hash_files(to_hash).items():
            out, st = to_hash[path]
            if digest == out.sha256:
                same.add(out.path)
                verified.add(out, st)
        verified.save()
    return frozenset(same), len(same) - vouched


class Verified:
    """Outputs whose content was found to be the recorded one though their time is not, with the
    stat they had then (size, mtime, ctime, inode): git's index does the same for a clone. Kept per
    user and BIDS root beside the lock cache; a damaged or missing file is only lost time."""

    def __init__(self, path: Path | None, entries: dict[str, list[Any]]) -> None:
        self.path, self.entries, self.changed = path, entries, False

    @classmethod
    def of(cls, root: Path) -> Verified:
        directory = _cache_dir()
        if directory is None:
            return cls(None, {})
        path = directory.parent / "verified" / f"{_cache_key(root)}.json"
        try:
            with open(path, "rb") as f:
                # One another user could write (a cache folder a lab shares) could vouch for their edit.
                if not private(os.fstat(f.fileno())):
                    return cls(path, {})
                entries = json.loads(f.read())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    @staticmethod
    def _key(out: OutputRecord, st: os.stat_result) -> list[Any]:
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, out.sha256]

    def vouches(self, out: OutputRecord, st: os.stat_result) -> bool:
        return self.entries.get(out.path) == self._key(out, st)

    def add(self, out: OutputRecord, st: os.stat_result) -> None:
        self.entries[out.path] = self._key(out, st)
        self.changed = True

    def save(self) -> None:
        if not self.changed or self.path is None:
            return
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temp.unlink(missing_ok=True)  # made anew: 0600 whatever the umask
            with open(temp, "x", encoding="utf-8", opener=_private_opener) as f:
                f.write(json.dumps(self.entries, sort_keys=True))
            os.replace(temp, self.path)


@contextlib.contextmanager
def root_stat(root: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Iterator[Callable[[str], os.stat_result]]:
    """os.stat of paths relative to `root`. Relative to a descriptor of the root where the OS
    allows, the kernel walks a shorter path: a quarter less CPU for 40,000 outputs than with
    each path joined to the root's."""
    base = os.fspath(root)
    fd = _open_dir(base) if os.stat in os.supports_dir_fd else None
    try:
        if fd is not None:
            yield partial(os.stat, dir_fd=fd, follow_symlinks=follow_symlinks)
        else:
            yield lambda rel: os.stat(os.path.join(base, rel), follow_symlinks=follow_symlinks)
    finally:
        if fd is not None:
            os.close(fd)


class Beneath:
    """Tells whether a path under `root` stays inside it: a link anywhere along it (a linked
    session folder, a linked file) must resolve inside the root, as git-annex's do. Folders are
    looked at once each (lstat), so a tree without links costs one lstat per folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.fspath(root)
        self._real_root = os.path.realpath(self.root)
        self._linked_dirs: dict[str, bool] = {}

    def outside(self, rel: str) -> str | None:
        """Where `rel` really is when that is outside the root, else None; asked of a path that is
        a link or lies in a `linked` folder (any other one stays inside)."""
        real = os.path.realpath(os.path.join(self.root, rel))
        return None if real.startswith(self._real_root + os.sep) else real

    def linked(self, folder: str) -> bool:
        """Whether `folder` (relative to the root) or a folder above it is a link."""
        known = self._linked_dirs.get(folder)
        if known is None:
            if not folder:
                return False
            try:
                known = S_ISLNK(os.lstat(os.path.join(self.root, folder)).st_mode)
            except OSError:
                known = False
            known = self._linked_dirs[folder] = known or self.linked(folder.rpartition("/")[0])
        return known


def holds_nothing(root: str | os.PathLike[str], rel: str) -> bool:
    """Whether the folder `rel` of `root` holds no file at all: nothing but folders, themselves
    empty, all the way down (what is left of an export whose files were moved away). Any other
    entry is something: a file (a hidden one too, such as .DS_Store), a link (never followed), a
    socket. So is the folder when it or one above it in the root is a link, when one of its
    folders cannot be read, or is another file system's (a mount point: never empty to rmdir)."""
    if Beneath(root).linked(rel):
        return False
    top = os.path.join(os.fspath(root), rel)
    try:
        st = os.lstat(top)
        device = os.lstat(os.path.dirname(top)).st_dev
    except OSError:
        return False
    if not S_ISDIR(st.st_mode) or st.st_dev != device:
        return False
    folders = [top]
    while folders:  # no recursion: a deep tree of empty folders is still nothing
        try:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False) or entry.stat(follow_symlinks=False).st_dev != device:
                        return False
                    folders.append(entry.path)
        except OSError:
            return False
    return True


def _linked_entries(root: Path) -> frozenset[str]:
    """The names in `root` that are links (one directory listing; the entries' types come with it)."""
    try:
        with os.scandir(root) as entries:
            return frozenset(e.name for e in entries if e.is_symlink())
    except OSError:
        return frozenset()


def _is_link(lstat: Callable[[str], os.stat_result], rel: str) -> bool:
    try:
        return S_ISLNK(lstat(rel).st_mode)
    except OSError:
        return False


def _open_dir(path: str) -> int | None:
    """A descriptor of the directory at `path`, or None (missing, unreadable: use full paths)."""
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_files(paths: Iterable[str | os.PathLike[str]], *, workers: int | None = None) -> dict[str, str | None]:
    """sha256 of many files in parallel (hashlib releases the GIL); None for unreadable ones."""

    def one(p: str | os.PathLike[str]) -> tuple[str, str | None]:
        try:
            return os.fspath(p), sha256_file(p)
        except OSError:
            return os.fspath(p), None

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        return dict(pool.map(one, paths))
