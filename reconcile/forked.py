"""CPU-bound work over the parts of a list, spread over the cores by forking.

Reading a large lock without its cache (a fresh clone in CI, a first read on a new machine) is
pure Python work per session fragment: toml-rs, the schema, marshal. One core does 2,500-4,000
fragments a second. Forked children share the parent's memory, so the input costs nothing to
hand over; each child sends back only its marshalled result through a pipe.

Forking is safe only while this process has a single thread (Python's or a C library's): a lock
another thread held at the fork (a logger's, OpenSSL's, pyo3's) would stay held in the child
forever. So with more threads, or where there is no fork, everything runs here, one part after
another. A child that fails in any way, or takes far longer than the parent took for its own
part, only costs time: its part is done again here. Results never depend on the children.
"""

from __future__ import annotations

import marshal
import math
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
MAX_WORKERS = 8  # processes in all, the caller's included
# A child is given the time the parent took for its own part, times this, and at least
# CHILD_GRACE seconds more, before it is killed and its part done here (a child that hangs).
CHILD_SLACK = 4
CHILD_GRACE = 30.0
CGROUP_ROOT = "/sys/fs/cgroup"


def cores() -> int:
    """The cores this process may run on: its CPU affinity (a SLURM job's allocation, not the
    node's), and no more than a container's CPU quota (`docker --cpus`) lets it keep busy."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        count = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(count, quota)) if quota else count


def _cgroup_quota(proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """The fewest whole cores a CFS quota allows this process's cgroup or one above it, under
    the usual mount points (cgroup v2's cpu.max, v1's cpu.cfs_quota_us); None if unlimited."""
    try:
        with open(proc_cgroup) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    fewest = None
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        names = controllers.split(",")
        if controllers == "":
            dirs = [CGROUP_ROOT, os.path.join(CGROUP_ROOT, "unified")]
        elif "cpu" in names:
            dirs = [os.path.join(CGROUP_ROOT, controllers), os.path.join(CGROUP_ROOT, "cpu")]
        else:
            continue
        for top in dict.fromkeys(dirs):
            here = path
            while True:
                allowed = _quota_at(os.path.join(top, here.lstrip("/")), v2=controllers == "")
                if allowed is not None:
                    fewest = allowed if fewest is None else min(fewest, allowed)
                if here in ("/", ""):
                    break
                here = os.path.dirname(here)
    return fewest


def _quota_at(directory: str, v2: bool) -> int | None:
    try:
        if v2:
            with open(os.path.join(directory, "cpu.max")) as f:
                quota, period = f.read().split()[:2]
        else:
            with open(os.path.join(directory, "cpu.cfs_quota_us")) as f:
                quota = f.read().strip()
            with open(os.path.join(directory, "cpu.cfs_period_us")) as f:
                period = f.read().strip()
        if quota in ("max", "-1") or int(period) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def may_fork() -> bool:
    return sys.platform.startswith("linux") and threading.active_count() == 1 and _os_threads() == 1


def _os_threads() -> int:
    """The process's threads as the kernel counts them, also those that C libraries started."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - /proc not mounted: Python's own count has to do
        return 1


def split(items: Sequence[T], min_part: int) -> list[Sequence[T]]:
    """`items` in contiguous parts of at least `min_part` items, at most one per core."""
    n = max(1, min(cores(), MAX_WORKERS, len(items) // max(min_part, 1)))
    size, extra = divmod(len(items), n)
    parts, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        parts.append(items[start:end])
        start = end
    return parts


def map_forked(fn: Callable[[Sequence[T]], Any], parts: Sequence[Sequence[T]]) -> list[Any]:
    """`[fn(part) for part in parts]`, the first part here and each other in a forked child when
    `may_fork()`. `fn`'s results must be marshallable (None, numbers, str, bytes, lists, dicts)."""
    if len(parts) < 2 or not may_fork():
        return [fn(part) for part in parts]
    children: list[tuple[int, int] | None] = []  # (pid, read end) per part after the first
    try:
        for part in parts[1:]:
            # No Python signal handler may run between the fork and the child's try (it would
            # raise out of _fork in the child), nor in the parent before the child is recorded.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
            try:
                children.append(_fork(fn, part))
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        started = time.monotonic()
        results = [fn(parts[0])]
        deadline = time.monotonic() + CHILD_GRACE + CHILD_SLACK * (time.monotonic() - started)
        for i, child in enumerate(children, start=1):
            got = _FAILED
            if child is not None:
                children[i - 1] = None
                got = _collect(*child, deadline)
            results.append(fn(parts[i]) if got is _FAILED else got)
        return results
    finally:
        for child in children:  # an error or Ctrl-C before they were collected
            if child is not None:
                os.close(child[1])
                _kill(child[0])


_FAILED = object()


def _fork(fn: Callable[[Sequence[T]], Any], part: Sequence[T]) -> tuple[int, int] | None:
    try:
        read_end, write_end = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:  # out of processes or memory: this part is done here
        os.close(read_end)
        os.close(write_end)
        return None
    if pid == 0:  # the child: never returns, never runs the parent's cleanup or atexit
        # All signals stay blocked here (the parent blocked them for the fork): none of the
        # parent's Python handlers runs in the child; the parent SIGKILLs it when it must stop.
        code = 1
        try:
            os.close(read_end)
            payload = marshal.dumps(fn(part))
            with os.fdopen(write_end, "wb") as out:
                out.write(payload)
            code = 0
        except BaseException:  # noqa: BLE001 - any failure: the parent does this part again
            pass
        finally:
            os._exit(code)
    os.close(write_end)  # so that the read end sees EOF once the child is done
    return pid, read_end


def _collect(pid: int, read_end: int, deadline: float) -> Any:
    """The child's result, or _FAILED unless it exited cleanly with a whole result by `deadline`
    (time.monotonic()). Closes the pipe and reaps the child whatever happens."""
    chunks = []
    poller = select.poll()
    poller.register(read_end, select.POLLIN)
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(math.ceil(left * 1000)):
                _kill(pid)  # hung: its part is done here
                return _FAILED
            chunk = os.read(read_end, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except BaseException:
        _kill(pid)
        raise
    finally:
        os.close(read_end)
    payload = b"".join(chunks)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # SIGCHLD ignored (inherited so across exec): reaped by the kernel
        return _FAILED
    if os.waitstatus_to_exitcode(status) != 0:
        return _FAILED
    try:
        return marshal.loads(payload)
    except (EOFError, ValueError, TypeError):  # pragma: no cover - a whole payload was written
        return _FAILED


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):  # pragma: no cover - already reaped
        pass
