"""Reading a zip front to back as it downloads, entry by entry, in constant memory.

`zipfile` needs the central directory at the end, so a scan's zip had to be written to a temporary
file and then extracted: every byte went to disk twice. Here each entry's data goes straight to
its own file. This works because a zip also describes every entry just before its data (the local
header): STORED entries carry their sizes there, DEFLATED ones end where the deflate stream ends,
and entries written by a streaming zipper (Java's ZipOutputStream, as XNAT uses) are followed by a
data descriptor with their CRC and sizes. What cannot be read this way raises `Unstreamable`; the
caller then downloads those files one by one.

The central directory at the end is read too (`central_directory`): it is where a symbolic link is
marked, and its names must be the ones the local headers gave.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

_LOCAL = 0x04034B50
_CENTRAL = 0x02014B50
_DESCRIPTOR = 0x08074B50
_END, _END64, _LOCATOR64 = 0x06054B50, 0x06064B50, 0x07064B50
_MAX32 = 0xFFFFFFFF
# Java's ZipOutputStream (XNAT's zips) streams an entry with zeros in its local header and no ZIP64
# extra field, then writes 8-byte sizes in its data descriptor once either size reaches this
# (OpenJDK's writeEXT; Go's archive/zip does the same).
_WIDE_DESCRIPTOR = _MAX32
_ENCRYPTED = 0x0001
_HAS_DESCRIPTOR = 0x0008
_UTF8 = 0x0800
STORED, DEFLATED = 0, 8


class ZipFormatError(Exception):
    """The bytes are not a well-formed zip (or the stream ended inside one)."""


class Unstreamable(Exception):
    """A well-formed entry this reader cannot take front to back (encrypted, another compression,
    or STORED with its size only after the data and no listed size to go by)."""


@dataclass(frozen=True)
class Entry:
    name: str
    flags: int
    method: int
    crc: int  # from the local header; 0 when a data descriptor follows
    size: int | None  # uncompressed size, None when only the data descriptor has it
    zip64: bool
    csize: int | None = None  # compressed size, None when only the data descriptor has it


@dataclass(frozen=True)
class CentralRecord:
    name: str
    external_attr: int


def _decode(raw: bytes, flags: int) -> str:
    if not flags & _UTF8:
        return raw.decode("cp437")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ZipFormatError(f"an entry name is not valid UTF-8: {raw!r}") from None


class ZipStream:
    """Entries of a zip read from `readinto` (a function filling a buffer, 0 at the end).

    Use: `while (entry := z.next_entry()) is not None: z.copy(entry, write)` or `z.skip(entry)`,
    then `z.central_directory()`.
    """

    def __init__(self, readinto: Callable[[memoryview], int], buffer: memoryview):
        self._readinto = readinto
        self._buf = buffer
        self._start = 0  # unread bytes are _buf[_start:_end]
        self._end = 0
        self.received = 0

    # -- buffer ---------------------------------------------------------------------------------
    def _fill(self) -> bool:
        """Read more bytes behind the unread ones; False at the end of the stream."""
        if self._start:
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start:self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            raise ZipFormatError("a zip header longer than the read buffer")
        got = self._readinto(self._buf[self._end:])
        self._end += got
        self.received += got
        return got > 0

    def _take(self, n: int) -> bytes:
        while self._end - self._start < n:
            if not self._fill():
                raise ZipFormatError("the zip ends in the middle of a header")
        out = bytes(self._buf[self._start:self._start + n])
        self._start += n
        return out

    def _peek_signature(self) -> int | None:
        while self._end - self._start < 4:
            if not self._fill():
                return None if self._end == self._start else -1
        return struct.unpack_from("<I", self._buf, self._start)[0]

    def _unread(self, entry: Entry) -> memoryview:
        """The bytes received and not yet consumed, reading more when there are none."""
        if self._start == self._end:
            self._start = self._end = 0
            if not self._fill():
                raise ZipFormatError(f"the zip ends inside entry {entry.name!r}")
        return self._buf[self._start:self._end]

    # -- entries --------------------------------------------------------------------------------
    def next_entry(self) -> Entry | None:
        """The next entry's local header, or None where the central directory begins."""
        sig = self._peek_signature()
        if sig in (_CENTRAL, _END, _END64):  # an empty zip is its end record(s) alone
            return None
        if sig is None:
            raise ZipFormatError("the zip ends before its central directory")
        if sig != _LOCAL:
            raise ZipFormatError("not a zip entry where one was expected")
        (_, _, flags, method, _, _, crc, csize, usize, name_len, extra_len) = struct.unpack(
            "<IHHHHHIIIHH", self._take(30)
        )
        name = _decode(self._take(name_len), flags)
        extra = self._take(extra_len)
        usize, csize, zip64 = _zip64_sizes(extra, usize, csize)
        if flags & _ENCRYPTED:
            raise Unstreamable(f"entry {name!r} is encrypted")
        if method not in (STORED, DEFLATED):
            raise Unstreamable(f"entry {name!r} uses compression method {method}")
        later = bool(flags & _HAS_DESCRIPTOR)
        size = None if later and usize == 0 and csize == 0 else usize
        if method == STORED and size is not None and csize != size:
            raise ZipFormatError(f"stored entry {name!r} has two sizes")
        return Entry(name, flags, method, 0 if later else crc, size, zip64, None if size is None else csize)

    def copy(self, entry: Entry, write: Callable[[memoryview], object], *, size_hint: int | None = None,
             limit: int | None = None, check_crc: bool = True) -> tuple[int, bool]:
        """Pass the entry's data to `write` piece by piece; returns its size and whether its CRC-32
        is the one the zip gives (True without `check_crc`: a caller that checks an MD5 anyway
        saves ~0.5 CPU-s per GiB). `size_hint` stands in for a STORED size the header leaves to
        the data descriptor. Beyond `limit` bytes nothing more is written (the data is still
        read), so an entry larger than listed cannot fill the disk; the CRC then does not match."""
        size = crc = 0
        consumed = 0  # compressed bytes read

        def emit(piece: memoryview) -> None:
            nonlocal size, crc
            if limit is None or size + len(piece) <= limit:
                write(piece)
                if check_crc:
                    crc = zlib.crc32(piece, crc)
            size += len(piece)

        if entry.method == STORED:
            count = entry.size if entry.size is not None else size_hint
            if count is None:
                raise Unstreamable(f"stored entry {entry.name!r} gives its size only after its data")
            while count:
                piece = self._unread(entry)[:count]
                self._start += len(piece)
                count -= len(piece)
                emit(piece)
            consumed = size
        else:
            inflate = zlib.decompressobj(-15)
            while not inflate.eof:
                data = self._unread(entry)
                try:
                    out = inflate.decompress(data, 1 << 20)
                except zlib.error as exc:
                    raise ZipFormatError(f"entry {entry.name!r} does not inflate: {exc}") from None
                # Left in the buffer: input held back at the output limit, or bytes after the stream.
                taken = len(data) - len(inflate.unconsumed_tail) - len(inflate.unused_data)
                self._start += taken
                consumed += taken
                if out:
                    emit(memoryview(out))
        expected = self._end_of_entry(entry, size, consumed)
        return size, (limit is None or size <= limit) and (not check_crc or crc == expected)

    def skip(self, entry: Entry, *, size_hint: int | None = None) -> None:
        """Read past an entry that is not wanted."""
        self.copy(entry, lambda piece: None, size_hint=size_hint, limit=0, check_crc=False)

    def _end_of_entry(self, entry: Entry, size: int, consumed: int) -> int:
        """Read the data descriptor if there is one; the entry's CRC-32 as the zip gives it. `size`
        and `consumed` are the uncompressed and compressed sizes as read."""
        if not entry.flags & _HAS_DESCRIPTOR:
            if entry.size != size or entry.csize != consumed:
                raise ZipFormatError(f"entry {entry.name!r} is not the size its zip says")
            return entry.crc
        if self._peek_signature() == _DESCRIPTOR:
            self._take(4)
        wide = entry.zip64 or max(size, consumed) >= _WIDE_DESCRIPTOR
        crc, d_csize, d_size = struct.unpack("<IQQ" if wide else "<III", self._take(20 if wide else 12))
        if d_size != size or d_csize != consumed or (entry.size is not None and entry.size != size):
            raise ZipFormatError(f"entry {entry.name!r} is not the size its zip says")
        return crc

    def central_directory(self) -> list[CentralRecord]:
        """The central directory's records (name, external attributes), reading the stream to its end."""
        records: list[CentralRecord] = []
        while self._peek_signature() == _CENTRAL:
            fields = struct.unpack("<IHHHHHHIIIHHHHHII", self._take(46))
            flags, external = fields[3], fields[15]
            name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
            name = _decode(self._take(name_len), flags)
            self._take(extra_len + comment_len)
            records.append(CentralRecord(name, external))
        if self._peek_signature() == _END64:
            (_, length) = struct.unpack("<IQ", self._take(12))
            self._take(length)
        if self._peek_signature() == _LOCATOR64:
            self._take(20)
        if self._peek_signature() != _END:
            raise ZipFormatError("the zip ends without its end record")
        fields = struct.unpack("<IHHHHIIH", self._take(22))
        count, comment_len = fields[4], fields[7]
        if count not in (len(records), 0xFFFF):
            raise ZipFormatError(f"the zip's end record counts {count} entries, its directory has {len(records)}")
        self._take(comment_len)
        return records


def _zip64_sizes(extra: bytes, usize: int, csize: int) -> tuple[int, int, bool]:
    """Sizes from the ZIP64 extra field if there is one (it holds only the ones the header set to
    0xFFFFFFFF, in that order), and whether there is one (a data descriptor then has 8-byte sizes)."""
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        body = extra[at + 4:at + 4 + length]
        if tag == 1:
            values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
            if usize == _MAX32 and values:
                usize = values.pop(0)
            if csize == _MAX32 and values:
                csize = values.pop(0)
            return usize, csize, True
        at += 4 + length
    if usize == _MAX32 or csize == _MAX32:
        raise ZipFormatError("an entry marked ZIP64 without its sizes")
    return usize, csize, False
