"""Benchmark downloading one session: `export_session` (files, zip) vs curl (same URLs, --parallel)
vs xnatpy's `scan.download`, with throughput, peak RSS of each downloader and ratios.

    python benchmarks/bench_download.py [--repeat 2] [--only big|small]

Variants: "big" = 4 scans × 64 files × 4 MiB (1 GiB); "small" = 4 scans × 1,024 files × 32 KiB
(128 MiB). Every downloader runs in its own child process (peak RSS from wait4) against an
emulator in another process, writing below a fresh directory that is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import _bench
from _bench import verdict

PROJECT = "BENCH"
TOOLS = ("curl", "curl+verify", "files", "zip", "xnatpy")
VARIANTS = {"big": (4, 64, 4 << 20), "small": (4, 1024, 32 << 10)}
WORKER = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
import _bench
spec = json.loads(sys.argv[1])
with _bench.client(spec["url"]) as c:
    exp = c.list_experiments(spec["project"])[0]
    scans = c.list_scans(exp)
    t0 = time.perf_counter()
    if spec["tool"] == "xnatpy":
        import xnat
        with xnat.connect(spec["url"], user=_bench.USER, password=_bench.PASSWORD, loglevel="ERROR") as s:
            x = s.experiments[exp.id]
            for scan in scans:
                x.scans[scan.id].download(f"{{spec['dest']}}/{{scan.id}}.zip", verbose=False)
    else:
        from reconcile.export import export_session
        export_session(c, exp, scans, spec["dest"], method=spec["tool"])
    print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""


def run_tool(tool: str, url: str, dest: Path) -> tuple[float, int]:
    code = WORKER.format(bench=str(Path(__file__).parent))
    spec = {"tool": tool, "url": url, "dest": str(dest), "project": PROJECT}
    _, rss, out = _bench.python_child(code, json.dumps(spec))
    return json.loads(out.strip().splitlines()[-1])["seconds"], rss


def run_curl_verified(url: str, dest: Path, parallel: int) -> tuple[float, int]:
    """curl as below, then what export_session adds: the MD5 of every file (md5sum, in parallel).
    export_session's check built from standard tools."""
    dt, rss = run_curl(url, dest, parallel)
    t0 = time.perf_counter()
    _bench.child(["sh", "-c", f"find {dest} -type f -print0 | xargs -0 -n 16 -P {parallel} md5sum >/dev/null"])
    return dt + time.perf_counter() - t0, rss


def run_curl(url: str, dest: Path, parallel: int) -> tuple[float, int]:
    """curl with a config file listing every file URL of the session, --parallel, one session cookie."""
    with _bench.client(url) as c:
        exp = c.list_experiments(PROJECT)[0]
        scans = c.list_scans(exp)
    sid = _bench.curl_session(url)
    config = dest.with_suffix(".curlrc")
    lines = []
    for scan in scans:
        (dest / scan.id).mkdir(parents=True, exist_ok=True)
        for f in scan.files:
            lines.append(f'url = "{url}{f.uri}"\noutput = "{dest / scan.id / f.name}"')
    config.write_text("\n".join(lines) + "\n")
    cmd = [_bench.need("curl"), "-sf", "-b", f"JSESSIONID={sid}", "--parallel", "--parallel-max", str(parallel),
           "-K", str(config)]
    dt, rss, _ = _bench.child(cmd)
    config.unlink()
    return dt, rss


def emulator_alone(scans: int, files: int, size: int) -> float:
    """Bytes per second the emulator's synthetic content generator produces (no network)."""
    code = f"""
import time
from reconcile.emulator import Archive
a = Archive(); a.add_project("{PROJECT}")
exp = a.add_synthetic_sessions("{PROJECT}", n=1, scans_per_session={scans}, files_per_scan={files}, file_size={size})[0]
t0 = time.perf_counter(); n = 0
for scan in exp.scans.values():
    for res in scan.resources.values():
        for entry in res.files.values():
            for chunk in entry.iter_bytes():
                n += len(chunk)
print(n / (time.perf_counter() - t0))
"""
    return float(_bench.python_child(code)[2].strip())


def md5_rate() -> float:
    """Bytes per second hashlib's MD5 (OpenSSL) manages on one core: the floor of a verified download."""
    import hashlib
    import os

    block = os.urandom(1 << 20)
    h = hashlib.md5()
    t0 = time.perf_counter()
    for _ in range(256):
        h.update(block)
    return 256 * len(block) / (time.perf_counter() - t0)


def bench_variant(name: str, repeat: int, parallel: int) -> None:
    scans, files, size = VARIANTS[name]
    total = scans * files * size
    gen_rate = emulator_alone(scans, files, size)
    results: dict[str, tuple[float, int]] = {}
    with tempfile.TemporaryDirectory(dir=Path.home() if Path.home().exists() else None) as tmp:
        with _bench.emulator_child(1, scans=scans, files=files, size=size) as url:
            for _ in range(repeat):
                # Interleaved, so a change of machine load hits every tool alike.
                for tool in TOOLS:
                    dest = Path(tmp, tool)
                    dest.mkdir()
                    try:
                        if tool == "curl":
                            dt, rss = run_curl(url, dest, parallel)
                        elif tool == "curl+verify":
                            dt, rss = run_curl_verified(url, dest, parallel)
                        else:
                            dt, rss = run_tool(tool, url, dest)
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
                    if tool not in results or dt < results[tool][0]:
                        results[tool] = (dt, rss)
    mbps = {k: total / 1e6 / v[0] for k, v in results.items()}
    names = {
        "curl": f"curl --parallel --parallel-max {parallel} (config file of every URL)",
        "curl+verify": "the same curl, then md5sum -P (export's check)",
        "files": "export_session method=files",
        "zip": "export_session method=zip",
        "xnatpy": "xnatpy scan.download (zip per scan, not extracted)",
    }
    rows = []
    for tool in TOOLS:
        dt, rss = results[tool]
        ours = tool in ("files", "zip")
        rows.append([
            names[tool], f"{dt:.2f} s", f"{mbps[tool]:.0f} MB/s", f"{mbps[tool] / mbps['curl']:.2f}×",
            f"{mbps[tool] / mbps['xnatpy']:.2f}×", _bench.mib(rss),
            verdict(mbps[tool] >= 0.9 * mbps["curl"] and mbps[tool] >= mbps["xnatpy"] and rss < 150 << 20)
            if ours else "—",
        ])
    _bench.report(
        f"download of one session, {scans} scans × {files:,} files × {size >> 10:,} KiB = {_bench.mib(total)}",
        ["downloader", "time", "throughput", "× curl", "× xnatpy", "peak RSS", "target met"], rows,
        [f"Targets: ≥ 0.9× curl, ≥ 1× xnatpy, peak RSS < 150 MB. Best of {repeat}, interleaved. "
         f"Emulator alone generates content at {gen_rate / 1e6:.0f} MB/s (in-process, no network). "
         "export_session also hashes (MD5) every file and renames it into place (files with an MD5 are "
         "not fsynced: they are hashed again whenever reused); curl and xnatpy do neither. MD5 runs at "
         f"{md5_rate() / 1e6:.0f} MB/s on one core here."],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4, help="curl --parallel-max (export uses 4 workers)")
    ap.add_argument("--only", choices=sorted(VARIANTS))
    args = ap.parse_args()
    for name in ([args.only] if args.only else ["big", "small"]):
        bench_variant(name, args.repeat, args.parallel)


if __name__ == "__main__":
    main()
