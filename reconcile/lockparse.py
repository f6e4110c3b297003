"""A lock's bytes -> its validated document: toml-rs when it parses the text, tomllib for anything
else and for the wording of errors; LockfileError for anything but a valid lock. A file laid out
as `write_lock` writes it is parsed session by session, which also tells where each session's text
lies. Also `gc_paused`, for code that builds much lock data at once. Builds no records and reads
no files.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import marshal
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any, AnyStr, NamedTuple

from reconcile.errors import LockfileError
from reconcile.forked import map_forked, split
from reconcile.lockcheck import _problems, _raise_invalid, _sessions_valid
from reconcile.lockdoc import (
    _HEADER_FIELDS,
    FORMAT_VERSION,
    TRAILER,
    TRAILER_BLOCK,
    _canonical_session,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
try:  # a Rust TOML parser, ~10x faster than tomllib; none for Python 3.10
    import toml_rs
except ImportError:  # pragma: no cover
    toml_rs = None

_DUPLICATE_SESSION = re.compile(r"Cannot declare \('sessions', '([^']*)'\) twice")
# Where a session's fragment starts in a file laid out as `write_lock` writes it: a line of its
# own. Searched for from the newline before it: a pattern led by `^` is tried at every byte
# (0.56-0.88 s of a cold read of 74 MB), one led by a literal jumps from candidate to candidate.
_SESSION_START = re.compile(rb"\[sessions\.([A-Za-z0-9_-]+)\]$", re.MULTILINE)
_SESSION_LINE = re.compile(rb"\n\[sessions\.([A-Za-z0-9_-]+)\]$", re.MULTILINE)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector. Parsing a large lock, or listing and planning, allocates
    millions of objects that all survive and form no cycles; the collector would rescan the
    growing heap again and again for nothing (half of a lock build, a third of a 10,000-session
    plan). Reference counting still frees everything as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _fast_document(text: str) -> dict[str, Any] | None:
    """toml-rs's document of `text` (strict TOML 1.0, which gives tomllib's), or None if it fails."""
    if toml_rs is None or text.startswith("\ufeff"):  # tomllib refuses a byte order mark, toml-rs skips it
        return None
    try:
        return toml_rs.loads(text, toml_version="1.0.0")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # also a Rust panic; tomllib decides, and words the error
        return None


def _parse(text: str, source: str) -> dict[str, Any]:
    """The validated document of a lock's text, ended by its trailer where its format has one;
    LockfileError when it is not a valid lock."""
    doc = _valid_document(text, source)
    _check_ended(doc, text[-_TAIL:].encode(), source)
    return doc


def _valid_document(text: str, source: str) -> dict[str, Any]:
    doc = _fast_document(text)
    if doc is not None and not _problems(doc):
        return doc
    # Anything but a valid lock is parsed again by tomllib: its errors are the ones reported.
    if not text.strip():
        raise LockfileError(f"{source}: the file is empty (cut short by a full disk or a failed copy?)",
                            hint="restore it (from git: `git checkout -- .xnat2bids.lock`, or a backup), "
                                 "or move it away to start afresh")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = conflict_marker_line(text)
        if line is not None:
            raise LockfileError(f"{source}: unresolved git merge conflict (a conflict marker at line {line})",
                                hint="keep each session whole (its [sessions.ID] table and the [[sessions.ID.…]] "
                                     "tables after it) from one side or both, a serial above both sides', delete the marker "
                                     "lines, then run `xnat2bids check`; `xnat2bids merge-lock --help` sets up git "
                                     "to merge locks session by session from then on") from exc
        if text.startswith("\ufeff"):
            raise LockfileError(f"{source}: starts with a byte order mark, which TOML does not allow "
                                "(an editor added it)", hint="save the file as UTF-8 without BOM") from exc
        duplicate = _DUPLICATE_SESSION.search(str(exc))
        if duplicate:
            raise LockfileError(
                f"{source}: session {duplicate.group(1)} appears twice ({str(exc)[duplicate.end():].strip(' ()')})"
            ) from exc
        raise LockfileError(f"{source}: not valid TOML: {exc}") from exc
    version = doc.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        # Checked before the schema: a newer format may legitimately have fields this one lacks.
        raise LockfileError(
            f"{source}: written by a newer xnat2bids (format {version}); upgrade",
            hint="install a newer xnat2bids to use this BIDS root",
        )
    problems = _problems(doc)
    if problems:
        _raise_invalid(f"{source}: invalid lock", problems)
    return doc


_TAIL = 4 * len(TRAILER_BLOCK)  # enough of the file's end to find its trailer, whitespace after it included


def _ends(data: bytes) -> int | None:
    """Where the text before the trailer of a format 3 lock ends; None when it has none."""
    for block in (TRAILER_BLOCK, TRAILER_BLOCK.rstrip(b"\n")):  # an editor may drop the final newline
        if data.endswith(block):
            return len(data) - len(block)
    return None


def _check_ended(header: Mapping[str, Any], tail: bytes, source: str) -> None:
    """A format 3 lock without its trailer as its last line was cut short: sessions, or outputs of
    the last one, may be missing though what is left parses. `tail`: the file's last bytes."""
    if header["format_version"] >= 3 and not tail.rstrip().endswith(b"\n" + TRAILER.strip().encode()):
        raise LockfileError(
            f"{source}: the file ends before its last line `{TRAILER.strip()}`: cut short (a full disk, "
            "a failed copy?); sessions or outputs may be missing",
            hint="restore it (from git: `git checkout -- .xnat2bids.lock`, or a backup); if you edited it by "
                 "hand and it is whole, end it with that line again",
        )


# What git leaves at the start of a line of a file it could not merge (diff3 style's `|||||||` too;
# CRLF after `=======` in a file with CRLF lines). Searched for from the newline before it: a
# pattern led by a literal jumps from newline to newline, one led by `^` is tried at every byte.
_MARKER = r"(?:<{7}|={7}|>{7}|\|{7})(?: |\r?$)"
_CONFLICT_MARKER = (re.compile(_MARKER, re.MULTILINE), re.compile("\n" + _MARKER, re.MULTILINE))
_CONFLICT_MARKER_BYTES = tuple(re.compile(p.pattern.encode(), re.MULTILINE) for p in _CONFLICT_MARKER)


def first_conflict_marker(data: AnyStr) -> int | None:
    """Where the first line starting with a git conflict marker starts; None when there is none
    (a 50 MB history is searched in ~40 ms)."""
    first, later = _CONFLICT_MARKER_BYTES if isinstance(data, bytes) else _CONFLICT_MARKER
    if first.match(data):
        return 0
    found = later.search(data)
    return None if found is None else found.start() + 1


def conflict_marker_line(text: str) -> int | None:
    """The line (from 1) of the first git conflict marker in `text`; None when it has none."""
    at = first_conflict_marker(text)
    return None if at is None else text.count("\n", 0, at) + 1

_Spans = dict[str, tuple[int, int]]
# Fewest fragments to parse for a forked child to pay off (`forked`): 0.25-0.4 s of work at
# 2,500-4,000 fragments a second, against a few ms to fork.
FORK_MIN_FRAGMENTS = 1000


class Parsed(NamedTuple):
    """A valid lock file's content, as the lock cache keeps it."""

    header: dict[str, Any]  # the top-level fields but `sessions`
    blobs: dict[str, bytes]  # session key -> its canonical document (`_canonical_session`), marshalled
    spans: _Spans | None  # session key -> where its fragment lies; None: not laid out fragment by fragment
    fragment_digests: dict[str, bytes] | None  # session key -> SHA-256 of its fragment, given `known`


def _parse_bytes(data: bytes, source: str, known: Mapping[str, bytes] | None = None) -> Parsed:
    """The validated content of a lock file's bytes; LockfileError when invalid.

    `known`: session key -> SHA-256 of that session's fragment in a file read before (valid then).
    A fragment with the same bytes means the same session: it is neither parsed nor validated
    again, and its session has no blob (the caller has it)."""
    end = _ends(data)
    laid_out = _by_session(data, known, end)
    if laid_out is not None:
        _check_ended(laid_out.header, data[-_TAIL:], source)
        return laid_out
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LockfileError(f"{source}: not valid TOML: not UTF-8 text (byte {exc.start})") from exc
    doc = _parse(text, source)
    sessions = doc["sessions"]
    blobs = {key: marshal.dumps(_canonical_session(sessions[key])) for key in sorted(sessions)}
    return Parsed({key: doc[key] for key in _HEADER_FIELDS}, blobs, None, None)


def _session_starts(data: bytes) -> Iterator[tuple[int, str]]:
    """Offset and key of each `[sessions.<key>]` line."""
    first = _SESSION_START.match(data)
    if first:
        yield 0, first.group(1).decode()
    for m in _SESSION_LINE.finditer(data):
        yield m.start() + 1, m.group(1).decode()


def _by_session(data: bytes, known: Mapping[str, bytes] | None = None, stop: int | None = None) -> Parsed | None:
    """A valid lock laid out as a header, then one self-contained fragment per session in key
    order (a `[sessions.<key>]` line, up to the next one), parsed fragment by fragment with
    toml-rs. None for any other file, valid or not.

    Each fragment must parse alone to its own session and nothing else, and the header to no
    session, so the whole text means what the parts mean. A write may then copy the fragment of
    an unchanged session from the file instead of serializing it again (tomli-w: ~0.7 ms per
    session), also after a read that found no cache. A fragment edited by hand keeps its form
    until its session changes. A line that looks like a session's start inside a multi-line
    string cuts that string, so its fragment fails to parse and the whole file goes to `_parse`.
    With `known` (see `_parse_bytes`), the fragments it knows are skipped. Many fragments are
    parsed by forked children, a part each (`forked`). `stop`: where the sessions' text ends (the
    trailer's start); the end of `data` if None.
    """
    stop = len(data) if stop is None else stop
    if toml_rs is None or data.startswith(b"\xef\xbb\xbf"):  # a byte order mark: tomllib refuses it
        return None
    starts = list(_session_starts(data))
    if not starts:
        return None
    spans: _Spans = {}
    digests: dict[str, bytes] | None = None if known is None else {}
    todo: list[tuple[str, int, int]] = []
    view, sha256 = memoryview(data), hashlib.sha256
    previous = ""
    for i, (start, key) in enumerate(starts):
        if key <= previous:  # out of order, or twice
            return None
        previous = key
        end = starts[i + 1][0] if i + 1 < len(starts) else stop
        if end < stop and data[end - 2:end] == b"\n\n":
            end -= 1  # the blank line between two fragments is the writer's separator
        spans[key] = (start, end)
        if digests is not None:
            digest = digests[key] = sha256(view[start:end]).digest()
            if known.get(key) == digest:  # type: ignore[union-attr]
                continue  # parsed alone to its own session when it was read before
        todo.append((key, start, end))
    header = _fragment(data[: starts[0][0]])
    # The schema has no rule across sessions: the header and each session can be checked alone.
    if header is None or "sessions" in header or _problems({**header, "sessions": {}}):
        return None
    blobs: dict[str, bytes] = {}
    for part in map_forked(partial(_fragment_blobs, data), split(todo, FORK_MIN_FRAGMENTS)):
        if part is None:
            return None
        blobs.update(part)
    return Parsed(header, blobs, spans, digests)


def _fragment(piece: bytes) -> dict[str, Any] | None:
    """toml-rs's document of a piece of the file; None if it is not UTF-8 or not TOML (`_parse`
    then decides, and words the error)."""
    try:
        text = piece.decode()
    except UnicodeDecodeError:
        return None
    return _fast_document(text)


def _fragment_blobs(data: bytes, todo: Sequence[tuple[str, int, int]]) -> dict[str, bytes] | None:
    """The marshalled canonical document of each session fragment in `todo` (key, start, end), or
    None if one is not a valid session of its own. Runs in forked children: no locks, no hashlib."""
    blobs = {}
    for key, start, end in todo:
        # After a `[sessions]` line: a fragment declaring that table too (allowed once per file,
        # so maybe in each fragment alone) fails here as the whole file would.
        fragment = _fragment(b"[sessions]\n" + data[start:end])
        if fragment is None or len(fragment) != 1 or len(tables := fragment["sessions"]) != 1 or key not in tables:
            return None
        if not _sessions_valid(tables):
            return None
        blobs[key] = marshal.dumps(_canonical_session(tables[key]))
    return blobs
