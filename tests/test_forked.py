"""reconcile.forked: parts of a list worked on by forked children, with the parent as the fallback."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Sequence

import pytest

from reconcile import forked

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or not sys.platform.startswith("linux"),
                                reason="forks only on Linux")


@pytest.fixture
def may_fork(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Fork although the test runner may have threads of its own: the work here takes no locks.
    The children forked."""
    monkeypatch.setattr(forked, "may_fork", lambda: True)
    pids: list[int] = []
    real = forked._fork

    def fork(fn, part):  # noqa: ANN001, ANN202
        child = real(fn, part)
        if child is not None:
            pids.append(child[0])
        return child

    monkeypatch.setattr(forked, "_fork", fork)
    return pids


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


def test_each_part_after_the_first_runs_in_a_child_and_the_results_keep_their_order(may_fork: list[int]) -> None:
    parts = [range(0, 10), range(10, 20), range(20, 30)]
    results = forked.map_forked(pid_and_sum, [list(p) for p in parts])
    assert [r[1] for r in results] == [45, 145, 245]
    assert results[0][0] == os.getpid()
    assert {r[0] for r in results[1:]}.isdisjoint({os.getpid()}) and results[1][0] != results[2][0]
    assert all_reaped(may_fork)


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


def test_a_failing_child_only_costs_time_its_part_is_done_here(may_fork: list[int]) -> None:
    parent = os.getpid()

    def fails_in_children(part: Sequence[int]) -> list[int]:
        if os.getpid() != parent and 2 in part:
            raise RuntimeError("a child fails")
        return pid_and_sum(part)

    assert forked.map_forked(fails_in_children, [[1], [2], [3]])[1] == [parent, 2]
    assert all_reaped(may_fork)


def test_a_killed_child_only_costs_time(may_fork: list[int]) -> None:
    parent = os.getpid()

    def killed_in_children(part: Sequence[int]) -> list[int]:
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return pid_and_sum(part)

    assert forked.map_forked(killed_in_children, [[1], [2, 3]]) == [[parent, 1], [parent, 5]]
    assert all_reaped(may_fork)


def test_a_result_that_cannot_cross_the_pipe_is_made_here(may_fork: list[int]) -> None:
    parent = os.getpid()
    results = forked.map_forked(lambda part: object() if os.getpid() != parent else len(part), [[1], [2, 3]])
    assert results == [1, 2]


def test_an_error_in_the_parents_part_leaves_no_child_behind(may_fork: list[int]) -> None:
    parent = os.getpid()

    def fails_here(part: Sequence[int]) -> int:
        if os.getpid() == parent:
            raise ValueError("the parent's part")
        return 0

    with pytest.raises(ValueError, match="the parent's part"):
        forked.map_forked(fails_here, [[1], [2], [3]])
    assert all_reaped(may_fork)


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
