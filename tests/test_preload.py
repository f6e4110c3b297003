"""The preloaded heudiconv server: one import, a fork per conversion, gone with its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconcile import preload
from reconcile.convert import converter_env

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the fork server is Linux-only")


@pytest.fixture(autouse=True)
def fresh_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Earlier tests may have left a server started with another environment, or none at all."""
    if preload._server is not None:
        preload._retire(preload._server)
    monkeypatch.setattr(preload, "_broken", None)


def _wait(conversion: preload.Conversion, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while (code := conversion.poll()) is None:
        assert time.monotonic() < deadline, "conversion did not finish"
        time.sleep(0.05)
    conversion.close()
    return code


def test_conversions_are_forks_of_one_server_with_their_own_log_and_exit_status(tmp_path: Path) -> None:
    results = []
    for i, argv in enumerate((["--version"], ["--no-such-option"])):
        work = tmp_path / f"w{i}"
        work.mkdir()
        log = tmp_path / f"{i}.log"
        conversion = preload.start(argv, work, log, converter_env())
        results.append((conversion.pid, _wait(conversion), log.read_text(), preload._server.pid))
    (pid_a, code_a, log_a, server_a), (pid_b, code_b, log_b, server_b) = results
    assert server_a == server_b and pid_a != pid_b  # one server, a child each
    assert code_a == 0 and log_a.strip()[:1].isdigit()  # heudiconv's version
    assert code_b == 2 and "usage:" in log_b  # argparse's exit status and message, in the log


def _endless_argv(tmp_path: Path) -> list[str]:
    """heudiconv blocks reading a FIFO named like DICOM: a conversion that never ends by itself."""
    (tmp_path / "dicom").mkdir()
    os.mkfifo(tmp_path / "dicom" / "1.dcm")
    return ["--files", str(tmp_path / "dicom"), "-f", "reproin", "--bids", "-o", str(tmp_path / "out"),
            "-s", "01", "-ss", "a", "-l", "", "-g", "all"]


def _start_endless(tmp_path: Path) -> preload.Conversion:
    """A conversion that is really inside heudiconv (its log says so) and stays there."""
    log = tmp_path / "c.log"
    conversion = preload.start(_endless_argv(tmp_path), tmp_path, log, converter_env())
    deadline = time.monotonic() + 60
    while "Analyzing 1 dicoms" not in (log.read_text() if log.exists() else ""):
        assert conversion.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "heudiconv did not start reading the DICOM"
        time.sleep(0.05)
    return conversion


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGSEGV, signal.SIGKILL], ids=lambda s: s.name)
def test_a_conversion_killed_by_a_signal_reports_that_signal(tmp_path: Path, sig: signal.Signals) -> None:
    conversion = _start_endless(tmp_path)
    os.kill(conversion.pid, sig)  # as the OOM killer, a crash in dcm2niix's parent or a user would
    assert _wait(conversion) == -sig  # subprocess' convention: -N for signal N


def test_a_conversion_that_fails_before_heudiconv_runs_reports_its_exit_status(tmp_path: Path) -> None:
    # The child cannot open its log, so it exits with status 1 before writing any report itself.
    conversion = preload.start(["--version"], tmp_path, tmp_path / "missing" / "c.log", converter_env())
    assert _wait(conversion) == 1


def test_finished_conversions_leave_no_zombie_behind(tmp_path: Path) -> None:
    work = tmp_path / "done"
    work.mkdir()
    assert _wait(preload.start(["--version"], work, tmp_path / "done.log", converter_env())) == 0
    killed = _start_endless(tmp_path)
    os.kill(killed.pid, signal.SIGSEGV)
    assert _wait(killed) == -signal.SIGSEGV
    server = preload._server.pid
    deadline = time.monotonic() + 10
    while children := _children(server):
        assert time.monotonic() < deadline, f"the server left children behind: {children}"
        time.sleep(0.05)
    assert preload._server.poll() is None  # reaping them did not cost the server its life


def test_a_conversion_whose_server_dies_is_reported_killed_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conversion = _start_endless(tmp_path)
    # A report that is late never stops being awaited here: only a dead server ends the wait.
    monkeypatch.setattr(preload, "REPORT_GRACE_S", float("inf"))
    preload._server.kill()  # its children are SIGKILLed with it (PR_SET_PDEATHSIG)
    assert _wait(conversion) == -signal.SIGKILL  # no waiting for a report that cannot come


def test_a_running_conversion_dies_with_the_process_that_started_the_server(tmp_path: Path) -> None:
    argv = _endless_argv(tmp_path)
    script = f"""
import os, signal, time
from pathlib import Path
from reconcile import preload
from reconcile.convert import converter_env
c = preload.start({argv!r}, Path({str(tmp_path)!r}), Path({str(tmp_path / "c.log")!r}), converter_env())
time.sleep(1.0)
assert c.poll() is None, "the conversion should still be waiting on the FIFO"
print(preload._server.pid, c.pid, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    server, child = (int(x) for x in out.stdout.split())
    assert "Analyzing 1 dicoms" in (tmp_path / "c.log").read_text()  # it was really running heudiconv
    deadline = time.monotonic() + 10
    while _alive(server) or _alive(child):
        assert time.monotonic() < deadline, "the server or its conversion outlived the process that started them"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    return _state(pid) not in ("gone", "Z")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, zombies included, with their state."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found[int(entry.name)] = fields[0]
    return found
