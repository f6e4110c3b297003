"""The XNAT client over real HTTP: a small XNAT stand-in on pytest-httpserver, raw sockets for
resets and truncation, and (when present) the project's emulator."""

from __future__ import annotations

import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from reconcile.config import Config
from reconcile.credentials import Credentials, resolve_credentials
from reconcile.errors import (
    AuthError,
    Cancelled,
    ConfigError,
    NotFoundError,
    RemoteError,
    UnsafePathError,
    XnatBidsError,
)
from reconcile.lock import Lock
from reconcile.model import Experiment, SessionRecord
from reconcile.plan import LocalState, ProjectListing, RemoteState, compute_plan
from reconcile.xnat import EXPERIMENT_COLUMNS, StreamResponse, XnatClient, html_message

SENTINEL = "pw-S3NT1NEL-9f8e"
USER = "alice"
TOKEN_ALIAS = "0b5c2f4e-1a2b-4c3d-8e9f-0123456789ab"

EXPERIMENTS_PATH = "/data/projects/PROJ/experiments"
RESTLET_404 = (
    "<html><head><title>Status page</title></head><body><h3>Unable to identify project NOPE</h3>"
    "<p>You can get technical details <a href='x'>here</a>.</p></body></html>"
)


def read_body(resp: StreamResponse, chunk: int) -> bytes:
    """The whole body of a streamed download, read the way export reads it."""
    buffer, body = bytearray(chunk), bytearray()
    while n := resp.readinto(buffer):
        body += buffer[:n]
    return bytes(body)


def exp_row(**over: str) -> dict[str, str]:
    row = {
        "ID": "SITE_E00001",
        "label": "SUBJ01_MR1",
        "project": "PROJ",
        "subject_ID": "SITE_S00001",
        "subject_label": "SUBJ01",
        "date": "2024-01-10",
        "insert_date": "2023-09-27 17:31:21.352",
        "last_modified": "2023-09-28 08:00:00.5",
        "xsiType": "xnat:mrSessionData",
        "URI": "/data/experiments/SITE_E00001",
    }
    row.update(over)
    return row


def result_set(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"ResultSet": {"Result": rows, "totalRecords": str(len(rows))}}


def file_row(scan: str, name: str, size: int = 10, digest: str = "", collection: str = "DICOM") -> dict[str, str]:
    base = "/data/projects/PROJ/subjects/SITE_S00001/experiments/SITE_E00001"
    return {
        "Name": name.rsplit("/", 1)[-1],
        "Size": str(size),
        "URI": f"{base}/scans/{scan}/resources/101/files/{name}",
        "collection": collection,
        "file_tags": "",
        "file_format": "DICOM",
        "file_content": "RAW",
        "cat_ID": "101",
        "digest": digest,
    }


class Site:
    """A tiny XNAT on pytest-httpserver: password login, cookie check, JSON routes."""

    def __init__(self, server: HTTPServer, *, set_cookie: bool = True):
        self.server = server
        self.set_cookie = set_cookie
        self.sessions: set[str] = set()
        self.logins = 0
        self.basic_seen = 0
        self.password = SENTINEL  # what the site accepts; a test may change it mid-run
        server.expect_request("/data/services/auth", method="PUT").respond_with_handler(self._auth)
        server.expect_request("/data/JSESSION", method="DELETE").respond_with_handler(self._logout)

    @property
    def url(self) -> str:
        return self.server.url_for("").rstrip("/")

    def _auth(self, request: Request) -> Response:
        self.logins += 1
        if request.form.get("username") != USER or request.form.get("password") != self.password:
            return Response("Authentication failed.", status=401, content_type="text/plain")
        sid = f"SID{self.logins:04d}"
        self.sessions.add(sid)
        resp = Response(sid, content_type="text/plain")
        if self.set_cookie:
            resp.set_cookie("JSESSIONID", sid, path="/")
        return resp

    def _logout(self, request: Request) -> Response:
        self.sessions.discard(request.cookies.get("JSESSIONID", ""))
        return Response("", status=200)

    def expire_sessions(self) -> None:
        self.sessions.clear()

    def authed(self, body: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def handler(request: Request) -> Response:
            if request.authorization is not None:
                self.basic_seen += 1
            if request.cookies.get("JSESSIONID") not in self.sessions:
                return Response("<html><body><h3>Login required</h3></body></html>", status=401)
            return body(request)

        return handler

    def json(self, path: str, payload: Any, *, method: str = "GET") -> None:
        text = json.dumps(payload)
        self.server.expect_request(path, method=method).respond_with_handler(
            self.authed(lambda r: Response(text, content_type="application/json"))
        )

    def raw(self, path: str, body: str | bytes, *, status: int = 200, content_type: str = "text/html") -> None:
        self.server.expect_request(path).respond_with_handler(
            self.authed(lambda r: Response(body, status=status, content_type=content_type))
        )

    def requests_to(self, path: str) -> list[Request]:
        return [req for req, _ in self.server.log if req.path == path]


@pytest.fixture
def site(httpserver: HTTPServer) -> Site:
    return Site(httpserver)


def make_client(url: str, **kw: Any) -> XnatClient:
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 5.0)
    return XnatClient(url, Credentials(USER, SENTINEL, "env"), **kw)


@pytest.fixture
def client(site: Site) -> Iterator[XnatClient]:
    with make_client(site.url) as c:
        yield c


def assert_no_secret(exc: BaseException) -> None:
    """The password must not appear in the error, its chain, or their reprs."""
    seen: BaseException | None = exc
    while seen is not None:
        assert SENTINEL not in str(seen) and SENTINEL not in repr(seen)
        for attr in ("summary", "detail", "hint"):
            assert SENTINEL not in str(getattr(seen, attr, "") or "")
        seen = seen.__cause__ or seen.__context__


# ---------------------------------------------------------------------------- login & cookies


def test_logs_in_once_then_sends_only_the_cookie(site: Site, client: XnatClient) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row()]))
    for _ in range(3):
        client.list_experiments("PROJ")
    assert site.logins == 1
    assert site.basic_seen == 0
    listing = site.requests_to(EXPERIMENTS_PATH)
    assert len(listing) == 3 and all(r.cookies.get("JSESSIONID") == "SID0001" for r in listing)


def test_login_form_body_carries_the_credentials(site: Site, client: XnatClient) -> None:
    client.login()
    client.login()  # idempotent
    (auth,) = site.requests_to("/data/services/auth")
    assert auth.method == "PUT" and auth.authorization is None
    assert auth.form["username"] == USER and auth.form["password"] == SENTINEL


def test_session_id_from_the_body_when_no_set_cookie(httpserver: HTTPServer) -> None:
    site = Site(httpserver, set_cookie=False)
    site.json(EXPERIMENTS_PATH, result_set([exp_row()]))
    with make_client(site.url) as c:
        assert len(c.list_experiments("PROJ")) == 1
    assert site.logins == 1


def test_close_ends_the_server_session(site: Site) -> None:
    c = make_client(site.url)
    c.login()
    assert site.sessions == {"SID0001"}
    c.close()
    assert site.sessions == set()
    with pytest.raises(RemoteError):
        c.list_experiments("PROJ")


def test_wrong_password_is_an_auth_error_without_the_password(site: Site) -> None:
    bad = XnatClient(site.url, Credentials(USER, SENTINEL + "x", "env"), backoff=0)
    with pytest.raises(AuthError) as info:
        bad.login()
    assert str(info.value).startswith(f"XNAT rejected the credentials for user {USER} at {site.url}")
    assert SENTINEL not in str(info.value)
    assert_no_secret(info.value)
    assert site.logins == 1  # a 401 on login is not retried


@pytest.mark.parametrize("answer", [
    (400, "text/plain", "Request rejected by WAF: {body}"),
    (400, "text/plain", "x" * 172 + " {body}"),  # the password across the 200-character cut
    (200, "text/html", "<html><title>Bad form {body}</title><body>Error</body></html>"),
    (500, "text/plain", "java.lang.IllegalStateException at {body}"),
], ids=["refused", "cut", "html", "failing"])
def test_an_answer_that_echoes_the_login_form_is_quoted_without_the_password(httpserver: HTTPServer, answer) -> None:
    status, kind, text = answer
    secret = SENTINEL + " &+/é  x"  # URL-encoded in the echoed form; two spaces, which a message folds

    def echo(request):
        return Response(text.format(body=request.get_data(as_text=True)), status=status, content_type=kind)

    httpserver.expect_request("/data/services/auth").respond_with_handler(echo)
    with XnatClient(httpserver.url_for("/"), Credentials(USER, secret, "env"), backoff=0, retries=0) as c, \
            pytest.raises(RemoteError) as info:
        c.login()
    said = f"{info.value.summary} {info.value.detail} {info.value.hint}"
    assert "username=alice&password=***" in said
    assert SENTINEL not in said and "S3NT1NEL" not in said and "pw-S3" not in said


@pytest.mark.parametrize("cut", [None, 20], ids=["whole", "cut-short"])
def test_an_answer_that_echoes_a_token_logins_authorization_header_is_quoted_without_it(httpserver: HTTPServer,
                                                                                          cut) -> None:
    # A proxy page quoting the request's headers: base64 of the alias and its secret, maybe cut
    # short by the page, must not reach a terminal, --json or the history.
    alias = "fe59172a-f857-4b37-b3bc-f92c89bf4900"
    sent: list[str] = []

    def echo(request: Request) -> Response:
        header = request.headers.get("Authorization", "")
        sent.append(header)
        return Response(f"Bad gateway; request headers: Authorization: {header[:cut]}", status=502)

    httpserver.expect_request("/data/JSESSION").respond_with_handler(echo)
    with XnatClient(httpserver.url_for("/"), Credentials(alias, SENTINEL, "token-file"), backoff=0, retries=0) as c, \
            pytest.raises(RemoteError) as info:
        c.login()
    encoded = sent[0].removeprefix("Basic ")
    assert sent[0].startswith("Basic ") and len(encoded) > 20
    said = f"{info.value.summary} {info.value.detail} {info.value.hint}"
    assert "Authorization: Basic ***" in said and encoded[:16] not in said, said


def test_an_answer_that_echoes_the_session_cookie_is_quoted_without_it(httpserver: HTTPServer) -> None:
    # The cookie stands for the login until the session ends: a proxy page quoting the request's
    # headers must not put it on a terminal or in --json.
    sid = "836C0FFEE1234567890ABCDEF0123456"

    def login(request: Request) -> Response:
        resp = Response(sid, content_type="text/plain")
        resp.set_cookie("JSESSIONID", sid, path="/")
        return resp

    httpserver.expect_request("/data/services/auth").respond_with_handler(login)
    httpserver.expect_request("/data/projects").respond_with_handler(
        lambda r: Response(f"Proxy error; you sent cookie {r.headers.get('Cookie')}", status=400))
    with make_client(httpserver.url_for("/"), retries=0) as c, pytest.raises(RemoteError) as info:
        c.get_json("/data/projects")
    said = f"{info.value.summary} {info.value.detail} {info.value.hint}"
    assert "you sent cookie JSESSIONID=***" in said and sid not in said


@pytest.mark.parametrize("status", [301, 302, 307, 308])
@pytest.mark.parametrize("token", [False, True], ids=["password", "alias-token"])
def test_a_redirected_login_sends_the_credentials_nowhere_else(httpserver: HTTPServer, status: int,
                                                                token: bool) -> None:
    elsewhere = HTTPServer()
    elsewhere.start()
    try:
        elsewhere.expect_request("/data/services/auth").respond_with_data("ELSEWHERE-SESSION")
        elsewhere.expect_request("/data/JSESSION").respond_with_data("ELSEWHERE-SESSION")
        for path in ("/data/services/auth", "/data/JSESSION"):
            httpserver.expect_request(path).respond_with_response(
                Response("", status=status, headers={"Location": elsewhere.url_for(path)}))
        user = TOKEN_ALIAS if token else USER
        with XnatClient(httpserver.url_for("/"), Credentials(user, SENTINEL, "env"), backoff=0) as c, \
                pytest.raises(RemoteError) as info:
            c.login()
        assert info.value.summary == (f"XNAT at {httpserver.url_for('/').rstrip('/')} redirected the login to "
                                   f"{elsewhere.url_for('/data/services/auth' if not token else '/data/JSESSION')}; "
                                   "the credentials were not sent there")
        assert "set xnat_url" in (info.value.hint or "")
        assert elsewhere.log == []
        assert len(httpserver.log) == 1  # not retried either
    finally:
        elsewhere.clear()
        elsewhere.stop()


def _rejected_credentials(source: str, tmp_path: Path) -> Credentials:
    """Wrong credentials, found the way resolve_credentials finds them from `source`."""
    wrong = SENTINEL + "x"
    netrc = tmp_path / "netrc"
    token = tmp_path / "token.json"
    env: dict[str, str] = {}
    prompt = password_prompt = None
    if source == "env":
        env = {"XNAT_USER": USER, "XNAT_PASS": wrong}
    elif source == "netrc":
        netrc.write_text(f"default login {USER} password {wrong}\n")
        netrc.chmod(0o600)
    elif source == "token-file":
        token.write_text(json.dumps({"alias": TOKEN_ALIAS, "secret": wrong}))
        env = {"XNAT_TOKEN_FILE": str(token)}
    else:
        prompt, password_prompt = (lambda text: USER), (lambda text: wrong)
    creds = resolve_credentials("http://127.0.0.1", env=env, netrc_path=netrc, prompt=prompt,
                                password_prompt=password_prompt)
    assert creds.source == source
    return creds


@pytest.mark.parametrize(
    ("source", "expected", "unexpected"),
    [
        ("env", "check XNAT_USER/XNAT_PASS", ".netrc"),
        ("netrc", "check the 'default' entry in {tmp}/netrc", "XNAT_USER"),
        ("token-file", "the alias token in {tmp}/token.json may have expired", "XNAT_USER"),
        ("prompt", "typed at the prompt", "XNAT_USER"),
    ],
)
def test_rejected_login_hint_names_where_the_credentials_came_from(
    site: Site, tmp_path: Path, source: str, expected: str, unexpected: str
) -> None:
    site.server.expect_request("/data/JSESSION", method="GET").respond_with_data("", status=401)  # the alias login
    creds = _rejected_credentials(source, tmp_path)
    with XnatClient(site.url, creds, backoff=0) as c, pytest.raises(AuthError) as info:
        c.login()
    assert "rejected the credentials" in info.value.summary
    assert info.value.hint is not None
    assert expected.format(tmp=tmp_path) in info.value.hint and unexpected not in info.value.hint
    assert_no_secret(info.value)
    if source == "token-file":  # an alias token's ID is half its secret: not in messages (logs, history)
        assert creds.user not in str(info.value) and "for an alias token at" in info.value.summary


def test_a_rejected_slurm_batch_token_points_at_apply_not_at_its_deleted_file(site: Site) -> None:
    site.server.expect_request("/data/JSESSION", method="GET").respond_with_data("", status=401)
    alias = "0c0a1b7e-3f1d-4a55-9a0e-2f6b8c9d1e23"
    with XnatClient(site.url, Credentials(alias, "s3cret-token", "batch-token", "/x/credentials.json"),
                    backoff=0) as c, pytest.raises(AuthError) as info:
        c.login()
    assert info.value.summary == f"XNAT rejected the credentials for an alias token at {site.url}"
    assert info.value.hint == ("the alias token apply issued for this SLURM batch expired or was revoked; "
                               "`xnat2bids apply` submits what is left with a new one")
    assert alias not in str(info.value) + repr(c)


def test_expired_session_triggers_one_relogin(site: Site, client: XnatClient) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row()]))
    client.list_experiments("PROJ")
    site.expire_sessions()
    assert len(client.list_experiments("PROJ")) == 1
    assert site.logins == 2


def test_persistent_401_after_relogin_is_an_auth_error(site: Site, client: XnatClient) -> None:
    site.server.expect_request(EXPERIMENTS_PATH).respond_with_data("no", status=401)
    with pytest.raises(AuthError) as info:
        client.list_experiments("PROJ")
    assert site.logins == 2
    assert "rejected the credentials" in str(info.value)
    assert_no_secret(info.value)


def test_alias_token_logs_in_with_one_basic_request(httpserver: HTTPServer) -> None:
    seen: list[Request] = []

    def jsession(request: Request) -> Response:
        seen.append(request)
        auth = request.authorization
        if auth is None or (auth.username, auth.password) != (TOKEN_ALIAS, SENTINEL):
            return Response("", status=401)
        resp = Response("TOKSID", content_type="text/plain")
        resp.set_cookie("JSESSIONID", "TOKSID", path="/")
        return resp

    def listing(request: Request) -> Response:
        assert request.authorization is None
        assert request.cookies.get("JSESSIONID") == "TOKSID"
        return Response(json.dumps(result_set([exp_row()])), content_type="application/json")

    httpserver.expect_request("/data/JSESSION", method="GET").respond_with_handler(jsession)
    httpserver.expect_request(EXPERIMENTS_PATH).respond_with_handler(listing)
    httpserver.expect_request("/data/JSESSION", method="DELETE").respond_with_data("")
    with XnatClient(httpserver.url_for("/"), Credentials(TOKEN_ALIAS, SENTINEL, "token-file"), backoff=0) as c:
        c.list_experiments("PROJ")
        c.list_experiments("PROJ")
    assert len(seen) == 1
    assert not any(r.path == "/data/services/auth" for r, _ in httpserver.log)


def test_netrc_is_not_used_by_the_transport(
    site: Site, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests would otherwise add Basic auth from ~/.netrc to every call (a new server session each).
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login alice password other\nmachine 127.0.0.1 login alice password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    site.json(EXPERIMENTS_PATH, result_set([exp_row()]))
    with make_client(site.url) as c:
        c.list_experiments("PROJ")
    assert site.basic_seen == 0


# ---------------------------------------------------------------------------- listing parse


def test_list_experiments_is_one_request_with_the_columns(site: Site, client: XnatClient) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row(), exp_row(ID="SITE_E00002", label="SUBJ02_MR1")]))
    client.login()
    before = client.request_count
    exps = client.list_experiments("PROJ")
    assert client.request_count - before == 1
    (req,) = site.requests_to(EXPERIMENTS_PATH)
    assert req.args["format"] == "json"
    assert req.args["columns"].split(",") == list(EXPERIMENT_COLUMNS)
    assert [e.id for e in exps] == ["SITE_E00001", "SITE_E00002"]


def test_experiment_values_are_parsed(site: Site, client: XnatClient) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row()]))
    (exp,) = client.list_experiments("PROJ")
    assert exp == Experiment(
        id="SITE_E00001",
        label="SUBJ01_MR1",
        project="PROJ",
        subject_id="SITE_S00001",
        subject_label="SUBJ01",
        date="2024-01-10",
        insert_date=datetime(2023, 9, 27, 17, 31, 21, 352000),
        last_modified=datetime(2023, 9, 28, 8, 0, 0, 500000),
        xsi_type="xnat:mrSessionData",
    )


def test_a_shared_session_is_listed_with_the_project_it_belongs_to(site: Site, client: XnatClient) -> None:
    # XNAT lists a session shared into PROJ under its share label but with its primary project.
    site.json(EXPERIMENTS_PATH, result_set([exp_row(), exp_row(ID="SITE_E00002", label="P_002", project="STUDY")]))
    own, shared = client.list_experiments("PROJ")
    assert (own.project, own.primary_project) == ("PROJ", None)
    assert (shared.project, shared.label, shared.primary_project) == ("PROJ", "P_002", "STUDY")


def test_empty_strings_become_none(site: Site, client: XnatClient) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row(date="", insert_date="", last_modified="")]))
    (exp,) = client.list_experiments("PROJ")
    assert exp.date is None and exp.insert_date is None and exp.last_modified is None


@pytest.mark.parametrize(
    "text, micros",
    [("0", 0), ("5", 500000), ("35", 350000), ("352", 352000), ("123456", 123456), ("123456789", 123456)],
)
def test_timestamps_with_1_to_9_fraction_digits(site: Site, client: XnatClient, text: str, micros: int) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row(insert_date=f"2023-09-27 17:31:21.{text}")]))
    (exp,) = client.list_experiments("PROJ")
    assert exp.insert_date == datetime(2023, 9, 27, 17, 31, 21, micros)


def test_rows_of_every_type_are_kept(site: Site, client: XnatClient) -> None:
    site.json(
        EXPERIMENTS_PATH,
        result_set([exp_row(), exp_row(ID="SITE_E00009", label="QC1", xsiType="xnat:qcAssessmentData",
                                       subject_ID="", subject_label="")]),
    )
    exps = client.list_experiments("PROJ")
    assert [e.xsi_type for e in exps] == ["xnat:mrSessionData", "xnat:qcAssessmentData"]
    assert exps[1].subject_id == ""


@pytest.mark.parametrize(
    "row, fragment",
    [
        (exp_row(ID=""), "without ID or label"),
        ({k: v for k, v in exp_row().items() if k != "label"}, "without ID or label"),
        (exp_row(insert_date="yesterday"), "SITE_E00001"),
        (exp_row(date="10/01/2024"), "SITE_E00001"),
    ],
)
def test_malformed_row_is_a_remote_error_naming_the_row(
    site: Site, client: XnatClient, row: dict[str, str], fragment: str
) -> None:
    site.json(EXPERIMENTS_PATH, result_set([exp_row(ID="SITE_E00000"), row]))
    with pytest.raises(RemoteError) as info:
        client.list_experiments("PROJ")
    assert fragment in str(info.value) and "row 1" in str(info.value)


def test_unknown_project_404(site: Site, client: XnatClient) -> None:
    site.raw("/data/projects/NOPE/experiments", RESTLET_404, status=404)
    with pytest.raises(NotFoundError) as info:
        client.list_experiments("NOPE")
    assert info.value.summary == f"project NOPE not found on XNAT or not visible to user {USER}"
    assert "Unable to identify project NOPE" in str(info.value)


def test_forbidden_project_403(site: Site, client: XnatClient) -> None:
    site.raw(EXPERIMENTS_PATH, "<html><h3>Unable to read experiments for Project: PROJ</h3></html>", status=403)
    with pytest.raises(AuthError) as info:
        client.list_experiments("PROJ")
    assert "PROJ" in info.value.summary and USER in info.value.summary
    assert not isinstance(info.value, NotFoundError)


def test_html_page_with_200_is_a_remote_error(site: Site, client: XnatClient) -> None:
    site.raw(EXPERIMENTS_PATH, "<!DOCTYPE html><html><body><h3>The server is in maintenance</h3></body></html>")
    with pytest.raises(RemoteError) as info:
        client.list_experiments("PROJ")
    assert "The server is in maintenance" in str(info.value)


def test_invalid_json_is_a_remote_error(site: Site, client: XnatClient) -> None:
    site.raw(EXPERIMENTS_PATH, '{"ResultSet": {"Result": [', content_type="application/json")
    with pytest.raises(RemoteError) as info:
        client.list_experiments("PROJ")
    assert "invalid JSON" in str(info.value)


def test_json_without_result_set_is_a_remote_error(site: Site, client: XnatClient) -> None:
    site.json(EXPERIMENTS_PATH, {"items": []})
    with pytest.raises(RemoteError, match="ResultSet"):
        client.list_experiments("PROJ")


def test_html_message_extraction() -> None:
    assert html_message(RESTLET_404) == "Unable to identify project NOPE"
    assert html_message("<!doctype html><title>Bad &amp; gateway</title>") == "Bad & gateway"
    assert html_message('{"a": 1}') is None


# ---------------------------------------------------------------------------- retries


def test_503_is_retried_then_succeeds(site: Site, client: XnatClient) -> None:
    for _ in range(2):
        site.server.expect_oneshot_request(EXPERIMENTS_PATH).respond_with_data("busy", status=503)
    site.json(EXPERIMENTS_PATH, result_set([exp_row()]))
    assert len(client.list_experiments("PROJ")) == 1
    assert len(site.requests_to(EXPERIMENTS_PATH)) == 3


def test_retries_exhausted_is_a_remote_error(site: Site) -> None:
    site.server.expect_request(EXPERIMENTS_PATH).respond_with_data("busy", status=503)
    with make_client(site.url, retries=2) as c:
        with pytest.raises(RemoteError) as info:
            c.list_experiments("PROJ")
    assert "503" in str(info.value) and "3 attempt" in str(info.value)
    assert len(site.requests_to(EXPERIMENTS_PATH)) == 3
    assert_no_secret(info.value)


def test_backoff_grows_between_attempts(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    import reconcile.xnat

    slept: list[float] = []

    class RecordingClock:  # the client's `time`, with its sleeps recorded instead of taken
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def sleep(self, seconds: float) -> None:
            slept.append(seconds)

    monkeypatch.setattr(reconcile.xnat, "time", RecordingClock())
    site.server.expect_request(EXPERIMENTS_PATH).respond_with_data("busy", status=503)
    with make_client(site.url, retries=2, backoff=0.05) as c:
        with pytest.raises(RemoteError):
            c.list_experiments("PROJ")
    assert len(slept) == 2  # between the 3 attempts
    # backoff * 2**attempt, plus up to half of that as jitter
    assert 0.05 <= slept[0] <= 0.075 and 0.1 <= slept[1] <= 0.15


def test_404_is_not_retried(site: Site, client: XnatClient) -> None:
    site.raw(EXPERIMENTS_PATH, RESTLET_404, status=404)
    with pytest.raises(NotFoundError):
        client.list_experiments("PROJ")
    assert len(site.requests_to(EXPERIMENTS_PATH)) == 1


def test_unreachable_server_is_a_remote_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with make_client(f"http://127.0.0.1:{port}", retries=1) as c:
        with pytest.raises(RemoteError) as info:
            c.login()
    assert "cannot reach XNAT" in str(info.value)
    assert_no_secret(info.value)


class RawServer:
    """An HTTP/1.1 server on a bare socket, for faults werkzeug cannot produce (RST, short bodies).

    `script(method, path)` returns "reset", ("truncate", body), ("sleep", seconds, body) or body bytes.
    Every response closes its connection.
    """

    def __init__(self, script: Callable[[str, str], Any]):
        self.script = script
        self.seen: list[tuple[str, str]] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            while len(rest) < length:
                rest += conn.recv(65536)
            path = target.split("?", 1)[0]
            self.seen.append((method, path))
            action = self.script(method, path)
            if action == "reset":
                # SO_LINGER 0 makes close() send RST: a connection reset by peer.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                return
            if isinstance(action, tuple) and action[0] == "truncate":
                body = action[1]
                conn.sendall(self._head(len(body) + 1000) + body)
                return
            if isinstance(action, tuple) and action[0] == "sleep":
                time.sleep(action[1])
                action = action[2]
            conn.sendall(self._head(len(action)) + action)

    @staticmethod
    def _head(length: int) -> bytes:
        return (
            f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n"
            "Set-Cookie: JSESSIONID=RAW1; Path=/\r\nConnection: close\r\n\r\n"
        ).encode()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def flaky_server(first: Any, times: int = 1) -> RawServer:
    listing = json.dumps(result_set([exp_row()])).encode()
    counter = {"n": 0}

    def script(method: str, path: str) -> Any:
        if path == "/data/services/auth":
            return b"RAW1"
        if path == EXPERIMENTS_PATH:
            counter["n"] += 1
            if counter["n"] <= times:
                return first
            return listing
        return b""

    return RawServer(script)


@pytest.mark.parametrize(
    "fault",
    ["reset", ("truncate", b'{"ResultSet": {"Res'), ("sleep", 1.0, b"{}")],
    ids=["connection-reset", "truncated-body", "read-timeout"],
)
def test_transient_transport_faults_are_retried(fault: Any) -> None:
    server = flaky_server(fault)
    try:
        with make_client(server.url, timeout=0.5) as c:
            assert [e.id for e in c.list_experiments("PROJ")] == ["SITE_E00001"]
        assert server.seen.count(("GET", EXPERIMENTS_PATH)) == 2
    finally:
        server.close()


def test_a_server_that_answers_too_slowly_is_named_with_the_timeout_to_raise() -> None:
    server = flaky_server(("sleep", 1.0, b"{}"), times=100)
    try:
        with make_client(server.url, timeout=0.3, retries=1) as c:
            with pytest.raises(RemoteError) as info:
                c.list_experiments("PROJ")
        assert info.value.summary == (f"XNAT at {server.url} did not answer within 0.3 s (2 attempts) for the "
                                      "experiments of project PROJ")
        assert info.value.hint == ("XNAT is slow or busy: raise `timeout` in the config (seconds), or run again when "
                                   "XNAT is less busy")
    finally:
        server.close()


def test_persistent_resets_become_a_remote_error() -> None:
    server = flaky_server("reset", times=100)
    try:
        with make_client(server.url, retries=2) as c:
            with pytest.raises(RemoteError) as info:
                c.list_experiments("PROJ")
        assert "3 attempt" in str(info.value)
        assert isinstance(info.value.__cause__, Exception)
        assert_no_secret(info.value)
    finally:
        server.close()


# ---------------------------------------------------------------------------- scans & files

EXP = Experiment(
    id="SITE_E00001",
    label="SUBJ01_MR1",
    project="PROJ",
    subject_id="SITE_S00001",
    subject_label="SUBJ01",
    date="2024-01-10",
    insert_date=None,
    last_modified=None,
)
EXPT_PATH = "/data/projects/PROJ/subjects/SITE_S00001/experiments/SITE_E00001"


def scan_rows() -> list[dict[str, str]]:
    return [
        {"ID": "2", "type": "rest_fMRI", "series_description": "rest bold", "xsiType": "xnat:mrScanData",
         "URI": "/data/experiments/SITE_E00001/scans/2"},
        {"ID": "10", "type": "T1w", "series_description": "MPRAGE", "xsiType": "xnat:mrScanData",
         "URI": "/data/experiments/SITE_E00001/scans/10"},
        {"ID": "1", "type": "localizer", "series_description": "", "xsiType": "xnat:mrScanData",
         "URI": "/data/experiments/SITE_E00001/scans/1"},
    ]


def serve_session(site: Site, files: list[dict[str, str]]) -> None:
    site.json(f"{EXPT_PATH}/scans", result_set(scan_rows()))
    site.json(f"{EXPT_PATH}/scans/ALL/files", {"ResultSet": {"Result": files, "title": "Files"}})


def test_list_scans_groups_one_file_listing_by_scan(site: Site, client: XnatClient) -> None:
    serve_session(site, [
        file_row("2", "b.dcm", 20, "AB" * 16),
        file_row("2", "a.dcm", 10),
        file_row("10", "sub/dir/x.dcm", 7, collection="DICOM"),
        file_row("10", "notes.txt", 3, collection="SNAPSHOTS"),
    ])
    client.login()
    before = client.request_count
    scans = client.list_scans(EXP)
    assert client.request_count - before == 2
    assert [s.id for s in scans] == ["1", "2", "10"]
    by_id = {s.id: s for s in scans}
    assert by_id["1"].files == ()
    assert [(f.name, f.size, f.digest) for f in by_id["2"].files] == [("a.dcm", 10, ""), ("b.dcm", 20, "ab" * 16)]
    assert by_id["2"].type == "rest_fMRI" and by_id["2"].series_description == "rest bold"
    assert [(f.resource, f.name) for f in by_id["10"].files] == [("DICOM", "sub/dir/x.dcm"), ("SNAPSHOTS", "notes.txt")]
    assert by_id["10"].files[0].uri.endswith("/scans/10/resources/101/files/sub/dir/x.dcm")
    (req,) = site.requests_to(f"{EXPT_PATH}/scans")
    assert req.args["columns"].split(",") == ["ID", "type", "series_description", "xsiType"]


def test_a_deep_plan_names_scans_in_the_order_the_client_lists_them(site: Site, client: XnatClient) -> None:
    # A scan ID is a number or begins with one (1-MR1, 1a: derived from scan 1): each sorts next
    # to the scan it is numbered after, in the listing and in the plan alike.
    ids = ["SCOUT", "10", "1.2", "2", "1a", "1-MR1", "1"]
    rows = [{"ID": i, "type": "T1w", "series_description": "anat-T1w", "xsiType": "xnat:mrScanData",
             "URI": f"/data/experiments/SITE_E00001/scans/{i}"} for i in ids]
    site.json(f"{EXPT_PATH}/scans", result_set(rows))
    site.json(f"{EXPT_PATH}/scans/ALL/files", {"ResultSet": {"Result": [], "title": "Files"}})
    client.login()
    scans = client.list_scans(EXP)
    assert [s.id for s in scans] == ["1", "1-MR1", "1.2", "1a", "2", "10", "SCOUT"]
    # Recorded without any of them: the deep plan names each one added, whatever order it is given them in.
    recorded = SessionRecord(EXP.id, EXP.project, EXP.subject_id, EXP.subject_label, EXP.label, "SUBJ01", "MR1",
                             EXP.date, "", "", EXP.xsi_type, "2024-01-11T00:00:00Z", "")
    remote = RemoteState((ProjectListing("PROJ", (EXP,)),), deep={EXP.id: tuple(reversed(scans))})
    plan = compute_plan(Lock.new().with_session(recorded), remote, LocalState({}), Config())
    (change,) = plan.changes
    assert [r.field for r in change.reasons if r.code == "scan_added"] == [f"scan:{s.id}" for s in scans]


@pytest.mark.parametrize("listing", ["scans", "experiments"])
def test_a_listing_with_fewer_rows_than_it_counts_is_an_error_not_removals(site: Site, client: XnatClient,
                                                                           listing: str) -> None:
    # A cut answer would read as scans removed (apply --deep would convert without them).
    rows = scan_rows()[:2] if listing == "scans" else [{"ID": "SITE_E00001", "label": "S_MR1"}]
    path = f"{EXPT_PATH}/scans" if listing == "scans" else "/data/projects/PROJ/experiments"
    site.json(path, {"ResultSet": {"Result": rows, "totalRecords": "8"}})
    site.json(f"{EXPT_PATH}/scans/ALL/files", {"ResultSet": {"Result": [], "title": "Files"}})
    with pytest.raises(RemoteError) as info:
        client.list_scans(EXP) if listing == "scans" else client.list_experiments("PROJ")
    assert info.value.summary.startswith(f"XNAT at {site.url} sent an incomplete listing of the {listing} of ")
    assert info.value.detail == f"{len(rows)} rows where it counts 8 (totalRecords)"


def test_rows_with_malformed_values_can_be_set_aside_one_by_one(site: Site, client: XnatClient) -> None:
    rows = [{"ID": f"SITE_E0000{i}", "label": f"S{i}_MR1", "subject_label": f"S{i}", "date": date,
             "xsiType": "xnat:mrSessionData"} for i, date in enumerate(("2024-01-10", "garbage", "2024-02-30"))]
    site.json("/data/projects/PROJ/experiments", result_set(rows))
    with pytest.raises(RemoteError, match="with a malformed value"):
        client.list_experiments("PROJ")  # as one listing: its error
    malformed: list = []
    assert [e.id for e in client.list_experiments("PROJ", malformed)] == ["SITE_E00000"]
    assert [(m.id, m.label, m.message) for m in malformed] == [
        ("SITE_E00001", "S1_MR1", "not an XNAT date: 'garbage'"),
        ("SITE_E00002", "S2_MR1", "not a date on the calendar: '2024-02-30'")]


def test_session_without_subject_uses_the_experiment_path(site: Site, client: XnatClient) -> None:
    site.json("/data/experiments/SITE_E00001/scans", result_set([]))
    exp = Experiment("SITE_E00001", "X", "PROJ", "", "", None, None, None)
    assert client.list_scans(exp) == []


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "a/../../b", "..", "a\\b.dcm", "a\x00b", "/etc/passwd", "a/./b", "a//b"],
)
def test_unsafe_file_names_are_refused(site: Site, client: XnatClient, name: str) -> None:
    serve_session(site, [file_row("2", "ok.dcm"), file_row("2", name)])
    with pytest.raises(UnsafePathError):
        client.list_scans(EXP)


def test_percent_signs_in_a_listed_name_are_part_of_the_name(site: Site, client: XnatClient) -> None:
    """XNAT does not percent-encode the names in its URIs: `%2F` is three characters of a name."""
    serve_session(site, [file_row("2", "%2Fetc%2Fpasswd"), file_row("2", "a%00b")])
    scan = next(s for s in client.list_scans(EXP) if s.id == "2")
    assert sorted(f.name for f in scan.files) == ["%2Fetc%2Fpasswd", "a%00b"]
    assert {f.uri.rpartition("/files/")[2] for f in scan.files} == {"%252Fetc%252Fpasswd", "a%2500b"}


@pytest.mark.parametrize("size, message", [
    ("big", "XNAT listed file a.dcm in .* with a malformed size"),
    ("", "lists file a.dcm in .* without a size: the file may be missing on the server"),
])
def test_a_malformed_or_missing_size_is_a_remote_error(site: Site, client: XnatClient, size: str, message: str) -> None:
    row = file_row("2", "a.dcm")
    row["Size"] = size
    serve_session(site, [row])
    with pytest.raises(RemoteError, match=message):
        client.list_scans(EXP)


def experiments(n: int) -> list[Experiment]:
    return [
        Experiment(f"SITE_E{i:05d}", f"S{i}_MR1", "PROJ", f"SITE_S{i:05d}", f"S{i}", "2024-01-10", None, None)
        for i in range(n)
    ]


def serve_many(site: Site, exps: list[Experiment], delay: float = 0.0, hold_until: int = 0) -> dict[str, int]:
    """Serve the scans and file listings of `exps`; the returned counts say how many requests were
    in flight at most. With `hold_until`, the first requests wait (up to 30 s) until that many are
    in flight at once, so the count does not depend on how the threads happen to overlap."""
    live = {"now": 0, "max": 0}
    lock = threading.Lock()
    enough = threading.Event()
    if not hold_until:
        enough.set()

    for i, exp in enumerate(exps):
        base = f"/data/projects/PROJ/subjects/{exp.subject_id}/experiments/{exp.id}"
        scans = json.dumps(result_set([{"ID": str(k), "type": f"T{k}", "series_description": f"d{i}", "URI": ""}
                                       for k in range(1, (i % 3) + 2)]))
        files = json.dumps({"ResultSet": {"Result": [
            {**file_row(str(k), f"{i}_{k}.dcm", i + k), "URI": f"{base}/scans/{k}/resources/1/files/{i}_{k}.dcm"}
            for k in range(1, (i % 3) + 2)]}})

        def body(text: str) -> Callable[[Request], Response]:
            def handler(request: Request) -> Response:
                with lock:
                    live["now"] += 1
                    live["max"] = max(live["max"], live["now"])
                    if live["now"] >= hold_until:
                        enough.set()
                enough.wait(30)  # a guard against hanging, not a bound on speed
                time.sleep(delay)
                with lock:
                    live["now"] -= 1
                return Response(text, content_type="application/json")
            return handler

        site.server.expect_request(f"{base}/scans").respond_with_handler(site.authed(body(scans)))
        site.server.expect_request(f"{base}/scans/ALL/files").respond_with_handler(site.authed(body(files)))
    return live


def test_deep_details_concurrent_equals_sequential(threaded_site: Site) -> None:
    site = threaded_site
    exps = experiments(12)
    serve_many(site, exps, delay=0.01)
    progress: list[tuple[str, int, int]] = []
    with make_client(site.url) as client:
        sequential = client.deep_details(exps, concurrency=1)
        concurrent = client.deep_details(
            exps, concurrency=6, on_progress=lambda e, d, t: progress.append((e.id, d, t))
        )
    assert concurrent == sequential
    assert list(concurrent) == [e.id for e in exps]
    assert sorted(p[1] for p in progress) == list(range(1, 13)) and {p[2] for p in progress} == {12}
    assert sequential["SITE_E00002"][2].files[0].name == "2_3.dcm"
    assert site.logins == 1


@pytest.fixture
def threaded_site() -> Iterator[Site]:
    # pytest-httpserver serves one request at a time by default; concurrency needs threads.
    server = HTTPServer(threaded=True)
    server.start()
    try:
        yield Site(server)
    finally:
        server.clear()
        if server.is_running():
            server.stop()


def test_concurrent_401s_after_expiry_relogin_once(threaded_site: Site) -> None:
    site = threaded_site
    exps = experiments(12)
    serve_many(site, exps, delay=0.01)
    with make_client(site.url) as client:
        first = client.deep_details(exps, concurrency=6)
        site.expire_sessions()
        assert client.deep_details(exps, concurrency=6) == first
    assert site.logins == 2


def test_credentials_refused_at_a_relogin_are_sent_once_not_by_every_request_in_flight(threaded_site: Site) -> None:
    """XNAT locks an account after 20 failed logins (maxFailedLogins): the requests in flight
    when the password changed must not each try it again."""
    site = threaded_site
    exps = experiments(12)
    serve_many(site, exps, delay=0.05)
    with make_client(site.url, max_connections=6) as client:
        client.deep_details(exps[:1])
        assert site.logins == 1
        site.password = "changed by the user on XNAT"
        site.expire_sessions()
        with pytest.raises(AuthError, match="rejected the credentials"):
            client.deep_details(exps, concurrency=6)
        with pytest.raises(AuthError):  # and later requests of this client do not try again either
            client.list_scans(exps[0])
    assert site.logins == 2


def test_max_connections_caps_concurrent_requests(threaded_site: Site) -> None:
    site = threaded_site
    exps = experiments(10)
    live = serve_many(site, exps, delay=0.05, hold_until=3)
    with make_client(site.url, max_connections=3) as c:
        c.deep_details(exps, concurrency=10)
    assert live["max"] == 3  # three at once were reached, and never more


def test_deep_details_raises_the_first_failure(site: Site, client: XnatClient) -> None:
    exps = experiments(4)
    serve_many(site, exps[:3])
    site.raw(f"/data/projects/PROJ/subjects/{exps[3].subject_id}/experiments/{exps[3].id}/scans",
             RESTLET_404, status=404)
    with pytest.raises(NotFoundError, match="S3_MR1"):
        client.deep_details(exps, concurrency=4)


# ---------------------------------------------------------------------------- streaming & misc


def test_stream_yields_the_body_and_passes_range_headers(site: Site, client: XnatClient) -> None:
    payload = bytes(range(256)) * 100
    uri = f"{EXPT_PATH}/scans/2/resources/101/files/a.dcm"

    def handler(request: Request) -> Response:
        rng = request.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            return Response(payload[start:], status=206, content_type="application/octet-stream")
        return Response(payload, content_type="application/octet-stream")

    site.server.expect_request(uri).respond_with_handler(site.authed(handler))
    with client.stream(uri) as resp:
        assert resp.status_code == 200
        assert read_body(resp, 4096) == payload
    with client.stream(uri, headers={"Range": "bytes=100-"}) as resp:
        assert resp.status_code == 206
        assert read_body(resp, 4096) == payload[100:]


def test_stream_gives_what_came_without_waiting_for_a_full_buffer(site: Site, client: XnatClient) -> None:
    # A server trickling bytes: export checks for Ctrl-C between reads, so a read must not wait
    # until its 256 KiB buffer fills (days at a byte a second).
    uri = f"{EXPT_PATH}/scans/2/resources/101/files/slow.dcm"

    def trickle(request: Request) -> Response:
        def body() -> Iterator[bytes]:
            for _ in range(40):
                yield b"x"
                time.sleep(0.05)
        return Response(body(), headers={"Content-Length": str(1 << 20)}, direct_passthrough=True)

    site.server.expect_request(uri).respond_with_handler(site.authed(trickle))
    with client.stream(uri) as resp:
        n = resp.readinto(bytearray(256 << 10))
    assert 1 <= n < 40  # before the trickle ended (it then closes the connection short of its length)


def test_stream_retries_503_then_reports_404(site: Site, client: XnatClient) -> None:
    uri = f"{EXPT_PATH}/scans/2/resources/101/files/gone.dcm"
    site.server.expect_oneshot_request(uri).respond_with_data("busy", status=503)
    site.raw(uri, "<html><h3>Unable to find file.</h3></html>", status=404)
    with pytest.raises(NotFoundError, match="Unable to find file"):
        with client.stream(uri):
            pass
    assert len(site.requests_to(uri)) == 2


def test_stream_cut_short_is_a_remote_error() -> None:
    def script(method: str, path: str) -> Any:
        return b"RAW1" if path == "/data/services/auth" else ("truncate", b"x" * 5000)

    server = RawServer(script)
    try:
        with make_client(server.url) as c:
            with pytest.raises(RemoteError, match="cut short"):
                with c.stream("/data/experiments/E/scans/1/resources/1/files/a.dcm") as resp:
                    read_body(resp, 1024)
    finally:
        server.close()


def test_stream_refuses_another_server(client: XnatClient) -> None:
    with pytest.raises(RemoteError, match="another server"):
        with client.stream("https://evil.example.org/data/x"):
            pass


def test_stream_slots_are_released(site: Site) -> None:
    uri = "/data/experiments/E/scans/1/resources/1/files/a.dcm"
    site.raw(uri, b"abc", content_type="application/octet-stream")
    site.raw(uri + ".missing", "<html><h3>Unable to find file.</h3></html>", status=404)
    with make_client(site.url, max_connections=1) as c:
        for _ in range(3):
            with c.stream(uri) as resp:
                assert read_body(resp, 2) == b"abc"
        with pytest.raises(NotFoundError):
            with c.stream(uri + ".missing"):
                pass
        site.json(EXPERIMENTS_PATH, result_set([]))
        assert c.list_experiments("PROJ") == []  # would hang if a slot leaked


@pytest.mark.parametrize("status", [404, 405, 501])
def test_a_url_where_no_xnat_answers_the_login_is_said_with_the_base_url_hint(httpserver: HTTPServer, status: int) -> None:
    # 501 is what a plain web server (python -m http.server) answers a PUT with.
    httpserver.expect_request("/data/services/auth", method="PUT").respond_with_data("Error response", status=status)
    with pytest.raises(RemoteError) as info, make_client(httpserver.url_for("/")) as c:
        c.list_experiments("PROJ")
    assert info.value.summary == f"no XNAT login service at {httpserver.url_for('/').rstrip('/')}"
    assert "give the XNAT base URL" in (info.value.hint or "")


@pytest.mark.parametrize("suffix", ["", "/"])
def test_base_url_with_prefix_and_trailing_slash(httpserver: HTTPServer, suffix: str) -> None:
    httpserver.expect_request("/xnat/data/services/auth", method="PUT").respond_with_data("SIDX")
    httpserver.expect_request(f"/xnat{EXPERIMENTS_PATH}").respond_with_json(result_set([exp_row()]))
    httpserver.expect_request("/xnat/data/projects/PROJ/experiments/E1").respond_with_json({"items": []})
    httpserver.expect_request("/xnat/data/JSESSION", method="DELETE").respond_with_data("")
    url = httpserver.url_for("/xnat") + suffix
    with make_client(url) as c:
        assert c.url == httpserver.url_for("/xnat")
        assert len(c.list_experiments("PROJ")) == 1
        assert c.get_json("/data/projects/PROJ/experiments/E1") == {"items": []}
        assert c.get_json("/xnat/data/projects/PROJ/experiments/E1") == {"items": []}


def test_get_json_adds_format_and_params(site: Site, client: XnatClient) -> None:
    site.json("/data/experiments", result_set([]))
    assert client.get_json("/data/experiments", xsiType="xnat:mrSessionData") == result_set([])
    (req,) = site.requests_to("/data/experiments")
    assert req.args["format"] == "json" and req.args["xsiType"] == "xnat:mrSessionData"


def test_on_request_hook_sees_every_attempt(site: Site) -> None:
    seen: list[tuple[str, str]] = []
    site.server.expect_oneshot_request(EXPERIMENTS_PATH).respond_with_data("busy", status=503)
    site.json(EXPERIMENTS_PATH, result_set([]))
    with make_client(site.url, on_request=lambda m, u: seen.append((m, u))) as c:
        c.list_experiments("PROJ")
        assert c.request_count == 3
    assert [m for m, _ in seen] == ["PUT", "GET", "GET", "DELETE"]


def test_tls_verification_is_on_by_default(site: Site) -> None:
    assert make_client(site.url).verify is True


def test_secret_never_in_client_repr_or_errors(site: Site) -> None:
    c = make_client(site.url)
    assert SENTINEL not in repr(c) and SENTINEL not in repr(c.credentials)
    site.raw(EXPERIMENTS_PATH, RESTLET_404, status=404)
    errors: list[XnatBidsError] = []
    for call in (lambda: c.list_experiments("PROJ"), lambda: c.list_scans(EXP)):
        try:
            call()
        except XnatBidsError as exc:
            errors.append(exc)
    assert len(errors) == 2
    for exc in errors:
        assert_no_secret(exc)


def test_url_credentials_are_dropped() -> None:
    c = XnatClient(f"https://bob:{SENTINEL}@xnat.example.org/xnat/", Credentials(USER, "p", "env"))
    assert c.url == "https://xnat.example.org/xnat" and SENTINEL not in repr(c)


@pytest.mark.parametrize(
    ("url", "shown", "detail"),
    [
        (f"https://alice:{SENTINEL}@:8443/xnat", "https://:8443/xnat", "no host"),
        (f"https://alice:{SENTINEL}@xnat.example.org:99999", "https://xnat.example.org:99999", "port"),
        (f"https://alice:{SENTINEL}@xnat.example.org:0", "https://xnat.example.org:0", "port"),
        (f"https://alice:pa/{SENTINEL}@xnat.example.org", "https://xnat.example.org", "port"),  # port 'pa'
        (f"https://alice:12/{SENTINEL}@xnat.example.org", "https://xnat.example.org", "'@' after the host"),
        (f"alice:{SENTINEL}@xnat.example.org", "xnat.example.org", "scheme"),
        (f"https://alice:{SENTINEL}@[::1/xnat", "https://[::1/xnat", "IPv6"),
    ],
    ids=["no-host", "port-too-big", "port-0", "slash-in-password", "digits-slash-password", "no-scheme", "ipv6"],
)
def test_bad_url_is_a_config_error_that_never_shows_the_password(url: str, shown: str, detail: str) -> None:
    with pytest.raises(ConfigError) as info:
        XnatClient(url, Credentials(USER, "p", "env"))
    assert info.value.summary == f"not an XNAT URL: {shown!r}"
    assert detail in (info.value.detail or "")
    assert info.value.hint is not None and "base URL" in info.value.hint
    assert_no_secret(info.value)


def test_ipv6_host_keeps_its_brackets() -> None:
    with XnatClient("http://[::1]:8080/xnat/", Credentials(USER, "p", "env")) as c:
        assert c.url == "http://[::1]:8080/xnat"


def test_refused_uri_to_another_server_does_not_show_its_password(client: XnatClient) -> None:
    with pytest.raises(RemoteError) as info, client.stream(f"https://bob:{SENTINEL}@evil.example.org/data/x?token=1"):
        pass
    assert info.value.summary == "refusing to follow a URI to another server: https://evil.example.org/data/x"
    assert_no_secret(info.value)


# ---------------------------------------------------------------------------- TLS


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "insecure"])
def test_https_to_a_plain_http_port_is_a_handshake_failure(site: Site, verify: bool) -> None:
    url = site.url.replace("http://", "https://", 1)
    with make_client(url, verify=verify) as c, pytest.raises(RemoteError) as info:
        c.login()
    err = info.value
    assert err.summary == f"TLS handshake with {url} failed"
    assert err.hint is not None and "may not speak https" in err.hint and "http://" in err.hint
    assert "verification" not in str(err) and "--insecure" not in str(err)
    assert site.logins == 0


@pytest.fixture
def tls_site(tmp_path: Path) -> Iterator[Site]:
    """Site over https with a self-signed certificate for localhost (made by the openssl command)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = HTTPServer(host="localhost", port=0, ssl_context=context)
    server.start()
    try:
        yield Site(server)
    finally:
        server.clear()
        server.stop()


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_untrusted_certificate_blames_verification_only_while_it_is_on(
    tls_site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    with make_client(tls_site.url) as c, pytest.raises(RemoteError) as info:
        c.login()
    assert info.value.summary == f"TLS verification failed for {tls_site.url}"
    assert "self-signed" in (info.value.detail or "")
    assert info.value.hint is not None and "--insecure" in info.value.hint
    with make_client(tls_site.url, verify=False) as c:
        c.login()
    assert tls_site.logins == 1


def _assert_redirects_refused(site: Site, location: str, why: str, **client_options: Any) -> None:
    """A listing and a download that `site` redirects to `location` fail, the hint saying `why`."""
    for path in ("/data/projects", "/data/files/1.dcm"):
        site.server.expect_request(path).respond_with_handler(site.authed(
            lambda r: Response("", status=302, headers={"Location": location})))
    with make_client(site.url, **client_options) as c:
        c.login()
        with pytest.raises(RemoteError) as info:
            c.get_json("/data/projects")
        assert info.value.summary == f"XNAT at {site.url} redirected /data/projects to {location}; not followed"
        assert why in (info.value.hint or "")
        with pytest.raises(RemoteError, match="redirected the download of /data/files/1.dcm to .*; not followed"):
            with c.stream("/data/files/1.dcm"):
                pass


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_an_https_xnat_redirecting_to_plain_http_is_not_followed(tls_site: Site, httpserver: HTTPServer) -> None:
    # requests would send the session cookie along, unencrypted: the answer is an error instead.
    httpserver.expect_request(re.compile(".*")).respond_with_data("PLAIN")
    plain = httpserver.url_for("/data/x").replace("localhost", "127.0.0.1")
    _assert_redirects_refused(tls_site, plain, "session cookie", verify=False)
    assert httpserver.log == []  # nothing, cookie or not, went over plain http


def test_a_redirect_to_another_port_of_the_same_host_is_not_followed(site: Site) -> None:
    # Cookies go by host name, not port: followed, the session cookie would reach whatever listens
    # there (another user's server on a shared login node).
    other = HTTPServer(host=urlsplit(site.url).hostname, port=0)
    other.start()
    try:
        other.expect_request(re.compile(".*")).respond_with_data("OTHER")
        elsewhere = other.url_for("/data/x")
        _assert_redirects_refused(site, elsewhere, "another port")
        assert other.log == []
    finally:
        other.clear()
        other.stop()


def test_a_stop_ends_the_retries_with_cancelled_instead_of_waiting_them_out(site: Site) -> None:
    # A busy XNAT answering 503 (or not at all) would hold a Ctrl-C for minutes of retries.
    site.raw("/data/projects", "busy", status=503)
    stop = threading.Event()
    with make_client(site.url, retries=4) as c:
        c.login()
        c.stop_when(stop)
        c.on_request = lambda method, url: stop.set()  # the stop comes while the first attempt is under way
        with pytest.raises(Cancelled, match="stopped while retrying a request to XNAT"):
            c.get_json("/data/projects")
        assert len(site.requests_to("/data/projects")) == 1  # no retry after the stop
        c.on_request = None
        c.stop_when(None)
        with pytest.raises(RemoteError, match="kept failing"):
            c.get_json("/data/projects")
        assert len(site.requests_to("/data/projects")) == 1 + 5


# ---------------------------------------------------------------------------- against the emulator

def _emulator_fault(route: str, kind: str, **kw: Any) -> Any:
    from reconcile.emulator.faults import Fault

    return Fault(route=route, kind=kind, **kw)


def emu_client(emulator: Any, **kw: Any) -> XnatClient:
    kw.setdefault("backoff", 0.0)
    kw.setdefault("timeout", 5.0)
    return XnatClient(emulator.url, Credentials(emulator.user, emulator.password, "env"), **kw)


def populate(archive: Any, n: int = 3) -> list[Any]:
    sessions = []
    for i in range(1, n + 1):
        exp = archive.add_session("PROJ", f"SUBJ{i:02d}", f"SUBJ{i:02d}_MR1", date=f"2024-01-{i:02d}")
        archive.add_scan(exp.id, "1", type="localizer", series_description="loc",
                         files={"1.dcm": b"a" * i, "2.dcm": b"bb"})
        archive.add_scan(exp.id, "2", type="T1w", series_description="MPRAGE", files={"1.dcm": b"t1" * i})
        sessions.append(exp)
    return sessions


def auth_requests(emulator: Any) -> list[tuple[str, str, str]]:
    return [r for r in emulator.app.requests if r[1].endswith("/services/auth")]


def test_emulator_listing_and_deep_details(emulator: Any) -> None:
    made = populate(emulator.archive, 3)
    emulator.archive.add_session("PROJ", "SUBJ09", "SUBJ09_MR1")  # no date, no scans
    with emu_client(emulator) as c:
        exps = c.list_experiments("PROJ")
        assert {e.id for e in exps} == {m.id for m in made} | {exps[-1].id}
        by_label = {e.label: e for e in exps}
        first = by_label["SUBJ01_MR1"]
        assert first.project == "PROJ" and first.subject_label == "SUBJ01" and first.date == "2024-01-01"
        assert isinstance(first.insert_date, datetime) and isinstance(first.last_modified, datetime)
        assert by_label["SUBJ09_MR1"].date is None
        sequential = c.deep_details(exps, concurrency=1)
        concurrent = c.deep_details(exps, concurrency=4)
    assert sequential == concurrent
    scans = sequential[first.id]
    assert [(s.id, s.type, s.series_description) for s in scans] == [("1", "localizer", "loc"), ("2", "T1w", "MPRAGE")]
    assert [(f.name, f.size, f.resource) for f in scans[0].files] == [("1.dcm", 1, "DICOM"), ("2.dcm", 2, "DICOM")]
    assert scans[0].files[0].digest == "0cc175b9c0f1b6a831c399e269772661"  # md5(b"a")
    assert sequential[by_label["SUBJ09_MR1"].id] == ()
    assert len(auth_requests(emulator)) == 1


def test_emulator_list_experiments_is_one_request(emulator: Any) -> None:
    populate(emulator.archive, 2)
    with emu_client(emulator) as c:
        c.login()
        emulator.app.reset_requests()
        c.list_experiments("PROJ")
        assert len(emulator.app.requests) == 1
        method, path, query = emulator.app.requests[0]
        assert (method, path) == ("GET", "/data/projects/PROJ/experiments") and "format=json" in query


def test_emulator_unknown_and_forbidden_projects(emulator: Any) -> None:
    emulator.archive.add_project("OTHER")
    emulator.archive.add_user("bob", SENTINEL, projects=["PROJ"])
    with emu_client(emulator) as c:
        with pytest.raises(NotFoundError) as info:
            c.list_experiments("NOPE")
    assert info.value.summary == f"project NOPE not found on XNAT or not visible to user {emulator.user}"
    with XnatClient(emulator.url, Credentials("bob", SENTINEL, "env"), backoff=0) as bob:
        with pytest.raises(AuthError) as denied:
            bob.list_experiments("OTHER")
    assert_no_secret(denied.value)


def test_emulator_bad_password(emulator: Any) -> None:
    with XnatClient(emulator.url, Credentials(emulator.user, SENTINEL, "env"), backoff=0) as c:
        with pytest.raises(AuthError) as info:
            c.list_experiments("PROJ")
    assert info.value.summary == f"XNAT rejected the credentials for user {emulator.user} at {emulator.url}"
    assert_no_secret(info.value)


def test_emulator_alias_token_login(emulator: Any) -> None:
    populate(emulator.archive, 1)
    token = emulator.app.issue_token(emulator.user)
    with XnatClient(emulator.url, Credentials(token["alias"], token["secret"], "token-file"), backoff=0) as c:
        assert len(c.list_experiments("PROJ")) == 1
        c.list_experiments("PROJ")
    basic = [r for r in emulator.app.requests if r[1] == "/data/JSESSION" and r[0] == "GET"]
    assert len(basic) == 1 and auth_requests(emulator) == []


def test_emulator_session_timeout_relogs_in_once(emulator: Any) -> None:
    populate(emulator.archive, 1)
    with emu_client(emulator) as c:
        c.list_experiments("PROJ")
        real_clock = emulator.app.wall_clock
        emulator.app.wall_clock = lambda: real_clock() + 24 * 3600  # every session is now idle too long
        assert len(c.list_experiments("PROJ")) == 1
    assert len(auth_requests(emulator)) == 2


def test_emulator_credentials_revoked_is_an_auth_error(emulator: Any) -> None:
    populate(emulator.archive, 1)
    with emu_client(emulator) as c:
        c.list_experiments("PROJ")
        emulator.app.faults.add(_emulator_fault(r"/experiments$", "auth_expire", times=1))
        with pytest.raises(AuthError):
            c.list_experiments("PROJ")
    assert len(auth_requests(emulator)) == 2


@pytest.mark.parametrize(
    "kind, extra",
    [("status", {"status": 503}), ("reset", {}), ("truncate", {"fraction": 0.5}), ("status", {"status": 502})],
)
def test_emulator_transient_faults_are_retried(emulator: Any, kind: str, extra: dict[str, Any]) -> None:
    populate(emulator.archive, 2)
    listing = emulator.app.faults.add(_emulator_fault(r"/experiments$", kind, times=2, **extra))
    files = emulator.app.faults.add(_emulator_fault(r"/scans/ALL/files$", kind, times=2, **extra))
    with emu_client(emulator) as c:
        exps = c.list_experiments("PROJ")
        details = c.deep_details(exps, concurrency=2)
    assert (listing.fired, files.fired) == (2, 2)  # the faults did hit, and were retried through
    assert len(exps) == 2 and all(len(scans) == 2 for scans in details.values())


def test_emulator_retries_exhausted(emulator: Any) -> None:
    emulator.app.faults.add(_emulator_fault(r"/experiments$", "status", status=503))
    with emu_client(emulator, retries=2) as c:
        with pytest.raises(RemoteError, match="kept failing"):
            c.list_experiments("PROJ")
    assert sum(1 for r in emulator.app.requests if r[1] == "/data/projects/PROJ/experiments") == 3


def test_emulator_html_200_and_invalid_json(emulator: Any) -> None:
    emulator.app.faults.add(_emulator_fault(r"/experiments$", "html_200", times=1, message="Maintenance window"))
    emulator.app.faults.add(_emulator_fault(r"/experiments$", "invalid_json", times=1, after=1))
    with emu_client(emulator) as c:
        with pytest.raises(RemoteError, match="Maintenance window"):
            c.list_experiments("PROJ")
        with pytest.raises(RemoteError, match="invalid JSON"):
            c.list_experiments("PROJ")
        assert c.list_experiments("PROJ") == []


def test_emulator_unsafe_file_name(emulator: Any) -> None:
    (exp,) = populate(emulator.archive, 1)
    emulator.archive.upload_file(exp.id, "1", "DICOM", "../../escape.dcm", b"x")
    with emu_client(emulator) as c:
        (listed,) = c.list_experiments("PROJ")
        with pytest.raises(UnsafePathError):
            c.list_scans(listed)


def test_emulator_stream_download(emulator: Any) -> None:
    (exp,) = populate(emulator.archive, 1)
    with emu_client(emulator) as c:
        (listed,) = c.list_experiments("PROJ")
        scan = c.list_scans(listed)[1]
        with c.stream(scan.files[0].uri) as resp:
            assert resp.status_code == 200 and read_body(resp, 1024) == b"t1"
        busy = emulator.app.faults.add(_emulator_fault(r"/files/", "status", status=503, times=1))
        with c.stream(scan.files[0].uri) as resp:
            assert read_body(resp, 1024) == b"t1"
        assert busy.fired == 1  # the 503 came, and the download was retried past it
