"""Plain data shared by the planner, the lock, the XNAT client and apply.

Values here are parsed and typed; nothing in this module does I/O.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from typing import NamedTuple

# XNAT's Timestamp.toString(): "2023-09-27 17:31:21.352" (1-9 fraction digits, trailing zeros cut).
_TIMESTAMP = re.compile(r"^(\d{4}-\d{2}-\d{2})[ T](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# Characters no name from XNAT may bring into a path: NUL, newlines, terminal escapes.
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
# What a terminal may act on in text shown to people: C0 but for tab and newline, DEL, and C1
# (\x9b is an escape sequence's start on some terminals).
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with every control character written out as Python would (`\x1b`, `\r`): names and
    messages that come from XNAT must not clear or rewrite the terminal or a log."""
    if _UNPRINTABLE.search(text) is None:
        return text
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
# What the pattern admits, fromisoformat reads as meant from Python 3.11 on: fractions of 1-9 digits
# cut (not rounded) to microseconds. A third of the cost of the general path in parse_timestamp.
_FROMISOFORMAT_READS_XNAT = sys.version_info >= (3, 11)


def parse_timestamp(text: str | None) -> datetime | None:
    """Parse an XNAT listing timestamp; '' or None means unset. Raises ValueError on garbage."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    m = _TIMESTAMP.match(text)
    if not m:
        raise ValueError(f"not an XNAT timestamp: {text!r}")
    if _FROMISOFORMAT_READS_XNAT:
        return datetime.fromisoformat(text)
    day, clock, frac = m.groups()
    micros = int((frac or "0")[:6].ljust(6, "0"))
    return datetime.fromisoformat(f"{day} {clock}").replace(microsecond=micros)


def login_name() -> str:
    """The account this process runs as, by its uid: $USER and $LOGNAME (what getpass reads first)
    name another after `su -m` or `sudo -E`, and the history and state lock would credit them."""
    import getpass
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, AttributeError):  # no passwd entry (a container), or no uid (not POSIX)
        return getpass.getuser()


def utc_now() -> str:
    """Now, as the lock, the history and the logs write times: 2026-11-25T17:09:36Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_timestamp(value: datetime | None) -> str:
    """Render like XNAT does, to the millisecond with trailing zeros cut ('.0' when whole)."""
    if value is None:
        return ""
    base = value.strftime("%Y-%m-%d %H:%M:%S")
    frac = f"{value.microsecond:06d}".rstrip("0") or "0"
    return f"{base}.{frac}"


def parse_date(text: str | None) -> str | None:
    """XNAT session dates are 'YYYY-MM-DD' or ''; keep them as strings."""
    if text is None or text.strip() == "":
        return None
    text = text.strip()
    if not _DATE.match(text):
        raise ValueError(f"not an XNAT date: {text!r}")
    try:
        date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not a date on the calendar: {text!r}") from None
    return text


# SessionKey, BidsAddress and FileStat are named tuples, not dataclasses: plan builds, hashes and
# sorts them once or more per session, and tuples do that in C.
class SessionKey(NamedTuple):
    """A session's identity: XNAT project and experiment accession ID."""

    project: str
    experiment_id: str

    def __str__(self) -> str:
        return f"{self.project}/{self.experiment_id}"


class BidsAddress(NamedTuple):
    """Where a session lives in the BIDS tree: sub-<subject>/ses-<session> (labels without prefixes)."""

    subject: str
    session: str

    @property
    def path(self) -> str:
        return f"sub-{self.subject}/ses-{self.session}"

    def __str__(self) -> str:
        return self.path


@dataclass(frozen=True)
class MalformedRow:
    """A row of a project's experiment listing with a value that does not parse: a problem for
    that session alone (it is still in XNAT: never an orphan)."""

    id: str
    label: str
    subject_label: str
    xsi_type: str
    message: str


@dataclass(frozen=True, init=False)
class Experiment:
    """One row of a project's experiment listing, parsed at the client boundary."""

    id: str
    label: str
    project: str
    subject_id: str
    subject_label: str
    date: str | None
    insert_date: datetime | None
    last_modified: datetime | None
    xsi_type: str = "xnat:mrSessionData"
    # `project` is the project listed (the session is addressed through it); a session shared into
    # it from another project is listed there under its share label, and this is the project it
    # belongs to (XNAT's `project` column). None when it is `project`, or not known.
    primary_project: str | None = None

    def __init__(
        self, id: str, label: str, project: str, subject_id: str, subject_label: str, date: str | None,
        insert_date: datetime | None, last_modified: datetime | None, xsi_type: str = "xnat:mrSessionData",
        primary_project: str | None = None,
    ) -> None:
        # One update of the instance dict instead of the generated __init__'s object.__setattr__ per
        # field, which cost twice as much (15k instructions for these 9, a third of parsing a listing
        # row; 10,000s per plan). Still frozen: __setattr__ refuses.
        self.__dict__.update(
            id=id, label=label, project=project, subject_id=subject_id, subject_label=subject_label, date=date,
            insert_date=insert_date, last_modified=last_modified, xsi_type=xsi_type, primary_project=primary_project,
        )

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.project, self.id)


@dataclass(frozen=True)
class RemoteFile:
    """A file in a scan resource, as XNAT lists it. `name` is the path below `files/`."""

    name: str
    size: int
    digest: str  # MD5 hex, or "" when XNAT has none
    uri: str
    resource: str = "DICOM"
    resource_id: str = ""  # the numeric ID in `uri`, which XNAT's zips replace by `resource`


_DIGIT_RUNS = re.compile(r"([0-9]+)")  # ASCII: int() refuses other digits (²)


def natural_key(text: str) -> tuple[str | int, ...]:
    """`text` ordered with its runs of digits as numbers: XNAT scan IDs 1 < 1-MR1 < 1.2 < 1a < 2 < 10 < SCOUT.

    A scan ID is a number or begins with one (1-MR1, 1a: a scan derived from scan 1), so each sorts
    next to the scan it is numbered after. The client lists scans and the planner names them in this order."""
    parts: list[str | int] = _DIGIT_RUNS.split(text)  # the digit runs at odd places
    parts[1::2] = map(int, parts[1::2])
    return (*parts, text)  # the text itself last: 01 and 1 in one order every time


@dataclass(frozen=True)
class Scan:
    """A scan with its files (deep listing)."""

    id: str
    type: str
    series_description: str
    files: tuple[RemoteFile, ...] = ()

    @property
    def file_count(self) -> int:
        return len(self.files)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def listing_digest(self) -> str:
        """Fingerprint of the file listing: names, sizes and MD5s, order-independent."""
        h = hashlib.sha256()
        for f in sorted(self.files, key=lambda f: (f.resource, f.name)):
            h.update(f"{f.resource}/{f.name}\t{f.size}\t{f.digest}\n".encode())
        return h.hexdigest()

    def record(self, bidsmap_target: str | None = None, protocol_name: str | None = None) -> ScanRecord:
        return ScanRecord(
            id=self.id,
            type=self.type,
            series_description=self.series_description,
            file_count=self.file_count,
            total_size=self.total_size,
            digest=self.listing_digest,
            bidsmap_target=bidsmap_target,
            protocol_name=protocol_name,
        )


@dataclass(frozen=True, init=False)
class ScanRecord:
    """What the lock keeps of a scan: enough to notice added, removed or changed files; and for
    judging rule changes, the ReproIn name the config's bidsmap gave it (None: no entry matched)
    and its DICOM ProtocolName where that differs from the series description (None: the same,
    or not recorded; the session's `unselected_scans` is None then)."""

    id: str
    type: str
    series_description: str
    file_count: int
    total_size: int
    digest: str
    bidsmap_target: str | None = None
    protocol_name: str | None = None

    def __init__(self, id: str, type: str, series_description: str, file_count: int, total_size: int,
                 digest: str, bidsmap_target: str | None = None, protocol_name: str | None = None) -> None:
        # As Experiment's; the lock decodes the records of every recorded session for a plan.
        self.__dict__.update(id=id, type=type, series_description=series_description, file_count=file_count,
                             total_size=total_size, digest=digest, bidsmap_target=bidsmap_target,
                             protocol_name=protocol_name)


@dataclass(frozen=True)
class UnselectedScan:
    """A scan of an exported session that the config's include/skip left out: with the recorded
    scans, what plan needs to tell which sessions a change of those lists affects."""

    id: str
    type: str
    series_description: str


@dataclass(frozen=True, init=False)
class OutputRecord:
    """A file apply wrote, relative to the BIDS root."""

    path: str
    size: int
    sha256: str
    mtime_ns: int

    def __init__(self, path: str, size: int, sha256: str, mtime_ns: int) -> None:
        self.__dict__.update(path=path, size=size, sha256=sha256, mtime_ns=mtime_ns)  # as Experiment's


@dataclass(frozen=True, init=False)
class SessionRecord:
    """The lock's entry for one exported session."""

    experiment_id: str
    project: str
    subject_id: str
    subject_label: str
    session_label: str
    bids_subject: str
    bids_session: str
    date: str | None
    insert_date: str  # XNAT's text, kept verbatim for diff-friendliness
    last_modified: str
    xsi_type: str
    exported_at: str
    config_fingerprint: str
    config_digests: dict[str, str] = field(default_factory=dict)  # per conversion key, for reasons
    tools: dict[str, str] = field(default_factory=dict)  # xnat2bids / heudiconv / dcm2niix versions
    scans: tuple[ScanRecord, ...] = ()
    outputs: tuple[OutputRecord, ...] = ()
    # The listed scans the config did not select; None when plan cannot judge rule changes on
    # the recorded scans: exported by format 1, or XNAT's series descriptions were not what the
    # conversion matched on (an empty one, or one that differs from the DICOM's).
    unselected_scans: tuple[UnselectedScan, ...] | None = None

    def __init__(
        self, experiment_id: str, project: str, subject_id: str, subject_label: str, session_label: str,
        bids_subject: str, bids_session: str, date: str | None, insert_date: str, last_modified: str,
        xsi_type: str, exported_at: str, config_fingerprint: str, config_digests: dict[str, str] | None = None,
        tools: dict[str, str] | None = None, scans: tuple[ScanRecord, ...] = (), outputs: tuple[OutputRecord, ...] = (),
        unselected_scans: tuple[UnselectedScan, ...] | None = None,
    ) -> None:
        # As Experiment's: with its outputs, a fifth less CPU to decode a lock entry.
        self.__dict__.update(
            experiment_id=experiment_id, project=project, subject_id=subject_id, subject_label=subject_label,
            session_label=session_label, bids_subject=bids_subject, bids_session=bids_session, date=date,
            insert_date=insert_date, last_modified=last_modified, xsi_type=xsi_type, exported_at=exported_at,
            config_fingerprint=config_fingerprint,
            config_digests={} if config_digests is None else config_digests,
            tools={} if tools is None else tools,
            scans=scans, outputs=outputs, unselected_scans=unselected_scans,
        )

    @property
    def key(self) -> SessionKey:
        return SessionKey(self.project, self.experiment_id)

    @property
    def address(self) -> BidsAddress:
        return BidsAddress(self.bids_subject, self.bids_session)


class FileStat(NamedTuple):
    """What the local scan saw of a recorded output."""

    size: int
    mtime_ns: int
