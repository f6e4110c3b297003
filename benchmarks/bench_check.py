"""Benchmark `check`: size mode over 10,000 sessions / 200,000 outputs vs `find -printf` and
`find`+`stat`, and `check --full` hashing throughput vs `sha256sum` on bigger files.

    python benchmarks/bench_check.py [--sessions 10000] [--outputs 20] [--hash-files 64] [--hash-size-mib 16]

The 200,000 small files are created once in a temporary directory (this takes a while); all
tools then read them warm from the page cache.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import _bench
from _bench import ms, ratio, verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--outputs", type=int, default=20)
    ap.add_argument("--hash-files", type=int, default=64)
    ap.add_argument("--hash-size-mib", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from reconcile.check import check_outputs
    from reconcile.lock import dumps_lock, lock_path

    find = _bench.need("find")
    rep = args.repeat
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        lock = _bench.synthetic_lock(args.sessions, args.outputs, root=root, write_files=True)
        lock_path(root).write_text(dumps_lock(lock))
        n = sum(len(r.outputs) for r in lock.sessions.values())
        t_find, _ = _bench.best_of(rep, lambda: _bench.child([find, str(root), "-name", "*.nii.gz", "-printf", "%s %p\n"]))
        t_stat, _ = _bench.best_of(rep, lambda: _bench.child(
            ["sh", "-c", f"find {root} -name '*.nii.gz' -print0 | xargs -0 stat -c '%s %n'"]))
        t_check, report = _bench.best_of(rep, lambda: check_outputs(root, lock))
        assert report.ok and report.outputs == n, report.problems[:3]
        env = dict(_bench.os.environ, XNAT2BIDS_CACHE_DIR=str(Path(tmp, "cache")))  # a cold lock cache
        check_cmd = [*_bench.XNAT2BIDS, "check", str(root)]
        t_cli_cold, _ = _bench.best_of(1, lambda: _bench.child(check_cmd, cwd=root, env=env))
        t_cli, _ = _bench.best_of(rep, lambda: _bench.child(check_cmd, cwd=root, env=env))
        rows = [
            [f"find -printf '%s %p' ({n:,} files)", ms(t_find), ratio(t_find, t_stat), "—"],
            ["find + xargs stat -c '%s %n'", ms(t_stat), "1.00×", "—"],
            ["check_outputs (size mode), lock already parsed", ms(t_check), ratio(t_check, t_stat),
             verdict(t_check <= 2 * t_stat)],
            ["`xnat2bids check` CLI, first run (parses the TOML lock)", ms(t_cli_cold),
             ratio(t_cli_cold, t_stat), verdict(t_cli_cold <= 2 * t_stat)],
            ["`xnat2bids check` CLI, later runs (verified lock cache)", ms(t_cli), ratio(t_cli, t_stat),
             verdict(t_cli <= 2 * t_stat)],
        ]
        _bench.report(f"check, {args.sessions:,} sessions / {n:,} outputs (size mode)",
                      ["what", "time", "× find+stat", "≤ 2× met"], rows, [f"Best of {rep} (first CLI run: 1 run). The CLI times include interpreter start and imports."])

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = args.hash_size_mib << 20
        lock = _bench.synthetic_lock(args.hash_files, 1, root=root, write_files=True, file_size=size, scans=1)
        paths = [str(root / r.outputs[0].path) for r in lock.sessions.values()]
        total = size * len(paths)
        sha = _bench.need("sha256sum")
        t_sha, _ = _bench.best_of(rep, lambda: _bench.child([sha, *paths]))
        t_par, _ = _bench.best_of(rep, lambda: _bench.child(
            ["sh", "-c", f"printf '%s\\0' \"$@\" | xargs -0 -n 8 -P {_bench.os.cpu_count()} {sha}", "sh", *paths]))
        t_full, report = _bench.best_of(rep, lambda: check_outputs(root, lock, full=True))
        assert report.ok, report.problems[:3]
        mbs = lambda t: f"{total / 1e6 / t:.0f} MB/s"  # noqa: E731
        rows = [
            [f"sha256sum (one process, {len(paths)} × {args.hash_size_mib} MiB)", ms(t_sha), mbs(t_sha), "1.00×", "—"],
            [f"sha256sum via xargs -P {_bench.os.cpu_count()}", ms(t_par), mbs(t_par), ratio(t_sha, t_par), "—"],
            ["check_outputs --full", ms(t_full), mbs(t_full), ratio(t_sha, t_full), verdict(t_sha / t_full >= 0.8)],
        ]
        _bench.report(f"check --full hashing, {_bench.mib(total)} in {len(paths)} files",
                      ["what", "time", "throughput", "× sha256sum", "≥ 0.8× met"], rows, [f"Best of {rep}; warm page cache."])


if __name__ == "__main__":
    main()
