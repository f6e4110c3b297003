"""`xnat2bids plan`/`--diff`/`check`/`show` end to end: CLI → client → emulator over HTTP."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import jsonschema
import pytest
import requests
from worlds import SMALL, add, add_sessions, exported_root, redate, write_config

from reconcile.config import Config, load_config
from reconcile.lock import lock_path, read_lock, write_lock
from reconcile.schema import load_schema


def test_plan_on_empty_root_lists_creates_and_exits_2(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 2)
    code, out, _ = cli("plan", str(tmp_path / "bids"), "--project", "PROJ", "--detailed-exitcode")
    assert code == 2
    assert "+ create  sub-SUBJ01/ses-SUBJ01MR1" in out
    assert "Plan: 2 to create, 0 to update, 0 drifted, 0 orphaned, 0 unchanged." in out
    assert f"note: {tmp_path / 'bids'} does not exist: apply creates it and exports every session" in out
    assert not (tmp_path / "bids").exists()  # planning writes nothing


def test_plan_makes_one_listing_request_per_project(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 5)
    emulator.app.reset_requests()
    cli("plan", str(tmp_path), "--project", "PROJ")
    listings = [r for r in emulator.app.requests if r[1].endswith("/experiments")]
    assert len(listings) == 1


def test_up_to_date_root_exits_0_with_no_changes(cli, emulator, tmp_path):
    root = exported_root(emulator.archive, tmp_path, add_sessions(emulator.archive, 2))
    code, out, _ = cli("plan", str(root), "--project", "PROJ", "--detailed-exitcode")
    assert code == 0, out
    assert "No changes. 2 sessions up to date." in out


def test_redated_session_via_rest_is_planned_as_update(cli, emulator, tmp_path):
    exps = add_sessions(emulator.archive, 2)
    root = exported_root(emulator.archive, tmp_path, exps)
    insert_before = emulator.archive.get_session(exps[1].id).insert_date
    r = requests.put(
        f"{emulator.url}/data/projects/PROJ/subjects/{exps[1].subject_id}/experiments/{exps[1].id}",
        params={"xnat:mrSessionData/date": "2024-02-01"}, auth=(emulator.user, emulator.password), timeout=10,
    )
    assert r.status_code == 200
    assert emulator.archive.get_session(exps[1].id).insert_date == insert_before
    code, out, _ = cli("--diff", str(root), "--config", str(write_config(tmp_path, 'projects = ["PROJ"]')))
    assert code == 2
    assert "~ update  sub-SUBJ02/ses-SUBJ02MR1" in out
    assert "date 2024-01-10 → 2024-02-01 (re-dated in XNAT)" in out


def test_json_plan_follows_its_schema_and_can_be_saved(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    saved = tmp_path / "plan.json"
    code, out, _ = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--json", "--out", str(saved))
    assert code == 0
    doc = json.loads(out)
    jsonschema.validate(doc, load_schema("plan"))
    assert doc["summary"] == {"create": 1, "update": 0, "drift": 0, "orphan": 0, "unchanged": 0}
    assert doc["changes"][0]["reasons"] == [{"code": "new", "message": "new in XNAT"}]
    assert json.loads(saved.read_text())["changes"] == doc["changes"]


def test_deleted_session_is_orphan_and_removed_file_is_drift(cli, emulator, tmp_path):
    exps = add_sessions(emulator.archive, 3)
    root = exported_root(emulator.archive, tmp_path, exps)
    emulator.archive.delete_session(exps[0].id)
    (root / "sub-SUBJ02/ses-SUBJ02MR1/anat/t1.nii.gz").unlink()
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2
    assert "- orphan  sub-SUBJ01/ses-SUBJ01MR1" in out
    assert "! drift   sub-SUBJ02/ses-SUBJ02MR1" in out and "missing: sub-SUBJ02/ses-SUBJ02MR1/anat/t1.nii.gz" in out
    assert (root / "sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz").exists()  # orphans are never deleted
    # The advice names the root planned (run bare, forget would look in the default root) and the config.
    config = write_config(tmp_path, "")
    saved = tmp_path / "plan.json"
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "-c", str(config), "--insecure", "--out", str(saved))
    assert f"`xnat2bids forget {exps[0].id} {root} -c {config}` drops one from the lock" in out
    # apply --plan talks to XNAT as the plan did; forget asks nothing of it
    assert f"run `xnat2bids apply --plan {saved} -c {config} --insecure` to carry it out" in out
    # So does the plan apply shows, and the seed spellings' (run as printed, forget could drop the
    # session from the lock of the config's root).
    for command in (("apply", str(root), "-p", "PROJ", "-c", str(config), "--yes"),
                    ("-c", str(config), "--update", str(root)), ("-c", str(config), "--diff", str(root))):
        code, out, err = cli(*command)
        assert f"`xnat2bids forget {exps[0].id} {root} -c {config}` drops one from the lock" in out, out + err
    code, out, err = cli("forget", exps[0].id, str(root), "-c", str(config), "--yes")
    assert code == 0 and exps[0].id not in read_lock(root).sessions, out + err


def test_file_added_without_redate_needs_deep(cli, emulator, tmp_path):
    exps = add_sessions(emulator.archive, 1)
    emulator.archive.add_scan(exps[0].id, "1", type="anat-T1w", series_description="anat-T1w", files={"1.dcm": b"a" * 10})
    from reconcile.credentials import Credentials
    from reconcile.lock import read_lock
    from reconcile.xnat import XnatClient

    root = exported_root(emulator.archive, tmp_path, exps)
    with XnatClient(emulator.url, Credentials(emulator.user, emulator.password, "env")) as client:
        scans = client.list_scans(client.list_experiments("PROJ")[0])
    lock = read_lock(root)
    rec = lock.sessions[exps[0].id]
    from dataclasses import replace

    write_lock(root, lock.with_session(replace(rec, scans=tuple(s.record() for s in scans))))
    emulator.archive.upload_file(exps[0].id, "1", "DICOM", "2.dcm", b"b" * 2000)
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "--deep" in out
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode", "--deep")
    assert code == 2
    assert "scan 1: 1 file added (+2.0 kB)" in out


@pytest.mark.slow  # the client's retries with backoff: ~30 s
def test_a_deep_listing_that_fails_for_one_session_stops_only_its_project(cli, emulator, tmp_path):  # row 11
    from reconcile.emulator import Fault

    bad, good = add_sessions(emulator.archive, 2)
    emulator.archive.add_project("OTHER")
    other = emulator.archive.add_session("OTHER", "O1", "O1_MR1", date="2024-01-10")
    emulator.app.faults.add(Fault(route=rf"/experiments/{bad.id}/scans", kind="status", status=503))
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "-p", "OTHER", "--deep",
                         "--detailed-exitcode")
    assert code == 1, out + err
    assert (f"listing of project PROJ failed: the scans of session {bad.label} ({bad.id}): "
            f"XNAT at {emulator.url} kept failing") in out + err
    assert f"+ create  sub-O1/ses-O1MR1  OTHER/{other.id}" in out
    assert good.id not in out  # nothing planned for PROJ

    # A project whose every session fails (an outage): the sessions not yet asked are left out,
    # so it costs the retries of those in flight, not of every session.
    many = [emulator.archive.add_session("PROJ", f"M{i:02d}", f"M{i:02d}_MR1", date="2024-01-10") for i in range(60)]
    emulator.app.faults.add(Fault(route=r"/projects/PROJ/subjects/[^/]+/experiments/[^/]+/scans", kind="status",
                                  status=503))
    emulator.app.reset_requests()
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--deep")
    assert code == 1 and "listing of project PROJ failed: the scans of session" in out + err
    asked = {p.split("/experiments/")[1].split("/")[0] for _, p, _ in emulator.app.requests if p.endswith("/scans")}
    assert 0 < len(asked) < len(many)


def test_a_shared_session_is_not_moved_while_its_recorded_project_fails_to_list(cli, emulator, tmp_path):  # rows 10, 11
    from reconcile.emulator import Fault

    exps = add_sessions(emulator.archive, 2)
    root = exported_root(emulator.archive, tmp_path, exps)  # recorded under PROJ
    emulator.archive.add_project("PROJ2")
    emulator.archive.share_session(exps[1].id, "PROJ2", "P2_002_visit1")
    code, out, err = cli("plan", str(root), "-p", "PROJ", "-p", "PROJ2", "--detailed-exitcode")
    assert code == 0, out + err
    assert "No changes. 2 sessions up to date." in out  # listed by its own project too: the share changes nothing

    emulator.app.faults.add(Fault(route=r"/projects/PROJ/experiments$", kind="status", status=503))
    code, out, err = cli("plan", str(root), "-p", "PROJ", "-p", "PROJ2", "--detailed-exitcode")
    assert code == 1, out + err
    assert "listing of project PROJ failed" in out + err
    assert "update" not in out and "P2002visit1" not in out and exps[1].id not in out  # a share is no move
    before = read_lock(root)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "-p", "PROJ2", "--yes")
    assert code == 1, out + err
    assert "update" not in out and exps[1].id not in out  # apply was about to convert it under the share's label
    assert read_lock(root) == before and before.sessions[exps[1].id].bids_session == "SUBJ02MR1"


def test_a_new_shared_session_is_created_under_its_primary_project(cli, emulator, tmp_path):  # row 10
    archive = emulator.archive
    archive.add_project("STUDY")
    archive.add_project("ARCHIVE")
    own = archive.add_session("STUDY", "001", "001_visit1", date="2024-01-10")
    archive.share_session(own.id, "ARCHIVE", "ARCH_001_visit1")
    # The config's order, or the projects' names, would both say ARCHIVE.
    config = write_config(tmp_path, 'projects = ["ARCHIVE", "STUDY"]')
    code, out, err = cli("plan", str(tmp_path / "bids"), "--config", str(config), "--detailed-exitcode")
    assert code == 2, out + err
    assert f"+ create  sub-001/ses-001visit1  STUDY/{own.id}" in out
    assert "Plan: 1 to create" in out and "ARCH" not in out


def test_unknown_project_is_an_error_exit_1(cli, emulator, tmp_path):
    code, out, err = cli("plan", str(tmp_path), "-p", "NOPE", "--detailed-exitcode")
    assert code == 1
    assert "NOPE" in out


def test_usage_error_exits_1_not_2(cli):
    code, _, err = cli("plan", "--no-such-option")
    assert code == 1
    assert "No such option" in err


def test_unknown_config_key_suggests_the_close_match(cli, tmp_path):
    cfg = write_config(tmp_path, 'projets = ["PROJ"]')
    code, _, err = cli("plan", str(tmp_path), "--config", str(cfg))
    assert code == 1
    assert "unknown key 'projets' (did you mean 'projects'?)" in err


def test_invalid_lock_is_an_error_and_left_untouched(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    root.mkdir()
    lock_path(root).write_text("format_version = 1\nthis is not toml = =\n")
    before = lock_path(root).read_bytes()
    code, _, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 1 and "error:" in err
    assert lock_path(root).read_bytes() == before


def test_bad_credentials_are_a_clear_error_without_the_password(cli, monkeypatch, tmp_path):
    monkeypatch.setenv("XNAT_PASS", "wrong-sentinel-pw")
    code, out, err = cli("plan", str(tmp_path), "-p", "PROJ")
    assert code == 1
    assert "rejected" in err.lower() or "credentials" in err.lower()
    assert "wrong-sentinel-pw" not in out + err


def test_check_and_show_report_on_the_lock(cli, emulator, tmp_path):
    root = exported_root(emulator.archive, tmp_path, add_sessions(emulator.archive, 2))
    code, out, _ = cli("check", str(root), "--full")
    assert code == 1  # the fake outputs have a dummy sha256
    assert "content of sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz differs" in out
    code, out, _ = cli("check", str(root))
    assert code == 0 and "2 sessions, 2 outputs verified (size)" in out
    (root / "sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz").write_bytes(b"longer content")
    code, out, _ = cli("check", str(root))
    assert code == 1 and "size of sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz is 14, lock says 5" in out
    code, out, _ = cli("show", str(root))
    assert code == 0 and "2 sessions" in out and "sub-SUBJ02/ses-SUBJ02MR1" in out


def test_python_dash_m_works():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "reconcile", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("xnat2bids ")


def test_no_command_shows_the_help_and_fails_as_a_usage_error():
    # A cron line `xnat2bids $MODE` with MODE empty must not pass for a run.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "reconcile"], capture_output=True, text=True)
    assert out.returncode == 1 and "Commands:" in out.stdout and "--diff" in out.stdout, out
    assert out.stderr == "error: no command given\n"


def test_os_errors_are_one_line_errors_not_tracebacks(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    code, _, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--out", str(tmp_path / "no/such/dir/plan.json"))
    assert code == 1
    assert "error: No such file or directory: " in err and "Traceback" not in err
    code, _, err = cli("forget", "XNAT_E00001", str(tmp_path / "missing"))
    assert code == 1 and "Traceback" not in err


def saved_plan(cli, root, tmp_path, *args: str) -> tuple[Path, dict]:
    saved = tmp_path / "plan.json"
    code, out, err = cli("plan", str(root), "-p", "PROJ", "--out", str(saved), *args)
    assert code == 0, out + err
    return saved, json.loads(saved.read_text())


def signed(doc: dict) -> dict:
    """A plan document as plan would have written it with these values (its digest recomputed)."""
    from reconcile.render import _digest

    return {**doc, "digest": _digest(doc)}


def test_saved_plan_changed_after_plan_wrote_it_is_refused(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 2)
    root = tmp_path / "bids"
    saved, doc = saved_plan(cli, root, tmp_path)
    first = doc["changes"][0]
    edits = {
        "an address": {**doc, "changes": [{**first, "bids_subject": "999", "address": "sub-999/ses-01"}, *doc["changes"][1:]]},
        "the summary": {**doc, "summary": {**doc["summary"], "create": 10}},
        "an action": {**doc, "changes": [{**first, "action": "update"}, *doc["changes"][1:]]},
    }
    for what, edited in edits.items():
        saved.write_text(json.dumps(edited, indent=2))
        code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
        assert code == 1, what
        assert f"error: {saved} was changed after plan wrote it (its content does not match its digest)" in err, what
        assert "hint: run plan --out again" in err and not root.exists(), what
    # Nor is a digest skipped by calling the plan older: a format 2 plan (no digest) is refused.
    del doc["digest"]
    saved.write_text(json.dumps({**doc, "format_version": 2}))
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and "(plan format 2), which did not record a digest of its content" in err and not root.exists()
    doc = json.loads(saved_plan(cli, root, tmp_path)[0].read_text())
    # Only its content counts: the same plan written out again in another layout applies.
    saved.write_text(json.dumps(doc, indent=4, sort_keys=False))
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert "changed after plan wrote it" not in err
    assert out.count("the session has no scans to convert") == 2, out  # carried out (these sessions have no scans)


def test_saved_plan_records_its_bids_root_and_config(cli, emulator, tmp_path, monkeypatch):
    add_sessions(emulator.archive, 1)
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, '[naming]\nsession_label = "strip-subject"')
    _, doc = saved_plan(cli, "bids", tmp_path, "-c", str(cfg))
    assert doc["format_version"] == 3
    assert doc["bids_root"] == str(tmp_path / "bids")
    assert doc["config_fingerprint"] == load_config(cfg).fingerprint() != Config().fingerprint()


def test_saved_plan_names_the_config_apply_needs(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    cfg = write_config(tmp_path, '[naming]\nsession_label = "strip-subject"')
    saved = tmp_path / "my plan.json"
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "-c", str(cfg), "--out", str(saved))
    assert code == 0, out + err
    assert f"run `xnat2bids apply --plan '{saved}' -c {cfg}` to carry it out." in out
    code, out, err = cli("apply", "--plan", str(saved), "-c", str(cfg), "--yes")  # as the hint says
    assert "stale" not in err and "the session has no scans to convert" in out, out + err


def test_saved_plan_of_a_root_without_a_lock_is_stale_once_a_lock_is_written(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "fresh"
    first, _ = saved_plan(cli, root, tmp_path)
    second = tmp_path / "second.json"
    assert cli("plan", str(root), "-p", "PROJ", "--out", str(second))[0] == 0
    assert cli("apply", "--plan", str(first), "--yes")[0] == 0
    code, out, err = cli("apply", "--plan", str(second), "--yes")
    assert code == 1 and f"error: plan is stale: {root} had no lock when it was made, and has one now (serial 1)" in err


def test_saved_plan_for_another_root_is_refused(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    saved, _ = saved_plan(cli, root_a, tmp_path)
    code, out, err = cli("apply", str(root_b), "--plan", str(saved), "--yes")
    assert code == 1
    assert f"error: plan is for another BIDS root: it was made for {root_a}, not {root_b}" in err
    assert f"hint: apply it to {root_a}, or run plan again for {root_b}" in err
    assert "create" not in out and not root_b.exists()  # not even an empty folder left behind


def test_saved_plan_applies_to_its_root_under_another_spelling(cli, emulator, tmp_path):
    root = exported_root(emulator.archive, tmp_path, add_sessions(emulator.archive, 1))
    saved, _ = saved_plan(cli, root, tmp_path)
    (tmp_path / "link").symlink_to(root)
    code, out, err = cli("apply", str(tmp_path / "link"), "--plan", str(saved), "--yes")
    assert code == 0, out + err
    assert "Nothing to apply." in out


def test_saved_plan_for_a_new_root_spelled_with_dot_dot_applies_there(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    (tmp_path / "elsewhere").mkdir()
    root = tmp_path / "elsewhere" / ".." / "bids"  # no folder yet: only the spelling can tell
    saved, _ = saved_plan(cli, root, tmp_path)
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 0, out + err
    assert (tmp_path / "bids" / ".xnat2bids.lock").is_file()


def test_saved_plan_made_with_another_config_is_refused(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    x, y = tmp_path / "x.toml", tmp_path / "y.toml"
    x.write_text('[naming]\nsession_label = "strip-subject"\n')
    y.write_text('[naming]\nsession_label = "label"\n')
    saved, _ = saved_plan(cli, root, tmp_path, "-c", str(x))
    code, out, err = cli("apply", str(root), "-c", str(y), "--plan", str(saved), "--yes")
    assert code == 1 and "create" not in out
    assert "error: plan is stale: it was made with a different config" in err and "hint: " in err
    assert not lock_path(root).exists() and not list(root.glob("sub-*"))
    code, _, err = cli("apply", str(root), "--plan", str(saved), "--yes")  # no -c: the default config
    assert code == 1 and "made with a different config" in err


def test_saved_plan_made_against_another_xnat_is_refused(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    saved, doc = saved_plan(cli, root, tmp_path)
    assert doc["xnat_url"] == emulator.url
    saved.write_text(json.dumps(signed({**doc, "xnat_url": "https://xnat.example.org"})))
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and "create" not in out
    assert f"error: plan is for another XNAT: it was made against https://xnat.example.org, not {emulator.url}" in err
    assert not lock_path(root).exists()


def test_saved_plan_for_another_xnat_is_said_so_before_a_login_that_cannot_reach_it(cli, emulator, tmp_path,
                                                                                     monkeypatch):
    # The plan's XNAT is up; this apply was pointed at another, which is down: the plan is for
    # another XNAT, whatever that one would answer (no login tried, no retries waited for).
    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    saved, _ = saved_plan(cli, root, tmp_path)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("XNAT_HOST", down)
    emulator.app.reset_requests()
    code, out, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1 and "create" not in out, out + err
    assert f"error: plan is for another XNAT: it was made against {emulator.url}, not {down}" in err, err
    assert "cannot reach" not in err and not root.exists()


def test_saved_plan_of_the_older_format_is_refused(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    saved, doc = saved_plan(cli, root, tmp_path)
    del doc["config_fingerprint"], doc["xnat_url"], doc["digest"]
    saved.write_text(json.dumps({**doc, "format_version": 1}))
    code, _, err = cli("apply", str(root), "--plan", str(saved), "--yes")
    assert code == 1
    assert "error: plan was saved by an older xnat2bids (plan format 1)" in err and "hint: run plan again" in err
    assert not lock_path(root).exists()


def test_selection_with_a_saved_plan_is_a_usage_error(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    saved, _ = saved_plan(cli, root, tmp_path)
    code, _, err = cli("apply", str(root), "--plan", str(saved), "-p", "PROJ", "--session", "*", "--yes")
    assert code == 1
    assert "Usage: xnat2bids apply" in err
    assert "--project, --session cannot be combined with --plan" in err
    assert not root.exists()


def test_a_file_that_is_not_a_saved_plan_is_refused_by_what_it_lacks(cli, tmp_path):
    for text in ("{}", '{"format_version": 2, "bids_root": "/x"}'):
        saved = tmp_path / "plan.json"
        saved.write_text(text)
        code, _, err = cli("apply", str(tmp_path / "bids"), "--plan", str(saved), "--yes")
        assert code == 1 and f"{saved} is not an xnat2bids plan: it lacks " in err and "generator" in err
        assert "made for , not" not in err and not (tmp_path / "bids").exists()


def test_a_project_glob_selects_among_the_projects_of_the_config_and_the_lock(cli, emulator, tmp_path):
    root = exported_root(emulator.archive, tmp_path, add_sessions(emulator.archive, 2))
    code, out, err = cli("plan", str(root), "-p", "PR*", "--detailed-exitcode")
    assert code == 0, out + err
    assert "No changes. 2 sessions up to date." in out
    code, _, err = cli("plan", str(root), "-p", "X*")
    assert code == 1
    assert "error: project pattern 'X*' matches no project in the config or the lock" in err


def _error_document(out: str) -> dict:
    doc = json.loads(out)
    jsonschema.validate(doc, load_schema("error"))
    return doc["error"]


def test_json_plan_that_cannot_log_in_prints_an_error_document(cli, emulator, tmp_path, monkeypatch):
    monkeypatch.setenv("XNAT_PASS", "not-the-password")
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--json")
    assert code == 1
    error = _error_document(out)
    assert error["kind"] == "auth"
    assert error["message"] in err and "not-the-password" not in out + err
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ")
    assert code == 1 and out == "" and "error:" in err  # without --json stdout stays empty


def test_json_commands_print_an_error_document_for_a_damaged_lock(cli, emulator, tmp_path):
    lock_path(tmp_path).write_text("format_version = [\n")
    for command in ("show", "plan"):
        args = (command, str(tmp_path), "--json") + (("-p", "PROJ") if command == "plan" else ())
        code, out, err = cli(*args)
        assert code == 1, (command, out, err)
        error = _error_document(out)
        assert error["kind"] == "lockfile", command
        assert error["message"] in err


def test_json_error_document_for_a_bad_config(cli, emulator, tmp_path):
    config = write_config(tmp_path, "projectz = [\"PROJ\"]")
    code, out, err = cli("plan", str(tmp_path / "bids"), "--config", str(config), "--json")
    assert code == 1
    error = _error_document(out)
    assert error["kind"] == "config" and "unknown key 'projectz'" in error["message"]
    assert error["message"] in err


def test_json_status_and_history_print_an_error_document_for_a_root_that_is_a_file(cli, emulator, tmp_path):
    root = tmp_path / "bids"
    root.write_text("not a folder\n")
    for command in ("status", "history"):
        code, out, err = cli(command, str(root), "--json")
        assert code == 1, (command, out, err)
        assert _error_document(out)["message"] in err


def test_check_json_gives_the_verdict_for_ci(cli, emulator, tmp_path):
    exps = add_sessions(emulator.archive, 2)
    root = exported_root(emulator.archive, tmp_path, exps)  # its lock records made-up sha256s
    code, out, _ = cli("check", str(root), "--json")
    assert code == 0, out
    doc = json.loads(out)
    jsonschema.validate(doc, load_schema("check"))
    assert (doc["ok"], doc["mode"], doc["sessions"], doc["problems"]) == (True, "size", 2, [])
    assert doc["outputs"] == sum(len(r.outputs) for r in read_lock(root).sessions.values()) > 0
    code, out, _ = cli("check", str(root), "--json", "--full")
    assert code == 1
    doc = json.loads(out)
    jsonschema.validate(doc, load_schema("check"))
    assert doc["ok"] is False and doc["mode"] == "sha256"
    assert [(p["code"], p["message"].endswith("differs from the lock (sha256)")) for p in doc["problems"]] == [
        ("content", True), ("content", True)]
    assert {p["session"] for p in doc["problems"]} == {e.id for e in exps}
    t1 = "sub-SUBJ02/ses-SUBJ02MR1/anat/t1.nii.gz"
    (root / t1).unlink()
    (root / t1.replace("SUBJ02", "SUBJ01")).write_bytes(b"another size")
    code, out, _ = cli("check", str(root), "--json")
    assert code == 1
    text_code, text_out, _ = cli("check", str(root))
    assert text_code == 1
    doc = json.loads(out)
    jsonschema.validate(doc, load_schema("check"))
    recorded = {o.path: o.size for r in read_lock(root).sessions.values() for o in r.outputs}
    assert doc["problems"] == [
        {"code": "size", "session": exps[0].id, "path": t1.replace("SUBJ02", "SUBJ01"),
         "message": f"{exps[0].id} sub-SUBJ01/ses-SUBJ01MR1: size of {t1.replace('SUBJ02', 'SUBJ01')} is 12, "
                    f"lock says {recorded[t1.replace('SUBJ02', 'SUBJ01')]}"},
        {"code": "missing", "session": exps[1].id, "path": t1,
         "message": f"{exps[1].id} sub-SUBJ02/ses-SUBJ02MR1: missing {t1}"},
    ]
    assert [line[len("problem: "):] for line in text_out.splitlines() if line.startswith("problem: ")] == [
        p["message"] for p in doc["problems"]]
    code, out, _ = cli("check", str(tmp_path / "nowhere"), "--json")
    assert code == 1 and _error_document(out)["kind"] in ("config", "os")


def test_a_listing_row_with_a_malformed_value_is_that_sessions_problem_only(cli, emulator, tmp_path):
    exp, other = add_sessions(emulator.archive, 2)
    emulator.archive.set_fields(exp.id, date="2024-03-001")  # XNAT keeps what a REST PUT sent
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ")
    assert code == 1, out + err
    assert (f"error: session {exp.id} (PROJ/SUBJ01_MR1): XNAT lists it with a malformed value (not an XNAT date: "
            "'2024-03-001')") in out
    assert f"+ create  sub-SUBJ02/ses-SUBJ02MR1  PROJ/{other.id}" in out  # the rest of the project is planned


def test_a_session_the_user_may_not_read_stops_only_its_project_in_a_deep_plan(cli, emulator, tmp_path):
    from reconcile.emulator import Fault

    bad, good = add_sessions(emulator.archive, 2)
    emulator.archive.add_project("OTHER")
    other = emulator.archive.add_session("OTHER", "O1", "O1_MR1", date="2024-01-10")
    emulator.app.faults.add(Fault(route=rf"/experiments/{bad.id}/scans", kind="status", status=403))
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "-p", "OTHER", "--deep")
    assert code == 1, out + err
    assert f"listing of project PROJ failed: the scans of session {bad.label} ({bad.id}): user " in out
    assert f"+ create  sub-O1/ses-O1MR1  OTHER/{other.id}" in out and good.id not in out


def test_terminal_controls_in_names_are_written_out_not_sent_to_the_terminal(cli, emulator, tmp_path):
    # A name from XNAT or the command line must not clear the screen or rewrite the line a user confirms.
    add_sessions(emulator.archive, 1)
    code, out, err = cli("plan", str(tmp_path / "bids"), "--project", "PROJ", "--project", "NO\x1b7\rPE\x9b1m")
    assert code == 1
    assert "NO\\x1b7\\rPE\\x9b1m" in out + err
    assert not any(c in out + err for c in "\x1b\r\x9b")
    assert "+ create  sub-SUBJ01/ses-SUBJ01MR1" in out, err  # the other project is planned as usual


def test_plan_notes_downloads_left_for_sessions_it_does_not_change(cli, emulator, tmp_path):
    # An interrupted apply's staging of a session deleted in XNAT since: nothing would ever use or
    # remove it; plan says so. One still planned (or whose commit is journalled) is not named.
    [kept, gone] = add_sessions(emulator.archive, 2)
    root = tmp_path / "bids"
    for exp_id in (kept.id, "XNAT_E99999"):
        (root / ".xnat2bids/staging" / exp_id / "dicom/1").mkdir(parents=True)
        (root / ".xnat2bids/staging" / exp_id / "dicom/1/1.dcm").write_bytes(b"DICM")
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 0, out + err
    assert ("note: .xnat2bids/staging holds what an earlier apply (stopped or failed) downloaded for 1 session(s) no change here asks "
            "for (XNAT_E99999): apply reuses it if they are planned again; delete it to free the space") in out
    assert (root / ".xnat2bids/staging/XNAT_E99999/dicom/1/1.dcm").read_bytes() == b"DICM"  # plan only tells
    # While another process applies, what is in staging may be its work: no note.
    import subprocess
    import sys

    from test_statelock import _holder_json, _our_identity

    from reconcile.statelock import state_lock_path

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state_lock_path(root).write_text(_holder_json("0ther0apply0", other.pid, **_our_identity(other.pid)))
        code, out, err = cli("plan", str(root), "-p", "PROJ")
        assert code == 0 and "is at work on this root" in err and ".xnat2bids/staging holds" not in out, out + err
    finally:
        other.kill()
        other.wait()


def test_plan_out_writes_through_a_link_and_into_a_pipe(cli, emulator, tmp_path):
    # A link (plans kept in a shared folder) is left a link, its target gets the plan; a pipe
    # (`--out >(jq .)`, /dev/stdout) is written to, never replaced by a file.
    import threading

    add_sessions(emulator.archive, 1)
    real, link = tmp_path / "plans/real.json", tmp_path / "link.json"
    real.parent.mkdir()
    real.write_text("{}")
    link.symlink_to(real)
    assert cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--out", str(link))[0] == 0
    assert link.is_symlink() and json.loads(real.read_text())["changes"][0]["action"] == "create"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()))
    reader.start()
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--out", str(fifo))
    reader.join(timeout=30)
    assert code == 0, out + err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and json.loads(got[0])["changes"][0]["action"] == "create"


def test_check_of_a_root_whose_first_apply_failed_every_session_passes(cli, emulator, tmp_path):
    add_sessions(emulator.archive, 1)  # no scans: its conversion fails
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 1
    assert (root / ".xnat2bids/history.jsonl").is_file() and not (root / ".xnat2bids.lock").exists()
    code, out, err = cli("check", str(root))
    assert code == 0 and "OK: lock serial 0, 0 sessions" in out, out + err


def test_check_of_a_root_whose_lock_was_lost_fails(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    (root / ".xnat2bids.lock").rename(tmp_path / "elsewhere.lock")
    code, out, err = cli("check", str(root))
    assert code == 1 and f"error: no lock at {root / '.xnat2bids.lock'}" in err
    assert "hint: its history tells of exports: restore the lock (from git or a backup)" in err
    code, out, err = cli("plan", str(root), "-p", "PROJ")  # plan says the same, not only "move the folder out"
    assert f"note: {root} has no .xnat2bids.lock, but its history tells of exports (up to lock serial 1): " \
           "restore the lock (from git or a backup) before applying" in out, out + err
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and f"error: apply refused: {root} has no .xnat2bids.lock, but its history" in err, out + err
    assert not (root / ".xnat2bids.lock").exists()


def test_plan_says_when_the_lock_is_older_than_the_history(cli, emulator, tmp_path):
    # A lock restored from an older backup: what was exported since is missing from it.
    add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    backup = (root / ".xnat2bids.lock").read_bytes()
    code, out, _ = cli("plan", str(root), "-p", "PROJ")
    assert "older than the history" not in out
    add(emulator.archive, [("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    (root / ".xnat2bids.lock").write_bytes(backup)
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert ("note: the lock (serial 1) is older than the history, which tells of exports up to serial 2: restored "
            "from an older backup or commit?") in out, out + err
    # apply (with --git-commit it would share it) refuses a lock without what was exported since
    redate(emulator, emulator.archive.sessions("PROJ")[0], "2024-02-01")
    for how in ((), ("--executor", "slurm")):
        code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", *how)
        assert code == 1 and "error: apply refused: the lock (serial 1) is older than the history" in err, out + err
        assert "--accept-older-lock goes on with this lock" in err
        assert (root / ".xnat2bids.lock").read_bytes() == backup
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--accept-older-lock")
    assert code == 1 and "sub-02/ses-02MR1 exists but the lock records no session there" in out, out + err
    assert read_lock(root).sessions[emulator.archive.sessions("PROJ")[0].id].date == "2024-02-01"


def test_plan_out_dev_stdout_appends_to_a_log_the_shell_opened(emulator, tmp_path):
    # `plan --out /dev/stdout >> cron.log`: /dev/stdout resolves to the log file, which is written
    # to (appended), never replaced by a new file.
    import subprocess
    import sys

    add_sessions(emulator.archive, 1)
    log = tmp_path / "cron.log"
    log.write_text("earlier line\n")
    env = {**os.environ, "XNAT_HOST": emulator.url, "XNAT_USER": emulator.user, "XNAT_PASS": emulator.password}
    with open(log, "a") as out:
        done = subprocess.run([sys.executable, "-m", "reconcile", "plan", str(tmp_path / "bids"), "-p", "PROJ",
                               "--out", "/dev/stdout"], stdout=out, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    text = log.read_text()
    assert text.startswith("earlier line\n")
    assert json.loads(text.removeprefix("earlier line\n"))["format_version"] == 3  # the document alone, as --json
    # `>` and a pipe: the document alone too, never mixed with the plan's text.
    for how in ("file", "pipe"):
        with open(log, "w") as out:
            done = subprocess.run([sys.executable, "-m", "reconcile", "plan", str(tmp_path / "bids"), "-p", "PROJ",
                                   "--out", "/dev/stdout"], stdout=out if how == "file" else subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        got = log.read_text() if how == "file" else done.stdout
        assert json.loads(got)["changes"][0]["action"] == "create", how


def test_sessions_the_config_excludes_are_neither_created_updated_nor_orphaned(cli, emulator, tmp_path):
    one, two = add_sessions(emulator.archive, 2)
    root = exported_root(emulator.archive, tmp_path, [one, two])
    scout = emulator.archive.add_session("PROJ", "SUBJ03", "SUBJ03_scout", date="2024-01-10")
    kept = add(emulator.archive, [("SUBJ04", "SUBJ04_MR1", "2024-01-10")])["SUBJ04_MR1"]
    emulator.archive.set_fields(one.id, date="2024-02-01")  # re-dated: an update
    emulator.archive.delete_session(two.id)  # gone: an orphan

    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--json", "--detailed-exitcode")
    assert code == 2 and {(c["action"], c["experiment_id"]) for c in json.loads(out)["changes"]} == {
        ("update", one.id), ("orphan", two.id), ("create", scout.id), ("create", kept.id)}

    config = write_config(tmp_path, f'[project.PROJ]\nexclude = ["SUBJ01_MR1", "{two.id}", "*_scout"]')
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--json", "--detailed-exitcode", "-c", str(config))
    doc = json.loads(out)
    assert code == 2 and [(c["action"], c["experiment_id"]) for c in doc["changes"]] == [("create", kept.id)]
    assert ("3 sessions left out by the config's exclude (PROJ/SUBJ01_MR1, PROJ/SUBJ02_MR1, PROJ/SUBJ03_scout): "
            "neither exported, updated nor orphaned; the files of one exported before stay as they are") in doc["notes"]

    # apply leaves them as they are: the lock keeps both records as they were, the scout is not exported.
    before = read_lock(root)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(config))
    assert code == 0, out + err
    after = read_lock(root)
    assert sorted(after.sessions) == sorted([one.id, two.id, kept.id])
    assert after.sessions[one.id] == before.sessions[one.id] and after.sessions[two.id] == before.sessions[two.id]
    assert not (root / "sub-SUBJ03").exists()


def test_an_exclude_key_mistyped_is_refused_with_the_close_match(tmp_path):
    with pytest.raises(Exception, match="did you mean 'exclude'"):
        load_config(write_config(tmp_path, '[project.PROJ]\nexlude = ["x"]'))


@pytest.mark.parametrize("emptied", ["scans", "files"])
def test_a_deep_listing_with_nothing_in_a_recorded_session_is_a_problem_not_an_update(cli, emulator, tmp_path,
                                                                                       emptied):
    e = add(emulator.archive, [("01", "01_MR1", "2024-01-10")])["01_MR1"]
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    session = emulator.archive.get_session(e.id)
    for scan in session.scans.values():  # as a failed or partial listing shows it
        for resource in scan.resources.values():
            resource.files.clear()
    if emptied == "scans":
        session.scans.clear()
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--deep", "--json")
    doc = json.loads(out)
    listed = "no scans" if emptied == "scans" else "2 scans without files"
    assert code == 1 and doc["changes"] == [] and [p["message"] for p in doc["problems"]] == [
        f"sub-01/ses-01MR1: XNAT listed {listed} for PROJ/{e.id}, which the lock records with 2 scans; "
        "not taken for a deletion"]
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--deep")
    assert code == 1 and read_lock(root).serial == 1 and (root / "sub-01/ses-01MR1/anat").is_dir()


def test_plan_does_not_wait_long_on_a_slurm_controller_that_hangs(cli, emulator, tmp_path, monkeypatch):
    # A batch holds the root; squeue hangs (slurmctld overloaded): plan says the batch may be at
    # work after a short wait instead of a minute's, and goes on.
    from test_statelock import _holder_json

    from reconcile import cli as cli_module
    from reconcile.statelock import state_lock_path

    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    (root / ".xnat2bids").mkdir(parents=True)
    state_lock_path(root).write_text(_holder_json("0batch0", 1, jobs=("4242", "4243")))
    fake = tmp_path / "slurm-hangs"
    fake.mkdir()
    (fake / "squeue").write_text("#!/bin/sh\nexec sleep 20\n")  # then says no job is queued
    (fake / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    monkeypatch.setattr(cli_module, "SQUEUE_GLANCE_S", 1)
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 0, out + err
    assert "is at work on this root" in err and "none of its jobs" not in err, err
    assert "+ create  sub-SUBJ01/ses-SUBJ01MR1" in out
