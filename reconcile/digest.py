"""MD5 of files, several at a time: what export checks every downloaded byte with.

MD5 is serial within one file, so hashlib's one stream per core (~550 MB/s here) is the limit of a
verified download. `_md5lanes` (a small optional C extension) advances up to eight files per
instruction, one per SIMD lane: 2x less CPU with 4 files, 4x with 8. This module batches files
for it and falls back to hashlib for lone files, huge files, or when the extension was not built.
It reads files and nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import stat
from collections.abc import Sequence
from pathlib import Path

try:
    from reconcile._md5lanes import md5_many
except ImportError:  # built without a C compiler
    md5_many = None

CHUNK_SIZE = 1 << 20
# Fewer files than this go through hashlib: with most lanes idle the vector code is slower than
# OpenSSL's scalar MD5 (measured: 1 file 0.5x, 2 files 1.0x, 4 files 2x, 8 files 4x).
LANES_MIN = 3
# The files of one batch are mapped into memory together, so the batch's size bounds what that
# adds to the process's resident memory; a file bigger than this is hashed alone, in chunks.
BATCH_BYTES = 32 << 20
# Smaller files are read rather than mapped: a mapping costs more than copying a few pages.
MAP_MIN = 256 << 10


def lanes_available() -> bool:
    return md5_many is not None


def batches(sizes: Sequence[int]) -> list[list[int]]:
    """Group the indices of `sizes` into batches that fit BATCH_BYTES, in order."""
    groups: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > BATCH_BYTES:
            groups.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        groups.append(current)
    return groups


def md5_files(paths: Sequence[Path], sizes: Sequence[int]) -> list[str | None]:
    """The hex MD5 of each file, read as exactly its expected size; None for a file that cannot
    be read or does not have that size (gone, truncated, grown, not a regular file)."""
    digests: list[str | None] = [None] * len(paths)
    for group in batches(sizes):
        if md5_many is None or len(group) < LANES_MIN:
            for i in group:
                digests[i] = _md5_alone(paths[i], sizes[i])
            continue
        with contextlib.ExitStack() as stack:
            maps, mapped = [], []
            for i in group:
                content = _map(paths[i], sizes[i], stack)
                if content is not None:
                    maps.append(content)
                    mapped.append(i)
            for i, digest in zip(mapped, md5_many(maps)):
                digests[i] = digest.hex()
    return digests


def _map(path: Path, size: int, stack: contextlib.ExitStack) -> mmap.mmap | bytes | None:
    """The file's content, mapped read-only (no copy out of the page cache: reading it into a
    buffer cost as much CPU as hashing it); None unless it is a regular file of `size` bytes.
    The files are export's own `.part`s and staging files, which nothing else truncates while
    they are mapped."""
    try:
        handle = stack.enter_context(open(path, "rb", buffering=0))
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        if size < MAP_MIN:
            content = handle.read(size + 1)  # one more byte shows a file that grew
            return content if len(content) == size else None
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return stack.enter_context(mmap.mmap(handle.fileno(), size, flags=flags, prot=mmap.PROT_READ))
    except (OSError, ValueError):
        return None


def _md5_alone(path: Path, size: int) -> str | None:
    h = hashlib.md5()
    got = 0
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(CHUNK_SIZE):
                h.update(chunk)
                got += len(chunk)
    except OSError:
        return None
    return h.hexdigest() if got == size else None
