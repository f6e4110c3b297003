"""reconcile.zipread against zips written by `zipfile` in every way a server may write them
(stored, deflated, streamed with data descriptors, ZIP64), read through reads of any size."""

from __future__ import annotations

import io
import os
import random
import stat
import struct
import zipfile
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconcile import zipread
from reconcile.zipread import Unstreamable, ZipFormatError, ZipStream

_RANDOM = random.Random(0)  # incompressible bytes, the same on every run


class Unseekable(io.RawIOBase):
    """A write-only stream: zipfile then writes data descriptors, as a streaming server does."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


def make_zip(files: dict[str, bytes], *, method: int = zipfile.ZIP_STORED, streamed: bool = False,
             zip64: bool = False, symlink: str | None = None) -> bytes:
    out: io.BytesIO | Unseekable = Unseekable() if streamed else io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=method) as zf:  # type: ignore[arg-type]
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 2, 3, 4, 6))
            info.compress_type = method
            if name == symlink:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            with zf.open(info, "w", force_zip64=zip64) as dst:
                dst.write(data)
    return bytes(out.data) if isinstance(out, Unseekable) else out.getvalue()


def reader(data: bytes, step: int) -> Callable[[memoryview], int]:
    at = 0

    def readinto(buf: memoryview) -> int:
        nonlocal at
        n = min(step, len(buf), len(data) - at)
        buf[:n] = data[at:at + n]
        at += n
        return n

    return readinto


def read_all(data: bytes, step: int = 1 << 20, buffer: int = 4096, hints: dict[str, int] | None = None):
    z = ZipStream(reader(data, step), memoryview(bytearray(buffer)))
    got: dict[str, bytes] = {}
    while (entry := z.next_entry()) is not None:
        parts: list[bytes] = []
        size, crc_ok = z.copy(entry, lambda p: parts.append(bytes(p)), size_hint=(hints or {}).get(entry.name))
        assert crc_ok and size == len(b"".join(parts))
        got[entry.name] = b"".join(parts)
    return got, z.central_directory()


FILES = {"S/scans/1-T1w/resources/DICOM/files/1.dcm": _RANDOM.randbytes(5000),
         "S/scans/1-T1w/resources/DICOM/files/sub/2.dcm": b"abc" * 3000,
         "S/scans/1-T1w/resources/DICOM/files/empty.dcm": b"",
         "S/scans/1-T1w/resources/DICOM/files/ünï.dcm": b"x"}


@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("streamed", [False, True], ids=["sizes-first", "data-descriptors"])
@pytest.mark.parametrize("zip64", [False, True])
def test_every_entry_reads_back_whole(method: int, streamed: bool, zip64: bool) -> None:
    data = make_zip(FILES, method=method, streamed=streamed, zip64=zip64)
    hints = {k: len(v) for k, v in FILES.items()}  # a stored entry with a descriptor needs its listed size
    got, central = read_all(data, step=777, hints=hints)
    assert got == FILES
    assert [r.name for r in central] == list(FILES)


@settings(max_examples=40, deadline=None)
@given(step=st.integers(1, 9000), buffer=st.integers(1024, 20000),
       method=st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]), streamed=st.booleans())
def test_read_and_buffer_sizes_do_not_matter(step: int, buffer: int, method: int, streamed: bool) -> None:
    data = make_zip(FILES, method=method, streamed=streamed)
    assert read_all(data, step=step, buffer=buffer, hints={k: len(v) for k, v in FILES.items()})[0] == FILES


def test_the_emulators_zips_read_back(archive) -> None:  # noqa: ANN001
    from reconcile.emulator.zipstream import zip_pieces

    exp = archive.add_session("PROJ", "S1", "S1_MR1")
    archive.add_scan(exp.id, "1", type="T1w", files={"1.dcm": b"one", "2.dcm": _RANDOM.randbytes(70000)})
    files = archive.get_scan(exp.id, "1").resources["DICOM"].files
    pieces = zip_pieces([(f"x/{n}", e) for n, e in files.items()], (2024, 1, 1, 0, 0, 0))
    blob = b"".join(p if isinstance(p, bytes) else os.pread(p[0], p[2], p[1]) for p in pieces)
    got, _ = read_all(blob, step=1000)
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        assert got == {n: zf.read(n) for n in zf.namelist()}


def test_symlink_marks_come_from_the_central_directory() -> None:
    data = make_zip({"a": b"1", "link": b"/etc/passwd"}, symlink="link")
    _, central = read_all(data)
    links = [r.name for r in central if stat.S_ISLNK(r.external_attr >> 16)]
    assert links == ["link"]


def test_a_zip_cut_anywhere_is_a_format_error() -> None:
    data = make_zip(FILES, method=zipfile.ZIP_DEFLATED, streamed=True)
    for cut in range(0, len(data), 7):
        with pytest.raises(ZipFormatError):
            read_all(data[:cut])


@pytest.mark.parametrize("check_crc", [True, False])
def test_a_flipped_byte_fails_the_crc_unless_the_caller_checks_its_own(check_crc: bool) -> None:
    payload = _RANDOM.randbytes(3000)
    data = bytearray(make_zip({"a": payload}))
    data[data.index(payload[:64]) + 10] ^= 0xFF
    z = ZipStream(reader(bytes(data), 4096), memoryview(bytearray(8192)))
    entry = z.next_entry()
    assert entry is not None
    out: list[bytes] = []
    assert z.copy(entry, lambda p: out.append(bytes(p)), check_crc=check_crc) == (3000, not check_crc)
    assert b"".join(out) != payload and len(b"".join(out)) == 3000


def test_a_damaged_deflate_stream_is_never_accepted() -> None:
    for at in range(60, 400, 37):
        data = bytearray(make_zip({"a": _RANDOM.randbytes(2000) * 4}, method=zipfile.ZIP_DEFLATED))
        data[at:at + 4] = b"\xff\x00\xff\x00"
        z = ZipStream(reader(bytes(data), 4096), memoryview(bytearray(8192)))
        try:
            entry = z.next_entry()
            assert entry is not None
            outcome = "bad crc" if not z.copy(entry, lambda p: None)[1] else "accepted"
        except ZipFormatError:
            outcome = "format error"
        assert outcome != "accepted", at


def test_not_a_zip() -> None:
    with pytest.raises(ZipFormatError):
        read_all(b"<html>Maintenance</html>" * 10)


def test_a_stored_entry_sized_only_afterwards_without_a_listed_size_is_unstreamable() -> None:
    data = make_zip({"a": b"12345"}, streamed=True)
    with pytest.raises(Unstreamable):
        read_all(data)


def test_an_entry_larger_than_the_limit_writes_no_more_than_it() -> None:
    data = make_zip({"a": b"x" * 10000}, method=zipfile.ZIP_DEFLATED, streamed=True)
    z = ZipStream(reader(data, 1000), memoryview(bytearray(4096)))
    entry = z.next_entry()
    written: list[int] = []
    size, crc_ok = z.copy(entry, lambda p: written.append(len(p)), limit=100)
    assert size == 10000 and not crc_ok and sum(written) <= 100
    assert z.next_entry() is None


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA], ids=["bzip2", "lzma"])
def test_compression_methods_other_than_deflate_are_unstreamable(method: int) -> None:
    data = make_zip({"a": b"x" * 100}, method=method)  # XNAT sends stored or deflated entries
    with pytest.raises(Unstreamable):
        read_all(data)


@pytest.mark.parametrize("where", ["local header", "central directory"])
def test_an_entry_name_flagged_utf8_that_is_not_is_a_format_error(where: str) -> None:
    data = bytearray(make_zip({"P/ü.dcm": b"x"}))  # zipfile sets the UTF-8 flag for this name
    find = data.index if where == "local header" else data.rindex
    data[find("ü".encode())] = 0xFF
    with pytest.raises(ZipFormatError, match="an entry name is not valid UTF-8"):
        read_all(bytes(data))


_MAX = 0xFFFFFFFF


def java_zip(name: str, deflated: list[bytes], crc: int, size: int, *, wide: bool,
             csize: int | None = None) -> list[bytes]:
    """A zip of one DEFLATED entry in pieces, as Java's ZipOutputStream streams it (XNAT's zips):
    flag 8, zeros in the local header and no ZIP64 extra field, then a data descriptor with 8-byte
    sizes when `wide` (OpenJDK's writeEXT: when either size is 0xFFFFFFFF or more)."""
    raw = name.encode()
    csize = sum(map(len, deflated)) if csize is None else csize
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0x0808, 8, 0, 0, 0, 0, 0, len(raw), 0) + raw
    descriptor = struct.pack("<IIQQ" if wide else "<IIII", 0x08074B50, crc, csize, size)
    extra = struct.pack("<HHQQ", 1, 16, size, csize) if wide else b""
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0x0808, 8, 0, 0, crc,
                          *((_MAX, _MAX) if wide else (csize, size)), len(raw), len(extra), 0, 0, 0, 0, 0) + raw + extra
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), _MAX if wide else 0, 0)
    return [local, *deflated, descriptor, central, end]


def piece_reader(pieces: list[bytes]) -> Callable[[memoryview], int]:
    """`reader` over pieces, for a zip too large to hold in memory."""
    chunks = (p[i:i + (1 << 16)] for p in pieces for i in range(0, len(p), 1 << 16))
    pending = b""

    def readinto(buf: memoryview) -> int:
        nonlocal pending
        pending = pending or next(chunks, b"")
        n = min(len(buf), len(pending))
        buf[:n] = pending[:n]
        pending = pending[n:]
        return n

    return readinto


def deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(("data", "wide"), [
    (bytes(4095), False),
    (bytes(4096), True),  # the uncompressed size reaches the threshold
    (_RANDOM.randbytes(4091), True),  # only the compressed size does (a stored block: 5 bytes more)
], ids=["below", "size-at-threshold", "compressed-size-at-threshold"])
def test_javas_descriptor_widens_once_a_size_reaches_4_gib(monkeypatch, data: bytes, wide: bool) -> None:  # noqa: ANN001
    monkeypatch.setattr(zipread, "_WIDE_DESCRIPTOR", 4096)  # in place of 0xFFFFFFFF: the same decision
    deflated = deflate(data)
    assert wide == (max(len(data), len(deflated)) >= 4096)
    z = ZipStream(piece_reader(java_zip("P/a.dcm", [deflated], zlib.crc32(data), len(data), wide=wide)),
                  memoryview(bytearray(4096)))
    entry = z.next_entry()
    assert entry is not None and not entry.zip64 and entry.size is None
    out: list[bytes] = []
    assert z.copy(entry, lambda p: out.append(bytes(p))) == (len(data), True)
    assert b"".join(out) == data
    assert [r.name for r in z.central_directory()] == ["P/a.dcm"]


def test_a_descriptor_whose_compressed_size_is_not_the_bytes_read_is_a_format_error() -> None:
    data = b"abc" * 1000
    deflated = deflate(data)
    pieces = java_zip("P/a.dcm", [deflated], zlib.crc32(data), len(data), wide=False, csize=len(deflated) + 1)
    with pytest.raises(ZipFormatError, match="not the size its zip says"):
        read_all(b"".join(pieces))


@pytest.mark.slow  # about 12 s: 4 GiB through inflate
def test_a_4_gib_entry_streamed_by_java_reads_through() -> None:
    size = _MAX  # exactly the size from which Java writes 8-byte sizes
    chunk = bytes(16 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    middle = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)  # every later full chunk deflates the same
    tail = c.compress(chunk[:size % len(chunk)]) + c.flush()
    count = size // len(chunk)
    crc = 0
    for _ in range(count):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(chunk[:size % len(chunk)], crc)
    pieces = java_zip("P/big.dcm", [first, *[middle] * (count - 1), tail], crc, size, wide=True)
    z = ZipStream(piece_reader(pieces), memoryview(bytearray(256 << 10)))
    entry = z.next_entry()
    assert entry is not None and not entry.zip64
    assert z.copy(entry, lambda p: None) == (size, True)
    assert [r.name for r in z.central_directory()] == ["P/big.dcm"]


def test_an_empty_zip_has_no_entries() -> None:
    buf = io.BytesIO()
    zipfile.ZipFile(buf, "w").close()  # the end record alone
    assert read_all(buf.getvalue()) == ({}, [])


def test_an_empty_zip64_zip_has_no_entries() -> None:
    end64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, 0, 0, 0, 0)
    locator = struct.pack("<IIQI", 0x07064B50, 0, 0, 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, _MAX, _MAX, 0)
    assert read_all(end64 + locator + end) == ({}, [])
    with zipfile.ZipFile(io.BytesIO(end64 + locator + end)) as zf:  # a zip by zipfile's reading too
        assert zf.namelist() == []


def test_a_local_header_whose_compressed_size_is_not_the_bytes_read_is_a_format_error() -> None:
    data = make_zip({"P/a.dcm": b"abc" * 1000}, method=zipfile.ZIP_DEFLATED)
    (_, _, _, _, _, _, _, csize, _, _, _) = struct.unpack("<IHHHHHIIIHH", data[:30])
    # The entry's deflate stream ends where it should; only the header's compressed size is off by one.
    bad = data[:18] + struct.pack("<I", csize + 1) + data[22:]
    with pytest.raises(ZipFormatError, match="not the size its zip says"):
        read_all(bad)
