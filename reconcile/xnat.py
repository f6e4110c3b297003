"""The tool's own XNAT client: one HTTP session, login, retries and parsing into `reconcile.model`.

This is the one HTTP boundary: every `requests` exception is translated here into
`RemoteError`/`AuthError`/`NotFoundError`, and XNAT's string-valued listings are parsed
into dataclasses, so nothing downstream sees `requests` or `ResultSet`. No disk I/O here.
"""

from __future__ import annotations

import html
import http.client
import json
import os
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Any
from urllib.parse import SplitResult, quote, quote_plus, urlencode, urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.cookies import create_cookie

from reconcile import keepalive
from reconcile.credentials import Credentials
from reconcile.errors import (
    AuthError,
    Cancelled,
    ConfigError,
    ForbiddenError,
    NotFoundError,
    RemoteError,
    UnsafePathError,
)
from reconcile.model import (
    CONTROL_CHARS,
    Experiment,
    MalformedRow,
    RemoteFile,
    Scan,
    natural_key,
    parse_date,
    parse_timestamp,
)

EXPERIMENT_COLUMNS = (
    "ID",
    "label",
    "project",
    "subject_ID",
    "subject_label",
    "date",
    "insert_date",
    "last_modified",
    "xsiType",
)
SCAN_COLUMNS = ("ID", "type", "series_description", "xsiType")

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
# Row URIs always carry the numeric resource id: …/scans/{id}/resources/{rid}/files/{relpath}
_FILE_URI = re.compile(r"/scans/([^/]+)/resources/([^/]+)/files/(.*)$", re.S)
_H3 = re.compile(r"<h3[^>]*>(.*?)</h3>", re.I | re.S)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TAG = re.compile(r"<[^>]+>")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")
_URL_HINT = "give the site's base URL, e.g. https://xnat.example.org; credentials never go into it"
_MAX_SLEEP = 30.0
# 5xx is transient on a busy Tomcat; 429 is a proxy asking us to slow down.
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
# Requests in flight at once (listings in `--deep`, file downloads). 16 measured 13.7x faster than
# one after another at 20 ms of latency (8: latency-bound at about 9x); XNAT's Tomcat serves 200
# requests at once by default, so 16 small GETs are still polite.
CONNECTIONS = 16
_TRANSIENT = (
    requests.ConnectionError,  # includes ConnectTimeout and connection resets
    requests.Timeout,  # ReadTimeout
    requests.exceptions.ChunkedEncodingError,  # body cut short
    requests.exceptions.ContentDecodingError,
)

OnRequest = Callable[[str, str], None]
OnProgress = Callable[[Experiment, int, int], None]


def is_alias_token(user: str) -> bool:
    """XNAT alias tokens are UUID4-shaped 'users'; they log in with one Basic-auth request."""
    return bool(_UUID.match(user))


def html_message(body: str) -> str | None:
    """The message of a Restlet/Tomcat HTML error page (its <h3>, else its <title>), if `body` is HTML."""
    head = body.lstrip()[:200].lower()
    if not (head.startswith("<!doctype") or head.startswith("<html")):
        return None
    for pattern in (_H3, _TITLE):
        m = pattern.search(body)
        if m:
            text = " ".join(html.unescape(_TAG.sub("", m.group(1))).split())
            if text:
                return text[:300]
    return "an HTML page instead of data"


def refuse_html_page(resp: StreamResponse, what: str, *, server: str) -> None:
    """A download answered 200 with an HTML page (a single-sign-on proxy's login page, a
    maintenance page) is an error saying so, not a file whose size or checksum is wrong."""
    if not str(resp.headers.get("Content-Type", "")).lower().startswith("text/html"):
        return
    buffer = memoryview(bytearray(1 << 16))
    n = 0
    while n < len(buffer) and (got := resp.readinto(buffer[n:])):  # its message may come late in the page
        n += got
    message = html_message(bytes(buffer[:n]).decode("utf-8", "replace")) or "an HTML page instead of data"
    raise RemoteError(
        f"XNAT at {server} (or a proxy in front of it) answered {what} with an HTML page: {message}",
        hint="a login page? check that xnat_url reaches XNAT itself and that the credentials work there; "
             "otherwise run again later",
    )


def check_relpath(name: str, *, where: str = "") -> str:
    """Refuse file names that could escape their directory once written below a BIDS root."""
    bad = (
        not name
        or name.startswith("/")
        or "\\" in name
        or CONTROL_CHARS.search(name) is not None
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(seg in ("..", ".", "") for seg in name.split("/"))
    )
    if bad:
        raise UnsafePathError(
            f"XNAT lists an unsafe file name {name!r}" + (f" in {where}" if where else ""),
            hint="file names must be relative paths without '..', '.', empty segments, backslashes or "
                 "control characters",
        )
    return name


_DEFAULT_PORTS = {"http": 80, "https": 443}


class _Session(requests.Session):
    """requests' session, but two redirects are not followed, for requests would send the session
    cookie along (cookies go by host name, whatever the scheme or port): from https to plain http
    (unencrypted), and to another port of the same host over plain http (another server, maybe
    another user's, on a shared machine). Up to https on the same host is followed. The 3xx answer
    is then the request's error."""

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if not target:
            return target
        here, there = urlsplit(resp.url), urlsplit(urljoin(resp.url, target))
        if here.scheme == "https" and there.scheme != "https":
            return None
        if there.scheme != "https" and there.hostname == here.hostname and \
                (there.port or _DEFAULT_PORTS.get(there.scheme)) != (here.port or _DEFAULT_PORTS.get(here.scheme)):
            return None
        return target


class _NoAuth(requests.auth.AuthBase):
    """Stops requests from adding Basic auth from ~/.netrc on every call (one server session each)."""

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        return r


class StreamResponse:
    """A streaming download: `.status_code`, `.headers`, `.url`, `.readinto(buffer)`.

    Wraps a `requests.Response` or a keep-alive `http.client` answer, so that errors while reading
    the body come out as RemoteError.
    """

    def __init__(
        self,
        url: str,
        status_code: int,
        headers: Any,
        direct: http.client.HTTPResponse | None,
        response: requests.Response | None = None,
    ):
        self.url = url
        self.status_code = status_code
        self.headers = headers  # case-insensitive `.get` in both kinds
        self._direct = direct
        self._response = response

    @classmethod
    def of_requests(cls, response: requests.Response) -> StreamResponse:
        fp = getattr(response.raw, "_fp", None)
        # Straight from http.client into the caller's buffer when the body is not content-encoded:
        # urllib3's read() allocates a fresh 1 MiB object per chunk, which cost about 10 % of a
        # 1 GiB download's CPU (page faults and the copy).
        plain = isinstance(fp, http.client.HTTPResponse) and not response.headers.get("Content-Encoding")
        return cls(response.url, response.status_code, response.headers, fp if plain else None, response)

    @classmethod
    def of_answer(cls, answer: keepalive.Answer) -> StreamResponse:
        return cls(answer.url, answer.status_code, answer.headers, answer.response)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Fill `buffer` with the next body bytes; returns how many, 0 once the body is complete.

        RemoteError when the connection breaks or closes before the announced length.
        """
        try:
            if self._direct is None:
                assert self._response is not None
                data = self._response.raw.read(len(buffer), decode_content=True)
                buffer[: len(data)] = data
                return len(data)
            n = _receive_once(self._direct, buffer)
        except (*_TRANSIENT, OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as exc:
            raise self._cut(type(exc).__name__) from exc
        if n == 0 and len(buffer):
            if self._direct.length:  # http.client returns 0 when the server closes early
                raise self._cut(f"connection closed {self._direct.length} bytes before the end")
            if self._response is not None:
                self._response._content_consumed = True  # complete: the connection may serve the next request
                self._response.raw.release_conn()
        return n

    def _cut(self, detail: str) -> RemoteError:
        return RemoteError(
            f"download of {shown_url(self.url)} was cut short",
            detail=detail,
            hint="run again; completed files are kept",
        )


def _no_such_name(exc: BaseException) -> bool:
    """Whether the resolver answered that the host name does not exist (not a passing failure)."""
    final = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, name)}
    seen: BaseException | None = exc
    for _ in range(10):  # requests → urllib3 → socket.gaierror, through args and causes
        if seen is None:
            return False
        if isinstance(seen, socket.gaierror):
            return seen.errno in final
        inner = next((a for a in getattr(seen, "args", ()) if isinstance(a, BaseException)), None)
        seen = seen.__cause__ or seen.__context__ or inner or getattr(seen, "reason", None)
    return False


# How long a streamed read goes on filling its buffer once bytes have come.
RECEIVE_WAIT = 0.2


def _receive_once(resp: http.client.HTTPResponse, buffer: memoryview | bytearray) -> int:
    """`resp.readinto(buffer)`, but returning once RECEIVE_WAIT has passed since the first bytes
    (at the next bytes after it): readinto waits until the buffer is full, so a server trickling a
    byte a second would hold a download, and the Ctrl-C it checks for between reads, for days. At full speed the buffer
    still fills (over TLS one socket read brings 16 KiB at most). A body of unknown length
    (chunked) is read as before."""
    if resp.chunked or resp.length is None or resp.fp is None:
        return resp.readinto(buffer)
    view = memoryview(buffer)[: resp.length]
    total, until = 0, None
    while total < len(view):
        n = resp.fp.readinto1(view[total:])
        if not n:
            break
        total += n
        now = time.monotonic()
        until = until or now + RECEIVE_WAIT
        if now >= until:
            break
    if len(view) and not total:
        resp.close()  # the server closed early: `length` tells how much is missing
    else:
        resp.length -= total
        if not resp.length:
            resp.close()  # the body is complete: the connection may serve the next request
    return total


def _text(value: Any) -> str:
    """A listing cell as text: XNAT's JSON is string-valued, but None and numbers occur."""
    return value if type(value) is str else ("" if value is None else str(value))


def _row_name(index: int, ident: str) -> str:
    return f"row {index}" + (f" (ID {ident!r})" if ident else "")


def shown_url(url: str) -> str:
    """A URL as messages show it: without its query and without a user:password@ before the host."""
    return _USERINFO.sub(r"\1", url.split("?", 1)[0])


def _shown_given_url(url: str) -> str:
    """The URL a user gave, for messages: all before its last '@' may be user:password (urlsplit
    even takes a password with a '/' in it for the path), so only the rest is shown."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    return scheme + sep + rest.rsplit("@", 1)[-1]


def base_url(url: str) -> tuple[str, str]:
    """(origin, path prefix) of XNAT's base URL, without any user:password@ in it.

    ConfigError when `url` is not one; the message never quotes the user:password@ part.
    """
    url = url.strip()
    shown = _shown_given_url(url)
    # The ValueErrors are dropped, not chained (not even as __context__): they may quote part of a password.
    parts: SplitResult | None
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed or malformed [IPv6] host
        parts = None
    if parts is None:
        raise ConfigError(f"not an XNAT URL: {shown!r}", detail="malformed [IPv6] host", hint=_URL_HINT)
    try:
        port = parts.port
    except ValueError:  # out of range or not a number
        port = 0  # as unusable as the port 0 itself
    problem = None
    if port == 0:
        problem = "the port must be a number from 1 to 65535"
    elif parts.scheme not in ("http", "https"):
        problem = "the scheme must be http or https"
    elif not parts.hostname:
        problem = "no host"
    elif "@" in parts.path + parts.query + parts.fragment:
        problem = "an '@' after the host (a user:password@ with '/', '?' or '#' in it?)"
    if problem:
        raise ConfigError(f"not an XNAT URL: {shown!r}", detail=problem, hint=_URL_HINT)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 address keeps its brackets
    return f"{parts.scheme}://{host}" + (f":{port}" if port else ""), parts.path.rstrip("/")


def _ssl_error(exc: BaseException) -> ssl.SSLError | None:
    """The `ssl` error under requests' and urllib3's wrappers (arguments, `reason`, causes), if any."""
    todo: list[BaseException] = [exc]
    seen: set[int] = set()
    while todo:
        err = todo.pop()
        if isinstance(err, ssl.SSLError):
            return err
        if id(err) in seen:
            continue
        seen.add(id(err))
        linked = (*err.args, getattr(err, "reason", None), err.__cause__, err.__context__)
        todo.extend(e for e in linked if isinstance(e, BaseException))
    return None


def _error_text(resp: requests.Response | keepalive.Answer, clean: Callable[[str], str] = lambda t: t) -> str:
    """The server's reason for an error status: an HTML page's <h3>, or a short plain-text body.
    `clean` sees the whole body first (a secret is masked before any cut could split it)."""
    try:
        body = clean(resp.text)
    except requests.RequestException:
        return ""
    message = html_message(body)
    if message is not None:
        return message
    body = " ".join(body.split())
    return body[:200] if body and not body.startswith(("{", "[")) else ""


_BASIC_CREDENTIAL = re.compile(r"(\bBasic\s+)[A-Za-z0-9+/=_-]{4,}", re.IGNORECASE)

class XnatClient:
    """A logged-in XNAT session: one cookie, bounded concurrency, retries, typed results."""

    def __init__(
        self,
        url: str,
        credentials: Credentials,
        *,
        verify: bool = True,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_connections: int = CONNECTIONS,
        on_request: OnRequest | None = None,
    ):
        # Never keep user:password@ from a URL; credentials come from `credentials` only.
        self._origin, self._prefix = base_url(url)
        self.url: str = self._origin + self._prefix
        self.credentials = credentials
        self.verify = verify
        self.timeout = timeout
        self.retries = max(0, retries)
        self.backoff = backoff
        self.max_connections = max(1, max_connections)
        self.on_request = on_request
        self.request_count = 0
        # Set (by apply, on Ctrl-C or SIGTERM): requests stop retrying, and none starts, raising
        # Cancelled; a slow XNAT would otherwise hold the stop for minutes of retries. `stop_when` sets it.
        self._stop: threading.Event | None = None

        self._http = _Session()
        self._http.auth = _NoAuth()
        # requests reads the environment (proxies, CA bundle) again on every call, scanning all of
        # os.environ twice: about 0.9 of the 2.6 ms of CPU a listing request cost. Every URL is on
        # this origin, so read it once, the way requests would, and pass the result with each call.
        self._http.trust_env = False
        self._proxies = requests.utils.get_environ_proxies(self._origin)
        self._verify: bool | str = verify
        if verify is True:
            self._verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        self._http.headers["User-Agent"] = "xnat2bids"
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.max_connections, max_retries=0)
        self._http.mount("http://", adapter)
        self._http.mount("https://", adapter)
        self._slots = threading.BoundedSemaphore(self.max_connections)
        # Logged-in GETs go through http.client when no proxy is in the way (see reconcile/keepalive.py).
        self._keepalive = (  # (the proxies may hold just a NO_PROXY list: {"no": ...})
            None if requests.utils.select_proxy(self._origin, self._proxies) else
            keepalive.KeepAlivePool(self._origin, verify=self._verify, timeout=timeout, max_idle=self.max_connections)
        )
        self._cookie_header: tuple[int, str] | None = None  # (login generation, Cookie header)
        self._count_lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._generation = 0  # bumped at every login, so concurrent 401s re-login only once
        self._refused: tuple[int, AuthError] | None = None  # the session generation whose re-login was refused
        self._logged_in = False
        self._closed = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> XnatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def who(self) -> str:
        """Who logs in, as messages say it: "user alice", or "an alias token", whose ID is half its
        secret and must not reach a log or the history."""
        user = self.credentials.user
        return "an alias token" if is_alias_token(user) else f"user {user}"

    def __repr__(self) -> str:
        return f"XnatClient(url={self.url!r}, {self.who})"

    def close(self) -> None:
        """End the server-side session (best effort) and release connections."""
        if self._closed:
            return
        self._closed = True
        if self._logged_in:
            try:
                # Ending the session frees a Tomcat session slot instead of waiting for the idle timeout.
                self._count("DELETE", self._url("/data/JSESSION"))
                self._http.delete(
                    self._url("/data/JSESSION"), timeout=min(self.timeout, 5.0), verify=self._verify,
                    proxies=self._proxies,
                )
            except requests.RequestException:
                pass
            self._logged_in = False
        if self._keepalive is not None:
            self._keepalive.close()
        self._http.close()

    # -- authentication --------------------------------------------------------------------
    def login(self) -> None:
        """Log in once and keep the JSESSIONID cookie; later requests send only the cookie."""
        if self._logged_in:  # fast path: no lock contention between workers once logged in
            return
        with self._auth_lock:
            if not self._logged_in:
                self._login_locked()

    def _login_locked(self) -> None:
        self._drop_session_cookie()
        user = self.credentials.user
        if is_alias_token(user):
            # One Basic-auth request creates the session; the reply's body is its ID.
            resp = self._send(
                "GET",
                self._url("/data/JSESSION"),
                auth=(user, self.credentials.password),
                what="the login",
            )
        else:
            resp = self._send(
                "PUT",
                self._url("/data/services/auth"),
                data={"username": user, "password": self.credentials.password},
                what="the login",
            )
        if resp.is_redirect:
            where = shown_url(urljoin(resp.url, resp.headers.get("Location", "")))
            raise RemoteError(
                f"XNAT at {self.url} redirected the login to {where}; the credentials were not sent there",
                detail=f"HTTP {resp.status_code}",
                hint="set xnat_url (or $XNAT_HOST) to the address XNAT answers at, if that is it",
            )
        if resp.status_code in (401, 403):
            hint = self.credentials.rejected_hint()
            if is_alias_token(user) and self.credentials.source not in ("token-file", "batch-token"):
                hint = f"the alias token may have expired (issue a new one); otherwise {hint}"
            raise AuthError(f"XNAT rejected the credentials for {self.who} at {self.url}", hint=hint)
        if resp.status_code in (404, 405, 501):  # 501: a web server that takes no PUT at all
            raise RemoteError(
                f"no XNAT login service at {self.url}",
                detail=f"HTTP {resp.status_code} for {shown_url(resp.url)}",
                hint="give the XNAT base URL, e.g. https://xnat.example.org or https://host/xnat",
            )
        self._raise_for_status(resp, what="the login")
        body = resp.text.strip()
        if html_message(body) is not None:
            raise RemoteError(
                f"XNAT at {self.url} answered the login with an HTML page",
                detail=self._without_secret(html_message(self._without_secret(body)) or ""),
                hint="is the URL the XNAT base URL (without /app/...)?",
            )
        if "JSESSIONID" not in self._http.cookies:
            if not body or len(body) > 200 or any(c.isspace() for c in body):
                raise RemoteError(f"XNAT at {self.url} did not return a session after login")
            # XNAT puts the session ID in the body; some proxies drop Set-Cookie.
            hostname = urlsplit(self._origin).hostname or ""
            # http.cookiejar matches dotless hosts (localhost) as "host.local", as it would a Set-Cookie.
            domain = hostname if "." in hostname else f"{hostname}.local"
            self._http.cookies.set_cookie(create_cookie("JSESSIONID", body, domain=domain, path="/"))
        self._generation += 1
        self._logged_in = True

    def _drop_session_cookie(self) -> None:
        for cookie in list(self._http.cookies):
            if cookie.name == "JSESSIONID":
                self._http.cookies.clear(cookie.domain, cookie.path, cookie.name)

    def _relogin(self, seen_generation: int) -> None:
        with self._auth_lock:
            refused = self._refused
            if refused is not None and refused[0] == seen_generation:
                # Another request's re-login was refused: XNAT locks an account after a number of
                # failed logins (20 by default), so the credentials are not sent again.
                raise AuthError(refused[1].summary, detail=refused[1].detail, hint=refused[1].hint)
            if self._generation == seen_generation:  # nobody re-logged in meanwhile
                try:
                    self._login_locked()
                except AuthError as exc:
                    self._refused = (seen_generation, exc)
                    raise

    # -- transport -------------------------------------------------------------------------
    def _url(self, path: str) -> str:
        """Absolute URL for an XNAT path (as in listing URIs, which are relative to the web app)."""
        if "://" in path:
            parts = urlsplit(path)
            if f"{parts.scheme}://{parts.netloc}".lower() != self._origin.lower():
                raise RemoteError(f"refusing to follow a URI to another server: {shown_url(path)}")
            return path
        if not path.startswith("/"):
            path = "/" + path
        if self._prefix and (path == self._prefix or path.startswith(self._prefix + "/")):
            return self._origin + path
        return self.url + path

    def _count(self, method: str, url: str) -> None:
        with self._count_lock:
            self.request_count += 1
        if self.on_request is not None:
            self.on_request(method, url)

    def stop_when(self, event: threading.Event | None) -> None:
        """Once `event` is set (None: never), send no further attempt: Cancelled instead. The
        attempt under way ends at its timeout at the latest."""
        self._stop = event

    def _sleep(self, attempt: int, resp: requests.Response | keepalive.Answer | None) -> None:
        """Wait before a retry; Cancelled instead when the run is being stopped."""
        delay = self.backoff * (2**attempt)
        delay += random.uniform(0, delay / 2)  # jitter: parallel workers must not retry in lockstep
        if resp is not None:
            after = resp.headers.get("Retry-After", "")
            if after.isdigit():
                delay = max(delay, float(after))
        delay = min(max(delay, 0), _MAX_SLEEP)
        if self._stop is None:
            time.sleep(delay)
        elif self._stop.wait(delay):
            raise Cancelled(f"stopped while retrying a request to XNAT at {self.url}")

    def _send(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, Any] | None = None,
        data: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        stream: bool = False,
        what: str = "",
    ) -> requests.Response | keepalive.Answer:
        """One logical request with retries on transient failures. Raises RemoteError when they run out.

        A streamed response is returned with its semaphore slot still held (see `stream`).
        """
        for attempt in range(self.retries + 1):
            resp: requests.Response | keepalive.Answer | None = None
            self._slots.acquire()
            if self._stop is not None and self._stop.is_set():  # asked for, or waited for a slot, during the stop
                self._slots.release()
                raise Cancelled(f"stopped before a request to XNAT at {self.url}")
            try:
                self._count(method, url)
                lane = self._lane(method, url, params, data, headers, auth, stream)
                resp = lane if lane is not None else self._http.request(
                    method,
                    url,
                    params=params,
                    data=data,
                    headers=headers,
                    auth=auth,
                    timeout=self.timeout,
                    verify=self._verify,
                    proxies=self._proxies,
                    stream=stream,
                    # requests re-sends a 307/308's body to wherever it points, other hosts and
                    # plain http included: a request carrying credentials is never redirected.
                    allow_redirects=data is None and auth is None,
                )
            except requests.exceptions.SSLError as exc:
                self._slots.release()
                raise self._tls_error(exc) from exc
            except requests.exceptions.InvalidURL as exc:
                self._slots.release()
                raise RemoteError(f"invalid URL {shown_url(url)}") from exc
            except _TRANSIENT as exc:
                self._slots.release()
                # A name the resolver says does not exist stays so for the next seconds: said at
                # once. A resolver that failed for now (EAI_AGAIN) is asked again, as any outage.
                unresolved = _no_such_name(exc)
                if self._stop is not None and self._stop.is_set():  # what failed was waited on during the stop
                    raise Cancelled(f"stopped while waiting for XNAT at {self.url}") from exc
                if attempt == self.retries or unresolved:
                    if isinstance(exc, (requests.exceptions.ReadTimeout, TimeoutError)):
                        listing = "/files" in url
                        attempts = f"{attempt + 1} attempt{'s' if attempt else ''}"
                        raise RemoteError(
                            f"XNAT at {self.url} did not answer within {self.timeout:g} s ({attempts}) "
                            f"for {what or shown_url(url)}",
                            hint=("XNAT builds a large session's file listing whole before answering: " if listing
                                  else "XNAT is slow or busy: ")
                            + "raise `timeout` in the config (seconds), or run again when XNAT is less busy",
                        ) from exc
                    raise RemoteError(
                        f"cannot reach XNAT at {self.url} for {what or shown_url(url)}"
                        + (f": the name {urlsplit(self.url).hostname} does not resolve" if unresolved else ""),
                        detail=f"{type(exc).__name__} after {attempt + 1} attempt(s)",
                        unreachable=True,
                        hint="check the URL (a typo in the host name?)" if unresolved
                        else "check the URL and the network; run again later",
                    ) from exc
                self._sleep(attempt, None)
                continue
            except requests.RequestException as exc:
                self._slots.release()
                raise RemoteError(f"request to {shown_url(url)} failed", detail=type(exc).__name__) from exc
            except BaseException:
                self._slots.release()
                raise
            if resp.status_code in _RETRY_STATUS and attempt < self.retries:
                resp.close()
                self._slots.release()
                self._sleep(attempt, resp)
                continue
            if not stream:
                self._slots.release()
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    def _tls_error(self, exc: requests.exceptions.SSLError) -> RemoteError:
        cause = _ssl_error(exc)
        # Only a certificate we checked can fail verification. With verification off, or a plain-HTTP
        # port answering the TLS hello (WRONG_VERSION_NUMBER), the handshake itself failed.
        if self.verify and isinstance(cause, ssl.SSLCertVerificationError):
            return RemoteError(
                f"TLS verification failed for {self._origin}",
                detail=cause.verify_message or type(exc).__name__,
                hint="fix the server certificate or point REQUESTS_CA_BUNDLE at your CA; "
                "--insecure turns verification off",
            )
        return RemoteError(
            f"TLS handshake with {self._origin} failed",
            detail=(cause.reason if cause is not None else None) or type(exc).__name__,
            hint="the server may not speak https at this address and port; "
            "check the URL's scheme (http:// for a plain-HTTP server) and port",
        )

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        what: str = "",
    ) -> requests.Response | keepalive.Answer:
        """An authenticated request: logs in first if needed, re-logs in once after a 401."""
        if self._closed:
            raise RemoteError("the XNAT client is closed")
        self.login()
        url = self._url(path)
        for relogged in (False, True):
            generation = self._generation
            resp = self._send(method, url, params=params, headers=headers, stream=stream, what=what)
            if resp.status_code != 401:
                return resp
            resp.close()
            if stream:
                self._slots.release()
            if relogged:
                break
            # The server-side session expired (idle timeout, restart): log in once more.
            self._relogin(generation)
        raise AuthError(
            f"XNAT rejected the credentials for {self.who} at {self.url}",
            detail=f"401 for {what or shown_url(url)} even after logging in again",
        )

    def _without_secret(self, text: str) -> str:
        """A server's answer as messages quote it: a proxy or error page that echoes the login's
        form (`username=…&password=…`) or the request's headers must not put the password, or the
        session cookie that stands for it, on a terminal or in --json."""
        secret = self.credentials.password
        for form in {secret, quote_plus(secret), quote(secret, safe="")} if secret else ():
            text = text.replace(form, "***")
        # The Authorization header echoed: base64 of user:password (an alias token's too), maybe
        # cut short by the page that quotes it, so every Basic credential goes.
        text = _BASIC_CREDENTIAL.sub(r"\1***", text)
        for cookie in list(self._http.cookies):
            if cookie.name == "JSESSIONID" and cookie.value and len(cookie.value) >= 8:
                text = text.replace(cookie.value, "***")
        return text

    def _raise_for_status(
        self, resp: requests.Response | keepalive.Answer, *, what: str, not_found: str | None = None,
        forbidden: str | None = None,
    ) -> None:
        code = resp.status_code
        if 200 <= code < 300:
            return
        detail = f"HTTP {code}"
        message = self._without_secret(_error_text(resp, self._without_secret))
        if message:
            detail += f": {message}"
        if code == 404:
            raise NotFoundError(not_found or f"{what} not found on XNAT at {self.url}", detail=detail)
        if code == 403:
            raise ForbiddenError(
                forbidden or f"{self.who} may not read {what} at {self.url}", detail=detail
            )
        if code == 401:
            raise AuthError(f"XNAT rejected the credentials for {self.who} at {self.url}")
        if 300 <= code < 400 and isinstance(resp, requests.Response):
            where = shown_url(urljoin(resp.url, resp.headers.get("Location", "")))
            raise RemoteError(f"XNAT at {self.url} redirected {what} to {where}; not followed", detail=f"HTTP {code}",
                              hint="the session cookie would go along, unencrypted or to another server: XNAT must "
                                   "not send requests on to plain http, nor to another port of its host unless over "
                                   "https; check the server's or its proxy's configuration")
        if code in _RETRY_STATUS:
            raise RemoteError(
                f"XNAT at {self.url} kept failing for {what}",
                detail=f"{detail} after {self.retries + 1} attempt(s)",
                hint="the server is overloaded or down; run again later",
            )
        raise RemoteError(f"XNAT at {self.url} refused {what}", detail=detail)

    def _json(self, resp: requests.Response | keepalive.Answer, *, what: str) -> Any:
        try:
            body = resp.text
        except _TRANSIENT as exc:  # pragma: no cover - bodies are read in _send for non-streams
            raise RemoteError(f"reading {what} from {self.url} failed", detail=type(exc).__name__) from exc
        message = html_message(body)
        if message is not None:
            message = html_message(self._without_secret(body)) or ""
            raise RemoteError(f"XNAT at {self.url} sent an HTML page for {what}", detail=self._without_secret(message))
        try:
            return json.loads(body)
        except ValueError as exc:
            snippet = self._without_secret(" ".join(self._without_secret(body)[:80].split()))
            raise RemoteError(
                f"XNAT at {self.url} sent invalid JSON for {what}", detail=f"{exc}; body starts {snippet!r}"
            ) from exc

    def get_json(self, path: str, **params: Any) -> Any:
        """GET `path` (relative to the base URL) with format=json; return the decoded JSON."""
        params.setdefault("format", "json")
        what = shown_url(path)
        resp = self._request("GET", path, params=params, what=what)
        self._raise_for_status(resp, what=what)
        return self._json(resp, what=what)

    def _result_rows(
        self, path: str, params: dict[str, Any], *, what: str, not_found: str | None = None,
        forbidden: str | None = None,
    ) -> list[dict[str, Any]]:
        params = {"format": "json", **params}
        resp = self._request("GET", path, params=params, what=what)
        self._raise_for_status(resp, what=what, not_found=not_found, forbidden=forbidden)
        doc = self._json(resp, what=what)
        try:
            rows = doc["ResultSet"]["Result"]
        except (KeyError, TypeError) as exc:
            raise RemoteError(f"XNAT at {self.url} sent an unexpected document for {what}",
                              detail="no ResultSet.Result") from exc
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise RemoteError(f"XNAT at {self.url} sent an unexpected document for {what}",
                              detail="ResultSet.Result is not a list of rows")
        # XNAT counts a listing's rows (the file listing excepted). Fewer rows than counted is an
        # answer cut short (a proxy, a hostile server): scans missing from it would read as removed.
        total = doc["ResultSet"].get("totalRecords") if isinstance(doc["ResultSet"], dict) else None
        if isinstance(total, (str, int)) and str(total).isdigit() and int(total) != len(rows):
            raise RemoteError(f"XNAT at {self.url} sent an incomplete listing of {what}",
                              detail=f"{len(rows)} rows where it counts {total} (totalRecords)",
                              hint="run again; if it persists, a proxy may be cutting XNAT's answers")
        return rows

    # -- typed listings --------------------------------------------------------------------
    def list_experiments(self, project: str, malformed: list[MalformedRow] | None = None) -> list[Experiment]:
        """All experiments of `project` (every xsiType) with dates, in one request. A row with a
        value that does not parse is an error, or, given `malformed`, is put there and left out."""
        what = f"the experiments of project {project}"
        rows = self._result_rows(
            f"/data/projects/{quote(project, safe='')}/experiments",
            {"columns": ",".join(EXPERIMENT_COLUMNS)},
            what=what,
            not_found=f"project {project} not found on XNAT or not visible to {self.who}",
            forbidden=f"{self.who} may not read the experiments of project {project}",
        )
        if malformed is None:
            return [self._experiment(project, i, row) for i, row in enumerate(rows)]
        listed = []
        for i, row in enumerate(rows):
            try:
                listed.append(self._experiment(project, i, row))
            except RemoteError as exc:
                get = row.get
                ident, label = _text(get("ID")), _text(get("label"))
                if not ident or not label:  # nothing to name it by: the whole listing is in doubt
                    raise
                malformed.append(MalformedRow(ident, label, _text(get("subject_label")),
                                              _text(get("xsiType")) or "xnat:mrSessionData", exc.detail or exc.summary))
        return listed

    def _experiment(self, project: str, index: int, row: dict[str, Any]) -> Experiment:
        # Runs once per listed session (10,000s per plan): no per-row closures, error text only on
        # error, Experiment's fields by position (keywords cost a tenth of the row).
        get = row.get
        ident, label = _text(get("ID")), _text(get("label"))
        if not ident or not label:
            raise RemoteError(
                f"XNAT listed an experiment of project {project} without ID or label",
                detail=f"{_row_name(index, ident)}: {json.dumps(row, sort_keys=True)[:300]}",
            )
        # A session shared into `project` is listed there with its own (primary) project's ID.
        owner = _text(get("project"))
        try:
            return Experiment(
                ident,
                label,
                project,  # the session is addressed through the project we listed, also when shared in
                _text(get("subject_ID")),
                _text(get("subject_label")),
                parse_date(_text(get("date"))),
                parse_timestamp(_text(get("insert_date"))),
                parse_timestamp(_text(get("last_modified"))),
                _text(get("xsiType")) or "xnat:mrSessionData",
                owner if owner and owner != project else None,
            )
        except ValueError as exc:
            raise RemoteError(
                f"XNAT listed experiment {_row_name(index, ident)} of project {project} with a malformed value",
                detail=str(exc),
            ) from exc

    def experiment_path(self, exp: Experiment) -> str:
        """Where an experiment's scans hang: the 9-segment form when the subject is known."""
        e = quote(exp.id, safe="")
        if exp.subject_id:
            p, s = quote(exp.project, safe=""), quote(exp.subject_id, safe="")
            return f"/data/projects/{p}/subjects/{s}/experiments/{e}"
        return f"/data/experiments/{e}"

    def list_scans(self, exp: Experiment) -> list[Scan]:
        """Scans of one session with all their files: two requests (scan listing, one file listing)."""
        base = self.experiment_path(exp)
        where = f"session {exp.label} ({exp.id})"
        not_found = f"{where} of project {exp.project} not found on XNAT or not visible to {self.who}"
        scan_rows = self._result_rows(
            f"{base}/scans", {"columns": ",".join(SCAN_COLUMNS)}, what=f"the scans of {where}", not_found=not_found
        )
        scans: dict[str, dict[str, str]] = {}
        for i, row in enumerate(scan_rows):
            scan_id = str(row.get("ID") or "")
            if not scan_id:
                raise RemoteError(f"XNAT listed a scan without ID in {where}", detail=f"row {i}")
            scans[scan_id] = {
                "type": str(row.get("type") or ""),
                "series_description": str(row.get("series_description") or ""),
            }
        files: dict[str, list[RemoteFile]] = {sid: [] for sid in scans}
        if scans:
            try:
                file_rows = self._result_rows(f"{base}/scans/ALL/files", {}, what=f"the files of {where}")
            except NotFoundError:
                file_rows = []  # XNAT answers 404 when no scan has a resource yet
            for i, row in enumerate(file_rows):
                scan_id, f = self._remote_file(where, i, row)
                if scan_id in files:
                    files[scan_id].append(f)
                # A file of a scan not in the scan listing was added in between; the next plan sees it.
        return [
            Scan(
                id=sid,
                type=scans[sid]["type"],
                series_description=scans[sid]["series_description"],
                files=tuple(sorted(files[sid], key=lambda f: (f.resource, f.name))),
            )
            for sid in sorted(scans, key=natural_key)
        ]

    def _remote_file(self, where: str, index: int, row: dict[str, Any]) -> tuple[str, RemoteFile]:
        uri = str(row.get("URI") or "")
        m = _FILE_URI.search(uri)
        if not m:
            raise RemoteError(f"XNAT listed a file in {where} with an unexpected URI", detail=f"row {index}: {uri!r}")
        # XNAT joins the URI from the catalog's names as they are, not percent-encoded: a file
        # named `a%20b.dcm` is that, and `a#b.dcm` must be encoded to be asked for.
        scan_id, rid, name = m.group(1), m.group(2), m.group(3)
        check_relpath(name, where=f"scan {scan_id} of {where}")
        size_text = str(row.get("Size", "")).strip()
        if not size_text:  # XNAT's catalog has the entry, but neither a size nor the file to stat
            raise RemoteError(f"XNAT lists file {name} in {where} without a size: the file may be missing on the server",
                              detail=f"row {index}: Size=''", hint="ask the XNAT administrator to check the scan's files")
        try:
            size = int(size_text)
            if size < 0:
                raise ValueError(size_text)
        except ValueError as exc:
            raise RemoteError(
                f"XNAT listed file {name} in {where} with a malformed size", detail=f"row {index}: Size={size_text!r}"
            ) from exc
        return scan_id, RemoteFile(
            name=name,
            size=size,
            digest=str(row.get("digest") or "").strip().lower(),
            uri=uri[:m.start(3)] + quote(name, safe="/"),
            resource=str(row.get("collection") or rid),
            resource_id=rid,
        )

    def deep_details(
        self,
        experiments: Sequence[Experiment],
        *,
        concurrency: int = CONNECTIONS,
        on_progress: OnProgress | None = None,
        failures: dict[str, RemoteError] | None = None,
    ) -> dict[str, tuple[Scan, ...]]:
        """`list_scans` for many sessions at once, keyed by experiment ID in input order.

        At most `concurrency` sessions are in flight (and never more than `max_connections`
        requests). `on_progress(exp, done, total)` is called from the calling thread. The first
        failure cancels what has not started and is raised; with `failures`, a session's
        RemoteError (rejected credentials aside) is put there instead, what has not started of its
        project is left out (that project is not planned: an outage costs one session's retries per
        project, not every session's), and the other projects go on.
        """
        total = len(experiments)
        results: dict[str, tuple[Scan, ...]] = {}
        if total == 0:
            return results

        failed_projects: set[str] = set()

        def failed(exp: Experiment, exc: BaseException) -> bool:
            """Whether `exc` is noted in `failures` (else the caller raises it)."""
            if failures is None or not isinstance(exc, RemoteError):
                return False
            if isinstance(exc, AuthError) and not isinstance(exc, ForbiddenError):
                return False  # rejected credentials: every session would fail the same way
            failures[exp.id] = exc
            failed_projects.add(exp.project)
            return True

        workers = max(1, min(concurrency, total))
        if workers == 1:
            for done, exp in enumerate(experiments, 1):
                if exp.project in failed_projects:
                    continue
                try:
                    results[exp.id] = tuple(self.list_scans(exp))
                except RemoteError as exc:
                    if not failed(exp, exc):
                        raise
                if on_progress is not None:
                    on_progress(exp, done, total)
            return results
        self.login()  # once, before the workers race for it
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xnat-deep")
        try:
            futures: dict[Future[list[Scan]], Experiment] = {
                pool.submit(self.list_scans, exp): exp for exp in experiments
            }
            pending = set(futures)
            done_count = 0
            while pending:
                finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in finished:
                    if fut.cancelled():  # left out: its project failed
                        continue
                    exc = fut.exception()
                    if exc is not None and not failed(futures[fut], exc):
                        for other in pending:
                            other.cancel()
                        raise exc
                    if exc is not None:
                        for other in pending:
                            if futures[other].project in failed_projects:
                                other.cancel()
                    done_count += 1
                    if on_progress is not None:
                        on_progress(futures[fut], done_count, total)
            by_id = {futures[f].id: tuple(f.result()) for f in futures
                     if not f.cancelled() and f.exception() is None}
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        for exp in experiments:
            if exp.id in by_id:
                results[exp.id] = by_id[exp.id]
        return results

    # -- downloads -------------------------------------------------------------------------
    @contextmanager
    def stream(self, uri: str, *, headers: dict[str, str] | None = None) -> Iterator[StreamResponse]:
        """GET `uri` (a listing URI or path) streamed; yields a StreamResponse for 2xx and 416.

        Connect errors and 5xx are retried before the body starts; a failure mid-body raises
        RemoteError from `readinto`. Range requests are the caller's: pass `headers`.
        """
        what = f"the download of {shown_url(uri)}"
        resp = self._request("GET", uri, headers=headers, stream=True, what=what)
        try:
            # 416 tells a resuming caller its Range is past the end; it decides what that means.
            if not (200 <= resp.status_code < 300 or resp.status_code == 416):
                try:
                    resp.content  # small error page; read it for the message
                except _TRANSIENT:
                    pass
                self._raise_for_status(resp, what=what)
            lane = isinstance(resp, keepalive.Answer)
            yield StreamResponse.of_answer(resp) if lane else StreamResponse.of_requests(resp)
        finally:
            resp.close()
            self._slots.release()

    def _lane(
        self, method: str, url: str, params: dict[str, Any] | None, data: Any, headers: dict[str, str] | None,
        auth: Any, stream: bool,
    ) -> keepalive.Answer | None:
        """One attempt of a logged-in GET through the keep-alive lane (reconcile/keepalive.py);
        None when the lane is off or passes (the attempt then goes through requests). The body of
        a non-streamed answer is read here, as requests would; a cut body is a transient error."""
        if self._keepalive is None or method != "GET" or data is not None or auth is not None or not self._logged_in:
            return None
        if params:
            url += ("&" if "?" in url else "?") + urlencode(params, doseq=True)
        parts = urlsplit(requests.utils.requote_uri(url))  # the encoding requests would send
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        sent = {
            "User-Agent": "xnat2bids", "Accept": "*/*", "Accept-Encoding": "identity",
            "Cookie": self._session_cookies(),
        }
        sent.update(headers or {})
        answer = self._keepalive.get(target, sent, url)
        if answer is not None and not stream:
            answer.content  # noqa: B018 - read now; raises ChunkedEncodingError when cut short
            answer.close()
        return answer

    def _session_cookies(self) -> str:
        """The Cookie header requests would send, worked out once per login."""
        cached = self._cookie_header
        if cached is None or cached[0] != self._generation:
            probe = requests.Request("GET", self.url + "/").prepare()
            header = requests.cookies.get_cookie_header(self._http.cookies, probe) or ""
            cached = self._cookie_header = (self._generation, header)
        return cached[1]
