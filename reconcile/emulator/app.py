"""The emulator's HTTP face: XNAT's REST routes, listing formats, auth flows and error pages.

This module owns how the archive looks over HTTP to xnatpy, pyxnat and our own client; it keeps no
content of its own besides login sessions and alias tokens (the data lives in `archive.py`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import mimetypes
import os
import re
import secrets
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from xml.etree import ElementTree

from werkzeug.wrappers import Request, Response

from .archive import (
    CHUNK_SIZE,
    Archive,
    ArchiveError,
    Experiment,
    FileEntry,
    Resource,
    Scan,
    User,
)
from .faults import Fault, FaultSet
from .xmldoc import item_document, xsd_text
from .zipstream import tar_pieces, zip_pieces

XNAT_VERSION = "1.8.10"
SESSION_COOKIE = "JSESSIONID"
DEFAULT_SESSION_TIMEOUT = 15 * 60.0
DEFAULT_TOKEN_LIFETIME = 2 * 24 * 3600.0

# Every type's ancestors, for `xsiType=` filters that name a base type (pyxnat asks for
# xnat:subjectAssessorData and expects mrSessionData rows).
SUPERTYPES: dict[str, tuple[str, ...]] = {
    "xnat:projectData": (),
    "xnat:subjectData": (),
    "xnat:experimentData": (),
    "xnat:subjectAssessorData": ("xnat:experimentData",),
    "xnat:imageSessionData": ("xnat:subjectAssessorData", "xnat:experimentData"),
    "xnat:imageScanData": (),
    "xnat:abstractResource": (),
    "xnat:resource": ("xnat:abstractResource",),
    "xnat:resourceCatalog": ("xnat:resource", "xnat:abstractResource"),
}
for _modality in ("mr", "ct", "pet"):
    SUPERTYPES[f"xnat:{_modality}SessionData"] = ("xnat:imageSessionData",) + SUPERTYPES["xnat:imageSessionData"]
    SUPERTYPES[f"xnat:{_modality}ScanData"] = ("xnat:imageScanData",)

# Listing columns: (default columns, all available columns). `URI` is appended separately.
PROJECT_COLUMNS = ("ID", "secondary_ID", "name", "description", "pi_firstname", "pi_lastname")
SUBJECT_COLUMNS = ("ID", "project", "label", "insert_date", "insert_user")
SUBJECT_EXTRA = ("last_modified", "xsiType")
EXPERIMENT_COLUMNS = ("ID", "project", "date", "xsiType", "label", "insert_date")
EXPERIMENT_EXTRA = ("subject_ID", "subject_label", "last_modified", "insert_user", "time", "modality")
SITE_EXPERIMENT_COLUMNS = EXPERIMENT_COLUMNS + ("subject_ID", "subject_label")
# A project's (or subject's) experiment listing with default columns also carries the root
# element's key under its xpath, as a real row shows (facts §1); unused by xnatpy and pyxnat.
EXPERIMENT_ROOT_KEY = "xnat:subjectassessordata/id"
SCAN_COLUMNS = ("xnat_imagescandata_id", "ID", "type", "quality", "xsiType", "note", "series_description")
RESOURCE_COLUMNS = (
    "xnat_abstractresource_id", "label", "element_name", "category", "cat_id", "cat_desc",
    "file_count", "file_size", "tags", "content", "format",
)  # fmt: skip
FILE_COLUMNS = (
    "Name", "Size", "URI", "collection", "file_tags", "file_format", "file_content", "cat_ID", "digest",
)  # fmt: skip

# xpaths whose short alias differs from their last path step.
XPATH_ALIASES = {
    "xnat:subjectassessordata/subject_id": "subject_ID",
    "xnat:experimentdata/meta/insert_date": "insert_date",
    "xnat:experimentdata/meta/last_modified": "last_modified",
    "xnat:experimentdata/meta/insert_user": "insert_user",
    "xnat:subjectdata/meta/insert_date": "insert_date",
}

RESERVED_QUERY = {
    "format", "columns", "sortby", "sortorder", "limit", "offset", "accept-not-found", "structure",
    "inbody", "overwrite", "event_reason", "event_type", "event_action", "update-stats", "extract",
    "content", "file_format", "file_content", "removefiles", "req_format", "xsitype", "allowdatadeletion",
}  # fmt: skip


class HttpError(Exception):
    """Ends a request with XNAT's Restlet-style status page."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def status_page(status: int, message: str, http_status: int | None = None) -> Response:
    """The HTML page Restlet sends with an error; both clients recognise it by its `<html>` start."""
    body = (
        "<html>\n<head>\n   <title>Status page</title>\n</head>\n<body>\n"
        f"<h3>{html.escape(message)}</h3>"
        "<p>You can get technical details <a href=\"http://www.w3.org/Protocols/rfc2616/rfc2616-sec10.html\">here</a>.<br>\n"
        "Please continue your visit at our <a href=\"/\">home page</a>.\n</p>\n</body>\n</html>\n"
    )
    return Response(body, status=http_status if http_status is not None else status, mimetype="text/html")


def java_timestamp(moment: datetime) -> str:
    """Java `Timestamp.toString()`: fraction with trailing zeros cut, at least one digit."""
    fraction = f"{moment.microsecond:06d}".rstrip("0") or "0"
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + fraction


def java_date(moment: datetime) -> str:
    """Java `Date.toString()` in the server zone (UTC): `Wed Jan 10 14:22:05 UTC 2024`."""
    return moment.strftime("%a %b %d %H:%M:%S UTC %Y")


@dataclass
class HttpSession:
    id: str
    login: str
    last_seen: float


@dataclass
class AliasToken:
    alias: str
    secret: str
    login: str
    created: float
    expires: float
    single_use: bool = False


@dataclass
class Ctx:
    """One request as the route handlers see it."""

    request: Request
    user: User
    session_id: str | None
    segments: list[str]
    fmt: str
    # "project" when the URL named project and subject (file URIs then keep that form).
    via: str = "experiment"


class EmulatorApp:
    """A WSGI app emulating the XNAT 1.8 REST API over an `Archive`."""

    def __init__(
        self,
        archive: Archive,
        *,
        session_timeout: float = DEFAULT_SESSION_TIMEOUT,
        token_lifetime: float = DEFAULT_TOKEN_LIFETIME,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.archive = archive
        self.faults = FaultSet()
        self.requests: list[tuple[str, str, str]] = []
        self.session_timeout = session_timeout
        self.token_lifetime = token_lifetime
        # Login sessions expire on wall-clock time, independently of the archive's (test) clock.
        self.wall_clock = wall_clock
        self._sessions: dict[str, HttpSession] = {}
        self._tokens: dict[str, AliasToken] = {}
        self._lock = threading.Lock()
        self._token_seq = 0

    # -- entry points -----------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.handle(Request(environ))(environ, start_response)

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def handle(self, request: Request) -> Response:
        """Serve one request (also usable as pytest-httpserver's `respond_with_handler`)."""
        with self._lock:
            self.requests.append((request.method, request.path, request.query_string.decode("latin-1")))
        firing = self.faults.fire(request.method, request.path)
        for fault in firing:
            if fault.kind == "latency":
                time.sleep(fault.seconds)
            elif fault.kind == "auth_expire":
                self.expire_sessions()
        for fault in firing:
            if fault.kind == "reset":
                _drop_connection(request)
                return Response(b"", status=500)
            if fault.kind == "status":
                return status_page(fault.status, fault.message or f"Injected fault: status {fault.status}")
            if fault.kind == "html_200":
                return status_page(fault.status, fault.message or "Internal Server Error", http_status=200)
            if fault.kind == "invalid_json":
                return Response('{"ResultSet":{"Result":[{"ID":', status=200, mimetype="application/json")
        try:
            response = self._dispatch(request)
        except (HttpError, ArchiveError) as exc:
            response = _error_page(exc)
        for fault in firing:
            if fault.kind == "corrupt":
                response = _corrupt(response)
            elif fault.kind == "truncate":
                response = _truncate(response, fault, request)
        return response

    # -- authentication ---------------------------------------------------------------------

    def _new_session(self, login: str) -> str:
        session_id = secrets.token_hex(16).upper()
        now = self.wall_clock()
        with self._lock:
            if len(self._sessions) >= 4096:
                # Cookie-less Basic clients open a session per request; forget the idle ones.
                for stale in [s.id for s in self._sessions.values() if now - s.last_seen > self.session_timeout]:
                    del self._sessions[stale]
            self._sessions[session_id] = HttpSession(session_id, login, now)
        return session_id

    def _basic_user(self, request: Request) -> tuple[User | None, bool]:
        """(user, header present). A wrong Basic header is a failed login even with a valid cookie."""
        header = request.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None, False
        try:
            login, _, password = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, True
        return self._check_password(login, password), True

    def _check_password(self, login: str, password: str) -> User | None:
        user = self.archive.users.get(login)
        if user is not None and secrets.compare_digest(user.password, password):
            return user
        with self._lock:
            token = self._tokens.get(login)
            if token is None or not secrets.compare_digest(token.secret, password):
                return None
            if token.expires <= self.wall_clock():
                del self._tokens[login]
                return None
            if token.single_use:
                del self._tokens[login]
        return self.archive.users.get(token.login)

    def _authenticate(self, request: Request) -> tuple[User | None, str | None, bool]:
        """(user, session id, session is new)."""
        if self.faults.auth_expired:
            return None, None, False
        user, has_basic = self._basic_user(request)
        if has_basic and user is None:
            return None, None, False
        session = self._live_session(request.cookies.get(SESSION_COOKIE))
        if user is not None:
            if session is not None and session.login == user.login:
                return user, session.id, False
            # Without a live session cookie, every Basic-authenticated request opens a new
            # server-side session, as on XNAT (facts §10: clients that drop cookies pile them up).
            return user, self._new_session(user.login), True
        if session is not None and session.login in self.archive.users:
            return self.archive.users[session.login], session.id, False
        return None, None, False

    def _live_session(self, session_id: str | None) -> HttpSession | None:
        if not session_id:
            return None
        now = self.wall_clock()
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and now - session.last_seen > self.session_timeout:
                del self._sessions[session_id]
                return None
            if session is not None:
                session.last_seen = now
            return session

    def expire_sessions(self) -> None:
        """End every login session (as a server restart or idle timeout would); credentials stay valid."""
        with self._lock:
            self._sessions.clear()

    # -- routing ----------------------------------------------------------------------------

    def _dispatch(self, request: Request) -> Response:
        path = request.path
        if len(path) > 1:
            path = path.rstrip("/")
        if path in ("", "/") or path == "/app" or path.startswith("/app/"):
            return self._home(request)
        if path.startswith("/xapi/"):
            rest, api = path[len("/xapi/") :], "xapi"
        else:
            for prefix in ("/data/archive/", "/data/", "/REST/"):
                if path.startswith(prefix):
                    rest, api = path[len(prefix) :], "data"
                    break
            else:
                if path in ("/data", "/data/archive", "/REST"):
                    rest, api = "", "data"
                else:
                    raise HttpError(404, "The server has not found anything matching the request URI")
        segments = [s for s in rest.split("/")]

        if api == "data" and segments[:2] == ["services", "auth"]:
            return self._services_auth(request)
        if api == "data" and segments == ["version"]:
            # XNAT >= 1.7 has no such route; xnatpy then asks /xapi/siteConfig/buildInfo.
            raise HttpError(404, "The server has not found anything matching the request URI")

        user, session_id, new_session = self._authenticate(request)
        if user is None:
            raise HttpError(401, "Login required or credentials invalid", {"WWW-Authenticate": 'Basic realm="XNAT"'})
        fmt = (request.args.get("format") or "").lower()
        ctx = Ctx(request, user, session_id, segments, fmt)
        try:
            response = self._xapi(ctx) if api == "xapi" else self._data(ctx)
        except (HttpError, ArchiveError) as exc:  # valid Basic credentials opened a session all the same
            response = _error_page(exc)
        if new_session and session_id is not None:
            response.set_cookie(SESSION_COOKIE, session_id, path="/", httponly=True)
        return response

    def _home(self, request: Request) -> Response:
        # xnatpy's token login reads JSESSIONID from this response, so Basic auth here opens a session.
        user, session_id, new_session = self._authenticate(request)
        who = "Guest" if user is None else user.login
        body = (
            "<!DOCTYPE html>\n<html><head><title>XNAT</title></head><body>"
            f"<span id=\"user_info\">Logged in as: {html.escape(who)}</span></body></html>\n"
        )
        response = Response(body, mimetype="text/html")
        if new_session and session_id is not None:
            response.set_cookie(SESSION_COOKIE, session_id, path="/", httponly=True)
        return response

    def _services_auth(self, request: Request) -> Response:
        if request.method not in ("PUT", "POST"):
            raise HttpError(405, "Method Not Allowed")
        login = request.form.get("username", "")
        password = request.form.get("password", "")
        user = None if self.faults.auth_expired else self._check_password(login, password)
        if user is None:
            raise HttpError(401, "Authentication failed.")
        session_id = self._new_session(user.login)
        response = Response(session_id, mimetype="text/plain")
        response.set_cookie(SESSION_COOKIE, session_id, path="/", httponly=True)
        return response

    def _xapi(self, ctx: Ctx) -> Response:
        segs = ctx.segments
        if segs == ["siteConfig", "buildInfo"]:
            return _json(
                {
                    "version": XNAT_VERSION,
                    "buildNumber": "emulator",
                    "buildDate": "Thu Jan 01 00:00:00 UTC 2024",
                    "commit": "0000000",
                    "sha": "0000000000000000000000000000000000000000",
                }
            )
        if segs == ["schemas"]:
            return _json(["xdat", "xnat"])
        if len(segs) == 2 and segs[0] == "schemas":
            if segs[1] == "xnat":
                return Response(xsd_text(), mimetype="application/xml")
            if segs[1] == "xdat":
                return Response(XDAT_XSD, mimetype="application/xml")
            raise HttpError(404, f"Unable to find schema {segs[1]}")
        raise HttpError(404, "The server has not found anything matching the request URI")

    def _data(self, ctx: Ctx) -> Response:
        segs = ctx.segments
        method = ctx.request.method
        head = segs[0] if segs else ""
        if segs == ["JSESSION"]:
            if method == "DELETE":
                with self._lock:
                    self._sessions.pop(ctx.session_id or "", None)
                return Response("", mimetype="text/plain")
            return Response(ctx.session_id or "", mimetype="text/plain")
        if segs == ["auth"]:
            return Response(f"User '{ctx.user.login}' is logged in", mimetype="text/plain")
        if head == "services" and len(segs) >= 2 and segs[1] == "tokens":
            return self._tokens_route(ctx, segs[2:])
        if head == "search" and len(segs) >= 2 and segs[1] == "elements":
            return self._search_elements(ctx, segs[2:])
        if head == "projects":
            return self._projects_route(ctx, segs[1:])
        if head == "experiments":
            if len(segs) == 1:
                return self._experiment_listing(ctx, project=None, subject=None)
            experiment = self._experiment_by_id(ctx, segs[1])
            return self._experiment_route(ctx, experiment, segs[2:])
        if head == "subjects" and len(segs) == 1:
            rows = [self._subject_row(s) for s in list(self.archive.subjects.values()) if ctx.user.can_read(s.project)]
            return self._listing(ctx, rows, SUBJECT_COLUMNS, SUBJECT_COLUMNS + SUBJECT_EXTRA, uri=True)
        raise HttpError(404, "The server has not found anything matching the request URI")

    # -- tokens, search elements ------------------------------------------------------------

    def _tokens_route(self, ctx: Ctx, segs: list[str]) -> Response:
        if segs[:1] == ["issue"]:
            login = ctx.user.login
            if len(segs) == 3 and segs[1] == "user":
                if ctx.user.projects is not None and segs[2] != login:
                    raise HttpError(403, "Only administrators can issue tokens for other users.")
                if segs[2] not in self.archive.users:
                    raise HttpError(404, f"Unable to find user {segs[2]}")
                login = segs[2]
            return _json(self.issue_token(login))
        # As XNAT's AliasTokenRestlet: an alias it does not know is a 404 before any operation;
        # validate answers the token's user name, or null.
        if len(segs) in (2, 3) and segs[0] in ("validate", "invalidate"):
            with self._lock:
                token = self._tokens.get(segs[1])
            if token is None:
                raise HttpError(404, f"Can't find an alias token with the alias {segs[1]}")
            if segs[0] == "invalidate" and len(segs) == 2:
                with self._lock:
                    self._tokens.pop(segs[1], None)
                return _json({"result": "OK"})
            if segs[0] == "validate" and len(segs) == 3:
                valid = secrets.compare_digest(token.secret, segs[2]) and token.expires > self.wall_clock()
                return _json({"valid": token.login if valid else None})
        raise HttpError(404, "The server has not found anything matching the request URI")

    def issue_token(self, login: str, single_use: bool = False) -> dict[str, Any]:
        """Create an alias token for `login` (also handy for tests that need one without HTTP)."""
        now = self.wall_clock()
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        token = AliasToken(
            alias=str(uuid.uuid4()),
            secret="".join(secrets.choice(alphabet) for _ in range(64)),
            login=login,
            created=now,
            expires=now + self.token_lifetime,
            single_use=single_use,
        )
        with self._lock:
            self._token_seq += 1
            self._tokens[token.alias] = token
            seq = self._token_seq
        return {
            "id": seq,
            "alias": token.alias,
            "secret": token.secret,
            "xdatUserId": login,
            "singleUse": single_use,
            "enabled": True,
            "created": int(now * 1000),
            "timestamp": int(now * 1000),
            "estimatedExpirationTime": int(token.expires * 1000),
            "validIPAddresses": [],
        }

    def _search_elements(self, ctx: Ctx, segs: list[str]) -> Response:
        if not segs:
            rows = [
                {"ELEMENT_NAME": name, "PLURAL": plural, "SINGULAR": singular, "COUNT": "0"}
                for name, singular, plural in SEARCH_ELEMENTS
            ]
            return self._listing(ctx, rows, ("ELEMENT_NAME", "PLURAL", "SINGULAR", "COUNT"), None, uri=False)
        fields = SEARCH_FIELDS.get(segs[0])
        if fields is None:
            raise HttpError(404, f"Unable to find element {segs[0]}")
        rows = [{"FIELD_ID": f, "HEADER": f.lower(), "SUMMARY": "", "TYPE": "string", "REQUIRES_VALUE": "false",
                 "DESC": "", "ELEMENT_NAME": segs[0], "SRC": "0"} for f in fields]  # fmt: skip
        return self._listing(ctx, rows, tuple(rows[0]), None, uri=False)

    # -- projects and subjects --------------------------------------------------------------

    def _readable_project(self, ctx: Ctx, project_id: str, what: str = "experiments") -> str:
        project = self.archive.projects.get(project_id)
        if project is None:
            raise HttpError(404, f"Unable to identify project {project_id}")
        if not ctx.user.can_read(project.id):
            raise HttpError(403, f"Unable to read {what} for Project: {project.id}")
        return project.id

    def _projects_route(self, ctx: Ctx, segs: list[str]) -> Response:
        method = ctx.request.method
        if not segs:
            rows = [
                {
                    "ID": p.id,
                    "secondary_ID": p.secondary_id,
                    "name": p.name,
                    "description": p.description,
                    "pi_firstname": p.pi_firstname,
                    "pi_lastname": p.pi_lastname,
                    "URI": f"/data/projects/{p.id}",
                }
                for p in list(self.archive.projects.values())
                if ctx.user.can_read(p.id)
            ]
            return self._listing(ctx, rows, PROJECT_COLUMNS, PROJECT_COLUMNS, uri=True)
        project_id = segs[0]
        if len(segs) == 1 and method == "PUT" and project_id not in self.archive.projects:
            if ctx.user.projects is not None:
                raise HttpError(403, "Only administrators can create projects here.")
            self.archive.add_project(project_id, name=ctx.request.args.get("name") or project_id)
            return Response(project_id, status=201, mimetype="text/plain")
        if project_id not in self.archive.projects:
            raise HttpError(404, f"Unable to identify project {project_id}")
        if len(segs) == 1:
            if not ctx.user.can_read(project_id):
                raise HttpError(404, f"Unable to identify project {project_id}")
            if method == "PUT":
                return Response(project_id, mimetype="text/plain")
            project = self.archive.projects[project_id]
            fields = {"ID": project.id, "secondary_ID": project.secondary_id, "name": project.name,
                      "description": project.description}  # fmt: skip
            return self._single(ctx, "xnat:projectData", fields, None, [])
        kind = segs[1]
        if kind == "experiments":
            project_id = self._readable_project(ctx, project_id)
            if len(segs) == 2:
                return self._experiment_listing(ctx, project=project_id, subject=None)
            experiment = self.archive.find_session(project_id, segs[2])
            if experiment is None:
                if method == "PUT" and len(segs) == 3:
                    raise HttpError(400, "Creating an experiment needs its subject: PUT /data/projects/P/subjects/S/experiments/E")
                raise HttpError(404, f"Unable to find experiment {segs[2]}")
            if len(segs) > 3:
                # XNAT 1.8 has no scan routes under /projects/P/experiments/E (facts §3).
                raise HttpError(404, "The server has not found anything matching the request URI")
            return self._experiment_route(ctx, experiment, [])
        if kind == "subjects":
            project_id = self._readable_project(ctx, project_id, "subjects")
            if len(segs) == 2:
                rows = [self._subject_row(s, project_id) for s in self.archive.subjects_of(project_id)]
                return self._listing(ctx, rows, SUBJECT_COLUMNS, SUBJECT_COLUMNS + SUBJECT_EXTRA, uri=True)
            subject = self.archive.find_subject(project_id, segs[2])
            if len(segs) == 3:
                return self._subject_route(ctx, project_id, segs[2], subject)
            if subject is None:
                raise HttpError(404, f"Unable to find subject {segs[2]}")
            if segs[3] != "experiments":
                raise HttpError(404, "The server has not found anything matching the request URI")
            if len(segs) == 4:
                return self._experiment_listing(ctx, project=project_id, subject=subject.id)
            experiment = self.archive.find_session(project_id, segs[4])
            if experiment is None or experiment.subject_id != subject.id:
                if method == "PUT" and len(segs) == 5:
                    return self._create_session(ctx, project_id, subject.id, segs[4])
                raise HttpError(404, f"Unable to find experiment {segs[4]}")
            ctx.via = "project"
            return self._experiment_route(ctx, experiment, segs[5:])
        if kind == "resources" and len(segs) == 2:
            self._readable_project(ctx, project_id, "resources")
            return self._listing(ctx, [], RESOURCE_COLUMNS, None, uri=False, title="Resources")
        raise HttpError(404, "The server has not found anything matching the request URI")

    def _subject_row(self, subject: Any, project: str | None = None) -> dict[str, str]:
        listed_in = project or subject.project  # the project it is shared into, when listed there
        return {
            "ID": subject.id,
            "project": listed_in,
            "label": subject.label_in(listed_in),
            "insert_date": java_timestamp(subject.insert_date),
            "insert_user": subject.insert_user,
            "last_modified": java_timestamp(subject.last_modified),
            "xsiType": "xnat:subjectData",
            "URI": f"/data/subjects/{subject.id}",
        }

    def _subject_route(self, ctx: Ctx, project_id: str, key: str, subject: Any) -> Response:
        method = ctx.request.method
        if method == "PUT":
            if subject is None:
                subject = self.archive.add_subject(project_id, key)
                return Response(subject.id, status=201, mimetype="text/plain")
            new_label = ctx.request.args.get("label")
            if new_label and new_label != subject.label:
                self.archive.rename_subject(subject.id, new_label)
            return Response(subject.id, mimetype="text/plain")
        if subject is None:
            raise HttpError(404, f"Unable to find subject {key}")
        if method != "GET":
            raise HttpError(405, "Method Not Allowed")
        fields = {"ID": subject.id, "project": subject.project, "label": subject.label}
        return self._single(ctx, "xnat:subjectData", fields, subject.last_modified, [])

    # -- experiments ------------------------------------------------------------------------

    def _experiment_by_id(self, ctx: Ctx, key: str) -> Experiment:
        experiment = self.archive.experiments.get(key)
        if experiment is None:
            raise HttpError(404, f"Unable to find experiment {key}")
        if not any(ctx.user.can_read(p) for p in (experiment.project, *experiment.shares)):
            raise HttpError(403, f"Specified user account has insufficient privileges for experiments in the {experiment.project} project.")
        return experiment

    def _experiment_row(self, experiment: Experiment, project: str | None = None) -> dict[str, str]:
        """A listing row; in the listing of a project the session is shared into, XNAT gives the
        label it has there, but its own (primary) project and its subject's own label: those
        columns are xnat:experimentData/project and xnat:subjectData/label, and ProjSubExptList
        replaces only `label` by the share's."""
        subject = self.archive.subjects.get(experiment.subject_id)
        listed_in = project or experiment.project
        return {
            "ID": experiment.id,
            "project": experiment.project,
            "date": experiment.date,
            "xsiType": experiment.xsi_type,
            "label": experiment.label_in(listed_in),
            "insert_date": java_timestamp(experiment.insert_date),
            "subject_ID": experiment.subject_id,
            "subject_label": subject.label if subject else "",
            "last_modified": java_timestamp(experiment.last_modified),
            "insert_user": experiment.insert_user,
            "time": experiment.time,
            "modality": experiment.modality,
            EXPERIMENT_ROOT_KEY: experiment.id,
            "URI": f"/data/experiments/{experiment.id}",
        }

    def _experiment_listing(self, ctx: Ctx, project: str | None, subject: str | None) -> Response:
        if ctx.request.method != "GET" and ctx.request.method != "HEAD":
            raise HttpError(405, "Method Not Allowed")
        rows = [
            self._experiment_row(e, project)
            for e in self.archive.sessions(project)
            if (subject is None or e.subject_id == subject) and ctx.user.can_read(project or e.project)
        ]
        defaults = SITE_EXPERIMENT_COLUMNS if project is None else EXPERIMENT_COLUMNS + (EXPERIMENT_ROOT_KEY,)
        return self._listing(ctx, rows, defaults, EXPERIMENT_COLUMNS + EXPERIMENT_EXTRA, uri=True)

    def _create_session(self, ctx: Ctx, project_id: str, subject_id: str, label: str) -> Response:
        args = ctx.request.args
        xsi_type = args.get("xsiType") or "xnat:mrSessionData"
        edits = _field_edits(args)
        edits.pop("label", None)  # the label is the URL's last segment
        experiment = self.archive.add_session(
            project_id,
            subject_id,
            label,
            date=edits.pop("date", None),
            time=edits.pop("time", ""),
            xsi_type=xsi_type,
            insert_user=ctx.user.login,
        )
        if edits:
            # Creation is one save in XNAT: fold the remaining fields in without a second bump.
            for name, value in edits.items():
                setattr(experiment, name, value)
        return Response(experiment.id, status=201, mimetype="text/plain")

    def _experiment_route(self, ctx: Ctx, experiment: Experiment, tail: list[str]) -> Response:
        method = ctx.request.method
        if not tail:
            if method == "DELETE":
                self.archive.delete_session(experiment.id)
                return Response("", mimetype="text/plain")
            if method == "PUT":
                edits = _field_edits(ctx.request.args)
                body = ctx.request.get_data().strip()  # an XML re-upload: a re-save with its fields
                if body or edits:
                    self.archive.set_fields(experiment.id, **{**(_xml_fields(body) if body else {}), **edits})
                return Response(experiment.id, mimetype="text/plain")
            if method not in ("GET", "HEAD"):
                raise HttpError(405, "Method Not Allowed")
            return self._experiment_single(ctx, experiment)
        if tail[0] == "resources" and len(tail) == 1:
            return self._listing(ctx, [], RESOURCE_COLUMNS, None, uri=False, title="Resources")
        if tail[0] == "projects" and len(tail) == 2 and method == "PUT":  # share into project tail[1]
            target = self._readable_project(ctx, tail[1])
            self.archive.share_session(experiment.id, target, ctx.request.args.get("label") or None)
            return Response(experiment.id, mimetype="text/plain")
        if tail[0] != "scans":
            raise HttpError(404, "The server has not found anything matching the request URI")
        if len(tail) == 1:
            rows = [self._scan_row(experiment, s) for s in list(experiment.scans.values())]
            return self._listing(ctx, rows, SCAN_COLUMNS, SCAN_COLUMNS, uri=True)
        scan_key = tail[1]
        if len(tail) >= 3 and tail[2] == "files":
            return self._files(ctx, experiment, self._select_scans(experiment, scan_key), "ALL", tail[3:])
        if len(tail) == 2 and method == "PUT":
            return self._put_scan(ctx, experiment, scan_key)
        if tail[2:] == ["resources"] or (len(tail) >= 5 and tail[2] == "resources" and tail[4] == "files"
                                         and method not in ("PUT", "POST")):
            # As in scans/{key}/files, the scan segment may be an ID, a scan type, a comma list or ALL.
            scans = self._select_scans(experiment, scan_key)
            if not scans:
                raise HttpError(404, f"Unable to find scan {scan_key}")
            if len(tail) == 3:
                rows = [_resource_row(scan, r) for scan in scans for r in list(scan.resources.values())]
                return self._listing(ctx, rows, RESOURCE_COLUMNS, None, uri=False, title="Resources")
            return self._files(ctx, experiment, scans, tail[3], tail[5:])
        scan = experiment.scans.get(scan_key)
        if scan is None:
            raise HttpError(404, f"Unable to find scan {scan_key}")
        if len(tail) == 2:
            if method == "DELETE":
                del experiment.scans[scan.id]
                return Response("", mimetype="text/plain")
            return self._scan_single(ctx, experiment, scan)
        if tail[2] != "resources":
            raise HttpError(404, "The server has not found anything matching the request URI")
        res_key = tail[3]
        if len(tail) == 4:
            if method == "PUT":
                res = scan.find_resource(res_key) or self.archive.add_resource(
                    experiment.id, scan.id, res_key, ctx.request.args.get("format", "")
                )
                return Response(res.id, mimetype="text/plain")
            res = scan.find_resource(res_key)
            if res is None:
                raise HttpError(404, f"Unable to find resource {res_key}")
            item = self._resource_item(experiment, scan, res)
            return self._single(ctx, "xnat:resourceCatalog", item["data_fields"], experiment.last_modified, [])
        if tail[4] != "files":
            raise HttpError(404, "The server has not found anything matching the request URI")
        if len(tail) > 5:
            return self._upload(ctx, experiment, scan, res_key, "/".join(tail[5:]))
        raise HttpError(405, "Method Not Allowed")

    def _experiment_single(self, ctx: Ctx, experiment: Experiment) -> Response:
        scan_items = [self._scan_item(experiment, s) for s in list(experiment.scans.values())]
        fields: dict[str, Any] = {
            "ID": experiment.id,
            "id": experiment.id,
            "label": experiment.label,
            "project": experiment.project,
            "subject_ID": experiment.subject_id,
            "modality": experiment.modality,
        }
        if experiment.date:
            fields["date"] = experiment.date
        if experiment.time:
            fields["time"] = experiment.time
        if experiment.note:
            fields["note"] = experiment.note
        children = [{"field": "scans/scan", "items": scan_items}] if scan_items else []
        if experiment.shares:
            shares = [{"children": [], "meta": {"create_event_id": 0, "xsi:type": "xnat:experimentData_share",
                                                "isHistory": False},
                       "data_fields": {"project": project, "label": label}}
                      for project, label in sorted(experiment.shares.items())]
            children.append({"field": "sharing/share", "items": shares})
        return self._single(ctx, experiment.xsi_type, fields, experiment.last_modified, children)

    def _put_scan(self, ctx: Ctx, experiment: Experiment, scan_id: str) -> Response:
        args = ctx.request.args
        existing = experiment.scans.get(scan_id)
        xsi_type = args.get("xsiType") or (existing.xsi_type if existing else None)
        scan_type = _typed_arg(args, "type")
        description = _typed_arg(args, "series_description")
        if existing is None:
            scan = self.archive.add_scan(
                experiment.id, scan_id, type=scan_type or "", series_description=description, xsi_type=xsi_type
            )
            return Response(scan.id, status=201, mimetype="text/plain")
        if scan_type is not None:
            existing.type = scan_type
        if description is not None:
            existing.series_description = description
        return Response(existing.id, mimetype="text/plain")

    # -- scans, resources, files ------------------------------------------------------------

    def _scan_row(self, experiment: Experiment, scan: Scan) -> dict[str, str]:
        return {
            "xnat_imagescandata_id": scan.xnat_imagescandata_id,
            "ID": scan.id,
            "type": scan.type,
            "quality": scan.quality,
            "xsiType": scan.xsi_type,
            "note": scan.note,
            "series_description": scan.series_description,
            "URI": f"/data/experiments/{experiment.id}/scans/{scan.id}",
        }

    def _scan_item(self, experiment: Experiment, scan: Scan) -> dict[str, Any]:
        resources = [self._resource_item(experiment, scan, r) for r in list(scan.resources.values())]
        fields: dict[str, Any] = {
            "ID": scan.id,
            "type": scan.type,
            "series_description": scan.series_description,
            "quality": scan.quality,
            "xnat_imagescandata_id": int(scan.xnat_imagescandata_id),
            "image_session_ID": experiment.id,
            "project": experiment.project,
        }
        if scan.note:
            fields["note"] = scan.note
        return {
            "meta": {"isHistory": False, "xsi:type": scan.xsi_type, "start_date": java_date(experiment.last_modified)},
            "data_fields": fields,
            "children": [{"field": "file", "items": resources}] if resources else [],
        }

    def _resource_item(self, experiment: Experiment, scan: Scan, res: Resource) -> dict[str, Any]:
        catalog = f"/data/xnat/archive/{experiment.project}/arc001/{experiment.label}/SCANS/{scan.id}/{res.label}"
        return {
            "meta": {"isHistory": False, "xsi:type": "xnat:resourceCatalog"},
            "data_fields": {
                "xnat_abstractresource_id": int(res.id),
                "label": res.label,
                "format": res.format,
                "content": res.content,
                "file_count": len(res.files),
                "file_size": res.file_size,
                "URI": f"{catalog}/scan_{scan.id}_catalog.xml",
            },
            "children": [],
        }

    def _scan_single(self, ctx: Ctx, experiment: Experiment, scan: Scan) -> Response:
        item = self._scan_item(experiment, scan)
        return self._single(ctx, item["meta"]["xsi:type"], item["data_fields"], experiment.last_modified,
                            item["children"])

    def _select_scans(self, experiment: Experiment, key: str) -> list[Scan]:
        """A scans segment as XNATTemplate reads it: `ALL` or `*`, else a comma list whose parts
        each match a scan ID or a scan type; `NULL` matches untyped scans, `[SLASH]` and `[COMMA]`
        stand for a `/` and a `,` in a type. Scans come in the session's order."""
        scans = list(experiment.scans.values())  # a snapshot, safe against concurrent writers
        key = key.replace("[SLASH]", "/")
        if key in ("ALL", "*"):
            return scans
        parts = [p for p in key.split(",") if p]  # StringUtils.split drops empty parts
        types = {"" if p == "NULL" else p.replace("[COMMA]", ",") for p in parts}
        return [s for s in scans if s.id in parts or s.type in types]

    def _files(self, ctx: Ctx, experiment: Experiment, scans: list[Scan], res_key: str, rest: list[str]) -> Response:
        selected: list[tuple[Scan, Resource]] = []
        keys = None if res_key == "ALL" else res_key.split(",")
        for scan in scans:
            if keys is None:
                selected.extend((scan, r) for r in list(scan.resources.values()))
            else:
                for key in keys:
                    res = scan.find_resource(key)
                    if res is not None:
                        selected.append((scan, res))
        if rest:
            relpath = "/".join(rest)
            for scan, res in selected:
                entry = res.files.get(relpath)
                if entry is not None:
                    if ctx.request.method == "DELETE":
                        del res.files[relpath]
                        return Response("", mimetype="text/plain")
                    return _file_response(entry)
            raise HttpError(404, "Unable to find file.")
        if ctx.fmt in ARCHIVE_FORMATS:
            if not selected or not any(r.files for _, r in selected):
                if ctx.request.args.get("accept-not-found") == "true":
                    return Response(status=204)
                raise HttpError(404, "Unable to find file.")
            structure = ctx.request.args.get("structure", "")
            return _archive_response(experiment, selected, structure, ctx.fmt)
        if not scans or (keys is not None and not selected):
            raise HttpError(404, f"Unable to find resource {res_key}")
        rows = []
        for scan, res in selected:
            if ctx.via == "project":
                base = (
                    f"/data/projects/{experiment.project}/subjects/{experiment.subject_id}"
                    f"/experiments/{experiment.id}"
                )
            else:
                base = f"/data/experiments/{experiment.id}"
            for entry in list(res.files.values()):
                rows.append(
                    {
                        "Name": entry.name,
                        "Size": str(entry.size),
                        "URI": f"{base}/scans/{scan.id}/resources/{res.id}/files/{entry.path}",
                        "collection": res.label,
                        "file_tags": "",
                        "file_format": res.format,
                        "file_content": res.content,
                        "cat_ID": res.id,
                        "digest": entry.md5 if self.archive.checksums else "",
                    }
                )
        return self._listing(ctx, rows, FILE_COLUMNS, None, uri=False, title="Files", file_listing=True)

    def _upload(self, ctx: Ctx, experiment: Experiment, scan: Scan, res_key: str, relpath: str) -> Response:
        request = ctx.request
        if request.mimetype == "multipart/form-data":
            data = next(iter(request.files.values())).read() if request.files else b""
        else:  # the body as sent, whatever type it claims (curl --data-binary says a form's)
            data = request.get_data()
        res = scan.find_resource(res_key)
        label = res.label if res is not None else res_key
        existed = res is not None and relpath in res.files
        if existed and request.args.get("overwrite", "false").lower() != "true":
            raise HttpError(409, f"File {relpath} already exists.")
        self.archive.upload_file(experiment.id, scan.id, label, relpath, data)
        return Response("", status=200 if existed else 201, mimetype="text/plain")

    # -- rendering --------------------------------------------------------------------------

    def _single(
        self, ctx: Ctx, xsi_type: str, fields: dict[str, Any], modified: datetime | None, children: list[Any]
    ) -> Response:
        if ctx.fmt == "xml":
            return Response(item_document(xsi_type, fields, children), mimetype="text/xml")
        if ctx.fmt not in ("", "json"):
            raise HttpError(400, f"Unsupported format {ctx.fmt}")
        meta: dict[str, Any] = {"isHistory": False, "xsi:type": xsi_type}
        if modified is not None:
            # XNAT puts row_last_modified here, not the insert date (xnatpy calls it insert_date).
            meta["start_date"] = java_date(modified)
        return _json({"items": [{"children": children, "meta": meta, "data_fields": fields}]})

    def _listing(
        self,
        ctx: Ctx,
        rows: list[dict[str, str]],
        defaults: Sequence[str],
        available: Sequence[str] | None,
        *,
        uri: bool,
        title: str | None = None,
        file_listing: bool = False,
    ) -> Response:
        """Filter, project and render a listing. `available=None`: fixed columns, `columns=` ignored."""
        args = ctx.request.args
        known = list(available) if available is not None else list(defaults)
        rows = [r for r in rows if _row_matches(r, args, known)]
        columns = list(defaults)
        requested = args.get("columns")
        if available is not None and requested:
            columns = []
            for name in requested.split(","):
                column = _resolve_column(name.strip(), known)
                if column is not None and column not in columns:
                    columns.append(column)
        if uri and "URI" not in columns:
            columns.append("URI")
        table = [{c: r.get(c, "") for c in columns} for r in rows]
        if ctx.fmt == "json":
            if "time" in columns:
                # XNAT's JSON writer formats Time cells with milliseconds; CSV keeps HH:MM:SS.
                for row in table:
                    if re.fullmatch(r"\d{2}:\d{2}:\d{2}", row["time"]):
                        row["time"] += ".000"
            result: dict[str, Any] = {"Result": table}
            if file_listing:
                result["Columns"] = [{"key": "URI", "serverRoot": ""}]
            else:
                result["totalRecords"] = str(len(table))
            if title:
                result["title"] = title
            return _json({"ResultSet": result})
        if ctx.fmt == "csv":
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(columns)
            for row in table:
                writer.writerow([row[c] for c in columns])
            return Response(buffer.getvalue(), mimetype="text/csv")
        if ctx.fmt == "xml":
            attributes = {"title": title} if title else {}
            if not file_listing:
                attributes["totalRecords"] = str(len(table))
            properties = {"URI": {"serverRoot": ""}} if file_listing else {}
            return Response(_xml_result_set(columns, table, attributes, properties), mimetype="text/xml")
        if ctx.fmt in ("", "html"):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(row[c])}</td>" for c in columns) + "</tr>" for row in table
            )
            return Response(f"<html><body><table><tr>{head}</tr>{body}</table></body></html>", mimetype="text/html")
        raise HttpError(400, f"Unsupported format {ctx.fmt}")


# -- helpers (module-private) -------------------------------------------------------------------


def _json(payload: Any) -> Response:
    return Response(json.dumps(payload), mimetype="application/json")


XDAT_XSD = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    '<xs:schema targetNamespace="http://nrg.wustl.edu/xdat" xmlns:xdat="http://nrg.wustl.edu/xdat" '
    'xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified"/>\n'
)

SEARCH_ELEMENTS = (
    ("xnat:projectData", "Project", "Projects"),
    ("xnat:subjectData", "Subject", "Subjects"),
    ("xnat:mrSessionData", "MR Session", "MR Sessions"),
    ("xnat:ctSessionData", "CT Session", "CT Sessions"),
    ("xnat:petSessionData", "PET Session", "PET Sessions"),
)
_SESSION_FIELDS = ("EXPT_ID", "LABEL", "PROJECT", "SUBJECT_ID", "SUBJECT_LABEL", "DATE", "INSERT_DATE", "LAST_MODIFIED")
SEARCH_FIELDS: dict[str, tuple[str, ...]] = {
    "xnat:projectData": ("ID", "NAME", "DESCRIPTION"),
    "xnat:subjectData": ("SUBJECT_ID", "SUBJECT_LABEL", "INSERT_DATE"),
    "xnat:mrSessionData": _SESSION_FIELDS,
    "xnat:ctSessionData": _SESSION_FIELDS,
    "xnat:petSessionData": _SESSION_FIELDS,
}


def _xml_text(value: str) -> str:
    """A cell or attribute as XNAT writes it (XFTTable.toXMLList): only `<` and `>` are escaped,
    so a value with `&` makes the document ill-formed there as well."""
    return value.replace(">", "&gt;").replace("<", "&lt;")


def _xml_result_set(
    columns: Sequence[str], table: list[dict[str, str]], attributes: dict[str, str],
    properties: dict[str, dict[str, str]],
) -> str:
    """A listing as XMLTableRepresentation writes it: no declaration, no namespace; the table's
    parameters (`totalRecords`, `title`) as attributes of `ResultSet`, column properties (the file
    listing's `serverRoot` of `URI`) as attributes of `column`, one line per row."""
    head = "".join(f' {k}="{_xml_text(v)}"' for k, v in attributes.items())
    cols = "".join(
        "<column" + "".join(f' {k}="{_xml_text(v)}"' for k, v in properties.get(c, {}).items()) + f">{c}</column>"
        for c in columns
    )
    rows = "".join("<row>" + "".join(f"<cell>{_xml_text(row[c])}</cell>" for c in columns) + "</row>\n"
                   for row in table)
    return f"<ResultSet{head}><results><columns>{cols}</columns>\n<rows>{rows}</rows></results></ResultSet>"


def _resolve_column(name: str, available: Sequence[str]) -> str | None:
    """Map a requested column (alias or xpath, any case) to its short alias, or None if unknown."""
    lowered = name.lower()
    if "/" in lowered:
        alias = XPATH_ALIASES.get(lowered)
        if alias is not None:
            return alias if alias in available else None
        lowered = lowered.rsplit("/", 1)[-1]
    return next((c for c in available if c.lower() == lowered), None)


def _value_matches(value: str, pattern: str, column: str) -> bool:
    if column == "date":
        span = re.fullmatch(r"(\d{4}-\d{2}-\d{2})-(\d{4}-\d{2}-\d{2})", pattern)
        if span:
            return bool(value) and span.group(1) <= value <= span.group(2)
    regex = "^" + ".*".join(re.escape(part) for part in pattern.split("*")) + "$"
    return re.match(regex, value, re.IGNORECASE) is not None


def _row_matches(row: dict[str, str], args: Any, available: Sequence[str]) -> bool:
    for key, value in args.items(multi=True):
        is_type = key.lower() == "xsitype"  # a filter key, matched without case as the others are
        if key.lower() in RESERVED_QUERY and not is_type:
            continue
        if is_type and "xsiType" in row:
            types = (row["xsiType"],) + SUPERTYPES.get(row["xsiType"], ())
            if not any(_value_matches(t, p, "xsiType") for p in value.split(",") for t in types):
                return False
            continue
        column = _resolve_column(key, available)
        if column is None or column not in row:
            continue
        if not any(_value_matches(row[column], p, column) for p in value.split(",")):
            return False
    return True


def _xml_fields(body: bytes) -> dict[str, str]:
    """The session fields a re-uploaded XML document sets: its `label` attribute and its
    date/time/note elements (any namespace prefix)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as exc:
        raise HttpError(400, f"Unable to parse the XML document: {exc}") from None
    fields = {"label": root.get("label")} if root.get("label") else {}
    for child in root:
        name = child.tag.rpartition("}")[2]
        if name in ("date", "time", "note") and child.text is not None:
            fields[name] = child.text.strip()
    return fields


def _typed_arg(args: Any, name: str) -> str | None:
    """A field given as `name=` or as an xpath such as `xnat:mrScanData/type=`."""
    for key, value in args.items():
        if key == name or (key.lower().endswith("/" + name.lower()) and ":" in key):
            return value
    return None


def _field_edits(args: Any) -> dict[str, str]:
    """Session fields a PUT edits: `date=` or `xnat:mrSessionData/date=` (any type prefix), etc."""
    edits: dict[str, str] = {}
    for name in ("date", "time", "note", "label"):
        value = _typed_arg(args, name)
        if value is not None:
            edits[name] = value
    return edits


def _resource_row(scan: Scan, res: Resource) -> dict[str, str]:
    return {
        "xnat_abstractresource_id": res.id,
        "label": res.label,
        "element_name": "xnat:resourceCatalog",
        "category": "scans",
        "cat_id": scan.id,
        "cat_desc": scan.series_description,
        "file_count": str(len(res.files)),
        "file_size": str(res.file_size),
        "tags": "",
        "content": res.content,
        "format": res.format,
    }


def _file_response(entry: FileEntry) -> Response:
    mimetype = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
    if entry.name.lower().endswith(".dcm"):
        mimetype = "application/dicom"
    response = Response(PiecesBody(entry.pieces), mimetype=mimetype, direct_passthrough=True)
    response.headers["Content-Length"] = str(entry.size)
    return response


class PiecesBody:
    """A response body made of bytes and `(fd, offset, count)` file ranges (`FileEntry.pieces`,
    `zip_pieces`): a server that can use sendfile(2) sends the pieces (see `serve.py`); any other
    iterates the bytes."""

    def __init__(self, pieces: Callable[[], Iterator[bytes | tuple[int, int, int]]]):
        self.pieces = pieces

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.pieces():
            if isinstance(piece, bytes):
                if piece:
                    yield piece
                continue
            fd, offset, count = piece
            end = offset + count
            while offset < end:
                chunk = os.pread(fd, min(CHUNK_SIZE, end - offset), offset)
                if not chunk:
                    raise OSError(f"file behind descriptor {fd} ended {end - offset} bytes early")
                yield chunk
                offset += len(chunk)


def _error_page(exc: HttpError | ArchiveError) -> Response:
    response = status_page(exc.status, exc.message)
    if isinstance(exc, HttpError):
        response.headers.update(exc.headers)
    return response


def _zip_entry_name(experiment: Experiment, scan: Scan, res: Resource, relpath: str, structure: str,
                    typed: dict[str, str] | None = None, tar: bool = False) -> str:
    """An entry's name in a zip (or tar) of files, made as XNAT's FileList makes it. The default
    structure (RestFileUtils.buildRelativePath) is plain string replacement on the file's URI: cut
    at the session's ID, that ID replaced by the label everywhere, `/{resource id}/files/` by the
    label, then every `/{scan id}/` by `/{scan id}-{type}/` for each typed scan in the request
    (`typed`). `simplified` is the same without the type remaps and with every `/resources` and
    `/files` cut out; `improved` is `scans/{id}_{type}/{label}/` (no type in a tar) and the path
    after the URI's last `/files/`; `legacy` the file's absolute path."""
    if structure == "legacy":
        return f"data/xnat/archive/{experiment.project}/arc001/{experiment.label}/SCANS/{scan.id}/{res.label}/{relpath}"
    uri = f"{experiment.id}/scans/{scan.id}/resources/{res.id}/files/{relpath}"
    if structure == "improved":
        folder = scan.id
        if scan.type and not tar:  # tar names are kept short (its old 100-character limit)
            folder += "_" + re.sub(r'[/\\:*?"<>|]', "_", scan.type)
        return f"scans/{folder}/{res.label}/{uri.rpartition('/files/')[2]}"
    name = uri.replace(experiment.id, experiment.label).replace(f"/{res.id}/files/", f"/{res.label}/files/")
    if structure == "simplified":
        return name.replace("/resources", "").replace("/files", "")
    for scan_id, folder in (typed or {}).items():
        name = name.replace(f"/{scan_id}/", f"/{folder}/")
    return name


def _zip_type(scan_type: str) -> str:
    return re.sub(r"\W", "_", scan_type, flags=re.ASCII)  # Java's \W is ASCII-only


# format= of a download -> (Content-Type, file name extension), as XNAT's ZipRepresentation.
ARCHIVE_FORMATS = {
    "zip": ("application/zip", "zip"),
    "tar": ("application/x-tar", "tar"),
    "tar.gz": ("application/x-gtar", "tar.gz"),
}


def _archive_response(experiment: Experiment, selected: list[tuple[Scan, Resource]], structure: str,
                      fmt: str) -> Response:
    """The selected files as one zip, tar or gzipped tar, streamed (no Content-Length, as XNAT)."""
    tar = fmt != "zip"
    typed = {scan.id: f"{scan.id}-{_zip_type(scan.type)}" for scan, _ in selected if scan.type}  # getReMaps
    entries = [
        (_zip_entry_name(experiment, scan, res, entry.path, structure, typed, tar), entry)
        for scan, res in selected
        for entry in list(res.files.values())
    ]
    body: Iterable[bytes]
    if fmt == "zip":
        # Entries are STORED, as DICOM barely compresses.
        stamp = experiment.last_modified.timetuple()[:6]
        body = PiecesBody(lambda: zip_pieces(entries, stamp))
    else:
        mtime = int(experiment.last_modified.replace(tzinfo=timezone.utc).timestamp())
        body = PiecesBody(lambda: tar_pieces(entries, mtime))
        if fmt == "tar.gz":
            body = _gzipped(body)
    mimetype, extension = ARCHIVE_FORMATS[fmt]
    response = Response(body, mimetype=mimetype, direct_passthrough=True)
    response.headers["Content-Disposition"] = f'attachment; filename="{experiment.id}.{extension}"'
    return response


def _gzipped(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """`chunks` through gzip at Java's default level (XNAT wraps its tar in a GZIPOutputStream)."""
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    for chunk in chunks:
        packed = compressor.compress(chunk)
        if packed:
            yield packed
    yield compressor.flush()


def _drop_connection(request: Request, reset: bool = True) -> None:
    """End the TCP connection now: `reset` aborts it (RST on close), otherwise only our side is closed.

    The server's later writes then fail quietly (werkzeug treats them as a dropped connection).
    """
    # cheroot (serve.py) and werkzeug (pytest-httpserver) each hand over the socket under their own key.
    sock = request.environ.get("emulator.socket") or request.environ.get("werkzeug.socket")
    if sock is None:
        return
    try:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _body_chunks(response: Response) -> Iterator[bytes]:
    for chunk in response.iter_encoded():
        if chunk:
            yield chunk


def _corrupt(response: Response) -> Response:
    """Flip the first byte of the body, keeping its length, so a digest check fails."""

    def generate() -> Iterator[bytes]:
        flipped = False
        for chunk in _body_chunks(response):
            if not flipped:
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                flipped = True
            yield chunk

    corrupted = Response(generate(), status=response.status_code, direct_passthrough=True)
    corrupted.headers = response.headers.copy()
    return corrupted


def _truncate(response: Response, fault: Fault, request: Request) -> Response:
    """Announce the whole body but send only part of it, then drop the connection."""
    length_header = response.headers.get("Content-Length")
    if length_header is None and not response.is_streamed:
        length_header = str(len(response.get_data()))

    def generate() -> Iterator[bytes]:
        if length_header is not None:
            keep = int(int(length_header) * fault.fraction)
            sent = 0
            for chunk in _body_chunks(response):
                if sent + len(chunk) >= keep:
                    if keep > sent:
                        yield chunk[: keep - sent]
                    break
                sent += len(chunk)
                yield chunk
        else:
            # Unknown length (a streamed zip): hold one chunk back and cut the last one short.
            previous: bytes | None = None
            for chunk in _body_chunks(response):
                if previous is not None:
                    yield previous
                previous = chunk
            if previous:
                yield previous[: int(len(previous) * fault.fraction)]
        _drop_connection(request, reset=False)

    truncated = Response(generate(), status=response.status_code, direct_passthrough=True)
    truncated.headers = response.headers.copy()
    if length_header is not None:
        truncated.headers["Content-Length"] = length_header
    return truncated
