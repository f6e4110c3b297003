"""Benchmark reading and writing the lockfile with 10,000 sessions (target ≤ 0.5 s each).

    python benchmarks/bench_lock.py [--sessions 10000] [--repeat 3]

"write" is `write_lock` over an existing lock: it re-reads the file on disk (refusing to overwrite
an invalid one), validates, serialises, fsyncs and renames — what every apply does per session.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _bench
from _bench import ms, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from reconcile.lock import dumps_lock, loads_lock, lock_path, read_lock, write_lock

    rows = []
    for outputs in (4, 20):
        lock = _bench.synthetic_lock(args.sessions, outputs)
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            write_lock(root, lock)
            size = lock_path(root).stat().st_size
            text = lock_path(root).read_text()
            t_read, current = _bench.best_of(args.repeat, lambda: read_lock(root))
            t_write, _ = _bench.best_of(args.repeat, lambda: write_lock(root, read_lock(root) or lock))
            t_write -= t_read  # the read that supplies the lock to write is not part of the write
            t_dumps, _ = _bench.best_of(args.repeat, lambda: dumps_lock(current))
            t_loads, _ = _bench.best_of(args.repeat, lambda: loads_lock(text))
        what = f"{args.sessions:,} sessions × 2 scans × {outputs} outputs ({size / 1e6:.1f} MB)"
        rows.append([what, ms(t_read), ms(t_write), ms(t_loads), ms(t_dumps),
                     verdict(t_read <= 0.5 and t_write <= 0.5)])
    _bench.report(f"lock read and write, {args.sessions:,} sessions",
                  ["lock", "read_lock", "write_lock", "loads_lock (parse+validate)", "dumps_lock", "≤ 0.5 s each"],
                  rows, [f"Best of {args.repeat}."])


if __name__ == "__main__":
    main()
