"""The text form of a plan (one aligned line per change, further reasons below the first) and its JSON."""

from __future__ import annotations

import pytest

from reconcile.errors import StalePlanError
from reconcile.model import BidsAddress, SessionKey
from reconcile.plan import Action, Change, Plan, Problem, Reason
from reconcile.render import plan_from_dict, plan_to_dict, render_text
from reconcile.schema import schema_errors


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
    blocked = Plan(changes=(), unchanged=0, problems=(Problem("listing of project P failed"),), notes=(), lineage="l",
                   serial=1, deep=False)
    assert render_text(blocked).splitlines() == ["Nothing planned: 1 problem below; 0 sessions up to date.",
                                                "error: listing of project P failed"]


def test_plan_json_records_the_absolute_bids_root_config_fingerprint_and_xnat(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    plan = Plan(changes=(change(Action.CREATE, 1, "01", "new in XNAT"),), unchanged=0, problems=(), notes=(),
                lineage="l", serial=0, deep=False)
    doc = plan_to_dict(plan, bids_root="bids", config_fingerprint="c5c3219356d33c3b", xnat_url="https://x.org/xnat",
                       created_at="t")
    assert doc["format_version"] == 3 and schema_errors("plan", doc) == []
    assert (doc["bids_root"], doc["config_fingerprint"], doc["xnat_url"]) == (
        str(tmp_path / "bids"), "c5c3219356d33c3b", "https://x.org/xnat")
    for key in ("config_fingerprint", "xnat_url"):
        assert schema_errors("plan", {k: v for k, v in doc.items() if k != key}) == [
            f"(top level): '{key}' is a required property"]
    del doc["config_fingerprint"], doc["xnat_url"], doc["digest"]
    # Format 1 (no fingerprint) still loads: SLURM batches submitted before an upgrade read theirs.
    loaded, _ = plan_from_dict({**doc, "format_version": 1})
    assert loaded.changes[0].key == plan.changes[0].key


def test_plan_from_a_newer_xnat2bids_is_refused_as_newer_not_invalid():
    plan = Plan(changes=(), unchanged=0, problems=(), notes=(), lineage="l", serial=0, deep=False)
    doc = {**plan_to_dict(plan, bids_root="/b", config_fingerprint="f", xnat_url="http://x", created_at="t"),
           "format_version": 4, "new": 1}
    with pytest.raises(StalePlanError, match=r"saved.json was written by a newer xnat2bids \(format 4\)"):
        plan_from_dict(doc, "saved.json")
