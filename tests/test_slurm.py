"""`apply --executor slurm` on a real single-node SLURM cluster (`.ci/slurm/start-slurm.sh`).

The emulator listens on 127.0.0.1 inside pytest; the array tasks and the finalize job are
separate processes started by slurmd on the same node, so they reach it like any client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from worlds import add, assert_schema, redate, token_valid

from reconcile import statelock
from reconcile.config import load_config
from reconcile.emulator import Fault
from reconcile.executors import slurm as sx
from reconcile.lock import lock_path, read_lock

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Opt-in: on a cluster's login node `sbatch` reaches the lab's real cluster, where test jobs have
# no business (and cannot reach the tests' emulator on 127.0.0.1). CI always runs them.
needs_cluster = pytest.mark.skipif(
    os.environ.get("XNAT2BIDS_TEST_SLURM") != "1" and os.environ.get("CI") != "true",
    reason="these tests submit jobs to the cluster sbatch reaches: start a throwaway one with "
           "`.ci/slurm/start-slurm.sh` (as root) and set XNAT2BIDS_TEST_SLURM=1 to run them",
)

SENTINEL = "Sentinel-pw-4f1c9a7e"  # the password the jobs must never see in clear
JOB_TIMEOUT = 240.0


@pytest.fixture
def slurm_cli(cli, emulator, monkeypatch):  # noqa: F811  (the imported fixture)
    """The CLI logged in as a user whose password is the sentinel (from XNAT_USER/XNAT_PASS)."""
    emulator.archive.add_user("labuser", SENTINEL)
    monkeypatch.setenv("XNAT_USER", "labuser")
    monkeypatch.setenv("XNAT_PASS", SENTINEL)
    return cli


def sessions(n: int) -> list[tuple[str, str, str]]:
    return [(f"{i:02d}", f"{i:02d}_MR1", f"2024-01-{10 + i:02d}") for i in range(1, n + 1)]


def current_batch(root: Path) -> sx.Batch:
    batches = sx.list_batches(root)
    assert batches, f"no batch under {root}"
    return batches[-1]


def submit(slurm_cli, root: Path) -> sx.Batch:  # noqa: ANN001
    """`apply --executor slurm` of the PROJ sessions into `root`; the batch it submitted."""
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 0, out + err
    return current_batch(root)


def staged_unmerged(slurm_cli, root: Path) -> sx.Batch:  # noqa: ANN001
    """A batch whose tasks ran and whose finalize job was cancelled: results staged, none merged."""
    batch = submit(slurm_cli, root)
    subprocess.run(["scancel", batch.finalize_job], check=True)
    wait_gone(*batch.jobs)
    return batch


def wait_gone(*job_ids: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while sx.active_jobs(job_ids):
        assert time.monotonic() < deadline, f"SLURM jobs {job_ids} still queued after {timeout} s"
        time.sleep(0.5)


def wait_for(predicate, what: str, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def history(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / ".xnat2bids/history.jsonl").read_text().splitlines()]


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "xnat2bids.toml"
    path.write_text(body)
    return path


@needs_cluster
def test_array_stages_every_session_and_only_finalize_writes_the_lock(slurm_cli, emulator, tmp_path):
    exps = add(emulator.archive, sessions(3))
    root = tmp_path / "bids"
    # A setup snippet with quotes and a heredoc word: sourced from its own file, it cannot
    # break the generated script, and it runs before each job.
    config = write_config(tmp_path, '''
executor = "slurm"
[slurm]
partition = "debug"
time = "00:20:00"
cpus_per_task = 1
max_parallel = 8  # more than the sessions: they say 3 at once
setup = """
echo "setup ran for job $SLURM_JOB_ID: it's <<EOF fine" >&2
"""
[conversion]
skip = ["func-*"]
''')
    code, out, err = slurm_cli("apply", str(root), "-c", str(config), "-p", "PROJ", "--yes", "--validate")
    assert code == 0, out + err
    batch = current_batch(root)
    assert f"Submitted batch {batch.id}: array job {batch.array_job} (3 sessions, at most 3 at once)" in out
    assert f"finalize job {batch.finalize_job}" in out and f"xnat2bids status {root}" in out
    holder = statelock.read_holder(root)
    assert holder is not None and holder.id == batch.id and holder.jobs == (batch.array_job, batch.finalize_job)

    code, out, _ = slurm_cli("status", str(root))
    assert code == 0 and f"Batch {batch.id}" in out and f"array job {batch.array_job} (3 tasks, at most 3 at once)" in out
    assert f"finalize job {batch.finalize_job}" in out

    wait_gone(batch.array_job, batch.finalize_job)

    done = sx.read_finalized(batch)
    assert done is not None and done["ok"], done
    assert done["by_job"] == batch.finalize_job
    lock = read_lock(root)
    assert sorted(lock.sessions) == sorted(e.id for e in exps.values())
    assert lock.serial == 1  # the finalize job writes the lock once for the whole batch
    assert lock.config_fingerprint == load_config(config).fingerprint()  # as a local apply records it
    # The tasks hand the scans skip left out to finalize, which records them as a local apply does.
    assert {tuple(s.series_description for s in r.unselected_scans) for r in lock.sessions.values()} == {
        ("func-bold_task-rest",)}
    assert {tuple(s.series_description for s in r.scans) for r in lock.sessions.values()} == {
        ("anat-T1w_acq-memprage",)}
    results = [sx.read_result(batch, i) for i in range(3)]
    assert {r["job"] for r in results} == {f"{batch.array_job}_{i}" for i in range(3)}
    assert all(r["status"] == "done" and r["outputs"] for r in results)
    # Every session was committed after the last task had finished: by finalize, in one write.
    assert max(r["finished_at"] for r in results) <= min(rec.exported_at for rec in lock.sessions.values())
    assert statelock.read_holder(root) is None
    entry = history(root)[-1]
    assert entry["operation"] == "slurm apply" and entry["summary"]["done"] == 3
    assert entry["lock_serial"] == {"before": 0, "after": 1}
    assert "setup ran for job" in (batch.logs_dir / "task-0.out").read_text()
    finalized = batch.finalize_output.read_text()
    assert "Finalize complete: 3 done, 0 failed, 0 skipped; lock serial 1; BIDS validator: 0 errors" in finalized
    assert done["validator_errors"] == 0 and (root / ".xnat2bids/logs/bids-validator.json").is_file()
    assert not (root / ".xnat2bids/staging").exists() or not any((root / ".xnat2bids/staging").iterdir())
    code, out, _ = slurm_cli("check", str(root), "--full")
    assert code == 0, out

    code, out, _ = slurm_cli("status", str(root))
    assert "finalized" in out and "3 done, 0 failed, 0 skipped; lock serial 1" in out
    code, out, _ = slurm_cli("status", str(root), "--json")
    doc = json.loads(out)
    assert_schema("status", doc)
    assert doc["finalized"]["summary"] == {"done": 3, "failed": 0, "skipped": 0}
    assert doc["format_version"] == 1 and doc["array_job"] == batch.array_job and not doc["holds_state_lock"]
    assert [s["state"] for s in doc["sessions"]] == ["done"] * 3
    code, out, _ = slurm_cli("apply", str(root), "-c", str(config), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out


@needs_cluster
def test_a_submission_with_an_update_held_back_exits_1_saying_so(slurm_cli, emulator, tmp_path):
    exps = add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    assert slurm_cli("apply", str(root), "-p", "PROJ", "--yes")[0] == 0  # locally
    [sidecar] = (root / "sub-01/ses-01MR1/anat").glob("*_T1w.json")
    sidecar.write_text("{}")  # edited by the lab
    redate(emulator, exps["01_MR1"], "2024-03-01")
    new = add(emulator.archive, [("02", "02_MR1", "2024-01-12")])["02_MR1"]

    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm")
    batch = current_batch(root)
    assert code == 1 and f"Submitted batch {batch.id}" in out and "(1 session," in out
    assert "error: 1 change from XNAT held back (sub-01/ses-01MR1): files of this session changed on disk" in err
    wait_gone(batch.array_job, batch.finalize_job)
    assert sorted(read_lock(root).sessions) == sorted([exps["01_MR1"].id, new.id])
    assert sidecar.read_text() == "{}"


@needs_cluster
def test_second_apply_is_refused_while_a_batch_is_queued(slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    batch = submit(slurm_cli, root)
    try:
        for executor in ("local", "slurm"):
            code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", executor)
            assert code == 1
            assert f"SLURM batch {batch.id} of {root} is still queued or running" in err
            assert batch.array_job in err and f"xnat2bids status {root}" in err
        code, _, err = slurm_cli("finalize", str(root))
        assert code == 1 and "still queued or running" in err
        # Nor is its lock removed: its tasks would share the work area with the next apply.
        code, _, err = slurm_cli("force-unlock", batch.id, str(root))
        assert code == 1 and f"is held by SLURM batch {batch.id}, whose jobs are still queued or running" in err
        assert f"scancel {' '.join(batch.jobs)}" in err and statelock.read_holder(root).id == batch.id
        assert len(sx.list_batches(root)) == 1
    finally:
        wait_gone(*batch.jobs)
    assert sx.read_finalized(batch)["ok"]
    assert len(read_lock(root).sessions) == 2


@needs_cluster
def test_failing_task_does_not_block_the_others_and_finalize_still_runs(slurm_cli, emulator, tmp_path):
    from reconcile.emulator import Fault

    exps = add(emulator.archive, sessions(3))
    bad = exps["02_MR1"]
    emulator.app.faults.add(Fault(route=rf"/experiments/{bad.id}/scans.*files", kind="status", status=500))
    root = tmp_path / "bids"
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "--wait")
    assert code == 1, out + err
    batch = current_batch(root)
    assert f"Batch {batch.id} finalized: 2 done, 1 failed, 0 skipped; lock serial 1." in out
    lock = read_lock(root)
    assert sorted(lock.sessions) == sorted(e.id for e in exps.values() if e.id != bad.id)
    assert not (root / "sub-02").exists()
    assert statelock.read_holder(root) is None
    failed = sx.read_result(batch, [s.experiment_id for s in batch.sessions].index(bad.id))
    assert failed["status"] == "failed" and failed["log"] == f".xnat2bids/logs/{bad.id}.log"
    assert (root / failed["log"]).read_text().strip()
    tasks = sx.array_task_states(batch.array_job)
    assert sorted(t.state for t in tasks.values()) == ["COMPLETED", "COMPLETED", "FAILED"]
    # The finalize job ran and merged; its exit status is the batch's (so --mail-type=FAIL tells).
    finalize_job = sx.job_state(batch.finalize_job)
    assert (finalize_job.state, finalize_job.exit_code) == ("FAILED", "1:0")
    assert "Finalize complete: 2 done, 1 failed, 0 skipped" in batch.finalize_output.read_text()

    code, out, _ = slurm_cli("status", str(root))
    assert "failed" in out and f"log: {root / '.xnat2bids/logs' / (bad.id + '.log')}" in out
    code, out, _ = slurm_cli("plan", str(root), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "sub-02/ses-02MR1" in out

    emulator.app.faults.clear()
    for args in (("init", "-q"), ("config", "user.email", "t@example.org"), ("config", "user.name", "t")):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "--wait", "--git-commit")
    assert code == 0, out + err
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())
    assert [h["summary"]["done"] for h in history(root)] == [2, 1]
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert f"git commit {head}" in out  # the --wait summary says what finalize committed


@needs_cluster
@pytest.mark.parametrize("signum, code, said", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_stopping_wait_leaves_the_batch_running_and_exits_with_the_signals_code(emulator, tmp_path, signum, code,
                                                                                said):
    # Ctrl-C stops the waiting only: the batch is not cancelled, and the exit code is not the
    # 1 of a failed batch.
    exps = add(emulator.archive, sessions(1))
    emulator.archive.add_user("labuser", SENTINEL)
    root = tmp_path / "bids"
    config = write_config(tmp_path, '[slurm]\nextra_args = ["--begin=now+3600"]\n')  # queued until let go below
    env = {**os.environ, "XNAT_HOST": emulator.url, "XNAT_USER": "labuser", "XNAT_PASS": SENTINEL,
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "reconcile", "apply", str(root), "-c", str(config), "-p", "PROJ",
                             "--yes", "--executor", "slurm", "--wait"], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        seen = ""
        while "Waiting for the finalize job" not in seen:
            line = proc.stdout.readline()
            assert line, seen  # it ended before waiting
            seen += line
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    batch = current_batch(root)
    try:
        assert proc.returncode == code, seen + out + err
        assert (f"Stopped waiting ({said}); batch {batch.id} was not cancelled and goes on on the cluster: follow "
                f"it with `xnat2bids status {root}`; to cancel it: `scancel {batch.array_job} {batch.finalize_job}`"
                ) in err
        assert "Interrupted." not in err and "finalized" not in out
        assert set(sx.active_jobs(batch.jobs)) == set(batch.jobs)  # still queued, both
        assert statelock.read_holder(root).id == batch.id
        for job in batch.jobs:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        wait_gone(*batch.jobs)
    finally:
        sx.cancel_jobs(sx.active_jobs(batch.jobs))  # not left queued for an hour by a failure
    assert sx.read_finalized(batch)["ok"]
    assert list(read_lock(root).sessions) == [exps["01_MR1"].id]


@needs_cluster
def test_a_task_killed_before_it_wrote_its_result_is_a_failure_of_the_batch(slurm_cli, emulator, tmp_path):
    # SIGKILL (the out-of-memory killer, its node, `scancel --signal=KILL`) leaves the task no
    # chance to write a record: finalize counts it as failed, as `status` shows it, not skipped.
    exps = add(emulator.archive, sessions(1))
    slow = emulator.app.faults.add(Fault(route=r"/files/[^/]+\.dcm$", kind="latency", seconds=3))
    root = tmp_path / "bids"
    batch = submit(slurm_cli, root)
    wait_for(lambda: slow.seen >= 1, "the task's first download")
    subprocess.run(["scancel", "--batch", "--signal=KILL", f"{batch.array_job}_0"], check=True)
    wait_gone(*batch.jobs)
    assert sx.read_result(batch, 0) is None
    done = sx.read_finalized(batch)
    assert done["summary"] == {"done": 0, "failed": 1, "skipped": 0} and not done["ok"], done
    finalized = batch.finalize_output.read_text()
    assert "Finalize complete: 0 done, 1 failed, 0 skipped" in finalized, finalized
    assert f"task {batch.array_job}_0 ended without writing its result (SLURM: FAILED, exit code 0:9: killed by " \
           "SIGKILL" in finalized, finalized
    finalize_job = sx.job_state(batch.finalize_job)
    assert (finalize_job.state, finalize_job.exit_code) == ("FAILED", "1:0")
    [row] = history(root)[-1]["sessions"]
    assert row["experiment_id"] == exps["01_MR1"].id and row["result"] == "failed"
    assert row["error"].startswith(f"task {batch.array_job}_0 ended without writing its result"), row
    code, out, _ = slurm_cli("status", str(root))
    assert "finalized" in out and "0 done, 1 failed, 0 skipped" in out, out
    assert f"  0  failed     sub-01/ses-01MR1  PROJ/{exps['01_MR1'].id}  {batch.array_job}_0 FAILED" in out, out


@needs_cluster
def test_plan_calls_a_batch_at_work_only_while_slurm_runs_its_jobs(slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    config = write_config(tmp_path, '[slurm]\nextra_args = ["--begin=now+3600"]\n')  # queued: at work
    code, out, err = slurm_cli("apply", str(root), "-c", str(config), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 0, out + err
    batch = current_batch(root)
    try:
        code, out, err = slurm_cli("plan", str(root), "-c", str(config), "-p", "PROJ")
        assert f"warning: SLURM batch {batch.id}" in err and "is at work on this root" in err, err
    finally:
        subprocess.run(["scancel", *batch.jobs], check=True)
    wait_gone(*batch.jobs)
    code, out, err = slurm_cli("plan", str(root), "-c", str(config), "-p", "PROJ")
    assert "is at work on this root" not in err, err
    assert (f"warning: SLURM batch {batch.id} holds this root, but none of its jobs ({batch.array_job}, "
            f"{batch.finalize_job}) is queued or running: nothing is at work here") in err, err
    assert f"`xnat2bids finalize {root}` merges it" in err
    code, out, err = slurm_cli("check", str(root))
    assert "is at work on this root" not in err and "none of its jobs" in err, err


@needs_cluster
def test_cancelled_finalize_is_merged_by_the_next_apply(slurm_cli, emulator, tmp_path):
    exps = add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    batch = staged_unmerged(slurm_cli, root)
    assert sx.read_finalized(batch) is None and read_lock(root) is None
    assert statelock.read_holder(root).id == batch.id  # still held: nothing merged the results yet
    code, out, _ = slurm_cli("status", str(root))
    assert "CANCELLED" in out and out.count(" done ") == 2
    assert f"its finalize job is over; the batch holds the state lock: merge it with `xnat2bids finalize {root}`" in out

    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert f"Merged the results of SLURM batch {batch.id}, whose finalize job did not finish: 2 done" in out
    assert "Nothing to apply." in out
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())
    assert statelock.read_holder(root) is None
    assert slurm_cli("check", str(root), "--full")[0] == 0


@needs_cluster
def test_a_submission_killed_after_its_array_was_queued_is_removed_by_apply_not_finalized(
        slurm_cli, emulator, tmp_path):
    # The node rebooted (SIGKILL) between the two sbatch calls: the held array is queued, the batch
    # records no job. finalize must not mark it done (the array would stay held for ever).
    exps = add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    env = {**os.environ, "XNAT_HOST": emulator.url, "XNAT_USER": "labuser", "XNAT_PASS": SENTINEL,
           "XNAT2BIDS_FAILPOINT": "slurm-array-queued"}
    killed = subprocess.run([sys.executable, "-m", "reconcile", "apply", str(root), "-p", "PROJ", "--yes",
                             "--executor", "slurm"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    batch = current_batch(root)
    assert not batch.submitted

    def queued() -> str:
        return subprocess.run(["squeue", "-h", f"--name=xnat2bids-{batch.id}", "-o", "%i"],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert queued()  # held, waiting for a release that never comes
    code, out, _ = slurm_cli("status", str(root))
    assert "its submission was interrupted before it recorded its jobs, so nothing of it ran; the next " \
           "`xnat2bids apply` removes it" in out, out
    code, out, err = slurm_cli("finalize", str(root))
    assert code == 1 and f"error: batch {batch.id} of {root} was never submitted" in err, out + err
    assert sx.read_finalized(batch) is None and not (root / ".xnat2bids/history.jsonl").exists()

    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 0, out + err
    assert f"Removed SLURM batch {batch.id}, whose submission was interrupted" in out
    assert not queued()
    fresh = current_batch(root)
    assert fresh.id != batch.id and fresh.submitted
    wait_gone(*fresh.jobs)
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())


@needs_cluster
def test_a_finalize_job_cancelled_while_the_array_runs_is_merged_once_the_array_has_ended(
        slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(1))
    slow = emulator.app.faults.add(Fault(route=r"/files/[^/]+\.dcm$", kind="latency", seconds=3))
    root = tmp_path / "bids"
    batch = submit(slurm_cli, root)
    subprocess.run(["scancel", batch.finalize_job], check=True)
    wait_gone(batch.finalize_job)
    wait_for(lambda: slow.seen >= 1, "the task's first download")
    code, out, _ = slurm_cli("status", str(root))
    assert f"its finalize job is over while the array still runs: once the array has ended, merge it with " \
           f"`xnat2bids finalize {root}`" in out, out  # finalize now would be refused: the array runs
    wait_gone(batch.array_job)
    code, out, _ = slurm_cli("status", str(root))
    assert f"its finalize job is over; the batch holds the state lock: merge it with `xnat2bids finalize {root}`" in out
    code, out, err = slurm_cli("finalize", str(root))
    assert code == 0 and "1 done" in out, out + err


@needs_cluster
def test_a_finalize_job_whose_batch_lost_the_root_does_not_merge_on_its_own(slurm_cli, emulator, tmp_path,
                                                                           monkeypatch):
    # The state lock removed under a queued batch (by hand, or by an older force-unlock): what
    # happened to the root since is unknown to its plan; only `finalize --batch` merges it.
    exps = add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    batch = submit(slurm_cli, root)
    statelock.state_lock_path(root).unlink()
    wait_gone(*batch.jobs)
    assert sx.read_finalized(batch) is None and read_lock(root) is None
    assert not batch.credentials_path.exists()  # the jobs are over: their token went with the refusal
    # From an interactive allocation (srun --pty bash, salloc): a SLURM_JOB_ID, not the finalize job's.
    monkeypatch.setenv("SLURM_JOB_ID", "777777")
    code, out, err = slurm_cli("finalize", "--batch", batch.id, str(root))
    assert code == 0, out + err
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())


@needs_cluster
def test_finalizing_a_force_unlocked_batch_claims_no_session_a_newer_batch_exported(slurm_cli, emulator, tmp_path):
    # Its output and the history entry it writes agree: a session the newer batch exported (and
    # its history entry told of) is not this batch's "done".
    exps = add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    old = staged_unmerged(slurm_cli, root)
    assert slurm_cli("force-unlock", old.id, str(root))[0] == 0
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "--wait")
    assert code == 0 and "2 done" in out, out + err
    newer = current_batch(root)
    assert newer.id != old.id and [e["operation"] for e in history(root)] == ["force-unlock", "slurm apply"]

    code, out, err = slurm_cli("finalize", "--batch", old.id, str(root))
    entry = history(root)[-1]
    assert entry["summary"]["done"] == 0 and {row["result"] for row in entry["sessions"]} == {"skipped"}, entry
    assert "Finalize complete: 0 done, 0 failed, 2 skipped" in out, out + err
    assert " ✓ " not in out and out.count(f"already recorded by another apply (SLURM batch {newer.id})") == 2, out
    assert history(root)[1]["batch"] == newer.id and entry["batch"] == old.id
    assert_schema("history", entry)
    assert all("already recorded by another apply" in row["error"] for row in entry["sessions"])
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())
    assert read_lock(root).serial == 1  # nothing of the old batch was committed


def _unreachable_controller(tmp_path: Path, monkeypatch, *tools: str) -> None:
    """SLURM's commands answering as they do while slurmctld is down."""
    fake = tmp_path / "slurm-down"
    fake.mkdir()
    for tool in tools:
        (fake / tool).write_text("#!/bin/sh\necho 'slurm_load_jobs error: Unable to contact slurm controller "
                                 "(connect failure)' >&2\nexit 1\n")
        (fake / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")


@needs_cluster
def test_status_and_force_unlock_while_the_controller_cannot_be_asked(slurm_cli, emulator, tmp_path, monkeypatch):
    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    batch = submit(slurm_cli, root)
    with monkeypatch.context() as down:
        _unreachable_controller(tmp_path, down, "squeue", "scontrol")
        code, out, err = slurm_cli("status", str(root))  # what the batch folder tells, and that SLURM did not answer
        assert code == 0 and f"Batch {batch.id}" in out and "scontrol could not be asked" in out, out + err
        code, out, err = slurm_cli("force-unlock", batch.id, str(root))  # the jobs may well run
        assert code == 1 and "SLURM could not be asked whether the jobs" in err
        assert statelock.read_holder(root).id == batch.id and batch.credentials_path.exists()
    wait_gone(*batch.jobs)


@needs_cluster
def test_force_unlock_of_a_cancelled_batch_invalidates_its_alias_token(slurm_cli, emulator, tmp_path):
    # Its jobs will not run again: the token issued for them must not outlive them.
    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    batch = submit(slurm_cli, root)
    token = json.loads(batch.credentials_path.read_text())
    validate = f"{emulator.url}/data/services/tokens/validate/{token['alias']}/{token['secret']}"
    subprocess.run(["scancel", *batch.jobs], check=True)
    wait_gone(*batch.jobs)
    assert token_valid(requests.get(validate, auth=("labuser", SENTINEL), timeout=10))
    code, out, err = slurm_cli("force-unlock", batch.id, str(root))
    assert code == 0, out + err
    assert f"Invalidated the alias token of SLURM batch {batch.id} on XNAT." in out
    assert f"merged only by `xnat2bids finalize --batch {batch.id} {root}`" in out
    assert not batch.credentials_path.exists() and statelock.read_holder(root) is None
    assert not token_valid(requests.get(validate, auth=("labuser", SENTINEL), timeout=10))


@needs_cluster
def test_a_batch_larger_than_the_clusters_array_limit_is_refused_before_anything_is_submitted(slurm_cli, emulator,
                                                                                               tmp_path):
    from worlds import add_sessions

    limit = int(next(line.split("=")[1] for line in subprocess.run(["scontrol", "show", "config"], capture_output=True,
                                                                     text=True).stdout.splitlines()
                     if line.startswith("MaxArraySize")))
    add_sessions(emulator.archive, limit + 1)
    root = tmp_path / "bids"
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 1, out + err
    assert (f"error: this plan has {limit + 1} sessions to apply, and this cluster takes at most {limit} tasks in one "
            "job array (MaxArraySize)") in err
    assert sx.list_batches(root) == [] and statelock.read_holder(root) is None
    assert not root.exists()  # made by this apply, and nothing written: the next plan still says it is missing
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "--dry-run")
    assert code == 0 and f"# warning: this plan has {limit + 1} sessions to apply" in out, out + err


@needs_cluster
def test_a_finalize_run_again_after_its_history_line_tells_of_each_commit_once(slurm_cli, emulator, tmp_path,
                                                                               monkeypatch):
    # The finalize job killed as it appends the history: the next finalize writes the entry,
    # and no session is told of twice (audits count exports from the history).
    exps = add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    monkeypatch.setenv("XNAT2BIDS_FAILPOINT", "history-append")  # the jobs inherit it
    batch = submit(slurm_cli, root)
    monkeypatch.delenv("XNAT2BIDS_FAILPOINT")
    wait_gone(*batch.jobs)
    assert sx.read_finalized(batch) is None and sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())
    code, out, err = slurm_cli("finalize", str(root))
    assert code == 0, out + err
    told = [row["experiment_id"] for entry in history(root) for row in entry["sessions"] if row["result"] == "done"]
    assert sorted(told) == sorted(e.id for e in exps.values()), history(root)


@needs_cluster
def test_cancelled_batch_leaves_a_consistent_state_that_finalize_repairs(slurm_cli, emulator, tmp_path):
    exps = add(emulator.archive, sessions(3))
    root = tmp_path / "bids"
    config = write_config(tmp_path, "[slurm]\nmax_parallel = 1\n")
    code, out, err = slurm_cli("apply", str(root), "-c", str(config), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 0, out + err
    batch = current_batch(root)
    # Let the first session finish, then cancel everything while the second one is running.
    wait_for(lambda: sx.read_result(batch, 0) is not None, "the first task's result")
    second_log = root / ".xnat2bids/logs" / f"{batch.sessions[1].experiment_id}.log"
    wait_for(second_log.exists, "the second task to start")
    subprocess.run(["scancel", batch.array_job, batch.finalize_job], check=True)
    wait_gone(*batch.jobs)
    assert read_lock(root) is None
    # scancel sends SIGTERM first: the running task stops cleanly and still leaves a record.
    second = sx.read_result(batch, 1)
    assert second is not None and second["status"] == "failed", second
    assert second["message"] == "cancelled (scancel or the time limit)"
    assert not second.get("hint")  # not "the out-of-memory killer": SLURM signalled the whole job
    assert sx.read_result(batch, 2) is None

    code, out, err = slurm_cli("finalize", str(root))
    assert code == 1, out + err  # not every session made it
    assert f"Finalizing batch {batch.id}" in out
    lock = read_lock(root)
    assert list(lock.sessions) == [batch.sessions[0].experiment_id]
    assert statelock.read_holder(root) is None
    assert slurm_cli("check", str(root), "--full")[0] == 0
    code, out, _ = slurm_cli("finalize", str(root))
    assert code == 0 and "Nothing to finalize" in out

    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "--wait")
    assert code == 0, out + err
    assert sorted(read_lock(root).sessions) == sorted(e.id for e in exps.values())
    assert slurm_cli("check", str(root), "--full")[0] == 0


def _files_under(path: Path):
    for p in path.rglob("*"):
        if p.is_file():
            yield p


@needs_cluster
def test_password_appears_in_no_script_argument_environment_or_log(slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 0, out + err
    assert SENTINEL not in out + err
    batch = current_batch(root)
    assert batch.credentials == "alias-token"
    mode = stat.S_IMODE(batch.credentials_path.stat().st_mode)
    assert mode == 0o600
    token = json.loads(batch.credentials_path.read_text())
    assert token["alias"] != "labuser" and token["secret"] != SENTINEL
    validate = f"{emulator.url}/data/services/tokens/validate/{token['alias']}/{token['secret']}"
    assert token_valid(requests.get(validate, auth=("labuser", SENTINEL), timeout=10))

    seen = []
    for job in batch.jobs:
        for argv in (["scontrol", "show", "job", "-dd", job], ["scontrol", "write", "batch_script", job, "-"]):
            seen.append(subprocess.run(argv, capture_output=True, text=True).stdout)
    # slurmctld keeps each queued job's environment and script in its state directory.
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    state_dir = next((line.split("=", 1)[1].strip() for line in conf.splitlines() if line.startswith("StateSaveLocation")), "")
    assert state_dir and os.access(state_dir, os.R_OK), "the tests run as root, like .ci/run"
    environments = []
    for path in _files_under(Path(state_dir)):
        try:
            text = path.read_bytes().decode("latin-1")
        except FileNotFoundError:
            continue  # slurmctld replaces its state files as it goes
        seen.append(text)
        if path.name == "environment":
            environments.append(text)
    # Positive controls: the job's stored environment and script were really looked at.
    assert any(f"XNAT_HOST={emulator.url}" in text for text in environments)
    assert any(str(batch.dir) in text for text in seen)
    for text in seen:
        assert SENTINEL not in text
        assert "XNAT_PASS" not in text

    wait_gone(*batch.jobs)
    assert sx.read_finalized(batch)["ok"]
    assert not batch.credentials_path.exists()  # finalize removes the job credential
    assert not token_valid(requests.get(validate, auth=("labuser", SENTINEL), timeout=10))  # and revokes it on XNAT
    for job in batch.jobs:
        assert SENTINEL not in subprocess.run(["scontrol", "show", "job", "-dd", job], capture_output=True, text=True).stdout
    for path in [*_files_under(root), lock_path(root)]:
        assert SENTINEL.encode() not in path.read_bytes(), path


@needs_cluster
def test_token_the_finalize_job_cannot_revoke_stays_pending_until_the_next_apply(slurm_cli, emulator, tmp_path):
    from reconcile.emulator import Fault

    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    emulator.app.faults.add(Fault(route=r"/data/services/tokens/invalidate/", kind="status", status=503))
    batch = submit(slurm_cli, root)
    token = json.loads(batch.credentials_path.read_text())
    validate = f"{emulator.url}/data/services/tokens/validate/{token['alias']}/{token['secret']}"
    wait_gone(*batch.jobs)
    assert sx.read_finalized(batch)["ok"]  # a token XNAT did not invalidate does not fail the batch
    assert not batch.credentials_path.exists()
    assert token_valid(requests.get(validate, auth=("labuser", SENTINEL), timeout=10))
    [pending] = sx.pending_revocations(root)
    assert pending.batch == batch.id and pending.alias == token["alias"] and pending.attempts == 1
    assert stat.S_IMODE(pending.path.stat().st_mode) == 0o600 and token["secret"] not in pending.path.read_text()
    log = batch.finalize_output.read_text()
    assert f"alias token of SLURM batch {batch.id}" in log and "still pending" in log
    assert token["alias"] not in log and token["secret"] not in log

    emulator.app.faults.clear()
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out, out + err
    assert f"Invalidated the alias token of SLURM batch {batch.id} on XNAT" in out
    assert not token_valid(requests.get(validate, auth=("labuser", SENTINEL), timeout=10))
    assert sx.pending_revocations(root) == [] and not pending.path.exists()


def test_dry_run_prints_the_job_scripts_and_submits_nothing(slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(2))
    root = tmp_path / "bids"
    config = write_config(tmp_path, '''
[slurm]
partition = "debug; touch /tmp/x2b-pwned"
time = "01:00:00"
mem = "2G"
cpus_per_task = 2
account = "mylab"
qos = "normal"
max_parallel = 5
extra_args = ["--comment=$(touch /tmp/x2b-pwned)", "--mail-type=FAIL"]
setup = "module load dcm2niix\\nexit 0'\\"\\nEOF"
''')
    def queue() -> str:  # the jobs SLURM knows of, where there is a SLURM
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout \
            if shutil.which("squeue") else ""

    before = queue()
    code, out, err = slurm_cli("apply", str(root), "-c", str(config), "-p", "PROJ", "--executor", "slurm", "--dry-run")
    assert code == 0, out + err
    assert "Dry run: 2 session(s) would be submitted" in out
    assert "sbatch --parsable --hold --job-name=xnat2bids-" in out and "--array=0-1%2" in out
    assert "'--partition=debug; touch /tmp/x2b-pwned'" in out  # one argv element, quoted for display only
    for flag in ("--time=01:00:00", "--mem=2G", "--cpus-per-task=2", "--account=mylab", "--qos=normal",
                 "--mail-type=FAIL", "'--dependency=afterany:<array job ID>'", "--export=ALL"):
        assert flag in out, out
    assert '-m reconcile slurm-task' in out and '--index "$SLURM_ARRAY_TASK_ID"' in out
    assert f"-m reconcile finalize {root}" in out and f"--config {config.resolve()}" in out  # not the job's lookup
    assert "module load dcm2niix" in out and "setup.sh (the [slurm] setup snippet" in out
    assert "export XNAT_TOKEN_FILE=" in out and SENTINEL not in out
    assert not root.exists()  # nothing written, not even the root
    assert queue() == before
    assert not (pwned := Path("/tmp/x2b-pwned")).exists() or pwned.stat().st_mtime_ns < config.stat().st_mtime_ns


def test_generated_script_keeps_its_structure_whatever_the_setup_snippet_says(tmp_path):
    from reconcile.config import SlurmSettings

    batch = sx.Batch(
        root=tmp_path / "it's a \"bids\" $(root)", id="abc123", created_at="2024-01-01T00:00:00Z", user="u", host="h",
        xnat_url="https://xnat.example.org", verify_tls=True, config_path=None, credentials="alias-token",
        options=sx.BatchOptions(), sessions=(sx.BatchSession(0, "E1", "P", "sub-1/ses-1", "create"),),
    )
    hostile = SlurmSettings(setup="'\nEOF\nfi\nexit 0", extra_args=("--comment=a b", "--wrap=rm -rf /"))
    array, finalize = sx.build_jobs(batch, hostile, python="/usr/bin/python3", token_file=batch.credentials_path)
    for job in (array, finalize):
        assert hostile.setup not in job.script
        check = subprocess.run(["bash", "-n"], input=job.script, capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    # The hostile strings are single argv elements handed to sbatch, never parsed by a shell.
    assert "--wrap=rm -rf /" in array.command() and "--comment=a b" in finalize.command("7")
    assert finalize.command("7")[-2:] == ["--dependency=afterany:7", str(batch.finalize_script)]
    assert sx.job_environment({"XNAT_PASS": "x", "XNAT_USER": "u", "XNAT_TOKEN_FILE": "/t", "GITHUB_TOKEN": "y",
                               "PATH": "/bin", "NETRC": "/n"}) == {"XNAT_TOKEN_FILE": "/t", "PATH": "/bin", "NETRC": "/n"}


@needs_cluster
def test_a_task_refuses_a_config_edited_after_the_batch_was_submitted(slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    queued = '[slurm]\nextra_args = ["--begin=now+3600"]\n'  # the jobs wait in the queue, as on a busy cluster
    config = write_config(tmp_path, queued)
    code, out, err = slurm_cli("apply", str(root), "-c", str(config), "-p", "PROJ", "--yes", "--executor", "slurm")
    assert code == 0, out + err
    batch = current_batch(root)
    config.write_text(queued + '[conversion]\nskip = ["*bold*"]\n')  # edited while the batch waits
    for job in batch.jobs:
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    wait_gone(*batch.jobs)
    result = sx.read_result(batch, 0)
    assert result["status"] == "failed", result
    assert result["message"] == f"the config changed since batch {batch.id} was submitted ({config})"
    assert sx.read_finalized(batch)["ok"] is False
    assert not (root / "sub-01").exists()
    assert read_lock(root) is None or read_lock(root).sessions == {}


@needs_cluster
def test_finalizing_a_copied_dataset_writes_into_the_copy_only(slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    batch = staged_unmerged(slurm_cli, root)
    assert sx.read_result(batch, 0)["status"] == "done" and read_lock(root) is None
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    code, out, err = slurm_cli("status", str(copy))
    assert f"Batch {batch.id} of {copy}" in out and str(root) + "/" not in out
    code, out, err = slurm_cli("finalize", str(copy))
    assert code == 0, out + err
    assert f"Finalizing batch {batch.id} of {copy} (1 session)" in out
    assert list(read_lock(copy).sessions) == [batch.sessions[0].experiment_id]
    assert (copy / batch.sessions[0].address).is_dir() and statelock.read_holder(copy) is None
    assert read_lock(root) is None and not (root / batch.sessions[0].address).exists()
    assert statelock.read_holder(root).id == batch.id  # the original still waits for its own finalize


@needs_cluster
def test_finalize_writes_no_entry_into_a_history_git_left_conflicted_and_apply_records_it_later(
        slurm_cli, emulator, tmp_path):
    add(emulator.archive, sessions(1))
    root = tmp_path / "bids"
    batch = staged_unmerged(slurm_cli, root)
    history = root / ".xnat2bids/history.jsonl"
    conflicted = b"<<<<<<< HEAD\n=======\n>>>>>>> other\n"  # a git pull met the cluster's finalize
    history.write_bytes(conflicted)
    code, out, err = slurm_cli("finalize", str(root))
    assert code == 0 and list(read_lock(root).sessions) == [batch.sessions[0].experiment_id], out + err
    assert f"batch {batch.id}'s entry is not written" in err and history.read_bytes() == conflicted, out + err
    history.write_bytes(b"")  # resolved
    code, out, err = slurm_cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    entries = [json.loads(line) for line in history.read_text().splitlines()]
    assert [(e["operation"], [r["experiment_id"] for r in e["sessions"]]) for e in entries] == [
        ("unrecorded", [batch.sessions[0].experiment_id])]


def test_the_jobs_get_an_absolute_config_path_and_no_credentials(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = sx.job_environment({"XNAT2BIDS_CONFIG": "lab.toml", "XNAT_PASS": SENTINEL, "PATH": "/bin",
                              "XNAT_TOKEN_FILE": "tok.json", "NETRC": "my/netrc"})
    assert env == {"XNAT2BIDS_CONFIG": str(tmp_path / "lab.toml"), "PATH": "/bin",  # the jobs run elsewhere
                   "XNAT_TOKEN_FILE": str(tmp_path / "tok.json"), "NETRC": str(tmp_path / "my/netrc")}


@pytest.mark.parametrize("status", [404, 405, 403, 503])
def test_the_jobs_get_the_password_only_where_xnat_has_no_token_service(emulator, tmp_path, status):
    # A token service that failed now (a 503) is no reason to leave the password on the cluster's disk.
    from reconcile.credentials import Credentials
    from reconcile.emulator import Fault
    from reconcile.errors import RemoteError
    from reconcile.xnat import XnatClient

    emulator.archive.add_user("labuser", SENTINEL)
    emulator.app.faults.add(Fault(route=r"/data/services/tokens/issue", kind="status", status=status))
    path = tmp_path / "batch" / "credentials.json"
    with XnatClient(emulator.url, Credentials("labuser", SENTINEL, "env"), backoff=0, retries=0) as client:
        if status == 503:
            with pytest.raises(RemoteError, match="XNAT could not issue an alias token for the jobs"):
                sx.write_job_credentials(client, path)
            assert not path.exists()
        else:
            assert sx.write_job_credentials(client, path) == "password-file"
            assert json.loads(path.read_text()) == {"alias": "labuser", "secret": SENTINEL, "kind": "password-file"}
            assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_session_another_apply_exported_since_is_not_claimed_by_an_old_batch():
    # finalize --batch of a force-unlocked batch: a session whose staged folder is gone and whose
    # record is newer counts as this batch's only when it is what the batch planned.
    from dataclasses import replace

    from test_lock import record

    from reconcile.model import BidsAddress, Experiment, SessionKey, parse_timestamp
    from reconcile.plan import Action, Change, Reason

    rec = record(1)
    planned = Experiment(rec.experiment_id, rec.session_label, rec.project, rec.subject_id, rec.subject_label,
                         rec.date, parse_timestamp(rec.insert_date), parse_timestamp(rec.last_modified),
                         "xnat:mrSessionData")
    change = Change(Action.UPDATE, SessionKey(rec.project, rec.experiment_id), BidsAddress(rec.bids_subject, rec.bids_session),
                    (Reason("redated", "date"),), None, planned)
    assert sx._as_planned(rec, change)
    assert not sx._as_planned(replace(rec, date="2024-08-05"), change)
    assert not sx._as_planned(replace(rec, last_modified="2024-08-05 10:00:00.0"), change)


def test_an_interrupted_submission_cancels_the_held_array(monkeypatch, tmp_path):
    # Ctrl-C between the two sbatch calls (a busy slurmctld): the held array is cancelled, not
    # left queued for ever with no batch to own it.
    calls, cancelled = [], []

    def sbatch(command, env):
        calls.append(command)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return "41"

    monkeypatch.setattr(sx, "_sbatch", sbatch)
    monkeypatch.setattr(sx, "cancel_jobs", lambda ids: cancelled.extend(ids))

    class Job:
        def command(self, dependency=None):
            return ["sbatch", f"--dependency=afterany:{dependency}"] if dependency else ["sbatch"]

    with pytest.raises(KeyboardInterrupt):
        sx.submit(tmp_path, None, None, Job(), Job(), env={})
    assert cancelled == ["41"]


def test_wait_with_slurm_unreachable_after_the_finalize_job_still_says_the_way_out(monkeypatch, tmp_path, capsys):
    from types import SimpleNamespace

    from reconcile import cli as cli_module
    from reconcile.errors import SlurmError

    batch = SimpleNamespace(finalize_job="12", array_job="11", finalize_output=tmp_path / "finalize.out",
                            root=tmp_path, id="b1", sessions=[], jobs=("11", "12"))

    def down(*args, **kwargs):
        raise SlurmError("squeue failed", detail="slurm_load_jobs error: Unable to contact slurm controller")

    monkeypatch.setattr(sx, "wait_for_job", lambda *args, **kwargs: None)
    monkeypatch.setattr(sx, "read_finalized", lambda b: None)
    monkeypatch.setattr(sx, "job_state", down)
    monkeypatch.setattr(sx, "active_jobs", down)
    assert cli_module._wait_for_batch(batch) == cli_module.EXIT_ERROR
    err = capsys.readouterr().err
    assert "error: the finalize job 12 ended (state unknown) without merging the results\n" in err
    assert f"hint: run `xnat2bids finalize {tmp_path}` to merge them" in err


@pytest.mark.parametrize("state, queued", [("pending", True), ("running", True), ("suspended", True),
                                           ("requeued", True), ("completing", True), ("done", False),
                                           ("failed", False), ("cancelled", False), ("unknown", False)])
def test_a_task_queued_in_any_slurm_state_keeps_finalize_waiting(state, queued):
    entry = sx.BatchSession(0, "XNAT_E00001", "PROJ", "sub-01/ses-01", "create")
    assert sx.SessionState(entry, state).queued is queued
