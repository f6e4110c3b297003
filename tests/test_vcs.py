"""--git-commit's git side: which paths a commit takes in, whatever their number."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconcile import vcs


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("on_command_line", [2000, 2], ids=["command-line", "standard-input"])
def test_commit_paths_takes_in_those_paths_alone_however_many(tmp_path: Path, monkeypatch, on_command_line: int) -> None:
    # More session folders than a command line holds go to git on its standard input.
    monkeypatch.setattr(vcs, "PATHSPECS_ON_COMMAND_LINE", on_command_line)
    root = tmp_path / "bids"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.org")
    git(root, "config", "user.name", "t")
    folders = [f"sub-{n:02d}" for n in range(7)]
    for folder in folders:
        (root / folder / "ses-1").mkdir(parents=True)
        (root / folder / "ses-1" / "a.json").write_text(folder)
    (root / "staged.txt").write_text("the user's")
    git(root, "add", "staged.txt")
    (root / "sub-99").mkdir()
    (root / "sub-99/x.txt").write_text("not asked for")

    commit = vcs.commit_paths(root, "export", [*folders, "sub-gone"])
    assert commit == git(root, "rev-parse", "HEAD").strip()
    committed = git(root, "show", "--format=", "--name-only", "HEAD").split()
    assert committed == [f"{f}/ses-1/a.json" for f in folders]
    assert sorted(git(root, "status", "--porcelain").splitlines()) == ["?? sub-99/", "A  staged.txt"]

    # Nothing changed under them since: no commit.
    assert vcs.commit_paths(root, "again", folders) is None
    # A removed folder is committed as removed.
    (root / "sub-03/ses-1/a.json").unlink()
    vcs.commit_paths(root, "removed", folders)
    assert git(root, "show", "--format=", "--name-status", "HEAD").split() == ["D", "sub-03/ses-1/a.json"]
