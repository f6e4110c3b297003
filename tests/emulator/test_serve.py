"""Serving the emulator for real: background thread, blocking loop, constant-memory streaming, DICOM folders."""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import signal
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pydicom
import pytest
import requests
import xnat
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from reconcile.emulator import (
    Archive,
    EmulatorApp,
    Fault,
    load_dicom_dir,
    serve_in_thread,
)
from reconcile.emulator.archive import FileEntry

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_serve_in_thread_serves_real_clients(archive):
    exp = archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    archive.add_scan(exp.id, "1", type="t1", files={"1.dcm": b"abc"})
    with serve_in_thread(EmulatorApp(archive)) as url:
        assert url.startswith("http://127.0.0.1:")
        with xnat.connect(url, user="admin", password="secret", loglevel="ERROR") as conn:
            assert list(conn.projects["PROJ"].experiments.keys()) == [exp.id]
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=2)


def test_served_connections_stay_open_between_requests_as_with_tomcat(archive):
    exp = archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    archive.add_scan(exp.id, "1", type="t1", files={"1.dcm": b"abc" * 1000})
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:secret").decode()}
    with serve_in_thread(EmulatorApp(archive)) as url:
        conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=10)
        bodies, ports = [], []
        for path in ("/data/projects/PROJ/experiments?format=json",
                     f"/data/experiments/{exp.id}/scans/1/resources/DICOM/files/1.dcm") * 2:
            conn.request("GET", path, headers=auth)
            resp = conn.getresponse()
            bodies.append((resp.status, resp.getheader("Connection"), resp.read()))
            ports.append(conn.sock.getsockname()[1])  # still the same socket: nothing reconnected
        conn.close()
    assert [status for status, _, _ in bodies] == [200] * 4
    assert all(header != "close" for _, header, _ in bodies)
    assert bodies[1][2] == bodies[3][2] == b"abc" * 1000
    assert len(set(ports)) == 1


def test_reset_fault_drops_the_served_connection(archive):
    exp = archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    archive.add_scan(exp.id, "1", type="t1", files={"1.dcm": b"abc" * 1000})
    app = EmulatorApp(archive)
    app.faults.add(Fault(route=r"/files/", kind="reset", times=1))
    file_url = f"/data/experiments/{exp.id}/scans/1/resources/DICOM/files/1.dcm"
    with serve_in_thread(app) as url:
        with pytest.raises(requests.ConnectionError):
            requests.get(url + file_url, auth=("admin", "secret"), timeout=10)
        assert requests.get(url + file_url, auth=("admin", "secret"), timeout=10).content == b"abc" * 1000


def test_files_from_memory_disk_and_pattern_are_served_whole_and_faults_still_apply(archive, tmp_path):
    exp = archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    scan = archive.add_scan(exp.id, "1", type="t1", files={"mem.dcm": b"m" * 70_000})
    (tmp_path / "disk.dcm").write_bytes(bytes(range(256)) * 4000)
    files = scan.resources["DICOM"].files
    files["disk.dcm"] = FileEntry.from_disk("disk.dcm", tmp_path / "disk.dcm")
    files["gen.dcm"] = FileEntry.synthetic("gen.dcm", (2 << 20) + 7, seed="gen")
    app = EmulatorApp(archive)
    app.faults.add(Fault(route=r"/files/mem.dcm", kind="truncate", fraction=0.5, times=1))
    base = f"/data/experiments/{exp.id}/scans/1/resources/DICOM/files"
    with serve_in_thread(app) as url, requests.Session() as http:
        http.auth = ("admin", "secret")
        for name in ("disk.dcm", "gen.dcm"):
            response = http.get(f"{url}{base}/{name}", timeout=10)
            assert response.status_code == 200
            assert response.headers["Content-Length"] == str(files[name].size)
            assert response.content == files[name].read()
            assert hashlib.md5(response.content).hexdigest() == files[name].md5
            assert http.head(f"{url}{base}/{name}", timeout=10).content == b""
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            http.get(f"{url}{base}/mem.dcm", timeout=10)
        assert http.get(f"{url}{base}/mem.dcm", timeout=10).content == b"m" * 70_000
        zipped = http.get(f"{url}{base}?format=zip", timeout=10)  # chunked, pieces sent with sendfile
        assert zipped.headers.get("Transfer-Encoding") == "chunked"
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            assert archive.testzip() is None
            assert {n.rsplit("/", 1)[1]: archive.read(n) for n in archive.namelist()} == {
                name: entry.read() for name, entry in files.items()}


def _peak_while(action) -> int:  # noqa: ANN001 - any callable
    tracemalloc.start()
    try:
        action()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_big_file_and_zip_stream_in_constant_memory(archive):
    size = 48 * 1024 * 1024
    (exp,) = archive.add_synthetic_sessions("PROJ", n=1, scans_per_session=1, files_per_scan=1, file_size=size)
    entry = archive.get_scan(exp.id, "1").resources["DICOM"].files["1.dcm"]
    auth = ("admin", "secret")
    with serve_in_thread(EmulatorApp(archive)) as url:
        base = f"{url}/data/experiments/{exp.id}/scans/1/resources/DICOM/files"
        digest = hashlib.md5()

        def download_file() -> None:
            with requests.get(f"{base}/1.dcm", auth=auth, stream=True) as response:
                for chunk in response.iter_content(1 << 20):
                    digest.update(chunk)

        def download_zip() -> None:
            with requests.get(f"{base}?format=zip", auth=auth, stream=True) as response:
                assert response.headers["Content-Type"] == "application/zip"
                assert sum(len(c) for c in response.iter_content(1 << 20)) > size

        # Server and client share this process, so the peak covers both ends of the stream.
        assert _peak_while(download_file) < 12 * 1024 * 1024
        assert digest.hexdigest() == entry.md5
        assert _peak_while(download_zip) < 12 * 1024 * 1024


def test_serve_forever_runs_until_interrupted(tmp_path):
    script = (
        "from reconcile.emulator import Archive, serve_forever\n"
        "archive = Archive()\n"
        "archive.add_user('admin', 'secret')\n"
        "archive.add_project('PROJ')\n"
        "serve_forever(archive, '127.0.0.1', 0, on_ready=lambda url: print(url, flush=True))\n"
        "print('stopped', flush=True)\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        url = process.stdout.readline().strip()
        rows = requests.get(f"{url}/data/projects?format=json", auth=("admin", "secret"), timeout=5).json()
        assert [r["ID"] for r in rows["ResultSet"]["Result"]] == ["PROJ"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0  # a guard against a hang, not a bound on speed (a loaded CI)
        assert process.stdout.read().strip() == "stopped"
    finally:
        if process.poll() is None:
            process.kill()


def _write_dicom(path: Path, description: str, protocol: str = "", date: str = "20240110", modality: str = "MR") -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyDate = date
    ds.StudyTime = "142205.123"
    if description:
        ds.SeriesDescription = description
    if protocol:
        ds.ProtocolName = protocol
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_load_dicom_dir_builds_sessions_from_the_folder_layout(tmp_path):
    session_dir = tmp_path / "STUDY" / "SUB01" / "SUB01_MR1"
    _write_dicom(session_dir / "1" / "a.dcm", "anat-T1w")
    _write_dicom(session_dir / "1" / "b.dcm", "anat-T1w")
    _write_dicom(session_dir / "2" / "a.dcm", "", protocol="func-bold_task-rest")
    archive = Archive()

    (exp,) = load_dicom_dir(archive, tmp_path)

    assert "STUDY" in archive.projects
    assert (exp.project, exp.label, exp.date, exp.time) == ("STUDY", "SUB01_MR1", "2024-01-10", "14:22:05")
    assert archive.subject_of(exp).label == "SUB01"
    assert [(s.id, s.type, s.series_description) for s in exp.scans.values()] == [
        ("1", "anat-T1w", "anat-T1w"),
        ("2", "func-bold_task-rest", "func-bold_task-rest"),
    ]
    files = exp.scans["1"].resources["DICOM"].files
    assert sorted(files) == ["a.dcm", "b.dcm"]
    on_disk = (session_dir / "1" / "a.dcm").read_bytes()
    assert files["a.dcm"].read() == on_disk
    assert files["a.dcm"].md5 == hashlib.md5(on_disk).hexdigest()


def test_loaded_dicom_is_served_in_the_zip(tmp_path, archive):
    _write_dicom(tmp_path / "PROJ" / "SUB01" / "SUB01_CT1" / "3" / "x.dcm", "head", modality="CT")
    (exp,) = load_dicom_dir(archive, tmp_path)
    assert exp.xsi_type == "xnat:ctSessionData"
    with serve_in_thread(EmulatorApp(archive)) as url:
        response = requests.get(f"{url}/data/experiments/{exp.id}/scans/ALL/files?format=zip", auth=("admin", "secret"))
    target = tmp_path / "out.zip"
    target.write_bytes(response.content)
    with zipfile.ZipFile(target) as zipped:
        assert zipped.namelist() == ["SUB01_CT1/scans/3-head/resources/DICOM/files/x.dcm"]
