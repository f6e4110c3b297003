"""Where each project's BIDS dataset lives: one root ("flat"), or the seed tool's
`<root>/<pi>/study-<study>/bids` trees for XNAT projects named `PI_STUDY` ("pi-study").

Only path arithmetic and directory listing; nothing is created here, and a glob never names a
folder: it selects among projects that are known.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reconcile.config import expand_projects, is_pattern
from reconcile.errors import ConfigError, LockfileError
from reconcile.lock import lock_path, read_lock
from reconcile.naming import check_safe


@dataclass(frozen=True)
class Study:
    project: str
    root: Path


def _find_child(parent: Path, name: str) -> Path:
    """An existing child whose name matches case-insensitively, else `parent/name` lower-cased."""
    if parent.is_dir():
        for child in sorted(parent.iterdir()):
            if child.is_dir() and child.name.lower() == name.lower():
                return child
    return parent / name.lower()


def study_root(root: Path, project: str) -> Path:
    if is_pattern(project):
        raise ConfigError(
            f"{project!r} is a pattern, not a project; refusing to make a study folder for it",
            hint="select the project by its ID (PI_STUDY), or by a glob that matches known projects",
        )
    pi, sep, study = project.partition("_")
    if not sep or not pi or not study:
        raise ConfigError(
            f"project {project!r} does not have the PI_STUDY form that layout = \"pi-study\" needs",
            hint="use layout = \"flat\" for this project, or name it PI_STUDY",
        )
    check_safe(pi, "PI")
    check_safe(study, "study")
    return _find_child(_find_child(root, pi), f"study-{study}") / "bids"


def dataset_roots(root: Path) -> list[Path]:
    """The `<pi>/study-<study>/bids` folders under `root` that a project could have made (no
    lock is read)."""
    roots = []
    for bids in sorted(root.glob("*/study-*/bids")):
        pi, study = bids.parent.parent.name, bids.parent.name.removeprefix("study-")
        if bids.is_dir() and study and not is_pattern(pi) and not is_pattern(study):
            roots.append(bids)
    return roots


def discover(root: Path) -> list[Study]:
    """Existing `<pi>/study-<study>/bids` datasets; the project comes from the lock when there is one.

    Folders whose names no project could have made (a glob such as `study-*`, an empty study) are
    skipped: they were never datasets of this tool, and planning them would ask XNAT for a project
    that cannot exist.
    """
    found = []
    for bids in dataset_roots(root):
        pi, study = bids.parent.parent.name, bids.parent.name.removeprefix("study-")
        try:
            lock = read_lock(bids)
        except LockfileError:  # named by the folder; the command run on this dataset reports it
            lock = None
        recorded = sorted({r.project for r in lock.sessions.values()}) if lock else []
        if recorded:
            found += [Study(p, bids) for p in recorded]
        else:
            found.append(Study(f"{pi}_{study}".upper(), bids))
    return found


def study_at(root: Path, *, known: tuple[str, ...] = ()) -> list[Study] | None:
    """The study (or studies) whose own dataset `root` is, when it is one: it holds a lock, or it
    is a `<pi>/study-<study>/bids` folder. None for the top of a pi/study tree."""
    lock = read_lock(root) if lock_path(root).is_file() else None
    recorded = sorted({r.project for r in lock.sessions.values()}) if lock else []
    if recorded:
        return [Study(p, root) for p in recorded]
    if root.name != "bids" or not root.parent.name.startswith("study-"):
        return None
    project = f"{root.parent.parent.name}_{root.parent.name.removeprefix('study-')}"
    configured = [p for p in known if p.lower() == project.lower()]
    return [Study(configured[0] if configured else project.upper(), root)]


def studies(root: Path, projects: tuple[str, ...], *, known: tuple[str, ...] = ()) -> list[Study]:
    """The (project, BIDS root) pairs a pi-study tree holds or should hold.

    A project ID names its study folder, existing or not. A glob is matched against the known
    projects: the IDs in `projects` and `known` (the config's) and the studies under `root`; one
    that matches none is an error, so that no folder is ever named after a pattern.
    """
    if not projects:
        found = discover(root)
        if not found:
            raise ConfigError(
                f"no <pi>/study-<study>/bids datasets under {root} and no project selected",
                hint="pass --project PI_STUDY or set projects in the config",
            )
        return found
    existing = {s.project: s.root for s in discover(root)} if any(map(is_pattern, projects)) else {}
    candidates = sorted({p for p in (*projects, *known) if not is_pattern(p)} | set(existing))
    chosen = expand_projects(projects, candidates, where=f"in the config or under {root}")
    # In path order, as `discover` (and with it check, show, status and history) walks them.
    return sorted((Study(p, existing.get(p) or study_root(root, p)) for p in chosen), key=lambda s: (s.root, s.project))
