"""The emulator's REST surface with plain `requests`: shapes, formats, filters, errors, auth flows."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import re
import tarfile
import zipfile
from xml.etree import ElementTree

import pytest
import requests

FILES = {"1.dcm": b"DICM-one" * 10, "2.dcm": b"DICM-two" * 20}


@pytest.fixture
def world(emulator):
    """Two sessions in PROJ (one re-dated later), one in OTHER; a restricted user."""
    archive = emulator.archive
    archive.clock = lambda: dt.datetime(2024, 3, 1, 12, 0, 0, 352000)
    first = archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR1", date="2024-01-10", time="14:22:05")
    archive.add_scan(first.id, "1", type="anat-T1w", series_description="T1 MPRAGE", files=FILES)
    archive.add_scan(first.id, "2", type="func-bold", files={"1.dcm": b"bold"})
    second = archive.add_session("PROJ", "SUBJ02", "SUBJ02_MR1", date="2024-06-30", xsi_type="xnat:ctSessionData")
    archive.add_project("OTHER")
    archive.add_session("OTHER", "X1", "X1_MR1", date="2023-05-05")
    archive.add_user("bob", "pw", projects={"PROJ"})
    return first, second


@pytest.fixture
def http(emulator) -> requests.Session:
    client = requests.Session()
    client.auth = (emulator.user, emulator.password)
    return client


def result(response: requests.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    return response.json()["ResultSet"]["Result"]


def test_project_listing_defaults_and_uri(emulator, http, world):
    rows = result(http.get(f"{emulator.url}/data/projects?format=json"))
    assert [r["ID"] for r in rows] == ["PROJ", "OTHER"]
    assert list(rows[0]) == ["ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname", "URI"]
    assert rows[0]["URI"] == "/data/projects/PROJ"


@pytest.mark.parametrize("prefix", ["/data", "/data/archive", "/REST"])
def test_all_three_prefixes_serve_the_same_listing(emulator, http, world, prefix):
    rows = result(http.get(f"{emulator.url}{prefix}/projects/PROJ/experiments?format=json"))
    assert [r["label"] for r in rows] == ["SUBJ01_MR1", "SUBJ02_MR1"]


def test_experiment_listing_row_shape_and_string_values(emulator, http, world):
    first, _ = world
    body = http.get(f"{emulator.url}/data/projects/PROJ/experiments?format=json").json()
    assert body["ResultSet"]["totalRecords"] == "2"
    row = body["ResultSet"]["Result"][0]
    assert row == {
        "ID": first.id,
        "project": "PROJ",
        "date": "2024-01-10",
        "xsiType": "xnat:mrSessionData",
        "label": "SUBJ01_MR1",
        "insert_date": "2024-03-01 12:00:00.352",
        "xnat:subjectassessordata/id": first.id,
        "URI": f"/data/experiments/{first.id}",
    }
    # The root key comes with the default columns of a project's listing only.
    assert "xnat:subjectassessordata/id" not in result(http.get(f"{emulator.url}/data/experiments?format=json"))[0]
    assert "xnat:subjectassessordata/id" not in result(
        http.get(f"{emulator.url}/data/projects/PROJ/experiments?format=json&columns=ID,label"))[0]


def test_columns_accept_xpaths_drop_unknown_names_and_append_uri(emulator, http, world):
    url = (
        f"{emulator.url}/data/projects/PROJ/experiments?format=json"
        "&columns=ID,xnat:subjectAssessorData/subject_id,NOPE,last_modified,modality"
    )
    rows = result(http.get(url))
    assert list(rows[0]) == ["ID", "subject_ID", "last_modified", "modality", "URI"]
    assert [r["modality"] for r in rows] == ["MR", "CT"]


def test_filters_with_wildcards_comma_or_and_date_ranges(emulator, http, world):
    base = f"{emulator.url}/data/projects/PROJ/experiments?format=json&columns=label"
    assert [r["label"] for r in result(http.get(base + "&label=*02*"))] == ["SUBJ02_MR1"]
    assert len(result(http.get(base + "&label=SUBJ01_MR1,SUBJ02_MR1"))) == 2
    assert [r["label"] for r in result(http.get(base + "&date=2024-01-01-2024-03-01"))] == ["SUBJ01_MR1"]
    assert [r["label"] for r in result(http.get(base + "&xsiType=xnat:ctSessionData"))] == ["SUBJ02_MR1"]
    assert [r["label"] for r in result(http.get(base + "&XSITYPE=xnat:ctSessionData"))] == ["SUBJ02_MR1"]


def test_site_wide_experiments_filter_by_base_type_for_pyxnat(emulator, http, world):
    first, _ = world
    url = (
        f"{emulator.url}/data/experiments?xsiType=xnat:subjectAssessorData&ID={first.id}"
        "&columns=ID,project,xnat:subjectAssessorData/subject_id&format=csv"
    )
    response = http.get(url)
    assert response.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert rows == [{"ID": first.id, "project": "PROJ", "subject_ID": first.subject_id, "URI": f"/data/experiments/{first.id}"}]
    assert response.text.endswith("\n") and "\r" not in response.text


def test_site_wide_listing_hides_projects_the_user_cannot_read(emulator, world):
    rows = result(requests.get(f"{emulator.url}/data/experiments?format=json", auth=("bob", "pw")))
    assert {r["project"] for r in rows} == {"PROJ"}


def test_listing_without_format_is_an_html_table(emulator, http, world):
    response = http.get(f"{emulator.url}/data/projects")
    assert response.status_code == 200
    assert response.text.startswith("<html>") and "<table>" in response.text


def xml_rows(response: requests.Response) -> tuple[ElementTree.Element, list[dict[str, str]]]:
    """The `ResultSet` root of an XML listing and its rows as dicts keyed by column."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/xml")
    root = ElementTree.fromstring(response.content)
    columns = [c.text or "" for c in root.findall("results/columns/column")]
    rows = [dict(zip(columns, [c.text or "" for c in row.findall("cell")])) for row in root.findall("results/rows/row")]
    return root, rows


@pytest.mark.parametrize(
    "path",
    ["/projects", "/projects/PROJ/subjects", "/projects/PROJ/experiments", "/experiments",
     "/experiments/{E}/scans", "/experiments/{E}/scans/1/resources", "/experiments/{E}/scans/1/resources/DICOM/files"],
)  # fmt: skip
def test_xml_listings_have_the_rows_and_columns_of_json(emulator, http, world, path):
    first, _ = world
    url = f"{emulator.url}/data{path.format(E=first.id)}"
    root, rows = xml_rows(http.get(url + "?format=xml"))
    assert root.tag == "ResultSet" and root.find("results") is not None
    body = http.get(url + "?format=json").json()["ResultSet"]
    assert rows == body["Result"]
    assert root.get("totalRecords") == body.get("totalRecords") and root.get("title") == body.get("title")


def test_xml_listing_shape_as_xnat_writes_it(emulator, http, world):
    first, _ = world
    response = http.get(f"{emulator.url}/data/projects/PROJ/experiments?format=xml&columns=ID,label&label=SUBJ01_MR1")
    assert response.text == (
        '<ResultSet totalRecords="1"><results><columns><column>ID</column><column>label</column>'
        "<column>URI</column></columns>\n"
        f"<rows><row><cell>{first.id}</cell><cell>SUBJ01_MR1</cell><cell>/data/experiments/{first.id}</cell></row>\n"
        "</rows></results></ResultSet>"
    )
    files = http.get(f"{emulator.url}/data/experiments/{first.id}/scans/1/resources/DICOM/files?format=xml")
    root, _ = xml_rows(files)
    assert root.attrib == {"title": "Files"}
    assert [c.attrib for c in root.findall("results/columns/column") if c.text == "URI"] == [{"serverRoot": ""}]


def test_time_has_milliseconds_in_json_only(emulator, http, world):
    url = f"{emulator.url}/data/projects/PROJ/experiments?columns=label,time&label=SUBJ01_MR1"
    assert result(http.get(url + "&format=json"))[0]["time"] == "14:22:05.000"
    assert http.get(url + "&format=csv").text.splitlines()[1] == "SUBJ01_MR1,14:22:05,/data/experiments/XNAT_E00001"


def test_single_experiment_json_has_meta_with_last_modified_as_java_date(emulator, http, world):
    first, _ = world
    emulator.archive.clock = lambda: dt.datetime(2024, 4, 2, 9, 15, 0)
    emulator.archive.set_fields(first.id, note="re-saved")
    (item,) = http.get(f"{emulator.url}/data/experiments/{first.id}?format=json").json()["items"]
    assert item["meta"] == {"isHistory": False, "xsi:type": "xnat:mrSessionData", "start_date": "Tue Apr 02 09:15:00 UTC 2024"}
    assert item["data_fields"]["subject_ID"] == first.subject_id
    assert item["data_fields"]["date"] == "2024-01-10"
    (scans,) = item["children"]
    assert scans["field"] == "scans/scan"
    assert [s["data_fields"]["ID"] for s in scans["items"]] == ["1", "2"]


def test_scan_listing_and_single_scan(emulator, http, world):
    first, _ = world
    rows = result(http.get(f"{emulator.url}/data/experiments/{first.id}/scans?format=json"))
    assert rows[0] == {
        "xnat_imagescandata_id": rows[0]["xnat_imagescandata_id"],
        "ID": "1",
        "type": "anat-T1w",
        "quality": "usable",
        "xsiType": "xnat:mrScanData",
        "note": "",
        "series_description": "T1 MPRAGE",
        "URI": f"/data/experiments/{first.id}/scans/1",
    }
    assert rows[0]["xnat_imagescandata_id"].isdigit()
    (item,) = http.get(f"{emulator.url}/data/experiments/{first.id}/scans/1?format=json").json()["items"]
    assert item["meta"]["xsi:type"] == "xnat:mrScanData"
    assert item["data_fields"]["series_description"] == "T1 MPRAGE"


def test_scan_routes_do_not_exist_under_project_experiments(emulator, http, world):
    first, _ = world
    assert http.get(f"{emulator.url}/data/projects/PROJ/experiments/{first.id}/scans?format=json").status_code == 404


def test_resource_rows_have_no_id_or_uri(emulator, http, world):
    first, _ = world
    body = http.get(f"{emulator.url}/data/experiments/{first.id}/scans/1/resources?format=json&columns=ID,URI").json()
    (row,) = body["ResultSet"]["Result"]
    assert "ID" not in row and "URI" not in row
    assert row["label"] == "DICOM" and row["element_name"] == "xnat:resourceCatalog"
    assert (row["category"], row["cat_id"], row["file_count"]) == ("scans", "1", "2")
    assert row["file_size"] == str(sum(len(d) for d in FILES.values()))
    assert row["xnat_abstractresource_id"].isdigit()


def test_file_listing_shape_uses_numeric_resource_id_and_true_md5(emulator, http, world):
    first, _ = world
    url = f"{emulator.url}/data/projects/PROJ/subjects/SUBJ01/experiments/SUBJ01_MR1/scans/1/resources/DICOM/files?format=json"
    body = http.get(url).json()["ResultSet"]
    assert "totalRecords" not in body
    assert body["title"] == "Files" and body["Columns"] == [{"key": "URI", "serverRoot": ""}]
    rid = emulator.archive.get_scan(first.id, "1").resources["DICOM"].id
    row = body["Result"][0]
    assert row == {
        "Name": "1.dcm",
        "Size": str(len(FILES["1.dcm"])),
        "URI": f"/data/projects/PROJ/subjects/{first.subject_id}/experiments/{first.id}/scans/1/resources/{rid}/files/1.dcm",
        "collection": "DICOM",
        "file_tags": "",
        "file_format": "DICOM",
        "file_content": "RAW",
        "cat_ID": rid,
        "digest": hashlib.md5(FILES["1.dcm"]).hexdigest(),
    }
    via_experiment = result(http.get(f"{emulator.url}/data/experiments/{first.id}/scans/1/resources/{rid}/files?format=json"))
    assert via_experiment[0]["URI"] == f"/data/experiments/{first.id}/scans/1/resources/{rid}/files/1.dcm"


def test_files_of_several_scans_by_id_type_and_all(emulator, http, world):
    first, _ = world
    base = f"{emulator.url}/data/experiments/{first.id}/scans"
    assert len(result(http.get(f"{base}/ALL/files?format=json"))) == 3
    assert len(result(http.get(f"{base}/1,func-bold/files?format=json"))) == 3
    assert [r["Name"] for r in result(http.get(f"{base}/func-bold/files?format=json"))] == ["1.dcm"]
    # The same scan segments under resources/{label}/files, as pyxnat's scans().download uses them.
    assert len(result(http.get(f"{base}/ALL/resources/DICOM/files?format=json"))) == 3
    assert len(result(http.get(f"{base}/1,func-bold/resources/DICOM/files?format=json"))) == 3
    assert [r["Name"] for r in result(http.get(f"{base}/func-bold/resources/DICOM/files?format=json"))] == ["1.dcm"]
    zipped = http.get(f"{base}/func-bold/resources/DICOM/files?format=zip")
    assert zipped.status_code == 200 and zipped.content[:4] == b"PK\x03\x04"
    assert http.get(f"{base}/nope/resources/DICOM/files?format=json").status_code == 404


@pytest.mark.parametrize(
    ("key", "scans"),
    [("1", ["1"]), ("func-bold", ["2"]), ("1,func-bold", ["1", "2"]), ("ALL", ["1", "2", "3", "4"]), ("*", ["1", "2", "3", "4"]),
     ("NULL", ["3"]), ("a[SLASH]b[COMMA]c", ["4"]), ("2,a[SLASH]b[COMMA]c", ["2", "4"])],
)  # fmt: skip
def test_scan_segments_select_the_same_scans_for_resources_and_files(emulator, http, world, key, scans):
    first, _ = world
    emulator.archive.add_scan(first.id, "3", type="", files={"u.dcm": b"u"})
    emulator.archive.add_scan(first.id, "4", type="a/b,c", files={"t.dcm": b"t"})
    base = f"{emulator.url}/data/experiments/{first.id}/scans/{key}"
    resources = result(http.get(f"{base}/resources?format=json"))
    assert [r["cat_id"] for r in resources] == scans
    files = result(http.get(f"{base}/files?format=json"))
    assert sorted({r["URI"].split("/scans/")[1].split("/")[0] for r in files}) == scans
    assert http.get(f"{base}/resources/DICOM/files?format=json").status_code == 200


def test_unknown_scan_segment_is_not_found_for_resources(emulator, http, world):
    first, _ = world
    assert http.get(f"{emulator.url}/data/experiments/{first.id}/scans/nope/resources?format=json").status_code == 404


def test_file_bytes_and_missing_file_page(emulator, http, world):
    first, _ = world
    base = f"{emulator.url}/data/experiments/{first.id}/scans/1/resources/DICOM/files"
    response = http.get(f"{base}/2.dcm")
    assert response.content == FILES["2.dcm"]
    assert response.headers["Content-Length"] == str(len(FILES["2.dcm"]))
    missing = http.get(f"{base}/nope.dcm")
    assert missing.status_code == 404
    assert "<h3>Unable to find file.</h3>" in missing.text and missing.text.startswith("<html>")


def test_zip_of_a_resource_and_its_headers(emulator, http, world):
    first, _ = world
    response = http.get(f"{emulator.url}/data/experiments/{first.id}/scans/1/resources/DICOM/files?format=zip")
    assert response.headers["Content-Type"] == "application/zip"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{first.id}.zip"'
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
        assert {n: archive.read(n) for n in archive.namelist()} == {
            f"SUBJ01_MR1/scans/1-anat_T1w/resources/DICOM/files/{n}": d for n, d in FILES.items()
        }


def test_zip_entry_names_are_made_by_xnats_string_replacements(emulator, http):
    """XNAT builds entry names from each file's URI by plain replacement (RestFileUtils): an untyped
    scan keeps its bare ID, a folder named like a typed scan's ID gets the type too, and the
    session's ID becomes its label wherever it appears, file names included."""
    archive = emulator.archive
    exp = archive.add_session("PROJ", "SUBJ09", "SUBJ09_MR1")
    archive.add_scan(exp.id, "3", type="", files={"a.dcm": b"a"})
    archive.add_scan(exp.id, "4", type="T1w MPRAGE", files={"4/x.dcm": b"x", f"{exp.id}_note.txt": b"n"})
    names = {}
    for scan in ("3", "4", "ALL"):
        response = http.get(f"{emulator.url}/data/experiments/{exp.id}/scans/{scan}/files?format=zip")
        with zipfile.ZipFile(io.BytesIO(response.content)) as zipped:
            names[scan] = sorted(zipped.namelist())
    assert names["3"] == ["SUBJ09_MR1/scans/3/resources/DICOM/files/a.dcm"]
    assert names["4"] == [
        "SUBJ09_MR1/scans/4-T1w_MPRAGE/resources/DICOM/files/4-T1w_MPRAGE/x.dcm",
        "SUBJ09_MR1/scans/4-T1w_MPRAGE/resources/DICOM/files/SUBJ09_MR1_note.txt",
    ]
    assert names["ALL"] == sorted(names["3"] + names["4"])


def _zip_members(content: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(content)) as zipped:
        return {n: zipped.read(n) for n in zipped.namelist()}


@pytest.mark.parametrize(("fmt", "mimetype"), [("tar", "application/x-tar"), ("tar.gz", "application/x-gtar")])
@pytest.mark.parametrize("path", ["scans/ALL/files", "scans/1/resources/DICOM/files"])
def test_tar_downloads_hold_the_entries_of_the_zip(emulator, http, world, fmt, mimetype, path):
    first, _ = world
    url = f"{emulator.url}/data/experiments/{first.id}/{path}"
    response = http.get(f"{url}?format={fmt}")
    assert response.status_code == 200 and response.headers["Content-Type"] == mimetype
    assert response.headers["Content-Disposition"] == f'attachment; filename="{first.id}.{fmt}"'
    assert (response.content[:2] == b"\x1f\x8b") == (fmt == "tar.gz")
    assert len(response.content) % 10240 == 0 or fmt == "tar.gz"
    with tarfile.open(fileobj=io.BytesIO(response.content), mode="r:*") as tar:
        members = tar.getmembers()
        contents = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    assert contents == _zip_members(http.get(f"{url}?format=zip").content)
    # XNAT's TarUtils puts the type flag '0' into the mode field: permissions 0060.
    assert {m.mode for m in members} == {0o060} and all(m.isfile() for m in members)


def test_tar_keeps_long_entry_names_whole(emulator, http, world):
    first, _ = world
    long_name = "deep/" * 30 + "x.dcm"
    emulator.archive.upload_file(first.id, "1", "DICOM", long_name, b"long")
    response = http.get(f"{emulator.url}/data/experiments/{first.id}/scans/1/files?format=tar")
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        assert f"SUBJ01_MR1/scans/1-anat_T1w/resources/DICOM/files/{long_name}" in tar.getnames()


def test_other_zip_structures_as_xnat_builds_them(emulator, http, world):
    first, _ = world
    url = f"{emulator.url}/data/experiments/{first.id}/scans/1/files?format=zip&structure="
    assert sorted(_zip_members(http.get(url + "simplified").content)) == ["SUBJ01_MR1/scans/1/DICOM/1.dcm", "SUBJ01_MR1/scans/1/DICOM/2.dcm"]
    assert sorted(_zip_members(http.get(url + "improved").content)) == ["scans/1_anat-T1w/DICOM/1.dcm", "scans/1_anat-T1w/DICOM/2.dcm"]
    tar_url = url.replace("format=zip", "format=tar") + "improved"
    with tarfile.open(fileobj=io.BytesIO(http.get(tar_url).content)) as tar:
        assert sorted(tar.getnames()) == ["scans/1/DICOM/1.dcm", "scans/1/DICOM/2.dcm"]


def test_zip_with_nothing_to_send(emulator, http, world):
    _, second = world
    url = f"{emulator.url}/data/experiments/{second.id}/scans/ALL/files?format=zip"
    assert http.get(url).status_code == 404
    assert http.get(url + "&accept-not-found=true").status_code == 204


def test_unknown_and_forbidden_projects(emulator, world):
    unknown = requests.get(f"{emulator.url}/data/projects/NOPE/experiments?format=json", auth=("admin", "secret"))
    assert unknown.status_code == 404 and "<h3>Unable to identify project NOPE</h3>" in unknown.text
    forbidden = requests.get(f"{emulator.url}/data/projects/OTHER/experiments?format=json", auth=("bob", "pw"))
    assert forbidden.status_code == 403 and "Unable to read experiments for Project: OTHER" in forbidden.text
    assert requests.get(f"{emulator.url}/data/projects/OTHER?format=json", auth=("bob", "pw")).status_code == 404


def test_missing_or_wrong_credentials_are_401(emulator, world):
    assert requests.get(f"{emulator.url}/data/projects?format=json").status_code == 401
    assert requests.get(f"{emulator.url}/data/projects?format=json", auth=("admin", "bad")).status_code == 401


def test_password_login_then_cookie_only(emulator, world):
    client = requests.Session()
    login = client.put(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "secret"})
    assert login.status_code == 200 and login.headers["Content-Type"].startswith("text/plain")
    assert re.fullmatch(r"[0-9A-F]{32}", login.text)
    assert client.cookies["JSESSIONID"] == login.text
    assert client.get(f"{emulator.url}/data/auth").text == "User 'admin' is logged in"
    assert client.get(f"{emulator.url}/data/JSESSION").text == login.text
    assert client.delete(f"{emulator.url}/data/JSESSION").status_code == 200
    assert client.get(f"{emulator.url}/data/auth").status_code == 401


def test_password_login_failures(emulator):
    bad = requests.put(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "no"})
    assert bad.status_code == 401 and "Authentication failed." in bad.text
    assert requests.get(f"{emulator.url}/data/services/auth").status_code == 405


def test_basic_auth_on_any_url_opens_a_session(emulator):
    response = requests.get(f"{emulator.url}/data/projects?format=json", auth=("admin", "secret"))
    session_id = response.cookies["JSESSIONID"]
    again = requests.get(f"{emulator.url}/data/auth", cookies={"JSESSIONID": session_id})
    assert again.text == "User 'admin' is logged in"


def test_basic_auth_that_ends_in_an_error_still_gets_its_session_cookie(emulator):
    """Valid credentials open a session on any URL: a 404 or 400 answer names it too, or a
    Basic-only client would leave one session behind on the server per failed call."""
    for url in ("/data/projects/NOPE/experiments?format=json", "/data/projects?format=bogus"):
        response = requests.get(f"{emulator.url}{url}", auth=("admin", "secret"))
        assert response.status_code in (400, 404), url
        session_id = response.cookies["JSESSIONID"]
        again = requests.get(f"{emulator.url}/data/auth", cookies={"JSESSIONID": session_id})
        assert again.text == "User 'admin' is logged in"


def test_basic_auth_with_a_live_cookie_reuses_the_session(emulator):
    client = requests.Session()
    client.auth = ("admin", "secret")
    first = client.get(f"{emulator.url}/data/JSESSION").text
    assert client.get(f"{emulator.url}/data/JSESSION").text == first
    assert requests.get(f"{emulator.url}/data/JSESSION", auth=("admin", "secret")).text != first


def test_expire_sessions_forces_a_new_login(emulator):
    client = requests.Session()
    client.put(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "secret"})
    emulator.app.expire_sessions()
    assert client.get(f"{emulator.url}/data/auth").status_code == 401


def test_head_of_a_file_gives_its_length(emulator, http, world):
    first, _ = world
    response = http.head(f"{emulator.url}/data/experiments/{first.id}/scans/1/resources/DICOM/files/1.dcm")
    assert response.status_code == 200
    assert response.headers["Content-Length"] == str(len(FILES["1.dcm"]))


def test_root_does_not_redirect_and_sets_a_session_for_basic_auth(emulator):
    anonymous = requests.get(emulator.url, allow_redirects=False)
    assert anonymous.status_code == 200 and "JSESSIONID" not in anonymous.cookies
    with_basic = requests.get(emulator.url, auth=("admin", "secret"), allow_redirects=False)
    assert with_basic.status_code == 200 and "JSESSIONID" in with_basic.cookies


def test_sessions_expire_after_idle_timeout(archive):
    from werkzeug.test import Client

    from reconcile.emulator import EmulatorApp

    now = [1000.0]
    app = EmulatorApp(archive, wall_clock=lambda: now[0])
    client = Client(app)
    client.put("/data/services/auth", data={"username": "admin", "password": "secret"})
    now[0] += 14 * 60
    assert client.get("/data/auth").status_code == 200
    now[0] += 14 * 60  # idle time counts from the last request
    assert client.get("/data/auth").status_code == 200
    now[0] += 15 * 60 + 1
    assert client.get("/data/auth").status_code == 401


def test_alias_token_issue_validate_use_and_invalidate(emulator, http, world):
    token = http.get(f"{emulator.url}/data/services/tokens/issue").json()
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", token["alias"])
    assert re.fullmatch(r"[A-Za-z0-9]{64}", token["secret"])
    assert token["xdatUserId"] == "admin" and token["singleUse"] is False
    assert token["estimatedExpirationTime"] > 1000 * dt.datetime.now().timestamp()
    validate = f"{emulator.url}/data/services/tokens/validate/{token['alias']}/{token['secret']}"
    assert http.get(validate).json() == {"valid": "admin"}  # XNAT answers the token's user, or null
    wrong = validate.rsplit("/", 1)[0] + "/" + "0" * 64  # the secret is letters and digits, never all zeros
    assert http.get(wrong).json() == {"valid": None}
    as_token = requests.get(f"{emulator.url}/data/auth", auth=(token["alias"], token["secret"]))
    assert as_token.text == "User 'admin' is logged in"
    assert http.get(f"{emulator.url}/data/services/tokens/invalidate/{token['alias']}").json() == {"result": "OK"}
    gone = http.get(validate)  # an alias XNAT does not know is a 404, whatever the operation
    assert gone.status_code == 404 and f"Can&#x27;t find an alias token with the alias {token['alias']}" in gone.text  # a Restlet status page
    assert http.get(f"{emulator.url}/data/services/tokens/invalidate/{token['alias']}").status_code == 404
    assert requests.get(f"{emulator.url}/data/auth", auth=(token["alias"], token["secret"])).status_code == 401


def test_alias_tokens_last_two_days_and_a_single_use_one_works_once(emulator, monkeypatch):
    now = [1_800_000_000.0]
    monkeypatch.setattr(emulator.app, "wall_clock", lambda: now[0])
    token = emulator.app.issue_token("admin")
    assert token["estimatedExpirationTime"] == int((now[0] + 2 * 24 * 3600) * 1000)
    creds = (token["alias"], token["secret"])
    assert requests.get(f"{emulator.url}/data/auth", auth=creds).status_code == 200
    now[0] += 2 * 24 * 3600  # expired
    assert requests.get(f"{emulator.url}/data/auth", auth=creds).status_code == 401
    once = emulator.app.issue_token("admin", single_use=True)
    once_creds = (once["alias"], once["secret"])
    assert requests.get(f"{emulator.url}/data/auth", auth=once_creds).text == "User 'admin' is logged in"
    assert requests.get(f"{emulator.url}/data/auth", auth=once_creds).status_code == 401


def test_login_by_post_to_services_auth(emulator):
    response = requests.post(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "secret"})
    assert response.status_code == 200 and response.cookies["JSESSIONID"] == response.text
    again = requests.get(f"{emulator.url}/data/auth", cookies={"JSESSIONID": response.text})
    assert again.text == "User 'admin' is logged in"
    refused = requests.post(f"{emulator.url}/data/services/auth", data={"username": "admin", "password": "nope"})
    assert refused.status_code == 401


def test_tokens_for_other_users_need_an_admin(emulator, world):
    assert requests.get(f"{emulator.url}/data/services/tokens/issue/user/admin", auth=("bob", "pw")).status_code == 403
    issued = requests.get(f"{emulator.url}/data/services/tokens/issue/user/bob", auth=("admin", "secret"))
    assert issued.json()["xdatUserId"] == "bob"


def test_model_building_endpoints(emulator, http):
    assert http.get(f"{emulator.url}/data/version").status_code == 404
    assert http.get(f"{emulator.url}/xapi/siteConfig/buildInfo?format=json").json()["version"] == "1.8.10"
    names = http.get(f"{emulator.url}/xapi/schemas?format=json").json()
    assert "xnat" in names
    for name in names:
        schema = http.get(f"{emulator.url}/xapi/schemas/{name}")
        assert schema.status_code == 200 and "<xs:schema" in schema.text
    elements = result(http.get(f"{emulator.url}/data/search/elements?format=json"))
    assert "xnat:mrSessionData" in [e["ELEMENT_NAME"] for e in elements]
    fields = result(http.get(f"{emulator.url}/data/search/elements/xnat:mrSessionData?format=json"))
    assert all(f["FIELD_ID"].isupper() for f in fields)  # lower-case names would shadow xnatpy properties


def test_every_served_xsi_type_is_defined_in_the_xsd(emulator, http):
    schema = http.get(f"{emulator.url}/xapi/schemas/xnat").text
    defined = {f"xnat:{name}" for name in re.findall(r'<xs:complexType name="(\w+)"', schema)}
    from reconcile.emulator.archive import (
        MODALITY_BY_SESSION_TYPE,
        SCAN_TYPE_BY_SESSION_TYPE,
    )

    served = set(MODALITY_BY_SESSION_TYPE) | set(SCAN_TYPE_BY_SESSION_TYPE.values())
    served |= {"xnat:projectData", "xnat:subjectData", "xnat:resourceCatalog"}
    assert served <= defined


def test_a_scan_type_the_xsd_does_not_define_is_refused(emulator, http, world):
    first, _ = world
    base = f"{emulator.url}/data/experiments/{first.id}/scans"
    for bogus in ("xnat:otherDicomScanData", "bogus"):
        response = http.put(f"{base}/9", params={"xsiType": bogus})
        assert response.status_code == 400 and bogus in response.text
    assert "9" not in emulator.archive.get_session(first.id).scans
    assert http.put(f"{base}/9", params={"xsiType": "xnat:mrScanData"}).status_code == 201


def test_an_xml_reupload_is_a_resave_with_the_documents_fields(emulator, http, world):
    first, _ = world
    url = f"{emulator.url}/data/projects/PROJ/subjects/{first.subject_id}/experiments/{first.id}"
    before = emulator.archive.get_session(first.id).last_modified
    emulator.archive.clock = lambda: dt.datetime(2024, 5, 1, 10, 0, 0)
    document = (b'<xnat:MRSession xmlns:xnat="http://nrg.wustl.edu/xnat" label="SUBJ01_MR1">'
                b"<xnat:date>2024-02-02</xnat:date></xnat:MRSession>")
    response = http.put(url, params={"inbody": "true"}, data=document, headers={"Content-Type": "text/xml"})
    assert response.status_code == 200 and response.text == first.id
    after = emulator.archive.get_session(first.id)
    assert after.date == "2024-02-02" and after.last_modified > before
    assert http.put(url, data=b"<not xml", headers={"Content-Type": "text/xml"}).status_code == 400


def test_put_edits_bump_last_modified_only(emulator, http, world):
    first, _ = world
    emulator.archive.clock = lambda: dt.datetime(2024, 5, 1, 10, 0, 0)
    url = f"{emulator.url}/data/projects/PROJ/subjects/SUBJ01/experiments/SUBJ01_MR1?xnat:mrSessionData/date=2024-01-11"
    assert http.put(url).status_code == 200
    assert http.put(f"{emulator.url}/data/experiments/{first.id}?date=2024-01-12").status_code == 200
    (row,) = result(http.get(f"{emulator.url}/data/projects/PROJ/experiments?format=json&columns=date,insert_date,last_modified&label=SUBJ01_MR1"))
    # Two saves under a frozen clock still give two distinct, increasing stamps.
    assert row == {"date": "2024-01-12", "insert_date": "2024-03-01 12:00:00.352",
                   "last_modified": "2024-05-01 10:00:00.001", "URI": f"/data/experiments/{first.id}"}  # fmt: skip


def test_put_subject_session_scan_and_file_upload(emulator, http, world):
    base = f"{emulator.url}/data/projects/PROJ/subjects/NEW"
    created = http.put(base)
    assert created.status_code == 201 and created.text.startswith("XNAT_S")
    session = http.put(f"{base}/experiments/NEW_MR1?xsiType=xnat:mrSessionData&date=2024-07-01")
    assert session.status_code == 201
    exp = emulator.archive.get_session(session.text)
    stamps = (exp.insert_date, exp.last_modified)
    assert http.put(f"{base}/experiments/NEW_MR1/scans/5?xsiType=xnat:mrScanData&xnat:mrScanData/type=dwi").status_code == 201
    upload = http.put(f"{base}/experiments/NEW_MR1/scans/5/resources/DICOM/files/a.dcm", data=b"new-bytes")
    assert upload.status_code == 201
    as_curl = http.put(f"{base}/experiments/NEW_MR1/scans/5/resources/DICOM/files/c.dcm", data=b"c=1&d=2",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})  # curl --data-binary's type
    assert as_curl.status_code == 201
    multipart = http.post(f"{base}/experiments/NEW_MR1/scans/5/resources/DICOM/files/b.dcm", files={"file": ("b.dcm", b"multi")})
    assert multipart.status_code == 201
    scan = emulator.archive.get_scan(exp.id, "5")
    assert scan.type == "dwi"
    assert {p: f.read() for p, f in scan.resources["DICOM"].files.items()} == {"a.dcm": b"new-bytes", "b.dcm": b"multi", "c.dcm": b"c=1&d=2"}
    assert (exp.insert_date, exp.last_modified) == stamps
    assert http.put(f"{base}/experiments/NEW_MR1/scans/5/resources/DICOM/files/a.dcm", data=b"x").status_code == 409
    assert http.put(f"{base}/experiments/NEW_MR1/scans/5/resources/DICOM/files/a.dcm?overwrite=true", data=b"x").status_code == 200


def test_delete_session(emulator, http, world):
    first, _ = world
    assert http.delete(f"{emulator.url}/data/projects/PROJ/subjects/SUBJ01/experiments/SUBJ01_MR1").status_code == 200
    assert http.get(f"{emulator.url}/data/experiments/{first.id}?format=json").status_code == 404


def test_requests_are_recorded(emulator, http):
    http.get(f"{emulator.url}/data/projects?format=json&columns=ID")
    assert emulator.app.requests == [("GET", "/data/projects", "format=json&columns=ID")]
    emulator.app.reset_requests()
    assert emulator.app.requests == []
