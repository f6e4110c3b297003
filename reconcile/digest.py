"""MD5 of files, several at a time: what export checks every downloaded byte with.

MD5 is serial within one file, so hashlib's one stream per core (~550 MB/s here) is the limit of a
verified download. `_md5lanes` (a small optional C extension) advances up to eight files per
instruction, one per SIMD lane: 2x less CPU with 4 files, 4x with 8. This module batches files
for it and falls back to hashlib for lone files, huge files, or when the extension was not built.
It reads files and nothing else.
"""

from __future__ import annotations

import hashlib
import threading
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
# Files are read into one buffer per thread for a batch, so memory stays bounded whatever their
# size; a file bigger than this is hashed alone, in chunks.
BATCH_BYTES = 32 << 20

_local = threading.local()


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
        buffer = _buffer()
        views, readable, offset = [], [], 0
        for i in group:
            view = buffer[offset : offset + sizes[i]]
            offset += sizes[i]
            if _read_exactly(paths[i], view):
                views.append(view)
                readable.append(i)
        for i, digest in zip(readable, md5_many(views)):
            digests[i] = digest.hex()
    return digests


def _buffer() -> memoryview:
    buffer = getattr(_local, "buffer", None)
    if buffer is None:
        buffer = _local.buffer = memoryview(bytearray(BATCH_BYTES))
    return buffer


def _read_exactly(path: Path, view: memoryview) -> bool:
    """Fill `view` from `path`; False unless the file has exactly that many bytes."""
    try:
        with open(path, "rb", buffering=0) as handle:
            got = 0
            while got < len(view):
                n = handle.readinto(view[got:])
                if not n:
                    return False
                got += n
            return handle.read(1) == b""
    except OSError:
        return False


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
