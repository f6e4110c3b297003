"""Mapping XNAT subject/session labels to BIDS `sub-`/`ses-` labels.

Labels that could escape the BIDS root are rejected, never "cleaned"; everything else is
sanitised to BIDS's alphanumeric label rule. Pure functions, no I/O.
"""

from __future__ import annotations

import re

from reconcile.config import NamingSettings
from reconcile.errors import UnsafePathError
from reconcile.model import CONTROL_CHARS, BidsAddress, Experiment

MAX_LABEL = 128
# Subject and session labels together: `sub-S_ses-T_` begins each file name, which must leave room
# for the entities and suffix (task-…_acq-…_run-…_echo-…_part-…_bold.nii.gz) within 255 bytes.
MAX_LABELS = 140
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")
# Everything check_safe refuses, but for emptiness, "." and length: one search for the usual label.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]|\.\.")
_XNAT_HINT = "rename it in XNAT or map it in [naming] of the config"
_ACCESSION_ID = re.compile(r"[A-Za-z0-9_-]+")  # the lock schema's rule for experiment IDs


def _map_hint(table: str, key: str) -> str:
    """The hint for a bad label that came from the config's map, not from XNAT: the map is what to fix."""
    return f"fix the value for {key!r} in [naming] {table} of the config (a BIDS label is letters and digits)"


def check_accession_id(exp_id: str) -> str:
    """XNAT accession IDs name the work area's folders and files; refuse anything that is not one."""
    if not _ACCESSION_ID.fullmatch(exp_id):
        raise UnsafePathError(f"experiment ID {exp_id!r} is not a plain XNAT accession ID; refusing to use it as a path",
                              hint="an XNAT accession ID is letters, digits, '_' and '-'; ask the XNAT admin")
    return exp_id


def check_safe(label: str, what: str, *, hint: str = _XNAT_HINT) -> None:
    """Refuse labels that are unsafe as path components, whatever the sanitiser would make of them."""
    if label and label != "." and len(label) <= MAX_LABEL and not _UNSAFE.search(label):
        return
    problem = None
    if label == "":
        problem = "is empty"
    elif CONTROL_CHARS.search(label):
        problem = "contains control characters"
    elif "/" in label or "\\" in label:
        problem = "contains a path separator"
    elif label in (".", "..") or ".." in label:
        problem = "contains '..'"
    elif len(label) > MAX_LABEL:
        problem = f"is longer than {MAX_LABEL} characters"
    if problem:
        raise UnsafePathError(
            f"{what} label {label!r} {problem}; refusing to use it as a path",
            hint=hint,
        )


def bids_label(label: str, what: str, *, hint: str | None = None) -> str:
    """XNAT label → BIDS label: unsafe labels raise, others keep only [A-Za-z0-9].

    `hint` replaces the advice to rename or map the label, for labels that come from elsewhere.
    """
    if label.isascii() and label.isalnum() and len(label) <= MAX_LABEL:
        return label  # safe, and a BIDS label already
    check_safe(label, what, hint=hint or _XNAT_HINT)
    return _letters_and_digits(label, what, hint=hint)


def _letters_and_digits(label: str, what: str, *, hint: str | None = None) -> str:
    """The BIDS label made of a safe label: its ASCII letters and digits, which must exist."""
    cleaned = _NOT_ALNUM.sub("", label)
    if not cleaned:
        raise UnsafePathError(
            f"{what} label {label!r} has no letters or digits to make a BIDS label from",
            hint=hint or "map it in [naming] of the config",
        )
    return cleaned


def address_for(exp: Experiment, naming: NamingSettings) -> BidsAddress:
    """The BIDS address of a session, honouring overrides and the label convention."""
    address = _address(exp, naming)
    together = len(address.subject) + len(address.session)
    if together > MAX_LABELS:
        raise UnsafePathError(
            f"subject label {address.subject!r} and session label {address.session!r} are {together} characters "
            f"together; every BIDS file name of the session begins with both, and with its entities after them "
            f"would not fit in a file name (255 bytes)",
            hint=f"map shorter labels (at most {MAX_LABELS} characters together) in [naming] subjects or sessions "
                 "of the config",
        )
    return address


def _address(exp: Experiment, naming: NamingSettings) -> BidsAddress:
    mapped = naming.subjects.get(exp.subject_label)
    if mapped is not None:
        subject = bids_label(mapped, "subject", hint=_map_hint("subjects", exp.subject_label))
    else:
        subject = bids_label(exp.subject_label, "subject")
    key = exp.id if exp.id in naming.sessions else exp.label
    override = naming.sessions.get(key)
    if override is not None:
        return BidsAddress(subject, bids_label(override, "session", hint=_map_hint("sessions", key)))
    label = exp.label
    check_safe(label, "session")
    if naming.session_label == "strip-subject":
        prefix = exp.subject_label + "_"
        if label.startswith(prefix) and len(label) > len(prefix):
            return BidsAddress(subject, bids_label(label[len(prefix):], "session"))
    return BidsAddress(subject, _letters_and_digits(label, "session"))
