"""Whether the file system a BIDS root should be on is mounted: /etc/fstab names the mount points,
/proc/self/mountinfo (or os.path.ismount) what is mounted now. It only reads, never mounts, and
answers "no problem known" whenever it cannot tell.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

FSTAB = Path("/etc/fstab")
MOUNTINFO = Path("/proc/self/mountinfo")

_ESCAPE = re.compile(r"\\([0-7]{3})")  # fstab and mountinfo write a space in a path as \040


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def fstab_mount_points(fstab: Path | None = None) -> dict[str, str]:
    """Mount point -> what is mounted there (device and type), as the fstab lists them; empty
    when it is absent or unreadable. The root file system and swap are left out: "/" is always
    mounted, and swap has no mount point."""
    try:
        text = (fstab or FSTAB).read_text(errors="replace")
    except (OSError, ValueError):
        return {}
    points: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or fields[0].startswith("#"):
            continue
        where = _unescape(fields[1])
        if not where.startswith("/") or fields[2] == "swap":
            continue
        where = os.path.normpath(where)
        if where != "/":
            points[where] = f"{_unescape(fields[0])} ({fields[2]})"
    return points


def _mounted_now(mountinfo: Path | None = None) -> set[str] | None:
    """The mount points of this process's mount namespace; None when the kernel does not say."""
    try:
        text = (mountinfo or MOUNTINFO).read_text(errors="replace")
    except (OSError, ValueError):
        return None
    return {os.path.normpath(_unescape(fields[4])) for fields in map(str.split, text.splitlines()) if len(fields) > 4}


def unmounted_above(root: Path, *, fstab: Path | None = None, mountinfo: Path | None = None) -> tuple[str, str] | None:
    """(mount point, what the fstab mounts there) of the outermost folder at or above `root` that the
    fstab lists and that nothing is mounted on now; None when there is none, or no fstab.

    An entry with `noauto` counts too: not mounted at boot, it still says where a file system goes,
    and an apply while it is not mounted writes onto the disk underneath. An automount
    (`x-systemd.automount`, autofs) is no exception either: its trigger is itself a mount, so a
    path it serves counts as mounted whether or not it was accessed yet. What is mounted is read
    from mountinfo, which names bind mounts too (os.path.ismount misses one of a folder on the
    same file system); os.path.ismount answers only where there is no mountinfo."""
    points = fstab_mount_points(fstab)
    if not points:
        return None
    path = os.path.realpath(root)  # through the links that exist: where the files would go
    listed = [p for p in (path, *map(str, Path(path).parents)) if p in points]
    if not listed:
        return None
    mounted = _mounted_now(mountinfo)
    for point in reversed(listed):  # outermost first: the one to mount
        if not (point in mounted if mounted is not None else os.path.ismount(point)):
            return point, points[point]
    return None


def bare_above(root: Path) -> bool:
    """Whether the nearest folder at or above `root` that exists is empty: what a mount point with
    nothing mounted on it shows. A dataset removed on purpose from a folder that holds other things
    (a home, a lab's scratch) leaves no such thing."""
    for folder in (root, *root.parents):
        try:
            with os.scandir(folder) as entries:
                return next(entries, None) is None
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:  # unreadable: nothing known
            return False
    return False
