"""Turning a Plan into text for people and JSON for machines (and back, for saved plans).

Computing lives in plan.py; this module only formats and parses. The JSON form follows
`schemas/plan.schema.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from reconcile import __version__
from reconcile.errors import StalePlanError
from reconcile.lock import Lock
from reconcile.model import (
    BidsAddress,
    Experiment,
    SessionKey,
    format_timestamp,
    parse_timestamp,
)
from reconcile.plan import Action, Change, Plan, Problem, Reason
from reconcile.schema import schema_errors

# 2: records the config fingerprint, so that apply can refuse a plan made with another config.
# 3: carries a digest of its content, so that apply can refuse a plan changed after plan wrote it.
PLAN_FORMAT_VERSION = 3
SYMBOLS = {Action.CREATE: "+", Action.UPDATE: "~", Action.DRIFT: "!", Action.ORPHAN: "-"}
MAX_REASONS_SHOWN = 3
_LEADS = {a: f"{symbol} {a.value:<6}" for a, symbol in SYMBOLS.items()}  # "+ create", "~ update", …


def problems(plan: Plan) -> str:
    """"1 problem", "2 problems": how the summaries count the plan's errors."""
    k = len(plan.problems)
    return f"{k} problem{'s' if k != 1 else ''}"


def summary_line(plan: Plan) -> str:
    if not plan.changes:
        n = plan.unchanged
        up_to_date = f"{n} session{'s' if n != 1 else ''} up to date"
        if plan.problems:  # not "No changes.": what the problems hide was not compared
            return f"Nothing planned: {problems(plan)} below; {up_to_date}."
        return f"No changes. {up_to_date}."
    return (
        f"Plan: {plan.count(Action.CREATE)} to create, {plan.count(Action.UPDATE)} to update, "
        f"{plan.count(Action.DRIFT)} drifted, {plan.count(Action.ORPHAN)} orphaned, "
        f"{plan.unchanged} unchanged."
    )


def render_text(plan: Plan) -> str:
    """The changes and summary (`render_changes`), then the errors and the notes."""
    return "\n".join([render_changes(plan), *problem_lines(plan), *(f"note: {note}" for note in plan.notes)])


def render_changes(plan: Plan) -> str:
    """One line per change, grouped by action, each with its reasons; then the summary."""
    lines: list[str] = []
    paths = [c.address.path for c in plan.changes]
    width = max(map(len, paths), default=0)
    for change, path in zip(plan.changes, paths):
        reasons = change.reasons
        head = f"{_LEADS[change.action]}  {path:<{width}}  {change.key}"
        lines.append(f"{head}  {reasons[0].message}")
        if len(reasons) > 1:  # the others go below the first, aligned with it
            shown = [r.message for r in reasons[1:MAX_REASONS_SHOWN]]
            if len(reasons) > MAX_REASONS_SHOWN:
                shown.append(f"and {len(reasons) - MAX_REASONS_SHOWN} more")
            pad = " " * (len(head) + 2)
            lines += [pad + text for text in shown]
    if lines:
        lines.append("")
    lines.append(summary_line(plan))
    return "\n".join(lines)


def problem_lines(plan: Plan) -> list[str]:
    """The plan's errors, each with its hint below it."""
    lines = []
    for problem in plan.problems:
        lines.append(f"error: {problem.message}")
        if problem.hint:
            lines.append(f"  hint: {problem.hint}")
    return lines


def _experiment_dict(exp: Experiment) -> dict[str, Any]:
    return {
        "id": exp.id,
        "label": exp.label,
        "project": exp.project,
        "subject_id": exp.subject_id,
        "subject_label": exp.subject_label,
        "date": exp.date,
        "insert_date": format_timestamp(exp.insert_date),
        "last_modified": format_timestamp(exp.last_modified),
        "xsi_type": exp.xsi_type,
    }


def _change_dict(change: Change) -> dict[str, Any]:
    before = None
    if change.before is not None:
        b = change.before
        before = {
            "experiment_id": b.experiment_id,
            "project": b.project,
            "address": b.address.path,
            "date": b.date,
            "insert_date": b.insert_date,
            "last_modified": b.last_modified,
        }
    return {
        "action": change.action.value,
        "project": change.key.project,
        "experiment_id": change.key.experiment_id,
        "address": change.address.path,
        "bids_subject": change.address.subject,
        "bids_session": change.address.session,
        "reasons": [
            {k: v for k, v in vars(r).items() if v is not None} for r in change.reasons
        ],
        "before": before,
        "after": _experiment_dict(change.after) if change.after else None,
        "edited": list(change.edited),
    }


def plan_to_dict(
    plan: Plan, *, bids_root: str, config_fingerprint: str, xnat_url: str, created_at: str
) -> dict[str, Any]:
    """The plan with what it was made for (BIDS root, config, XNAT, lock), so a saved one applies only there."""
    doc = {
        "format_version": PLAN_FORMAT_VERSION,
        "generator": f"xnat2bids {__version__}",
        "created_at": created_at,
        "bids_root": os.path.abspath(bids_root),
        "config_fingerprint": config_fingerprint,
        "xnat_url": xnat_url,
        "lock": {"lineage": plan.lineage, "serial": plan.serial},
        "deep": plan.deep,
        "projects": list(plan.projects),
        "summary": {
            **{a.value: plan.count(a) for a in Action if a is not Action.NOOP},
            "unchanged": plan.unchanged,
        },
        "changes": [_change_dict(c) for c in plan.changes],
        "problems": [{k: v for k, v in vars(p).items() if v is not None} for p in plan.problems],
        "notes": list(plan.notes),
    }
    doc["digest"] = _digest(doc)
    return doc


def _digest(doc: dict[str, Any]) -> str:
    """SHA-256 of a plan document's content but its digest: a saved plan edited by hand, cut
    short or mixed up is refused, not carried out as something plan never said."""
    body = json.dumps({k: v for k, v in doc.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def render_json(plan: Plan, *, bids_root: str, config_fingerprint: str, xnat_url: str, created_at: str) -> str:
    doc = plan_to_dict(plan, bids_root=bids_root, config_fingerprint=config_fingerprint, xnat_url=xnat_url,
                       created_at=created_at)
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def plan_from_dict(data: Any, source: str = "plan", lock: Lock | None = None) -> tuple[Plan, dict[str, Any]]:
    """Rebuild a saved plan for apply; the `before` records are taken from `lock` when given.

    Format 1 plans (no config fingerprint) still load, for SLURM batches submitted before an
    upgrade; `apply.check_plan_fresh` refuses them as saved plans.
    """
    version = data.get("format_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > PLAN_FORMAT_VERSION:  # before the schema, which may not know its fields
        raise StalePlanError(f"{source} was written by a newer xnat2bids (format {version})",
                             hint="upgrade xnat2bids, or run plan again with this one")
    problems = schema_errors("plan", data)
    if problems:
        raise StalePlanError(f"{source} is not a valid xnat2bids plan: {problems[0]}")
    if "digest" in data and data["digest"] != _digest(data):
        raise StalePlanError(f"{source} was changed after plan wrote it (its content does not match its digest)",
                             hint="run plan --out again; a saved plan is carried out only as plan wrote it")
    changes = []
    for c in data["changes"]:
        after = c["after"]
        exp = None
        if after is not None:
            exp = Experiment(
                id=after["id"],
                label=after["label"],
                project=after["project"],
                subject_id=after["subject_id"],
                subject_label=after["subject_label"],
                date=after["date"],
                insert_date=parse_timestamp(after["insert_date"]),
                last_modified=parse_timestamp(after["last_modified"]),
                xsi_type=after["xsi_type"],
            )
        changes.append(
            Change(
                action=Action(c["action"]),
                key=SessionKey(c["project"], c["experiment_id"]),
                address=BidsAddress(c["bids_subject"], c["bids_session"]),
                reasons=tuple(Reason(**r) for r in c["reasons"]),
                before=lock.sessions.get(c["before"]["experiment_id"]) if lock and c["before"] else None,
                after=exp,
                edited=tuple(c.get("edited", ())),
            )
        )
    plan = Plan(
        changes=tuple(changes),
        unchanged=data["summary"]["unchanged"],
        problems=tuple(Problem(**p) for p in data["problems"]),
        notes=tuple(data["notes"]),
        lineage=data["lock"]["lineage"],
        serial=data["lock"]["serial"],
        deep=data["deep"],
        projects=tuple(data["projects"]),
    )
    return plan, data
