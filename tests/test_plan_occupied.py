"""A session folder on disk that the lock records for no session (another tool's export, a
forgotten session) is never written into: plan reports it before anything is downloaded."""

from __future__ import annotations

from worlds import add_sessions, exported_root, tree

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
