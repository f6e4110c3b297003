"""The bytes of a STORED zip (or a tar) of archive files, as pieces a server can send with sendfile(2).

XNAT builds scan zips on the fly. Building them through `zipfile` cost the emulator ~5 CPU seconds
per GiB (CRC, two copies per chunk), so that the emulator, not the client, was what zip downloads
measured. Here each entry's CRC is cached with the file (`FileEntry.crc32`), headers are packed by
hand and file bodies stay `FileEntry.pieces()`. ZIP64 records are added where sizes or offsets need
them. Only this module knows the zip layout; `app.py` chooses the entries and their names.
"""

from __future__ import annotations

import struct
import tarfile
from collections.abc import Iterator, Sequence

from .archive import FileEntry

_MAX32 = 0xFFFFFFFF
_UTF8 = 0x0800  # general purpose flag 11: names are UTF-8
_DOS_EPOCH = (1980, 1, 1, 0, 0, 0)
# XNAT's TarUtils calls Ant's `TarEntry.setMode(TarEntry.LF_NORMAL)`: the type flag '0' (48) lands in
# the mode field, so every entry of its tars has permissions 0060.
TAR_MODE = ord("0")
_TAR_BLOCK, _TAR_RECORD = 512, 10240


def _dos_stamp(stamp: tuple[int, int, int, int, int, int]) -> tuple[int, int]:
    year, month, day, hour, minute, second = max(stamp, _DOS_EPOCH)
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


def zip_pieces(
    entries: Sequence[tuple[str, FileEntry]], stamp: tuple[int, int, int, int, int, int]
) -> Iterator[bytes | tuple[int, int, int]]:
    """The zip of `entries` (name, file) as bytes and `(fd, offset, count)` file ranges, in order."""
    time, date = _dos_stamp(stamp)
    central: list[bytes] = []
    offset = 0
    for name, entry in entries:
        raw = name.encode("utf-8")
        flags = 0 if raw.isascii() else _UTF8
        size, crc = entry.size, entry.crc32
        big = size >= _MAX32
        local_extra = struct.pack("<HHQQ", 1, 16, size, size) if big else b""
        version = 45 if big else 20
        header = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, version, flags, 0, time, date, crc,
            _MAX32 if big else size, _MAX32 if big else size, len(raw), len(local_extra),
        ) + raw + local_extra
        yield header
        yield from entry.pieces()

        far = offset >= _MAX32
        values = ([size, size] if big else []) + ([offset] if far else [])
        extra = struct.pack("<HH", 1, 8 * len(values)) + struct.pack(f"<{len(values)}Q", *values) if values else b""
        version = 45 if values else 20
        central.append(struct.pack(
            "<IHHHHHHIIIHHHHHII", 0x02014B50, version, version, flags, 0, time, date, crc,
            _MAX32 if big else size, _MAX32 if big else size, len(raw), len(extra), 0, 0, 0, 0,
            _MAX32 if far else offset,
        ) + raw + extra)
        offset += len(header) + size

    directory = b"".join(central)
    count, start, length = len(central), offset, len(directory)
    yield directory
    if count >= 0xFFFF or start >= _MAX32 or length >= _MAX32:
        yield struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, length, start)
        yield struct.pack("<IIQI", 0x07064B50, 0, start + length, 1)
    yield struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, min(count, 0xFFFF), min(count, 0xFFFF),
        min(length, _MAX32), min(start, _MAX32), 0,
    )


def tar_pieces(entries: Sequence[tuple[str, FileEntry]], mtime: int) -> Iterator[bytes | tuple[int, int, int]]:
    """The tar of `entries` (name, file) as XNAT's TarUtils writes it: POSIX (pax) headers for long
    names, each body padded to 512 bytes, two zero blocks, then zeros up to a 10240-byte record."""
    written = 0
    for name, entry in entries:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = entry.size, mtime, TAR_MODE
        header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        yield header
        yield from entry.pieces()
        padding = -entry.size % _TAR_BLOCK
        if padding:
            yield bytes(padding)
        written += len(header) + entry.size + padding
    end = 2 * _TAR_BLOCK
    yield bytes(end + -(written + end) % _TAR_RECORD)
