"""Convert one exported session's DICOM into a fresh BIDS staging dataset with heudiconv.

Owns the heudiconv command line, scan selection, the generated wrapper heuristic (bidsmap,
session naming) and turning failures into `ConversionError`. It only writes inside its own
work directory and the log file: moving the session into the real BIDS root is apply's job.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from reconcile import preload
from reconcile.config import ConversionSettings
from reconcile.errors import ConversionError
from reconcile.failpoints import hit
from reconcile.model import BidsAddress

__all__ = ["ConversionResult", "convert_session", "converter_env", "bidsmap_target"]

WRAPPER_NAME = "xnat2bids_heuristic.py"
LOG_TAIL_LINES = 25
KILL_GRACE_S = 5.0
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class ConversionResult:
    staging_root: Path  # a BIDS dataset made by heudiconv in the work dir
    session_dir: Path  # staging_root / "sub-X" / "ses-Y": what apply moves into the real BIDS root
    outputs: tuple[str, ...]  # files under session_dir, relative to staging_root, sorted
    log_path: Path
    seconds: float


@dataclass(frozen=True)
class _ScanDir:
    scan_id: str
    path: Path
    description: str | None  # the first readable DICOM's SeriesDescription


def converter_env() -> dict[str, str]:
    """The environment heudiconv runs in.

    The dcm2niix wheel puts its console script next to the interpreter, which is not on PATH
    when a venv is used without activating it. NO_ET stops heudiconv's online version check.
    The XNAT credentials are left out: a converter needs none, and /proc/PID/environ shows them.
    """
    from reconcile.credentials import ENV_PASS, ENV_TOKEN_FILE, ENV_USER

    env = {k: v for k, v in os.environ.items() if k not in (ENV_PASS, ENV_USER, ENV_TOKEN_FILE)}
    bindir = str(Path(sys.executable).parent)
    rest = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != bindir]
    env["PATH"] = os.pathsep.join([bindir, *rest])
    env["NO_ET"] = "1"
    return env


def bidsmap_target(description: str, bidsmap: Sequence[tuple[str, str]]) -> str | None:
    """The ReproIn name a bidsmap gives a series description, or None when nothing matches.

    An exact name beats globs; several globs may match only when they agree. Raises
    ValueError on a conflict. The generated heuristic embeds this function's source, so it
    may use nothing but `fnmatchcase`.
    """
    for pattern, target in bidsmap:
        if pattern == description:
            return target
    targets = {target for pattern, target in bidsmap if fnmatchcase(description, pattern)}
    if len(targets) > 1:
        raise ValueError(f"series {description!r} matches bidsmap patterns with different names: "
                         f"{', '.join(sorted(targets))}")
    return targets.pop() if targets else None


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
        raise ConversionError("cancelled", detail=f"conversion of {address} was cancelled before it started")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    staging_root = work_dir / "bids"

    scans = _scan_dirs(dicom_dir)
    needs_description = bool(settings.include or settings.skip or settings.bidsmap)
    if needs_description:
        scans = [_ScanDir(s.scan_id, s.path, _series_description(s.path)) for s in scans]
    selected = [s for s in scans if not needs_description or settings.selects(s.scan_id, s.description or "")]
    if not selected:
        raise ConversionError(
            f"{address}: no scans to convert in {dicom_dir}",
            detail=f"{len(scans)} scan folder(s) found, none selected by include/skip" if scans else None,
            hint="check [conversion] include/skip" if scans else "the export left no DICOM behind",
        )
    renames = _resolve_bidsmap(selected, settings.bidsmap, address)
    heuristic = _write_wrapper(work_dir, _resolve_heuristic(settings.heuristic, address), renames, settings.bidsmap)

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
    _run(args, work_dir, log_path, cancel, timeout, address)

    session_dir = staging_root / f"sub-{address.subject}" / f"ses-{address.session}"
    files = sorted(p for p in session_dir.rglob("*") if p.is_file()) if session_dir.is_dir() else []
    if not any(p.name.endswith(NIFTI_SUFFIXES) for p in files):
        raise ConversionError(f"{address}: heudiconv produced no NIfTI", detail=_tail(log_path),
                              hint=f"{hint}; {_no_output_reason(log_path)}")
    outputs = tuple(sorted(p.relative_to(staging_root).as_posix() for p in files))
    return ConversionResult(
        staging_root=staging_root,
        session_dir=session_dir,
        outputs=outputs,
        log_path=log_path,
        seconds=time.monotonic() - started,
    )


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
    if path.is_file():
        yield path
        return
    for root, dirs, names in os.walk(path):
        dirs.sort()
        for name in sorted(names):
            yield Path(root) / name


def _series_description(path: Path) -> str | None:
    # Imported here: pydicom (with numpy) takes ~0.4 s to import, which every `plan` paid for
    # `converter_env` alone.
    import pydicom
    from pydicom.errors import InvalidDicomError

    for candidate in _dicom_files(path):
        try:
            ds = pydicom.dcmread(candidate, stop_before_pixels=True,
                                 specific_tags=["SeriesDescription", "ProtocolName"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        description = str(ds.get("SeriesDescription", "") or ds.get("ProtocolName", "") or "")
        return description or None
    return None


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

import importlib.util as _ilu
import os as _os
import sys as _sys
from importlib.machinery import SourceFileLoader as _SourceFileLoader
from fnmatch import fnmatchcase

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
        target = _renamed(s.series_description) or _renamed(s.protocol_name)
        if target is not None:
            s = s._replace(series_description=target, protocol_name=target)
        fixed.append(s)
    return _base.infotodict(fixed, *args, **kwargs)


def infotoids(seqinfos, outdir):
    # heudiconv falls back to -s/-ss/-l when these are None.
    return {{"locator": None, "session": None, "subject": None}}
'''


def _write_wrapper(work_dir: Path, base: str, renames: dict[str, str],
                   bidsmap: Sequence[tuple[str, str]]) -> Path:
    path = work_dir / WRAPPER_NAME
    path.write_text(_WRAPPER.format(
        base=base,
        renames=dict(sorted(renames.items())),
        bidsmap=[tuple(p) for p in bidsmap],
        target_source=inspect.getsource(bidsmap_target),
    ), encoding="utf-8")
    return path


def _run(args: list[str], work_dir: Path, log_path: Path, cancel: threading.Event | None,
         timeout: float, address: BidsAddress) -> None:
    """Run heudiconv with `args` (its arguments) in `work_dir`, its output appended to the log."""
    hint = f"see the heudiconv log: {log_path}"
    command = [sys.executable, "-m", "heudiconv.cli.run", *args]
    deadline = time.monotonic() + timeout
    with open(log_path, "wb") as log:
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
                raise ConversionError("cancelled", detail=f"conversion of {address} was cancelled", hint=hint)
            if time.monotonic() > deadline:
                proc.kill()
                raise ConversionError(f"{address}: heudiconv timed out after {timeout:g} s",
                                      detail=_tail(log_path), hint=hint)
    except BaseException:
        proc.kill()  # e.g. KeyboardInterrupt: never leave a converter running
        raise
    finally:
        proc.close()
    if returncode < 0:  # both _Forked and _Spawned say -N for signal N, as subprocess does
        if returncode == -signal.SIGKILL:
            hint += "; SIGKILL usually comes from the kernel's out-of-memory killer (see dmesg)"
        raise ConversionError(f"{address}: heudiconv was killed by {_signal_name(-returncode)}",
                              detail=_tail(log_path), hint=hint)
    if returncode != 0:
        raise ConversionError(f"{address}: heudiconv failed (exit status {returncode})",
                              detail=_tail(log_path), hint=hint)


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


def _no_output_reason(log_path: Path) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    if "Generated sequence info with 0 entries" in text:
        return "heudiconv found no readable DICOM series in the export"
    if "Could not figure out where to stick" in text:
        return ("the heuristic did not recognise the series: map non-ReproIn series descriptions "
                "with [conversion] bidsmap or choose another heuristic")
    return "the heuristic selected no series for conversion"


def _tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])
