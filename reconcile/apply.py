"""Carrying a Plan out: stage (export + convert) each session, then commit it into the BIDS root.

Staging writes only into the hidden work area; committing moves one finished session into
place, records it in the lock and the provenance files. A journal makes the commit
crash-safe: an interrupted commit is rolled forward or back by `recover`. Apply prints
nothing; it reports through `on_event`.
"""

from __future__ import annotations

import contextlib
import filecmp
import glob
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any

from reconcile.config import Config, ConversionSettings
from reconcile.convert import ConversionCancelled, convert_session, nothing_selected
from reconcile.dataset import (
    DatasetFileError,
    check_dataset_files,
    drop_participant,
    ensure_dataset_description,
    ensure_participant,
    refuse_unfinished_merge,
    remove_session_row,
    session_acq_time,
    update_sessions_tsv,
)
from reconcile.durable import (
    fsync_dir,
    fsync_file,
    fsync_tree,
    open_to_group,
    write_atomic,
)
from reconcile.errors import (
    NO_SPACE,
    AuthError,
    Cancelled,
    ForbiddenError,
    LockConflictError,
    LockfileError,
    OccupiedError,
    PlanError,
    RemoteError,
    StalePlanError,
    UnsafePathError,
    XnatBidsError,
)
from reconcile.export import export_session
from reconcile.failpoints import hit
from reconcile.journal import Settle, pending_commits, read_journal, swapped
from reconcile.localscan import Beneath, holds_nothing, sha256_file, stat_records
from reconcile.lock import (
    Lock,
    dumps_lock,
    load_or_new,
    read_lock,
    stale_temp_files,
    write_lock,
)
from reconcile.lockparse import conflict_marker_line, first_conflict_marker
from reconcile.model import (
    BidsAddress,
    Experiment,
    OutputRecord,
    Scan,
    SessionRecord,
    format_timestamp,
    login_name,
    utc_now,
)
from reconcile.naming import check_safe
from reconcile.plan import Change, Plan, recorded_scans
from reconcile.plan import edited as plan_edited
from reconcile.schema import load_schema
from reconcile.statelock import Holder
from reconcile.workarea import WORK_DIR, WorkArea, work_path


class Status(str, Enum):
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"  # not started (cancelled, credentials rejected or XNAT gone earlier)


@dataclass(frozen=True)
class Outcome:
    change: Change
    status: Status
    message: str = ""
    log_path: Path | None = None
    seconds: float = 0.0
    record: SessionRecord | None = None
    warnings: tuple[str, ...] = ()
    hint: str | None = None  # of a failure: what to do about it


Event = Callable[[str, Change, "Outcome | None"], None]


@dataclass(frozen=True)
class ApplyOptions:
    jobs: int = 1
    repair_drift: bool = False
    keep_dicom: bool = False
    export_method: str = "auto"


@dataclass
class ApplyReport:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: Lock | None = None
    cancelled: bool = False
    halted: str | None = None  # why sessions not started by then were skipped

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status is status)

    @property
    def ok(self) -> bool:
        return not self.cancelled and all(o.status is Status.DONE for o in self.outcomes)


@dataclass(frozen=True)
class StagedSession:
    """A session exported and converted in the work area, ready to be committed."""

    change: Change
    experiment: Experiment
    address: BidsAddress
    scans: tuple[Scan, ...]
    session_dir: Path  # converted sub-X/ses-Y in staging
    dicom_dir: Path
    log_path: Path
    tools: dict[str, str]
    settings: ConversionSettings
    # Fingerprints taken by the worker that converted the session, so commits (one at a time)
    # do not hash; None: the commit hashes them itself.
    outputs: tuple[OutputRecord, ...] | None = None
    warnings: tuple[str, ...] = ()  # from the conversion, e.g. a selected scan that gave no file
    # The listed scans include/skip left out, and the conversion's (SeriesDescription,
    # ProtocolName) per scan; None when not known (a SLURM result from an older version): the
    # lock then records no unselected scans, as format 1 did.
    unselected: tuple[Scan, ...] | None = None
    names: Mapping[str, tuple[str, str]] | None = None


def _previous(change: Change, lock: Lock) -> SessionRecord | None:
    """The lock entry a change replaces (itself, or the re-archived session it supersedes), as
    the lock has it now."""
    rec = lock.sessions.get(change.key.experiment_id)
    if rec is None and change.before is not None:
        rec = lock.sessions.get(change.before.experiment_id)
    return rec


def _target(root: Path, address: BidsAddress) -> Path:
    """A session's folder in the root, refused when a link takes it out of the root: a commit
    would replace a folder elsewhere (a mistaken `ln -s`, another project's data)."""
    check_safe(address.subject, "subject")
    check_safe(address.session, "session")
    beneath = Beneath(root)
    if beneath.linked(address.path):
        elsewhere = beneath.outside(address.path)
        if elsewhere is not None:
            raise UnsafePathError(f"{address.path} leads out of the BIDS root, to {elsewhere}, through a link; "
                                  "refusing to write through it",
                                  hint="replace the link by the folder itself, or remove it")
    return root / f"sub-{address.subject}" / f"ses-{address.session}"


def stage_session(
    change: Change,
    root: Path,
    client,
    config: Config,
    *,
    tools: dict[str, str],
    export_method: str = "auto",
    cancel: threading.Event | None = None,
) -> StagedSession:
    """Export and convert one session into the work area; touches nothing else."""
    exp = change.after
    if exp is None:
        raise PlanError(f"{change.key}: nothing to export for a {change.action.value}")
    area = WorkArea(root)
    staging = area.staging(exp.id)
    log_path = area.log(exp.id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    settings = config.conversion_for(exp.project, exp.label, exp.id)
    listed = client.list_scans(exp)
    scans = tuple(s for s in listed if settings.selects(s.id, s.series_description))
    with open(log_path, "a", encoding="utf-8") as log:
        open_to_group(log.fileno())
        log.write(f"{utc_now()} apply {change.action.value} {exp.project}/{exp.id} ({exp.label}): "
                  f"{len(scans)} of {len(listed)} scans selected\n")
    if not scans:  # before downloading anything
        raise nothing_selected(change.address, [(s.id, s.series_description) for s in listed], settings)
    export_session(client, exp, scans, staging / "dicom", method=export_method, cancel=cancel)
    hit("apply-exported")
    result = convert_session(
        staging / "dicom", staging / "convert", change.address, settings, log_path=log_path, cancel=cancel
    )
    hit("apply-converted")
    outputs = staged_outputs(result.session_dir.parent.parent, result.session_dir)
    # The lock will vouch for these bytes: they reach the disk before it is written (here, in
    # parallel workers, rather than in the one-at-a-time commit).
    fsync_tree(result.session_dir)
    disagreeing = _left_out_by_dicom(scans, result.names, settings)
    for warning in disagreeing:
        log_line(log_path, f"warning: {warning}")
    return StagedSession(
        change, exp, change.address, scans, result.session_dir, staging / "dicom", log_path, tools, settings, outputs,
        result.warnings + disagreeing, tuple(s for s in listed if not settings.selects(s.id, s.series_description)),
        result.names,
    )


def _left_out_by_dicom(scans: Iterable[Scan], names: Mapping[str, tuple[str, str]],
                       settings: ConversionSettings) -> tuple[str, ...]:
    """A warning for each scan that XNAT's series description selected, so it was downloaded, but
    that include/skip leave out by its DICOM's SeriesDescription (else ProtocolName), which the
    conversion goes by. Where XNAT lists no description, judging by the DICOM is the design and
    says nothing."""
    out = []
    for s in scans:
        description, protocol = names.get(s.id, ("", ""))
        judged = description or protocol
        if s.series_description and judged and not settings.selects(s.id, judged):
            out.append(f'scan {s.id}: XNAT lists it as "{s.series_description}" but its DICOM says "{judged}", '
                       "which [conversion] include/skip leave out: it was downloaded but not converted; if it "
                       "should be, change include/skip (or a [project.<project>.sessions.<session label>] table's)")
    return tuple(out)


def _copy_user_files(old_dir: Path, new_dir: Path, recorded: set[str], root: Path, kept: Path, *,
                     renamed: tuple[str, str] | None = None, notes: list[str] | None = None) -> list[str]:
    """Files, links and empty folders a user added inside a session folder survive its
    re-conversion. One at a path the conversion now writes is kept under `kept` instead.
    Returns the paths kept there. A task events stub nobody filled in is not carried: the new
    conversion wrote its own for each run it still has. When the session moved (`renamed`: the
    old and the new `sub-X_ses-Y_` file-name prefixes), task events belong to runs that were
    renamed too: one filled in is carried under the new name."""
    if not old_dir.is_dir():
        return []
    moved_aside = []
    for dirpath, dirs, files in os.walk(old_dir):
        here = Path(dirpath)
        links = [d for d in dirs if (here / d).is_symlink()]  # os.walk lists them, never enters them
        empty = [d for d in dirs if d not in links and not any((here / d).iterdir())]
        for name in [*files, *links, *empty]:
            path = here / name
            rel = path.relative_to(root).as_posix()
            if rel in recorded:
                continue
            if _is_events_stub(path):
                continue  # heudiconv's, unfilled: the new conversion writes its own where the run remains
            dest = new_dir / path.relative_to(old_dir)
            if renamed and name.endswith("_events.tsv") and name.startswith(renamed[0]):
                dest = dest.with_name(renamed[1] + name[len(renamed[0]):])
            if name in empty and dest.is_dir() and not dest.is_symlink():
                continue  # the conversion made that folder: nothing of the user's is replaced
            # Filled-in events describe one acquisition: when the run's name now belongs to another
            # series (a run deleted in XNAT renumbers the rest), they do not go on beside that
            # other run's data. (Their run gone with no other in its place: they stay, the lab's.)
            orphaned = False
            if name.endswith("_events.tsv"):
                ran, now = _run_of(path), _run_of(dest)
                home = _events_of_run(ran, dest.parent) if ran is not None and ran != now else None
                if home is not None and home != dest:  # its run renumbered (an earlier one deleted): they follow it
                    if notes is not None:
                        notes.append(f"{rel}: moved with its run to {home.name} (a run deleted in XNAT renumbers "
                                     "the rest)")
                    dest, now = home, ran
                orphaned = None not in (ran, now) and ran != now
            if _is_events_stub(dest) and not orphaned:
                dest.unlink()  # the lab's events (filled in or not) over heudiconv's new stub
            if orphaned or dest.exists() or dest.is_symlink() or _file_on_the_way(dest, new_dir):
                dest = kept / rel
                moved_aside.append(rel)
                if orphaned and notes is not None:
                    notes.append(f"{rel}: its run's name is another series' now (a run deleted in XNAT renumbers "
                                 f"the rest); not carried over, kept in {kept.relative_to(root)}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            if name in empty:
                dest.mkdir(exist_ok=True)
            else:
                shutil.copy2(path, dest, follow_symlinks=False)
                if not dest.is_symlink():
                    fsync_file(dest)  # the original goes to the trash once the session is swapped
            fsync_dir(dest.parent)
    return moved_aside


def _run_of(events: Path) -> tuple[Any, Any] | None:
    """The acquisition a task events file belongs to: SeriesNumber and AcquisitionTime from the
    sidecar of its run's BOLD image beside it (multi-echo: the first echo's). None: none to read."""
    stem = events.name[: -len("_events.tsv")]
    echoes = sorted(events.parent.glob(f"{glob.escape(stem)}_echo-*_bold.json"))
    for sidecar in [events.with_name(f"{stem}_bold.json"), *echoes]:
        run = _acquisition(sidecar)
        if run is not None:
            return run
    return None


def _acquisition(sidecar: Path) -> tuple[Any, Any] | None:
    try:
        meta = json.loads(sidecar.read_bytes())
    except (OSError, ValueError):
        return None
    return (meta.get("SeriesNumber"), meta.get("AcquisitionTime")) if isinstance(meta, dict) else None


def _events_of_run(run: tuple[Any, Any], folder: Path) -> Path | None:
    """Where the task events of the acquisition `run` go in a new conversion's `folder`: beside
    the BOLD run with its SeriesNumber and AcquisitionTime, whatever its name now. None: not there."""
    if None in run:
        return None
    for sidecar in sorted(folder.glob("*_bold.json")):
        if _acquisition(sidecar) == run:
            return folder / (re.sub(r"(_echo-\d+)?_bold\.json$", "", sidecar.name) + "_events.tsv")
    return None


def _file_prefix(address: BidsAddress) -> str:
    """How BIDS names begin in a session's folder: `sub-01_ses-MR1_`."""
    return f"sub-{address.subject}_ses-{address.session}_"


def _file_on_the_way(dest: Path, top: Path) -> bool:
    """Whether a folder between `top` and `dest` is a file (or a link) in the new tree."""
    return any(p.is_symlink() or (p.exists() and not p.is_dir()) for p in dest.parents if p != top and top in p.parents)


def _keep(root: Path, paths: list[str], kept: Path) -> None:
    """Copy these files, relative to `root`, under `kept` before the commit replaces them."""
    for rel in paths:
        dest = kept / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest, follow_symlinks=False)
        fsync_file(dest)


def _remove_recorded(root: Path, record: SessionRecord, keep: set[str], *, moved_to: BidsAddress | None = None) -> None:
    """Remove only the files the lock says apply wrote, and event stubs nobody filled in (the move
    copied them along), then folders left empty. `moved_to`: the session's new address; filled-in
    events the move carried there, byte for byte under the new name, go from here too: they
    belong to their run, which moved (left behind, they would describe a run of this folder's
    next owner)."""
    dirs = set()
    session_dir = root / record.address.path
    events = sorted(session_dir.glob("*/*_events.tsv")) if session_dir.is_dir() else []
    stubs = [p for p in events if _is_events_stub(p)]
    if moved_to is not None:
        old, new = _file_prefix(record.address), _file_prefix(moved_to)
        for p in events:
            carried = root / moved_to.path / p.parent.name / (new + p.name[len(old):])
            if p not in stubs and p.name.startswith(old) and not p.is_symlink() and carried.is_file() \
                    and filecmp.cmp(p, carried, shallow=False):
                stubs.append(p)
    for path in [*(root / o.path for o in record.outputs if o.path not in keep), *stubs]:
        path.unlink(missing_ok=True)
        dirs.add(path.parent)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        while d != root and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
            d = d.parent


def _remove_empty(folder: Path, address: BidsAddress, exp_id: str) -> None:
    """Remove `folder`, which held no file (`holds_nothing`), and the empty folders in it, so that
    a session is renamed into its place. rmdir removes only empty folders: a file put there since
    fails the session and stays, and a crash in between loses nothing (a commit journalled later
    finds no folder, as if there had been none)."""
    try:
        _rmdir_tree(folder)
    except OSError as exc:
        raise OccupiedError(
            f"{address.path} already exists but the lock does not record it for {exp_id}, and it could not be "
            f"removed ({exc.strerror or exc}): it held no file when looked at",
            hint="move that folder away and apply again",
        ) from exc


def _rmdir_tree(folder: Path) -> None:
    """Remove `folder` and the folders in it, deepest first: rmdir removes only empty ones, so a
    file in it stops this with OSError and stays."""
    for dirpath, _dirs, _files in os.walk(folder, topdown=False):
        os.rmdir(dirpath)


def _move_replacing(src: Path, dest: Path, trash: Path) -> None:
    if dest.exists():
        trash.parent.mkdir(parents=True, exist_ok=True)
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(dest, trash)
        hit("commit-between-renames")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(src, dest)
    fsync_dir(dest.parent)


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Durable (file and folder synced) before the folders move.
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True))


def _is_events_stub(path: Path) -> bool:
    """heudiconv's `*_events.tsv` for a task run: a header (with a TODO column) and no rows, for
    the lab to fill in. It is theirs from the start: never recorded as an output (filling it in is
    no drift), and a filled-in one is kept over a new stub."""
    if not path.name.endswith("_events.tsv") or path.is_symlink() or not path.is_file():
        return False
    with open(path, "rb") as stub:
        return len([line for line in stub.read(64 * 1024).splitlines() if line.strip()]) <= 1


def staged_outputs(staging_root: Path, session_dir: Path) -> tuple[OutputRecord, ...]:
    """Fingerprint the converted files before the move; a rename keeps size and mtime. Task event
    stubs are left out (`_is_events_stub`)."""
    records = []
    for dirpath, _dirs, files in os.walk(session_dir):
        for name in files:
            path = Path(dirpath) / name
            if _is_events_stub(path):
                continue
            st = path.stat()
            rel = path.relative_to(staging_root).as_posix()
            records.append(OutputRecord(rel, st.st_size, sha256_file(path), st.st_mtime_ns))
    return tuple(sorted(records, key=lambda o: o.path))


def commit_session(
    staged: StagedSession, root: Path, lock: Lock, *, keep_dicom: bool = False, save: bool = True,
    repair_drift: bool = False, warnings: list[str] | None = None,
) -> Lock:
    """Move a staged session into place and record it in the lock; returns the lock as written.

    Order: journal (the complete new record) → swap folders → provenance → lock. A crash at
    any point is repaired by `recover`: before the swap it rolls back, after it rolls forward.
    With `save=False` the lock is only updated in memory and the journal kept, so that a batch
    of commits can be saved with one write by `save_commits`. What the user should know (files
    set aside) is added to `warnings`.
    """
    area = WorkArea(root)
    exp, address = staged.experiment, staged.address
    previous = _previous(staged.change, lock)
    target = _target(root, address)
    staging_root = staged.session_dir.parent.parent
    scan_records, unselected = recorded_scans((*staged.scans, *(staged.unselected or ())), staged.settings,
                                              staged.names)
    record = SessionRecord(
        experiment_id=exp.id,
        project=exp.project,
        subject_id=exp.subject_id,
        subject_label=exp.subject_label,
        session_label=exp.label,
        bids_subject=address.subject,
        bids_session=address.session,
        date=exp.date,
        insert_date=format_timestamp(exp.insert_date),
        last_modified=format_timestamp(exp.last_modified),
        xsi_type=exp.xsi_type,
        exported_at=utc_now(),
        config_fingerprint=staged.settings.fingerprint(),
        config_digests=staged.settings.digests(),
        tools=dict(staged.tools),
        scans=scan_records,
        outputs=staged.outputs if staged.outputs is not None else staged_outputs(staging_root, staged.session_dir),
        unselected_scans=None if staged.unselected is None else unselected,
    )
    if target.exists() and (previous is None or previous.address != address):
        # Not ours to replace: a folder from another tool, a forgotten session, or one another
        # recorded session still owns. Fail this session, keep everything. Unless it holds no file
        # (an old export's files moved away): nothing to lose, it makes way for the session.
        if not holds_nothing(root, address.path):
            raise OccupiedError(
                f"{address.path} already exists but the lock does not record it for {exp.id}; refusing to replace it",
                hint="move that folder away (or `xnat2bids forget` the session it belongs to) and apply again",
            )
        _remove_empty(target, address, exp.id)
    # Before anything moves: a dataset file the commit cannot update fails this session alone.
    moved = previous is not None and previous.address != address
    check_dataset_files(root, address.subject, previous_subject=previous.bids_subject if moved else None)
    target.parent.mkdir(parents=True, exist_ok=True)  # a file in its way fails here, before the journal
    # As the planner judged it, and again now, by content: outputs may have changed since
    # planning, and an edit that kept size and time shows only in a hash. Those bytes are about
    # to be replaced: reading them once more is what keeping every edit costs.
    edited = []
    if previous is not None:
        now = {r.field for r in plan_edited(previous, stat_records(root, [previous], full=True))}
        planned = {r.field for r in staged.change.reasons if r.code == "changed"} & {o.path for o in previous.outputs}
        edited = sorted(now | {p for p in planned if (root / p).is_file()})
    if edited and not repair_drift:
        raise OccupiedError(
            f"{address.path}: outputs changed on disk since they were recorded: {', '.join(edited)}",
            hint="apply with --repair-drift to replace them (a copy of each is kept); `xnat2bids plan --full` shows "
                 "them as drift (an edit that kept a file's size and time is found by its sha256 only)",
        )
    kept = area.kept(exp.id)
    _keep(root, edited, kept)
    aside = list(edited)
    events_notes: list[str] = []
    if previous is not None:
        # After fingerprinting: the user's files are carried over but never recorded as outputs.
        # After a rename they are copies: the originals stay in the old folder, which is theirs
        # (but filled-in events, which move with their run: `_remove_recorded`).
        old_dir = _target(root, previous.address)
        renamed = (_file_prefix(previous.address), _file_prefix(address)) if previous.address != address else None
        aside += _copy_user_files(old_dir, staged.session_dir, {o.path for o in previous.outputs}, root, kept,
                                  renamed=renamed, notes=events_notes)
    if aside:
        fsync_tree(kept)
        log_line(staged.log_path, f"kept what the new conversion replaces, in {kept.relative_to(root)}: {', '.join(aside)}")
        if warnings is not None:
            warnings.append(f"{len(aside)} file(s) the new conversion replaces (edited outputs, or files the lock does "
                            f"not record) were set aside in {kept.relative_to(root)}")
            warnings.extend(events_notes)
    if keep_dicom:
        dicom = kept_dicom_dir(root, address)
        if dicom.is_dir() and not dicom.is_symlink() and _dicom_owner(dicom) == exp.id:
            # Before the journal: a file that cannot be moved aside fails this session, nothing moved.
            _set_aside_extra_dicom(root, dicom, staged.dicom_dir, kept,
                                   warnings.append if warnings is not None else lambda m: None)
        # Marked before the move, so the mark travels with the folder: a kill right after the
        # move must not leave this session's DICOM looking like another's.
        (staged.dicom_dir / DICOM_OWNER).write_text(exp.id + "\n", encoding="utf-8")
        fsync_tree(staged.dicom_dir)  # export leaves MD5-verified files unsynced (re-verified on reuse)
    journal = {
        "record": dumps_lock(Lock.new().with_session(record)),
        "previous": previous.experiment_id if previous else None,
        "staged": os.path.relpath(staged.session_dir, root),
        "dicom": os.path.relpath(staged.dicom_dir, root) if keep_dicom else None,
    }
    _write_json(area.journal(exp.id), journal)
    hit("commit-journaled")
    _move_replacing(staged.session_dir, target, area.trash(exp.id))
    hit("commit-moved")
    return _roll_forward(root, exp.id, lock, save=save, warnings=warnings)


def _roll_forward(root: Path, exp_id: str, lock: Lock | None = None, *, save: bool = True,
                  warnings: list[str] | None = None) -> Lock:
    """Finish a commit whose folders are in place: provenance, lock, clean-up. Idempotent."""
    area = WorkArea(root)
    journal, record = read_journal(area.journal(exp_id))
    lock = lock if lock is not None else load_or_new(root)

    def warn(text: str) -> None:  # into the session's log, and its outcome when apply is there to say it
        log_line(area.log(exp_id), text)
        if warnings is not None:
            warnings.append(text)

    previous = lock.sessions.get(journal["previous"]) if journal["previous"] else None
    moved = previous is not None and previous.address != record.address
    if moved:
        # The row first: a sessions file left with no row goes, so the walk up from the removed
        # outputs also takes a subject folder the move left empty.
        remove_session_row(root, previous.bids_subject, previous.bids_session,
                           xnat_experiment_id=previous.experiment_id)
        others = {o.path for r in lock.sessions.values() if r.experiment_id != previous.experiment_id for o in r.outputs}
        _remove_recorded(root, previous, others | {o.path for o in record.outputs}, moved_to=record.address)
    left_subject = moved and previous.bids_subject != record.bids_subject
    # The same XNAT subject under a new label: its participants.tsv row goes with it.
    renamed = previous.bids_subject if left_subject and previous.subject_id == record.subject_id != "" else None
    if journal["dicom"] and (root / journal["dicom"]).is_dir():
        dest = kept_dicom_dir(root, record.address)
        linked = dest.is_symlink()
        if not linked and dest.is_dir() and holds_nothing(root, dest.relative_to(root).as_posix()):
            _rmdir_tree(dest)  # an old export's, emptied: nothing to set aside (a file put there since stays)
        if linked or (dest.exists() and _dicom_owner(dest) != exp_id):
            # A link (moved to other storage and linked back: what it points to is never walked
            # into, emptied or deleted), or kept DICOM not marked as this session's (another
            # session was at this address, renamed since; or kept before the mark): not this
            # commit's to replace. Set aside whole.
            aside = area.kept(exp_id) / dest.relative_to(root)
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.rename(dest, aside)
            if linked:
                warn(f"{dest.relative_to(root)} was a link to {os.readlink(aside)}; the link was set aside in "
                     f"{aside.relative_to(root)}, what it points to is untouched")
            else:
                warn(f"{dest.relative_to(root)} held DICOM not marked as this session's (kept for another session "
                     f"at this address, or before the mark); set aside in {aside.relative_to(root)}")
        _move_replacing(root / journal["dicom"], dest, area.trash(exp_id, dicom=True))
        hit("commit-dicom-moved")
        if not (dest / DICOM_OWNER).exists():  # staged by an xnat2bids that marked it after the move
            (dest / DICOM_OWNER).write_text(exp_id + "\n", encoding="utf-8")
    ensure_dataset_description(root, name=record.project, tools=record.tools)
    said = ensure_participant(root, record.bids_subject, renamed_from=renamed)
    if said is not None:
        warn(said)
    if left_subject:
        drop_participant(root, previous.bids_subject, renamed_to=record.bids_subject if renamed else None)
    update_sessions_tsv(
        root,
        record.bids_subject,
        record.bids_session,
        acq_time=session_acq_time(root, record.bids_subject, record.bids_session, record.date),
        xnat_experiment_id=record.experiment_id,
        xnat_insert_date=record.insert_date,
    )
    hit("commit-provenance-written")
    if lock.sessions.get(exp_id) != record:
        updated = lock
        if previous is not None and previous.experiment_id != exp_id:
            updated = updated.without_session(previous.experiment_id)
        if not save:
            return updated.with_session(record)  # journal and leftovers stay until save_commits
        lock = write_lock(root, updated.with_session(record), expected_serial=lock.serial)
        hit("commit-lock-written")
    _clean_up(area, exp_id)
    return lock


def kept_dicom_dir(root: Path, address: BidsAddress) -> Path:
    """Where `--keep-dicom` keeps a session's DICOM."""
    return root / "sourcedata" / f"sub-{address.subject}" / f"ses-{address.session}" / "dicom"


def _set_aside_extra_dicom(root: Path, old: Path, new: Path, kept: Path, warn: Callable[[str], None]) -> None:
    """Files in a session's kept DICOM folder `old` that its new one `new` lacks (a user's notes,
    a scan no longer exported) are moved under `kept` before `new` replaces `old`, never deleted."""
    extra = []
    for dirpath, dirs, files in os.walk(old):
        here = Path(dirpath)
        for name in [*files, *(d for d in dirs if (here / d).is_symlink())]:
            rel = (here / name).relative_to(old)
            if rel != Path(DICOM_OWNER) and not os.path.lexists(new / rel):
                extra.append(rel)
    extra.sort()
    for rel in extra:
        aside = kept / old.relative_to(root) / rel
        aside.parent.mkdir(parents=True, exist_ok=True)
        os.rename(old / rel, aside)
    for folder in {(kept / old.relative_to(root) / rel).parent for rel in extra} | {(old / rel).parent for rel in extra}:
        fsync_dir(folder)
    if extra:
        warn(f"{len(extra)} file(s) in {old.relative_to(root)} that the new DICOM does not have "
             f"({', '.join(r.as_posix() for r in extra[:3])}{', …' if len(extra) > 3 else ''}) were set aside in "
             f"{(kept / old.relative_to(root)).relative_to(root)}")


DICOM_OWNER = ".xnat2bids-experiment"  # in a kept DICOM folder: the experiment it was kept for


def _dicom_owner(folder: Path) -> str | None:
    try:
        return (folder / DICOM_OWNER).read_text(encoding="utf-8").strip()
    except OSError:
        return None


def _clean_up(area: WorkArea, exp_id: str) -> None:
    for leftover in (area.trash(exp_id), area.trash(exp_id, dicom=True), area.staging(exp_id)):
        shutil.rmtree(leftover, ignore_errors=True)
    area.journal(exp_id).unlink(missing_ok=True)


def save_commits(root: Path, lock: Lock, exp_ids: list[str]) -> Lock:
    """One lock write (serial + 1) for commits made with `save=False`, then their clean-up.

    Until this write, each of them is still journalled, so a crash is settled by `recover`.
    """
    if not exp_ids:
        return lock
    written = write_lock(root, lock, expected_serial=lock.serial)
    area = WorkArea(root)
    for exp_id in exp_ids:
        _clean_up(area, exp_id)
    return written


def recover(root: Path, *, warn: Callable[[str], None] = lambda m: None) -> list[str]:
    """Finish or undo commits that a crash interrupted; returns the experiment IDs handled."""
    area = WorkArea(root)
    # Temp files of a lock, journal or dataset file write killed before its rename; the caller
    # holds the state lock.
    journal_dir, temps = work_path(root, "journal"), work_path(root, "tmp")
    for stale in [*stale_temp_files(root), *journal_dir.glob("*.tmp"), *temps.glob(".*.tmp")]:
        stale.unlink(missing_ok=True)
    handled, completed = [], []
    for p in pending_commits(root):
        if p.settle is Settle.COMPLETE:
            _roll_forward(root, p.exp_id)
            completed.append(p.exp_id)
            warn(f"{p.exp_id}: an interrupted commit was completed")
        else:
            # Never swapped, or its new folder is gone since (moved away by hand): put the old
            # session folder back, drop the journal; the session is applied again.
            target = root / p.record.address.path
            trash = area.trash(p.exp_id)
            if p.settle is Settle.ABANDON and os.path.lexists(target):
                # What is left of the dropped commit's own files goes aside whole, so the lock's
                # record and the folder agree again (the old folder comes back, if there was one).
                left = area.kept(p.exp_id)
                left.parent.mkdir(parents=True, exist_ok=True)
                os.rename(target, left)
                warn(f"{p.exp_id}: what the interrupted commit left in {p.record.address} is kept in "
                     f"{left.relative_to(root)}")
            if trash.is_dir() and not target.exists():
                os.rename(trash, target)
            elif trash.is_dir():  # something else stands there now: keep the old files aside
                aside = area.kept(p.exp_id)
                aside.parent.mkdir(parents=True, exist_ok=True)
                os.rename(trash, aside)
                warn(f"{p.exp_id}: the files {p.record.address} held before the interrupted commit are kept in "
                     f"{aside.relative_to(root)}")
            p.path.unlink()
            if p.settle is Settle.ROLL_BACK:
                warn(f"{p.exp_id}: an interrupted commit was rolled back; the session will be applied again")
            else:
                are = "is" if len(p.missing) == 1 else "are"
                warn(f"{p.exp_id}: an interrupted commit was dropped: {len(p.missing)} of the files it records {are} "
                     f"not in {p.record.address} (e.g. {p.missing[0]}); the session will be applied again")
        handled.append(p.exp_id)
    _empty_trash(root, warn)
    try:
        _note_unrecorded(root, completed)
    except OSError as exc:  # a full disk: the lock is right; the next run tries again
        warn(f"could not add the commits without a history entry to the history ({exc.strerror or exc})")
    return handled


def _empty_trash(root: Path, warn: Callable[[str], None]) -> None:
    """Old session folders a commit could not remove (a file the user may not delete, an NFS
    hiccup) are removed by the next run; what still cannot be is named."""
    trash = work_path(root, "trash")
    for leftover in sorted(trash.iterdir()) if trash.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)
        if leftover.exists():
            warn(f"cannot remove {leftover.relative_to(root)}, the old files of a replaced session; remove it by hand")


def _same_root(planned: Path, root: Path) -> bool:
    """The same folder, whatever the spelling (`..`, symlinks), also before it exists."""
    if os.path.realpath(planned) == os.path.realpath(root):
        return True
    try:
        return planned.exists() and root.exists() and os.path.samefile(planned, root)
    except OSError:
        return False


def check_plan_root(planned_root: str, root: Path) -> None:
    if not _same_root(Path(planned_root), root):
        raise StalePlanError(
            f"plan is for another BIDS root: it was made for {planned_root}, not {root}",
            hint=f"apply it to {planned_root}, or run plan again for {root}",
        )


def check_plan_made_for(root: Path, config: Config, url: str, *, planned_root: str, planned_config: str | None,
                        planned_url: str | None) -> None:
    """The part of `check_plan_fresh` that needs neither XNAT nor the lock: the plan's BIDS root,
    XNAT and config are this apply's (said before a login that may fail for another reason)."""
    if planned_config is None:
        raise StalePlanError(
            "plan was saved by an older xnat2bids (plan format 1), which did not record the config it was made with",
            hint="run plan again",
        )
    check_plan_root(planned_root, root)
    if (planned_url or "").rstrip("/") != url.rstrip("/"):
        raise StalePlanError(
            f"plan is for another XNAT: it was made against {planned_url}, not {url}",
            hint="apply it with the XNAT it was made against, or run plan again",
        )
    if planned_config != config.fingerprint():
        raise StalePlanError(
            "plan is stale: it was made with a different config (naming, conversion or project settings differ)",
            hint="apply with the config used for planning, or run plan again with this one",
        )


def check_plan_fresh(
    plan: Plan, root: Path, config: Config, *, planned_root: str, planned_config: str | None,
    planned_url: str | None, url: str, planned_changes: Iterable[Mapping[str, Any]] = (),
) -> None:
    """A saved plan applies only to what it was computed for: its BIDS root, its config (naming
    and conversion decide every address and output), its XNAT and its lock (lineage, serial, and
    the record of each session it changes).

    `planned_root`, `planned_config`, `planned_url` and `planned_changes` are the plan file's
    `bids_root`, `config_fingerprint`, `xnat_url` (the two None in format 1 plans, which lack
    them) and `changes`; `url` is the XNAT this apply talks to.
    """
    check_plan_made_for(root, config, url, planned_root=planned_root, planned_config=planned_config,
                        planned_url=planned_url)
    lock = read_lock(root)
    if lock is None:
        if plan.serial != 0:
            raise StalePlanError(
                f"plan is stale: it was made against lock serial {plan.serial}, but {root} has no lock now",
                hint="run plan again",
            )
        return
    if lock.lineage != plan.lineage and plan.serial == 0 and lock.serial != 0:
        raise StalePlanError(f"plan is stale: {root} had no lock when it was made, and has one now (serial {lock.serial})",
                             hint="run plan again")
    if lock.lineage != plan.lineage and not (plan.serial == 0 and lock.serial == 0):
        raise StalePlanError(
            f"plan is stale: it was made for lock lineage {plan.lineage}, but {root} has lineage {lock.lineage}",
            hint="run plan again",
        )
    if lock.serial != plan.serial:
        raise StalePlanError(
            f"plan is stale: the lock changed since planning (serial {plan.serial} → {lock.serial})",
            hint="run plan again",
        )
    # Serials count one clone's writes: two clones that each applied once reach the same one, and
    # a git merge of their locks keeps it. The sessions the plan changes must still be as it saw them.
    for change in planned_changes:
        moved = _recorded_since(change, lock)
        if moved:
            raise StalePlanError(f"plan is stale: the lock changed since planning ({moved}), though its serial "
                                 f"is still {lock.serial} (a merge of another clone's lock?)", hint="run plan again")


def _recorded_since(change: Mapping[str, Any], lock: Lock) -> str | None:
    """How the lock's record of a planned change's session differs from the one the plan saw."""
    seen = change["before"]
    where = f"{change['address']} ({change['project']}/{change['experiment_id']})"
    if seen is None:
        return f"{where} is recorded now" if change["experiment_id"] in lock.sessions else None
    now = lock.sessions.get(seen["experiment_id"])
    if now is None:
        return f"{where} is no longer recorded"
    for name in ("address", "date", "insert_date", "last_modified"):
        value = now.address.path if name == "address" else getattr(now, name)
        if value != seen[name]:
            return f"{where}: {name} {seen[name]} → {value}"
    return None


def lock_for(plan: Plan, root: Path) -> Lock:
    """The lock a plan is applied to; one not written yet takes the lineage the plan recorded."""
    lock = load_or_new(root)
    if lock.lineage != plan.lineage and lock.serial == 0 and plan.serial == 0:
        lock = replace(lock, lineage=plan.lineage)
    return lock


def apply_plan(
    plan: Plan,
    root: Path,
    client,
    config: Config,
    *,
    options: ApplyOptions = ApplyOptions(),
    tools: dict[str, str] | None = None,
    on_event: Event = lambda kind, change, outcome: None,
    cancel: threading.Event | None = None,
) -> ApplyReport:
    """Stage sessions concurrently (bounded by `jobs`), commit each one as it finishes.

    Commits happen one at a time in the calling thread, so the lock has a single writer.
    A failed session leaves its old state on disk and in the lock; the others go on.
    Rejected credentials, and an XNAT that no longer answers, stop new sessions from starting.
    """
    cancel = cancel or threading.Event()
    tools = tools or {}
    report = ApplyReport(lock=replace(lock_for(plan, root), config_fingerprint=config.fingerprint()))
    changes = list(plan.actionable(repair_drift=options.repair_drift))
    halted: list[str] = []  # why no new session starts: rejected credentials, XNAT gone, a lock changed under us
    started: dict[Future, tuple[Change, float]] = {}
    pending = list(changes)

    def stage(change: Change) -> StagedSession:
        if cancel.is_set() or halted:
            raise _NotStarted()
        return stage_session(change, root, client, config, tools=tools, export_method=options.export_method, cancel=cancel)

    client.stop_when(cancel)  # a stop also ends the retries against a slow XNAT
    try:
        with ThreadPoolExecutor(max_workers=max(1, options.jobs), thread_name_prefix="xnat2bids-session") as pool:
            while pending or started:
                while pending and len(started) < max(1, options.jobs) and not (cancel.is_set() or halted):
                    change = pending.pop(0)
                    on_event("start", change, None)
                    started[pool.submit(stage, change)] = (change, time.monotonic())
                if not started:
                    break
                done, _ = wait(list(started), return_when=FIRST_COMPLETED, timeout=0.5)
                for fut in done:
                    change, t0 = started.pop(fut)
                    outcome = _settle(fut, change, t0, root, report, options, halted)
                    report.outcomes.append(outcome)
                    on_event(outcome.status.value, change, outcome)
            for change in pending:
                why = halted[0] if halted else "cancelled"
                outcome = Outcome(change, Status.SKIPPED, why)
                report.outcomes.append(outcome)
                on_event(outcome.status.value, change, outcome)
    finally:
        client.stop_when(None)
    report.cancelled = cancel.is_set()
    # Said when it kept a session from running or committing; not after the last one failed.
    if halted and any(o.status is Status.SKIPPED and o.message.endswith(halted[0]) for o in report.outcomes):
        report.halted = halted[0]
    return report


def _disk_full(exc: Exception, root: Path) -> Exception:
    """A full disk or quota as the session's error, saying where; any other error as it is."""
    if not isinstance(exc, OSError) or exc.errno not in NO_SPACE:
        return exc
    where = exc.filename or root
    what = NO_SPACE[exc.errno]
    return XnatBidsError(f"{what} on the disk holding {where}",
                         hint="free space there, then apply again (verified downloads are kept, partial ones resumed)")


class _NotStarted(Exception):
    pass


_REJECTED = "credentials rejected earlier in this run"  # sessions staged before it may still commit
# Each session would otherwise spend its own retries on it: minutes a session against a hung XNAT.
_UNREACHABLE = "XNAT could not be reached earlier in this run; apply again once it is back"
_COMMIT_STILL = (_REJECTED, _UNREACHABLE)  # what XNAT does no longer matters to what is staged


def _settle(
    fut: Future, change: Change, t0: float, root: Path, report: ApplyReport, options: ApplyOptions,
    halted: list[str],
) -> Outcome:
    log_path = WorkArea(root).log(change.key.experiment_id)
    try:
        staged = fut.result()
        warnings = list(staged.warnings)
        stop = next((why for why in halted if why not in _COMMIT_STILL), None)
        if stop is not None:  # the lock cannot take another commit
            return Outcome(change, Status.SKIPPED, f"not committed: {stop}")
        report.lock = commit_session(staged, root, report.lock, keep_dicom=options.keep_dicom,
                                     repair_drift=options.repair_drift, warnings=warnings)
    except _NotStarted:
        return Outcome(change, Status.SKIPPED, "not started")
    except AuthError as exc:
        if not isinstance(exc, ForbiddenError):  # a 403 is this session's; rejected credentials are everyone's
            halted.append(_REJECTED)
        log_line(log_path, f"failed: {exc.log_text()}")
        return Outcome(change, Status.FAILED, exc.summary, log_path, time.monotonic() - t0, hint=exc.hint)
    except (Cancelled, ConversionCancelled):  # stopped part-way by the user: not a failure
        log_line(log_path, "cancelled; nothing of it was committed")
        return Outcome(change, Status.SKIPPED, "cancelled part-way; nothing of it was committed")
    except Exception as exc:  # one session's failure, a bug or an OS error, must not stop the others
        exc = _disk_full(exc, root)
        text = exc.summary if isinstance(exc, XnatBidsError) else f"{type(exc).__name__}: {exc}"
        known = isinstance(exc, XnatBidsError)
        half = _half_committed(root, change.key.experiment_id)
        if half is not None:
            text += f" ({half[1]})"
        if isinstance(exc, RemoteError) and exc.unreachable:  # not an error status: no answer at all
            halted.append(_UNREACHABLE)
        elif isinstance(exc, LockConflictError):  # every later commit would meet the same lock
            halted.append("the lock changed on disk during this run; run plan again")
        elif half is not None and half[0]:  # on disk ahead of the lock (it cannot be written?): so would
            halted.append(f"the commit of {change.key.experiment_id} was left half-way")  # every later one be
        log_line(log_path, f"failed: {exc.log_text()}" if known else f"failed: {exc!r}")  # ours: with its hint
        hint = exc.hint if known else None
        return Outcome(change, Status.FAILED, text, log_path, time.monotonic() - t0, hint=hint)
    record = report.lock.sessions.get(change.key.experiment_id)
    return Outcome(change, Status.DONE, "", log_path, time.monotonic() - t0, record, warnings=tuple(warnings))


def _half_committed(root: Path, exp_id: str) -> tuple[bool, str] | None:
    """A commit this run left half-way (its journal is still there): whether its new folder is in
    place ahead of the lock, and what the next apply does with it, as `check` says it; None when
    nothing of the commit was left."""
    path = WorkArea(root).journal(exp_id)
    if not path.exists():
        return None
    try:
        journal, record = read_journal(path)
    except LockfileError:
        return True, "its journal cannot be read; see `xnat2bids check`"
    if swapped(root, journal):
        return True, "the new session is in place; the next apply completes its commit"
    trash = WorkArea(root).trash(exp_id)
    if trash.is_dir() and not (root / record.address.path).exists():  # moved aside, the new one not in
        return False, (f"the old session waits in {trash.relative_to(root)}; the next apply puts it back and tries "
                       "this one again")
    return False, "the old session is kept; the next apply tries this one again"


def log_line(path: Path, text: str) -> None:
    """Best effort: the outcome is reported on the console anyway, and a full disk must not stop
    the run that is reporting it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            open_to_group(fh.fileno())
            fh.write(f"{utc_now()} {text}\n")
    except OSError:
        pass


def _history_entry(operation: str, serial_before: int, serial_after: int, summary: dict[str, int],
                   sessions: list[dict], **extra: Any) -> dict:
    import socket

    from reconcile import __version__

    return {
        "time": utc_now(),
        "operation": operation,
        "user": login_name(),
        "host": socket.gethostname(),
        "xnat2bids": __version__,
        "lock_serial": {"before": serial_before, "after": serial_after},
        "summary": summary,
        **extra,
        "sessions": sessions,
    }


def append_history(root: Path, plan: Plan, report: ApplyReport, *, operation: str = "apply",
                   batch: str | None = None, errors: Sequence[tuple[str, str]] = ()) -> dict:
    """One JSON line per apply in the dataset's work area; never rewritten. `batch`: the SLURM
    batch a finalize merged, so that a later finalize can tell its own commits from others'.
    `errors`: (kind, summary) of what the apply did not take up (see `append_failed_run`), so
    that a night one project's listing failed does not read as a clean one."""
    after = report.lock.serial if report.lock else plan.serial
    last = last_history_entry(root)
    # Commits of this plan that `recover` already put in an entry (a finalize run again after it
    # was stopped part-way): this entry starts where that one ended, so the serials chain up.
    before = plan.serial
    if last is not None and plan.serial < last["lock_serial"]["after"] <= after:
        before = last["lock_serial"]["after"]
    entry = _history_entry(
        operation, before, after,
        {s.value: report.count(s) for s in Status},
        cancelled=report.cancelled,
        **({"batch": batch} if batch is not None else {}),
        **({"errors": [{"kind": kind, "message": message} for kind, message in errors]} if errors else {}),
        sessions=[
            {
                "experiment_id": o.change.key.experiment_id,
                "project": o.change.key.project,
                "address": o.change.address.path,
                "action": o.change.action.value,
                "result": o.status.value,
                "reasons": [r.message for r in o.change.reasons],
                "date": {
                    "before": o.change.before.date if o.change.before else None,
                    "after": o.change.after.date if o.change.after else None,
                },
                **({"error": o.message} if o.status is not Status.DONE else {}),
                **({"warnings": list(o.warnings)} if o.warnings else {}),
            }
            for o in report.outcomes
        ],
    )
    _append_entry(root, entry)
    return entry


def append_lock_change(root: Path, operation: str, serials: tuple[int, int], records: Iterable[SessionRecord],
                       *, action: str, reason: str, dropped: bool = False,
                       reasons: Mapping[str, str] | None = None) -> dict:
    """A history entry for a lock change that is not an apply: `forget` (`dropped` records), or
    commits no entry told of (see `_note_unrecorded`). `serials`: the lock's before and after;
    `reasons`: experiment ID → the reason of its row, where not `reason`."""
    rows = [
        {"experiment_id": r.experiment_id, "project": r.project, "address": r.address.path, "action": action,
         "result": "done", "reasons": [(reasons or {}).get(r.experiment_id, reason)],
         "date": {"before": r.date, "after": None} if dropped else {"before": None, "after": r.date}}
        for r in sorted(records, key=lambda r: (r.address, r.experiment_id))
    ]
    entry = _history_entry(operation, *serials, {"done": len(rows), "failed": 0, "skipped": 0}, rows)
    _append_entry(root, entry)
    return entry


FORCE_UNLOCK = "force-unlock"  # an entry that changes no lock: see `append_forced_unlock`


def append_forced_unlock(root: Path, holder: Holder) -> dict:
    """A history entry for the state lock `force-unlock` removed: who broke whose lock (the holder's
    ID, operation, account, host, pid and since when; nothing secret is in a lock record). It changes
    no lock: its serials are the last entry's after. The commits of the apply it broke (killed before
    its entry) get their "unrecorded" entry first: a version that does not pass over this entry
    would look for them after its time, and find none."""
    refuse_conflicted_history(root, nothing="its entry is not written")  # it would land inside the conflict
    with contextlib.suppress(XnatBidsError):  # an unreadable lock: the next apply says so
        _note_unrecorded(root)
    serial = history_serial(root)
    unlocked = {"id": holder.id, "operation": holder.operation, "user": holder.user, "host": holder.host,
                "pid": holder.pid, "since": holder.since, "jobs": list(holder.jobs)}
    entry = _history_entry(FORCE_UNLOCK, serial, serial, {"done": 0, "failed": 0, "skipped": 0}, [],
                           unlocked=unlocked)
    _append_entry(root, entry)
    return entry


def append_failed_run(root: Path, errors: Sequence[tuple[str, str]]) -> dict:
    """A history entry for an apply that failed before it applied anything (XNAT unreachable,
    credentials refused, listings that failed), so that such a night does not read as one the
    apply never ran: `errors`, each error's kind and one-line summary (never its detail, which may
    quote a server's answer). It changes no lock: its serials are the last entry's after, and
    readers looking for the last lock change pass over it (`failed_run`). As for a forced unlock,
    commits no entry tells of get theirs first. The caller holds the state lock."""
    refuse_conflicted_history(root, nothing="its entry is not written")  # it would land inside the conflict
    refuse_unfinished_merge(root, nothing="its entry is not written")
    with contextlib.suppress(XnatBidsError):  # an unreadable lock (maybe the failure itself): the next apply says so
        _note_unrecorded(root)
    serial = history_serial(root)
    entry = _history_entry("apply", serial, serial, {"done": 0, "failed": 0, "skipped": 0}, [],
                           errors=[{"kind": kind, "message": message} for kind, message in errors])
    _append_entry(root, entry)
    return entry


def failed_run(entry: Mapping[str, Any]) -> bool:
    """Whether a history entry tells of an apply that failed before it applied anything (errors,
    and no session: an apply that ran some has its errors beside them)."""
    return "errors" in entry and not entry["sessions"]


def _append_entry(root: Path, entry: dict) -> None:
    path = WorkArea(root).history
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:  # readable too: the last byte is looked at
        open_to_group(fh.fileno())  # another member's apply appends its entries too
        # A crash mid-append leaves a torn last line; start on a fresh line so this entry stays readable.
        torn = fh.tell() > 0 and os.pread(fh.fileno(), 1, fh.tell() - 1) != b"\n"
        hit("history-append")
        fh.write((("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n").encode())
        fh.flush()
        os.fsync(fh.fileno())


def _note_unrecorded(root: Path, completed: Sequence[str] = ()) -> None:
    """Commits the history does not tell of get an entry of their own: an apply killed after some
    commits (its entry is written at its end), or a commit `recover` just completed (`completed`:
    exported before the entry of the run that left it half-way, which told of it as failed). The
    lock's serial then is past the last entry's; those sessions and the ones exported since that
    entry are named. A serial that moved with no session exported since (a merge took the higher
    of two clones' serials) has nothing to tell: no entry."""
    lock = read_lock(root)
    last = last_history_entry(root)
    after = last["lock_serial"]["after"] if last else 0
    if lock is None or lock.serial <= after:
        return
    since = last["time"] if last else ""
    # Times are to the second: one exported in the entry's second is new unless the entry names it.
    named = {row["experiment_id"] for row in last["sessions"]} if last else set()
    records = [r for r in lock.sessions.values()
               if r.exported_at > since or (r.exported_at == since and r.experiment_id not in named)
               or r.experiment_id in completed]
    if records and last is not None:
        # A git merge of two clones' histories (a union) leaves the other clone's entries before
        # this one's last line: a session one of them tells of as exported since is not unrecorded.
        entries = read_history(root)
        after = max([after, *(e["lock_serial"]["after"] for e in entries if e["lock_serial"]["after"] < lock.serial)])
        told = told_by(entries)
        records = [r for r in records
                   if r.experiment_id in completed or r.experiment_id not in told or told[r.experiment_id]["time"] < r.exported_at]
    if not records:  # the serial moved without an export: a git merge of two clones' locks
        return
    append_lock_change(root, "unrecorded", (after, lock.serial), records, action="commit",
                       reason="in the lock without a history entry (an apply stopped before writing "
                              "its entry, or a history kept elsewhere)",
                       reasons=dict.fromkeys(completed, "an interrupted commit, completed by this run's recovery"))


def told_by(entries: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Experiment ID → the latest history entry that tells of it as exported (an apply's entry is
    written after its exports)."""
    told: dict[str, Mapping[str, Any]] = {}
    for entry in entries:
        for row in entry["sessions"]:
            exp_id = row["experiment_id"]
            if row.get("result") == "done" and row.get("action") != "forget" and (
                    exp_id not in told or entry["time"] > told[exp_id]["time"]):
                told[exp_id] = entry
    return told


def history_serial(root: Path) -> int:
    """The lock serial the history's last entry ends at; 0 without a history (or `.xnat2bids`).
    OSError when the history cannot be read."""
    if not (root / WORK_DIR).is_dir():
        return 0
    last = last_history_entry(root)
    return last["lock_serial"]["after"] if last is not None else 0


def last_history_entry(root: Path) -> dict | None:
    """The history's last complete entry of a lock change (a forced unlock or a failed run is none),
    read from the end of the file (an entry of a large apply is megabytes; the history holds many)."""
    path = WorkArea(root).history
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None
    with fh:
        end = fh.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - (1 << 20))
            fh.seek(start)
            tail = fh.read(end - start) + tail
            end = start
            lines = tail.split(b"\n")
            # Every line but the first is whole (the first may go on before `start`).
            for line in reversed(lines if start == 0 else lines[1:]):
                entry, _ = _history_line(line)
                if entry is not None and entry["operation"] != FORCE_UNLOCK and not failed_run(entry):
                    return entry
            tail = lines[0] if start > 0 else b""
    return None


def _history_line(line: str | bytes) -> tuple[dict | None, str | None]:
    """(the entry, None), or (None, what is wrong with the line); (None, None) for a blank one."""
    if not line.strip():
        return None, None
    try:
        entry = json.loads(line, parse_constant=_no_constant)
    except ValueError:  # usually a line torn by a crash during its append (the next starts anew)
        return None, "is not valid JSON"
    return (entry, None) if _is_history_entry(entry) else (None, "is not a complete history entry")


_JSON_TYPES = {"string": str, "object": dict, "array": list}


@cache
def _required(*where: str) -> tuple[dict[str, type], dict[str, frozenset[str]]]:
    """What schemas/history.schema.json requires of an entry (or, `where` "sessions", of a row):
    each required field's type, and the keys each required table must have."""
    schema = load_schema("history")
    for name in where:
        schema = schema["properties"][name]["items"]
    props = schema["properties"]
    types = {key: _JSON_TYPES[props[key]["type"]] for key in schema["required"]}
    keys = {key: frozenset(props[key].get("required", ())) for key in types if types[key] is dict}
    return types, keys


def _has_required(doc: object, *where: str) -> bool:
    types, keys = _required(*where)
    return (isinstance(doc, dict) and all(isinstance(doc.get(k), t) for k, t in types.items())
            and all(need <= doc[k].keys() for k, need in keys.items()))


def _is_history_entry(entry: object) -> bool:
    """Whether a history line has what readers use: the fields and tables the history schema
    requires, checked by type only (a full validation of every line would cost seconds)."""
    return _has_required(entry) and all(_has_required(row, "sessions") for row in entry["sessions"])


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: never written, so never passed on


def read_history(root: Path, *, warn: Callable[[str], None] = lambda m: None) -> list[dict]:
    """The history's entries in order; lines that are not a complete entry are skipped with a warning,
    and the marker lines of a git conflict with one warning naming the conflict."""
    path = WorkArea(root).history
    if not path.exists():
        return []
    entries = []
    conflicted = False
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if conflict_marker_line(line) is not None:  # both sides' entries are read; the markers said once
            if not conflicted:
                warn(f"{_history_conflict(path, number)}; {_history_way_out(root, path.relative_to(root))}")
            conflicted = True
            continue
        entry, problem = _history_line(line)
        if problem is not None:
            warn(f"{path}: line {number} {problem}; skipped")
        elif entry is not None:
            entries.append(entry)
    return entries


def history_conflict_line(root: Path) -> int | None:
    """The line (from 1) of the first git conflict marker in the history; None when it has none,
    or there is no history (or no work area). Reads the file as bytes: a history of many large
    applies is tens of megabytes."""
    if not (root / WORK_DIR).is_dir():
        return None
    try:
        data = WorkArea(root).history.read_bytes()
    except (OSError, UnsafePathError):  # missing, or unreadable: whoever appends says so
        return None
    found = first_conflict_marker(data)
    return None if found is None else data.count(b"\n", 0, found) + 1


def _history_conflict(path: Path, line: int) -> str:
    return f"{path}: unresolved git merge conflict (a conflict marker at line {line})"


def _history_way_out(root: Path, named: Path) -> str:
    """How to resolve a history git left conflicted (`named`: the file as `git add` should name it)."""
    import shlex

    way = (f"keep both sides' entries: delete the marker lines (<<<<<<<, =======, >>>>>>>) and leave every entry "
           "line of both sides as it stands, each side's in its order, as git's `merge=union` writes them (a line is "
           f"one whole entry; `xnat2bids history` shows them by time), then `git add {shlex.quote(str(named))}`")
    attributes = root / WORK_DIR / ".gitattributes"
    try:
        union = "history.jsonl merge=union" in attributes.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        union = False
    if not union:  # an older xnat2bids wrote no such file: git merged the history line by line
        way += ("; with `history.jsonl merge=union` in .xnat2bids/.gitattributes (apply writes it when it exports; "
                "commit it) git keeps both sides' entries itself")
    return way


def history_conflict_note(root: Path) -> str | None:
    """What `plan` and `check` say of a history git left conflicted."""
    line = history_conflict_line(root)
    if line is None:
        return None
    named = (root / WORK_DIR / "history.jsonl").relative_to(root)
    return (f"unresolved git merge conflict markers in {named} (line {line}): apply writes nothing until they are "
            f"resolved ({_history_way_out(root, named)})")


def refuse_conflicted_history(root: Path, *, nothing: str = "nothing was exported") -> None:
    """Before apply (or forget) writes anything: an entry appended to a history git left
    conflicted would land after the other side's marker, inside the conflict."""
    line = history_conflict_line(root)
    if line is not None:
        path = WorkArea(root).history
        raise DatasetFileError(f"{_history_conflict(path, line)}; {nothing}", hint=_history_way_out(root, path))
