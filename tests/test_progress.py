"""apply's reporter: what it prints for each session."""

from __future__ import annotations

import io

from reconcile.apply import Outcome, Status
from reconcile.model import BidsAddress, SessionKey, printable
from reconcile.plan import Action, Change, Reason
from reconcile.progress import Reporter, format_duration


def test_plain_lines_write_out_terminal_controls_from_xnat():
    change = Change(Action.CREATE, SessionKey("P\x1b[2J", "E1\r"), BidsAddress("S1", "MR1"), (Reason("new", "new"),))
    stream = io.StringIO()
    report = Reporter(1, stream=stream, live=False)
    report("start", change, None)
    report("end", change, Outcome(change, Status.FAILED, "refused: \x9b31m red"))
    text = stream.getvalue()
    assert "(P\\x1b[2J/E1\\r)" in text and "refused: \\x9b31m red" in text
    assert not any(c in text for c in "\x1b\r\x9b")


def test_printable_keeps_text_tabs_and_newlines():
    assert printable("sub-01\tses-01\nünïcode") == "sub-01\tses-01\nünïcode"
    assert printable("a\x00b\x7fc") == "a\\x00b\\x7fc"


def test_a_duration_is_said_in_the_units_people_read():
    assert [format_duration(s) for s in (0.04, 4.24, 9.96, 47.4, 60, 123.4, 3599.6, 3725)] == [
        "0.0 s", "4.2 s", "10 s", "47 s", "1 min 0 s", "2 min 3 s", "1 h 0 min", "1 h 2 min"]
