"""The state lock under contention: real files in tmp_path, real processes racing for them.

A slow unlink (the state lock file's removal takes a while, as on a busy network filesystem)
widens the window between deciding to remove a lock file and removing it; every check-and-remove
must stay correct however wide that window is.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from reconcile import statelock
from reconcile.errors import LockHeldError
from reconcile.statelock import state_lock_path

MP = multiprocessing.get_context("fork")
SLOW_UNLINK = 0.3


def _slow_unlink_of(path: Path, *, reached=None) -> None:
    """In this (child) process, removing `path` first signals `reached`, then waits SLOW_UNLINK."""
    real = os.unlink

    def unlink(target, *args, **kwargs):
        if os.fspath(target) == os.fspath(path):
            if reached is not None:
                reached.set()
            time.sleep(SLOW_UNLINK)
        return real(target, *args, **kwargs)

    os.unlink = unlink


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _holder_json(lock_id: str, pid: int, *, jobs=()) -> str:
    return json.dumps({
        "id": lock_id, "user": "someone", "host": socket.gethostname(), "pid": pid,
        "since": "2024-01-01T00:00:00Z", "operation": "apply", "jobs": list(jobs),
    })


def _make_old(path: Path, seconds: float = 60) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def _results(q, n: int, timeout: float = 30) -> list[tuple]:
    return [q.get(timeout=timeout) for _ in range(n)]


# -- takeover of a dead holder's lock -----------------------------------------------------------


def _race_for_the_lock(root: Path, start, done, results) -> None:
    _slow_unlink_of(state_lock_path(root))
    start.wait()
    try:
        holder = statelock.acquire(root, "apply")
    except LockHeldError as exc:
        results.put(("lost", os.getpid(), exc.summary))
        return
    results.put(("won", os.getpid(), holder.id))
    done.wait(30)  # keep holding until every racer has given up
    statelock.release(root, holder)


def test_processes_racing_to_take_over_a_dead_holders_lock_leave_exactly_one_holder(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    state_lock_path(root).write_text(_holder_json("deadbeef0000", _dead_pid()))
    start, done, results = MP.Event(), MP.Event(), MP.Queue()
    racers = [MP.Process(target=_race_for_the_lock, args=(root, start, done, results)) for _ in range(6)]
    for p in racers:
        p.start()
    try:
        start.set()
        outcomes = _results(results, len(racers))
        winners = [o for o in outcomes if o[0] == "won"]
        assert len(winners) == 1, outcomes
        assert statelock.read_holder(root).id == winners[0][2]
        losers = [o for o in outcomes if o[0] == "lost"]
        assert all(f"pid {winners[0][1]}" in summary for _, _, summary in losers), losers
    finally:
        done.set()
        for p in racers:
            p.join(30)
    assert not state_lock_path(root).exists()


# -- release ------------------------------------------------------------------------------------


def _hold_then_release_slowly(root: Path, held, go, reached) -> None:
    holder = statelock.acquire(root, "apply")
    held.put(holder.id)
    go.wait(30)
    _slow_unlink_of(state_lock_path(root), reached=reached)
    statelock.release(root, holder)


def test_release_never_removes_a_lock_taken_while_it_was_removing_its_own(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    held, go, reached = MP.Queue(), MP.Event(), MP.Event()
    first = MP.Process(target=_hold_then_release_slowly, args=(root, held, go, reached))
    first.start()
    try:
        first_id = held.get(timeout=30)
        go.set()
        assert reached.wait(30)  # the first holder is removing its lock file right now
        try:
            statelock.force_unlock(root, first_id)
        except LockHeldError as exc:
            assert "is not locked" in exc.summary  # the release finished first
        mine = statelock.acquire(root, "forget")
    finally:
        first.join(30)
    assert statelock.read_holder(root) == mine
    statelock.release(root, mine)
    assert not state_lock_path(root).exists()


def test_release_leaves_another_holders_lock_alone(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    old = statelock.acquire(root, "apply")
    statelock.force_unlock(root, old.id)
    new = statelock.acquire(root, "apply")
    statelock.release(root, old)
    assert statelock.read_holder(root) == new
    statelock.release(root, new)
    assert statelock.read_holder(root) is None


def test_record_jobs_refuses_once_the_lock_belongs_to_someone_else(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    batch = statelock.acquire(root, "apply --executor slurm")
    statelock.force_unlock(root, batch.id)
    other = statelock.acquire(root, "apply")
    with pytest.raises(LockHeldError) as exc:
        statelock.record_jobs(root, batch, ("11", "12"))
    assert other.id in str(exc.value)
    assert statelock.read_holder(root) == other
    statelock.release(root, other)


def test_record_jobs_hands_the_lock_to_the_batch(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply --executor slurm")
    updated = statelock.record_jobs(root, holder, ("11", "12"))
    assert updated.jobs == ("11", "12") and updated.id == holder.id
    assert statelock.read_holder(root) == updated
    assert sorted(p.name for p in root.iterdir()) == [state_lock_path(root).name]  # no temp file left
    statelock.release(root, updated)
    assert not state_lock_path(root).exists()


# -- unreadable and half-written lock files -----------------------------------------------------


def test_lock_file_appears_complete_or_not_at_all(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    path = state_lock_path(root)
    stop = threading.Event()
    torn: list[bytes] = []

    def read_constantly() -> None:
        while not stop.is_set():
            try:
                content = path.read_bytes()
            except FileNotFoundError:
                continue
            try:
                json.loads(content)
            except ValueError:
                torn.append(content)

    reader = threading.Thread(target=read_constantly)
    reader.start()
    try:
        for _ in range(300):
            statelock.release(root, statelock.acquire(root, "apply"))
    finally:
        stop.set()
        reader.join()
    assert torn == []


def test_empty_lock_file_left_by_a_crash_names_the_command_that_removes_it(cli, tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    path = state_lock_path(root)
    path.write_bytes(b"")  # a crash between creating the file and writing it
    _make_old(path)
    with pytest.raises(LockHeldError) as exc:
        statelock.acquire(root, "apply")
    assert "unreadable" in exc.value.summary
    assert f"`xnat2bids force-unlock unreadable {root}`" in exc.value.hint
    code, out, err = cli("force-unlock", "unreadable", str(root))
    assert code == 0, out + err
    assert "Removed the state lock" in out and "unreadable" in out
    assert not path.exists()
    statelock.release(root, statelock.acquire(root, "apply"))


def test_force_unlock_unreadable_refuses_a_readable_lock(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    with pytest.raises(LockHeldError) as exc:
        statelock.force_unlock(root, statelock.UNREADABLE)
    assert holder.id in exc.value.summary
    assert statelock.read_holder(root) == holder
    statelock.release(root, holder)


def test_force_unlock_with_an_id_refuses_an_unreadable_lock_and_names_the_right_command(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    path = state_lock_path(root)
    path.write_text('{"id": "abc')
    _make_old(path)
    with pytest.raises(LockHeldError) as exc:
        statelock.force_unlock(root, "abc")
    assert f"xnat2bids force-unlock unreadable {root}" in exc.value.hint
    assert path.exists()
    assert statelock.force_unlock(root, statelock.UNREADABLE).id == statelock.UNREADABLE
    assert not path.exists()


def _create_then_write_slowly(root: Path, created, done) -> None:
    """A writer that creates the lock file and fills it a moment later (a crash here leaves it empty)."""
    path = state_lock_path(root)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    created.set()
    time.sleep(0.5)
    os.write(fd, _holder_json("c0ffee000000", os.getpid()).encode())
    os.close(fd)
    done.wait(30)


def test_lock_file_being_written_counts_as_held_not_unreadable(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    created, done = MP.Event(), MP.Event()
    writer = MP.Process(target=_create_then_write_slowly, args=(root, created, done))
    writer.start()
    try:
        assert created.wait(30)
        with pytest.raises(LockHeldError) as exc:
            statelock.acquire(root, "apply")
        assert f"pid {writer.pid}" in exc.value.summary and "c0ffee000000" in exc.value.summary
    finally:
        done.set()
        writer.join(30)


def test_lock_file_of_a_writer_that_died_mid_write_is_taken_over_once_written(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    path = state_lock_path(root)
    path.write_bytes(b"")

    def finish_writing() -> None:
        time.sleep(0.3)
        path.write_text(_holder_json("deadbeef0001", _dead_pid()))

    writer = threading.Thread(target=finish_writing)
    writer.start()
    warnings: list[str] = []
    try:
        holder = statelock.acquire(root, "apply", warn=warnings.append)
    finally:
        writer.join()
    assert statelock.read_holder(root) == holder
    assert len(warnings) == 1 and "deadbeef0001" in warnings[0]
    statelock.release(root, holder)


def test_read_holder_of_a_lock_file_with_json_that_is_not_a_holder_is_unreadable(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    for content in (b"[]", b"null", b'{"id": 1}', b"\xff"):
        state_lock_path(root).write_bytes(content)
        _make_old(state_lock_path(root))
        with pytest.raises(LockHeldError) as exc:
            statelock.read_holder(root)
        assert "unreadable" in exc.value.summary
