"""Optional git commit of an apply's result (`--git-commit`), for git or DataLad datasets, and
what keeps xnat2bids' own files out of any commit (`ensure_own_ignores`, `exclude_locally`).

Only what the apply wrote is committed: the lock, the history, the dataset's own files and the
folders of the subjects it exported. Never the state lock's `.info` file (held while the command
runs), xnat2bids' logs and staging, or anything else the user has changed or staged.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconcile.credentials import without_secrets
from reconcile.durable import write_atomic
from reconcile.errors import ConfigError, VcsError, XnatBidsError
from reconcile.lock import LOCK_NAME, differing_sessions, read_lock
from reconcile.model import SessionRecord
from reconcile.workarea import WORK_DIR

if TYPE_CHECKING:
    from reconcile.apply import ApplyReport

# Dataset-level files apply writes or updates, relative to the BIDS root.
DATASET_FILES = (
    LOCK_NAME, ".xnat2bids/history.jsonl", ".xnat2bids/.gitignore", ".xnat2bids/.gitattributes", ".bidsignore",
    "dataset_description.json", "participants.tsv", "participants.json", "sessions.json", "scans.json",
)
# xnat2bids' own working folders: logs, staging, kept copies; in the history's folder, never committed.
GITIGNORE = "# Written by xnat2bids: its working folders stay out of the dataset's history.\n" + "".join(
    f"/{name}/\n" for name in ("batches", "journal", "logs", "replaced", "revocations", "staging", "tmp", "trash")
)
# Two clones that each applied append to the history's end: a union merge keeps both sides'
# entries instead of a conflict on every pull.
GITATTRIBUTES = "# Written by xnat2bids: the history is append-only; a merge keeps both sides' lines.\nhistory.jsonl merge=union\n"


# A commit message lists at most this many sessions.
MESSAGE_LINES = 500
# More pathspecs than this go to git on its standard input (git 2.25+): a command line holds about
# 20,000 session folders (E2BIG). Fewer go on the command line, which any git reads.
PATHSPECS_ON_COMMAND_LINE = 2000


def _git(root: Path, *args: str, text: bool = True, input: str | None = None) -> subprocess.CompletedProcess[Any]:
    try:
        # Without XNAT's credentials: the dataset's hooks run with this environment. Paths given
        # on stdin and read back (ls-files) are coded as the argv's are, whatever the locale.
        coding = {"encoding": sys.getfilesystemencoding(), "errors": sys.getfilesystemencodeerrors()} if text else {}
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, input=input,
                              env=without_secrets(os.environ), **coding)
    except OSError as exc:  # no git on PATH
        raise VcsError(f"git could not be run: {exc.strerror or exc}",
                            hint="the lock and the files are right; commit the dataset by hand "
                                 "(git add, git commit)") from exc


def is_repository(root: Path) -> bool:
    out = _git(root, "rev-parse", "--show-toplevel")
    return out.returncode == 0 and Path(out.stdout.strip()).resolve() == root.resolve()


def check_can_commit(root: Path) -> None:
    """Before an apply with --git-commit does any work: the root is a repository's top and git
    knows who commits."""
    if not is_repository(root):
        raise ConfigError(f"--git-commit: {root} is not the top of a git repository", hint="run `git init` there first")
    git_dir = _git_dir(root)
    busy = _unfinished_operation(root, git_dir)
    if busy:
        raise ConfigError(f"--git-commit: {root} is in the middle of {busy}",
                          hint="finish it (resolve, then `git commit`, or `git merge --abort`) and run again; "
                               "xnat2bids never commits on top of unresolved conflicts")
    index_lock = git_dir / "index.lock"
    if index_lock.exists():  # git add would fail after all the work
        raise ConfigError(f"--git-commit: {index_lock} exists: another git command runs in {root}, or one was killed",
                          hint="if no git command runs there, remove that file and run again")
    if (root / ".datalad").is_dir():
        return  # datalad save reports its own problems
    ident = _git(root, "var", "GIT_COMMITTER_IDENT")
    if ident.returncode != 0:
        raise ConfigError("--git-commit: git does not know who commits here",
                          detail=ident.stderr.strip()[-500:] or None,
                          hint='set it with `git config user.name "…"` and `git config user.email "…"`')


def _git_dir(root: Path) -> Path:
    """The repository's git folder (`.git`, or where a worktree's file points)."""
    out = _git(root, "rev-parse", "--git-dir")
    return root / out.stdout.strip() if out.returncode == 0 else root / ".git"


def _unfinished_operation(root: Path, git_dir: Path) -> str | None:
    """What git is in the middle of (a merge, rebase, cherry-pick, revert), or unmerged paths: a
    commit then would either fail after all the work or mark the conflicts resolved."""
    for name, what in (("MERGE_HEAD", "a git merge"), ("rebase-merge", "a git rebase"), ("rebase-apply", "a git rebase"),
                       ("CHERRY_PICK_HEAD", "a git cherry-pick"), ("REVERT_HEAD", "a git revert")):
        if (git_dir / name).exists():
            return what
    unmerged = _git(root, "ls-files", "--unmerged")
    if unmerged.returncode == 0 and unmerged.stdout.strip():
        path = unmerged.stdout.split("\t", 1)[1].splitlines()[0]
        return f"a conflict git has not seen resolved ({path})"
    return None


def commit_apply(root: Path, title: str, report: ApplyReport) -> str | None:
    """Commit what an apply may have written: the dataset files, and the subject folders (the old
    and the new one of a rename) and kept DICOM of each session it carried out, or that the lock
    records otherwise than the last commit's lock does (a commit that recovery completed, a run
    killed before its git commit): every commit is then a dataset that passes `check` once cloned.
    Returns the new commit ID, None when nothing changed."""
    carried, ids = set(), set()
    for outcome in report.outcomes:
        change = outcome.change
        ids.add(change.key.experiment_id)
        carried.update([change.address] + ([change.before.address] if change.before is not None else []))
    pairs = _recorded_since_last_commit(root)
    if not isinstance(pairs, list):  # HEAD has no lock this one can be compared with: every session folder
        current = read_lock(root)
        addresses = {rec.address for rec in current.sessions.values()} if current is not None else set()
        # None: no lock committed yet (a first export), nothing to say; else the committed one is unreadable.
        earlier = [] if pairs is None else [
            "(the last commit's lock could not be read: every session folder is included)"]
    else:
        pairs = [(old, new) for old, new in pairs if (new or old).experiment_id not in ids]  # type: ignore[union-attr]
        addresses = {rec.address for pair in pairs for rec in pair if rec is not None}
        earlier = [_told(old, new) for old, new in pairs]
    paths = set(DATASET_FILES)
    for address in carried | addresses:
        paths.add(f"sub-{address.subject}")
        paths.add(f"sourcedata/sub-{address.subject}/ses-{address.session}")
    return commit_paths(root, apply_message(title, report, earlier), paths)


def _told(old: SessionRecord | None, new: SessionRecord | None) -> str:
    """A commit message's line for a session recorded otherwise than in the last commit."""
    if new is None:
        return f"no longer recorded: {old.address.path} ({old.experiment_id})"  # type: ignore[union-attr]
    moved = f"{old.address.path} → " if old is not None and old.address != new.address else ""
    return f"recorded by an earlier run: {moved}{new.address.path} ({new.experiment_id})"


def _recorded_since_last_commit(root: Path) -> list[tuple[SessionRecord | None, SessionRecord | None]] | str | None:
    """(record in HEAD's lock, record now) of each session recorded otherwise than in the last
    commit; None when HEAD has no lock (a first export), what is wrong when HEAD's lock cannot be
    compared (one that does not validate)."""
    shown = _git(root, "show", f"HEAD:./{LOCK_NAME}", text=False)
    if shown.returncode != 0:
        return None
    try:
        return differing_sessions(root, shown.stdout, f"HEAD:{LOCK_NAME}")
    except XnatBidsError as exc:  # a lock committed by hand that does not validate, or of a newer format
        return exc.summary


def apply_message(title: str, report: ApplyReport, earlier: Sequence[str] = ()) -> str:
    """`earlier`: a line for each session recorded since the last commit that this apply did not
    carry out (commits recovery completed, a run killed before its git commit). At most
    MESSAGE_LINES lines are listed."""
    from reconcile.apply import Status

    sessions = sum(1 for line in earlier if not line.startswith("("))
    also = f", and {sessions} recorded otherwise by an earlier run" if sessions else ""
    lines = [f"{o.change.action.value} {o.change.address.path} ({o.change.key}): {o.status.value}" for o in report.outcomes]
    lines += earlier
    if len(lines) > MESSAGE_LINES:
        lines = [*lines[:MESSAGE_LINES], f"… and {len(lines) - MESSAGE_LINES} more"]
    return f"{title}: {report.count(Status.DONE)} session(s) exported{also}\n\n" + "\n".join(lines)


def ensure_own_ignores(root: Path) -> None:
    """`.xnat2bids/.gitignore` and `.gitattributes`: written when missing, and given the lines an
    older xnat2bids' own lacks. In every dataset apply writes to, git or not yet: a lab member's
    `git add -A` or `datalad save` must never take in a SLURM batch's credentials file, the
    staging or the logs."""
    for name, text in ((".gitignore", GITIGNORE), (".gitattributes", GITATTRIBUTES)):
        own = root / WORK_DIR / name
        try:
            if not own.parent.is_dir() or own.parent.is_symlink():
                continue
            if not os.path.lexists(own):
                write_atomic(own, text)
            elif own.is_file() and not own.is_symlink():  # ours, from an older xnat2bids: the lines it lacks
                had = own.read_text(encoding="utf-8", errors="replace")
                missing = [line for line in text.splitlines() if line not in had.splitlines()]
                if had.startswith(text.splitlines()[0]) and missing:
                    write_atomic(own, had + ("" if had.endswith("\n") else "\n") + "".join(f"{x}\n" for x in missing))
        except OSError:
            pass  # a read-only work area fails apply with its own message


def maybe_in_git(root: Path) -> bool:
    """Whether `root` may be in a git work tree: a `.git` (folder or file) stands on the way up
    from its physical folder, or GIT_DIR is set. A few stat calls, no git run."""
    here = Path(os.path.realpath(root))
    return "GIT_DIR" in os.environ or any(os.path.lexists(folder / ".git") for folder in (here, *here.parents))


# Where git keeps what a merge or a rebase that waits for the user has left to do (in its folder:
# a linked worktree's own), and the command that ends it; `git am` also uses rebase-apply.
_UNFINISHED = (("rebase-merge", "rebase"), ("rebase-apply", "rebase"), ("MERGE_HEAD", "merge"),
               ("CHERRY_PICK_HEAD", "cherry-pick"), ("REVERT_HEAD", "revert"))


def unfinished_merge(root: Path) -> str | None:
    """The git command ("merge", "rebase", "am", "cherry-pick", "revert") whose run in the repository holding `root` waits
    for the user to finish it: files may still hold conflict markers, or one side's content alone,
    while the lock the merge driver wrote is valid. None otherwise; no git run where no `.git`
    stands on the way up (plan asks on every run)."""
    if not maybe_in_git(root) or not root.is_dir():
        return None
    try:
        out = _git(root, "rev-parse", *(arg for name, _ in _UNFINISHED for arg in ("--git-path", name)))
    except VcsError:  # no git on PATH: no merge either
        return None
    paths = out.stdout.splitlines()
    if out.returncode != 0 or len(paths) != len(_UNFINISHED):  # not in a work tree after all
        return None
    for path, (name, command) in zip(paths, _UNFINISHED):
        where = root / path  # relative to `root`, where git ran
        if where.exists():
            return "am" if name == "rebase-apply" and (where / "applying").exists() else command
    return None


def unfinished_way_out(command: str) -> str:
    """How the user ends what `unfinished_merge` found."""
    return (f"resolve the files `git status` names, `git add` them, then `git {command} --continue`; "
            f"or `git {command} --abort` to go back")


def unfinished_merge_note(root: Path) -> str | None:
    """What `plan` and `check` say while `unfinished_merge` finds something."""
    command = unfinished_merge(root)
    if command is None:
        return None
    return (f"a `git {command}` is unfinished in the repository of {root}: files may still hold conflict markers "
            f"or one side's content alone, though the lock reads well; apply refuses to run until it is finished "
            f"({unfinished_way_out(command)})")


def exclude_locally(root: Path, pattern: str, why: str) -> None:
    """Add `pattern` (after a `# why` line) to the exclude file of the repository whose work tree
    holds `root`, unless it is there: the repository's own list, never shared, which a `git add -A`
    or `datalad save` anywhere in the work tree obeys. That file is wherever git keeps it: `.git`
    may be a file (a clone made with --separate-git-dir, a linked worktree, a submodule, a DataLad
    subdataset) and `root` a folder below the top (one repository holding several datasets).
    Patterns there are relative to the top; give one without a slash to match at any depth.
    Best effort, and no git run where no `.git` stands on the way up (nor GIT_DIR is set)."""
    if not maybe_in_git(root):
        return
    try:
        out = _git(root, "rev-parse", "--is-inside-work-tree", "--git-path", "info/exclude")
    except VcsError:  # no git on PATH
        return
    answer = out.stdout.splitlines()
    if out.returncode != 0 or len(answer) != 2 or answer[0] != "true":  # none, bare, or inside the git folder
        return
    exclude = root / answer[1]  # relative to `root`, where git ran
    try:
        text = exclude.read_text(encoding="utf-8", errors="replace") if exclude.exists() else ""
        if pattern in (line.strip() for line in text.splitlines()):
            return
        exclude.parent.mkdir(exist_ok=True)
        with open(exclude, "a", encoding="utf-8") as fh:
            fh.write(("\n" if text and not text.endswith("\n") else "") + f"# {why}\n{pattern}\n")
    except OSError:
        pass


def commit_paths(root: Path, message: str, paths: Iterable[str]) -> str | None:
    """Commit the changes under `paths` (relative to `root`) and nothing else; returns the new
    commit ID, None when they have none."""
    check_can_commit(root)  # again: a SLURM finalize commits long after the submission checked
    ensure_own_ignores(root)
    paths = sorted(set(paths))
    tracked = {t for chunk in _chunks(paths) for t in _git(root, "ls-files", "-z", "--", *_literal(chunk)).stdout.split("\0")}
    tracked.discard("")
    present = [p for p in paths if os.path.lexists(root / p) or any(t == p or t.startswith(p + "/") for t in tracked)]
    if not present:
        return None
    if (root / ".datalad").is_dir():
        # datalad takes its paths on the command line only: many are saved in parts, one commit each,
        # the lock and the history in the last, so that no commit records a folder it lacks.
        parts = _chunks(sorted(present, key=lambda path: (path in DATASET_FILES, path)))
        for n, part in enumerate(parts, 1):
            said = message if len(parts) == 1 else f"{message}\n\n(part {n} of {len(parts)})"
            try:
                out = subprocess.run(["datalad", "save", "-d", str(root), "-m", said, "--", *part],
                                     capture_output=True, encoding="utf-8", errors="replace", cwd=root, env=without_secrets(os.environ))
            except OSError as exc:
                raise VcsError(f"datalad could not be run: {exc.strerror or exc}",
                                    hint="the lock and the files are right; save the dataset by hand (datalad save)") from exc
            if out.returncode != 0:
                raise VcsError("datalad save failed", detail=out.stderr.strip()[-2000:])
        return _git(root, "rev-parse", "HEAD").stdout.strip()
    add = _git_on_paths(root, ("add", "-A"), present)
    if add.returncode != 0:
        old_git = "pathspec-from-file" in add.stderr
        raise VcsError("git add failed", detail=add.stderr.strip()[-2000:],
                            hint=f"{len(present)} paths need git 2.25 or later (module load git?)" if old_git else None)
    if all(_git(root, "diff", "--cached", "--quiet", "--", *_literal(chunk)).returncode == 0 for chunk in _chunks(present)):
        return None
    # --only: these paths alone, whatever else the user has staged. The message goes in a file:
    # one argument holds at most 128 KiB (E2BIG), and standard input carries the pathspecs.
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", prefix="xnat2bids-commit-", suffix=".txt") as note:
        note.write(message)
        note.flush()
        out = _git_on_paths(root, ("commit", "-q", "--only", "-F", note.name), present)
    if out.returncode != 0:
        raise VcsError("git commit failed", detail=out.stderr.strip()[-2000:])
    return _git(root, "rev-parse", "HEAD").stdout.strip()


def _chunks(paths: list[str]) -> list[list[str]]:
    """`paths` in lists a command line holds (for git commands whose answers add up)."""
    n = PATHSPECS_ON_COMMAND_LINE
    return [paths[i:i + n] for i in range(0, len(paths), n)]


def _git_on_paths(root: Path, command: tuple[str, ...], paths: list[str]) -> subprocess.CompletedProcess[Any]:
    """git `command` limited to `paths`, which go on its standard input when too many for a command line."""
    if len(paths) <= PATHSPECS_ON_COMMAND_LINE:
        return _git(root, *command, "--", *_literal(paths))
    return _git(root, *command, "--pathspec-from-file=-", "--pathspec-file-nul", input="\0".join(_literal(paths)))


def _literal(paths: Iterable[str]) -> list[str]:
    return [f":(literal){p}" for p in paths]
