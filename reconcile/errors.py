"""The one error hierarchy of xnat2bids.

Everything below the CLI raises these; only `cli.py` turns them into text and exit codes.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

# What a full disk or quota is called in messages, by errno.
NO_SPACE = {errno.ENOSPC: "no space left", errno.EDQUOT: "the disk quota is used up"}


class XnatBidsError(Exception):
    """Root error: a one-line `summary`, optional `detail` and a `hint` for what to do."""

    def __init__(self, summary: str, *, detail: str | None = None, hint: str | None = None,
                 detail_logged: bool = False):
        super().__init__(summary)
        self.summary = summary
        self.detail = detail
        self.hint = hint
        # The detail quotes the session log (heudiconv's output): the log holds it already.
        self.detail_logged = detail_logged

    @property
    def kind(self) -> str:
        """The error's class as a stable word for `--json` output: `LockHeldError` → "lock_held"."""
        name = type(self).__name__.removesuffix("Error")
        return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() if name != "XnatBids" else "error"

    def __str__(self) -> str:
        parts = [self.summary]
        if self.detail:
            parts.append(self.detail)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)

    def log_text(self) -> str:
        """The error as the session log records it: without a detail quoted from that log."""
        if not self.detail_logged:
            return str(self)
        return "\n".join([self.summary, *([f"hint: {self.hint}"] if self.hint else [])])


class Cancelled(XnatBidsError):
    """Stopped by the user (Ctrl-C, SIGTERM, scancel) part-way: not a failure."""


class ConfigError(XnatBidsError):
    """The configuration file is missing, malformed or has unknown keys."""


class LockfileError(XnatBidsError):
    """The lockfile is malformed, fails its schema, or cannot be written."""


class LockConflictError(LockfileError):
    """The lock on disk is not the one a write started from: another run wrote or replaced it."""


class LockHeldError(XnatBidsError):
    """Another apply holds the state lock of this BIDS root."""


class StalePlanError(XnatBidsError):
    """A saved plan no longer matches the lock it was computed against."""


class RemoteError(XnatBidsError):
    """XNAT could not be reached or answered with an error.

    `unreachable`: no connection, after every retry (refused or reset, a name that does not
    resolve): what every later request of the run would meet too. Not set for an error status, one
    download cut short, nor an answer slower than the timeout (XNAT builds a large session's file
    listing whole before it answers: that session's own slowness).
    """

    def __init__(self, summary: str, *, unreachable: bool = False, **kwargs):
        super().__init__(summary, **kwargs)
        self.unreachable = unreachable


class AuthError(RemoteError):
    """XNAT rejected the credentials (401) or the user may not read an object (403)."""


class ForbiddenError(AuthError):
    """XNAT knows the user but lets them not read one object (403): that object's failure, not a
    reason to stop everything, as rejected credentials are."""


class NotFoundError(RemoteError):
    """XNAT says the object does not exist or is not visible to this user (404)."""


class UnsafePathError(XnatBidsError):
    """A label, file name or zip entry would escape its target directory."""


class VerificationError(XnatBidsError):
    """Downloaded bytes do not match XNAT's listing (size or digest)."""


class ConversionError(XnatBidsError):
    """heudiconv/dcm2niix failed or produced nothing for a session."""


class PlanError(XnatBidsError):
    """The plan cannot be computed safely (e.g. an empty listing for a project with a lock)."""


class SlurmError(XnatBidsError):
    """sbatch/squeue/scontrol failed, or a SLURM batch is in a state that forbids the operation."""


class ValidationError(XnatBidsError):
    """The BIDS validator could not be run or its report read (not: it found errors)."""


class VcsError(XnatBidsError):
    """git or datalad could not record what an apply wrote."""


class OccupiedError(XnatBidsError):
    """What a commit would replace is not apply's to replace: a folder the lock does not record,
    or outputs changed on disk since they were recorded."""


def write_hint(exc: OSError, where: Path | str, otherwise: str | None = None) -> str | None:
    """The hint for a write below `where` that failed with `exc`: free space for a full disk or
    quota (which no permission fixes), else `otherwise`."""
    if exc.errno == errno.ENOSPC:
        return f"the disk holding {where} is full: free space there, then run again"
    if exc.errno == errno.EDQUOT:
        return f"your disk quota where {where} is is used up: free space (or ask for a larger quota), then run again"
    return otherwise
