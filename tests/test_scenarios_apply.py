"""What `apply` does in the situations of plan-scenarios.md that the planner tests cannot show:
the emulator over HTTP, real heudiconv/dcm2niix, the BIDS root on disk and the lock.

One or two small sessions each (a T1w, sometimes a BOLD run): about a second of conversion per
session. Marked slow; CI runs them.
"""

from __future__ import annotations

import gzip
import math
import struct
from dataclasses import replace

import pytest
from worlds import SMALL, add

from reconcile.emulator.dicomgen import session_scans
from reconcile.lock import lock_path, read_lock, write_lock
from reconcile.observe import tool_versions

pytestmark = pytest.mark.slow

T1W = SMALL[:1]
T1W_FILE = "anat/sub-{s}_ses-{ses}_acq-memprage_T1w.nii.gz"


def files_under(root, top: str = "") -> list[str]:
    """Every file below root (or root/top), as relative paths."""
    base = root / top if top else root
    return sorted(p.relative_to(root).as_posix() for p in base.rglob("*") if p.is_file()) if base.exists() else []


def slices_in(path) -> int:
    """How many T1W slices a converted volume holds, from its (gzipped) NIfTI-1 header."""
    with gzip.open(path) as fh:
        header = fh.read(56)
    dim = struct.unpack("<8h", header[40:56])  # dim[0] is the number of dimensions that follow
    return math.prod(dim[1:1 + dim[0]]) // T1W[0].matrix ** 2


# -- rows 17 and 18: refused sessions do not stop the good ones ---------------------------------

REFUSED = {
    # row 18: a label that is unsafe as a path
    "unsafe label": ([("02", "../evil", "2024-01-10")], "session label '../evil' contains a path separator"),
    # row 17: two XNAT sessions that map to one BIDS address
    "two sessions at one address": ([("03", "03_MR1", "2024-01-10"), ("03", "03-MR1", "2024-01-11")],
                                    "both map to sub-03/ses-03MR1"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_apply_converts_the_good_session_and_refuses_only_the_bad_ones(cli, emulator, tmp_path, case):
    refused_sessions, message = REFUSED[case]
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), *refused_sessions], series=T1W)
    good = exps.pop("01_MR1")
    root = tmp_path / "bids"

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1, out + err  # the refusals make the run an error...
    assert message in out and all(e.id in out for e in exps.values())
    assert "Apply complete: 1 done, 0 failed, 0 skipped; lock serial 1; took " in out
    assert " s. Left as they are: 1 session error (see the plan's errors and notes)." in out  # ...yet the good one is done, and the summary says what was left

    lock = read_lock(root)
    assert list(lock.sessions) == [good.id]
    t1w = root / "sub-01/ses-01MR1" / T1W_FILE.format(s="01", ses="01MR1")
    assert t1w.stat().st_size > 0
    assert t1w.relative_to(root).as_posix() in {o.path for o in lock.sessions[good.id].outputs}
    assert cli("check", str(root), "--full")[0] == 0

    # Nothing is written for a refused session: no folder, no log, no staging, no participant.
    assert [p.name for p in root.glob("sub-*")] == ["sub-01"]
    assert not list(tmp_path.rglob("evil*"))
    for refused in exps.values():
        assert not (root / ".xnat2bids/logs" / f"{refused.id}.log").exists()
        assert not (root / ".xnat2bids/staging" / refused.id).exists()
    assert (root / "participants.tsv").read_text().splitlines() == ["participant_id", "sub-01"]


# -- rows 4 and 5: files and scans added without a re-save, seen and applied with --deep ---------

def test_files_and_scans_added_without_resave_are_reconverted_by_apply_deep(cli, emulator, tmp_path):
    t1w, bold = session_scans("01", "01_MR1", series=SMALL, study_date="20240110")
    last = max(t1w.files, key=lambda name: int(name.split(".")[0]))
    exp = emulator.archive.add_session("PROJ", "01", "01_MR1", date="2024-01-10")
    emulator.archive.add_scan(exp.id, "1", type=t1w.series_description, series_description=t1w.series_description,
                              files={n: data for n, data in t1w.files.items() if n != last})  # one slice short
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    t1w_nifti = root / "sub-01/ses-01MR1" / T1W_FILE.format(s="01", ses="01MR1")
    assert slices_in(t1w_nifti) == len(t1w.files) - 1
    assert [(s.id, s.file_count) for s in read_lock(root).sessions[exp.id].scans] == [("1", len(t1w.files) - 1)]

    # Row 4: the missing slice is uploaded into the scan's resource; row 5: a scan is added.
    # Neither re-saves the session, so its last_modified stays put.
    emulator.archive.upload_file(exp.id, "1", "DICOM", last, t1w.files[last])
    emulator.archive.add_scan(exp.id, "2", type=bold.series_description, series_description=bold.series_description,
                              files=bold.files)
    lock_before = lock_path(root).read_bytes()

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0, out  # plain plan cannot see it...
    assert "No changes. 1 session up to date." in out
    assert ("note: plain plan compares XNAT's session dates only; files added to a session without re-saving it "
            "are found with --deep") in out  # ...and says so
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out
    assert lock_path(root).read_bytes() == lock_before

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--deep")
    assert code == 0, out + err
    assert "scan 1: 1 file added" in out and "scan 2 added" in out
    lock = read_lock(root)
    assert lock.serial == 2
    assert [(s.id, s.file_count) for s in lock.sessions[exp.id].scans] == [("1", len(t1w.files)),
                                                                            ("2", len(bold.files))]
    assert slices_in(t1w_nifti) == len(t1w.files)  # converted again, with the new slice
    bold_nifti = root / "sub-01/ses-01MR1/func/sub-01_ses-01MR1_task-rest_bold.nii.gz"
    assert bold_nifti.relative_to(root).as_posix() in {o.path for o in lock.sessions[exp.id].outputs}
    assert cli("check", str(root), "--full")[0] == 0

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode", "--deep")
    assert code == 0 and "No changes. 1 session up to date." in out, out


# -- row 16: a newer converter re-converts only when asked -----------------------------------------

def test_sessions_converted_with_older_tools_are_reconverted_only_with_reconvert_outdated(cli, emulator, tmp_path):
    exp = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=T1W)["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    current = tool_versions()["heudiconv"]
    lock = read_lock(root)
    recorded = lock.sessions[exp.id]
    assert recorded.tools["heudiconv"] == current
    write_lock(root, lock.with_session(replace(recorded, tools={**recorded.tools, "heudiconv": "0.9.0"})))
    older = lock_path(root).read_bytes()
    serial = read_lock(root).serial

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0, out
    assert "No changes. 1 session up to date." in out
    assert "note: 1 session converted with older tools; use --reconvert-outdated to convert it again" in out
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out
    assert lock_path(root).read_bytes() == older  # not without being asked

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode", "--reconvert-outdated")
    assert code == 2, out
    assert f"~ update  sub-01/ses-01MR1  PROJ/{exp.id}  converted with heudiconv 0.9.0, now {current}" in out

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--reconvert-outdated")
    assert code == 0, out + err
    assert "1 done, 0 failed" in out
    after = read_lock(root)
    assert after.serial == serial + 1
    assert after.sessions[exp.id].tools["heudiconv"] == current
    assert after.sessions[exp.id].exported_at != recorded.exported_at
    assert cli("check", str(root), "--full")[0] == 0
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "older tools" not in out, out


# -- row 7: a subject renamed in XNAT --------------------------------------------------------------

def test_renamed_subject_moves_its_sessions_to_the_new_subject_folder(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("01", "01_MR2", "2024-03-02")], series=T1W)
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    before = read_lock(root)
    assert (root / "sub-01/sub-01_sessions.tsv").is_file()

    participants = root / "participants.tsv"
    participants.write_text("participant_id\tage\tgroup\nsub-01\t34\tpatient\n")  # the lab's own columns
    emulator.archive.rename_subject(exps["01_MR1"].subject_id, "P01")
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2, out
    assert out.count("renamed sub-01 → sub-P01") == 2
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert "2 done, 0 failed" in out

    after = read_lock(root)
    assert after.serial == before.serial + 2
    for label, ses in (("01_MR1", "01MR1"), ("01_MR2", "01MR2")):
        rec = after.sessions[exps[label].id]
        assert (rec.bids_subject, rec.bids_session, rec.subject_label) == ("P01", ses, "P01")
        assert all(o.path.startswith(f"sub-P01/ses-{ses}/") and (root / o.path).is_file() for o in rec.outputs)
        assert (root / f"sub-P01/ses-{ses}" / T1W_FILE.format(s="P01", ses=ses)).stat().st_size > 0
    assert files_under(root, "sub-01") == []  # the old outputs and the old sessions.tsv are gone
    assert not (root / "sub-01").exists()  # and the folder they left empty

    rows = (root / "sub-P01/sub-P01_sessions.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    by_session = {r.split("\t")[0]: dict(zip(header, r.split("\t"))) for r in rows[1:]}
    assert sorted(by_session) == ["ses-01MR1", "ses-01MR2"]
    assert {s: row["xnat_experiment_id"] for s, row in by_session.items()} == {
        "ses-01MR1": exps["01_MR1"].id, "ses-01MR2": exps["01_MR2"].id}
    # The renamed subject's row keeps the lab's values, and no row names a subject that is gone.
    assert participants.read_text() == "participant_id\tage\tgroup\nsub-P01\t34\tpatient\n"

    code, out, _ = cli("check", str(root), "--full")
    assert code == 0, out
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "No changes. 2 sessions up to date." in out, out
