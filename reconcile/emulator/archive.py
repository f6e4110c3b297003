"""The emulator's in-memory XNAT archive: users, projects, subjects, sessions, scans, resources, files.

This module owns the data model and the rules for when `insert_date` and `last_modified` change
(see the facts file §7). It knows nothing about HTTP; `app.py` renders it.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date as date_type
from datetime import datetime, timedelta, timezone
from pathlib import Path

CHUNK_SIZE = 1 << 20

MODALITY_BY_SESSION_TYPE = {
    "xnat:mrSessionData": "MR",
    "xnat:ctSessionData": "CT",
    "xnat:petSessionData": "PET",
}
SCAN_TYPE_BY_SESSION_TYPE = {
    "xnat:mrSessionData": "xnat:mrScanData",
    "xnat:ctSessionData": "xnat:ctScanData",
    "xnat:petSessionData": "xnat:petScanData",
}

# Scan types cycled through by `add_synthetic_sessions`.
SYNTHETIC_SCAN_TYPES = ("anat-T1w", "func-bold_task-rest", "fmap-epi", "dwi", "anat-T2w", "localizer")


class ArchiveError(Exception):
    """A request the archive cannot satisfy; `status` is the HTTP status XNAT would answer with."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.message = message
        self.status = status


_pattern_lock = threading.Lock()
_pattern: bytes | None = None


def _synthetic_pattern() -> bytes:
    """1 MiB of fixed pseudo-random bytes that synthetic file contents are cut from."""
    global _pattern
    with _pattern_lock:
        if _pattern is None:
            _pattern = random.Random(20240110).randbytes(CHUNK_SIZE)
        return _pattern


_pattern_fd: int | None = None


def _synthetic_pattern_fd() -> int:
    """A file descriptor holding the pattern, open for the life of the process: servers send
    synthetic content from it with sendfile(2)."""
    global _pattern_fd
    pattern = _synthetic_pattern()
    with _pattern_lock:
        if _pattern_fd is None:
            with tempfile.TemporaryFile() as handle:  # unlinked; the duplicate keeps it alive
                handle.write(pattern)
                handle.flush()
                _pattern_fd = os.dup(handle.fileno())
        return _pattern_fd


@dataclass
class FileEntry:
    """One file of a resource: bytes in memory, a file on disk read on demand, or a lazy,
    deterministic synthetic stream (`seed`)."""

    path: str
    size: int
    data: bytes | None = field(default=None, repr=False)
    seed: str | None = None
    source: Path | None = None
    _md5: str | None = field(default=None, repr=False)
    _crc32: int | None = field(default=None, repr=False)

    @classmethod
    def from_bytes(cls, path: str, data: bytes) -> FileEntry:
        return cls(path=path, size=len(data), data=bytes(data))

    @classmethod
    def from_disk(cls, path: str, source: Path) -> FileEntry:
        return cls(path=path, size=source.stat().st_size, source=source)

    @classmethod
    def synthetic(cls, path: str, size: int, seed: str) -> FileEntry:
        return cls(path=path, size=size, seed=seed)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def md5(self) -> str:
        # Computed once, lazily: a synthetic 1 GiB file should cost nothing until someone lists it.
        if self._md5 is None:
            self._digest()
        assert self._md5 is not None
        return self._md5

    @property
    def crc32(self) -> int:
        """The CRC-32 a zip entry of this file carries; computed with the MD5, in one pass."""
        if self._crc32 is None:
            self._digest()
        assert self._crc32 is not None
        return self._crc32

    def _digest(self) -> None:
        hasher, crc = hashlib.md5(), 0
        for chunk in self.iter_bytes():
            hasher.update(chunk)
            crc = zlib.crc32(chunk, crc)
        self._md5, self._crc32 = hasher.hexdigest(), crc

    def iter_bytes(self, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
        """Yield the content in chunks of at most `chunk_size` bytes."""
        if self.data is not None:
            for start in range(0, len(self.data), chunk_size):
                yield self.data[start : start + chunk_size]
            return
        if self.source is not None:
            with self.source.open("rb") as handle:
                while chunk := handle.read(chunk_size):
                    yield chunk
            return
        pattern = _synthetic_pattern()
        for piece in self.pieces():
            if isinstance(piece, bytes):
                yield piece
                continue
            _, offset, count = piece
            for start in range(offset, offset + count, chunk_size):
                yield pattern[start : min(start + chunk_size, offset + count)]

    def read(self) -> bytes:
        return b"".join(self.iter_bytes())

    def pieces(self) -> Iterator[bytes | tuple[int, int, int]]:
        """The content as bytes and `(fd, offset, count)` ranges of files open for reading, in
        order: what a server needs to send it with sendfile(2), without copying it through Python.
        The file descriptors stay open only while the iterator runs."""
        if self.data is not None:
            yield self.data
            return
        if self.source is not None:
            with self.source.open("rb") as handle:
                yield (handle.fileno(), 0, self.size)
            return
        # Synthetic: a per-file header makes every file's digest distinct; the body is a rotation
        # of the shared pattern.
        digest = hashlib.sha256((self.seed or self.path).encode()).digest()
        header = (digest * 2)[: min(64, self.size)]
        if header:
            yield header
        fd, length = _synthetic_pattern_fd(), len(_synthetic_pattern())
        offset = int.from_bytes(digest[:4], "big") % length
        remaining = self.size - len(header)
        while remaining > 0:
            take = min(remaining, length - offset)
            yield (fd, offset, take)
            offset = (offset + take) % length
            remaining -= take


@dataclass
class Resource:
    id: str  # xnat_abstractresource_id: a numeric string, unique site-wide
    label: str
    format: str = ""
    content: str = ""
    files: dict[str, FileEntry] = field(default_factory=dict)

    @property
    def file_size(self) -> int:
        return sum(f.size for f in self.files.values())


@dataclass
class Scan:
    id: str
    type: str
    series_description: str
    xsi_type: str
    xnat_imagescandata_id: str
    quality: str = "usable"
    note: str = ""
    resources: dict[str, Resource] = field(default_factory=dict)

    def find_resource(self, key: str) -> Resource | None:
        """A resource segment may be a label or the numeric resource ID."""
        if key in self.resources:
            return self.resources[key]
        return next((r for r in self.resources.values() if r.id == key), None)


@dataclass
class User:
    login: str
    password: str
    projects: frozenset[str] | None = None  # None: may read every project

    def can_read(self, project: str) -> bool:
        return self.projects is None or project in self.projects


@dataclass
class Project:
    id: str
    name: str
    secondary_id: str = ""
    description: str = ""
    pi_firstname: str = ""
    pi_lastname: str = ""


class _Shareable:
    """What a subject and a session have of XNAT's sharing: a project and label of their own, and
    `shares` (project shared into -> label there)."""

    label: str
    project: str
    shares: dict[str, str]

    def label_in(self, project: str) -> str:
        """Its label as `project` lists it: its own, or the one it was shared under."""
        return self.label if project == self.project else self.shares.get(project, self.label)

    def belongs_to(self, project: str) -> bool:
        return project == self.project or project in self.shares


@dataclass
class Subject(_Shareable):
    id: str
    label: str
    project: str
    insert_date: datetime
    last_modified: datetime
    insert_user: str = "admin"
    shares: dict[str, str] = field(default_factory=dict)  # project shared into -> label there


@dataclass
class Experiment(_Shareable):
    id: str
    label: str
    project: str
    subject_id: str
    xsi_type: str
    date: str
    time: str
    insert_date: datetime
    last_modified: datetime
    insert_user: str = "admin"
    note: str = ""
    scans: dict[str, Scan] = field(default_factory=dict)
    shares: dict[str, str] = field(default_factory=dict)  # project shared into -> label there

    @property
    def modality(self) -> str:
        return MODALITY_BY_SESSION_TYPE.get(self.xsi_type, "")


def _default_clock() -> datetime:
    return datetime.now(timezone.utc)


class Archive:
    """An XNAT site's content, safe to share between server threads.

    Timestamps are naive datetimes in the server's local time, which is UTC here.
    """

    def __init__(self, site: str = "XNAT", clock: Callable[[], datetime] | None = None):
        self.site = site
        self.clock: Callable[[], datetime] = clock or _default_clock
        # XNAT's site setting "checksums": off, its catalogs hold no MD5 and listings say "".
        self.checksums = True
        # Fraction digits of insert_date/last_modified: XNAT shows what its database keeps,
        # milliseconds here by default, up to microseconds (6) on PostgreSQL.
        self.stamp_digits = 3
        self.users: dict[str, User] = {}
        self.projects: dict[str, Project] = {}
        self.subjects: dict[str, Subject] = {}
        self.experiments: dict[str, Experiment] = {}
        self._lock = threading.RLock()
        # (project, label) -> ID; keeps bulk creation of thousands of sessions linear.
        self._subject_labels: dict[tuple[str, str], str] = {}
        self._session_labels: dict[tuple[str, str], str] = {}
        self._subject_seq = 0
        self._experiment_seq = 0
        self._resource_seq = 0
        self._scan_seq = 0

    # -- time -------------------------------------------------------------------------------

    def now(self) -> datetime:
        """The clock's current time as naive UTC, without the 'strictly increasing' bump."""
        moment = self.clock()
        if moment.tzinfo is not None:
            moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
        return moment

    def _stamp(self, previous: datetime | None = None) -> datetime:
        """Now, to `stamp_digits` fraction digits; for a re-save strictly after the row's
        `previous` stamp.

        Two saves within one unit (or under a frozen test clock) still yield distinct
        `last_modified` values, so "the session changed" is always observable.
        """
        unit = 10 ** (6 - self.stamp_digits)
        moment = self.now()
        moment = moment.replace(microsecond=moment.microsecond // unit * unit)
        if previous is not None and moment <= previous:
            moment = previous + timedelta(microseconds=unit)
        return moment

    # -- users and projects -----------------------------------------------------------------

    def add_user(self, login: str, password: str, projects: Iterable[str] | None = None) -> User:
        user = User(login, password, None if projects is None else frozenset(projects))
        with self._lock:
            self.users[login] = user
        return user

    def add_project(self, project_id: str, name: str | None = None, description: str = "") -> Project:
        with self._lock:
            if project_id in self.projects:
                raise ArchiveError(f"Project {project_id} already exists", 409)
            project = Project(project_id, name or project_id, description=description)
            self.projects[project_id] = project
            return project

    def get_project(self, project_id: str) -> Project:
        project = self.projects.get(project_id)
        if project is None:
            raise ArchiveError(f"Unable to identify project {project_id}")
        return project

    # -- subjects ---------------------------------------------------------------------------

    def add_subject(self, project: str, label: str) -> Subject:
        with self._lock:
            self.get_project(project)
            if self.find_subject(project, label) is not None:
                raise ArchiveError(f"Subject {label} already exists in project {project}", 409)
            self._subject_seq += 1
            stamp = self._stamp()
            subject = Subject(f"{self.site}_S{self._subject_seq:05d}", label, project, stamp, stamp)
            self.subjects[subject.id] = subject
            self._subject_labels[(project, label)] = subject.id
            return subject

    def find_subject(self, project: str, key: str) -> Subject | None:
        """A subject by ID or label within a project (its own, or one it is shared into)."""
        subject = self.subjects.get(key)
        if subject is not None and subject.belongs_to(project):
            return subject
        subject_id = self._subject_labels.get((project, key))
        return None if subject_id is None else self.subjects.get(subject_id)

    def rename_subject(self, subject_id: str, label: str) -> Subject:
        with self._lock:
            subject = self.subjects[subject_id]
            del self._subject_labels[(subject.project, subject.label)]
            subject.label = label
            self._subject_labels[(subject.project, label)] = subject.id
            subject.last_modified = self._stamp(subject.last_modified)
            return subject

    def subjects_of(self, project: str) -> list[Subject]:
        with self._lock:
            return [s for s in self.subjects.values() if s.belongs_to(project)]

    # -- sessions ---------------------------------------------------------------------------

    def add_session(
        self,
        project: str,
        subject: str,
        label: str,
        date: str | date_type | None = None,
        time: str = "",
        xsi_type: str = "xnat:mrSessionData",
        insert_user: str = "admin",
    ) -> Experiment:
        """Create a session (and its subject, given by label or ID, when missing)."""
        if xsi_type not in MODALITY_BY_SESSION_TYPE:
            raise ArchiveError(f"Unsupported session type {xsi_type}", 400)
        with self._lock:
            self.get_project(project)
            subj = self.find_subject(project, subject) or self.add_subject(project, subject)
            if self.find_session(project, label) is not None:
                raise ArchiveError(f"Experiment {label} already exists in project {project}", 409)
            self._experiment_seq += 1
            stamp = self._stamp()
            experiment = Experiment(
                id=f"{self.site}_E{self._experiment_seq:05d}",
                label=label,
                project=project,
                subject_id=subj.id,
                xsi_type=xsi_type,
                date=_date_string(date),
                time=time or "",
                insert_date=stamp,
                last_modified=stamp,
                insert_user=insert_user,
            )
            self.experiments[experiment.id] = experiment
            self._session_labels[(project, label)] = experiment.id
            return experiment

    def get_session(self, experiment_id: str) -> Experiment:
        experiment = self.experiments.get(experiment_id)
        if experiment is None:
            raise ArchiveError(f"Unable to find experiment {experiment_id}")
        return experiment

    def find_session(self, project: str, key: str) -> Experiment | None:
        """A session by ID or label within a project (its own, or one it is shared into)."""
        experiment = self.experiments.get(key)
        if experiment is not None and experiment.belongs_to(project):
            return experiment
        experiment_id = self._session_labels.get((project, key))
        return None if experiment_id is None else self.experiments.get(experiment_id)

    def sessions(self, project: str | None = None) -> list[Experiment]:
        """A project's sessions, those shared into it included; every session without one."""
        with self._lock:
            return [e for e in self.experiments.values() if project is None or e.belongs_to(project)]

    def share_subject(self, subject_id: str, project: str, label: str | None = None) -> Subject:
        """Share a subject into another project, under its own label or another one."""
        with self._lock:
            subject = self.subjects[subject_id]
            self.get_project(project)
            label = label or subject.label
            taken = self._subject_labels.get((project, label))
            if project == subject.project or (taken is not None and taken != subject.id):
                raise ArchiveError(f"Subject {label} already exists in project {project}", 409)
            subject.shares[project] = label
            self._subject_labels[(project, label)] = subject.id
            return subject

    def share_session(self, experiment_id: str, project: str, label: str | None = None) -> Experiment:
        """Share a session into another project under a label of its own there (XNAT's "share"):
        that project's listing shows it with that label and project, its zips keep the primary
        label (the archive folder's name). Its subject is shared along when it is not yet."""
        with self._lock:
            experiment = self.get_session(experiment_id)
            self.get_project(project)
            label = label or experiment.label
            taken = self._session_labels.get((project, label))
            if project == experiment.project or (taken is not None and taken != experiment.id):
                raise ArchiveError(f"Experiment {label} already exists in project {project}", 409)
            subject = self.subjects[experiment.subject_id]
            if project not in subject.shares:
                self.share_subject(subject.id, project)
            if project in experiment.shares:  # shared again: one share per project, under the new label
                del self._session_labels[(project, experiment.shares[project])]
            experiment.shares[project] = label
            self._session_labels[(project, label)] = experiment.id
            return experiment

    def subject_of(self, experiment: Experiment) -> Subject:
        return self.subjects[experiment.subject_id]

    def set_fields(self, experiment_id: str, **fields: str) -> Experiment:
        """Edit session fields the way a REST PUT does: a re-save, so `last_modified` moves."""
        allowed = {"date", "time", "note", "label"}
        unknown = set(fields) - allowed
        if unknown:
            raise ArchiveError(f"Unknown field(s): {', '.join(sorted(unknown))}", 400)
        with self._lock:
            experiment = self.get_session(experiment_id)
            if "label" in fields:
                taken = self._session_labels.get((experiment.project, str(fields["label"])))
                if taken is not None and taken != experiment.id:
                    raise ArchiveError(f"Experiment {fields['label']} already exists in project {experiment.project}", 409)
                del self._session_labels[(experiment.project, experiment.label)]
                self._session_labels[(experiment.project, str(fields["label"]))] = experiment.id
            for name, value in fields.items():
                setattr(experiment, name, _date_string(value) if name == "date" else str(value))
            experiment.last_modified = self._stamp(experiment.last_modified)
            return experiment

    def rename_session(self, experiment_id: str, label: str) -> Experiment:
        return self.set_fields(experiment_id, label=label)

    def delete_session(self, experiment_id: str) -> None:
        with self._lock:
            experiment = self.get_session(experiment_id)
            del self.experiments[experiment_id]
            del self._session_labels[(experiment.project, experiment.label)]
            for project, label in experiment.shares.items():
                self._session_labels.pop((project, label), None)

    # -- scans, resources, files ------------------------------------------------------------

    def add_scan(
        self,
        experiment_id: str,
        scan_id: str,
        type: str = "",
        series_description: str | None = None,
        files: Mapping[str, bytes] | None = None,
        resource: str = "DICOM",
        xsi_type: str | None = None,
        quality: str = "usable",
    ) -> Scan:
        """Add a scan (replacing one with the same ID). Does not re-save the session row."""
        if xsi_type is not None and xsi_type not in SCAN_TYPE_BY_SESSION_TYPE.values():
            # Only types the served XSD defines: xnatpy raises KeyError on any other.
            raise ArchiveError(f"Unsupported scan type {xsi_type}", 400)
        with self._lock:
            experiment = self.get_session(experiment_id)
            self._scan_seq += 1
            scan = Scan(
                id=str(scan_id),
                type=type,
                series_description=type if series_description is None else series_description,
                xsi_type=xsi_type or SCAN_TYPE_BY_SESSION_TYPE[experiment.xsi_type],
                xnat_imagescandata_id=str(self._scan_seq),
                quality=quality,
            )
            experiment.scans[scan.id] = scan
            if files:
                res = self._ensure_resource(scan, resource)
                for path, data in files.items():
                    res.files[path] = FileEntry.from_bytes(path, data)
            return scan

    def get_scan(self, experiment_id: str, scan_id: str) -> Scan:
        scan = self.get_session(experiment_id).scans.get(str(scan_id))
        if scan is None:
            raise ArchiveError(f"Unable to find scan {scan_id}")
        return scan

    def add_resource(self, experiment_id: str, scan_id: str, label: str, format: str = "") -> Resource:
        with self._lock:
            return self._ensure_resource(self.get_scan(experiment_id, scan_id), label, format)

    def _ensure_resource(self, scan: Scan, label: str, format: str | None = None) -> Resource:
        existing = scan.find_resource(label)
        if existing is not None:
            return existing
        self._resource_seq += 1
        fmt = format if format is not None else ("DICOM" if label.upper() == "DICOM" else "")
        res = Resource(id=str(self._resource_seq), label=label, format=fmt, content="RAW" if fmt == "DICOM" else "")
        scan.resources[label] = res
        return res

    def upload_file(self, experiment_id: str, scan_id: str, resource: str, path: str, data: bytes) -> FileEntry:
        """Add or replace one file, as `PUT …/resources/R/files/path` does.

        Only the resource's catalog changes; the session row is not re-saved, so neither
        `insert_date` nor `last_modified` of the session moves (facts §7).
        """
        with self._lock:
            res = self._ensure_resource(self.get_scan(experiment_id, scan_id), resource)
            entry = FileEntry.from_bytes(path, data)
            res.files[path] = entry
            return entry

    def add_disk_file(self, experiment_id: str, scan_id: str, resource: str, path: str, source: Path) -> FileEntry:
        """Add a file served from disk, read only when downloaded or hashed."""
        with self._lock:
            res = self._ensure_resource(self.get_scan(experiment_id, scan_id), resource)
            entry = FileEntry.from_disk(path, source)
            res.files[path] = entry
            return entry

    def add_synthetic_file(
        self, experiment_id: str, scan_id: str, resource: str, path: str, size: int, seed: str | None = None
    ) -> FileEntry:
        """Add a file whose content is generated on demand (for big sessions)."""
        with self._lock:
            res = self._ensure_resource(self.get_scan(experiment_id, scan_id), resource)
            entry = FileEntry.synthetic(path, size, seed or f"{experiment_id}/{scan_id}/{resource}/{path}")
            res.files[path] = entry
            return entry

    def add_synthetic_sessions(
        self,
        project: str,
        n: int,
        scans_per_session: int = 2,
        files_per_scan: int = 3,
        file_size: int = 1024,
        start: int = 1,
        first_date: date_type = date_type(2024, 1, 1),
    ) -> list[Experiment]:
        """Add `n` sessions SUB00001_MR1… (one subject SUB00001… each) with lazily generated files.

        Deterministic: the same arguments give the same labels, dates, scan types and bytes.
        """
        created: list[Experiment] = []
        with self._lock:
            for number in range(start, start + n):
                subject_label = f"SUB{number:05d}"
                session_date = first_date + timedelta(days=(number - 1) % 365)
                experiment = self.add_session(
                    project, subject_label, f"{subject_label}_MR1", date=session_date, time="09:00:00"
                )
                for scan_index in range(1, scans_per_session + 1):
                    scan_type = SYNTHETIC_SCAN_TYPES[(scan_index - 1) % len(SYNTHETIC_SCAN_TYPES)]
                    self.add_scan(experiment.id, str(scan_index), type=scan_type)
                    for file_index in range(1, files_per_scan + 1):
                        path = f"{file_index}.dcm"
                        seed = f"{project}/{subject_label}/{scan_index}/{path}"
                        self.add_synthetic_file(experiment.id, str(scan_index), "DICOM", path, file_size, seed)
                created.append(experiment)
        return created


def _date_string(value: str | date_type | None) -> str:
    if value is None:
        return ""
    if isinstance(value, date_type):
        return value.isoformat()
    return str(value)
