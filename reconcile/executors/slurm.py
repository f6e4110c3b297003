"""Apply on a SLURM cluster: one job array stages the sessions, one finalize job commits them.

Owns the batch directory (`.xnat2bids/batches/<id>/`: manifest, saved plan, job scripts, the
`[slurm] setup` snippet, result records, job logs), the jobs' alias tokens and the records of
those whose revocation is still pending (`.xnat2bids/revocations/`), the sbatch/squeue/scontrol
calls and the merge of result records into the lock. Array tasks only stage
(`apply.stage_session`) and write a result record; only `finalize_batch` writes the lock and
the history. Prints nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from reconcile import statelock
from reconcile.apply import (
    ApplyReport,
    Event,
    Outcome,
    StagedSession,
    Status,
    append_history,
    commit_session,
    history_conflict_line,
    lock_for,
    log_line,
    read_history,
    recover,
    save_commits,
    stage_session,
    staged_outputs,
    told_by,
)
from reconcile.config import Config, ConversionSettings, SlurmSettings, load_config
from reconcile.credentials import without_secrets
from reconcile.durable import write_atomic
from reconcile.errors import (
    ConfigError,
    ForbiddenError,
    LockHeldError,
    NotFoundError,
    RemoteError,
    SlurmError,
    XnatBidsError,
)
from reconcile.failpoints import hit
from reconcile.localscan import sha256_file
from reconcile.model import RemoteFile, Scan, SessionRecord, login_name, utc_now
from reconcile.plan import Change, Plan, same_time
from reconcile.validate import ValidationResult
from reconcile.workarea import WorkArea, share_with_group, work_path

BATCH_FORMAT_VERSION = 1
RESULT_FORMAT_VERSION = 1
REVOCATION_FORMAT_VERSION = 1
# Revoking a token is not worth holding a finalize job or an apply for long while XNAT is down:
# the record stays and the next run tries again.
REVOKE_RETRIES = 2
REVOKE_TIMEOUT_S = 15.0
KEEP_FINALIZED_BATCHES = 20
HISTORY_OPERATION = "slurm apply"

# Names of environment variables that must not travel to slurmctld with the job: sbatch
# stores the submitting environment with the job (--export=ALL), where admins and dumps see it.
_PATH_ENV = frozenset({"XNAT_TOKEN_FILE"})  # a path to a 0600 file, not a secret
# squeue shows only jobs that are not finished yet; these are the states it can report.
_ACTIVE = {
    "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
    "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT",
}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Readers never see half a record: see `durable.write_atomic`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o644)


# -- the batch on disk ----------------------------------------------------------------------


@dataclass(frozen=True)
class BatchOptions:
    """What the finalize job and the tasks need to know about the apply command line."""

    repair_drift: bool = False
    keep_dicom: bool = False
    export_method: str = "auto"
    git_commit: bool = False
    validate: bool = False


@dataclass(frozen=True)
class BatchSession:
    """Array task `index` stages this session (the index-th actionable change of the plan)."""

    index: int
    experiment_id: str
    project: str
    address: str
    action: str


@dataclass(frozen=True)
class Batch:
    """One submission: the manifest in `.xnat2bids/batches/<id>/manifest.json`.

    The batch ID is the ID of the state lock taken at submission, so the lock names its batch.
    """

    root: Path
    id: str
    created_at: str
    user: str
    host: str
    xnat_url: str
    verify_tls: bool
    config_path: str | None
    credentials: str  # how the tasks log in: netrc | token-file | alias-token | password-file
    options: BatchOptions
    sessions: tuple[BatchSession, ...]
    max_parallel: int = 1
    timeout: float = 30.0  # the config's, for the tasks' XNAT requests (absent from older batches)
    array_job: str | None = None
    finalize_job: str | None = None

    @property
    def dir(self) -> Path:
        return batch_dir(self.root, self.id)

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def plan_path(self) -> Path:
        return self.dir / "plan.json"

    @property
    def setup_path(self) -> Path:
        return self.dir / "setup.sh"

    @property
    def credentials_path(self) -> Path:
        return self.dir / "credentials.json"

    @property
    def task_script(self) -> Path:
        return self.dir / "task.sh"

    @property
    def finalize_script(self) -> Path:
        return self.dir / "finalize.sh"

    @property
    def finalized_path(self) -> Path:
        return self.dir / "finalized.json"

    @property
    def logs_dir(self) -> Path:
        return self.dir / "logs"

    def result_path(self, index: int) -> Path:
        return self.dir / "results" / f"{index}.json"

    def task_output(self, index: int) -> Path:
        return self.logs_dir / f"task-{index}.out"

    @property
    def finalize_output(self) -> Path:
        return self.logs_dir / "finalize.out"

    @property
    def submitted(self) -> bool:
        """Whether the submission recorded its jobs: one killed before (node reboot, SIGKILL) ran nothing."""
        return self.array_job is not None

    @property
    def jobs(self) -> tuple[str, ...]:
        return tuple(j for j in (self.array_job, self.finalize_job) if j)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["root"] = str(self.root)
        data["format_version"] = BATCH_FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Batch:
        if data.get("format_version", 0) > BATCH_FORMAT_VERSION:
            raise SlurmError(f"batch {data.get('id')} was written by a newer xnat2bids")
        fields = {k: v for k, v in data.items() if k != "format_version"}
        fields["root"] = Path(data["root"])
        fields["options"] = BatchOptions(**data["options"])
        fields["sessions"] = tuple(BatchSession(**s) for s in data["sessions"])
        return cls(**fields)


def batches_dir(root: Path) -> Path:
    return work_path(root, "batches")


def batch_dir(root: Path, batch_id: str) -> Path:
    return batches_dir(root) / batch_id


def _from_manifest(path: Path, root: Path) -> Batch:
    """The batch of a manifest found in the dataset at `root`. Its `root` is that dataset, not the
    one it was submitted from: finalizing a copied or moved dataset must never write into the
    original."""
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return replace(Batch.from_dict(data), root=root.absolute())


def read_batch(root: Path, batch_id: str) -> Batch:
    path = batch_dir(root, batch_id) / "manifest.json"
    try:
        return _from_manifest(path, root)
    except FileNotFoundError:
        raise SlurmError(f"no SLURM batch {batch_id} in {root}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SlurmError(f"the manifest {path} is unreadable: {exc}") from exc


def list_batches(root: Path) -> list[Batch]:
    """Every batch with a manifest, oldest first."""
    base = batches_dir(root)
    if not base.is_dir():
        return []
    batches = []
    for manifest in base.glob("*/manifest.json"):
        try:
            batches.append(_from_manifest(manifest, root))
        except (ValueError, TypeError, KeyError, AttributeError, SlurmError):
            continue  # a half-written batch of a failed submission; nothing to merge from it
    return sorted(batches, key=lambda b: (b.created_at, b.id))


def unfinalized_batches(root: Path) -> list[Batch]:
    return [b for b in list_batches(root) if b.array_job and not b.finalized_path.exists()]


def read_result(batch: Batch, index: int) -> dict[str, Any] | None:
    try:
        return json.loads(batch.result_path(index).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # torn by a kill mid-write cannot happen (rename), but a disk error can


def read_finalized(batch: Batch) -> dict[str, Any] | None:
    try:
        return json.loads(batch.finalized_path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return None


# -- preparing and submitting -----------------------------------------------------------------


@dataclass(frozen=True)
class JobSpec:
    """One sbatch submission: its argv (without the dependency and script) and its script."""

    kind: str  # "array" | "finalize"
    argv: tuple[str, ...]
    script_path: Path
    script: str

    def command(self, dependency: str | None = None) -> list[str]:
        extra = [f"--dependency=afterany:{dependency}"] if dependency else []
        return [*self.argv, *extra, str(self.script_path)]


def _pattern_safe(path: Path) -> str:
    # sbatch expands %j, %a, ... in --output; a literal % in the BIDS root must be doubled.
    return str(path).replace("%", "%%")


def sbatch_options(settings: SlurmSettings) -> list[str]:
    """The [slurm] settings as sbatch arguments, one argv element each (no shell involved)."""
    opts = []
    for flag, value in (
        ("--partition", settings.partition),
        ("--time", settings.time),
        ("--mem", settings.mem),
        ("--cpus-per-task", settings.cpus_per_task),
        ("--account", settings.account),
        ("--qos", settings.qos),
    ):
        if value is not None and value != "":
            opts.append(f"{flag}={value}")
    return opts + list(settings.extra_args)


_SCRIPT = """\
#!/bin/bash
# xnat2bids SLURM {kind} job of batch {batch_id}. Generated by xnat2bids; do not edit.
# The [slurm] setup snippet is sourced from its own file, so nothing in it can change the
# structure of this script; a non-zero status of its last command fails the job.
if ! . {setup}; then
    echo "xnat2bids: the [slurm] setup snippet failed:" {setup} >&2
    exit 1
fi
{credentials}exec {command}
"""


def build_jobs(
    batch: Batch, settings: SlurmSettings, *, python: str = sys.executable, token_file: Path | None = None
) -> tuple[JobSpec, JobSpec]:
    """The array job (submitted held) and the finalize job; pure, so --dry-run prints the same."""
    q = shlex.quote
    common = ["sbatch", "--parsable", "--export=ALL", f"--chdir={batch.dir}", *sbatch_options(settings)]
    credentials = f"export XNAT_TOKEN_FILE={q(str(token_file))}\n" if token_file else ""
    n = len(batch.sessions)
    throttle = max(1, min(batch.max_parallel, n))
    task_cmd = f'{q(python)} -m reconcile slurm-task {q(str(batch.dir))} --index "$SLURM_ARRAY_TASK_ID"'
    array = JobSpec(
        "array",
        (
            *common[:2],
            # Held until the finalize job is queued and the state lock records both job IDs.
            "--hold",
            f"--job-name=xnat2bids-{batch.id}",
            f"--array=0-{n - 1}%{throttle}",
            f"--output={_pattern_safe(batch.logs_dir)}/task-%a.out",
            *common[2:],
        ),
        batch.task_script,
        _SCRIPT.format(kind="array", batch_id=batch.id, setup=q(str(batch.setup_path)), credentials=credentials,
                       command=task_cmd),
    )
    # The batch's own config (finalize reads only its layout): not whatever the job's environment
    # would find, which may be a relative $XNAT2BIDS_CONFIG or a broken default.
    config = f" --config {q(batch.config_path)}" if batch.config_path else ""
    finalize_cmd = f"{q(python)} -m reconcile finalize {q(str(batch.root))} --batch {q(batch.id)}{config}"
    finalize = JobSpec(
        "finalize",
        (
            *common[:2],
            f"--job-name=xnat2bids-{batch.id}-finalize",
            f"--output={_pattern_safe(batch.finalize_output)}",
            *common[2:],
        ),
        batch.finalize_script,
        _SCRIPT.format(kind="finalize", batch_id=batch.id, setup=q(str(batch.setup_path)), credentials="",
                       command=finalize_cmd),
    )
    return array, finalize


def new_batch(
    root: Path,
    batch_id: str,
    plan: Plan,
    config: Config,
    *,
    xnat_url: str,
    credentials: str,
    options: BatchOptions,
    max_parallel: int,
) -> Batch:
    changes = plan.actionable(repair_drift=options.repair_drift)
    return Batch(
        root=root,
        id=batch_id,
        created_at=utc_now(),
        user=login_name(),
        host=socket.gethostname(),
        xnat_url=xnat_url,
        verify_tls=config.verify_tls,
        timeout=config.timeout,
        config_path=str(Path(config.source).resolve()) if config.source else None,
        credentials=credentials,
        options=options,
        sessions=tuple(
            BatchSession(i, c.key.experiment_id, c.key.project, c.address.path, c.action.value)
            for i, c in enumerate(changes)
        ),
        max_parallel=max_parallel,
    )


def credentials_kind(client) -> str:
    """How the jobs will log in, given how this process did."""
    source = client.credentials.source
    return source if source in ("netrc", "token-file") else "alias-token"


def write_job_credentials(client, path: Path) -> str:
    """Give the jobs a credential they read from a 0600 file: an alias token where XNAT issues one.

    Returns the kind written ("alias-token" or "password-file"). netrc and token-file users
    need no file: the jobs read the same ~/.netrc / $NETRC / $XNAT_TOKEN_FILE.
    """
    try:
        issued = client.get_json("/data/services/tokens/issue")
        alias, secret, kind = str(issued["alias"]), str(issued["secret"]), "alias-token"
    except (RemoteError, KeyError, TypeError) as exc:
        # No token service (404, 405) or not allowed (403): the password itself, readable only by
        # this user. A service that failed now, or answered without a token, is no reason for that.
        absent = isinstance(exc, (NotFoundError, ForbiddenError)) or (
            isinstance(exc, RemoteError) and (exc.detail or "").startswith("HTTP 405"))
        if not absent:
            why = exc.summary if isinstance(exc, RemoteError) else "its token service answered without one"
            raise RemoteError(f"XNAT could not issue an alias token for the jobs: {why}",
                              detail=exc.detail if isinstance(exc, RemoteError) else None,
                              hint="run again later; the jobs are given a token, not your password, where XNAT "
                                   "issues one") from exc
        alias, secret, kind = client.credentials.user, client.credentials.password, "password-file"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        # The kind too: a batch whose submission was killed before its manifest said which is
        # cleaned up by `discard_unsubmitted`, which must not take a password for a token.
        json.dump({"alias": alias, "secret": secret, "kind": kind}, fh)
    return kind


def job_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The submitting environment without anything that looks like a credential. The jobs run in
    the batch's folder: a relative $XNAT2BIDS_CONFIG, $XNAT_TOKEN_FILE or $NETRC is made absolute
    for them (the file the submission read)."""
    from reconcile.config import ENV_CONFIG

    kept = without_secrets(env, keep=_PATH_ENV)
    for name in (ENV_CONFIG, "XNAT_TOKEN_FILE", "NETRC"):
        if kept.get(name):
            kept[name] = os.path.abspath(os.path.expanduser(kept[name]))
    return kept


def write_batch(batch: Batch, plan_json: str, settings: SlurmSettings, jobs: Sequence[JobSpec]) -> None:
    """Everything the jobs read, before anything is submitted."""
    batch.logs_dir.mkdir(parents=True, exist_ok=True)
    (batch.dir / "results").mkdir(exist_ok=True)
    batch.plan_path.write_text(plan_json, encoding="utf-8")
    batch.setup_path.write_text(settings.setup + ("\n" if settings.setup and not settings.setup.endswith("\n") else ""), encoding="utf-8")
    for job in jobs:
        job.script_path.write_text(job.script, encoding="utf-8")
        job.script_path.chmod(0o700)
    _write_json(batch.manifest_path, batch.to_dict())


def _run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if shutil.which(argv[0]) is None:
        raise SlurmError(f"{argv[0]} is not on PATH", hint="run this on a SLURM login node, or use --executor local")
    try:
        return subprocess.run(list(argv), capture_output=True, encoding="utf-8", errors="replace", env=dict(env) if env is not None else None,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"{argv[0]} did not answer within {timeout:.0f} s") from exc


def _sbatch(argv: Sequence[str], env: Mapping[str, str]) -> str:
    out = _run(argv, env=env)
    job_id = out.stdout.strip().split(";")[0]
    if out.returncode != 0 or not job_id.isdigit():
        raise SlurmError("sbatch refused the job", detail=(out.stderr or out.stdout).strip()[-2000:])
    return job_id


def cancel_jobs(job_ids: Iterable[str]) -> None:
    ids = [j for j in job_ids if j]
    if ids:
        _run(["scancel", *ids])


def check_array_size(batch: Batch) -> None:
    """Refuse a batch with more sessions than the cluster takes tasks in one array (MaxArraySize,
    1001 by default), before anything is written or submitted."""
    out = _run(["scontrol", "show", "config"])
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.MULTILINE) if out.returncode == 0 else None
    if m is None:  # not said: sbatch decides
        return
    limit = int(m.group(1))
    if len(batch.sessions) > limit:
        raise SlurmError(f"this plan has {len(batch.sessions)} sessions to apply, and this cluster takes at most {limit} "
                         "tasks in one job array (MaxArraySize)",
                         hint="apply a part at a time (--subject or --session globs select it), or use --executor local")


def submit(
    root: Path, holder: statelock.Holder, batch: Batch, array: JobSpec, finalize: JobSpec, *, env: Mapping[str, str]
) -> tuple[Batch, statelock.Holder]:
    """Queue the held array, then finalize after it; record both IDs; then let the array run.

    The array is released only once the state lock names both jobs, so a finalize job that
    runs at once (every task failing fast) can never release a lock that is then re-created.
    """
    array_id = _sbatch(array.command(), env)
    hit("slurm-array-queued")
    try:
        finalize_id = _sbatch(finalize.command(dependency=array_id), env)
    except BaseException:  # a refusal, or Ctrl-C meanwhile: the held array must not stay queued for ever
        cancel_jobs([array_id])
        raise
    batch = replace(batch, array_job=array_id, finalize_job=finalize_id)
    try:
        _write_json(batch.manifest_path, batch.to_dict())
        holder = statelock.record_jobs(root, holder, batch.jobs)
        out = _run(["scontrol", "release", array_id])
        if out.returncode != 0:
            raise SlurmError(f"could not release the held array job {array_id}", detail=out.stderr.strip())
    except BaseException:
        cancel_jobs(batch.jobs)
        raise
    return batch, holder


# -- job states -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobState:
    job_id: str  # "12" or, for an array task, "12_3"
    state: str  # SLURM's JobState (PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)
    reason: str = ""
    exit_code: str = ""

    @property
    def active(self) -> bool:
        return self.state in _ACTIVE

    def describe(self) -> str:
        text = f"{self.job_id} {self.state}"
        if self.reason and self.reason not in ("None", "(null)"):
            text += f" ({self.reason})"
        return text


def active_jobs(job_ids: Iterable[str], *, timeout: float = 60) -> dict[str, list[str]]:
    """Job ID (array ID for array tasks) → the squeue states of its parts still in the queue.
    SlurmError when squeue fails or does not answer within `timeout` seconds."""
    ids = sorted({j for j in job_ids if j})
    if not ids:
        return {}
    out = _run(["squeue", "-h", "-j", ",".join(ids), "-o", "%F|%i|%T"], timeout=timeout)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return {}  # all of them left the queue long ago
        raise SlurmError("squeue failed", detail=out.stderr.strip()[-2000:])
    found: dict[str, list[str]] = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[2] in _ACTIVE:
            found.setdefault(parts[0], []).append(parts[2])
    return found


_SCONTROL_FIELD = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|ExitCode)=(\S*)")


def _expand_tasks(spec: str) -> list[int]:
    """ArrayTaskId as scontrol prints it: '3', '2-4%2', '1,3,5-6'."""
    spec = spec.split("%", 1)[0]
    tasks: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        if lo.isdigit() and (not sep or hi.isdigit()):
            tasks += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return tasks


def job_details(job_id: str) -> list[dict[str, str]]:
    """`scontrol -o show job ID`: one dict per record (per array task); [] once SLURM forgot it.
    SlurmError when SLURM cannot be asked (its controller down): not the same as forgotten."""
    out = _run(["scontrol", "-o", "show", "job", job_id])
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:
            return []
        raise SlurmError("scontrol could not be asked about job " + job_id, detail=out.stderr.strip()[-2000:],
                         hint="is the SLURM controller up? run again later")
    return [dict(_SCONTROL_FIELD.findall(line)) for line in out.stdout.splitlines() if line.strip()]


def array_task_states(array_job: str) -> dict[int, JobState]:
    states = {}
    for rec in job_details(array_job):
        for task in _expand_tasks(rec.get("ArrayTaskId", "")):
            states[task] = JobState(f"{array_job}_{task}", rec.get("JobState", "UNKNOWN"), rec.get("Reason", ""),
                                    rec.get("ExitCode", ""))
    return states


def job_state(job_id: str) -> JobState | None:
    recs = job_details(job_id)
    if not recs:
        return None
    rec = recs[0]
    return JobState(job_id, rec.get("JobState", "UNKNOWN"), rec.get("Reason", ""), rec.get("ExitCode", ""))


def listed_jobs(active: Mapping[str, list[str]]) -> str:
    """`active_jobs`' answer for a message: '49 (RUNNING), 50 (PENDING)'."""
    return ", ".join(f"{j} ({'/'.join(sorted(set(s)))})" for j, s in sorted(active.items()))


def check_batch_idle(batch: Batch, *, own_job: str | None = None) -> None:
    """Refuse while any job of the batch (but the caller's own) is queued or running."""
    others = [j for j in batch.jobs if j != own_job]
    active = active_jobs(others)
    if active:
        listed = listed_jobs(active)
        raise LockHeldError(
            f"SLURM batch {batch.id} of {batch.root} is still queued or running: jobs {listed}",
            hint=f"follow it with `xnat2bids status {batch.root}`; to stop it: scancel {' '.join(batch.jobs)}",
        )


def wait_for_job(job_id: str, *, poll: float = 2.0, on_poll: Callable[[], None] = lambda: None) -> None:
    while active_jobs([job_id]):
        on_poll()
        time.sleep(poll)


# -- the array task ---------------------------------------------------------------------------


def _scan_dict(scan: Scan) -> dict[str, Any]:
    return {
        "id": scan.id,
        "type": scan.type,
        "series_description": scan.series_description,
        "files": [asdict(f) for f in scan.files],
    }


def _scan_from(data: Mapping[str, Any]) -> Scan:
    return Scan(data["id"], data["type"], data["series_description"],
                tuple(RemoteFile(**f) for f in data["files"]))


def _outputs(session_dir: Path) -> list[dict[str, Any]]:
    """The staged files' fingerprints, relative to the staging root (sub-X/ses-Y/...)."""
    base = session_dir.parent.parent
    rows = []
    for path in sorted(p for p in session_dir.rglob("*") if p.is_file()):
        rows.append({"path": path.relative_to(base).as_posix(), "size": path.stat().st_size,
                     "sha256": sha256_file(path)})
    return rows


def _actionable_change(plan: Plan, batch: Batch, entry: BatchSession) -> Change:
    changes = plan.actionable(repair_drift=batch.options.repair_drift)
    if entry.index >= len(changes) or changes[entry.index].key.experiment_id != entry.experiment_id:
        raise SlurmError(f"batch {batch.id}: the saved plan does not match the manifest at task {entry.index}")
    return changes[entry.index]


def load_plan(batch: Batch) -> tuple[Plan, dict[str, Any]]:
    """The batch's plan and its file's header (`config_fingerprint`, …)."""
    from reconcile.lock import read_lock
    from reconcile.render import plan_from_dict

    return plan_from_dict(json.loads(batch.plan_path.read_text(encoding="utf-8")), str(batch.plan_path), read_lock(batch.root))


def _config_as_submitted(batch: Batch, planned: str | None) -> Config:
    """The config the batch was planned with, read again by a task that may start hours later:
    an edit since the submission (naming, conversion, a heuristic file) fails the task instead of
    converting with settings nobody confirmed."""
    config = load_config(batch.config_path) if batch.config_path else Config()
    if planned is not None and config.fingerprint() != planned:
        raise ConfigError(
            f"the config changed since batch {batch.id} was submitted"
            + (f" ({batch.config_path})" if batch.config_path else ""),
            hint="restore it and re-run the task, or let the batch finish and run plan/apply again",
        )
    return config


def run_task(directory: Path, index: int, *, cancel: threading.Event | None = None, client=None) -> dict[str, Any]:
    """Stage session `index` of the batch in `directory` and write its result record.

    Never raises for a session's own failure: that becomes a "failed" record (with the log);
    the caller turns the record's status into the job's exit status.
    """
    from reconcile.credentials import resolve_credentials
    from reconcile.observe import tool_versions
    from reconcile.xnat import XnatClient

    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    batch = Batch.from_dict(manifest)
    entry = batch.sessions[index]
    root = batch.root
    share_with_group(root)  # the job's umask is the member's
    log_path = WorkArea(root).log(entry.experiment_id)
    record: dict[str, Any] = {
        "format_version": RESULT_FORMAT_VERSION,
        "batch": batch.id,
        "index": index,
        "experiment_id": entry.experiment_id,
        "project": entry.project,
        "address": entry.address,
        "job": f"{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', index)}",
        "host": socket.gethostname(),
        "started_at": utc_now(),
        "log": os.path.relpath(log_path, root),
    }
    t0 = time.monotonic()
    own_client = client is None
    try:
        plan, header = load_plan(batch)
        change = _actionable_change(plan, batch, entry)
        config = _config_as_submitted(batch, header.get("config_fingerprint"))
        if client is None:
            creds = resolve_credentials(batch.xnat_url, warn=lambda m: log_line(log_path, f"warning: {m}"))
            if batch.credentials == "alias-token":  # issued by apply for this batch, not the user's own
                creds = replace(creds, source="batch-token")
            client = XnatClient(batch.xnat_url, creds, verify=batch.verify_tls, timeout=batch.timeout)
        staged = stage_session(change, root, client, config, tools=tool_versions(),
                               export_method=batch.options.export_method, cancel=cancel)
        record.update(
            status=Status.DONE.value,
            message="",
            staged={"session_dir": os.path.relpath(staged.session_dir, root),
                    "dicom_dir": os.path.relpath(staged.dicom_dir, root)},
            scans=[_scan_dict(s) for s in staged.scans],
            # Their files are not needed: the lock keeps ID, type and description.
            unselected_scans=[_scan_dict(replace(s, files=())) for s in staged.unselected or ()],
            scan_names={scan_id: list(pair) for scan_id, pair in (staged.names or {}).items()},
            tools=dict(staged.tools),
            conversion={"heuristic": staged.settings.heuristic, "include": list(staged.settings.include),
                        "skip": list(staged.settings.skip), "bidsmap": [list(p) for p in staged.settings.bidsmap],
                        "heuristic_sha": staged.settings.heuristic_sha},
            outputs=_outputs(staged.session_dir),
            warnings=list(staged.warnings),
        )
    except XnatBidsError as exc:
        cancelled = cancel is not None and cancel.is_set()
        why = "cancelled (scancel or the time limit)" if cancelled else exc.summary
        log_line(log_path, f"failed: {exc.log_text()}")
        # SLURM signals the whole job: a converter it killed is not the out-of-memory killer's.
        record.update(status=Status.FAILED.value, message=why, hint=None if cancelled else exc.hint)
    except Exception as exc:  # a bug or an OS error still leaves a record for finalize to report
        log_line(log_path, f"failed: {exc!r}")
        record.update(status=Status.FAILED.value, message=f"{type(exc).__name__}: {exc}")
    finally:
        if own_client and client is not None:
            client.close()
    record["seconds"] = round(time.monotonic() - t0, 3)
    record["finished_at"] = utc_now()
    _write_json(batch.result_path(index), record)
    return record


# -- finalize: the single writer ----------------------------------------------------------------


@dataclass
class FinalizeReport:
    batch: Batch
    plan: Plan
    report: ApplyReport
    validation: ValidationResult | None = None  # with --validate, when the validator ran
    git_commit: str | None = None
    problems: list[str] = field(default_factory=list)  # validator / git failures, reported, not fatal

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.problems and not (self.validation and self.validation.errors)


def _staged_from(root: Path, change: Change, result: Mapping[str, Any]) -> StagedSession:
    conv = result["conversion"]
    settings = ConversionSettings(
        heuristic=conv["heuristic"], include=tuple(conv["include"]), skip=tuple(conv["skip"]),
        bidsmap=tuple(tuple(p) for p in conv["bidsmap"]), heuristic_sha=conv.get("heuristic_sha", ""),
    )
    assert change.after is not None
    return StagedSession(
        change=change,
        experiment=change.after,
        address=change.address,
        scans=tuple(_scan_from(s) for s in result["scans"]),
        session_dir=root / result["staged"]["session_dir"],
        dicom_dir=root / result["staged"]["dicom_dir"],
        log_path=root / result["log"],
        tools=dict(result["tools"]),
        settings=settings,
        unselected=tuple(_scan_from(s) for s in result["unselected_scans"]) if "unselected_scans" in result else None,
        names={k: (v[0], v[1]) for k, v in result["scan_names"].items()} if "scan_names" in result else None,
    )


def _ended_tasks(batch: Batch) -> dict[int, JobState]:
    """The array's tasks as SLURM last saw them; {} once it forgot them, or cannot be asked."""
    try:
        return array_task_states(batch.array_job) if batch.array_job else {}
    except SlurmError:
        return {}


def _without_result(batch: Batch, entry: BatchSession, change: Change, task: JobState | None) -> Outcome:
    """A task that wrote no result record: it never ran (cancelled while queued), or it ran and was
    killed before it could (SIGKILL from the out-of-memory killer, its node, `scancel --signal=KILL`;
    a failed setup snippet): that is a failure, as `status` shows it, not a session skipped."""
    log = batch.task_output(entry.index)  # opened by slurmd as the task starts
    started = log.exists()
    if not started and (task is None or task.state in ("CANCELLED", *_ACTIVE)):
        why = f"cancelled before it ran (SLURM: {task.state})" if task else "cancelled or never ran"
        return Outcome(change, Status.SKIPPED, f"no result: the task was {why}", log)
    said = ""
    if task is not None:
        said = f" (SLURM: {task.state}" + (f", exit code {task.exit_code}" if task.exit_code else "")
        signum = task.exit_code.rpartition(":")[2]
        if signum == str(int(signal.SIGKILL)):
            said += ": killed by SIGKILL, as by the out-of-memory killer, its node or `scancel --signal=KILL`"
        said += ")"
    job = task.job_id if task else f"{batch.array_job}_{entry.index}"
    return Outcome(change, Status.FAILED, f"task {job} ended without writing its result{said}",
                   log if started else None)


def _merge_one(batch: Batch, entry: BatchSession, change: Change, report: ApplyReport, pending: list[str],
               tasks: Mapping[int, JobState], told: Mapping[str, Mapping[str, Any]]) -> Outcome:
    root = batch.root
    result = read_result(batch, entry.index)
    if result is None:
        return _without_result(batch, entry, change, tasks.get(entry.index))
    log_path = root / result.get("log", "")
    seconds = float(result.get("seconds", 0.0))
    if result.get("status") != Status.DONE.value:
        return Outcome(change, Status.FAILED, result.get("message") or "failed", log_path, seconds,
                       hint=result.get("hint"))
    staged = _staged_from(root, change, result)
    if not staged.session_dir.is_dir():
        committed = report.lock.sessions.get(entry.experiment_id) if report.lock else None
        if committed is not None and committed.exported_at >= batch.created_at:
            by = told.get(entry.experiment_id)
            # An "unrecorded" entry names no committer: that may be this batch's earlier finalize, killed
            # before its entry (the run's own `recover` writes it).
            if _as_planned(committed, change) and by is not None and by["time"] >= committed.exported_at \
                    and by.get("batch") != batch.id and by["operation"] != "unrecorded":
                # A newer batch or apply exported it as planned here (this one was force-unlocked), and
                # its history entry told of it: not this batch's to report as done, nor to tell of again.
                what = f"SLURM batch {by['batch']}" if by.get("batch") else f"{by['operation']} of {by['time']}"
                return Outcome(change, Status.SKIPPED, f"exported since and already recorded by another apply "
                               f"({what}); this batch's conversion of it is not used", log_path, seconds)
            if _as_planned(committed, change):
                # An earlier finalize of this batch committed it before it was interrupted.
                return Outcome(change, Status.DONE, "", log_path, seconds, committed)
            # Another apply exported it since (this batch was force-unlocked meanwhile).
            return Outcome(change, Status.SKIPPED, f"exported since by another apply (recorded with date "
                           f"{committed.date or '(none)'}); this batch's conversion of it is not used", log_path, seconds)
        return Outcome(change, Status.FAILED, "the staged session is gone from the work area", log_path, seconds)
    # The staged files are hashed once more, as the commit records them, and must be the task's:
    # between a task and its finalize they sit on shared storage, for as long as finalize queues.
    base = staged.session_dir.parent.parent
    recorded = {out["path"]: (out["size"], out.get("sha256")) for out in result["outputs"]}
    outputs = staged_outputs(base, staged.session_dir)
    changed = [o.path for o in outputs if recorded.get(o.path) != (o.size, o.sha256)]
    changed += [path for path in recorded if not (base / path).is_file()]
    if changed:
        return Outcome(change, Status.FAILED, f"staged file {changed[0]} changed after its task ended",
                       log_path, seconds)
    staged = replace(staged, outputs=outputs)
    warnings = list(result.get("warnings", ()))
    try:
        report.lock = commit_session(staged, root, report.lock, keep_dicom=batch.options.keep_dicom, save=False,
                                     repair_drift=batch.options.repair_drift, warnings=warnings)
        pending.append(entry.experiment_id)
    except XnatBidsError as exc:
        log_line(log_path, f"commit failed: {exc}")
        return Outcome(change, Status.FAILED, exc.summary, log_path, seconds)
    except OSError as exc:
        log_line(log_path, f"commit failed: {exc!r}")
        return Outcome(change, Status.FAILED, f"commit failed: {exc}", log_path, seconds)
    return Outcome(change, Status.DONE, "", log_path, seconds, report.lock.sessions.get(entry.experiment_id),
                   warnings=tuple(warnings))


def _as_planned(committed: SessionRecord, change: Change) -> bool:
    """Whether the lock records the session as XNAT listed it when this batch was planned."""
    after = change.after
    if after is None:
        return True
    return (committed.date == after.date and same_time(committed.insert_date, after.insert_date)
            and same_time(committed.last_modified, after.last_modified))


def finalize_batch(
    batch: Batch,
    *,
    own_job: str | None = None,
    on_event: Event = lambda kind, change, outcome: None,
    warn: Callable[[str], None] = lambda m: None,
) -> FinalizeReport:
    """Merge a batch's result records into the lock, append the history, release the state lock.

    Safe to run again after an interruption: committed sessions are recognised, the journal
    of a half-done commit is finished by `recover`. Refuses while the batch's jobs run.
    """
    root = batch.root
    check_batch_idle(batch, own_job=own_job)
    holder = statelock.read_holder(root)
    if holder is None and own_job:
        # The batch no longer holds the root (force-unlocked): what happened there since is not
        # known to its plan; it is merged only when someone asks for it. Its jobs are over: the
        # credentials issued for them go now.
        revoke_job_token(batch, warn=warn)
        batch.credentials_path.unlink(missing_ok=True)
        raise LockHeldError(f"SLURM batch {batch.id} no longer holds {root} (force-unlocked?); its finalize job "
                            "does not merge it on its own",
                            hint=f"merge it with `xnat2bids finalize --batch {batch.id} {root}` once nothing else runs there")
    if holder is None:
        holder = statelock.acquire(root, statelock.FINALIZE, warn=warn)
    elif holder.id != batch.id:
        raise LockHeldError(
            f"cannot finalize batch {batch.id}: another xnat2bids holds {root}: {holder.describe()}",
            hint="finalize again once it is done",
        )
    else:  # one finalizer at a time: the finalize job, or after it `finalize` or an apply's merge
        holder = statelock.claim(root, batch.id, statelock.FINALIZE_JOB if own_job else statelock.FINALIZE)
    for exp_id in recover(root, warn=warn):
        warn(f"recovered the interrupted commit of {exp_id}")
    _retry_with_batch_credentials(batch, warn=warn)
    plan, header = load_plan(batch)
    lock = lock_for(plan, root)
    # The config the batch was planned with, recorded as a local apply records its own.
    report = ApplyReport(lock=replace(lock, config_fingerprint=header.get("config_fingerprint") or lock.config_fingerprint))
    pending: list[str] = []  # committed sessions whose lock entries are written together
    telling = told_by(read_history(root))  # read once: nothing below appends to it before the end
    # Why a task left no result, where SLURM still knows (scontrol keeps ended jobs for MinJobAge).
    missing = any(read_result(batch, entry.index) is None for entry in batch.sessions)
    tasks = _ended_tasks(batch) if missing else {}
    for entry in batch.sessions:
        change = _actionable_change(plan, batch, entry)
        on_event("start", change, None)
        outcome = _merge_one(batch, entry, change, report, pending, tasks, telling)
        report.outcomes.append(outcome)
        on_event(outcome.status.value, change, outcome)
    report.lock = save_commits(root, report.lock, pending)  # serial + 1 for the whole batch
    # Run again after an interruption: the commits an entry already tells of (this batch's own
    # earlier finalize, or recovery's) are not told of twice.
    told = {exp_id: entry["time"] for exp_id, entry in telling.items()}
    fresh = [o for o in report.outcomes if not (o.status is Status.DONE and o.record is not None
                                                and told.get(o.change.key.experiment_id, "") >= o.record.exported_at)]
    conflicted = history_conflict_line(root)
    if conflicted is not None:  # the commits stand; an entry would land inside the conflict
        warn(f"{WorkArea(root).history}: unresolved git merge conflict (a conflict marker at line {conflicted}): "
             f"batch {batch.id}'s entry is not written; once the conflict is resolved, the next apply records "
             "its commits")
    elif fresh or not report.outcomes:
        append_history(root, plan, replace(report, outcomes=fresh), operation=HISTORY_OPERATION, batch=batch.id)
    result = FinalizeReport(batch, plan, report)
    if batch.options.validate:
        try:
            from reconcile.validate import validate

            result.validation = validate(root)
        except XnatBidsError as exc:
            result.problems.append(f"validator: {exc.summary}")
    if batch.options.git_commit:
        try:
            from reconcile.vcs import commit_apply

            result.git_commit = commit_apply(root, f"xnat2bids apply (SLURM batch {batch.id})", report)
        except XnatBidsError as exc:
            said = (exc.detail or "").strip().splitlines()
            result.problems.append(f"git: {exc.summary}" + (f" ({said[-1][:300]})" if said else ""))
    _write_json(batch.finalized_path, {
        "format_version": BATCH_FORMAT_VERSION,
        "batch": batch.id,
        "finished_at": utc_now(),
        "by_job": own_job,
        "ok": result.ok,
        "summary": {s.value: report.count(s) for s in Status},
        "lock_serial": report.lock.serial if report.lock else plan.serial,
        "validator_errors": len(result.validation.errors) if result.validation is not None else None,
        "git_commit": result.git_commit,
        "problems": result.problems,
    })
    revoke_job_token(batch, warn=warn)
    batch.credentials_path.unlink(missing_ok=True)
    statelock.release(root, holder)
    _prune(root)
    return result


def revoke_job_token(batch: Batch, *, warn: Callable[[str], None] = lambda m: None) -> bool:
    """Invalidate on XNAT the alias token issued for the batch's jobs; they are done with it.

    Without this it stays valid until XNAT expires it (2 days by default, up to 60 at some
    sites). A record of the pending revocation (the alias, never the secret) is written first
    and removed once XNAT confirms, so a failure, or a crash, leaves it for `retry_revocations`;
    the caller deletes the token file either way.
    """
    from reconcile.credentials import Credentials
    from reconcile.xnat import XnatClient

    if batch.credentials != "alias-token" or not batch.credentials_path.exists():
        return False
    try:
        token = json.loads(batch.credentials_path.read_text(encoding="utf-8"))
        alias, secret = str(token["alias"]), str(token["secret"])
        if token.get("kind", "alias-token") != "alias-token":
            return False  # the password, for an XNAT without tokens: nothing to invalidate
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # no message: it may quote the secret
        warn(f"could not read the alias token of SLURM batch {batch.id} ({type(exc).__name__}) to invalidate it "
             "on XNAT; it stays valid until XNAT expires it")
        return False
    pending = PendingRevocation(batch.root, batch.id, alias, batch.xnat_url, utc_now())
    try:
        _write_revocation(pending)
    except OSError as exc:
        warn(f"could not record the pending revocation of SLURM batch {batch.id}'s alias token ({exc.strerror}); "
             "if XNAT cannot invalidate it now, it stays valid until XNAT expires it")
    try:
        with XnatClient(batch.xnat_url, Credentials(alias, secret, "token-file"), verify=batch.verify_tls,
                        timeout=REVOKE_TIMEOUT_S, retries=REVOKE_RETRIES) as client:
            _invalidate(client, alias)
    except XnatBidsError as exc:
        _still_pending(pending, exc, warn)
        return False
    pending.path.unlink(missing_ok=True)
    return True


@dataclass(frozen=True)
class PendingRevocation:
    """An alias token that XNAT has not confirmed invalidating yet: `.xnat2bids/revocations/<batch>.json`.

    Holds the alias only: invalidating needs it and any login of the same user, not the secret.
    """

    root: Path
    batch: str
    alias: str
    xnat_url: str
    since: str
    attempts: int = 0
    last_error: str = ""

    @property
    def path(self) -> Path:
        return revocations_dir(self.root) / f"{self.batch}.json"


def revocations_dir(root: Path) -> Path:
    return work_path(root, "revocations")


def _write_revocation(pending: PendingRevocation) -> None:
    data = {"format_version": REVOCATION_FORMAT_VERSION, **asdict(pending)}
    del data["root"]
    pending.path.parent.mkdir(parents=True, exist_ok=True)
    # 0600 like the token file it outlives: the alias is half of a login.
    write_atomic(pending.path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o600)


def pending_revocations(root: Path) -> list[PendingRevocation]:
    """The alias tokens still to invalidate, oldest first."""
    base = revocations_dir(root)
    if not base.is_dir():
        return []
    found = []
    for path in base.glob("*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format_version", 0) > REVOCATION_FORMAT_VERSION:
                continue
            found.append(PendingRevocation(  # the file's name is the batch: removing the record removes it
                root, path.stem, str(data["alias"]), str(data["xnat_url"]), str(data["since"]),
                int(data.get("attempts", 0)), str(data.get("last_error", "")),
            ))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # not ours to judge; it is left alone
    return sorted(found, key=lambda p: (p.since, p.batch))


def _invalidate(client, alias: str) -> None:
    from reconcile.errors import NotFoundError

    try:
        client.get_json(f"/data/services/tokens/invalidate/{quote(alias, safe='')}")
    except NotFoundError:
        pass  # XNAT knows no such token (any more): nothing left to invalidate


def _still_pending(pending: PendingRevocation, exc: XnatBidsError, warn: Callable[[str], None]) -> None:
    # The alias is in the request path, hence in some messages; it stays out of logs.
    reason = exc.summary + (f" ({exc.detail})" if exc.detail else "")
    reason = reason.replace(pending.alias, "<alias>").replace(quote(pending.alias, safe=""), "<alias>")
    try:
        _write_revocation(replace(pending, attempts=pending.attempts + 1, last_error=reason))
        where = f"; the next apply, submit or finalize with XNAT credentials retries it ({pending.path})"
    except OSError as exc_io:
        where = f"; its record could not be written ({exc_io.strerror}), so it stays valid until XNAT expires it"
    warn(f"could not invalidate the alias token of SLURM batch {pending.batch} on XNAT: {reason}; "
         f"its revocation is still pending{where}")


def retry_revocations(root: Path, client, *, warn: Callable[[str], None] = lambda m: None) -> list[PendingRevocation]:
    """Invalidate, through `client`, the pending alias tokens issued by its XNAT; return those done.

    Each record is removed once XNAT confirms (an unknown token counts: nothing is left to
    invalidate); a failure is warned about and the record kept for the next run.
    """
    pending = [p for p in pending_revocations(root) if p.xnat_url == client.url]
    # A client logged in with one of these tokens invalidates its own last.
    pending.sort(key=lambda p: p.alias == client.credentials.user)
    done = []
    for item in pending:
        try:
            _invalidate(client, item.alias)
        except XnatBidsError as exc:
            _still_pending(item, exc, warn)
            continue
        item.path.unlink(missing_ok=True)
        done.append(item)
    return done


def _retry_with_batch_credentials(batch: Batch, *, warn: Callable[[str], None]) -> None:
    """Finalize's turn at `retry_revocations`: logged in as the batch's jobs are, if it can be."""
    from reconcile.credentials import Credentials, resolve_credentials
    from reconcile.xnat import XnatClient

    pending = [p for p in pending_revocations(batch.root) if p.xnat_url == batch.xnat_url]
    if not pending:
        return
    try:
        if batch.credentials in ("alias-token", "password-file") and batch.credentials_path.exists():
            token = json.loads(batch.credentials_path.read_text(encoding="utf-8"))
            creds = Credentials(str(token["alias"]), str(token["secret"]), "token-file")
        else:
            creds = resolve_credentials(batch.xnat_url)  # ~/.netrc or $XNAT_TOKEN_FILE, as the tasks log in
    except (XnatBidsError, OSError, ValueError, KeyError, TypeError):
        warn(f"{len(pending)} alias token(s) of earlier SLURM batches still pending revocation on XNAT: no XNAT "
             f"credentials to retry with here; the next apply retries ({revocations_dir(batch.root)})")
        return
    try:
        with XnatClient(batch.xnat_url, creds, verify=batch.verify_tls, timeout=REVOKE_TIMEOUT_S,
                        retries=REVOKE_RETRIES) as client:
            retry_revocations(batch.root, client, warn=warn)
    except XnatBidsError as exc:  # e.g. a malformed URL in the manifest
        warn(f"could not retry the pending alias token revocations ({exc.summary}); the next apply retries")


def discard_unsubmitted(root: Path, *, warn: Callable[[str], None] = lambda m: None) -> list[str]:
    """Remove the batches a submission wrote but never recorded as submitted: it was killed (the
    node rebooted, SIGKILL) before its job IDs were written, so no finalize ever cleans them up.
    Their alias token is invalidated and their credentials file deleted; an array sbatch had
    queued meanwhile would stay held for ever, and is cancelled by its name (a finalize job queued
    after it then fails at once: its batch is gone). Called under the state lock, before a new
    batch is written, so no submission is under way."""
    gone = []
    for batch in list_batches(root):
        if batch.submitted or batch.finalized_path.exists():
            continue
        revoke_job_token(batch, warn=warn)
        if shutil.which("scancel"):  # its controller down, scancel retries for ~20 s: not waited for that long
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scancel", f"--name=xnat2bids-{batch.id}", f"--user={login_name()}"],
                               capture_output=True, timeout=10)
        batch.credentials_path.unlink(missing_ok=True)
        shutil.rmtree(batch.dir, ignore_errors=True)
        gone.append(batch.id)
    return gone


def _prune(root: Path) -> None:
    """Keep the newest finalized batches' records and logs; older ones only take space."""
    finalized = [b for b in list_batches(root) if b.finalized_path.exists()]
    for old in finalized[:-KEEP_FINALIZED_BATCHES]:
        shutil.rmtree(old.dir, ignore_errors=True)


def settle_previous(root: Path, *, on_event: Event = lambda k, c, o: None,
                    warn: Callable[[str], None] = lambda m: None) -> FinalizeReport | None:
    """Before a new apply: refuse while a batch runs; merge a batch whose finalize never finished.

    Only the batch the state lock names is merged; a batch abandoned with `force-unlock` is
    merged only by an explicit `xnat2bids finalize --batch ID`.
    """
    holder = statelock.read_holder(root)
    if holder is None or not holder.jobs:
        return None
    batch = next((b for b in list_batches(root) if b.id == holder.id), None)
    if batch is None:
        raise LockHeldError(
            f"{root} is held by SLURM jobs {', '.join(holder.jobs)} whose batch record is missing",
            hint=f"if those jobs are gone, run `xnat2bids force-unlock {holder.id} {root}`",
        )
    check_batch_idle(batch)
    if batch.finalized_path.exists():
        # Finalize finished its work but died before releasing the lock.
        statelock.release(root, holder)
        return None
    return finalize_batch(batch, on_event=on_event, warn=warn)


# -- status --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionState:
    entry: BatchSession
    state: str  # done | failed | pending | running | cancelled | timeout | ... | unknown
    detail: str = ""
    log: str | None = None

    @property
    def queued(self) -> bool:
        """Its array task is still queued or running (pending, running, suspended, requeued, …)."""
        return self.state.upper() in _ACTIVE


@dataclass(frozen=True)
class BatchStatus:
    batch: Batch
    sessions: tuple[SessionState, ...]
    finalize: JobState | None
    finalized: dict[str, Any] | None
    holds_lock: bool
    unasked: str = ""  # why SLURM could not be asked (its controller down), when it could not

    def to_dict(self) -> dict[str, Any]:
        b = self.batch
        return {
            "format_version": BATCH_FORMAT_VERSION,
            "batch": b.id,
            "bids_root": str(b.root),
            "created_at": b.created_at,
            "submitted_by": f"{b.user}@{b.host}",
            "array_job": b.array_job,
            "finalize_job": b.finalize_job,
            "finalize_state": self.finalize.state if self.finalize else None,
            "holds_state_lock": self.holds_lock,
            "finalized": self.finalized,
            "sessions": [
                {"index": s.entry.index, "experiment_id": s.entry.experiment_id, "project": s.entry.project,
                 "address": s.entry.address, "action": s.entry.action, "state": s.state, "detail": s.detail,
                 "log": s.log}
                for s in self.sessions
            ],
        }


def no_batch_status(root: Path) -> dict[str, Any]:
    """`BatchStatus.to_dict`'s keys for a BIDS root without a batch, so scripts need no special case."""
    return {
        "format_version": BATCH_FORMAT_VERSION, "batch": None, "bids_root": str(root), "created_at": None,
        "submitted_by": None, "array_job": None, "finalize_job": None, "finalize_state": None,
        "holds_state_lock": False, "finalized": None, "sessions": [],
    }


def batch_status(batch: Batch, *, query: bool = True) -> BatchStatus:
    """Per-session state from the result records, else from scontrol (when `query`). SLURM that
    cannot be asked (its controller down) leaves what the batch folder tells."""
    asked = ""
    try:
        tasks = array_task_states(batch.array_job) if query and batch.array_job else {}
        fin = job_state(batch.finalize_job) if query and batch.finalize_job else None
    except SlurmError as exc:
        tasks, fin, asked = {}, None, exc.summary
    rows = []
    for entry in batch.sessions:
        result = read_result(batch, entry.index)
        if result is not None:
            log = str(batch.root / result["log"]) if result.get("log") else None
            rows.append(SessionState(entry, result.get("status", "unknown"), result.get("message", ""), log))
            continue
        task = tasks.get(entry.index)
        if task is not None:
            log = batch.task_output(entry.index)  # none for a task cancelled before it ran
            rows.append(SessionState(entry, task.state.lower(), task.describe(), str(log) if log.exists() else None))
        else:
            why = f"no result record, and {asked}" if asked else "no result record and SLURM no longer knows the task"
            rows.append(SessionState(entry, "unknown", why))
    holder = statelock.read_holder(batch.root)
    return BatchStatus(batch, tuple(rows), fin, read_finalized(batch), holder is not None and holder.id == batch.id,
                       asked)
