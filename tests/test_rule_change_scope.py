"""Row 15 end to end: apply records the scans include/skip left out and the name bidsmap gave each
scan, so that a later change of those rules updates only the sessions whose conversion it changes
(a lab adding a skip pattern should not re-export every session of the dataset)."""

from __future__ import annotations

import io
import json

import pydicom
from worlds import SMALL, add, write_config

from reconcile.emulator.dicomgen import DEFAULT_SERIES
from reconcile.lock import FORMAT_VERSION, read_lock
from reconcile.workarea import WorkArea

LOCALIZER = DEFAULT_SERIES[0]
RULES = '[conversion]\nskip = ["*localizer*"]\nbidsmap = { "anat-T1w_acq-memprage" = "anat-T1w_acq-mp" }'


def _plan(cli, root, config) -> tuple[int, dict]:
    code, out, err = cli("plan", str(root), "-p", "PROJ", "-c", str(config), "--json", "--detailed-exitcode")
    assert code in (0, 2), out + err
    return code, json.loads(out)


def _reasons(doc: dict) -> dict[str, list[str]]:
    return {c["experiment_id"]: [r["message"] for r in c["reasons"]] for c in doc["changes"]}


def test_a_rule_change_updates_only_the_sessions_whose_scans_it_concerns(cli, emulator, tmp_path):
    assert LOCALIZER.description == "anat-scout_acq-localizer"
    plain = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    scouted = add(emulator.archive, [("02", "02_MR1", "2024-01-10")], series=(LOCALIZER, *SMALL))["02_MR1"]
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(write_config(tmp_path, RULES)))
    assert code == 0, out + err

    lock = read_lock(root)
    assert lock.format_version == FORMAT_VERSION
    one, two = lock.sessions[plain.id], lock.sessions[scouted.id]
    assert one.unselected_scans == ()
    assert [(s.id, s.series_description) for s in two.unselected_scans] == [("1", "anat-scout_acq-localizer")]
    assert [(s.series_description, s.bidsmap_target) for s in two.scans] == [
        ("anat-T1w_acq-memprage", "anat-T1w_acq-mp"), ("func-bold_task-rest", None)]
    assert (root / "sub-01/ses-01MR1/anat/sub-01_ses-01MR1_acq-mp_T1w.nii.gz").is_file()
    text = (root / ".xnat2bids.lock").read_text()
    assert 'bidsmap_target = "anat-T1w_acq-mp"' in text and "anat-scout_acq-localizer" in text

    # Patterns for series neither session has: nothing to convert again.
    unused = ('[conversion]\nskip = ["*localizer*", "dwi_*"]\n'
              'bidsmap = { "anat-T1w_acq-memprage" = "anat-T1w_acq-mp", "fmap_*" = "fmap_acq-x" }')
    code, doc = _plan(cli, root, write_config(tmp_path, unused))
    assert (code, doc["changes"]) == (0, []), doc

    # Without the skip, only the session with a localizer converts anything new.
    code, doc = _plan(cli, root, write_config(tmp_path, RULES.replace('skip = ["*localizer*"]', "skip = []")))
    assert code == 2
    assert _reasons(doc) == {scouted.id: ["config changed: skip (scan 1 (anat-scout_acq-localizer) now selected)"]}

    # A new name for a series both have: both, each saying what changes.
    code, doc = _plan(cli, root, write_config(tmp_path, RULES.replace('"anat-T1w_acq-mp"', '"anat-T1w_acq-mprage"')))
    effect = "config changed: bidsmap (scan {} (anat-T1w_acq-memprage) named anat-T1w_acq-mp → anat-T1w_acq-mprage)"
    assert _reasons(doc) == {plain.id: [effect.format(1)], scouted.id: [effect.format(2)]}

    # Rules by scan ID are judged by ID: scan 1 is the T1w in 01 and the localizer in 02. Applying
    # converts 01 again, records its new selection, and leaves 02 as it was.
    by_id = write_config(tmp_path, RULES.replace('"*localizer*"', '"1"'))
    code, doc = _plan(cli, root, by_id)
    assert _reasons(doc) == {plain.id: ["config changed: skip (scan 1 (anat-T1w_acq-memprage) left out)"]}
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(by_id))
    assert code == 0, out + err
    after = read_lock(root)
    assert after.sessions[scouted.id] == two
    assert [s.id for s in after.sessions[plain.id].scans] == ["2"]
    assert [s.series_description for s in after.sessions[plain.id].unselected_scans] == ["anat-T1w_acq-memprage"]
    assert not (root / "sub-01/ses-01MR1/anat").exists()
    code, doc = _plan(cli, root, by_id)
    assert (code, doc["changes"]) == (0, [])


def _files(root) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.glob("sub-*/ses-*/*/*.nii.gz"))


def _exported_skipping_func(cli, emulator, tmp_path, *, xnat_description: str):
    """A session whose BOLD (scan 2) XNAT lists as `xnat_description`, exported with its DICOM's
    description skipped (`func-*`): the conversion selects by the DICOM. (session, root, output)."""
    e = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    emulator.archive.get_scan(e.id, "2").series_description = xnat_description
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c",
                         str(write_config(tmp_path, '[conversion]\nskip = ["func-*"]')))
    assert code == 0, out + err
    assert not any("/func/" in f for f in _files(root))  # the conversion skipped it by its DICOM description
    return e, root, out


def test_a_session_whose_xnat_descriptions_are_not_what_the_conversion_matched_takes_any_rule_change(
        cli, emulator, tmp_path):
    # XNAT lists the BOLD without a description; its DICOM has one, which the conversion selects by.
    e, root, _ = _exported_skipping_func(cli, emulator, tmp_path, xnat_description="")
    assert read_lock(root).sessions[e.id].unselected_scans is None  # so plan cannot judge on XNAT's
    code, doc = _plan(cli, root, write_config(tmp_path, ""))
    assert (code, _reasons(doc)) == (2, {e.id: ["config changed: skip"]})
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(write_config(tmp_path, "")))
    assert code == 0, out + err
    assert any("/func/" in f for f in _files(root))


def test_a_scan_xnat_selects_but_its_dicom_description_leaves_out_is_a_warning(cli, emulator, tmp_path):
    # XNAT's description was edited after the upload; the DICOM still says what the skip matches.
    e, root, out = _exported_skipping_func(cli, emulator, tmp_path, xnat_description="resting state")
    assert ('warning: scan 2: XNAT lists it as "resting state" but its DICOM says "func-bold_task-rest", which '
            "[conversion] include/skip leave out: it was downloaded but not converted") in out
    assert 'XNAT lists it as "resting state"' in WorkArea(root).log(e.id).read_text()
    rec = read_lock(root).sessions[e.id]
    assert [s.id for s in rec.scans] == ["1", "2"]  # both exported
    assert rec.unselected_scans is None  # a rule change is judged on no description: any counts


def _set_protocol_name(archive, exp_id: str, scan_id: str, protocol: str) -> None:
    resource = archive.get_scan(exp_id, scan_id).resources["DICOM"]
    for path, entry in list(resource.files.items()):
        ds = pydicom.dcmread(io.BytesIO(entry.read()))
        ds.ProtocolName = protocol
        buffer = io.BytesIO()
        ds.save_as(buffer)
        archive.upload_file(exp_id, scan_id, "DICOM", path, buffer.getvalue())


def test_a_bidsmap_entry_for_a_protocol_name_is_recorded_and_judged(cli, emulator, tmp_path):
    # Philips and GE name series by protocol: the conversion renames by SeriesDescription, else by
    # ProtocolName, and so must plan.
    e = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    _set_protocol_name(emulator.archive, e.id, "1", "t1_mprage_proto")
    root = tmp_path / "bids"
    mapped = write_config(tmp_path, '[conversion]\nbidsmap = { "t1_mprage_proto" = "anat-T1w_acq-proto" }')
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(mapped))
    assert code == 0, out + err
    assert "sub-01/ses-01MR1/anat/sub-01_ses-01MR1_acq-proto_T1w.nii.gz" in _files(root)
    rec = read_lock(root).sessions[e.id]
    assert [(s.id, s.bidsmap_target, s.protocol_name) for s in rec.scans] == [
        ("1", "anat-T1w_acq-proto", "t1_mprage_proto"), ("2", None, None)]
    assert rec.unselected_scans == ()

    code, doc = _plan(cli, root, write_config(tmp_path, ""))
    assert _reasons(doc) == {e.id: [
        "config changed: bidsmap (scan 1 (anat-T1w_acq-memprage) no longer named anat-T1w_acq-proto)"]}
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(write_config(tmp_path, "")))
    assert code == 0, out + err
    assert "sub-01/ses-01MR1/anat/sub-01_ses-01MR1_acq-memprage_T1w.nii.gz" in _files(root)


def test_a_scan_folder_holding_two_series_is_not_judged_on_its_first_alone(cli, emulator, tmp_path):
    # The BOLD's files were archived into scan 1 too (a scan XNAT did not split by series): the
    # conversion names both of scan 1's series, so a bidsmap entry for the second one concerns it.
    e = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    for path, entry in list(emulator.archive.get_scan(e.id, "2").resources["DICOM"].files.items()):
        emulator.archive.upload_file(e.id, "1", "DICOM", f"zz_{path}", entry.read())
    root = tmp_path / "bids"
    only_scan_1 = '[conversion]\nskip = ["2"]'
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(write_config(tmp_path, only_scan_1)))
    assert code == 0, out + err
    assert "sub-01/ses-01MR1/func/sub-01_ses-01MR1_task-rest_bold.nii.gz" in _files(root)
    assert read_lock(root).sessions[e.id].unselected_scans is None

    renamed = write_config(tmp_path, only_scan_1 + '\nbidsmap = { "func-bold_task-rest" = "func-bold_task-other" }')
    code, doc = _plan(cli, root, renamed)
    assert (code, _reasons(doc)) == (2, {e.id: ["config changed: bidsmap"]})
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(renamed))
    assert code == 0, out + err
    assert "sub-01/ses-01MR1/func/sub-01_ses-01MR1_task-other_bold.nii.gz" in _files(root)


def test_a_protocol_name_heudiconv_reads_from_the_siemens_header_is_judged(cli, emulator, tmp_path):
    e = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL)["01_MR1"]
    resource = emulator.archive.get_scan(e.id, "1").resources["DICOM"]
    for path, entry in list(resource.files.items()):
        ds = pydicom.dcmread(io.BytesIO(entry.read()))
        del ds.ProtocolName  # heudiconv then takes tProtocolName from the CSA series header
        buffer = io.BytesIO()
        ds.save_as(buffer)
        emulator.archive.upload_file(e.id, "1", "DICOM", path, buffer.getvalue())
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(write_config(tmp_path, RULES)))
    assert code == 0, out + err
    rec = read_lock(root).sessions[e.id]
    assert rec.unselected_scans == () and rec.scans[0].bidsmap_target == "anat-T1w_acq-mp"
    code, doc = _plan(cli, root, write_config(tmp_path, RULES.replace('"anat-T1w_acq-mp"', '"anat-T1w_acq-x"')))
    assert _reasons(doc) == {e.id: [
        "config changed: bidsmap (scan 1 (anat-T1w_acq-memprage) named anat-T1w_acq-mp → anat-T1w_acq-x)"]}
