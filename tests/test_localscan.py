"""The local scan: what the disk holds of the outputs a lock records."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from reconcile.localscan import stat_outputs
from reconcile.lock import Lock
from reconcile.model import FileStat, OutputRecord, SessionRecord


def lock_recording(*paths: str) -> Lock:
    outputs = tuple(OutputRecord(p, 1, "0" * 64, 1) for p in paths)
    record = SessionRecord("E1", "P", "S1", "SUBJ01", "SUBJ01_MR1", "SUBJ01", "MR1", None, "", "", "xnat:mrSessionData",
                           "2024-01-01T00:00:00Z", "f", outputs=outputs)
    return Lock.new().with_session(record)


def _open_fds() -> int | None:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


@pytest.fixture(params=["relative to the root's descriptor", "by full path"])
def stat_way(request, monkeypatch):
    if request.param == "by full path":  # as on systems without dir_fd support
        monkeypatch.setattr(os, "supports_dir_fd", set())


def test_scan_sees_recorded_files_and_leaves_out_missing_ones_and_directories(tmp_path, stat_way):
    session = tmp_path / "sub-SUBJ01" / "ses-MR1" / "anat"
    session.mkdir(parents=True)
    (session / "a.nii.gz").write_bytes(b"12345")
    (session / "dir.json").mkdir()
    lock = lock_recording("sub-SUBJ01/ses-MR1/anat/a.nii.gz", "sub-SUBJ01/ses-MR1/anat/gone.json",
                          "sub-SUBJ01/ses-MR1/anat/dir.json")
    open_before = _open_fds()
    files = stat_outputs(tmp_path, lock).files
    assert _open_fds() == open_before
    st = (session / "a.nii.gz").stat()
    assert files == {"sub-SUBJ01/ses-MR1/anat/a.nii.gz": FileStat(5, st.st_mtime_ns)}


def test_scan_of_a_missing_root_sees_nothing(tmp_path, stat_way):
    assert stat_outputs(tmp_path / "nowhere", lock_recording("sub-SUBJ01/a.json")).files == {}


def test_check_refuses_outputs_that_are_links_out_of_the_root_and_keeps_links_inside(tmp_path):
    import hashlib

    from reconcile.check import check_outputs

    root, elsewhere = tmp_path / "bids", tmp_path / "elsewhere"
    data = b"{}\n"
    paths = ("sub-01/ses-1/anat/a.json", "sub-02/ses-1/anat/b.json", "sub-03/ses-1/anat/c.json")
    for rel in paths:
        (root / rel).parent.mkdir(parents=True)
    elsewhere.mkdir()
    (elsewhere / "a.json").write_bytes(data)
    os.symlink(elsewhere / "a.json", root / paths[0])  # a linked file
    (elsewhere / "ses-1" / "anat").mkdir(parents=True)
    (elsewhere / "ses-1" / "anat" / "b.json").write_bytes(data)
    (root / "sub-02" / "ses-1" / "anat").rmdir()
    (root / "sub-02" / "ses-1").rmdir()
    os.symlink(elsewhere / "ses-1", root / "sub-02" / "ses-1")  # a linked session folder
    annexed = root / ".git/annex/objects/c.json"  # git-annex: a link to a file inside the root
    annexed.parent.mkdir(parents=True)
    annexed.write_bytes(data)
    os.symlink(os.path.relpath(annexed, (root / paths[2]).parent), root / paths[2])
    lock = Lock.new()
    for n, path in enumerate(paths, start=1):
        output = OutputRecord(path, len(data), hashlib.sha256(data).hexdigest(), 1)
        lock = lock.with_session(SessionRecord(
            f"E{n}", "P", f"S{n}", f"0{n}", f"0{n}_1", f"0{n}", "1", None, "", "", "xnat:mrSessionData",
            "2024-01-01T00:00:00Z", "f", outputs=(output,)))
    report = check_outputs(root, lock, full=True)
    assert [(p.code.value, p.experiment_id, p.path, p.message) for p in report.problems] == [
        ("link_outside_root", "E1", paths[0],
         f"E1 sub-01/ses-1: {paths[0]} is a link out of the BIDS root, to {elsewhere / 'a.json'}"),
        ("link_outside_root", "E2", paths[1],
         f"E2 sub-02/ses-1: {paths[1]} is a link out of the BIDS root, to {elsewhere / 'ses-1/anat/b.json'}"),
    ]


def test_check_names_two_sessions_at_one_folder_and_outputs_outside_their_session(tmp_path):
    from reconcile.check import check_outputs

    def session(n: int, subject: str, path: str) -> SessionRecord:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(b"x")
        return SessionRecord(f"E{n}", "P", f"S{n}", subject, f"{subject}_1", subject, "1", None, "", "",
                             "xnat:mrSessionData", "2024-01-01T00:00:00Z", "f",
                             outputs=(OutputRecord(path, 1, "0" * 64, 1),))

    lock = Lock.new().with_session(session(1, "01", "sub-01/ses-1/anat/a.json"))
    lock = lock.with_session(session(2, "01", "sub-02/ses-1/anat/b.json"))  # hand-edited: sub-02 → 01
    report = check_outputs(tmp_path, lock)
    assert [(p.code.value, p.experiment_id, p.path, p.message) for p in report.problems] == [
        ("shared_session_folder", "E2", "sub-01/ses-1", "E1 and E2 are both recorded at sub-01/ses-1"),
        ("outside_session_folder", "E2", "sub-02/ses-1/anat/b.json",
         "E2 sub-01/ses-1: output sub-02/ses-1/anat/b.json lies outside its session folder"),
    ]


def _recording(root, files: dict[str, bytes], mtime_ns: int = 1) -> Lock:
    import hashlib

    outputs = []
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        outputs.append(OutputRecord(rel, len(data), hashlib.sha256(data).hexdigest(), mtime_ns))
    record = SessionRecord("E1", "P", "S1", "SUBJ01", "SUBJ01_MR1", "SUBJ01", "MR1", None, "", "", "xnat:mrSessionData",
                           "2024-01-01T00:00:00Z", "f", outputs=tuple(outputs))
    return Lock.new().with_session(record)


def test_an_output_with_a_new_time_but_its_recorded_bytes_is_told_from_an_edit(tmp_path, monkeypatch):
    from reconcile import localscan

    lock = _recording(tmp_path, {"sub-SUBJ01/ses-MR1/anat/a.json": b"{}\n", "sub-SUBJ01/ses-MR1/anat/b.json": b"[1]\n"})
    (tmp_path / "sub-SUBJ01/ses-MR1/anat/b.json").write_bytes(b"[2]\n")  # edited, same size
    local = stat_outputs(tmp_path, lock)
    assert local.same_content == {"sub-SUBJ01/ses-MR1/anat/a.json"}
    assert set(local.files) == {"sub-SUBJ01/ses-MR1/anat/a.json", "sub-SUBJ01/ses-MR1/anat/b.json"}

    hashed: list[str] = []
    real = localscan.hash_files
    monkeypatch.setattr(localscan, "hash_files", lambda paths: hashed.extend(paths) or real(paths))
    assert stat_outputs(tmp_path, lock).same_content == {"sub-SUBJ01/ses-MR1/anat/a.json"}
    assert hashed == [str(tmp_path / "sub-SUBJ01/ses-MR1/anat/b.json")]  # a.json vouched for by its stat

    os.utime(tmp_path / "sub-SUBJ01/ses-MR1/anat/a.json", ns=(5, 5))  # touched again: hashed again
    hashed.clear()
    assert stat_outputs(tmp_path, lock).same_content == {"sub-SUBJ01/ses-MR1/anat/a.json"}
    assert str(tmp_path / "sub-SUBJ01/ses-MR1/anat/a.json") in hashed


def test_a_damaged_verified_file_only_costs_a_hash(tmp_path):
    from reconcile.localscan import Verified

    lock = _recording(tmp_path, {"sub-SUBJ01/ses-MR1/anat/a.json": b"{}\n"})
    assert stat_outputs(tmp_path, lock).same_content == {"sub-SUBJ01/ses-MR1/anat/a.json"}
    stored = Verified.of(tmp_path).path
    assert stored is not None and stored.exists()
    stored.write_text("not json")
    assert stat_outputs(tmp_path, lock).same_content == {"sub-SUBJ01/ses-MR1/anat/a.json"}


@pytest.mark.skipif(os.name != "posix" or os.getuid() != 0, reason="giving a file to another user needs root")
def test_another_users_verified_file_vouches_for_nothing(tmp_path):
    # A cache folder a lab shares: what another member says was verified could hide their edit.
    from reconcile.localscan import Verified

    lock = _recording(tmp_path, {"sub-SUBJ01/ses-MR1/anat/a.json": b"{}\n"})
    stat_outputs(tmp_path, lock)
    stored = Verified.of(tmp_path).path
    assert Verified.of(tmp_path).entries  # this user's own: read
    assert stored.stat().st_mode & 0o777 == 0o600
    stored.chmod(0o664)  # one a member of its group could rewrite in place, keeping its owner
    assert Verified.of(tmp_path).entries == {}
    stored.chmod(0o600)
    os.chown(stored, 4242, 4242)
    assert Verified.of(tmp_path).entries == {}


def test_an_output_linked_out_of_the_root_is_not_judged_by_its_target_one_linked_inside_is(tmp_path):
    root = tmp_path / "bids"
    lock = _recording(root, {"sub-SUBJ01/ses-MR1/anat/a.json": b"{}\n", "sub-SUBJ01/ses-MR1/anat/b.json": b"[1]\n"},
                      mtime_ns=0)
    out, annexed = root / "sub-SUBJ01/ses-MR1/anat/a.json", root / "sub-SUBJ01/ses-MR1/anat/b.json"
    (tmp_path / "elsewhere.json").write_bytes(out.read_bytes())
    out.unlink()
    out.symlink_to(tmp_path / "elsewhere.json")
    (root / ".git/annex").mkdir(parents=True)
    annexed.rename(root / ".git/annex/b")
    annexed.symlink_to("../../../.git/annex/b")  # as git-annex links its files: inside the root
    local = stat_outputs(root, lock)
    assert local.outside == {"sub-SUBJ01/ses-MR1/anat/a.json"}
    assert set(local.files) == {"sub-SUBJ01/ses-MR1/anat/b.json"}
    assert local.files["sub-SUBJ01/ses-MR1/anat/b.json"].size == 4


@pytest.mark.parametrize("many", [True, False], ids=["whole-lock", "few-records"])
def test_outputs_in_a_datatype_folder_linked_out_of_the_root_are_outside(tmp_path, many):
    # `anat/` moved away and linked back: plan sees what check sees (a link out of the root).
    from reconcile.localscan import stat_records

    root = tmp_path / "bids"
    lock = _recording(root, {"sub-SUBJ01/ses-MR1/anat/a.json": b"{}\n", "sub-SUBJ01/ses-MR1/func/b.json": b"[1]\n"})
    anat = root / "sub-SUBJ01/ses-MR1/anat"
    anat.rename(tmp_path / "anat")
    anat.symlink_to(tmp_path / "anat")
    records = lock.sessions.values() if many else list(lock.sessions.values())
    local = stat_records(root, records)
    assert local.outside == {"sub-SUBJ01/ses-MR1/anat/a.json"}
    assert set(local.files) == {"sub-SUBJ01/ses-MR1/func/b.json"}
    # Linked to a folder inside the root, it is judged by what it holds.
    anat.unlink()
    (tmp_path / "anat").rename(root / "kept-anat")
    anat.symlink_to("../../kept-anat")
    local = stat_records(root, records)
    assert local.outside == set() and set(local.files) == {"sub-SUBJ01/ses-MR1/anat/a.json", "sub-SUBJ01/ses-MR1/func/b.json"}


def test_full_hashes_every_output_even_those_the_verified_store_vouches_for(tmp_path):
    from reconcile.localscan import Verified

    a, b = "sub-SUBJ01/ses-MR1/anat/a.json", "sub-SUBJ01/ses-MR1/anat/b.json"
    lock = _recording(tmp_path, {a: b"{}\n", b: b"[1]\n"})  # recorded times differ from the files'
    assert stat_outputs(tmp_path, lock).same_content == {a, b}  # hashed once, then vouched for by stat
    (tmp_path / b).write_bytes(b"[9]\n")
    verified = Verified.of(tmp_path)  # bit rot: the content changes, nothing the store keys on does
    out = next(o for o in lock.sessions["E1"].outputs if o.path == b)
    verified.add(out, (tmp_path / b).stat())
    verified.save()
    assert stat_outputs(tmp_path, lock).same_content == {a, b}  # the store's word, without --full
    full = stat_outputs(tmp_path, lock, full=True)
    assert full.same_content == {a} and full.differs == frozenset()  # touched and other bytes: an edit
    assert full.hashed_now == 1


def test_full_hashes_only_the_sessions_it_is_asked_for(tmp_path):
    a = "sub-SUBJ01/ses-MR1/anat/a.json"
    lock = _recording(tmp_path, {a: b"{}\n"})
    out = lock.sessions["E1"].outputs[0]
    st = (tmp_path / a).stat()
    (tmp_path / a).write_bytes(b"[]\n")
    os.utime(tmp_path / a, ns=(st.st_atime_ns, st.st_mtime_ns))
    lock = lock.with_session(replace(lock.sessions["E1"], outputs=(replace(out, mtime_ns=st.st_mtime_ns),)))
    assert stat_outputs(tmp_path, lock, full=lambda rec: rec.experiment_id == "E2").differs == frozenset()
    assert stat_outputs(tmp_path, lock, full=lambda rec: rec.experiment_id == "E1").differs == {a}


def test_a_folder_of_empty_folders_holds_nothing_any_file_or_link_is_something(tmp_path):
    from reconcile.localscan import holds_nothing

    session = tmp_path / "sub-01" / "ses-01"
    (session / "anat").mkdir(parents=True)
    (session / "func" / "deeper").mkdir(parents=True)
    assert holds_nothing(tmp_path, "sub-01/ses-01")
    assert not holds_nothing(tmp_path, "sub-01/ses-02")  # not there: nothing to take the place of
    (tmp_path / "elsewhere").mkdir()
    (session / "func" / "deeper" / "link").symlink_to(tmp_path / "elsewhere")  # an empty folder, but a link
    assert not holds_nothing(tmp_path, "sub-01/ses-01")
    (session / "func" / "deeper" / "link").unlink()
    (session / "anat" / "gone").symlink_to(tmp_path / "nowhere")  # a broken link is something too
    assert not holds_nothing(tmp_path, "sub-01/ses-01")
    (session / "anat" / "gone").unlink()
    (session / "anat" / ".DS_Store").write_bytes(b"")  # hidden and empty, still a file
    assert not holds_nothing(tmp_path, "sub-01/ses-01")
    (session / "anat" / ".DS_Store").unlink()
    assert holds_nothing(tmp_path, "sub-01/ses-01")
    (tmp_path / "sub-02").symlink_to(tmp_path / "sub-01")  # the folder itself through a link: never judged empty
    assert not holds_nothing(tmp_path, "sub-02/ses-01")
    (session.parent / "ses-03").symlink_to(session)
    assert not holds_nothing(tmp_path, "sub-01/ses-03")
    (session.parent / "ses-04").write_bytes(b"")
    assert not holds_nothing(tmp_path, "sub-01/ses-04")
