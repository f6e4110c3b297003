"""The emulator as the real, unpatched pyxnat 1.6.4 sees it (CSV listings, Basic auth on every call)."""

from __future__ import annotations

import datetime as dt
import zipfile

import pytest
from lxml import etree
from pyxnat import Interface
from pyxnat.core.errors import DatabaseError

T1_FILES = {"1.dcm": b"DICM-t1-a" * 50, "sub/2.dcm": b"DICM-t1-b" * 70}
BOLD_FILES = {"1.dcm": b"DICM-bold" * 40}
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"


@pytest.fixture
def session(emulator):
    archive = emulator.archive
    archive.clock = lambda: dt.datetime(2024, 3, 1, 12, 0, 0)
    exp = archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR1", date="2024-01-10", time="14:22:05")
    archive.add_scan(exp.id, "1", type="anat-T1w", files=T1_FILES)
    archive.add_scan(exp.id, "2", type="func-bold", files=BOLD_FILES)
    return exp


@pytest.fixture
def interface(emulator):
    intf = Interface(server=emulator.url, user=emulator.user, password=emulator.password)
    yield intf
    intf.disconnect()


def test_listing_projects_subjects_and_experiments(interface, session):
    assert interface.select.projects().get() == ["PROJ"]
    project = interface.select.project("PROJ")
    assert project.exists()
    assert project.subjects().get() == [session.subject_id]
    assert project.experiments().get() == [session.id]


def test_experiment_is_rerooted_under_its_subject_with_label_and_date(interface, session):
    (experiment,) = list(interface.select.project("PROJ").experiments())
    assert experiment._uri == f"/data/projects/PROJ/subjects/{session.subject_id}/experiments/{session.id}"
    assert experiment.label() == "SUBJ01_MR1"
    assert experiment.attrs.get("date") == "2024-01-10"
    assert experiment.attrs.get("xnat:mrSessionData/insert_date") == "2024-03-01 12:00:00.0"


def test_request_sequence_starts_with_jsession_and_uses_csv(emulator, interface, session):
    interface.select.project("PROJ").experiments().get()
    requests_seen = emulator.app.requests
    assert requests_seen[0][:2] == ("GET", "/data/JSESSION")
    assert all("format=json" not in query for _, _, query in requests_seen)
    assert ("GET", "/data/experiments") in [(m, p) for m, p, _ in requests_seen]


def test_scans_resources_and_file_get(interface, session, tmp_path):
    experiment = interface.select.project("PROJ").subject("SUBJ01").experiment("SUBJ01_MR1")
    assert experiment.scans().get() == ["1", "2"]
    scan = experiment.scan("1")
    assert scan.resources().get() == ["1"]
    assert sorted(scan.resource("DICOM").files().get()) == ["1.dcm", "2.dcm"]  # the Name column
    for relpath, data in T1_FILES.items():
        target = tmp_path / relpath.replace("/", "_")
        scan.resource("DICOM").file(relpath).get(str(target))
        assert target.read_bytes() == data


def test_scans_download_writes_the_session_zip(interface, session, tmp_path):
    (experiment,) = list(interface.select.project("PROJ").experiments())
    experiment.scans().download(str(tmp_path), type="ALL", extract=False)
    zip_path = tmp_path / f"PROJ_{session.subject_id}_{session.id}_scans_ALL.zip"
    with zipfile.ZipFile(zip_path) as archive:
        contents = {name: archive.read(name) for name in archive.namelist()}
    expected = {f"SUBJ01_MR1/scans/1-anat_T1w/resources/DICOM/files/{n}": d for n, d in T1_FILES.items()}
    expected |= {f"SUBJ01_MR1/scans/2-func_bold/resources/DICOM/files/{n}": d for n, d in BOLD_FILES.items()}
    assert contents == expected


def test_scans_download_by_type_selects_scans(interface, session, tmp_path):
    (experiment,) = list(interface.select.project("PROJ").experiments())
    experiment.scans().download(str(tmp_path), type="func-bold", extract=False)
    (zip_path,) = tmp_path.glob("*.zip")
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == ["SUBJ01_MR1/scans/2-func_bold/resources/DICOM/files/1.dcm"]


def test_resource_get_extracts_files(interface, session, tmp_path):
    resource = interface.select.project("PROJ").subject("SUBJ01").experiment("SUBJ01_MR1").scan("1").resource("DICOM")
    paths = resource.get(str(tmp_path), extract=True)
    assert sorted(paths) == sorted(str(tmp_path / "DICOM" / name) for name in T1_FILES)
    for name, data in T1_FILES.items():
        assert (tmp_path / "DICOM" / name).read_bytes() == data


def test_attrs_set_redates_the_session(interface, session, emulator):
    emulator.archive.clock = lambda: dt.datetime(2024, 4, 2, 9, 0, 0)
    (experiment,) = list(interface.select.project("PROJ").experiments())
    experiment.attrs.set("xnat:mrSessionData/date", "2024-02-01")
    assert (session.date, session.insert_date) == ("2024-02-01", dt.datetime(2024, 3, 1, 12, 0, 0))
    assert session.last_modified == dt.datetime(2024, 4, 2, 9, 0, 0)
    assert experiment.attrs.get("date") == "2024-02-01"


def test_bad_password_falls_back_to_rest_then_raises_database_error(emulator):
    intf = Interface(server=emulator.url, user="admin", password="wrong")
    assert intf.select.projects().get() == []  # pyxnat swallows listing errors
    with pytest.raises(DatabaseError, match="401"):
        intf.select.project("PROJ").experiments().get()
    assert emulator.app.requests[0][:2] == ("GET", "/data/JSESSION")
    assert all(path.startswith("/REST/") for _, path, _ in emulator.app.requests[1:])


def test_project_without_access_lists_nothing(emulator, session):
    emulator.archive.add_project("OTHER")
    emulator.archive.add_session("OTHER", "S9", "S9_MR1")
    emulator.archive.add_user("bob", "pw", projects={"PROJ"})
    intf = Interface(server=emulator.url, user="bob", password="pw")
    try:
        assert intf.select.projects().get() == ["PROJ"]
        assert intf.select.project("OTHER").experiments().get() == []
        assert intf.select.project("PROJ").experiments().get() == [session.id]
    finally:
        intf.disconnect()


def test_get_and_xpath_read_the_xml_documents(interface, session, emulator):
    experiment = interface.select.project("PROJ").subject("SUBJ01").experiment("SUBJ01_MR1")
    root = etree.fromstring(experiment.get())
    assert root.tag == "{http://nrg.wustl.edu/xnat}MRSession"
    assert (root.get("ID"), root.get("project"), root.get("label")) == (session.id, "PROJ", "SUBJ01_MR1")
    assert experiment.xpath("xnat:date/text()") == ["2024-01-10"]
    assert experiment.xpath("xnat:subject_ID/text()") == [session.subject_id]
    scans = experiment.xpath("xnat:scans/xnat:scan")
    assert [(s.get("ID"), s.get("type"), s.get(XSI_TYPE)) for s in scans] == [
        ("1", "anat-T1w", "xnat:mrScanData"), ("2", "func-bold", "xnat:mrScanData")]
    (t1_dicom,) = experiment.xpath("xnat:scans/xnat:scan[@ID='1']/xnat:file")
    assert (t1_dicom.get("label"), t1_dicom.get("file_count"), t1_dicom.get(XSI_TYPE)) == (
        "DICOM", "2", "xnat:resourceCatalog")
    assert int(t1_dicom.get("file_size")) == sum(map(len, T1_FILES.values()))
    scan = experiment.scan("2")
    assert scan.xpath("/xnat:MRScan/@type") == ["func-bold"]
    assert interface.select.project("PROJ").xpath("/xnat:Project/@ID") == ["PROJ"]
    # A re-dated session's document says the new date.
    experiment.attrs.set("xnat:mrSessionData/date", "2024-02-01")
    assert experiment.xpath("xnat:date/text()") == ["2024-02-01"]


def test_the_xml_documents_are_valid_by_the_emulators_schema(emulator, session):
    from requests import Session

    from reconcile.emulator.xmldoc import xsd_text

    schema = etree.XMLSchema(etree.fromstring(xsd_text().encode()))
    http = Session()
    http.auth = (emulator.user, emulator.password)
    base = f"{emulator.url}/data/projects/PROJ/subjects/{session.subject_id}"
    for path in ("", f"/experiments/{session.id}", f"/experiments/{session.id}/scans/1",
                 f"/experiments/{session.id}/scans/1/resources/DICOM"):
        response = http.get(base + path, params={"format": "xml"}, timeout=10)
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/xml"), path
        schema.assertValid(etree.fromstring(response.content))
    response = http.get(f"{emulator.url}/data/projects/PROJ", params={"format": "xml"}, timeout=10)
    schema.assertValid(etree.fromstring(response.content))
