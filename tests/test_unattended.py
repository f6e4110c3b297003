"""What a nightly `xnat2bids apply --yes` from cron needs: --quiet (cron mails whatever a job
prints), `history -n/--since`, and a history entry for a night that failed before it applied
anything, so that "XNAT was down" does not read as "cron did not run"."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest
from test_layout import PI_STUDY, _export_study
from worlds import SMALL, add, add_sessions, assert_schema, exported_root, write_config

from reconcile import __version__
from reconcile.apply import (
    ApplyReport,
    append_history,
    history_serial,
    last_history_entry,
)
from reconcile.config import Config
from reconcile.emulator import Fault
from reconcile.lock import Lock
from reconcile.model import login_name
from reconcile.plan import LocalState, RemoteState, compute_plan


@pytest.fixture
def no_backoff(monkeypatch):
    """The client's retries without their waits: an XNAT that is down fails at once."""
    monkeypatch.setattr("reconcile.xnat.XnatClient._sleep", lambda self, attempt, resp: None)


def _history_path(root: Path) -> Path:
    return root / ".xnat2bids/history.jsonl"


def _entries(root: Path) -> list[dict]:
    path = _history_path(root)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _applied_before(cli, emulator, tmp_path) -> Path:
    """A dataset an earlier apply ran in (its lock, work area and history), up to date with XNAT."""
    root = exported_root(emulator.archive, tmp_path, add_sessions(emulator.archive, 2))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out, out + err
    # The exports the fake lock tells of (serial 1).
    assert [(e["operation"], e["lock_serial"]["after"]) for e in _entries(root)] == [("unrecorded", 1)]
    return root


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- --quiet -----------------------------------------------------------------------------------


def test_quiet_apply_and_plan_with_nothing_to_do_print_nothing(cli, emulator, tmp_path):
    root = _applied_before(cli, emulator, tmp_path)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out and "note:" in out  # what --quiet leaves out
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet") == (0, "", "")
    assert cli("apply", str(root), "-p", "PROJ", "--yes", "-q") == (0, "", "")
    assert cli("plan", str(root), "-p", "PROJ", "--quiet", "--detailed-exitcode") == (0, "", "")


def test_quiet_plan_prints_the_changes_and_summary_alone(cli, emulator, tmp_path):
    root = _applied_before(cli, emulator, tmp_path)
    new = emulator.archive.add_session("PROJ", "SUBJ03", "SUBJ03_MR1", date="2024-01-12")
    code, out, err = cli("plan", str(root), "-p", "PROJ", "--quiet", "--detailed-exitcode")
    assert (code, err) == (2, "")
    assert out == (f"+ create  sub-SUBJ03/ses-SUBJ03MR1  PROJ/{new.id}  new in XNAT\n"
                   "\n"
                   "Plan: 1 to create, 0 to update, 0 drifted, 0 orphaned, 2 unchanged.\n")


def test_quiet_plan_names_only_the_studies_it_has_something_to_say_of(cli, emulator, tmp_path):
    root = tmp_path / "export"
    _export_study(emulator.archive, root, "jones/study-vision/bids", "JONES_VISION")  # up to date
    emulator.archive.add_project("SMITH_MEMORY")
    new = emulator.archive.add_session("SMITH_MEMORY", "01", "01_MR1", date="2024-01-10")
    cfg = write_config(tmp_path, PI_STUDY + '\nprojects = ["JONES_VISION", "SMITH_MEMORY"]')
    code, out, err = cli("plan", str(root), "--config", str(cfg), "--quiet")
    assert (code, err) == (0, "")
    assert out == (f"=== SMITH_MEMORY: {root}/smith/study-memory/bids\n"
                   f"+ create  sub-01/ses-01MR1  SMITH_MEMORY/{new.id}  new in XNAT\n"
                   "\n"
                   "Plan: 1 to create, 0 to update, 0 drifted, 0 orphaned, 0 unchanged.\n")
    code, out, _ = cli("plan", str(root), "--config", str(cfg))
    assert code == 0 and f"=== JONES_VISION: {root}/jones/study-vision/bids\n" in out


def test_quiet_leaves_a_json_document_alone_the_error_document_too(cli, emulator, tmp_path, monkeypatch):
    root = _applied_before(cli, emulator, tmp_path)
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--json", "--quiet")
    assert code == 0 and json.loads(out)["summary"]["unchanged"] == 2
    monkeypatch.setenv("XNAT_PASS", "wrong")
    code, out, err = cli("plan", str(root), "-p", "PROJ", "--json", "--quiet")
    assert code == 1 and json.loads(out)["error"]["kind"] == "auth" and err.startswith("error: XNAT rejected")


@pytest.mark.slow  # real heudiconv
def test_quiet_apply_prints_its_outcome_lines_and_summary_alone(cli, emulator, tmp_path):
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet")
    assert (code, err) == (0, ""), out + err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[1] == "", out
    assert re.fullmatch(rf"\[1/1\] ✓ create sub-01/ses-01MR1 \(PROJ/{exps['01_MR1'].id}\): \d+ files in [\d.]+ s",
                        lines[0]), out
    assert re.fullmatch(r"Apply complete: 1 done, 0 failed, 0 skipped; lock serial 1; took [\d.]+ s\.", lines[2]), out
    # What it left alone points at plan, not at the notes --quiet did not print.
    emulator.archive.delete_session(exps["01_MR1"].id)
    add(emulator.archive, [("02", "02_MR1", "2024-01-11")], series=SMALL[:1])
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet")
    assert code == 0 and "note:" not in out + err, out + err
    assert "s. Left as they are: 1 orphaned (see `xnat2bids plan`, which tells why)." in out, out


def test_quiet_apply_says_failed_sessions_on_stderr_for_cron_to_mail(cli, emulator, tmp_path):
    # `apply --yes --quiet >/dev/null` in a crontab: a night every session failed must still mail.
    exps = add(emulator.archive, [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    emulator.app.faults.add(Fault(route=r"/files", kind="status", status=404))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet")
    assert code == 1
    assert f"[1/1] ✗ create sub-01/ses-01MR1 (PROJ/{exps['01_MR1'].id}): " in err and "      log: " in err, err
    assert "✗" not in out and "Apply complete: 0 done, 1 failed, 0 skipped" in out, out


def test_quiet_apply_says_on_stderr_what_it_leaves_as_it_is(cli, emulator, tmp_path):
    # A file gone from the dataset, a session deleted in XNAT: nothing to apply, but not a quiet
    # night; said every night until dealt with (`--repair-drift`, `forget`).
    root = _applied_before(cli, emulator, tmp_path)
    (root / "sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz").unlink()
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet")
    assert (code, out) == (0, ""), out + err
    assert err == "Nothing to apply. Left as they are: 1 drifted (see `xnat2bids plan`, which tells why).\n", err


def test_quiet_apply_says_a_listing_that_failed_on_stderr_and_the_history_keeps_it(cli, emulator, tmp_path,
                                                                                    no_backoff):
    root = _applied_before(cli, emulator, tmp_path)
    before = _history_path(root).read_bytes()
    # An error page that echoes what it should not: the console shows it, the history (shared
    # through git) keeps the error without it.
    leaked = "internal db host db-prod-7.lab.internal user=svc_xnat"
    emulator.app.faults.add(Fault(route=r"/projects/PROJ/experiments$", kind="status", status=503, message=leaked))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet")
    assert (code, out) == (1, ""), err
    assert err.startswith("error: listing of project PROJ failed: ") and "  hint: nothing was planned" in err
    assert leaked in err
    text = _history_path(root).read_bytes()
    assert text.startswith(before)  # appended to, never rewritten
    entry = json.loads(text[len(before):])
    assert_schema("history", entry)
    assert entry["operation"] == "apply" and entry["sessions"] == [] and entry["lock_serial"] == {"before": 1, "after": 1}
    assert [e["kind"] for e in entry["errors"]] == ["plan"]
    message = entry["errors"][0]["message"]
    assert message.startswith("listing of project PROJ failed: XNAT at ") and "503" not in message, message
    assert err.splitlines()[0].removeprefix("error: ").startswith(message) and leaked not in text.decode()


def test_a_night_one_projects_listing_failed_reads_so_in_the_history_beside_what_it_did(cli, emulator, tmp_path,
                                                                                      no_backoff):
    root = _applied_before(cli, emulator, tmp_path)
    emulator.archive.add_project("OTHER")
    new = add(emulator.archive, [("SUBJ03", "SUBJ03_MR1", "2024-01-12")], series=SMALL[:1])["SUBJ03_MR1"]
    emulator.app.faults.add(Fault(route=r"/projects/OTHER/experiments$", kind="status", status=503))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "-p", "OTHER", "--yes", "--quiet")
    assert code == 1 and "error: listing of project OTHER failed: " in err, out + err
    entry = _entries(root)[-1]
    assert_schema("history", entry)
    assert [(r["experiment_id"], r["result"]) for r in entry["sessions"]] == [(new.id, "done")], entry
    assert entry["errors"] == [{"kind": "plan", "message": "listing of project OTHER failed: XNAT at "
                                f"{emulator.url} kept failing for the experiments of project OTHER"}]
    assert last_history_entry(root) == entry  # a lock change like any apply's, not a failed night
    code, out, _ = cli("history", str(root), "-n", "1")
    assert "    error: listing of project OTHER failed: " in out and "failed, nothing applied" not in out, out


def test_quiet_check_prints_nothing_when_all_is_verified_and_its_problems_on_stderr(cli, emulator, tmp_path):
    root = _applied_before(cli, emulator, tmp_path)
    assert cli("check", str(root), "--quiet") == (0, "", "")
    (root / "sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz").unlink()
    code, out, err = cli("check", str(root), "-q")
    assert (code, out) == (1, ""), out + err
    assert err.splitlines()[0].startswith("problem: ") and "sub-SUBJ01/ses-SUBJ01MR1/anat/t1.nii.gz" in err
    assert err.splitlines()[-1].startswith("FAILED: 1 problem(s); 2 sessions, 2 outputs checked (size)"), err
    code, out, _ = cli("check", str(root))  # without it, as before: the verdict on stdout
    assert code == 1 and "FAILED: 1 problem(s)" in out


# -- history -n / --since ----------------------------------------------------------------------


def _history_at(root: Path, times: list[str]) -> None:
    """A history whose entries have these times, in this order (a union merge of two clones
    leaves them out of time order)."""
    plan = compute_plan(Lock.new(), RemoteState((), None), LocalState({}), Config())
    entry = append_history(root, plan, ApplyReport(lock=Lock.new()))
    _history_path(root).write_text("".join(json.dumps({**entry, "time": t}) + "\n" for t in times))


def _times(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if line.startswith("20")]


def test_history_last_and_since_select_entries_by_time_as_text_and_json(cli, tmp_path):
    root = tmp_path / "bids"
    _history_at(root, ["2026-11-01T12:00:00Z", "2026-10-31T23:59:59Z", "2026-11-02T08:00:00Z", "2026-11-01T00:00:00Z"])

    def shown(*options: str) -> tuple[list[str], list[str]]:
        code, out, err = cli("history", str(root), *options)
        assert code == 0, out + err
        code, doc, err = cli("history", str(root), "--json", *options)
        assert code == 0, doc + err
        return _times(out), [json.loads(line)["time"] for line in doc.splitlines()]

    assert shown("--since", "2026-11-01") == (
        ["2026-11-01T00:00:00Z", "2026-11-01T12:00:00Z", "2026-11-02T08:00:00Z"],  # by time
        ["2026-11-01T12:00:00Z", "2026-11-02T08:00:00Z", "2026-11-01T00:00:00Z"])  # the file's order
    assert shown("--since", "2026-11-01T12:00") == (["2026-11-01T12:00:00Z", "2026-11-02T08:00:00Z"],) * 2
    assert shown("--since", "2026-11-01T12:00:01Z") == (["2026-11-02T08:00:00Z"],) * 2
    # A local time with its offset (`date -Iminutes`): midnight of Nov 2 in Tokyo is 15:00 UTC on Nov 1.
    assert shown("--since", "2026-11-02T00:00+09:00") == (["2026-11-02T08:00:00Z"],) * 2
    assert shown("--since", "2026-11-01T07:00-05:00") == (["2026-11-01T12:00:00Z", "2026-11-02T08:00:00Z"],) * 2
    assert shown("-n", "2") == (["2026-11-01T12:00:00Z", "2026-11-02T08:00:00Z"],) * 2  # the latest two
    assert shown("--last", "1", "--since", "2026-10-01") == (["2026-11-02T08:00:00Z"],) * 2
    assert shown("-n", "9")[0] == _times(cli("history", str(root))[1])
    assert cli("history", str(root), "--since", "2026-12-01") == (0, "No history since 2026-12-01T00:00:00Z.\n", "")
    assert cli("history", str(root), "--since", "2026-12-01", "--json") == (0, "", "")


@pytest.mark.parametrize("when", ["yesterday", "2026-13-01", "2026-11-01T25:00", "01/11/2026", "2026-11-01 12:00",
                                  "2026-11-01+09:00", "2026-11-01T12:00+9"])
def test_a_malformed_since_is_an_error_naming_the_accepted_forms(cli, tmp_path, when):
    root = tmp_path / "bids"
    _history_at(root, ["2026-11-01T12:00:00Z"])
    for json_option in ((), ("--json",)):
        code, out, err = cli("history", str(root), "--since", when, *json_option)
        assert (code, out) == (1, "")
        assert repr(when) in err and "give YYYY-MM-DD, YYYY-MM-DDTHH:MM or YYYY-MM-DDTHH:MM:SS" in err, err
    code, out, err = cli("history", str(root), "-n", "0")
    assert (code, out) == (1, "") and "--last" in err


# -- a failed night in the history ---------------------------------------------------------------


def test_an_apply_that_cannot_reach_xnat_tells_the_history_so(cli, emulator, tmp_path, monkeypatch, no_backoff):
    root = _applied_before(cli, emulator, tmp_path)
    before = _history_path(root).read_bytes()
    down = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("XNAT_HOST", down)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--quiet")
    assert (code, out) == (1, "")
    summary = f"cannot reach XNAT at {down} for the login"
    assert err.startswith(f"error: {summary}\n")
    text = _history_path(root).read_bytes()
    assert text.startswith(before) and text.count(b"\n") == before.count(b"\n") + 1
    entry = _entries(root)[-1]
    assert_schema("history", entry)
    assert {k: entry[k] for k in ("operation", "user", "xnat2bids", "lock_serial", "summary", "sessions", "errors")} == {
        "operation": "apply", "user": login_name(), "xnat2bids": __version__, "lock_serial": {"before": 1, "after": 1},
        "summary": {"done": 0, "failed": 0, "skipped": 0}, "sessions": [],
        "errors": [{"kind": "remote", "message": summary}],
    }
    # Not a lock change: what the next apply looks for as the last one is the entry before.
    assert last_history_entry(root) == _entries(root)[0] and history_serial(root) == 1

    code, out, err = cli("history", str(root))
    assert code == 0, out + err
    assert out.splitlines()[-2:] == [
        f"{entry['time']}  apply by {entry['user']}@{entry['host']} (xnat2bids {__version__}): "
        "failed, nothing applied",
        f"    error: {summary}",
    ]
    assert " unrecorded by " in out.splitlines()[0]  # the older entry reads as before
    code, out, _ = cli("history", str(root), "--json", "-n", "1")
    assert code == 0 and json.loads(out) == entry


def test_a_failed_night_makes_the_history_of_a_shared_dataset_the_groups(cli, emulator, tmp_path, monkeypatch,
                                                                          no_backoff):
    # A first apply killed after its commits, before its history entry: the failed night after
    # it makes the history, which the lab's other members must be able to append to.
    import os
    import stat

    root = _applied_before(cli, emulator, tmp_path)
    _history_path(root).unlink()
    root.chmod(0o2775)
    monkeypatch.setenv("XNAT_HOST", f"http://127.0.0.1:{_closed_port()}")
    before = os.umask(0o022)  # a member's own
    try:
        code, _, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    finally:
        os.umask(before)
    assert code == 1 and "cannot reach XNAT" in err
    assert [e["operation"] for e in _entries(root)] == ["unrecorded", "apply"]
    assert stat.S_IMODE(_history_path(root).stat().st_mode) & 0o060 == 0o060


def test_rejected_credentials_are_told_of_without_the_password(cli, emulator, tmp_path, monkeypatch):
    root = _applied_before(cli, emulator, tmp_path)
    monkeypatch.setenv("XNAT_PASS", "wrong-sentinel-pw")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "XNAT rejected the credentials" in err, out + err
    entry = _entries(root)[-1]
    assert entry["errors"] == [{"kind": "auth", "message": f"XNAT rejected the credentials for user admin at {emulator.url}"}]
    assert "wrong-sentinel-pw" not in _history_path(root).read_text()


def test_a_failed_apply_writes_nothing_where_it_may_not(cli, emulator, tmp_path, monkeypatch, no_backoff):
    from reconcile import statelock

    # Another apply holds the state lock: it is at work, and tells its own story.
    root = _applied_before(cli, emulator, tmp_path)
    before = _history_path(root).read_bytes()
    holder = statelock.acquire(root, "apply")
    try:
        code, _, err = cli("apply", str(root), "-p", "PROJ", "--yes")
        assert code == 1 and f"(lock ID {holder.id})" in err
        monkeypatch.setenv("XNAT_HOST", f"http://127.0.0.1:{_closed_port()}")
        code, _, err = cli("apply", str(root), "-p", "PROJ", "--yes")
        assert code == 1 and "cannot reach XNAT" in err
    finally:
        statelock.release(root, holder)
    assert _history_path(root).read_bytes() == before
    # A history git left conflicted: an entry would land inside the conflict.
    conflicted = before + b"<<<<<<< HEAD\n=======\n>>>>>>> theirs\n"
    _history_path(root).write_bytes(conflicted)
    code, _, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "cannot reach XNAT" in err
    assert _history_path(root).read_bytes() == conflicted

    # No dataset yet, or one without its work area: neither is made for this.
    new = tmp_path / "new"
    assert cli("apply", str(new), "-p", "PROJ", "--yes")[0] == 1
    assert not new.exists()
    (tmp_path / "bare").mkdir()
    bare = exported_root(emulator.archive, tmp_path / "bare", [])
    assert cli("apply", str(bare), "-p", "PROJ", "--yes")[0] == 1
    assert sorted(p.name for p in bare.iterdir()) == [".xnat2bids.lock"]


@pytest.mark.parametrize("executor, question, cancelled", [
    ("local", "Apply 1 change(s) to {root}?", "Cancelled; nothing changed."),
    ("slurm", "Submit 1 session(s) of {root} to SLURM?", "Cancelled; nothing submitted."),
])
def test_apply_quiet_at_a_terminal_shows_the_plan_it_asks_to_confirm(cli, emulator, tmp_path, monkeypatch,
                                                                    executor, question, cancelled):
    # --quiet is for cron; a person asked "Apply 1 change(s)?" must see what they confirm, and
    # that their "no" cancelled it.
    from reconcile import cli as cli_module

    add_sessions(emulator.archive, 1)
    root = tmp_path / "bids"
    asked: list[str] = []
    monkeypatch.setattr(cli_module, "stdin_is_terminal", lambda: True)
    monkeypatch.setattr(cli_module.typer, "confirm", lambda question, default: asked.append(question) or False)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--quiet", "--executor", executor)
    assert asked == [question.format(root=root)], out + err
    assert "+ create  sub-SUBJ01/ses-SUBJ01MR1" in out and "Plan: 1 to create" in out, out + err
    assert code == 1 and cancelled in out
