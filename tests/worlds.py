"""Worlds the tests build: XNAT sessions in the emulator, exported BIDS roots, configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests

from reconcile.config import Config
from reconcile.demo import populate
from reconcile.emulator.dicomgen import DEFAULT_SERIES
from reconcile.lock import Lock, write_lock
from reconcile.model import OutputRecord, SessionRecord, format_timestamp


def add_sessions(archive, n: int):
    return [archive.add_session("PROJ", f"SUBJ{i:02d}", f"SUBJ{i:02d}_MR1", date="2024-01-10") for i in range(1, n + 1)]


def record_as_exported(archive, exp, root: Path) -> SessionRecord:
    """A lock entry as apply would write it for the emulator's current state, with one output file."""
    subject = archive.subject_of(exp).label
    address = f"sub-{subject}/ses-{exp.label.replace('_', '')}"
    out = root / address / "anat" / "t1.nii.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(b"nifti")
    conv = Config().conversion_for("PROJ", exp.label)
    return SessionRecord(
        experiment_id=exp.id, project="PROJ", subject_id=exp.subject_id, subject_label=subject,
        session_label=exp.label, bids_subject=subject, bids_session=exp.label.replace("_", ""),
        date=exp.date or None, insert_date=format_timestamp(exp.insert_date),
        last_modified=format_timestamp(exp.last_modified), xsi_type=exp.xsi_type,
        exported_at="2024-01-11T00:00:00Z", config_fingerprint=conv.fingerprint(), config_digests=conv.digests(),
        outputs=(OutputRecord(f"{address}/anat/t1.nii.gz", 5, "0" * 64, out.stat().st_mtime_ns),),
    )


def exported_root(archive, tmp_path: Path, exps) -> Path:
    root = tmp_path / "bids"
    root.mkdir()
    lock = Lock.new()
    for exp in exps:
        lock = lock.with_session(record_as_exported(archive, exp, root))
    write_lock(root, lock)
    return root


# T1w + one bold run keep heudiconv fast; the full ReproIn session is converted in the validator test.
SMALL = tuple(s for s in DEFAULT_SERIES if s.description in ("anat-T1w_acq-memprage", "func-bold_task-rest"))


def add(archive, sessions, series=SMALL):
    populate(archive, "PROJ", sessions, series=series)
    return {e.label: e for e in archive.sessions("PROJ")}


def tree(root: Path, sub: str) -> dict[str, tuple[int, bytes]]:
    """Every file under root/sub with its mtime and bytes: 'untouched' means equal."""
    base = root / sub
    return {
        p.relative_to(root).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(base.rglob("*")) if p.is_file()
    }


def redate(emulator, exp, date: str) -> None:
    r = requests.put(
        f"{emulator.url}/data/projects/PROJ/subjects/{exp.subject_id}/experiments/{exp.id}",
        params={"xnat:mrSessionData/date": date}, auth=(emulator.user, emulator.password), timeout=10,
    )
    assert r.status_code == 200


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xnat2bids.toml"
    path.write_text(text + "\n")
    return path


def _closed(schema):
    """`schema` with every object that names its properties closed to others: what xnat2bids
    writes must be described in full, even where the schema lets readers accept more."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def assert_schema(name: str, doc) -> None:
    """`doc` follows schemas/<name>.schema.json, and names no key the schema does not describe."""
    import jsonschema

    from reconcile.schema import load_schema

    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema)
    jsonschema.validate(doc, _closed(schema))


def token_valid(answer: requests.Response) -> bool:
    """XNAT's answer to tokens/validate/ALIAS/SECRET: the token's user name when it is valid, null
    when the secret is wrong or it expired, a 404 once the alias is gone (invalidated)."""
    if answer.status_code == 404:
        return False
    assert answer.status_code == 200, answer.text
    return isinstance(answer.json()["valid"], str)


def git(where, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@x", *args],
                          capture_output=True, text=True)


def two_clones(cli, tmp_path):
    """A dataset in git with session 01_MR1 exported, and a clone of it that merges locks with the driver."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    git(ours, "init", "-q", "-b", "main")
    git(ours, "config", "user.name", "t")
    git(ours, "config", "user.email", "t@x")
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "01_MR1", "--yes", "--git-commit")[0] == 0
    git(tmp_path, "clone", "-q", str(ours), str(theirs))
    git(theirs, "config", "merge.xnat2bids.driver", f"{sys.executable} -m reconcile merge-lock %O %A %B")
    (theirs / ".git/info/attributes").write_text(".xnat2bids.lock merge=xnat2bids\n")
    return ours, theirs


def each_applied_one(cli, ours: Path, theirs: Path) -> None:
    """Each clone exports and commits a session of its own (02_MR1, 03_MR1): what `git pull` then merges."""
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "02_MR1", "--yes", "--git-commit")[0] == 0
    assert cli("apply", str(theirs), "-p", "PROJ", "--session", "03_MR1", "--yes", "--git-commit")[0] == 0
