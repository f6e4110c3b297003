"""Apply's reporter: a rich progress bar on a terminal, plain lines otherwise.

Implements apply's `on_event` callback; the only output code apply ever triggers.
"""

from __future__ import annotations

import sys
from typing import TextIO

from reconcile.apply import Outcome, Status
from reconcile.model import printable
from reconcile.plan import Change


def format_duration(seconds: float) -> str:
    """A wall time as people read it: "4.2 s", "47 s", "2 min 3 s", "1 h 5 min"."""
    if seconds < 9.95:
        return f"{max(seconds, 0):.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min"


class Reporter:
    def __init__(self, total: int, *, stream: TextIO | None = None, live: bool | None = None, quiet: bool = False,
                 errors: TextIO | None = None):
        """`quiet` (--quiet): each session's outcome lines alone, no progress bar, no line as it
        starts; those of a failure, a skip or a warning on stderr (`errors`), for cron to mail
        also where stdout goes to /dev/null."""
        self.stream = stream or sys.stdout
        self.errors = (errors or sys.stderr) if quiet else self.stream
        self.total = total
        self.finished = 0
        self.quiet = quiet
        self.live = not quiet and (self.stream.isatty() if live is None else live)
        self._progress = None
        self._task = None
        if self.live and total:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]apply"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.description}"), console=Console(file=self.stream), transient=True,
            )
            self._task = self._progress.add_task("", total=total)
            self._progress.start()

    def _line(self, text: str, *, bad: bool = False) -> None:
        """`bad`: a failure's, a skip's or a warning's line (on `errors`)."""
        text = printable(text)
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.errors if bad else self.stream, flush=True)

    def __call__(self, kind: str, change: Change, outcome: Outcome | None) -> None:
        where = printable(f"{change.address.path} ({change.key})")
        if kind == "start":
            if self._progress is not None:
                from rich.markup import escape

                self._progress.update(self._task, description=escape(where))  # a label's "[" is not markup
            elif not self.quiet:
                self._line(f"  … {change.action.value:<6} {where}")
            return
        self.finished += 1
        if self._progress is not None:
            self._progress.update(self._task, advance=1)
        assert outcome is not None
        n = f"[{self.finished}/{self.total}]"
        if outcome.status is Status.DONE:
            files = len(outcome.record.outputs) if outcome.record else 0
            self._line(f"{n} ✓ {change.action.value:<6} {where}: {files} files in {outcome.seconds:.1f} s")
            for warning in outcome.warnings:
                self._line(f"      warning: {warning}", bad=True)
        elif outcome.status is Status.FAILED:
            self._line(f"{n} ✗ {change.action.value:<6} {where}: {outcome.message}", bad=True)
            if outcome.hint:
                self._line(f"      hint: {outcome.hint}", bad=True)
            if outcome.log_path:
                self._line(f"      log: {outcome.log_path}", bad=True)
        else:
            self._line(f"{n} - skipped {where}: {outcome.message}", bad=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
