"""export_session over real HTTP: the emulator for the archive's bytes and faults, a small
pytest-httpserver site for what the emulator cannot do (Range requests, hostile zips)."""

from __future__ import annotations

import hashlib
import io
import re
import stat
import threading
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from test_zipread import make_zip  # zips as a streaming server writes them
from werkzeug import Request, Response

import reconcile.export as export_mod
from reconcile import digest
from reconcile.credentials import Credentials
from reconcile.emulator import Fault
from reconcile.errors import (
    NotFoundError,
    RemoteError,
    UnsafePathError,
    VerificationError,
    XnatBidsError,
)
from reconcile.export import (
    AUTO_ZIP_MAX_MEAN_SIZE,
    AUTO_ZIP_MIN_FILES,
    ExportCancelled,
    ExportResult,
    export_session,
    zip_prefix,
)
from reconcile.model import Experiment, RemoteFile, Scan
from reconcile.xnat import XnatClient

# -- worlds -----------------------------------------------------------------------------------------


def blob(seed: str, size: int) -> bytes:
    """Deterministic bytes that differ per file."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


@pytest.fixture
def client(emulator) -> Iterator[XnatClient]:  # noqa: ANN001 - conftest's RunningEmulator
    creds = Credentials(user=emulator.user, password=emulator.password, source="env")
    with XnatClient(emulator.url, creds, backoff=0.0, retries=1) as c:
        yield c


@pytest.fixture
def session(emulator, client):  # noqa: ANN001, ANN201
    """SUBJ01_MR1 with a small T1 (3 files, one in a subfolder), a 30-file BOLD and a SNAPSHOTS resource."""
    archive = emulator.archive
    exp = archive.add_session("PROJ", "SUBJ01", "SUBJ01_MR1", date="2024-01-10")
    archive.add_scan(
        exp.id, "1", type="T1w MPRAGE", files={n: blob(f"t1/{n}", 5000 + i) for i, n in enumerate(["1.dcm", "2.dcm", "sub/3.dcm"])}
    )
    archive.add_scan(exp.id, "2", type="rest_fMRI", files={f"{i:03d}.dcm": blob(f"bold/{i}", 700 + i) for i in range(30)})
    archive.upload_file(exp.id, "1", "SNAPSHOTS", "thumb.gif", b"GIF89a")
    return _listed(client, exp.id)


def _listed(client: XnatClient, exp_id: str) -> tuple[Experiment, list[Scan]]:
    exp = next(e for e in client.list_experiments("PROJ") if e.id == exp_id)
    return exp, client.list_scans(exp)


def archived(emulator, exp: Experiment, resource: str = "DICOM") -> dict[str, bytes]:  # noqa: ANN001
    """What the archive holds, as {"<scan>/<relpath>": bytes}."""
    stored = emulator.archive.get_session(exp.id)
    return {
        f"{scan.id}/{path}": entry.read()
        for scan in stored.scans.values()
        for res in scan.resources.values()
        if res.label == resource
        for path, entry in res.files.items()
    }


def on_disk(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def downloads(emulator) -> list[tuple[str, str]]:  # noqa: ANN001
    """(path, query) of every file or zip GET the emulator served."""
    return [(p, q) for m, p, q in emulator.app.requests if m == "GET" and ("/files/" in p or "format=zip" in q)]


@pytest.fixture(params=["lanes", "hashlib"])
def md5_by(request, monkeypatch) -> str:  # noqa: ANN001
    """Run a test with MD5s checked several files at a time by `_md5lanes`, then in-stream by hashlib."""
    if request.param == "lanes":
        if not digest.lanes_available():
            pytest.skip("reconcile._md5lanes was not built (no C compiler)")
    else:
        monkeypatch.setattr(digest, "md5_many", None)
    return request.param


# -- happy path -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["files", "zip", "auto"])
def test_export_is_byte_identical_to_the_archive(emulator, client, session, tmp_path, md5_by, method) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    seen: list[int] = []
    result = export_session(client, exp, scans, dest, method=method, on_progress=seen.append)

    expected = archived(emulator, exp)
    assert on_disk(dest) == expected
    assert isinstance(result, ExportResult)
    assert result.dicom_dir == dest.resolve()
    assert result.scans == tuple(scans)
    assert result.files == 33
    assert result.bytes == sum(len(b) for b in expected.values())
    assert result.downloaded == sum(seen) >= result.bytes
    assert not list(dest.rglob("*.part"))


@pytest.mark.parametrize("method", ["files", "zip"])
def test_a_site_without_checksums_is_verified_by_size_and_crc(emulator, client, session, tmp_path, method) -> None:  # noqa: ANN001
    """XNAT with checksums off lists every digest as "": files are checked by size (and a zip's
    by CRC-32), and each is fsynced before its final name, as only its size vouches for it later."""
    emulator.archive.checksums = False
    exp, scans = _listed(client, session[0].id)
    assert all(f.digest == "" for scan in scans for f in scan.files)
    dest = tmp_path / "dicom"
    synced: list[str] = []
    real_fsync = export_mod.fsync_file
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_mod, "fsync_file", lambda path: (synced.append(Path(path).name), real_fsync(path)))
        export_session(client, exp, scans, dest, method=method)
    assert on_disk(dest) == archived(emulator, exp)
    assert sorted(synced) == sorted(f"{Path(k).name}.part" for k in archived(emulator, exp))


@pytest.mark.parametrize("method", ["files", "zip"])
def test_zip_entries_named_by_xnats_replacements_land_at_their_listed_names(emulator, client, tmp_path, method) -> None:  # noqa: ANN001
    """An untyped scan's zip folder is its bare ID; a folder named like the scan's ID and a file
    name holding the session's ID are renamed in the zip, and still land where the listing says."""
    archive = emulator.archive
    exp = archive.add_session("PROJ", "SUBJ07", "SUBJ07_MR1", date="2024-01-10")
    archive.add_scan(exp.id, "3", type="", files={f"{i}.dcm": blob(f"u/{i}", 300 + i) for i in range(4)})
    archive.add_scan(exp.id, "4", type="T1w", files={"4/x.dcm": blob("x", 500), f"{exp.id}_a.dcm": blob("a", 400)})
    exp, scans = _listed(client, exp.id)
    dest = tmp_path / "dicom"
    result = export_session(client, exp, scans, dest, method=method)
    assert on_disk(dest) == archived(emulator, exp)
    assert "4/4/x.dcm" in on_disk(dest) and f"4/{exp.id}_a.dcm" in on_disk(dest)
    assert result.files == 6
    zips = [p for p, q in downloads(emulator) if "format=zip" in q]
    assert len(zips) == (2 if method == "zip" else 0)


@pytest.mark.parametrize("method", ["files", "zip", "auto"])
def test_a_session_shared_in_under_another_label_exports_from_zips_named_by_its_primary_label(
        emulator, client, tmp_path, method) -> None:  # noqa: ANN001
    """Listed by the project it is shared into, a session has that project's label; XNAT names
    its zips' entries by the archive folder, its primary label, and a file named with its ID
    gets that label too."""
    archive = emulator.archive
    exp = archive.add_session("PROJ", "SUBJ08", "SUBJ08_MR1", date="2024-01-10")
    archive.add_scan(exp.id, "1", type="T1w", files={f"{i:02d}.dcm": blob(f"s/{i}", 200 + i) for i in range(12)})
    archive.add_scan(exp.id, "2", type="", files={f"{exp.id}_b.dcm": blob("b", 300)})
    archive.add_project("OTHER")
    archive.share_session(exp.id, "OTHER", "OTHER_MR1")
    [listed] = [e for e in client.list_experiments("OTHER") if e.id == exp.id]
    assert (listed.label, listed.project) == ("OTHER_MR1", "OTHER")
    dest = tmp_path / "dicom"
    result = export_session(client, listed, client.list_scans(listed), dest, method=method)
    assert on_disk(dest) == archived(emulator, listed) and result.files == 13
    assert f"2/{exp.id}_b.dcm" in on_disk(dest)
    zips = [p for p, q in downloads(emulator) if "format=zip" in q]
    assert len(zips) == {"files": 0, "zip": 2, "auto": 1}[method]


@pytest.mark.parametrize("method", ["files", "zip"])
def test_a_name_listed_as_a_file_and_as_a_folder_is_refused_before_any_download(emulator, client, tmp_path,
                                                                                method) -> None:  # noqa: ANN001
    archive = emulator.archive
    exp = archive.add_session("PROJ", "SUBJ08", "SUBJ08_MR1", date="2024-01-10")
    archive.add_scan(exp.id, "2", type="T1w", files={"1.dcm": blob("1", 300), "1.dcm/2.dcm": blob("2", 300)})
    exp, scans = _listed(client, exp.id)
    with pytest.raises(VerificationError) as info:
        export_session(client, exp, scans, tmp_path / "dicom", method=method)
    assert info.value.summary == f"XNAT lists 1.dcm both as a file and as a folder in scan 2 of session SUBJ08_MR1 ({exp.id})"
    assert downloads(emulator) == []


@pytest.mark.parametrize("method", ["files", "zip"])
def test_file_names_with_url_characters_land_under_their_own_names(emulator, client, tmp_path, method) -> None:  # noqa: ANN001
    """XNAT lists a file's URI with its name as it is, not percent-encoded: `a%20b.dcm` is its
    own file beside `a b.dcm`, and `#`, `?`, `;` and `%` are encoded when the file is asked for."""
    archive = emulator.archive
    exp = archive.add_session("PROJ", "SUBJ08", "SUBJ08_MR1", date="2024-01-10")
    names = ["a b.dcm", "a%20b.dcm", "a%41.dcm", "a#b.dcm", "a?b.dcm", "a;b.dcm", "a+b.dcm"]
    archive.add_scan(exp.id, "3", type="T1w", files={name: blob(name, 300 + i) for i, name in enumerate(names)})
    exp, scans = _listed(client, exp.id)
    assert sorted(f.name for f in scans[0].files) == sorted(names)
    dest = tmp_path / "dicom"
    export_session(client, exp, scans, dest, method=method)
    assert on_disk(dest) == archived(emulator, exp)
    assert sorted(on_disk(dest)) == sorted(f"3/{name}" for name in names)


def test_auto_uses_one_zip_for_a_scan_with_many_files_and_per_file_gets_otherwise(
    emulator, client, session, tmp_path  # noqa: ANN001
) -> None:
    exp, scans = session
    assert len(scans[0].files) <= AUTO_ZIP_MIN_FILES < len(scans[1].files)
    emulator.app.reset_requests()
    export_session(client, exp, scans, tmp_path / "dicom")
    got = downloads(emulator)
    zips = [p for p, q in got if "format=zip" in q]
    singles = [p for p, q in got if "format=zip" not in q]
    assert zips == [f"/data/projects/PROJ/subjects/{exp.subject_id}/experiments/{exp.id}/scans/2/resources/DICOM/files"]
    assert len(singles) == 3 and all("/scans/1/" in p for p in singles)


def test_auto_fetches_big_files_one_by_one_however_many(emulator, client, tmp_path) -> None:  # noqa: ANN001
    n, size = AUTO_ZIP_MIN_FILES + 1, AUTO_ZIP_MAX_MEAN_SIZE + 1
    (stored,) = emulator.archive.add_synthetic_sessions("PROJ", 1, scans_per_session=1, files_per_scan=n, file_size=size)
    exp, scans = _listed(client, stored.id)
    emulator.app.reset_requests()
    result = export_session(client, exp, scans, tmp_path / "dicom")
    got = downloads(emulator)
    assert len(got) == n and not any("format=zip" in q for _, q in got)
    assert result.bytes == n * size


def test_other_resources_and_stale_files_are_not_left_in_the_staging_folder(client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    (dest / "1").mkdir(parents=True)
    (dest / "1" / "old.dcm").write_bytes(b"from an older listing")
    (dest / "9" / "x").mkdir(parents=True)
    (dest / "1" / "link.dcm").symlink_to(tmp_path / "elsewhere")
    export_session(client, exp, scans, dest, method="files")
    names = set(on_disk(dest))
    assert "1/old.dcm" not in names and "1/link.dcm" not in names and not (dest / "9").exists()
    assert not any("thumb.gif" in n for n in names)
    assert len(names) == 33


# -- resume -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["files", "zip"])
def test_second_export_downloads_nothing(emulator, client, session, tmp_path, md5_by, method) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    export_session(client, exp, scans, dest, method=method)
    emulator.app.reset_requests()
    again = export_session(client, exp, scans, dest, method=method)
    assert again.downloaded == 0
    assert again.files == 33
    assert downloads(emulator) == []


def test_a_changed_file_is_downloaded_again(emulator, client, session, tmp_path, md5_by) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    export_session(client, exp, scans, dest, method="files")
    (dest / "1" / "2.dcm").write_bytes(b"x" * (scans[0].files[1].size))  # same size, wrong MD5
    emulator.app.reset_requests()
    again = export_session(client, exp, scans, dest, method="files")
    assert [p.rsplit("/", 1)[-1] for p, _ in downloads(emulator)] == ["2.dcm"]
    assert again.downloaded == scans[0].files[1].size
    assert on_disk(dest) == archived(emulator, exp)


def test_a_truncated_part_is_completed(emulator, client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    export_session(client, exp, scans, dest, method="files")
    target = dest / "1" / "1.dcm"
    whole = target.read_bytes()
    target.unlink()
    (dest / "1" / "1.dcm.part").write_bytes(whole[:1000])
    again = export_session(client, exp, scans, dest, method="files")
    assert target.read_bytes() == whole
    assert not (dest / "1" / "1.dcm.part").exists()
    # The emulator ignores Range and answers 200, so the file is fetched whole once more.
    assert again.downloaded == len(whole)


def test_a_complete_verified_part_is_renamed_without_downloading(emulator, client, session, tmp_path, md5_by) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    export_session(client, exp, scans, dest, method="files")
    (dest / "1" / "1.dcm").rename(dest / "1" / "1.dcm.part")  # as if cancelled between fsync and rename
    emulator.app.reset_requests()
    again = export_session(client, exp, scans, dest, method="files")
    assert again.downloaded == 0 and downloads(emulator) == []
    assert on_disk(dest) == archived(emulator, exp)


class RangeSite:
    """A minimal XNAT that serves one file and honours `Range: bytes=N-` with 206."""

    PATH = "/data/experiments/SITE_E00001/scans/1/resources/11/files/big.dcm"

    def __init__(self, server: HTTPServer, data: bytes):
        self.data = data
        self.ranges: list[str | None] = []
        server.expect_request("/data/services/auth", method="PUT").respond_with_data("SESSION1")
        server.expect_request(self.PATH).respond_with_handler(self._file)

    def _file(self, request: Request) -> Response:
        header = request.headers.get("Range")
        self.ranges.append(header)
        m = re.fullmatch(r"bytes=(\d+)-", header or "")
        if not m:
            return Response(self.data, mimetype="application/dicom")
        start = int(m.group(1))
        resp = Response(self.data[start:], status=206, mimetype="application/dicom")
        resp.headers["Content-Range"] = f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"
        return resp


def bare_experiment() -> Experiment:
    return Experiment(
        id="SITE_E00001", label="SUBJ01_MR1", project="PROJ", subject_id="", subject_label="SUBJ01",
        date="2024-01-10", insert_date=None, last_modified=None,
    )


def test_a_part_is_resumed_with_a_range_request_when_the_server_supports_it(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    data = blob("big", 300_000)
    site = RangeSite(httpserver, data)
    f = RemoteFile("big.dcm", len(data), hashlib.md5(data).hexdigest(), site.PATH)
    scans = [Scan("1", "T1w", "T1w", (f,))]
    dest = tmp_path / "dicom"
    (dest / "1").mkdir(parents=True)
    (dest / "1" / "big.dcm.part").write_bytes(data[:120_000])
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        result = export_session(c, bare_experiment(), scans, dest, method="files")
    assert site.ranges == ["bytes=120000-"]
    assert result.downloaded == len(data) - 120_000
    assert (dest / "1" / "big.dcm").read_bytes() == data


def test_a_corrupt_part_is_dropped_and_the_file_fetched_again(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    data = blob("big", 50_000)
    site = RangeSite(httpserver, data)
    f = RemoteFile("big.dcm", len(data), hashlib.md5(data).hexdigest(), site.PATH)
    dest = tmp_path / "dicom"
    (dest / "1").mkdir(parents=True)
    (dest / "1" / "big.dcm.part").write_bytes(b"\0" * 10_000)  # resumable length, wrong bytes
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        export_session(c, bare_experiment(), [Scan("1", "T1w", "T1w", (f,))], dest, method="files")
    assert site.ranges == ["bytes=10000-", None]
    assert (dest / "1" / "big.dcm").read_bytes() == data


def test_only_files_without_an_md5_are_fsynced_and_md5_files_are_rechecked_on_reuse(
    httpserver: HTTPServer, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    signed, unsigned = blob("signed", 40_000), blob("unsigned", 30_000)
    httpserver.expect_request("/data/services/auth", method="PUT").respond_with_data("SESSION1")
    for name, data in (("a.dcm", signed), ("b.dcm", unsigned)):
        httpserver.expect_request(f"/data/files/{name}").respond_with_data(data, mimetype="application/dicom")
    files = (RemoteFile("a.dcm", len(signed), hashlib.md5(signed).hexdigest(), "/data/files/a.dcm"),
             RemoteFile("b.dcm", len(unsigned), None, "/data/files/b.dcm"))
    scans = [Scan("1", "T1w", "T1w", files)]
    synced: list[str] = []
    real = export_mod.fsync_file
    monkeypatch.setattr(export_mod, "fsync_file", lambda path: (synced.append(Path(path).name), real(path)))
    dest = tmp_path / "dicom"
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        export_session(c, bare_experiment(), scans, dest, method="files")
        assert synced == ["b.dcm.part"]  # trusted on size alone later, so it reaches the disk first
        # What a power loss can leave of an unsynced file: the right size, other bytes.
        (dest / "1" / "a.dcm").write_bytes(b"\0" * len(signed))
        again = export_session(c, bare_experiment(), scans, dest, method="files")
    assert again.downloaded == len(signed)
    assert (dest / "1" / "a.dcm").read_bytes() == signed and (dest / "1" / "b.dcm").read_bytes() == unsigned


# -- faults -----------------------------------------------------------------------------------------

FILE_ROUTE = r"/scans/1/resources/[^/]+/files/2\.dcm$"
ZIP_ROUTE = r"/scans/2/resources/DICOM/files$"


@pytest.mark.parametrize("kind", ["truncate", "corrupt"])
def test_a_bad_download_is_retried_once(emulator, client, session, tmp_path, md5_by, kind) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    fault = emulator.app.faults.add(Fault(route=FILE_ROUTE, kind=kind, times=1))
    export_session(client, exp, scans, dest, method="files")
    assert fault.fired == 1
    assert on_disk(dest) == archived(emulator, exp)


@pytest.mark.parametrize("kind", ["truncate", "corrupt"])
def test_a_persistently_bad_download_raises_verification_error_and_leaves_no_final_file(
    emulator, client, session, tmp_path, kind, md5_by  # noqa: ANN001
) -> None:
    exp, scans = session
    dest = tmp_path / "dicom"
    fault = emulator.app.faults.add(Fault(route=FILE_ROUTE, kind=kind))
    with pytest.raises(VerificationError) as info:
        export_session(client, exp, scans, dest, method="files")
    assert fault.fired == 2
    message = str(info.value)
    assert "2.dcm" in message and "expected" in message and "got" in message
    assert not (dest / "1" / "2.dcm").exists()


@pytest.mark.parametrize("kind", ["truncate", "corrupt"])
def test_a_bad_zip_is_retried_and_then_reported(emulator, client, session, tmp_path, kind) -> None:  # noqa: ANN001
    exp, scans = session
    dest = tmp_path / "dicom"
    once = emulator.app.faults.add(Fault(route=ZIP_ROUTE, kind=kind, times=1))
    export_session(client, exp, scans, dest, method="zip")
    assert once.fired == 1
    assert on_disk(dest) == archived(emulator, exp)

    emulator.app.faults.clear()
    for p in (dest / "2").iterdir():
        p.unlink()
    always = emulator.app.faults.add(Fault(route=ZIP_ROUTE, kind="truncate"))
    with pytest.raises(VerificationError, match="scan 2"):
        export_session(client, exp, scans, dest, method="zip")
    assert always.fired == 2  # the zip and its one retry
    assert not list((dest / "2").glob("*"))


def test_a_missing_file_is_a_remote_error(emulator, client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    emulator.app.faults.add(Fault(route=FILE_ROUTE, kind="status", status=404, message="Unable to find file."))
    with pytest.raises(NotFoundError):
        export_session(client, exp, scans, tmp_path / "dicom", method="files")


def test_a_file_listed_but_missing_from_the_zip_is_a_verification_error(emulator, client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    del emulator.archive.get_scan(exp.id, "2").resources["DICOM"].files["007.dcm"]  # after the listing
    with pytest.raises(VerificationError, match="lacks 1 listed file") as info:
        export_session(client, exp, scans, tmp_path / "dicom", method="zip")
    assert "007.dcm" in str(info.value)


def test_zip_entries_not_in_the_listing_are_ignored(emulator, client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    emulator.archive.upload_file(exp.id, "2", "DICOM", "late.dcm", b"added after the listing")
    dest = tmp_path / "dicom"
    export_session(client, exp, scans, dest, method="zip")
    assert not (dest / "2" / "late.dcm").exists()
    assert len(list((dest / "2").iterdir())) == 30


# -- unsafe names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x.dcm", "/abs.dcm", "a/../../x.dcm", "a\\b.dcm", "a\x00b.dcm", "C:x.dcm"])
def test_an_unsafe_name_in_the_listing_writes_nothing(client, session, tmp_path, name) -> None:  # noqa: ANN001
    exp, scans = session
    bad = RemoteFile(name, 3, "", scans[0].files[0].uri)
    hostile = [Scan(scans[0].id, scans[0].type, "", scans[0].files + (bad,)), *scans[1:]]
    dest = tmp_path / "dicom"
    with pytest.raises(UnsafePathError):
        export_session(client, exp, hostile, dest)
    assert list(tmp_path.iterdir()) == []


def test_an_unsafe_scan_id_writes_nothing(client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    with pytest.raises(UnsafePathError):
        export_session(client, exp, [Scan("..", "T1w", "", scans[0].files)], tmp_path / "dicom")
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_scan_folder_is_not_followed(client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    dest, outside = tmp_path / "dicom", tmp_path / "outside"
    dest.mkdir()
    outside.mkdir()
    (dest / "1").symlink_to(outside, target_is_directory=True)
    export_session(client, exp, scans, dest, method="files")
    assert list(outside.iterdir()) == []
    assert not (dest / "1").is_symlink() and len(list((dest / "1").rglob("*.dcm"))) == 3


class ZipSite:
    """A minimal XNAT whose scan zip is whatever the test built."""

    ZIP_PATH = "/data/experiments/SITE_E00001/scans/1/resources/DICOM/files"

    def __init__(self, server: HTTPServer, payload: bytes):
        server.expect_request("/data/services/auth", method="PUT").respond_with_data("SESSION1")
        server.expect_request(self.ZIP_PATH, query_string="format=zip").respond_with_data(
            payload, mimetype="application/zip"
        )


def hostile_zip(prefix: str, entry: str, *, symlink: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(prefix + "1.dcm", b"good")
        info = zipfile.ZipInfo(entry)
        if symlink:
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, b"evil")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("entry", "symlink"),
    [
        ("../x", False),
        ("/abs", False),
        ("{prefix}../../../../../../x", False),
        ("{prefix}link.dcm", True),
        ("SUBJ01_MR1/scans/9-other/resources/DICOM/files/1.dcm", False),
        ("PRIMARY_MR1/scans/1-T1w/resources/DICOM/files/2.dcm", False),  # a second session folder
        ("x", False),
        ("{prefix}a\\..\\..\\x", False),
    ],
)
def test_a_hostile_zip_is_refused_before_anything_is_extracted(
    httpserver: HTTPServer, tmp_path, entry, symlink  # noqa: ANN001
) -> None:
    exp = bare_experiment()
    f = RemoteFile("1.dcm", 4, hashlib.md5(b"good").hexdigest(), ZipSite.ZIP_PATH + "/1.dcm")
    scan = Scan("1", "T1w", "T1w", (f,))
    prefix = zip_prefix(exp, scan, "DICOM")
    ZipSite(httpserver, hostile_zip(prefix, entry.format(prefix=prefix), symlink=symlink))
    dest = tmp_path / "deep" / "dicom"
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(UnsafePathError):
            export_session(c, exp, [scan], dest, method="zip")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["deep", "deep/dicom"]


def test_a_well_formed_zip_from_a_bare_site_is_extracted(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    exp = bare_experiment()
    f = RemoteFile("1.dcm", 4, hashlib.md5(b"good").hexdigest(), ZipSite.ZIP_PATH + "/1.dcm")
    scan = Scan("1", "T1w", "T1w", (f,))
    ZipSite(httpserver, hostile_zip(zip_prefix(exp, scan, "DICOM"), zip_prefix(exp, scan, "DICOM") + "sub/"))
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert on_disk(tmp_path / "dicom") == {"1/1.dcm": b"good"}


def zip_scan(files: dict[str, bytes]) -> tuple[Experiment, Scan, str]:
    exp = bare_experiment()
    listed = tuple(RemoteFile(n, len(d), hashlib.md5(d).hexdigest(), f"{ZipSite.ZIP_PATH}/{n}") for n, d in files.items())
    scan = Scan("1", "T1w", "T1w", listed)
    return exp, scan, zip_prefix(exp, scan, "DICOM")


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED], ids=["deflated", "stored"])
def test_a_zip_with_data_descriptors_is_extracted_as_it_streams(httpserver: HTTPServer, tmp_path, method) -> None:  # noqa: ANN001
    files = {"1.dcm": blob("one", 70_000), "sub/2.dcm": b"two" * 999, "3.dcm": b""}
    exp, scan, prefix = zip_scan(files)
    extra = {prefix + "late.dcm": b"added after the listing"} if method == zipfile.ZIP_DEFLATED else {}
    ZipSite(httpserver, make_zip({prefix + n: d for n, d in files.items()} | extra, method=method, streamed=True))
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert on_disk(tmp_path / "dicom") == {f"1/{n}": d for n, d in files.items()}


def test_an_unlisted_entry_a_stream_cannot_skip_sends_the_scan_to_per_file_gets(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    files = {"1.dcm": b"one", "2.dcm": b"two"}
    exp, scan, prefix = zip_scan(files)
    # STORED with its size only in the data descriptor, and not in the listing: unreadable front to back.
    ZipSite(httpserver, make_zip({prefix + "x.dcm": b"?", **{prefix + n: d for n, d in files.items()}},
                                 method=zipfile.ZIP_STORED, streamed=True))
    for name, data in files.items():
        httpserver.expect_request(f"{ZipSite.ZIP_PATH}/{name}").respond_with_data(data)
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert on_disk(tmp_path / "dicom") == {"1/1.dcm": b"one", "1/2.dcm": b"two"}
    assert sorted(r.path for r, _ in httpserver.log if r.path.endswith(".dcm")) == [
        f"{ZipSite.ZIP_PATH}/1.dcm", f"{ZipSite.ZIP_PATH}/2.dcm"]


def test_without_an_md5_a_damaged_stored_entry_is_fetched_again_alone(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    good = blob("one", 5000)
    exp = bare_experiment()
    scan = Scan("1", "T1w", "T1w", (RemoteFile("1.dcm", len(good), "", f"{ZipSite.ZIP_PATH}/1.dcm"),))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zip_prefix(exp, scan, "DICOM") + "1.dcm", good)
    payload = bytearray(buf.getvalue())
    payload[payload.index(good[:64]) + 100] ^= 0x01
    ZipSite(httpserver, bytes(payload))
    httpserver.expect_request(f"{ZipSite.ZIP_PATH}/1.dcm").respond_with_data(good)
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert on_disk(tmp_path / "dicom") == {"1/1.dcm": good}
    assert [r.path for r, _ in httpserver.log].count(f"{ZipSite.ZIP_PATH}/1.dcm") == 1


def test_a_zip_whose_directory_disagrees_with_its_entries_is_refused(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    files = {"1.dcm": b"good"}
    exp, scan, prefix = zip_scan(files)
    payload = bytearray(make_zip({prefix + "1.dcm": b"good"}, method=zipfile.ZIP_DEFLATED, streamed=True))
    central = payload.rindex(b"PK\x01\x02")
    at = payload.index(b"1.dcm", central)
    payload[at:at + 5] = b"9.dcm"  # the directory names another file than the entry before it
    ZipSite(httpserver, bytes(payload))
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(VerificationError, match="unreadable zip"):
            export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["dicom"]


# -- cancel -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["files", "zip"])
def test_cancel_stops_the_export_and_leaves_no_partial_file_at_a_final_name(emulator, client, tmp_path, method) -> None:  # noqa: ANN001
    archive = emulator.archive
    (stored,) = archive.add_synthetic_sessions("PROJ", 1, scans_per_session=1, files_per_scan=8, file_size=3 << 20)
    exp, scans = _listed(client, stored.id)
    cancel = threading.Event()
    received: list[int] = []

    def progress(n: int) -> None:
        received.append(n)
        if sum(received) > (4 << 20):
            cancel.set()

    dest = tmp_path / "dicom"
    with pytest.raises(ExportCancelled) as info:
        export_session(client, exp, scans, dest, method=method, cancel=cancel, on_progress=progress)
    assert isinstance(info.value, XnatBidsError)
    expected = archived(emulator, exp)
    finals = {k: v for k, v in on_disk(dest).items() if k.endswith(".dcm")}
    assert len(finals) < len(expected)
    for name, data in finals.items():
        assert data == expected[name]

    # A second run picks up where the first stopped.
    result = export_session(client, exp, scans, dest, method=method)
    assert on_disk(dest) == expected and result.files == 8


def test_a_cancel_set_before_the_start_writes_nothing(client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ExportCancelled):
        export_session(client, exp, scans, tmp_path / "dicom", cancel=cancel)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_method_is_refused(client, session, tmp_path) -> None:  # noqa: ANN001
    exp, scans = session
    with pytest.raises(ValueError, match="method"):
        export_session(client, exp, scans, tmp_path / "dicom", method="rsync")


# -- memory -----------------------------------------------------------------------------------------


@pytest.mark.slow  # about 5 s per method: 200 MB through HTTP, MD5 and fsync
@pytest.mark.parametrize("method", ["files", "zip"])
def test_peak_memory_stays_bounded_for_a_large_file(emulator, client, tmp_path, method) -> None:  # noqa: ANN001
    size = 200 << 20
    (stored,) = emulator.archive.add_synthetic_sessions("PROJ", 1, scans_per_session=1, files_per_scan=1, file_size=size)
    exp, scans = _listed(client, stored.id)  # the listing's MD5 is computed here, outside the measurement
    tracemalloc.start()
    try:
        result = export_session(client, exp, scans, tmp_path / "dicom", method=method)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.bytes == size and (tmp_path / "dicom" / "1" / "1.dcm").stat().st_size == size
    # The emulator runs in this process too, so its buffers count; 200 MB in memory would show.
    assert peak < 24 << 20, f"peak {peak / 2**20:.1f} MiB"


def zip_gets(server: HTTPServer) -> int:
    return sum(1 for r, _ in server.log if r.path == ZipSite.ZIP_PATH)


def test_an_entry_name_that_is_not_utf8_is_an_unreadable_zip(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    exp, scan, prefix = zip_scan({"1.dcm": b"one"})
    payload = bytearray(make_zip({prefix + "1.dcm": b"one", prefix + "ü.dcm": b"x"}))
    payload[payload.index("ü".encode())] = 0xFF  # the name is flagged UTF-8 but is not
    ZipSite(httpserver, bytes(payload))
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(VerificationError, match="unreadable zip") as info:
            export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert "not valid UTF-8" in str(info.value)
    assert zip_gets(httpserver) == 2
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["dicom"]


def test_a_zip_cut_inside_a_wanted_entry_leaves_no_part_of_it(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    files = {"1.dcm": blob("one", 20_000), "2.dcm": blob("two", 200_000)}
    exp, scan, prefix = zip_scan(files)
    full = make_zip({prefix + n: d for n, d in files.items()})
    ZipSite(httpserver, full[:full.index(files["2.dcm"][:64]) + 100_000])  # ends inside 2.dcm's data
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(VerificationError, match="incomplete or unreadable zip"):
            export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    # Not even 2.dcm's .part, which nothing has checked: a later run would resume it.
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["dicom"]


def test_a_part_of_a_file_without_an_md5_is_fetched_again_from_its_start(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    data = blob("big", 300_000)
    site = RangeSite(httpserver, data)
    f = RemoteFile("big.dcm", len(data), "", site.PATH)  # XNAT lists no MD5: only the size is checked
    dest = tmp_path / "dicom"
    (dest / "1").mkdir(parents=True)
    (dest / "1" / "big.dcm.part").write_bytes(b"\0" * 120_000)  # a prefix nothing can verify
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        result = export_session(c, bare_experiment(), [Scan("1", "T1w", "T1w", (f,))], dest, method="files")
    assert site.ranges == [None]
    assert result.downloaded == len(data)
    assert on_disk(dest) == {"1/big.dcm": data}


def test_an_empty_zip_lacks_the_listed_files(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    exp, scan, _ = zip_scan({"1.dcm": b"one"})
    buf = io.BytesIO()
    zipfile.ZipFile(buf, "w").close()  # what XNAT sends once the scan's files are deleted
    ZipSite(httpserver, buf.getvalue())
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(VerificationError, match="lacks 1 listed file") as info:
            export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert "1.dcm" in str(info.value)
    assert zip_gets(httpserver) == 1


@pytest.mark.filterwarnings("ignore:Duplicate name")  # zipfile warns as it writes the second
def test_a_name_twice_among_many_unlisted_entries_is_refused(httpserver: HTTPServer, tmp_path) -> None:  # noqa: ANN001
    # Counted once (it took 28 s for 40,000 names when each was counted through the whole list).
    exp, scan, prefix = zip_scan({"1.dcm": b"one"})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(prefix + "1.dcm", b"one")
        for i in range(5_000):
            zf.writestr(prefix + f"x{i:05d}.dcm", b"")
        zf.writestr(prefix + "x00007.dcm", b"")
    ZipSite(httpserver, buf.getvalue())
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(VerificationError, match="has two entries for x00007.dcm"):
            export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert not any(p.is_file() for p in (tmp_path / "dicom").rglob("*"))


@pytest.mark.parametrize("method", ["files", "zip"])
def test_an_html_page_instead_of_the_data_is_named_as_such(emulator, client, session, tmp_path, method) -> None:  # noqa: ANN001
    """A single-sign-on proxy's login page, answered with 200: not a size or checksum mismatch."""
    exp, scans = session
    emulator.app.faults.add(Fault(route=r"/files", kind="html_200", message="Please log in"))
    with pytest.raises(RemoteError) as info:
        export_session(client, exp, scans, tmp_path / "dicom", method=method)
    assert "(or a proxy in front of it) answered the " in info.value.summary
    assert info.value.summary.endswith("with an HTML page: Please log in")
    assert not isinstance(info.value, VerificationError) and "a login page?" in info.value.hint
