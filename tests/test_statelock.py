"""The state lock under contention: real files in tmp_path, real processes racing for them.

A slow unlink (the state lock file's removal takes a while, as on a busy network filesystem)
widens the window between deciding to remove a lock file and removing it; every check-and-remove
must stay correct however wide that window is.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from reconcile import statelock
from reconcile.errors import ConfigError, LockHeldError
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


def _holder_json(lock_id: str, pid: int, *, jobs=(), since="2024-01-01T00:00:00Z", **identity) -> str:
    """A holder record on this host; `identity` adds the fields newer versions record (boot_id, pidns, ...)."""
    return json.dumps({
        "id": lock_id, "user": "someone", "host": socket.gethostname(), "pid": pid,
        "since": since, "operation": "apply", "jobs": list(jobs), **identity,
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


def _force_unlocked_as_if_held_on_another_node(root: Path, holder) -> None:
    """`force-unlock` run on a login node while the holder runs on a compute node (a shared filesystem).

    On this host `force_unlock` refuses a holder it can see running, and this test process is it.
    """
    path = state_lock_path(root)
    path.write_text(json.dumps({**json.loads(path.read_text()), "host": "compute-node-7"}))
    statelock.force_unlock(root, holder.id)


def test_release_leaves_another_holders_lock_alone(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    old = statelock.acquire(root, "apply")
    _force_unlocked_as_if_held_on_another_node(root, old)
    new = statelock.acquire(root, "apply")
    statelock.release(root, old)
    assert statelock.read_holder(root) == new
    statelock.release(root, new)
    assert statelock.read_holder(root) is None


def test_record_jobs_refuses_once_the_lock_belongs_to_someone_else(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    batch = statelock.acquire(root, "apply --executor slurm")
    _force_unlocked_as_if_held_on_another_node(root, batch)
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



def test_a_holder_written_by_a_newer_version_with_fields_this_one_lacks_is_still_known(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    path = state_lock_path(root)
    path.write_text(json.dumps({**json.loads(path.read_text()), "phase": "download"}))
    assert statelock.read_holder(root) == holder  # not "unreadable": its holder is alive and named
    with pytest.raises(LockHeldError) as exc:
        statelock.acquire(root, "apply")
    assert f"(lock ID {holder.id})" in str(exc.value)
    statelock.release(root, holder)
    assert not path.exists()


def test_a_holder_at_its_prompt_is_said_so_and_not_after(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    with statelock.asking(root, holder):
        asked = statelock.read_holder(root)
        assert asked.id == holder.id and statelock.gone(asked) is None
        assert re.fullmatch(r"apply \(waiting since \S+Z for its user to answer its confirmation prompt\) by .+",
                            asked.describe()), asked.describe()
    assert statelock.read_holder(root) == holder and "waiting" not in holder.describe()
    statelock.release(root, holder)
    assert not state_lock_path(root).exists()

# -- who is the holder: pid namespaces, pid reuse, reboots --------------------------------------

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _ns_inode(kind: str) -> int | None:
    try:
        return os.stat(f"/proc/self/ns/{kind}").st_ino
    except FileNotFoundError:  # no time namespaces before Linux 5.6
        return None


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, after the two of "pid (comm)"


def _our_identity(pid: int) -> dict:
    """What a holder running as `pid` in this process's boot and namespaces records, read straight from /proc."""
    return {
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        "pidns": _ns_inode("pid"),
        "timens": _ns_inode("time"),
        "start_time": _start_time(pid),
    }


def _is_taken_over(root: Path, record: str, lock_id: str, why: str) -> None:
    """`acquire` takes over the lock file `record`, warning with the lock ID and `why`."""
    state_lock_path(root).write_text(record)
    warnings: list[str] = []
    holder = statelock.acquire(root, "apply", warn=warnings.append)
    assert statelock.read_holder(root) == holder
    assert len(warnings) == 1 and lock_id in warnings[0] and why in warnings[0]
    statelock.release(root, holder)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def other_process():
    """A live process that is not the holder (it may have inherited a dead holder's pid)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@linux_only
def test_holder_in_another_pid_namespace_is_not_taken_over_even_if_its_pid_does_not_exist_here(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    dead = _dead_pid()
    identity = {**_our_identity(os.getpid()), "pidns": _ns_inode("pid") + 1, "start_time": 12345}  # a container's
    record = _holder_json("0ther0ns0000", dead, **identity)
    state_lock_path(root).write_text(record)
    with pytest.raises(LockHeldError) as exc:
        statelock.acquire(root, "apply")
    assert "another xnat2bids holds" in exc.value.summary and f"pid {dead}" in exc.value.summary
    assert "PID namespace" in exc.value.detail
    assert f"`xnat2bids force-unlock 0ther0ns0000 {root}`" in exc.value.hint
    assert state_lock_path(root).read_text() == record


@linux_only
def test_holder_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path, other_process):
    root = tmp_path / "bids"
    root.mkdir()
    identity = _our_identity(other_process.pid)
    identity["start_time"] -= 1  # the holder started earlier, died, and its pid went to `other_process`
    _is_taken_over(root, _holder_json("reused0pid00", other_process.pid, **identity), "reused0pid00", "another process")


@linux_only
def test_holder_from_before_a_reboot_is_taken_over_even_if_its_pid_is_in_use(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    identity = {**_our_identity(os.getpid()), "boot_id": str(uuid.uuid4())}
    _is_taken_over(root, _holder_json("b4reboot0000", os.getpid(), **identity), "b4reboot0000", "restarted")


@linux_only
def test_holder_with_another_boot_id_that_locked_after_this_machine_booted_is_not_taken_over(tmp_path):
    # Not a reboot: another machine with the same hostname (containers with a fixed --hostname).
    root = tmp_path / "bids"
    root.mkdir()
    identity = {**_our_identity(os.getpid()), "boot_id": str(uuid.uuid4())}
    record = _holder_json("samename0000", _dead_pid(), since=_now(), **identity)
    state_lock_path(root).write_text(record)
    with pytest.raises(LockHeldError) as exc:
        statelock.acquire(root, "apply")
    assert "another machine" in exc.value.detail
    assert state_lock_path(root).read_text() == record


@linux_only
def test_holder_whose_identity_was_only_partly_recorded_is_not_taken_over(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    identity = _our_identity(os.getpid())
    del identity["boot_id"]  # /proc/sys/kernel/random/boot_id was unreadable where it ran
    record = _holder_json("n0b00tid0000", _dead_pid(), **identity)
    state_lock_path(root).write_text(record)
    with pytest.raises(LockHeldError) as exc:
        statelock.acquire(root, "apply")
    assert "boot ID" in exc.value.detail
    assert state_lock_path(root).read_text() == record


def test_lock_written_by_an_older_xnat2bids_is_taken_over_only_when_its_pid_is_gone(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    record = _holder_json("0ldl1ve00000", os.getpid())  # no boot_id, pidns, timens, start_time
    state_lock_path(root).write_text(record)
    with pytest.raises(LockHeldError):
        statelock.acquire(root, "apply")
    assert state_lock_path(root).read_text() == record
    state_lock_path(root).write_text(_holder_json("0ldd3ad00000", _dead_pid()))
    warnings: list[str] = []
    holder = statelock.acquire(root, "apply", warn=warnings.append)
    assert len(warnings) == 1 and "0ldd3ad00000" in warnings[0]
    statelock.release(root, holder)


@linux_only
def test_lock_file_records_the_holders_boot_namespaces_and_start_time(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    record = json.loads(state_lock_path(root).read_text())
    assert {k: record.get(k) for k in ("boot_id", "pidns", "timens", "start_time")} == _our_identity(os.getpid())
    assert record["pid"] == os.getpid() and statelock.read_holder(root) == holder
    statelock.release(root, holder)


@linux_only
def test_holder_still_running_here_is_not_taken_over(tmp_path, other_process):
    root = tmp_path / "bids"
    root.mkdir()
    record = _holder_json("runn1ng00000", other_process.pid, **_our_identity(other_process.pid))
    state_lock_path(root).write_text(record)
    with pytest.raises(LockHeldError) as exc:
        statelock.acquire(root, "apply")
    assert f"pid {other_process.pid}" in exc.value.summary and exc.value.detail is None
    assert state_lock_path(root).read_text() == record


@linux_only
def test_force_unlock_refuses_a_holder_still_running_on_this_host(cli, tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")  # this test process holds it, and is running
    with pytest.raises(LockHeldError) as exc:
        statelock.force_unlock(root, holder.id)
    assert "still running" in exc.value.summary and f"pid {os.getpid()}" in exc.value.summary
    assert exc.value.hint.startswith(f"stop it (`kill {os.getpid()}` on ")
    code, out, err = cli("force-unlock", holder.id, str(root))
    assert code == 1 and "still running" in err, out + err
    assert statelock.read_holder(root) == holder
    statelock.release(root, holder)


@linux_only
def test_the_holder_is_named_by_the_uid_not_by_user_and_another_members_is_asked_to_stop(tmp_path, monkeypatch):
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    monkeypatch.setenv("USER", "alice")  # as `su -m` or `sudo -E` leave it
    monkeypatch.setenv("LOGNAME", "alice")
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    assert holder.user == me
    record = state_lock_path(root).read_text()
    state_lock_path(root).write_text(record.replace(f'"user": "{me}"', '"user": "bob"'))
    with pytest.raises(LockHeldError) as exc:  # bob's apply, still running here: this user cannot kill it
        statelock.force_unlock(root, holder.id)
    assert exc.value.hint.startswith(f"ask bob to stop it (`kill {os.getpid()}` on ")


@linux_only
def test_force_unlock_removes_a_holder_it_cannot_see_running(tmp_path):
    # In another PID namespace its pid means nothing here: the user's word is all there is.
    root = tmp_path / "bids"
    root.mkdir()
    identity = {**_our_identity(os.getpid()), "pidns": _ns_inode("pid") + 1}
    state_lock_path(root).write_text(_holder_json("c0nta1ner000", os.getpid(), **identity))
    assert statelock.force_unlock(root, "c0nta1ner000").id == "c0nta1ner000"
    assert not state_lock_path(root).exists()


# Real namespaces (root, or unprivileged user namespaces, and util-linux `unshare`).

_TRY_TO_ACQUIRE = """
import sys
from pathlib import Path
from reconcile import statelock
from reconcile.errors import ConfigError, LockHeldError
try:
    statelock.acquire(Path(sys.argv[1]), "apply")
except LockHeldError as exc:
    print("refused:", exc.detail)
else:
    print("took it")
"""

_HOLD_UNTIL_STDIN_CLOSES = """
import sys
from pathlib import Path
from reconcile import statelock
holder = statelock.acquire(Path(sys.argv[1]), "apply")
print(holder.id, flush=True)
sys.stdin.read()
statelock.release(Path(sys.argv[1]), holder)
"""


def _unshare(*args: str) -> list[str]:
    command = ["unshare", *args, "--fork"]
    try:
        probe = subprocess.run([*command, "true"], capture_output=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no unshare")
    if probe.returncode != 0:
        pytest.skip(f"cannot {' '.join(command)}: {probe.stderr.decode().strip()}")
    return command


def _python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


@linux_only
def test_live_holder_is_not_taken_over_from_a_new_pid_namespace_on_the_same_host(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    holder = statelock.acquire(root, "apply")
    try:
        rival = subprocess.run(
            [*_unshare("--pid", "--mount-proc"), *_python(_TRY_TO_ACQUIRE, str(root))],
            capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent.parent,
        )
        assert rival.returncode == 0, rival.stderr
        assert rival.stdout.startswith("refused:") and "PID namespace" in rival.stdout, rival.stdout
        assert statelock.read_holder(root) == holder
    finally:
        statelock.release(root, holder)


@linux_only
def test_live_holder_in_another_time_namespace_is_not_mistaken_for_a_reused_pid(tmp_path):
    # /proc/PID/stat shows start times shifted by the reader's time namespace boot-time offset.
    root = tmp_path / "bids"
    root.mkdir()
    command = [*_unshare("--time", "--boottime", "100000"), *_python(_HOLD_UNTIL_STDIN_CLOSES, str(root))]
    holder = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        lock_id = holder.stdout.readline().strip()
        assert lock_id and statelock.read_holder(root).id == lock_id
        with pytest.raises(LockHeldError) as exc:
            statelock.acquire(root, "apply")
        assert lock_id in exc.value.summary and "time namespace" in exc.value.detail
    finally:
        holder.stdin.close()
        assert holder.wait(60) == 0
    assert not state_lock_path(root).exists()


# -- one finalizer per batch ----------------------------------------------------------------------


def _batch_lock(root: Path) -> statelock.Holder:
    root.mkdir()
    return statelock.record_jobs(root, statelock.acquire(root, "apply --executor slurm"), ("11", "12"))


def test_a_batch_is_claimed_by_one_finalizer_at_a_time(tmp_path):
    root = tmp_path / "bids"
    batch = _batch_lock(root)
    mine = statelock.claim(root, batch.id, statelock.FINALIZE)
    assert (mine.id, mine.jobs, mine.pid, mine.operation) == (batch.id, ("11", "12"), os.getpid(), "finalize")
    assert statelock.read_holder(root) == mine
    with pytest.raises(LockHeldError, match=rf"batch {batch.id} of .* is being finalized by finalize by .* pid {os.getpid()}"):
        statelock.claim(root, batch.id, statelock.FINALIZE)  # this process is still running
    statelock.release(root, mine)
    assert not state_lock_path(root).exists()


def test_a_finalizer_that_died_or_the_finalize_job_leave_the_batch_to_the_next(tmp_path):
    root = tmp_path / "bids"
    batch = _batch_lock(root)
    for operation, pid in ((statelock.FINALIZE, _dead_pid()), (statelock.FINALIZE_JOB, os.getpid())):
        record = json.loads(_holder_json(batch.id, pid, jobs=batch.jobs))
        state_lock_path(root).write_text(json.dumps({**record, "operation": operation}))
        claimed = statelock.claim(root, batch.id, statelock.FINALIZE)
        assert (claimed.id, claimed.pid) == (batch.id, os.getpid())


def test_a_lock_that_is_no_longer_the_batchs_cannot_be_claimed(tmp_path):
    root = tmp_path / "bids"
    batch = _batch_lock(root)
    statelock.release(root, batch)
    with pytest.raises(LockHeldError, match="no longer batch"):
        statelock.claim(root, batch.id, statelock.FINALIZE)
    assert not state_lock_path(root).exists()


def test_the_state_lock_stays_out_of_a_git_repositorys_add(tmp_path):
    root = tmp_path / "bids"
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    exclude = root / ".git/info/exclude"
    exclude.write_text("*.swp")  # the user's, without a final newline
    for _ in range(2):  # added once
        holder = statelock.acquire(root, "apply")
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
                                capture_output=True, text=True, check=True).stdout
        assert statelock.STATE_LOCK_NAME not in status
        statelock.release(root, holder)
    lines = exclude.read_text().splitlines()
    assert lines[0] == "*.swp" and lines.count(statelock.STATE_LOCK_NAME) == 1


def _git(where: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("layout", ["separate-git-dir", "below-the-top", "worktree", "submodule"])
def test_the_state_lock_stays_out_of_the_add_of_whatever_repository_holds_the_root(tmp_path, layout):
    # `.git` a file (a clone with --separate-git-dir, a linked worktree, a submodule, a DataLad
    # subdataset) or the root a folder below the repository's top (one repository holding several
    # studies, the pi-study layout's <pi>/study-<study>/bids): the exclude file git reads is elsewhere.
    top = tmp_path / "repo"
    if layout == "separate-git-dir":
        _git(tmp_path, "init", "-q", "--separate-git-dir", str(tmp_path / "git-dir"), str(top))
        root = top
    elif layout == "below-the-top":
        _git(tmp_path, "init", "-q", str(top))
        root = top / "lab" / "study-[pilot] 1" / "bids"  # glob characters and a space in the prefix
        root.mkdir(parents=True)
    elif layout == "worktree":
        main = tmp_path / "main"
        _git(tmp_path, "init", "-q", "-b", "main", str(main))
        _git(main, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-q", "--allow-empty", "-m", "base")
        _git(main, "worktree", "add", "-q", str(top))
        root = top
    else:  # a submodule below the superproject's top, the root a folder inside it
        ident = ("-c", "user.name=t", "-c", "user.email=t@x")
        origin, superproject = tmp_path / "origin", tmp_path / "super"
        for repository in (origin, superproject):
            _git(tmp_path, "init", "-q", str(repository))
            _git(repository, *ident, "commit", "-q", "--allow-empty", "-m", "base")
        _git(superproject, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(origin), "studies/one")
        top = superproject / "studies/one"
        root = top / "bids"
        root.mkdir()
    assert (top / ".git").exists() and not (root / ".git").is_dir()
    for _ in range(2):  # added once
        holder = statelock.acquire(root, "apply")
        status = _git(top, "status", "--porcelain", "--untracked-files=all")
        assert statelock.STATE_LOCK_NAME not in status, status
        statelock.release(root, holder)
    exclude = Path(top, _git(root, "rev-parse", "--path-format=absolute", "--git-path", "info/exclude").strip())
    assert exclude.read_text().splitlines().count(statelock.STATE_LOCK_NAME) == 1
    assert not (root / ".git").is_dir()  # nothing made where git does not look


def test_a_root_in_no_repository_gets_no_exclude_file(tmp_path):
    root = tmp_path / "bids"
    root.mkdir()
    statelock.release(root, statelock.acquire(root, "apply"))
    assert list(root.iterdir()) == []


def test_a_root_where_the_lock_cannot_be_written_is_named_not_a_temp_file(tmp_path, monkeypatch):
    # Root bypasses a read-only mode here: a read-only file system is what the lock file meets.
    import errno

    real_open = os.open

    def read_only(path, flags, *args, **kw):
        if flags & os.O_CREAT and str(path).startswith(str(state_lock_path(tmp_path))):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ConfigError) as caught:  # not "held": a script retrying on lock_held would loop
        statelock.acquire(tmp_path, "forget")
    assert caught.value.summary == f"cannot take the state lock of {tmp_path}: Read-only file system"
    assert "must be writable by this user" in caught.value.hint and ".tmp" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("number", "hint"), [
    ("ENOSPC", "the disk holding {root} is full: free space there, then run again"),
    ("EDQUOT", "your disk quota where {root} is is used up: free space (or ask for a larger quota), then run again"),
])
def test_a_full_disk_or_quota_at_the_start_says_to_free_space_not_to_fix_permissions(tmp_path, monkeypatch, number,
                                                                                      hint):
    import errno

    code = getattr(errno, number)
    real_open = os.open

    def full(path, flags, *args, **kw):
        if flags & os.O_CREAT and str(path).startswith(str(state_lock_path(tmp_path))):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", full)
    with pytest.raises(ConfigError) as caught:
        statelock.acquire(tmp_path, "apply")
    assert caught.value.summary == f"cannot take the state lock of {tmp_path}: {os.strerror(code)}"
    assert caught.value.hint == hint.format(root=tmp_path)
    assert "writable" not in str(caught.value)


def test_a_batch_holder_is_described_as_the_batch_not_its_long_gone_submitter():
    holder = statelock.Holder("ab12cd34ef56", "lab", "login1", 4242, "2026-11-27T09:00:00Z", "apply --executor slurm",
                              jobs=("49", "50"))
    assert holder.describe() == ("SLURM batch ab12cd34ef56 (apply --executor slurm by lab@login1 since "
                                 "2026-11-27T09:00:00Z), SLURM jobs 49, 50")
    assert "pid" not in holder.describe()


def test_force_unlock_refuses_a_finalizer_still_running_here(tmp_path):
    # A finalize that claimed a batch's lock keeps the batch's job IDs; it is judged by its process.
    holder = statelock.record_jobs(tmp_path, statelock.acquire(tmp_path, "apply --executor slurm"), ("999991", "999992"))
    claimed = statelock.claim(tmp_path, holder.id, statelock.FINALIZE)
    try:
        with pytest.raises(LockHeldError, match="held by a process that is still running"):
            statelock.force_unlock(tmp_path, holder.id)
        assert statelock.read_holder(tmp_path).id == holder.id
    finally:
        statelock.release(tmp_path, claimed)


def test_a_killed_process_its_parent_has_not_reaped_yet_is_not_running():
    # A zombie answers signal 0, but holds nothing and no kill ends it: its lock can be taken over.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert statelock._alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 30
        while not statelock._zombie(child.pid):  # dead, not yet waited for
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not statelock._alive(child.pid)
    finally:
        child.wait()


def _held_by_bob_on_another_node(root: Path) -> statelock.Holder:
    """An apply of another member's on a compute node (a shared filesystem): one `force-unlock`
    cannot see running from here, so it removes it as asked."""
    holder = statelock.acquire(root, "apply")
    path = state_lock_path(root)
    path.write_text(json.dumps({**json.loads(path.read_text()), "user": "bob", "host": "compute-node-7"}))
    return replace(holder, user="bob", host="compute-node-7")


def test_force_unlock_tells_the_history_who_removed_whose_lock(cli, emulator, tmp_path):
    from worlds import assert_schema

    from reconcile.apply import read_history
    from reconcile.model import login_name

    root = tmp_path / "bids"
    root.mkdir()
    bobs = _held_by_bob_on_another_node(root)
    code, out, err = cli("force-unlock", bobs.id, str(root))
    assert code == 0, out + err
    [entry] = read_history(root)
    assert_schema("history", entry)
    assert (entry["operation"], entry["user"], entry["host"]) == ("force-unlock", login_name(), socket.gethostname())
    assert entry["unlocked"] == {"id": bobs.id, "operation": "apply", "user": "bob", "host": "compute-node-7",
                                 "pid": os.getpid(), "since": bobs.since, "jobs": []}
    assert emulator.password not in (root / ".xnat2bids/history.jsonl").read_text()
    code, out, err = cli("history", str(root))
    assert code == 0, out + err
    assert out == (f"{entry['time']}  force-unlock by {login_name()}@{socket.gethostname()} (xnat2bids "
                   f"{entry['xnat2bids']}): removed the state lock held by {bobs.describe()}\n")


def test_a_forced_unlock_hides_no_commit_of_the_apply_it_broke_from_the_history(cli, emulator, tmp_path):
    # Bob's apply committed a session and was killed before writing its history entry: the forced
    # unlock tells of that commit ("unrecorded") before its own entry, which a version that does
    # not pass over it would take as the last (and look for unrecorded commits after it).
    from worlds import record_as_exported

    from reconcile.apply import read_history, recover
    from reconcile.lock import Lock, write_lock

    root = tmp_path / "bids"
    root.mkdir()
    exp = emulator.archive.add_session("PROJ", "01", "01_MR1", date="2024-01-10")
    record = replace(record_as_exported(emulator.archive, exp, root), exported_at="2024-01-10T10:00:00Z")
    write_lock(root, Lock.new().with_session(record))
    code, out, err = cli("force-unlock", _held_by_bob_on_another_node(root).id, str(root))
    assert code == 0, out + err
    recover(root)
    entries = read_history(root)
    assert [(e["operation"], e["lock_serial"]) for e in entries] == [
        ("unrecorded", {"before": 0, "after": 1}), ("force-unlock", {"before": 1, "after": 1})]
    assert [row["experiment_id"] for row in entries[0]["sessions"]] == [exp.id]
