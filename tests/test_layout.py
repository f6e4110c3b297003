"""The seed tool's `<root>/<pi>/study-<study>/bids` layout: one lock per study, all walked."""

from __future__ import annotations

import pytest
from worlds import SMALL, write_config

from reconcile.demo import populate
from reconcile.layout import discover, study_root
from reconcile.lock import read_lock


def test_study_root_reuses_existing_folders_case_insensitively(tmp_path):
    (tmp_path / "Smith" / "study-Memory" / "bids").mkdir(parents=True)
    assert study_root(tmp_path, "SMITH_MEMORY") == tmp_path / "Smith/study-Memory/bids"
    assert study_root(tmp_path, "JONES_VISION") == tmp_path / "jones/study-vision/bids"
    assert [s.project for s in discover(tmp_path)] == ["SMITH_MEMORY"]


@pytest.mark.slow
def test_diff_and_update_walk_every_study(cli, emulator, tmp_path):
    archive = emulator.archive
    for project in ("SMITH_MEMORY", "JONES_VISION"):
        archive.add_project(project)
        populate(archive, project, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "export"
    cfg = write_config(tmp_path, 'layout = "pi-study"\nprojects = ["SMITH_MEMORY", "JONES_VISION"]')
    code, out, _ = cli("--diff", str(root), "--config", str(cfg))
    assert code == 2
    assert "=== SMITH_MEMORY" in out and "=== JONES_VISION" in out and out.count("+ create") == 2
    code, out, err = cli("--update", str(root), "--config", str(cfg))
    assert code == 0, out + err
    for pi, study, project in (("smith", "memory", "SMITH_MEMORY"), ("jones", "vision", "JONES_VISION")):
        lock = read_lock(root / pi / f"study-{study}" / "bids")
        assert [r.project for r in lock.sessions.values()] == [project]
    code, out, _ = cli("--diff", str(root), "--config", str(cfg))
    assert code == 0 and out.count("No changes. 1 session up to date.") == 2
