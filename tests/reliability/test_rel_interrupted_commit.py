"""What the commands other than apply do with a commit a crash interrupted: `forget` settles it
before dropping the session, and a damaged journal is an error naming it, never skipped."""

from __future__ import annotations

import signal

import pytest
from relworld import kill_leftovers, served_world, xnat2bids

from reconcile.lock import read_lock

pytestmark = pytest.mark.slow


def _redated_and_killed(world, root, tmp_path, failpoint: str):
    """The world's session exported, re-dated in XNAT, and its re-export killed at `failpoint`."""
    first = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    [exp] = world.archive.sessions("PROJ")
    world.archive.set_fields(exp.id, date="2024-02-02")
    killed = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path,
                       XNAT2BIDS_FAILPOINT=failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    kill_leftovers(root)
    return exp


@pytest.fixture
def interrupted(tmp_path):
    """A root whose session was re-dated in XNAT and whose re-export was killed with the new
    folder in place and the lock not yet written."""
    with served_world() as world:
        root = tmp_path / "bids"
        exp = _redated_and_killed(world, root, tmp_path, "commit-moved")
        assert (root / ".xnat2bids/journal" / f"{exp.id}.json").is_file()
        assert read_lock(root).sessions[exp.id].date == "2024-01-10"
        yield world, root, exp


def test_forget_completes_an_interrupted_commit_before_dropping_the_session(interrupted, tmp_path):
    world, root, exp = interrupted
    done = xnat2bids("forget", "--yes", exp.id, str(root), url=world.url, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"recovered the interrupted commit of {exp.id}" in done.stdout
    assert f"Forgot {exp.id}; its files were left on disk." in done.stdout
    assert read_lock(root).sessions == {}
    assert not list((root / ".xnat2bids/journal").glob("*"))
    assert (root / "sub-01/ses-01MR1").is_dir()  # the files stay, as forget promises
    # Nothing brings it back: the next apply finds a folder the lock records for no session.
    again = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
    assert again.returncode == 1 and "exists but the lock records no session there" in again.stdout + again.stderr
    assert read_lock(root).sessions == {}


def test_plan_judges_the_root_as_the_next_apply_leaves_it(interrupted, tmp_path):
    # The new folder is in place, the lock is behind: not a foreign folder in the way.
    world, root, exp = interrupted
    lock_before = (root / ".xnat2bids.lock").read_bytes()
    planned = xnat2bids("plan", str(root), "-p", "PROJ", "--detailed-exitcode", url=world.url, cwd=tmp_path)
    # Something for apply to do still: cron's `--diff && --update` must run it.
    assert planned.returncode == 2, planned.stdout + planned.stderr
    assert "No changes. 1 session up to date." in planned.stdout
    assert "The next apply settles 1 interrupted commit first (see the notes)." in planned.stdout
    assert (f"note: {exp.id}: an interrupted commit of sub-01/ses-01MR1 will be completed by the next apply"
            in planned.stdout)
    assert "exists but the lock records no session there" not in planned.stdout + planned.stderr
    assert (root / ".xnat2bids.lock").read_bytes() == lock_before  # planning settles nothing


def test_a_commit_whose_folder_was_moved_away_is_dropped_not_recorded(interrupted, tmp_path):
    world, root, exp = interrupted
    (root / "sub-01/ses-01MR1").rename(tmp_path / "moved-away")  # the new files, out of the root by hand
    checked = xnat2bids("check", str(root), url=world.url, cwd=tmp_path)
    assert f"pending: {exp.id}: an interrupted commit of sub-01/ses-01MR1 cannot be completed (" in checked.stdout
    assert checked.returncode == 0, checked.stdout + checked.stderr  # judged as recovery leaves it: the old folder back

    done = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{exp.id}: an interrupted commit was dropped: " in done.stderr
    assert "date 2024-01-10 → 2024-02-02 (re-dated in XNAT)" in done.stdout  # the old record, the old folder back
    assert "Apply complete: 1 done, 0 failed, 0 skipped" in done.stdout
    assert read_lock(root).sessions[exp.id].date == "2024-02-02"
    assert xnat2bids("check", str(root), "--full", url=world.url, cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "moved-away").rglob("*.nii.gz"))  # what was moved is left alone


def test_a_commit_missing_one_file_keeps_the_old_folder_aside_and_records_nothing_missing(interrupted, tmp_path):
    world, root, exp = interrupted
    gone = sorted((root / "sub-01/ses-01MR1").rglob("*.nii.gz"))[0]
    gone.unlink()
    checked = xnat2bids("check", str(root), url=world.url, cwd=tmp_path)  # judged as recovery leaves it
    assert checked.returncode == 0 and "cannot be completed" in checked.stdout, checked.stdout + checked.stderr
    done = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
    assert f"{exp.id}: an interrupted commit was dropped: 1 of the files it records is not in sub-01/ses-01MR1" \
        in done.stderr
    [aside] = (root / ".xnat2bids/replaced" / exp.id).iterdir()  # what the dropped commit left, kept whole
    assert (aside / "anat").is_dir() and not (aside / gone.relative_to(root / "sub-01/ses-01MR1")).exists()
    assert f"{exp.id}: what the interrupted commit left in sub-01/ses-01MR1 is kept in .xnat2bids/replaced/" \
        in done.stderr
    assert "Apply complete: 1 done, 0 failed, 0 skipped; lock serial 2; took " in done.stdout  # applied again, whole
    assert read_lock(root).sessions[exp.id].date == "2024-02-02"
    assert xnat2bids("check", str(root), "--full", url=world.url, cwd=tmp_path).returncode == 0


def test_plan_and_check_agree_on_a_commit_the_next_apply_rolls_back(tmp_path):
    # Killed between its renames: the old folder waits in the trash, the new one still staged.
    with served_world() as world:
        root = tmp_path / "bids"
        _redated_and_killed(world, root, tmp_path, "commit-between-renames")
        assert not (root / "sub-01/ses-01MR1").exists()
        planned = xnat2bids("plan", str(root), "-p", "PROJ", "--detailed-exitcode", url=world.url, cwd=tmp_path)
        assert planned.returncode == 2, planned.stdout + planned.stderr
        assert "date 2024-01-10 → 2024-02-02 (re-dated in XNAT)" in planned.stdout
        assert "missing:" not in planned.stdout and "drift" not in planned.stdout.split("Plan:")[0]
        assert "will be rolled back by the next apply" in planned.stdout
        assert xnat2bids("check", str(root), url=world.url, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("content", [b'{"record": ', b"{}", b"[]", b"\xff\xfe"])
def test_a_damaged_journal_is_an_error_naming_it(interrupted, tmp_path, content):
    world, root, exp = interrupted
    journal = root / ".xnat2bids/journal" / f"{exp.id}.json"
    journal.write_bytes(content)
    for command in (("check", str(root)), ("plan", str(root), "-p", "PROJ"), ("apply", str(root), "-p", "PROJ", "--yes"), ("forget", exp.id, str(root))):
        result = xnat2bids(*command, url=world.url, cwd=tmp_path)
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"error: the journal of an interrupted commit cannot be read: {journal}" in result.stderr
        assert "internal error" not in result.stderr
    assert journal.read_bytes() == content and read_lock(root).sessions[exp.id].date == "2024-01-10"


def test_kept_dicom_moved_in_by_a_killed_commit_stays_marked_as_the_sessions(tmp_path):
    # Killed right after the DICOM folder moved in: the folder carries its mark, so the next
    # --keep-dicom update replaces it as this session's, not set aside as another's.
    with served_world() as world:
        root = tmp_path / "bids"
        args = ("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")
        killed = xnat2bids(*args, url=world.url, cwd=tmp_path, XNAT2BIDS_FAILPOINT="commit-dicom-moved")
        assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
        kill_leftovers(root)
        [exp] = world.archive.sessions("PROJ")
        dicom = root / "sourcedata/sub-01/ses-01MR1/dicom"
        assert (dicom / ".xnat2bids-experiment").read_text() == f"{exp.id}\n"
        done = xnat2bids(*args, url=world.url, cwd=tmp_path)
        assert done.returncode == 0 and f"{exp.id}: an interrupted commit was completed" in done.stdout + done.stderr
        world.archive.set_fields(exp.id, date="2024-02-02")
        again = xnat2bids(*args, url=world.url, cwd=tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "not marked as this session's" not in again.stdout + again.stderr
        assert (dicom / ".xnat2bids-experiment").read_text() == f"{exp.id}\n"
        assert not (root / ".xnat2bids/replaced").exists() or not list((root / ".xnat2bids/replaced").rglob("dicom"))
