"""Running the BIDS validator (`bids-validator-deno` from PyPI) on the dataset (`--validate`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from reconcile.credentials import without_secrets
from reconcile.errors import ValidationError

VALIDATOR_TIMEOUT_S = 900
REPORT_NAME = "bids-validator.json"  # in the work area's logs: the last --validate run's full report


@dataclass(frozen=True)
class ValidationResult:
    errors: tuple[str, ...]
    warnings: int
    warning_codes: tuple[tuple[str, int], ...] = ()  # (code, how many), most frequent first
    report: Path | None = None  # the validator's whole JSON output, where every warning is located
    skipped: str = ""  # why it did not run

    def summary(self) -> str:
        """'BIDS validator: E errors, W warnings (CODE ×n, …); full report: PATH'."""
        if self.skipped:
            return f"BIDS validator: not run ({self.skipped})"
        text = f"BIDS validator: {len(self.errors)} errors, {self.warnings} warnings"
        if self.warning_codes:
            text += " (" + ", ".join(f"{code} ×{n}" for code, n in self.warning_codes) + ")"
        if self.report is not None and (self.warnings or self.errors):
            text += f"; full report: {self.report}"
        return text


def validator() -> str:
    """The validator's executable: on PATH, else beside this Python; ValidationError if neither."""
    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    if not os.path.exists(exe):
        raise ValidationError("bids-validator-deno is not installed", hint="pip install bids-validator-deno")
    return exe


def validate(root: Path) -> ValidationResult:
    """Validate the dataset; the validator's JSON report is kept in the work area's logs."""
    from reconcile.durable import write_atomic
    from reconcile.workarea import work_path

    if not (root / "dataset_description.json").exists():  # it would report only what is not there yet
        validator()
        return ValidationResult((), 0, skipped="nothing exported yet")
    try:
        # Without XNAT's credentials: deno runs it with --allow-env --allow-net.
        out = subprocess.run([validator(), str(root), "--format", "json"], capture_output=True, encoding="utf-8", errors="replace",
                             timeout=VALIDATOR_TIMEOUT_S, env=without_secrets(os.environ))
    except subprocess.TimeoutExpired:
        raise ValidationError(f"the BIDS validator did not finish within {VALIDATOR_TIMEOUT_S} s",
                              hint=f"run `bids-validator-deno {root}` by hand to see it") from None
    except OSError as exc:
        raise ValidationError(f"the BIDS validator could not be run: {exc.strerror or exc}") from exc
    try:
        issues = json.loads(out.stdout)["issues"]["issues"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValidationError("could not read the BIDS validator's output", detail=(out.stderr or out.stdout)[-2000:]) from exc
    errors = tuple(
        f"{i.get('code')}: {i.get('location', '')} {i.get('issueMessage') or ''}".strip()
        for i in issues
        if i.get("severity") == "error"
    )
    codes = Counter(str(i.get("code")) for i in issues if i.get("severity") == "warning")
    report = work_path(root, "logs", REPORT_NAME)
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(report, out.stdout)
    except OSError:
        report = None  # the summary still names every code; only the locations are not kept
    return ValidationResult(errors, sum(codes.values()), tuple(sorted(codes.items(), key=lambda c: (-c[1], c[0]))),
                            report)
