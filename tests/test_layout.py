"""The seed tool's `<root>/<pi>/study-<study>/bids` layout: one lock per study, all walked."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import pytest
from test_statelock import _holder_json, _ns_inode, _our_identity
from worlds import SMALL, record_as_exported, write_config

from reconcile.config import parse_config
from reconcile.demo import populate
from reconcile.errors import ConfigError
from reconcile.layout import discover, study_root
from reconcile.lock import Lock, read_lock, write_lock
from reconcile.model import OutputRecord
from reconcile.plan import Selection
from reconcile.statelock import state_lock_path

PI_STUDY = 'layout = "pi-study"'


def test_study_root_reuses_existing_folders_case_insensitively(tmp_path):
    (tmp_path / "Smith" / "study-Memory" / "bids").mkdir(parents=True)
    assert study_root(tmp_path, "SMITH_MEMORY") == tmp_path / "Smith/study-Memory/bids"
    assert study_root(tmp_path, "JONES_VISION") == tmp_path / "jones/study-vision/bids"
    assert [s.project for s in discover(tmp_path)] == ["SMITH_MEMORY"]


def test_study_root_refuses_a_pattern(tmp_path):
    with pytest.raises(ConfigError, match="'SMITH_\\*' is a pattern"):
        study_root(tmp_path, "SMITH_*")


def test_discover_skips_folders_named_by_a_pattern(tmp_path):
    for folder in ("smith/study-*/bids", "smith/study-[ab]/bids", "smith/study-/bids", "smith/study-memory/bids"):
        (tmp_path / folder).mkdir(parents=True)
    assert [s.project for s in discover(tmp_path)] == ["SMITH_MEMORY"]


def test_project_glob_matching_no_known_project_is_an_error_and_makes_no_folder(cli, tmp_path):
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY)
    for command in (("plan",), ("apply", "--yes")):
        code, out, err = cli(*command, str(root), "--config", str(cfg), "--project", "SMITH_*")
        assert code == 1, out + err
        assert "project pattern 'SMITH_*' matches no project" in err
        assert "===" not in out
    assert not root.exists()
    code, _, err = cli("plan", str(root), "--config", str(cfg))
    assert code == 1 and "no <pi>/study-<study>/bids datasets" in err


def test_project_glob_plans_each_matching_configured_or_exported_study(cli, emulator, tmp_path):
    for project in ("SMITH_MEMORY", "SMITH_AGING", "JONES_VISION"):
        emulator.archive.add_project(project)
        emulator.archive.add_session(project, "01", "01_MR1", date="2024-01-10")
    root = tmp_path / "export"
    (root / "Smith" / "study-Aging" / "bids").mkdir(parents=True)  # exported before, not configured
    cfg = write_config(tmp_path, PI_STUDY + '\nprojects = ["SMITH_MEMORY", "JONES_VISION"]')
    code, out, err = cli("plan", str(root), "--config", str(cfg), "--project", "SMITH_*", "--project", "SMITH_MEMORY")
    assert code == 0, out + err
    headers = [line for line in out.splitlines() if line.startswith("===")]
    assert headers == [  # the existing PI folder is shared, whatever its case
        f"=== SMITH_AGING: {root}/Smith/study-Aging/bids", f"=== SMITH_MEMORY: {root}/Smith/study-memory/bids",
    ]
    assert out.count("+ create") == 2 and "JONES" not in out
    assert not [p for p in root.rglob("*") if "*" in p.name]


def _export_study(archive, root, folder: str, project: str):
    """A study dataset as apply leaves it: one output file and a lock recording it."""
    bids = root / folder
    bids.mkdir(parents=True)
    archive.add_project(project)
    exp = archive.add_session(project, "01", "01_MR1", date="2024-01-10")
    rec = record_as_exported(archive, exp, bids)
    out = rec.outputs[0]
    data = (bids / out.path).read_bytes()
    output = OutputRecord(out.path, len(data), hashlib.sha256(data).hexdigest(), out.mtime_ns)
    write_lock(bids, Lock.new().with_session(replace(rec, project=project, outputs=(output,))))
    return bids / out.path


def test_check_walks_every_study_and_the_worst_result_wins(cli, emulator, tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    cfg = write_config(tmp_path, PI_STUDY)
    code, out, err = cli("check", str(root), "--config", str(cfg))
    assert code == 1 and f"error: no <pi>/study-<study>/bids datasets under {root}" in err
    _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY")
    nifti = _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION")
    code, out, err = cli("check", str(root), "--config", str(cfg), "--full")
    assert code == 0, out + err
    assert f"=== JONES_VISION: {root}/jones/study-vision/bids" in out
    assert f"=== SMITH_MEMORY: {root}/smith/study-memory/bids" in out
    assert out.count("OK: lock serial 1, 1 session, 1 output verified (size and sha256) in ") == 2
    nifti.unlink()
    (root / "lee" / "study-pilot" / "bids").mkdir(parents=True)  # an apply that never got to write its lock
    code, out, err = cli("check", str(root), "--config", str(cfg))
    assert code == 1
    assert out.count("OK: lock serial 1") == 1 and out.count("FAILED: 1 problem(s)") == 1
    assert "=== LEE_PILOT" in out and f"error: no lock at {root}/lee/study-pilot/bids/.xnat2bids.lock" in err


def test_show_walks_every_study(cli, emulator, tmp_path):
    root = tmp_path / "export"
    root.mkdir()
    cfg = write_config(tmp_path, PI_STUDY)
    code, out, _ = cli("show", str(root), "--config", str(cfg))
    assert code == 0 and f"No <pi>/study-<study>/bids datasets under {root}: nothing exported yet." in out
    code, out, _ = cli("status", str(root), "--config", str(cfg))
    assert code == 0 and f"No <pi>/study-<study>/bids datasets under {root}: no SLURM batch." in out
    _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY")
    _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION")
    code, out, err = cli("show", str(root), "--config", str(cfg))
    assert code == 0, out + err
    assert "nothing exported" not in out
    for folder, project in (("jones/study-vision/bids", "JONES_VISION"), ("smith/study-memory/bids", "SMITH_MEMORY")):
        assert f"=== {project}: {root}/{folder}" in out
        assert f"{root}/{folder}/.xnat2bids.lock: lineage" in out
        assert f" {project}/" in out
    code, _, err = cli("show", str(root), "--config", str(cfg), "--json")
    assert code == 1 and "--json needs one dataset" in err


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


def test_forget_finds_the_study_whose_lock_records_the_session_and_history_walks_them(cli, emulator, tmp_path):
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY)
    _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY")
    _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION")
    [jones] = [e for e in emulator.archive.sessions("JONES_VISION")]
    code, out, err = cli("forget", "--yes", jones.id, str(root), "--config", str(cfg))
    assert code == 0, out + err
    assert read_lock(root / "jones/study-vision/bids").sessions == {}
    assert len(read_lock(root / "smith/study-memory/bids").sessions) == 1
    code, _, err = cli("forget", "XNAT_E99999", str(root), "--config", str(cfg))
    assert code == 1 and "XNAT_E99999 is in no lock of the <pi>/study-<study>/bids datasets under" in err

    code, out, _ = cli("history", str(root), "--config", str(cfg))
    assert code == 0
    assert f"=== JONES_VISION: {root}/jones/study-vision/bids" in out and out.count("No history yet.") == 1
    jones_history = out.split("=== ")[1]  # the lock written without an apply, then the forget
    assert "unrecorded by " in jones_history and "serial 0 → 1" in jones_history
    assert "forget by " in jones_history and "serial 1 → 2" in jones_history


def test_a_study_folder_given_directly_is_one_dataset(cli, emulator, tmp_path):
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY)
    study = _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY").parents[3]
    assert study == root / "smith/study-memory/bids"
    code, out, err = cli("show", str(study), "--config", str(cfg), "--json")
    assert code == 0, out + err
    assert [s["project"] for s in json.loads(out)["sessions"]] == ["SMITH_MEMORY"]
    code, out, err = cli("check", str(study), "--config", str(cfg))
    assert code == 0 and "===" not in out and "OK: lock serial 1, 1 session" in out
    code, out, err = cli("status", str(study), "--config", str(cfg), "--json")
    assert code == 0, out + err
    assert json.loads(out)["holder"] is None
    for command in ("status", "history", "show"):
        code, out, err = cli(command, str(root), "--config", str(cfg), "--json")
        assert code == 1 and f"pass a study's bids folder ({root}/<pi>/study-<study>/bids)" in err
        assert json.loads(out)["error"]["kind"] == "config"  # a document for scripts, not several


def test_status_finalize_and_force_unlock_walk_every_study(cli, emulator, tmp_path):
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY)
    _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY")
    jones = _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION").parents[3]
    # A lock left by an apply in another PID namespace (a container): only the user can release it.
    identity = {**_our_identity(os.getpid()), "pidns": _ns_inode("pid") + 1}
    state_lock_path(jones).write_text(_holder_json("c0nta1ner000", os.getpid(), **identity))

    code, out, err = cli("status", str(root), "--config", str(cfg))
    assert code == 0, out + err
    assert f"=== JONES_VISION: {jones}\n{jones} is locked: " in out
    assert f"No SLURM batch in {root}/smith/study-memory/bids." in out
    code, out, err = cli("finalize", str(root), "--config", str(cfg))
    assert code == 0, out + err
    assert out.count("Nothing to finalize in") == 2
    code, _, err = cli("finalize", str(root), "--config", str(cfg), "--batch", "b0000000")
    assert code == 1 and f"no batch b0000000 in the <pi>/study-<study>/bids datasets under {root}" in err

    code, _, err = cli("force-unlock", "0ther0ns0000", str(root), "--config", str(cfg))
    assert code == 1 and "no <pi>/study-<study>/bids dataset under" in err
    assert state_lock_path(jones).exists()
    code, out, err = cli("force-unlock", "c0nta1ner000", str(root), "--config", str(cfg))
    assert code == 0, out + err
    assert f"Removed the state lock of {jones}" in out
    assert not state_lock_path(jones).exists()


def test_an_invalid_lock_in_one_study_leaves_the_others_checked(cli, emulator, tmp_path):
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY)
    _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY")
    jones = _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION").parents[3]
    broken = (jones / ".xnat2bids.lock").read_bytes() + b"x = = \n"
    (jones / ".xnat2bids.lock").write_bytes(broken)
    for command in ("check", "show", "history", "status"):
        code, out, err = cli(command, str(root), "--config", str(cfg))
        assert code == (1 if command in ("check", "show") else 0), out + err
        assert f"=== SMITH_MEMORY: {root}/smith/study-memory/bids" in out
    code, out, err = cli("check", str(root), "--config", str(cfg))
    assert "OK: lock serial 1, 1 session" in out and f"{jones}/.xnat2bids.lock: not valid TOML" in err
    assert (jones / ".xnat2bids.lock").read_bytes() == broken


def test_forget_walks_past_an_invalid_lock_and_takes_a_study_folder_directly(cli, emulator, tmp_path):
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY)
    smith = _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY").parents[3]
    jones = _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION").parents[3]
    (jones / ".xnat2bids.lock").write_bytes((jones / ".xnat2bids.lock").read_bytes() + b"x = = \n")
    [s1] = emulator.archive.sessions("SMITH_MEMORY")
    code, out, err = cli("forget", "--yes", s1.id, str(root), "--config", str(cfg))
    assert code == 0, out + err
    assert read_lock(smith).sessions == {}
    code, _, err = cli("forget", "XNAT_E99999", str(root), "--config", str(cfg))
    assert code == 1 and f"unreadable locks: {jones}" in err
    _export_study(emulator.archive, root, "lee/study-pilot/bids", "LEE_PILOT")
    [s3] = emulator.archive.sessions("LEE_PILOT")
    code, out, err = cli("forget", "--yes", s3.id, str(root / "lee/study-pilot/bids"), "--config", str(cfg))
    assert code == 0, out + err
    assert read_lock(root / "lee/study-pilot/bids").sessions == {}


def test_a_session_moved_between_studies_says_so_in_the_study_it_moved_to(cli, emulator, tmp_path):  # row 10
    root = tmp_path / "export"
    cfg = write_config(tmp_path, PI_STUDY + '\nprojects = ["SMITH_MEMORY", "JONES_VISION"]')
    _export_study(emulator.archive, root, "smith/study-memory/bids", "SMITH_MEMORY")
    _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION")
    [moved] = emulator.archive.sessions("SMITH_MEMORY")
    emulator.archive.add_session("SMITH_MEMORY", "02", "02_MR1", date="2024-01-11")
    moved.project, moved.label = "JONES_VISION", "01_MR2"  # moved in XNAT (no REST route for it here)
    code, out, err = cli("plan", str(root), "--config", str(cfg))
    assert code == 0, out + err
    sections = {part.split(":")[0]: part for part in out.split("=== ")[1:]}
    smith, jones = sections["SMITH_MEMORY"], sections["JONES_VISION"]
    assert f"- orphan  sub-01/ses-01MR1  SMITH_MEMORY/{moved.id}  no longer in XNAT project SMITH_MEMORY" in smith
    assert (f"+ create  sub-01/ses-01MR2  JONES_VISION/{moved.id}  project SMITH_MEMORY → JONES_VISION (also recorded "
            f"in {root}/smith/study-memory/bids: moved or shared in XNAT)") in jones
    assert "new in XNAT" not in jones


def _two_studies(archive, tmp_path):
    """Projects SMITH_MEMORY and JONES_VISION with a session each, a pi-study config naming both;
    (the tree's top, the config)."""
    for project in ("SMITH_MEMORY", "JONES_VISION"):
        archive.add_project(project)
        populate(archive, project, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    return tmp_path / "export", write_config(tmp_path, 'layout = "pi-study"\nprojects = ["SMITH_MEMORY", "JONES_VISION"]')


def test_a_study_folder_given_to_plan_or_apply_is_that_one_dataset_not_a_tree_inside_it(cli, emulator, tmp_path):
    root, cfg = _two_studies(emulator.archive, tmp_path)
    study = root / "smith/study-memory/bids"
    code, out, err = cli("apply", str(study), "--config", str(cfg), "--yes")  # before any export: by its path
    assert code == 0, out + err
    assert "=== SMITH_MEMORY: " in out and "JONES_VISION" not in out
    assert (study / ".xnat2bids.lock").is_file() and not (study / "smith").exists()
    assert [s.project for s in discover(root)] == ["SMITH_MEMORY"]

    code, out, err = cli("plan", str(study), "--config", str(cfg), "--detailed-exitcode")  # by its lock
    assert code == 0 and f"plan for {study} (lock serial" in out, out + err
    code, _, err = cli("plan", str(study), "--config", str(cfg), "--project", "JONES_VISION")
    assert code == 1 and "which --project JONES_VISION does not select" in err
    assert not (study / "jones").exists()


def test_a_project_table_no_study_has_is_noted_once_for_the_tree(cli, emulator, tmp_path):
    emulator.archive.add_project("SMITH_MEMORY")
    populate(emulator.archive, "SMITH_MEMORY", [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    cfg = write_config(tmp_path, 'layout = "pi-study"\nprojects = ["SMITH_MEMORY"]\n'
                                 '[project.SMITH_MEMRY.conversion]\nskip = ["func-*"]\n'
                                 '[project.SMITH_MEMORY.conversion]\nskip = ["dwi*"]')
    code, out, err = cli("plan", str(tmp_path / "export"), "--config", str(cfg))
    assert code == 0, out + err
    assert out.count("note: [project.SMITH_MEMRY] names a project that is neither configured, exported nor "
                     "selected") == 1
    assert "[project.SMITH_MEMORY]" not in out


def test_plan_json_and_a_saved_plan_work_on_a_study_folder_in_the_pi_study_layout(cli, emulator, tmp_path):
    root, cfg = _two_studies(emulator.archive, tmp_path)
    code, _, err = cli("plan", str(root), "--config", str(cfg), "--json")
    assert code == 1 and "--json and --out need one dataset" in err  # the tree: several documents

    study = root / "smith/study-memory/bids"
    code, out, err = cli("plan", str(study), "--config", str(cfg), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["bids_root"] == str(study) and doc["projects"] == ["SMITH_MEMORY"]
    assert [c["action"] for c in doc["changes"]] == ["create"]
    # The top of the tree with one project: that study's dataset, as given by its folder.
    code, out, err = cli("plan", str(root), "--config", str(cfg), "--json", "--project", "SMITH_MEMORY")
    assert code == 0, err
    fresh = ("created_at", "digest", "lock")  # a root with no lock yet: each plan names a new lineage
    assert {k: v for k, v in json.loads(out).items() if k not in fresh} == {k: v for k, v in doc.items() if k not in fresh}

    saved = tmp_path / "plan.json"
    assert cli("plan", str(study), "--config", str(cfg), "--out", str(saved))[0] == 0
    code, out, err = cli("apply", str(study), "--config", str(cfg), "--plan", str(saved), "--yes")
    assert code == 0, out + err
    assert sorted(r.project for r in read_lock(study).sessions.values()) == ["SMITH_MEMORY"]
    assert not (study / "smith").exists() and not (root / "jones").exists()


def test_a_study_held_by_another_apply_does_not_stop_the_others(cli, emulator, tmp_path):
    from reconcile import statelock

    root, cfg = _two_studies(emulator.archive, tmp_path)
    jones = root / "jones/study-vision/bids"
    jones.mkdir(parents=True)
    holder = statelock.acquire(jones, "apply")  # another apply, still running there
    try:
        code, out, err = cli("apply", str(root), "--config", str(cfg), "--yes")
    finally:
        statelock.release(jones, holder)
    assert code == 1, out + err
    assert f"(lock ID {holder.id})" in err and "Traceback" not in err
    headers = [line for line in out.splitlines() if line.startswith("===")]
    assert headers == [f"=== JONES_VISION: {jones}", f"=== SMITH_MEMORY: {root}/smith/study-memory/bids"]  # path order
    assert "Apply complete: 1 done" in out.split(headers[1])[1]
    assert [r.project for r in read_lock(root / "smith/study-memory/bids").sessions.values()] == ["SMITH_MEMORY"]
    assert read_lock(jones) is None
    code, out, err = cli("apply", str(root), "--config", str(cfg), "--yes")  # released: it goes ahead
    assert code == 0, out + err
    assert [r.project for r in read_lock(jones).sessions.values()] == ["JONES_VISION"]
    code, out, _ = cli("check", str(root), "--config", str(cfg))  # the offline commands walk the same order
    assert [line for line in out.splitlines() if line.startswith("===")] == headers


def test_project_selects_the_studies_the_offline_commands_walk(cli, emulator, tmp_path):
    root, cfg = _two_studies(emulator.archive, tmp_path)
    assert cli("apply", str(root), "--config", str(cfg), "--yes")[0] == 0
    smith, jones = root / "smith/study-memory/bids", root / "jones/study-vision/bids"
    for command in (("check",), ("show",), ("history",), ("status",)):
        code, out, err = cli(*command, str(root), "--config", str(cfg), "-p", "SMITH_*")
        assert code == 0, out + err
        assert [line for line in out.splitlines() if line.startswith("===")] == [f"=== SMITH_MEMORY: {smith}"]
    code, out, _ = cli("check", str(root), "--config", str(cfg), "-p", "JONES_VISION", "-p", "SMITH_MEMORY")
    assert code == 0 and out.count("===") == 2 and "OK: lock serial 1, 1 session" in out
    code, out, err = cli("show", str(root), "--config", str(cfg), "-p", "DOE_*")
    assert code == 1 and "project pattern 'DOE_*' matches no project exported under" in err and "===" not in out
    code, out, err = cli("history", str(root), "--config", str(cfg), "-p", "DOE_SLEEP")
    assert code == 1 and f"no dataset of DOE_SLEEP under {root}" in err and "===" not in out
    # A study folder given directly: its own project selects it, another is an error.
    code, out, err = cli("show", str(jones), "--config", str(cfg), "-p", "JONES_*", "--json")
    assert code == 0 and [s["project"] for s in json.loads(out)["sessions"]] == ["JONES_VISION"]
    code, out, err = cli("check", str(jones), "--config", str(cfg), "-p", "SMITH_MEMORY")
    assert code == 1 and "which --project SMITH_MEMORY does not select" in err


def test_project_on_an_offline_command_of_a_flat_dataset_is_refused(cli, tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    code, out, err = cli("check", str(root), "-p", "PROJ")
    assert code == 1 and "--project selects studies of the pi-study layout" in err and "Traceback" not in err


def test_a_signal_that_cancels_one_studys_apply_starts_no_other_study(tmp_path, monkeypatch, capsys):
    import reconcile.cli as cli

    cfg = parse_config({"layout": "pi-study", "projects": ["SMITH_ALPHA", "SMITH_BETA"]})
    monkeypatch.setattr(cli, "_stopping", False)
    started = []

    def cancelled(where, selection):  # what run_apply's Ctrl-C / SIGTERM handler leaves behind
        started.append(selection.projects)
        cli._stopping = True
        return 1

    assert cli.for_each_study(cfg, tmp_path, Selection(), cancelled) == 1
    assert started == [("SMITH_ALPHA",)]
    assert "Stopped before SMITH_BETA: the remaining studies were not started." in capsys.readouterr().out
