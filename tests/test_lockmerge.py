"""Merging two clones' locks session by session (`xnat2bids merge-lock`, a git merge driver)."""

from __future__ import annotations

import json
from dataclasses import replace

from test_lock import lock_with, record
from worlds import SMALL, add, each_applied_one, git, redate, two_clones

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


def test_a_session_both_sides_changed_differently_is_a_conflict_and_the_rest_still_merges():
    base = lock_with(record(1))
    ours = _clone(base, replace(record(1), date="2024-02-01", exported_at="2024-02-02T10:00:00Z"))
    theirs = _clone(base, replace(record(1), date="2024-03-01", exported_at="2024-03-02T10:00:00Z"), record(2))
    merged = merge_locks(base, ours, theirs)
    assert merged.conflicts == ("XNAT_E00001: exported again at sub-SUBJ01/ses-MR1 on 2024-02-02T10:00:00Z "
                                "(date 2024-02-01) here, exported again at sub-SUBJ01/ses-MR1 on "
                                "2024-03-02T10:00:00Z (date 2024-03-01) in the other clone",)
    # The other clone's new session is kept; of the conflicting one, this clone's record.
    assert merged.lock.sessions == {"XNAT_E00001": ours.sessions["XNAT_E00001"], "XNAT_E00002": record(2)}
    assert loads_lock(dumps_lock(merged.lock)) == merged.lock
    gone = merge_locks(base, ours, _clone(base).without_session("XNAT_E00001"))
    assert "forgotten in the other clone" in gone.conflicts[0]
    assert gone.lock.sessions == ours.sessions


def test_two_sessions_merged_into_one_folder_are_a_conflict_and_ours_stays():
    # The other clone exported a session XNAT then replaced (archived again under a new ID), this
    # clone the replacement: both at one folder, which a lock must never record.
    base = lock_with(record(1))
    replaced = replace(record(3), experiment_id="XNAT_E00002")
    assert replaced.address == record(3).address
    mine, other = _clone(base, record(3)), _clone(base, replaced)
    merged = merge_locks(base, mine, other)
    assert sorted(merged.lock.sessions) == ["XNAT_E00001", "XNAT_E00003"]
    assert merged.conflicts == (f"XNAT_E00002: exported at {replaced.address.path} in the other clone, where "
                                "XNAT_E00003 is recorded here; left out of the lock",)
    assert sorted(merge_locks(base, other, mine).lock.sessions) == ["XNAT_E00001", "XNAT_E00002"]
    assert loads_lock(dumps_lock(merged.lock)) == merged.lock  # valid: one session per folder


def test_the_driver_names_the_lock_not_gits_temporary_file_and_says_the_way_out(cli, tmp_path):
    base = lock_with(record(1))
    files = {name: tmp_path / f".merge_file_{name}" for name in ("base", "ours", "theirs")}
    files["base"].write_text(dumps_lock(base))
    files["ours"].write_text(dumps_lock(_clone(base, replace(record(1), date="2024-02-01"))))
    files["theirs"].write_text(dumps_lock(_clone(base, replace(record(1), date="2024-03-01"), record(2))))
    code, out, err = cli("merge-lock", *(str(files[n]) for n in ("base", "ours", "theirs")))
    assert code == 1
    assert ("xnat2bids merge-lock: 1 conflict(s); the lock (.xnat2bids.lock) holds every session both sides "
            "merged, and this clone's side of the sessions named") in err
    assert ".merge_file_" not in err and "git merge --abort" in err and "git checkout --ours -- sub-" in err
    merged = loads_lock(files["ours"].read_text())
    assert sorted(merged.sessions) == ["XNAT_E00001", "XNAT_E00002"] and merged.sessions["XNAT_E00001"].date == "2024-02-01"


def test_the_same_export_in_both_clones_is_no_conflict_but_other_bytes_are():
    base = lock_with(record(1))
    mine = record(2)
    same = replace(mine, exported_at="2030-01-01T00:00:00Z",
                   outputs=tuple(replace(o, mtime_ns=o.mtime_ns + 5) for o in mine.outputs))
    merged = merge_locks(base, _clone(base, mine), _clone(base, same))
    assert merged.conflicts == () and merged.lock.sessions["XNAT_E00002"] == mine  # ours kept
    other = replace(same, outputs=(replace(same.outputs[0], sha256="f" * 64), *same.outputs[1:]))
    assert merge_locks(base, _clone(base, mine), _clone(base, other)).conflicts[0].startswith("XNAT_E00002: ")


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


def test_a_conflict_resolved_as_the_driver_says_keeps_the_other_clones_sessions(cli, emulator, tmp_path):
    first = add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11")],
                series=SMALL[:1])["01_MR1"]
    ours, theirs = two_clones(cli, tmp_path)
    redate(emulator, first, "2024-02-01")  # exported again in one clone, which also exports 02
    assert cli("apply", str(ours), "-p", "PROJ", "--yes", "--git-commit")[0] == 0
    redate(emulator, first, "2024-03-01")  # and again, otherwise, in the other
    assert cli("apply", str(theirs), "-p", "PROJ", "--session", "01_MR1", "--yes", "--git-commit")[0] == 0
    before = git(theirs, "rev-parse", "HEAD").stdout.strip()

    rebase = git(theirs, "pull", "--rebase", "origin", "main")
    assert rebase.returncode != 0
    assert "the lock (.xnat2bids.lock) holds every session both sides merged, and the upstream's side" in rebase.stderr
    assert "(date 2024-02-01, last_modified " in rebase.stderr and ") upstream, exported again" in rebase.stderr
    assert "(date 2024-03-01, last_modified " in rebase.stderr and ") in the commit being replayed" in rebase.stderr
    assert "`git rebase --continue`; or `git rebase --abort`" in rebase.stderr
    assert git(theirs, "rebase", "--abort").returncode == 0
    assert git(theirs, "rev-parse", "HEAD").stdout.strip() == before

    merge = git(theirs, "pull", "--no-rebase", "origin", "main")
    assert merge.returncode != 0 and "this clone's side of the sessions named" in merge.stderr, merge.stderr
    assert "conflict: XNAT_E00001: exported again at sub-01/ses-01MR1" in merge.stderr
    # The hint, to the letter: this clone's folders of the session named, the lock as written.
    assert git(theirs, "checkout", "--ours", "--", "sub-01").returncode == 0
    assert git(theirs, "add", ".xnat2bids.lock", "sub-01").returncode == 0
    assert git(theirs, "commit", "--no-edit").returncode == 0, git(theirs, "status").stdout
    lock = read_lock(theirs)
    assert sorted(r.session_label for r in lock.sessions.values()) == ["01_MR1", "02_MR1"]
    assert lock.sessions[first.id].date == "2024-03-01"
    code, out, err = cli("check", str(theirs), "--full")
    assert code == 0, out + err
    code, out, err = cli("plan", str(theirs), "-p", "PROJ", "--detailed-exitcode")
    assert code == 0 and "No changes. 2 sessions up to date." in out, out + err


def test_git_merges_two_clones_locks_with_the_driver(cli, emulator, tmp_path):
    add(emulator.archive, [("01", "01_MR1", "2024-01-10"), ("02", "02_MR1", "2024-01-11"),
                           ("03", "03_MR1", "2024-01-12")], series=SMALL[:1])
    ours, theirs = two_clones(cli, tmp_path)
    each_applied_one(cli, ours, theirs)
    git(theirs, "pull", "-q", "--no-rebase", "origin", "main")  # participants.tsv may still conflict: not ours
    unmerged = {line.split("\t")[1] for line in git(theirs, "ls-files", "--unmerged").stdout.splitlines()}
    assert ".xnat2bids.lock" not in unmerged and ".xnat2bids/history.jsonl" not in unmerged
    lock = read_lock(theirs)
    assert sorted(r.session_label for r in lock.sessions.values()) == ["01_MR1", "02_MR1", "03_MR1"]
    assert lock.serial == 3  # past both clones' 2
    code, out, err = cli("check", str(theirs), "--full")
    assert code == 0, out + err
    # participants.tsv resolved (both rows kept) and the merge committed: apply waits for that.
    (theirs / "participants.tsv").write_text("participant_id\nsub-01\nsub-02\nsub-03\n")
    assert git(theirs, "commit", "-qa", "--no-edit").returncode == 0
    # The merged history holds both clones' entries, the other clone's last: the next apply finds
    # every recorded session told of, and writes no "unrecorded" entry for this clone's export.
    assert cli("apply", str(theirs), "-p", "PROJ", "--yes")[0] == 0
    history = [json.loads(line) for line in (theirs / ".xnat2bids/history.jsonl").read_text().splitlines()]
    assert [e["operation"] for e in history] == ["apply", "apply", "apply"]
