"""The emulator as the real, unpatched xnatpy 0.8.1 sees it: login, navigation, dates, downloads."""

from __future__ import annotations

import datetime as dt
import hashlib
import zipfile
from pathlib import Path

import pytest
import xnat
from xnat.exceptions import XNATLoginFailedError, XNATResponseError, XNATValueError

from reconcile.emulator import Fault

T1_FILES = {"1.dcm": b"DICM-t1-slice-1" * 100, "2.dcm": b"DICM-t1-slice-2" * 120}
BOLD_FILES = {"1.dcm": b"DICM-bold-vol-1" * 90}


class SteppingClock:
    """A settable test clock; the archive reads it whenever it stamps a row."""

    def __init__(self, start: dt.datetime):
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> SteppingClock:
    return SteppingClock(dt.datetime(2024, 3, 1, 12, 0, 0, 352000))


@pytest.fixture
def session(emulator, clock):
    """One MR session with a T1w scan (2 files) and a BOLD scan (1 file)."""
    archive = emulator.archive
    archive.clock = clock
    exp = archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR1", date="2024-01-10", time="14:22:05")
    archive.add_scan(exp.id, "1", type="anat-T1w", series_description="T1w MPRAGE", files=T1_FILES)
    archive.add_scan(exp.id, "2", type="func-bold_task-rest", files=BOLD_FILES)
    return exp


def connect(emulator, **kwargs):
    kwargs.setdefault("user", emulator.user)
    kwargs.setdefault("password", emulator.password)
    return xnat.connect(emulator.url, loglevel="ERROR", **kwargs)


def test_password_login_follows_the_documented_request_sequence(emulator):
    with connect(emulator) as conn:
        assert conn.logged_in_user == "admin"
        assert conn.xnat_version == "1.8.10"
    seen = [(method, path) for method, path, _ in emulator.app.requests]
    assert seen[:6] == [
        ("GET", "/"),
        ("PUT", "/data/services/auth"),
        ("GET", "/data/auth"),
        ("GET", "/data/JSESSION"),
        ("GET", "/data/version"),
        ("GET", "/xapi/siteConfig/buildInfo"),
    ]
    assert ("GET", "/xapi/schemas/xnat") in seen
    assert seen[-1] == ("DELETE", "/data/JSESSION")


def test_bad_password_raises_login_failed(emulator):
    with pytest.raises(XNATLoginFailedError):
        xnat.connect(emulator.url, user="admin", password="wrong", loglevel="CRITICAL")


def test_token_login_uses_basic_auth_on_root_and_no_password_login(emulator, session):
    with connect(emulator) as conn:
        token = conn.services.issue_token()
    emulator.app.reset_requests()

    with connect(emulator, user=token.alias, password=token.secret) as conn:
        assert conn.logged_in_user == "admin"
        assert "SUBJ01_MR1" in conn.projects["PROJ"].experiments
    paths = [path for _, path, _ in emulator.app.requests]
    assert "/data/services/auth" not in paths


def test_invalidated_token_cannot_log_in(emulator):
    with connect(emulator) as conn:
        token = conn.services.issue_token()
        conn.get(f"/data/services/tokens/invalidate/{token.alias}")
    with pytest.raises(XNATLoginFailedError):
        xnat.connect(emulator.url, user=token.alias, password=token.secret, loglevel="CRITICAL")


def test_navigation_from_project_to_files(emulator, session):
    with connect(emulator) as conn:
        project = conn.projects["PROJ"]
        assert project.name == "Test project"
        assert list(project.subjects.keys()) == ["XNAT_S00001"]
        assert project.subjects["SUBJ01"].label == "SUBJ01"

        experiment = project.experiments["SUBJ01_MR1"]
        assert experiment.id == session.id
        assert experiment.__xsi_type__ == "xnat:mrSessionData"
        assert experiment is project.experiments[session.id]

        scans = experiment.scans
        assert sorted(scans.keys()) == ["1", "2"]
        assert scans["anat-T1w"].id == "1"  # scans are also keyed by type
        assert scans["1"].series_description == "T1w MPRAGE"

        resource = scans["1"].resources["DICOM"]
        assert resource.file_count == 2
        assert resource.file_size == sum(len(b) for b in T1_FILES.values())
        files = resource.files
        assert sorted(files.keys()) == ["1.dcm", "2.dcm"]
        assert files["1.dcm"].digest == hashlib.md5(T1_FILES["1.dcm"]).hexdigest()
        assert files["2.dcm"].file_size == str(len(T1_FILES["2.dcm"]))


def test_subject_listing_reaches_its_experiments(emulator, session):
    with connect(emulator) as conn:
        subject = conn.projects["PROJ"].subjects["SUBJ01"]
        assert list(subject.experiments.keys()) == [session.id]


def test_experiment_fields_and_xnatpy_insert_date(emulator, session):
    with connect(emulator) as conn:
        experiment = conn.projects["PROJ"].experiments[session.id]
        assert str(experiment.date) == "2024-01-10"
        assert experiment.subject_id == session.subject_id
        assert experiment.label == "SUBJ01_MR1"
        # xnatpy's insert_date is meta.start_date: the row's last-modified, to the second, in UTC.
        assert experiment.insert_date == dt.datetime(2024, 3, 1, 12, 0, 0, tzinfo=dt.timezone.utc)


def test_tabulate_gives_true_insert_date_and_last_modified(emulator, session, clock):
    clock.now = dt.datetime(2024, 3, 5, 8, 30, 0, 500000)
    emulator.archive.set_fields(session.id, note="touched")
    with connect(emulator) as conn:
        rows = conn.projects["PROJ"].experiments.tabulate(
            columns=("ID", "label", "date", "insert_date", "last_modified", "subject_ID")
        )
    assert [row._asdict() for row in rows] == [
        {
            "ID": session.id,
            "label": "SUBJ01_MR1",
            "date": "2024-01-10",
            "insert_date": "2024-03-01 12:00:00.352",
            "last_modified": "2024-03-05 08:30:00.5",
            "subject_ID": session.subject_id,
        }
    ]


def test_redating_via_rest_put_moves_date_and_last_modified_but_not_insert_date(emulator, session, clock):
    clock.now = dt.datetime(2024, 4, 2, 9, 0, 0)
    with connect(emulator) as conn:
        uri = f"/data/projects/PROJ/subjects/{session.subject_id}/experiments/{session.id}"
        conn.put(uri, query={"xnat:mrSessionData/date": "2024-02-01"})
        conn.clearcache()
        experiment = conn.projects["PROJ"].experiments[session.id]
        assert str(experiment.date) == "2024-02-01"
        # The pitfall the tool must avoid: xnatpy's "insert_date" moves with a re-save.
        assert experiment.insert_date == dt.datetime(2024, 4, 2, 9, 0, 0, tzinfo=dt.timezone.utc)
        (row,) = conn.projects["PROJ"].experiments.tabulate(columns=("ID", "insert_date", "last_modified"))
    assert row.insert_date == "2024-03-01 12:00:00.352"
    assert row.last_modified == "2024-04-02 09:00:00.0"


def test_file_upload_keeps_session_timestamps(emulator, session, clock, tmp_path):
    before = (session.insert_date, session.last_modified)
    clock.now = dt.datetime(2024, 5, 1)
    local = tmp_path / "3.dcm"
    local.write_bytes(b"DICM-new-slice")
    with connect(emulator) as conn:
        resource = conn.projects["PROJ"].experiments[session.id].scans["1"].resources["DICOM"]
        resource.upload(local, "3.dcm", verbose=False)
        assert "3.dcm" in resource.files
    entry = emulator.archive.get_scan(session.id, "1").resources["DICOM"].files["3.dcm"]
    assert entry.read() == b"DICM-new-slice"
    assert (session.insert_date, session.last_modified) == before


def test_file_download_returns_archived_bytes(emulator, session, tmp_path):
    target = tmp_path / "1.dcm"
    with connect(emulator) as conn:
        files = conn.projects["PROJ"].experiments[session.id].scans["1"].resources["DICOM"].files
        files["1.dcm"].download(target, verbose=False)
    assert target.read_bytes() == T1_FILES["1.dcm"]


def test_xnatpy_rejects_a_corrupted_download_by_digest(emulator, session, tmp_path):
    with connect(emulator) as conn:
        files = conn.projects["PROJ"].experiments[session.id].scans["1"].resources["DICOM"].files
        emulator.app.faults.add(Fault(route=r"/files/1\.dcm$", kind="corrupt"))
        with pytest.raises(XNATValueError, match="digest"):
            files["1.dcm"].download(tmp_path / "1.dcm", verbose=False)


def _zip_contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist()}


def test_scan_zip_download_has_xnat_layout(emulator, session, tmp_path):
    target = tmp_path / "scan.zip"
    with connect(emulator) as conn:
        conn.projects["PROJ"].experiments[session.id].scans["1"].download(target, verbose=False)
    assert _zip_contents(target) == {
        f"SUBJ01_MR1/scans/1-anat_T1w/resources/DICOM/files/{name}": data for name, data in T1_FILES.items()
    }


def test_session_zip_download_has_every_scan(emulator, session, tmp_path):
    target = tmp_path / "session.zip"
    with connect(emulator) as conn:
        conn.projects["PROJ"].experiments[session.id].download(target, verbose=False)
    expected = {f"SUBJ01_MR1/scans/1-anat_T1w/resources/DICOM/files/{n}": d for n, d in T1_FILES.items()}
    expected |= {f"SUBJ01_MR1/scans/2-func_bold_task_rest/resources/DICOM/files/{n}": d for n, d in BOLD_FILES.items()}
    assert _zip_contents(target) == expected


def test_scan_download_dir_extracts_files(emulator, session, tmp_path):
    with connect(emulator) as conn:
        conn.projects["PROJ"].experiments[session.id].scans["2"].download_dir(tmp_path, verbose=False)
    extracted = tmp_path / "SUBJ01_MR1/scans/2-func_bold_task_rest/resources/DICOM/files/1.dcm"
    assert extracted.read_bytes() == BOLD_FILES["1.dcm"]


def test_large_synthetic_file_streams_with_a_matching_digest(emulator, tmp_path):
    (exp,) = emulator.archive.add_synthetic_sessions("PROJ", n=1, scans_per_session=1, files_per_scan=1,
                                                     file_size=6 * 1024 * 1024 + 17)  # fmt: skip
    target = tmp_path / "big.dcm"
    with connect(emulator) as conn:
        files = conn.projects["PROJ"].experiments[exp.id].scans["1"].resources["DICOM"].files
        files["1.dcm"].download(target, verbose=False)
    entry = emulator.archive.get_scan(exp.id, "1").resources["DICOM"].files["1.dcm"]
    assert target.stat().st_size == entry.size
    assert hashlib.md5(target.read_bytes()).hexdigest() == entry.md5


def test_unknown_project_is_a_key_error(emulator):
    with connect(emulator) as conn:
        with pytest.raises(KeyError):
            conn.projects["NOPE"]


def test_restricted_user_sees_only_its_projects(emulator, session):
    emulator.archive.add_project("OTHER")
    emulator.archive.add_session("OTHER", "S9", "S9_MR1")
    emulator.archive.add_user("bob", "pw", projects={"PROJ"})
    with connect(emulator, user="bob", password="pw") as conn:
        assert list(conn.projects.keys()) == ["PROJ"]
        with pytest.raises(XNATResponseError, match="status 403"):
            conn.get("/data/projects/OTHER/experiments", format="json")


def test_created_subject_and_session_appear_in_the_archive(emulator):
    with connect(emulator) as conn:
        conn.put("/data/projects/PROJ/subjects/NEW01")
        conn.put(
            "/data/projects/PROJ/subjects/NEW01/experiments/NEW01_MR1",
            query={"xsiType": "xnat:mrSessionData", "date": "2024-06-01"},
        )
        conn.clearcache()
        experiment = conn.projects["PROJ"].experiments["NEW01_MR1"]
        assert str(experiment.date) == "2024-06-01"
    (created,) = emulator.archive.sessions("PROJ")
    assert (created.label, created.date, created.insert_user) == ("NEW01_MR1", "2024-06-01", "admin")


def test_deleting_a_session_removes_it(emulator, session):
    with connect(emulator) as conn:
        conn.delete(f"/data/projects/PROJ/subjects/{session.subject_id}/experiments/{session.id}")
    assert emulator.archive.sessions("PROJ") == []


def test_a_session_shared_into_another_project_is_listed_there_under_its_label_there(emulator, session, tmp_path):
    # XNAT's share (PUT .../experiments/E/projects/Q?label=L): Q's listing gives the row the label
    # it has there, but keeps its primary project and its subject's own label (ProjSubExptList
    # replaces the label column only); the session's document names the share, and its zips keep
    # the archive folder's name, the primary label.
    emulator.archive.add_project("OTHER")
    emulator.archive.share_subject(session.subject_id, "OTHER", "OTH01")
    import requests

    shared = requests.put(f"{emulator.url}/data/experiments/{session.id}/projects/OTHER", params={"label": "OTH_MR1"},
                          auth=(emulator.user, emulator.password), timeout=10)
    assert shared.status_code == 200, shared.text
    with connect(emulator) as conn:
        listed = conn.projects["OTHER"].experiments[session.id]
        assert listed.label == "OTH_MR1"
        rows = conn.get_json("/data/projects/OTHER/experiments", query={"columns": "ID,label,project,subject_label"})
        assert [(r["ID"], r["label"], r["project"], r["subject_label"]) for r in rows["ResultSet"]["Result"]] == [
            (session.id, "OTH_MR1", "PROJ", "SUBJ01")]
        own = conn.get_json("/data/projects/PROJ/experiments", query={"columns": "ID,label"})["ResultSet"]["Result"]
        assert [(r["ID"], r["label"]) for r in own] == [(session.id, "SUBJ01_MR1")]  # its own project's unchanged
        doc = conn.get_json(f"/data/experiments/{session.id}", query={"format": "json"})
        [share_child] = [c for c in doc["items"][0]["children"] if c["field"] == "sharing/share"]
        assert [i["data_fields"] for i in share_child["items"]] == [{"project": "OTHER", "label": "OTH_MR1"}]
        target = tmp_path / "scan.zip"
        conn.projects["OTHER"].experiments[session.id].scans["1"].download(target, verbose=False)
    assert set(_zip_contents(target)) == {f"SUBJ01_MR1/scans/1-anat_T1w/resources/DICOM/files/{n}" for n in T1_FILES}
    again = requests.put(f"{emulator.url}/data/experiments/{session.id}/projects/OTHER", params={"label": "SUBJ01_MR1"},
                         auth=(emulator.user, emulator.password), timeout=10)
    assert again.status_code == 200  # sharing again under another label: XNAT keeps one share per project
    assert emulator.archive.find_session("OTHER", "OTH_MR1") is None
    assert emulator.archive.find_session("OTHER", "SUBJ01_MR1") is emulator.archive.get_session(session.id)
