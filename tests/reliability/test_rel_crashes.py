"""SIGKILL at every step of an apply, then `check` and a rerun: nothing torn, nothing lost.

Each scenario runs `python -m reconcile apply` as a real process with XNAT2BIDS_FAILPOINT set,
so it dies by SIGKILL at that exact point (reconcile/failpoints.py) — no sleeping, no races.
After the kill, the lock must parse, `xnat2bids check` must pass, and every file in the BIDS tree
must be recorded in the lock or belong to a journalled commit that the next apply finishes.
The rerun must then produce the same files and lock content as an apply that was never interrupted.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
from pathlib import Path

import pytest
import requests
from relworld import SENTINEL, USER, kill_leftovers, served_world, snapshot, xnat2bids

from reconcile.apply import read_history
from reconcile.cli import main
from reconcile.lock import loads_lock, read_lock

pytestmark = pytest.mark.slow

# Where a create (first export of a session) can die, in the order apply reaches them.
CREATE_POINTS = [
    "export-receiving",           # during a file download (.part being written)
    "export-before-rename",       # a verified .part not yet renamed
    "apply-exported",             # after the download, before conversion
    "convert-running",            # heudiconv started (it outlives its parent, as after an OOM kill)
    "apply-converted",            # converted in staging, before the commit
    "commit-journaled",           # journal written, nothing moved yet
    "commit-moved",               # session folder in place, no provenance, no lock entry
    "atomic-temp-written:dataset_description.json",  # its temp file written, not yet renamed
    "atomic-temp-written:sub-01_sessions.tsv",  # (a re-dated re-export leaves sessions.tsv as it is)
    "commit-provenance-written",  # sessions.tsv/participants written, lock not yet
    "lock-temp-written",          # lock temp file complete and fsynced, os.replace not done
    "lock-replaced",              # new lock in place, directory not yet fsynced
    "commit-lock-written",        # lock written, staging/journal not cleaned up
    "history-append",             # everything done but the history line
]
# Where a re-export of a session already on disk can die: the old folder must survive or be replaced whole.
UPDATE_POINTS = [
    "commit-journaled",
    "commit-between-renames",     # old folder moved to trash, new one not yet in place
    "commit-moved",
    "commit-provenance-written",
    "lock-temp-written",
]


def apply_args(root: Path) -> list[str]:
    return ["apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1"]


def pending_records(root: Path) -> dict[str, set[str]]:
    """Output paths of the commits that journals say are under way."""
    out = {}
    for journal in sorted((root / ".xnat2bids/journal").glob("*.json")):
        data = json.loads(journal.read_text())
        rec = loads_lock(data["record"]).sessions[journal.stem]
        out[journal.stem] = {o.path for o in rec.outputs}
    return out


def check_in_process(root: Path) -> tuple[int, str]:
    """`xnat2bids check` (read-only) through the real entry point, without a process start."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf), pytest.raises(SystemExit) as exc:
        main(["check", str(root)])
    return exc.value.code, buf.getvalue()


def assert_consistent_after_kill(root: Path, url: str, cwd: Path) -> None:
    lock = read_lock(root)  # raises on a torn or invalid lock
    recorded = {o.path for r in (lock.sessions.values() if lock else ()) for o in r.outputs}
    journalled = set().union(*pending_records(root).values()) if root.exists() else set()
    for path in sorted(root.glob("sub-*/ses-*/**/*")):
        if path.is_file():
            rel = path.relative_to(root).as_posix()
            assert rel in recorded or rel in journalled, f"{rel} is in the BIDS tree but neither locked nor journalled"
    if lock is not None or (root / ".xnat2bids").is_dir():  # also a first apply killed before its first commit
        code, out = check_in_process(root)
        assert code == 0 and "OK:" in out, out
        for temp in root.glob(".xnat2bids.lock.*.tmp"):  # a kill between writing and renaming
            assert f"pending: {temp.name}: left by an interrupted lock write; the next apply removes it" in out


def crash_and_recover(world, root: Path, point: str, cwd: Path, reference) -> None:
    killed = xnat2bids(*apply_args(root), url=world.url, cwd=cwd, XNAT2BIDS_FAILPOINT=point)
    assert killed.returncode == -signal.SIGKILL, f"{point} was never reached:\n{killed.stdout}{killed.stderr}"
    kill_leftovers(root)
    assert_consistent_after_kill(root, world.url, cwd)

    rerun = xnat2bids(*apply_args(root), url=world.url, cwd=cwd)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    files, lock = snapshot(root)
    ref_files, ref_lock = reference
    assert sorted(files) == sorted(ref_files)
    for rel in files:
        assert files[rel] == ref_files[rel], f"{rel} differs from the uninterrupted run"
    assert lock == ref_lock  # same sizes and sha256 as the reference, so `check --full` agrees too
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".xnat2bids.lock") and p.name != ".xnat2bids.lock")
    assert leftovers == [], "temporary or state lock files left behind"
    work = root / ".xnat2bids"
    for sub in ("journal", "staging", "tmp", "trash"):
        assert not any((work / sub).glob("*")), f"{sub} not cleaned up"
    assert not [p for p in root.rglob("*.tmp")], "temporary files left in the tree"
    # The history tells of every commit, also of those the killed run made: its serials chain up
    # to the lock's, and each session the lock records is named in an entry.
    history, lock = read_history(root), read_lock(root)
    serials = [(e["lock_serial"]["before"], e["lock_serial"]["after"]) for e in history]
    assert serials and serials[0][0] == 0 and serials[-1][1] == lock.serial, serials
    assert all(a[1] == b[0] for a, b in zip(serials, serials[1:])), serials
    named = {row["experiment_id"] for e in history for row in e["sessions"] if row["result"] == "done"}
    assert named >= set(lock.sessions), (named, set(lock.sessions))
    for e in history:  # each commit moves the serial by one: an entry names exactly its commits
        done = [row["experiment_id"] for row in e["sessions"] if row["result"] == "done"]
        assert len(done) == e["lock_serial"]["after"] - e["lock_serial"]["before"], e


@pytest.fixture(scope="module")
def create_world(tmp_path_factory):
    with served_world() as world:
        cwd = tmp_path_factory.mktemp("create-cwd")
        ref_root = tmp_path_factory.mktemp("create-ref") / "bids"
        result = xnat2bids(*apply_args(ref_root), url=world.url, cwd=cwd)
        assert result.returncode == 0, result.stdout + result.stderr
        yield world, cwd, snapshot(ref_root)


@pytest.fixture(scope="module")
def update_world(tmp_path_factory):
    """A root exported once, then the session re-dated in XNAT; the reference is the uninterrupted re-export."""
    with served_world() as world:
        cwd = tmp_path_factory.mktemp("update-cwd")
        base = tmp_path_factory.mktemp("update-base") / "bids"
        result = xnat2bids(*apply_args(base), url=world.url, cwd=cwd)
        assert result.returncode == 0, result.stdout + result.stderr
        exp = world.archive.sessions("PROJ")[0]
        r = requests.put(f"{world.url}/data/projects/PROJ/subjects/{exp.subject_id}/experiments/{exp.id}",
                         params={"xnat:mrSessionData/date": "2024-02-02"}, auth=(USER, SENTINEL), timeout=10)
        assert r.status_code == 200
        ref_root = tmp_path_factory.mktemp("update-ref") / "bids"
        shutil.copytree(base, ref_root)
        result = xnat2bids(*apply_args(ref_root), url=world.url, cwd=cwd)
        assert result.returncode == 0 and "1 done" in result.stdout, result.stdout + result.stderr
        yield world, cwd, base, snapshot(ref_root)


@pytest.mark.parametrize("point", CREATE_POINTS)
def test_sigkill_during_first_export_then_rerun_gives_the_uninterrupted_result(point, create_world, tmp_path):
    world, cwd, reference = create_world
    crash_and_recover(world, tmp_path / "bids", point, cwd, reference)


@pytest.mark.parametrize("point", UPDATE_POINTS)
def test_sigkill_during_re_export_keeps_old_or_new_session_whole(point, update_world, tmp_path):
    world, cwd, base, reference = update_world
    root = tmp_path / "bids"
    shutil.copytree(base, root)
    crash_and_recover(world, root, point, cwd, reference)
    assert read_lock(root).sessions[world.archive.sessions("PROJ")[0].id].date == "2024-02-02"


@pytest.mark.parametrize("point", ["commit-journaled", "commit-moved", "commit-lock-written"])
def test_sigkill_during_an_export_into_an_empty_session_folder_then_rerun_gives_the_uninterrupted_result(
        point, create_world, tmp_path):
    # What an old export leaves once its files are moved away: the session's folders, empty. The
    # commit takes their place; a kill on the way loses nothing and the rerun finishes the export.
    world, cwd, reference = create_world
    root = tmp_path / "bids"
    for folder in ("anat", "func"):
        (root / "sub-01" / "ses-01MR1" / folder).mkdir(parents=True)
    crash_and_recover(world, root, point, cwd, reference)
    assert not (root / "sub-01" / "ses-01MR1" / "func").exists()  # made way for the session whole
