"""The synthetic DICOM generator: deterministic, well-formed, and convertible to valid BIDS."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID

from reconcile.emulator.dicomgen import (
    DEFAULT_SERIES,
    SeriesSpec,
    SyntheticScan,
    session_scans,
    write_session,
)


def _read(data: bytes) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(data))


def _all_files(scans: list[SyntheticScan]) -> list[pydicom.Dataset]:
    return [_read(data) for scan in scans for data in scan.files.values()]


# --------------------------------------------------------------------------------------
# unit


@pytest.fixture(scope="module")
def default_scans() -> list[SyntheticScan]:
    return session_scans("01", "01")


@pytest.fixture(scope="module")
def default_datasets(default_scans: list[SyntheticScan]) -> list[pydicom.Dataset]:
    return _all_files(default_scans)


def test_same_arguments_give_byte_identical_sessions(default_scans: list[SyntheticScan]) -> None:
    assert session_scans("01", "01") == default_scans


@pytest.mark.parametrize(
    "other",
    [
        {"subject": "02", "session": "01"},
        {"subject": "01", "session": "02"},
        {"subject": "01", "session": "01", "seed": 1},
    ],
)
def test_any_changed_identity_changes_every_uid(other: dict, default_datasets: list[pydicom.Dataset]) -> None:
    base = default_datasets
    subject, session = other.pop("subject"), other.pop("session")
    changed = _all_files(session_scans(subject, session, **other))
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert not {ds[attr].value for ds in base} & {ds[attr].value for ds in changed}, attr


def test_uids_are_valid_and_scoped_to_study_series_and_file(
    default_scans: list[SyntheticScan], default_datasets: list[pydicom.Dataset]
) -> None:
    scans, datasets = default_scans, default_datasets
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    series_uids = []
    for scan in scans:
        per_scan = {_read(data).SeriesInstanceUID for data in scan.files.values()}
        assert len(per_scan) == 1
        series_uids += per_scan
    assert len(set(series_uids)) == len(scans)
    for ds in datasets:
        for uid in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID):
            assert UID(uid).is_valid, uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID


def test_default_session_has_the_reproin_series_in_scan_order(default_scans: list[SyntheticScan]) -> None:
    scans = default_scans
    assert [(s.scan_id, s.series_description) for s in scans] == [
        ("1", "anat-scout_acq-localizer"),
        ("2", "anat-T1w_acq-memprage"),
        ("3", "func-bold_task-rest"),
        ("4", "func-bold_task-checks_run+"),
        ("5", "func-bold_task-checks_run+"),
        ("6", "fmap_acq-boldGRE"),
        ("7", "fmap_acq-boldGRE"),
        ("8", "dwi_acq-b1500_dir-ap"),
    ]
    assert len(scans) == len(DEFAULT_SERIES)


def test_files_carry_patient_study_and_series_identity() -> None:
    scans = session_scans("sub7", "visit2", study_date="20231231")
    for scan in scans:
        for relpath, data in scan.files.items():
            ds = _read(data)
            assert relpath.endswith(".dcm")
            assert str(ds.PatientName) == ds.PatientID == "sub7"
            assert ds.StudyDate == ds.SeriesDate == "20231231"
            assert ds.Manufacturer == "SIEMENS"
            assert ds.Modality == "MR"
            assert str(ds.SeriesNumber) == scan.scan_id
            assert ds.SeriesDescription == ds.ProtocolName == scan.series_description
            assert ds.StudyDescription
            assert ds.pixel_array.shape == (16, 16)


def test_series_times_increase_through_the_session(default_scans: list[SyntheticScan]) -> None:
    times = [_read(next(iter(scan.files.values()))).SeriesTime for scan in default_scans]
    assert times == sorted(times)
    assert len(set(times)) == len(times)


def test_field_map_has_two_magnitude_echoes_then_one_phase_series(default_scans: list[SyntheticScan]) -> None:
    scans = {s.scan_id: s for s in default_scans}
    magnitude = [_read(d) for d in scans["6"].files.values()]
    phase = [_read(d) for d in scans["7"].files.values()]
    assert {ds.ImageType[2] for ds in magnitude} == {"M"}
    assert {ds.ImageType[2] for ds in phase} == {"P"}
    assert {(int(ds.EchoNumbers), float(ds.EchoTime)) for ds in magnitude} == {(1, 4.92), (2, 7.38)}
    assert {float(ds.EchoTime) for ds in phase} == {7.38}


def test_dwi_carries_b_values_and_directions(default_scans: list[SyntheticScan]) -> None:
    dwi = next(s for s in default_scans if s.series_description.startswith("dwi"))
    by_volume: dict[int, set[int]] = {}
    for data in dwi.files.values():
        ds = _read(data)
        block = ds.private_block(0x0019, "SIEMENS MR HEADER")
        by_volume.setdefault(int(ds.AcquisitionNumber), set()).add(int(block[0x0C].value))
        if int(block[0x0C].value):
            assert len(block[0x0E].value) == 3
    assert by_volume == {1: {0}, 2: {1500}, 3: {1500}, 4: {1500}}


def test_csa_headers_parse_and_pad_valued_elements_to_six_items(default_scans: list[SyntheticScan]) -> None:
    csareader = pytest.importorskip("nibabel.nicom.csareader")
    for scan in default_scans:
        ds = _read(next(iter(scan.files.values())))
        series = csareader.get_csa_header(ds, "series")
        image = csareader.get_csa_header(ds, "image")
        for header in (series, image):
            for name, tag in header["tags"].items():
                assert tag["n_items"] == 0 or tag["n_items"] >= 6, name
        protocol = series["tags"]["MrPhoenixProtocol"]["items"][0]
        assert "### ASCCONV BEGIN" in protocol and "### ASCCONV END ###" in protocol
        offset_x = next(line for line in protocol.splitlines() if "asGPAData[0].lOffsetX" in line)
        assert int(offset_x.split("=")[1]) != 0


def test_mosaic_tag_is_absent_from_non_mosaic_images(default_datasets: list[pydicom.Dataset]) -> None:
    for ds in default_datasets:
        assert "MOSAIC" not in ds.ImageType
        assert (0x0019, 0x1029) not in ds


def test_custom_series_list_is_honoured() -> None:
    series = (SeriesSpec("anat-T2w", "anat", n_slices=2), SeriesSpec("func-bold_task-x", "func", n_volumes=2))
    scans = session_scans("01", "01", series=series)
    assert [len(s.files) for s in scans] == [2, 8]


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        SeriesSpec("anat-T1w", "pet")


def test_write_session_lays_out_scan_folders(tmp_path: Path) -> None:
    scans = write_session(tmp_path, "01", "01")
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    expected = sorted(f"{s.scan_id}/{rel}" for s in scans for rel in s.files)
    assert written == expected
    for scan in scans:
        for rel, data in scan.files.items():
            assert (tmp_path / scan.scan_id / rel).read_bytes() == data


def test_session_is_small() -> None:
    scans = session_scans("01", "01")
    assert sum(len(d) for s in scans for d in s.files.values()) < 1_000_000


# --------------------------------------------------------------------------------------
# end to end: real heudiconv + dcm2niix + BIDS validator


def _tool_env() -> dict[str, str]:
    # The dcm2niix console script lives next to the interpreter; heudiconv looks it up on PATH.
    env = dict(os.environ, NO_ET="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _tool(name: str, env: dict[str, str]) -> str:
    path = shutil.which(name, path=env["PATH"])
    if path is None:
        message = f"{name} is not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":  # CI installs every tool: missing there is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.mark.slow
def test_real_heudiconv_converts_sessions_to_a_valid_bids_dataset(tmp_path: Path) -> None:
    env = _tool_env()
    heudiconv = _tool("heudiconv", env)
    validator = _tool("bids-validator-deno", env)
    _tool("dcm2niix", env)
    out = tmp_path / "bids"
    sessions = [("01", "01", "20240110"), ("01", "02", "20240301"), ("02", "01", "20240112")]

    for subject, session, date in sessions:
        dicom_dir = tmp_path / "dicom" / subject / session
        write_session(dicom_dir, subject, session, study_date=date)
        result = subprocess.run(
            [heudiconv, "--files", str(dicom_dir), "-f", "reproin", "--bids", "-o", str(out),
             "-s", subject, "-ss", session, "-l", "", "--minmeta"],
            env=env, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    for subject, session, _ in sessions:
        ses = out / f"sub-{subject}" / f"ses-{session}"
        prefix = f"sub-{subject}_ses-{session}"
        expected = [
            f"anat/{prefix}_acq-memprage_T1w.nii.gz",
            f"func/{prefix}_task-rest_bold.nii.gz",
            f"func/{prefix}_task-checks_run-01_bold.nii.gz",
            f"func/{prefix}_task-checks_run-02_bold.nii.gz",
            f"fmap/{prefix}_acq-boldGRE_magnitude1.nii.gz",
            f"fmap/{prefix}_acq-boldGRE_magnitude2.nii.gz",
            f"fmap/{prefix}_acq-boldGRE_phasediff.nii.gz",
            f"dwi/{prefix}_acq-b1500_dir-ap_dwi.nii.gz",
            f"dwi/{prefix}_acq-b1500_dir-ap_dwi.bval",
            f"dwi/{prefix}_acq-b1500_dir-ap_dwi.bvec",
        ]
        missing = [rel for rel in expected if not (ses / rel).is_file()]
        assert not missing, sorted(p.relative_to(ses).as_posix() for p in ses.rglob("*"))
        phasediff = json.loads((ses / f"fmap/{prefix}_acq-boldGRE_phasediff.json").read_text())
        assert (phasediff["EchoTime1"], phasediff["EchoTime2"]) == (0.00492, 0.00738)
        assert f"ses-{session}/func/{prefix}_task-rest_bold.nii.gz" in phasediff["IntendedFor"]
        bvals = (ses / f"dwi/{prefix}_acq-b1500_dir-ap_dwi.bval").read_text().split()
        assert [float(b) for b in bvals] == [0, 1500, 1500, 1500]
        bold = json.loads((ses / f"func/{prefix}_task-rest_bold.json").read_text())
        assert bold["RepetitionTime"] == 2 and bold["PhaseEncodingDirection"] == "j-"
        # ReproIn keeps the localizer only as source DICOM.
        assert not list(ses.glob("anat/*scout*"))

    result = subprocess.run([validator, str(out), "--format", "json"], env=env,
                            capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    errors = [issue for issue in report["issues"]["issues"] if issue["severity"] == "error"]
    assert errors == [], json.dumps(errors, indent=1)[:4000]
    assert result.returncode == 0
