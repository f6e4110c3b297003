"""The planner's semantics, one test per row of plan-scenarios.md. Pure: no server, no files."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from reconcile.config import Config, ConversionSettings, NamingSettings, parse_config
from reconcile.lock import Lock
from reconcile.model import (
    Experiment,
    FileStat,
    OutputRecord,
    RemoteFile,
    Scan,
    SessionRecord,
    format_timestamp,
)
from reconcile.plan import (
    Action,
    LocalState,
    ProjectListing,
    RemoteState,
    Selection,
    compute_plan,
    older,
    recorded_scans,
    refuse_occupied,
    repairing,
)

T0 = datetime(2024, 1, 10, 14, 22, 5, 352000)
TOOLS = {"heudiconv": "1.5.1", "dcm2niix": "v1.0.20260724", "xnat2bids": "0.1.0"}
CONFIG = Config()


def exp(n: int, *, subject: str | None = None, label: str | None = None, date: str = "2024-01-10",
        modified: datetime = T0, inserted: datetime = T0, project: str = "PROJ", eid: str | None = None) -> Experiment:
    subject = subject or f"SUBJ{n:02d}"
    return Experiment(
        id=eid or f"XNAT_E{n:05d}", label=label or f"{subject}_MR1", project=project,
        subject_id=f"XNAT_S{n:05d}", subject_label=subject, date=date,
        insert_date=inserted, last_modified=modified,
    )


def scans_for(n_files: int = 2, size: int = 100) -> tuple[Scan, ...]:
    files = tuple(RemoteFile(f"{i}.dcm", size, f"{i:032x}", f"/x/{i}.dcm") for i in range(n_files))
    return (Scan("1", "anat-T1w", "anat-T1w", files), Scan("2", "func-bold_task-rest", "func-bold_task-rest", files))


def outputs_for(e: Experiment, address: str) -> tuple[OutputRecord, ...]:
    return (OutputRecord(f"{address}/anat/{address.replace('/', '_')}_T1w.nii.gz", 10, "0" * 64, 111),)


def record(e: Experiment, *, config: Config = CONFIG, scans: tuple[Scan, ...] | None = None,
           bids_subject: str | None = None, bids_session: str = "MR1", tools=TOOLS) -> SessionRecord:
    bids_subject = bids_subject or e.subject_label
    address = f"sub-{bids_subject}/ses-{bids_session}"
    conv = config.conversion_for(e.project, e.label)
    return SessionRecord(
        experiment_id=e.id, project=e.project, subject_id=e.subject_id, subject_label=e.subject_label,
        session_label=e.label, bids_subject=bids_subject, bids_session=bids_session, date=e.date,
        insert_date=format_timestamp(e.insert_date), last_modified=format_timestamp(e.last_modified),
        xsi_type=e.xsi_type, exported_at="2024-01-11T00:00:00Z", config_fingerprint=conv.fingerprint(),
        config_digests=conv.digests(), tools=dict(tools),
        scans=tuple(s.record() for s in (scans if scans is not None else scans_for())),
        outputs=outputs_for(e, address),
    )


def lock_of(*records: SessionRecord) -> Lock:
    lock = Lock.new()
    for r in records:
        lock = lock.with_session(r)
    return lock


def on_disk(*records: SessionRecord) -> LocalState:
    return LocalState({o.path: FileStat(o.size, o.mtime_ns) for r in records for o in r.outputs})


def listing(*exps: Experiment, project: str = "PROJ") -> ProjectListing:
    return ProjectListing(project, tuple(exps))


def plan_of(lock, remote_exps, local=None, *, config=CONFIG, deep=None, projects=("PROJ",), **kw):
    listings = tuple(listing(*[e for e in remote_exps if e.project == p], project=p) for p in projects)
    local = local if local is not None else on_disk(*lock.sessions.values())
    return compute_plan(lock, RemoteState(listings, deep), local, config, tools=TOOLS, **kw)


def only(plan, action):
    changes = [c for c in plan.changes if c.action is action]
    assert len(changes) == 1, plan.changes
    return changes[0]


def test_sessions_reproin_cannot_convert_are_noted_with_the_way_out(tmp_path):
    # PET and CT sessions are image sessions (planned), but ReproIn converts MR series alone.
    pet = replace(exp(2, label="SUBJ02_PET1"), xsi_type="xnat:petSessionData")
    ct = replace(exp(3, label="SUBJ03_CT1"), xsi_type="xnat:ctSessionData")
    plan = plan_of(Lock.new(), [exp(1), pet, ct])
    assert len(plan.changes) == 3
    assert ("2 sessions to export are not MR (xnat:ctSessionData 1, xnat:petSessionData 1): the ReproIn heuristic "
            "converts MR series alone, so apply would fail them; leave them out with [project.PROJ] exclude = "
            '["SUBJ02_PET1", "SUBJ03_CT1"], or convert them with a heuristic of your own ([project.PROJ.conversion] '
            "heuristic)") in plan.notes
    mr_only = plan_of(Lock.new(), [exp(1), replace(exp(4), xsi_type="xnat:petmrSessionData")])  # PET/MR: MR too
    assert not any("not MR" in n for n in mr_only.notes)
    (tmp_path / "pet_heuristic.py").write_text("def infotodict(seqinfo):\n    return {}\n")
    own = parse_config({"project": {"PROJ": {"conversion": {"heuristic": str(tmp_path / "pet_heuristic.py")}}}})
    assert not any("not MR" in n for n in plan_of(Lock.new(), [exp(1), pet], config=own).notes)
    excluded = parse_config({"project": {"PROJ": {"exclude": ["SUBJ02_PET1", "SUBJ03_CT1"]}}})
    assert not any("not MR" in n for n in plan_of(Lock.new(), [exp(1), pet, ct], config=excluded).notes)


def test_sessions_of_a_project_the_config_no_longer_names_are_noted_not_orphaned():
    # A finished study dropped from `projects`: its sessions stay, and the plan says so.
    kept, old = exp(1), exp(2, project="OLD")
    lock = lock_of(record(kept, bids_session="SUBJ01MR1"), record(old, bids_session="SUBJ02MR1"))
    config = parse_config({"projects": ["PROJ"]})
    plan = plan_of(lock, [kept], config=config)
    assert not plan.changes and plan.unchanged == 1
    assert ("1 session the lock records for projects not in the config's `projects` is not planned: OLD (1); it "
            "stays as exported (name the project again to plan it, or `xnat2bids forget ID` to drop one from the "
            "lock)") in plan.notes
    named = parse_config({"projects": ["PROJ", "OLD"]})  # named, but not listed this run (a failure): no note
    assert not any("not in the config's" in n for n in plan_of(lock, [kept], config=named).notes)
    assert not any("not in the config's" in n for n in plan_of(lock, [kept]).notes)  # -p alone: not asked


def test_new_session_is_planned_as_create():  # row 1
    plan = plan_of(Lock.new(), [exp(1)])
    change = only(plan, Action.CREATE)
    assert change.address.path == "sub-SUBJ01/ses-SUBJ01MR1"
    assert change.after.id == "XNAT_E00001"
    assert plan.unchanged == 0 and not plan.problems


def test_redated_session_is_planned_as_update_with_reason():  # row 2
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    redated = replace(e, date="2024-02-01", last_modified=T0 + timedelta(days=30))
    change = only(plan_of(lock, [redated]), Action.UPDATE)
    assert [r.code for r in change.reasons] == ["redated"]
    assert change.reasons[0].message == "date 2024-01-10 → 2024-02-01 (re-dated in XNAT)"
    assert (change.reasons[0].before, change.reasons[0].after) == ("2024-01-10", "2024-02-01")
    deep = only(plan_of(lock, [redated], deep={e.id: scans_for()}), Action.UPDATE)
    assert deep.reasons == change.reasons  # "same": the moved last_modified is the re-date's


def test_resaved_session_is_update_modified_and_deep_says_no_content_change():  # row 3
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    later = T0 + timedelta(hours=2)
    resaved = replace(e, last_modified=later)
    change = only(plan_of(lock, [resaved]), Action.UPDATE)
    assert change.reasons[0].message == f"modified in XNAT at {format_timestamp(later)}"
    deep = only(plan_of(lock, [resaved], deep={e.id: scans_for()}), Action.UPDATE)
    assert [r.code for r in deep.reasons] == ["modified", "no_content_change"]


def test_files_added_without_resave_are_seen_only_by_deep_plan():  # row 4
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1", scans=scans_for(2)))
    plain = plan_of(lock, [e])
    assert not plain.changes and plain.unchanged == 1
    assert any("--deep" in n for n in plain.notes)
    bigger = scans_for(2)
    extra = bigger[0].files + (RemoteFile("9.dcm", 600_000, "f" * 32, "/x/9.dcm"), RemoteFile("10.dcm", 600_000, "e" * 32, "/x/10.dcm"))
    deep_scans = (replace(bigger[0], files=extra), bigger[1])
    change = only(plan_of(lock, [e], deep={e.id: deep_scans}), Action.UPDATE)
    assert change.reasons[0].message == "scan 1: 2 files added (+1.2 MB)"
    assert not any("--deep" in n for n in plan_of(lock, [e], deep={e.id: deep_scans}).notes)


def test_scan_added_or_removed_is_reported_by_deep_plan():  # row 5
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    two = scans_for()
    added = two + (Scan("7", "dwi", "dwi_acq-b1500_dir-ap", two[0].files),)
    assert [r.message for r in only(plan_of(lock, [e], deep={e.id: added}), Action.UPDATE).reasons] == ["scan 7 added"]
    removed = two[:1]
    assert [r.message for r in only(plan_of(lock, [e], deep={e.id: removed}), Action.UPDATE).reasons] == ["scan 2 removed"]
    # Plain plan without last_modified moving cannot see it.
    assert plan_of(lock, [e]).unchanged == 1


def test_renamed_session_label_is_update_to_new_address():  # row 6
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    renamed = replace(e, label="SUBJ01_MR2", last_modified=T0 + timedelta(minutes=1))
    change = only(plan_of(lock, [renamed]), Action.UPDATE)
    assert change.address.path == "sub-SUBJ01/ses-SUBJ01MR2"
    assert change.reasons[0].message == "renamed ses-SUBJ01MR1 → ses-SUBJ01MR2"
    assert change.before.address.path == "sub-SUBJ01/ses-SUBJ01MR1"


def test_renamed_subject_updates_each_of_its_sessions():  # row 7
    e1, e2 = exp(1), exp(2, subject="SUBJ01", label="SUBJ01_MR2")
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ01MR2"))
    renamed = [replace(e, subject_label="P001") for e in (e1, e2)]
    plan = plan_of(lock, renamed)
    assert [c.action for c in plan.changes] == [Action.UPDATE, Action.UPDATE]
    assert all(c.reasons[0].message == "renamed sub-SUBJ01 → sub-P001" for c in plan.changes)


def test_a_subject_label_handed_on_in_one_run_waits_for_the_subject_leaving_it():  # row 7, a chain
    # XNAT: SUBJ02 renamed P02, then SUBJ01 renamed SUBJ02. participants.tsv's sub-SUBJ02 row is
    # SUBJ02's until its sessions have moved; the next run takes SUBJ01 there.
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ02MR1"))
    later = T0 + timedelta(minutes=1)
    now = [replace(e1, subject_label="SUBJ02", last_modified=later), replace(e2, subject_label="P02", last_modified=later)]
    plan = plan_of(lock, now)
    change = only(plan, Action.UPDATE)
    assert change.key.experiment_id == e2.id and change.reasons[0].message == "renamed sub-SUBJ02 → sub-P02"
    [problem] = plan.problems
    assert problem.message == (f"session {e1.id} (PROJ/SUBJ01_MR1) goes to sub-SUBJ02, which the lock still records "
                               f"for XNAT subject {e2.subject_id} (SUBJ02), itself being renamed")
    assert problem.hint == "apply moves SUBJ02's sessions out of sub-SUBJ02 first; apply again afterwards for this one"
    moved = lock.with_session(replace(lock.sessions[e2.id], bids_subject="P02", subject_label="P02"))
    next_run = plan_of(moved, now)
    assert e1.id in {c.key.experiment_id for c in next_run.changes} and not next_run.problems
    # A new subject given the label that is being handed over waits too.
    newcomer = exp(3, subject="SUBJ02")
    waits = plan_of(lock, [e1, replace(e2, subject_label="P02", last_modified=later), newcomer])
    assert [p.experiment_id for p in waits.problems] == [newcomer.id]
    assert newcomer.id not in {c.key.experiment_id for c in waits.changes}
    # Two subjects swapping labels never free one for the other: said, with the way out.
    swapped = [replace(e1, subject_label="SUBJ02", last_modified=later),
               replace(e2, subject_label="SUBJ01", last_modified=later)]
    swap = plan_of(lock, swapped)
    assert not swap.changes and len(swap.problems) == 2
    assert all(p.hint.startswith("the subjects swap labels: map one to a temporary label in [naming.subjects]")
               for p in swap.problems)
    assert "and apply twice (a label is taken only in the run after it was left), then remove the mapping and " \
           "apply once more" in swap.problems[0].hint
    # The hint to the letter: three applies.
    mapped = parse_config({"naming": {"subjects": {"SUBJ02": "SUBJ02tmp"}}})
    way_out = plan_of(lock, swapped, config=mapped)
    assert [(c.key.experiment_id, c.address.subject) for c in way_out.changes] == [(e1.id, "SUBJ02tmp")]
    assert [p.experiment_id for p in way_out.problems] == [e2.id]  # the next run takes sub-SUBJ01

    def applied(lock, change, config):
        now = next(e for e in swapped if e.id == change.key.experiment_id)
        return lock.with_session(record(now, config=config, bids_subject=change.address.subject,
                                        bids_session=change.address.session))

    after = applied(lock, way_out.changes[0], mapped)
    second = plan_of(after, swapped, config=mapped)
    assert [(c.key.experiment_id, c.address.subject) for c in second.changes] == [(e2.id, "SUBJ01")]
    assert not second.problems
    after = applied(after, second.changes[0], mapped)
    third = plan_of(after, swapped)
    assert [(c.key.experiment_id, c.address.subject) for c in third.changes] == [(e1.id, "SUBJ02")]
    assert not third.problems
    assert not plan_of(applied(after, third.changes[0], CONFIG), swapped).changes
    # Another XNAT subject that stays at the label (a merge the config asked for) does not wait.
    stays = [replace(e1, subject_label="SUBJ02", last_modified=later), e2]
    change = only(plan_of(lock, stays), Action.UPDATE)
    assert change.key.experiment_id == e1.id and not plan_of(lock, stays).problems


def test_deleted_session_is_orphan_and_never_more():  # row 8
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ02MR1"))
    plan = plan_of(lock, [e1])
    change = only(plan, Action.ORPHAN)
    assert change.key.experiment_id == e2.id and change.after is None
    assert change.reasons[0].message == "no longer in XNAT project PROJ"
    assert f"1 orphan: nothing is deleted; `xnat2bids forget {e2.id}` drops one from the lock and leaves its files" \
        in plan.notes


def test_rearchived_session_is_one_update_not_orphan_plus_create():  # row 9
    e1 = exp(1)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"))
    e2 = replace(e1, id="XNAT_E00099", insert_date=T0 + timedelta(days=3), last_modified=T0 + timedelta(days=3))
    plan = plan_of(lock, [e2])
    change = only(plan, Action.UPDATE)
    assert len(plan.changes) == 1
    assert change.reasons[0].message == "replaced in XNAT: XNAT_E00001 → XNAT_E00099"
    assert change.before.experiment_id == "XNAT_E00001" and change.key.experiment_id == "XNAT_E00099"
    # Selected by the old ID, the replacement is planned with it: not an orphan to forget.
    for selection in (Selection(sessions=("XNAT_E00001",)), Selection(sessions=("XNAT_E00099",))):
        selected = plan_of(lock, [e2, exp(2)], selection=selection)
        assert [(c.action, c.key.experiment_id) for c in selected.changes] == [(Action.UPDATE, "XNAT_E00099")]
    # Deleted in one project and archived again in another (row 10 too): both are said.
    moved = replace(e2, project="OTHER")
    plan = plan_of(lock, [moved, exp(3)], projects=("PROJ", "OTHER"))
    assert [r.message for r in only(plan, Action.UPDATE).reasons] == [
        "replaced in XNAT: XNAT_E00001 → XNAT_E00099", "project PROJ → OTHER"]
    # Archived again with another date: that is said too (a user re-dates to force a re-sync).
    redated = replace(e2, date="2024-02-01")
    assert [(r.code, r.message) for r in only(plan_of(lock, [redated]), Action.UPDATE).reasons] == [
        ("replaced", "replaced in XNAT: XNAT_E00001 → XNAT_E00099"), ("redated", "date 2024-01-10 → 2024-02-01")]


def test_a_change_into_an_occupied_folder_becomes_a_problem_and_the_others_stay():
    renamed_from, rearchived_from = exp(3), exp(4)
    lock = lock_of(record(renamed_from, bids_session="SUBJ03MR1"), record(rearchived_from, bids_session="SUBJ04MR1"))
    new, other = exp(1), exp(2)
    renamed = replace(renamed_from, label="SUBJ03_MR2", last_modified=T0 + timedelta(minutes=1))
    rearchived = replace(rearchived_from, id="XNAT_E00099")
    plan = plan_of(lock, [new, other, renamed, rearchived])
    occupied = dict.fromkeys(c.address for c in plan.changes)  # every target folder exists on disk
    kept = refuse_occupied(plan, occupied)
    assert [c.key.experiment_id for c in kept.changes] == ["XNAT_E00099"]  # its folder is the one it replaces
    assert [(p.experiment_id, p.message) for p in kept.problems] == [
        (e.id, f"{address} exists but the lock records no session there; session {e.id} (PROJ/{e.label}) "
               "would be written into it")
        for e, address in [(new, "sub-SUBJ01/ses-SUBJ01MR1"), (other, "sub-SUBJ02/ses-SUBJ02MR1"),
                           (renamed, "sub-SUBJ03/ses-SUBJ03MR2")]
    ]
    assert refuse_occupied(plan, {}) is plan
    [new_address] = [c.address for c in plan.changes if c.key.experiment_id == new.id]
    in_the_way = refuse_occupied(plan, {new_address: "sub-SUBJ01"})
    assert in_the_way.problems[-1].message == (f"sub-SUBJ01 is a file, where the subject folder of session {new.id} "
                                               f"(PROJ/{new.label}) goes")


def test_session_moved_to_another_project_is_reported_under_its_new_project():  # row 10
    e, stays = exp(1), exp(2)  # PROJ still lists a session: an empty listing would be in doubt (row 11)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"), record(stays, bids_session="SUBJ02MR1"))
    moved = replace(e, project="OTHER", last_modified=T0 + timedelta(minutes=5))
    plan = plan_of(lock, [moved, stays], projects=("PROJ", "OTHER"))
    change = only(plan, Action.UPDATE)
    assert change.key.project == "OTHER"
    assert change.reasons[0].message == "project PROJ → OTHER"
    assert len(plan.changes) == 1 and not plan.problems


def test_the_last_session_moved_out_of_a_project_waits_with_the_empty_listing():  # rows 10, 11
    # An empty listing where the lock records sessions (lost access rights?) blocks its project;
    # its sessions listed elsewhere may be shares, so none moves.
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    moved = replace(e, project="OTHER", last_modified=T0 + timedelta(minutes=5))
    plan = plan_of(lock, [moved], projects=("PROJ", "OTHER"))
    assert not plan.changes and [p.project for p in plan.problems] == ["PROJ"]


@pytest.mark.parametrize("failed", [True, False])
def test_failed_or_empty_listing_with_recorded_sessions_is_an_error_not_orphans(failed):  # row 11
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    broken = ProjectListing("PROJ", None, "HTTP 503") if failed else ProjectListing("PROJ", ())
    plan = compute_plan(lock, RemoteState((broken,)), on_disk(*lock.sessions.values()), CONFIG, tools=TOOLS)
    assert not plan.changes
    assert len(plan.problems) == 1 and plan.problems[0].project == "PROJ"
    assert ("failed" in plan.problems[0].message) == failed


def test_empty_listing_without_recorded_sessions_is_fine():
    plan = compute_plan(Lock.new(), RemoteState((ProjectListing("PROJ", ()),)), LocalState({}), CONFIG)
    assert not plan.changes and not plan.problems


def test_deleted_output_is_drift_naming_the_file():  # row 12
    e = exp(1)
    rec = record(e, bids_session="SUBJ01MR1")
    plan = plan_of(lock_of(rec), [e], LocalState({}))
    change = only(plan, Action.DRIFT)
    assert change.reasons[0].message == f"missing: {rec.outputs[0].path}"
    assert "1 session changed on disk; only apply --repair-drift repairs it (exports and converts again)" in plan.notes
    repaired = repairing(plan)  # as apply --repair-drift shows it: the same changes, the note says what it does
    assert repaired.changes == plan.changes and len(repaired.notes) == len(plan.notes)
    assert "1 session changed on disk: --repair-drift exports and converts it again" in repaired.notes


def test_edited_output_is_drift():  # row 13
    e = exp(1)
    rec = record(e, bids_session="SUBJ01MR1")
    out = rec.outputs[0]
    resized = LocalState({out.path: FileStat(out.size + 1, out.mtime_ns)})
    assert "size" in only(plan_of(lock_of(rec), [e], resized), Action.DRIFT).reasons[0].message
    touched = LocalState({out.path: FileStat(out.size, out.mtime_ns + 5)})
    assert "modified on disk" in only(plan_of(lock_of(rec), [e], touched), Action.DRIFT).reasons[0].message
    linked_out = LocalState({}, outside=frozenset({out.path}))  # as check: its target is not the dataset's
    assert only(plan_of(lock_of(rec), [e], linked_out), Action.DRIFT).reasons[0].message == \
        f"changed: {out.path} (now a link out of the BIDS root)"
    copied = LocalState({**on_disk(rec).files, out.path: FileStat(out.size, out.mtime_ns + 5)}, frozenset({out.path}),
                        hashed_now=1)
    plan = plan_of(lock_of(rec), [e], copied)  # the same bytes, checked: a copy or a clone, not an edit
    assert not plan.changes and plan.unchanged == 1
    assert "1 output has a new modification time but the recorded content (sha256 checked, e.g. after a copy " \
        "or clone): not drift" in plan.notes
    vouched = plan_of(lock_of(rec), [e], replace(copied, hashed_now=0))  # checked by an earlier look: no note
    assert not vouched.changes and not [n for n in vouched.notes if "modification time" in n]


def test_an_update_names_outputs_missing_or_edited_on_disk_and_only_edits_hold_it_back():
    e = exp(1)
    rec = record(e, bids_session="SUBJ01MR1")
    gone = rec.outputs[0]
    edited_out = replace(gone, path=gone.path.replace("_T1w", "_T2w"))
    rec = replace(rec, outputs=(gone, edited_out))
    files = {**on_disk(rec).files, edited_out.path: FileStat(edited_out.size + 1, edited_out.mtime_ns)}
    del files[gone.path]
    redated = replace(e, date="2024-02-01", last_modified=T0 + timedelta(minutes=1))
    change = only(plan_of(lock_of(rec), [redated], LocalState(files)), Action.UPDATE)
    assert [r.message for r in change.reasons][1:] == [f"missing: {gone.path}",
                                                       f"changed: {edited_out.path} (size {edited_out.size} → "
                                                       f"{edited_out.size + 1})"]
    assert change.edited == (edited_out.path,)  # the missing one is simply written again
    del files[edited_out.path]
    change = only(plan_of(lock_of(rec), [redated], LocalState(files)), Action.UPDATE)
    assert not change.edited and change.reasons[-1].message == f"missing: {edited_out.path}"


def test_unrecorded_user_files_do_not_matter():  # row 14
    e = exp(1)
    rec = record(e, bids_session="SUBJ01MR1")
    local = LocalState({**on_disk(rec).files, "sub-SUBJ01/ses-SUBJ01MR1/notes.txt": FileStat(3, 1)})
    plan = plan_of(lock_of(rec), [e], local)
    assert not plan.changes and plan.unchanged == 1


def test_conversion_config_change_updates_the_sessions_it_affects():  # row 15
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ02MR1"))
    config = parse_config({"project": {"PROJ": {"sessions": {"SUBJ02_MR1": {"skip": ["1"]}}}}})
    plan = plan_of(lock, [e1, e2], config=config)
    change = only(plan, Action.UPDATE)
    assert change.key.experiment_id == e2.id
    assert change.reasons[0].message == "config changed: skip"
    assert plan.unchanged == 1


def test_a_naming_override_is_a_config_change_not_an_xnat_rename():  # row 15
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ02MR1"))
    config = parse_config({"naming": {"subjects": {"SUBJ02": "B02"}}})
    change = only(plan_of(lock, [e1, e2], config=config), Action.UPDATE)
    assert change.key.experiment_id == e2.id and change.address.path == "sub-B02/ses-SUBJ02MR1"
    assert [(r.code, r.message) for r in change.reasons] == [
        ("renamed", "config changed: naming (sub-SUBJ02 → sub-B02)")]
    renamed_in_xnat = replace(e2, subject_label="B02", last_modified=T0 + timedelta(minutes=1))
    change = only(plan_of(lock, [e1, renamed_in_xnat]), Action.UPDATE)
    assert change.reasons[0].message == "renamed sub-SUBJ02 → sub-B02"


def test_deep_plan_says_a_newly_skipped_scan_is_deselected_not_removed():  # row 15, deep
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1"))
    config = parse_config({"conversion": {"skip": ["2"]}})
    change = only(plan_of(lock, [e], config=config, deep={e.id: scans_for()}), Action.UPDATE)
    assert [r.message for r in change.reasons] == ["scan 2 no longer selected by the config", "config changed: skip"]
    gone = only(plan_of(lock, [e], config=config, deep={e.id: scans_for()[:1]}), Action.UPDATE)
    assert [r.message for r in gone.reasons] == ["scan 2 removed", "config changed: skip"]


def test_project_conversion_change_updates_only_that_projects_sessions():  # row 15
    # Settings are worked out once per project (and per session that has a table of its own).
    a1, a2 = exp(1), exp(2)
    b1 = exp(3, project="OTHER")
    records = [record(e, bids_session=f"{e.subject_label}MR1") for e in (a1, a2, b1)]
    config = parse_config({"project": {"PROJ": {"conversion": {"skip": ["1"]},
                                                "sessions": {"SUBJ02_MR1": {"include": ["2"]}}}}})
    plan = plan_of(lock_of(*records), [a1, a2, b1], config=config, projects=("PROJ", "OTHER"))
    reasons = {c.key.experiment_id: c.reasons[0].message for c in plan.changes}
    assert reasons == {a1.id: "config changed: skip", a2.id: "config changed: include, skip"}
    assert plan.unchanged == 1


def test_reordering_or_repeating_include_and_skip_patterns_changes_nothing():  # row 15
    e = exp(1)
    before = parse_config({"conversion": {"skip": ["*localizer*", "*scout*"], "include": ["1-4,6", "7"]}})
    lock = lock_of(record(e, bids_session="SUBJ01MR1", config=before))
    after = parse_config({"conversion": {"skip": ["*scout*", "*localizer*", "*scout*"], "include": ["7", "1-4,6"]}})
    plan = plan_of(lock, [e], config=after)
    assert not plan.changes and plan.unchanged == 1
    widened = parse_config({"conversion": {"skip": ["*scout*"], "include": ["7", "1-4,6"]}})
    assert only(plan_of(lock, [e], config=widened), Action.UPDATE).reasons[0].message == "config changed: skip"


def test_a_lock_written_before_include_and_skip_digests_were_normalised_is_unchanged():  # row 15
    e = exp(1)
    config = parse_config({"conversion": {"skip": ["*scout*", "*localizer*"], "include": ["7", "1-4,6"]}})
    rec = record(e, bids_session="SUBJ01MR1", config=config)
    settings = config.conversion_for(e.project, e.label)
    # What the previous version recorded: the digests of the lists as written.
    old = replace(rec, config_digests={**rec.config_digests, **settings.legacy_digests()})
    assert old.config_digests != rec.config_digests
    plan = plan_of(lock_of(old), [e], config=config)
    assert not plan.changes and plan.unchanged == 1
    other = parse_config({"conversion": {"skip": ["*scout*"], "include": ["7", "1-4,6"]}})
    assert only(plan_of(lock_of(old), [e], config=other), Action.UPDATE).reasons[0].message == "config changed: skip"


LOCALIZER = Scan("3", "MR", "anat-scout_acq-localizer", scans_for()[0].files)


def exported(e: Experiment, config: Config, listed: tuple[Scan, ...]) -> SessionRecord:
    """The record apply writes (format 2): the scans `config` selected, with their bidsmap names,
    and the ones it left out."""
    names = {s.id: (s.series_description, s.series_description) for s in listed}  # DICOM agrees with XNAT
    selected, unselected = recorded_scans(listed, config.conversion_for(e.project, e.label), names)
    return replace(record(e, config=config, bids_session=f"{e.subject_label}MR1"), scans=selected,
                   unselected_scans=unselected)


def test_a_skip_change_updates_only_the_sessions_whose_scans_it_selects_differently():  # row 15
    e1, e2 = exp(1), exp(2)
    before = parse_config({"conversion": {"skip": ["*localizer*"]}})
    lock = lock_of(exported(e1, before, scans_for()), exported(e2, before, (*scans_for(), LOCALIZER)))
    assert [s.id for s in lock.sessions[e2.id].unselected_scans] == ["3"]
    # A pattern no recorded scan matches: no session's conversion changes.
    wider = parse_config({"conversion": {"skip": ["*localizer*", "*scout*"]}})
    plan = plan_of(lock, [e1, e2], config=wider)
    assert not plan.changes and plan.unchanged == 2
    assert ("2 sessions exported with other conversion settings convert the same under these (the same scans "
            "selected and named): left as exported") in plan.notes
    # Without the skip, e2's localizer is converted too; e1 has none.
    plan = plan_of(lock, [e1, e2], config=Config())
    change = only(plan, Action.UPDATE)
    assert change.key.experiment_id == e2.id and plan.unchanged == 1
    assert any(n.startswith("1 session exported with other conversion settings converts the same") for n in plan.notes)
    assert not any("exported with other conversion settings" in n for n in plan_of(lock, [e1, e2], config=before).notes)
    assert [r.message for r in change.reasons] == [
        "config changed: skip (scan 3 (anat-scout_acq-localizer) now selected)"]
    # Skipping a scan both have updates both, each saying which of its scans is left out.
    bold = parse_config({"conversion": {"skip": ["*localizer*", "func-*"]}})
    plan = plan_of(lock, [e1, e2], config=bold)
    assert {c.reasons[0].message for c in plan.changes} == {
        "config changed: skip (scan 2 (func-bold_task-rest) left out)"}
    assert plan.count(Action.UPDATE) == 2


def test_an_include_change_is_judged_on_the_recorded_scans_too():  # row 15
    e1, e2 = exp(1), exp(2)
    only_anat = parse_config({"conversion": {"include": ["anat-*"]}})
    lock = lock_of(exported(e1, only_anat, scans_for()), exported(e2, only_anat, (*scans_for(), LOCALIZER)))
    # Still the same scans for e1 (anat-T1w); e2's localizer is anat-* too and stays selected.
    same = parse_config({"conversion": {"include": ["anat-T1w*", "anat-scout*"]}})
    assert not plan_of(lock, [e1, e2], config=same).changes
    narrower = parse_config({"conversion": {"include": ["anat-T1w*"]}})
    change = only(plan_of(lock, [e1, e2], config=narrower), Action.UPDATE)
    assert change.key.experiment_id == e2.id
    assert change.reasons[0].message == "config changed: include (scan 3 (anat-scout_acq-localizer) left out)"


def test_a_bidsmap_change_updates_only_the_sessions_with_a_series_it_names_differently():  # row 15
    e1, e2 = exp(1), exp(2)
    before = parse_config({"conversion": {"skip": ["*localizer*"], "bidsmap": {"anat-T1w": "anat-T1w_acq-mp"}}})
    lock = lock_of(exported(e1, before, scans_for()), exported(e2, before, (*scans_for(), LOCALIZER)))
    assert [s.bidsmap_target for s in lock.sessions[e1.id].scans] == ["anat-T1w_acq-mp", None]
    # An entry for a series that is skipped (e2's localizer) or that no session has changes nothing.
    unused = parse_config({"conversion": {"skip": ["*localizer*"], "bidsmap": {
        "anat-T1w": "anat-T1w_acq-mp", "anat-scout*": "anat-scout_acq-loc", "dwi*": "dwi_acq-x"}}})
    plan = plan_of(lock, [e1, e2], config=unused)
    assert not plan.changes and plan.unchanged == 2
    cases = {
        "anat-T1w_acq-mprage": "scan 1 (anat-T1w) named anat-T1w_acq-mp → anat-T1w_acq-mprage",
        None: "scan 1 (anat-T1w) no longer named anat-T1w_acq-mp",
    }
    for name, effect in cases.items():
        bidsmap = {"anat-T1w": name} if name else {}
        config = parse_config({"conversion": {"skip": ["*localizer*"], "bidsmap": bidsmap}})
        plan = plan_of(lock, [e1, e2], config=config)
        assert {c.reasons[0].message for c in plan.changes} == {f"config changed: bidsmap ({effect})"}
        assert plan.count(Action.UPDATE) == 2
    bold = parse_config({"conversion": {"skip": ["*localizer*"], "bidsmap": {
        "anat-T1w": "anat-T1w_acq-mp", "func-bold*": "func-bold_task-resting"}}})
    messages = {c.reasons[0].message for c in plan_of(lock, [e1, e2], config=bold).changes}
    assert messages == {"config changed: bidsmap (scan 2 (func-bold_task-rest) now named func-bold_task-resting)"}


def test_bidsmap_names_are_judged_by_protocol_name_too_and_conflicts_count():  # row 15
    e1, e2 = exp(1), exp(2)
    listed = scans_for()
    settings = CONFIG.conversion_for("PROJ", e1.label)
    # The T1w's DICOM ProtocolName differs from its description (Philips, GE): kept for the bidsmap.
    selected, unselected = recorded_scans(listed, settings, {"1": ("anat-T1w", "t1_tfe"), "2": ("func-bold_task-rest",) * 2})
    assert [(s.protocol_name, s.bidsmap_target) for s in selected] == [("t1_tfe", None), (None, None)]
    rec1 = replace(record(e1, bids_session="SUBJ01MR1"), scans=selected, unselected_scans=unselected)
    rec2 = exported(e2, CONFIG, listed)
    by_protocol = parse_config({"conversion": {"bidsmap": {"t1_tfe": "anat-T1w_acq-tfe"}}})
    change = only(plan_of(lock_of(rec1, rec2), [e1, e2], config=by_protocol), Action.UPDATE)
    assert change.key.experiment_id == e1.id
    assert change.reasons[0].message == "config changed: bidsmap (scan 1 (anat-T1w) now named anat-T1w_acq-tfe)"
    # Entries that disagree on a series: the conversion would refuse it, so it is a change to carry out.
    clash = parse_config({"conversion": {"bidsmap": {"anat-*": "anat-T1w_acq-a", "*T1w": "anat-T1w_acq-b"}}})
    plan = plan_of(lock_of(rec1, rec2), [e1, e2], config=clash)
    assert {c.reasons[0].message for c in plan.changes} == {
        "config changed: bidsmap (scan 1 (anat-T1w) matches bidsmap entries that disagree)"}
    assert plan.count(Action.UPDATE) == 2


def test_rule_changes_are_not_judged_where_xnat_did_not_list_what_the_conversion_matched():  # row 15
    listed = scans_for()
    settings = CONFIG.conversion_for("PROJ", "SUBJ01_MR1")
    agreeing = {s.id: (s.series_description, s.series_description) for s in listed}
    assert recorded_scans(listed, settings, agreeing)[1] == ()
    assert recorded_scans(listed, settings, None)[1] is None  # the conversion's names not known
    differing = {**agreeing, "2": ("func-bold_task-rest_run-1", "func-bold_task-rest_run-1")}
    assert recorded_scans(listed, settings, differing)[1] is None
    assert recorded_scans(listed, settings, {"1": agreeing["1"]})[1] is None  # scan 2 gave the conversion nothing
    # No ProtocolName: heudiconv takes the one in Siemens' private header, which apply does not read.
    assert recorded_scans(listed, settings, {**agreeing, "1": ("anat-T1w", "")})[1] is None
    blank = (listed[0], replace(listed[1], series_description=""))  # the conversion went by ProtocolName
    skip_blank = parse_config({"conversion": {"skip": ["2"]}}).conversion_for("PROJ", "SUBJ01_MR1")
    assert recorded_scans(blank, skip_blank, agreeing)[1] is None


def test_sessions_exported_before_scans_were_recorded_take_any_rule_change():  # row 15, format 1
    e1, e2 = exp(1), exp(2)
    before = parse_config({"conversion": {"skip": ["*localizer*"]}})
    old = [replace(exported(e, before, scans_for()), unselected_scans=None) for e in (e1, e2)]
    wider = parse_config({"conversion": {"skip": ["*localizer*", "*scout*"]}})
    plan = plan_of(lock_of(*old), [e1, e2], config=wider)
    assert {c.reasons[0].message for c in plan.changes} == {"config changed: skip"}
    assert plan.count(Action.UPDATE) == 2


def test_a_heuristic_change_updates_every_session_it_applies_to():  # row 15
    e1, e2 = exp(1), exp(2)
    lock = lock_of(exported(e1, CONFIG, scans_for()[:1]), exported(e2, CONFIG, (*scans_for(), LOCALIZER)))
    config = parse_config({"conversion": {"heuristic": "convertall"}})
    plan = plan_of(lock, [e1, e2], config=config)
    assert {c.reasons[0].message for c in plan.changes} == {"config changed: heuristic"}
    assert plan.count(Action.UPDATE) == 2


def test_deep_plan_says_a_scan_the_config_now_selects_was_there_before():  # row 15, deep
    e = exp(1)
    before = parse_config({"conversion": {"skip": ["*localizer*"]}})
    lock = lock_of(exported(e, before, (*scans_for(), LOCALIZER)))
    change = only(plan_of(lock, [e], config=Config(), deep={e.id: (*scans_for(), LOCALIZER)}), Action.UPDATE)
    assert [r.message for r in change.reasons] == [
        "scan 3 now selected by the config", "config changed: skip (scan 3 (anat-scout_acq-localizer) now selected)"]
    new_scan = only(plan_of(lock_of(exported(e, before, scans_for())), [e], config=Config(),
                            deep={e.id: (*scans_for(), LOCALIZER)}), Action.UPDATE)
    assert [r.message for r in new_scan.reasons] == ["scan 3 added"]


def test_a_session_table_keyed_by_experiment_id_applies_and_tables_that_select_nothing_are_noted():  # row 15
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ02MR1"))
    config = parse_config({"project": {
        "PROJ": {"sessions": {e2.id: {"skip": ["1"]}, "SUBJ09_MR1": {"skip": ["2"]}}},
        "PORJ": {"conversion": {"skip": ["*"]}},
    }})
    plan = plan_of(lock, [e1, e2], config=config)
    change = only(plan, Action.UPDATE)
    assert change.key.experiment_id == e2.id and change.reasons[0].message == "config changed: skip"
    assert "[project.PORJ] names a project that is neither configured, exported nor listed" in plan.notes
    assert "[project.PROJ.sessions] names no session of PROJ in XNAT (by label or experiment ID): SUBJ09_MR1" \
        in plan.notes
    both = parse_config({"naming": {"sessions": {e1.id: "A", e1.label: "B"}}})
    assert (f'[naming.sessions] names session {e1.id} twice, "{e1.id}" = "A" and "{e1.label}" = "B": '
            "the experiment ID's is used") in plan_of(Lock.new(), [e1, e2], config=both).notes
    # pi-study: each dataset is planned for its own project; the other studies' tables are not its own.
    studies = parse_config({"layout": "pi-study", "project": {"PORJ": {"conversion": {"skip": ["*"]}}}})
    assert not [n for n in plan_of(lock, [e1, e2], config=studies).notes if "PORJ" in n]


def test_newer_converter_is_a_note_unless_reconvert_outdated():  # row 16
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1", tools={**TOOLS, "heudiconv": "1.4.0"}))
    plan = plan_of(lock, [e])
    assert not plan.changes
    assert any(n.startswith("1 session converted with older tools") for n in plan.notes)
    change = only(plan_of(lock, [e], reconvert_outdated=True), Action.UPDATE)
    assert change.reasons[0].message == "converted with heudiconv 1.4.0, now 1.5.1"


def test_a_session_converted_with_newer_tools_is_not_outdated():  # a colleague's newer install on a shared root
    e = exp(1)
    lock = lock_of(record(e, bids_session="SUBJ01MR1", tools={**TOOLS, "heudiconv": "1.10.0"}))
    for reconvert in (False, True):
        plan = plan_of(lock, [e], reconvert_outdated=reconvert)
        assert not plan.changes and plan.unchanged == 1
        assert not any("older tools" in n for n in plan.notes)


@pytest.mark.parametrize("recorded, installed, outdated", [
    ("1.4.0", "1.5.1", True), ("1.10.0", "1.5.1", False), ("1.5.1", "1.5.1", False), (None, "1.5.1", True),
    ("v1.0.20240202", "v1.0.20250506", True), ("v1.0.20250506", "v1.0.20240202", False), ("1.5.1", "1.5.1.post1", True),
    # PEP 440: a pre-release or development release comes before its release
    ("1.4.0rc1", "1.4.0", True), ("1.4.0", "1.4.0rc1", False), ("1.3.2.dev5", "1.3.2", True), ("1.3.2b1", "1.3.2rc1", True),
    ("v1.0.20240202_custom", "v1.0.20250506", True),  # not PEP 440: numbers as numbers
])
def test_tool_versions_compare_as_numbers(recorded, installed, outdated):
    assert older(recorded, installed) is outdated


def test_two_sessions_at_one_bids_address_is_an_error_naming_both():  # row 17
    a = exp(1, subject="SUBJ01", label="SUBJ01_MR1")
    b = exp(2, subject="SUBJ01", label="SUBJ01-MR1")
    plan = plan_of(Lock.new(), [a, b, exp(3)])
    assert len(plan.problems) == 1
    message = plan.problems[0].message
    assert "XNAT_E00001" in message and "XNAT_E00002" in message and "sub-SUBJ01/ses-SUBJ01MR1" in message
    assert "[naming.sessions]" in plan.problems[0].hint
    assert [c.key.experiment_id for c in plan.changes] == ["XNAT_E00003"]


def test_two_subjects_mapped_to_one_label_name_the_subject_map_in_the_hint():  # row 17
    a, b = exp(1, subject="SUBJ01"), exp(2, subject="SUBJ02")
    config = parse_config({"naming": {"subjects": {"SUBJ02": "SUBJ01"}, "session_label": "strip-subject"}})
    plan = plan_of(Lock.new(), [a, b], config=config)
    [problem] = plan.problems
    assert "both map to sub-SUBJ01/ses-MR1" in problem.message
    assert problem.hint.startswith('[naming.subjects] maps "SUBJ02" to "SUBJ01"')


def test_a_session_renamed_onto_an_orphans_folder_is_a_problem_not_an_update():
    kept, gone = exp(1, label="SUBJ01_MR1"), exp(2, subject="SUBJ01", label="SUBJ01_MR2")
    lock = lock_of(record(kept, bids_session="SUBJ01MR1"), record(gone, bids_session="SUBJ01MR2"))
    renamed = replace(kept, label="SUBJ01_MR2", last_modified=T0 + timedelta(minutes=1))
    plan = plan_of(lock, [renamed])
    assert [c.action for c in plan.changes] == [Action.ORPHAN]  # the gone session, still reported
    assert [p.message for p in plan.problems] == [
        "session XNAT_E00001 (PROJ/SUBJ01_MR2) was renamed to sub-SUBJ01/ses-SUBJ01MR2, which the lock records "
        "for XNAT_E00002, no longer in XNAT"
    ]


@pytest.mark.parametrize("owner_listing", ["not selected", "failed"])
def test_a_session_at_the_address_of_one_in_an_unlisted_project_is_a_collision(owner_listing):  # row 17
    owner = exp(1)
    lock = lock_of(record(owner, bids_session="SUBJ01MR1"))
    newcomer = exp(2, subject="SUBJ01", label="SUBJ01_MR1", project="OTHER")
    listings = [listing(newcomer, project="OTHER")]
    if owner_listing == "failed":
        listings.append(ProjectListing("PROJ", None, "HTTP 503"))
    plan = compute_plan(lock, RemoteState(tuple(listings)), on_disk(*lock.sessions.values()), CONFIG, tools=TOOLS)
    assert plan.changes == () and plan.unchanged == 0
    [problem] = [p for p in plan.problems if p.experiment_id == newcomer.id]
    said = (f"session {newcomer.id} (OTHER/SUBJ01_MR1) maps to sub-SUBJ01/ses-SUBJ01MR1, which the lock records for "
            f"{owner.id} of project PROJ")
    if owner_listing == "failed":  # it may be the owner itself, moved: a new label would make a second copy
        assert problem.message == said + ", whose listing is in error above"
        assert problem.hint == (f"plan again once project PROJ lists; if {owner.id} was moved to OTHER in XNAT, this "
                                "is its new ID and plan then replaces it")
    else:
        assert problem.message == said and problem.hint.startswith("give one a distinct label in [naming.sessions]")


@pytest.mark.parametrize("label", ["../evil", "a/b", "x\x00y", "..", "tab\there", "A" * 200])
def test_unsafe_label_is_an_error_for_that_session_only(label):  # row 18
    bad = exp(1, label=label)
    plan = plan_of(Lock.new(), [bad, exp(2)])
    assert len(plan.problems) == 1 and plan.problems[0].experiment_id == "XNAT_E00001"
    assert [c.key.experiment_id for c in plan.changes] == ["XNAT_E00002"]


@pytest.mark.parametrize("eid", ["XNAT_E00001/../x", "E1\x1b[2J", "..", "E 1", "XNAT_E00001.v2"])
def test_an_experiment_id_unsafe_as_a_path_is_an_error_for_that_session_only(eid):
    # The ID names the session's staging folder, log and journal: apply would stop on it half-way;
    # the lock's schema admits letters, digits, '_' and '-' (a dot once wedged a commit's journal).
    plan = plan_of(Lock.new(), [exp(1, eid=eid), exp(2)])
    [problem] = plan.problems
    assert problem.experiment_id == eid and f"experiment ID {eid!r} is not a plain XNAT accession ID" in problem.message
    assert [c.key.experiment_id for c in plan.changes] == ["XNAT_E00002"]


def test_a_row_with_a_malformed_value_is_a_problem_for_its_session_only_never_an_orphan():
    from reconcile.model import MalformedRow

    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"))
    bad = MalformedRow(e1.id, e1.label, e1.subject_label, "xnat:mrSessionData", "not an XNAT date: 'garbage'")
    remote = RemoteState((ProjectListing("PROJ", (e2,), malformed=(bad,)),))
    plan = compute_plan(lock, remote, on_disk(*lock.sessions.values()), CONFIG, tools=TOOLS)
    [problem] = plan.problems
    assert problem.experiment_id == e1.id and problem.message == (
        f"session {e1.id} (PROJ/{e1.label}): XNAT lists it with a malformed value (not an XNAT date: 'garbage')")
    assert [(c.action, c.key.experiment_id) for c in plan.changes] == [(Action.CREATE, e2.id)]  # no orphan


def test_a_malformed_row_in_one_project_keeps_the_empty_listing_guard_of_another():
    from reconcile.model import MalformedRow

    a1, b1 = exp(1, project="A"), exp(2, project="B")
    lock = lock_of(record(b1, bids_session="SUBJ02MR1"))
    bad = MalformedRow("XNAT_E00007", "S7_MR1", "S7", "xnat:mrSessionData", "not an XNAT date: 'x'")
    remote = RemoteState((ProjectListing("A", (a1,), malformed=(bad,)), ProjectListing("B", ())))
    plan = compute_plan(lock, remote, on_disk(*lock.sessions.values()), CONFIG, tools=TOOLS)
    assert not [c for c in plan.changes if c.action is Action.ORPHAN]  # B's empty listing is refused
    assert any("XNAT listed no sessions for project B" in p.message for p in plan.problems)


def test_addresses_that_differ_only_in_case_collide():
    # One folder on macOS or an SMB share: the second commit would replace the first's files.
    upper, lower, other = exp(1, subject="ABC", label="MR1"), exp(2, subject="abc", label="MR1"), exp(3)
    plan = plan_of(Lock.new(), [upper, lower, other])
    [problem] = plan.problems
    assert problem.message == (f"{upper.id} (PROJ/ABC/MR1) at sub-ABC/ses-MR1 and {lower.id} (PROJ/abc/MR1) at "
                               "sub-abc/ses-MR1 differ only in case: one folder where the file system ignores case")
    assert [c.key.experiment_id for c in plan.changes] == [other.id]
    # Both recorded already, side by side (exported on a case-sensitive file system): left as they are.
    both = lock_of(record(upper, bids_session="MR1"), record(lower, bids_session="MR1"))
    assert not plan_of(both, [upper, lower]).problems and plan_of(both, [upper, lower]).unchanged == 2
    # One recorded, the other new: only the newcomer is refused.
    one = plan_of(lock_of(record(upper, bids_session="MR1")), [upper, lower])
    assert [p.experiment_id for p in one.problems] == [lower.id] and one.unchanged == 1


def test_a_session_listed_twice_with_other_values_is_a_problem_not_the_first_rows_plan():
    e1 = exp(1)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"))
    other = replace(e1, label="SUBJ01_MR9", date="2025-01-01")
    for rows in ([e1, other, exp(2)], [other, e1, exp(2)]):  # whatever the order
        plan = plan_of(lock, rows)
        [problem] = plan.problems
        assert problem.message == (f"session {e1.id} (PROJ): XNAT lists it 2 times, with other values "
                                   "(SUBJ01/SUBJ01_MR1 dated 2024-01-10, SUBJ01/SUBJ01_MR9 dated 2025-01-01)")
        assert [(c.action, c.key.experiment_id) for c in plan.changes] == [(Action.CREATE, "XNAT_E00002")]
    assert not plan_of(lock, [e1, e1]).problems  # the same row twice says nothing new


def test_a_subject_rename_waits_for_all_its_sessions_while_one_is_held_back(capsys):
    # One session held back by an edit, the other moved: one person under two labels.
    mr1, mr2, other = exp(1, label="SUBJ01_MR1"), replace(exp(1, label="SUBJ01_MR2"), id="XNAT_E00009"), exp(2)
    recs = [record(mr1, bids_session="MR1"), record(mr2, bids_session="MR2"), record(other, bids_session="MR1")]
    lock = lock_of(*recs)
    edited_out = recs[0].outputs[0]
    local = LocalState({**on_disk(*recs).files, edited_out.path: FileStat(edited_out.size + 1, edited_out.mtime_ns)})
    renamed = [replace(e, subject_label="SUBJ11") for e in (mr1, mr2)]
    plan = plan_of(lock, [*renamed, replace(other, date="2025-01-01")], local,
                   config=Config(naming=NamingSettings(session_label="strip-subject")))
    updates = {c.key.experiment_id: c for c in plan.changes if c.action is Action.UPDATE}
    assert updates[mr1.id].edited and not updates[mr2.id].edited
    assert [c.key.experiment_id for c in plan.actionable()] == [other.id]  # the rename waits whole
    assert {c.key.experiment_id for c in plan.actionable(repair_drift=True)} == {mr1.id, mr2.id, other.id}
    assert ("sub-SUBJ01 → sub-SUBJ11: 1 more session of that subject waits with the one that would replace "
            "outputs changed on disk, so the subject is not split between two labels by this") in plan.notes
    assert not [n for n in repairing(plan).notes if "more session" in n]  # --repair-drift moves them all
    # apply's status line names the edited session alone as changed on disk.
    from reconcile.cli import _held_back, _say_held_back

    _say_held_back(_held_back(plan, plan.actionable()))
    assert capsys.readouterr().err == (
        "error: 2 changes from XNAT held back (sub-SUBJ01/ses-MR1): files of this session changed on disk; 1 more "
        "of the same subject waits with them; apply --repair-drift carries them out, keeping a copy of each changed "
        "file\n")


def test_nothing_changed_is_empty_plan():  # row 19
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"), record(e2, bids_session="SUBJ02MR1"))
    plan = plan_of(lock, [e1, e2])
    assert not plan.changes and not plan.problems and plan.unchanged == 2


def test_changes_are_ordered_by_action_then_address():
    old = [exp(n) for n in (5, 6)]
    lock = lock_of(*(record(e, bids_session=f"{e.subject_label}MR1") for e in old))
    plan = plan_of(lock, [exp(9), exp(3), replace(old[1], date="2025-01-01")], LocalState({}))
    assert [(c.action, c.address.subject) for c in plan.changes] == [
        (Action.CREATE, "SUBJ03"), (Action.CREATE, "SUBJ09"), (Action.UPDATE, "SUBJ06"), (Action.ORPHAN, "SUBJ05"),
    ]


def test_selection_limits_both_sides():
    e1, e2 = exp(1), exp(2)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"))
    plan = plan_of(lock, [e2], selection=Selection(subjects=("SUBJ02",)))
    assert [c.action for c in plan.changes] == [Action.CREATE]  # e1 not orphaned: not selected
    assert not [n for n in plan.notes if "selects no session" in n]


def test_a_selection_that_matches_nothing_says_so_not_only_no_changes():
    e1 = exp(1)
    lock = lock_of(record(e1, bids_session="SUBJ01MR1"))
    plan = plan_of(lock, [e1], selection=Selection(subjects=("zzz",), sessions=("ses-MR1",)))
    assert not plan.changes and plan.unchanged == 0
    assert any(n.startswith("--subject zzz --session ses-MR1 selects no session listed in XNAT or recorded in the "
                            "lock") for n in plan.notes)


def test_naming_overrides_and_strip_subject_convention():
    config = Config(naming=NamingSettings(session_label="strip-subject", subjects={"SUBJ01": "001"}))
    plan = plan_of(Lock.new(), [exp(1)], config=config)
    assert plan.changes[0].address.path == "sub-001/ses-MR1"


def test_a_subject_renamed_under_strip_subject_names_the_session_label_not_the_config():
    config = Config(naming=NamingSettings(session_label="strip-subject"))
    e = exp(4, subject="004", label="004_MR1")
    lock = lock_of(record(e, config=config, bids_subject="004", bids_session="MR1"))
    renamed = replace(e, subject_label="104", last_modified=T0 + timedelta(minutes=1))
    change = only(plan_of(lock, [renamed], config=config), Action.UPDATE)
    assert [r.message for r in change.reasons] == [
        "renamed sub-004 → sub-104",
        "renamed ses-MR1 → ses-004MR1 (session label 004_MR1 does not begin with the new subject label 104; "
        "[naming.sessions] can keep ses-MR1)",
    ]
    fixed = replace(e, subject_label="04", label="004_MR1")  # a subject label corrected to match
    lock = lock_of(record(fixed, config=config, bids_subject="04", bids_session="004MR1"))
    change = only(plan_of(lock, [replace(fixed, subject_label="004", last_modified=T0 + timedelta(minutes=1))],
                          config=config), Action.UPDATE)
    assert change.reasons[1].message == ("renamed ses-004MR1 → ses-MR1 (session label 004_MR1 now begins with the "
                                         "new subject label 004)")
    kept = Config(naming=NamingSettings(session_label="strip-subject", sessions={e.id: "MR2"}))
    lock = lock_of(record(e, config=kept, bids_subject="004", bids_session="MR1"))
    change = only(plan_of(lock, [renamed], config=kept), Action.UPDATE)
    assert change.reasons[1].message == "config changed: naming (ses-MR1 → ses-MR2)"  # the override's doing


def test_non_session_experiments_are_ignored():
    qc = replace(exp(2), xsi_type="xnat:qcAssessmentData")
    plan = plan_of(Lock.new(), [exp(1), qc])
    assert [c.key.experiment_id for c in plan.changes] == ["XNAT_E00001"]


def test_conversion_settings_select_scans():
    s = ConversionSettings(include=("1-4,6",), skip=("*scout*",))
    assert [i for i in map(str, range(1, 8)) if s.selects(i, "x")] == ["1", "2", "3", "4", "6"]
    assert not s.selects("2", "anat-scout_acq-localizer")


def test_selecting_one_session_still_sees_its_collision_with_a_recorded_one():
    a = exp(1, subject="SUBJ01", label="SUBJ01_MR1")
    lock = lock_of(record(a, bids_session="SUBJ01MR1"))
    b = exp(2, subject="SUBJ01", label="SUBJ01-MR1")
    plan = plan_of(lock, [a, b], selection=Selection(sessions=("XNAT_E00002",)))
    assert not plan.changes
    assert len(plan.problems) == 1 and "XNAT_E00001" in plan.problems[0].message


def test_a_session_renamed_away_from_the_selection_is_not_an_orphan():
    a = exp(1, label="SUBJ01_A")
    lock = lock_of(record(a, bids_session="SUBJ01A"))
    renamed = replace(a, label="SUBJ01_B", last_modified=T0 + timedelta(minutes=1))
    assert not plan_of(lock, [renamed], selection=Selection(sessions=("SUBJ01_A",))).changes
    unsafe = replace(a, label="../x", last_modified=T0 + timedelta(minutes=1))
    plan = plan_of(lock, [unsafe])
    assert not plan.changes and len(plan.problems) == 1  # the unsafe label, but no false orphan


def test_deep_plan_compares_only_the_scans_the_config_selects():
    config = parse_config({"conversion": {"skip": ["2"]}})
    e = exp(1)
    kept = scans_for()[:1]
    lock = lock_of(record(e, bids_session="SUBJ01MR1", config=config, scans=kept))
    plan = plan_of(lock, [e], config=config, deep={e.id: scans_for()})
    assert not plan.changes and plan.unchanged == 1


def test_swapped_labels_are_refused_instead_of_overwriting_each_other():
    a, b = exp(1, label="SUBJ01_A", subject="SUBJ01"), exp(2, label="SUBJ01_B", subject="SUBJ01")
    lock = lock_of(record(a, bids_session="SUBJ01A"), record(b, bids_session="SUBJ01B"))
    later = T0 + timedelta(minutes=1)
    swapped = [replace(a, label="SUBJ01_B", last_modified=later), replace(b, label="SUBJ01_A", last_modified=later)]
    plan = plan_of(lock, swapped)
    assert not plan.changes
    assert len(plan.problems) == 2 and all("which the lock still records for" in p.message for p in plan.problems)


@pytest.mark.parametrize("recorded_in", ["PROJ", "OTHER"])
def test_session_shared_into_another_project_stays_under_the_recorded_one(recorded_in):  # row 10
    # XNAT lists a shared experiment in both projects, same ID; it is planned once, where the lock has it.
    home = exp(1, project=recorded_in)
    shared = replace(home, project="PROJ" if recorded_in == "OTHER" else "OTHER")
    lock = lock_of(record(home, bids_session="SUBJ01MR1"))
    plan = plan_of(lock, [home, shared], projects=("PROJ", "OTHER"))
    assert not plan.changes and not plan.problems  # no "project A → B" update, no duplicate
    assert plan.unchanged == 1


def test_new_session_shared_into_a_second_project_is_one_create():  # row 10
    e = exp(1)
    plan = plan_of(Lock.new(), [e, replace(e, project="OTHER")], projects=("PROJ", "OTHER"))
    change = only(plan, Action.CREATE)
    assert len(plan.changes) == 1 and not plan.problems  # never a silent duplicate, nor a collision with itself
    assert change.key.experiment_id == e.id


def shared_plan(lock, rows, listings, *, config=CONFIG):
    """A plan from `listings`: project → its rows, or None for a failed listing (HTTP 503)."""
    remote = RemoteState(tuple(ProjectListing(p, None, "HTTP 503") if ids is None
                               else ProjectListing(p, tuple(e for e in rows if e.project == p))
                               for p, ids in listings.items()))
    return compute_plan(lock, remote, on_disk(*lock.sessions.values()), config, tools=TOOLS)


@pytest.mark.parametrize("home", ["failed", "not listed"])
def test_a_share_is_never_read_as_a_move_while_the_recorded_project_is_not_listed(home):  # rows 10, 11
    # Recorded under PROJ, shared into PROJ2 under a label of its own. Without PROJ's listing the
    # share cannot be told from a move: the session is left as it is, like the rest of PROJ.
    e = exp(2, subject="002", label="MR1")
    lock = lock_of(record(e, bids_session="MR1"))
    share = replace(e, project="PROJ2", label="P2_002_visit1")
    listings = {"PROJ": None, "PROJ2": ()} if home == "failed" else {"PROJ2": ()}
    plan = shared_plan(lock, [share], listings)
    assert not plan.changes and plan.unchanged == 0
    assert [p.project for p in plan.problems] == (["PROJ"] if home == "failed" else [])


def test_a_session_listed_by_its_recorded_project_and_shared_elsewhere_is_unchanged():  # row 10
    e = exp(2, subject="002", label="MR1")
    lock = lock_of(record(e, bids_session="MR1"))
    share = replace(e, project="PROJ2", label="P2_002_visit1")
    for order in ([e, share], [share, e]):
        plan = shared_plan(lock, order, {"PROJ2": (), "PROJ": ()})
        assert not plan.changes and not plan.problems and plan.unchanged == 1


def test_a_session_gone_from_its_recorded_project_but_listed_by_another_is_moved():  # row 10
    e, stays = exp(2, subject="002", label="MR1"), exp(3)
    lock = lock_of(record(e, bids_session="MR1"), record(stays, bids_session="SUBJ03MR1"))
    moved = replace(e, project="PROJ2", label="P2_002_visit1")
    change = only(shared_plan(lock, [moved, stays], {"PROJ": (), "PROJ2": ()}), Action.UPDATE)
    assert change.key.project == "PROJ2" and change.reasons[0].message == "project PROJ → PROJ2"


@pytest.mark.parametrize("names", [("STUDY", "ARCHIVE"), ("PROJ", "ARCHIVE")])
def test_a_new_session_listed_by_two_projects_goes_to_the_first_of_the_config(names):  # row 10
    # XNAT names no primary project here (both rows name their own): the config's order decides,
    # never the projects' names.
    first, second = names
    config = parse_config({"projects": [first, second]})
    e = exp(1, subject="001", label="001_visit1", project=first)
    share = replace(e, project=second, label="ARCH_001_visit1")
    change = only(shared_plan(Lock.new(), [e, share], {second: (), first: ()}, config=config), Action.CREATE)
    assert change.key.project == first and change.address.path == "sub-001/ses-001visit1"


def test_a_new_shared_session_goes_to_its_primary_project_whatever_the_config_order():  # row 10
    # XNAT's listing of a project a session is shared into gives its share label but its primary
    # project (the `project` column): that project is its home when it is listed.
    config = parse_config({"projects": ["ARCHIVE", "STUDY"]})
    e = exp(1, subject="001", label="001_visit1", project="STUDY")
    share = replace(e, project="ARCHIVE", label="ARCH_001_visit1", primary_project="STUDY")
    change = only(shared_plan(Lock.new(), [share, e], {"ARCHIVE": (), "STUDY": ()}, config=config), Action.CREATE)
    assert change.key.project == "STUDY" and change.address.path == "sub-001/ses-001visit1"
    # Its primary project not configured: the first configured one that lists it.
    only_shares = parse_config({"projects": ["ARCHIVE", "MIRROR"]})
    mirror = replace(share, project="MIRROR", label="M_001")
    change = only(shared_plan(Lock.new(), [mirror, share], {"MIRROR": (), "ARCHIVE": ()}, config=only_shares),
                  Action.CREATE)
    assert change.key.project == "ARCHIVE" and change.address.path == "sub-001/ses-ARCH001visit1"


def test_a_new_shared_session_waits_while_its_primary_project_fails_to_list():  # rows 10, 11
    # Created under the share now, it would stay there once its own project lists again.
    config = parse_config({"projects": ["STUDY", "ARCHIVE"]})
    e = exp(1, subject="001", label="001_visit1", project="STUDY")
    share = replace(e, project="ARCHIVE", label="ARCH_001_visit1", primary_project="STUDY")
    plan = shared_plan(Lock.new(), [share], {"STUDY": None, "ARCHIVE": ()}, config=config)
    assert not plan.changes and [p.project for p in plan.problems] == ["STUDY"]
    # So while it is not planned this run (`plan -p ARCHIVE`): its own project's plan creates it.
    plan = shared_plan(Lock.new(), [share], {"ARCHIVE": ()}, config=config)
    assert not plan.changes and not plan.problems
    # In the pi-study layout each study's dataset has a copy of its own: ARCHIVE's is created.
    studies = parse_config({"projects": ["STUDY", "ARCHIVE"], "layout": "pi-study"})
    plan = shared_plan(Lock.new(), [share], {"ARCHIVE": ()}, config=studies)
    assert [(c.action, c.key.project) for c in plan.changes] == [(Action.CREATE, "ARCHIVE")]
    # A share whose own project is not configured at all goes to the one that is.
    alone = parse_config({"projects": ["ARCHIVE"]})
    assert [c.key.project for c in shared_plan(Lock.new(), [share], {"ARCHIVE": ()}, config=alone).changes] == \
        ["ARCHIVE"]
