"""Running the BIDS validator (`bids-validator-deno` from PyPI) on the dataset (`--validate`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from reconcile.errors import XnatBidsError


@dataclass(frozen=True)
class ValidationResult:
    errors: tuple[str, ...]
    warnings: int


def _validator() -> str:
    exe = shutil.which("bids-validator-deno") or str(Path(sys.executable).parent / "bids-validator-deno")
    if not os.path.exists(exe):
        raise XnatBidsError("bids-validator-deno is not installed", hint="pip install bids-validator-deno")
    return exe


def validate(root: Path) -> ValidationResult:
    out = subprocess.run([_validator(), str(root), "--format", "json"], capture_output=True, text=True, timeout=900)
    try:
        issues = json.loads(out.stdout)["issues"]["issues"]
    except (ValueError, KeyError, TypeError) as exc:
        raise XnatBidsError("could not read the BIDS validator's output", detail=(out.stderr or out.stdout)[-2000:]) from exc
    errors = tuple(
        f"{i.get('code')}: {i.get('location', '')} {i.get('issueMessage') or ''}".strip()
        for i in issues
        if i.get("severity") == "error"
    )
    warnings = sum(1 for i in issues if i.get("severity") == "warning")
    return ValidationResult(errors, warnings)
