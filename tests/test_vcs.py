"""--git-commit's git side: which paths a commit takes in, whatever their number."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconcile import vcs
from reconcile.errors import ConfigError


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout


def repository(tmp_path: Path) -> Path:
    """An empty git repository with an identity, at tmp_path/bids."""
    root = tmp_path / "bids"
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.org")
    git(root, "config", "user.name", "t")
    return root


@pytest.mark.parametrize("on_command_line", [2000, 2], ids=["command-line", "standard-input"])
def test_commit_paths_takes_in_those_paths_alone_however_many(tmp_path: Path, monkeypatch, on_command_line: int) -> None:
    # More session folders than a command line holds go to git on its standard input.
    monkeypatch.setattr(vcs, "PATHSPECS_ON_COMMAND_LINE", on_command_line)
    root = repository(tmp_path)
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


def test_a_commit_message_longer_than_one_argument_holds_is_committed(tmp_path: Path) -> None:
    # Linux takes at most 128 KiB in one argument: the message goes in a file.
    root = repository(tmp_path)
    (root / "sub-01").mkdir()
    (root / "sub-01/a.json").write_text("{}")
    message = "title\n\n" + "\n".join(f"create sub-{n:05d}/ses-01 (PROJ/XNAT_E{n:05d}): done" for n in range(4000))
    assert len(message.encode()) > 128 * 1024
    vcs.commit_paths(root, message, ["sub-01"])
    assert git(root, "log", "-1", "--format=%B").strip() == message


def test_the_message_names_each_session_an_earlier_run_recorded_once_and_lists_at_most_so_many() -> None:
    from dataclasses import replace

    from test_lock import record

    from reconcile.apply import ApplyReport

    a, b = record(1), record(2)
    moved = replace(a, bids_subject="SUBJ99")
    lines = [vcs._told(a, moved), vcs._told(None, b), vcs._told(b, None)]
    assert lines == ["recorded by an earlier run: sub-SUBJ01/ses-MR1 → sub-SUBJ99/ses-MR1 (XNAT_E00001)",
                     "recorded by an earlier run: sub-SUBJ02/ses-MR1 (XNAT_E00002)",
                     "no longer recorded: sub-SUBJ02/ses-MR1 (XNAT_E00002)"]
    message = vcs.apply_message("xnat2bids apply", ApplyReport(), lines)
    assert message.splitlines()[0] == "xnat2bids apply: 0 session(s) exported, and 3 recorded otherwise by an earlier run"
    many = vcs.apply_message("t", ApplyReport(), [f"line {n}" for n in range(vcs.MESSAGE_LINES + 7)])
    assert many.splitlines()[-1] == "… and 7 more" and len(many.splitlines()) == vcs.MESSAGE_LINES + 3


def test_an_older_xnat2bids_gitignore_gains_the_lines_it_lacks(tmp_path: Path) -> None:
    root = repository(tmp_path)
    (root / ".xnat2bids").mkdir()
    old = vcs.GITIGNORE.replace("/tmp/\n", "")
    (root / ".xnat2bids/.gitignore").write_text(old)
    (root / "sub-01").mkdir()
    (root / "sub-01/a.json").write_text("{}")
    vcs.commit_paths(root, "export", ["sub-01", ".xnat2bids/.gitignore"])
    assert (root / ".xnat2bids/.gitignore").read_text() == old + "/tmp/\n"
    mine = "# my own rules\n/logs/\n"  # not ours: left alone
    (root / ".xnat2bids/.gitignore").write_text(mine)
    vcs.commit_paths(root, "again", ["sub-01"])
    assert (root / ".xnat2bids/.gitignore").read_text() == mine


def test_the_first_export_is_committed_without_a_note_and_an_unreadable_committed_lock_with_one(tmp_path: Path) -> None:
    from test_lock import record

    from reconcile.apply import ApplyReport
    from reconcile.lock import Lock, write_lock

    root = repository(tmp_path)
    git(root, "commit", "-q", "--allow-empty", "-m", "init")
    write_lock(root, Lock.new().with_session(record(1)))
    vcs.commit_apply(root, "xnat2bids apply", ApplyReport())  # no lock in HEAD yet: a first export
    assert git(root, "log", "-1", "--format=%B").strip() == "xnat2bids apply: 0 session(s) exported"
    (root / ".xnat2bids.lock").write_text("not = [a lock\n")
    git(root, "commit", "-q", "-am", "a hand edit")
    (root / ".xnat2bids.lock").unlink()  # (write_lock refuses to overwrite a lock it cannot read)
    write_lock(root, Lock.new().with_session(record(1)))
    vcs.commit_apply(root, "xnat2bids apply", ApplyReport())
    assert "(the last commit's lock could not be read: every session folder is included)" in git(
        root, "log", "-1", "--format=%B")


def test_a_git_index_lock_left_behind_is_said_before_any_work(tmp_path: Path) -> None:
    root = repository(tmp_path)
    vcs.check_can_commit(root)
    (root / ".git" / "index.lock").write_text("")
    with pytest.raises(ConfigError, match="index.lock exists: another git command runs in") as info:
        vcs.check_can_commit(root)
    assert "remove that file" in (info.value.hint or "")


def test_a_state_lock_a_killed_apply_left_stays_out_of_git_add_from_a_root_below_the_top(cli, emulator, tmp_path):
    # One repository for a PI's studies (<pi>/study-<study>/bids): its .git is two levels above the root.
    from worlds import SMALL, add

    from reconcile.statelock import STATE_LOCK_NAME

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    top = repository(tmp_path)
    root = top / "lab" / "study-pilot" / "bids"
    root.mkdir(parents=True)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    (root / STATE_LOCK_NAME).write_text('{"id": "0123456789ab", "host": "node7"}')  # as a kill leaves it
    git(top, "add", "-A")
    staged = git(top, "diff", "--cached", "--name-only").split()
    assert "lab/study-pilot/bids/.xnat2bids.lock" in staged
    assert not [path for path in staged if path.endswith(STATE_LOCK_NAME)], staged
