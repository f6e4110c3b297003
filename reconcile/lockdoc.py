"""A session's document in the lock and the order the file keeps it in: session record <->
document, scans by numeric-aware ID, outputs by path, dict keys sorted. Pure conversion: no TOML,
no validation, no files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from functools import lru_cache
from typing import Any

from reconcile.model import OutputRecord, ScanRecord, SessionRecord, UnselectedScan

# 2: sessions record the scans include/skip left out, and scans the name bidsmap gave them and
# their DICOM ProtocolName.
# 3: the file ends with TRAILER, so that one cut short at the end of a line (a full disk, a
# failed copy) is told from a whole one: TOML has no end of its own.
# Format 1 and 2 files are read as they are and written as format 3.
FORMAT_VERSION = 3
TRAILER = "# End of the xnat2bids lock.\n"
# What follows the last session's (or the header's) text: a blank line, then TRAILER.
TRAILER_BLOCK = ("\n" + TRAILER).encode()

_DIGITS = re.compile(r"(\d+)")


@lru_cache(maxsize=1 << 14)  # a lock's sessions share their few scan IDs ("1".."12"): ~0.15 s of a cold read
def scan_sort_key(scan_id: str) -> tuple[tuple[str | int, ...], str]:
    """Numeric-aware order for XNAT scan IDs: '2' < '10' < '10a' < 'SR1'."""
    # re.split with a capture group alternates text and digits, so positions never mix str and int.
    parts = tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(scan_id)))
    return parts, scan_id


def _normalized(record: SessionRecord) -> SessionRecord:
    """The record with scans, outputs and dict keys in the order the file keeps them."""
    return replace(
        record,
        config_digests=dict(sorted(record.config_digests.items())),
        tools=dict(sorted(record.tools.items())),
        scans=tuple(sorted(record.scans, key=lambda s: scan_sort_key(s.id))),
        outputs=tuple(sorted(record.outputs, key=lambda o: o.path)),
        unselected_scans=None if record.unselected_scans is None
        else tuple(sorted(record.unselected_scans, key=lambda s: scan_sort_key(s.id))),
    )


def _session_document(record: SessionRecord) -> dict[str, Any]:
    # Field order follows the model so a human reading the file sees identity first.
    doc: dict[str, Any] = {
        "experiment_id": record.experiment_id,
        "project": record.project,
        "subject_id": record.subject_id,
        "subject_label": record.subject_label,
        "session_label": record.session_label,
        "bids_subject": record.bids_subject,
        "bids_session": record.bids_session,
    }
    if record.date is not None:  # TOML has no null
        doc["date"] = record.date
    doc.update(
        insert_date=record.insert_date,
        last_modified=record.last_modified,
        xsi_type=record.xsi_type,
        exported_at=record.exported_at,
        config_fingerprint=record.config_fingerprint,
        config_digests=dict(sorted(record.config_digests.items())),
        tools=dict(sorted(record.tools.items())),
        scans=[_scan_document(s) for s in sorted(record.scans, key=lambda s: scan_sort_key(s.id))],
    )
    if record.unselected_scans is not None:
        doc["unselected_scans"] = [
            {"id": s.id, "type": s.type, "series_description": s.series_description}
            for s in sorted(record.unselected_scans, key=lambda s: scan_sort_key(s.id))
        ]
    doc["outputs"] = [
        {"path": o.path, "size": o.size, "sha256": o.sha256, "mtime_ns": o.mtime_ns}
        for o in sorted(record.outputs, key=lambda o: o.path)
    ]
    return doc


def _scan_document(s: ScanRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": s.id,
        "type": s.type,
        "series_description": s.series_description,
        "file_count": s.file_count,
        "total_size": s.total_size,
        "digest": s.digest,
    }
    if s.bidsmap_target is not None:
        doc["bidsmap_target"] = s.bidsmap_target
    if s.protocol_name is not None:
        doc["protocol_name"] = s.protocol_name
    return doc


_HEADER_FIELDS = ("format_version", "lineage", "serial", "generator", "config_fingerprint")
_SESSION_FIELDS = (
    "experiment_id", "project", "subject_id", "subject_label", "session_label", "bids_subject", "bids_session",
    "date", "insert_date", "last_modified", "xsi_type", "exported_at", "config_fingerprint",
)
_SCAN_FIELDS = (
    "id", "type", "series_description", "file_count", "total_size", "digest", "bidsmap_target", "protocol_name",
)
_UNSELECTED_FIELDS = ("id", "type", "series_description")
_OUTPUT_FIELDS = ("path", "size", "sha256", "mtime_ns")


def _canonical_session(doc: Mapping[str, Any]) -> dict[str, Any]:
    """`_session_document(_record(doc))` for a valid session document, without the dataclasses."""
    out = {key: doc[key] for key in _SESSION_FIELDS if key in doc}
    out["config_digests"] = dict(sorted(doc["config_digests"].items()))
    out["tools"] = dict(sorted(doc["tools"].items()))
    scans = sorted(doc["scans"], key=lambda s: scan_sort_key(s["id"]))
    out["scans"] = [{key: s[key] for key in _SCAN_FIELDS if key in s} for s in scans]
    if "unselected_scans" in doc:
        unselected = sorted(doc["unselected_scans"], key=lambda s: scan_sort_key(s["id"]))
        out["unselected_scans"] = [{key: s[key] for key in _UNSELECTED_FIELDS} for s in unselected]
    out["outputs"] = [{key: o[key] for key in _OUTPUT_FIELDS} for o in sorted(doc["outputs"], key=lambda o: o["path"])]
    return out


_new = object.__new__
_set_attr = object.__setattr__


def _adopt(cls: type, fields: dict[str, Any]) -> Any:
    """An instance of the frozen dataclass `cls` whose instance dict IS `fields` (no copy, no
    keyword call): only for a dict nobody else holds, with exactly `cls`'s fields."""
    obj = _new(cls)
    _set_attr(obj, "__dict__", fields)
    return obj


def _decoded(doc: dict[str, Any]) -> SessionRecord:
    """`_record(doc, canonical=True)` of a freshly unmarshalled canonical document, built in place:
    its dicts become the records' instance dicts (a third of the cost of decoding a session).
    `doc` must not be used afterwards."""
    for s in doc["scans"]:
        if "bidsmap_target" not in s:
            s["bidsmap_target"] = None
        if "protocol_name" not in s:
            s["protocol_name"] = None
    doc["scans"] = tuple([_adopt(ScanRecord, s) for s in doc["scans"]])
    doc["outputs"] = tuple([_adopt(OutputRecord, o) for o in doc["outputs"]])
    listed = doc.get("unselected_scans")
    doc["unselected_scans"] = None if listed is None else tuple([_adopt(UnselectedScan, s) for s in listed])
    if "date" not in doc:
        doc["date"] = None
    return _adopt(SessionRecord, doc)


def _record(doc: Mapping[str, Any], *, canonical: bool = False) -> SessionRecord:
    scans = [ScanRecord(**s) for s in doc["scans"]]
    outputs = [OutputRecord(**o) for o in doc["outputs"]]
    listed = doc.get("unselected_scans")
    unselected = None if listed is None else [UnselectedScan(**s) for s in listed]
    digests, tools = doc["config_digests"], doc["tools"]
    if not canonical:  # a document this module built is already sorted, and its dicts are ours to keep
        scans.sort(key=lambda s: scan_sort_key(s.id))
        outputs.sort(key=lambda o: o.path)
        if unselected is not None:
            unselected.sort(key=lambda s: scan_sort_key(s.id))
        digests, tools = dict(sorted(digests.items())), dict(sorted(tools.items()))
    return SessionRecord(
        experiment_id=doc["experiment_id"],
        project=doc["project"],
        subject_id=doc["subject_id"],
        subject_label=doc["subject_label"],
        session_label=doc["session_label"],
        bids_subject=doc["bids_subject"],
        bids_session=doc["bids_session"],
        date=doc.get("date"),
        insert_date=doc["insert_date"],
        last_modified=doc["last_modified"],
        xsi_type=doc["xsi_type"],
        exported_at=doc["exported_at"],
        config_fingerprint=doc["config_fingerprint"],
        config_digests=digests,
        tools=tools,
        scans=tuple(scans),
        outputs=tuple(outputs),
        unselected_scans=None if unselected is None else tuple(unselected),
    )
