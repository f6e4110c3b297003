"""The lockfile: its TOML layout, validation, identity (lineage/serial) and atomic saving."""

from __future__ import annotations

import copy
import errno
import fcntl
import hashlib
import marshal
import os
import pickle
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconcile import __version__, forked, lockcache, lockcheck, lockdoc, lockparse
from reconcile import lock as lock_module
from reconcile.errors import LockfileError
from reconcile.lock import (
    FORMAT_VERSION,
    LOCK_NAME,
    Lock,
    _document,
    _schema_problems,
    dumps_lock,
    load_or_new,
    loads_lock,
    lock_path,
    read_lock,
    scan_sort_key,
    write_lock,
)
from reconcile.lockdoc import TRAILER
from reconcile.model import OutputRecord, ScanRecord, SessionRecord, UnselectedScan

if TYPE_CHECKING:
    from conftest import Forks
from reconcile.schema import load_schema


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record(n: int = 1, *, outputs: int = 2, scans: tuple[str, ...] = ("1", "2")) -> SessionRecord:
    subject = f"SUBJ{n:02d}"
    return SessionRecord(
        experiment_id=f"XNAT_E{n:05d}",
        project="PROJ",
        subject_id=f"XNAT_S{n:05d}",
        subject_label=subject,
        session_label=f"{subject}_MR1",
        bids_subject=subject,
        bids_session="MR1",
        date="2024-01-10",
        insert_date="2024-01-10 14:22:05.352",
        last_modified="2024-01-11 09:00:00.0",
        xsi_type="xnat:mrSessionData",
        exported_at="2026-11-25T16:00:00Z",
        config_fingerprint="0123456789abcdef",
        config_digests={"skip": "aa", "bidsmap": "bb", "heuristic": "cc", "include": "dd"},
        tools={"xnat2bids": "0.1.0", "heudiconv": "1.5.1", "dcm2niix": "v1.0.20240202"},
        scans=tuple(ScanRecord(s, "T1w", "t1_mprage", 176, 176 * 1024, sha(s)) for s in scans),
        outputs=tuple(
            OutputRecord(f"sub-{subject}/ses-MR1/anat/sub-{subject}_ses-MR1_run-{i:02d}_T1w.nii.gz", 1000 + i, sha(str(i)), 1_764_086_400_000_000_000 + i)
            for i in range(outputs)
        ),
    )


def lock_with(*records: SessionRecord) -> Lock:
    lock = Lock.new()
    for r in records:
        lock = lock.with_session(r)
    return lock


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path


# --- format ------------------------------------------------------------------------------------


def test_round_trip_is_byte_identical() -> None:
    lock = replace(lock_with(record(1), record(2, scans=())), config_fingerprint="0123456789abcdef", serial=7)
    text = dumps_lock(lock)
    assert loads_lock(text) == lock
    assert dumps_lock(loads_lock(text)) == text


def test_layout_has_header_identity_and_one_table_per_session() -> None:
    text = dumps_lock(lock_with(record(1)))
    lines = text.splitlines()
    assert lines[0] == "# Written by xnat2bids; do not edit by hand."
    assert lines[1] == f"format_version = {FORMAT_VERSION}"
    assert [line.split(" =")[0] for line in lines[2:6]] == ["lineage", "serial", "generator", "config_fingerprint"]
    assert "[sessions.XNAT_E00001]" in lines
    assert "[[sessions.XNAT_E00001.outputs]]" in lines


def test_missing_date_is_omitted_and_reads_back_as_none() -> None:
    lock = lock_with(replace(record(1), date=None))
    text = dumps_lock(lock)
    assert "\ndate =" not in text
    assert loads_lock(text).sessions["XNAT_E00001"].date is None


def test_output_is_sorted_regardless_of_insertion_order() -> None:
    a, b, c = record(1), record(2), record(3)
    shuffled = replace(
        b,
        scans=tuple(reversed(record(2, scans=("1", "2", "10", "SR1", "9")).scans)),
        outputs=tuple(reversed(b.outputs)),
        config_digests=dict(reversed(list(b.config_digests.items()))),
    )
    forward = replace(lock_with(a, shuffled, c), lineage="1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed")
    backward = replace(lock_with(c, shuffled, a), lineage=forward.lineage)
    text = dumps_lock(forward)
    assert text == dumps_lock(backward)

    session_headers = [line for line in text.splitlines() if line.startswith("[sessions.") and line.count(".") == 1]
    assert session_headers == ["[sessions.XNAT_E00001]", "[sessions.XNAT_E00002]", "[sessions.XNAT_E00003]"]
    parsed = loads_lock(text).sessions["XNAT_E00002"]
    assert [s.id for s in parsed.scans] == ["1", "2", "9", "10", "SR1"]
    assert [o.path for o in parsed.outputs] == sorted(o.path for o in b.outputs)
    assert list(parsed.config_digests) == ["bidsmap", "heuristic", "include", "skip"]
    assert text.index("bidsmap") < text.index("heuristic") < text.index("include") < text.index("skip =")


def test_scan_ids_sort_numerically() -> None:
    ids = ["10", "2", "1", "1-MR1", "100", "SR_2", "SR_10", "02"]
    assert sorted(ids, key=scan_sort_key) == ["1", "1-MR1", "02", "2", "10", "100", "SR_2", "SR_10"]


def test_with_session_and_without_session_leave_the_original_unchanged() -> None:
    empty = Lock.new()
    one = empty.with_session(record(1))
    assert dict(empty.sessions) == {}
    assert list(one.sessions) == ["XNAT_E00001"]
    assert one.lineage == empty.lineage and one.serial == empty.serial
    assert dict(one.without_session("XNAT_E00001").sessions) == {}
    assert list(one.sessions) == ["XNAT_E00001"]
    assert one.without_session("XNAT_E99999") == one


def test_new_lock_has_a_fresh_uuid4_lineage_and_no_sessions() -> None:
    a, b = Lock.new(), Lock.new()
    assert uuid.UUID(a.lineage).version == 4
    assert a.lineage != b.lineage
    assert (a.serial, a.config_fingerprint, dict(a.sessions)) == (0, "", {})
    assert a.generator == f"xnat2bids {__version__}"


def test_documented_example_is_accepted() -> None:
    text = f'''\
format_version = 1
lineage = "1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed"
serial = 3
generator = "xnat2bids 0.1.0"
config_fingerprint = "0123456789abcdef"

[sessions.XNAT_E00001]
experiment_id = "XNAT_E00001"
project = "PROJ"
subject_id = "XNAT_S00001"
subject_label = "SUBJ01"
session_label = "SUBJ01_MR1"
bids_subject = "SUBJ01"
bids_session = "MR1"
date = "2024-01-10"
insert_date = "2024-01-10 14:22:05.352"
last_modified = "2024-01-10 14:22:05.352"
xsi_type = "xnat:mrSessionData"
exported_at = "2026-11-25T16:00:00Z"
config_fingerprint = "0123456789abcdef"
config_digests = {{ bidsmap = "aa", heuristic = "bb", include = "cc", skip = "dd" }}
tools = {{ dcm2niix = "v1.0.20240202", heudiconv = "1.5.1", xnat2bids = "0.1.0" }}
scans = []

[[sessions.XNAT_E00001.outputs]]
path = "sub-SUBJ01/ses-MR1/anat/sub-SUBJ01_ses-MR1_T1w.nii.gz"
size = 123
sha256 = "{sha("x")}"
mtime_ns = 1764086400000000000
'''
    lock = loads_lock(text)
    assert lock.serial == 3
    assert lock.sessions["XNAT_E00001"].outputs[0].size == 123


def test_a_format_1_lock_is_read_as_it_is_and_written_in_the_current_format() -> None:
    # Format 1 sessions lack unselected_scans: None, so that plan knows it cannot tell which
    # sessions an include/skip/bidsmap change affects, unlike an empty list.
    old = loads_lock(dumps_lock(lock_with(record(1))).replace(f"format_version = {FORMAT_VERSION}", "format_version = 1"))
    assert old.format_version == 1 and old.sessions["XNAT_E00001"].unselected_scans is None
    text = dumps_lock(old.with_session(replace(record(2), unselected_scans=())))
    assert text.splitlines()[1] == f"format_version = {FORMAT_VERSION}"
    again = loads_lock(text)
    assert again.sessions["XNAT_E00001"].unselected_scans is None
    assert again.sessions["XNAT_E00002"].unselected_scans == ()
    assert "unselected_scans = []" in text and text.count("unselected_scans") == 1


@pytest.mark.parametrize("left_out, problem", [
    (("3", "3"), r"unselected_scans/1/id: '3' is listed twice"),
    (("2",), r"unselected_scans/0/id: '2' is among the session's scans too"),
])
def test_an_unselected_scan_listed_twice_or_also_selected_is_refused(left_out, problem) -> None:
    rec = replace(record(1), unselected_scans=tuple(UnselectedScan(i, "MR", "x") for i in left_out))
    text = dumps_lock(lock_with(replace(rec, unselected_scans=())))
    listed = ", ".join(f'{{ id = "{i}", type = "MR", series_description = "x" }}' for i in left_out)
    with pytest.raises(LockfileError, match=problem):
        loads_lock(text.replace("unselected_scans = []", f"unselected_scans = [{listed}]"))


def test_unselected_scans_and_bidsmap_names_are_kept_in_scan_order() -> None:
    scans = (ScanRecord("10", "MR", "t1", 1, 1, sha("a"), bidsmap_target="anat-T1w"),
             ScanRecord("2", "MR", "bold", 1, 1, sha("b")))
    left_out = (UnselectedScan("11", "MR", "localizer"), UnselectedScan("1", "MR", "scout"))
    text = dumps_lock(lock_with(replace(record(1), scans=scans, unselected_scans=left_out)))
    rec = loads_lock(text).sessions["XNAT_E00001"]
    assert [s.id for s in rec.unselected_scans] == ["1", "11"]
    assert [(s.id, s.bidsmap_target) for s in rec.scans] == [("2", None), ("10", "anat-T1w")]
    assert text.count("bidsmap_target") == 1
    assert ('unselected_scans = [\n    { id = "1", type = "MR", series_description = "scout" },\n'
            '    { id = "11", type = "MR", series_description = "localizer" },\n]\n') in text  # a line each


# --- property: any lock survives the round trip -------------------------------------------------

_label = st.text(min_size=1, max_size=12)
_free = st.text(max_size=20)
_hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_count = st.integers(min_value=0, max_value=2**63 - 1)
_ident = st.from_regex(r"\A[A-Za-z0-9_-]{1,16}\Z")
_alnum = st.from_regex(r"\A[A-Za-z0-9]{1,10}\Z")
_segment = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\" + "".join(map(chr, range(32)))),
    min_size=1,
    max_size=10,
).filter(lambda s: s not in (".", ".."))
_path = st.lists(_segment, min_size=1, max_size=4).map("/".join)
_scan = st.builds(ScanRecord, id=_label, type=_free, series_description=_free, file_count=_count, total_size=_count,
                  digest=_hex64, bidsmap_target=st.none() | _label)
_unselected = st.builds(UnselectedScan, id=_label, type=_free, series_description=_free)
_output = st.builds(OutputRecord, path=_path, size=_count, sha256=_hex64, mtime_ns=_count)
_session = st.builds(
    SessionRecord,
    experiment_id=_ident,
    project=_label,
    subject_id=_label,
    subject_label=_label,
    session_label=_label,
    bids_subject=_alnum,
    bids_session=_alnum,
    date=st.none() | st.dates().map(lambda d: f"{d.year:04d}-{d.month:02d}-{d.day:02d}"),
    insert_date=_free,
    last_modified=_free,
    xsi_type=_label,
    exported_at=st.datetimes().map(lambda d: f"{d.year:04d}-{d:%m-%dT%H:%M:%S}Z"),
    config_fingerprint=st.text(alphabet="0123456789abcdef", max_size=16),
    config_digests=st.dictionaries(_ident, _free, max_size=4),
    tools=st.dictionaries(_ident, _free, max_size=3),
    scans=st.lists(_scan, max_size=4, unique_by=lambda s: s.id).map(tuple),
    outputs=st.lists(_output, max_size=4, unique_by=lambda o: o.path).map(tuple),
    unselected_scans=st.none() | st.lists(_unselected, max_size=3, unique_by=lambda s: s.id).map(tuple),
).filter(lambda s: not {u.id for u in s.unselected_scans or ()} & {x.id for x in s.scans})  # valid: no scan both
_locks = st.builds(
    lambda sessions, serial, fingerprint: replace(lock_with(*sessions), serial=serial, config_fingerprint=fingerprint),
    st.lists(_session, max_size=4, unique_by=lambda s: s.experiment_id),
    st.integers(min_value=0, max_value=2**62),  # writes add one each; TOML integers are 64-bit
    st.text(alphabet="0123456789abcdef", max_size=16),
)


@given(_locks)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_lock_round_trips_byte_identically(lock: Lock) -> None:
    text = dumps_lock(lock)
    assert loads_lock(text) == lock
    assert dumps_lock(loads_lock(text)) == text


@given(_locks)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.skipif(lockparse.toml_rs is None, reason="toml-rs is not installed (Python 3.10)")
def test_the_fast_parser_gives_tomllibs_document(lock: Lock) -> None:
    text = dumps_lock(lock)
    fast, slow = lockparse._fast_document(text), lockparse.tomllib.loads(text)
    assert fast == slow and repr(fast) == repr(slow)  # same types and key order too


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda t: t.replace('project = "PROJ"', 'project = "P\\eJ"'), id="TOML 1.1 escape"),
        pytest.param(lambda t: t.replace('generator = "', 'x = { a = 1,\n}\ngenerator = "'), id="TOML 1.1 inline table"),
    ],
)
def test_what_tomllib_refuses_stays_refused(root: Path, edit: Callable[[str], str]) -> None:
    text = edit(dumps_lock(lock_with(record(1))))
    with pytest.raises(lockparse.tomllib.TOMLDecodeError) as expected:
        lockparse.tomllib.loads(text)
    lock_path(root).write_text(text, encoding="utf-8")
    with pytest.raises(LockfileError) as excinfo:
        read_lock(root)
    assert excinfo.value.summary == f"{lock_path(root)}: not valid TOML: {expected.value}"


def _shuffled(node: object, rnd: random.Random) -> object:
    if isinstance(node, dict):
        items = list(node.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(node, list):
        return rnd.sample([_shuffled(v, rnd) for v in node], len(node))
    return node


@given(_session, st.randoms())
@settings(max_examples=100, deadline=None)
def test_a_read_session_is_put_in_the_order_a_record_is_written_in(record: SessionRecord, rnd: random.Random) -> None:
    expected = lockdoc._session_document(record)
    # repr: equal with the same order of keys and items
    assert repr(lockdoc._canonical_session(_shuffled(expected, rnd))) == repr(expected)



@given(_session)
@settings(max_examples=100, deadline=None)
def test_a_record_built_on_unmarshalled_dicts_is_the_record_the_document_gives(record: SessionRecord) -> None:
    """The lock decodes a session by adopting the dicts marshal returns: the same record, with
    every field set and no other attribute, in the session itself and in each scan and output."""
    blob = marshal.dumps(lockdoc._session_document(record))
    adopted, built = lockdoc._decoded(marshal.loads(blob)), lockdoc._record(marshal.loads(blob), canonical=True)
    assert adopted == built and repr(adopted) == repr(built)
    for obj in (adopted, *adopted.scans, *adopted.outputs, *(adopted.unselected_scans or ())):
        assert set(vars(obj)) == {f.name for f in fields(obj)}


# --- validation --------------------------------------------------------------------------------


def test_the_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(load_schema("lock"))


def _mutations(doc: dict) -> st.SearchStrategy[dict]:
    """A valid document with one value somewhere replaced by something arbitrary."""
    leaves: list[tuple[tuple, object]] = []

    def walk(node: object, where: tuple) -> None:
        leaves.append((where, node))
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*where, k))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, (*where, i))

    walk(doc, ())
    junk = (
        st.integers(min_value=-3, max_value=2**64)
        | st.booleans()
        | st.text(max_size=8)
        | st.sampled_from(["../x", "/abs", "a/../b", "a\n", "a//b", sha("x") + "\n", "X" * 200, "", "."])
        | st.just({})
        | st.just([])
    )

    def mutate(choice: tuple[tuple, object], value: object, add_key: bool) -> dict:
        where, _ = choice
        out = copy.deepcopy(doc)
        if not where:
            out["surprise"] = value
            return out
        parent = out
        for key in where[:-1]:
            parent = parent[key]
        if add_key and isinstance(parent, dict):
            parent[f"extra_{where[-1]}"] = value
        else:
            parent[where[-1]] = value
        return out

    return st.builds(mutate, st.sampled_from(leaves), junk, st.booleans())


_SAMPLE_DOC = _document(lock_with(record(1, outputs=2, scans=("1", "2")), replace(record(2), date=None)))


@given(_mutations(_SAMPLE_DOC))
@settings(max_examples=400, deadline=None)
def test_the_compiled_validator_agrees_with_jsonschema(doc: dict) -> None:
    reference = jsonschema.Draft202012Validator(load_schema("lock"), format_checker=None)
    expected_valid = not any(reference.iter_errors(doc))
    ours = _schema_problems(doc)
    # Our validator is stricter in two documented ways: ints only (JSON Schema also takes 1.0) and
    # '$' anchors at the very end (Python's re also before a final newline).
    if expected_valid and ours:
        assert all("\\n" in p or "is not an integer" in p for p in ours), ours
    else:
        assert expected_valid == (not ours), ours


@given(_mutations(_SAMPLE_DOC))
@settings(max_examples=400, deadline=None)
def test_the_quick_yes_no_agrees_with_the_full_check(doc: dict) -> None:
    valid, check = lockcheck._lock_check()
    problems: list = []
    check(doc, (), problems)
    try:
        quick = bool(valid(doc))
    except TypeError:
        quick = False
    assert quick == (not problems), problems


def test_a_valid_document_has_no_problems() -> None:
    assert _schema_problems(_SAMPLE_DOC) == []
    assert lockcheck._lock_check()[0](_SAMPLE_DOC)  # said by the quick check alone


# --- files -------------------------------------------------------------------------------------


def test_read_of_a_missing_lock_is_none(root: Path) -> None:
    assert read_lock(root) is None


def test_load_or_new_does_not_write(root: Path) -> None:
    lock = load_or_new(root)
    assert lock.serial == 0 and dict(lock.sessions) == {}
    assert not lock_path(root).exists()


def test_lock_path_is_in_the_bids_root(root: Path) -> None:
    assert lock_path(root) == root / LOCK_NAME == root / ".xnat2bids.lock"


def test_write_increments_serial_and_keeps_lineage(root: Path) -> None:
    first = write_lock(root, lock_with(record(1)))
    assert first.serial == 1
    again = read_lock(root)
    assert again == first
    second = write_lock(root, again.with_session(record(2)), expected_serial=again.serial)
    assert second.serial == 2
    assert second.lineage == first.lineage
    assert read_lock(root) == second
    assert lock_path(root).read_text() == dumps_lock(second)


def test_write_records_this_version_as_generator(root: Path) -> None:
    written = write_lock(root, replace(lock_with(record(1)), generator="xnat2bids 0.0.1"))
    assert written.generator == f"xnat2bids {__version__}"
    assert read_lock(root).generator == f"xnat2bids {__version__}"


def test_atomic_write_leaves_no_temp_files(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    write_lock(root, lock, expected_serial=1)
    assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]


def test_a_failed_rename_keeps_the_old_lock_and_removes_the_temp_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lock = write_lock(root, lock_with(record(1)))
    before = lock_path(root).read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(LockfileError, match="cannot write .*No space left") as caught:
        write_lock(root, lock.with_session(record(2)), expected_serial=1)
    assert caught.value.hint == f"the disk holding {root} is full: free space there, then run again"
    assert lock_path(root).read_bytes() == before
    assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]


def test_a_writer_that_read_an_older_lock_fails_instead_of_overwriting_a_newer_one(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = write_lock(root, lock_with(record(1)))
    paused, resume = threading.Event(), threading.Event()

    def hit(name: str) -> None:  # the slow writer stops between its serial check and its rename
        if name == "lock-temp-written" and threading.current_thread().name == "slow":
            paused.set()
            resume.wait(30)

    monkeypatch.setattr(lock_module, "hit", hit)
    outcome: dict[str, object] = {}

    def write(name: str, n: int) -> None:
        try:
            outcome[name] = write_lock(root, first.with_session(record(n)), expected_serial=1)
        except LockfileError as exc:
            outcome[name] = exc

    slow = threading.Thread(target=write, args=("slow", 2), name="slow")
    slow.start()
    assert paused.wait(30)
    fast = threading.Thread(target=write, args=("fast", 3))
    fast.start()  # read serial 1 too: it must wait for the slow writer, then see serial 2
    resume.set()
    slow.join(30)
    fast.join(30)
    assert isinstance(outcome["fast"], LockfileError) and "(serial 1 → 2)" in str(outcome["fast"])
    forget()
    assert read_lock(root) == outcome["slow"] and sorted(read_lock(root).sessions) == ["XNAT_E00001", "XNAT_E00002"]


def test_write_keeps_the_file_mode(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    lock_path(root).chmod(0o640)
    write_lock(root, lock)
    assert stat.S_IMODE(lock_path(root).stat().st_mode) == 0o640


def test_write_into_a_missing_directory_is_a_lockfile_error(tmp_path: Path) -> None:
    with pytest.raises(LockfileError, match="cannot write"):
        write_lock(tmp_path / "nope", Lock.new())


def test_expected_serial_mismatch_is_refused(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    write_lock(root, lock, expected_serial=1)  # another run got there first: serial 2 on disk
    before = lock_path(root).read_bytes()
    with pytest.raises(LockfileError, match=r"changed on disk since it was read \(serial 1 → 2\)"):
        write_lock(root, lock.with_session(record(2)), expected_serial=1)
    assert lock_path(root).read_bytes() == before


def test_expected_serial_against_a_different_lineage_is_refused(root: Path) -> None:
    write_lock(root, lock_with(record(1)))
    stranger = Lock.new()
    with pytest.raises(LockfileError, match="different lock"):
        write_lock(root, stranger, expected_serial=1)


def test_expected_serial_zero_matches_a_missing_lock(root: Path) -> None:
    assert write_lock(root, load_or_new(root), expected_serial=0).serial == 1
    with pytest.raises(LockfileError, match=r"serial 0 → 1"):
        write_lock(root, Lock.new(), expected_serial=0)


def test_writing_an_invalid_lock_is_refused_and_writes_nothing(root: Path) -> None:
    escaping = replace(record(1), outputs=(OutputRecord("../../etc/passwd", 1, sha("x"), 0),))
    with pytest.raises(LockfileError, match=r"refusing to write an invalid lock.*outputs/0/path: '\.\./\.\./etc/passwd' is not a relative path"):
        write_lock(root, lock_with(escaping))
    assert not lock_path(root).exists()
    assert list(root.iterdir()) == []


def test_writing_a_lock_keyed_under_the_wrong_id_is_refused(root: Path) -> None:
    lock = Lock.new()
    lock = replace(lock, sessions={"XNAT_E00002": record(1)})
    with pytest.raises(LockfileError, match="disagrees with its table key"):
        write_lock(root, lock)


VALID = dumps_lock(replace(lock_with(record(1), record(2)), serial=4))


def _edit(old: str, new: str, count: int = 1) -> str:
    assert old in VALID
    return VALID.replace(old, new, count)


INVALID = {
    "not TOML": ("format_version = 1\nserial = = 3\n", r"not valid TOML: .*line 2"),
    "not UTF-8": (b"format_version = 1\n\xff\xfe", r"not valid TOML: not UTF-8"),
    "empty": ("", r"the file is empty \(cut short by a full disk or a failed copy\?\)"),
    "blank lines only": ("\n \n", r"the file is empty"),
    "header only": (VALID.split("\n[sessions.")[0], r"invalid lock: \(top level\): missing required key 'sessions'"),
    "cut at the end of a line": (VALID[:VALID.rindex("\n[[sessions.XNAT_E00002.outputs]]")] + "\n",
                                 r"the file ends before its last line `# End of the xnat2bids lock.`: cut short"),
    "last session cut off": (VALID[:VALID.index("[sessions.XNAT_E00002]")], r"the file ends before its last line"),
    "byte order mark": ("\ufeff" + VALID, r"starts with a byte order mark, which TOML does not allow"),
    "git merge conflict": (
        _edit("serial = 4\n", "<<<<<<< HEAD\nserial = 4\n=======\nserial = 5\n>>>>>>> theirs\n"),
        r"unresolved git merge conflict \(a conflict marker at line 4\)",
    ),
    "schema failure": (_edit('serial = 4', 'serial = "four"'), r"invalid lock: serial: 'four' is not an integer"),
    "negative size": (_edit("size = 1000", "size = -1"), r"sessions/XNAT_E00001/outputs/0/size: -1 must be at least 0"),
    "bad sha256": (_edit(f'sha256 = "{sha("0")}"', 'sha256 = "abc"'), r"outputs/0/sha256: 'abc' is not a SHA-256 digest"),
    "bad lineage": (_edit("lineage = ", 'lineage = "not-a-uuid"\nx = ').replace("\nx = " + VALID.split("lineage = ")[1].split("\n")[0], ""), r"lineage: 'not-a-uuid' is not a lowercase UUID4"),
    "impossible date": (_edit('date = "2024-01-10"', 'date = "2024-13-45"'), r"sessions/XNAT_E00001/date: '2024-13-45' is not a date on the calendar"),
    "unknown key": (_edit('xsi_type = "', 'colour = "red"\nxsi_type = "'), r"sessions/XNAT_E00001: unknown key 'colour'"),
    "missing key": (_edit('xsi_type = "xnat:mrSessionData"\n', ""), r"sessions/XNAT_E00001: missing required key 'xsi_type'"),
    "future format": (_edit(f"format_version = {FORMAT_VERSION}", f"format_version = {FORMAT_VERSION + 1}\nnew_thing = true"),
                      rf"written by a newer xnat2bids \(format {FORMAT_VERSION + 1}\); upgrade"),
    "old format": (_edit(f"format_version = {FORMAT_VERSION}", "format_version = 0"), r"format_version: 0 must be at least 1"),
    "path with ..": (_edit('path = "sub-SUBJ01/ses-MR1/anat/', 'path = "sub-SUBJ01/../../'), r"outputs/0/path: 'sub-SUBJ01/\.\./\.\./.*' is not a relative path inside the BIDS root"),
    "absolute path": (_edit('path = "sub-SUBJ01/', 'path = "/sub-SUBJ01/'), r"outputs/0/path: '/sub-SUBJ01/.*' is not a relative path"),
    "unsafe bids label": (_edit('bids_subject = "SUBJ01"', 'bids_subject = "../x"'), r"bids_subject: '\.\./x' is not a BIDS label"),
    "unsafe session key": (_edit("[sessions.XNAT_E00001]", '[sessions."../x"]'), r"sessions/\.\./x: '\.\./x' is not an XNAT experiment ID"),
    "mismatched experiment_id": (_edit('experiment_id = "XNAT_E00001"', 'experiment_id = "XNAT_E00002"'), r"sessions/XNAT_E00001/experiment_id: 'XNAT_E00002' disagrees with its table key 'XNAT_E00001'"),
    "table after the sessions": (VALID + "\n[other]\nx = 1\n", r"\(top level\): unknown key 'other'"),
    "array of tables after the sessions": (VALID + "\n[[other]]\nx = 1\n", r"\(top level\): unknown key 'other'"),
    "number for a session's string": (
        VALID.replace('config_fingerprint = "0123456789abcdef"', "config_fingerprint = 5", 1),
        r"sessions/XNAT_E00001/config_fingerprint: 5 is not a string",
    ),
    "duplicate session": (VALID + "\n[sessions.XNAT_E00001]\nproject = 'P'\n", r"session XNAT_E00001 appears twice \(at line \d+"),
    "duplicate output": (
        VALID.replace(
            VALID.split("[[sessions.XNAT_E00001.outputs]]")[2].split("\n[")[0],
            VALID.split("[[sessions.XNAT_E00001.outputs]]")[1].rstrip("\n") + "\n",
        ),
        r"outputs/1/path: '.*' is listed twice",
    ),
}


def test_a_lock_ends_with_its_trailer_and_one_written_before_format_3_needs_none(root: Path) -> None:
    text = dumps_lock(lock_with(record(1)))
    assert text.endswith("\n\n# End of the xnat2bids lock.\n") and text.count("# End of") == 1
    assert loads_lock(text.rstrip("\n")) == loads_lock(text)  # an editor dropped the final newline
    older = text.replace(f"format_version = {FORMAT_VERSION}", "format_version = 2").removesuffix("\n" + TRAILER)
    lock_path(root).write_text(older)
    assert read_lock(root) == replace(loads_lock(text), format_version=2)
    written = write_lock(root, read_lock(root))
    assert lock_path(root).read_text().endswith(TRAILER) and written.format_version == FORMAT_VERSION


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_lock_is_reported_and_never_overwritten(root: Path, case: str) -> None:
    content, message = INVALID[case]
    data = content if isinstance(content, bytes) else content.encode()
    lock_path(root).write_bytes(data)

    with pytest.raises(LockfileError, match=message) as excinfo:
        read_lock(root)
    assert str(lock_path(root)) in excinfo.value.summary

    with pytest.raises(LockfileError, match=message):
        write_lock(root, lock_with(record(3)))
    with pytest.raises(LockfileError):
        load_or_new(root)
    assert lock_path(root).read_bytes() == data
    assert sorted(p.name for p in root.iterdir()) == [LOCK_NAME]


@pytest.mark.parametrize("case", sorted(INVALID))
def test_errors_are_the_same_without_the_fast_parser(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    content, _ = INVALID[case]
    if isinstance(content, bytes):
        return
    with pytest.raises(LockfileError) as fast:
        loads_lock(content)
    monkeypatch.setattr(lockparse, "toml_rs", None)
    with pytest.raises(LockfileError) as slow:
        loads_lock(content)
    assert (fast.value.summary, fast.value.detail) == (slow.value.summary, slow.value.detail)


def test_the_valid_base_of_the_invalid_cases_is_valid() -> None:
    assert loads_lock(VALID).serial == 4


def test_loads_names_its_source() -> None:
    with pytest.raises(LockfileError, match=r"^journal\.json: not valid TOML"):
        loads_lock("[", source="journal.json")


def test_a_lock_broken_after_this_process_wrote_it_is_still_refused(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    broken = lock_path(root).read_bytes().replace(b'path = "sub-SUBJ01/', b'path = "../SUBJ01/', 1)
    lock_path(root).write_bytes(broken)
    with pytest.raises(LockfileError, match=r"is not a relative path inside the BIDS root"):
        write_lock(root, lock, expected_serial=lock.serial)
    assert lock_path(root).read_bytes() == broken


def test_a_lock_rewritten_by_another_process_is_noticed(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    other = replace(loads_lock(lock_path(root).read_text()), serial=5)
    lock_path(root).write_text(dumps_lock(other))
    with pytest.raises(LockfileError, match=r"serial 1 → 5"):
        write_lock(root, lock, expected_serial=lock.serial)


def test_a_lock_replaced_by_one_of_the_same_size_and_mtime_is_noticed(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    before = os.stat(lock_path(root))
    other = root / "other"
    other.write_text(dumps_lock(replace(lock, serial=5)))
    assert other.stat().st_size == before.st_size
    os.utime(other, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(other, lock_path(root))  # as this module, or an editor, writes: a new file
    with pytest.raises(LockfileError, match=r"serial 1 → 5"):
        write_lock(root, lock, expected_serial=lock.serial)
    assert read_lock(root).serial == 5


def test_a_lock_rewritten_in_place_with_its_old_size_and_mtime_is_noticed(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    before = os.stat(lock_path(root))
    time.sleep(0.02)  # past the file system's timestamp tick, so the new ctime differs
    with open(lock_path(root), "r+b") as f:
        f.write(dumps_lock(replace(lock, serial=5)).encode())
    os.utime(lock_path(root), ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(lock_path(root)).st_size == before.st_size
    with pytest.raises(LockfileError, match=r"serial 1 → 5"):
        write_lock(root, lock, expected_serial=lock.serial)


def test_a_lock_this_process_wrote_is_not_read_again(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_lock(root, lock_with(record(1)))

    def refuse(path: Path, data: bytes) -> None:
        raise AssertionError("the lock file was read")

    monkeypatch.setattr(lockcache, "_snapshot_of", refuse)
    assert read_lock(root) == first
    second = write_lock(root, first.with_session(record(2)), expected_serial=1)
    assert read_lock(root) == second
    monkeypatch.undo()
    forget()
    assert read_lock(root) == second and lock_path(root).read_text() == dumps_lock(second)


# --- speed: incremental writes and the read cache ----------------------------------------------


@pytest.fixture
def cached(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every lock gets a cache file, saved on every write, in a private directory of its own."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XNAT2BIDS_CACHE_DIR", str(cache))
    monkeypatch.setattr(lockcache, "_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(lockcache, "_CACHE_SAVE_INTERVAL", 0.0)
    return cache / "locks"


def forget() -> None:
    """As a new process would start: nothing known in memory."""
    lockcache._snapshots.clear()
    lockcache._cache_files.clear()


def no_toml(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(data: bytes, source: str, known: object = None) -> None:
        raise AssertionError("the TOML was parsed")

    monkeypatch.setattr(lockcache, "_parse_bytes", refuse)  # as the file reader calls it


@given(_locks, st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
def test_incremental_writes_are_byte_identical_to_a_full_dump(tmp_path: Path, lock: Lock, data: st.DataObject) -> None:
    root = tmp_path / secrets_token()
    root.mkdir()
    written = write_lock(root, lock)
    assert lock_path(root).read_text() == dumps_lock(written)
    for _ in range(3):
        edit = data.draw(st.sampled_from(["add", "replace", "remove", "header"]))
        if edit == "add" or (edit in ("replace", "remove") and not written.sessions):
            changed = written.with_session(data.draw(_session))
        elif edit == "replace":
            key = data.draw(st.sampled_from(sorted(written.sessions)))
            changed = written.with_session(replace(data.draw(_session), experiment_id=key))
        elif edit == "remove":
            changed = written.without_session(data.draw(st.sampled_from(sorted(written.sessions))))
        else:
            changed = replace(written, config_fingerprint=data.draw(st.text(alphabet="0123456789abcdef", max_size=16)))
        written = write_lock(root, changed, expected_serial=written.serial)
        assert lock_path(root).read_text() == dumps_lock(written)
        assert read_lock(root) == written


def secrets_token() -> str:
    return os.urandom(6).hex()


@pytest.mark.parametrize("read_from", ["cache", "TOML"])
def test_a_write_after_a_read_reserializes_only_the_changed_session(
    root: Path, read_from: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if read_from == "cache":
        request.getfixturevalue("cached")
    else:  # a lock this small gets no cache file: the read parses the TOML
        monkeypatch.setenv("XNAT2BIDS_CACHE_DIR", str(root / "cache"))
    write_lock(root, lock_with(*(record(n) for n in range(1, 6))))
    forget()
    parsed: list[str] = []
    real_parse = lockcache._parse_bytes
    monkeypatch.setattr(lockcache, "_parse_bytes", lambda data, source, known=None: parsed.append(source) or real_parse(data, source, known))
    lock = read_lock(root)
    assert len(parsed) == (read_from == "TOML")
    serialized: list[str] = []
    real = lock_module.tomli_w.dumps
    monkeypatch.setattr(lock_module.tomli_w, "dumps", lambda doc: serialized.append(next(iter(doc))) or real(doc))
    written = write_lock(root, lock.with_session(replace(record(3), exported_at="2027-01-01T00:00:00Z")), expected_serial=1)
    assert serialized.count("sessions") == 1  # the changed session; the rest is the header
    monkeypatch.undo()
    assert lock_path(root).read_text() == dumps_lock(written)
    assert read_lock(root).sessions["XNAT_E00003"].exported_at == "2027-01-01T00:00:00Z"


def _fragment_of(text: str, key: str) -> tuple[int, int]:
    """Where session `key`'s text starts and ends in a lock written by `write_lock`."""
    start = text.index(f"[sessions.{key}]\n")
    following = re.compile(r"^\[sessions\.[A-Za-z0-9_-]+\]$", re.MULTILINE).search(text, start + 1)
    return start, text.rindex("\n" + TRAILER) if following is None else following.start() - 1  # before the blank line


def test_a_hand_formatted_session_keeps_its_form_until_it_changes(root: Path) -> None:
    write_lock(root, lock_with(record(1), record(2), record(3)))
    text = lock_path(root).read_text()
    start, end = _fragment_of(text, "XNAT_E00002")
    mine = text[start:end].replace("]\n", "]\n# checked by hand\n", 1).replace("size = 1001\n", "size   =   1001\n")
    lock_path(root).write_text(text[:start] + mine + text[end:])
    forget()
    read = read_lock(root)
    assert read.sessions == lock_with(record(1), record(2), record(3)).sessions

    written = write_lock(root, read.with_session(replace(record(3), exported_at="2027-01-01T00:00:00Z")), expected_serial=1)
    canonical = dumps_lock(written)
    start, end = _fragment_of(canonical, "XNAT_E00002")
    assert lock_path(root).read_text() == canonical[:start] + mine + canonical[end:]  # session 2 as edited
    forget()
    assert read_lock(root) == written

    again = write_lock(root, written.with_session(replace(record(2), exported_at="2027-01-02T00:00:00Z")), expected_serial=2)
    assert lock_path(root).read_text() == dumps_lock(again)  # a changed session is written anew


def _move_tools_of_2_to_the_end(text: str) -> str:
    block = text[text.index("[sessions.XNAT_E00002.tools]"):]
    block = block[: block.index("\n\n") + 2]
    body = text.replace(block, "").removesuffix("\n" + TRAILER)
    return body + "\n" + block + "\n" + TRAILER  # after the last session, before the trailer


def _swap_1_and_2(text: str) -> str:
    (a, b), (c, d) = _fragment_of(text, "XNAT_E00001"), _fragment_of(text, "XNAT_E00002")
    return text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]


@pytest.mark.parametrize("spelling", ["[sessions]", '["sessions"]', "[ sessions ]"])
def test_a_sessions_table_declared_in_two_fragments_is_refused(root: Path, spelling: str) -> None:
    write_lock(root, lock_with(record(1), record(2), record(3)))
    text = lock_path(root).read_text()
    for key in ("XNAT_E00002", "XNAT_E00003"):
        text = text.replace(f"\n\n[sessions.{key}]", f"\n{spelling}\n\n[sessions.{key}]")
    lock_path(root).write_text(text)
    forget()
    with pytest.raises(LockfileError, match=r"not valid TOML: Cannot declare \('sessions',\) twice"):
        read_lock(root)
    with pytest.raises(LockfileError, match="twice"):
        write_lock(root, lock_with(record(4)))
    assert lock_path(root).read_text() == text


def test_a_name_that_is_not_unicode_text_is_refused_before_writing(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1)))
    before = lock_path(root).read_bytes()
    undecodable = os.fsdecode(b"sub-SUBJ02/ses-MR1/anat/f\xe9.nii.gz")  # as os.walk names a Latin-1 file
    bad = replace(record(2), outputs=(OutputRecord(undecodable, 1, sha("x"), 0),))
    with pytest.raises(LockfileError, match=r"refusing to write an invalid lock.*sessions/XNAT_E00002: '\\udce9' is not Unicode"):
        write_lock(root, lock.with_session(bad), expected_serial=1)
    assert lock_path(root).read_bytes() == before


@pytest.mark.skipif(lockparse.toml_rs is None, reason="toml-rs is not installed (Python 3.10)")
@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_swap_1_and_2, id="sessions out of order"),
        pytest.param(_move_tools_of_2_to_the_end, id="a session's table in another's fragment"),
        pytest.param(lambda t: t.replace("[sessions.XNAT_E00002]", "[ sessions.XNAT_E00002 ]"), id="a spaced table name"),
        pytest.param(lambda t: t.replace("\n", "\r\n"), id="CRLF line ends"),
        pytest.param(lambda t: t.replace('series_description = "t1_mprage"', 'series_description = """\n[sessions.XNAT_E00009]\n"""', 1),
                     id="a fragment's first line inside a multi-line string"),
        pytest.param(lambda t: t.replace("[sessions.XNAT_E00001]", "[sessions]\n[sessions.XNAT_E00001]"), id="a sessions table"),
        pytest.param(lambda t: t.replace("[sessions.XNAT_E00002]", "[sessions]\n[sessions.XNAT_E00002]"),
                     id="a sessions table in a fragment"),
    ],
)
def test_a_lock_laid_out_otherwise_is_read_whole_and_written_anew(root: Path, edit: Callable[[str], str]) -> None:
    write_lock(root, lock_with(record(1), record(2), record(3)))
    text = edit(lock_path(root).read_text())
    lock_path(root).write_bytes(text.encode())
    assert lockparse._by_session(text.encode()) is None
    forget()
    read = read_lock(root)
    assert read == loads_lock(text) and _document(read) == lockparse.tomllib.loads(text)
    written = write_lock(root, read.with_session(record(4)), expected_serial=1)
    assert lock_path(root).read_text() == dumps_lock(written)


@given(_locks)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.skipif(lockparse.toml_rs is None, reason="toml-rs is not installed (Python 3.10)")
def test_a_written_lock_is_read_fragment_by_fragment(lock: Lock) -> None:
    data = dumps_lock(lock).encode()
    header, blobs, spans, _ = lockparse._parse_bytes(data, "lock")
    sessions = {key: marshal.loads(blob) for key, blob in blobs.items()}
    assert {**header, "sessions": sessions} == lockparse.tomllib.loads(data.decode())
    if lock.sessions:
        assert spans is not None and list(spans) == sorted(lock.sessions)
        pieces, where = lock_module._assemble(header, [data[start:end] for start, end in spans.values()])
        assert b"".join(pieces) == data and where == list(spans.values())


def test_a_dict_changed_inside_a_read_record_is_written(root: Path) -> None:
    write_lock(root, lock_with(record(1), record(2)))
    forget()
    lock = read_lock(root)
    lock.sessions["XNAT_E00002"].tools["dcm2niix"] = "v2"  # frozen records still hold mutable dicts
    written = write_lock(root, lock, expected_serial=1)
    assert lock_path(root).read_text() == dumps_lock(written)
    assert read_lock(root).sessions["XNAT_E00002"].tools["dcm2niix"] == "v2"


def test_an_invalid_changed_session_is_refused_even_when_the_rest_is_reused(root: Path) -> None:
    lock = write_lock(root, lock_with(record(1), record(2)))
    before = lock_path(root).read_bytes()
    escaping = replace(record(2), outputs=(OutputRecord("../x", 1, sha("x"), 0),))
    with pytest.raises(LockfileError, match=r"refusing to write an invalid lock.*sessions/XNAT_E00002/outputs/0/path"):
        write_lock(root, lock.with_session(escaping), expected_serial=1)
    with pytest.raises(LockfileError, match=r"refusing to write an invalid lock.*lineage"):
        write_lock(root, replace(lock, lineage="nope"))
    assert lock_path(root).read_bytes() == before


def test_sessions_read_lazily_behave_like_a_dict(root: Path) -> None:
    expected = write_lock(root, lock_with(record(1), record(2)))
    forget()
    lock = read_lock(root)
    assert lock == expected and lock.sessions == dict(expected.sessions)
    assert "XNAT_E00001" in lock.sessions and len(lock.sessions) == 2
    assert sorted(lock.without_session("XNAT_E00001").sessions) == ["XNAT_E00002"]
    assert sorted(lock.sessions) == ["XNAT_E00001", "XNAT_E00002"]
    assert pickle.loads(pickle.dumps(lock)) == expected


def test_a_large_lock_is_read_from_the_cache_without_parsing(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_lock(root, lock_with(record(1), record(2, scans=())))
    assert len(list(cached.iterdir())) == 1
    forget()
    no_toml(monkeypatch)
    assert read_lock(root) == written
    assert write_lock(root, read_lock(root).with_session(record(3)), expected_serial=written.serial).serial == 2


def test_a_cache_of_a_lock_in_a_newer_format_is_not_read(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The cache skips the TOML parser and its format check: an xnat2bids that knows only an older
    # format must still refuse the lock, not decode it from the cache (and drop what it cannot read).
    write_lock(root, lock_with(record(1)))
    assert len(list(cached.iterdir())) == 1
    forget()
    monkeypatch.setattr(lockcache, "FORMAT_VERSION", FORMAT_VERSION - 1)
    no_toml(monkeypatch)
    with pytest.raises(AssertionError, match="the TOML was parsed"):  # where the format is checked
        read_lock(root)


def test_small_locks_get_no_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XNAT2BIDS_CACHE_DIR", str(tmp_path / "cache"))
    write_lock(tmp_path / "", lock_with(record(1)))
    assert not (tmp_path / "cache" / "locks").exists()
    # Only the line that tells which lock the root had, for apply to notice it gone (not mounted).
    assert [p.suffix for p in (tmp_path / "cache").rglob("*") if p.is_file()] == [".seen"]


@pytest.mark.parametrize("damage", ["flipped byte in a session", "flipped byte in the index", "truncated", "empty", "garbage"])
def test_a_damaged_cache_is_ignored_and_the_lock_parsed(root: Path, cached: Path, damage: str) -> None:
    written = write_lock(root, lock_with(record(1), record(2)))
    [cache] = cached.iterdir()
    raw = bytearray(cache.read_bytes())
    at = {"flipped byte in a session": len(lockcache._CACHE_MAGIC) + 60, "flipped byte in the index": len(raw) - 100}.get(damage)
    if at is not None:
        raw[at] ^= 0x01
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(os.urandom(len(raw)))
    cache.write_bytes(bytes(raw))
    forget()
    assert read_lock(root) == written
    assert cache.read_bytes() != bytes(raw)  # refreshed from the parsed lock


def test_a_cache_of_other_content_is_ignored(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = write_lock(root, lock_with(record(1)))
    [cache] = cached.iterdir()
    stale = cache.read_bytes()
    second = write_lock(root, first.with_session(record(2)), expected_serial=1)
    cache.write_bytes(stale)  # e.g. a process killed before it saved the newer cache
    forget()
    assert read_lock(root) == second


def test_a_hand_edited_lock_is_parsed_and_validated_not_taken_from_the_cache(root: Path, cached: Path) -> None:
    write_lock(root, lock_with(record(1), record(2)))
    text = lock_path(root).read_text()
    lock_path(root).write_text(text.replace("size = 1001", "size = 4242", 1).replace("serial = 1", "serial = 9"))
    forget()
    edited = read_lock(root)
    assert edited.serial == 9 and edited.sessions["XNAT_E00001"].outputs[1].size == 4242
    # The edited file's bytes are not what this module writes: the next write serializes anew.
    written = write_lock(root, edited.with_session(record(3)), expected_serial=9)
    assert lock_path(root).read_text() == dumps_lock(written)

    broken = lock_path(root).read_bytes().replace(b'bids_subject = "SUBJ01"', b'bids_subject = "../x"')
    lock_path(root).write_bytes(broken)
    forget()
    with pytest.raises(LockfileError, match=r"bids_subject: '\.\./x' is not a BIDS label"):
        read_lock(root)
    with pytest.raises(LockfileError, match=r"is not a BIDS label"):
        write_lock(root, written, expected_serial=written.serial)
    assert lock_path(root).read_bytes() == broken


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_lock_is_never_overwritten_with_the_cache_on(root: Path, cached: Path, case: str) -> None:
    write_lock(root, lock_with(record(1)))  # leaves a valid cache for the path
    content, message = INVALID[case]
    data = content if isinstance(content, bytes) else content.encode()
    lock_path(root).write_bytes(data)
    forget()
    with pytest.raises(LockfileError, match=message):
        read_lock(root)
    with pytest.raises(LockfileError, match=message):
        write_lock(root, lock_with(record(3)))
    assert lock_path(root).read_bytes() == data


def count_toml_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The texts toml-rs is asked to parse from now on (the header, then one per session fragment)."""
    parsed: list[str] = []
    real = lockparse.toml_rs.loads
    monkeypatch.setattr(lockparse.toml_rs, "loads", lambda text, **kw: parsed.append(text) or real(text, **kw))
    return parsed


def as_another_writer(root: Path, data: bytes) -> None:
    """Replace the lock as another process does (`write_lock`, an editor, a pull): a new file renamed
    over it, so it is a new inode whatever the file system's timestamp resolution."""
    tmp = lock_path(root).with_name("other-writer.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, lock_path(root))


def _known_from(source: str, root: Path) -> None:
    """Leave what is known of the lock at `root` in one place: the cache file only, or this
    process's snapshot of the file it wrote, or of the file it read."""
    if source in ("cache", "read"):
        forget()
    if source == "read":
        read_lock(root)


@pytest.mark.skipif(lockparse.toml_rs is None, reason="toml-rs is not installed (Python 3.10)")
@pytest.mark.parametrize("known_from", ["cache", "written", "read"])
def test_after_another_writer_only_the_sessions_it_changed_are_parsed(
    root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch, known_from: str
) -> None:
    # A colleague's apply on a shared root, a pull, a hand edit: the cache (or this process's own
    # reading) is of the file before. Fragments with the same bytes are taken from it.
    mine = write_lock(root, lock_with(*(record(n) for n in range(1, 6))))
    theirs = replace(mine.without_session("XNAT_E00002").with_session(replace(record(3), exported_at="2027-01-01T00:00:00Z"))
                     .with_session(record(7)), serial=mine.serial + 1)
    _known_from(known_from, root)
    text = dumps_lock(theirs)
    as_another_writer(root, text.encode())
    parsed = count_toml_parses(monkeypatch)
    read = read_lock(root)
    assert [t.split("\n", 2)[1] for t in parsed[1:]] == ["[sessions.XNAT_E00003]", "[sessions.XNAT_E00007]"]
    assert read == theirs == loads_lock(text)
    assert read.sessions["XNAT_E00003"].exported_at == "2027-01-01T00:00:00Z"
    # What the read saved is complete: a new process reads it back without the parser.
    forget()
    parsed.clear()
    assert read_lock(root) == theirs and parsed == []
    # ...and a write copies every unchanged fragment from the file: one session serialised.
    serialized: list[str] = []
    real = lock_module.tomli_w.dumps
    monkeypatch.setattr(lock_module.tomli_w, "dumps", lambda doc: serialized.append(next(iter(doc))) or real(doc))
    written = write_lock(root, read.with_session(replace(record(4), exported_at="2027-02-02T00:00:00Z")),
                         expected_serial=theirs.serial)
    assert serialized.count("sessions") == 1
    monkeypatch.undo()
    assert lock_path(root).read_text() == dumps_lock(written)


@pytest.mark.skipif(lockparse.toml_rs is None, reason="toml-rs is not installed (Python 3.10)")
@pytest.mark.parametrize("known_from", ["cache", "written", "read"])
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        pytest.param(lambda t: t.replace(f"format_version = {FORMAT_VERSION}", f"format_version = {FORMAT_VERSION + 1}"),
                     "newer xnat2bids", id="newer format"),
        pytest.param(lambda t: re.sub(r"serial = \d+", "serial = -1", t, count=1), "serial", id="header invalid"),
        pytest.param(lambda t: t + "\n" + t[t.index("[sessions.XNAT_E00001]"):t.index("[sessions.XNAT_E00002]")],
                     "appears twice", id="a known session twice"),
        pytest.param(lambda t: t.replace('bids_subject = "SUBJ02"', 'bids_subject = "../x"'),
                     r"sessions/XNAT_E00002/bids_subject: '\.\./x' is not a BIDS label", id="a changed session invalid"),
    ],
)
def test_a_lock_another_writer_broke_is_refused_though_its_sessions_are_known(
    root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch, known_from: str, edit: Callable[[str], str], message: str
) -> None:
    write_lock(root, lock_with(record(1), record(2), record(3)))
    broken = edit(lock_path(root).read_text()).encode()
    _known_from(known_from, root)
    as_another_writer(root, broken)
    parsed = count_toml_parses(monkeypatch)
    with pytest.raises(LockfileError, match=message):
        read_lock(root)
    if "XNAT_E00002/bids_subject" in message:  # found by parsing that session's fragment alone first
        assert [t.split("\n", 2)[1] for t in parsed[1:2]] == ["[sessions.XNAT_E00002]"]
    with pytest.raises(LockfileError, match=message):
        write_lock(root, lock_with(record(4)))
    assert lock_path(root).read_bytes() == broken


@pytest.mark.skipif(lockparse.toml_rs is None, reason="toml-rs is not installed (Python 3.10)")
def test_known_sessions_swapped_in_the_file_are_read_whole(root: Path, cached: Path) -> None:
    written = write_lock(root, lock_with(record(1), record(2)))
    text = lock_path(root).read_text()
    one, two = _fragment_of(text, "XNAT_E00001"), _fragment_of(text, "XNAT_E00002")
    swapped = text[:one[0]] + text[two[0]:two[1]] + "\n" + text[one[0]:one[1]] + "\n" + TRAILER
    forget()
    as_another_writer(root, swapped.encode())
    assert lockparse._by_session(swapped.encode()) is None  # out of order: not laid out as written
    assert read_lock(root) == replace(written) == loads_lock(swapped)


def _reexported(root: Path, lock: Lock, n: int) -> Lock:
    """`lock` written again with session `n` exported anew."""
    return write_lock(root, lock.with_session(replace(record(n), exported_at="2027-01-01T00:00:00Z")),
                      expected_serial=lock.serial)


@given(_locks, _locks, st.sampled_from(["cache", "written", "read"]))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_reading_a_changed_lock_with_the_old_one_known_gives_what_a_fresh_read_gives(
    before: Lock, after: Lock, known_from: str
) -> None:
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(lockcache, "_CACHE_MIN_BYTES", 0), \
            mock.patch.dict(os.environ, {"XNAT2BIDS_CACHE_DIR": str(Path(tmp) / "cache")}):
        root = Path(tmp) / "bids"
        root.mkdir()
        sessions = dict(before.sessions)  # kept, and every other one replaced by a session of `after`
        for key, rec in zip(sorted(before.sessions)[::2], after.sessions.values()):
            sessions[key] = replace(rec, experiment_id=key)
        mixed = replace(after, sessions={**dict(after.sessions), **sessions})
        write_lock(root, before)
        lockcache._save_unsaved()
        _known_from(known_from, root)
        as_another_writer(root, dumps_lock(mixed).encode())
        again = read_lock(root)
        lockcache._snapshots.clear()
        shutil.rmtree(Path(tmp) / "cache")
        assert again == read_lock(root) == loads_lock(dumps_lock(mixed))
        lockcache._snapshots.clear()


def test_a_cache_save_appends_only_what_changed_and_is_rewritten_when_mostly_left_over(
    root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 9))))
    [cache] = cached.iterdir()
    first = cache.stat()
    written = _reexported(root, written, 2)
    second = cache.stat()
    blob = len(lockcache._snapshots[os.path.abspath(lock_path(root))].blobs["XNAT_E00002"])
    assert second.st_ino == first.st_ino and blob <= second.st_size - first.st_size < first.st_size  # appended
    forget()
    no_toml(monkeypatch)
    assert read_lock(root) == written  # from the cache, as appended
    monkeypatch.undo()
    monkeypatch.setenv("XNAT2BIDS_CACHE_DIR", str(cached.parent))
    monkeypatch.setattr(lockcache, "_CACHE_SAVE_INTERVAL", 0.0)
    monkeypatch.setattr(lockcache, "_CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(lockcache, "_CACHE_SLACK", 0)
    for n in range(3, 8):  # each append leaves an index and a blob over: soon more than the live blobs
        written = _reexported(root, written, n)
    live = sum(map(len, lockcache._snapshots[os.path.abspath(lock_path(root))].blobs.values()))
    assert cache.stat().st_ino != first.st_ino and cache.stat().st_size <= 2 * live + 4096  # written anew
    forget()
    no_toml(monkeypatch)
    assert read_lock(root) == written


@pytest.mark.parametrize("meddling", ["replaced by another process", "appended to by another process", "torn append"])
def test_a_cache_changed_behind_this_process_is_written_whole_or_ignored(
    root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch, meddling: str
) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 4))))
    [cache] = cached.iterdir()
    raw = cache.read_bytes()
    if meddling == "replaced by another process":
        other = cache.with_name("other.tmp")
        other.write_bytes(raw)
        os.replace(other, cache)
    elif meddling == "appended to by another process":
        with open(cache, "ab") as f:
            f.write(raw[len(lockcache._CACHE_MAGIC):])  # another trailer: still a valid cache by itself
    written = _reexported(root, written, 1)
    if meddling == "torn append":  # killed while appending: a trailer that is not an index
        cache.write_bytes(cache.read_bytes()[:-7])
    forget()
    parsed: list[str] = []
    real = lockcache._parse_bytes
    monkeypatch.setattr(lockcache, "_parse_bytes", lambda data, source, known=None: parsed.append(source) or real(data, source, known))
    assert read_lock(root) == written
    assert len(parsed) == (meddling == "torn append")


def _counting_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    parsed: list[str] = []
    real = lockcache._parse_bytes
    monkeypatch.setattr(lockcache, "_parse_bytes", lambda data, source, known=None: parsed.append(source) or real(data, source, known))
    return parsed


def _relaid(raw: bytes, pad: int) -> bytes:
    """The same cache with its blobs `pad` bytes further on: another process's rewrite, laid out
    otherwise (other order, left-overs), seen by this one."""
    first = len(lockcache._CACHE_MAGIC) + lockcache._NONCE_BYTES
    nonce = raw[len(lockcache._CACHE_MAGIC):first]
    start = len(raw) - 40 - int.from_bytes(raw[-40:-32], "big")
    fields = list(marshal.loads(raw[start:-40]))
    fields[4] = tuple(at + pad for at in fields[4])
    index = marshal.dumps(tuple(fields))
    return (raw[:first] + b"\0" * pad + raw[first:start] + index + len(index).to_bytes(8, "big")
            + hashlib.sha256(nonce + index).digest())


def test_a_cache_another_process_rewrote_otherwise_is_written_whole_not_appended_to(
    root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 5))))
    [cache] = cached.iterdir()
    other = cache.with_name("other.tmp")
    other.write_bytes(_relaid(cache.read_bytes(), 4096))
    os.replace(other, cache)
    forget()
    assert read_lock(root) == written  # the rewrite is a valid cache
    lockcache._snapshots.clear()
    written = _reexported(root, written, 1)
    forget()
    no_toml(monkeypatch)
    assert read_lock(root) == written


def test_a_cache_another_process_is_appending_to_is_written_whole(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 5))))
    [cache] = cached.iterdir()
    before = cache.stat()
    with open(cache, "rb") as held:  # its own open file: as another process's append holds it
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        written = _reexported(root, written, 1)
        assert os.fstat(held.fileno()).st_size == before.st_size  # not appended to under its flock
    assert cache.stat().st_ino != before.st_ino
    forget()
    no_toml(monkeypatch)
    assert read_lock(root) == written


def test_consecutive_saves_append_only_their_session_and_an_index(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 9))))
    [cache] = cached.iterdir()
    first = cache.stat()
    size = first.st_size
    for n in (2, 3, 4):
        written = _reexported(root, written, n)
        snapshot = lockcache._snapshots[os.path.abspath(lock_path(root))]
        keys = tuple(snapshot.blobs)
        index = sum(map(len, lockcache._index(snapshot, keys, [0] * len(keys), b"")))
        now = cache.stat()
        assert now.st_ino == first.st_ino
        assert now.st_size - size <= len(snapshot.blobs[f"XNAT_E0000{n}"]) + index + 64  # that session only
        size = now.st_size
    forget()
    no_toml(monkeypatch)
    assert read_lock(root) == written


def test_a_read_after_another_writer_appends_to_the_cache_it_read(root: Path, cached: Path) -> None:
    mine = write_lock(root, lock_with(*(record(n) for n in range(1, 6))))
    [cache] = cached.iterdir()
    before = cache.stat()
    forget()  # a new process: it knows the cache file only by reading it
    theirs = replace(mine.with_session(replace(record(3), exported_at="2027-01-01T00:00:00Z")), serial=mine.serial + 1)
    as_another_writer(root, dumps_lock(theirs).encode())
    assert read_lock(root) == theirs
    assert cache.stat().st_ino == before.st_ino and cache.stat().st_size > before.st_size


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_append_takes_itself_back_and_never_fails_the_lock_write(
    root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    # A full home quota (where ~/.cache lives) must not fail a lock write that already happened.
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 5))))
    [cache] = cached.iterdir()
    before = cache.read_bytes()
    real = os.pwrite

    def fail_midway(fd: int, data: Any, at: int) -> int:
        real(fd, bytes(data)[:10], at)
        raise error

    monkeypatch.setattr(lockcache.os, "pwrite", fail_midway)
    changed = written.with_session(replace(record(1), exported_at="2027-01-01T00:00:00Z"))
    snapshot = lockcache._snapshots[os.path.abspath(lock_path(root))]
    known = lockcache._cache_files[str(cache)]
    if isinstance(error, OSError):
        assert lockcache._append_cache(cache, snapshot, known) is False
    else:
        with pytest.raises(KeyboardInterrupt):
            lockcache._append_cache(cache, snapshot, known)
    assert cache.read_bytes() == before  # the torn append taken back: the older cache still serves
    if isinstance(error, OSError):
        written = write_lock(root, changed, expected_serial=written.serial)  # the save writes it whole
        monkeypatch.setattr(lockcache.os, "pwrite", real)
        forget()
        no_toml(monkeypatch)
        assert read_lock(root) == written


def test_a_cache_written_by_someone_else_is_not_trusted(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_lock(root, lock_with(record(1)))
    forget()
    monkeypatch.setattr(os, "getuid", lambda: os.stat(root).st_uid + 1)
    parsed: list[str] = []
    real = lockcache._parse_bytes
    monkeypatch.setattr(lockcache, "_parse_bytes", lambda data, source, known=None: parsed.append(source) or real(data, source, known))
    read_lock(root)
    assert parsed == [str(lock_path(root))]


def test_a_cache_someone_else_could_write_is_not_trusted(root: Path, cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Made 0600 whatever the umask (a group-shared root widens it); one a group member could
    # rewrite in place, its owner kept, could say what the lock holds.
    old = os.umask(0o002)
    try:
        write_lock(root, lock_with(record(1)))
    finally:
        os.umask(old)
    files = [f for f in cached.rglob("*") if f.is_file()]
    assert files and all(f.stat().st_mode & 0o777 == 0o600 for f in files), [oct(f.stat().st_mode) for f in files]
    forget()
    for f in files:
        f.chmod(0o664)
    parsed: list[str] = []
    real = lockcache._parse_bytes
    monkeypatch.setattr(lockcache, "_parse_bytes", lambda data, source, known=None: parsed.append(source) or real(data, source, known))
    read_lock(root)
    assert parsed == [str(lock_path(root))]


@given(_locks)
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_recorded_outputs_read_undecoded_give_the_records_outputs(lock: Lock) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_lock(Path(tmp), lock)
        lockcache._snapshots.clear()  # read as a new process would: every session undecoded
        read = read_lock(Path(tmp))
        for key, rec in lock.sessions.items():
            assert read.sessions.blob(key) is not None and key not in read.sessions._origin  # undecoded
            expected = (rec.address.path, [(o.path, o.size, o.sha256) for o in rec.outputs])
            assert read.recorded_outputs(key) == expected
            decoded = read.sessions[key]
            assert read.recorded_outputs(key) == (decoded.address.path, [(o.path, o.size, o.sha256) for o in decoded.outputs])
        for key, rec in lock.sessions.items():  # records, not documents: read from the records
            assert lock.recorded_outputs(key) == (rec.address.path, [(o.path, o.size, o.sha256) for o in rec.outputs])


_LINE_BITS = st.sampled_from([b"[sessions.", b"[[sessions.", b"a", b"X_1-", b"]", b"\n", b"\r", b" ", b".", b"="])


@given(st.lists(_LINE_BITS, max_size=40).map(b"".join))
@settings(max_examples=300, deadline=None)
def test_session_starts_are_the_lines_a_multiline_pattern_finds(data: bytes) -> None:
    lines = re.compile(rb"^\[sessions\.([A-Za-z0-9_-]+)\]$", re.MULTILINE)
    expected = [(m.start(), m.group(1).decode()) for m in lines.finditer(data)]
    assert list(lockparse._session_starts(data)) == expected


# --- many fragments: forked children parse a part each ---------------------------------------


@pytest.fixture
def forking(monkeypatch: pytest.MonkeyPatch, forks: Forks) -> Forks:
    """Every fragment of a lock counts as many (a part per core from two fragments on), three
    cores. The children forked, with the size of the part each got."""
    monkeypatch.setattr(lockparse, "FORK_MIN_FRAGMENTS", 1)
    monkeypatch.setattr(forked, "cores", lambda: 3)
    return forks


@pytest.mark.skipif(lockparse.toml_rs is None or not hasattr(os, "fork"), reason="needs toml-rs and fork")
def test_a_cold_read_of_many_sessions_gives_parts_to_children(root: Path, forking: Forks) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 8))))
    forget()
    assert read_lock(root) == written
    assert forking.sizes == [2, 2]  # 7 fragments: 3 here, 2 and 2 in two children


@pytest.mark.skipif(lockparse.toml_rs is None or not hasattr(os, "fork"), reason="needs toml-rs and fork")
def test_an_invalid_session_in_a_childs_part_is_reported_as_without_children(root: Path, forking: Forks) -> None:
    write_lock(root, lock_with(*(record(n) for n in range(1, 8))))
    lock_path(root).write_text(lock_path(root).read_text().replace('bids_session = "MR1"', 'bids_session = "M/R1"', 7)
                               .replace('bids_session = "M/R1"', 'bids_session = "MR1"', 6))  # the 7th only
    forget()
    with mock.patch.object(forked, "may_fork", lambda: False), pytest.raises(LockfileError) as alone:
        read_lock(root)
    assert forking.sizes == []
    forget()
    with pytest.raises(LockfileError) as parted:
        read_lock(root)
    assert forking.sizes == [2, 2]
    assert "XNAT_E00007/bids_session" in str(alone.value) and str(parted.value) == str(alone.value)


@pytest.mark.skipif(lockparse.toml_rs is None or not hasattr(os, "fork"), reason="needs toml-rs and fork")
def test_a_child_that_dies_costs_time_not_sessions(root: Path, forking: Forks, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_lock(root, lock_with(*(record(n) for n in range(1, 8))))
    parent, real = os.getpid(), lockparse._fragment_blobs
    monkeypatch.setattr(lockparse, "_fragment_blobs",
                        lambda data, todo: os._exit(3) if os.getpid() != parent else real(data, todo))
    forget()
    assert read_lock(root) == written and forking.sizes == [2, 2]


@given(_locks)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@pytest.mark.skipif(lockparse.toml_rs is None or not hasattr(os, "fork"), reason="needs toml-rs and fork")
def test_parts_parsed_by_children_make_what_one_process_makes(lock: Lock) -> None:
    data = dumps_lock(lock).encode()
    alone = lockparse._parse_bytes(data, "lock")
    with mock.patch.object(lockparse, "FORK_MIN_FRAGMENTS", 1), mock.patch.object(forked, "may_fork", lambda: True), \
            mock.patch.object(forked, "cores", lambda: 3):
        assert lockparse._parse_bytes(data, "lock") == alone


def test_a_session_that_is_not_unicode_text_is_refused_by_name(root: Path) -> None:
    bad = replace(record(2), outputs=(OutputRecord("sub-SUBJ02/ses-MR1/anat/\udcff.nii.gz", 1, sha("x"), 1),))
    with pytest.raises(LockfileError, match=r"sessions/XNAT_E00002: '\\udcff' is not Unicode text"):
        write_lock(root, lock_with(record(1), bad))
    assert not lock_path(root).exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_many_sessions_are_serialized_in_parts_by_children(
    root: Path, forking: Forks, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_module, "FORK_MIN_SERIALIZED", 1)
    lock = lock_with(*(record(n) for n in range(1, 8)))
    written = write_lock(root, lock)
    assert forking.sizes == [2, 2]  # 7 sessions: 3 here, 2 and 2 in two children
    assert lock_path(root).read_text() == dumps_lock(written)
    bad = replace(record(7), outputs=(OutputRecord("sub-SUBJ07/ses-MR1/anat/\udcff.nii.gz", 1, sha("x"), 1),))
    other = root / "other"
    other.mkdir()
    with pytest.raises(LockfileError, match=r"sessions/XNAT_E00007: '\\udcff' is not Unicode text"):
        write_lock(other, lock.with_session(bad))  # in the last child's part
    assert forking.sizes == [2, 2, 2, 2] and not lock_path(other).exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_an_invalid_session_in_a_childs_part_is_refused_as_in_one_process(
    root: Path, forking: Forks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Children check their sessions yes/no; the words come from checking the whole lock, and a
    schema problem comes before a text that is not Unicode, wherever each is."""
    monkeypatch.setattr(lock_module, "FORK_MIN_SERIALIZED", 1)
    not_text = replace(record(2), outputs=(OutputRecord("sub-SUBJ02/ses-MR1/anat/\udcff.nii.gz", 1, sha("x"), 1),))
    bad_label = replace(record(6), bids_session="M/R1")
    lock = lock_with(*(record(n) for n in range(1, 8))).with_session(not_text).with_session(bad_label)
    with mock.patch.object(forked, "may_fork", lambda: False), pytest.raises(LockfileError) as alone:
        write_lock(root, lock)
    assert forking.sizes == []
    with pytest.raises(LockfileError) as parted:
        write_lock(root, lock)
    assert forking.sizes == [2, 2]  # XNAT_E00006 in the second child's part
    assert "sessions/XNAT_E00006/bids_session" in str(parted.value) and str(parted.value) == str(alone.value)
    assert "Unicode" not in str(parted.value) and not lock_path(root).exists()


_FORKS_COUNTED = """
import os, sys
from pathlib import Path
forks = []
real = os.fork
os.fork = lambda: forks.append(1) or real()
from reconcile.lock import read_lock
lock = read_lock(Path(sys.argv[1]))
print(len(forks), len(lock.sessions))
"""


@pytest.mark.skipif(lockparse.toml_rs is None or not hasattr(os, "fork"), reason="needs toml-rs and fork")
def test_a_fresh_process_reads_a_large_lock_in_parts_by_itself(root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing patched: the process's own cores and threads, the real part size. A switch left
    off (never forking, one core, a part size too large) shows here."""
    if forked.cores() < 2:
        pytest.skip("one core: nothing to fork for")
    written = write_lock(root, lock_with(*(record(i, outputs=1, scans=()) for i in range(1, 2001))))
    env = {**os.environ, "XNAT2BIDS_CACHE_DIR": str(tmp_path_factory.mktemp("fresh-cache"))}
    out = subprocess.run([sys.executable, "-c", _FORKS_COUNTED, str(root)], capture_output=True, text=True,
                         check=True, env=env)
    assert out.stdout.split() == ["1", str(len(written.sessions))]


def test_differing_sessions_names_only_the_sessions_recorded_otherwise(tmp_path: Path) -> None:
    """What `--git-commit` commits: the sessions whose record differs between a commit's lock and
    the lock on disk, old and new; one whose text alone differs (hand-formatted) is the same."""
    a, b, c, d = record(1), record(2), record(3), record(4)
    write_lock(tmp_path, Lock.new().with_session(a).with_session(b).with_session(c))
    committed = lock_path(tmp_path).read_bytes()
    b2 = replace(b, date="2024-02-02")
    write_lock(tmp_path, read_lock(tmp_path).with_session(b2).without_session(c.experiment_id).with_session(d))
    pairs = lock_module.differing_sessions(tmp_path, committed, "HEAD:.xnat2bids.lock")
    assert [(o and o.experiment_id, n and n.experiment_id) for o, n in pairs] == [
        ("XNAT_E00002", "XNAT_E00002"), ("XNAT_E00003", None), (None, "XNAT_E00004")]
    assert pairs[0][0].date == "2024-01-10" and pairs[0][1].date == "2024-02-02"
    # The same records written in another form (a hand edit that changed no value): no difference.
    text = lock_path(tmp_path).read_text()
    reformatted = text.replace('date = "2024-01-10"', 'date   =   "2024-01-10"')
    assert reformatted != text
    assert lock_module.differing_sessions(tmp_path, reformatted.encode(), "HEAD:.xnat2bids.lock") == []
    with pytest.raises(LockfileError):
        lock_module.differing_sessions(tmp_path, b"not = [toml", "HEAD:.xnat2bids.lock")
