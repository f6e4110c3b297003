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


def test_the_last_entry_is_read_from_the_end_past_torn_lines_and_across_chunks(tmp_path):
    from reconcile.apply import last_history_entry

    root = tmp_path / "bids"
    assert last_history_entry(root) is None
    plan = compute_plan(Lock.new(), RemoteState((), None), LocalState({}), Config())
    append_history(root, plan, ApplyReport(lock=Lock.new()))
    big = dict(append_history(root, plan, ApplyReport(lock=Lock.new())), note="x" * (3 << 20))  # 3 MiB line
    history = root / ".xnat2bids/history.jsonl"
    with open(history, "a") as fh:
        fh.write(json.dumps(big) + "\n")
        fh.write(json.dumps(big)[:1000])  # torn
    assert last_history_entry(root) == big
    assert read_history(root)[-1] == big
