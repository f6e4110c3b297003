"""An in-process XNAT 1.8 emulator: an in-memory archive served over XNAT's REST API.

Real xnatpy and pyxnat clients run against it unpatched (see tests/emulator); it also backs the
demo (`xnat2bids emulator serve`) and the benchmarks. It must never talk to a real XNAT.
"""

from .app import EmulatorApp
from .archive import (
    Archive,
    ArchiveError,
    Experiment,
    FileEntry,
    Project,
    Resource,
    Scan,
    Subject,
    User,
)
from .faults import Fault, FaultSet
from .serve import load_dicom_dir, serve_forever, serve_in_thread

__all__ = [
    "Archive",
    "ArchiveError",
    "EmulatorApp",
    "Experiment",
    "Fault",
    "FaultSet",
    "FileEntry",
    "Project",
    "Resource",
    "Scan",
    "Subject",
    "User",
    "load_dicom_dir",
    "serve_forever",
    "serve_in_thread",
]
