"""`xnat2bids demo`: the whole plan → apply → re-date → plan → apply → check cycle, offline.

It starts the built-in XNAT emulator with a small project of synthetic MR sessions and talks
to it over real HTTP, exactly as it would to a real XNAT.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import requests

from reconcile.emulator import Archive, EmulatorApp, serve_in_thread
from reconcile.emulator.dicomgen import DEFAULT_SERIES, session_scans

DEMO_PROJECT = "DEMO"
DEMO_USER = "demo"
DEMO_PASSWORD = "demo-password"
DEMO_SESSIONS = (("001", "001_MR1", "2024-01-10"), ("002", "002_MR1", "2024-01-11"), ("002", "002_MR2", "2024-03-02"))


def populate(archive: Archive, project: str = DEMO_PROJECT, sessions=DEMO_SESSIONS, series=DEFAULT_SERIES) -> None:
    """Add synthetic ReproIn-named MR sessions (tiny but real DICOM) to `archive`."""
    try:
        archive.get_project(project)
    except Exception:
        archive.add_project(project, name=f"{project} (xnat2bids demo)")
    for seed, (subject, label, date) in enumerate(sessions):
        exp = archive.add_session(project, subject, label, date=date)
        for scan in session_scans(subject, label, series=series, study_date=date.replace("-", ""), seed=seed):
            archive.add_scan(exp.id, scan.scan_id, type=scan.series_description,
                             series_description=scan.series_description, files=scan.files)


def run_demo(workdir: Path | None, echo: Callable[[str], None]) -> int:
    from reconcile.cli import run_apply, run_check, run_plan
    from reconcile.config import parse_config
    from reconcile.credentials import Credentials
    from reconcile.errors import ConfigError
    from reconcile.lock import lock_path, read_lock
    from reconcile.lockcache import forget_seen
    from reconcile.plan import Selection
    from reconcile.xnat import XnatClient

    base = Path(workdir).absolute() if workdir else Path(tempfile.mkdtemp(prefix="xnat2bids-demo-"))
    root = base / "bids"
    if root.exists():
        # Each demo starts its own XNAT, whose sessions are new: a dataset of an earlier demo
        # would see them all as re-archived, and the demo's story would not be told.
        raise ConfigError(f"{root} exists (an earlier demo?)",
                          hint="give the demo a --workdir of its own, or none for a temporary one")
    base.mkdir(parents=True, exist_ok=True)  # asked for by name: made, not refused halfway by apply
    forget_seen(lock_path(root))  # a demo dataset removed to run the demo again is not an unmounted one
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access log lines in the demo
    archive = Archive(site="DEMO")
    archive.add_user(DEMO_USER, DEMO_PASSWORD)
    populate(archive)
    with serve_in_thread(EmulatorApp(archive)) as url:
        config = parse_config({"xnat_url": url, "projects": [DEMO_PROJECT], "naming": {"session_label": "strip-subject"}})
        creds = Credentials(user=DEMO_USER, password=DEMO_PASSWORD, source="demo")
        echo(f"XNAT emulator at {url}: project {DEMO_PROJECT}, {len(DEMO_SESSIONS)} MR sessions")
        echo(f"BIDS root: {root}\n")
        with XnatClient(url, creds) as client:
            step = lambda title: echo(f"\n=== {title} ===")  # noqa: E731
            step("1. xnat2bids plan")
            run_plan(client, root, config, Selection())
            step("2. xnat2bids apply --yes")
            if run_apply(config, root, Selection(), yes=True, client=client) != 0:
                return 1
            target = archive.sessions(DEMO_PROJECT)[1]
            step(f"3. re-date {target.label} in XNAT (PUT …/experiments/{target.id}?xnat:mrSessionData/date=2024-02-01)")
            resp = requests.put(
                f"{url}/data/projects/{DEMO_PROJECT}/subjects/{target.subject_id}/experiments/{target.id}",
                params={"xnat:mrSessionData/date": "2024-02-01"},
                auth=(DEMO_USER, DEMO_PASSWORD),
                timeout=30,
            )
            resp.raise_for_status()
            step("4. xnat2bids plan (shows the update)")
            if run_plan(client, root, config, Selection(), detailed_exitcode=True) != 2:
                echo("demo: expected the re-dated session to be planned as an update")
                return 1
            step("5. xnat2bids apply --yes")
            if run_apply(config, root, Selection(), yes=True, client=client) != 0:
                return 1
            step("6. xnat2bids check --full")
            if run_check(root, read_lock(root), full=True) != 0:
                return 1
            step("7. xnat2bids plan (nothing left to do)")
            code = run_plan(client, root, config, Selection(), detailed_exitcode=True)
    echo(f"\nThe demo dataset stays in {root}")
    return code
