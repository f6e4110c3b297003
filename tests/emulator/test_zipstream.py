"""The emulator's hand-built zips: what `zipfile` (and so xnatpy, pyxnat, export) reads from them."""

from __future__ import annotations

import io
import os
import zipfile

from reconcile.emulator.archive import FileEntry
from reconcile.emulator.zipstream import zip_pieces

STAMP = (2024, 1, 10, 14, 22, 6)


class PiecesFile(io.RawIOBase):
    """A seekable, read-only file over zip pieces, reading file ranges only when asked: a zip of
    several GiB can be opened without producing its bytes."""

    def __init__(self, pieces):  # noqa: ANN001 - zip_pieces output
        self.parts, self.size = [], 0
        for piece in pieces:
            length = len(piece) if isinstance(piece, bytes) else piece[2]
            self.parts.append((self.size, length, piece))
            self.size += length
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        out = bytearray()
        want = min(len(buffer), self.size - self.pos)
        for start, length, piece in self.parts:
            if len(out) == want:
                break
            if start + length <= self.pos + len(out):
                continue
            skip = self.pos + len(out) - start
            take = min(length - skip, want - len(out))
            if isinstance(piece, bytes):
                out += piece[skip : skip + take]
            else:
                fd, offset, _ = piece
                out += os.pread(fd, take, offset + skip)
        buffer[: len(out)] = out
        self.pos += len(out)
        return len(out)


def test_a_zip_of_every_kind_of_file_reads_back_whole_with_its_crcs(tmp_path):
    (tmp_path / "disk.dcm").write_bytes(os.urandom(70_000))
    entries = [
        ("S_MR1/scans/1-t1/resources/DICOM/files/a.dcm", FileEntry.from_bytes("a.dcm", b"abc" * 999)),
        ("S_MR1/scans/1-t1/resources/DICOM/files/sub/empty.dcm", FileEntry.from_bytes("empty.dcm", b"")),
        ("S_MR1/scans/1-t1/resources/DICOM/files/disk.dcm", FileEntry.from_disk("disk.dcm", tmp_path / "disk.dcm")),
        ("S_MR1/scans/2-bold/resources/DICOM/files/gen.dcm", FileEntry.synthetic("gen.dcm", (3 << 20) + 5, "g")),
        ("S_MR1/scans/2-bold/resources/DICOM/files/naïve.dcm", FileEntry.from_bytes("naïve.dcm", b"x")),
    ]
    data = b"".join(p if isinstance(p, bytes) else os.pread(p[0], p[2], p[1]) for p in zip_pieces(entries, STAMP))
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None  # every CRC matches
        assert archive.namelist() == [name for name, _ in entries]
        for name, entry in entries:
            assert archive.read(name) == entry.read()
            info = archive.getinfo(name)
            assert info.compress_type == zipfile.ZIP_STORED and info.date_time == STAMP
    assert len(data) == sum(len(p) if isinstance(p, bytes) else p[2] for p in zip_pieces(entries, STAMP))


def test_entries_beyond_4_gib_get_zip64_records():
    huge = FileEntry.synthetic("huge.dcm", (4 << 30) + 123, "h")
    huge._crc32 = 0  # its CRC is not checked here: computing it would read 4 GiB
    small = FileEntry.from_bytes("after.dcm", b"after the huge one")
    entries = [("E/huge.dcm", huge), ("E/after.dcm", small)]
    with zipfile.ZipFile(PiecesFile(zip_pieces(entries, STAMP))) as archive:
        infos = archive.infolist()
        assert [(i.filename, i.file_size) for i in infos] == [("E/huge.dcm", (4 << 30) + 123), ("E/after.dcm", 18)]
        assert infos[1].header_offset > 4 << 30
        assert archive.read("E/after.dcm") == b"after the huge one"
        with archive.open("E/huge.dcm") as member:
            assert member.read(64) == next(huge.iter_bytes())[:64]
