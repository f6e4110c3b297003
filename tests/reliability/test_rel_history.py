"""The history survives a crash in the middle of an append (a torn last line)."""

from __future__ import annotations

import json

from reconcile.apply import ApplyReport, append_history, read_history
from reconcile.config import Config
from reconcile.lock import Lock
from reconcile.plan import LocalState, RemoteState, compute_plan


def test_a_torn_history_line_is_skipped_and_the_next_entry_starts_on_its_own_line(cli, tmp_path):
    root = tmp_path / "bids"
    plan = compute_plan(Lock.new(), RemoteState((), None), LocalState({}), Config())
    first = append_history(root, plan, ApplyReport(lock=Lock.new()))
    history = root / ".xnat2bids/history.jsonl"
    with open(history, "a") as fh:
        fh.write(json.dumps(first)[:40])  # what a SIGKILL halfway through a write leaves
    assert read_history(root) == [first]
    second = append_history(root, plan, ApplyReport(lock=Lock.new()))
    assert read_history(root) == [first, second]
    code, out, err = cli("history", str(root))
    assert code == 0 and out.count("apply by") == 2, out + err
