"""Provenance files do not depend on the order in which sessions were committed (apply --jobs N)."""

from __future__ import annotations

import itertools

from reconcile.dataset import ensure_participant, update_sessions_tsv


def test_participants_and_sessions_rows_do_not_depend_on_commit_order(tmp_path):
    sessions = [("01", "MR1"), ("02", "MR1"), ("01", "MR2"), ("03", "MR1")]
    results = set()
    for n, order in enumerate(itertools.permutations(sessions)):
        root = tmp_path / str(n)
        root.mkdir()
        (root / "participants.tsv").write_text("participant_id\tage\nsub-zz\t40\n")  # a user's own row
        for subject, session in order:
            ensure_participant(root, subject)
            update_sessions_tsv(root, subject, session, acq_time="n/a", xnat_experiment_id=f"E{subject}{session}",
                                xnat_insert_date="n/a")
        results.add(tuple(p.read_text() for p in sorted(root.rglob("*.tsv"))))
    assert len(results) == 1
    participants = next(iter(results))[0]
    assert participants == "participant_id\tage\nsub-01\tn/a\nsub-02\tn/a\nsub-03\tn/a\nsub-zz\t40\n"
