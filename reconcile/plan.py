"""The planner: a pure function of (lock, remote listing, local scan, config) → Plan.

It decides what apply should do and why, and never touches the network or the disk.
Identity comes first (experiment IDs, then BIDS addresses), content second (dates,
scan fingerprints, config digests, file stats).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from functools import cache
from typing import TYPE_CHECKING

from reconcile.config import Config, ConversionSettings, NamingSettings, select
from reconcile.errors import UnsafePathError
from reconcile.lock import Lock
from reconcile.model import (
    BidsAddress,
    Experiment,
    FileStat,
    MalformedRow,
    Scan,
    ScanRecord,
    SessionKey,
    SessionRecord,
    UnselectedScan,
    format_timestamp,
    natural_key,
    parse_timestamp,
)
from reconcile.naming import address_for, check_accession_id

if TYPE_CHECKING:
    from packaging.version import Version

CONVERTER_TOOLS = ("heudiconv", "dcm2niix")
# Image sessions are what gets converted; subject assessors such as QC or FreeSurfer runs are not.
SESSION_TYPES_SUFFIX = "SessionData"
MR_SUFFIX = "mrSessionData"  # xnat:mrSessionData, and PET/MR: xnat:petmrSessionData


class Action(str, Enum):
    CREATE = "create"
    UPDATE = "update"
    DRIFT = "drift"
    ORPHAN = "orphan"
    NOOP = "noop"


ACTION_ORDER = {a: i for i, a in enumerate(Action)}


@dataclass(frozen=True)
class Reason:
    """Why a change is planned: a machine-readable code plus a sentence for people."""

    code: str
    message: str
    field: str | None = None
    before: str | None = None
    after: str | None = None


_NEW = (Reason("new", "new in XNAT"),)


@dataclass(frozen=True, init=False)
class Change:
    action: Action
    key: SessionKey
    address: BidsAddress
    reasons: tuple[Reason, ...]
    before: SessionRecord | None = None  # the lock entry (for a replacement: the replaced one)
    after: Experiment | None = None  # the XNAT listing row; None for orphans
    scans: tuple[Scan, ...] | None = None  # deep details when planned with --deep
    # Recorded outputs changed on disk that applying this update replaces: it is drift too.
    edited: tuple[str, ...] = ()

    def __init__(
        self, action: Action, key: SessionKey, address: BidsAddress, reasons: tuple[Reason, ...],
        before: SessionRecord | None = None, after: Experiment | None = None, scans: tuple[Scan, ...] | None = None,
        edited: tuple[str, ...] = (),
    ) -> None:
        # As Experiment's: one dict update instead of an object.__setattr__ per field (one change per
        # listed session in a first plan).
        self.__dict__.update(
            action=action, key=key, address=address, reasons=reasons, before=before, after=after, scans=scans,
            edited=edited,
        )


@dataclass(frozen=True)
class Problem:
    """Something that stops part of the plan; the CLI exits 1 when any exist."""

    message: str
    project: str | None = None
    experiment_id: str | None = None
    hint: str | None = None
    # `message` without the words of a server it quotes (an error page may echo anything): what
    # the history keeps, which git shares further than a console. None: `message` quotes none.
    summary: str | None = None


@dataclass(frozen=True)
class Selection:
    projects: tuple[str, ...] = ()
    subjects: tuple[str, ...] = ()  # globs on the XNAT subject label or the BIDS subject
    sessions: tuple[str, ...] = ()  # globs on the XNAT session label, experiment ID or BIDS session
    # (project, globs on its session labels, experiment IDs or BIDS sessions): the config's
    # `exclude`, sessions left out of every plan, as if XNAT did not list them and the lock did not
    # record them (neither created, updated nor orphaned).
    excluded: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def wants(self, subject_label: str, bids_subject: str, session_label: str, exp_id: str, bids_session: str) -> bool:
        return select(self.subjects, subject_label, bids_subject) and select(
            self.sessions, session_label, exp_id, bids_session
        )

    def excludes(self, project: str, session_label: str, exp_id: str, bids_session: str) -> bool:
        return any(p == project and select(globs, session_label, exp_id, bids_session) for p, globs in self.excluded)

    def holds(self, rec: SessionRecord) -> bool:
        """A recorded session is selected: its project, subject and session."""
        return (not self.projects or rec.project in self.projects) and self.wants(
            rec.subject_label, rec.bids_subject, rec.session_label, rec.experiment_id, rec.bids_session
        ) and not self.excludes(rec.project, rec.session_label, rec.experiment_id, rec.bids_session)


@dataclass(frozen=True)
class ProjectListing:
    """One project's experiment listing; `experiments` is None when the request failed."""

    project: str
    experiments: tuple[Experiment, ...] | None
    error: str | None = None
    malformed: tuple[MalformedRow, ...] = ()  # rows left out of `experiments`: each its session's problem
    error_summary: str | None = None  # `error` without what the server answered (for the history)


@dataclass(frozen=True)
class RemoteState:
    listings: tuple[ProjectListing, ...]
    deep: Mapping[str, tuple[Scan, ...]] | None = None  # by experiment ID; None when not deep


@dataclass(frozen=True)
class LocalState:
    """Stat results for the lock's recorded outputs; a missing path is absent from `files`.
    `same_content`: outputs whose modification time changed but whose bytes are the recorded ones
    (their sha256 was checked): a copy, a clone, a restore from backup. Not drift. An output that
    is a link out of the root (`outside`) is not judged by its target: it is drift, as for check.
    `hashed_now`: how many of `same_content` were hashed for this look (the others were vouched
    for by an earlier one). `differs`: outputs with their recorded size and time but not their
    recorded sha256 (looked for only when asked: `--full`)."""

    files: Mapping[str, FileStat]
    same_content: frozenset[str] = frozenset()
    outside: frozenset[str] = frozenset()  # outputs that are now links out of the BIDS root
    hashed_now: int = 0
    differs: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...]
    unchanged: int
    problems: tuple[Problem, ...]
    notes: tuple[str, ...]
    lineage: str
    serial: int
    deep: bool
    projects: tuple[str, ...] = ()

    @property
    def has_changes(self) -> bool:
        return bool(self.changes)

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action is action)

    def actionable(self, *, repair_drift: bool = False) -> tuple[Change, ...]:
        """The changes apply carries out: create and update, plus drift when asked. An update
        that would replace outputs changed on disk is drift too: only when asked."""
        wanted = {Action.CREATE, Action.UPDATE} | ({Action.DRIFT} if repair_drift else set())
        chosen = tuple(c for c in self.changes if c.action in wanted and (repair_drift or not c.edited))
        # A subject renamed moves with all of its sessions or with none: one held back would
        # leave the same person under two labels (two participants) until it is repaired.
        waiting = set() if repair_drift else {m for c in self.changes if c.edited and (m := subject_move(c))}
        return tuple(c for c in chosen if subject_move(c) not in waiting) if waiting else chosen


@dataclass
class _Collector:
    changes: list[Change] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unchanged: int = 0
    drifted: int = 0  # DRIFT changes
    outdated: int = 0  # unchanged sessions converted with older tools
    unaffected: int = 0  # unchanged sessions exported under other settings that convert the same


def _size(n: int) -> str:
    value = float(abs(n))
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            text = f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            return ("-" if n < 0 else "+") + text
        value /= 1000
    raise AssertionError("unreachable")


def recorded_scans(listed: Iterable[Scan], settings: ConversionSettings,
                   names: Mapping[str, tuple[str, str]] | None
                   ) -> tuple[tuple[ScanRecord, ...], tuple[UnselectedScan, ...] | None]:
    """What the lock keeps of a session's listed scans: the selected ones, each with the name the
    bidsmap gave it and its ProtocolName; and the ones include/skip left out, or None when rule
    changes cannot be judged on XNAT's series descriptions. `names`: the conversion's
    (SeriesDescription, ProtocolName) per exported scan (None: not known)."""
    selected, unselected = [], []
    judged = names is not None
    for s in listed:
        if not s.series_description:  # the conversion goes by the ProtocolName, which XNAT does not list
            judged = False
        if not settings.selects(s.id, s.series_description):
            unselected.append(UnselectedScan(s.id, s.type, s.series_description))
            continue
        description, protocol = (names or {}).get(s.id, (s.series_description, s.series_description))
        # Without a ProtocolName heudiconv takes Siemens' private (CSA) one, unseen here.
        judged = judged and s.id in names and description == s.series_description and protocol != ""
        try:
            name = settings.scan_name(description, protocol)
        except ValueError:  # the conversion refused it; nothing was named
            name = None
        selected.append(s.record(name, protocol if protocol != description else None))
    return tuple(selected), tuple(unselected) if judged else None


_CONFLICT = "\0conflict"  # `_Judge.name`'s answer when bidsmap entries that disagree match


class _Judge:
    """One ConversionSettings' include/skip and bidsmap answers, memoised: a rule change that
    affects no session is judged again on every plan, for every recorded scan (10,000 sessions ×
    10 scans), and the sessions of a study share their series."""

    def __init__(self, settings: ConversionSettings) -> None:
        self.settings = settings
        self._selected: dict[tuple[str, str], bool] = {}
        self._names: dict[tuple[str, str], str | None] = {}

    def selects(self, scan_id: str, description: str) -> bool:
        found = self._selected.get((scan_id, description))
        if found is None:
            found = self._selected[scan_id, description] = self.settings.selects(scan_id, description)
        return found

    def name(self, description: str, protocol_name: str) -> str | None:
        key = (description, protocol_name)
        if key not in self._names:
            try:
                self._names[key] = self.settings.scan_name(description, protocol_name)
            except ValueError:
                self._names[key] = _CONFLICT
        return self._names[key]


@cache
def _judge(settings: ConversionSettings) -> _Judge:
    return _Judge(settings)


def _rule_changes(rec: SessionRecord, settings: ConversionSettings, changed: list[str]) -> tuple[list[str], str]:
    """Of the conversion settings that `changed` since `rec` was exported, those that change its
    conversion, and what they change. include/skip and bidsmap act on scan IDs, series
    descriptions and protocol names, which the record keeps (without its unselected scans, as
    from format 1, every change counts); a heuristic is code and always counts."""
    if rec.unselected_scans is None:
        return changed, ""
    effects: list[str] = []
    affecting = [k for k in changed if k not in ("include", "skip", "bidsmap")]
    judge = _judge(settings)
    kept = [judge.selects(s.id, s.series_description) for s in rec.scans]
    if "include" in changed or "skip" in changed:
        dropped = [s for s, keep in zip(rec.scans, kept) if not keep]
        added = [s for s in rec.unselected_scans if judge.selects(s.id, s.series_description)]
        effects += [f"scan {s.id} ({s.series_description}) left out" for s in dropped]
        effects += [f"scan {s.id} ({s.series_description}) now selected" for s in added]
        if dropped or added:
            affecting += [k for k in changed if k in ("include", "skip")]
    if "bidsmap" in changed:
        renamed = [(s, judge.name(s.series_description, s.protocol_name or s.series_description))
                   for s, keep in zip(rec.scans, kept) if keep]
        renamed = [(s, name) for s, name in renamed if name != s.bidsmap_target]
        effects += [_renaming(s, name) for s, name in renamed]
        if renamed:
            affecting.append("bidsmap")
    shown = "; ".join(effects[:3]) + (f"; {len(effects) - 3} more" if len(effects) > 3 else "")
    return sorted(affecting), shown


def _renaming(scan: ScanRecord, name: str | None) -> str:
    what = f"scan {scan.id} ({scan.series_description})"
    if name == _CONFLICT:
        return f"{what} matches bidsmap entries that disagree"
    if scan.bidsmap_target is None:
        return f"{what} now named {name}"
    if name is None:
        return f"{what} no longer named {scan.bidsmap_target}"
    return f"{what} named {scan.bidsmap_target} → {name}"


def _scan_reasons(recorded: tuple[ScanRecord, ...], remote: tuple[Scan, ...], listed: set[str],
                  unselected: Iterable[UnselectedScan] = ()) -> list[Reason]:
    """Recorded scans against the selected ones XNAT lists (`listed`: the IDs of all it lists;
    `unselected`: the scans the record says the config left out)."""
    before = {s.id: s for s in recorded}
    after = {s.id: s.record() for s in remote}
    left_out = {s.id for s in unselected}
    reasons = []
    for sid in sorted(set(before) | set(after), key=natural_key):
        old, new = before.get(sid), after.get(sid)
        if old is None and sid in left_out:  # there before: the selection changed, not the session
            reasons.append(Reason("scan_selected", f"scan {sid} now selected by the config", f"scan:{sid}", None,
                                  new.series_description))
        elif old is None:
            reasons.append(Reason("scan_added", f"scan {sid} added", f"scan:{sid}", None, new.series_description))
        elif new is None and sid in listed:  # still in XNAT: the selection changed, not the session
            reasons.append(Reason("scan_deselected", f"scan {sid} no longer selected by the config", f"scan:{sid}",
                                  old.series_description, None))
        elif new is None:
            reasons.append(Reason("scan_removed", f"scan {sid} removed", f"scan:{sid}", old.series_description, None))
        elif old.digest != new.digest:
            delta = new.file_count - old.file_count
            if delta > 0:
                what = f"{delta} file{'s' if delta != 1 else ''} added"
            elif delta < 0:
                what = f"{-delta} file{'s' if delta != -1 else ''} removed"
            else:
                what = "files changed"
            msg = f"scan {sid}: {what} ({_size(new.total_size - old.total_size)})"
            reasons.append(Reason("scan_files", msg, f"scan:{sid}", str(old.file_count), str(new.file_count)))
    return reasons


# Conversion settings with their digests, as `_conversion_lookup` hands them out.
_Conversion = tuple[ConversionSettings, dict[str, str]]


def _conversion_lookup(config: Config) -> Callable[[str, str, str], _Conversion]:
    """`config.conversion_for` and its digests, computed once per project: only the sessions that
    a project's `sessions` table names have settings of their own (about 10 µs a call, once per
    listed session otherwise)."""
    known: dict[tuple[str, str | None], _Conversion] = {}

    def conversion(project: str, label: str, experiment_id: str) -> _Conversion:
        key = (project, config.session_table_key(project, label, experiment_id))
        found = known.get(key)
        if found is None:
            settings = config.conversion_for(project, label, experiment_id)
            found = known[key] = (settings, settings.digests())
        return found

    return conversion


def older(recorded: str | None, installed: str) -> bool:
    """Whether a session converted with tool version `recorded` (None: not recorded) is outdated
    by `installed`: in PEP 440's order where both follow it ("1.4.0rc1" < "1.4.0", "v1.0.20240202"),
    else numbers compared as numbers. A newer recorded version (a colleague's install on a shared
    root) is not."""
    if recorded is None:
        return True
    a, b = _pep440(recorded), _pep440(installed)
    if a is not None and b is not None:
        return a < b
    return _version_key(recorded) < _version_key(installed)


@cache  # a handful of distinct versions, asked about for every unchanged session
def _pep440(version: str) -> Version | None:
    # packaging takes 20 ms to import: paid only where versions are compared.
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version)
    except InvalidVersion:
        return None


@cache
def _version_key(version: str) -> tuple[tuple[str | int, ...], ...]:
    return tuple(natural_key(p) for p in re.findall(r"\d+|[^\d.\-_+]+", version))


def same_time(a: str | None, b: datetime | None) -> bool:
    """Whether a recorded XNAT timestamp (text) is `b`; a malformed one is not."""
    try:
        return parse_timestamp(a) == b
    except ValueError:
        return False


def _handover(label: str, subject_id: str, own_label: str | None, by_subject: Mapping[str, list[SessionRecord]],
              seen: Mapping[str, tuple[Experiment, BidsAddress]]) -> tuple[SessionRecord, bool] | None:
    """A session of another XNAT subject that the lock records at BIDS subject `label` and that
    this plan moves to another label (`label` is being handed over, a chain of renames), and
    whether that chain comes round (a swap: no run frees the label). None when nobody leaves it.
    `own_label`: the label the subject moving in leaves (None for a new session)."""
    first: SessionRecord | None = None
    labels = {label}
    current, mover = label, subject_id
    while True:
        holder = next((o for o in by_subject.get(current, ())
                       if o.subject_id != mover and o.experiment_id in seen
                       and seen[o.experiment_id][1].subject != current), None)
        if holder is None:
            return None if first is None else (first, False)
        first = first or holder
        current, mover = seen[holder.experiment_id][1].subject, holder.subject_id
        if current == own_label or current in labels:
            return first, True
        labels.add(current)


def _renamed(old: str, new: str, field: str, *, by_xnat: bool) -> Reason:
    """A new BIDS label: XNAT's label changed, or (same label) the config's [naming] did."""
    message = f"renamed {old} → {new}" if by_xnat else f"config changed: naming ({old} → {new})"
    return Reason("renamed", message, field, old, new)


def _compare(
    rec: SessionRecord,
    exp: Experiment,
    address: BidsAddress,
    naming: NamingSettings,
    conversion: _Conversion,
    scans: tuple[Scan, ...] | None,
    tools: Mapping[str, str],
    reconvert_outdated: bool,
) -> list[Reason]:
    reasons: list[Reason] = []
    if rec.project != exp.project:
        reasons.append(Reason("moved", f"project {rec.project} → {exp.project}", "project", rec.project, exp.project))
    if rec.bids_subject != address.subject:
        old, new = f"sub-{rec.bids_subject}", f"sub-{address.subject}"
        reasons.append(_renamed(old, new, "subject", by_xnat=rec.subject_label != exp.subject_label))
    if rec.bids_session != address.session:
        old, new = f"ses-{rec.bids_session}", f"ses-{address.session}"
        strips = naming.session_label == "strip-subject" and exp.id not in naming.sessions \
            and exp.label not in naming.sessions
        if strips and rec.session_label == exp.label and rec.subject_label != exp.subject_label:
            # The session's label is read with its subject's, which XNAT renamed.
            if exp.label.startswith(exp.subject_label + "_"):
                why = f"session label {exp.label} now begins with the new subject label {exp.subject_label}"
            else:
                why = (f"session label {exp.label} does not begin with the new subject label {exp.subject_label}; "
                       f"[naming.sessions] can keep {old}")
            reasons.append(Reason("renamed", f"renamed {old} → {new} ({why})", "session", old, new))
        else:
            reasons.append(_renamed(old, new, "session", by_xnat=rec.session_label != exp.label))
    if rec.date != exp.date:
        msg = f"date {rec.date or '(none)'} → {exp.date or '(none)'} (re-dated in XNAT)"
        reasons.append(Reason("redated", msg, "date", rec.date, exp.date))
    if not same_time(rec.insert_date, exp.insert_date):
        after = format_timestamp(exp.insert_date)
        msg = f"insert_date {rec.insert_date} → {after} (re-archived in XNAT)"
        reasons.append(Reason("reinserted", msg, "insert_date", rec.insert_date, after))
    # Re-saved and nothing else to say (a re-date moves last_modified too): the deep pass then says
    # whether the content changed.
    resaved = not reasons and not same_time(rec.last_modified, exp.last_modified)
    if resaved:
        after = format_timestamp(exp.last_modified)
        reasons.append(Reason("modified", f"modified in XNAT at {after}", "last_modified", rec.last_modified, after))
    settings, digests = conversion
    if scans is not None:
        # The lock records only the scans the config selects; compare like with like.
        selected = tuple(s for s in scans if settings.selects(s.id, s.series_description))
        scan_reasons = _scan_reasons(rec.scans, selected, {s.id for s in scans}, rec.unselected_scans or ())
        reasons += scan_reasons
        if resaved and not scan_reasons:
            reasons.append(Reason("no_content_change", "deep comparison found no content change"))
    if rec.config_digests != digests:
        legacy = settings.legacy_digests()
        changed = sorted(k for k in digests if rec.config_digests.get(k) not in (digests[k], legacy.get(k)))
        changed, effects = _rule_changes(rec, settings, changed) if changed else (changed, "")
        if changed:
            msg = f"config changed: {', '.join(changed)}" + (f" ({effects})" if effects else "")
            reasons.append(Reason("config", msg, "config", None, ",".join(changed)))
    if reconvert_outdated:
        for tool in CONVERTER_TOOLS:
            old, new = rec.tools.get(tool), tools.get(tool)
            if new and older(old, new):
                msg = f"converted with {tool} {old or '(unknown)'}, now {new}"
                reasons.append(Reason("outdated", msg, tool, old, new))
    return reasons


def edited(rec: SessionRecord, local: LocalState) -> list[Reason]:
    """The outputs of `rec` changed on disk: what an update of it would replace (its reasons'
    `field` is the output's path)."""
    return [r for r in _drift(rec, local) if r.code == "changed"]


def _edited_paths(drift: list[Reason]) -> tuple[str, ...]:
    return tuple(r.field for r in drift if r.code == "changed")


def _drift(rec: SessionRecord, local: LocalState) -> list[Reason]:
    reasons = []
    for out in rec.outputs:
        seen = local.files.get(out.path)
        if out.path in local.outside:
            reasons.append(Reason("changed", f"changed: {out.path} (now a link out of the BIDS root)", out.path))
        elif seen is None:
            reasons.append(Reason("missing", f"missing: {out.path}", out.path))
        elif seen.size != out.size:
            reasons.append(Reason("changed", f"changed: {out.path} (size {out.size} → {seen.size})", out.path))
        elif seen.mtime_ns != out.mtime_ns and out.path not in local.same_content:
            reasons.append(Reason("changed", f"changed: {out.path} (modified on disk)", out.path))
        elif out.path in local.differs:
            reasons.append(Reason("changed", f"changed: {out.path} (its sha256 is not the recorded one)", out.path))
    return reasons


def _unused_tables(config: Config, remote: RemoteState, records: Iterable[SessionRecord]) -> list[str]:
    """Config tables that select nothing, said aloud: a typo in a project's name or a session's
    key would otherwise silently convert with the defaults."""
    notes = []
    known = {*config.projects, *(r.project for r in records), *(p.project for p in remote.listings)}
    # In pi-study each dataset sees its own project only: the others' tables are not for it.
    for project in sorted(set(config.project_tables) - known) if config.layout != "pi-study" else ():
        notes.append(f"[project.{project}] names a project that is neither configured, exported nor listed")
    for listing in remote.listings:
        own = config.project_tables.get(listing.project, {}).get("sessions", {})
        if not own or listing.experiments is None:
            continue
        names = {e.id for e in listing.experiments} | {e.label for e in listing.experiments}
        unused = sorted(k for k in own if k not in names)
        if unused:
            notes.append(f"[project.{listing.project}.sessions] names no session of {listing.project} in XNAT "
                         f"(by label or experiment ID): {', '.join(unused)}")
    renames = config.naming.sessions
    for listing in remote.listings if renames else ():
        for e in listing.experiments or ():
            if e.id in renames and e.label in renames and renames[e.id] != renames[e.label]:
                notes.append(f'[naming.sessions] names session {e.id} twice, "{e.id}" = "{renames[e.id]}" and '
                             f'"{e.label}" = "{renames[e.label]}": the experiment ID\'s is used')
    return notes


def compute_plan(
    lock: Lock,
    remote: RemoteState,
    local: LocalState,
    config: Config,
    *,
    selection: Selection = Selection(),
    tools: Mapping[str, str] | None = None,
    reconvert_outdated: bool = False,
) -> Plan:
    """Compare desired (XNAT), recorded (lock) and actual (disk) state. Pure: no I/O."""
    out = _Collector()
    # The lock's records, decoded once: every step below looks at all of them.
    sessions = dict(lock.sessions.items())
    records = sessions.values()
    selection = replace(selection, excluded=config.exclusions())
    wanted = _selector(selection)

    # 1. Listings: a failed or suspiciously empty listing blocks its project, never orphans it.
    rows, blocked, malformed_ids = _listed_rows(remote, records, selection, out)

    # 2. Addresses of every listed session, selected or not: identity and collisions are facts
    #    about the whole listing; the selection only decides which changes and problems are shown.
    listed_ids = {e.id for e in rows}
    present_ids = listed_ids | malformed_ids  # unsafe ones too: they are not gone from XNAT
    rows = _unambiguous(rows, len(listed_ids), wanted, out)
    listed_ok = {p.project for p in remote.listings} - blocked
    # The config's order (then --project's, in which the listings come) picks among a new session's shares.
    order = dict.fromkeys((*config.projects, *(listing.project for listing in remote.listings)))
    ranks = {project: i for i, project in enumerate(order)}
    # A new session shared in from a configured project this run does not plan (-p) waits for that
    # project's own plan; in the pi-study layout each study's dataset has a copy of its own.
    unplanned = set() if config.layout == "pi-study" else set(config.projects) - listed_ok
    seen = _addressed(_homes(rows, sessions, listed_ok, blocked | unplanned, ranks), config.naming, wanted, out)
    colliding = _collisions(seen, sessions, config.naming, wanted, out)

    # 3. Match remote sessions with lock entries: by ID, then by address (re-archived).
    replaced_ids = _session_changes(
        seen, colliding, sessions, present_ids=present_ids, listed_ok=listed_ok, blocked=blocked,
        deep_scans=remote.deep, local=local, config=config, selection=selection, wanted=wanted,
        tools=tools or {}, reconvert_outdated=reconvert_outdated, out=out,
    )

    # 4. Lock entries gone from a successfully listed project are orphans (never deleted).
    gone = _orphans(records, present_ids, replaced_ids, listed_ok, selection, out)

    deep = remote.deep is not None
    out.notes += _notes(out, gone, local, config, remote, records, selection, deep=deep)
    out.notes += _excluded_note(rows, seen, sessions, selection)
    out.notes += _not_mr_note(out.changes, config)
    out.notes += _unlisted_projects_note(records, remote, config)
    changes = sorted(out.changes, key=lambda c: (ACTION_ORDER[c.action], c.address, c.key))
    return Plan(
        changes=tuple(changes),
        unchanged=out.unchanged,
        problems=tuple(out.problems),
        notes=tuple(out.notes),
        lineage=lock.lineage,
        serial=lock.serial,
        deep=deep,
        projects=tuple(sorted(p.project for p in remote.listings)),
    )


# Experiment ID → its listing row and BIDS address: one per listed session whose address is safe.
_Listed = dict[str, tuple[Experiment, BidsAddress]]
# Whether a listed session, at its BIDS address when known, is one the selection shows.
_Wanted = Callable[[Experiment, BidsAddress | None], bool]


def _selector(selection: Selection) -> _Wanted:
    """`selection` as a test of listed sessions; without --subject, --session or an exclusion it
    passes every one."""
    if not selection.subjects and not selection.sessions and not selection.excluded:
        return lambda exp, address: True

    def wanted(exp: Experiment, address: BidsAddress | None) -> bool:
        sub = address.subject if address else exp.subject_label
        ses = address.session if address else exp.label
        return selection.wants(exp.subject_label, sub, exp.label, exp.id, ses) and not selection.excludes(
            exp.project, exp.label, exp.id, ses)

    return wanted


def _listed_rows(remote: RemoteState, records: Iterable[SessionRecord], selection: Selection,
                 out: _Collector) -> tuple[list[Experiment], set[str], set[str]]:
    """The image sessions of the listings to plan from, the projects blocked (their listing failed,
    or is empty where the lock records sessions) and the IDs of the rows XNAT lists malformed."""
    blocked: set[str] = set()
    rows: list[Experiment] = []
    malformed_ids: set[str] = set()
    for listing in sorted(remote.listings, key=lambda p: p.project):
        if listing.experiments is None:
            blocked.add(listing.project)
            out.problems.append(
                Problem(f"listing of project {listing.project} failed: {listing.error}", listing.project,
                        hint="nothing was planned for this project; fix the cause and plan again",
                        summary=f"listing of project {listing.project} failed"
                                + (f": {listing.error_summary}" if listing.error_summary else ""))
            )
            continue
        listed = [e for e in listing.experiments if e.xsi_type.endswith(SESSION_TYPES_SUFFIX)]
        bad_here = _malformed(listing, selection, out)
        malformed_ids |= bad_here
        recorded = [] if listed or bad_here else [r for r in records
                                                  if r.project == listing.project and selection.holds(r)]
        if recorded:
            blocked.add(listing.project)
            out.problems.append(
                Problem(
                    f"XNAT listed no sessions for project {listing.project}, but the lock records {len(recorded)}",
                    listing.project,
                    hint="refusing to treat every session as deleted; check the project ID and your access rights "
                         "(if they really were deleted in XNAT, `xnat2bids forget ID` drops each from the lock)",
                )
            )
            continue
        rows += listed
    return rows, blocked, malformed_ids


def _malformed(listing: ProjectListing, selection: Selection, out: _Collector) -> set[str]:
    """The IDs of the image sessions `listing` left out as malformed; each selected one is a problem."""
    ids = set()
    selects_all = not selection.subjects and not selection.sessions
    for bad in listing.malformed:
        if bad.xsi_type.endswith(SESSION_TYPES_SUFFIX):
            ids.add(bad.id)
            if selects_all or selection.wants(bad.subject_label, "", bad.label, bad.id, ""):
                out.problems.append(Problem(
                    f"session {bad.id} ({listing.project}/{bad.label}): XNAT lists it with a malformed value "
                    f"({bad.message})", listing.project, bad.id,
                    hint="nothing was planned for this session; correct the value in XNAT"))
    return ids


def _unambiguous(rows: list[Experiment], distinct: int, wanted: _Wanted, out: _Collector) -> list[Experiment]:
    """`rows` (`distinct` experiment IDs) without the sessions one project's listing names twice with
    other values: which row is XNAT's is unknown (taking the first would flip label or date with the
    rows' order)."""
    listed_twice = set()
    if distinct < len(rows):  # an ID twice: in one listing, or shared into two projects
        listed_twice = {k for k, n in Counter((e.project, e.id) for e in rows).items() if n > 1}
    rows_of: dict[tuple[str, str], set[Experiment]] = defaultdict(set)
    for exp in rows if listed_twice else ():
        if (exp.project, exp.id) in listed_twice:
            rows_of[exp.project, exp.id].add(exp)
    for (project, exp_id), twins in sorted((k, v) for k, v in rows_of.items() if len(v) > 1):
        if any(wanted(e, None) for e in twins):
            labels = ", ".join(sorted({f"{e.subject_label}/{e.label} dated {e.date or '(none)'}" for e in twins}))
            out.problems.append(Problem(f"session {exp_id} ({project}): XNAT lists it {len(twins)} times, with other "
                                        f"values ({labels})", project, exp_id,
                                        hint="nothing was planned for this session; plan again, or ask the XNAT admin"))
    if any(len(v) > 1 for v in rows_of.values()):
        return [e for e in rows if len(rows_of.get((e.project, e.id), ())) <= 1]
    return rows


def _homes(rows: list[Experiment], sessions: Mapping[str, SessionRecord], listed_ok: set[str], waiting: set[str],
           ranks: Mapping[str, int]) -> list[Experiment]:
    """The row each listed session is planned from: XNAT lists a session shared into other projects
    in each of them, under the label it has there. `ranks`: the projects in the config's order."""
    first: dict[str, Experiment] = {}
    more: dict[str, list[Experiment]] = {}
    for exp in rows:
        if (earlier := first.setdefault(exp.id, exp)) is not exp:
            more.setdefault(exp.id, [earlier]).append(exp)
    homes = []
    for exp_id, exp in first.items():
        rec = sessions.get(exp_id)
        if exp_id not in more and (exp.primary_project is None if rec is None else rec.project == exp.project):
            homes.append(exp)  # listed once, by its own project or the recorded one: nearly every session
        elif (home := _home(more.get(exp_id) or [exp], rec, listed_ok, waiting, ranks)) is not None:
            homes.append(home)
    return homes


def _home(rows: list[Experiment], rec: SessionRecord | None, listed_ok: set[str], waiting: set[str],
          ranks: Mapping[str, int]) -> Experiment | None:
    """Which of one session's rows it is planned from, or None: not planned this time.

    A share is never read as a move: a session listed by the project the lock records it under is
    planned from that project's row; while that project is not listed (its listing failed, or it is
    not planned) the session is not planned at all, as the rest of that project, since its rows
    elsewhere cannot tell a move from a share. Otherwise (new, or gone from the recorded project:
    moved) it goes to the project it belongs to in XNAT when that one lists it, and waits while that
    one is `waiting` (its listing failed, or it is configured but not planned this run: created under
    a share now, it would stay there); else to the first project in the config's order, whatever the
    projects' names or the lock's history."""
    if rec is not None:
        for exp in rows:
            if exp.project == rec.project:
                return exp
        if rec.project not in listed_ok:
            return None
    owners = {exp.primary_project for exp in rows if exp.primary_project is not None}
    if len(owners) == 1:  # said by the rows of its shares
        [owner] = owners
        if owner in waiting:
            return None
        for exp in rows:
            if exp.project == owner:
                return exp
    return min(rows, key=lambda e: (ranks.get(e.project, len(ranks)), e.project))


def _addressed(rows: list[Experiment], naming: NamingSettings, wanted: _Wanted, out: _Collector) -> _Listed:
    """Each session of `rows` (one row each) with its BIDS address; an unsafe ID or label is its
    problem instead."""
    seen: _Listed = {}
    for exp in sorted(rows, key=lambda e: (e.project, e.id)):
        try:
            check_accession_id(exp.id)  # it names the session's files in the work area
            address = address_for(exp, naming)
        except UnsafePathError as exc:
            if wanted(exp, None):
                out.problems.append(Problem(f"session {exp.id} ({exp.project}): {exc.summary}", exp.project, exp.id,
                                            exc.hint))
            continue
        seen[exp.id] = (exp, address)
    return seen


def _collisions(seen: _Listed, sessions: Mapping[str, SessionRecord], naming: NamingSettings, wanted: _Wanted,
                out: _Collector) -> set[str]:
    """The IDs of the sessions that would share a folder with another one: none of them is planned."""
    at_address: dict[BidsAddress, list[Experiment]] = defaultdict(list)
    for exp, address in seen.values():
        at_address[address].append(exp)
    colliding = _case_twins(at_address, sessions, wanted, out)
    for address, exps in sorted((a, exps) for a, exps in at_address.items() if len(exps) > 1):
        colliding.update(e.id for e in exps)
        if any(wanted(e, address) for e in exps):
            names = " and ".join(f"{e.id} ({e.project}/{e.subject_label}/{e.label})" for e in exps)
            mapped = [e.subject_label for e in exps if e.subject_label in naming.subjects]
            if len({e.subject_label for e in exps}) > 1 and mapped:  # two XNAT subjects made one
                hint = (f'[naming.subjects] maps "{mapped[0]}" to "{address.subject}", where another XNAT '
                        f"subject's sessions already go: map it to a label of its own")
            else:
                hint = f'give one a distinct label in [naming.sessions], e.g. "{exps[1].id}" = "{address.session}b"'
            out.problems.append(Problem(f"{names} both map to {address.path}", exps[0].project, exps[0].id, hint=hint))
    return colliding


def _case_twins(at_address: Mapping[BidsAddress, list[Experiment]], sessions: Mapping[str, SessionRecord],
                wanted: _Wanted, out: _Collector) -> set[str]:
    """The IDs of the sessions that would move in next to a folder differing from theirs only in case.

    Such addresses are one folder on a case-insensitive file system (macOS, SMB shares): the
    second commit would replace the first session's files."""
    colliding: set[str] = set()
    folded: dict[tuple[str, str], list[BidsAddress]] = defaultdict(list)
    if len({(a.subject.casefold(), a.session.casefold()) for a in at_address}) < len(at_address):
        for address in at_address:
            folded[address.subject.casefold(), address.session.casefold()].append(address)
    for addresses in (sorted(a) for a in folded.values() if len(a) > 1):
        # Sessions recorded side by side already (a case-sensitive file system) stay as they are;
        # only one moving in next to its case twin is refused.
        newcomers = [e for a in addresses for e in at_address[a]
                     if e.id not in sessions or sessions[e.id].address != a]
        if not newcomers:
            continue
        colliding.update(e.id for e in newcomers)
        if any(wanted(e, a) for a in addresses for e in at_address[a]):
            names = " and ".join(f"{e.id} ({e.project}/{e.subject_label}/{e.label}) at {a.path}"
                                 for a in addresses for e in at_address[a])
            out.problems.append(Problem(
                f"{names} differ only in case: one folder where the file system ignores case", newcomers[0].project,
                newcomers[0].id, hint="give one a label of its own in [naming.subjects] or [naming.sessions]"))
    return colliding


def _session_changes(
    seen: _Listed,
    colliding: set[str],
    sessions: Mapping[str, SessionRecord],
    *,
    present_ids: set[str],
    listed_ok: set[str],
    blocked: set[str],
    deep_scans: Mapping[str, tuple[Scan, ...]] | None,
    local: LocalState,
    config: Config,
    selection: Selection,
    wanted: _Wanted,
    tools: Mapping[str, str],
    reconvert_outdated: bool,
    out: _Collector,
) -> set[str]:
    """Plans each listed session against its lock entry (by ID, then by address: re-archived) and
    returns the IDs of the lock entries that listed sessions replace."""
    holder_of, vanished_by_address = _recorded_addresses(sessions.values(), present_ids, listed_ok)
    used_as_replaced: set[str] = set()
    by_subject: dict[str, list[SessionRecord]] | None = None
    outdated = drifted = unaffected = 0
    deep = deep_scans is not None
    scans_of = deep_scans or {}
    conversion = _conversion_lookup(config)
    converters = {t: tools[t] for t in CONVERTER_TOOLS if tools.get(t)}
    for exp_id, (exp, address) in sorted(seen.items()):
        if exp_id in colliding:
            continue
        if not wanted(exp, address):
            # Selected by the ID of the session it replaces (re-archived): planned with it, or the
            # old one would read as deleted and the new one as taking its folder.
            replaced = None if exp_id in sessions else vanished_by_address.get(address)
            if replaced is None or not selection.holds(replaced):
                continue
        scans = scans_of.get(exp_id) if deep else None
        rec = sessions.get(exp_id)
        holder = holder_of.get(address)
        if holder is not None and holder.experiment_id != exp_id:
            problem = _address_taken(exp, address, holder, rec, present_ids, listed_ok, blocked)
            if problem is not None:
                out.problems.append(problem)
                continue
        if rec is None or rec.bids_subject != address.subject:
            if by_subject is None:  # built for the first session new at its subject label only
                by_subject = _by_subject(sessions.values())
            handover = _handover(address.subject, exp.subject_id, rec.bids_subject if rec else None, by_subject,
                                 seen)
            if handover is not None:
                out.problems.append(_handover_problem(exp, address, *handover))
                continue
        if rec is None:
            replaced = vanished_by_address.get(address)
            if replaced is not None:
                used_as_replaced.add(replaced.experiment_id)
                out.changes.append(_replacement(exp, address, replaced, scans, local))
            else:
                out.changes.append(Change(Action.CREATE, exp.key, address, _NEW, None, exp, scans))
            continue
        if scans is not None and rec.scans and not any(s.files for s in scans):
            out.problems.append(_emptied(exp, address, rec, scans))
            continue
        converted_by = conversion(exp.project, exp.label, exp.id)
        reasons = _compare(rec, exp, address, config.naming, converted_by, scans, tools, reconvert_outdated)
        if reasons:
            # What changed on disk is named too; an edited output holds the update back, a missing
            # one the update simply writes again.
            drift = _drift(rec, local)
            out.changes.append(Change(Action.UPDATE, exp.key, address, (*reasons, *drift), rec, exp, scans,
                                      _edited_paths(drift)))
            continue
        drift = _drift(rec, local)
        if drift:
            out.changes.append(Change(Action.DRIFT, exp.key, address, tuple(drift), rec, exp, scans))
            drifted += 1
            continue
        out.unchanged += 1
        outdated += any(older(rec.tools.get(t), version) for t, version in converters.items())
        # Exported under other settings, judged to convert the same (or equal older digests).
        unaffected += rec.config_digests != converted_by[1]
    out.drifted, out.outdated, out.unaffected = drifted, outdated, unaffected
    return used_as_replaced


def _emptied(exp: Experiment, address: BidsAddress, rec: SessionRecord, scans: tuple[Scan, ...]) -> Problem:
    """A deep listing with no file in any scan of a session the lock records with scans: a failed
    or partial listing as likely as a deletion, so never an update that says every scan is gone."""
    listed = f"{len(scans)} scan{'s' if len(scans) != 1 else ''} without files" if scans else "no scans"
    return Problem(
        f"{address.path}: XNAT listed {listed} for {exp.project}/{exp.id}, which the lock records with "
        f"{len(rec.scans)} scan{'s' if len(rec.scans) != 1 else ''}; not taken for a deletion",
        project=exp.project, experiment_id=exp.id,
        hint="plan again later; if the session's files really are gone from XNAT, its exported files stay: "
             "leave it out with `exclude` in its [project.<project>] table",
    )


def _recorded_addresses(records: Iterable[SessionRecord], present_ids: set[str], listed_ok: set[str]
                        ) -> tuple[dict[BidsAddress, SessionRecord], dict[BidsAddress, SessionRecord]]:
    """The lock entry recorded at each BIDS address, and those of them gone from a listed project
    (a listed session new at that address replaces it: re-archived)."""
    holder_of: dict[BidsAddress, SessionRecord] = {}
    vanished_by_address: dict[BidsAddress, SessionRecord] = {}
    for r in records:
        address = r.address
        holder_of[address] = r
        if r.experiment_id not in present_ids and r.project in listed_ok:
            vanished_by_address[address] = r
    return holder_of, vanished_by_address


def _by_subject(records: Iterable[SessionRecord]) -> dict[str, list[SessionRecord]]:
    by_subject: dict[str, list[SessionRecord]] = {}
    for r in records:
        by_subject.setdefault(r.bids_subject, []).append(r)
    return by_subject


def _address_taken(exp: Experiment, address: BidsAddress, holder: SessionRecord, rec: SessionRecord | None,
                   present_ids: set[str], listed_ok: set[str], blocked: set[str]) -> Problem | None:
    """The problem of a session whose folder the lock records for another one (`holder`), if that
    other one still has it; None when the folder is free to take (its owner is gone from XNAT)."""
    exp_id = exp.id
    if holder.project not in listed_ok:
        # The folder's owner is in a project not listed this run (not selected, or its listing
        # failed): as good as present, so this is a collision (plan-scenarios row 17), not a free address.
        # Unless its listing failed: then it may be this very session, moved, and a new label
        # would make it a second copy.
        if holder.project in blocked:
            msg = (f"session {exp_id} ({exp.project}/{exp.label}) maps to {address.path}, which the lock records "
                   f"for {holder.experiment_id} of project {holder.project}, whose listing is in error above")
            hint = (f"plan again once project {holder.project} lists; if {holder.experiment_id} was moved to "
                    f"{exp.project} in XNAT, this is its new ID and plan then replaces it")
        else:
            msg = (f"session {exp_id} ({exp.project}/{exp.label}) maps to {address.path}, which the lock records "
                   f"for {holder.experiment_id} of project {holder.project}")
            hint = f'give one a distinct label in [naming.sessions], e.g. "{exp_id}" = "{address.session}b"'
        return Problem(msg, exp.project, exp_id, hint=hint)
    if holder.experiment_id in present_ids:
        # Another recorded session still owns that folder (e.g. two labels swapped):
        # converting now would overwrite it.
        return Problem(
            f"session {exp_id} ({exp.project}/{exp.label}) maps to {address.path}, which the lock "
            f"still records for {holder.experiment_id}",
            exp.project,
            exp_id,
            hint="apply the other session first (select it with --session), or rename through a temporary label",
        )
    if rec is not None:
        # A recorded session renamed onto the folder of one gone from XNAT (an orphan): that
        # folder is still the orphan's until `forget` drops it.
        return Problem(
            f"session {exp_id} ({exp.project}/{exp.label}) was renamed to {address.path}, which the lock "
            f"records for {holder.experiment_id}, no longer in XNAT",
            exp.project,
            exp_id,
            hint=f"move {address.path} out of the BIDS root and run `xnat2bids forget {holder.experiment_id}`, "
                 "then plan again",
        )
    return None


def _handover_problem(exp: Experiment, address: BidsAddress, leaving: SessionRecord, swap: bool) -> Problem:
    """A session that goes to a subject label another subject is leaving in this plan.

    Its participants.tsv row is the other subject's until that one has moved: taking the label in
    the same run would give this subject the other's row."""
    if swap:
        hint = (f'the subjects swap labels: map one to a temporary label in [naming.subjects] (e.g. '
                f'"{leaving.subject_label}" = "{leaving.subject_label}tmp") and apply twice (a label is '
                "taken only in the run after it was left), then remove the mapping and apply once more")
    else:
        hint = (f"apply moves {leaving.subject_label}'s sessions out of sub-{address.subject} first; "
                "apply again afterwards for this one")
    return Problem(
        f"session {exp.id} ({exp.project}/{exp.label}) goes to sub-{address.subject}, which the "
        f"lock still records for XNAT subject {leaving.subject_id} ({leaving.subject_label}), itself "
        f"being renamed",
        exp.project,
        exp.id,
        hint=hint,
    )


def _replacement(exp: Experiment, address: BidsAddress, replaced: SessionRecord, scans: tuple[Scan, ...] | None,
                 local: LocalState) -> Change:
    """The update of a session archived again in XNAT (a new experiment ID) at `replaced`'s folder."""
    reasons = [Reason("replaced", f"replaced in XNAT: {replaced.experiment_id} → {exp.id}",
                      "experiment_id", replaced.experiment_id, exp.id)]
    if replaced.project != exp.project:  # deleted in one project, archived again in another
        reasons.append(Reason("moved", f"project {replaced.project} → {exp.project}", "project",
                              replaced.project, exp.project))
    if replaced.date != exp.date:  # the new archive's date: said as a re-date is
        reasons.append(Reason("redated", f"date {replaced.date or '(none)'} → {exp.date or '(none)'}", "date",
                              replaced.date, exp.date))
    drift = _drift(replaced, local)
    return Change(Action.UPDATE, exp.key, address, (*reasons, *drift), replaced, exp, scans, _edited_paths(drift))


def _orphans(records: Iterable[SessionRecord], present_ids: set[str], replaced_ids: set[str], listed_ok: set[str],
             selection: Selection, out: _Collector) -> list[SessionRecord]:
    """The selected lock entries of listed projects that XNAT lists no more and no listed session
    replaces, each planned as an orphan: never deleted."""
    gone = sorted(
        (r for r in records
         if r.experiment_id not in present_ids and r.experiment_id not in replaced_ids
         and r.project in listed_ok and selection.holds(r)),
        key=lambda r: r.address,
    )
    for rec in gone:
        reason = Reason("gone", f"no longer in XNAT project {rec.project}", "experiment_id", rec.experiment_id, None)
        out.changes.append(Change(Action.ORPHAN, rec.key, rec.address, (reason,), rec, None, None))
    return gone


def _notes(out: _Collector, gone: list[SessionRecord], local: LocalState, config: Config, remote: RemoteState,
           records: Iterable[SessionRecord], selection: Selection, *, deep: bool) -> list[str]:
    """The plan's notes, in the order shown: what is held back, what was found on disk, what the
    config does, what the selection and a plain plan cannot show."""
    notes = _held_back_notes(out.changes)
    if out.drifted:
        notes.append(_drift_note(out.drifted))
    if local.hashed_now:  # said once: later plans find them vouched for, and say nothing
        n = local.hashed_now
        notes.append(
            f"{n} output{'s' if n != 1 else ''} ha{'ve' if n != 1 else 's'} a new modification time but the "
            f"recorded content (sha256 checked, e.g. after a copy or clone): not drift"
        )
    if gone:
        notes.append(
            f"{len(gone)} orphan{'s' if len(gone) != 1 else ''}: nothing is deleted; "
            f"`xnat2bids forget {gone[0].experiment_id}` drops one from the lock and leaves its files"
        )
    notes += _unused_tables(config, remote, records)
    if unaffected := out.unaffected:
        notes.append(
            f"{unaffected} session{'s' if unaffected != 1 else ''} exported with other conversion settings "
            f"convert{'s' if unaffected == 1 else ''} the same under these (the same scans selected and named): "
            f"left as exported"
        )
    if outdated := out.outdated:
        notes.append(
            f"{outdated} session{'s' if outdated != 1 else ''} converted with older tools; "
            f"use --reconvert-outdated to convert {'them' if outdated != 1 else 'it'} again"
        )
    if (selection.subjects or selection.sessions) and not out.changes and not out.unchanged and not out.problems:
        given = [f"--subject {' '.join(selection.subjects)}"] * bool(selection.subjects) + \
            [f"--session {' '.join(selection.sessions)}"] * bool(selection.sessions)
        notes.append(f"{' '.join(given)} selects no session listed in XNAT or recorded in the lock "
                     "(globs match XNAT labels, experiment IDs or BIDS labels without their sub-/ses- prefix)")
    if not deep:
        notes.append(
            "plain plan compares XNAT's session dates only; files added to a session without "
            "re-saving it are found with --deep"
        )
    return notes


def _unlisted_projects_note(records: Iterable[SessionRecord], remote: RemoteState, config: Config) -> list[str]:
    """A note on the sessions the lock records for projects this plan did not list and the config
    no longer names (a finished study dropped from `projects`): left as they are, never orphaned,
    and said, so that "N sessions up to date" does not read as the whole lock."""
    if not config.projects:  # projects come from -p alone: the others are simply not asked about
        return []
    named = {listing.project for listing in remote.listings} | set(config.projects)
    left = Counter(r.project for r in records if r.project not in named)
    if not left:
        return []
    n = sum(left.values())
    which = ", ".join(f"{project} ({k})" for project, k in sorted(left.items()))
    return [f"{n} session{'s' if n != 1 else ''} the lock records for projects not in the config's `projects` "
            f"{'are' if n != 1 else 'is'} not planned: {which}; {'they stay' if n != 1 else 'it stays'} as exported "
            "(name the project again to plan it, or `xnat2bids forget ID` to drop one from the lock)"]


def _not_mr_note(changes: Iterable[Change], config: Config) -> list[str]:
    """A note on the sessions to export that are not MR (PET, CT) where ReproIn is to convert
    them: it knows MR series alone, so each would fail every apply."""
    kinds: Counter[str] = Counter()
    projects: dict[str, list[str]] = defaultdict(list)
    for c in changes:
        exp = c.after
        if c.action in (Action.CREATE, Action.UPDATE) and exp is not None and not exp.xsi_type.endswith(MR_SUFFIX) \
                and config.conversion_for(exp.project, exp.label, exp.id).heuristic == "reproin":
            kinds[exp.xsi_type] += 1
            projects[exp.project].append(exp.label)
    if not kinds:
        return []
    n = sum(kinds.values())
    which = ", ".join(f"{t} {k}" for t, k in sorted(kinds.items()))
    project, labels = sorted(projects.items())[0]
    example = ", ".join(f'"{label}"' for label in sorted(labels)[:3])
    return [f"{n} session{'s' if n != 1 else ''} to export {'are' if n != 1 else 'is'} not MR ({which}): the ReproIn "
            f"heuristic converts MR series alone, so apply would fail {'them' if n != 1 else 'it'}; leave them out "
            f"with [project.{project}] exclude = [{example}], or convert them with a heuristic of your own "
            f"([project.{project}.conversion] heuristic)"]


def _excluded_note(rows: Iterable[Experiment], seen: _Listed, sessions: Mapping[str, SessionRecord],
                   selection: Selection) -> list[str]:
    """Which sessions the config's `exclude` leaves out, listed or recorded: said on every plan, so
    that an exclusion is never forgotten."""
    if not selection.excluded:
        return []
    names = {e.id: f"{e.project}/{e.label}" for e in rows
             if selection.excludes(e.project, e.label, e.id, seen[e.id][1].session if e.id in seen else e.label)}
    names.update((r.experiment_id, f"{r.project}/{r.session_label}") for r in sessions.values()
                 if r.experiment_id not in names
                 and selection.excludes(r.project, r.session_label, r.experiment_id, r.bids_session))
    if not names:
        return []
    shown = ", ".join(sorted(names.values())[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    n = len(names)
    return [f"{n} session{'s' if n != 1 else ''} left out by the config's exclude ({shown}): neither exported, "
            "updated nor orphaned; the files of one exported before stay as they are"]


def _held_back_notes(changes: Iterable[Change]) -> list[str]:
    """Notes on the updates that would replace outputs changed on disk, and on the subject renames
    held back whole with them."""
    notes = []
    edits = sum(1 for c in changes if c.edited)
    if edits:
        notes.append(_edits_note(edits))
    moving: Counter[tuple[str, str, str]] = Counter()
    held_moves = set()
    for c in changes:
        if move := subject_move(c):
            moving[move] += not c.edited
            if c.edited:
                held_moves.add(move)
    for move in sorted(held_moves):
        if moving[move]:
            n = moving[move]
            notes.append(
                f"sub-{move[1]} → sub-{move[2]}: {n} more session{'s' if n != 1 else ''} of that subject "
                f"wait{'' if n != 1 else 's'} with the one that would replace outputs changed on disk"
                f"{_SPLIT_SUBJECT}")
    return notes


def subject_move(change: Change) -> tuple[str, str, str] | None:
    """The subject rename an update is part of: (XNAT subject ID, old BIDS label, new one)."""
    before = change.before
    if change.action is Action.UPDATE and before is not None and before.bids_subject != change.address.subject:
        return before.subject_id, before.bids_subject, change.address.subject
    return None


def subjects_written(changes: Iterable[Change]) -> set[str]:
    """The BIDS subjects whose sessions files carrying out `changes` updates: each session's, and
    the one a session moves away from."""
    changes = tuple(changes)
    return {c.address.subject for c in changes} | {c.before.bids_subject for c in changes if c.before is not None}


def moves_in(change: Change) -> bool:
    """Whether apply would write `change`'s session into a folder no lock entry holds for it: a
    create, or an update to a new address (a rename). Apply refuses such a folder if it exists."""
    return change.action is Action.CREATE or (
        change.action is Action.UPDATE and change.before is not None and change.before.address != change.address
    )


# The end of the note on a subject rename held back whole (apply --repair-drift carries it out).
_SPLIT_SUBJECT = ", so the subject is not split between two labels by this"


def _edits_note(n: int, *, repairing: bool = False) -> str:
    them = "them" if n != 1 else "it"
    if repairing:
        return (f"{n} update{'s' if n != 1 else ''} replace{'' if n != 1 else 's'} outputs changed on disk "
                f"(--repair-drift), keeping a copy of each changed file in .xnat2bids/replaced/")
    return (f"{n} update{'s' if n != 1 else ''} would replace outputs changed on disk; apply carries {them} out "
            "only with --repair-drift, keeping a copy of each changed file in .xnat2bids/replaced/")


def _drift_note(n: int, *, repairing: bool = False) -> str:
    them = "them" if n != 1 else "it"
    if repairing:
        return f"{n} session{'s' if n != 1 else ''} changed on disk: --repair-drift exports and converts {them} again"
    return f"{n} session{'s' if n != 1 else ''} changed on disk; only apply --repair-drift repairs {them} (exports " \
           "and converts again)"


def repairing(plan: Plan) -> Plan:
    """`plan` as apply --repair-drift carries it out: its notes say the drift is repaired, not
    that it needs the flag."""
    edits, drifted = sum(1 for c in plan.changes if c.edited), plan.count(Action.DRIFT)
    now = {_edits_note(edits): _edits_note(edits, repairing=True), _drift_note(drifted): _drift_note(drifted, repairing=True)}
    return replace(plan, notes=tuple(now.get(n, n) for n in plan.notes if not n.endswith(_SPLIT_SUBJECT)))


def refuse_occupied(plan: Plan, occupied: Mapping[BidsAddress, str | None],
                    holding: Mapping[BidsAddress, tuple[int, tuple[str, ...]]] | None = None) -> Plan:
    """`plan` with each change that moves into an `occupied` folder (on disk, recorded for no
    session: another tool's export, a forgotten session) made a problem. Apply would refuse it
    only after downloading and converting, on every run. `occupied` names, per folder, the file
    that stands where its subject folder goes, if that is what is there; `holding`, per folder,
    how many files it holds and the first few (what is in the way may be the user's own copies)."""
    refused = [c for c in plan.changes if c.address in occupied and moves_in(c)]
    if not refused:
        return plan

    def problem(c: Change) -> Problem:
        session = f"session {c.key.experiment_id} ({c.key.project}/{c.after.label if c.after else c.key.experiment_id})"
        in_the_way = occupied[c.address]
        if in_the_way is not None:
            return Problem(f"{in_the_way} is a file, where the subject folder of {session} goes", c.key.project,
                           c.key.experiment_id, hint="move that file out of the BIDS root, then plan again")
        count, names = (holding or {}).get(c.address, (0, ()))
        held = ""
        if names:
            more = f" and {count - len(names)} more" if count > len(names) else ""
            held = f" (it holds {count} file{'s' if count != 1 else ''}: {', '.join(names)}{more})"
        return Problem(
            f"{c.address.path} exists but the lock records no session there{held}; {session} would be written into it",
            c.key.project,
            c.key.experiment_id,
            hint="move that folder out of the BIDS root (its files are never replaced), then plan again",
        )

    problems = [problem(c) for c in refused]
    gone = {id(c) for c in refused}
    return replace(plan, changes=tuple(c for c in plan.changes if id(c) not in gone),
                   problems=plan.problems + tuple(problems))


def note_moved_in(plan: Plan, recorded_elsewhere: Mapping[str, tuple[str, str]]) -> Plan:
    """`plan` with each create of a session that another dataset's lock records (pi-study
    layout: a session moved or shared between projects, so between studies) saying so instead of
    "new in XNAT". `recorded_elsewhere`: experiment ID → (its recorded project, that dataset's folder)."""
    def moved(c: Change) -> Change:
        project, where = recorded_elsewhere[c.key.experiment_id]
        # Moved, or shared into this project: that study's own plan tells (an orphan there, or not).
        reason = Reason("moved", f"project {project} → {c.key.project} (also recorded in {where}: moved or shared "
                        "in XNAT)", "project", project, c.key.project)
        return replace(c, reasons=(reason,))

    changes = tuple(moved(c) if c.action is Action.CREATE and c.key.experiment_id in recorded_elsewhere else c
                    for c in plan.changes)
    return replace(plan, changes=changes)
