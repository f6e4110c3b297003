"""A sentinel password must not leak: not into child processes (argv or environment), logs,
history, lock, output or --debug tracebacks. TLS verification is on unless --insecure is given."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from relworld import SENTINEL, served_world, start_xnat2bids, xnat2bids

from reconcile.config import Config


def _ppid(pid: str) -> int | None:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat_line.rsplit(")", 1)[1].split()[1])


class ChildSpy:
    """Polls /proc for every descendant of `root_pid`, keeping each one's argv and environment."""

    def __init__(self, root_pid: int):
        self.root_pid = root_pid
        self.root_argv = Path(f"/proc/{root_pid}/cmdline").read_bytes()
        self.seen: dict[int, tuple[bytes, bytes]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            family = {self.root_pid}
            pids = [p for p in os.listdir("/proc") if p.isdigit()]
            parents = {int(p): _ppid(p) for p in pids}
            changed = True
            while changed:
                changed = False
                for pid, parent in parents.items():
                    if parent in family and pid not in family:
                        family.add(pid)
                        changed = True
            for pid in family - {self.root_pid}:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                # Between fork and exec a child still shows its parent's argv and environment
                # (the test puts the password in apply's own); that is not something it was given.
                if argv != self.root_argv:
                    self.seen[pid] = (argv, environ)
            self._stop.wait(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_password_never_reaches_children_files_or_output(tmp_path):
    secret = SENTINEL.encode()
    with served_world() as world:
        root = tmp_path / "bids"
        proc = start_xnat2bids("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1", url=world.url, cwd=tmp_path)
        spy = ChildSpy(proc.pid)
        out, err = proc.communicate(timeout=180)
        spy.stop()
        assert proc.returncode == 0, out + err
        commands = [argv.split(b"\0") for argv, _ in spy.seen.values()]
        # heudiconv runs in forks of the preloaded server (or as its own process where it cannot).
        converters = (b"reconcile.preload", b"heudiconv.cli.run")
        assert any(a in converters for argv in commands for a in argv), "heudiconv was never observed"
        for pid, (argv, environ) in spy.seen.items():
            assert secret not in argv, f"password in the argv of child {pid}: {argv[:200]!r}"
            assert secret not in environ, f"password in the environment of child {pid}: {argv[:200]!r}"
        assert SENTINEL not in out + err
        files = all_bytes(root)
        assert any(name.startswith(".xnat2bids/logs/") for name in files) and ".xnat2bids/history.jsonl" in files
        assert [name for name, data in files.items() if secret in data] == []

        # Errors, with and without --debug: rejected credentials (a traceback), an unknown project.
        results = []
        for extra_args, password in (([], "wrong-" + SENTINEL), (["--debug"], "wrong-" + SENTINEL),
                                     (["--debug"], SENTINEL)):
            r = xnat2bids(*extra_args, "plan", str(root), "-p", "NOPE", url=world.url, cwd=tmp_path,
                          XNAT_PASS=password)
            assert r.returncode == 1
            assert SENTINEL not in r.stdout + r.stderr
            results.append(r)
        assert "XNAT rejected the credentials for user admin" in results[0].stderr
        assert "Traceback" in results[1].stderr  # --debug printed one, without the password


def test_converter_environment_carries_no_credentials(monkeypatch):
    from reconcile.convert import converter_env

    monkeypatch.setenv("XNAT_PASS", SENTINEL)
    monkeypatch.setenv("XNAT_USER", "admin")
    monkeypatch.setenv("XNAT_TOKEN_FILE", "/tmp/token.json")
    env = converter_env()
    assert SENTINEL not in "".join(env.values())
    assert "XNAT_USER" not in env and "XNAT_TOKEN_FILE" not in env


def test_netrc_wider_than_0600_gets_a_warning(cli, emulator, tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    host = emulator.url.split("://")[1].split(":")[0]
    netrc.write_text(f"machine {host} login {emulator.user} password {emulator.password}\n")
    netrc.chmod(0o644)
    monkeypatch.delenv("XNAT_USER")
    monkeypatch.delenv("XNAT_PASS")
    monkeypatch.setenv("NETRC", str(netrc))
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ")
    assert code == 0, out + err
    assert f"{netrc} is readable by others (mode 0644); run: chmod 600 {netrc}" in err
    assert emulator.password not in out + err
    netrc.chmod(stat.S_IRUSR | stat.S_IWUSR)
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ")
    assert code == 0 and "readable by others" not in err


def test_tls_verification_is_on_by_default_and_off_only_with_insecure(cli, emulator, tmp_path, monkeypatch):
    import reconcile.xnat

    assert Config().verify_tls is True
    seen = []
    original = reconcile.xnat.XnatClient.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.verify)

    monkeypatch.setattr(reconcile.xnat.XnatClient, "__init__", spy)
    assert cli("plan", str(tmp_path / "bids"), "-p", "PROJ")[0] == 0
    code, out, err = cli("plan", str(tmp_path / "bids"), "-p", "PROJ", "--insecure")
    assert code == 0, out + err
    assert seen == [True, False]
    assert "TLS certificate verification is off (--insecure)" in err
