"""Ctrl-C, two applies at once, and --jobs: real processes against a served emulator.

Timing is driven by the emulator's state (a latency fault has been reached), never by sleeping
for a guessed duration.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest
from relworld import cli_env, served_world, snapshot, start_xnat2bids, xnat2bids

from reconcile.emulator import Fault
from reconcile.lock import read_lock
from reconcile.statelock import state_lock_path

pytestmark = pytest.mark.slow

FILE_GET = r"/scans/[^/]+/resources/[^/]+/files/[^/]+\.dcm$"


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# SIGTERM is what `timeout`, systemd and a SLURM time limit send: it stops apply as Ctrl-C does.
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_signal_during_download_stops_cleanly_releases_the_lock_and_a_rerun_completes(tmp_path, signum):
    with served_world() as world:
        slow = world.app.faults.add(Fault(route=FILE_GET, kind="latency", seconds=1.5))
        root = tmp_path / "bids"
        proc = start_xnat2bids("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1", url=world.url, cwd=tmp_path)
        wait_for(lambda: slow.seen >= 1, "the first file download")
        assert state_lock_path(root).exists()
        proc.send_signal(signum)
        proc.send_signal(signum)  # as GNU timeout does: to its child, then to its process group
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "Forced stop" not in err, out + err
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        assert f"Stopping: the sessions under way are abandoned cleanly ({again} to force)" in err
        assert "Apply cancelled: 0 done, 0 failed, 1 skipped" in out  # stopped by the user: not a failure
        assert "cancelled part-way; nothing of it was committed" in out.split("Apply cancelled")[0]
        assert "see the heudiconv log" not in out
        assert not state_lock_path(root).exists()
        assert read_lock(root) is None
        assert not list(root.glob("sub-*"))
        history = xnat2bids("history", str(root), url=world.url, cwd=tmp_path)
        assert "(cancelled): 0 done, 0 failed, 1 skipped" in history.stdout
        world.app.faults.clear()
        rerun = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "1 done, 0 failed" in rerun.stdout


def test_a_signal_while_xnat_does_not_answer_sends_the_request_no_more(tmp_path, monkeypatch):
    # XNAT answers no file listing or download: the request under way ends at its timeout and is
    # neither sent again on a new connection nor retried.
    with served_world() as world:
        slow = world.app.faults.add(Fault(route="/files", kind="latency", seconds=3))
        config = tmp_path / "lab.toml"
        config.write_text("timeout = 0.5\n")
        root = tmp_path / "bids"
        started: list[subprocess.Popen] = []
        serve = world.app.handle

        def handle(request):
            if slow.matches(request.method, request.path) and slow.seen == 0:
                started[0].send_signal(signal.SIGINT)  # Ctrl-C while XNAT keeps the first one waiting
            return serve(request)

        monkeypatch.setattr(world.app, "handle", handle)
        started.append(start_xnat2bids("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1",
                                       "--config", str(config), url=world.url, cwd=tmp_path))
        out, err = started[0].communicate(timeout=60)
        assert started[0].returncode == 1, out + err
        assert "Stopping: the sessions under way are abandoned cleanly" in err
        assert "Apply cancelled: 0 done, 0 failed, 1 skipped" in out, out + err
        assert slow.seen == 1
        assert not state_lock_path(root).exists() and read_lock(root) is None


def test_a_terminal_that_hangs_up_stops_apply_cleanly(tmp_path):
    # An SSH session that drops hangs up apply's terminal: SIGHUP, then every write to it fails.
    with served_world() as world:
        slow = world.app.faults.add(Fault(route=FILE_GET, kind="latency", seconds=1.5))
        root = tmp_path / "bids"
        master, terminal = os.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconcile", "apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1"],
            cwd=tmp_path, env=cli_env(world.url), stdin=terminal, stdout=terminal, stderr=terminal,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(terminal)
        shown, stop_reading = bytearray(), threading.Event()

        def read_terminal():  # as a terminal would: a progress bar must never block on a full one
            while not stop_reading.is_set():
                if select.select([master], [], [], 0.05)[0]:
                    try:
                        shown.extend(os.read(master, 65536))
                    except OSError:
                        return

        reader = threading.Thread(target=read_terminal)
        reader.start()
        try:
            wait_for(lambda: slow.seen >= 1, "the first file download")
        finally:
            stop_reading.set()
            reader.join()
        os.close(master)  # the hangup: the kernel sends SIGHUP to the terminal's session
        assert proc.wait(timeout=60) == 1, shown.decode(errors="replace")
        assert not state_lock_path(root).exists()
        assert read_lock(root) is None and not list(root.glob("sub-*"))
        history = xnat2bids("history", str(root), url=world.url, cwd=tmp_path)
        assert "(cancelled): 0 done, 0 failed, 1 skipped" in history.stdout, history.stdout + history.stderr
        world.app.faults.clear()
        rerun = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
        assert rerun.returncode == 0 and "1 done, 0 failed" in rerun.stdout, rerun.stdout + rerun.stderr
        assert "taking over" not in rerun.stderr


def test_an_apply_started_with_nohup_outlives_a_hangup(tmp_path):
    with served_world() as world:
        slow = world.app.faults.add(Fault(route=FILE_GET, kind="latency", seconds=1.5))
        root = tmp_path / "bids"
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconcile", "apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1"],
            cwd=tmp_path, env=cli_env(world.url), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
        )  # as `nohup` starts it
        wait_for(lambda: slow.seen >= 1, "the first file download")
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "1 done, 0 failed" in out, out + err
        assert "Stopping" not in err and len(read_lock(root).sessions) == 1


def test_a_second_ctrl_c_forces_the_stop_of_a_download_that_does_not_end(tmp_path):
    with served_world() as world:
        # Stuck for far longer than the stop takes (the served emulator waits for it at the end).
        slow = world.app.faults.add(Fault(route=FILE_GET, kind="latency", seconds=15))
        root = tmp_path / "bids"
        proc = start_xnat2bids("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1", url=world.url, cwd=tmp_path)
        wait_for(lambda: slow.seen >= 1, "the first file download")
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, out + err
        assert "Forced stop: the next apply settles what was under way." in err
        world.app.faults.clear()
        rerun = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
        assert rerun.returncode == 0 and "1 done, 0 failed" in rerun.stdout, rerun.stdout + rerun.stderr
        assert "taking over the state lock left by a process that no longer exists" in rerun.stderr


def test_sigterm_stops_plan_with_exit_1_and_one_line(tmp_path):
    with served_world() as world:
        slow = world.app.faults.add(Fault(route=r"/projects/PROJ/experiments$", kind="latency", seconds=5))
        proc = start_xnat2bids("plan", str(tmp_path / "bids"), "-p", "PROJ", url=world.url, cwd=tmp_path)
        wait_for(lambda: slow.seen >= 1, "the listing request")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, err.strip().splitlines()[-1]) == (1, "Interrupted."), out + err


def test_second_apply_on_the_same_root_fails_at_once_naming_the_holder(tmp_path):
    with served_world() as world:
        # The first apply's first file download is held until the second apply has finished.
        reached, release = threading.Event(), threading.Event()
        serve = world.app.handle

        def handle(request):
            if re.search(FILE_GET, request.path) and not release.is_set():
                reached.set()
                release.wait(120)  # a guard against hanging, not a bound on speed
            return serve(request)

        world.app.handle = handle
        root = tmp_path / "bids"
        first = start_xnat2bids("apply", str(root), "-p", "PROJ", "--yes", "--jobs", "1", url=world.url, cwd=tmp_path)
        try:
            wait_for(reached.is_set, "the first apply's download")
            second = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", url=world.url, cwd=tmp_path)
            # plan and check read on, and say that the root is being changed
            looks = [xnat2bids(*command, str(root), url=world.url, cwd=tmp_path)
                     for command in (("plan", "-p", "PROJ"), ("check",))]
            assert first.poll() is None  # the second did not wait for the first to end
        finally:
            release.set()
        assert second.returncode == 1
        assert f"another xnat2bids holds {root}: apply by" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        for look in looks:
            assert f"pid {first.pid} since" in look.stderr and "is at work on this root" in look.stderr, look.stderr
        assert looks[0].returncode == 0 and "+ create" in looks[0].stdout
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, out + err
        assert "1 done" in out
        assert not state_lock_path(root).exists()


def test_jobs_3_produces_the_same_lock_and_files_as_jobs_1(tmp_path):
    sessions = [(f"{i:02d}", f"{i:02d}_MR1", f"2024-01-{10 + i}") for i in range(1, 4)]
    with served_world(sessions=sessions) as world:
        results = {}
        for jobs in ("1", "3"):
            root = tmp_path / f"bids-{jobs}"
            r = xnat2bids("apply", str(root), "-p", "PROJ", "--yes", "--jobs", jobs, url=world.url, cwd=tmp_path)
            assert r.returncode == 0 and "3 done" in r.stdout, r.stdout + r.stderr
            results[jobs] = snapshot(root)
            assert read_lock(root).serial == 3
        files1, lock1 = results["1"]
        files3, lock3 = results["3"]
        assert sorted(files1) == sorted(files3)
        assert all(files1[k] == files3[k] for k in files1), [k for k in files1 if files1[k] != files3[k]]
        assert lock1 == lock3 and len(lock1) == 3


def test_an_apply_refused_while_another_waits_at_its_prompt_says_so(tmp_path):
    # A person who left an apply at its confirmation prompt keeps the lock: the night's cron run
    # is refused and its log says who keeps it, and why.
    with served_world() as world:
        root = tmp_path / "bids"
        master, terminal = os.openpty()
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconcile", "apply", str(root), "-p", "PROJ"],
            cwd=tmp_path, env=cli_env(world.url), stdin=terminal, stdout=terminal, stderr=terminal,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(terminal)
        shown = bytearray()

        def at_prompt() -> bool:
            if select.select([master], [], [], 0.05)[0]:
                shown.extend(os.read(master, 65536))
            return b"[y/N]" in shown

        try:
            wait_for(at_prompt, "the confirmation prompt")
            assert "confirmation prompt" in json.loads(state_lock_path(root).read_text())["operation"]
            cron = subprocess.run([sys.executable, "-m", "reconcile", "apply", str(root), "-p", "PROJ", "--yes"],
                                  cwd=tmp_path, env=cli_env(world.url), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=120)
            assert cron.returncode == 1, cron.stdout + cron.stderr
            assert re.search(r"apply \(waiting since \S+ for its user to answer its confirmation prompt\) by \S+ "
                             r"pid \d+ since \S+ \(lock ID \w+\)", cron.stderr), cron.stderr
            os.write(master, b"n\n")
            assert proc.wait(timeout=60) == 1
        finally:
            proc.kill()
            os.close(master)
        assert not state_lock_path(root).exists() and read_lock(root) is None
