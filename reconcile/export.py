"""Download one session's DICOM files from XNAT into a staging folder: streamed, verified, atomic, resumable.

Owns the staging layout `dest/<scan_id>/<relpath>`, the `.part` files and the check of every
byte against XNAT's listing (size and MD5). It writes nothing outside `dest`, converts nothing
and talks to XNAT only through `XnatClient.stream`.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import shutil
import stat
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from reconcile import digest
from reconcile.durable import fsync_dir, fsync_file
from reconcile.errors import (
    Cancelled,
    RemoteError,
    UnsafePathError,
    VerificationError,
)
from reconcile.failpoints import hit
from reconcile.model import Experiment, RemoteFile, Scan
from reconcile.xnat import StreamResponse, XnatClient, check_relpath, refuse_html_page
from reconcile.zipread import Unstreamable, ZipFormatError, ZipStream

METHODS = ("auto", "files", "zip")
CHUNK_SIZE = 1 << 20
# Bytes received per read. Small enough to stay in the CPU's cache between the read from the
# socket and the write to the file: with 1 MiB the kernel's copy into the page cache read its
# source from memory and cost ~1 CPU-s per GiB (curl, with 16 KiB, ~0.1 s); 1 GiB in 4 MiB files
# took 2.3-3.3 s at 256 KiB, 2.5-3.2 s at 128 KiB and 3.0-5.4 s at 1 MiB (fresh process each).
RECEIVE_SIZE = 256 << 10
# Per-file downloads in flight; the client caps connections on its own as well.
WORKERS = 4
# Threads that fsync and rename verified files without an MD5 while the downloads go on.
SYNC_WORKERS = 4
# "auto" fetches a scan as one zip when more than AUTO_ZIP_MIN_FILES of its files are missing and
# they average at most AUTO_ZIP_MAX_MEAN_SIZE bytes. Measured on the emulator (separate process,
# local disk, 4 workers; per-file time / zip time): 4 KiB files 1.0 at 1 file, 1.2 at 3, 1.7-1.9 at
# 8, 2-4 at 20-100, 2.3 at 1,000 (4.2 with 20 ms added per request); 12 files of 1 MiB 1.0-1.3,
# of 4 MiB 0.7-0.8, of 16 MiB 0.7; 3 files of 50 MiB 0.4-0.95. Big files go faster as parallel
# GETs (one stream each, one disk write instead of zip + extract) and can resume with Range.
AUTO_ZIP_MIN_FILES = 8
AUTO_ZIP_MAX_MEAN_SIZE = 2 << 20
PART_SUFFIX = ".part"
_RETRY_HINT = "run again; verified files are kept and partial ones resumed"


class ExportCancelled(Cancelled):
    """The export was cancelled through its `cancel` event; finished files stay, partial ones stay `.part`."""


@dataclass(frozen=True)
class ExportResult:
    """What `export_session` left in `dicom_dir`."""

    dicom_dir: Path  # files laid out dicom_dir/<scan_id>/<relpath> (the chosen resource only)
    scans: tuple[Scan, ...]  # the scans exported, as listed by XNAT and passed in
    files: int
    bytes: int  # total size on disk
    downloaded: int  # bytes transferred this run (0 when everything was already verified)


@dataclass(frozen=True)
class _Job:
    """One listed file and where it goes."""

    scan: Scan
    file: RemoteFile
    target: Path

    @property
    def part(self) -> Path:
        return self.target.with_name(self.target.name + PART_SUFFIX)

    @property
    def label(self) -> str:
        return f"scan {self.scan.id} file {self.file.name}"


class _Aborted(Exception):
    """Another worker failed; stop between chunks without reporting anything of our own."""


class _Mismatch(Exception):
    def __init__(self, what: str, expected: str, actual: str):
        super().__init__(what)
        self.what, self.expected, self.actual = what, expected, actual


class _CutShort(Exception):
    def __init__(self, received: int, cause: RemoteError):
        super().__init__(str(cause))
        self.received, self.cause = received, cause


def zip_type(scan_type: str) -> str:
    """The scan type as XNAT spells it in zip entry names (`\\W` → `_`, Java's ASCII \\W)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", scan_type)


def zip_prefix(exp: Experiment, scan: Scan, resource: str) -> str:
    """The entry prefix of a scan-resource zip: `{label}/scans/{id}-{type}/resources/{res}/files/`,
    `{id}` alone for a scan without a type."""
    folder = f"{scan.id}-{zip_type(scan.type)}" if scan.type else scan.id
    return f"{exp.label}/scans/{folder}/resources/{resource}/files/"


def zip_label(first_entry: str, exp: Experiment, scan: Scan, resource: str) -> str:
    """The session folder a scan zip's entries are under, as its first entry shows: the label the
    listing gave, or, for a session shared into the project listed under a label of its own
    there, its primary label (XNAT names zip entries by the archive folder, which is the primary
    label, and the listing of the other project does not give it). Anything else is the listed
    label, and the entry is then refused as outside the layout."""
    head, sep, rest = first_entry.partition("/")
    below = zip_prefix(exp, scan, resource)[len(exp.label) + 1:]
    if sep and head not in ("", ".", "..") and rest.startswith(below):
        return head
    return exp.label


def zip_entry_name(exp: Experiment, scan: Scan, file: RemoteFile) -> str:
    """The name XNAT gives `file` in the zip of its scan's resource. XNAT makes it from the file's
    URI by plain string replacement (RestFileUtils.buildRelativePath): from the session's ID on,
    that ID replaced by the label wherever it appears (file names too), `/{resource id}/files/` by
    the resource's label, then every `/{scan id}/` (folders below files/ too) by
    `/{scan id}-{type}/` when the scan has a type."""
    name = f"{exp.id}/scans/{scan.id}/resources/{file.resource_id or file.resource}/files/{file.name}"
    name = name.replace(exp.id, exp.label)
    if file.resource_id:
        name = name.replace(f"/{file.resource_id}/files/", f"/{file.resource}/files/")
    if scan.type:
        name = name.replace(f"/{scan.id}/", f"/{scan.id}-{zip_type(scan.type)}/")
    return name


def export_session(
    client: XnatClient,
    exp: Experiment,
    scans: Sequence[Scan],
    dest: Path,
    *,
    method: str = "auto",
    resource: str = "DICOM",
    cancel: threading.Event | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ExportResult:
    """Make `dest` hold exactly the `resource` files of `scans`, verified against their listing.

    `scans` is the listing to trust (from `client.list_scans` just before). Files already present
    with the listed size and MD5 are kept; a leftover `.part` of a file with a listed MD5 is
    resumed with a Range request.
    Anything else below `dest` (files of an older listing, stray `.part`s, symlinks) is removed,
    because `dest` is the staging folder the converter reads in full.

    `method`: "files" (one GET per file, WORKERS in parallel), "zip" (one zip per scan) or "auto"
    (zip for a scan with more than AUTO_ZIP_MIN_FILES missing files averaging at most
    AUTO_ZIP_MAX_MEAN_SIZE bytes). `on_progress(n)` gets byte counts as they arrive, from worker
    threads but never two calls at once. Raises UnsafePathError (before writing anything) for
    names that could escape `dest`, VerificationError when bytes still do not match the listing
    after one retry, RemoteError from the client, ExportCancelled once `cancel` is set.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if Path(dest).is_symlink():  # what it points at would be emptied of all XNAT does not list
        raise UnsafePathError(f"{dest} is a symbolic link; refusing to export into it",
                              hint="remove the link; the export folder is emptied of files XNAT does not list")
    root = Path(dest).resolve()
    jobs = _plan_jobs(root, exp, scans, resource)  # every name checked before the disk is touched
    exporter = _Exporter(client, exp, root, resource, cancel, on_progress)
    exporter.check_cancel()
    root.mkdir(parents=True, exist_ok=True)
    _prune(root, jobs)  # first: it also removes symlinks that would lead the checks below astray
    for directory in {job.target.parent for job in jobs}:
        _check_inside(root, directory)

    missing: dict[str, list[_Job]] = {}
    exporter.check_cancel()
    for job, ok in zip(jobs, _verified([j.target for j in jobs], [j.file for j in jobs])):
        if ok:
            continue
        if job.target.is_symlink() or job.target.exists():
            job.target.unlink()  # wrong content must not sit at the final name while we fetch
        missing.setdefault(job.scan.id, []).append(job)

    tasks: list[Callable[[], None]] = []
    by_id = {s.id: s for s in scans}
    for scan_id, scan_jobs in missing.items():
        use_zip = method == "zip" or (method == "auto" and _zip_pays_off(scan_jobs))
        if use_zip:
            tasks.append(lambda s=by_id[scan_id], js=scan_jobs: exporter.fetch_zip(s, js))
        else:
            tasks.extend(lambda j=job: exporter.fetch_file(j) for job in scan_jobs)
    exporter.run(tasks)

    # Renames (and new folders) are durable only once their directory is synced.
    directories = {root}
    for folder in {j.target.parent for j in jobs}:  # a few folders, however many files
        while folder != root and folder not in directories:
            directories.add(folder)
            folder = folder.parent
    for directory in sorted(directories):
        fsync_dir(directory)
    return ExportResult(
        dicom_dir=root,
        scans=tuple(scans),
        files=len(jobs),
        bytes=sum(j.file.size for j in jobs),
        downloaded=exporter.downloaded,
    )


def _zip_pays_off(jobs: Sequence[_Job]) -> bool:
    """For "auto": many small files cost more in per-request overhead than one zip stream."""
    return len(jobs) > AUTO_ZIP_MIN_FILES and sum(j.file.size for j in jobs) <= AUTO_ZIP_MAX_MEAN_SIZE * len(jobs)


def _plan_jobs(root: Path, exp: Experiment, scans: Sequence[Scan], resource: str) -> list[_Job]:
    jobs: list[_Job] = []
    seen: set[tuple[str, str]] = set()
    for scan in scans:
        where = f"session {exp.label} ({exp.id})"
        check_relpath(scan.id, where=where)
        if "/" in scan.id:
            raise UnsafePathError(f"XNAT lists a scan ID with a slash, {scan.id!r}, in {where}")
        for f in scan.files:
            if f.resource != resource:
                continue
            check_relpath(f.name, where=f"scan {scan.id} of {where}")
            if f.name.endswith(PART_SUFFIX):
                # A listed "x.part" would collide with our temporary for "x".
                raise UnsafePathError(
                    f"XNAT lists a file name ending in {PART_SUFFIX}, {f.name!r}, in scan {scan.id} of {where}",
                    hint="rename the file on XNAT",
                )
            if (scan.id, f.name) in seen:
                raise VerificationError(f"XNAT lists file {f.name} twice in scan {scan.id} of {where}")
            seen.add((scan.id, f.name))
            jobs.append(_Job(scan, f, root / scan.id / f.name))
    # "1.dcm" and "1.dcm/2.dcm": one path cannot be a file and a folder.
    folders = {(scan_id, "/".join(parts[:i])) for scan_id, name in seen
               for parts in [name.split("/")] for i in range(1, len(parts))}
    for scan_id, name in sorted(seen & folders):
        raise VerificationError(f"XNAT lists {name} both as a file and as a folder in scan {scan_id} of session "
                                f"{exp.label} ({exp.id})", hint="rename one of them on XNAT")
    return jobs


def _check_inside(root: Path, path: Path) -> None:
    """Refuse a target that resolves outside `root` (e.g. through a symlinked directory)."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise UnsafePathError(f"{path} resolves to {real}, outside the staging folder {root}")


def _prune(root: Path, jobs: Iterable[_Job]) -> None:
    """Remove everything below `root` that is neither a listed file, its `.part`, nor a parent of one."""
    keep_files: set[Path] = set()
    keep_dirs: set[Path] = {root}
    for job in jobs:
        keep_files.update((job.target, job.part))
    for directory in {job.target.parent for job in jobs}:
        keep_dirs.update(p for p in (directory, *directory.parents) if root in p.parents)
    for dirpath, dirnames, filenames in os.walk(root, topdown=True, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            path = here / name
            if path.is_symlink():
                dirnames.remove(name)
                path.unlink()
            elif path not in keep_dirs:
                dirnames.remove(name)
                shutil.rmtree(path)
        for name in filenames:
            path = here / name
            if path not in keep_files or path.is_symlink():
                path.unlink()


def _verified(paths: Sequence[Path], files: Sequence[RemoteFile]) -> list[bool]:
    """For each path: is it a regular file with the listed size (and MD5 when XNAT has one)?"""
    ok = [False] * len(paths)
    to_hash: list[int] = []
    for i, (path, f) in enumerate(zip(paths, files)):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == f.size:
            if f.digest:
                to_hash.append(i)
            else:
                ok[i] = True
    hashed = digest.md5_files([paths[i] for i in to_hash], [files[i].size for i in to_hash])
    for i, md5 in zip(to_hash, hashed):
        ok[i] = md5 == files[i].digest
    return ok


def _content_range_start(value: str) -> int | None:
    m = re.match(r"^\s*bytes\s+(\d+)-\d+/(?:\d+|\*)\s*$", value or "")
    return int(m.group(1)) if m else None


class _Exporter:
    """The state shared by the workers of one export: progress, cancellation, the first failure."""

    def __init__(
        self,
        client: XnatClient,
        exp: Experiment,
        root: Path,
        resource: str,
        cancel: threading.Event | None,
        on_progress: Callable[[int], None] | None,
    ):
        self.client = client
        self.exp = exp
        self.root = root
        self.resource = resource
        self.cancel = cancel
        self.on_progress = on_progress
        self.downloaded = 0
        self._lock = threading.Lock()
        self._local = threading.local()
        self._dirs: set[Path] = set()  # folders made and checked by _make_dir
        self._abort = threading.Event()
        self._committer: ThreadPoolExecutor | None = None  # fsync + rename, set while `run` runs
        self._commits: list[Future[None]] = []
        # Downloaded files waiting for their MD5, checked several at a time (`_check_loop`).
        self._to_check: queue.SimpleQueue[_Job | None] | None = None

    # -- shared state ----------------------------------------------------------------------
    def _make_dir(self, directory: Path) -> None:
        """Create a folder of the staging tree (once per export) and check it stays inside."""
        if directory in self._dirs:
            return
        directory.mkdir(parents=True, exist_ok=True)
        _check_inside(self.root, directory)
        self._dirs.add(directory)

    def _buffer(self) -> memoryview:
        """This thread's receive buffer, reused for every chunk of every file it fetches."""
        buffer = getattr(self._local, "buffer", None)
        if buffer is None:
            buffer = self._local.buffer = memoryview(bytearray(RECEIVE_SIZE))
        return buffer

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise ExportCancelled(
                f"export of session {self.exp.label} ({self.exp.id}) cancelled", hint=_RETRY_HINT
            )
        if self._abort.is_set():
            raise _Aborted()

    def progress(self, n: int) -> None:
        with self._lock:
            self.downloaded += n
            if self.on_progress is not None and n:
                self.on_progress(n)

    def run(self, tasks: list[Callable[[], None]]) -> None:
        """Run tasks on a few threads; the first failure stops the others between chunks and is raised.

        Verified files that need an fsync are synced and renamed on threads of their own
        (`_commit_soon`), so a download slot never waits on the disk. With several tasks and the
        `_md5lanes` extension, MD5s are checked on one more thread, several files at a time
        (`_check_soon`). `run` returns once every check and commit is done.
        """
        if not tasks:
            return
        futures: list[Future[None]] = []
        self._committer = ThreadPoolExecutor(max_workers=SYNC_WORKERS, thread_name_prefix="export-sync")
        checker: threading.Thread | None = None
        if len(tasks) > 1 and digest.lanes_available():
            self._to_check = queue.SimpleQueue()
            checker = threading.Thread(target=self._check_loop, name="export-md5", daemon=True)
            checker.start()
        try:
            if len(tasks) == 1:
                try:
                    tasks[0]()
                except Exception as exc:
                    # Queued commits stop (their verified .parts are resumed later); the error is
                    # raised below, unless it is the _Aborted of a commit that failed first.
                    self._abort.set()
                    futures = [Future()]
                    futures[0].set_exception(exc)
                except BaseException:
                    self._abort.set()
                    raise
            else:
                self.client.login()  # once, before the workers race for it
                with ThreadPoolExecutor(max_workers=min(WORKERS, len(tasks)), thread_name_prefix="export") as pool:
                    futures = [pool.submit(t) for t in tasks]
                    wait(futures, return_when=FIRST_EXCEPTION)
                    if self._abort.is_set() or any(
                        f.done() and not f.cancelled() and f.exception() is not None for f in futures
                    ):
                        self._abort.set()
                        for f in futures:
                            f.cancel()
                    wait(futures)
        finally:
            if checker is not None and self._to_check is not None:
                self._to_check.put(None)
                checker.join()
                self._to_check = None
            self._committer.shutdown(wait=True)
            self._committer = None
        futures += self._commits
        errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        real = [e for e in errors if not isinstance(e, _Aborted)]
        if real:
            # A user's cancel wins over errors it may have caused in other workers.
            cancelled = [e for e in real if isinstance(e, ExportCancelled)]
            raise (cancelled or real)[0]

    # -- one file --------------------------------------------------------------------------
    def fetch_file(self, job: _Job, *, first_attempt: int = 1) -> None:
        """GET one file into its `.part`, verify, rename; one retry after a mismatch or a cut.

        On a first attempt with a checker running, the MD5 is left to it (`_check_soon`), which
        makes the second attempt itself when it finds a mismatch."""
        self.check_cancel()
        self._make_dir(job.target.parent)
        for attempt in range(first_attempt, 3):
            try:
                self._fetch_file_once(job, defer_md5=attempt == 1 and self._to_check is not None)
                return
            except _Mismatch as m:
                job.part.unlink(missing_ok=True)
                if attempt == 2:
                    raise VerificationError(
                        f"{job.label} of session {self.exp.label} does not match XNAT's listing: "
                        f"{m.what} expected {m.expected}, got {m.actual}",
                        detail=f"after {attempt} downloads of {job.file.uri}",
                        hint="the file may have changed on XNAT since the listing; plan again",
                    ) from None
            except _CutShort as cut:
                # The .part is kept: the retry (or a later run) resumes it with a Range request
                # when an MD5 can check the whole file (`_fetch_file_once`).
                if attempt == 2:
                    raise VerificationError(
                        f"{job.label} of session {self.exp.label} does not match XNAT's listing: "
                        f"size expected {job.file.size}, got {cut.received} (the download was cut short)",
                        detail=str(cut.cause),
                        hint=_RETRY_HINT,
                    ) from cut.cause

    def _fetch_file_once(self, job: _Job, *, defer_md5: bool = False) -> None:
        f = job.file
        have = job.part.stat().st_size if job.part.exists() else 0
        if have == f.size and f.digest and _verified([job.part], [f])[0]:
            # Complete and verified, but a crash or a cancel came before the rename.
            self._commit_soon(job)
            return
        if have >= f.size or not f.digest:
            # Nothing to resume (or already too long): start over. So too without an MD5: the file
            # is then checked by its size alone, which says nothing of a prefix left by another run.
            job.part.unlink(missing_ok=True)
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else None
        with self.client.stream(f.uri, headers=headers) as resp:
            if not f.name.lower().endswith((".html", ".htm")):
                refuse_html_page(resp, f"the download of {f.name}", server=self.client.url)
            start = 0
            if have:
                if resp.status_code == 206 and _content_range_start(resp.headers.get("Content-Range", "")) == have:
                    start = have
                elif resp.status_code != 200:  # 200: the server ignored Range and sends the whole file
                    start = -1  # 416 or a range we did not ask for
            defer_md5 = defer_md5 and bool(f.digest)
            if start >= 0:
                self._receive(job, resp, start, hash_md5=not defer_md5)
        if start < 0:
            job.part.unlink(missing_ok=True)
            self._fetch_file_once(job, defer_md5=defer_md5)  # once more without Range
            return
        if defer_md5:
            self._check_soon(job)
        else:
            self._commit_soon(job)

    def _receive(self, job: _Job, resp: StreamResponse, start: int, *, hash_md5: bool = True) -> None:
        """Write the body into the .part (appending at `start`) and verify its size; with
        `hash_md5`, hash all of it on the way and verify the MD5 too."""
        f = job.file
        h = hashlib.md5() if hash_md5 else None
        with open(job.part, "r+b" if start else "wb") as out:
            if start:
                if h is not None:
                    for chunk in iter(lambda: out.read(CHUNK_SIZE), b""):
                        h.update(chunk)
                out.seek(start)
                out.truncate()
            size = start
            buffer = self._buffer()
            try:
                while n := resp.readinto(buffer):
                    self.check_cancel()
                    chunk = buffer[:n]
                    out.write(chunk)
                    if h is not None:
                        h.update(chunk)
                    size += n
                    self.progress(n)
                    hit("export-receiving")
                    if size > f.size:
                        break  # a server sending more than listed must not fill the disk
            except RemoteError as exc:
                raise _CutShort(size, exc) from exc
            self._verify(h, size, f)

    @staticmethod
    def _verify(h: Any, size: int, f: RemoteFile) -> None:
        """Size, then the MD5 when XNAT lists one and `h` hashed the bytes (None: checked later)."""
        if size != f.size:
            raise _Mismatch("size", str(f.size), str(size) + ("+" if size > f.size else ""))
        if f.digest and h is not None and h.hexdigest() != f.digest:
            raise _Mismatch("MD5", f.digest, h.hexdigest())

    # -- MD5s, several files at a time -----------------------------------------------------
    def _check_soon(self, job: _Job) -> None:
        """Queue a downloaded `.part` of the right size for its MD5 check and rename."""
        assert self._to_check is not None
        self._to_check.put(job)

    def _check_loop(self) -> None:
        """Take every `.part` waiting, hash them together (`digest.md5_files`), rename the good
        ones and download the others once more. The batch is as large as the downloads got ahead:
        the slower the check, the more lanes it fills."""
        assert self._to_check is not None
        closing = False
        while not closing:
            batch: list[_Job] = []
            item = self._to_check.get()
            while item is not None:
                batch.append(item)
                try:
                    item = self._to_check.get_nowait()
                except queue.Empty:
                    break
            closing = item is None
            if not batch:
                continue
            future: Future[None] = Future()
            self._commits.append(future)
            try:
                self._check(batch)
                future.set_result(None)
            except BaseException as exc:  # noqa: BLE001 - handed to `run` through the future
                self._abort.set()
                future.set_exception(exc)
                closing = True  # what is still queued stays .part; the next run checks it

    def _check(self, batch: list[_Job]) -> None:
        self.check_cancel()
        md5s = digest.md5_files([j.part for j in batch], [j.file.size for j in batch])
        for job, md5 in zip(batch, md5s):
            self.check_cancel()
            if md5 == job.file.digest:
                self._sync_and_replace(job)
            else:
                job.part.unlink(missing_ok=True)
                self.fetch_file(job, first_attempt=2)

    # -- one scan as a zip -----------------------------------------------------------------
    def fetch_zip(self, scan: Scan, jobs: list[_Job]) -> None:
        """GET a scan's resource as one zip, written entry by entry to the listed files' `.part`s
        as it arrives (`_stream_zip`); one retry of the whole zip when it is cut short or damaged.
        Entries that do not match the listing, and every file of a zip this reader cannot stream,
        are then fetched one by one."""
        self.check_cancel()
        url = (
            f"{self.client.experiment_path(self.exp)}/scans/{quote(scan.id, safe='')}"
            f"/resources/{quote(self.resource, safe='')}/files?format=zip"
        )
        retry: list[_Job] = []
        for attempt in (1, 2):
            try:
                retry = self._stream_zip(url, scan, jobs)
                break
            except Unstreamable:
                retry = jobs
                break
            except (_CutShort, ZipFormatError) as exc:
                if attempt == 1:
                    continue
                raise VerificationError(
                    f"XNAT sent an incomplete or unreadable zip for scan {scan.id} of session {self.exp.label}",
                    detail=f"{exc} (from {url}, {attempt} attempts)",
                    hint=_RETRY_HINT,
                ) from exc
        for job in retry:
            self.fetch_file(job)

    def _stream_zip(self, url: str, scan: Scan, jobs: list[_Job]) -> list[_Job]:
        """Write the wanted entries of the scan's zip to their `.part`s; returns the jobs whose entry
        did not match the listing. Every entry name is checked before its data is written, and the
        central directory (symbolic links, names) once the data is in; on any error every `.part`
        this zip wrote is removed."""
        prefix = zip_prefix(self.exp, scan, self.resource)
        where = f"the zip of scan {scan.id} of session {self.exp.label}"
        wanted = {j.file.name: j for j in jobs}
        files = [f for f in scan.files if f.resource == self.resource]
        listed = {f.name: f.size for f in files}
        named = {zip_entry_name(self.exp, scan, f): f.name for f in files}  # entry name -> listed name
        check_later = self._to_check is not None
        local: list[str] = []
        written: list[_Job] = []  # every job whose .part this zip opened, the one being written too
        good: list[_Job] = []
        bad: list[_Job] = []

        def receive(buffer: memoryview) -> int:
            self.check_cancel()
            n = resp.readinto(buffer)
            self.progress(n)
            return n

        try:
            with self.client.stream(url) as resp:
                refuse_html_page(resp, where, server=self.client.url)
                z = ZipStream(receive, self._buffer())
                try:
                    while (entry := z.next_entry()) is not None:
                        if not local and (label := zip_label(entry.name, self.exp, scan, self.resource)) != self.exp.label:
                            shared = replace(self.exp, label=label)  # a shared session: see zip_label
                            prefix = zip_prefix(shared, scan, self.resource)
                            named = {zip_entry_name(shared, scan, f): f.name for f in files}
                        local.append(entry.name)
                        name = _zip_member(entry.name, prefix, where=where)
                        name = named.get(entry.name, name) if name is not None else None
                        job = wanted.pop(name, None) if name is not None else None
                        hint = listed.get(name) if name is not None else None
                        if job is None:
                            # Not wanted: already present, a folder, or not in the listing (added
                            # since; the next plan sees it). A second entry of a wanted name lands
                            # here too and is caught below, as the directory has it twice.
                            z.skip(entry, size_hint=hint)
                            continue
                        written.append(job)
                        self._make_dir(job.target.parent)
                        h = hashlib.md5() if job.file.digest and not check_later else None
                        with open(job.part, "wb") as out:
                            write = out.write if h is None else (
                                lambda piece, out=out, h=h: (out.write(piece), h.update(piece))
                            )
                            size, intact = z.copy(entry, write, size_hint=hint, limit=job.file.size,
                                                  check_crc=not job.file.digest)  # an MD5 says more
                        try:
                            self._verify(h, size, job.file)
                        except _Mismatch:
                            intact = False
                        (good if intact else bad).append(job)
                    central = z.central_directory()
                except RemoteError as exc:
                    raise _CutShort(z.received, exc) from exc
            if [r.name for r in central] != local:
                raise ZipFormatError("the zip's directory does not name the entries it holds")
            for record in central:
                _zip_member(record.name, prefix, where=where, symlink=stat.S_ISLNK(record.external_attr >> 16))
            twice = sorted(n for n, count in Counter(local).items() if count > 1)
            if twice:
                raise VerificationError(f"{where} has two entries for {twice[0][len(prefix):]}")
            if wanted:
                missing = sorted(wanted)
                raise VerificationError(
                    f"{where} lacks {len(missing)} listed file(s)",
                    detail="missing: " + ", ".join(missing[:10]) + (" …" if len(missing) > 10 else ""),
                    hint="the scan may have changed on XNAT since the listing; plan again",
                )
        except BaseException:
            self._discard(written)
            raise
        for job in bad:
            job.part.unlink(missing_ok=True)
        for job in good:
            if check_later and job.file.digest:
                self._check_soon(job)
            else:
                self._commit_soon(job)
        return bad

    def _discard(self, jobs: list[_Job]) -> None:
        """Remove the `.part`s of `jobs`, and their folders when that leaves them empty."""
        for job in jobs:
            job.part.unlink(missing_ok=True)
        for folder in sorted({j.target.parent for j in jobs}, key=lambda p: len(p.parts), reverse=True):
            while folder != self.root and self.root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:
                    break
                self._dirs.discard(folder)
                folder = folder.parent

    def _commit_soon(self, job: _Job) -> None:
        """Rename a verified `.part` into place; one that needs an fsync first goes to a commit
        thread. fsync waits on the disk: in the download thread it left a connection idle meanwhile
        (1 GiB in 4 MiB files took 6.6 s instead of 4.1 s). A bare rename is done at once: handing
        it to a thread cost more than the rename (a fifth of a 4,096-file zip export)."""
        if self._committer is None or job.file.digest:
            self._sync_and_replace(job)
            return
        future = self._committer.submit(self._sync_and_replace, job)
        future.add_done_callback(self._commit_done)
        self._commits.append(future)

    def _commit_done(self, future: Future[None]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self._abort.set()  # the downloads stop between chunks; `run` raises the commit's error

    def _sync_and_replace(self, job: _Job) -> None:
        self.check_cancel()
        if not job.file.digest:
            # Only a file without an MD5 is trusted on size alone when reused, so only it must
            # reach the disk before its final name does. MD5-verified files are hashed again
            # whenever they are reused (a power loss shows as a mismatch and a new download);
            # syncing them cost 1.1 s of 3.9 s for 1 GiB. Apply syncs what it commits.
            fsync_file(job.part)
        hit("export-before-rename")
        os.replace(job.part, job.target)


def _zip_member(raw: str, prefix: str, *, where: str, symlink: bool = False) -> str | None:
    """The relpath below `files/` of a zip entry, None for directory entries; UnsafePathError otherwise."""
    if symlink:
        raise UnsafePathError(f"{where} holds a symbolic link, {raw!r}", hint="refusing to extract it")
    name = raw
    if "\x00" in raw or "\\" in raw:
        raise UnsafePathError(f"{where} holds an unsafe entry name {raw!r}")
    is_dir = name.endswith("/")
    try:
        check_relpath(name.rstrip("/") if is_dir else name, where=where)
    except UnsafePathError as exc:
        raise UnsafePathError(f"{where} holds an unsafe entry name {raw!r}", hint=exc.hint) from None
    if is_dir and prefix.startswith(name):
        return None  # a parent of the expected layout
    if not name.startswith(prefix):
        raise UnsafePathError(
            f"{where} holds an entry outside the expected layout: {raw!r}",
            detail=f"expected every entry below {prefix}",
        )
    rel = name[len(prefix):]
    if is_dir:
        return None
    check_relpath(rel, where=where)
    return rel

