"""Converting one exported session with real heudiconv + dcm2niix into a staging BIDS dataset.

The slow tests run the real converters on synthetic Siemens DICOM from `emulator.dicomgen`
and finish with the BIDS validator on a dataset assembled the way apply assembles it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest

from reconcile import convert as convert_module
from reconcile import preload
from reconcile.config import ConversionSettings
from reconcile.convert import (
    ConversionResult,
    _Forked,
    _Spawned,
    bidsmap_target,
    convert_session,
    converter_env,
    nothing_selected,
)
from reconcile.dataset import (
    ensure_bidsignore,
    ensure_dataset_description,
    ensure_participant,
    update_sessions_tsv,
)
from reconcile.emulator.dicomgen import (
    DEFAULT_SERIES,
    SeriesSpec,
    session_scans,
    write_session,
)
from reconcile.errors import ConversionError
from reconcile.model import BidsAddress

REPROIN = ConversionSettings()
A = BidsAddress("01", "a")
B = BidsAddress("02", "b")

EXPECTED_A = {
    "anat/sub-01_ses-a_acq-memprage_T1w.json",
    "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz",
    "func/sub-01_ses-a_task-rest_bold.json",
    "func/sub-01_ses-a_task-rest_bold.nii.gz",
    "func/sub-01_ses-a_task-rest_events.tsv",
    "func/sub-01_ses-a_task-checks_run-01_bold.json",
    "func/sub-01_ses-a_task-checks_run-01_bold.nii.gz",
    "func/sub-01_ses-a_task-checks_run-01_events.tsv",
    "func/sub-01_ses-a_task-checks_run-02_bold.json",
    "func/sub-01_ses-a_task-checks_run-02_bold.nii.gz",
    "func/sub-01_ses-a_task-checks_run-02_events.tsv",
    "fmap/sub-01_ses-a_acq-boldGRE_magnitude1.json",
    "fmap/sub-01_ses-a_acq-boldGRE_magnitude1.nii.gz",
    "fmap/sub-01_ses-a_acq-boldGRE_magnitude2.json",
    "fmap/sub-01_ses-a_acq-boldGRE_magnitude2.nii.gz",
    "fmap/sub-01_ses-a_acq-boldGRE_phasediff.json",
    "fmap/sub-01_ses-a_acq-boldGRE_phasediff.nii.gz",
    "dwi/sub-01_ses-a_acq-b1500_dir-ap_dwi.bval",
    "dwi/sub-01_ses-a_acq-b1500_dir-ap_dwi.bvec",
    "dwi/sub-01_ses-a_acq-b1500_dir-ap_dwi.json",
    "dwi/sub-01_ses-a_acq-b1500_dir-ap_dwi.nii.gz",
    "sub-01_ses-a_scans.tsv",
}

# A scanner not set up for ReproIn: the operator's own series names.
SITE_SERIES = (
    SeriesSpec("localizer", "scout", n_slices=3),
    SeriesSpec("MPRAGE", "anat", n_slices=8, voxel_mm=2.0),
    SeriesSpec("rest_fMRI", "func", n_volumes=4),
    SeriesSpec("checkerboard", "func", n_volumes=3),
    SeriesSpec("checkerboard", "func", n_volumes=3),
    SeriesSpec("gre_field_mapping", "fmap_mag", n_echoes=2),
    SeriesSpec("gre_field_mapping", "fmap_phase"),
    SeriesSpec("DTI_b1500_AP", "dwi", n_volumes=4),
)
SITE_BIDSMAP = ConversionSettings(bidsmap=(
    ("DTI_*", "dwi_acq-b1500_dir-ap"),
    ("MPRAGE", "anat-T1w"),
    ("checkerboard", "func-bold_task-checks_run+"),
    ("gre_field_mapping", "fmap_acq-boldGRE"),
    ("localizer", "anat-scout"),
    ("rest_*", "func-bold_task-rest"),
))
EXPECTED_B = {
    "anat/sub-02_ses-b_T1w.nii.gz",
    "func/sub-02_ses-b_task-rest_bold.nii.gz",
    "func/sub-02_ses-b_task-checks_run-01_bold.nii.gz",
    "func/sub-02_ses-b_task-checks_run-02_bold.nii.gz",
    "fmap/sub-02_ses-b_acq-boldGRE_magnitude1.nii.gz",
    "fmap/sub-02_ses-b_acq-boldGRE_magnitude2.nii.gz",
    "fmap/sub-02_ses-b_acq-boldGRE_phasediff.nii.gz",
    "dwi/sub-02_ses-b_acq-b1500_dir-ap_dwi.nii.gz",
    "dwi/sub-02_ses-b_acq-b1500_dir-ap_dwi.bval",
    "dwi/sub-02_ses-b_acq-b1500_dir-ap_dwi.bvec",
}

# The operator repeated the resting-state run under the same name (no `_run+`), and one series
# is named neither by ReproIn nor by a bidsmap.
REPEATED_SERIES = (
    SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),
    SeriesSpec("func-bold_task-rest", "func", n_volumes=3),
    SeriesSpec("func-bold_task-rest", "func", n_volumes=3),
)
UNNAMED_SERIES = (
    SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),
    SeriesSpec("T1 MPRAGE (sag) ü", "anat", n_slices=4),
)


def _convert(dicom: Path, where: Path, address: BidsAddress = A,
             settings: ConversionSettings = REPROIN, **kwargs: object) -> ConversionResult:
    return convert_session(dicom, where / "work", address, settings, log_path=where / "convert.log", **kwargs)  # type: ignore[arg-type]


def _rewrite(scan_folder: Path, **fields: object) -> None:
    """Set DICOM `fields` in every file of a generated scan, as a scanner would have written them."""
    for path in scan_folder.rglob("*"):
        if path.is_file():
            ds = pydicom.dcmread(path)
            for name, value in fields.items():
                setattr(ds, name, value)
            ds.save_as(path)


def _session_files(result: ConversionResult) -> set[str]:
    return {p.relative_to(result.session_dir).as_posix() for p in result.session_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def reproin_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("dicom-reproin")
    write_session(dest, "01", "a")
    return dest


@pytest.fixture(scope="module")
def site_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("dicom-site")
    write_session(dest, "02", "b", series=SITE_SERIES, study_date="20240205")
    return dest


@pytest.fixture(scope="module")
def converted(reproin_dicom: Path, tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    return _convert(reproin_dicom, tmp_path_factory.mktemp("convert-a"))


@pytest.fixture(scope="module")
def converted_site(site_dicom: Path, tmp_path_factory: pytest.TempPathFactory) -> ConversionResult:
    return _convert(site_dicom, tmp_path_factory.mktemp("convert-b"), B, SITE_BIDSMAP)


# --- without the converters -----------------------------------------------------------


def test_converter_env_puts_the_interpreters_bin_first_and_silences_the_version_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = str(Path(sys.executable).parent)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", bindir, "/bin"]))
    env = converter_env()
    assert env["PATH"].split(os.pathsep) == [bindir, "/usr/bin", "/bin"]
    assert env["NO_ET"] == "1"
    assert shutil.which("dcm2niix", path=env["PATH"]) is not None


def test_converter_env_holds_no_xnat_server_or_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # Other services' secrets too: heudiconv's /proc/PID/environ is readable wherever its user's are.
    secrets = ("XNAT_HOST", "XNAT_USER", "XNAT_PASS", "XNAT_TOKEN_FILE", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY",
               "DB_PASSWORD", "MY_CREDENTIALS")
    for name in secrets:
        monkeypatch.setenv(name, "value")
    monkeypatch.setenv("XNAT2BIDS_PRELOAD", "0")
    env = converter_env()
    assert not set(secrets) & set(env)
    assert env["XNAT2BIDS_PRELOAD"] == "0"


def test_bidsmap_exact_name_beats_globs() -> None:
    bidsmap = (("MPRAGE*", "anat-T2w"), ("MPRAGE", "anat-T1w"))
    assert bidsmap_target("MPRAGE", bidsmap) == "anat-T1w"
    assert bidsmap_target("MPRAGE_ND", bidsmap) == "anat-T2w"
    assert bidsmap_target("t2_spc", bidsmap) is None


def test_bidsmap_globs_that_disagree_are_an_error() -> None:
    bidsmap = (("*rest*", "func-bold_task-rest"), ("rest_*", "func-bold_task-rest"), ("*fMRI", "func-bold_task-x"))
    assert bidsmap_target("rest_run", bidsmap) == "func-bold_task-rest"
    with pytest.raises(ValueError, match="different names"):
        bidsmap_target("rest_fMRI", bidsmap)


def test_ambiguous_bidsmap_fails_before_heudiconv_runs(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "02", "b", series=SITE_SERIES[1:3])
    settings = ConversionSettings(bidsmap=(("*_fMRI", "func-bold_task-rest"), ("rest_*", "func-bold_task-other")))
    with pytest.raises(ConversionError, match="rest_fMRI") as info:
        _convert(tmp_path / "dicom", tmp_path, B, settings)
    assert "bidsmap" in (info.value.hint or "")
    assert not (tmp_path / "convert.log").exists()


def test_selecting_no_scan_is_an_error_that_names_the_selection_and_the_scans(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "02", "b", series=SITE_SERIES[1:3])
    settings = ConversionSettings(include=("DTI_*",), skip=("MPRAGE",))
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path, B, settings)
    error = info.value
    assert error.summary == "sub-02/ses-b: [conversion] include/skip select none of the session's 2 scans"
    assert "scan 1 'MPRAGE'" in (error.detail or "") and "scan 2 'rest_fMRI'" in (error.detail or "")
    assert "include = ['DTI_*']" in (error.detail or "") and "skip = ['MPRAGE']" in (error.detail or "")
    assert "[project.<project>.sessions.<session label>]" in (error.hint or "")
    assert "export left no DICOM" not in str(error)
    assert not (tmp_path / "convert.log").exists()


def test_nothing_selected_describes_the_sessions_scans_for_a_check_before_export() -> None:
    error = nothing_selected(A, [("1", "anat-T1w"), ("2", None), ("3", "func-bold_task-rest")],
                             ConversionSettings(skip=("anat-*", "func-*")))
    assert isinstance(error, ConversionError)
    assert error.summary == "sub-01/ses-a: [conversion] include/skip select none of the session's 3 scans"
    assert "scan 2 (no series description)" in (error.detail or "")
    assert "skip = ['anat-*', 'func-*']" in (error.detail or "")
    assert nothing_selected(A, [], ConversionSettings()).summary == "sub-01/ses-a: the session has no scans to convert"


def test_an_empty_export_is_an_error_naming_the_folder(tmp_path: Path) -> None:
    (tmp_path / "dicom").mkdir()
    with pytest.raises(ConversionError, match="no scans to convert") as info:
        _convert(tmp_path / "dicom", tmp_path, B)
    assert info.value.hint == "the export left no DICOM behind: the selected scans have no files on XNAT"


def test_missing_custom_heuristic_file_is_an_error(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "02", "b", series=SITE_SERIES[1:2])
    with pytest.raises(ConversionError, match="heuristic file"):
        _convert(tmp_path / "dicom", tmp_path, B, ConversionSettings(heuristic=str(tmp_path / "nope.py")))


# --- real heudiconv + dcm2niix --------------------------------------------------------


@pytest.mark.slow
def test_reproin_session_converts_to_the_expected_bids_files(converted: ConversionResult) -> None:
    assert converted.session_dir == converted.staging_root / "sub-01" / "ses-a"
    assert _session_files(converted) == EXPECTED_A
    # The scout is kept only as sourcedata by ReproIn, never in the session; and no series is
    # tarred into sourcedata at all (apply would throw the tarballs away).
    assert not any("scout" in p for p in converted.outputs)
    assert not list(converted.staging_root.rglob("*.dicom.tgz"))
    assert not list(converted.staging_root.rglob("sourcedata"))
    assert converted.log_path.is_file() and "PROCESSING DONE" in converted.log_path.read_text()
    assert converted.seconds > 0
    bvals = (converted.session_dir / "dwi" / "sub-01_ses-a_acq-b1500_dir-ap_dwi.bval").read_text().split()
    assert bvals == ["0", "1500", "1500", "1500"]
    # The gradient directions were read from the DICOM: a zero b0 column, then orthogonal unit vectors.
    bvec = (converted.session_dir / "dwi" / "sub-01_ses-a_acq-b1500_dir-ap_dwi.bvec").read_text().split("\n")
    columns = list(zip(*([float(v) for v in line.split()] for line in bvec if line.strip())))
    assert len(columns) == len(bvals) and all(len(c) == 3 for c in columns)
    assert columns[0] == (0.0, 0.0, 0.0)
    assert all(abs(sum(x * x for x in c) - 1) < 1e-3 for c in columns[1:])
    assert all(abs(sum(x * y for x, y in zip(a, b))) < 1e-3 for i, a in enumerate(columns[1:]) for b in columns[i + 2:])
    for sidecar in ("dwi/sub-01_ses-a_acq-b1500_dir-ap_dwi.json", "fmap/sub-01_ses-a_acq-boldGRE_phasediff.json"):
        assert json.loads((converted.session_dir / sidecar).read_text())["PhaseEncodingDirection"] == "j-", sidecar
    phasediff = json.loads((converted.session_dir / "fmap" / "sub-01_ses-a_acq-boldGRE_phasediff.json").read_text())
    assert phasediff["EchoTime1"] < phasediff["EchoTime2"]
    assert "ses-a/func/sub-01_ses-a_task-rest_bold.nii.gz" in phasediff["IntendedFor"]


@pytest.mark.slow
def test_field_maps_without_shim_settings_are_matched_by_imaging_volume(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A scanner that recorded no shim offsets (or de-identification that stripped them): dcm2niix
    writes no ShimSetting, and ReproIn's shim matching would fail the whole session."""
    from reconcile.emulator import dicomgen

    shimmed = dicomgen._session_shim
    monkeypatch.setattr(dicomgen, "_session_shim", lambda ctx: (0, 0, 0) + shimmed(ctx)[3:])
    dicom = tmp_path / "dicom"
    write_session(dicom, "01", "a")
    result = _convert(dicom, tmp_path)
    phasediff = json.loads((result.session_dir / "fmap" / "sub-01_ses-a_acq-boldGRE_phasediff.json").read_text())
    assert "ShimSetting" not in phasediff
    assert "ses-a/func/sub-01_ses-a_task-rest_bold.nii.gz" in phasediff["IntendedFor"]
    assert _session_files(result) == EXPECTED_A
    assert result.log_path.read_text().count("has no ShimSetting; field maps are matched by ImagingVolume only") == 1


@pytest.mark.slow
def test_a_session_the_scanner_split_into_two_studies_is_one_bids_session(tmp_path: Path) -> None:
    """One XNAT experiment can hold two StudyInstanceUIDs (a patient taken out and back in):
    heudiconv groups them all (`-g all`) into the one session."""
    parts = [(tmp_path / "p1", "a", DEFAULT_SERIES[1:3], 0), (tmp_path / "p2", "a-part2", DEFAULT_SERIES[7:8], 10)]
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    for where, session, series, offset in parts:
        write_session(where, "01", session, series=series)
        for folder in where.iterdir():
            folder.rename(dicom / str(int(folder.name) + offset))
    uids = {pydicom.dcmread(next(p.iterdir()), stop_before_pixels=True).StudyInstanceUID for p in dicom.iterdir()}
    assert len(uids) == 2
    result = _convert(dicom, tmp_path)
    assert {p.split("/")[1] for p in result.outputs} == {"ses-a"}
    assert any("/func/" in p for p in result.outputs) and any("/dwi/" in p for p in result.outputs)


@pytest.mark.slow
def test_heudiconv_as_a_plain_process_converts_the_same(reproin_dicom: Path, converted: ConversionResult,
                                                        tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Where the preloaded helper cannot run (XNAT2BIDS_PRELOAD=0, no fork), heudiconv is started
    as a process of its own, with the same result."""
    monkeypatch.setenv("XNAT2BIDS_PRELOAD", "0")
    started: list[list[str]] = []
    spawn = convert_module._start_process
    monkeypatch.setattr(convert_module, "_start_process", lambda command, *a: (started.append(command), spawn(command, *a))[1])
    again = _convert(reproin_dicom, tmp_path)
    assert len(started) == 1 and started[0][1:3] == ["-m", "heudiconv.cli.run"]
    assert again.outputs == converted.outputs


def test_the_dicom_only_note_names_scouts_only_when_nothing_else_is_converted(tmp_path: Path) -> None:
    import importlib.util

    wrapper = convert_module._write_wrapper(tmp_path, tmp_path / "bids", "reproin", {}, [])
    spec = importlib.util.spec_from_file_location("xnat2bids_wrapper_under_test", wrapper)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    note = tmp_path / convert_module.DICOM_ONLY_NAME
    scout, t1 = ("{bids_subject_session_dir}/anat/scout", ("dicom",), None), ("t1", ("nii.gz", "dicom"), None)
    assert module._without_dicom({scout: ["1"], t1: ["2"]}) == {scout[:1] + ((),) + scout[2:]: ["1"],
                                                              ("t1", ("nii.gz",), None): ["2"]}
    assert note.read_text() == ""  # the T1 was meant to convert: not the scouts' doing if it did not
    module._without_dicom({scout: ["1"]})
    assert note.read_text() == "{bids_subject_session_dir}/anat/scout\n"


@pytest.mark.slow
def test_a_session_of_scouts_only_says_the_heuristic_keeps_them_as_dicom(tmp_path: Path) -> None:
    dicom = tmp_path / "dicom"
    write_session(dicom, "01", "a", series=(SeriesSpec("anat-scout_acq-localizer", "scout", n_slices=3),))
    with pytest.raises(ConversionError) as exc:
        _convert(dicom, tmp_path)
    assert "heudiconv produced no NIfTI" in exc.value.summary
    assert "keeps every selected series as DICOM only (acq-localizer_scout: scouts" in exc.value.hint
    assert "{" not in exc.value.hint and "--keep-dicom" not in exc.value.hint  # no template text, no false remedy


@pytest.mark.slow
def test_outputs_list_exactly_the_session_files_relative_to_the_staging_root(converted: ConversionResult) -> None:
    on_disk = sorted(p.relative_to(converted.staging_root).as_posix()
                     for p in converted.session_dir.rglob("*") if p.is_file())
    assert list(converted.outputs) == on_disk
    assert all(p.startswith("sub-01/ses-a/") for p in converted.outputs)


@pytest.mark.slow
def test_reconverting_into_a_stale_work_dir_starts_fresh_and_gives_the_same_files(
        reproin_dicom: Path, converted: ConversionResult, tmp_path: Path) -> None:
    # A stale conversion table would make heudiconv silently reuse it (see conversion-facts.md).
    stale = tmp_path / "work" / "bids" / ".heudiconv" / "01" / "ses-a" / "info"
    stale.mkdir(parents=True)
    (stale / "01_ses-a.edit.txt").write_text("{}")
    (tmp_path / "work" / "leftover.txt").write_text("x")
    again = _convert(reproin_dicom, tmp_path)
    assert again.outputs == converted.outputs
    assert not (tmp_path / "work" / "leftover.txt").exists()
    for rel in converted.outputs:
        if rel.endswith((".json", ".tsv", ".bval", ".bvec")):
            assert (again.staging_root / rel).read_bytes() == (converted.staging_root / rel).read_bytes(), rel


@pytest.mark.slow
def test_dicom_dir_is_not_modified(reproin_dicom: Path, converted: ConversionResult) -> None:
    # What the fixture wrote (the generator is deterministic), against what is there after converting.
    written = {f"{scan.scan_id}/{rel}": hashlib.sha256(data).hexdigest()
               for scan in session_scans("01", "a") for rel, data in scan.files.items()}
    after = {p.relative_to(reproin_dicom).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in reproin_dicom.rglob("*") if p.is_file()}
    assert after == written  # same files, same bytes: nothing added, removed or changed
    assert sorted(p.name for p in reproin_dicom.iterdir()) == sorted({k.split("/")[0] for k in written})


@pytest.mark.slow
def test_skip_by_description_removes_that_series(reproin_dicom: Path, tmp_path: Path) -> None:
    result = _convert(reproin_dicom, tmp_path, settings=ConversionSettings(skip=("func-bold_task-rest", "dwi_*")))
    files = _session_files(result)
    assert not any("task-rest" in f or f.startswith("dwi/") for f in files)
    assert "func/sub-01_ses-a_task-checks_run-01_bold.nii.gz" in files
    assert "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz" in files


@pytest.mark.slow
def test_include_by_scan_id_range_keeps_only_those_series(reproin_dicom: Path, tmp_path: Path) -> None:
    result = _convert(reproin_dicom, tmp_path, settings=ConversionSettings(include=("1-3",)))
    assert {f for f in _session_files(result) if f.endswith(".nii.gz")} == {
        "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz",
        "func/sub-01_ses-a_task-rest_bold.nii.gz",
    }


@pytest.mark.slow
def test_bidsmap_converts_a_session_with_site_series_names(converted_site: ConversionResult) -> None:
    files = _session_files(converted_site)
    assert EXPECTED_B <= files
    assert not any("scout" in f for f in files)
    sidecar = json.loads((converted_site.session_dir / "anat" / "sub-02_ses-b_T1w.json").read_text())
    assert sidecar["SeriesDescription"] == "MPRAGE"  # the DICOM is converted as it was, only renamed


@pytest.mark.slow
def test_site_series_names_without_bidsmap_convert_to_nothing(site_dicom: Path, tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no NIfTI") as info:
        _convert(site_dicom, tmp_path, B)
    assert "bidsmap" in (info.value.hint or "")
    assert str(tmp_path / "convert.log") in (info.value.hint or "")
    # which series, without reading the log: the names to map
    assert info.value.hint.endswith("; the session's: scan 1 'localizer', scan 2 'MPRAGE', scan 3 'rest_fMRI', "
                                    "scan 4 'checkerboard', scan 5 'checkerboard', scan 6 'gre_field_mapping', "
                                    "scan 7 'gre_field_mapping', scan 8 'DTI_b1500_AP'")


@pytest.mark.slow
def test_session_markers_in_series_names_do_not_override_the_session_label(tmp_path: Path) -> None:
    # ReproIn would take "ses-pre" from the series name; xnat2bids' naming decides the session.
    write_session(tmp_path / "dicom", "03", "x", series=(SeriesSpec("anat-T1w_ses-pre", "anat", n_slices=4),))
    result = _convert(tmp_path / "dicom", tmp_path, BidsAddress("03", "x"))
    assert result.outputs == ("sub-03/ses-x/anat/sub-03_ses-x_T1w.json",
                              "sub-03/ses-x/anat/sub-03_ses-x_T1w.nii.gz",
                              "sub-03/ses-x/sub-03_ses-x_scans.tsv")


@pytest.mark.slow
def test_custom_heuristic_file_is_used(site_dicom: Path, tmp_path: Path) -> None:
    heuristic = tmp_path / "myheuristic.py"
    heuristic.write_text(
        "def create_key(template, outtype=('nii.gz',), annotation_classes=None):\n"
        "    return template, outtype, annotation_classes\n"
        "def infotodict(seqinfo):\n"
        "    t1 = create_key('sub-{subject}/{session}/anat/sub-{subject}_{session}_T1w')\n"
        "    return {t1: [s.series_id for s in seqinfo if s.series_description == 'MPRAGE']}\n"
    )
    result = _convert(site_dicom, tmp_path, B, ConversionSettings(heuristic=str(heuristic)))
    assert {f for f in result.outputs if f.endswith(".nii.gz")} == {"sub-02/ses-b/anat/sub-02_ses-b_T1w.nii.gz"}


@pytest.mark.slow
def test_recognised_series_give_no_warnings(converted: ConversionResult, converted_site: ConversionResult) -> None:
    # The scout (localizer) is in ReproIn's conversion table, kept as sourcedata only: not a warning.
    assert converted.warnings == ()
    assert converted_site.warnings == ()


@pytest.mark.slow
def test_repeated_series_without_run_plus_fail_naming_the_dup_files_and_scans(tmp_path: Path) -> None:
    # ReproIn names all but the last of same-named series `__dup-NN`: the BIDS validator rejects them.
    write_session(tmp_path / "dicom", "01", "a", series=REPEATED_SERIES)
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    error = info.value
    assert error.summary == ("sub-01/ses-a: scans 2, 3 convert to the same BIDS name; "
                             "heudiconv wrote '__dup-' files, which are not valid BIDS")
    detail = error.detail or ""
    assert "sub-01/ses-a/func/sub-01_ses-a_task-rest_bold__dup-01.nii.gz" in detail
    assert "scans 2, 3 ('func-bold_task-rest') all become sub-01_ses-a_task-rest_bold" in detail
    hint = error.hint or ""
    assert 'skip = ["2"]' in hint
    assert '"func-bold_task-rest" = "func-bold_task-rest_run+"' in hint
    assert "warning" not in (tmp_path / "convert.log").read_text()


@pytest.mark.slow
def test_a_single_band_reference_named_by_its_protocol_is_the_bolds_sbref(tmp_path: Path) -> None:
    # CMRR multiband: the SBRef's SeriesDescription is the protocol's with _SBRef, and the bidsmap
    # names the protocol. Renamed through its ProtocolName it became one more BOLD (a __dup).
    series = (SeriesSpec("cmrr_mbep2d_bold_rest_SBRef", "func", n_volumes=1),
              SeriesSpec("cmrr_mbep2d_bold_rest", "func", n_volumes=3))
    write_session(tmp_path / "dicom", "01", "a", series=series)
    _rewrite(tmp_path / "dicom" / "1", ProtocolName="cmrr_mbep2d_bold_rest")
    settings = ConversionSettings(bidsmap=(("cmrr_mbep2d_bold_rest", "func-bold_task-rest"),))
    assert settings.scan_name("cmrr_mbep2d_bold_rest_SBRef", "cmrr_mbep2d_bold_rest") == "func-sbref_task-rest"
    assert settings.scan_name("cmrr_mbep2d_bold_rest", "cmrr_mbep2d_bold_rest") == "func-bold_task-rest"
    result = _convert(tmp_path / "dicom", tmp_path, settings=settings)
    assert {f for f in _session_files(result) if f.endswith(".nii.gz")} == {
        "func/sub-01_ses-a_task-rest_bold.nii.gz", "func/sub-01_ses-a_task-rest_sbref.nii.gz"}


@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "bidsmap"), [
    ("func-bold_task-x_run+", ()),
    ("cmrr_mbep2d_bold_x", (("cmrr_mbep2d_bold_x", "func-bold_task-x_run+"),)),
])
def test_single_band_references_of_numbered_runs_take_their_bolds_run_numbers(
        tmp_path: Path, protocol: str, bidsmap: tuple[tuple[str, str], ...]) -> None:
    # A Siemens SBRef comes just before its BOLD, named by the same protocol: ReproIn, which
    # reads ProtocolName first, counted it as one more `_run+` (sbref run-01, bold run-02).
    series = tuple(SeriesSpec(name, "func", n_volumes=n) for name, n in
                   [(f"{protocol}_SBRef", 1), (protocol, 3), (f"{protocol}_SBRef", 1), (protocol, 3)])
    write_session(tmp_path / "dicom", "01", "a", series=series)
    for scan in ("1", "3"):
        _rewrite(tmp_path / "dicom" / scan, ProtocolName=protocol)
    result = _convert(tmp_path / "dicom", tmp_path, settings=ConversionSettings(bidsmap=bidsmap))
    assert sorted(f for f in _session_files(result) if f.endswith(".nii.gz")) == [
        f"func/sub-01_ses-a_task-x_run-{run}_{kind}.nii.gz" for run in ("01", "02") for kind in ("bold", "sbref")]
    assert result.warnings == ()
    # Each SBRef is its own BOLD's: acquired just before it.
    rows = (result.session_dir / "sub-01_ses-a_scans.tsv").read_text().splitlines()[1:]
    times = {row.split("\t")[0]: row.split("\t")[1] for row in rows}
    for run in ("01", "02"):
        assert times[f"func/sub-01_ses-a_task-x_run-{run}_sbref.nii.gz"] <= \
            times[f"func/sub-01_ses-a_task-x_run-{run}_bold.nii.gz"]
    assert times["func/sub-01_ses-a_task-x_run-01_bold.nii.gz"] < times["func/sub-01_ses-a_task-x_run-02_sbref.nii.gz"]


@pytest.mark.slow
def test_a_single_band_reference_whose_bold_was_stopped_keeps_a_run_of_its_own(tmp_path: Path) -> None:
    # The BOLD after the first SBRef was aborted (not archived): the next series of the protocol
    # is the second SBRef, and the BOLD after it is that one's alone (both took its number: a dup).
    protocol = "func-bold_task-x_run+"
    series = tuple(SeriesSpec(name, "func", n_volumes=n) for name, n in
                   [(f"{protocol}_SBRef", 1), (f"{protocol}_SBRef", 1), (protocol, 3)])
    write_session(tmp_path / "dicom", "01", "a", series=series)
    for scan in ("1", "2"):
        _rewrite(tmp_path / "dicom" / scan, ProtocolName=protocol)
    result = _convert(tmp_path / "dicom", tmp_path)
    assert sorted(f for f in _session_files(result) if f.endswith(".nii.gz")) == [
        "func/sub-01_ses-a_task-x_run-01_sbref.nii.gz", "func/sub-01_ses-a_task-x_run-02_bold.nii.gz",
        "func/sub-01_ses-a_task-x_run-02_sbref.nii.gz"]


@pytest.mark.slow
def test_a_derived_series_named_after_its_original_is_the_one_the_hint_leaves_out(tmp_path: Path) -> None:
    # Siemens names an MPR reformat (and an ADC map) after the protocol it came from: ReproIn,
    # which reads ProtocolName first, gives it the original's name. Leaving out the original
    # would export the reformat as the T1w.
    series = (SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),
              SeriesSpec("anat-T1w_acq-memprage_MPR_tra", "anat", n_slices=4))
    write_session(tmp_path / "dicom", "01", "a", series=series)
    _rewrite(tmp_path / "dicom" / "2", ImageType=["DERIVED", "SECONDARY", "MPR", "CSA MPR", "NORM"],
             ProtocolName="anat-T1w_acq-memprage")
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    assert info.value.summary.startswith("sub-01/ses-a: scans 1, 2 convert to the same BIDS name")
    assert info.value.hint == (
        "scan 2 'anat-T1w_acq-memprage_MPR_tra' holds derived images (ImageType DERIVED: a reformat or a map the "
        'scanner computed), named after the series they came from; leave them out with skip = ["2"] in '
        "[project.<project>.sessions.<session label>], or in [conversion] skip by their names for every session")
    # The way out, to the letter: the original alone is the T1w.
    result = _convert(tmp_path / "dicom", tmp_path / "again", settings=ConversionSettings(skip=("2",)))
    [sidecar] = [o for o in result.outputs if o.endswith("_T1w.json")]
    assert "DERIVED" not in json.loads((result.session_dir.parents[1] / sidecar).read_text())["ImageType"]


@pytest.mark.slow
@pytest.mark.parametrize("description", ["func-bold_task-rest run", "anat-T1w_acq-mprage\u00fc"])
def test_a_series_name_that_gives_invalid_bids_names_fails_naming_the_scan(tmp_path: Path, description: str) -> None:
    # heudiconv takes a space or an accented letter into an entity's label as it is; the BIDS
    # validator rejects such names (INVALID_ENTITY_LABEL), so they are never committed.
    kind = "func" if description.startswith("func") else "anat"
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec(description, kind),))
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    error = info.value
    assert error.summary.startswith("sub-01/ses-a: the conversion wrote ") and "not valid BIDS" in error.summary
    assert description.split("_")[-1] in (error.detail or "")
    assert f"scan 1 {description!r} holds other characters" in (error.hint or "")
    assert "[conversion] bidsmap" in (error.hint or "")


@pytest.mark.slow
@pytest.mark.parametrize(("description", "suggested"), [
    ("anat-T1w_acq-M\u00fcller\u00f1", "anat-T1w_acq-Mullern"),
    ("func-bold_task-s\u00e9quence", "func-bold_task-sequence"),
    ("anat-T1w_acq-Stra\u00dfe\u00f8\u00e6", "anat-T1w_acq-Strasseoae"),
])
def test_the_bidsmap_name_suggested_for_accented_letters_spells_them_in_ascii(
        tmp_path: Path, description: str, suggested: str) -> None:
    kind = "func" if description.startswith("func") else "anat"
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec(description, kind),))
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    assert (info.value.hint or "").endswith(f'[conversion] bidsmap, e.g. "{description}" = "{suggested}"')
    # The suggestion, to the letter, converts.
    result = _convert(tmp_path / "dicom", tmp_path / "again", settings=ConversionSettings(
        bidsmap=((description, suggested),)))
    entity = suggested.split("_")[-1]
    assert [f for f in _session_files(result) if f.endswith(".nii.gz")] == [
        f"{kind}/sub-01_ses-a_{entity}_{'bold' if kind == 'func' else 'T1w'}.nii.gz"]


@pytest.mark.slow
def test_the_bidsmap_the_dup_error_suggests_numbers_the_runs(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "01", "a", series=REPEATED_SERIES)
    settings = ConversionSettings(bidsmap=(("func-bold_task-rest", "func-bold_task-rest_run+"),))
    result = _convert(tmp_path / "dicom", tmp_path, settings=settings)
    assert {f for f in _session_files(result) if f.endswith(".nii.gz")} == {
        "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz",
        "func/sub-01_ses-a_task-rest_run-01_bold.nii.gz",
        "func/sub-01_ses-a_task-rest_run-02_bold.nii.gz",
    }
    assert result.warnings == ()


@pytest.mark.slow
def test_selected_scan_the_heuristic_does_not_recognise_is_a_warning(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "01", "a", series=UNNAMED_SERIES)
    result = _convert(tmp_path / "dicom", tmp_path)
    assert result.outputs == ("sub-01/ses-a/anat/sub-01_ses-a_acq-memprage_T1w.json",
                              "sub-01/ses-a/anat/sub-01_ses-a_acq-memprage_T1w.nii.gz",
                              "sub-01/ses-a/sub-01_ses-a_scans.tsv")
    assert len(result.warnings) == 1
    warning = result.warnings[0]
    assert warning.startswith("scan 2 'T1 MPRAGE (sag) ü' was selected but converted to nothing")
    assert "ReproIn" in warning and '"T1 MPRAGE (sag) ü" = "<its ReproIn name: anat-T1w, func-bold_task-rest' in warning
    log = (tmp_path / "convert.log").read_text(encoding="utf-8")
    assert log.rstrip().splitlines()[-1].endswith(f"warning: {warning}")


@pytest.mark.slow
def test_conversion_appends_to_the_session_log_and_marks_where_it_starts(
        reproin_dicom: Path, tmp_path: Path) -> None:
    log = tmp_path / "convert.log"
    log.write_text("2024-01-10T09:00:00Z export PROJ/XNAT_E00001 (a): 8 of 8 scans selected\n")
    _convert(reproin_dicom, tmp_path)
    _convert(reproin_dicom, tmp_path)
    lines = log.read_text().splitlines()
    assert lines[0] == "2024-01-10T09:00:00Z export PROJ/XNAT_E00001 (a): 8 of 8 scans selected"
    starts = [i for i, line in enumerate(lines) if line.endswith(" convert sub-01/ses-a with heudiconv")]
    assert len(starts) == 2 and starts[0] == 1
    assert all(lines[i + 1].startswith("$ ") and "heudiconv" in lines[i + 1] for i in starts)
    assert sum("PROCESSING DONE" in line for line in lines) == 2


@pytest.mark.slow
def test_failure_reason_comes_from_this_attempt_not_an_earlier_one_in_the_log(
        site_dicom: Path, tmp_path: Path) -> None:
    (tmp_path / "convert.log").write_text("INFO: Generated sequence info with 0 entries\n")
    with pytest.raises(ConversionError, match="no NIfTI") as info:
        _convert(site_dicom, tmp_path, B)
    assert "did not recognise" in (info.value.hint or "")
    assert "0 entries" not in (info.value.detail or "")


@pytest.mark.slow
def test_unreadable_dicom_is_a_conversion_error_pointing_at_the_log(tmp_path: Path) -> None:
    scan = tmp_path / "dicom" / "1"
    scan.mkdir(parents=True)
    (scan / "1.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(2000))
    (scan / "2.dcm").write_text("not a dicom file")
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    log = tmp_path / "convert.log"
    assert log.is_file()
    assert str(log) in (info.value.hint or "")
    assert info.value.detail and info.value.detail.splitlines()[-1] in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("first", [True, False])
def test_a_scan_with_a_file_cut_short_converts_the_rest_with_a_warning_naming_it(tmp_path: Path, first: bool) -> None:
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),))
    files = sorted((tmp_path / "dicom" / "1").iterdir())
    cut = files[0 if first else -1]
    cut.write_bytes(cut.read_bytes()[:300])  # its header stops before SeriesNumber
    result = _convert(tmp_path / "dicom", tmp_path)
    # A file cut short first did not hide the series' name: the T1w is still named by it.
    assert "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz" in _session_files(result)
    assert result.warnings == (
        f"scan 1 'anat-T1w_acq-memprage': heudiconv could not read 1 of its {len(files)} files as DICOM "
        f"({cut.name}) and converted the others, so its images may lack slices or volumes; check the files in "
        "XNAT and, once mended there, re-date the session to export it again",)
    assert result.warnings[0] in (tmp_path / "convert.log").read_text()


@pytest.mark.slow
def test_a_raw_data_file_beside_the_images_is_no_warning(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),))
    image = sorted((tmp_path / "dicom" / "1").iterdir())[0]
    raw = pydicom.dcmread(image)
    raw.SOPClassUID = "1.2.840.10008.5.1.4.1.1.66"  # Raw Data Storage: heudiconv leaves it out on purpose
    raw.file_meta.MediaStorageSOPClassUID = raw.SOPClassUID
    raw.SOPInstanceUID = raw.file_meta.MediaStorageSOPInstanceUID = raw.SOPInstanceUID + ".9"
    raw.save_as(image.with_name("raw.dcm"))
    result = _convert(tmp_path / "dicom", tmp_path)
    assert "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz" in _session_files(result)
    assert result.warnings == ()


@pytest.mark.slow
def test_a_scanners_protocol_report_is_said_to_hold_no_image_with_skip_as_the_way_out(tmp_path: Path) -> None:
    # Siemens adds a PhoenixZIPReport series (CSA Non-Image Storage): no bidsmap name can convert it.
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),))
    report = pydicom.dcmread(sorted((tmp_path / "dicom" / "1").iterdir())[0])
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.3.12.2.1107.5.9.1"
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID + ".9"
    report.SeriesInstanceUID += ".9"
    report.SeriesDescription = report.ProtocolName = "PhoenixZIPReport"
    report.SeriesNumber, report.ImageType = 99, ["ORIGINAL", "PRIMARY", "OTHER"]
    for tag in (0x7FE00010, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280102, 0x00280103, 0x00280002,
                0x00280004, 0x00280030, 0x00200032, 0x00200037):
        if tag in report:
            del report[tag]
    (tmp_path / "dicom" / "99").mkdir()
    report.save_as(tmp_path / "dicom" / "99" / "report.dcm")
    result = _convert(tmp_path / "dicom", tmp_path)
    assert "anat/sub-01_ses-a_acq-memprage_T1w.nii.gz" in _session_files(result)
    assert result.warnings == (
        "scan 99 'PhoenixZIPReport' was selected but converted to nothing: it holds a Siemens non-image object (a "
        "protocol report such as PhoenixZIPReport), no image series to convert; leave it out with [conversion] "
        'skip = ["PhoenixZIPReport"]',)


@pytest.mark.slow
def test_a_slash_in_a_series_name_that_crashes_heudiconv_is_named_with_the_scan(tmp_path: Path) -> None:
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec("func-bold_task-rest/x", "func", n_volumes=2),))
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    error = info.value
    assert error.summary == ("sub-01/ses-a: heudiconv failed on scan 1, whose series name 'func-bold_task-rest/x' "
                             "has a '/' (BIDS file names cannot hold one)")
    assert (error.hint or "").startswith('map the scan in [conversion.bidsmap], e.g. "func-bold_task-rest/x" = ')
    assert "Traceback" in (error.detail or "")
    # Mapped as the hint says, it converts.
    settings = ConversionSettings(bidsmap=(("func-bold_task-rest/x", "func-bold_task-rest"),))
    result = _convert(tmp_path / "dicom", tmp_path, settings=settings)
    assert "func/sub-01_ses-a_task-rest_bold.nii.gz" in _session_files(result)


@pytest.mark.slow
def test_a_series_name_too_long_for_a_file_name_is_named_with_the_scan_before_heudiconv_runs(tmp_path: Path) -> None:
    # DICOM caps SeriesDescription at 64 characters; a longer one makes file names past the file
    # system's 255 bytes, and heudiconv fails with nothing but its exit status.
    name = "func-bold_task-" + "x" * 238
    assert len(name) == 253
    write_session(tmp_path / "dicom", "01", "a", series=(SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4),
                                                          SeriesSpec(name, "func", n_volumes=2)))
    with pytest.raises(ConversionError) as info:
        _convert(tmp_path / "dicom", tmp_path)
    error = info.value
    assert error.summary == (f"sub-01/ses-a: scan 2's series name ('{name[:40]}…', 253 characters) is too long for a "
                             "file name: the BIDS file names made of it would pass the file system's limit of 255 bytes")
    assert error.detail == f"scan 2: {name!r}"
    assert error.hint == (f'map the scan to a shorter ReproIn name in [conversion] bidsmap, e.g. "{name[:40]}*" = '
                          '"<its ReproIn name>", or leave it out with skip = ["2"] in '
                          "[project.<project>.sessions.<session label>]")
    assert not (tmp_path / "work" / "bids").exists()  # heudiconv never ran
    # Mapped as the hint says, it converts.
    settings = ConversionSettings(bidsmap=((f"{name[:40]}*", "func-bold_task-long"),))
    result = _convert(tmp_path / "dicom", tmp_path / "again", settings=settings)
    assert "func/sub-01_ses-a_task-long_bold.nii.gz" in _session_files(result)


@pytest.mark.slow
def test_heudiconv_crash_is_reported_with_its_exit_status(reproin_dicom: Path, tmp_path: Path) -> None:
    heuristic = tmp_path / "broken.py"
    heuristic.write_text("def infotodict(seqinfo):\n    raise RuntimeError('heuristic exploded')\n")
    with pytest.raises(ConversionError, match="exit status") as info:
        _convert(reproin_dicom, tmp_path, settings=ConversionSettings(heuristic=str(heuristic)))
    assert "heuristic exploded" in (info.value.detail or "")


@pytest.mark.slow
@pytest.mark.parametrize(("number", "said"), [(28, "no space left"), (122, "the disk quota is used up")],
                         ids=["ENOSPC", "EDQUOT"])
def test_heudiconv_failing_on_a_full_disk_says_so_not_its_exit_status(
        reproin_dicom: Path, tmp_path: Path, number: int, said: str) -> None:
    # As heudiconv's populate_aggregated_jsons fails when the disk fills: a traceback, exit status 1.
    full = tmp_path / "work" / "bids" / "task-rest_bold.json"
    heuristic = tmp_path / "filling.py"
    heuristic.write_text(f"import os\ndef infotodict(seqinfo):\n"
                         f"    raise OSError({number}, os.strerror({number}), {str(full)!r})\n")
    with pytest.raises(ConversionError) as info:
        _convert(reproin_dicom, tmp_path, settings=ConversionSettings(heuristic=str(heuristic)))
    assert info.value.summary == f"{A}: heudiconv stopped: {said} on the disk holding {full}"
    assert info.value.hint == "free space there, then apply again"
    assert f"[Errno {number}]" in (info.value.detail or "")


def _endless_dicom(tmp_path: Path) -> Path:
    """A DICOM folder whose one file is a FIFO: heudiconv blocks reading it and never ends by itself."""
    (tmp_path / "dicom" / "1").mkdir(parents=True)
    os.mkfifo(tmp_path / "dicom" / "1" / "1.dcm")
    return tmp_path / "dicom"


@pytest.mark.slow
def test_cancel_kills_a_running_heudiconv(tmp_path: Path) -> None:
    dicom = _endless_dicom(tmp_path)
    cancel = threading.Event()

    def cancel_once_heudiconv_runs() -> None:
        deadline = time.monotonic() + 120  # a guard against hanging, not a bound on speed
        while not _session_leaders_in(tmp_path / "work") and time.monotonic() < deadline:
            time.sleep(0.05)
        cancel.set()

    canceller = threading.Thread(target=cancel_once_heudiconv_runs)
    canceller.start()
    try:
        with pytest.raises(ConversionError) as info:
            _convert(dicom, tmp_path, cancel=cancel, timeout=600)  # only the cancel can end it
    finally:
        canceller.join()
    assert info.value.summary == "cancelled"
    assert not _running_converters(tmp_path)


@pytest.mark.slow
def test_timeout_kills_heudiconv(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="timed out"):
        _convert(_endless_dicom(tmp_path), tmp_path, timeout=0.3)
    assert not _running_converters(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("preloaded", "sig", "disk_full"),
                         [(True, signal.SIGSEGV, False), (False, signal.SIGSEGV, False), (True, signal.SIGKILL, False),
                          (True, signal.SIGKILL, True)],
                         ids=["preloaded-SIGSEGV", "plain-SIGSEGV", "preloaded-SIGKILL", "disk-full"])
def test_heudiconv_killed_by_a_signal_is_reported_with_the_signal_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preloaded: bool, sig: signal.Signals, disk_full: bool) -> None:
    monkeypatch.setenv("XNAT2BIDS_PRELOAD", "1" if preloaded else "0")
    if disk_full:  # as if no space were left where it converts
        monkeypatch.setattr("reconcile.convert.DISK_FULL_BYTES", 1 << 62)
    (tmp_path / "dicom" / "1").mkdir(parents=True)
    os.mkfifo(tmp_path / "dicom" / "1" / "1.dcm")  # heudiconv blocks reading it until killed

    def kill_heudiconv() -> None:
        deadline = time.monotonic() + 120
        while not (pids := _session_leaders_in(tmp_path / "work")) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            os.kill(pid, sig)

    killer = threading.Thread(target=kill_heudiconv)
    killer.start()
    try:
        with pytest.raises(ConversionError) as info:
            _convert(tmp_path / "dicom", tmp_path, timeout=180)
    finally:
        killer.join()
    if disk_full:
        assert info.value.summary == f"{A}: heudiconv stopped: no space left on the disk holding {tmp_path / 'work'}"
        assert info.value.hint == "free space there, then apply again"
        return
    assert info.value.summary == f"{A}: heudiconv was killed by {sig.name} (signal {sig.value})"
    assert str(tmp_path / "convert.log") in (info.value.hint or "")
    assert ("out-of-memory" in (info.value.hint or "")) == (sig == signal.SIGKILL)


@pytest.mark.parametrize("preloaded", [True, False], ids=["preloaded", "plain"])
def test_kill_after_heudiconv_was_reaped_signals_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preloaded: bool) -> None:
    # Its PID is its process group's ID; once reaped, both may be another process's.
    if preloaded:
        if not hasattr(os, "pidfd_open"):
            pytest.skip("the fork server is Linux-only")
        if preload._server is not None:  # started by an earlier test, maybe with another environment
            preload._retire(preload._server)
        monkeypatch.setattr(preload, "_broken", None)
        child = _Forked(preload.start(["--version"], tmp_path, tmp_path / "c.log", converter_env()))
    else:
        child = _Spawned(subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True))
    deadline = time.monotonic() + 60
    while (code := child.wait(0.05)) is None:
        assert time.monotonic() < deadline, "heudiconv did not finish"
    assert code == 0
    while _state(child.pid) != "gone":  # the fork server reaps its child just after reporting it
        assert time.monotonic() < deadline, f"{child.pid} was not reaped"
        time.sleep(0.02)
    sent: list[tuple[str, int, int]] = []
    slept: list[float] = []

    class RecordingClock:  # convert's `time`, with its sleeps recorded (and still taken)
        def __getattr__(self, name: str) -> object:
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            slept.append(seconds)
            time.sleep(seconds)

    with monkeypatch.context() as m:
        m.setattr(os, "killpg", lambda pgid, sig: sent.append(("killpg", pgid, sig)))
        m.setattr(os, "kill", lambda pid, sig: sent.append(("kill", pid, sig)))
        m.setattr(signal, "pidfd_send_signal", lambda fd, sig, *a: sent.append(("pidfd", fd, sig)), raising=False)
        m.setattr(convert_module, "time", RecordingClock())
        child.kill()
        child.kill()
    child.close()
    assert sent == []
    assert slept == []  # no grace period spent waiting for a process that is gone


# A stand-in for dcm2niix that outlives heudiconv's SIGTERM: only the group's SIGKILL ends it.
_GRANDCHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(str(os.getpid()))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(600)
"""


@pytest.mark.slow
@pytest.mark.parametrize("preloaded", [True, False], ids=["preloaded", "plain"])
def test_cancel_kills_a_child_of_heudiconv_that_ignores_sigterm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preloaded: bool) -> None:
    monkeypatch.setenv("XNAT2BIDS_PRELOAD", "1" if preloaded else "0")
    (tmp_path / "dicom" / "1").mkdir(parents=True)
    (tmp_path / "dicom" / "1" / "1.dcm").write_bytes(b"")
    pidfile = tmp_path / "grandchild.pid"
    heuristic = tmp_path / "spawning.py"  # heudiconv imports it before reading any DICOM
    heuristic.write_text(
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {_GRANDCHILD!r}, {str(pidfile)!r}])\n"
        "time.sleep(600)\n"
    )
    cancel = threading.Event()

    def cancel_once_the_grandchild_runs() -> None:
        deadline = time.monotonic() + 120
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cancel.set()

    canceller = threading.Thread(target=cancel_once_the_grandchild_runs)
    canceller.start()
    try:
        with pytest.raises(ConversionError, match="cancelled"):
            _convert(tmp_path / "dicom", tmp_path, settings=ConversionSettings(heuristic=str(heuristic)),
                     cancel=cancel, timeout=180)
    finally:
        canceller.join()
    grandchild = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    try:
        while _state(grandchild) not in ("gone", "Z"):
            assert time.monotonic() < deadline, "the SIGTERM-proof child of heudiconv outlived the cancel"
            time.sleep(0.05)
    finally:
        if _state(grandchild) not in ("gone", "Z"):
            os.kill(grandchild, signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _session_leaders_in(cwd: Path) -> list[int]:
    """Live processes working in `cwd` that lead their own process group (heudiconv, not dcm2niix)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == int(proc.name) and os.readlink(proc / "cwd") == str(cwd):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def _running_converters(tmp_path: Path) -> list[str]:
    """Command lines of live processes that mention this test's work dir."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if str(tmp_path) in cmdline and "Z (zombie)" not in state:
            found.append(cmdline)
    return found


# --- the validator on a dataset assembled like apply does ------------------------------


@pytest.mark.slow
def test_two_converted_sessions_with_provenance_files_validate_without_errors(
        converted: ConversionResult, converted_site: ConversionResult, tmp_path: Path) -> None:
    root = tmp_path / "bids"
    root.mkdir()
    sessions = ((converted, A, "XNAT_E00001", "2024-01-10"), (converted_site, B, "XNAT_E00002", "2024-02-05"))
    for result, address, exp_id, date in sessions:
        shutil.copytree(result.session_dir, root / address.path)
        ensure_dataset_description(root, name="PROJ", tools={"xnat2bids": "0.1.0", "heudiconv": "1.5.1",
                                                             "dcm2niix": "v1.0.20260724"})
        ensure_participant(root, address.subject)
        update_sessions_tsv(root, address.subject, address.session, acq_time=f"{date}T00:00:00",
                            xnat_experiment_id=exp_id, xnat_insert_date=f"{date} 12:00:00.0")
    ensure_bidsignore(root)
    # apply's work area, lockfile and state lock live in the root, all dot-named.
    (root / ".xnat2bids" / "staging" / "X").mkdir(parents=True)
    (root / ".xnat2bids" / "staging" / "X" / "1.dcm").write_bytes(b"x")
    (root / ".xnat2bids.lock").write_text("{}")
    (root / ".xnat2bids.lock.info").write_text("{}")

    exe = shutil.which("bids-validator-deno", path=converter_env()["PATH"])
    assert exe, "bids-validator-deno is not installed"
    run = subprocess.run([exe, str(root), "--format", "json"], capture_output=True, text=True, timeout=300,
                         env=converter_env())
    report = json.loads(run.stdout)
    errors = [i for i in report["issues"]["issues"] if i["severity"] == "error"]
    assert errors == [], json.dumps(errors, indent=1)
    # Our sessions.tsv columns are described by the top-level sessions.json, heudiconv's extra
    # scans.tsv columns (operator, randstr) by scans.json.
    undefined = [i for i in report["issues"]["issues"] if i["code"] == "TSV_ADDITIONAL_COLUMNS_UNDEFINED"]
    assert not [i for i in undefined if i.get("location", "").endswith(("_sessions.tsv", "_scans.tsv"))], undefined
    assert run.returncode == 0
    assert sorted(report["summary"]["subjects"]) == ["01", "02"]


def test_cancelled_before_start_does_not_run_heudiconv(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ConversionError, match="cancelled"):
        _convert(tmp_path / "dicom", tmp_path, cancel=cancel)
    assert not (tmp_path / "convert.log").exists()


@pytest.mark.slow
def test_a_siemens_mosaic_bold_run_converts_as_its_slice_files_do(tmp_path: Path) -> None:
    """Siemens scanners before XA write EPI as mosaics (one file per volume, slices tiled): heudiconv
    and dcm2niix must give the same run, voxel for voxel, as from one file per slice."""
    import nibabel

    runs = {}
    for mosaic in (False, True):
        dicom = tmp_path / f"dicom-{mosaic}"
        series = [SeriesSpec("func-bold_task-rest", "func", n_volumes=3, n_slices=5, mosaic=mosaic)]
        scans = write_session(dicom, "01", "a", series=series)
        assert len(scans[0].files) == (3 if mosaic else 15)
        result = _convert(dicom, tmp_path / f"work-{mosaic}")
        [bold] = result.session_dir.glob("func/*_bold.nii.gz")
        runs[mosaic] = (bold.name, nibabel.load(bold), json.loads(bold.with_name(
            bold.name.replace(".nii.gz", ".json")).read_text()))
    (name, slices, sidecar), (mosaic_name, mosaic, mosaic_sidecar) = runs[False], runs[True]
    assert mosaic_name == name == "sub-01_ses-a_task-rest_bold.nii.gz"
    assert mosaic.shape == slices.shape == (16, 16, 5, 3)
    assert (mosaic.affine == slices.affine).all()
    assert (mosaic.get_fdata() == slices.get_fdata()).all()
    assert mosaic_sidecar["SliceTiming"] == pytest.approx(sidecar["SliceTiming"], abs=0.01)
    assert mosaic_sidecar["SliceTiming"] == pytest.approx([0, 0.4, 0.8, 1.2, 1.6])
    assert mosaic_sidecar["PhaseEncodingDirection"] == "j-"
    with pytest.raises(ValueError, match="mosaic applies to single-echo func series"):
        SeriesSpec("dwi_acq-b1500_dir-ap", "dwi", n_volumes=2, mosaic=True)


def test_scans_are_named_as_heudiconv_saw_their_series_or_left_out() -> None:
    scans = [convert_module._ScanDir(i, Path(i), None) for i in ("1", "2", "3", "4")]
    first_dicom = {"1": ("t1", "t1"), "2": ("bold", ""), "3": ("mixed", "mixed"), "4": ("nothing", "nothing"),
                   "5": ("scout", "scout")}  # 5 was left out by the config: not converted
    table = convert_module._Table({}, {"1-t1": ("1",), "2-bold": ("2",), "3-a": ("3",), "3-b": ("3",)})
    heudiconv = {"1-t1": ("t1", "t1"), "2-bold": ("bold", "ep2d_bold_csa"), "3-a": ("mixed", "mixed"),
                 "3-b": ("other", "other")}
    assert convert_module._as_converted(first_dicom, scans, table, heudiconv) == {
        "1": ("t1", "t1"),
        "2": ("bold", "ep2d_bold_csa"),  # the ProtocolName heudiconv read from the Siemens CSA header
        # 3: two series of different names in one folder; 4: no series read from it, kept as read
        "4": ("nothing", "nothing"),
        "5": ("scout", "scout"),
    }
    del heudiconv["1-t1"]  # a series missing from dicominfo
    assert "1" not in convert_module._as_converted(first_dicom, scans, table, heudiconv)
    assert convert_module._as_converted(first_dicom, scans, None, heudiconv) == {"5": ("scout", "scout")}
    assert convert_module._as_converted(first_dicom, scans, table, None) == {"5": ("scout", "scout")}


def test_a_series_name_with_a_slash_fails_the_session_instead_of_nesting_folders(tmp_path: Path) -> None:
    # ReproIn reads the name from the DICOM; heudiconv keeps a '/' in it as a folder of its own.
    dicom = tmp_path / "dicom"
    write_session(dicom, "01", "a", series=(SeriesSpec("anat-T1w_acq-x/../../y/z", "anat"),))
    with pytest.raises(ConversionError) as info:
        _convert(dicom, tmp_path)
    assert "below a folder of its own, which BIDS has no place for" in info.value.summary
    assert info.value.hint == ("a '/' in scan 1's series name 'anat-T1w_acq-x/../../y/z' names a folder; map the "
                               "scan in [conversion.bidsmap], e.g. \"anat-T1w_acq-x/../../y/z\" = \"<its ReproIn "
                               "name without '/'>\"")
    assert not list(tmp_path.glob("**/tmp/y")) and not (tmp_path / "y").exists()


def test_a_scan_a_custom_heuristic_leaves_unnamed_gets_no_reproin_advice() -> None:
    from reconcile.convert import _ScanDir, _Table, _unconverted

    table = _Table(names={"1-a": (), "2-b": ("{bids_subject_session_dir}/anat/x_T1w",)}, scans={"1-a": ("1",), "2-b": ("2",)})
    scans = [_ScanDir("1", Path("1"), "dwi_dir-AP"), _ScanDir("2", Path("2"), "t1")]
    [warning] = _unconverted(scans, table, "/lab/heuristic.py")
    assert warning == ("scan 1 'dwi_dir-AP' was selected but converted to nothing: the heuristic /lab/heuristic.py "
                       "gave it no BIDS name; extend the heuristic, or leave the scan out with [conversion] skip")
    [reproin] = _unconverted(scans, table)
    assert "ReproIn" in reproin and "anat-T1w\"" not in reproin  # no target that would mislabel a DWI
