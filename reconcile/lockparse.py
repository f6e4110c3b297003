"""A lock's text -> its validated document: toml-rs when it parses the text, tomllib for anything
else and for the wording of errors; LockfileError for anything but a valid lock. Also `gc_paused`,
for code that builds much lock data at once. Builds no records and reads no files.
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys
from collections.abc import Iterator
from typing import Any

from reconcile.errors import LockfileError
from reconcile.lockcheck import _problems, _raise_invalid
from reconcile.lockdoc import FORMAT_VERSION

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib
try:  # a Rust TOML parser, ~10x faster than tomllib; none for Python 3.10
    import toml_rs
except ImportError:  # pragma: no cover
    toml_rs = None

_DUPLICATE_SESSION = re.compile(r"Cannot declare \('sessions', '([^']*)'\) twice")


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
    """The validated document of a lock's text; LockfileError when it is not a valid lock."""
    doc = _fast_document(text)
    if doc is not None and not _problems(doc):
        return doc
    # Anything but a valid lock is parsed again by tomllib: its errors are the ones reported.
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
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
