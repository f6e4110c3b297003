"""The text form of a plan: one aligned line per change, further reasons below the first."""

from __future__ import annotations

from reconcile.model import BidsAddress, SessionKey
from reconcile.plan import Action, Change, Plan, Problem, Reason
from reconcile.render import render_text


def change(action: Action, n: int, subject: str, *messages: str) -> Change:
    return Change(action, SessionKey("PROJ", f"XNAT_E{n:05d}"), BidsAddress(subject, "MR1"),
                  tuple(Reason("r", m) for m in messages))


def test_text_plan_aligns_addresses_and_lists_at_most_three_reasons():
    plan = Plan(
        changes=(
            change(Action.CREATE, 1, "01", "new in XNAT"),
            change(Action.UPDATE, 2, "0002", "date 2024-01-10 → 2024-01-11 (re-dated in XNAT)", "config changed: skip"),
            change(Action.DRIFT, 3, "3", "missing: a", "missing: b", "missing: c", "missing: d", "missing: e"),
            change(Action.ORPHAN, 4, "04", "no longer in XNAT project PROJ"),
        ),
        unchanged=7,
        problems=(Problem("listing of project X failed: HTTP 500", "X", hint="fix it"),),
        notes=("a note",),
        lineage="l",
        serial=1,
        deep=False,
    )
    assert render_text(plan).splitlines() == [
        "+ create  sub-01/ses-MR1    PROJ/XNAT_E00001  new in XNAT",
        "~ update  sub-0002/ses-MR1  PROJ/XNAT_E00002  date 2024-01-10 → 2024-01-11 (re-dated in XNAT)",
        "                                              config changed: skip",
        "! drift   sub-3/ses-MR1     PROJ/XNAT_E00003  missing: a",
        "                                              missing: b",
        "                                              missing: c",
        "                                              and 2 more",
        "- orphan  sub-04/ses-MR1    PROJ/XNAT_E00004  no longer in XNAT project PROJ",
        "",
        "Plan: 1 to create, 1 to update, 1 drifted, 1 orphaned, 7 unchanged.",
        "error: listing of project X failed: HTTP 500",
        "  hint: fix it",
        "note: a note",
    ]


def test_text_of_a_plan_without_changes_is_its_summary():
    plan = Plan(changes=(), unchanged=1, problems=(), notes=(), lineage="l", serial=1, deep=False)
    assert render_text(plan) == "No changes. 1 session up to date."
