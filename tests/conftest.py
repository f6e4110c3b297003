"""Shared fixtures: an in-memory XNAT archive and the emulator serving it over real HTTP."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from pytest_httpserver import HTTPServer

from reconcile import forked
from reconcile.cli import main
from reconcile.emulator import Archive, EmulatorApp

EMULATOR_USER = "admin"
EMULATOR_PASSWORD = "secret"


@dataclass
class RunningEmulator:
    """The emulator as a test sees it: where it listens, what it serves, who may log in."""

    url: str
    archive: Archive
    app: EmulatorApp
    user: str
    password: str


class _QuickStopHTTPServer(HTTPServer):
    """pytest-httpserver whose serve loop polls often, so stopping takes milliseconds, not 0.5 s."""

    def thread_target(self) -> None:
        assert self.server is not None
        self.server.serve_forever(poll_interval=0.02)


# The machine's proxies would send the tests' requests to 127.0.0.1 elsewhere; NO_PROXY goes too,
# as it means nothing without them (test_keepalive.py sets the ones it is about).
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Every test talks to 127.0.0.1 directly, whatever proxy the machine's environment names
    (common on campus and HPC hosts). A test about proxies sets its own variables."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(autouse=True)
def _git_identity(monkeypatch):
    """Commits made by tests (`--git-commit`, merges of two clones) have an author on any machine:
    a fresh one has no ~/.gitconfig, and git may not guess an address. A test about a missing
    identity removes these."""
    for role in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{role}_NAME", "xnat2bids tests")
        monkeypatch.setenv(f"GIT_{role}_EMAIL", "tests@xnat2bids.invalid")


@pytest.fixture(autouse=True)
def _private_lock_cache(tmp_path_factory, monkeypatch):
    """Lock read caches go to a per-test folder, never the user's ~/.cache."""
    monkeypatch.setenv("XNAT2BIDS_CACHE_DIR", str(tmp_path_factory.mktemp("lock-cache")))


class Forks(list):
    """(pid, part size) of each child `reconcile.forked` forked, in order."""

    @property
    def pids(self) -> list[int]:
        return [pid for pid, _ in self]

    @property
    def sizes(self) -> list[int]:
        return [size for _, size in self]


@pytest.fixture
def forks(monkeypatch) -> Forks:
    """`reconcile.forked` forks although pytest may hold threads of its own (the work the tests
    hand it takes no locks), and records each child it forked."""
    monkeypatch.setattr(forked, "may_fork", lambda: True)
    record = Forks()
    real = forked._fork

    def fork(fn, part):
        child = real(fn, part)
        if child is not None:
            record.append((child[0], len(part)))
        return child

    monkeypatch.setattr(forked, "_fork", fork)
    return record


@pytest.fixture
def archive() -> Archive:
    """An empty archive with user admin/secret and an empty project PROJ."""
    archive = Archive(site="XNAT")
    archive.add_user(EMULATOR_USER, EMULATOR_PASSWORD)
    archive.add_project("PROJ", name="Test project")
    return archive


@pytest.fixture
def emulator(archive: Archive) -> Iterator[RunningEmulator]:
    """The emulator over `archive`, served by pytest-httpserver on a free local port."""
    app = EmulatorApp(archive)
    server = _QuickStopHTTPServer(host="127.0.0.1", port=0, threaded=True)

    def handler(request):  # noqa: ANN001, ANN202 - werkzeug types
        response = app.handle(request)
        # pytest-httpserver keeps every (request, response) pair; drop them so long runs stay small.
        server.clear_log()
        return response

    # One permanent catch-all handler: any number of requests, in any order, nothing "unexpected".
    server.expect_request(re.compile(".*")).respond_with_handler(handler)
    server.start()
    try:
        yield RunningEmulator(
            url=f"http://127.0.0.1:{server.port}",
            archive=archive,
            app=app,
            user=EMULATOR_USER,
            password=EMULATOR_PASSWORD,
        )
    finally:
        server.clear()
        if server.is_running():
            server.stop()


@pytest.fixture
def cli(emulator, monkeypatch, capsys, tmp_path_factory):
    """Run the real CLI entry point against the emulator; returns (exit code, stdout, stderr).

    Credentials come from the environment, as a user's would; the working directory is a
    fresh folder, so no stray ./xnat2bids.toml is picked up.
    """
    monkeypatch.setenv("XNAT_HOST", emulator.url)
    monkeypatch.setenv("XNAT_USER", emulator.user)
    monkeypatch.setenv("XNAT_PASS", emulator.password)
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    # The emulator's access log would interleave with the CLI's stderr.
    monkeypatch.setattr(logging.getLogger("werkzeug"), "disabled", True)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main(list(args))
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return run
