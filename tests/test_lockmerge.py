"""Merging two clones' locks session by session (`xnat2bids merge-lock`, a git merge driver)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

from test_lock import lock_with, record
from worlds import SMALL, add

from reconcile.lock import dumps_lock, loads_lock, read_lock
from reconcile.lockmerge import merge_locks


def _clone(lock, *changed):
    """`lock` with these records added or replaced, written once more (serial + 1)."""
    for r in changed:
        lock = lock.with_session(r)
    return replace(lock, serial=lock.serial + 1)


def test_sessions_each_side_added_or_changed_are_all_kept_and_the_serial_passes_both():
    base = replace(lock_with(record(1), record(2)), serial=3)
    ours = _clone(base, record(3))
    theirs = replace(_clone(base, record(4), replace(record(2), date="2024-02-01")), serial=6)
    theirs = theirs.without_session("XNAT_E00001")  # forgotten there
    merged = merge_locks(base, ours, theirs)
    assert merged.conflicts == ()
    assert sorted(merged.lock.sessions) == ["XNAT_E00002", "XNAT_E00003", "XNAT_E00004"]
    assert merged.lock.sessions["XNAT_E00002"].date == "2024-02-01"
    assert merged.lock.serial == 7 and merged.lock.lineage == base.lineage
    assert loads_lock(dumps_lock(merged.lock)) == merged.lock  # a valid lock


def test_a_session_both_sides_changed_differently_is_a_conflict():
    base = lock_with(record(1))
    ours = _clone(base, replace(record(1), date="2024-02-01", exported_at="2024-02-02T10:00:00Z"))
    theirs = _clone(base, replace(record(1), date="2024-03-01", exported_at="2024-03-02T10:00:00Z"))
    merged = merge_locks(base, ours, theirs)
    assert merged.lock is None
    assert merged.conflicts == ("XNAT_E00001: exported again at sub-SUBJ01/ses-MR1 on 2024-02-02T10:00:00Z here, "
                                "exported again at sub-SUBJ01/ses-MR1 on 2024-03-02T10:00:00Z in the other clone",)
    gone = merge_locks(base, ours, _clone(base).without_session("XNAT_E00001"))
    assert gone.lock is None and "forgotten in the other clone" in gone.conflicts[0]


def test_the_driver_names_the_lock_not_gits_temporary_file_and_says_the_way_out(cli, tmp_path):
    base = lock_with(record(1))
    files = {name: tmp_path / f".merge_file_{name}" for name in ("base", "ours", "theirs")}
    files["base"].write_text(dumps_lock(base))
    files["ours"].write_text(dumps_lock(_clone(base, replace(record(1), date="2024-02-01"))))
    files["theirs"].write_text(dumps_lock(_clone(base, replace(record(1), date="2024-03-01"))))
    before = files["ours"].read_bytes()
    code, out, err = cli("merge-lock", *(str(files[n]) for n in ("base", "ours", "theirs")))
    assert code == 1
    assert "xnat2bids merge-lock: 1 conflict(s); the lock (.xnat2bids.lock) is left as this clone had it" in err
    assert ".merge_file_" not in err and "git merge --abort" in err
    assert files["ours"].read_bytes() == before


def test_the_same_export_in_both_clones_is_no_conflict_but_other_bytes_are():
    base = lock_with(record(1))
    mine = record(2)
    same = replace(mine, exported_at="2030-01-01T00:00:00Z",
                   outputs=tuple(replace(o, mtime_ns=o.mtime_ns + 5) for o in mine.outputs))
    merged = merge_locks(base, _clone(base, mine), _clone(base, same))
    assert merged.conflicts == () and merged.lock.sessions["XNAT_E00002"] == mine  # ours kept
    other = replace(same, outputs=(replace(same.outputs[0], sha256="f" * 64), *same.outputs[1:]))
    assert merge_locks(base, _clone(base, mine), _clone(base, other)).lock is None


def test_two_first_exports_merge_into_one_lineage_but_locks_of_two_datasets_do_not():
    # Cloned before any export: each clone's first apply began a lineage, and git has no base lock.
    ours = replace(lock_with(record(1)), config_fingerprint="a" * 16)
    theirs = replace(lock_with(record(2)), serial=4, config_fingerprint="b" * 16)
    merged, reverse = merge_locks(None, ours, theirs), merge_locks(None, theirs, ours)
    assert merged.conflicts == () and sorted(merged.lock.sessions) == ["XNAT_E00001", "XNAT_E00002"]
    kept = min((ours, theirs), key=lambda lock: lock.lineage)
    assert (merged.lock.lineage, merged.lock.config_fingerprint) == (kept.lineage, kept.config_fingerprint)
    assert (reverse.lock.lineage, reverse.lock.config_fingerprint) == (kept.lineage, kept.config_fingerprint)
    assert merged.lock.serial == 5
    merged = merge_locks(ours, ours, theirs)  # a common lock of one lineage, the other side another
    assert merged.lock is None and "different lineages" in merged.conflicts[0]


def test_git_merges_two_clones_locks_with_the_driver(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12")], series=SMALL[:1])
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"

    def git(where, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@x", *args],
                              capture_output=True, text=True)

    ours.mkdir()
    git(ours, "init", "-q", "-b", "main")
    git(ours, "config", "user.name", "t")
    git(ours, "config", "user.email", "t@x")
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "01_MR1", "--yes", "--git-commit")[0] == 0
    git(tmp_path, "clone", "-q", str(ours), str(theirs))
    git(theirs, "config", "merge.xnat2bids.driver", f"{sys.executable} -m reconcile merge-lock %O %A %B")
    (theirs / ".git/info/attributes").write_text(".xnat2bids.lock merge=xnat2bids\n")
    assert cli("apply", str(ours), "-p", "PROJ", "--session", "02_MR1", "--yes", "--git-commit")[0] == 0
    assert cli("apply", str(theirs), "-p", "PROJ", "--session", "03_MR1", "--yes", "--git-commit")[0] == 0
    git(theirs, "pull", "-q", "--no-rebase", "origin", "main")  # participants.tsv may still conflict: not ours
    unmerged = {line.split("\t")[1] for line in git(theirs, "ls-files", "--unmerged").stdout.splitlines()}
    assert ".xnat2bids.lock" not in unmerged and ".xnat2bids/history.jsonl" not in unmerged
    lock = read_lock(theirs)
    assert sorted(r.session_label for r in lock.sessions.values()) == ["01_MR1", "02_MR1", "03_MR1"]
    assert lock.serial == 3  # past both clones' 2
    code, out, err = cli("check", str(theirs), "--full")
    assert code == 0, out + err
    # The merged history holds both clones' entries, the other clone's last: the next apply finds
    # every recorded session told of, and writes no "unrecorded" entry for this clone's export.
    assert cli("apply", str(theirs), "-p", "PROJ", "--yes")[0] == 0
    history = [json.loads(line) for line in (theirs / ".xnat2bids/history.jsonl").read_text().splitlines()]
    assert [e["operation"] for e in history] == ["apply", "apply", "apply"]
