"""Which fstab mount points above a BIDS root are not mounted: fake fstab and mountinfo files."""

from __future__ import annotations

import os
from pathlib import Path

from reconcile.mounts import fstab_mount_points, unmounted_above


def _files(tmp_path: Path, fstab: str, mountinfo: str | None = None) -> dict[str, Path]:
    (tmp_path / "fstab").write_text(fstab)
    files = {"fstab": tmp_path / "fstab", "mountinfo": tmp_path / "mountinfo"}
    if mountinfo is not None:
        files["mountinfo"].write_text(mountinfo)
    return files


def test_the_outermost_unmounted_fstab_entry_above_a_root_is_named_noauto_ones_too(tmp_path):
    files = _files(tmp_path, "# comment\n/dev/sda1 / ext4 defaults 0 1\n/dev/sda2 none swap sw 0 0\n"
                             "nas:/lab /mnt/lab nfs noauto,user 0 0\nnas:/lab/data /mnt/lab/data/ nfs defaults 0 0\n",
                   "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    assert unmounted_above(Path("/mnt/lab/data/bids"), **files) == ("/mnt/lab", "nas:/lab (nfs)")
    assert unmounted_above(Path("/home/me/bids"), **files) is None  # on "/" only


def test_a_mount_point_in_mountinfo_counts_as_mounted_a_bind_mount_too(tmp_path):
    files = _files(tmp_path, "/srv/lab /mnt/my\\040lab none bind 0 0\n",
                   "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n40 22 8:1 /srv/lab /mnt/my\\040lab rw - ext4 /dev/sda1 rw\n")
    assert fstab_mount_points(files["fstab"]) == {"/mnt/my lab": "/srv/lab (none)"}
    assert unmounted_above(Path("/mnt/my lab/bids"), **files) is None


def test_no_fstab_or_an_unreadable_one_means_no_check(tmp_path):
    assert unmounted_above(Path("/mnt/lab/bids"), fstab=tmp_path / "absent", mountinfo=tmp_path / "absent") is None
    files = _files(tmp_path, "nas:/lab /mnt/lab nfs defaults 0 0\n")
    os.chmod(files["fstab"], 0)
    if os.getuid() != 0:  # root reads it all the same
        assert unmounted_above(Path("/mnt/lab/bids"), **files) is None


def test_without_mountinfo_os_path_ismount_tells(tmp_path):
    point = Path(os.path.realpath(tmp_path)) / "mnt"
    point.mkdir()
    files = _files(tmp_path, f"nas:/lab {point} nfs defaults 0 0\n/dev/sda1 / ext4 defaults 0 1\n")
    assert unmounted_above(point / "bids", **files) == (str(point), "nas:/lab (nfs)")
    files = _files(tmp_path, "/dev/sda1 / ext4 defaults 0 1\n/dev/sda1 /proc proc defaults 0 0\n")
    assert unmounted_above(Path("/proc/self"), **files) is None  # mounted: ismount says so
