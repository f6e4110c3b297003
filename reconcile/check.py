"""`xnat2bids check`: verify offline that the files on disk match what the lock records.

Reads only; the CLI decides the exit status from the returned report.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from reconcile.localscan import hash_files, stat_outputs
from reconcile.lock import Lock


@dataclass(frozen=True)
class CheckReport:
    sessions: int
    outputs: int
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_outputs(root: Path, lock: Lock, *, full: bool = False) -> CheckReport:
    """Every recorded output must exist with its size (and, with `full`, its sha256)."""
    seen = stat_outputs(root, lock).files
    problems: list[str] = []
    to_hash: dict[str, tuple[str, str, str]] = {}
    total = 0
    for exp_id in sorted(lock.sessions):
        rec = lock.sessions[exp_id]
        for out in rec.outputs:
            total += 1
            stat = seen.get(out.path)
            if stat is None:
                problems.append(f"{exp_id} {rec.address}: missing {out.path}")
            elif stat.size != out.size:
                problems.append(f"{exp_id} {rec.address}: size of {out.path} is {stat.size}, lock says {out.size}")
            elif full:
                to_hash[os.path.join(root, out.path)] = (f"{exp_id} {rec.address}", out.path, out.sha256)
    if to_hash:
        for path, digest in sorted(hash_files(to_hash).items()):
            where, rel, expected = to_hash[path]
            if digest != expected:
                problems.append(f"{where}: content of {rel} differs from the lock (sha256)")
    return CheckReport(len(lock.sessions), total, tuple(problems))
