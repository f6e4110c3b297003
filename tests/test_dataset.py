"""Dataset-level BIDS files: xnat2bids adds its own rows, columns and keys and keeps the user's."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from reconcile.dataset import (
    BIDS_VERSION,
    DatasetFileError,
    check_dataset_files,
    drop_participant,
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


def test_a_deleted_participants_tsv_comes_back_with_every_subject_folder(tmp_path: Path) -> None:
    for sub in ("sub-02", "sub-10", "sub-01"):
        (tmp_path / sub).mkdir()
    (tmp_path / "sub-notes.txt").write_text("a file, not a subject")
    ensure_participant(tmp_path, "03")  # its folder is not there yet: it is being committed
    assert (tmp_path / "participants.tsv").read_text() == "participant_id\nsub-01\nsub-02\nsub-03\nsub-10\n"


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


def test_a_renamed_subject_takes_its_row_and_the_old_row_goes_with_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    path.write_text("participant_id\tage\tgroup\nsub-01\t34\tpatient\nsub-09\t51\n")  # a short row
    (tmp_path / "sub-01").mkdir()
    ensure_participant(tmp_path, "P01", renamed_from="01")
    assert path.read_text() == "participant_id\tage\tgroup\nsub-01\t34\tpatient\nsub-09\t51\nsub-P01\t34\tpatient\n"
    drop_participant(tmp_path, "01", renamed_to="P01")  # sub-01 still has a folder: its row stays
    assert "sub-01\t34" in path.read_text()
    (tmp_path / "sub-01").rmdir()
    drop_participant(tmp_path, "01", renamed_to="P01")
    assert path.read_text() == "participant_id\tage\tgroup\nsub-09\t51\nsub-P01\t34\tpatient\n"


def test_a_rename_onto_a_label_whose_row_differs_keeps_both_rows_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    user = "participant_id\tage\nsub-004\t40\nsub-104\t41\n"  # 104 → 004 again; 004's row is stale
    path.write_text(user)
    said = ensure_participant(tmp_path, "004", renamed_from="104")
    assert said == ("participants.tsv: sub-104 is sub-004 now, whose row was there already with other values; "
                    "both rows are kept for you to reconcile")
    assert path.read_text() == user
    path.write_text("participant_id\tage\nsub-004\t41\nsub-104\t41\n")
    assert ensure_participant(tmp_path, "004", renamed_from="104") is None  # the same values: nothing to say


def test_a_row_with_values_of_its_own_is_never_dropped(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    user = "participant_id\tage\nsub-01\t34\nsub-02\tn/a\nsub-P01\t35\n"
    path.write_text(user)
    drop_participant(tmp_path, "01")  # a session moved to another XNAT subject: not the same person
    drop_participant(tmp_path, "01", renamed_to="P01")  # the new row says otherwise: the user decides
    assert path.read_text() == user
    drop_participant(tmp_path, "02")  # nothing but n/a: ours to drop
    assert path.read_text() == "participant_id\tage\nsub-01\t34\nsub-P01\t35\n"


def test_participants_without_participant_id_column_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "participants.tsv").write_text("subject\tage\nsub-01\t3\n")
    with pytest.raises(DatasetFileError):
        ensure_participant(tmp_path, "02")


# --- characters and encodings users' editors leave in these files ----------------------

# Characters str.splitlines() treats as line breaks although a TSV row ends only at \n.
SPLITLINES_ONLY = "\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
BOM = b"\xef\xbb\xbf"


def test_a_participant_cell_with_unicode_line_separators_stays_one_row(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    user = f"participant_id\tnote\nsub-01\tlikes{SPLITLINES_ONLY}cats\n".encode()
    path.write_bytes(user)
    ensure_participant(tmp_path, "01")
    assert path.read_bytes() == user
    ensure_participant(tmp_path, "02")
    assert path.read_bytes() == user + b"sub-02\tn/a\n"


def test_a_session_cell_with_unicode_line_separators_is_not_taken_for_a_session_row(tmp_path: Path) -> None:
    (tmp_path / "sub-01").mkdir()
    path = tmp_path / "sub-01" / "sub-01_sessions.tsv"
    user = (f"session_id\tacq_time\txnat_experiment_id\txnat_insert_date\tnotes\r\n"
            f"ses-pilot\tn/a\tn/a\tn/a\tsee\u2028ses-b{SPLITLINES_ONLY}\r\n").encode()
    path.write_bytes(user)
    _update(tmp_path, "a")
    assert path.read_bytes() == user + b"ses-a\t2024-01-10T00:00:00\tXNAT_E00001\t2024-01-11 10:00:00.0\tn/a\r\n"


def test_participants_with_a_byte_order_mark_gets_the_row_and_keeps_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    path.write_bytes(BOM + b"participant_id\tage\r\nsub-01\t42\r\n")
    ensure_participant(tmp_path, "01")
    ensure_participant(tmp_path, "02")
    assert path.read_bytes() == BOM + b"participant_id\tage\r\nsub-01\t42\r\nsub-02\tn/a\r\n"


def test_sessions_file_with_a_byte_order_mark_gets_the_row_and_keeps_the_mark(tmp_path: Path) -> None:
    (tmp_path / "sub-01").mkdir()
    path = tmp_path / "sub-01" / "sub-01_sessions.tsv"
    path.write_bytes(BOM + b"session_id\tgroup\nses-x\tcontrol\n")
    _update(tmp_path, "a")
    assert path.read_bytes() == BOM + (
        b"session_id\tgroup\tacq_time\txnat_experiment_id\txnat_insert_date\n"
        b"ses-x\tcontrol\tn/a\tn/a\tn/a\n"
        b"ses-a\tn/a\t2024-01-10T00:00:00\tXNAT_E00001\t2024-01-11 10:00:00.0\n"
    )


def test_dataset_description_with_a_byte_order_mark_is_updated_and_keeps_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "dataset_description.json"
    path.write_bytes(BOM + json.dumps({"Name": "Mine", "BIDSVersion": "1.9.0"}).encode())
    ensure_dataset_description(tmp_path, name="PROJ", tools=TOOLS)
    written = path.read_bytes()
    assert written.startswith(BOM) and not written.startswith(BOM * 2)
    data = json.loads(written[len(BOM):])
    assert data["Name"] == "Mine" and [e["Name"] for e in data["GeneratedBy"]] == ["xnat2bids", "heudiconv", "dcm2niix"]


def test_sessions_sidecar_with_a_byte_order_mark_keeps_the_mark(tmp_path: Path) -> None:
    path = tmp_path / "sessions.json"
    path.write_bytes(BOM + b'{"pain_score": {"Description": "0-10"}}')
    _update(tmp_path, "a")
    written = path.read_bytes()
    assert written.startswith(BOM) and not written.startswith(BOM * 2)
    assert set(json.loads(written[len(BOM):])) == {"pain_score", "xnat_experiment_id", "xnat_insert_date"}


def test_latin1_participants_is_refused_with_the_offset_and_a_hint_not_guessed(tmp_path: Path) -> None:
    path = tmp_path / "participants.tsv"
    user = "participant_id\tname\nsub-01\tM\xfcller\n".encode("latin-1")
    path.write_bytes(user)
    with pytest.raises(DatasetFileError) as raised:
        ensure_participant(tmp_path, "02")
    assert str(path) in raised.value.summary
    assert "offset 28 (line 2)" in raised.value.summary
    assert "UTF-8" in raised.value.hint
    assert path.read_bytes() == user


def test_non_utf8_dataset_description_is_refused_with_the_offset_and_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "dataset_description.json"
    user = '{"Name": "Caf\xe9"}'.encode("cp1252")
    path.write_bytes(user)
    with pytest.raises(DatasetFileError) as raised:
        ensure_dataset_description(tmp_path, name="PROJ", tools=TOOLS)
    assert str(path) in raised.value.summary and "offset 13 (line 1)" in raised.value.summary
    assert "UTF-8" in raised.value.hint
    assert path.read_bytes() == user


# --- checking the files before a commit ----------------------------------------------


def _files(root: Path) -> dict[str, bytes | None]:
    """Every path below root with its bytes (None for a folder): what a check must leave alone."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in root.rglob("*")}


def _commit(root: Path) -> None:
    """The dataset-file updates apply makes for a commit of sub-01's ses-a."""
    ensure_dataset_description(root, name="PROJ", tools=TOOLS)
    ensure_participant(root, "01")
    _update(root, "a")


MALFORMED = {
    "participants not UTF-8": ("participants.tsv", "participant_id\nsub-01\tM\xfcller\n".encode("latin-1")),
    "participants without participant_id": ("participants.tsv", b"subject\tage\nsub-01\t3\n"),
    "sessions not UTF-8": ("sub-01/sub-01_sessions.tsv", b"session_id\tnote\nses-x\t\xe9\n"),
    "sessions without session_id": ("sub-01/sub-01_sessions.tsv", b"visit\tgroup\nx\tcontrol\n"),
    "description not JSON": ("dataset_description.json", b"{not json"),
    "description GeneratedBy not a list": ("dataset_description.json", b'{"GeneratedBy": {"Name": "me"}}'),
    "description not an object": ("dataset_description.json", b"[]"),
    "sessions sidecar not JSON": ("sessions.json", b"{,}"),
    "scans sidecar not JSON": ("scans.json", b"{,}"),
    "participants with conflict markers": ("participants.tsv", b"participant_id\nsub-01\n<<<<<<< HEAD\nsub-03\n"
                                           b"=======\nsub-02\n>>>>>>> 5be40f1 (xnat2bids apply)\n"),
    "sessions with conflict markers": ("sub-01/sub-01_sessions.tsv", b"session_id\r\n<<<<<<< ours\r\nses-a\r\n"
                                       b"=======\r\nses-b\r\n>>>>>>> theirs\r\n"),
    "description with conflict markers": ("dataset_description.json", b'{\n<<<<<<< HEAD\n  "Name": "A"\n=======\n'
                                          b'  "Name": "B"\n>>>>>>> theirs\n}\n'),
}


CONFLICTED = ("participant_id\tage\nsub-01\t30\n<<<<<<< HEAD\nsub-03\tn/a\n=======\nsub-02\t41\n"
              ">>>>>>> 5be40f1 (xnat2bids apply)\n")


@pytest.mark.parametrize("write", ["participant", "sessions row", "dropped participant"])
def test_a_file_with_git_conflict_markers_is_refused_as_unreadable_and_left_as_it_is(tmp_path: Path, write) -> None:
    # After a `git pull` where both clones added a subject: the marker lines are not participants.
    path = tmp_path / ("sub-01/sub-01_sessions.tsv" if write == "sessions row" else "participants.tsv")
    path.parent.mkdir(exist_ok=True)
    text = CONFLICTED if write != "sessions row" else CONFLICTED.replace("participant_id\tage", "session_id\tage")
    path.write_text(text)
    with pytest.raises(DatasetFileError) as raised:
        if write == "participant":
            ensure_participant(tmp_path, "04")
        elif write == "sessions row":
            _update(tmp_path, "a")
        else:
            drop_participant(tmp_path, "01")
    assert raised.value.summary == f"{path}: unresolved git merge conflict (a conflict marker at line 3)"
    assert f"`git add {path}`" in raised.value.hint and "delete the marker lines" in raised.value.hint
    assert path.read_text() == text


@pytest.mark.parametrize("name", MALFORMED)
def test_check_raises_what_the_commit_would_raise_and_writes_nothing(tmp_path: Path, name: str) -> None:
    relative, content = MALFORMED[name]
    (tmp_path / "sub-01").mkdir()
    (tmp_path / relative).write_bytes(content)
    before = _files(tmp_path)
    with pytest.raises(DatasetFileError) as checked:
        check_dataset_files(tmp_path, "01")
    assert _files(tmp_path) == before
    with pytest.raises(DatasetFileError) as committed:
        _commit(tmp_path)
    assert type(checked.value) is type(committed.value)
    assert str(checked.value) == str(committed.value)
    assert (tmp_path / relative).read_bytes() == content


def test_check_covers_the_sessions_file_of_the_subject_a_session_moved_from(tmp_path: Path) -> None:
    (tmp_path / "sub-07").mkdir()
    path = tmp_path / "sub-07" / "sub-07_sessions.tsv"
    path.write_bytes(b"session_id\tnote\nses-x\t\xe9\n")
    check_dataset_files(tmp_path, "01")
    with pytest.raises(DatasetFileError, match="offset 22"):
        check_dataset_files(tmp_path, "01", previous_subject="07")
    assert _files(tmp_path) == {"sub-07": None, "sub-07/sub-07_sessions.tsv": b"session_id\tnote\nses-x\t\xe9\n"}


def test_check_passes_on_good_or_missing_files_and_changes_nothing(tmp_path: Path) -> None:
    check_dataset_files(tmp_path, "01", previous_subject="07")
    assert _files(tmp_path) == {}
    (tmp_path / "dataset_description.json").write_bytes(BOM + b'{"Name": "Mine", "GeneratedBy": []}')
    participants = f"participant_id\tnote\r\nsub-02\ta{SPLITLINES_ONLY}\r\n".encode()
    (tmp_path / "participants.tsv").write_bytes(BOM + participants)
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_bytes(b"session_id\nses-x")
    (tmp_path / "sessions.json").write_bytes(b"{}")
    before = _files(tmp_path)
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    check_dataset_files(tmp_path, "01")
    assert _files(tmp_path) == before
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == mtimes
    _commit(tmp_path)  # and the commit the check vouched for goes through
    assert (tmp_path / "participants.tsv").read_bytes() == BOM + (
        f"participant_id\tnote\r\nsub-01\tn/a\r\nsub-02\ta{SPLITLINES_ONLY}\r\n".encode())


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
