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
with the child's PID; when a child ends, the server writes how (exit code, or -N for signal N)
into the child's status file, then reaps it.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

STATUS_NAME = ".heudiconv-exit"  # + a number: in the child's work folder, written by the server once it ended
REPORT_GRACE_S = 10.0  # for the server to write the status of a child that has ended


class PreloadUnavailable(Exception):
    """The preloaded server cannot run a conversion here; run heudiconv as a plain process."""


@dataclass
class Conversion:
    """A heudiconv child of the server. Its process group is its PID; `pidfd` refers to it alone."""

    pid: int
    status_path: Path
    pidfd: int
    server: subprocess.Popen[bytes]
    _ended: float | None = field(default=None, init=False, repr=False)  # when the pidfd said so

    def poll(self) -> int | None:
        """The exit status once the server has reported it: -N when signal N killed the child.

        -9 when no report can come: the server is gone (and took its children with it by
        SIGKILL) or it could not write the status within REPORT_GRACE_S.
        """
        if (code := self._reported()) is not None:
            return code
        if not _readable(self.pidfd, 0):
            return None  # still running
        if self._ended is None:
            self._ended = time.monotonic()
        server_gone = self.server.poll() is not None  # before reading: a dead server writes no more
        if (code := self._reported()) is not None:
            return code
        if server_gone or time.monotonic() - self._ended > REPORT_GRACE_S:
            return -signal.SIGKILL
        return None  # ended, and the server is about to say how

    def _reported(self) -> int | None:
        try:
            text = self.status_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return int(text.strip())
        except ValueError:
            return 1

    def running(self) -> bool:
        """The child has not ended yet; once it has, the server may reap it at any time."""
        return self._reported() is None and not _readable(self.pidfd, 0)

    def signal(self, sig: int) -> None:
        """Signal the child's process group (it and its dcm2niix) while the child itself lives.

        Once it has ended its PID may be reused, so nothing is sent: the server SIGKILLs what
        is left of the group (see `_report`).
        """
        if not self.running():
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            # Not yet in a group of its own: the child alone, through its pidfd (no PID reuse).
            try:
                signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        os.close(self.pidfd)


SERVER_TIMEOUT_S = 300.0  # to import heudiconv, or to answer a request with a PID

_guard = threading.Lock()
_requests = itertools.count(1)  # numbers each conversion's status file
_server: subprocess.Popen[bytes] | None = None
_server_env: dict[str, str] | None = None
_broken: str | None = None  # why the server cannot be used in this process; then never retried


def start(argv: Sequence[str], cwd: Path, log_path: Path, env: Mapping[str, str]) -> Conversion:
    """Fork a heudiconv run of `argv` (its arguments, without the program) from the server.

    PreloadUnavailable when this process cannot use the server (then the caller runs heudiconv
    itself): no fork/pidfd here, XNAT2BIDS_PRELOAD=0, a server that failed, or an environment
    other than the one the running server was started with (restarting it would kill the
    conversions other threads have under way).
    """
    global _broken
    if os.environ.get("XNAT2BIDS_PRELOAD", "1") == "0":
        raise PreloadUnavailable("XNAT2BIDS_PRELOAD=0")
    # A name of its own: the late report of a killed earlier conversion in the same folder (the
    # server writes one for every child) cannot pass for this one's.
    status = cwd / f"{STATUS_NAME}-{next(_requests)}"
    status.unlink(missing_ok=True)
    request = json.dumps({"argv": list(argv), "cwd": str(cwd), "log": str(log_path), "status": str(status)})
    with _guard:
        if _broken is None and not _pidfd_works():
            _broken = "no pidfd_open on this system"
        if _broken is not None:
            raise PreloadUnavailable(_broken)
        server = _running(dict(env))
        try:
            assert server.stdin is not None and server.stdout is not None
            server.stdin.write(request.encode() + b"\n")
            server.stdin.flush()
            pid = int(_readline(server, SERVER_TIMEOUT_S))
        except (OSError, ValueError) as exc:
            _broken = f"the heudiconv server stopped answering: {exc}"
            _retire(server)
            raise PreloadUnavailable(_broken) from exc
    # The server reaps a child only once its status file is written: until then this PID is the
    # child's, and afterwards poll reads the file without looking at the pidfd.
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        # Already gone (and reaped): its status file says how it ended.
        pidfd = os.open(os.devnull, os.O_RDONLY)  # always "readable": poll reads the status
    except OSError as exc:  # e.g. EMFILE: the child cannot be watched, so it must not run
        if not status.exists():
            os.kill(pid, signal.SIGKILL)
        raise PreloadUnavailable(f"cannot watch the heudiconv process: {exc}") from exc
    return Conversion(pid, status, pidfd, server)


def _pidfd_works() -> bool:
    try:
        os.close(os.pidfd_open(os.getpid()))
        return True
    except (AttributeError, OSError):  # not Linux, kernel < 5.3, or a seccomp filter
        return False


def _readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _readline(server: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert server.stdout is not None
    if not _readable(server.stdout.fileno(), timeout):
        raise OSError(f"no answer within {timeout:g} s")
    return server.stdout.readline()


def _running(env: dict[str, str]) -> subprocess.Popen[bytes]:
    global _server, _server_env, _broken
    if _server is not None and _server.poll() is None:
        if _server_env != env:
            raise PreloadUnavailable("the heudiconv server runs with another environment")
        return _server
    spawned: dict[str, object] = {}
    ready = threading.Event()

    def launch() -> None:
        try:
            spawned["proc"] = subprocess.Popen(
                # -P: nothing from the working folder shadows what heudiconv imports.
                [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "reconcile.preload"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                cwd="/", start_new_session=True, preexec_fn=die_with_parent,
            )
        except Exception as exc:  # noqa: BLE001 - whatever it is, the caller falls back
            spawned["error"] = exc
        finally:
            ready.set()
        # PR_SET_PDEATHSIG fires when the thread that started the server ends: this one lives
        # as long as the process.
        threading.Event().wait()

    threading.Thread(target=launch, name="heudiconv-preload", daemon=True).start()
    ready.wait()
    proc = spawned.get("proc")
    if not isinstance(proc, subprocess.Popen):
        _broken = f"cannot start the heudiconv server: {spawned.get('error')}"
        raise PreloadUnavailable(_broken)
    try:
        started = _readline(proc, SERVER_TIMEOUT_S).strip() == b"ready"
    except OSError:
        started = False
    if not started:
        _broken = "the heudiconv server did not start (heudiconv not importable?)"
        _retire(proc)
        raise PreloadUnavailable(_broken)
    _server, _server_env = proc, env
    return proc


def _retire(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server that cannot be used (its conversions die with it), and reap it."""
    global _server
    proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    if _server is proc:
        _server = None


# -- the server ------------------------------------------------------------------------------------


def serve() -> None:
    import heudiconv.cli.run  # noqa: F401  (the import every conversion would otherwise pay)

    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # children stay until we reap them (not SIG_IGN)
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    server = os.getpid()
    children: dict[int, tuple[int, Path]] = {}  # pidfd → the child's PID and status file
    poller = select.poll()
    poller.register(0, select.POLLIN)
    pending = b""
    while True:
        for fd, _ in poller.poll():
            if fd in children:
                poller.unregister(fd)
                os.close(fd)
                _report(*children.pop(fd))
                continue
            data = os.read(0, 65536)
            if not data:
                return  # apply closed the pipe or died: our children die with us
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(request, server)  # never returns
                status = Path(request["status"])
                try:
                    pidfd = os.pidfd_open(pid)
                except OSError:  # e.g. EMFILE: unwatched, it would end unreported and unreaped
                    os.kill(pid, signal.SIGKILL)
                    _report(pid, status)
                else:
                    children[pidfd] = (pid, status)
                    poller.register(pidfd, select.POLLIN)
                out.write(f"{pid}\n".encode())
                out.flush()


def _report(pid: int, status: Path) -> None:
    """SIGKILL what is left of the ended child's group, write how it exited, then reap it.

    Until it is reaped its PID (its group's ID) cannot be reused, so only here can a dcm2niix
    that outlived a killed heudiconv be reached safely; apply no longer signals an ended child.
    """
    ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status  # subprocess' -N
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # it ended before its setsid: no group of its own
    tmp = status.with_name(status.name + ".tmp")
    try:
        tmp.write_text(str(code), encoding="utf-8")
        os.replace(tmp, status)
    except OSError:
        pass  # e.g. its work folder is gone: apply gives up waiting and reports it killed
    os.waitpid(pid, 0)


def _child(request: dict, server: int) -> None:
    code = 1
    try:
        os.setsid()  # killpg(pid) reaches dcm2niix too
        die_with_parent()  # the server
        if os.getppid() != server:  # it died before the line above took effect
            os._exit(1)
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
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)  # what the kernel keeps of it, as for a plain `heudiconv` process


def die_with_parent() -> None:
    """Linux: be SIGKILLed when the parent (the thread that started us) ends; no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    serve()
