"""A session folder on disk that the lock records for no session (another tool's export, a
forgotten session) is never written into: plan reports it before anything is downloaded. One that
holds no file at all (its files moved away, its folders left) is nothing in the way."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from worlds import SMALL, add, add_sessions, exported_root, tree

from reconcile.check import check_outputs
from reconcile.lock import read_lock


def test_a_forgotten_session_still_in_xnat_is_a_problem_not_a_create(cli, emulator, tmp_path):
    kept, forgotten = add_sessions(emulator.archive, 2)
    root = exported_root(emulator.archive, tmp_path, [kept, forgotten])
    assert cli("forget", "--yes", forgotten.id, str(root))[0] == 0
    before = tree(root, "sub-SUBJ02")

    code, out, err = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 1, out + err
    assert "create" not in out and "Nothing planned: 1 problem below; 1 session up to date." in out
    assert (f"sub-SUBJ02/ses-SUBJ02MR1 exists but the lock records no session there (it holds 1 file: "
            f"anat/t1.nii.gz); session {forgotten.id} (PROJ/SUBJ02_MR1) would be written into it") in out
    assert "move that folder out of the BIDS root" in out

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert tree(root, "sub-SUBJ02") == before
    assert sorted(read_lock(root).sessions) == [kept.id]


def test_another_tools_export_is_left_alone_until_moved_away(cli, emulator, tmp_path):
    [session] = add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    theirs = root / "sub-SUBJ01" / "ses-SUBJ01MR1" / "anat" / "sub-SUBJ01_ses-SUBJ01MR1_T1w.nii.gz"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"exported by the old script")

    code, out, err = cli("plan", str(root), "-p", "PROJ", "--json")
    assert code == 1, err
    assert f"session {session.id} (PROJ/SUBJ01_MR1) would be written into it" in out
    assert "(it holds 1 file: anat/sub-SUBJ01_ses-SUBJ01MR1_T1w.nii.gz)" in out  # what is in the way
    assert '"changes": []' in out

    (root / "sub-SUBJ01").rename(tmp_path / "old-export")
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "+ create  sub-SUBJ01/ses-SUBJ01MR1" in out


def test_a_file_where_a_subject_folder_goes_is_a_problem_before_anything_is_downloaded(cli, emulator, tmp_path):
    [session] = add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    root.mkdir()
    (root / "sub-SUBJ01").write_text("not a folder")
    code, out, _ = cli("plan", str(root), "-p", "PROJ")
    assert code == 1
    assert f"error: sub-SUBJ01 is a file, where the subject folder of session {session.id} (PROJ/{session.label}) goes" in out
    assert "hint: move that file out of the BIDS root, then plan again" in out


def test_session_folders_the_lock_does_not_record_beside_a_create_are_named(cli, emulator, tmp_path):
    # The lab's old script named sessions without the subject (ses-MR1); a config with the default
    # naming creates ses-SUBJ02MR1 beside it: the same data twice, with nothing said.
    exps = add_sessions(emulator.archive, 2)
    root = exported_root(emulator.archive, tmp_path, exps[:1])
    old = root / "sub-SUBJ02" / "ses-MR1" / "anat"
    old.mkdir(parents=True)
    (old / "sub-SUBJ02_ses-MR1_T1w.nii.gz").write_bytes(b"old export")
    emulator.archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR2", date="2024-02-10")
    code, out, err = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "+ create  sub-SUBJ02/ses-SUBJ02MR1" in out and "+ create  sub-SUBJ01/ses-SUBJ01MR2" in out
    assert ("note: 1 session folder the lock does not record stands in subjects this plan creates sessions in "
            "(sub-SUBJ02/ses-MR1): if an earlier export") in out, out
    assert "sub-SUBJ01/ses-SUBJ01MR1)" not in out  # recorded: not a stranger
    (old / "sub-SUBJ02_ses-MR1_T1w.nii.gz").unlink()  # its files moved away: empty folders hold no data twice
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert "+ create  sub-SUBJ02/ses-SUBJ02MR1" in out and "the lock does not record" not in out, out


def _session_files(root: Path, address: str) -> dict[str, bytes]:
    return {p.relative_to(root / address).as_posix(): p.read_bytes()
            for p in sorted((root / address).rglob("*")) if p.is_file()}


def test_a_session_folder_left_empty_by_moving_the_old_export_away_is_exported_into(cli, emulator, tmp_path):
    [exp] = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1]).values()
    root = tmp_path / "bids"
    old = root / "sub-01" / "ses-01MR1"
    for folder in ("anat", "func", "fmap/deeper"):  # the old script's folders, their files moved away
        (old / folder).mkdir(parents=True)

    code, out, err = cli("plan", str(root), "-p", "PROJ", "--json")
    assert code == 0, out + err
    plan = json.loads(out)
    assert [(c["action"], c["address"], c["experiment_id"]) for c in plan["changes"]] == [
        ("create", "sub-01/ses-01MR1", exp.id)]
    assert plan["problems"] == []

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert "Apply complete: 1 done, 0 failed" in out
    lock = read_lock(root)
    assert [(r.experiment_id, r.address.path) for r in lock.sessions.values()] == [(exp.id, "sub-01/ses-01MR1")]
    assert check_outputs(root, lock, full=True).ok  # every recorded output there, with its sha256
    # The same bytes as an export into a root that never had the folder, and nothing else in it:
    # the empty folders made way for the session folder whole.
    fresh = tmp_path / "fresh"
    assert cli("apply", str(fresh), "-p", "PROJ", "--yes")[0] == 0
    exported = _session_files(root, "sub-01/ses-01MR1")
    assert exported == _session_files(fresh, "sub-01/ses-01MR1") and any(n.endswith(".nii.gz") for n in exported)
    assert sorted(p.name for p in old.iterdir()) == sorted(p.name for p in (fresh / "sub-01/ses-01MR1").iterdir())
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "No changes." in out, out


def test_a_saved_plan_exports_into_a_folder_that_appeared_empty_since(cli, emulator, tmp_path):
    [exp] = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1]).values()
    root = tmp_path / "bids"
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0
    (root / "sub-01" / "ses-01MR1" / "anat").mkdir(parents=True)  # apply's own guard judges it
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 0, out + err
    assert read_lock(root).sessions[exp.id].address.path == "sub-01/ses-01MR1"
    assert any(p.name.endswith(".nii.gz") for p in (root / "sub-01/ses-01MR1/anat").iterdir())


@pytest.mark.parametrize("something", [".DS_Store", "link to an empty folder outside the root", "broken link"])
def test_a_session_folder_holding_only_a_hidden_file_or_a_link_still_blocks(cli, emulator, tmp_path, something):
    [session] = add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    anat = root / "sub-SUBJ01" / "ses-SUBJ01MR1" / "anat"
    anat.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    if something == ".DS_Store":
        (anat / ".DS_Store").write_bytes(b"")
    elif something == "broken link":
        (anat / "t1.nii.gz").symlink_to(tmp_path / "nowhere")
    else:
        (anat / "scans").symlink_to(outside)
    before = sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)

    code, out, err = cli("plan", str(root), "-p", "PROJ", "--json")
    assert code == 1, out + err
    plan = json.loads(out)
    assert plan["changes"] == []
    [problem] = plan["problems"]
    assert problem["message"].startswith("sub-SUBJ01/ses-SUBJ01MR1 exists but the lock records no session there")
    if something == ".DS_Store":
        assert "(it holds 1 file: anat/.DS_Store)" in problem["message"]
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 1
    assert sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root)
                  for n in ds + fs if not n.startswith(".xnat2bids")) == before
    assert list(outside.iterdir()) == []


def test_a_file_put_into_the_empty_folder_while_apply_commits_stays_and_fails_the_session(
        cli, emulator, tmp_path, monkeypatch):
    # The folder was empty when apply looked; a file lands in it before the folder goes: rmdir,
    # which removes only empty folders, fails the session and the file stays.
    from reconcile import apply as apply_module

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0
    landed = root / "sub-01" / "ses-01MR1" / "anat" / "copied-back.nii.gz"
    landed.parent.mkdir(parents=True)
    landed.write_bytes(b"the user's")
    monkeypatch.setattr(apply_module, "holds_nothing", lambda root, rel: True)
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1, out + err
    assert ("sub-01/ses-01MR1 already exists but the lock does not record it for" in out
            and "and it could not be removed (Directory not empty): it held no file when looked at" in out), out + err
    assert landed.read_bytes() == b"the user's"
    assert sorted(p.name for p in (root / "sub-01/ses-01MR1").rglob("*")) == ["anat", "copied-back.nii.gz"]
    assert read_lock(root) is None or not read_lock(root).sessions


def test_a_session_renamed_onto_an_empty_folder_is_planned_as_its_rename(cli, emulator, tmp_path):
    [session] = add_sessions(emulator.archive, 1)
    root = exported_root(emulator.archive, tmp_path, [session])
    emulator.archive.rename_session(session.id, "SUBJ01_MR2")
    (root / "sub-SUBJ01" / "ses-SUBJ01MR2" / "anat").mkdir(parents=True)
    code, out, err = cli("plan", str(root), "-p", "PROJ", "--json")
    assert code == 0, out + err
    plan = json.loads(out)
    assert plan["problems"] == []
    assert [(c["action"], c["address"], [r["message"] for r in c["reasons"]]) for c in plan["changes"]] == [
        ("update", "sub-SUBJ01/ses-SUBJ01MR2", ["renamed ses-SUBJ01MR1 → ses-SUBJ01MR2"])]
