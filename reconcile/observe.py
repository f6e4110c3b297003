"""Gathering the planner's inputs: XNAT listings (desired) and the disk (actual).

All the I/O that `plan` needs happens here, so that `plan.compute_plan` stays pure.
"""

from __future__ import annotations

import gc
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

from reconcile import __version__
from reconcile.config import Config, expand_projects, is_pattern
from reconcile.errors import ConfigError, RemoteError, XnatBidsError
from reconcile.journal import as_recovered, located, pending_commits
from reconcile.localscan import holds_nothing, stat_outputs
from reconcile.lock import Lock, gc_paused, load_or_new, read_lock
from reconcile.model import BidsAddress, Experiment, FileStat, MalformedRow
from reconcile.naming import address_for
from reconcile.plan import (
    SESSION_TYPES_SUFFIX,
    Action,
    LocalState,
    Plan,
    ProjectListing,
    RemoteState,
    Selection,
    compute_plan,
    moves_in,
    note_moved_in,
    refuse_occupied,
)
from reconcile.vcs import maybe_in_git, unfinished_merge_note
from reconcile.workarea import WORK_DIR, unconvertible, uncreatable
from reconcile.xnat import CONNECTIONS, XnatClient


def choose_projects(selection: Selection, config: Config, lock: Lock) -> tuple[str, ...]:
    """--project > `projects` in the config > the projects the lock already knows. A glob, on the
    command line or in the config, selects among the config's IDs and the lock's projects: XNAT
    is asked for project IDs, never for patterns."""
    wanted = selection.projects or config.projects
    if wanted and not any(is_pattern(p) for p in wanted):
        # IDs only: the lock's records stay undecoded here, so the local scan decodes them while
        # XNAT builds the listing (10,000 recorded sessions: ~0.25 s off an unchanged plan).
        return tuple(dict.fromkeys(wanted))
    recorded = tuple(sorted({r.project for r in lock.sessions.values()}))
    if not wanted:
        if not recorded:
            raise ConfigError(
                "no XNAT project selected",
                hint="set projects = [\"P\"] in the config, or pass --project P to plan or apply",
            )
        return recorded
    known = tuple(dict.fromkeys((*(p for p in config.projects if not is_pattern(p)), *recorded)))
    if selection.projects:
        return expand_projects(wanted, known, where="in the config or the lock")
    return expand_projects(wanted, known, where="exported to this BIDS root (the config's `projects` is a glob)",
                           hint="a glob in `projects` selects among the projects already exported here; "
                                "list a project not exported yet by its XNAT ID")


def observe_remote(
    client: XnatClient,
    projects: Sequence[str],
    *,
    deep: bool = False,
    concurrency: int = CONNECTIONS,
    wanted: Callable[[Experiment], bool] = lambda exp: True,
) -> RemoteState:
    """One listing request per project; with `deep`, scans and files per session too.

    A failed listing becomes a ProjectListing with `experiments=None`, so the planner can
    refuse that project instead of reading the failure as "everything was deleted".
    """
    client.login()  # rejected credentials stop everything; per-project errors do not
    listings = []
    for project in projects:
        try:
            malformed: list[MalformedRow] = []
            rows = tuple(client.list_experiments(project, malformed))
            listings.append(ProjectListing(project, rows, malformed=tuple(malformed)))
        except RemoteError as exc:
            listings.append(ProjectListing(project, None, _said(exc), error_summary=exc.summary))
    details = None
    if deep:
        sessions = [
            e for lst in listings if lst.experiments for e in lst.experiments
            if e.xsi_type.endswith(SESSION_TYPES_SUFFIX) and wanted(e)
        ]
        failures: dict[str, RemoteError] = {}
        details = client.deep_details(sessions, concurrency=concurrency, failures=failures)
        # A session whose scans could not be listed: its project is planned as a failed listing
        # would be (nothing planned for it), the other projects as usual.
        listings = [_deep_failed(lst, failures) for lst in listings]
    return RemoteState(tuple(listings), details)


def _deep_failed(listing: ProjectListing, failures: Mapping[str, RemoteError]) -> ProjectListing:
    failed = next((e for e in listing.experiments or () if e.id in failures), None)
    if failed is None:
        return listing
    error = failures[failed.id]
    more = sum(1 for e in listing.experiments or () if e.id in failures) - 1
    also = f" (and {more} more session{'s' if more != 1 else ''})" if more else ""
    which = f"the scans of session {failed.label} ({failed.id}){also}"
    return ProjectListing(listing.project, None, f"{which}: {_said(error)}", error_summary=f"{which}: {error.summary}")


def _said(exc: RemoteError) -> str:
    """The error for a plan's problem line: its summary, and the first line of its detail (which
    value was malformed, what the server answered), cut short."""
    first = (exc.detail or "").strip().partition("\n")[0]
    if not first:
        return exc.summary
    return f"{exc.summary} ({first[:197] + '...' if len(first) > 200 else first})"


@cache
def tool_versions() -> dict[str, str]:
    """Versions of the converters on PATH; recorded per session, compared by plan."""
    versions = {"xnat2bids": __version__}
    try:
        from importlib.metadata import version

        versions["heudiconv"] = version("heudiconv")
    except Exception:  # not installed: conversion will fail later with a clear error
        pass
    from reconcile.convert import converter_env

    env = converter_env()
    exe = shutil.which("dcm2niix", path=env["PATH"])
    wheel = _wheel_dcm2niix_version()
    if exe and wheel and Path(exe).parent == Path(sys.executable).parent:
        # The PyPI wheel's script is the one on PATH: its metadata names the binary's release,
        # which saves starting dcm2niix (~0.5 s) on every plan.
        versions["dcm2niix"] = f"v{wheel}"
    elif exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, encoding="utf-8", errors="replace", timeout=30, env=env).stdout
            for token in out.split():
                if token.startswith("v1.") or token.startswith("v2."):
                    versions["dcm2niix"] = token
                    break
        except (OSError, subprocess.SubprocessError):
            pass
    return versions


def _wheel_dcm2niix_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("dcm2niix")
    except Exception:
        return None


def _selected(exp: Experiment, config: Config, selection: Selection) -> bool:
    """Worth a deep listing: selected, and with labels that make a safe BIDS address."""
    try:
        address = address_for(exp, config.naming)
    except XnatBidsError:
        return False
    return selection.wants(exp.subject_label, address.subject, exp.label, exp.id, address.session) and \
        not selection.excludes(exp.project, exp.label, exp.id, address.session)


@dataclass(frozen=True)
class PlanRun:
    root: Path
    lock: Lock
    plan: Plan
    recovering: int = 0  # interrupted commits the next apply finishes or undoes: changes too


def make_plan(
    client: XnatClient,
    root: Path,
    config: Config,
    selection: Selection,
    *,
    deep: bool = False,
    reconvert_outdated: bool = False,
    concurrency: int = CONNECTIONS,
    full: bool = False,
) -> PlanRun:
    with gc_paused():
        # Planned as the next apply's recovery leaves it: a commit a crash interrupted with its
        # folder in place is recorded, not a foreign folder in the way.
        interrupted = pending_commits(root)
        lock, waiting, pending = as_recovered(root, load_or_new(root), interrupted)
        projects = choose_projects(selection, config, lock)
        if selection.projects:  # globs expanded: the planner compares project IDs
            selection = replace(selection, projects=projects)
        # The disk is looked at while XNAT answers: os.stat and the wait for the listing both
        # release the GIL (10,000 sessions × 4 outputs: about 0.3 s of the 1.4 s plan saved).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-scan") as pool:
            # --full hashes the selected sessions' outputs only (of the projects planned): one
            # session need not cost the whole dataset.
            hashed = replace(selection, projects=projects).holds if full else False
            scan = pool.submit(stat_outputs, root, lock, full=hashed)
            shown = replace(selection, excluded=config.exclusions())
            remote = observe_remote(client, projects, deep=deep, concurrency=concurrency,
                                    wanted=lambda e: _selected(e, config, shown))
            local = scan.result()
        if waiting:  # a session whose commit the next apply rolls back: its files wait in the trash
            local = _waiting_in_trash(local, lock, waiting)
        plan = compute_plan(
            lock, remote, local, config, selection=selection, tools=tool_versions(),
            reconvert_outdated=reconvert_outdated,
        )
        occupied = occupied_folders(root, plan, lock)
        plan = refuse_occupied(plan, occupied, {a: _holding(root / a.path) for a, f in occupied.items() if f is None})
        if config.layout == "pi-study":
            plan = note_moved_in(plan, _recorded_in_other_studies(root, plan))
        conflicted = _conflicted(root, plan)
        refused = _refused(root, config, plan, read_files=not conflicted)  # conflict markers: said already
        if not refused and not root.exists() and plan.changes:
            refused = absent_root_note(root)
        # Notes about the root come first, most pressing first; the planner's own after them.
        first = (refused, _strangers_beside(root, lock, plan), *_git_notes(root), conflicted, lost_lock(root, lock),
                 *pending)
        last = (_staged_for_nothing(root, plan),)
        plan = replace(plan, notes=(*filter(None, first), *plan.notes, *filter(None, last)))
        _promote_survivors()
    return PlanRun(root, lock, plan, len(interrupted))


def absent_root_note(root: Path) -> str:
    """Plan's note for a root that does not exist, where it has changes."""
    return (f"{root} does not exist: apply creates it and exports every session; if the dataset was moved, or its "
            "file system is not mounted, stop here")


def _git_notes(root: Path) -> tuple[str | None, ...]:
    """An unfinished merge (or rebase...), and a history git left conflicted. Not looked for where
    no git repository can be: no history read on every plan."""
    if not maybe_in_git(root):
        return ()
    from reconcile.apply import history_conflict_note

    return unfinished_merge_note(root), history_conflict_note(root)


def _strangers_beside(root: Path, lock: Lock, plan: Plan) -> str | None:
    """A note naming session folders the lock does not record in the subjects this plan creates
    sessions in: an earlier export (the lab's old script, other [naming]) of the same sessions
    under other labels, which the creates would export again beside them. One listing of each
    such subject's folder there is."""
    creates = [c for c in plan.changes if c.action is Action.CREATE]
    if not creates or not root.is_dir():
        return None
    try:  # one listing of the root: a first plan creates 10,000 sessions in subjects not there yet
        present = {name for name in os.listdir(root) if name.startswith("sub-")}
    except OSError:
        return None
    known = {r.address.path for r in lock.sessions.values()} | {c.address.path for c in plan.changes}
    found = []
    for subject in sorted({c.address.subject for c in creates if f"sub-{c.address.subject}" in present}):
        try:
            with os.scandir(root / f"sub-{subject}") as entries:
                names = sorted(e.name for e in entries if e.name.startswith("ses-") and e.is_dir())
        except OSError:
            continue
        # An empty one (an old export's files moved away) holds no data to export twice.
        found += [f"sub-{subject}/{name}" for name in names
                  if f"sub-{subject}/{name}" not in known and not holds_nothing(root, f"sub-{subject}/{name}")]
    if not found:
        return None
    shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
    return (f"{len(found)} session folder{'s' if len(found) != 1 else ''} the lock does not record stand"
            f"{'s' if len(found) == 1 else ''} in subjects this plan creates sessions in ({shown}): if an earlier "
            "export (another tool, another [naming]) made them, apply exports those sessions again under the "
            "names above; check [naming] session_label (and subjects, sessions) first")


def _refused(root: Path, config: Config, plan: Plan, *, read_files: bool = True) -> str | None:
    """What apply would refuse before exporting anything of this plan: a root it would not create,
    a path heudiconv cannot convert into, a dataset file every commit updates that it cannot read
    (not UTF-8, not JSON). Said by plan, so that `--diff` does not promise what `--update` refuses."""
    from reconcile.dataset import DatasetFileError, check_dataset_level_files

    if not plan.actionable(repair_drift=True):
        return None
    problem = unconvertible(root) or (uncreatable(root, config.layout) if not root.exists() else None)  # apply's order
    if problem is None and read_files and root.is_dir():
        try:
            check_dataset_level_files(root)
        except DatasetFileError as exc:
            problem = exc
    if problem is None:
        return None
    return f"apply refuses to export anything here: {problem.summary}" + (f"; {problem.hint}" if problem.hint else "")


def _conflicted(root: Path, plan: Plan) -> str | None:
    """A note naming the dataset files apply updates (participants.tsv, the changed subjects'
    sessions files, the top-level JSON) that a git merge left with conflict markers: apply refuses
    to start until they are resolved."""
    from reconcile.dataset import unresolved_conflicts
    from reconcile.plan import subjects_written

    found = unresolved_conflicts(root, subjects_written(plan.actionable(repair_drift=True)))
    if not found:
        return None
    named = ", ".join(f"{path.relative_to(root)} (line {line})" for path, line in found)
    files = " ".join(shlex.quote(str(path.relative_to(root))) for path, _ in found)
    return (f"unresolved git merge conflict markers in {named}: apply exports nothing until they are resolved "
            f"(keep both sides' rows, delete the marker lines, then `git add {files}`)")


def lost_lock(root: Path, lock: Lock) -> str | None:
    """A note when the root has no lock, or an older one (restored from a backup), while its
    history tells of later commits: the folders plan then finds in the way are the lock's, not
    foreign ones to move out."""
    missing = not (root / ".xnat2bids.lock").exists()
    if missing and (lock.serial != 0 or lock.sessions):
        return None
    from reconcile.apply import history_serial

    try:
        serial = history_serial(root)
    except OSError:  # an unreadable history: apply says so where it appends
        return None
    if serial <= lock.serial:
        return None
    if missing:
        return (f"{root} has no .xnat2bids.lock, but its history tells of exports (up to lock serial {serial}): "
                "restore the lock (from git or a backup) before applying")
    return (f"the lock (serial {lock.serial}) is older than the history, which tells of exports up to serial "
            f"{serial}: restored from an older backup or commit? what was exported since is not in it; restore "
            "the newest lock before applying")


def _staged_for_nothing(root: Path, plan: Plan) -> str | None:
    """A note naming the downloads an interrupted apply left in the work area for sessions this
    plan does not change (deleted or deselected since): apply reuses one when its session is
    planned again, and nothing else removes them (DICOM: patient data, gigabytes)."""
    staging = root / WORK_DIR / "staging"
    try:
        with os.scandir(staging) as entries:
            staged = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    except OSError:
        return None
    if staged:
        from reconcile.statelock import working_holder

        holder = working_holder(root)
        if holder is not None and holder.pid != os.getpid():  # an apply or a SLURM batch at work: its own
            return None
    changed = {c.key.experiment_id for c in plan.changes}
    journals = root / WORK_DIR / "journal"
    idle = [name for name in staged if name not in changed and not (journals / f"{name}.json").exists()]
    if not idle:
        return None
    shown = ", ".join(idle[:5]) + (", …" if len(idle) > 5 else "")
    return (f".xnat2bids/staging holds what an earlier apply (stopped or failed) downloaded for {len(idle)} session(s) no change here "
            f"asks for ({shown}): apply reuses it if they are planned again; delete it to free the space")


def _recorded_in_other_studies(root: Path, plan: Plan) -> dict[str, tuple[str, str]]:
    """The sessions `plan` creates that another study's lock of the same pi-study tree records:
    experiment ID → (recorded project, that study's folder). Only those records are decoded."""
    from reconcile.layout import dataset_roots

    creates = {c.key.experiment_id for c in plan.changes if c.action is Action.CREATE}
    found: dict[str, tuple[str, str]] = {}
    if not creates:
        return found
    here = os.path.realpath(root)
    for other in dataset_roots(root.parent.parent.parent):  # <base>/<pi>/study-<study>/bids
        if os.path.realpath(other) == here:
            continue
        try:
            lock = read_lock(other)
        except XnatBidsError:  # planning that study reports it
            continue
        for exp_id in creates & set(lock.sessions) if lock else ():
            found[exp_id] = (lock.sessions[exp_id].project, str(other))
    return found


def _waiting_in_trash(local: LocalState, lock: Lock, waiting: Mapping[str, tuple[str, Path]]) -> LocalState:
    """`local` with the outputs of sessions whose folder waits in the trash (a commit the next
    apply rolls back) stat'ed there, as `check` judges them."""
    files = dict(local.files)
    for rec in lock.sessions.values():
        if rec.address.path not in waiting:
            continue
        for out in rec.outputs:
            where = located(out.path, waiting)
            if where is None:  # outside its session folder (a hand-edited lock): check names it
                continue
            try:
                st = os.stat(where)
            except OSError:
                continue
            files[out.path] = FileStat(st.st_size, st.st_mtime_ns)
    return replace(local, files=files)


def _holding(folder: Path, shown: int = 3, most: int = 1000) -> tuple[int, tuple[str, ...]]:
    """How many files are below `folder` (counted up to `most`), and the first few (relative to
    it, in name order). A link is not followed: another tool's export may be large or elsewhere."""
    found: list[str] = []
    if folder.is_symlink():
        return 0, ()
    for dirpath, dirs, files in os.walk(folder):
        dirs.sort()
        found += (os.path.relpath(os.path.join(dirpath, f), folder) for f in sorted(files))
        if len(found) >= most:
            break
    return len(found), tuple(found[:shown])


def occupied_folders(root: Path, plan: Plan, lock: Lock) -> dict[BidsAddress, str | None]:
    """The session folders that `plan` would move into and that exist on disk, though the lock
    records no session at them; each with the file in the way of its subject folder, if that is
    what is there. A folder that holds no file (only empty folders: an old export moved away) is
    not in the way: apply takes its place. One listing of the root; a folder is looked for only
    when its subject's folder exists (an empty root: no more system calls). None of them when no change moves in (an
    unchanged plan): no system call at all."""
    if not any(moves_in(c) for c in plan.changes):
        return {}
    try:
        with os.scandir(root) as entries:
            subjects = {e.name: e.is_dir() for e in entries}
    except OSError:  # no root yet (or unreadable: apply will say so)
        return {}
    recorded = {r.address for r in lock.sessions.values()}
    occupied: dict[BidsAddress, str | None] = {}
    for c in plan.changes:
        subject = f"sub-{c.address.subject}"
        if not moves_in(c) or subject not in subjects or c.address in recorded:
            continue
        if not subjects[subject]:  # a file (or a broken link) where its folder goes
            occupied[c.address] = subject
        elif os.path.lexists(os.path.join(root, c.address.path)) and not holds_nothing(root, c.address.path):
            occupied[c.address] = None
    return occupied


def _promote_survivors() -> None:
    """Move every object the collector tracks into its oldest generation, unscanned.

    What planning allocated with the collector paused (decoded lock records, listing rows,
    changes) lives on and forms no cycles, but the first collection after the pause would
    traverse all of it, and the next generation's again (10,000 recorded sessions: ~0.2 s each,
    spent rendering the plan). Cycles among these objects are still found by the next full
    collection, as if they had survived the young ones.
    """
    gc.freeze()  # into the permanent generation...
    gc.unfreeze()  # ...and back into the oldest one
