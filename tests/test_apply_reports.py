"""What apply tells the user about a session beyond done or failed: warnings from its conversion,
and the fix for a session it cannot convert."""

from __future__ import annotations

from worlds import add, write_config

from reconcile.emulator.dicomgen import SeriesSpec
from reconcile.lock import read_lock
from reconcile.workarea import WorkArea


def test_a_selected_scan_that_converts_to_nothing_is_a_warning_under_its_session(cli, emulator, tmp_path):
    series = (SeriesSpec("anat-T1w_acq-memprage", "anat", n_slices=4), SeriesSpec("T1 MPRAGE (sag)", "anat", n_slices=4))
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=series)
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    lines = out.splitlines()
    done = next(i for i, line in enumerate(lines) if "✓ create sub-01/ses-01MR1" in line)
    assert lines[done + 1].startswith("      warning: scan 2 'T1 MPRAGE (sag)' was selected but converted to nothing")
    assert read_lock(root).serial == 1


def test_a_session_the_config_selects_no_scan_of_fails_before_downloading_with_the_fix(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")])
    root = tmp_path / "bids"
    config = write_config(tmp_path, '[conversion]\nskip = ["*"]')
    code, out, _ = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(config))
    assert code == 1
    assert "✗ create sub-01/ses-01MR1 (PROJ/XNAT_E00001): sub-01/ses-01MR1: [conversion] include/skip select none" in out
    assert "      hint: " in out
    assert not list((root / ".xnat2bids" / "staging").rglob("*.dcm")) and read_lock(root) is None


def test_a_failed_conversions_session_log_holds_heudiconvs_output_once(cli, emulator, tmp_path):
    # The log is heudiconv's own output file: the failure line under it says what failed and the
    # fix, without quoting the output again.
    e = add(emulator.archive, [("01", "01_MR1", "2024-01-10")],
            series=(SeriesSpec("func-bold_task-rest/x", "func", n_volumes=2),))["01_MR1"]
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    log = WorkArea(root).log(e.id).read_text()
    assert log.count("Traceback (most recent call last)") == 1
    assert log.count("IndexError: list index out of range") == 1
    failed = log[log.index(" failed: "):]
    assert failed.startswith(" failed: sub-01/ses-01MR1: heudiconv failed on scan 1, whose series name "
                             "'func-bold_task-rest/x' has a '/'")
    assert failed.splitlines()[1].startswith('hint: map the scan in [conversion.bidsmap], e.g. "func-bold_task-rest/x"')
