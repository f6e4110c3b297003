"""Optional git commit of an apply's result (`--git-commit`), for git or DataLad datasets."""

from __future__ import annotations

import subprocess
from pathlib import Path

from reconcile.errors import XnatBidsError


def _git(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)


def is_repository(root: Path) -> bool:
    out = _git(root, "rev-parse", "--show-toplevel")
    return out.returncode == 0 and Path(out.stdout.strip()).resolve() == root.resolve()


def commit_all(root: Path, message: str) -> str | None:
    """Commit everything changed in the dataset; returns the new commit ID, None when clean."""
    if not is_repository(root):
        raise XnatBidsError(f"--git-commit: {root} is not the top of a git repository", hint="run `git init` there first")
    datalad = (root / ".datalad").is_dir()
    if datalad:
        out = subprocess.run(["datalad", "save", "-d", str(root), "-m", message], capture_output=True, text=True)
        if out.returncode != 0:
            raise XnatBidsError("datalad save failed", detail=out.stderr.strip()[-2000:])
    else:
        add = _git(root, "add", "-A", ".")
        if add.returncode != 0:
            raise XnatBidsError("git add failed", detail=add.stderr.strip()[-2000:])
        if _git(root, "diff", "--cached", "--quiet").returncode == 0:
            return None
        out = _git(root, "commit", "-q", "-m", message)
        if out.returncode != 0:
            raise XnatBidsError("git commit failed", detail=out.stderr.strip()[-2000:])
    return _git(root, "rev-parse", "HEAD").stdout.strip()
