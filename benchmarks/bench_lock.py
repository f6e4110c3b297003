"""Benchmark reading and writing the lockfile with 10,000 sessions (target ≤ 0.5 s each).

    python benchmarks/bench_lock.py [--sessions 10000] [--repeat 2]

Each measurement runs in a fresh process, as `plan`/`apply`/`check` do: "read" is `read_lock`,
"write" is `write_lock` of that lock with one session changed (what apply does after each
session: re-read the file on disk, validate, serialise, fsync, rename). A first process finds no
cache (it parses the TOML); later ones may use the verified cache `reconcile.lock` keeps
(XNAT2BIDS_CACHE_DIR, pointed at a fresh directory here).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import _bench
from _bench import ms, verdict

WORKER = r"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
from reconcile.lock import read_lock, write_lock
root = Path(sys.argv[1])
t0 = time.perf_counter(); lock = read_lock(root); t1 = time.perf_counter()
key = sorted(lock.sessions)[int(sys.argv[2]) % len(lock.sessions)]
changed = lock.with_session(replace(lock.sessions[key], exported_at=f"2024-06-02T12:00:{int(sys.argv[2]) % 60:02d}Z"))
t2 = time.perf_counter(); write_lock(root, changed, expected_serial=lock.serial); t3 = time.perf_counter()
print(json.dumps({"read": t1 - t0, "write": t3 - t2, "sessions": len(lock.sessions)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    from reconcile.lock import dumps_lock, lock_path

    rows = []
    for outputs in (4, 20):
        lock = _bench.synthetic_lock(args.sessions, outputs)
        with tempfile.TemporaryDirectory() as tmp:
            root, cache = Path(tmp, "bids"), Path(tmp, "cache")
            root.mkdir()
            cache.mkdir()
            lock_path(root).write_text(dumps_lock(lock))
            size = lock_path(root).stat().st_size
            env = dict(os.environ, XNAT2BIDS_CACHE_DIR=str(cache))
            runs = []
            for i in range(1 + args.repeat):
                _, rss, out = _bench.child([sys.executable, "-c", WORKER, str(root), str(i)], env=env)
                runs.append(dict(json.loads(out.strip().splitlines()[-1]), rss=rss))
            cold, warm = runs[0], min(runs[1:], key=lambda r: r["read"] + r["write"])
        what = f"{args.sessions:,} sessions × 2 scans × {outputs} outputs ({size / 1e6:.1f} MB)"
        rows.append([what, ms(cold["read"]), ms(cold["write"]), ms(warm["read"]), ms(warm["write"]),
                     _bench.mib(max(r["rss"] for r in runs)),
                     verdict(warm["read"] <= 0.5 and warm["write"] <= 0.5)
                     + ("" if cold["read"] <= 0.5 and cold["write"] <= 0.5 else " (first read: **no**)")])
    _bench.report(f"lock read and write, {args.sessions:,} sessions, each in a fresh process",
                  ["lock", "first read (no cache)", "its write", "later read", "later write", "peak RSS",
                   "≤ 0.5 s each"],
                  rows, [f"Later = best of {args.repeat} further processes (the cache, if any, is warm). "
                         "Writes change one session, as apply does after each session."])


if __name__ == "__main__":
    main()
