"""Dataset-level BIDS files: xnat2bids adds its own rows, columns and keys and keeps the user's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconcile.dataset import (
    BIDS_VERSION,
    DatasetFileError,
    ensure_bidsignore,
    ensure_dataset_description,
    ensure_participant,
    update_sessions_tsv,
)

TOOLS = {"xnat2bids": "0.1.0", "heudiconv": "1.5.1", "dcm2niix": "v1.0.20260724"}


def _sessions(root: Path, subject: str = "01") -> str:
    return (root / f"sub-{subject}" / f"sub-{subject}_sessions.tsv").read_text()


def _update(root: Path, session: str, exp: str = "XNAT_E00001", insert: str = "2024-01-11 10:00:00.0",
            acq: str = "2024-01-10T00:00:00") -> None:
    update_sessions_tsv(root, "01", session, acq_time=acq, xnat_experiment_id=exp, xnat_insert_date=insert)


# --- dataset_description.json ---------------------------------------------------------


def test_new_dataset_description_has_name_version_type_and_tools(tmp_path: Path) -> None:
    ensure_dataset_description(tmp_path, name="PROJ", tools=TOOLS)
    data = json.loads((tmp_path / "dataset_description.json").read_text())
    assert data == {
        "Name": "PROJ",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "GeneratedBy": [
            {"Name": "xnat2bids", "Version": "0.1.0"},
            {"Name": "heudiconv", "Version": "1.5.1"},
            {"Name": "dcm2niix", "Version": "v1.0.20260724"},
        ],
    }


def test_user_keys_and_generated_by_entries_survive_a_tool_upgrade(tmp_path: Path) -> None:
    user = {
        "Name": "My study",
        "BIDSVersion": "1.9.0",
        "Authors": ["A. Person"],
        "License": "CC0",
        "GeneratedBy": [
            {"Name": "manual curation", "Description": "fixed sidecars"},
            {"Name": "heudiconv", "Version": "0.13.1", "CodeURL": "https://github.com/nipy/heudiconv"},
        ],
    }
    (tmp_path / "dataset_description.json").write_text(json.dumps(user))
    ensure_dataset_description(tmp_path, name="PROJ", tools=TOOLS)
    data = json.loads((tmp_path / "dataset_description.json").read_text())
    assert data["Name"] == "My study"
    assert data["BIDSVersion"] == "1.9.0"
    assert data["Authors"] == ["A. Person"] and data["License"] == "CC0"
    assert data["GeneratedBy"] == [
        {"Name": "manual curation", "Description": "fixed sidecars"},
        {"Name": "heudiconv", "Version": "1.5.1", "CodeURL": "https://github.com/nipy/heudiconv"},
        {"Name": "xnat2bids", "Version": "0.1.0"},
        {"Name": "dcm2niix", "Version": "v1.0.20260724"},
    ]


def test_unchanged_dataset_description_is_not_rewritten(tmp_path: Path) -> None:
    ensure_dataset_description(tmp_path, name="PROJ", tools=TOOLS)
    path = tmp_path / "dataset_description.json"
    os.utime(path, ns=(1, 1))
    ensure_dataset_description(tmp_path, name="other", tools=TOOLS)
    assert path.stat().st_mtime_ns == 1


def test_broken_dataset_description_is_reported_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "dataset_description.json"
    path.write_text("{not json")
    with pytest.raises(DatasetFileError):
        ensure_dataset_description(tmp_path, name="PROJ", tools=TOOLS)
    assert path.read_text() == "{not json"


# --- sub-X_sessions.tsv ---------------------------------------------------------------


def test_sessions_tsv_is_created_with_our_columns(tmp_path: Path) -> None:
    _update(tmp_path, "a")
    assert _sessions(tmp_path) == (
        "session_id\tacq_time\txnat_experiment_id\txnat_insert_date\n"
        "ses-a\t2024-01-10T00:00:00\tXNAT_E00001\t2024-01-11 10:00:00.0\n"
    )


def test_updating_a_session_keeps_user_columns_rows_and_order(tmp_path: Path) -> None:
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tpain_score\tacq_time\txnat_experiment_id\txnat_insert_date\tnotes\n"
        "ses-pilot\t3\tn/a\tn/a\tn/a\tby hand  \n"
        "ses-b\t5\t2024-02-01T00:00:00\tXNAT_E00002\t2024-02-02 10:00:00.0\tok\n"
        "ses-a\t7\t2024-01-10T00:00:00\tXNAT_E00001\t2024-01-11 10:00:00.0\tmoved\n"
    )
    _update(tmp_path, "a", insert="2024-03-01 08:00:00.5")
    _update(tmp_path, "c", exp="XNAT_E00003")
    assert _sessions(tmp_path) == (
        "session_id\tpain_score\tacq_time\txnat_experiment_id\txnat_insert_date\tnotes\n"
        "ses-pilot\t3\tn/a\tn/a\tn/a\tby hand  \n"
        "ses-b\t5\t2024-02-01T00:00:00\tXNAT_E00002\t2024-02-02 10:00:00.0\tok\n"
        "ses-a\t7\t2024-01-10T00:00:00\tXNAT_E00001\t2024-03-01 08:00:00.5\tmoved\n"
        "ses-c\tn/a\t2024-01-10T00:00:00\tXNAT_E00003\t2024-01-11 10:00:00.0\tn/a\n"
    )


def test_our_columns_missing_from_a_user_sessions_file_are_appended(tmp_path: Path) -> None:
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tgroup\nses-x\tcontrol\n")
    _update(tmp_path, "a")
    assert _sessions(tmp_path) == (
        "session_id\tgroup\tacq_time\txnat_experiment_id\txnat_insert_date\n"
        "ses-x\tcontrol\tn/a\tn/a\tn/a\n"
        "ses-a\tn/a\t2024-01-10T00:00:00\tXNAT_E00001\t2024-01-11 10:00:00.0\n"
    )


def test_unchanged_session_row_does_not_touch_the_file(tmp_path: Path) -> None:
    _update(tmp_path, "a")
    path = tmp_path / "sub-01" / "sub-01_sessions.tsv"
    os.utime(path, ns=(1, 1))
    _update(tmp_path, "a")
    assert path.stat().st_mtime_ns == 1


def test_crlf_sessions_file_keeps_its_line_endings(tmp_path: Path) -> None:
    (tmp_path / "sub-01").mkdir()
    path = tmp_path / "sub-01" / "sub-01_sessions.tsv"
    path.write_bytes(b"session_id\tacq_time\txnat_experiment_id\txnat_insert_date\r\nses-x\tn/a\tn/a\tn/a\r\n")
    _update(tmp_path, "a")
    assert path.read_bytes().count(b"\r\n") == 3


# --- participants.tsv -----------------------------------------------------------------


def test_participants_tsv_is_created_with_participant_id_only(tmp_path: Path) -> None:
    ensure_participant(tmp_path, "01")
    ensure_participant(tmp_path, "02")
    ensure_participant(tmp_path, "01")
    assert (tmp_path / "participants.tsv").read_text() == "participant_id\nsub-01\nsub-02\n"


def test_new_participant_keeps_user_columns_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    user = "participant_id\tage\tsex\tgroup\nsub-02\t34\tF\tpatient\nsub-01\t28\tM\tcontrol"  # no final newline
    path.write_text(user)
    os.chmod(path, 0o640)
    ensure_participant(tmp_path, "01")
    assert path.read_text() == user
    ensure_participant(tmp_path, "03")
    assert path.read_text() == user + "\nsub-03\tn/a\tn/a\tn/a\n"
    assert path.stat().st_mode & 0o777 == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_participants_without_participant_id_column_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "participants.tsv").write_text("subject\tage\nsub-01\t3\n")
    with pytest.raises(DatasetFileError):
        ensure_participant(tmp_path, "02")


# --- .bidsignore ----------------------------------------------------------------------


def test_bidsignore_is_not_created_when_nothing_needs_ignoring(tmp_path: Path) -> None:
    ensure_bidsignore(tmp_path)
    assert not (tmp_path / ".bidsignore").exists()


def test_bidsignore_appends_only_missing_patterns(tmp_path: Path) -> None:
    path = tmp_path / ".bidsignore"
    path.write_text("extra_data/\n*_notes.txt")
    ensure_bidsignore(tmp_path, ["*_notes.txt", "scratch/"])
    ensure_bidsignore(tmp_path, ["scratch/"])
    assert path.read_text() == "extra_data/\n*_notes.txt\nscratch/\n"


def test_sessions_sidecar_describes_our_columns_and_keeps_user_entries(tmp_path: Path) -> None:
    (tmp_path / "sessions.json").write_text(json.dumps({"pain_score": {"Description": "0-10"},
                                                        "xnat_insert_date": {"Description": "mine"}}))
    _update(tmp_path, "a")
    sidecar = json.loads((tmp_path / "sessions.json").read_text())
    assert sidecar["pain_score"] == {"Description": "0-10"}
    assert sidecar["xnat_insert_date"] == {"Description": "mine"}
    assert "Description" in sidecar["xnat_experiment_id"]


def test_a_moved_session_leaves_no_stale_row_and_user_rows_stay(tmp_path):
    from reconcile.dataset import remove_session_row

    update_sessions_tsv(tmp_path, "01", "A", acq_time="2024-01-10T00:00:00", xnat_experiment_id="E1",
                        xnat_insert_date="2024-01-10 10:00:00.0")
    path = tmp_path / "sub-01/sub-01_sessions.tsv"
    remove_session_row(tmp_path, "01", "A", xnat_experiment_id="E2")  # not ours: untouched
    assert "ses-A" in path.read_text()
    remove_session_row(tmp_path, "01", "A", xnat_experiment_id="E1")
    assert not path.exists()  # nothing but our header was left
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("session_id\tacq_time\txnat_experiment_id\txnat_insert_date\tnotes\nses-X\tn/a\tn/a\tn/a\tmine\n")
    update_sessions_tsv(tmp_path, "01", "A", acq_time="n/a", xnat_experiment_id="E1", xnat_insert_date="n/a")
    remove_session_row(tmp_path, "01", "A", xnat_experiment_id="E1")
    assert path.read_text() == "session_id\tacq_time\txnat_experiment_id\txnat_insert_date\tnotes\nses-X\tn/a\tn/a\tn/a\tmine\n"
