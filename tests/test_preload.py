"""The preloaded heudiconv server: one import, a fork per conversion, gone with its parent."""

from __future__ import annotations

import os
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


def test_a_running_conversion_dies_with_the_process_that_started_the_server(tmp_path: Path) -> None:
    # heudiconv blocks reading a FIFO named like DICOM: a conversion that never ends by itself.
    (tmp_path / "dicom").mkdir()
    os.mkfifo(tmp_path / "dicom" / "1.dcm")
    argv = ["--files", str(tmp_path / "dicom"), "-f", "reproin", "--bids", "-o", str(tmp_path / "out"),
            "-s", "01", "-ss", "a", "-l", "", "-g", "all"]
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
