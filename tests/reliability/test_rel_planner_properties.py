"""Property-based tests of the pure planner (hypothesis): listing order does not matter, a plan
carried out leaves nothing to do, and an unchanged remote never produces an update."""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from test_plan import CONFIG, T0, TOOLS, exp, on_disk

from reconcile.lock import Lock, dumps_lock, loads_lock
from reconcile.model import OutputRecord, SessionRecord, format_timestamp
from reconcile.plan import Action, ProjectListing, RemoteState, compute_plan

DATES = ("2024-01-10", "2024-02-11", "2023-12-31", None)  # None: XNAT has no date (parse_date)


@st.composite
def remotes(draw):
    """A project listing: unique experiment IDs and labels, a few sessions per subject."""
    n = draw(st.integers(0, 8))
    exps = []
    for i in range(n):
        subject = f"SUBJ{draw(st.integers(1, 3)):02d}"
        exps.append(exp(i + 1, subject=subject, label=f"{subject}_MR{i + 1}", date=draw(st.sampled_from(DATES)),
                        modified=T0 + timedelta(minutes=draw(st.integers(0, 5)))))
    return exps


def plan(lock, exps, local=None):
    local = local if local is not None else on_disk(*lock.sessions.values())
    return compute_plan(lock, RemoteState((ProjectListing("PROJ", tuple(exps)),), None), local, CONFIG, tools=TOOLS)


def carried_out(lock: Lock, p) -> Lock:
    """The lock a successful apply of `p` leaves on disk (the entries commit_session writes)."""
    for change in p.actionable():
        e, address = change.after, change.address
        conv = CONFIG.conversion_for(e.project, e.label)
        if change.before is not None and change.before.experiment_id != e.id:
            lock = lock.without_session(change.before.experiment_id)
        lock = lock.with_session(SessionRecord(
            experiment_id=e.id, project=e.project, subject_id=e.subject_id, subject_label=e.subject_label,
            session_label=e.label, bids_subject=address.subject, bids_session=address.session, date=e.date,
            insert_date=format_timestamp(e.insert_date), last_modified=format_timestamp(e.last_modified),
            xsi_type=e.xsi_type, exported_at="2024-03-01T00:00:00Z", config_fingerprint=conv.fingerprint(),
            config_digests=conv.digests(), tools=dict(TOOLS),
            outputs=(OutputRecord(f"{address.path}/anat/{address.subject}_T1w.nii.gz", 10, "0" * 64, 1),),
        ))
    return loads_lock(dumps_lock(lock))  # the next plan reads what was written, not the object


@settings(max_examples=60, deadline=None)
@given(remotes(), st.randoms(use_true_random=False), st.data())
def test_planning_does_not_depend_on_listing_order(exps, rnd, data):
    applied_first = data.draw(st.integers(0, len(exps)))
    lock = carried_out(Lock.new(), plan(Lock.new(), exps[:applied_first]))
    shuffled = list(exps)
    rnd.shuffle(shuffled)
    a, b = plan(lock, exps), plan(lock, shuffled)
    assert a.changes == b.changes and a.problems == b.problems


@settings(max_examples=60, deadline=None)
@given(remotes(), st.data())
def test_after_carrying_out_a_plan_the_next_plan_has_nothing_to_apply(exps, data):
    lock = Lock.new()
    # A history: some sessions exported earlier, then re-dated / re-saved in XNAT.
    earlier = data.draw(st.lists(st.sampled_from(exps), unique_by=lambda e: e.id) if exps else st.just([]))
    lock = carried_out(lock, plan(lock, earlier))
    edited = [replace(e, date="2025-05-05", last_modified=e.last_modified + timedelta(days=1))
              if data.draw(st.booleans()) else e for e in exps]
    first = plan(lock, edited)
    lock = carried_out(lock, first)
    second = plan(lock, edited)
    assert second.actionable() == ()
    assert not second.problems


@settings(max_examples=60, deadline=None)
@given(remotes(), st.data())
def test_an_unchanged_remote_never_produces_an_update(exps, data):
    lock = carried_out(Lock.new(), plan(Lock.new(), exps))
    touched = {e.id for e in exps if data.draw(st.booleans())}
    remote = [replace(e, last_modified=e.last_modified + timedelta(hours=1)) if e.id in touched else e for e in exps]
    p = plan(lock, remote)
    updated = {c.key.experiment_id for c in p.changes if c.action is Action.UPDATE}
    assert updated <= touched
    assert p.count(Action.CREATE) == 0 and p.count(Action.DRIFT) == 0 and p.count(Action.ORPHAN) == 0
    assert plan(lock, exps).changes == ()
