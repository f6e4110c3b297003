"""`xnat2bids apply` end to end: emulator over HTTP → export → real heudiconv/dcm2niix → BIDS.

These run the real converters on tiny synthetic DICOM, so they are marked slow (CI runs them).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worlds import (
    SMALL,
    add,
    assert_schema,
    each_applied_one,
    git,
    redate,
    tree,
    two_clones,
)

from reconcile.emulator import Fault
from reconcile.emulator.dicomgen import DEFAULT_SERIES
from reconcile.lock import lock_path, read_lock

pytestmark = pytest.mark.slow

def test_apply_converts_then_is_a_noop_and_redate_reconverts_only_that_session(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")])
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "2")
    assert code == 0, out + err
    lock = read_lock(root)
    assert lock.serial == 2 and sorted(lock.sessions) == sorted(e.id for e in exps.values())
    t1w = root / "sub-01/ses-01MR1/anat/sub-01_ses-01MR1_acq-memprage_T1w.nii.gz"
    assert t1w.stat().st_size > 0
    recorded = {o.path for r in lock.sessions.values() for o in r.outputs}
    assert t1w.relative_to(root).as_posix() in recorded
    code, out, _ = cli("check", str(root), "--full")
    assert code == 0, out

    lock_bytes = lock_path(root).read_bytes()
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out
    assert lock_path(root).read_bytes() == lock_bytes  # serial unchanged

    untouched = tree(root, "sub-01")
    redate(emulator, exps["02_MR1"], "2024-02-01")
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "date 2024-01-11 → 2024-02-01 (re-dated in XNAT)" in out
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert tree(root, "sub-01") == untouched
    after = read_lock(root)
    assert after.serial == 3 and after.sessions[exps["02_MR1"].id].date == "2024-02-01"
    assert after.sessions[exps["01_MR1"].id] == lock.sessions[exps["01_MR1"].id]
    history = [json.loads(line) for line in (root / ".xnat2bids/history.jsonl").read_text().splitlines()]
    assert [h["summary"]["done"] for h in history] == [2, 1]
    assert history[-1]["sessions"][0]["date"] == {"before": "2024-01-11", "after": "2024-02-01"}
    code, out, _ = cli("history", str(root))
    assert code == 0 and "date 2024-01-11 → 2024-02-01" in out


def test_saved_plan_is_refused_once_the_lock_changed(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0
    code, out, err = cli("apply", "--plan", str(saved), "--yes")  # no root: the one the plan was made for
    assert code == 0, out + err
    assert read_lock(root).serial == 1
    add(emulator.archive, [("02", "02_MR1", "2024-01-11")])
    code, _, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1
    assert "plan is stale: the lock changed since planning (serial 0 → 1)" in err
    assert read_lock(root).serial == 1


def test_saved_plan_is_refused_after_a_merge_that_kept_the_serial(cli, emulator, tmp_path):
    """Two clones that each applied once share a serial; a merge of their locks keeps it, so the
    sessions a saved plan changes are compared with what it saw."""
    from dataclasses import replace

    from reconcile.lock import write_lock

    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--session", "01_MR1", "--yes")[0] == 0
    redate(emulator, exps["01_MR1"], "2024-02-01")
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0  # update 01, create 02; serial 1
    lock = read_lock(root)

    def merged(sessions) -> None:  # the lock a merge leaves: other content, the same serial
        write_lock(root, replace(lock, serial=lock.serial - 1, sessions=sessions))
        assert read_lock(root).serial == lock.serial

    one = lock.sessions[exps["01_MR1"].id]
    merged({one.experiment_id: replace(one, date="2024-02-01")})  # the other clone did the update
    code, _, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and "plan is stale: the lock changed since planning (sub-01/ses-01MR1 (PROJ/" in err
    assert "date 2024-01-10 → 2024-02-01), though its serial is still 1" in err

    other = replace(one, experiment_id=exps["02_MR1"].id, session_label="02_MR1", subject_label="02")
    merged({one.experiment_id: one, other.experiment_id: other})  # the other clone created 02
    code, _, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and f"sub-02/ses-02MR1 (PROJ/{exps['02_MR1'].id}) is recorded now" in err

    merged({one.experiment_id: one})  # as planned: applied
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 0, out + err
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())


def test_second_apply_is_refused_while_the_state_lock_is_held(cli, emulator, tmp_path):
    from reconcile import statelock

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    try:
        code, _, err = cli("apply", str(root), "-p", "PROJ", "--yes")
        assert code == 1
        assert f"pid {os.getpid()}" in err and holder.id in err
        assert read_lock(root) is None
    finally:
        statelock.release(root, holder)


def test_state_lock_of_a_dead_process_is_taken_over(cli, emulator, tmp_path):
    from reconcile.statelock import state_lock_path

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    root.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    import socket

    state_lock_path(root).write_text(json.dumps({
        "id": "deadbeef0000", "user": "x", "host": socket.gethostname(), "pid": dead.pid,
        "since": "2024-01-01T00:00:00Z", "operation": "apply", "jobs": [],
    }))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert "taking over the state lock" in err
    assert not state_lock_path(root).exists()


def test_failed_session_does_not_block_others_and_is_retried(cli, emulator, tmp_path):
    from reconcile.emulator import Fault

    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")])
    bad = exps["02_MR1"]
    emulator.app.faults.add(Fault(route=rf"/experiments/{bad.id}/scans.*files", kind="status", status=500))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1
    assert "1 done, 1 failed" in out
    assert f"log: {root / '.xnat2bids/logs' / (bad.id + '.log')}" in out
    lock = read_lock(root)
    assert list(lock.sessions) == [exps["01_MR1"].id]
    assert not (root / "sub-02").exists()
    code, out, _ = cli("history", str(root))  # the text history says why each ran and why one failed
    assert code == 0
    failed = [line for line in out.splitlines() if f"/{bad.id})" in line]
    assert len(failed) == 1 and failed[0].startswith("    failed  create sub-02/ses-02MR1 ")
    assert failed[0].endswith("  new in XNAT"), out
    assert "error: " in out.split(failed[0], 1)[1].splitlines()[1]
    code, out, _ = cli("history", str(root), "--json")
    [entry] = [json.loads(line) for line in out.splitlines()]
    assert_schema("history", entry)
    assert {row["result"] for row in entry["sessions"]} == {"done", "failed"} and entry["summary"]["failed"] == 1
    emulator.app.faults.clear()
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())


@pytest.mark.parametrize("first_time", ["--keep-dicom", "without"])
def test_kept_dicom_of_another_session_at_the_address_is_set_aside_not_replaced(cli, emulator, tmp_path,
                                                                                first_time):
    # Subject 01 is relabelled 11 (its kept DICOM stays at the old label, as the user's); a new
    # subject then takes label 01: its DICOM must not silently replace the first one's, also when
    # the newcomer keeps DICOM only from its second export on.
    first = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")[0] == 0
    kept = root / "sourcedata/sub-01/ses-01MR1/dicom"
    old = {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
    emulator.archive.rename_subject(first.subject_id, "11")
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")[0] == 0
    add(emulator.archive, [("01", "01-MR1", "2024-03-10")], series=SMALL[:1])  # at sub-01/ses-01MR1 too
    [second] = [e for e in emulator.archive.sessions("PROJ") if e.id != first.id]
    assert second.subject_id != first.subject_id
    assert (kept / ".xnat2bids-experiment").read_text() == f"{first.id}\n"  # whose DICOM it is
    if first_time == "without":
        assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
        assert {p.relative_to(kept): p.read_bytes() for p in kept.rglob("*") if p.is_file()} == old
        redate(emulator, second, "2024-03-11")

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")
    assert code == 0, out + err
    said = ("sourcedata/sub-01/ses-01MR1/dicom held DICOM not marked as this session's (kept for another session at "
            "this address, or before the mark); set aside in .xnat2bids/replaced/")
    assert said in out
    assert (kept / ".xnat2bids-experiment").read_text() == f"{second.id}\n"
    [aside] = (root / ".xnat2bids/replaced" / second.id).glob("*/sourcedata/sub-01/ses-01MR1/dicom")
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == old


def test_a_users_file_in_the_kept_dicom_is_set_aside_not_deleted_by_an_update(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")[0] == 0
    dicom = root / "sourcedata/sub-01/ses-01MR1/dicom"
    exported = sorted(p.relative_to(dicom).as_posix() for p in dicom.rglob("*") if p.is_file())
    (dicom / "notes.txt").write_text("scanner hiccup in run 2")
    (dicom / "1" / "extra.dcm").write_bytes(b"a file the user copied in")
    redate(emulator, exps["01_MR1"], "2024-05-05")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")
    assert code == 0, out + err
    assert sorted(p.relative_to(dicom).as_posix() for p in dicom.rglob("*") if p.is_file()) == exported
    [kept] = (root / ".xnat2bids/replaced" / exps["01_MR1"].id).glob("*/sourcedata/sub-01/ses-01MR1/dicom")
    assert (kept / "notes.txt").read_text() == "scanner hiccup in run 2"
    assert (kept / "1/extra.dcm").read_bytes() == b"a file the user copied in"
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*") if p.is_file()) == ["1/extra.dcm", "notes.txt"]
    assert (f"2 file(s) in sourcedata/sub-01/ses-01MR1/dicom that the new DICOM does not have (1/extra.dcm, notes.txt) "
            f"were set aside in {kept.relative_to(root)}") in out + err


def test_a_kept_dicom_folder_linked_to_other_storage_is_never_walked_into(cli, emulator, tmp_path):
    # Moved to other storage and linked back: the update replaces the link, and what the link
    # points to is left exactly as it was (nothing moved out of it, nothing deleted in it).
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")[0] == 0
    dicom = root / "sourcedata/sub-01/ses-01MR1/dicom"
    archive = tmp_path / "archive/dicom"
    archive.parent.mkdir()
    dicom.rename(archive)
    dicom.symlink_to(archive)
    (archive / "notes.txt").write_text("the lab's")
    before = {p.relative_to(archive): p.read_bytes() for p in archive.rglob("*") if p.is_file()}
    redate(emulator, exps["01_MR1"], "2024-05-05")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")
    assert code == 0, out + err
    assert {p.relative_to(archive): p.read_bytes() for p in archive.rglob("*") if p.is_file()} == before
    assert dicom.is_dir() and not dicom.is_symlink() and (dicom / ".xnat2bids-experiment").is_file()


def test_keep_dicom_user_edits_and_git_commit(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "config", "user.email", "t@example.org"], check=True)
    subprocess.run(["git", "-C", str(root), "config", "user.name", "t"], check=True)
    (root / "code").mkdir()
    (root / "code/wip.txt").write_text("not ready")  # the user's, untracked
    (root / "staged.txt").write_text("staged by the user")
    subprocess.run(["git", "-C", str(root), "add", "staged.txt"], check=True)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom", "--git-commit")
    assert code == 0, out + err
    committed = subprocess.run(["git", "-C", str(root), "show", "--format=", "--name-only", "HEAD"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert ".xnat2bids.lock" in committed and "participants.tsv" in committed
    assert any(p.startswith("sub-01/ses-01MR1/anat/") for p in committed)
    assert not [p for p in committed if p.startswith((".xnat2bids.lock.info", ".xnat2bids/logs", "code/", "staged"))]
    status = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True).stdout
    assert sorted(status.splitlines()) == ["?? code/", "A  staged.txt"]  # only what was not ours
    assert ".xnat2bids/.gitignore" in committed  # xnat2bids' logs and staging stay out
    dicom = root / "sourcedata/sub-01/ses-01MR1/dicom"
    assert sorted(p.name for p in dicom.iterdir()) == [".xnat2bids-experiment", "1", "2"]
    assert (dicom / "1" / "1.dcm").read_bytes() == emulator.archive.get_scan(exps["01_MR1"].id, "1").find_resource("DICOM").files["1.dcm"].read()
    log = subprocess.run(["git", "-C", str(root), "log", "--format=%s", "--name-only"], capture_output=True, text=True).stdout
    assert "xnat2bids apply: 1 session(s) exported" in log and ".xnat2bids.lock" in log and ".xnat2bids/history.jsonl" in log

    # A user adds a column and a note file; a re-dated re-export keeps both.
    sessions_tsv = root / "sub-01/sub-01_sessions.tsv"
    rows = sessions_tsv.read_text().splitlines()
    # acq_time is when the first scan was acquired (heudiconv's scans.tsv, from the DICOM).
    scans_tsv = (root / "sub-01/ses-01MR1/sub-01_ses-01MR1_scans.tsv").read_text().splitlines()
    acquired = min(line.split("\t")[1] for line in scans_tsv[1:])
    assert rows[1].split("\t")[:2] == ["ses-01MR1", acquired] and not acquired.endswith("T00:00:00")
    sessions_tsv.write_text("\n".join([rows[0] + "\tnotes"] + [r + "\tgood scan" for r in rows[1:]]) + "\n")
    participants = root / "participants.tsv"
    participants.write_text("participant_id\tage\nsub-01\t42\n")
    note = root / "sub-01/ses-01MR1/notes.txt"
    note.write_text("my notes")
    redate(emulator, exps["01_MR1"], "2024-05-05")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    # The re-date (how labs force a re-export) does not move acq_time.
    assert "good scan" in sessions_tsv.read_text() and "2024-05-05" not in sessions_tsv.read_text()
    assert f"ses-01MR1\t{acquired}\t" in sessions_tsv.read_text()
    assert participants.read_text() == "participant_id\tage\nsub-01\t42\n"
    assert note.read_text() == "my notes"
    recorded = {o.path for o in read_lock(root).sessions[exps["01_MR1"].id].outputs}
    assert "sub-01/ses-01MR1/notes.txt" not in recorded  # user files are never recorded as outputs


def test_full_reproin_session_passes_the_bids_validator(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")], series=DEFAULT_SERIES)
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--validate", "--jobs", "2")
    assert code == 0, out + err
    # The summary names each warning's code; where they are is in the validator's report, kept.
    report = root / ".xnat2bids/logs/bids-validator.json"
    warnings = [i for i in json.loads(report.read_text())["issues"]["issues"] if i["severity"] == "warning"]
    [line] = [line for line in out.splitlines() if line.startswith("BIDS validator:")]
    assert line.startswith(f"BIDS validator: 0 errors, {len(warnings)} warnings"), line
    assert all(f"{i['code']} ×" in line for i in warnings)
    assert line.endswith(f"; full report: {report}") == bool(warnings)
    for kind in ("anat/sub-01_ses-01MR1_acq-memprage_T1w.nii.gz", "fmap/sub-01_ses-01MR1_acq-boldGRE_phasediff.json",
                 "dwi/sub-01_ses-01MR1_acq-b1500_dir-ap_dwi.bval", "func/sub-01_ses-01MR1_task-checks_run-02_bold.nii.gz"):
        assert (root / "sub-01/ses-01MR1" / kind).is_file(), kind


def test_renamed_session_moves_to_the_new_address_and_old_outputs_go(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    (root / "sub-01/ses-01MR1/mine.txt").write_text("user file")
    emulator.archive.rename_session(exps["01_MR1"].id, "01_MR2")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert "renamed ses-01MR1 → ses-01MR2" in out
    new = read_lock(root).sessions[exps["01_MR1"].id]
    assert new.bids_session == "01MR2"
    assert all(o.path.startswith("sub-01/ses-01MR2/") and (root / o.path).is_file() for o in new.outputs)
    assert sorted(p.relative_to(root).as_posix() for p in (root / "sub-01/ses-01MR1").rglob("*")) == [
        "sub-01/ses-01MR1/mine.txt"
    ]  # only the user's file is left at the old address
    assert (root / "sub-01/ses-01MR2/mine.txt").read_text() == "user file"  # and a copy goes with the session
    assert "ses-01MR1" not in (root / "sub-01/sub-01_sessions.tsv").read_text()


def test_rearchived_session_is_rekeyed_and_orphans_are_kept_until_forgotten(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    old = exps["01_MR1"]
    emulator.archive.delete_session(old.id)
    again = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])["01_MR1"]
    emulator.archive.delete_session(exps["02_MR1"].id)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert f"replaced in XNAT: {old.id} → {again.id}" in out
    assert "- orphan  sub-02/ses-02MR1" in out
    assert "; lock serial 3; took " in out and " s. Left as they are: 1 orphaned (see the plan's notes)." in out
    lock = read_lock(root)
    assert sorted(lock.sessions) == sorted([again.id, exps["02_MR1"].id])
    assert (root / "sub-02/ses-02MR1").is_dir()  # orphans are never deleted
    code, out, err = cli("forget", exps["02_MR1"].id, str(root))  # no terminal here to ask on
    assert code == 1 and (f"error: forget needs confirmation to drop {exps['02_MR1'].id} (PROJ/02_MR1, "
                          "sub-02/ses-02MR1); without a terminal pass --yes") in err
    assert read_lock(root).serial == 3
    code, out, _ = cli("forget", "--yes", exps["02_MR1"].id, str(root))
    assert code == 0
    assert f"note: if XNAT still has {exps['02_MR1'].id}, plan now finds sub-02/ses-02MR1 in its way" in out
    assert sorted(read_lock(root).sessions) == [again.id]
    assert (root / "sub-02/ses-02MR1").is_dir()
    code, out, _ = cli("history", str(root))  # forget is in the history, with the serial it moved
    assert code == 0 and "forget by " in out and "serial 3 → 4" in out
    assert (f"    done    forget sub-02/ses-02MR1 (PROJ/{exps['02_MR1'].id})  "
            "dropped from the lock by `xnat2bids forget`; its files were left on disk\n") in out and "None" not in out
    code, out, _ = cli("history", str(root), "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    assert [e["operation"] for e in entries][-1] == "forget"
    for entry in entries:
        assert_schema("history", entry)
    code, out, _ = cli("show", str(root), "--json")
    assert code == 0 and [s["experiment_id"] for s in json.loads(out)["sessions"]] == [again.id]
    assert_schema("show", json.loads(out))


def test_microsecond_timestamps_survive_the_lock_and_a_redate_is_still_seen(cli, emulator, tmp_path):
    """XNAT on PostgreSQL lists insert_date/last_modified to the microsecond: what the lock keeps
    must compare equal on the next plan, and a later re-save must still show."""
    emulator.archive.stamp_digits = 6
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])["01_MR1"]
    listed = emulator.archive.get_session(exp.id).insert_date
    assert listed.microsecond % 1000  # finer than milliseconds
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    recorded = read_lock(root).sessions[exp.id]
    assert recorded.insert_date.endswith(f"{listed.microsecond:06d}".rstrip("0"))
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "No changes. 1 session up to date." in out, out
    redate(emulator, exp, "2024-02-01")
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "date 2024-01-10 → 2024-02-01 (re-dated in XNAT)" in out, out


def test_drift_is_repaired_only_when_asked(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    lost = next((root / "sub-01/ses-01MR1/anat").glob("*.nii.gz"))
    original = lost.read_bytes()
    lost.unlink()
    for executor in ("local", "slurm"):  # with nothing to submit, no cluster is asked
        code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", executor)
        assert code == 0 and "Nothing to apply. Left as they are: 1 drifted (see the plan's notes)." in out, executor
    assert not lost.exists()
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--repair-drift")
    assert code == 0, out + err
    assert lost.read_bytes() == original
    assert cli("check", str(root), "--full")[0] == 0


def test_the_apply_summary_says_how_long_the_run_took(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    emulator.app.faults.add(Fault(route=r"/experiments$", kind="latency", seconds=1.0))  # the listing: part of it
    t0 = time.monotonic()
    code, out, err = cli("apply", str(tmp_path / "bids"), "-p", "PROJ", "--yes")
    took = time.monotonic() - t0
    assert code == 0, out + err
    said = re.search(r"^Apply complete: 1 done, 0 failed, 0 skipped; lock serial 1; took (\d+\.\d) s\.$", out, re.M)
    assert said is not None, out
    assert 1.0 <= float(said.group(1)) <= took + 0.05


def test_an_existing_unrecorded_folder_is_never_replaced(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0  # before the folder appears
    theirs = root / "sub-01/ses-01MR1/anat/from-the-old-script.nii.gz"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"old export")
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes")  # plan refuses it before any download
    assert code == 1
    assert "error: sub-01/ses-01MR1 exists but the lock records no session there" in out
    assert "Nothing applied: 1 problem above. Left as they are: 1 session error (see the plan's errors and notes)." in out
    code, out, _ = cli("apply", str(root), "--plan", str(saved), "--yes")  # planned earlier: apply's own guard
    assert code == 1
    assert "already exists but the lock does not record it" in out
    assert theirs.read_bytes() == b"old export"
    assert sorted(p.name for p in (root / "sub-01/ses-01MR1").rglob("*")) == ["anat", "from-the-old-script.nii.gz"]
    assert read_lock(root) is None or not read_lock(root).sessions


def test_apply_starts_no_more_sessions_once_the_lock_changed_under_it(cli, emulator, tmp_path, monkeypatch):
    from reconcile import apply as apply_module
    from reconcile.lock import write_lock

    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-10"),
                           ("03", "03_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    real_commit = apply_module.commit_session

    def commit_then_another_run_writes(staged, where, lock, **kw):
        written = real_commit(staged, where, lock, **kw)
        if written.serial == 1:
            write_lock(where, written, expected_serial=1)  # as another run would: serial 2 on disk
        return written

    monkeypatch.setattr(apply_module, "commit_session", commit_then_another_run_writes)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert "the lock changed on disk since it was read (serial 1 → 2)" in out
    assert "Apply complete: 1 done, 1 failed, 1 skipped" in out
    assert "the lock changed on disk during this run; run plan again" in out
    assert not (root / "sub-03").exists()  # never started


def test_git_that_cannot_be_run_is_a_clear_error_not_a_traceback(cli, emulator, tmp_path, monkeypatch):
    # No git on PATH here.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    root.mkdir()
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 1 and "error: git could not be run: No such file or directory" in err, out + err
    assert "Traceback" not in out + err and not (root / ".xnat2bids.lock").exists()


def test_git_commit_without_a_repository_or_an_identity_fails_before_any_work(cli, emulator, tmp_path, monkeypatch):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    root.mkdir()
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 1 and "is not the top of a git repository" in err and "run `git init` there first" in err
    assert not (root / ".xnat2bids.lock").exists() and not list(root.glob("sub-*"))

    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "config", "user.useConfigOnly", "true"], check=True)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "no-gitconfig"))  # no user.email anywhere
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL", "EMAIL", "GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.delenv(name, raising=False)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 1 and "git does not know who commits here" in err and "git config user.email" in err
    assert not (root / ".xnat2bids.lock").exists() and not list(root.glob("sub-*"))


def test_a_saved_plan_with_an_error_carries_out_the_rest_and_reports_it_again(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    root = tmp_path / "bids"
    theirs = root / "sub-01/ses-01MR1/anat/from-the-old-script.nii.gz"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"old export")
    saved = tmp_path / "plan.json"
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--out", str(saved))
    assert code == 1 and "error: sub-01/ses-01MR1 exists but the lock records no session there" in out
    assert "It keeps the 1 error(s) above: apply --plan carries out the other changes and reports them again" in out
    code, out, _ = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and "error: sub-01/ses-01MR1 exists but the lock records no session there" in out
    assert list(read_lock(root).sessions) == [exps["02_MR1"].id]
    assert theirs.read_bytes() == b"old export"


def test_git_commit_in_the_middle_of_a_merge_is_refused_before_any_work(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    root.mkdir()

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@x", *args],
                              capture_output=True, text=True)

    git("init", "-q", "-b", "main")
    (root / "notes.txt").write_text("base\n")
    git("add", "notes.txt")
    git("commit", "-qm", "base")
    git("checkout", "-qb", "other")
    (root / "notes.txt").write_text("theirs\n")
    git("commit", "-qam", "theirs")
    git("checkout", "-q", "main")
    (root / "notes.txt").write_text("ours\n")
    git("commit", "-qam", "ours")
    assert git("merge", "other").returncode != 0  # a conflict, left for the user to resolve
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 1 and f"{root} is in the middle of a git merge" in err and "git merge --abort" in err
    assert not (root / ".xnat2bids.lock").exists() and not list(root.glob("sub-*"))
    assert git("ls-files", "--unmerged").stdout.strip()  # the conflict is still git's to see

    (root / ".git/MERGE_HEAD").unlink()  # the merge state gone, the unmerged index entries still there
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 1 and "a conflict git has not seen resolved (notes.txt)" in err
    assert not list(root.glob("sub-*"))


def test_two_clones_histories_merge_without_a_conflict(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12")], series=SMALL[:1])
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ident = ["-c", "user.name=t", "-c", "user.email=t@x"]

    def git(where, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(where), *ident, *args], capture_output=True, text=True)

    ours.mkdir()
    git(ours, "init", "-q", "-b", "main")
    for name, value in (("user.name", "t"), ("user.email", "t@x")):
        git(ours, "config", name, value)
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "01_MR1", "--yes", "--git-commit")[0] == 0
    assert ".xnat2bids/.gitattributes" in git(ours, "ls-files").stdout.split()
    assert git(tmp_path, "clone", "-q", str(ours), str(theirs)).returncode == 0
    git(theirs, "config", "user.name", "t")
    git(theirs, "config", "user.email", "t@x")
    each_applied_one(cli, ours, theirs)
    git(theirs, "pull", "-q", "--no-rebase", "origin", "main")  # the lock itself may conflict: both added a session
    unmerged = {line.split("\t")[1] for line in git(theirs, "ls-files", "--unmerged").stdout.splitlines()}
    assert ".xnat2bids/history.jsonl" not in unmerged
    history = (theirs / ".xnat2bids/history.jsonl").read_text()
    assert "<<<<<<<" not in history and history.count('"operation": "apply"') == 3


def test_a_history_git_left_conflicted_is_named_so_and_apply_appends_nothing_to_it(cli, emulator, tmp_path):
    # A clone where git merges the history line by line (here: an attribute overriding the union
    # xnat2bids sets up; a dataset of an older xnat2bids had none): both clones appended an entry.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12"), ("04", "04_MR1", "2024-01-13")], series=SMALL[:1])
    ours, theirs = two_clones(cli, tmp_path)
    with open(theirs / ".git/info/attributes", "a") as fh:
        fh.write(".xnat2bids/history.jsonl merge=text\n")
    each_applied_one(cli, ours, theirs)
    assert git(theirs, "pull", "-q", "--no-rebase", "origin", "main").returncode != 0
    unmerged = {line.split("\t")[1] for line in git(theirs, "ls-files", "--unmerged").stdout.splitlines()}
    assert ".xnat2bids/history.jsonl" in unmerged
    (theirs / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    assert git(theirs, "commit", "-qa", "--no-edit").returncode == 0  # the history's markers committed with it
    history = theirs / ".xnat2bids/history.jsonl"
    conflicted = history.read_bytes()
    assert conflicted.splitlines()[1].startswith(b"<<<<<<< ")
    way_out = ("keep both sides' entries: delete the marker lines (<<<<<<<, =======, >>>>>>>) and leave every entry "
               "line of both sides as it stands")

    code, out, err = cli("history", str(theirs))
    assert code == 0, out + err
    assert f"warning: {history}: unresolved git merge conflict (a conflict marker at line 2); {way_out}" in err
    assert "not valid JSON" not in err and out.count(" apply by ") == 3  # both sides' entries
    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert code == 0, out + err
    assert ("note: unresolved git merge conflict markers in .xnat2bids/history.jsonl (line 2): apply writes nothing "
            f"until they are resolved ({way_out}") in out
    assert "then `git add .xnat2bids/history.jsonl`)" in out  # the union is set up already: not suggested
    code, out, err = cli("check", str(theirs))
    assert code == 0 and "note: unresolved git merge conflict markers in .xnat2bids/history.jsonl" in out, out + err

    lock = (theirs / ".xnat2bids.lock").read_bytes()
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert f"error: {history}: unresolved git merge conflict (a conflict marker at line 2); nothing was exported" in err
    assert way_out in err and f"`git add {history}`" in err
    code, out, err = cli("forget", "XNAT_E00001", str(theirs), "--yes")
    assert code == 1 and "nothing was forgotten" in err, out + err
    # A forced unlock removes the lock, and leaves the conflicted history as it is.
    from reconcile.statelock import acquire, state_lock_path

    held = acquire(theirs, "apply")
    info = state_lock_path(theirs)
    info.write_text(json.dumps({**json.loads(info.read_text()), "host": "compute-node-7"}))  # not seen running here
    code, out, err = cli("force-unlock", held.id, str(theirs))
    assert code == 0 and not info.exists() and "conflict marker at line 2); its entry is not written" in err, out + err
    assert history.read_bytes() == conflicted and (theirs / ".xnat2bids.lock").read_bytes() == lock
    assert not (theirs / "sub-04").exists()

    # A dataset without the union set up (an older xnat2bids): the way to have git keep both sides.
    (theirs / ".xnat2bids/.gitattributes").unlink()
    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert "with `history.jsonl merge=union` in .xnat2bids/.gitattributes" in out, out + err

    # Resolved as said: the marker lines gone, both sides' entries kept. Apply appends after them.
    history.write_bytes(b"".join(line for line in conflicted.splitlines(keepends=True)
                                 if not line.startswith((b"<<<<<<< ", b"=======", b">>>>>>> "))))
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    entries = [json.loads(line) for line in history.read_text().splitlines()]
    assert [e["operation"] for e in entries] == ["apply"] * 4
    assert (theirs / ".xnat2bids/.gitattributes").read_text().splitlines()[-1] == "history.jsonl merge=union"


def test_git_commit_takes_in_what_the_lock_records_since_the_last_commit(cli, emulator, tmp_path):
    # A run killed before its git commit (here: one run without --git-commit), or a commit that
    # recovery completed, leaves the lock ahead of the repository: the next --git-commit commits
    # that session's folder with the lock, even when nothing is left to apply.
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    root = tmp_path / "bids"
    root.mkdir()

    def git(where, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@x", *args],
                              capture_output=True, text=True)

    git(root, "init", "-q", "-b", "main")
    for name, value in (("user.name", "t"), ("user.email", "t@x")):
        git(root, "config", name, value)
    assert cli("apply", str(root), "-p", "PROJ", "--session", "01_MR1", "--yes", "--git-commit")[0] == 0
    assert cli("apply", str(root), "-p", "PROJ", "--session", "02_MR1", "--yes")[0] == 0
    assert "?? sub-02/" in git(root, "status", "--porcelain").stdout

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 0, out + err
    assert "Nothing to apply." in out and "git commit " in out
    assert "sub-02" not in git(root, "status", "--porcelain").stdout
    assert git(root, "log", "-1", "--format=%B").stdout.strip() == (
        "xnat2bids apply: 0 session(s) exported, and 1 recorded otherwise by an earlier run\n\n"
        f"recorded by an earlier run: sub-02/ses-02MR1 ({exps['02_MR1'].id})")
    clone = tmp_path / "clone"
    assert git(tmp_path, "clone", "-q", str(root), str(clone)).returncode == 0
    code, out, err = cli("check", str(clone))
    assert code == 0 and "OK: lock serial 2, 2 sessions" in out, out + err
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes", "--git-commit")
    assert code == 0 and "git commit" not in out  # nothing new: no empty commit, no message
    # A clone whose git turns line ends into CRLF (Windows habits: core.autocrlf): its text outputs
    # differ in size by their line count, which check says, with the way out.
    crlf = tmp_path / "crlf"
    assert git(tmp_path, "clone", "-q", "-c", "core.autocrlf=true", str(root), str(crlf)).returncode == 0
    code, out, _ = cli("check", str(crlf))
    sidecar = next(crlf.glob("sub-01/ses-01MR1/anat/*.json")).relative_to(crlf).as_posix()
    assert code == 1 and f"problem: {exps['01_MR1'].id} sub-01/ses-01MR1: size of {sidecar} is " in out, out
    assert "(its lines end in CRLF, as git's core.autocrlf writes them)" in out.split(sidecar)[1].splitlines()[0]
    hint = next(line for line in out.splitlines() if line.startswith("hint: git changed their line ends"))
    assert "`git config core.autocrlf false` in this clone, then `git checkout -- " in hint and sidecar in hint
    nifti = [line for line in out.splitlines() if ".nii.gz" in line]
    assert not nifti, nifti  # binary: left as they were
    git(crlf, "config", "core.autocrlf", "false")
    named = hint.split("`git checkout -- ", 1)[1].split("`", 1)[0].split()
    assert git(crlf, "checkout", "--", *named).returncode == 0  # the hint, to the letter
    code, out, _ = cli("check", str(crlf), "--full")
    assert code == 0, out


def test_a_serial_moved_by_a_merge_with_nothing_exported_gets_no_history_entry(cli, emulator, tmp_path):
    from reconcile.lock import write_lock

    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--session", "01_MR1", "--yes")[0] == 0
    lock = read_lock(root)
    write_lock(root, lock)  # as a merge that took the other clone's higher serial leaves it: serial 1 → 2
    assert read_lock(root).serial == 2
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    entries = [json.loads(line) for line in (root / ".xnat2bids/history.jsonl").read_text().splitlines()]
    assert [(e["operation"], e["lock_serial"]) for e in entries] == [
        ("apply", {"before": 0, "after": 1}), ("apply", {"before": 2, "after": 3})]


def test_a_session_the_user_may_not_read_fails_alone(cli, emulator, tmp_path):
    from reconcile.emulator import Fault

    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    emulator.app.faults.add(Fault(route=rf"/experiments/{exps['01_MR1'].id}/scans.*files", kind="status", status=403))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert "1 done, 1 failed, 0 skipped" in out and "credentials rejected" not in out
    assert list(read_lock(root).sessions) == [exps["02_MR1"].id]


def test_old_files_a_commit_could_not_remove_are_named_by_check_and_removed_by_the_next_apply(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    # What a replaced session's old folder leaves when one of its files could not be deleted then.
    left = root / ".xnat2bids/trash" / exp.id / "anat/old.nii.gz"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"old")
    code, out, _ = cli("check", str(root))
    assert code == 0 and (f"pending: .xnat2bids/trash/{exp.id}: the old files of a replaced session, which could "
                          "not be removed then; the next apply removes them") in out
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out, out + err
    assert not (root / ".xnat2bids/trash" / exp.id).exists()
    assert "pending" not in cli("check", str(root))[1]


def test_the_work_area_is_ignored_by_git_without_git_commit(cli, emulator, tmp_path):
    # A lab member's `git add -A` must never take in DICOM being downloaded, logs, or a SLURM
    # batch's credentials file: the work area carries its ignore rules from the first apply on.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    for inside in ("batches/0123456789ab/credentials.json", "revocations/0123456789ab.json",
                   "staging/XNAT_E00001/dicom/1/1.dcm", "logs/XNAT_E00001.log", "tmp/.participants.tsv.x.tmp"):
        ignored = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", f".xnat2bids/{inside}"])
        assert ignored.returncode == 0, inside
    assert subprocess.run(["git", "-C", str(root), "check-ignore", "-q", ".xnat2bids/history.jsonl"]).returncode == 1


def _fake_validator(folder, script: str) -> None:
    """A `bids-validator-deno` first on PATH that runs `script` (bash)."""
    folder.mkdir()
    exe = folder / "bids-validator-deno"
    exe.write_text(f"#!/bin/bash\n{script}\n")
    exe.chmod(0o755)


def _git_repository(root: Path) -> Path:
    """`root` made, as a git repository with an identity of its own."""
    root.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@example.org"], ["config", "user.name", "t"]):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    return root


def test_a_validator_that_fails_or_hangs_still_lets_apply_commit_what_it_did(cli, emulator, tmp_path, monkeypatch):
    from reconcile import validate

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = _git_repository(tmp_path / "bids")
    _fake_validator(tmp_path / "bin", "sleep 30")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setattr(validate, "VALIDATOR_TIMEOUT_S", 1)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--validate", "--git-commit")
    assert code == 1 and "error: the BIDS validator did not finish within 1 s" in err, out + err
    assert "Traceback" not in err and "git commit " in out
    committed = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True).stdout
    assert ".xnat2bids.lock" in committed and "sub-01/ses-01MR1/" in committed


def test_the_validator_and_the_datasets_git_hooks_get_no_xnat_credentials(cli, emulator, tmp_path, monkeypatch):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = _git_repository(tmp_path / "bids")
    seen = tmp_path / "seen"
    hook = root / ".git/hooks/pre-commit"
    hook.write_text(f"#!/bin/bash\nenv >> {seen}\n")
    hook.chmod(0o755)
    _fake_validator(tmp_path / "bin", f"env >> {seen}\necho '{{\"issues\": {{\"issues\": []}}}}'")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--validate", "--git-commit")
    assert code == 0, out + err
    text = seen.read_text()
    assert text.count("PATH=") >= 2  # both ran
    assert emulator.password not in text and "XNAT_USER" not in text and "XNAT_PASS" not in text


def test_validate_says_before_any_work_that_no_validator_is_installed_and_skips_a_root_with_nothing_exported(
        cli, emulator, tmp_path, monkeypatch):
    from reconcile import validate

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    with monkeypatch.context() as patched:
        patched.setattr(validate, "validator", lambda: (_ for _ in ()).throw(
            validate.ValidationError("bids-validator-deno is not installed", hint="pip install bids-validator-deno")))
        code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--validate")
    assert code == 1 and "error: bids-validator-deno is not installed" in err
    assert not (root / ".xnat2bids.lock").exists() and not (root / "sub-01").exists()

    # Every session failing leaves no dataset yet: nothing for the validator to judge but its absence.
    emulator.app.faults.add(Fault(route=r"/files", kind="status", status=404))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--validate")
    assert code == 1 and "1 failed" in out, out + err
    assert "BIDS validator: not run (nothing exported yet)" in out and "MISSING_DATASET_DESCRIPTION" not in out


def test_apply_creates_a_missing_root_but_not_missing_folders_above_it(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    unmounted = tmp_path / "mnt" / "project" / "bids"  # a file system not mounted, a mistyped path
    code, out, err = cli("apply", str(unmounted), "-p", "PROJ", "--yes")
    assert code == 1 and out == "" and not (tmp_path / "mnt").exists()
    assert err.startswith(f"error: BIDS root {unmounted} cannot be created: {tmp_path / 'mnt'} does not exist\n")
    assert "is its file system mounted?" in err
    # plan (and --diff) says so, not that apply creates it
    code, out, err = cli("plan", str(unmounted), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "does not exist: apply creates it" not in out, out
    assert (f"note: apply refuses to export anything here: BIDS root {unmounted} cannot be created: "
            f"{tmp_path / 'mnt'} does not exist; is its file system mounted?") in out, out
    code, out, err = cli("apply", str(tmp_path / "bids"), "-p", "PROJ", "--yes")  # the folder above exists
    assert code == 0 and (tmp_path / "bids/sub-01/ses-01MR1/anat").is_dir(), out + err


def test_a_participants_file_not_in_utf8_is_named_by_plan_and_refused_before_any_download(cli, emulator, tmp_path):
    # An old script's Latin-1 participants.tsv: every session was downloaded and converted, then
    # failed at its commit, on every run.
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--session", "01_MR1")[0] == 0
    participants = root / "participants.tsv"
    participants.write_bytes("participant_id\tsite\nsub-01\tZürich\n".encode("latin-1"))
    said = f"{participants} is not UTF-8: byte 0xfc at offset 28 (line 2)"
    code, out, err = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and f"note: apply refuses to export anything here: {said}; save the file as UTF-8" in out, out
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and f"error: {said}" in err, out + err
    assert not (root / "sub-02").exists() and not (root / ".xnat2bids/logs" / f"{exps['02_MR1'].id}.log").exists()
    assert participants.read_bytes() == "participant_id\tsite\nsub-01\tZürich\n".encode("latin-1")


def _unmount(folder: Path) -> None:
    """What a mount point looks like once its file system is gone: an empty folder."""
    import shutil

    shutil.rmtree(folder)
    folder.mkdir()


@pytest.mark.parametrize("mount_point", ["above", "root"])
def test_apply_refuses_a_root_whose_lock_this_user_saw_and_that_has_none_now(cli, emulator, tmp_path, mount_point):
    # Found by a nightly `apply --yes` from cron: with the file system not mounted it exported the
    # whole archive again onto the disk under the mount point, and exited 0.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    (tmp_path / "mnt" / "x").mkdir(parents=True)
    root = tmp_path / "mnt" / "x" / "bids" if mount_point == "above" else tmp_path / "mnt" / "x"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    serial = read_lock(root).serial
    _unmount(tmp_path / "mnt" / "x")
    had = f"{root} had a lock (serial {serial} or later, read on {time.strftime('%Y-%m-%d', time.gmtime())}) and has none now: is its file system mounted?"

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and out == "", out + err
    assert err.startswith(f"error: apply refused: {had}\n") and "--accept-missing-lock" in err, err
    assert list((tmp_path / "mnt" / "x").iterdir()) == []  # nothing created, nothing exported

    code, out, err = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and f"warning: {had} apply refuses to export into it" in err, out + err
    assert "apply creates it" not in out, out  # the warning's word stands, not the contrary

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--accept-missing-lock")  # removed on purpose
    assert code == 0 and (root / "sub-01/ses-01MR1/anat").is_dir(), out + err
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0  # its own lock from now on


def test_a_root_removed_on_purpose_from_a_folder_with_other_things_is_made_anew(cli, emulator, tmp_path):
    # `rm -rf ~/bids-test` to start over: the home it stood in holds other things, as an empty
    # mount point does not.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    home = tmp_path / "home"
    (home / "notes").mkdir(parents=True)
    root = home / "bids-test"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    shutil.rmtree(root)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "1 done" in out and "had a lock" not in err, out + err
    assert read_lock(root).serial == 1 and (root / "sub-01/ses-01MR1/anat").is_dir()


def test_apply_refuses_a_root_under_an_fstab_mount_point_that_is_not_mounted(cli, emulator, tmp_path, monkeypatch):
    # A cron job of a service account has no lock cache to remember the dataset by: the fstab says it.
    from reconcile import mounts

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    point = Path(os.path.realpath(tmp_path)) / "mnt"
    point.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# <file system> <mount point> <type> <options>\nUUID=1 / ext4 defaults 0 1\n"
                     f"nas:/export/lab {point} nfs rw,_netdev 0 0\n")
    monkeypatch.setattr(mounts, "FSTAB", fstab)
    root = point / "bids"

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and out == "" and not root.exists(), out + err
    assert err.startswith(f"error: apply refused: BIDS root {root} is on {point}, which {fstab} lists as the mount "
                          "point of nas:/export/lab (nfs), and nothing is mounted there\n"), err
    assert f"mount {point}" in err and "--accept-unmounted" in err
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 0 and f"warning: BIDS root {root} is on {point}" in err, out + err

    monkeypatch.setattr(mounts, "MOUNTINFO", tmp_path / "mountinfo")
    (tmp_path / "mountinfo").write_text(f"36 25 0:32 / {point} rw,relatime shared:1 - nfs nas:/export/lab rw\n")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")  # mounted now
    assert code == 0 and (root / "sub-01/ses-01MR1/anat").is_dir(), out + err


def test_a_saved_plan_of_a_dataset_moved_since_is_stale_and_creates_nothing(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    add(emulator.archive, [("02", "02_MR1", "2024-01-11")])
    saved = tmp_path / "plan.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(saved))[0] == 0
    root.rename(tmp_path / "moved")
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and "plan is stale: it was made against the lock of" in err and "(serial 1)" in err, out + err
    assert not root.exists()


def test_a_full_disk_is_the_sessions_error_saying_where(tmp_path):
    from reconcile.apply import _disk_full

    full = _disk_full(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.part")), tmp_path)
    assert full.summary == f"no space left on the disk holding {tmp_path / 'x.part'}"
    assert "free space there, then apply again" in full.hint
    quota = _disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert quota.summary == f"the disk quota is used up on the disk holding {tmp_path}"
    other = OSError(errno.EACCES, "Permission denied")
    assert _disk_full(other, tmp_path) is other


def test_an_apply_whose_login_fails_leaves_no_new_root_behind(cli, emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("XNAT_PASS", "wrong")
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "XNAT rejected the credentials" in err, out + err
    assert not root.exists()


def test_a_participants_file_git_left_conflicted_is_refused_before_any_export_and_kept(cli, emulator, tmp_path):
    # Two clones each added a subject; `git pull` merges the lock (the driver) and the history, but
    # participants.tsv conflicts, as the README says. Its marker lines are not participants.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12"), ("04", "04_MR1", "2024-01-13")], series=SMALL[:1])
    ours, theirs = two_clones(cli, tmp_path)
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "02_MR1", "--yes", "--git-commit")[0] == 0
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--session", "03_MR1", "--yes", "--git-commit")
    assert code == 0, out + err
    git(theirs, "pull", "-q", "--no-rebase", "origin", "main")
    unmerged = {line.split("\t")[1] for line in git(theirs, "ls-files", "--unmerged").stdout.splitlines()}
    assert unmerged == {"participants.tsv"}
    participants = theirs / "participants.tsv"
    conflicted = participants.read_bytes()
    assert b"<<<<<<< HEAD\n" in conflicted
    # Committed as it stands (`git commit -a` marks every file resolved): no merge is unfinished.
    assert git(theirs, "commit", "-qa", "--no-edit").returncode == 0
    lock = (theirs / ".xnat2bids.lock").read_bytes()

    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert "note: unresolved git merge conflict markers in participants.tsv (line 3): apply exports nothing" in out
    assert "apply refuses to export anything here" not in out  # said once, not twice
    assert "`git add participants.tsv`" in out
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert f"error: {participants}: unresolved git merge conflict (a conflict marker at line 3); nothing was exported" in err
    assert "delete the marker lines" in err and f"`git add {participants}`" in err
    assert participants.read_bytes() == conflicted and (theirs / ".xnat2bids.lock").read_bytes() == lock
    assert not (theirs / "sub-04").exists() and not list((theirs / ".xnat2bids/staging").glob("*/*"))

    # Resolved (both rows kept): the next apply adds sub-04.
    participants.write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert participants.read_text() == "participant_id\nsub-01\nsub-02\nsub-03\nsub-04\n"


def test_an_unfinished_git_merge_is_noted_by_plan_and_check_and_apply_refuses_to_start(cli, emulator, tmp_path):
    # `git pull` merged the lock (the driver: a valid lock) but stopped on participants.tsv. Even with
    # that file resolved, the merge is not finished until its commit: the dataset is half-merged.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12"), ("04", "04_MR1", "2024-01-13")], series=SMALL[:1])
    ours, theirs = two_clones(cli, tmp_path)
    each_applied_one(cli, ours, theirs)
    assert git(theirs, "pull", "-q", "--no-rebase", "origin", "main").returncode != 0
    (theirs / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    assert git(theirs, "add", "participants.tsv").returncode == 0
    note = f"a `git merge` is unfinished in the repository of {theirs}: files may still hold conflict markers"
    way_out = "then `git merge --continue`; or `git merge --abort` to go back"

    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert code == 0 and f"note: {note}" in out and way_out in out, out + err
    code, out, err = cli("check", str(theirs))
    assert code == 0 and f"note: {note}" in out and "OK: lock serial 3" in out, out + err
    code, out, err = cli("check", str(theirs), "--json")
    assert json.loads(out)["ok"] is True and f"note: {note}" in err

    written = {p: p.read_bytes() for p in (theirs / ".xnat2bids.lock", theirs / ".xnat2bids/history.jsonl")}
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert f"error: a `git merge` is unfinished in the repository of {theirs}; nothing was exported" in err
    assert way_out in err
    assert {p: p.read_bytes() for p in written} == written and not (theirs / "sub-04").exists()
    code, out, err = cli("forget", "XNAT_E00001", str(theirs), "--yes")
    assert code == 1 and "unfinished in the repository" in err and "nothing was forgotten" in err, out + err
    assert {p: p.read_bytes() for p in written} == written

    assert git(theirs, "commit", "-q", "--no-edit").returncode == 0
    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert code == 0 and "is unfinished in the repository" not in out, out + err
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert (theirs / "sub-04").is_dir()


def test_an_unfinished_rebase_in_a_linked_worktree_is_noted_there_alone_and_refused(cli, emulator, tmp_path):
    # A linked worktree keeps its rebase state in its own git folder (.git/worktrees/NAME), which
    # `git rev-parse --git-path` finds; the main work tree is not rebasing.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12")], series=SMALL[:1])
    ours, theirs = two_clones(cli, tmp_path)
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "02_MR1", "--yes", "--git-commit")[0] == 0
    side = tmp_path / "side"
    assert git(theirs, "worktree", "add", "-q", "-b", "side", str(side), "main").returncode == 0
    assert (side / ".git").is_file()
    assert cli("apply", str(side), "-p", "PROJ", "--session", "03_MR1", "--yes", "--git-commit")[0] == 0
    assert git(side, "fetch", "-q", "origin").returncode == 0
    assert git(side, "rebase", "origin/main").returncode != 0  # participants.tsv: both added a row
    assert (theirs / ".git/worktrees/side/rebase-merge").is_dir()

    code, out, err = cli("plan", str(side), "-p", "PROJ")
    assert code == 0, out + err
    assert f"note: a `git rebase` is unfinished in the repository of {side}" in out
    assert "then `git rebase --continue`; or `git rebase --abort` to go back" in out
    code, out, err = cli("check", str(side))
    assert f"note: a `git rebase` is unfinished in the repository of {side}" in out, out + err
    lock = (side / ".xnat2bids.lock").read_bytes()
    code, out, err = cli("apply", str(side), "-p", "PROJ", "--yes")
    assert code == 1 and f"error: a `git rebase` is unfinished in the repository of {side}; nothing was exported" in err
    assert (side / ".xnat2bids.lock").read_bytes() == lock
    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert code == 0 and "is unfinished in the repository" not in out, out + err


def test_an_unfinished_cherry_pick_is_noted_and_refused_as_a_merge_is(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12")], series=SMALL[:1])
    ours, theirs = two_clones(cli, tmp_path)
    each_applied_one(cli, ours, theirs)
    assert git(theirs, "fetch", "-q", "origin").returncode == 0
    assert git(theirs, "cherry-pick", "origin/main").returncode != 0  # participants.tsv: both added a row
    code, out, err = cli("plan", str(theirs), "-p", "PROJ")
    assert code == 0 and f"note: a `git cherry-pick` is unfinished in the repository of {theirs}" in out, out + err
    code, out, err = cli("apply", str(theirs), "-p", "PROJ", "--yes")
    assert code == 1 and f"error: a `git cherry-pick` is unfinished in the repository of {theirs}" in err, out + err


def test_a_root_its_group_shares_gets_what_apply_creates_group_writable_whatever_the_umask(emulator, tmp_path):
    # A lab's shared folder (chmod 2775, setgid): a member with umask 022 must not leave folders the
    # next member's apply cannot write (logs, trash, a session), as git's sharedRepository=group.
    import stat

    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    for setgid, shared in ((0o2000, True), (0, False)):
        root = tmp_path / f"bids-{setgid:o}"
        root.mkdir()
        root.chmod(0o775 | setgid)
        _apply_with_umask_022(emulator, root)
        made = [p for p in root.rglob("*") if not p.is_symlink()]
        assert any(p.parts[-1] == "logs" for p in made) and any(p.name.endswith(".nii.gz") for p in made)
        # (heudiconv leaves the images read-only for everyone, the owner too: replaced by rename)
        closed = [p.relative_to(root).as_posix() for p in made
                  if p.stat().st_mode & stat.S_IWUSR and not p.stat().st_mode & stat.S_IWGRP]
        if shared:
            assert closed == [], closed
        else:  # no group folder: the member's umask decides, as ever
            assert "sub-01" in closed and ".xnat2bids/logs" in closed


def _apply_with_umask_022(emulator, root: Path) -> None:
    """`apply` by a group member whose umask is 022, in a process of its own (the umask is the process's)."""
    env = {**os.environ, "XNAT_HOST": emulator.url, "XNAT_USER": emulator.user, "XNAT_PASS": emulator.password}
    done = subprocess.run([sys.executable, "-m", "reconcile", "apply", str(root), "-p", "PROJ", "--yes"],
                          env=env, cwd=root.parent, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_root_its_group_shares_gets_the_files_apply_rewrites_group_writable_whatever_their_mode(emulator, tmp_path):
    # Files an older version left 0644 (or a member's umask made so) are rewritten by the next
    # member's apply: in a group's root they end up group-writable too, or the other members could
    # no longer edit participants.tsv, nor append their entries to the history.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    rewritten = ("participants.tsv", "sub-01/sub-01_sessions.tsv", "dataset_description.json", ".xnat2bids.lock",
                 ".xnat2bids/history.jsonl")
    roots = {}
    for setgid, shared in ((0o2000, True), (0, False)):
        root = roots[shared] = tmp_path / f"bids-{setgid:o}"
        root.mkdir()
        root.chmod(0o775 | setgid)
        _apply_with_umask_022(emulator, root)
        description = json.loads((root / "dataset_description.json").read_text())
        del description["GeneratedBy"]  # for apply to put back
        (root / "dataset_description.json").write_text(json.dumps(description))
        for name in rewritten:
            (root / name).chmod(0o644)
    add(emulator.archive, [("01", "01_MR2", "2024-02-10"), ("02", "02_MR1", "2024-02-11")], series=SMALL[:1])
    for shared, root in roots.items():
        before = {name: (root / name).read_bytes() for name in rewritten}
        _apply_with_umask_022(emulator, root)
        assert [name for name in rewritten if (root / name).read_bytes() == before[name]] == []
        modes = {name: oct((root / name).stat().st_mode & 0o7777) for name in rewritten}
        # Group write added, nothing else: not writable by others.
        assert modes == dict.fromkeys(rewritten, oct(0o664 if shared else 0o644))


def test_a_history_the_member_may_not_chmod_is_still_appended_to(tmp_path, monkeypatch):
    # Only its owner may chmod a file (another member's, or a file system that refuses): opening it
    # to the group is best effort, and the entry is written all the same.
    from reconcile import durable
    from reconcile.apply import append_lock_change, read_history

    def refused(fd: int, mode: int) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    root = tmp_path / "bids"
    (root / ".xnat2bids").mkdir(parents=True)
    history = root / ".xnat2bids/history.jsonl"
    history.touch(mode=0o644)
    monkeypatch.setattr(durable, "_group_shares", True)
    monkeypatch.setattr(os, "fchmod", refused)
    append_lock_change(root, "forget", (1, 2), [], action="forget", reason="asked", dropped=True)
    assert [e["operation"] for e in read_history(root)] == ["forget"]
    assert history.stat().st_mode & 0o777 == 0o644


def test_a_dataset_its_group_does_not_share_gets_the_members_own_umask_back(tmp_path):
    # pi-study walks the studies in one process: a private study after a shared one must not get
    # the umask widened for the group's.
    from reconcile.workarea import share_with_group

    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    shared.chmod(0o2775)
    private.mkdir()
    private.chmod(0o755)
    before = os.umask(0o022)
    try:
        share_with_group(shared)
        assert os.umask(0o002) == 0o002  # widened for the group (read back, then set as it was)
        share_with_group(private)
        assert os.umask(0o022) == 0o022  # the member's own again
        share_with_group(shared)
        share_with_group(shared)  # twice: still the group's, from the member's own
        assert os.umask(0o002) == 0o002
    finally:
        os.umask(before)


def test_an_empty_kept_dicom_folder_an_old_export_left_makes_way_without_a_warning(cli, emulator, tmp_path):
    # Moving over: the old script's sourcedata/…/dicom, its files moved away, is no one's DICOM.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    left = root / "sourcedata/sub-01/ses-01MR1/dicom"
    (left / "1" / "deeper").mkdir(parents=True)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")
    assert code == 0, out + err
    assert "held DICOM not marked" not in out + err and not (root / ".xnat2bids/replaced").exists()
    assert (left / ".xnat2bids-experiment").is_file() and list((left / "1").glob("*.dcm"))
    assert not (left / "1" / "deeper").exists()
