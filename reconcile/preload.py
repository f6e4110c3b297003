"""A process with heudiconv already imported that forks one child per conversion.

Starting heudiconv costs about a second of imports (nipype, pydicom, …): half of what a small
session's conversion takes. The server pays it once per apply; each conversion is a fork of it,
in a session of its own (so it can be killed with its dcm2niix children), with the log as its
stdout/stderr and the converter environment (no XNAT credentials) it was started with.

Lifetimes: the server dies with the process that started it (PR_SET_PDEATHSIG, tied to a thread
that lives as long as that process) and each conversion dies with the server, so a killed apply
leaves no converter racing the next run. Linux only (fork, pidfd); elsewhere, and whenever the
server cannot be used, `start` raises PreloadUnavailable and the caller runs heudiconv itself.

Run as `python -m reconcile.preload`: reads one JSON request per line on stdin, forks, answers
with the child's PID.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

STATUS_NAME = ".heudiconv-exit"  # written by the child, in its work folder, just before it exits


class PreloadUnavailable(Exception):
    """The preloaded server cannot run a conversion here; run heudiconv as a plain process."""


@dataclass
class Conversion:
    """A heudiconv child of the server. Its process group is its PID."""

    pid: int
    status_path: Path
    _pidfd: int

    def poll(self) -> int | None:
        """The exit status once the child is done; -9 when it died without reporting one."""
        if not self.status_path.exists():
            if not select.select([self._pidfd], [], [], 0)[0]:
                return None  # still running
            if not self.status_path.exists():  # (it may have written it in between)
                return -signal.SIGKILL
        try:
            return int(self.status_path.read_text().strip())
        except ValueError:
            return 1

    def close(self) -> None:
        os.close(self._pidfd)


_guard = threading.Lock()
_server: subprocess.Popen[bytes] | None = None
_server_env: dict[str, str] | None = None


def start(argv: Sequence[str], cwd: Path, log_path: Path, env: Mapping[str, str]) -> Conversion:
    """Fork a heudiconv run of `argv` (its arguments, without the program) from the server."""
    if not hasattr(os, "pidfd_open") or os.environ.get("XNAT2BIDS_PRELOAD", "1") == "0":
        raise PreloadUnavailable("no fork server on this platform")
    status = cwd / STATUS_NAME
    status.unlink(missing_ok=True)
    request = json.dumps({"argv": list(argv), "cwd": str(cwd), "log": str(log_path), "status": str(status)})
    with _guard:
        server = _running(dict(env))
        try:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write(request.encode() + b"\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
        except (OSError, ValueError) as exc:
            _stop()
            raise PreloadUnavailable(f"the heudiconv server stopped: {exc}") from exc
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        # Already gone (and reaped): its status file says how it ended.
        pidfd = os.open(os.devnull, os.O_RDONLY)  # always "readable": poll reads the status
    return Conversion(pid, status, pidfd)


def _running(env: dict[str, str]) -> subprocess.Popen[bytes]:
    global _server, _server_env
    if _server is not None and _server.poll() is None and _server_env == env:
        return _server
    _stop()  # gone, or started with another environment: a new one
    spawned: dict[str, object] = {}
    ready = threading.Event()

    def launch() -> None:
        try:
            spawned["proc"] = subprocess.Popen(
                [sys.executable, "-m", "reconcile.preload"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=die_with_parent,
            )
        except OSError as exc:
            spawned["error"] = exc
        ready.set()
        # PR_SET_PDEATHSIG fires when the thread that started the server ends: this one lives
        # as long as the process.
        threading.Event().wait()

    threading.Thread(target=launch, name="heudiconv-preload", daemon=True).start()
    ready.wait()
    if "error" in spawned:
        raise PreloadUnavailable(f"cannot start the heudiconv server: {spawned['error']}")
    proc = spawned["proc"]
    assert isinstance(proc, subprocess.Popen) and proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise PreloadUnavailable("the heudiconv server did not start (heudiconv not importable?)")
    _server, _server_env = proc, env
    return proc


def _stop() -> None:
    """Let the current server go: it exits at the end of its input; its children run on."""
    global _server
    if _server is not None:
        try:
            if _server.stdin is not None:
                _server.stdin.close()
        except OSError:
            pass
        _server = None


# -- the server ------------------------------------------------------------------------------------


def serve() -> None:
    import heudiconv.cli.run  # noqa: F401  (the import every conversion would otherwise pay)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for line in sys.stdin.buffer:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)  # never returns
        out.write(f"{pid}\n".encode())
        out.flush()


def _child(request: dict) -> None:
    code = 1
    try:
        os.setsid()  # killpg(pid) reaches dcm2niix too
        die_with_parent()  # the server
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # heudiconv waits for its dcm2niix
        log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.chdir(request["cwd"])
        sys.argv = ["heudiconv", *request["argv"]]
        import heudiconv.cli.run

        try:
            heudiconv.cli.run.main(request["argv"])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        status = Path(request["status"])
        tmp = status.with_name(status.name + ".tmp")
        tmp.write_text(str(code))
        os.replace(tmp, status)
    finally:
        os._exit(code)


def die_with_parent() -> None:
    """Linux: be SIGKILLed when the parent (the thread that started us) ends; no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    serve()
