"""Benchmark `plan`: listing mode over 10,000 sessions vs curl of the same listing, and `--deep`
over 1,000 sessions with 20 ms latency per request, concurrent vs one request after another.

    python benchmarks/bench_plan.py [--sessions 10000] [--deep-sessions 1000] [--latency 0.02] [--repeat 5]

Every plan runs in a child process (its peak RSS is that child's alone) against an emulator in
another process, so the emulator never shares a GIL with the code measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import _bench
from _bench import ms, ratio, verdict

PROJECT = "BENCH"
COLUMNS = "ID,label,project,subject_ID,subject_label,date,insert_date,last_modified,xsiType"


def worker(spec: dict) -> dict:
    """Runs in the child: plan `repeat` times (fresh client and login each time), report the best."""
    from reconcile.config import Config
    from reconcile.observe import make_plan, tool_versions
    from reconcile.plan import Selection
    from reconcile.render import render_text

    root = Path(spec["root"])
    t0 = time.perf_counter()
    tool_versions()  # cached per process; the first call runs `dcm2niix --version`
    tools_s = time.perf_counter() - t0
    best = None
    run = text = None
    for _ in range(spec["repeat"]):
        urls: list[str] = []
        client = _bench.client(spec["url"], on_request=lambda m, u: urls.append(u), max_connections=spec["concurrency"])
        run = text = None  # the previous run's plan and lock are freed here, not in the timed part
        t0, cpu0 = time.perf_counter(), time.process_time()
        run = make_plan(client, root, Config(), Selection(projects=(PROJECT,)), deep=spec["deep"],
                        concurrency=spec["concurrency"])
        text = render_text(run.plan)
        dt, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        plan_requests = len(urls)
        client.close()  # ends the server-side session: one more request, after the timed part
        if best is None or dt < best["seconds"]:
            best = {
                "seconds": dt,
                "cpu": cpu,
                "plan_requests": plan_requests,
                "requests": len(urls),
                "listing_requests": sum(1 for u in urls if u.endswith(f"/projects/{PROJECT}/experiments")),
                "changes": len(run.plan.changes),
                "unchanged": run.plan.unchanged,
                "text_bytes": len(text),
            }
    best["tool_versions_seconds"] = tools_s
    return best


def run_worker(**spec) -> tuple[dict, int]:
    _, rss, out = _bench.child([sys.executable, __file__, "--worker", json.dumps(spec)])
    return json.loads(out.strip().splitlines()[-1]), rss


def emulator_alone(sessions: int, repeat: int) -> float:
    """The emulator's own time to build the listing (WSGI call, no network), in a child process."""
    code = f"""
import base64, time
from werkzeug.test import Client
from reconcile.emulator import Archive, EmulatorApp
a = Archive(); a.add_user("u", "p"); a.add_project("{PROJECT}")
a.add_synthetic_sessions("{PROJECT}", n={sessions}, scans_per_session=1, files_per_scan=1)
c = Client(EmulatorApp(a))
h = {{"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}}
best = 1e9
for _ in range({repeat}):
    t0 = time.perf_counter()
    c.get("/data/projects/{PROJECT}/experiments?format=json&columns={COLUMNS}", headers=h).get_data()
    best = min(best, time.perf_counter() - t0)
print(best)
"""
    return float(_bench.python_child(code)[2].strip())


def curl_listing(url: str, repeat: int) -> float:
    """Best time of one curl, Basic auth (one request, as a client without a session would)."""
    curl = _bench.need("curl")
    listing = f"{url}/data/projects/{PROJECT}/experiments?format=json&columns={COLUMNS}"
    best = float("inf")
    for _ in range(repeat):
        dt, _, _ = _bench.child([curl, "-sf", "-o", "/dev/null", "-u", f"{_bench.USER}:{_bench.PASSWORD}", listing])
        best = min(best, dt)
    return best


def cli_plan(url: str, root: Path, repeat: int) -> tuple[float, int]:
    """`xnat2bids plan` end to end in a fresh interpreter (imports, login, listing, render)."""
    best, rss = float("inf"), 0
    with tempfile.TemporaryDirectory() as cwd:  # no xnat2bids.toml here
        for _ in range(repeat):
            dt, peak, _ = _bench.child([*_bench.XNAT2BIDS, "plan", str(root), "-p", PROJECT],
                                       env=_bench.cli_env(url), cwd=Path(cwd))
            if dt < best:
                best, rss = dt, peak
    return best, rss


def fill_lock(url: str, root: Path, outputs: int) -> None:
    """A lock recording every listed session as exported, with `outputs` small files each on disk."""
    from reconcile.config import Config
    from reconcile.lock import Lock, write_lock
    from reconcile.model import OutputRecord
    from reconcile.naming import address_for
    from reconcile.observe import tool_versions

    from _bench import session_record

    config = Config()
    with _bench.client(url) as c:
        exps = c.list_experiments(PROJECT)
    records = []
    for exp in exps:
        address = address_for(exp, config.naming)
        outs = []
        for k in range(outputs):
            rel = f"{address.path}/anat/{address.path.replace('/', '_')}_run-{k:02d}_T1w.json"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"{}\n")
            st = path.stat()
            outs.append(OutputRecord(rel, st.st_size, "0" * 64, st.st_mtime_ns))
        records.append(session_record(exp, address, config, tool_versions(), tuple(outs)))
    lock = Lock.new()
    lock = type(lock)(lock.lineage, 0, lock.generator, config.fingerprint(),
                      {r.experiment_id: r for r in records})
    write_lock(root, lock)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--deep-sessions", type=int, default=1_000)
    ap.add_argument("--latency", type=float, default=0.02)
    ap.add_argument("--concurrency", type=int, default=16, help="deep plan concurrency (the CLI's: reconcile.xnat.CONNECTIONS)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--outputs", type=int, default=4, help="outputs per session in the up-to-date lock")
    ap.add_argument("--skip-deep", action="store_true")
    ap.add_argument("--skip-listing", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--fill-lock", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.fill_lock:
        url, root, outputs = json.loads(args.fill_lock)
        fill_lock(url, Path(root), outputs)
        return

    n, rep = args.sessions, args.repeat
    rows, notes = [], []
    if not args.skip_listing:
        listing_benchmark(args, n, rep, rows, notes)
    if not args.skip_deep:
        deep_benchmark(args, rep)


def listing_benchmark(args: argparse.Namespace, n: int, rep: int, rows: list, notes: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        empty, full = Path(tmp, "empty"), Path(tmp, "full")
        empty.mkdir()
        full.mkdir()
        emu_alone = emulator_alone(n, rep)
        with _bench.emulator_process("--synthetic-sessions", str(n), "--project", PROJECT,
                                     "--scans-per-session", "1", "--files-per-scan", "1") as url:
            curl_s = curl_listing(url, rep)
            new, rss_new = run_worker(url=url, root=str(empty), deep=False, concurrency=8, repeat=rep)
            cli_s, cli_rss = cli_plan(url, empty, rep)
            # In a child: a parent grown by 10,000 records would pass its peak RSS on to every
            # child it starts afterwards (Linux counts the forked copy's high-water mark at exec).
            _bench.child([sys.executable, __file__, "--fill-lock", json.dumps([url, str(full), args.outputs])])
            same, rss_same = run_worker(url=url, root=str(full), deep=False, concurrency=8, repeat=rep)
            curl_after = curl_listing(url, rep)  # the load may have changed meanwhile
        curl_s = min(curl_s, curl_after)
        rows.append([f"emulator alone: listing of {n:,} built in-process (no network)", ms(emu_alone), "—",
                     ratio(emu_alone, curl_s), "—", "—"])
        rows.append(["curl -u of the listing URL", ms(curl_s), "1", "1.00×", "—", "—"])
        rows.append([f"plan, empty BIDS root ({new['changes']:,} create), in-process",
                     ms(new["seconds"]), f"{new['plan_requests']} ({new['listing_requests']} listing) + logout",
                     ratio(new["seconds"], curl_s), _bench.mib(rss_new),
                     verdict(new["seconds"] <= 1 and new["seconds"] <= 1.5 * curl_s and new["listing_requests"] == 1)])
        rows.append([f"plan, lock with {n:,} sessions × {args.outputs} outputs on disk "
                     f"({same['unchanged']:,} unchanged), in-process",
                     ms(same["seconds"]), f"{same['plan_requests']} ({same['listing_requests']} listing) + logout",
                     ratio(same["seconds"], curl_s), _bench.mib(rss_same),
                     verdict(same["seconds"] <= 1 and same["seconds"] <= 1.5 * curl_s)])
        rows.append(["`xnat2bids plan` CLI, empty root, fresh interpreter", ms(cli_s), "2 + logout", ratio(cli_s, curl_s),
                     _bench.mib(cli_rss), "—"])
        notes.append(f"Target: plan ≤ 1 s and ≤ 1.5× curl, one listing request per project. Best of {rep}. "
                     f"Plan requests = login + listing; the client's close() then ends the server session "
                     f"(DELETE /data/JSESSION, not timed); curl sends Basic auth with its single request. "
                     f"`tool_versions()` (runs `dcm2niix --version`, once per process) took "
                     f"{ms(new['tool_versions_seconds'])} and is outside the in-process time.")
        _bench.report(f"plan, listing mode, {n:,} sessions in one project",
                      ["what", "time", "requests", "× curl", "peak RSS", "target met"], rows, notes)



def deep_benchmark(args: argparse.Namespace, rep: int) -> None:
    d, lat = args.deep_sessions, args.latency
    with tempfile.TemporaryDirectory() as tmp:
        with _bench.emulator_child(d, scans=2, files=3, latency=lat) as url:
            conc, rss_c = run_worker(url=url, root=tmp, deep=True, concurrency=args.concurrency, repeat=min(rep, 3))
            seq, rss_s = run_worker(url=url, root=tmp, deep=True, concurrency=1, repeat=1)
    rows = [
        ["deep plan, one request after another (concurrency 1)", ms(seq["seconds"]), str(seq["requests"]), "1.00×",
         _bench.mib(rss_s), "—"],
        [f"deep plan, concurrency {args.concurrency}", ms(conc["seconds"]), str(conc["requests"]),
         f"{seq['seconds'] / conc['seconds']:.1f}× faster", _bench.mib(rss_c),
         verdict(seq["seconds"] / conc["seconds"] >= 10)],
    ]
    _bench.report(f"plan --deep, {d:,} sessions (2 scans × 3 files), {lat * 1000:.0f} ms latency per request",
                  ["what", "time", "requests", "speed-up", "peak RSS", "target ≥ 10× met"], rows,
                  [f"Client CPU per request: {1000 * conc['cpu'] / conc['requests']:.1f} ms concurrent, "
                   f"{1000 * seq['cpu'] / seq['requests']:.1f} ms sequential; the emulator spends its own CPU on the "
                   f"same 2 cores, so past a few requests in flight the run is CPU-bound, not latency-bound.",
                   f"Each session costs two requests (scan listing, one file listing for all scans); the floor "
                   f"for one-after-another is {2 * d + 1} × {lat * 1000:.0f} ms = {(2 * d + 1) * lat:.1f} s."])


if __name__ == "__main__":
    main()
