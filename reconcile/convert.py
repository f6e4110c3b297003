"""Convert one exported session's DICOM into a fresh BIDS staging dataset with heudiconv.

Owns the heudiconv command line, scan selection, the generated wrapper heuristic (bidsmap,
session naming), checking what heudiconv made of the selected scans, and turning failures into
`ConversionError`. It only writes inside its own work directory and appends to the log file:
moving the session into the real BIDS root is apply's job.
"""

from __future__ import annotations

import ast
import csv
import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from reconcile import preload
from reconcile.config import (
    NOT_REPROIN,
    ConversionSettings,
    bidsmap_target,
    sbref_target,
)
from reconcile.errors import NO_SPACE, ConversionError
from reconcile.failpoints import hit
from reconcile.model import BidsAddress, utc_now

__all__ = ["ConversionResult", "convert_session", "converter_env", "bidsmap_target", "nothing_selected"]

WRAPPER_NAME = "xnat2bids_heuristic.py"
DICOM_ONLY_NAME = "xnat2bids-dicom-only.txt"  # the wrapper notes here the templates kept as DICOM only
LOG_TAIL_LINES = 25
KILL_GRACE_S = 5.0
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DUP_MARK = "__dup-"  # ReproIn's suffix for all but the last of series that get the same BIDS name


class ConversionCancelled(ConversionError):
    """The run was cancelled (Ctrl-C, scancel) while this conversion waited or ran."""


class _HeudiconvFailed(ConversionError):
    """heudiconv ended with a non-zero status: `convert_session` may know why better than its log."""


@dataclass(frozen=True)
class ConversionResult:
    staging_root: Path  # a BIDS dataset made by heudiconv in the work dir
    session_dir: Path  # staging_root / "sub-X" / "ses-Y": what apply moves into the real BIDS root
    outputs: tuple[str, ...]  # files under session_dir, relative to staging_root, sorted
    log_path: Path
    seconds: float
    # One line each, also in the log: selected scans that heudiconv converted to nothing.
    warnings: tuple[str, ...] = ()
    # Scan ID → the first readable DICOM's (SeriesDescription, ProtocolName), "" where absent:
    # what selection and the bidsmap were matched on, recorded so plan can judge rule changes.
    names: Mapping[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class _ScanDir:
    scan_id: str
    path: Path
    description: str | None  # the first readable DICOM's SeriesDescription


@dataclass(frozen=True)
class _Table:
    """What heudiconv's conversion table says it did with each series, by heudiconv series ID."""

    names: dict[str, tuple[str, ...]]  # series → BIDS name templates it was converted to
    scans: dict[str, tuple[str, ...]]  # series → IDs of the scan folders its DICOM came from
    files: frozenset[str] = frozenset()  # absolute paths of the files it grouped into series


# Below this much free space a converter's failure is put down to the full disk.
DISK_FULL_BYTES = 1 << 20
# What a full disk or quota is called, and how Python's traceback says it: "OSError: [Errno 28] No
# space left on device: '<file>'" (heudiconv's populate_aggregated_jsons writing the sidecars).
_ERRNO_LINE = re.compile(r"\[Errno (\d+)\][^\n]*?(?:: '([^'\n]+)')?$", re.MULTILINE)


def converter_env() -> dict[str, str]:
    """The environment heudiconv runs in.

    The dcm2niix wheel puts its console script next to the interpreter, which is not on PATH
    when a venv is used without activating it. NO_ET stops heudiconv's online version check.
    The XNAT server and every variable that looks like a credential are left out: a converter
    needs none, and /proc/PID/environ shows them.
    """
    from reconcile.credentials import ENV_HOST, without_secrets

    env = without_secrets(os.environ)
    env.pop(ENV_HOST, None)
    bindir = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir, *rest])
    env["NO_ET"] = "1"
    return env


@cache
def _bidsmap_target_source() -> str:
    """Read once per process: read per heuristic, a file replaced meanwhile (an upgrade during a
    long apply) would give other lines than this function's."""
    return inspect.getsource(bidsmap_target) + "\n\n" + inspect.getsource(sbref_target)


def convert_session(
    dicom_dir: Path,
    work_dir: Path,
    address: BidsAddress,
    settings: ConversionSettings,
    *,
    log_path: Path,
    cancel: threading.Event | None = None,
    timeout: float = 3600,
) -> ConversionResult:
    """Run one heudiconv call for the session in `dicom_dir`; its BIDS output lands in `work_dir/bids`.

    `work_dir` is removed first: a stale `.heudiconv` folder would make heudiconv silently
    re-use an old conversion table. `dicom_dir` is only read.
    """
    started = time.monotonic()
    dicom_dir = Path(dicom_dir).absolute()
    work_dir = Path(work_dir).absolute()
    log_path = Path(log_path).absolute()
    hint = f"see the heudiconv log: {log_path}"
    if cancel is not None and cancel.is_set():
        raise ConversionCancelled("cancelled", detail=f"conversion of {address} was cancelled before it started")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    staging_root = work_dir / "bids"

    scans = _scan_dirs(dicom_dir)
    names = {s.scan_id: _scan_names(s.path) for s in scans}
    scans = [_ScanDir(s.scan_id, s.path, names[s.scan_id][0] or names[s.scan_id][1] or None) for s in scans]
    selected = [s for s in scans if settings.selects(s.scan_id, s.description or "")]
    if scans and not selected:
        raise nothing_selected(address, [(s.scan_id, s.description) for s in scans], settings)
    if not selected:  # apply stops a session whose selection is empty before exporting it
        raise ConversionError(f"{address}: no scans to convert in {dicom_dir}",
                              hint="the export left no DICOM behind: the selected scans have no files on XNAT")
    renames = _resolve_bidsmap(selected, settings.bidsmap, address)
    if settings.heuristic == "reproin":  # it makes file names of series names; a lab's own heuristic may not
        _check_name_lengths(selected, names, settings, address)
    heuristic = _write_wrapper(work_dir, staging_root, _resolve_heuristic(settings.heuristic, address), renames,
                               settings.bidsmap)

    args = [
        "--files", *(str(s.path) for s in selected),
        "-f", str(heuristic),
        "--bids",
        "-o", str(staging_root),
        "-s", address.subject,
        "-ss", address.session,
        # Without a locator ReproIn nests the dataset under <PI>/<study>/ from StudyDescription.
        "-l", "",
        # One XNAT experiment is one BIDS session, even if the scanner split it into studies.
        "-g", "all",
        "--minmeta",
    ]
    # The log is the session's, shared with apply and earlier attempts: read only this attempt's part.
    attempt = log_path.stat().st_size if log_path.exists() else 0
    try:
        _run(args, work_dir, log_path, cancel, timeout, address, attempt)
    except _HeudiconvFailed as exc:
        slashed = _slashed(selected, renames, names)
        if slashed is None:
            raise
        scan_id, name = slashed
        raise ConversionError(
            f"{address}: heudiconv failed on scan {scan_id}, whose series name {name!r} has a '/' "
            "(BIDS file names cannot hold one)", detail=exc.detail, detail_logged=exc.detail_logged,
            hint=f'map the scan in [conversion.bidsmap], e.g. "{name}" = "<its ReproIn name without \'/\'>", '
                 "or leave it out with [conversion] skip") from exc

    session_dir = staging_root / f"sub-{address.subject}" / f"ses-{address.session}"
    files = sorted(p for p in session_dir.rglob("*") if p.is_file()) if session_dir.is_dir() else []
    if not any(p.name.endswith(NIFTI_SUFFIXES) for p in files):
        raise ConversionError(f"{address}: heudiconv produced no NIfTI", detail=_tail(log_path, attempt),
                              detail_logged=True,
                              hint=f"{hint}; {_no_output_reason(log_path, attempt, work_dir / DICOM_ONLY_NAME, selected)}")
    outputs = tuple(sorted(p.relative_to(staging_root).as_posix() for p in files))
    nested = [p.relative_to(staging_root).as_posix() for p in files if len(p.relative_to(session_dir).parts) > 2]
    if nested:  # BIDS puts files in <datatype>/ of the session, or beside it: a '/' in a series name
        slashed = _slashed(selected, renames, names)
        whose = f"scan {slashed[0]}'s series name {slashed[1]!r}" if slashed else \
            "the scan's SeriesDescription or ProtocolName"
        example = f', e.g. "{slashed[1]}" = "<its ReproIn name without \'/\'>"' if slashed else ""
        raise ConversionError(f"{address}: the conversion wrote {nested[0]}, below a folder of its own, which BIDS "
                              "has no place for" + (f" (and {len(nested) - 1} more)" if len(nested) > 1 else ""),
                              hint=f"a '/' in {whose} names a folder; map the scan in [conversion.bidsmap]{example}")
    table = _read_table(staging_root, address, selected)
    dicominfo = _dicominfo(staging_root, address)
    names = _as_converted(names, selected, table, _series_names(dicominfo))
    _check_no_dups(outputs, table, selected, renames, address, derived=_derived_scans(dicominfo, table))
    _check_bids_names(outputs, selected, address)
    warnings = _unconverted(selected, table, settings.heuristic) + _unread(selected, table)
    if warnings:
        with open(log_path, "a", encoding="utf-8") as log:
            log.writelines(f"{utc_now()} warning: {w}\n" for w in warnings)
    return ConversionResult(
        staging_root=staging_root,
        session_dir=session_dir,
        outputs=outputs,
        log_path=log_path,
        seconds=time.monotonic() - started,
        warnings=warnings,
        names=names,
    )


def nothing_selected(address: BidsAddress, scans: Sequence[tuple[str, str | None]],
                     settings: ConversionSettings) -> ConversionError:
    """The error for a session whose (scan ID, series description) pairs include/skip all leave out.

    apply can raise it before exporting anything; `convert_session` raises it for its scan folders.
    """
    if not scans:
        return ConversionError(f"{address}: the session has no scans to convert",
                               hint="XNAT lists no scans for it: check the session in XNAT, or leave it out "
                                    "with `exclude` in its [project.<project>] table")
    listed = "\n".join(f"  scan {scan_id} {_quoted(description)}" for scan_id, description in scans)
    return ConversionError(
        f"{address}: [conversion] include/skip select none of the session's {_count(len(scans), 'scan')}",
        detail=f"include = {list(settings.include)}, skip = {list(settings.skip)}; the session's scans:\n{listed}",
        hint="change include/skip in [conversion], or for this session alone in a "
             "[project.<project>.sessions.<session label>] table (its keys replace those above it); "
             "or leave the session out with `exclude` in its [project.<project>] table",
    )


def _quoted(description: str | None) -> str:
    return repr(description) if description else "(no series description)"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _read_table(staging_root: Path, address: BidsAddress, scans: Sequence[_ScanDir]) -> _Table | None:
    """heudiconv's conversion table and file groups for the session; None if they cannot be read.

    The table is a Python literal (heudiconv pformats a dict of tuples) written before converting.
    """
    info = staging_root / ".heudiconv" / address.subject / f"ses-{address.session}" / "info"
    try:
        table = ast.literal_eval((info / f"{address.subject}_ses-{address.session}.edit.txt")
                                 .read_text(encoding="utf-8"))
        filegroup = json.loads((info / f"filegroup_ses-{address.session}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(table, dict) or not isinstance(filegroup, dict):
        return None
    names: dict[str, list[str]] = {}
    for key, items in table.items():
        template = key[0] if isinstance(key, tuple) and key else key
        # An item is a series ID or a dict with it under "item"; a list of them is one output group.
        for group in items if isinstance(items, list) else [items]:
            for item in group if isinstance(group, list) else [group]:
                series = item.get("item") if isinstance(item, dict) else item
                names.setdefault(str(series), []).append(str(template))
    folders = {os.path.abspath(s.path): s.scan_id for s in scans}
    scan_ids: dict[str, tuple[str, ...]] = {}
    grouped: set[str] = set()
    for series, paths in filegroup.items():
        found: set[str] = set()
        for path in paths if isinstance(paths, list) else []:
            path = os.path.abspath(str(path))
            grouped.add(path)
            for folder in (path, *(str(p) for p in Path(path).parents)):
                if folder in folders:
                    found.add(folders[folder])
                    break
        scan_ids[str(series)] = tuple(sorted(found, key=_natural_key))
    return _Table({k: tuple(v) for k, v in names.items()}, scan_ids, frozenset(grouped))


def _slashed(scans: Sequence[_ScanDir], renames: Mapping[str, str],
             names: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(scan ID, series name) of the first scan the bidsmap leaves named with a '/' in it."""
    return next(((s.scan_id, n) for s in scans if s.description not in renames
                 for n in names[s.scan_id] if "/" in n), None)


# What a file name made of a series name adds to it, at most: ReproIn's suffix where the datatype
# was (fmap_ → _magnitude1), and the temporary name dcm2niix writes the images under before
# heudiconv renames them (`<name>_heudiconv123_e2.nii.gz`).
_NAME_ROOM = len("_magnitude1") + len("_heudiconv123_e2.nii.gz")
FILE_NAME_BYTES = 255  # the file system's limit on one name (ext4, XFS, NFS, Lustre)


def _check_name_lengths(scans: Sequence[_ScanDir], names: Mapping[str, tuple[str, str]],
                        settings: ConversionSettings, address: BidsAddress) -> None:
    """Refuse a series name ReproIn would make a file name too long of: dcm2niix cannot write it,
    and heudiconv fails with nothing but its exit status. Scanners keep names to 64 characters
    (DICOM's LO), so only an edited or generated header gets here."""
    room = FILE_NAME_BYTES - len(f"sub-{address.subject}_ses-{address.session}_".encode()) - _NAME_ROOM
    for scan in scans:
        description, protocol = names[scan.scan_id]
        try:
            target = settings.scan_name(description, protocol)
        except ValueError:  # the bidsmap conflict `_resolve_bidsmap` refuses, or one the heuristic ignores
            target = None
        # The bidsmap's name replaces both; else ReproIn takes whichever of them is a ReproIn name.
        for name in (target,) if target else (description, protocol):
            if name and len(name.encode()) > room:
                glob = f"{name[:40]}*" if not set("*?[") & set(name[:40]) else name
                raise ConversionError(
                    f"{address}: scan {scan.scan_id}'s series name ({name[:40] + '…'!r}, {len(name)} characters) is too "
                    "long for a file name: the BIDS file names made of it would pass the file system's limit of "
                    f"{FILE_NAME_BYTES} bytes",
                    detail=f"scan {scan.scan_id}: {name!r}",
                    hint=f'map the scan to a shorter ReproIn name in [conversion] bidsmap, e.g. "{glob}" = '
                         f'"<its ReproIn name>", or leave it out with skip = ["{scan.scan_id}"] in '
                         "[project.<project>.sessions.<session label>]")


def _dicominfo(staging_root: Path, address: BidsAddress) -> list[dict[str, str]] | None:
    """heudiconv's dicominfo table of the session: one row per series as its heuristic saw it;
    None if that cannot be read."""
    info = staging_root / ".heudiconv" / address.subject / f"ses-{address.session}" / "info"
    try:
        with open(info / f"dicominfo_ses-{address.session}.tsv", encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except (OSError, ValueError, csv.Error):
        return None


def _series_names(rows: list[dict[str, str]] | None) -> dict[str, tuple[str, str]] | None:
    """(SeriesDescription, ProtocolName) of each series, by heudiconv series ID."""
    try:
        return None if rows is None else {
            row["series_id"]: (row["series_description"] or "", row["protocol_name"] or "") for row in rows}
    except KeyError:
        return None


def _derived_scans(rows: list[dict[str, str]] | None, table: _Table | None) -> frozenset[str]:
    """The scans holding a derived series (ImageType DERIVED: a reformat, or a map the scanner
    computed from another series), which Siemens names after their original's protocol."""
    if rows is None or table is None:
        return frozenset()
    return frozenset(scan_id for row in rows if row.get("is_derived") == "True"
                     for scan_id in table.scans.get(row.get("series_id", ""), ()))


def _as_converted(names: Mapping[str, tuple[str, str]], scans: Sequence[_ScanDir], table: _Table | None,
                  series_names: Mapping[str, tuple[str, str]] | None) -> dict[str, tuple[str, str]]:
    """`names` (read from each scan's first DICOM), with each selected scan named as heudiconv's
    heuristic saw its series (a ProtocolName heudiconv took from a Siemens CSA header too), and
    without the scans it cannot be said of: a scan folder holding series of different names, or
    any scan when heudiconv's tables cannot be read. Plan does not judge rule changes for a
    session with a scan left out, so a bidsmap entry only another series of a scan matches is
    not missed."""
    out = dict(names)
    for scan in scans:
        seen = set() if table is None or series_names is None else {
            series_names.get(series) for series, ids in table.scans.items() if scan.scan_id in ids}
        if len(seen) == 1 and None not in seen:
            out[scan.scan_id] = seen.pop()
        elif seen or table is None or series_names is None:  # several, or one missing from dicominfo
            out.pop(scan.scan_id, None)
    return out


def _check_no_dups(outputs: Sequence[str], table: _Table | None, scans: Sequence[_ScanDir],
                   renames: dict[str, str], address: BidsAddress, *, derived: frozenset[str] = frozenset()) -> None:
    """Refuse ReproIn's `__dup-NN` files: the BIDS validator rejects them (NOT_INCLUDED). The way
    out leaves derived series out where they are among them, else the earlier attempts."""
    dups = [o for o in outputs if DUP_MARK in o.rsplit("/", 1)[-1]]
    if not dups:
        return
    by_id = {s.scan_id: s for s in scans}
    prefix = f"sub-{address.subject}_ses-{address.session}"
    groups: dict[str, list[str]] = {}  # BIDS name (without __dup-NN) → IDs of the scans given it
    earlier: list[str] = []  # the scans heudiconv renamed __dup-NN (it keeps the last the plain name)
    for series, templates in table.names.items() if table is not None else ():
        scan_ids = table.scans.get(series, ())
        for template in templates:
            base = template.split(DUP_MARK, 1)[0]
            name = base.rsplit("/", 1)[-1].replace("{bids_subject_session_prefix}", prefix)
            groups.setdefault(name, []).extend(scan_ids)
            if DUP_MARK in template:
                earlier += scan_ids
    lines = []
    all_scans: list[str] = []
    examples: list[str] = []
    for name, ids in sorted(groups.items()):
        ids = sorted(set(ids), key=_natural_key)
        if not set(ids) & set(earlier):
            continue
        all_scans += ids
        descriptions = sorted({by_id[i].description or "" for i in ids})
        lines.append(f"scans {', '.join(ids)} ({', '.join(_quoted(d) for d in descriptions)}) all become {name}")
        for description in descriptions:
            target = renames.get(description, description)
            if description and "_run" not in target:
                examples.append(f'"{description}" = "{target}_run+"')
    which = f"scans {', '.join(sorted(set(all_scans), key=_natural_key))}" if all_scans else "repeated series"
    derivatives = sorted(derived & set(all_scans), key=_natural_key)
    if derivatives:  # an MPR reformat or an ADC map named after its original: never the original's run
        quoted = ", ".join(f'"{i}"' for i in derivatives)
        named = ", ".join(f"{i} {_quoted(by_id[i].description or '')}" for i in derivatives)
        hint = (f"{'scan' if len(derivatives) == 1 else 'scans'} {named} {'holds' if len(derivatives) == 1 else 'hold'} "
                "derived images (ImageType DERIVED: a reformat or a map the scanner computed), "
                f"named after the series they came from; leave them out with skip = [{quoted}] in "
                "[project.<project>.sessions.<session label>], or in [conversion] skip by their names for every "
                "session")
    else:
        skip = ", ".join(f'"{i}"' for i in sorted(set(earlier), key=_natural_key)) or '"<scan ID>"'
        example = f", e.g. {'; '.join(examples)}" if examples else ""
        hint = (f"if the earlier scans were repeated (e.g. cancelled) attempts, leave them out with skip = [{skip}] "
                "in [project.<project>.sessions.<session label>]; if all are wanted, give them run numbers by "
                f"ending their ReproIn name with _run+ (on the scanner, or with [conversion] bidsmap{example})")
    raise ConversionError(
        f"{address}: {which} convert to the same BIDS name; heudiconv wrote '{DUP_MARK}' files, "
        "which are not valid BIDS",
        detail="\n".join([*lines, "heudiconv kept the last under the plain name and wrote:",
                          *(f"  {d}" for d in dups)]),
        hint=hint,
    )


# A BIDS file name: entities `key-label` (a label is ASCII letters and digits; `+` too, as some
# tools write it) joined by `_`, then a suffix and extensions.
_BIDS_NAME = re.compile(r"(?:[a-zA-Z0-9]+-[a-zA-Z0-9+]+_)+[a-zA-Z0-9]+(?:\.[a-zA-Z0-9]+)+")


def _check_bids_names(outputs: Sequence[str], scans: Sequence[_ScanDir], address: BidsAddress) -> None:
    """Refuse output names the BIDS validator rejects: heudiconv takes a series name's space or
    accented letter into an entity's label as it is (`task-rest run`)."""
    bad = [o for o in outputs if not _BIDS_NAME.fullmatch(o.rsplit("/", 1)[-1])]
    if not bad:
        return
    odd = [s for s in scans if s.description and NOT_REPROIN.search(s.description)]
    which = ", ".join(f"scan {s.scan_id} {_quoted(s.description)}" for s in odd) or "a series name"
    example = f', e.g. "{odd[0].description}" = "{_reproin_spelling(odd[0].description)}"' if odd else ""
    raise ConversionError(
        f"{address}: the conversion wrote {len(bad)} file(s) whose names are not valid BIDS ({bad[0]}"
        + (", …" if len(bad) > 1 else "") + "): a BIDS label holds ASCII letters and digits alone",
        detail="\n".join(f"  {b}" for b in bad[:20]),
        hint=f"{which} holds other characters (a space, an accented letter); give it a ReproIn name with "
             f"[conversion] bidsmap{example}",
    )


# Letters NFKD does not decompose into an ASCII letter and marks.
_ASCII_LETTERS = str.maketrans({"ß": "ss", "ø": "o", "Ø": "O", "æ": "ae", "Æ": "AE"})


def _reproin_spelling(name: str) -> str:
    """`name` with what a ReproIn name cannot hold left out, accented letters spelled in ASCII
    (Müller → Muller): a suggestion that keeps the letters the user will recognise."""
    decomposed = unicodedata.normalize("NFKD", name.translate(_ASCII_LETTERS))
    return NOT_REPROIN.sub("", "".join(c for c in decomposed if not unicodedata.combining(c)))


def _unconverted(scans: Sequence[_ScanDir], table: _Table | None, heuristic: str = "reproin") -> tuple[str, ...]:
    """A warning for each selected scan none of whose series heudiconv converted to anything."""
    if table is None:
        return ()
    series_of: dict[str, list[str]] = {}
    for series, scan_ids in table.scans.items():
        for scan_id in scan_ids:
            series_of.setdefault(scan_id, []).append(series)
    warnings = []
    for scan in scans:
        series = series_of.get(scan.scan_id, [])
        if series and any(table.names.get(s) for s in series):
            continue
        description = scan.description
        what = f"scan {scan.scan_id} {_quoted(description)} was selected but converted to nothing"
        kind = _not_image_series(scan.path)
        if kind is not None:  # a bidsmap name cannot help: skipping it is the way
            # By its description for every session; a scan ID only where it names this scan, its session's table.
            where = f'[conversion] skip = ["{description}"]' if description else \
                f'skip = ["{scan.scan_id}"] in [project.<project>.sessions.<session label>]'
            warnings.append(f"{what}: it holds {kind}, no image series to convert; leave it out with {where}")
            continue
        if not series:
            warnings.append(f"{what}: heudiconv read no DICOM series from it (see the heudiconv log)")
            continue
        if heuristic != "reproin":  # a lab's own heuristic: its rules, not ReproIn's names, decide
            warnings.append(f"{what}: the heuristic {heuristic} gave it no BIDS name; extend the heuristic, or "
                            "leave the scan out with [conversion] skip")
            continue
        # No guessed target: pasted as it is, a wrong datatype would mislabel data; this one is refused.
        example = f', e.g. "{description}" = "<its ReproIn name: anat-T1w, func-bold_task-rest, dwi_dir-AP, …>"' \
            if description else ""
        warnings.append(f"{what}: the heuristic did not recognise it; name the series by ReproIn conventions "
                        f"(e.g. anat-T1w_acq-mprage) or map it with [conversion] bidsmap{example}, "
                        "or leave it out with [conversion] skip")
    return tuple(warnings)


# DICOM that heudiconv leaves out on purpose: no image in them.
_NOT_IMAGES = frozenset({"1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.11.1"})  # Raw Data, GSPS
# Series a scanner adds beside the images, by SOP class: what they hold, for the warning.
_NOT_IMAGE_SERIES = {
    "1.3.12.2.1107.5.9.1": "a Siemens non-image object (a protocol report such as PhoenixZIPReport)",
    "1.2.840.10008.5.1.4.1.1.7": "secondary captures (screenshots)",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
    "1.2.840.10008.5.1.4.1.1.11.1": "presentation states",
}


def _not_image_series(folder: Path) -> str | None:
    """What a scan's first DICOM file holds when it is one of `_NOT_IMAGE_SERIES`, else None."""
    first = next((f for f in sorted(folder.rglob("*")) if f.is_file()), None)
    return None if first is None else _NOT_IMAGE_SERIES.get(_sop_class(first))


def _unread(scans: Sequence[_ScanDir], table: _Table | None) -> tuple[str, ...]:
    """A warning for each selected scan some of whose files heudiconv could not read as DICOM (cut
    short, or not DICOM at all): it converts the rest without a word, so a volume may lack slices."""
    if table is None or not table.files:
        return ()
    warnings = []
    for scan in scans:
        files = list(_dicom_files(scan.path))
        unread = [f for f in files if os.path.abspath(f) not in table.files and not _holds_no_image(f)]
        if unread and len(unread) < len(files):  # none read at all is `_unconverted`'s warning
            shown = ", ".join(f.relative_to(scan.path).as_posix() for f in unread[:3])
            more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
            warnings.append(f"scan {scan.scan_id} {_quoted(scan.description)}: heudiconv could not read "
                            f"{len(unread)} of its {len(files)} files as DICOM ({shown}{more}) and converted the "
                            "others, so its images may lack slices or volumes; check the files in XNAT and, once "
                            "mended there, re-date the session to export it again")
    return tuple(warnings)


def _holds_no_image(path: Path) -> bool:
    """Whether `path` is whole DICOM of a kind that holds no image (raw data, presentation state)."""
    return _sop_class(path) in _NOT_IMAGES


def _sop_class(path: Path) -> str:
    """The SOP class UID of a DICOM file; "" for one that cannot be read as DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return ""
    return str(ds.get("SOPClassUID", ""))


def _scan_dirs(dicom_dir: Path) -> list[_ScanDir]:
    if not dicom_dir.is_dir():
        raise ConversionError(f"DICOM folder {dicom_dir} does not exist")
    entries = sorted(dicom_dir.iterdir(), key=lambda p: _natural_key(p.name))
    scans = [_ScanDir(p.name, p, None) for p in entries if p.is_dir() and not p.name.startswith(".")]
    # Loose files are not a scan of the export layout; treat each as its own "scan" so that
    # heudiconv still sees them instead of silently dropping DICOM.
    scans += [_ScanDir(p.name, p, None) for p in entries if p.is_file() and not p.name.startswith(".")]
    return scans


def _natural_key(name: str) -> tuple[int, int | str]:
    return (0, int(name)) if name.isdigit() else (1, name)


def _dicom_files(path: Path) -> Iterator[Path]:
    """The regular files at or under `path`: a FIFO or device there would block the reader."""
    if path.is_file():
        yield path
        return
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            candidate = Path(root) / name
            if candidate.is_file():
                yield candidate


_NAMELESS_READS = 16


def _scan_names(path: Path) -> tuple[str, str]:
    """(SeriesDescription, ProtocolName) of the first readable DICOM under `path`, "" where absent:
    heudiconv's seqinfo carries both, and the conversion selects and renames by them."""
    # Imported here: pydicom (with numpy) takes ~0.4 s to import, which every `plan` paid for
    # `converter_env` alone.
    import pydicom
    from pydicom.errors import InvalidDicomError

    read = 0
    for candidate in _dicom_files(path):
        try:
            ds = pydicom.dcmread(candidate, stop_before_pixels=True,
                                 specific_tags=["SeriesDescription", "ProtocolName"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        names = str(ds.get("SeriesDescription", "") or ""), str(ds.get("ProtocolName", "") or "")
        read += 1
        # A file cut short may still parse, without its names: the next one tells. Bounded, for
        # a series that has no names at all.
        if any(names) or read >= _NAMELESS_READS:
            return names
    return "", ""


def _resolve_bidsmap(scans: Sequence[_ScanDir], bidsmap: Sequence[tuple[str, str]],
                     address: BidsAddress) -> dict[str, str]:
    """Exact description → ReproIn name for the scans at hand; conflicts fail before heudiconv runs."""
    renames: dict[str, str] = {}
    for scan in scans:
        if not bidsmap or scan.description is None:
            continue
        try:
            target = bidsmap_target(scan.description, bidsmap)
        except ValueError as exc:
            raise ConversionError(f"{address}: scan {scan.scan_id}: {exc}",
                                  hint="make the [conversion] bidsmap patterns disjoint or add an exact entry") from exc
        if target is not None:
            renames[scan.description] = target
    return renames


def _resolve_heuristic(heuristic: str, address: BidsAddress) -> str:
    """A heudiconv built-in name stays a name; anything path-like must exist."""
    if os.sep in heuristic or heuristic.endswith(".py") or (os.altsep and os.altsep in heuristic):
        path = Path(os.path.expanduser(heuristic)).absolute()
        if not path.is_file():
            raise ConversionError(f"{address}: heuristic file {path} not found",
                                  hint="[conversion] heuristic is 'reproin' or a path to a heudiconv heuristic")
        return str(path)
    return heuristic


_WRAPPER = '''\
"""Generated by xnat2bids for one conversion: delegates to {base!r}.

It renames series by the configured bidsmap and leaves subject/session naming to the
command line (xnat2bids' naming), not to session markers in series names.
"""
from __future__ import annotations

import glob as _glob
import importlib.util as _ilu
import json as _json
import os as _os
import sys as _sys
from collections.abc import Mapping as _Mapping
from importlib.machinery import SourceFileLoader as _SourceFileLoader
from fnmatch import fnmatchcase
from functools import cache

from heudiconv.utils import load_heuristic as _load_heuristic

_BASE_NAME = {base!r}
if _os.path.isabs(_BASE_NAME):
    # A private module name: heudiconv imports heuristics by file stem, which could collide.
    _loader = _SourceFileLoader("_xnat2bids_base_heuristic", _BASE_NAME)
    _base = _ilu.module_from_spec(_ilu.spec_from_loader(_loader.name, _loader))
    _sys.path.insert(0, _os.path.dirname(_BASE_NAME))  # as heudiconv does, for sibling imports
    try:
        _loader.exec_module(_base)
    finally:
        _sys.path.remove(_os.path.dirname(_BASE_NAME))
    _base.filename = _BASE_NAME
else:
    _base = _load_heuristic(_BASE_NAME)

globals().update({{k: v for k, v in vars(_base).items() if not k.startswith("__")}})


class _IntendedForOpts(_Mapping):
    """The base heuristic's POPULATE_INTENDED_FOR_OPTS, read when heudiconv unpacks them, after the
    conversion. Matching field maps by "Shims" needs ShimSetting in every sidecar, and dcm2niix
    writes it only when the scanner recorded shim offsets (de-identification may strip them):
    heudiconv would raise KeyError and fail the session. Then matching goes without it. Worked out
    once (`**` asks for every key), and only when there are field maps to match."""

    _known = None

    def _opts(self):
        if self._known is not None:
            return self._known
        opts = dict(_BASE_INTENDED_FOR)
        params = list(opts.get("matching_parameters") or ())
        fmaps = _glob.glob(_os.path.join({staging!r}, "sub-*", "**", "fmap"), recursive=True)
        unshimmed = _without_shims() if fmaps and "Shims" in params else None
        if unshimmed:
            params.remove("Shims")
            opts["matching_parameters"] = params or ["ImagingVolume"]
            print(f"xnat2bids: {{unshimmed}} has no ShimSetting; field maps are matched by "
                  f"{{', '.join(opts['matching_parameters'])}} only", flush=True)
        self._known = opts
        return opts

    def __getitem__(self, key):
        return self._opts()[key]

    def __iter__(self):
        return iter(self._opts())

    def __len__(self):
        return len(self._opts())


def _without_shims():
    """A converted sidecar that heudiconv's shim matching would read and that has no ShimSetting."""
    for path in sorted(_glob.glob(_os.path.join({staging!r}, "sub-*", "**", "*.json"), recursive=True)):
        if _os.path.basename(_os.path.dirname(path)) not in ("fmap", "func", "dwi", "anat", "perf"):
            continue
        try:
            with open(path, encoding="utf-8") as sidecar:
                data = _json.load(sidecar)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "ShimSetting" not in data:
            return _os.path.relpath(path, {staging!r})
    return None


_BASE_INTENDED_FOR = globals().pop("POPULATE_INTENDED_FOR_OPTS", None)
if _BASE_INTENDED_FOR is not None:
    POPULATE_INTENDED_FOR_OPTS = _IntendedForOpts()

RENAMES = {renames!r}
BIDSMAP = {bidsmap!r}

{target_source}

def _renamed(name):
    if name in RENAMES:
        return RENAMES[name]
    try:
        return bidsmap_target(name, BIDSMAP) if BIDSMAP else None
    except ValueError:
        return None


def infotodict(seqinfo, *args, **kwargs):
    fixed = []
    for s in seqinfo:
        target = _renamed(s.series_description)
        if target is None and _renamed(s.protocol_name) is not None:
            target = sbref_target(s.series_description or "", _renamed(s.protocol_name))
        if target is not None:
            s = s._replace(series_description=target, protocol_name=target)
        fixed.append(s)
    if _BASE_NAME == "reproin":
        fixed = _sbrefs_after_their_runs(seqinfo, fixed)
    return _without_dicom(_base.infotodict(fixed, *args, **kwargs))


def _sbrefs_after_their_runs(seqinfo, fixed):
    """ReproIn numbers `_run+` series in the order they come and reads ProtocolName first, so a
    Siemens single-band reference (`<protocol>_SBRef`, acquired just before its BOLD) took a run
    number of its own. It goes right after its BOLD (the next series of its protocol, when not
    another SBRef) with `_run=`: the number that BOLD was just given."""
    order = list(range(len(fixed)))
    for i, s in enumerate(seqinfo):
        if not (s.series_description or "").endswith("_SBRef"):
            continue
        names = {{k: "_".join("run=" if part == "run+" else part for part in (getattr(fixed[i], k) or "").split("_"))
                 for k in ("series_description", "protocol_name")}}
        # Its BOLD is the next series of its protocol; another SBRef there means its BOLD was stopped.
        after = next((j for j in range(i + 1, len(seqinfo)) if seqinfo[j].protocol_name == s.protocol_name), None)
        bold = None if after is None or (seqinfo[after].series_description or "").endswith("_SBRef") else after
        if bold is None or all(names[k] == (getattr(fixed[i], k) or "") for k in names):
            continue
        fixed[i] = fixed[i]._replace(**names)
        order.remove(i)
        order.insert(order.index(bold) + 1, i)
    return [fixed[k] for k in order]


def _without_dicom(info):
    # Output type "dicom" makes heudiconv tar and gzip (-9) each series into sourcedata/, which
    # apply never keeps (it moves the session folder; --keep-dicom keeps the export itself): a
    # third of a conversion's time. Keys left with no output type (ReproIn's scouts) stay, so the
    # series still count as recognised; their templates are noted for the "no NIfTI" message.
    out, dicom_only = {{}}, []
    for key, series in info.items():
        if isinstance(key, tuple) and len(key) >= 2 and "dicom" in tuple(key[1] or ()):
            kept = tuple(t for t in key[1] if t != "dicom")
            if not kept:
                dicom_only.append(str(key[0]))
            key = (key[0], kept, *key[2:])
        out.setdefault(key, []).extend(series)
    converted = any(key[1] for key in out if isinstance(key, tuple) and len(key) >= 2)
    with open({dicom_only_path!r}, "w", encoding="utf-8") as note:  # why nothing became NIfTI, if so
        note.write("" if converted else "".join(t + "\\n" for t in sorted(set(dicom_only))))
    return out


def infotoids(seqinfos, outdir):
    # heudiconv falls back to -s/-ss/-l when these are None.
    return {{"locator": None, "session": None, "subject": None}}
'''


def _write_wrapper(work_dir: Path, staging_root: Path, base: str, renames: dict[str, str],
                   bidsmap: Sequence[tuple[str, str]]) -> Path:
    path = work_dir / WRAPPER_NAME
    path.write_text(_WRAPPER.format(
        base=base,
        renames=dict(sorted(renames.items())),
        bidsmap=[tuple(p) for p in bidsmap],
        target_source=_bidsmap_target_source(),
        dicom_only_path=str(work_dir / DICOM_ONLY_NAME),
        staging=str(staging_root),
    ), encoding="utf-8")
    return path


def _run(args: list[str], work_dir: Path, log_path: Path, cancel: threading.Event | None,
         timeout: float, address: BidsAddress, attempt: int) -> None:
    """Run heudiconv with `args` (its arguments) in `work_dir`, its output appended to the log.

    `attempt`: the log's size before this attempt, so errors quote only this attempt's lines.
    """
    hint = f"see the heudiconv log: {log_path}"
    command = [sys.executable, "-m", "heudiconv.cli.run", *args]
    deadline = time.monotonic() + timeout
    # Appended: apply's lines for this attempt (the export) come before it, earlier attempts above.
    with open(log_path, "ab") as log:
        log.write(f"{utc_now()} convert {address} with heudiconv\n".encode())
        log.write(("$ " + subprocess.list2cmdline(command) + "\n").encode())
    try:
        # A fork of a process that has heudiconv imported already: saves ~1 s per session.
        proc: _Child = _Forked(preload.start(args, work_dir, log_path, converter_env()))
    except preload.PreloadUnavailable:
        proc = _start_process(command, work_dir, log_path, address, hint)
    hit("convert-running")
    try:
        while (returncode := proc.wait(0.1)) is None:
            if cancel is not None and cancel.is_set():
                proc.kill()
                raise ConversionCancelled("cancelled", detail=f"conversion of {address} was cancelled")
            if time.monotonic() > deadline:
                proc.kill()
                raise ConversionError(f"{address}: heudiconv timed out after {timeout:g} s",
                                      detail=_tail(log_path, attempt), detail_logged=True, hint=hint)
    except BaseException:
        proc.kill()  # e.g. KeyboardInterrupt: never leave a converter running
        raise
    finally:
        proc.close()
    if returncode < 0 and _disk_full(work_dir):
        # With no space left, the preload server cannot write how heudiconv ended either: what
        # would read as a SIGKILL (the out-of-memory killer) is the full disk.
        raise ConversionError(f"{address}: heudiconv stopped: no space left on the disk holding {work_dir}",
                              detail=_tail(log_path, attempt), detail_logged=True,
                              hint="free space there, then apply again")
    if returncode < 0:  # both _Forked and _Spawned say -N for signal N, as subprocess does
        if returncode == -signal.SIGKILL:
            hint += "; SIGKILL usually comes from the kernel's out-of-memory killer (see dmesg)"
        raise ConversionError(f"{address}: heudiconv was killed by {_signal_name(-returncode)}",
                              detail=_tail(log_path, attempt), detail_logged=True, hint=hint)
    if returncode != 0 and (full := _disk_full_said(_tail(log_path, attempt))) is not None:
        what, where = full
        raise ConversionError(f"{address}: heudiconv stopped: {what} on the disk holding {where or work_dir}",
                              detail=_tail(log_path, attempt), detail_logged=True,
                              hint="free space there, then apply again")
    if returncode != 0:
        raise _HeudiconvFailed(f"{address}: heudiconv failed (exit status {returncode})",
                              detail=_tail(log_path, attempt), detail_logged=True, hint=hint)


def _disk_full(path: Path) -> bool:
    """Whether the file system holding `path` has (next to) no space left for an unprivileged writer."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < DISK_FULL_BYTES


def _disk_full_said(text: str) -> tuple[str, str | None] | None:
    """Whether a converter's log ends on a full disk or quota: what it is called and the file that
    could not be written, when the log names it; None for any other failure."""
    said = [m for m in _ERRNO_LINE.finditer(text) if int(m.group(1)) in NO_SPACE]
    if said:
        return NO_SPACE[int(said[-1].group(1))], said[-1].group(2)
    for number, what in NO_SPACE.items():  # said without Python's "[Errno N]"
        if os.strerror(number) in text:
            return what, None
    return None


def _signal_name(number: int) -> str:
    try:
        return f"{signal.Signals(number).name} (signal {number})"
    except ValueError:  # e.g. a real-time signal
        return f"signal {number}"


class _Child:
    """A running heudiconv in a process group of its own (its PID), with its dcm2niix children.

    Its PID is also its group's ID, and once heudiconv has been reaped both numbers may belong
    to another process: `signal` refuses from then on, so `kill` never reaches a stranger.
    """

    pid: int

    def wait(self, seconds: float) -> int | None:
        """The exit status once heudiconv has ended, reaping it."""
        raise NotImplementedError

    def running(self) -> bool:
        """heudiconv has not ended yet (checked without reaping it)."""
        raise NotImplementedError

    def signal(self, sig: int) -> None:
        """Signal heudiconv's process group, unless heudiconv may have been reaped already."""
        raise NotImplementedError

    def kill(self) -> None:
        """SIGTERM to the group, then SIGKILL after a grace period, then reap; nothing once reaped."""
        self.signal(signal.SIGTERM)
        end = time.monotonic() + KILL_GRACE_S
        while self.running() and time.monotonic() < end:
            time.sleep(0.05)
        # heudiconv if it ignored SIGTERM, and what is left of its group (dcm2niix) if it did not.
        self.signal(signal.SIGKILL)
        end = time.monotonic() + KILL_GRACE_S
        while self.wait(0.05) is None and time.monotonic() < end:
            pass

    def close(self) -> None:
        pass


class _Forked(_Child):
    """A child of the preload server, which reaps it: signalled only while it runs (through
    `Conversion.signal`); the server SIGKILLs what is left of its group before reaping it."""

    def __init__(self, conversion: preload.Conversion):
        self.conversion, self.pid = conversion, conversion.pid

    def wait(self, seconds: float) -> int | None:
        code = self.conversion.poll()
        if code is None and seconds:
            time.sleep(seconds)
            code = self.conversion.poll()
        return code

    def running(self) -> bool:
        return self.conversion.running()

    def signal(self, sig: int) -> None:
        self.conversion.signal(sig)

    def close(self) -> None:
        self.conversion.close()


class _Spawned(_Child):
    """Our own child: until we reap it, even as a zombie, its PID and group ID stay ours."""

    def __init__(self, proc: subprocess.Popen[bytes]):
        self.proc, self.pid = proc, proc.pid

    def wait(self, seconds: float) -> int | None:
        try:
            return self.proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None

    def _exited(self) -> bool | None:
        """Whether heudiconv has ended, without reaping it; None once it has been reaped."""
        if self.proc.returncode is not None:
            return None
        if not hasattr(os, "waitid"):  # e.g. macOS before Python 3.13: only Popen can tell, by reaping
            return None if self.proc.poll() is not None else False
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return None  # reaped behind Popen's back

    def running(self) -> bool:
        return self._exited() is False

    def signal(self, sig: int) -> None:
        if self._exited() is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass


def _start_process(command: list[str], work_dir: Path, log_path: Path, address: BidsAddress, hint: str) -> _Child:
    try:
        with open(log_path, "ab") as log:
            # A session of its own, so cancel/timeout can kill dcm2niix children too.
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=work_dir, env=converter_env(), start_new_session=True,
                                    preexec_fn=preload.die_with_parent)
    except OSError as exc:
        raise ConversionError(f"{address}: cannot start heudiconv: {exc}", hint=hint) from exc
    return _Spawned(proc)


def _no_output_reason(log_path: Path, attempt: int = 0, dicom_only: Path | None = None,
                      scans: Sequence[_ScanDir] = ()) -> str:
    try:
        kept_as_dicom = dicom_only.read_text(encoding="utf-8").splitlines() if dicom_only is not None else []
    except OSError:
        kept_as_dicom = []
    if kept_as_dicom:
        # heudiconv's templates ({bids_subject_session_dir}/anat/{bids_subject_session_prefix}_acq-x_scout): their names
        names = sorted({t.rsplit("/", 1)[-1].replace("{bids_subject_session_prefix}_", "") for t in kept_as_dicom})
        return (f"the heuristic keeps every selected series as DICOM only ({', '.join(names)}: scouts and "
                "localizers in ReproIn), which gives no BIDS files; a session of nothing else has nothing to export: "
                "leave it out with `exclude` in its [project.<project>] table")
    text = _log_text(log_path, attempt)
    if "Generated sequence info with 0 entries" in text:
        return "heudiconv found no readable DICOM series in the export"
    if "Could not figure out where to stick" in text:
        named = [s for s in scans if s.description]
        which = "; the session's: " + ", ".join(f"scan {s.scan_id} {_quoted(s.description)}" for s in named[:10]) \
            + (f" and {len(named) - 10} more" if len(named) > 10 else "") if named else ""
        return ("the heuristic did not recognise the series: map non-ReproIn series descriptions "
                f"with [conversion] bidsmap or choose another heuristic{which}")
    return "the heuristic selected no series for conversion"


def _tail(log_path: Path, attempt: int = 0, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(_log_text(log_path, attempt).rstrip().splitlines()[-lines:])


def _log_text(log_path: Path, attempt: int = 0) -> str:
    """The log from byte offset `attempt` (where this attempt's lines start) to its end."""
    try:
        with open(log_path, "rb") as log:
            log.seek(attempt)
            return log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
