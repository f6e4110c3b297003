"""Standard output and error under a locale that is not UTF-8 (ISO-8859-1, ASCII on older clusters).

A character such a stream cannot encode is written as an ASCII stand-in (`…` as `...`, `→` as
`->`) or, for any other (an accented XNAT label under ASCII), as a backslash escape; never a
UnicodeEncodeError. Only the two streams: files are written as UTF-8 whatever the locale.
"""

from __future__ import annotations

import codecs
from typing import TextIO

ERRORS = "xnat2bids-stand-in"

# Every symbol the tool prints (and rich's bar, should it draw one), as an ASCII terminal shows it.
STAND_INS = {
    "…": "...", "→": "->", "←": "<-", "↔": "<->", "⇒": "=>", "↑": "^", "↓": "v",
    "✓": "ok", "✔": "ok", "✗": "FAILED", "✘": "FAILED",
    "×": "x", "≤": "<=", "≥": ">=", "≠": "!=", "±": "+/-", "—": "--", "–": "-", "·": "-", "•": "*",
    "‘": "'", "’": "'", "“": '"', "”": '"', "§": "S", "µ": "u", "°": " deg",
    "─": "-", "━": "-", "│": "|", "┃": "|", "╸": "-", "╺": "-", "█": "#", "░": ".", "▏": "|",
    "\u00a0": " ",
}


def _stand_in(exc: UnicodeError) -> tuple[str | bytes, int]:
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    char = exc.object[exc.start]
    if "\udc80" <= char <= "\udcff":  # a file name's undecodable byte (surrogateescape): as it was
        return bytes([ord(char) - 0xDC00]), exc.start + 1
    return STAND_INS.get(char) or char.encode("ascii", "backslashreplace").decode("ascii"), exc.start + 1


codecs.register_error(ERRORS, _stand_in)


def speaks_unicode(stream: TextIO) -> bool:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name.startswith("utf")
    except LookupError:
        return False


_DEFAULT_ERRORS = ("strict", "surrogateescape", "backslashreplace")  # Python's own, by locale and stream


def tolerate_locale(*streams: TextIO | None) -> None:
    """Have each stream that is not UTF-8 write stand-ins where it would raise. A stream told to
    replace already (PYTHONIOENCODING=latin-1:replace) is left as its user set it; stderr's default
    backslashreplace gives way to stand-ins."""
    for stream in streams:
        if stream is None or speaks_unicode(stream) or getattr(stream, "errors", None) not in _DEFAULT_ERRORS:
            continue
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors=ERRORS)
