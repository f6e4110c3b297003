"""Network and server faults against the whole apply: retried, isolated per session, never converted
when unverified, bounded in time, and never read as "everything was deleted".

The emulator's fault injection (reconcile/emulator/faults.py) misbehaves on chosen routes; the
CLI runs in-process (the `cli` fixture) against it over real HTTP.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from relworld import ONE_SERIES
from worlds import exported_root

import reconcile.xnat
from reconcile.credentials import Credentials
from reconcile.demo import populate
from reconcile.emulator import Archive, Fault
from reconcile.errors import RemoteError
from reconcile.lock import lock_path, read_lock
from reconcile.xnat import XnatClient

LISTING = r"/data/projects/PROJ/experiments$"
FILES = r"/resources/[^/]+/files/[^/]+\.dcm$"


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Retries keep their count and order; only the waiting between them is cut short."""
    monkeypatch.setattr(reconcile.xnat, "_MAX_SLEEP", 0.02)


def add(archive, n, series=ONE_SERIES):
    populate(archive, "PROJ", [(f"{i:02d}", f"{i:02d}_MR1", f"2024-01-{10 + i}") for i in range(1, n + 1)], series=series)
    return archive.sessions("PROJ")


@pytest.mark.parametrize("kind,status", [("status", 503), ("status", 500), ("status", 429), ("reset", 0)])
def test_transient_listing_failures_are_retried(cli, emulator, tmp_path, kind, status):
    add(emulator.archive, 1)
    fault = emulator.app.faults.add(Fault(route=LISTING, kind=kind, status=status or 500, times=2))
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2, out + err
    assert fault.fired == 2 and "1 to create" in out


@pytest.mark.parametrize("kind", ["status", "reset", "html_200", "invalid_json"])
def test_a_listing_that_keeps_failing_is_an_error_and_nothing_is_planned(cli, emulator, tmp_path, kind):
    add(emulator.archive, 1)
    emulator.app.faults.add(Fault(route=LISTING, kind=kind, status=500))
    code, out, err = cli("apply", str(tmp_path / "bids"), "-p", "PROJ", "--yes")
    assert code == 1
    assert "PROJ" in out + err and ("kept failing" in out + err or "HTML" in out + err
                                    or "invalid JSON" in out + err or "cannot reach" in out + err)
    assert read_lock(tmp_path / "bids") is None
    assert not list((tmp_path / "bids").glob("sub-*"))


def test_a_failed_listing_says_nothing_was_applied_because_of_it_not_that_all_is_quiet(cli, emulator, tmp_path):
    add(emulator.archive, 1)
    emulator.app.faults.add(Fault(route=LISTING, kind="status", status=500))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert "Nothing planned: 1 problem below; 0 sessions up to date." in out
    assert out.rstrip().endswith("Nothing applied: 1 problem above.")
    assert "Nothing to apply" not in out and "No changes" not in out
    code, out, err = cli("plan", str(root), "-p", "PROJ")
    assert code == 1 and "Nothing planned: 1 problem below; 0 sessions up to date." in out


@pytest.mark.parametrize("how", ["failing", "empty"])
def test_failed_or_empty_listing_with_sessions_in_the_lock_refuses_and_orphans_nothing(cli, emulator, tmp_path, how):
    elsewhere = Archive()
    elsewhere.add_project("PROJ")
    exps = [elsewhere.add_session("PROJ", f"S{i}", f"S{i}_MR1", date="2024-01-10") for i in range(3)]
    root = exported_root(elsewhere, tmp_path, exps)
    before = lock_path(root).read_bytes()
    if how == "failing":
        add(emulator.archive, 1)
        emulator.app.faults.add(Fault(route=LISTING, kind="status", status=502))
    refused = {"failing": "listing of project PROJ failed",
               "empty": "XNAT listed no sessions for project PROJ, but the lock records 3"}[how]
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1
    assert refused in out
    assert "orphan" not in out.replace("0 orphaned", "")
    assert lock_path(root).read_bytes() == before
    code, out, _ = cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 1 and refused in out
    assert "orphan" not in out.replace("0 orphaned", "")


@pytest.mark.slow
def test_file_faults_are_retried_or_isolate_one_session_while_the_other_completes(cli, emulator, tmp_path):
    good, bad = add(emulator.archive, 2)
    resets = emulator.app.faults.add(Fault(route=rf"/experiments/{good.id}/.*{FILES}", kind="reset", times=2))
    emulator.app.faults.add(Fault(route=rf"/experiments/{bad.id}/.*{FILES}", kind="status", status=503))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "2")
    assert code == 1
    assert "1 done, 1 failed" in out and "kept failing" in out
    assert resets.fired == 2
    assert list(read_lock(root).sessions) == [good.id]
    assert not (root / "sub-02").exists()
    assert not (root / ".xnat2bids/staging" / good.id).exists()
    code, out, _ = cli("check", str(root), "--full")
    assert code == 0, out


@pytest.mark.parametrize("kind", ["truncate", "corrupt"])
def test_bad_bytes_are_detected_and_never_converted(cli, emulator, tmp_path, monkeypatch, kind):
    (exp,) = add(emulator.archive, 1)
    listed = emulator.archive.get_scan(exp.id, "1").find_resource("DICOM").files
    root = tmp_path / "bids"
    dicom = root / ".xnat2bids/staging" / exp.id / "dicom"

    def finals() -> dict[str, Path]:
        return {p.name: p for p in dicom.rglob("*.dcm") if p.is_file()} if dicom.exists() else {}

    # One file is always damaged, and XNAT answers for it only once the others are verified and
    # renamed: the check below then has intact files to look at, whatever the download order.
    damaged = emulator.app.faults.add(Fault(route=r"/resources/[^/]+/files/1\.dcm$", kind=kind))
    serve = emulator.app.handle

    def handle(request):
        if request.path.endswith("/files/1.dcm"):
            deadline = time.monotonic() + 60  # a guard against hanging, not a bound on speed
            while len(finals()) < len(listed) - 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        return serve(request)

    monkeypatch.setattr(emulator.app, "handle", handle)
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1
    assert damaged.fired == 2  # the first download and its one retry
    assert "scan 1 file 1.dcm of session 01_MR1 does not match XNAT's listing" in out
    log = (root / ".xnat2bids/logs" / f"{exp.id}.log").read_text()
    assert "heudiconv" not in log  # conversion never started
    assert not (root / ".xnat2bids/staging" / exp.id / "convert").exists()
    reached = finals()
    assert sorted(reached) == sorted(n for n in listed if n != "1.dcm")  # never the damaged file
    for name, p in reached.items():  # what reached a final name is verified content
        assert p.read_bytes() == listed[name].read()
    assert read_lock(root) is None and not list(root.glob("sub-*"))


def test_a_slow_server_hits_a_bounded_timeout_with_a_clear_error(emulator):
    add(emulator.archive, 1)
    # Each answer comes after 1 s: without the 0.2 s timeout the listing would simply succeed.
    slow = emulator.app.faults.add(Fault(route=LISTING, kind="latency", seconds=1.0))
    creds = Credentials(emulator.user, emulator.password, "env")
    with XnatClient(emulator.url, creds, timeout=0.2, retries=2) as client:
        with pytest.raises(RemoteError) as info:
            client.list_experiments("PROJ")
    assert slow.fired >= 3  # every attempt reached the server and was given up on
    assert "did not answer within 0.2 s (3 attempts)" in info.value.summary
    assert "raise `timeout` in the config" in info.value.hint


def test_a_request_that_times_out_is_sent_once_per_attempt(emulator):
    add(emulator.archive, 1)
    slow = emulator.app.faults.add(Fault(route=LISTING, kind="latency", seconds=1.0))
    creds = Credentials(emulator.user, emulator.password, "env")
    with XnatClient(emulator.url, creds, timeout=0.2, retries=2) as client:
        with pytest.raises(RemoteError):
            client.list_experiments("PROJ")
    assert slow.fired == 3


@pytest.mark.slow
def test_credentials_rejected_mid_run_stop_new_sessions_with_a_clear_message(cli, emulator, tmp_path):
    exps = add(emulator.archive, 3)
    files_per_session = sum(len(r.files) for r in emulator.archive.get_scan(exps[0].id, "1").resources.values())
    emulator.app.faults.add(Fault(route=FILES, kind="auth_expire", after=files_per_session, times=1))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1
    assert "1 done, 1 failed, 1 skipped" in out
    assert "XNAT rejected the credentials for user admin" in out
    assert "credentials rejected earlier in this run" in out
    assert list(read_lock(root).sessions) == [exps[0].id]
    assert not (root / "sub-02").exists() and not (root / "sub-03").exists()
    assert not (root / ".xnat2bids/staging" / exps[2].id).exists()  # never started


def _sessions_of(*exps) -> str:
    return "/experiments/(" + "|".join(e.id for e in exps) + ")/"


def test_xnat_gone_mid_run_fails_one_session_and_skips_the_ones_not_started(cli, emulator, tmp_path):
    exps = add(emulator.archive, 4)
    # From the second session on, XNAT drops every connection.
    gone = [emulator.app.faults.add(Fault(route=_sessions_of(exp), kind="reset")) for exp in exps[1:]]
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert "1 done, 1 failed, 2 skipped" in out
    assert f"cannot reach XNAT at {emulator.url} for the scans of session 02_MR1" in out
    skipped = "XNAT could not be reached earlier in this run; apply again once it is back"
    assert out.count(skipped) == 3  # the two sessions, and the summary
    assert "Stopped early: " + skipped in out.split("Apply complete")[1]
    assert gone[0].fired >= 5  # its own attempts (1 + 4 retries)
    assert [g.fired for g in gone[1:]] == [0, 0]  # not one request of the sessions not started
    assert list(read_lock(root).sessions) == [exps[0].id]
    for exp in exps[2:]:
        assert not (root / ".xnat2bids/logs" / f"{exp.id}.log").exists()  # never started


def test_xnat_gone_during_the_last_session_stops_nothing_and_says_nothing_of_a_stop(cli, emulator, tmp_path):
    exps = add(emulator.archive, 3)
    emulator.app.faults.add(Fault(route=_sessions_of(exps[-1]), kind="reset"))
    code, out, err = cli("apply", str(tmp_path / "bids"), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1 and "2 done, 1 failed, 0 skipped" in out, out + err
    assert "cannot reach XNAT" in out and "Stopped early" not in out


def test_a_session_xnat_answers_too_slowly_fails_alone_and_the_others_go_on(cli, emulator, tmp_path):
    # XNAT builds a large session's file listing whole before it answers: that session's slowness,
    # not an XNAT gone away.
    exps = add(emulator.archive, 3)
    slow = emulator.app.faults.add(Fault(route=_sessions_of(exps[0]), kind="latency", seconds=2.0))
    config = tmp_path / "lab.toml"
    config.write_text("timeout = 0.2\n")
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1", "--config", str(config))
    assert code == 1, out + err
    assert f"XNAT at {emulator.url} did not answer within 0.2 s (5 attempts) for the scans of session 01_MR1" in out
    assert "2 done, 1 failed, 0 skipped" in out and "Stopped early" not in out
    assert slow.fired >= 5 and sorted(read_lock(root).sessions) == sorted(e.id for e in exps[1:])


def test_an_error_status_from_xnat_fails_that_session_and_the_others_go_on(cli, emulator, tmp_path):
    exps = add(emulator.archive, 3)
    emulator.app.faults.add(Fault(route=_sessions_of(exps[0]), kind="status", status=503))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert "kept failing" in out and "1 failed" in out and "2 done, 1 failed, 0 skipped" in out
    assert "Stopped early" not in out
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps[1:])


@pytest.mark.parametrize("kind,unreachable", [("reset", True), ("latency", False), ("status", False)])
def test_only_a_server_that_does_not_answer_is_unreachable(emulator, kind, unreachable):
    add(emulator.archive, 1)
    emulator.app.faults.add(Fault(route=LISTING, kind=kind, status=503, seconds=1.0))
    creds = Credentials(emulator.user, emulator.password, "env")
    with XnatClient(emulator.url, creds, timeout=0.2, retries=1) as client:
        with pytest.raises(RemoteError) as info:
            client.list_experiments("PROJ")
    assert info.value.unreachable is unreachable, info.value


def test_a_lock_that_cannot_be_written_stops_the_run_after_one_half_commit_and_the_history_tells_of_its_recovery(
        cli, emulator, tmp_path, monkeypatch):
    import errno

    import reconcile.apply

    exps = add(emulator.archive, 3)
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    for exp in exps:
        emulator.archive.set_fields(exp.id, date="2024-03-01")  # re-dated: three updates

    def refused(*args, **kwargs):  # what a read-only lock file or a full disk does to the write
        raise OSError(errno.EROFS, "Read-only file system", str(lock_path(root)))

    with monkeypatch.context() as patched:
        patched.setattr(reconcile.apply, "write_lock", refused)
        code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert f"Read-only file system: '{lock_path(root)}' (the new session is in place; the next apply completes " \
           "its commit)" in out
    # The other two never started, and the summary says why.
    assert out.count(f"the commit of {exps[0].id} was left half-way") == 3
    assert f"Stopped early: the commit of {exps[0].id} was left half-way." in out
    assert "0 done, 1 failed, 2 skipped" in out
    assert [p.stem for p in (root / ".xnat2bids/journal").glob("*.json")] == [exps[0].id]
    assert read_lock(root).serial == 3

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert f"recovered the interrupted commit of {exps[0].id}" in out
    assert "2 done, 0 failed" in out
    assert {r.date for r in read_lock(root).sessions.values()} == {"2024-03-01"}
    code, out, err = cli("history", str(root), "--json")
    entries = [json.loads(line) for line in out.splitlines()]
    serials = [(e["lock_serial"]["before"], e["lock_serial"]["after"]) for e in entries]
    assert serials == [(0, 3), (3, 3), (3, 4), (4, 6)], serials  # chained up to the lock's serial
    recovered = entries[2]
    assert (recovered["operation"], [s["experiment_id"] for s in recovered["sessions"]]) == ("unrecorded", [exps[0].id])
    assert recovered["sessions"][0]["reasons"] == ["an interrupted commit, completed by this run's recovery"]
    code, out, err = cli("check", str(root))
    assert code == 0, out + err


def test_a_session_folder_that_cannot_be_moved_fails_that_session_only(cli, emulator, tmp_path, monkeypatch):
    import errno

    import reconcile.apply

    exps = add(emulator.archive, 2)
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    for exp in exps:
        emulator.archive.set_fields(exp.id, date="2024-03-01")
    move = reconcile.apply._move_replacing
    stuck = root / "sub-01"

    def refused(src, dest, trash):  # what an immutable or foreign-owned folder does to the rename
        if stuck in dest.parents:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(dest))
        return move(src, dest, trash)

    with monkeypatch.context() as patched:
        patched.setattr(reconcile.apply, "_move_replacing", refused)
        code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert "(the old session is kept; the next apply tries this one again)" in out
    assert "1 done, 1 failed, 0 skipped" in out  # the other session went ahead
    lock = read_lock(root)
    assert [lock.sessions[e.id].date for e in exps] == ["2024-01-11", "2024-03-01"]
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "1 done, 0 failed" in out, out + err
    assert {r.date for r in read_lock(root).sessions.values()} == {"2024-03-01"}
    assert cli("check", str(root))[0] == 0


def test_a_new_folder_that_cannot_be_moved_in_leaves_the_old_one_aside_and_says_so(cli, emulator, tmp_path,
                                                                                     monkeypatch):
    import errno

    import reconcile.apply

    [exp] = add(emulator.archive, 1)
    root = tmp_path / "bids"
    assert cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0
    emulator.archive.set_fields(exp.id, date="2024-03-01")
    real_hit = reconcile.apply.hit

    def between_renames(name):  # the old folder is in the trash; the new one's rename fails
        if name == "commit-between-renames":
            raise PermissionError(errno.EACCES, "Permission denied", str(root / "sub-01"))
        real_hit(name)

    with monkeypatch.context() as patched:
        patched.setattr(reconcile.apply, "hit", between_renames)
        code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert (f"(the old session waits in .xnat2bids/trash/{exp.id}; the next apply puts it back and tries this one "
            "again)") in out
    assert not (root / "sub-01/ses-01MR1").exists()
    code, out, _ = cli("check", str(root))
    assert f"pending: {exp.id}: an interrupted commit of sub-01/ses-01MR1 will be rolled back by the next apply" in out
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "1 done" in out, out + err
    assert read_lock(root).sessions[exp.id].date == "2024-03-01" and cli("check", str(root))[0] == 0
