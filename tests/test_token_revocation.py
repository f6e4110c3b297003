"""A SLURM batch's alias token is invalidated on XNAT even when XNAT cannot be reached at first.

On the real single-node cluster (`.ci/slurm/start-slurm.sh`): a submission to a partition that
does not exist is refused by sbatch itself; jobs told to begin in an hour are cancelled before
they run, and `finalize` is run by hand. The finalize job's own revocation is covered in
test_slurm.py.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import requests
from worlds import add, assert_schema, token_valid, write_config

from reconcile.credentials import Credentials
from reconcile.emulator import Fault
from reconcile.executors import slurm as sx
from reconcile.xnat import XnatClient

INVALIDATE = r"/data/services/tokens/invalidate/"
OUTAGES = {
    "5xx": {"kind": "status", "status": 503},
    "unreachable": {"kind": "reset"},  # the connection drops: what a client sees of a network failure
}


@pytest.fixture
def issued(emulator, monkeypatch) -> list[dict]:
    """Every alias token the emulator issues (the tests need the secrets to validate them)."""
    tokens: list[dict] = []
    issue = emulator.app.issue_token

    def recording(login: str, single_use: bool = False) -> dict:
        token = issue(login, single_use)
        tokens.append(token)
        return token

    monkeypatch.setattr(emulator.app, "issue_token", recording)
    return tokens


needs_slurm = pytest.mark.skipif(
    shutil.which("sbatch") is None and os.environ.get("CI") != "true",
    reason="no sbatch on PATH: start a cluster with `.ci/slurm/start-slurm.sh` (as root) to run the SLURM tests",
)
# Jobs that wait an hour to begin: a test cancels them before they could run.
LATER = '[slurm]\nextra_args = ["--begin=now+3600"]\n'


def cancel_and_wait(batch: sx.Batch, timeout: float = 120.0) -> None:
    subprocess.run(["scancel", *batch.jobs], check=True)
    deadline = time.monotonic() + timeout
    while sx.active_jobs(batch.jobs):
        assert time.monotonic() < deadline, f"SLURM jobs {batch.jobs} still queued after scancel"
        time.sleep(0.3)


def still_valid(emulator, token: dict) -> bool:
    url = f"{emulator.url}/data/services/tokens/validate/{token['alias']}/{token['secret']}"
    return token_valid(requests.get(url, auth=(emulator.user, emulator.password), timeout=10))


def the_pending_record(root: Path) -> sx.PendingRevocation:
    pending = sx.pending_revocations(root)
    assert len(pending) == 1, pending
    return pending[0]


def assert_holds_no_secret(path: Path, token: dict) -> None:
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token["secret"] not in text
    assert "secret" not in json.loads(text)


@pytest.mark.slurm
@needs_slurm
@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_failed_revocation_of_a_refused_submission_is_retried_by_the_next_apply(
        cli, emulator, issued, tmp_path, outage):
    add(emulator.archive, [("01", "01_MR1", "2024-01-11")])
    root = tmp_path / "bids"
    nowhere = write_config(tmp_path, '[slurm]\npartition = "no-such-partition"\n')
    emulator.app.faults.add(Fault(route=INVALIDATE, **OUTAGES[outage]))

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "-c", str(nowhere))
    assert code == 1 and "sbatch refused the job" in err and "partition" in err.lower(), out + err
    [token] = issued
    assert still_valid(emulator, token)  # XNAT never got to invalidate it
    record = the_pending_record(root)
    assert record.alias == token["alias"] and record.xnat_url == emulator.url and record.attempts == 1
    assert_holds_no_secret(record.path, token)
    assert not sx.list_batches(root)  # the refused batch and its token file are gone
    assert f"alias token of SLURM batch {record.batch}" in err and "still pending" in err
    assert token["alias"] not in out + err and token["secret"] not in out + err

    emulator.app.faults.clear()
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "-c", str(nowhere))  # a local apply
    assert code == 0, out + err
    assert f"Invalidated the alias token of SLURM batch {record.batch} on XNAT" in out
    assert not still_valid(emulator, token)
    assert sx.pending_revocations(root) == [] and not record.path.exists()


@pytest.mark.slurm
@needs_slurm
def test_finalize_keeps_a_failed_revocation_pending_and_the_next_finalize_retries_it(
        cli, emulator, issued, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-11")])
    root = tmp_path / "bids"
    later = write_config(tmp_path, LATER)

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "-c", str(later))
    assert code == 0 and "Submitted batch" in out, out + err
    first = sx.list_batches(root)[-1]
    cancel_and_wait(first)
    emulator.app.faults.add(Fault(route=INVALIDATE, kind="status", status=502))
    code, out, err = cli("finalize", str(root))  # its jobs ended without staging anything
    assert "Finalize complete: 0 done, 0 failed, 1 skipped" in out, out + err
    assert f"alias token of SLURM batch {first.id}" in err and "still pending" in err
    assert not first.credentials_path.exists()  # the token file goes; the alias stays in the record
    [token] = issued
    assert still_valid(emulator, token)
    record = the_pending_record(root)
    assert record.batch == first.id and record.alias == token["alias"]
    assert_holds_no_secret(record.path, token)
    code, out, err = cli("status", str(root))
    assert code == 0 and "Token revocations pending: 1" in out and f"batch {first.id} on {emulator.url}" in out
    assert "1 attempt(s)" in out and token["alias"] not in out + err and token["secret"] not in out + err
    code, out, _ = cli("status", str(root), "--json")
    [listed] = json.loads(out)["pending_revocations"]
    assert_schema("status", json.loads(out))
    assert listed["batch"] == first.id and listed["attempts"] == 1 and token["alias"] not in out

    # The next submission's retry is refused: still pending, and the new batch goes ahead.
    emulator.app.faults.clear()
    emulator.app.faults.add(Fault(route=INVALIDATE, kind="status", status=403))
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--executor", "slurm", "-c", str(later))
    assert code == 0 and "Submitted batch" in out, out + err
    assert f"alias token of SLURM batch {first.id}" in err and "still pending" in err
    second = sx.list_batches(root)[-1]
    assert second.id != first.id and still_valid(emulator, token)
    cancel_and_wait(second)

    # That batch's finalize retries with the batch's own token, then revokes that one too.
    emulator.app.faults.clear()
    code, out, err = cli("finalize", str(root))
    assert "Finalize complete" in out and "still pending" not in err, out + err
    assert len(issued) == 2 and not any(still_valid(emulator, t) for t in issued)
    assert sx.pending_revocations(root) == []
    code, out, _ = cli("status", str(root))
    assert code == 0 and "Token revocations pending" not in out


def test_retry_keeps_the_record_while_xnat_fails_and_drops_it_once_xnat_has_no_such_token(emulator, tmp_path):
    root = tmp_path / "bids"
    token = emulator.app.issue_token(emulator.user)
    pending = sx.PendingRevocation(root, "b1", token["alias"], emulator.url, "2024-01-01T00:00:00Z")
    sx._write_revocation(pending)
    elsewhere = sx.PendingRevocation(root, "b2", "not-this-xnat", "https://xnat.example.org", "2024-01-01T00:00:00Z")
    sx._write_revocation(elsewhere)
    warnings: list[str] = []
    with XnatClient(emulator.url, Credentials(emulator.user, emulator.password, "env"), retries=0) as client:
        emulator.app.faults.add(Fault(route=INVALIDATE, kind="status", status=500))
        assert sx.retry_revocations(root, client, warn=warnings.append) == []
        [warning] = warnings
        assert "alias token of SLURM batch b1" in warning and "still pending" in warning
        assert token["alias"] not in warning
        [kept, _elsewhere] = sx.pending_revocations(root)
        assert kept.batch == "b1" and kept.attempts == 1 and "500" in kept.last_error
        assert token["alias"] not in kept.last_error
        assert still_valid(emulator, token)

        # XNAT answering "no such token" (or, as the emulator does, OK for an unknown alias) is done.
        emulator.app.faults.clear()
        emulator.app.faults.add(Fault(route=INVALIDATE, kind="status", status=404, times=1))
        assert [p.batch for p in sx.retry_revocations(root, client)] == ["b1"]
    assert [p.batch for p in sx.pending_revocations(root)] == ["b2"]  # another XNAT's token is left alone


@pytest.mark.parametrize("service", ["tokens", "no token service"])
def test_a_batch_whose_submission_was_killed_before_it_recorded_its_jobs_is_removed_by_the_next_apply(
        cli, emulator, issued, tmp_path, service):
    # The submitting process was killed (SIGKILL, a reboot) after writing the batch and its jobs'
    # credentials, before sbatch's job IDs were recorded: no finalize job will ever clean it up.
    root = tmp_path / "bids"
    batch = sx.Batch(
        root=root, id="killed000001", created_at="2024-01-01T00:00:00Z", user="u", host="h", xnat_url=emulator.url,
        verify_tls=True, config_path=None, credentials="alias-token", options=sx.BatchOptions(),
        sessions=(sx.BatchSession(0, "E1", "PROJ", "sub-1/ses-1", "create"),),
    )
    batch.dir.mkdir(parents=True)
    sx._write_json(batch.manifest_path, batch.to_dict())  # as write_batch leaves it: kind not known yet
    if service != "tokens":
        emulator.app.faults.add(Fault(route=r"/data/services/tokens/issue", kind="status", status=404))
    with XnatClient(emulator.url, Credentials(emulator.user, emulator.password, "env"), retries=0) as client:
        kind = sx.write_job_credentials(client, batch.credentials_path)
    assert kind == ("alias-token" if service == "tokens" else "password-file")

    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0 and "Nothing to apply." in out, out + err
    assert (f"Removed SLURM batch {batch.id}, whose submission was interrupted before it recorded its jobs "
            "(they never ran); its credentials are deleted.") in out
    assert not batch.dir.exists() and sx.list_batches(root) == []
    assert sx.pending_revocations(root) == []  # a token invalidated at once; a password is nothing to invalidate
    if service == "tokens":
        [token] = issued
        assert not still_valid(emulator, token)
    else:
        assert issued == [] and emulator.password not in out + err
