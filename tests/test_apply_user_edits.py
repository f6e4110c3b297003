"""What users change inside an exported session survives its re-conversion: outputs they edited
(a sidecar) are replaced only with --repair-drift, and a copy is kept; files, links and empty
folders they added are carried over, or kept aside where the conversion now writes; task events
they fill in are theirs from the start and kept over heudiconv's new stub."""

from __future__ import annotations

import json
import os

import pytest
from worlds import SMALL, add, redate, write_config

from reconcile.lock import read_lock

FILLED = b"onset\tduration\ttrial_type\n0\t10\trest\n"
EDITED = b'{"TaskName": "rest", "SliceTiming": [0.0, 0.5]}\n'  # a sidecar the lab corrected


def _kept(root, exp_id: str, rel: str) -> bytes:
    [copy] = (root / ".xnat2bids" / "replaced" / exp_id).glob(f"*/{rel}")
    return copy.read_bytes()


def test_an_update_replaces_an_edited_output_only_with_repair_drift_and_keeps_a_copy(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [sidecar] = (root / "sub-01/ses-01MR1/func").glob("*_bold.json")
    rel = sidecar.relative_to(root).as_posix()
    sidecar.write_bytes(EDITED)
    session = root / "sub-01/ses-01MR1"
    (session / "notes.txt").write_text("motion in run 2\n")
    (session / "physio").mkdir()
    os.symlink(tmp_path, session / "linked")
    redate(emulator, exp, "2024-02-01")

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2
    assert f"changed: {rel} (size " in out
    assert "1 update would replace outputs changed on disk; apply carries it out only with --repair-drift" in out

    # Nothing failed, but XNAT's change did not reach the dataset: status 1, so cron hears of it.
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "Nothing to apply. Left as they are: 1 update held back (see the plan's notes)." in out
    assert ("error: 1 change from XNAT held back (sub-01/ses-01MR1): files of this session changed on disk; "
            "apply --repair-drift carries them out") in err
    assert sidecar.read_bytes() == EDITED and read_lock(root).serial == 1
    told = json.loads((root / ".xnat2bids/history.jsonl").read_text().splitlines()[-1])  # a night that failed
    assert told["sessions"] == [] and [e["kind"] for e in told["errors"]] == ["held"], told
    assert told["errors"][0]["message"].startswith("1 change from XNAT held back (sub-01/ses-01MR1)")

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--repair-drift")
    assert code == 0, out + err
    assert ("note: 1 update replaces outputs changed on disk (--repair-drift), keeping a copy of each changed file "
            "in .xnat2bids/replaced/") in out
    assert "only with --repair-drift" not in out
    [kept] = (root / ".xnat2bids/replaced" / exp.id).iterdir()
    said = (f"warning: 1 file(s) the new conversion replaces (edited outputs, or files the lock does not record) "
            f"were set aside in {kept.relative_to(root)}")
    assert said in out  # on the console, and in the history
    code, history, _ = cli("history", str(root))
    assert said in history
    lock = read_lock(root)
    assert lock.serial == 2 and lock.sessions[exp.id].date == "2024-02-01"
    assert sidecar.read_bytes() != EDITED  # the new conversion's, as recorded
    assert _kept(root, exp.id, rel) == EDITED
    assert (session / "notes.txt").read_text() == "motion in run 2\n"
    assert (session / "physio").is_dir() and os.readlink(session / "linked") == str(tmp_path)
    assert cli("check", str(root), "--full")[0] == 0


def test_a_user_file_where_the_conversion_now_writes_is_kept_aside(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    skipping = write_config(tmp_path, '[conversion]\nskip = ["func-*"]')
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(skipping))[0] == 0
    assert not (root / "sub-01/ses-01MR1/func").exists()
    mine = root / "sub-01/ses-01MR1/func/sub-01_ses-01MR1_task-rest_bold.nii.gz"
    mine.parent.mkdir()
    mine.write_bytes(FILLED)
    deep = root / "sub-01/ses-01MR1/func/sub-01_ses-01MR1_task-rest_bold.json/x.txt"  # a folder where a file goes
    deep.parent.mkdir()
    deep.write_text("deep")

    defaults = tmp_path / "defaults.toml"
    defaults.write_text("")  # back to the default config: func converted now
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(defaults))
    assert code == 0 and "config changed" in out, out + err
    rel = mine.relative_to(root).as_posix()
    assert rel in {o.path for o in read_lock(root).sessions[exp.id].outputs}
    assert mine.read_bytes() != FILLED
    assert _kept(root, exp.id, rel) == FILLED
    assert _kept(root, exp.id, deep.relative_to(root).as_posix()) == b"deep"
    assert (root / "sub-01/ses-01MR1/func/sub-01_ses-01MR1_task-rest_bold.json").is_file()


def test_a_dataset_file_apply_cannot_update_fails_the_session_before_anything_moves(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text('{"Name": "x",')
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "dataset_description.json" in out
    assert not (root / "sub-01").exists() and not list((root / ".xnat2bids").glob("journal/*.json"))
    assert read_lock(root) is None

    (root / "dataset_description.json").write_text('{"Name": "x", "BIDSVersion": "1.9.0"}')
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    assert (root / "sub-01/ses-01MR1").is_dir() and read_lock(root).serial == 1


def test_outputs_edited_after_planning_are_replaced_only_with_repair_drift(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    redate(emulator, exp, "2024-02-01")
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0
    [sidecar] = (root / "sub-01/ses-01MR1/func").glob("*_bold.json")
    sidecar.write_bytes(EDITED)  # after planning: the saved plan cannot know

    code, out, _ = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1
    assert f"outputs changed on disk since they were recorded: {sidecar.relative_to(root).as_posix()}" in out
    assert "hint: apply with --repair-drift" in out
    assert sidecar.read_bytes() == EDITED and read_lock(root).serial == 1

    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes", "--repair-drift")
    assert code == 0, out + err
    assert read_lock(root).sessions[exp.id].date == "2024-02-01"
    assert _kept(root, exp.id, sidecar.relative_to(root).as_posix()) == EDITED


def test_task_events_are_the_labs_to_fill_in_and_survive_a_reconversion(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [events] = (root / "sub-01/ses-01MR1/func").glob("*_events.tsv")
    stub = events.read_bytes()
    assert b"\n" not in stub.strip() and b"TODO" in stub  # heudiconv's header alone, for the lab to fill in
    rel = events.relative_to(root).as_posix()
    assert rel not in {o.path for o in read_lock(root).sessions[exp.id].outputs}
    events.write_bytes(FILLED)
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "drift" not in out.split("Plan:")[0]  # filling it in is no drift

    redate(emulator, exp, "2024-02-01")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")  # no --repair-drift needed
    assert code == 0 and "1 done" in out, out + err
    assert read_lock(root).sessions[exp.id].date == "2024-02-01"
    assert events.read_bytes() == FILLED  # kept over the new stub, not set aside
    assert not (root / ".xnat2bids" / "replaced").exists()
    assert cli("check", str(root), "--full")[0] == 0


def test_filled_in_events_follow_their_renumbered_run_and_those_of_a_deleted_run_are_set_aside(
        cli, emulator, tmp_path):
    import requests

    from reconcile.emulator.dicomgen import DEFAULT_SERIES

    checks = tuple(s for s in DEFAULT_SERIES if s.description == "func-bold_task-checks_run+")
    assert len(checks) == 2
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=checks)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    func = root / "sub-01/ses-01MR1/func"
    run1 = func / "sub-01_ses-01MR1_task-checks_run-01_events.tsv"
    run1.write_bytes(FILLED)  # the lab's events for the first run (scan 1)
    run2 = func / "sub-01_ses-01MR1_task-checks_run-02_events.tsv"
    second = b"onset\tduration\ttrial_type\n5\t10\tchecks\n"
    run2.write_bytes(second)  # and for the second (scan 2), which becomes run-01
    first = sorted(emulator.archive.get_session(exp.id).scans)[0]
    gone = requests.delete(f"{emulator.url}/data/experiments/{exp.id}/scans/{first}",
                           auth=(emulator.user, emulator.password), timeout=10)
    assert gone.status_code == 200

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--deep")
    assert code == 0 and f"scan {first} removed" in out, out + err
    rel = run1.relative_to(root).as_posix()
    assert f"{rel}: its run's name is another series' now" in out
    # The second run's events follow it to its new name, over heudiconv's stub; none is left
    # behind under run-02, where a run added later would find them.
    assert run1.read_bytes() == second
    assert f"{run2.relative_to(root).as_posix()}: moved with its run to {run1.name}" in out
    assert not (func / "sub-01_ses-01MR1_task-checks_run-02_bold.nii.gz").exists() and not run2.exists()
    [kept] = (root / ".xnat2bids/replaced" / exp.id).glob(f"*/{rel}")
    assert kept.read_bytes() == FILLED
    assert cli("check", str(root), "--full")[0] == 0


@pytest.mark.parametrize("filled", [False, True], ids=["stub", "filled-in"])
def test_task_events_move_with_a_renamed_subject_under_the_new_name_or_not_at_all(cli, emulator, tmp_path, filled):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [events] = (root / "sub-01/ses-01MR1/func").glob("*_events.tsv")
    if filled:
        events.write_bytes(FILLED)
    emulator.archive.rename_subject(exp.subject_id, "11")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "renamed sub-01 → sub-11" in out, out + err
    func = root / "sub-11/ses-01MR1/func"
    [moved] = func.glob("*_events.tsv")  # heudiconv's new stub, or the lab's events in its place
    assert moved.name == events.name.replace("sub-01_", "sub-11_")
    assert (moved.read_bytes() == FILLED) is filled
    assert not events.exists()  # moved with its run: not left to describe a run of the folder's next owner
    assert not (root / "sub-01").exists()
    assert cli("check", str(root), "--full")[0] == 0


def test_a_copy_of_the_dataset_without_its_times_is_not_drift_and_takes_updates(cli, emulator, tmp_path):
    """cp -r, git clone, rsync without -t: every output has a new time and its recorded bytes."""
    import shutil

    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root, copy = tmp_path / "bids", tmp_path / "copy"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    shutil.copytree(root, copy, copy_function=shutil.copy)  # contents and modes, not times
    outputs = read_lock(copy).sessions[exp.id].outputs
    assert all((copy / o.path).stat().st_mtime_ns != o.mtime_ns for o in outputs)

    code, out, err = cli("plan", str(copy), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0, out + err
    assert f"{len(outputs)} outputs have a new modification time but the recorded content" in out
    code, out, err = cli("plan", str(copy), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "No changes." in out and "modification time" not in out  # said once, not every plan

    redate(emulator, exp, "2024-02-01")
    code, out, err = cli("apply", str(copy), "-p", "PROJ", "--yes")
    assert code == 0 and read_lock(copy).sessions[exp.id].date == "2024-02-01", out + err
    assert not (copy / ".xnat2bids" / "replaced").exists()  # nothing was the user's to keep
    assert cli("check", str(copy), "--full")[0] == 0


def test_an_output_replaced_by_a_link_out_of_the_root_is_drift_and_repaired_without_touching_the_target(
    cli, emulator, tmp_path
):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [sidecar] = (root / "sub-01/ses-01MR1/func").glob("*_bold.json")
    rel = sidecar.relative_to(root).as_posix()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(sidecar.read_bytes())
    sidecar.unlink()
    sidecar.symlink_to(elsewhere)

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and f"changed: {rel} (now a link out of the BIDS root)" in out
    assert cli("check", str(root))[0] == 1  # plan and check agree

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--repair-drift")
    assert code == 0, out + err
    assert sidecar.is_file() and not sidecar.is_symlink() and elsewhere.read_bytes() == sidecar.read_bytes()
    [kept] = (root / ".xnat2bids" / "replaced" / exp.id).glob(f"*/{rel}")
    assert kept.is_symlink() and os.readlink(kept) == str(elsewhere)  # the link kept, its target untouched
    assert cli("check", str(root), "--full")[0] == 0


def test_a_subject_folder_linked_out_of_the_root_is_drift_and_never_written_through(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    outside = tmp_path / "another-project"
    (root / "sub-01").rename(outside)
    (root / "sub-01").symlink_to(outside)
    before = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "! drift   sub-01/ses-01MR1" in out and "(now a link out of the BIDS root)" in out
    assert cli("check", str(root))[0] == 1  # plan and check agree

    redate(emulator, exp, "2024-02-01")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--repair-drift")
    assert code == 1
    assert (f"sub-01/ses-01MR1 leads out of the BIDS root, to {outside / 'ses-01MR1'}, through a link; refusing to "
            "write through it") in out + err
    assert {p: p.stat().st_mtime_ns for p in outside.rglob("*")} == before  # nothing outside was touched
    assert read_lock(root).sessions[exp.id].date == "2024-01-10"


def _exported_then_edited_in_place(cli, emulator, tmp_path):
    """A session exported, then one byte of its T1w changed with the file's size and time kept
    (bit rot, or an edit that restored the time): only a hash shows it."""
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [image] = (root / "sub-01/ses-01MR1/anat").glob("*_T1w.nii.gz")
    good, st = image.read_bytes(), image.stat()
    image.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    return exp, root, image, good


def test_content_changed_with_its_size_and_time_kept_is_drift_with_full_and_repaired(cli, emulator, tmp_path):
    exp, root, image, good = _exported_then_edited_in_place(cli, emulator, tmp_path)
    rel = image.relative_to(root).as_posix()

    code, out, _ = cli("check", str(root), "--full")
    assert code == 1 and f"content of {rel} differs from the lock (sha256)" in out
    assert "hint: `xnat2bids plan --full` shows the sessions with other content as drift" in out
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "No changes." in out  # size and time are the recorded ones
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode", "--full")
    assert code == 2 and f"changed: {rel} (its sha256 is not the recorded one)" in out
    assert "1 drifted" in out

    changed = image.read_bytes()
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--full", "--repair-drift")
    assert code == 0 and "1 done" in out, out + err
    assert image.read_bytes() == good
    assert _kept(root, exp.id, rel) == changed  # replaced as any edit is: a copy kept
    assert cli("check", str(root), "--full")[0] == 0
    assert read_lock(root).sessions[exp.id].date == "2024-01-10"


def test_an_unfilled_events_stub_goes_with_its_run_a_filled_in_one_stays(cli, emulator, tmp_path):
    import requests

    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [events] = (root / "sub-01/ses-01MR1/func").glob("*_events.tsv")
    [bold] = [s for s in emulator.archive.get_session(exp.id).scans.values() if "bold" in s.series_description]
    gone = requests.delete(f"{emulator.url}/data/experiments/{exp.id}/scans/{bold.id}",
                           auth=(emulator.user, emulator.password), timeout=10)
    assert gone.status_code == 200
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--deep")
    assert code == 0 and f"scan {bold.id} removed" in out, out + err
    assert not events.exists() and not list((root / "sub-01/ses-01MR1").glob("func/*"))  # heudiconv's stub went too

    add(emulator.archive, [("02", "02_MR1", "2024-01-11")], series=SMALL)
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    [events] = (root / "sub-02/ses-02MR1/func").glob("*_events.tsv")
    events.write_bytes(FILLED)  # the lab's events stay, also when their run is gone
    exp2 = next(e for e in emulator.archive.sessions("PROJ") if e.label == "02_MR1")
    [bold] = [s for s in emulator.archive.get_session(exp2.id).scans.values() if "bold" in s.series_description]
    requests.delete(f"{emulator.url}/data/experiments/{exp2.id}/scans/{bold.id}",
                    auth=(emulator.user, emulator.password), timeout=10)
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--deep")[0] == 0
    assert events.read_bytes() == FILLED


def test_an_update_keeps_an_edit_only_a_hash_shows_even_without_full(cli, emulator, tmp_path):
    exp, root, image, good = _exported_then_edited_in_place(cli, emulator, tmp_path)
    edited = image.read_bytes()
    redate(emulator, exp, "2024-02-01")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")  # the commit hashes what it replaces
    assert code == 1 and "outputs changed on disk since they were recorded" in out, out + err
    assert image.read_bytes() == edited and read_lock(root).sessions[exp.id].date == "2024-01-10"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--repair-drift")
    assert code == 0 and "1 done" in out, out + err
    assert _kept(root, exp.id, image.relative_to(root).as_posix()) == edited
    assert image.read_bytes() == good and read_lock(root).sessions[exp.id].date == "2024-02-01"
