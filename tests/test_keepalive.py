"""The keep-alive lane of `XnatClient.stream` (reconcile/keepalive.py): file GETs through
http.client on kept connections, and every answer it does not serve handed back to requests."""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests.utils
from pytest_httpserver import HTTPServer
from test_xnat_client import Site, emu_client, make_client, populate, read_body
from werkzeug import Request, Response

from reconcile.credentials import Credentials
from reconcile.emulator import Fault
from reconcile.emulator.serve import serve_in_thread
from reconcile.errors import Cancelled, RemoteError
from reconcile.keepalive import ssl_context
from reconcile.xnat import XnatClient


@pytest.fixture
def cheroot_emulator(emulator: Any) -> Iterator[Any]:
    """The same emulator served by cheroot (as `demo` and the benchmarks serve it), which keeps
    HTTP/1.1 connections open; pytest-httpserver closes each one."""
    with serve_in_thread(emulator.app) as url:
        yield dataclasses.replace(emulator, url=url)


def kept_ports(client: XnatClient) -> list[int]:
    """Local ports of the connections the lane keeps for the next GET."""
    assert client._keepalive is not None
    return [conn.sock.getsockname()[1] for conn in client._keepalive._idle if conn.sock is not None]


def test_file_gets_share_one_kept_connection(cheroot_emulator: Any) -> None:
    emulator = cheroot_emulator
    (exp,) = populate(emulator.archive, 1)
    with emu_client(emulator) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[0]
        ports = []
        for f in scan.files * 3:
            with c.stream(f.uri) as resp:
                assert resp.status_code == 200
                assert read_body(resp, 7) == {"1.dcm": b"a", "2.dcm": b"bb"}[f.name]
            ports.append(kept_ports(c))
    assert len({tuple(p) for p in ports}) == 1 and len(ports[0]) == 1


def test_listings_take_the_kept_connection_too(cheroot_emulator: Any) -> None:
    emulator = cheroot_emulator
    populate(emulator.archive, 2)
    with emu_client(emulator) as c:
        c.login()
        exps = c.list_experiments("PROJ")
        first = kept_ports(c)
        details = c.deep_details(exps, concurrency=1)
        assert kept_ports(c) == first and len(first) == 1
    assert all(len(scans) == 2 for scans in details.values())


def test_a_kept_connection_closed_meanwhile_is_replaced(cheroot_emulator: Any) -> None:
    emulator = cheroot_emulator
    (exp,) = populate(emulator.archive, 1)
    with emu_client(emulator) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
        with c.stream(scan.files[0].uri) as resp:
            read_body(resp, 64)
        assert c._keepalive is not None
        (stale,) = c._keepalive._idle
        stale.sock.shutdown(socket.SHUT_RDWR)  # as when the server drops an idle connection
        emulator.app.reset_requests()
        with c.stream(scan.files[0].uri) as resp:
            assert read_body(resp, 64) == b"t1"
        assert len(c._keepalive._idle) == 1 and stale not in c._keepalive._idle  # replaced in the lane
    assert [r[1] for r in emulator.app.requests if r[0] == "GET"] == [scan.files[0].uri]


def test_kept_connections_a_firewall_dropped_silently_are_replaced_not_retried_until_failure(
    cheroot_emulator: Any,
) -> None:
    emulator = cheroot_emulator
    (exp,) = populate(emulator.archive, 1)
    with socket.socket() as black_hole:  # accepts and never answers, as a dropped connection's far end
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        with emu_client(emulator) as c:
            scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
            c.retries = 1
            assert c._keepalive is not None and len(c._keepalive._idle) == 1
            for _ in range(4):  # more dead kept connections than the client has attempts
                dead = http.client.HTTPConnection("127.0.0.1", emulator.url.rsplit(":", 1)[1], timeout=0.5)
                dead.sock = socket.create_connection(black_hole.getsockname(), timeout=0.5)
                c._keepalive._idle.append(dead)
            emulator.app.reset_requests()
            with c.stream(scan.files[0].uri) as resp:
                assert read_body(resp, 64) == b"t1"
    assert [r[1] for r in emulator.app.requests if r[0] == "GET"] == [scan.files[0].uri]


def file_gets(emulator: Any, uri: str) -> int:
    return sum(1 for method, path, _ in emulator.app.requests if method == "GET" and path == uri)


def test_a_get_that_times_out_on_a_kept_connection_is_sent_once_per_attempt(cheroot_emulator: Any) -> None:
    # A read timeout is XNAT not answering, not a connection dropped while idle: sending the GET
    # again at once on a new connection made each such attempt take twice `timeout`.
    emulator = cheroot_emulator
    populate(emulator.archive, 1)
    with emu_client(emulator, timeout=0.5, retries=2) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
        assert c._keepalive is not None and len(c._keepalive._idle) == 1  # the listings' connection, kept
        emulator.app.faults.add(Fault(route=r"/files/1\.dcm$", kind="latency", seconds=0.8))
        emulator.app.reset_requests()
        with pytest.raises(RemoteError) as info:
            with c.stream(scan.files[0].uri):
                pass
    assert file_gets(emulator, scan.files[0].uri) == 3
    assert "did not answer within 0.5 s (3 attempts)" in info.value.summary


def test_a_stop_asked_for_while_a_get_waits_sends_it_no_more(
    cheroot_emulator: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    emulator = cheroot_emulator
    populate(emulator.archive, 1)
    stop = threading.Event()
    with emu_client(emulator, timeout=0.5, retries=4) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
        assert c._keepalive is not None and len(c._keepalive._idle) == 1
        c.stop_when(stop)
        slow = emulator.app.faults.add(Fault(route=r"/files/1\.dcm$", kind="latency", seconds=0.8))
        serve = emulator.app.handle

        def handle(request: Request) -> Response:
            if slow.matches(request.method, request.path):
                stop.set()  # Ctrl-C while XNAT keeps the GET waiting
            return serve(request)

        monkeypatch.setattr(emulator.app, "handle", handle)
        emulator.app.reset_requests()
        with pytest.raises(Cancelled):
            with c.stream(scan.files[0].uri):
                pass
    assert file_gets(emulator, scan.files[0].uri) == 1


def test_a_request_begun_during_a_stop_is_not_sent(cheroot_emulator: Any) -> None:
    # As a download worker that waited for a free connection while the others hung on a slow XNAT:
    # sending it would hold the stop for one more timeout.
    emulator = cheroot_emulator
    populate(emulator.archive, 1)
    stop = threading.Event()
    with emu_client(emulator, timeout=0.5) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
        c.stop_when(stop)
        stop.set()
        emulator.app.reset_requests()
        with pytest.raises(Cancelled):
            with c.stream(scan.files[0].uri):
                pass
    assert file_gets(emulator, scan.files[0].uri) == 0


def test_an_expired_session_is_handed_to_requests_which_logs_in_again(emulator: Any) -> None:
    (exp,) = populate(emulator.archive, 1)
    with emu_client(emulator) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
        real_clock = emulator.app.wall_clock
        emulator.app.wall_clock = lambda: real_clock() + 24 * 3600  # every session is now idle too long
        with c.stream(scan.files[0].uri) as resp:
            assert read_body(resp, 64) == b"t1"
    logins = [r for r in emulator.app.requests if r[1].endswith("/services/auth")]
    assert len(logins) == 2


@pytest.mark.parametrize("name", ["with space.dcm", "ünïcöde.dcm"])
def test_names_that_need_quoting_are_fetched(emulator: Any, name: str) -> None:
    (exp,) = populate(emulator.archive, 1)
    emulator.archive.upload_file(exp.id, "2", "DICOM", name, name.encode())
    with emu_client(emulator) as c:
        scan = c.list_scans(c.list_experiments("PROJ")[0])[1]
        (f,) = [f for f in scan.files if f.name == name]
        with c.stream(f.uri) as resp:
            assert resp.status_code == 200 and read_body(resp, 64) == name.encode()


def test_a_compressed_answer_is_decoded_through_requests(httpserver: HTTPServer) -> None:
    site = Site(httpserver)
    payload = b"dicom bytes " * 1000
    uri = "/data/experiments/E/scans/1/resources/1/files/a.dcm"

    def handler(request: Request) -> Response:
        return Response(gzip.compress(payload), headers={"Content-Encoding": "gzip"},
                        content_type="application/octet-stream")

    site.server.expect_request(uri).respond_with_handler(site.authed(handler))
    with make_client(site.url) as c:
        with c.stream(uri) as resp:
            assert read_body(resp, 4096) == payload
    assert len(site.requests_to(uri)) == 2  # the lane's GET, then requests' own


def test_the_lane_is_off_behind_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example.org:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    c = XnatClient("https://xnat.example.org", Credentials("alice", "secret", "env"))
    assert c._keepalive is None
    monkeypatch.setenv("NO_PROXY", "xnat.example.org")
    assert XnatClient("https://xnat.example.org", Credentials("alice", "secret", "env"))._keepalive is not None


def test_the_lane_stays_on_when_no_proxy_is_set_without_a_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")  # as many hosts set it; the XNAT host is not in it
    assert XnatClient("https://xnat.example.org", Credentials("alice", "secret", "env"))._keepalive is not None


def test_tls_contexts_follow_requests_verify_values(tmp_path: Any) -> None:
    default = ssl_context(True)
    assert default.verify_mode == ssl.CERT_REQUIRED and default.check_hostname
    assert default.cert_store_stats()["x509_ca"] > 0  # certifi's bundle, as requests uses
    off = ssl_context(False)
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
    bundle = ssl_context(requests.utils.DEFAULT_CA_BUNDLE_PATH)
    assert bundle.cert_store_stats()["x509_ca"] == default.cert_store_stats()["x509_ca"]
    assert ssl_context(str(tmp_path)).verify_mode == ssl.CERT_REQUIRED  # a CA folder
    with pytest.raises(OSError):
        ssl_context(str(tmp_path / "missing.pem"))


def test_a_missing_ca_file_is_left_to_requests_to_report(tmp_path: Any) -> None:
    # The lane's TLS context is made at its first connection, so building a client never fails on it.
    c = XnatClient("https://xnat.example.org", Credentials("alice", "secret", "env"), verify=str(tmp_path / "none.pem"))
    assert c._keepalive is not None
    assert c._keepalive.get("/data/x", {}, "https://xnat.example.org/data/x") is None  # the caller asks requests
