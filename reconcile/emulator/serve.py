"""Running the emulator as a real HTTP server, and filling an archive from a folder of DICOM files.

This module owns server lifecycles (a background thread for tests and benchmarks, a blocking loop
for `xnat2bids emulator serve`); it adds no routes of its own.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cheroot import wsgi

from .app import EmulatorApp, PiecesBody
from .archive import Archive, Experiment

SESSION_TYPE_BY_MODALITY = {"MR": "xnat:mrSessionData", "CT": "xnat:ctSessionData", "PT": "xnat:petSessionData"}
# Worker threads: enough for a client's full connection pool plus a few stragglers.
THREADS = 32
# File ranges at least this big go out with sendfile(2); smaller ones are copied and gathered.
SENDFILE_MIN = 256 << 10


class _Gateway(wsgi.Gateway_10):
    """Hands the connection's socket to the app, for the faults that drop a connection, and sends
    bodies straight to the socket: files and zips (`PiecesBody`) with sendfile(2), other bodies
    with `sendall`.

    cheroot's own writer copies every chunk twice in Python, and again for each partial send;
    serving 1 GiB that way took more CPU than the client receiving it, which made the emulator
    the bottleneck of the download benchmark."""

    def get_environ(self) -> dict:
        environ = super().get_environ()
        environ["emulator.socket"] = self.req.conn.socket
        return environ

    def respond(self) -> None:
        body = self.req.server.wsgi_app(self.env, self.start_response)
        try:
            if isinstance(body, PiecesBody):
                self.req.ensure_headers_sent()
            if isinstance(body, PiecesBody) and self._unencrypted():
                self._send_pieces(body)
            else:
                for chunk in body:
                    if chunk:
                        self.write(chunk)
        finally:
            self.req.ensure_headers_sent()
            if hasattr(body, "close"):
                body.close()

    def write(self, chunk: bytes) -> None:
        self.req.ensure_headers_sent()
        if self._unencrypted() and not self.req.chunked_write:
            self.req.conn.socket.sendall(chunk)
        else:
            super().write(chunk)

    def _unencrypted(self) -> bool:
        """Whether the body may bypass cheroot's writer (which goes through TLS when configured).
        Headers are written through it unbuffered, so nothing is pending in it."""
        return type(self.req.conn.socket) is socket.socket

    def _send_pieces(self, body: PiecesBody) -> None:
        """Send the pieces, framed as chunks when the response is chunked (cheroot sends the last,
        empty chunk after `respond`). Small pieces (a zip's headers, small files) are gathered
        into one send: the socket has TCP_NODELAY, so each send would be a packet of its own."""
        sock = self.req.conn.socket
        chunked = self.req.chunked_write
        pending = bytearray()

        def flush() -> None:
            if pending:
                sock.sendall(b"%x\r\n%s\r\n" % (len(pending), pending) if chunked else pending)
                pending.clear()

        for piece in body.pieces():
            if isinstance(piece, bytes):
                pending += piece
            elif piece[2] < SENDFILE_MIN:
                fd, offset, count = piece
                pending += os.pread(fd, count, offset)
            else:
                flush()
                fd, offset, count = piece
                if chunked:
                    sock.sendall(b"%x\r\n" % count)
                with open(fd, "rb", closefd=False) as handle:  # socket.sendfile wants a file object
                    sock.sendfile(handle, offset, count)
                if chunked:
                    sock.sendall(b"\r\n")
            if len(pending) >= SENDFILE_MIN:
                flush()
        flush()


def _server(app: EmulatorApp, host: str, port: int) -> wsgi.Server:
    # cheroot rather than werkzeug's development server: it keeps HTTP/1.1 connections open
    # between requests as XNAT's Tomcat does (werkzeug closes every one), so clients' connection
    # pools behave as against XNAT, and it serves from a pool of threads instead of starting one
    # per connection.
    server = wsgi.Server((host, port), app, numthreads=THREADS, request_queue_size=128, timeout=60)
    server.gateway = _Gateway
    server.prepare()  # binds now, so the port is known before serving
    return server


def _url(server: wsgi.Server, host: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{server.bind_addr[1]}"


@contextmanager
def serve_in_thread(app: EmulatorApp, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` on a threaded HTTP/1.1 server in the background; yield its base URL."""
    server = _server(app, host, port)
    thread = threading.Thread(target=server.serve, name="xnat-emulator", daemon=True)
    thread.start()
    try:
        yield _url(server, host)
    finally:
        server.stop()
        thread.join(timeout=5)


def serve_forever(
    archive: Archive,
    host: str = "127.0.0.1",
    port: int = 8080,
    *,
    app: EmulatorApp | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve `archive` until KeyboardInterrupt; `on_ready` gets the base URL once listening."""
    with serve_in_thread(app or EmulatorApp(archive), host, port) as url:
        if on_ready is not None:
            on_ready(url)
        # The server runs in a thread, so Ctrl-C (or SIGTERM as the CLI turns it into one) lands
        # here, never in the middle of cheroot's own locks, whose stop() could then wait forever.
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def load_dicom_dir(archive: Archive, path: str | Path) -> list[Experiment]:
    """Load a folder laid out PROJECT/SUBJECT/SESSION/SCANID/*.dcm into `archive`.

    Projects and subjects are created when missing. The scan type and series description come from
    SeriesDescription (ProtocolName as fallback, then the folder name), the session date and time
    from StudyDate/StudyTime, the session type from Modality. File bytes stay on disk until served.
    """
    import pydicom  # deferred: only this loader needs it

    root = Path(path)
    created: list[Experiment] = []
    for project_dir in _subdirs(root):
        if project_dir.name not in archive.projects:
            archive.add_project(project_dir.name)
        for subject_dir in _subdirs(project_dir):
            for session_dir in _subdirs(subject_dir):
                scans: list[tuple[Path, list[Path], pydicom.Dataset | None]] = []
                for scan_dir in _subdirs(session_dir):
                    files = sorted(p for p in scan_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
                    header = _first_header(files, pydicom)
                    scans.append((scan_dir, files, header))
                first = next((h for _, _, h in scans if h is not None), None)
                experiment = archive.add_session(
                    project_dir.name,
                    subject_dir.name,
                    session_dir.name,
                    date=_dicom_date(first),
                    time=_dicom_time(first),
                    xsi_type=SESSION_TYPE_BY_MODALITY.get(str(getattr(first, "Modality", "MR")), "xnat:mrSessionData"),
                )
                for scan_dir, files, header in scans:
                    description = str(getattr(header, "SeriesDescription", "") or getattr(header, "ProtocolName", ""))
                    description = description or scan_dir.name
                    archive.add_scan(experiment.id, scan_dir.name, type=description, series_description=description)
                    for file_path in files:
                        relpath = file_path.relative_to(scan_dir).as_posix()
                        archive.add_disk_file(experiment.id, scan_dir.name, "DICOM", relpath, file_path)
                created.append(experiment)
    return created


def _subdirs(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _first_header(files: list[Path], pydicom):  # noqa: ANN001, ANN202 - pydicom is imported lazily
    for file_path in files:
        try:
            return pydicom.dcmread(file_path, stop_before_pixels=True)
        except Exception:  # not DICOM (e.g. a stray text file): look at the next one
            continue
    return None


def _dicom_date(header) -> str:  # noqa: ANN001
    value = str(getattr(header, "StudyDate", "") or "")
    if len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return ""


def _dicom_time(header) -> str:  # noqa: ANN001
    value = str(getattr(header, "StudyTime", "") or "").split(".")[0]
    if len(value) >= 6 and value[:6].isdigit():
        return f"{value[:2]}:{value[2:4]}:{value[4:6]}"
    return ""
