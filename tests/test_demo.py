"""`xnat2bids demo` runs the whole cycle against the built-in emulator and leaves a valid dataset."""

from __future__ import annotations

import shutil

import pytest

from reconcile.cli import main
from reconcile.lock import read_lock


@pytest.mark.slow
def test_demo_runs_plan_apply_redate_plan_apply_check(tmp_path, capsys, monkeypatch):
    for var in ("XNAT_HOST", "XNAT_USER", "XNAT_PASS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path.parent)
    tmp_path.rmdir()  # --workdir named but not there yet, and relative: made, and shown whole
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--workdir", tmp_path.name])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert f"BIDS root: {tmp_path / 'bids'}\n" in out
    assert "Plan: 3 to create" in out
    assert "~ update  sub-002/ses-MR1  DEMO/DEMO_E00002  date 2024-01-11 → 2024-02-01 (re-dated in XNAT)" in out
    assert "OK: lock serial 4, 3 sessions" in out
    assert out.split("7. xnat2bids plan")[1].count("No changes. 3 sessions up to date.") == 1
    lock = read_lock(tmp_path / "bids")
    assert lock.sessions["DEMO_E00002"].date == "2024-02-01"
    before = (tmp_path / "bids" / ".xnat2bids.lock").read_bytes()
    with pytest.raises(SystemExit) as exc:  # again in the same folder: its new XNAT would re-archive all
        main(["demo", "--workdir", str(tmp_path)])
    captured = capsys.readouterr()
    assert exc.value.code == 1 and f"error: {tmp_path / 'bids'} exists (an earlier demo?)" in captured.err
    assert (tmp_path / "bids" / ".xnat2bids.lock").read_bytes() == before
    shutil.rmtree(tmp_path)  # removed, to run the demo afresh there: not a file system gone away
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--workdir", str(tmp_path)])
    captured = capsys.readouterr()
    assert exc.value.code == 0 and "had a lock" not in captured.err, captured.out + captured.err
    assert "OK: lock serial 4, 3 sessions" in captured.out
