"""The in-memory archive on its own: identities, timestamp rules, files, synthetic bulk content."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import pytest

from reconcile.emulator import Archive, ArchiveError
from reconcile.emulator.app import java_date, java_timestamp
from reconcile.emulator.archive import FileEntry

FROZEN = dt.datetime(2024, 3, 1, 12, 0, 0, 352999)


@pytest.fixture
def frozen(archive: Archive) -> Archive:
    archive.clock = lambda: FROZEN
    return archive


def test_ids_follow_the_site_pattern_and_missing_subjects_are_created(archive):
    exp = archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR1", date=dt.date(2024, 1, 10))
    second = archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR2")
    assert (exp.id, second.id) == ("XNAT_E00001", "XNAT_E00002")
    assert exp.subject_id == second.subject_id == "XNAT_S00001"
    assert exp.date == "2024-01-10" and second.date == ""
    assert archive.find_session("PROJ", "SUBJ01_MR1") is exp
    assert archive.find_session("PROJ", exp.id) is exp
    assert [e.label for e in archive.sessions("PROJ")] == ["SUBJ01_MR1", "SUBJ01_MR2"]


def test_duplicates_and_unknown_projects_are_refused(archive):
    archive.add_session("PROJ", "S1", "S1_MR1")
    with pytest.raises(ArchiveError) as duplicate:
        archive.add_session("PROJ", "S1", "S1_MR1")
    assert duplicate.value.status == 409
    with pytest.raises(ArchiveError, match="Unable to identify project NOPE"):
        archive.add_session("NOPE", "S1", "S1_MR1")


def test_stamps_are_milliseconds_in_naive_utc(archive):
    archive.clock = lambda: dt.datetime(2024, 3, 1, 13, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    exp = archive.add_session("PROJ", "S1", "S1_MR1")
    assert exp.insert_date == dt.datetime(2024, 3, 1, 12, 0, 0, 123000)


def test_set_fields_bumps_last_modified_strictly_never_insert_date(frozen):
    exp = frozen.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    inserted = exp.insert_date
    stamps = []
    for day in ("2024-02-01", "2024-02-02", "2024-02-03"):
        frozen.set_fields(exp.id, date=day)
        stamps.append(exp.last_modified)
    assert exp.date == "2024-02-03"
    assert exp.insert_date == inserted
    assert inserted < stamps[0] < stamps[1] < stamps[2]


def test_upload_file_changes_neither_insert_date_nor_last_modified(frozen):
    exp = frozen.add_session("PROJ", "S1", "S1_MR1")
    frozen.add_scan(exp.id, "1", type="t1")
    before = (exp.insert_date, exp.last_modified)
    frozen.clock = lambda: FROZEN + dt.timedelta(days=3)
    entry = frozen.upload_file(exp.id, "1", "NIFTI", "x.nii", b"nifti")
    assert (exp.insert_date, exp.last_modified) == before
    resource = frozen.get_scan(exp.id, "1").resources["NIFTI"]
    assert resource.files == {"x.nii": entry}
    assert resource.id.isdigit()


def test_renames_resave_and_move_the_label_index(frozen):
    exp = frozen.add_session("PROJ", "S1", "S1_MR1")
    subject = frozen.subject_of(exp)
    frozen.rename_session(exp.id, "S1_MR9")
    frozen.rename_subject(subject.id, "S9")
    assert exp.last_modified > exp.insert_date
    assert subject.last_modified > subject.insert_date
    assert frozen.find_session("PROJ", "S1_MR1") is None
    assert frozen.find_session("PROJ", "S1_MR9") is exp
    assert frozen.find_subject("PROJ", "S9") is subject


def test_renaming_onto_a_taken_label_is_refused(archive):
    first = archive.add_session("PROJ", "S1", "S1_MR1")
    archive.add_session("PROJ", "S1", "S1_MR2")
    with pytest.raises(ArchiveError) as taken:
        archive.rename_session(first.id, "S1_MR2")
    assert taken.value.status == 409
    assert archive.find_session("PROJ", "S1_MR1") is first


def test_delete_session(archive):
    exp = archive.add_session("PROJ", "S1", "S1_MR1")
    archive.delete_session(exp.id)
    assert archive.sessions("PROJ") == []
    with pytest.raises(ArchiveError):
        archive.get_session(exp.id)
    archive.add_session("PROJ", "S1", "S1_MR1")  # the label is free again


def test_unknown_fields_are_refused(archive):
    exp = archive.add_session("PROJ", "S1", "S1_MR1")
    with pytest.raises(ArchiveError, match="Unknown field"):
        archive.set_fields(exp.id, colour="blue")


@pytest.mark.parametrize("size", [0, 10, 64, 65, 1000, 3 * 1024 * 1024 + 5])
def test_synthetic_files_have_the_declared_size_and_true_md5(size):
    entry = FileEntry.synthetic("1.dcm", size, seed="a")
    chunks = list(entry.iter_bytes(chunk_size=1 << 20))
    assert all(len(c) <= 1 << 20 for c in chunks)
    data = b"".join(chunks)
    assert len(data) == size
    assert entry.md5 == hashlib.md5(data).hexdigest()
    assert b"".join(entry.iter_bytes(chunk_size=7 if size < 5000 else 65537)) == data


def test_synthetic_content_is_deterministic_and_distinct_per_seed():
    assert FileEntry.synthetic("x", 5000, "a").read() == FileEntry.synthetic("x", 5000, "a").read()
    assert FileEntry.synthetic("x", 5000, "a").md5 != FileEntry.synthetic("x", 5000, "b").md5


def test_synthetic_sessions_are_deterministic_and_lazy():
    def build(n: int) -> Archive:
        archive = Archive()
        archive.add_project("BIG")
        archive.add_synthetic_sessions("BIG", n=n, scans_per_session=2, files_per_scan=3, file_size=1024)
        return archive

    first = build(10_000)
    sessions = first.sessions("BIG")
    assert len(sessions) == 10_000
    assert (sessions[0].label, first.subject_of(sessions[0]).label) == ("SUB00001_MR1", "SUB00001")
    assert sessions[-1].label == "SUB10000_MR1"
    entry = sessions[0].scans["1"].resources["DICOM"].files["1.dcm"]
    assert entry.data is None and entry.size == 1024  # generated on demand, not stored
    again = build(1).sessions("BIG")[0].scans["1"].resources["DICOM"].files["1.dcm"]
    assert entry.md5 == again.md5


def test_a_gigabyte_session_costs_no_memory_until_read():
    archive = Archive()
    archive.add_project("BIG")
    (exp,) = archive.add_synthetic_sessions("BIG", n=1, scans_per_session=1, files_per_scan=1, file_size=1 << 30)
    entry = exp.scans["1"].resources["DICOM"].files["1.dcm"]
    assert entry.size == 1 << 30 and entry.data is None
    chunks = entry.iter_bytes()
    assert 0 < len(next(chunks)) <= 1 << 20 and 0 < len(next(chunks)) <= 1 << 20


@pytest.mark.parametrize("kind", ["synthetic", "bytes", "disk"])
def test_pieces_spell_out_the_same_bytes_as_iteration(kind, tmp_path):
    size = (3 << 20) + 12345  # wraps around the 1 MiB pattern several times
    if kind == "synthetic":
        entry = FileEntry.synthetic("a/1.dcm", size, seed="s")
    elif kind == "bytes":
        entry = FileEntry.from_bytes("a/1.dcm", os.urandom(size))
    else:
        (tmp_path / "f").write_bytes(os.urandom(size))
        entry = FileEntry.from_disk("a/1.dcm", tmp_path / "f")
    spelled = bytearray()
    for piece in entry.pieces():
        if isinstance(piece, bytes):
            spelled += piece
        else:
            fd, offset, count = piece
            spelled += os.pread(fd, count, offset)
    assert len(spelled) == size
    assert bytes(spelled) == entry.read()
    assert hashlib.md5(spelled).hexdigest() == entry.md5


def test_java_timestamp_cuts_trailing_zeros():
    assert java_timestamp(dt.datetime(2023, 9, 27, 17, 31, 21, 352000)) == "2023-09-27 17:31:21.352"
    assert java_timestamp(dt.datetime(2023, 9, 27, 17, 31, 21, 500000)) == "2023-09-27 17:31:21.5"
    assert java_timestamp(dt.datetime(2023, 9, 27, 17, 31, 21)) == "2023-09-27 17:31:21.0"


def test_java_date_format():
    assert java_date(dt.datetime(2023, 9, 27, 17, 31, 21, 352000)) == "Wed Sep 27 17:31:21 UTC 2023"
