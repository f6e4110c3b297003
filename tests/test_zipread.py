"""reconcile.zipread against zips written by `zipfile` in every way a server may write them
(stored, deflated, streamed with data descriptors, ZIP64), read through reads of any size."""

from __future__ import annotations

import io
import os
import stat
import zipfile
import zlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconcile.zipread import Unstreamable, ZipFormatError, ZipStream


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


FILES = {"S/scans/1-T1w/resources/DICOM/files/1.dcm": os.urandom(5000),
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
    archive.add_scan(exp.id, "1", type="T1w", files={"1.dcm": b"one", "2.dcm": os.urandom(70000)})
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
    payload = os.urandom(3000)
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
        data = bytearray(make_zip({"a": os.urandom(2000) * 4}, method=zipfile.ZIP_DEFLATED))
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


def test_compression_methods_other_than_deflate_are_unstreamable() -> None:
    data = make_zip({"a": b"x" * 100}, method=zipfile.ZIP_BZIP2)
    with pytest.raises(Unstreamable):
        read_all(data)
    assert zlib  # deflate is what XNAT uses
