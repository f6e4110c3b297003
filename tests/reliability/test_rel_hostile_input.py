"""Hostile and malformed input: each case gets a clear error (exit 1, a message naming the problem)
and writes nothing — the lock's bytes and every file of the dataset stay as they were.

Only the failed session's log and the history line may appear in the work area: they are the
record of what was refused. Non-ASCII labels are not hostile: they are sanitised to BIDS's
[A-Za-z0-9] rule (Jürgen → Jrgen); a label with no ASCII letter or digit at all is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from pytest_httpserver import HTTPServer
from test_export import hostile_zip
from worlds import exported_root

from reconcile.lock import lock_path


def tree(root: Path) -> dict[str, bytes]:
    """The dataset as a user sees it; the refused session's log, the history line and the work
    area's ignore rules are allowed to appear."""
    if not root.is_dir():
        return {}
    own = (".xnat2bids/logs/", ".xnat2bids/history", ".xnat2bids/.gitignore", ".xnat2bids/.gitattributes")
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(own)
    }


@pytest.fixture
def dataset(emulator, tmp_path):
    """A BIDS root whose lock records the emulator's one session (so a plain plan has nothing to do)."""
    exp = emulator.archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    return exported_root(emulator.archive, tmp_path, [exp])


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xnat2bids.toml"
    path.write_text(text)
    return path


CONFIG_CASES = {
    "unknown top-level key": ("colour = 'blue'\n", "unknown key 'colour'"),
    "unknown nested key": ("[conversion]\nskiip = ['x']\n", "unknown key 'conversion.skiip'"),
    "jobs is a string": ("jobs = 'four'\n", "jobs"),
    "verify_tls is a string": ("verify_tls = 'yes'\n", "verify_tls"),
    "projects is a string": ("projects = 'PROJ'\n", "projects"),
    "not TOML": ("jobs = = 3\n", "xnat2bids.toml"),
    "naming value wrong type": ("[naming]\nsession_label = 7\n", "session_label"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config_is_refused_and_nothing_written(cli, dataset, tmp_path, case):
    text, message = CONFIG_CASES[case]
    config = write_config(tmp_path, text)
    before = tree(dataset)
    code, out, err = cli("apply", str(dataset), "-c", str(config), "-p", "PROJ", "--yes")
    assert code == 1 and message in out + err, out + err
    assert tree(dataset) == before


@pytest.mark.parametrize("case", ["missing", "a directory"])
def test_unreadable_config_is_refused(cli, dataset, tmp_path, case):
    config = tmp_path / "cfg.toml"
    if case == "a directory":
        config.mkdir()
    before = tree(dataset)
    code, out, err = cli("apply", str(dataset), "-c", str(config), "-p", "PROJ", "--yes")
    assert code == 1 and "cfg.toml" in err, out + err
    assert "Traceback" not in err
    assert tree(dataset) == before


def _lock_text(root: Path) -> str:
    return lock_path(root).read_text()


LOCK_CASES = {
    "not TOML": (lambda t: t + "\n[[[broken\n", "not valid TOML"),
    "serial is a string": (lambda t: t.replace("serial = 1", 'serial = "one"'), "serial"),
    "future format_version": (lambda t: re.sub(r"^format_version = \d+$", "format_version = 99", t, count=1, flags=re.M), "newer xnat2bids (format 99)"),
    "duplicate session table": (lambda t: t + "\n" + t[t.index("[sessions."):],
                                "session XNAT_E00001 appears twice"),
    "output path with ..": (lambda t: t.replace('path = "sub-S1/', 'path = "../../etc/', 1), "path"),
    "absolute output path": (lambda t: t.replace('path = "sub-S1/', 'path = "/etc/sub-S1/', 1), "path"),
    "session key differs from its ID": (lambda t: t.replace("[sessions.XNAT_E00001]", "[sessions.XNAT_E99999]")
                                        .replace("[sessions.XNAT_E00001.", "[sessions.XNAT_E99999.")
                                        .replace("[[sessions.XNAT_E00001.", "[[sessions.XNAT_E99999."), "XNAT_E"),
    "sha256 not hex": (lambda t: t.replace('sha256 = "000', 'sha256 = "zzz', 1), "sha256"),
    "not UTF-8": (None, "not UTF-8 text"),
}


@pytest.mark.parametrize("case", sorted(LOCK_CASES))
@pytest.mark.parametrize("command", ["apply", "plan", "check"])
def test_bad_lock_is_refused_and_left_untouched(cli, dataset, case, command):
    edit, message = LOCK_CASES[case]
    if edit is None:
        lock_path(dataset).write_bytes(b"\xff\xfe" + lock_path(dataset).read_bytes())
    else:
        text = edit(_lock_text(dataset))
        assert text != _lock_text(dataset)
        lock_path(dataset).write_text(text)
    before = tree(dataset)
    args = {"apply": ("-p", "PROJ", "--yes"), "plan": ("-p", "PROJ"), "check": ()}[command]
    code, out, err = cli(command, str(dataset), *args)
    assert code == 1, out + err
    assert message in err and ".xnat2bids.lock" in err, out + err
    assert tree(dataset) == before


LABELS = {
    "subject ../": ("../evil", "S_MR2", "subject label '../evil'"),
    "subject with slash": ("a/b", "S_MR2", "contains a path separator"),
    "subject absolute": ("/etc", "S_MR2", "subject label '/etc'"),
    "session with NUL": ("S2", "S2\x00MR1", "control characters"),
    "session with newline": ("S2", "S2\nMR1", "control characters"),
    "session ..": ("S2", "..", "contains '..'"),
    "session backslash": ("S2", "a\\..\\b", "path separator"),
    "very long subject": ("S" * 300, "S_MR2", "longer than 128 characters"),
    "no ASCII letters": ("日本", "S_MR2", "has no letters or digits"),
}


@pytest.mark.parametrize("case", sorted(LABELS))
def test_unsafe_labels_are_refused_by_name_and_nothing_written(cli, emulator, dataset, case):
    subject, session, message = LABELS[case]
    emulator.archive.add_session("PROJ", subject, session, date="2024-01-11")
    before = tree(dataset)
    code, out, err = cli("apply", str(dataset), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert message in out + err, out + err
    assert tree(dataset) == before


def test_non_ascii_labels_are_sanitised_not_refused(cli, emulator, tmp_path):
    emulator.archive.add_session("PROJ", "Jürgen", "Jürgen_MR1", date="2024-01-11")
    code, out, _ = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--detailed-exitcode")
    assert code == 2 and "sub-Jrgen/ses-JrgenMR1" in out


@pytest.mark.parametrize("name", ["../../escape.dcm", "/etc/passwd", "a/../../x.dcm", "sub/./../../y.dcm",
                                  "x\x1b[2J\r1.dcm", "a\nb.dcm"])
def test_listed_file_names_escaping_the_folder_are_refused(cli, emulator, tmp_path, name):
    exp = emulator.archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    emulator.archive.add_scan(exp.id, "1", type="anat-T1w", series_description="anat-T1w")
    emulator.archive.upload_file(exp.id, "1", "DICOM", name, b"evil")
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "1 failed" in out
    assert "unsafe" in out.lower() or "escape" in out.lower() or "refus" in out.lower(), out
    assert tree(root) == {}
    assert not any(p.name in ("escape.dcm", "passwd", "x.dcm", "y.dcm") for p in tmp_path.rglob("*"))


@pytest.mark.parametrize("entry,symlink", [("../x", False), ("/abs", False), ("{prefix}../../../x", False),
                                           ("{prefix}link.dcm", True)])
def test_hostile_zip_entries_are_refused(httpserver: HTTPServer, tmp_path, entry, symlink):
    from test_export import ZipSite, bare_experiment

    from reconcile.credentials import Credentials
    from reconcile.errors import UnsafePathError
    from reconcile.export import export_session, zip_prefix
    from reconcile.model import RemoteFile, Scan
    from reconcile.xnat import XnatClient

    exp = bare_experiment()
    f = RemoteFile("1.dcm", 4, hashlib.md5(b"good").hexdigest(), ZipSite.ZIP_PATH + "/1.dcm")
    scan = Scan("1", "T1w", "T1w", (f,))
    prefix = zip_prefix(exp, scan, "DICOM")
    ZipSite(httpserver, hostile_zip(prefix, entry.format(prefix=prefix), symlink=symlink))
    with XnatClient(httpserver.url_for("/"), Credentials("u", "p", "env"), retries=0) as c:
        with pytest.raises(UnsafePathError) as info:
            export_session(c, exp, [scan], tmp_path / "dicom", method="zip")
    assert "zip" in info.value.summary
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def bare_site(server: HTTPServer, rows) -> None:
    server.expect_request("/data/services/auth", method="PUT").respond_with_data("SESSION1")
    server.expect_request("/data/projects/PROJ/experiments").respond_with_json({"ResultSet": {"Result": rows}})
    server.expect_request("/data/JSESSION", method="DELETE").respond_with_data("")


@pytest.mark.parametrize("case", ["row without ID", "row without label", "ResultSet missing", "rows not objects"])
def test_listing_with_missing_fields_is_a_clear_error(httpserver: HTTPServer, cli, tmp_path, monkeypatch, case):
    good = {"ID": "E1", "label": "S1_MR1", "project": "PROJ", "subject_ID": "S1", "subject_label": "S1",
            "date": "2024-01-10", "insert_date": "2024-01-10 10:00:00.0", "last_modified": "2024-01-10 10:00:00.0",
            "xsiType": "xnat:mrSessionData"}
    if case == "ResultSet missing":
        httpserver.expect_request("/data/services/auth", method="PUT").respond_with_data("SESSION1")
        httpserver.expect_request("/data/projects/PROJ/experiments").respond_with_json({"items": []})
        httpserver.expect_request("/data/JSESSION", method="DELETE").respond_with_data("")
    else:
        row = {k: v for k, v in good.items() if k != {"row without ID": "ID", "row without label": "label"}.get(case)}
        bare_site(httpserver, [row] if case != "rows not objects" else ["E1"])
    monkeypatch.setenv("XNAT_HOST", httpserver.url_for("/").rstrip("/"))
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1, out + err
    assert "PROJ" in out + err and "Traceback" not in err
    assert tree(root) == {}


@pytest.mark.slow
def test_a_huge_listing_still_plans(httpserver: HTTPServer, cli, tmp_path, monkeypatch):
    rows = [{"ID": f"E{i:06d}", "label": f"S{i:06d}_MR1", "project": "PROJ", "subject_ID": f"S{i:06d}",
             "subject_label": f"S{i:06d}", "date": "2024-01-10", "insert_date": "2024-01-10 10:00:00.0",
             "last_modified": "2024-01-10 10:00:00.0", "xsiType": "xnat:mrSessionData"} for i in range(50_000)]
    bare_site(httpserver, rows)
    monkeypatch.setenv("XNAT_HOST", httpserver.url_for("/").rstrip("/"))
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--json")
    assert code == 0, err
    assert len(json.loads(out)["changes"]) == 50_000


def test_bids_root_that_is_a_file_is_refused(cli, emulator, tmp_path):
    root = tmp_path / "bids"
    root.write_text("not a folder")
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 1 and "is not a directory" in err
    assert root.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["bids"]


def test_missing_bids_root_is_refused_by_check(cli, tmp_path):
    code, out, err = cli("check", str(tmp_path / "nowhere"))
    assert code == 1 and f"BIDS root {tmp_path / 'nowhere'} does not exist" in err
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_bids_root_is_a_clear_error(cli, dataset):
    before = tree(dataset)
    dataset.chmod(0o555)
    try:
        code, out, err = cli("apply", str(dataset), "-p", "PROJ", "--yes")
    finally:
        dataset.chmod(0o755)
    assert code == 1 and "Traceback" not in err and str(dataset) in err, out + err
    assert tree(dataset) == before


WORK_AREA_LINKS = {
    # where the link stands (relative to the root; {id} is the session's), what apply says
    "export folder": ("staging/{id}/dicom", "is a symbolic link; refusing to export into it"),
    "staging folder": ("staging/{id}", "xnat2bids keeps its work area in real folders"),
    "staging": ("staging", "xnat2bids keeps its work area in real folders"),
    "session log": ("logs/{id}.log", "xnat2bids keeps its work area in real folders"),
}


@pytest.mark.parametrize("case", sorted(WORK_AREA_LINKS))
def test_a_link_in_the_work_area_is_refused_and_where_it_points_is_untouched(cli, emulator, tmp_path, case):
    where, message = WORK_AREA_LINKS[case]
    exp = emulator.archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    emulator.archive.add_scan(exp.id, "1", type="anat-T1w", series_description="anat-T1w", files={"1.dcm": b"x"})
    outside = tmp_path / "outside"
    (outside / "code").mkdir(parents=True)
    (outside / "thesis.txt").write_text("draft\n")
    (outside / "code/analysis.py").write_text("print(1)\n")
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    link = tmp_path / "bids/.xnat2bids" / where.format(id=exp.id)
    link.parent.mkdir(parents=True)
    link.symlink_to(outside / "thesis.txt" if where.endswith(".log") else outside)
    code, out, err = cli("apply", str(tmp_path / "bids"), "-p", "PROJ", "--yes")
    assert code == 1 and message in out + err, out + err
    assert {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()} == before
    assert not lock_path(tmp_path / "bids").exists()


@pytest.mark.parametrize("exp_id", ["XNAT_E00001\n", "../XNAT_E00001", "..", "XNAT E1", ""])
def test_an_experiment_id_that_is_not_an_accession_id_names_no_work_folder(tmp_path, exp_id):
    from reconcile.errors import UnsafePathError
    from reconcile.workarea import WorkArea

    with pytest.raises(UnsafePathError, match="is not a plain XNAT accession ID"):
        WorkArea(tmp_path).staging(exp_id)


def test_a_scan_id_with_control_characters_is_refused(cli, emulator, tmp_path):
    exp = emulator.archive.add_session("PROJ", "S1", "S1_MR1", date="2024-01-10")
    emulator.archive.add_scan(exp.id, "2\x1b[31mRED\x1b[0m\n", type="anat-T1w", series_description="anat-T1w",
                              files={"1.dcm": b"x"})
    root = tmp_path / "bids"
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--keep-dicom")
    assert code == 1 and "1 failed" in out
    assert "XNAT lists an unsafe file name '2\\x1b[31mRED\\x1b[0m\\n'" in out + err, out + err
    assert tree(root) == {}


def test_a_session_log_that_cannot_be_written_fails_that_session_only(cli, emulator, tmp_path):
    # As a full disk would: writing the failure to the log fails too, and the run still goes on.
    from worlds import SMALL

    from reconcile.demo import populate

    populate(emulator.archive, "PROJ", [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-10")],
             series=SMALL[:1])
    first = emulator.archive.sessions("PROJ")[0]
    root = tmp_path / "bids"
    (root / ".xnat2bids/logs" / f"{first.id}.log").mkdir(parents=True)  # open(…, "a") fails
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1")
    assert code == 1, out + err
    assert "Apply complete: 1 done, 1 failed, 0 skipped; lock serial 1; took " in out
    assert sorted(read_lock_ids(root)) == [s.id for s in emulator.archive.sessions("PROJ")[1:]]
    code, out, _ = cli("history", str(root))
    assert "1 done, 1 failed, 0 skipped; serial 0 → 1" in out


def read_lock_ids(root: Path) -> list[str]:
    from reconcile.lock import read_lock

    return list(read_lock(root).sessions)


def test_a_history_that_cannot_be_appended_to_is_a_warning_after_the_summary(cli, emulator, tmp_path):
    from worlds import SMALL

    from reconcile.demo import populate

    populate(emulator.archive, "PROJ", [("01", "01_MR1", "2024-01-10")], series=SMALL[:1])
    root = tmp_path / "bids"
    (root / ".xnat2bids/history.jsonl").mkdir(parents=True)  # as a full disk would refuse the append
    code, out, err = cli("apply", str(root), "-p", "PROJ", "--yes")
    assert code == 0, out + err
    assert "Apply complete: 1 done, 0 failed, 0 skipped; lock serial 1; took " in out
    assert "warning: could not append this apply to the history" in err
    assert read_lock_ids(root) == [emulator.archive.sessions("PROJ")[0].id]
