"""Shared helpers for the benchmark scripts: machine description, timing, tables, child processes.

Benchmarks are run by hand (`python benchmarks/bench_plan.py`); nothing here is collected by pytest.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# CPU seconds (user + system) of the last process `child` ran, from the same wait4.
last_cpu = 0.0
# Process ID of each running emulator child, by URL, to read its CPU time (`process_cpu`).
emulator_pids: dict[str, int] = {}
XNAT2BIDS = [sys.executable, "-m", "reconcile"]
USER, PASSWORD = "bench", "bench-password"


def machine() -> str:
    """One line: CPU model, cores, RAM, Python, and the load average when the run started."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        ram = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    load = ", load %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return (
        f"{cpu}, {os.cpu_count()} cores{ram}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}{load}"
    )


def best_of(repeat: int, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Best wall time of `repeat` runs of `fn`, and the result of the best run."""
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if dt < best:
            best, result = dt, out
    return best, result


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (pastes into the README as is)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def report(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], notes: Sequence[str] = ()) -> None:
    print(f"\n### {title}\n")
    print(f"Machine: {machine()}\n")
    print(table(headers, rows))
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}×" if y else "n/a"


def mib(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def verdict(ok: bool) -> str:
    return "yes" if ok else "**no**"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def recycle_pages(folder: Path, nbytes: int) -> None:
    """Write `nbytes` of zeros to a file in `folder` and delete it: the same memory state before
    every downloader. On a VM that hands freed pages back to the host (virtio-balloon free page
    reporting), the first write to a page the host took back costs a host fault: writing 1 GiB
    costs 0.4 to 1.5 CPU-s depending on how much memory was freed just before. Without this,
    whichever tool ran right after a large delete looked faster."""
    path = folder / ".recycle"
    block = bytes(1 << 20)
    with open(path, "wb") as out:
        for _ in range(max(1, nbytes >> 20)):
            out.write(block)
    path.unlink()


def _die_with_parent() -> None:
    """In an emulator child before exec: SIGTERM it when the benchmark dies (Linux), so a killed
    benchmark leaves no emulator behind to load the machine for the next one."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def emulator_process(*args: str, timeout: float = 600) -> Iterator[str]:
    """`xnat2bids emulator serve` in its own process (its own GIL); yields the base URL."""
    port = free_port()
    cmd = [*XNAT2BIDS, "emulator", "serve", "--port", str(port), "--user", USER, "--password", PASSWORD, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            preexec_fn=_die_with_parent)
    try:
        _wait_ready(proc, timeout)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"{tool} is not installed (e.g. apt-get install -y {tool})")
    return path


def curl_session(url: str) -> str:
    """Log in once with curl (Basic auth) and return the JSESSIONID that later curls send."""
    out = subprocess.run(
        [need("curl"), "-sf", "-u", f"{USER}:{PASSWORD}", f"{url}/data/JSESSION"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not out:
        raise RuntimeError("curl login returned no session")
    return out


def child(cmd: Sequence[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> tuple[float, int, str]:
    """Run a command; (wall seconds, peak RSS bytes of that child alone, stdout). Raises on failure.

    Uses os.wait4, whose ru_maxrss (KiB on Linux) is this child's own maximum.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd or ROOT, env=env
    )
    out, err = "", ""
    # Drain both pipes before reaping, so a chatty child cannot block on a full pipe.
    if True:
        errbuf: list[str] = []
        reader = threading.Thread(target=lambda: errbuf.append(proc.stderr.read()), daemon=True)
        reader.start()
        out = proc.stdout.read()
        reader.join()
        err = errbuf[0] if errbuf else ""
    _, status, usage = os.wait4(proc.pid, 0)
    global last_cpu
    last_cpu = usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return dt, usage.ru_maxrss * 1024, out


def python_child(code: str, *args: str, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """`python -c code args…` via `child`."""
    return child([sys.executable, "-c", code, *args], env=env)


# -- an emulator in its own process, built from a spec ---------------------------------------------

_EMULATOR_CHILD = r"""
import json, sys
from reconcile.emulator import Archive, EmulatorApp, Fault
from reconcile.emulator.serve import serve_forever
spec = json.loads(sys.argv[1])
archive = Archive()
archive.add_user(spec["user"], spec["password"])
archive.add_project(spec["project"])
archive.add_synthetic_sessions(
    spec["project"], n=spec["sessions"], scans_per_session=spec["scans"], files_per_scan=spec["files"],
    file_size=spec["size"],
)
for exp in archive.sessions():  # list once so lazy MD5s are not computed inside a timed request
    for scan in exp.scans.values():
        for res in scan.resources.values():
            for entry in res.files.values():
                entry.md5 if spec["md5"] else None
app = EmulatorApp(archive)
if spec["latency"]:
    app.faults.add(Fault(route="", kind="latency", seconds=spec["latency"]))
serve_forever(archive, "127.0.0.1", spec["port"], app=app,
              on_ready=lambda url: print("XNAT emulator on", url, flush=True))
"""


@contextlib.contextmanager
def emulator_child(
    sessions: int, *, scans: int = 1, files: int = 1, size: int = 1024, latency: float = 0.0,
    project: str = "BENCH", precompute_md5: bool = True, timeout: float = 900,
) -> Iterator[str]:
    """A synthetic emulator (optionally with per-request latency) in its own process; yields its URL."""
    import json

    port = free_port()
    spec = dict(user=USER, password=PASSWORD, project=project, sessions=sessions, scans=scans, files=files,
                size=size, latency=latency, port=port, md5=precompute_md5)
    proc = subprocess.Popen([sys.executable, "-c", _EMULATOR_CHILD, json.dumps(spec)], preexec_fn=_die_with_parent,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, timeout)
        emulator_pids[url] = proc.pid
        yield url
    finally:
        emulator_pids.pop(url, None)
        _stop(proc)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while True:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"emulator exited with {proc.wait()}")
        if "XNAT emulator on" in line:
            # Keep draining its output so the server never blocks on a full pipe.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return
        if time.monotonic() > deadline:
            raise RuntimeError("emulator did not start")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def client(url: str, **kw: Any):
    from reconcile.credentials import Credentials
    from reconcile.xnat import XnatClient

    return XnatClient(url, Credentials(USER, PASSWORD, "env"), **kw)


def cli_env(url: str) -> dict[str, str]:
    """The environment of a timed CLI run. Bytecode may be written (an installed package has its
    .pyc files; with PYTHONDONTWRITEBYTECODE set, every run compiled two dozen modules, ~0.1 s)."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(XNAT_HOST=url, XNAT_USER=USER, XNAT_PASS=PASSWORD)
    return env


def session_record(exp, address, config, tools, outputs=(), scans=()):  # noqa: ANN001, ANN201
    """A lock record saying `exp` was exported to `address` (as apply would write it)."""
    from reconcile.model import SessionRecord, format_timestamp

    settings = config.conversion_for(exp.project, exp.label)
    return SessionRecord(
        experiment_id=exp.id, project=exp.project, subject_id=exp.subject_id, subject_label=exp.subject_label,
        session_label=exp.label, bids_subject=address.subject, bids_session=address.session, date=exp.date,
        insert_date=format_timestamp(exp.insert_date), last_modified=format_timestamp(exp.last_modified),
        xsi_type=exp.xsi_type, exported_at="2024-06-01T12:00:00Z", config_fingerprint=settings.fingerprint(),
        config_digests=settings.digests(), tools=dict(tools), scans=tuple(scans), outputs=tuple(outputs),
    )


def synthetic_lock(sessions: int, outputs: int, *, scans: int = 2, root: Path | None = None,
                   file_size: int = 64, write_files: bool = False):  # noqa: ANN201
    """A Lock of `sessions` exported sessions with `outputs` outputs each (files written below `root`)."""
    import hashlib
    from datetime import datetime, timedelta

    from reconcile.config import Config
    from reconcile.lock import Lock
    from reconcile.model import Experiment, OutputRecord, ScanRecord
    from reconcile.naming import address_for

    config = Config()
    base = datetime(2024, 1, 1, 9, 0, 0)
    records = {}
    for i in range(1, sessions + 1):
        stamp = base + timedelta(minutes=i, milliseconds=i % 1000)
        exp = Experiment(f"BENCH_E{i:05d}", f"SUB{i:05d}_MR1", "BENCH", f"BENCH_S{i:05d}", f"SUB{i:05d}",
                         "2024-01-01", stamp, stamp)
        address = address_for(exp, config.naming)
        outs = []
        for k in range(outputs):
            rel = f"{address.path}/anat/sub-{address.subject}_ses-{address.session}_run-{k:02d}_T1w.nii.gz"
            data = (f"{rel}\n".encode() * (file_size // len(rel) + 1))[:file_size]
            mtime = 1_700_000_000_000_000_000
            if write_files and root is not None:
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
                mtime = path.stat().st_mtime_ns
            outs.append(OutputRecord(rel, len(data), hashlib.sha256(data).hexdigest(), mtime))
        scan_records = [ScanRecord(str(s), "anat-T1w", "anat-T1w_acq-memprage", 176, 176 * 180_000,
                                   hashlib.sha256(f"{i}/{s}".encode()).hexdigest()) for s in range(1, scans + 1)]
        records[exp.id] = session_record(exp, address, config, {"dcm2niix": "v1.0.20240202", "heudiconv": "1.5.1",
                                                                "xnat2bids": "0.1.0"}, outs, scan_records)
    new = Lock.new()
    return Lock(new.lineage, 1, new.generator, config.fingerprint(), records)
