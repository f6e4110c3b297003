"""reconcile.forked: parts of a list worked on by forked children, with the parent as the fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pytest

from reconcile import forked

if TYPE_CHECKING:
    from conftest import Forks


pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                                reason="forks only on Linux")


def pid_and_sum(part: Sequence[int]) -> list[int]:
    return [os.getpid(), sum(part)]


def all_reaped(pids: list[int]) -> bool:
    """Each of these children was waited for: none is left running or as a zombie."""
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return bool(pids)


def test_each_part_after_the_first_runs_in_a_child_and_the_results_keep_their_order(forks: Forks) -> None:
    parts = [range(0, 10), range(10, 20), range(20, 30)]
    results = forked.map_forked(pid_and_sum, [list(p) for p in parts])
    assert [r[1] for r in results] == [45, 145, 245]
    assert results[0][0] == os.getpid()
    assert {r[0] for r in results[1:]}.isdisjoint({os.getpid()}) and results[1][0] != results[2][0]
    assert all_reaped(forks.pids)


def test_with_other_threads_alive_nothing_forks() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert not forked.may_fork()
        results = forked.map_forked(pid_and_sum, [[1], [2], [3]])
    finally:
        stop.set()
        thread.join()
    assert results == [[os.getpid(), 1], [os.getpid(), 2], [os.getpid(), 3]]


def test_a_failing_child_only_costs_time_its_part_is_done_here(forks: Forks) -> None:
    parent = os.getpid()

    def fails_in_children(part: Sequence[int]) -> list[int]:
        if os.getpid() != parent and 2 in part:
            raise RuntimeError("a child fails")
        return pid_and_sum(part)

    assert forked.map_forked(fails_in_children, [[1], [2], [3]])[1] == [parent, 2]
    assert all_reaped(forks.pids)


def test_a_killed_child_only_costs_time(forks: Forks) -> None:
    parent = os.getpid()

    def killed_in_children(part: Sequence[int]) -> list[int]:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return pid_and_sum(part)

    assert forked.map_forked(killed_in_children, [[1], [2, 3]]) == [[parent, 1], [parent, 5]]
    assert all_reaped(forks.pids)


def test_a_result_that_cannot_cross_the_pipe_is_made_here(forks: Forks) -> None:
    parent = os.getpid()
    results = forked.map_forked(lambda part: object() if os.getpid() != parent else len(part), [[1], [2, 3]])
    assert results == [1, 2]


def test_an_error_in_the_parents_part_leaves_no_child_behind(forks: Forks) -> None:
    parent = os.getpid()

    def fails_here(part: Sequence[int]) -> int:
        if os.getpid() == parent:
            raise ValueError("the parent's part")
        return 0

    with pytest.raises(ValueError, match="the parent's part"):
        forked.map_forked(fails_here, [[1], [2], [3]])
    assert all_reaped(forks.pids)


@pytest.mark.parametrize("items, min_part, cores, sizes", [
    (100, 10, 4, [25, 25, 25, 25]),
    (101, 10, 4, [26, 25, 25, 25]),
    (25, 10, 4, [13, 12]),  # at least min_part each
    (9, 10, 4, [9]),
    (0, 10, 4, [0]),
    (1000, 1, 64, [125] * 8),  # at most MAX_WORKERS
])
def test_split_gives_contiguous_parts_one_per_core_at_most(
    monkeypatch: pytest.MonkeyPatch, items: int, min_part: int, cores: int, sizes: list[int]
) -> None:
    monkeypatch.setattr(forked, "cores", lambda: cores)
    parts = forked.split(list(range(items)), min_part)
    assert [len(p) for p in parts] == sizes
    assert [x for p in parts for x in p] == list(range(items))


def test_a_thread_python_does_not_know_of_also_stops_forking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forked.threading, "active_count", lambda: 1)  # as for a thread a C library started
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    try:
        assert forked._os_threads() >= 2 and not forked.may_fork()
    finally:
        stop.set()
        thread.join()


def test_a_child_that_hangs_is_killed_and_its_part_done_here(forks: Forks, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forked, "CHILD_GRACE", 0.3)
    parent = os.getpid()

    def hangs_in_children(part: Sequence[int]) -> list[int]:
        if os.getpid() != parent:
            time.sleep(30)  # were it not killed, its own pid would come back: the test fails
        return pid_and_sum(part)

    assert forked.map_forked(hangs_in_children, [[1], [2, 3]]) == [[parent, 1], [parent, 5]]
    assert all_reaped(forks.pids)


def test_a_child_interrupted_by_keyboardinterrupt_only_costs_time(forks: Forks) -> None:
    parent = os.getpid()

    def interrupted_in_children(part: Sequence[int]) -> list[int]:
        if os.getpid() != parent:
            raise KeyboardInterrupt
        return pid_and_sum(part)

    assert forked.map_forked(interrupted_in_children, [[1], [2], [3]]) == [[parent, 1], [parent, 2], [parent, 3]]
    assert len(forks) == 2 and all_reaped(forks.pids)


def test_a_fresh_process_forks_by_itself_when_it_has_the_cores(tmp_path) -> None:  # noqa: ANN001
    """Nothing patched: its own thread count, its own cores. A switch left off would show here."""
    if forked.cores() < 2:
        pytest.skip("one core: nothing to fork for")
    script = (
        "import os, sys\n"
        "from reconcile import forked\n"
        "parts = forked.split(list(range(4)), 1)\n"
        "print(len(parts), len({pid for pid in forked.map_forked(lambda p: os.getpid(), parts)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == [str(min(forked.cores(), 4, forked.MAX_WORKERS))] * 2


def _cgroup_files(root, files: dict[str, str]) -> None:  # noqa: ANN001
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("proc, files, quota", [
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),  # v2, unlimited
    ("0::/\n", {"cpu.max": "150000 100000\n"}, 2),  # docker --cpus=1.5: two cores kept busy
    ("0::/job/step\n", {"cpu.max": "max 100000\n", "job/cpu.max": "100000 100000\n",
                        "job/step/cpu.max": "400000 100000\n"}, 1),  # the strictest level counts
    ("0::/\n", {"unified/cpu.max": "300000 100000\n"}, 3),  # v2 mounted beside v1 controllers
    ("4:cpu,cpuacct:/docker/x\n0::/\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000\n",
                                        "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000\n"}, 1),  # v1
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ("3:memory:/x\n", {"memory/cpu.max": "100000 100000\n"}, None),  # not the cpu controller
    ("0::/\n", {"cpu.max": "garbage\n"}, None),
    ("0::/\n", {}, None),  # no cgroup files at all
    ("garbage\n0::/\n", {"cpu.max": "100000 100000\n"}, 1),  # a line it cannot read is passed over
])
def test_a_cpu_quota_caps_the_cores(tmp_path, monkeypatch: pytest.MonkeyPatch, proc: str,  # noqa: ANN001
                                    files: dict[str, str], quota: int | None) -> None:
    _cgroup_files(tmp_path / "fs", files)
    (tmp_path / "cgroup").write_text(proc)
    monkeypatch.setattr(forked, "CGROUP_ROOT", str(tmp_path / "fs"))
    assert forked._cgroup_quota(str(tmp_path / "cgroup")) == quota
    monkeypatch.setattr(forked, "_cgroup_quota", lambda: quota)
    monkeypatch.setattr(forked.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert forked.cores() == min(4, quota or 4)


def test_no_proc_cgroup_file_means_no_quota(tmp_path) -> None:  # noqa: ANN001
    assert forked._cgroup_quota(str(tmp_path / "missing")) is None
