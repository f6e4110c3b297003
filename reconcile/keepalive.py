"""Keep-alive GETs over `http.client`: the lane `XnatClient._send` takes for a logged-in GET.

Through requests and urllib3 each GET cost ~1.1 ms of CPU in the client (the URL is parsed and
re-encoded twice, settings and cookies are merged, protocol `isinstance` checks); through
`http.client` it costs ~0.3 ms. An export makes one GET per file (4,096 files: 4 s of CPU) and
`plan --deep` two per session. Only plain GETs take this lane, with no proxy set. An `Answer`
looks to the client like a `requests.Response` (status, headers, text), so retries, re-login
and error messages stay in one place. A redirect, a content-encoded body or a connection that
fails before the answer gives None: the client then sends that attempt through requests.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
from urllib.parse import urlsplit

import requests.exceptions
import requests.utils

# How a kept connection that the server has closed meanwhile fails.
_CLOSED_WHILE_IDLE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def ssl_context(verify: bool | str) -> ssl.SSLContext:
    """The TLS context requests would use for `verify`: certifi's bundle by default, a CA file or
    folder when given, no verification when False."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if verify is True:
        return ssl.create_default_context(cafile=requests.utils.DEFAULT_CA_BUNDLE_PATH)
    if os.path.isdir(verify):
        return ssl.create_default_context(capath=verify)
    return ssl.create_default_context(cafile=verify)


class Answer:
    """A response whose status line and headers have been read, with what the client uses of a
    `requests.Response`: `status_code`, `headers`, `url`, `content`, `text`, `close()`. The body
    is read through `response` (streams) or all at once by `content`.

    `close()` puts the connection back for the next GET when the body was read to its end,
    otherwise closes it.
    """

    def __init__(self, pool: KeepAlivePool, conn: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 url: str):
        self._pool = pool
        self._conn: http.client.HTTPConnection | None = conn
        self.response = response
        self.url = url
        self.status_code = response.status
        self.headers = response.headers  # case-insensitive `.get`, like requests'
        self._content: bytes | None = None

    @property
    def content(self) -> bytes:
        """The whole body; a body cut short raises requests' ChunkedEncodingError, as requests would."""
        if self._content is None:
            try:
                self._content = self.response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise requests.exceptions.ChunkedEncodingError(f"{type(exc).__name__}: {exc}") from exc
        return self._content

    @property
    def text(self) -> str:
        charset = self.response.headers.get_content_charset() or "utf-8"
        try:
            return self.content.decode(charset, errors="replace")
        except LookupError:  # a charset Python does not know
            return self.content.decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        if self.response.isclosed() and not self.response.will_close:
            self._pool.put_back(conn)
        else:
            self.response.close()
            conn.close()


class KeepAlivePool:
    """Idle `http.client` connections to one origin, shared by the download threads."""

    def __init__(self, origin: str, *, verify: bool | str, timeout: float, max_idle: int):
        parts = urlsplit(origin)
        self._host = parts.hostname or ""
        self._port = parts.port
        self._https = parts.scheme == "https"
        self._verify = verify
        self._context: ssl.SSLContext | None = None  # made at the first connection: plans never need it
        self._timeout = timeout
        self._max_idle = max_idle
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> http.client.HTTPConnection:
        if not self._https:
            return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        if self._context is None:
            self._context = ssl_context(self._verify)  # OSError for a missing CA file: requests words it
        return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._context)

    def put_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def get(self, target: str, headers: dict[str, str], url: str) -> Answer | None:
        """GET `target` (path and query; `url` is the whole URL, for messages). None, with the
        connection closed, for a redirect, a content-encoded body or a connection that failed
        before the answer: the caller then asks through requests.

        A reused connection that the server closed while idle fails at once, before the answer
        (reset, closed, empty status line); it is dropped and the GET is sent once more on a new
        connection. A timeout is the attempt's, on a kept connection too: it raises requests'
        ReadTimeout (or ConnectTimeout), so the caller's retries count it and neither this lane
        nor requests sends the GET again within the attempt. Other failures (refused
        connections, TLS) give None at once.
        """
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        for fresh in ((False, True) if conn is not None else (True,)):
            try:
                if fresh:
                    conn = self._connect()
                assert conn is not None
                conn.request("GET", target, headers=headers)
                response = conn.getresponse()
            except _CLOSED_WHILE_IDLE:
                if conn is not None:
                    conn.close()
                continue
            except TimeoutError as exc:  # socket.timeout: connecting, sending or waiting for the answer
                connected = conn is not None and conn.sock is not None
                if conn is not None:
                    conn.close()
                if not fresh:
                    # A kept connection that a firewall or NAT dropped silently looks like this too,
                    # and so would the others kept as long: drop them all, so that the next attempt
                    # goes on a new one. Not this one: a slow XNAT would be waited for twice.
                    self._drop_idle()
                timeout = requests.exceptions.ReadTimeout if connected else requests.exceptions.ConnectTimeout
                raise timeout(f"{url}: no answer within {self._timeout} s") from exc
            except (OSError, http.client.HTTPException):
                if conn is not None:
                    conn.close()
                return None
            encoded = response.getheader("Content-Encoding", "identity").lower() != "identity"
            if 300 <= response.status < 400 or encoded:
                response.close()
                conn.close()
                return None
            return Answer(self, conn, response, url)
        return None

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_idle()
