"""The `xnat2bids` command line: the only place that prints, prompts and picks exit codes.

Exit codes: 0 = no changes / success, 2 = changes pending (plan with --detailed-exitcode or
--diff), 1 = any error, usage errors included (click's default 2 would read as "changes").
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, Optional

import typer
from typer.core import TyperGroup

try:  # recent typer vendors click; older releases use the click package
    from typer._click.exceptions import ClickException, UsageError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, ClickException, UsageError

from reconcile import __version__
from reconcile.config import ENV_CONFIG, Config, load_config
from reconcile.console import tolerate_locale
from reconcile.errors import (
    Cancelled,
    ConfigError,
    LockfileError,
    LockHeldError,
    NotFoundError,
    PlanError,
    SlurmError,
    StalePlanError,
    UnsafePathError,
    XnatBidsError,
    write_hint,
)
from reconcile.lock import Lock
from reconcile.model import printable, utc_now
from reconcile.plan import Action, Change, Plan, Selection, repairing
from reconcile.workarea import WORK_DIR, share_with_group, unconvertible, uncreatable

if TYPE_CHECKING:
    from reconcile.statelock import Holder

EXIT_OK, EXIT_ERROR, EXIT_CHANGES = 0, 1, 2


class _Interrupted(Exception):
    """Ctrl-C inside a command, carried past typer to `main`."""


class _StoppedWaiting(Exception):
    """Ctrl-C or SIGTERM ended `apply --wait`'s waiting, not its SLURM batch: the exit code is the
    signal's (130, 143), as for any command a signal stopped, not 1, which tells of a failed batch;
    no further study is submitted."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Commands(TyperGroup):
    def invoke(self, ctx):  # noqa: ANN001, ANN201 - click's signature
        # typer turns KeyboardInterrupt into a silent exit 130 before `main` sees it; README
        # promises 1 for any error, and a cancelled apply exits 1 too.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Interrupted() from exc


app = typer.Typer(
    name="xnat2bids",
    cls=_Commands,
    help="Keep a local BIDS dataset in sync with an XNAT archive: plan, apply, check.",
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
emulator_app = typer.Typer(help="The built-in XNAT emulator (for demos, tests and benchmarks).")
app.add_typer(emulator_app, name="emulator")

_debug = False
_stopping = False  # a signal cancelled an apply: no further study starts
# A second stop signal this soon after the first is the same one delivered twice (GNU timeout
# signals its child, then its process group), not a user asking to force the stop.
SAME_SIGNAL_S = 0.1
_root_config: Optional[Path] = None  # `xnat2bids --config FILE <command>`
_json_errors = False  # the command was given --json: a fatal error is a JSON document on stdout too
_quiet = False  # plan or apply --quiet: stdout gets outcome lines alone (see `echo`)
_heading: str | None = None  # a study's "=== …" line, printed with the first line of its study


class _PipeClosed(Exception):
    """Standard output's reader went away (`| head`). Not an OSError, which click would turn into
    exit 1 before `_run` sees it."""


def echo(text: str = "", *, err: bool = False, outcome: bool = False) -> None:
    """A line on stdout, or on stderr (`err`: warnings and errors, always printed). Under --quiet
    stdout gets only `outcome` lines, what a run did and its summary: cron mails whatever a job
    prints, and a run that did nothing must print nothing."""
    if _quiet and not err and not outcome:
        return
    _say_heading()
    try:
        # The stream itself, not click's: click rewraps an ASCII one as UTF-8, past `tolerate_locale`.
        typer.echo(printable(text), err=err, file=sys.stderr if err else sys.stdout)
    except BrokenPipeError:
        raise _PipeClosed() from None


def _say_heading() -> None:
    """The heading of the study at work, before the first line said of it: under --quiet a study
    with nothing to say is not named at all."""
    global _heading
    if _heading is not None:
        heading, _heading = _heading, None
        echo(heading, outcome=True)


def _study_heading(text: str) -> None:
    global _heading
    _heading = text


def _be_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _reporter(total: int):  # noqa: ANN202 - progress.Reporter, imported late
    """Apply's reporter, after the heading of its study: it prints on its own."""
    from reconcile.progress import Reporter

    _say_heading()
    return Reporter(total, quiet=_quiet)


def _show_plan(plan: Plan, *, outcome: bool, asking: bool = False) -> None:
    """The plan as text. Under --quiet its errors go to stderr, its notes nowhere, and its changes
    with their summary only as an `outcome` (plan's own, when it has changes; apply's outcome
    lines tell what it did instead). Whole whatever --quiet when someone is `asking` to confirm it."""
    from reconcile.render import problem_lines, render_changes, render_text

    if not _quiet or (asking and stdin_is_terminal()):
        echo(render_text(plan), outcome=True)
        return
    if outcome and plan.changes:
        echo(render_changes(plan), outcome=True)
    for line in problem_lines(plan):
        echo(line, err=True)


ConfigOpt = typer.Option(None, "--config", "-c", help="Config file (default: $XNAT2BIDS_CONFIG, ./xnat2bids.toml, ($XDG_CONFIG_HOME or ~/.config)/xnat2bids/xnat2bids.toml).")
ProjectOpt = typer.Option(None, "--project", "-p", help="XNAT project ID, or a glob over the projects of the config and the lock (repeatable).")
StudyOpt = typer.Option(None, "--project", "-p", help="layout = \"pi-study\": only the studies of these project IDs or globs (repeatable).")
SubjectOpt = typer.Option(None, "--subject", help="Subject label glob (repeatable).")
SessionOpt = typer.Option(None, "--session", help="Session label / experiment ID glob (repeatable).")
QuietOpt = typer.Option(False, "--quiet", "-q", help="For cron: print only what was done (the outcome lines and the summary; for plan, the changes), nothing when there is nothing to do; warnings and errors still go to stderr.")
InsecureOpt = typer.Option(False, "--insecure", help="Do not verify the XNAT server's TLS certificate (verify_tls = false).")
RootArg = typer.Argument(None, help="BIDS root (default: bids_root from the config, else ~/bids-export).")


def _load_config(config: Optional[Path]) -> Config:
    """The config a command's `--config` names, else the one given before the command
    (`xnat2bids -c FILE plan`), else the default. Two different files are an error."""
    given = _root_config
    if given is not None and config is not None and Path(given).absolute() != Path(config).absolute():
        raise ConfigError(f"two config files given: --config {given} before the command and --config {config} after it",
                          hint="give one")
    return load_config(config if config is not None else given)


def _tls(cfg: Config, insecure: bool) -> Config:
    if not insecure:
        return cfg
    from dataclasses import replace as _replace

    echo("warning: TLS certificate verification is off (--insecure)", err=True)
    return _replace(cfg, verify_tls=False)


def _selection(project: Optional[list[str]], subject: Optional[list[str]], session: Optional[list[str]]) -> Selection:
    return Selection(tuple(project or ()), tuple(subject or ()), tuple(session or ()))


def stdin_is_terminal() -> bool:
    """False also when stdin is closed (`<&-`: sys.stdin is None), as under some schedulers."""
    return sys.stdin is not None and sys.stdin.isatty()


def _ask(text: str) -> str:
    """A line typed at the terminal, asked on stderr as getpass asks for the password: stdout
    may be a redirected `plan --json` (click's prompt puts its last space there)."""
    sys.stderr.write(f"{text}: ")
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise typer.Abort()
    return line.rstrip("\n")


def connect(config: Config, *, interactive: bool | None = None):
    """Build the XNAT client: URL from the config or $XNAT_HOST, credentials never from argv."""
    from reconcile.credentials import cleartext, default_url, resolve_credentials
    from reconcile.xnat import XnatClient, base_url, shown_url

    from_env = default_url(os.environ)  # checked also when the config names the server
    url = config.xnat_url or from_env
    if config.xnat_url and from_env and from_env.rstrip("/") != config.xnat_url.rstrip("/"):
        echo(f"warning: $XNAT_HOST ({shown_url(from_env)}) is ignored: {config.source or 'the config'} names "
             f"{shown_url(config.xnat_url)}", err=True)
    if not url:
        where = f"{config.source} has no xnat_url" if config.source is not None else _no_config_file()
        raise ConfigError(f"no XNAT server configured: {where}",
                          hint="set xnat_url in the config (or pass --config FILE), or export XNAT_HOST")
    base_url(url)  # a malformed URL is said before credentials are looked for (or asked) for its host
    if interactive is None:
        interactive = stdin_is_terminal()
    prompt = _ask if interactive else None  # the user name; the password goes through getpass
    creds = resolve_credentials(url, prompt=prompt, warn=lambda m: echo(f"warning: {m}", err=True))
    if cleartext(url):
        echo(f"warning: {shown_url(url)} is reached over plain http: the password (or token) travels "
             "unencrypted; use an https:// URL", err=True)
    return XnatClient(url, creds, verify=config.verify_tls, timeout=config.timeout)



def run_plan(
    client,
    root: Path,
    config: Config,
    selection: Selection,
    *,
    deep: bool = False,
    as_json: bool = False,
    out: Path | None = None,
    detailed_exitcode: bool = False,
    reconvert_outdated: bool = False,
    full: bool = False,
    config_option: str = "",
    insecure: bool = False,
) -> int:
    """`config_option` (`-c FILE`, the config file given) and `insecure`: what `apply --plan` needs
    besides the plan file; forget, which asks nothing of XNAT, the config alone."""
    from dataclasses import replace as _replace

    from reconcile.observe import absent_root_note, make_plan
    from reconcile.render import render_json

    run = make_plan(client, root, config, selection, deep=deep, reconvert_outdated=reconvert_outdated, full=full)
    plan = _forget_here(run.plan, f" {shlex.quote(str(root))}{config_option}")
    _say_if_busy(root)
    vanished, _, unmounted = _missing_dataset(root)
    if vanished or unmounted:  # the warnings below say what apply does there, not "apply creates it"
        plan = _replace(plan, notes=tuple(n for n in plan.notes if n != absent_root_note(root)))
    if unmounted:
        echo(f"warning: {unmounted}; apply refuses to export into it (--accept-unmounted)", err=True)
    if vanished:
        echo(f"warning: {vanished} apply refuses to export into it (--accept-missing-lock if the dataset was "
             "removed on purpose)", err=True)
    unconfigured = _no_config_but_lock_had_one(config, run.lock, root)
    if unconfigured:
        echo(f"warning: {unconfigured}; the changes below may come from that (apply refuses to run so)", err=True)
    created = utc_now()
    # Only when asked for: the JSON of 10,000 changes costs ~0.35 s and 50 MB.
    doc = render_json(plan, bids_root=str(root), config_fingerprint=config.fingerprint(), xnat_url=client.url,
                      created_at=created) if out is not None or as_json else ""
    if out is not None and _is_stdout(out):  # `--out /dev/stdout`: the document alone, as --json gives it
        out, as_json = None, True
    if out is not None:
        _save_plan(out, doc)
    if as_json:
        sys.stdout.write(doc)
    else:
        echo(f"xnat2bids plan for {root} (lock serial {plan.serial})")
        echo()
        _show_plan(plan, outcome=True)
        if run.recovering:
            echo(f"The next apply settles {_count(run.recovering, 'interrupted commit')} first "
                 f"({'plan without --quiet names them' if _quiet else 'see the notes'}).",
                 outcome=True)
        if out is not None:
            apply_options = config_option + (" --insecure" if insecure else "")
            echo(f"\nSaved plan to {out}; run `xnat2bids apply --plan {shlex.quote(str(out))}{apply_options}` "
                 "to carry it out.")
            if plan.problems:  # as apply without a saved plan: the rest goes ahead, each problem stays one
                echo(f"It keeps the {len(plan.problems)} error(s) above: apply --plan carries out the other changes "
                     "and reports them again (exit 1).")
    if plan.problems:
        return EXIT_ERROR
    if detailed_exitcode and (plan.has_changes or run.recovering):  # cron's `--diff && --update` finishes them
        return EXIT_CHANGES
    return EXIT_OK


SQUEUE_GLANCE_S = 10  # how long plan and check wait for squeue to tell whether a batch is at work


def _say_if_busy(root: Path) -> None:
    """plan and check read a root another command may be changing: say so."""
    from reconcile.statelock import FINALIZE, working_holder

    holder = working_holder(root)
    if holder is None:
        return
    # A SLURM batch is at work while SLURM runs one of its jobs, as `status` asks; an interactive
    # finalize that claimed the batch's lock is judged by its process, which `working_holder` does not see.
    if holder.jobs and holder.operation != FINALIZE:
        from reconcile.executors.slurm import active_jobs

        try:
            # A warning only: plan and check do not wait a minute on a controller that hangs.
            running = bool(active_jobs(holder.jobs, timeout=SQUEUE_GLANCE_S))
        except XnatBidsError:  # SLURM cannot be asked (no squeue here, its controller down): it may be
            running = True
        if not running:
            echo(f"warning: SLURM batch {holder.id} holds this root, but none of its jobs ({', '.join(holder.jobs)}) "
                 f"is queued or running: nothing is at work here, and what it staged is not merged yet; "
                 f"`xnat2bids status {root}` tells more, `xnat2bids finalize {root}` merges it", err=True)
            return
    echo(f"warning: {holder.describe()} is at work on this root; what it changes may not be seen here yet",
         err=True)


def _say_if_merging(root: Path, *, as_json: bool) -> None:
    """check finds the lock the merge driver wrote valid while other files are half-merged, or the
    history git left conflicted: say so (on stderr beside JSON, which stays one document)."""
    from reconcile.apply import history_conflict_note
    from reconcile.vcs import maybe_in_git, unfinished_merge_note

    if not maybe_in_git(root):  # no merge could have been
        return
    for note in (unfinished_merge_note(root), history_conflict_note(root)):
        if note is not None:
            echo(f"note: {note}", err=as_json)


def _no_config_but_lock_had_one(cfg: Config, lock: Lock, root: Path) -> str | None:
    """What is wrong when no config file was found, but the lock's sessions were exported with
    settings other than the defaults (the file is elsewhere: another working directory)."""
    from reconcile.lock import lock_path

    if cfg.source is not None or not lock.sessions or lock.config_fingerprint in ("", cfg.fingerprint()):
        return None
    return f"{_no_config_file()}, but {lock_path(root)} was written with one"


def _no_config_file() -> str:
    from reconcile.config import config_candidates

    return f"no config file found (looked for {', '.join(map(str, config_candidates()))})"


def for_each_study(cfg: Config, root: Path, selection: Selection, run) -> int:
    """Run `run(root, selection)` once (flat layout) or per `<pi>/study-<study>/bids` dataset.

    The combined exit code is the worst one: error (1) over changes (2) over none (0).
    """
    if cfg.layout != "pi-study":
        return run(root, selection)
    from dataclasses import replace as _replace

    from reconcile.layout import discover, studies

    chosen = _studies_here(cfg, root, selection)  # a study's own bids folder: never a tree inside it
    if chosen is None:
        chosen = studies(root, selection.projects or cfg.projects, known=cfg.projects)
        # Each study's plan sees its own project only, so a table no study has (a misspelt
        # project) is noted here, once for the tree.
        known = {*cfg.projects, *(s.project for s in chosen), *(s.project for s in discover(root))}
        for project in sorted(set(cfg.project_tables) - known):
            echo(f"note: [project.{project}] names a project that is neither configured, exported nor selected")
    codes = []
    for study in chosen:
        if _stopping:  # Ctrl-C or SIGTERM cancelled a study's apply: the others do not start
            echo(f"Stopped before {study.project}: the remaining studies were not started.", outcome=True)
            codes.append(EXIT_ERROR)
            break
        _study_heading(f"=== {study.project}: {study.root}")
        try:
            codes.append(run(study.root, _replace(selection, projects=(study.project,))))
        except _STUDY_ERRORS as exc:
            _render_error(exc)
            codes.append(EXIT_ERROR)
        echo()
    return _worst(codes)


# What stops one study but not the others: its lock (invalid, written meanwhile, held by another
# apply), its folders, its project's listing. Errors of XNAT as a whole or of the config
# (credentials, an unreachable host) would only repeat for every study: they end the walk.
_STUDY_ERRORS = (LockfileError, LockHeldError, StalePlanError, UnsafePathError, PlanError, NotFoundError)


def one_dataset(cfg: Config, root: Path) -> bool:
    """True when `root` is a single dataset: the flat layout, or in pi-study one study's `bids`
    folder given directly (it holds a lock or xnat2bids' state, as a SLURM finalize job's does)."""
    from reconcile.lock import lock_path

    return cfg.layout != "pi-study" or lock_path(root).is_file() or (root / WORK_DIR).is_dir()


def need_one_dataset(cfg: Config, root: Path) -> None:
    """--json prints one document: one dataset."""
    if not one_dataset(cfg, root):
        raise ConfigError("--json needs one dataset; with layout = \"pi-study\" pass a study's bids folder "
                          f"({root}/<pi>/study-<study>/bids)")


def _need_dataset_folder(root: Path) -> None:
    """Commands that write into a dataset refuse a root that is missing or not a folder."""
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"BIDS root {root} {what}", hint="pass the dataset's folder, or set bids_root in the config")


def _offline_command(config: Optional[Path], bids_root: Optional[Path], as_json: bool,
                     run: Callable[[Path], int], *, none: Callable[[Path], int],
                     projects: Optional[list[str]] = None) -> NoReturn:
    """The body of the commands that only read the dataset (status, show, history, check):
    `run` per dataset (the studies `projects` selects), `none(root)` when a pi-study root holds
    none; exits with the worst code."""
    _errors_as_json(as_json)
    cfg = _load_config(config)
    root = cfg.resolve_bids_root(bids_root)
    raise typer.Exit(for_each_dataset(cfg, root, run, none=lambda: none(root), as_json=as_json,
                                      projects=tuple(projects or ())))


def _no_datasets(root: Path, meaning: str) -> int:
    echo(f"No <pi>/study-<study>/bids datasets under {root}: {meaning}.")
    return EXIT_OK


def for_each_dataset(cfg: Config, root: Path, run, *, none, as_json: bool = False,
                     projects: tuple[str, ...] = ()) -> int:
    """Run `run(root)` once (one dataset) or per `<pi>/study-<study>/bids` dataset found under
    `root` (those of the `projects` IDs or globs, when given), and `none()` when there is none:
    the commands' `for_each_study` that ask nothing of XNAT. With `as_json` there must be one
    dataset (one JSON document).

    An error in one dataset is reported and the next one still looked at; the combined exit code
    is the worst one, as for plan.
    """
    if as_json:
        need_one_dataset(cfg, root)
    _need_dataset_folder(root)  # a mistyped root is not an empty dataset
    if projects and cfg.layout != "pi-study":
        raise ConfigError(f"--project selects studies of the pi-study layout; {root} is one dataset of every project",
                          hint="leave --project out")
    if one_dataset(cfg, root):
        if projects:
            _studies_here(cfg, root, Selection(projects=projects))  # an error if it is not a selected study
        return run(root)
    from reconcile.config import expand_projects
    from reconcile.layout import discover

    found = discover(root)
    if projects:
        chosen = set(expand_projects(projects, [s.project for s in found], where=f"exported under {root}"))
        if chosen - {s.project for s in found}:
            raise ConfigError(f"no dataset of {', '.join(sorted(chosen - {s.project for s in found}))} "
                              f"under {root}", hint="see the exported studies with `xnat2bids show`")
        found = [s for s in found if s.project in chosen]
    datasets: dict[Path, list[str]] = {}
    for study in found:
        datasets.setdefault(study.root, []).append(study.project)
    if not datasets:
        return none()
    codes = []
    for where, projects in datasets.items():
        _study_heading(f"=== {', '.join(projects)}: {where}")
        try:
            codes.append(run(where))
        except XnatBidsError as exc:
            _render_error(exc)
            codes.append(EXIT_ERROR)
        echo()
    return _worst(codes)


def _count(n: int, noun: str) -> str:
    """'1 session', '2 sessions'."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _worst(codes: list[int]) -> int:
    """Error (1) over changes (2) over none (0)."""
    return EXIT_ERROR if EXIT_ERROR in codes else max(codes, default=EXIT_OK)


@app.callback(invoke_without_command=True)
def root_callback(
    ctx: typer.Context,
    diff: Optional[str] = typer.Option(None, "--diff", metavar="[ROOT]",
                                       help="As the old script had it: same as `plan --detailed-exitcode [ROOT]`."),
    update: Optional[str] = typer.Option(None, "--update", metavar="[ROOT]",
                                         help="As the old script had it: same as `apply [ROOT]`."),
    config: Optional[Path] = ConfigOpt,
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    global _debug, _root_config, _json_errors, _stopping, _quiet, _heading
    _debug, _root_config, _json_errors, _stopping, _quiet, _heading = debug, config, False, False, False, None
    if version:
        echo(f"xnat2bids {__version__}")
        raise typer.Exit(EXIT_OK)
    if ctx.invoked_subcommand is not None:
        if diff is not None or update is not None:
            raise UsageError(f"--{'diff' if diff is not None else 'update'} is a command of its own; "
                             f"it cannot be combined with `{ctx.invoked_subcommand}`", ctx)
        return
    if diff is not None and update is not None:
        raise UsageError("--diff and --update cannot be combined: run `xnat2bids --update [ROOT]` (it plans first)", ctx)
    named = diff or update
    if named and named in ctx.command.commands and not Path(named).exists():  # `--diff plan`
        flag = "--diff" if diff is not None else "--update"
        raise UsageError(f"{flag} takes a BIDS root, and {named!r} is a command: run `xnat2bids {named} …`", ctx)
    if diff is not None:
        cfg = _load_config(config)
        with connect(cfg) as client:
            code = for_each_study(
                cfg, cfg.resolve_bids_root(diff or None), Selection(),
                lambda root, sel: run_plan(client, root, cfg, sel, detailed_exitcode=True,
                                           config_option=_config_option(config)),
            )
        raise typer.Exit(code)
    if update is not None:
        cfg = _load_config(config)
        raise typer.Exit(for_each_study(
            cfg, cfg.resolve_bids_root(update or None), Selection(),
            lambda root, sel: run_apply(cfg, root, sel, yes=not stdin_is_terminal(), config_option=_config_option(config)),
        ))
    echo(ctx.get_help())
    # A usage error: a cron line whose command came from an empty variable must not pass for a run.
    echo("error: no command given", err=True)
    raise typer.Exit(EXIT_ERROR)


@app.command()
def plan(
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    project: Optional[list[str]] = ProjectOpt,
    subject: Optional[list[str]] = SubjectOpt,
    session: Optional[list[str]] = SessionOpt,
    deep: bool = typer.Option(False, "--deep", help="Also compare scans and file listings per session."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (schemas/plan.schema.json)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Save the plan for `apply --plan`."),
    detailed_exitcode: bool = typer.Option(False, "--detailed-exitcode", help="Exit 2 when there are changes."),
    reconvert_outdated: bool = typer.Option(False, "--reconvert-outdated", help="Plan sessions converted with older tools as updates."),
    full: bool = typer.Option(False, "--full", help="Also compare the sha256 of every output, as check --full: content changed without a new size or time is drift."),
    insecure: bool = InsecureOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Show what apply would change: create / update / drift / orphan.

    Example: xnat2bids plan ~/bids-export --project PROJ --detailed-exitcode

    Example: xnat2bids plan ~/bids-export --quiet --detailed-exitcode   (prints nothing when nothing changed)
    """
    _errors_as_json(as_json)
    _be_quiet(quiet)
    cfg = _tls(_load_config(config), insecure)
    root, selection = cfg.resolve_bids_root(bids_root), _selection(project, subject, session)
    one = cfg.layout != "pi-study"
    if not one and (as_json or out):  # one document: one study's own folder, planned as it alone
        one = True
        root, selection = _one_study(cfg, root, selection, "--json and --out need")

    config_option = _config_option(config)

    def run(where: Path, sel: Selection) -> int:
        return run_plan(client, where, cfg, sel, deep=deep, as_json=as_json, out=out,
                        detailed_exitcode=detailed_exitcode, reconvert_outdated=reconvert_outdated, full=full,
                        config_option=config_option, insecure=insecure)

    with connect(cfg) as client:
        code = run(root, selection) if one else for_each_study(cfg, root, selection, run)
    raise typer.Exit(code)


def _studies_here(cfg: Config, root: Path, selection: Selection):  # noqa: ANN202 - list[Study] | None
    """In the pi-study layout, the studies whose own folder `root` is (by its lock or its path)
    that `selection` selects: an error if it selects none of them; None at the top of a tree."""
    from reconcile.config import select
    from reconcile.layout import study_at

    here = study_at(root, known=cfg.projects)
    if here is None:
        return None
    chosen = [s for s in here if select(selection.projects, s.project)]
    if not chosen:
        raise ConfigError(f"{root} is the dataset of {', '.join(s.project for s in here)}, which "
                          f"--project {' '.join(selection.projects)} does not select",
                          hint="pass the top of the pi/study tree to reach other studies")
    return chosen


def _leave_hung_up_terminal(fds: list[int]) -> None:
    """Point these descriptors (the terminal's) at /dev/null: after a hangup every write to the
    terminal fails (EIO), and the stop must still settle the sessions and write the history."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _own_ignores(root: Path) -> None:
    """The work area's ignore rules, before apply downloads DICOM into it or a batch writes its
    credentials file there."""
    from reconcile.vcs import ensure_own_ignores
    from reconcile.workarea import work_path

    work_path(root).mkdir(exist_ok=True)
    ensure_own_ignores(root)


def _save_plan(out: Path, doc: str) -> None:
    """Write a saved plan: a file (or a link to one) is replaced whole, so a kill while writing
    leaves the plan saved before, not half of this one; anything else (/dev/stdout, a pipe) is
    written through."""
    import stat as stat_module

    from reconcile.durable import write_atomic

    try:
        regular = stat_module.S_ISREG(os.stat(out).st_mode) and not _through_a_device(out)
    except FileNotFoundError:
        regular = True  # a new file, or a link to one not made yet
    if regular:
        write_atomic(Path(os.path.realpath(out)), doc)
    else:  # appended: opening /dev/stdout anew would truncate the file the shell opened for `>>`
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(doc)


def _is_stdout(path: Path) -> bool:
    """Whether `path` is what this process's standard output writes to (/dev/stdout, /dev/fd/1, the
    file or pipe a shell redirected it to): the plan text would otherwise mix with the document."""
    try:
        return os.path.samestat(os.stat(path), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):  # no such path yet; a stdout without a descriptor
        return False


def _through_a_device(path: Path) -> bool:
    """Whether `path`, or a link on its way, is in /dev or /proc: /dev/stdout of a shell's `>> log`
    resolves to the log file, which must be written to, not replaced."""
    here = os.path.abspath(path)
    for _ in range(40):
        if here.startswith(("/dev/", "/proc/")):
            return True
        if not os.path.islink(here):
            return False
        here = os.path.join(os.path.dirname(here), os.readlink(here))
    return True  # a loop of links: write through and let the OS say what it thinks


def _one_study(cfg: Config, root: Path, selection: Selection, needs: str, *,
               by_project: bool = True) -> tuple[Path, Selection]:
    """The one study's own folder and `selection` for it: `root` when it is that folder; at the top
    of a pi-study tree, the folder of the one project `selection` names. An error otherwise."""
    from dataclasses import replace as _replace

    from reconcile.config import is_pattern

    here = _studies_here(cfg, root, selection)
    if here is None and len(selection.projects) == 1 and not is_pattern(selection.projects[0]):
        from reconcile.layout import study_root

        return study_root(root, selection.projects[0]), selection
    if here is None or len(here) != 1:
        raise ConfigError(f"{needs} one dataset; with layout = \"pi-study\" pass a study's bids folder "
                          f"({root}/<pi>/study-<study>/bids)" + (" or one --project PI_STUDY" if by_project else ""))
    return root, _replace(selection, projects=(here[0].project,))


def run_apply(
    cfg: Config,
    root: Path,
    selection: Selection,
    *,
    saved: _SavedPlan | None = None,
    yes: bool = False,
    jobs: int | None = None,
    deep: bool = False,
    repair_drift: bool = False,
    keep_dicom: bool = False,
    git_commit: bool = False,
    run_validator: bool = False,
    reconvert_outdated: bool = False,
    full: bool = False,
    client=None,
    executor: str | None = None,
    dry_run: bool = False,
    wait: bool = False,
    accept_older_lock: bool = False,
    accept_missing_lock: bool = False,
    accept_unmounted: bool = False,
    config_option: str = "",
) -> int:
    """Plan (or load a saved plan), confirm, apply under the state lock, record history.

    With the SLURM executor the sessions are submitted instead (see `run_slurm_apply`).
    """
    from reconcile import statelock
    from reconcile.apply import ApplyOptions, append_history, apply_plan
    from reconcile.observe import tool_versions
    from reconcile.progress import format_duration

    started = time.monotonic()  # the run's wall time, as the summary says it

    warn = lambda m: echo(f"warning: {m}", err=True)  # noqa: E731
    own_client = client is None
    created = begun = False  # begun: sessions under way (a SLURM batch submitted); the run's own entry tells of them
    try:
        if root.exists() and not root.is_dir():
            raise ConfigError(f"BIDS root {root} exists but is not a directory")
        if not (root / WORK_DIR).is_dir():  # nothing to recover or commit: refused before any work
            _refuse_whitespace(root)
        if saved is not None:  # a plan for another root must not leave an empty one behind
            from reconcile.apply import check_plan_root

            check_plan_root(saved.data.get("bids_root", ""), root)
            serial = (saved.data.get("lock") or {}).get("serial")
            if not root.exists() and isinstance(serial, int) and serial > 0:
                raise StalePlanError(f"plan is stale: it was made against the lock of {root} (serial {serial}), and "
                                     "that folder no longer exists", hint="was the dataset moved? plan again where it is")
        _refuse_missing_dataset(root, accept_missing_lock=accept_missing_lock, accept_unmounted=accept_unmounted)
        if run_validator:
            from reconcile.validate import validator

            validator()  # installed? said before any work, not after it
        client = client or connect(cfg)
        if saved is not None:  # a plan for another XNAT or config: said so, not the login's failure
            from reconcile.apply import check_plan_made_for

            check_plan_made_for(root, cfg, client.url, planned_root=saved.data.get("bids_root", ""),
                                planned_config=saved.data.get("config_fingerprint"),
                                planned_url=saved.data.get("xnat_url"))
        if not dry_run:  # which writes nothing, the root included
            client.login()  # first: a failed login (XNAT unreachable, bad password) leaves no new root behind
            share_with_group(root)
            created = not root.exists()
            _create_root(root, cfg.layout)
            if not os.access(root, os.W_OK | os.X_OK):
                raise ConfigError(f"BIDS root {root} is not writable by this user")
        if git_commit and not dry_run:
            from reconcile.vcs import check_can_commit

            check_can_commit(root)  # before any work, not after it
        if not dry_run:  # before recovery, which writes the lock and the history too
            from reconcile.apply import refuse_conflicted_history
            from reconcile.dataset import refuse_unfinished_merge

            refuse_unfinished_merge(root)
            refuse_conflicted_history(root)
        if executor not in (None, "local", "slurm"):
            raise ConfigError(f"unknown executor {executor!r}", hint="use --executor local or --executor slurm")

        if (executor or cfg.executor) == "slurm":
            code, batch = run_slurm_apply(
                cfg, root, selection, client, saved=saved, yes=yes, jobs=jobs, deep=deep,
                repair_drift=repair_drift, keep_dicom=keep_dicom, git_commit=git_commit, run_validator=run_validator,
                reconvert_outdated=reconvert_outdated, full=full, dry_run=dry_run,
                accept_older_lock=accept_older_lock, config_option=config_option,
            )
            begun = batch is not None
            return max(code, _wait_for_batch(batch)) if wait and batch is not None else code
        if dry_run:
            raise ConfigError("--dry-run prints the SLURM job scripts; it needs --executor slurm",
                              hint="`xnat2bids plan` previews a local apply")
        _settle_slurm_batch(root, warn)
        with statelock.held(root, "apply", warn=warn) as holder:
            plan, todo, held = _recover_and_plan(client, root, cfg, selection, saved=saved, deep=deep,
                                                 reconvert_outdated=reconvert_outdated, full=full,
                                                 repair_drift=repair_drift, warn=warn,
                                                 accept_older_lock=accept_older_lock, config_option=config_option,
                                                 asking=not yes)
            untouched = _left_alone(plan, todo, held)
            if not todo:
                return _nothing_to_apply(root, plan, held, untouched, git_commit=git_commit, record=True)
            _refuse_whitespace(root)
            if not yes:
                if not stdin_is_terminal():
                    raise ConfigError("apply needs confirmation; without a terminal pass --yes")
                asked = time.monotonic()
                if not _confirmed(root, holder, f"Apply {len(todo)} change(s) to {root}?"):
                    echo("Cancelled; nothing changed.", outcome=True)
                    return EXIT_ERROR
                started += time.monotonic() - asked  # the run's time, not the time it waited for an answer
            _own_ignores(root)
            cancel = threading.Event()
            previous_handlers: dict[int, Any] = {}
            if threading.current_thread() is threading.main_thread():
                first: list[float] = []
                terminal_fds = [fd for fd in (1, 2) if os.isatty(fd)]  # a hung-up terminal is no tty any more

                def on_stop(signum, frame):  # first Ctrl-C, SIGTERM or SIGHUP: finish cleanly; second: hard stop
                    global _stopping
                    if signum == signal.SIGHUP:
                        _leave_hung_up_terminal(terminal_fds)
                    if first and time.monotonic() - first[0] < SAME_SIGNAL_S:
                        return  # the same stop twice: GNU timeout signals its child and then its process group
                    if cancel.is_set():
                        # A download that trickles, or a converter, can hold a worker for hours, and
                        # the thread pool waits for its workers however the main thread exits. Every
                        # step is crash-safe: what was under way is settled by the next apply.
                        with contextlib.suppress(Exception):
                            reporter.close()  # a live progress bar gives the terminal its cursor back
                        echo("Forced stop: the next apply settles what was under way.", err=True)
                        os._exit(130 if signum == signal.SIGINT else 128 + signum)
                    cancel.set()
                    first.append(time.monotonic())
                    _stopping = True
                    again = "Ctrl-C again" if signum == signal.SIGINT else f"a second {signal.Signals(signum).name}"
                    echo(f"\nStopping: the sessions under way are abandoned cleanly ({again} to force).", err=True)
                # SIGTERM is what `timeout`, systemd and a SLURM time limit send before SIGKILL;
                # SIGHUP what an SSH session that dropped sends.
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    if signal.getsignal(signum) is not signal.SIG_IGN:  # `nohup` ignores SIGHUP: it stays so
                        previous_handlers[signum] = signal.signal(signum, on_stop)
            begun = True
            reporter = _reporter(len(todo))
            try:
                options = ApplyOptions(
                    jobs=jobs or cfg.jobs or max(1, min(4, os.cpu_count() or 1)),
                    repair_drift=repair_drift,
                    keep_dicom=keep_dicom or cfg.keep_dicom,
                )
                report = apply_plan(plan, root, client, cfg, options=options, tools=tool_versions(),
                                    on_event=reporter, cancel=cancel)
            finally:
                reporter.close()
                for signum, handler in previous_handlers.items():
                    signal.signal(signum, handler)
            try:
                append_history(root, plan, report, errors=_not_taken_up(plan, held))
            except OSError as exc:  # a full disk: the summary below still says what was done
                warn(f"could not append this apply to the history ({exc.strerror or exc}): {exc.filename or root}; "
                     "the next apply records its commits")
            from reconcile.apply import Status

            echo(
                f"\nApply {'cancelled' if report.cancelled else 'complete'}: {report.count(Status.DONE)} done, "
                f"{report.count(Status.FAILED)} failed, {report.count(Status.SKIPPED)} skipped; "
                f"lock serial {report.lock.serial if report.lock else plan.serial}; "
                f"took {format_duration(time.monotonic() - started)}.{untouched}", outcome=True
            )
            if report.halted:  # a cron mail's reader sees why, not only how many were skipped
                echo(f"Stopped early: {report.halted}.", outcome=True, err=_quiet)
            code = EXIT_OK if report.ok and not plan.problems and not held else EXIT_ERROR
            _say_held_back(held)
            if run_validator:
                from reconcile.validate import validate

                try:
                    result = validate(root)
                except XnatBidsError as exc:  # what was applied is committed still, as a SLURM finalize does
                    echo(f"error: {exc}", err=True)
                    code = EXIT_ERROR
                else:
                    for err in result.errors:
                        echo(f"validator: {err}", outcome=True)
                    echo(result.summary(), outcome=True)
                    code = code or (EXIT_ERROR if result.errors else EXIT_OK)
            if git_commit:
                _git_commit(root, report)
            return code
    except LockHeldError:  # another apply made the root meanwhile and works in it: not ours to tidy
        raise
    except XnatBidsError as exc:
        if created:  # refused before it wrote anything (a SLURM limit, a config the lock had): no empty root left
            _remove_empty_folders(root)
        elif not begun and not dry_run and not isinstance(exc, Cancelled):  # a stop asked for is no failure
            _record_failed_run(root, [(exc.kind, exc.summary)])
        raise
    finally:
        if own_client and client is not None:
            client.close()


def _missing_dataset(root: Path) -> tuple[str | None, str | None, str | None]:
    """What tells that `root`, without a lock, is not a new dataset's place: (the lock this user
    saw there and that is gone, the fstab mount point above it that nothing is mounted on, that
    problem said), as messages; all None for a root with a lock, or a new dataset's."""
    from reconcile.lock import lock_path, vanished_lock
    from reconcile.mounts import FSTAB, bare_above, unmounted_above

    if os.path.lexists(lock_path(root)):  # the dataset is there, whatever the fstab says
        return None, None, None
    # Where xnat2bids' state folder is, the file system is there: `lost_lock` tells what its history
    # says. A lock gone with the whole root, from a folder that holds other things, was removed.
    vanished = None if (root / WORK_DIR).is_dir() or not bare_above(root) else vanished_lock(root)
    unmounted = unmounted_above(root)
    if unmounted is None:
        return vanished, None, None
    point, what = unmounted
    return vanished, point, (f"BIDS root {root} is on {point}, which {FSTAB} lists as the mount "
                                        f"point of {what}, and nothing is mounted there")


def _refuse_missing_dataset(root: Path, *, accept_missing_lock: bool, accept_unmounted: bool) -> None:
    """Before anything is created: an apply from cron into a file system not mounted would export
    every session again onto the disk underneath, and end well."""
    vanished, point, unmounted = _missing_dataset(root)
    if unmounted and not accept_unmounted:
        raise ConfigError(f"apply refused: {unmounted}",
                          hint=f"mount it (`mount {shlex.quote(str(point))}`) and apply again; if the dataset is "
                               "to be on the disk under that mount point, --accept-unmounted exports there")
    if vanished and not accept_missing_lock:
        raise LockfileError(f"apply refused: {vanished}", hint="mount it, or restore the lock, and apply again; if "
                            "the dataset was removed on purpose, --accept-missing-lock starts a new one there")


def _remove_empty_folders(root: Path) -> None:
    """Remove a root this run made, and the work area's folders in it, where they hold nothing;
    never a file, and no folder of the BIDS tree."""
    work = root / WORK_DIR
    for folder in [*sorted((p for p in work.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True), work, root]:
        with contextlib.suppress(OSError):
            folder.rmdir()


@app.command()
def apply(
    ctx: typer.Context,
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    project: Optional[list[str]] = ProjectOpt,
    subject: Optional[list[str]] = SubjectOpt,
    session: Optional[list[str]] = SessionOpt,
    plan_file: Optional[Path] = typer.Option(None, "--plan", help="Carry out a plan saved with `plan --out`."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Sessions processed at once."),
    deep: bool = typer.Option(False, "--deep", help="Plan with scan and file listings."),
    repair_drift: bool = typer.Option(False, "--repair-drift", help="Re-export sessions whose files changed on disk."),
    keep_dicom: bool = typer.Option(False, "--keep-dicom", help="Keep the DICOM under sourcedata/."),
    git_commit: bool = typer.Option(False, "--git-commit", help="Commit the result when the BIDS root is a git repository."),
    run_validator: bool = typer.Option(False, "--validate", help="Run the BIDS validator afterwards."),
    reconvert_outdated: bool = typer.Option(False, "--reconvert-outdated", help="Re-convert sessions made with older tools."),
    full: bool = typer.Option(False, "--full", help="Also compare the sha256 of every output, as check --full: content changed without a new size or time is drift (--repair-drift replaces it)."),
    executor: Optional[str] = typer.Option(
        None, "--executor", metavar="[local|slurm]", help="Where sessions run: local (default) or slurm (overrides `executor` in the config).",
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="SLURM: print the job scripts and sbatch commands; submit nothing."),
    wait: bool = typer.Option(False, "--wait", help="SLURM: block until the finalize job ends; exit with the batch's status (Ctrl-C stops the waiting, not the batch: exit 130)."),
    accept_older_lock: bool = typer.Option(
        False, "--accept-older-lock",
        help="Go on with a lock older than the history (restored from a backup): what it lacks stays unrecorded.",
    ),
    accept_missing_lock: bool = typer.Option(
        False, "--accept-missing-lock",
        help="Start a new dataset in a root whose lock you removed: without it apply refuses a root without a "
             "lock where it read or wrote one before (its file system not mounted?).",
    ),
    accept_unmounted: bool = typer.Option(
        False, "--accept-unmounted",
        help="Create the dataset under a mount point /etc/fstab lists although nothing is mounted there (it goes "
             "onto the disk underneath).",
    ),
    insecure: bool = InsecureOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Export and convert what plan reports (create / update), updating the lock per session.

    A root without a lock where this user saw one before, or under a mount point of /etc/fstab
    that is not mounted, is refused before anything is created: a file system not mounted.

    With --executor slurm (or executor = "slurm"), --jobs is the array's limit of tasks at once.

    Example: xnat2bids apply ~/bids-export --project PROJ --yes --jobs 4

    Example: xnat2bids apply ~/bids-export --executor slurm --yes --wait

    Example (crontab): 0 2 * * * xnat2bids apply ~/bids-export --yes --quiet
    """
    _be_quiet(quiet)
    if plan_file is not None:
        planning = [flag for flag, given in (("--project", project), ("--subject", subject), ("--session", session),
                                             ("--deep", deep), ("--reconvert-outdated", reconvert_outdated),
                                             ("--full", full)) if given]
        if planning:  # they shape a plan; a saved one is carried out as it was made
            raise UsageError(f"{', '.join(planning)} cannot be combined with --plan: a saved plan is applied as planned; "
                             f"pass {planning[0]} to `xnat2bids plan --out FILE` instead", ctx)
    cfg = _tls(_load_config(config), insecure)
    saved = _SavedPlan(plan_file, _read_plan_file(plan_file)) if plan_file is not None else None
    if saved is not None and bids_root is None:  # the root the plan was made for, not the config's
        bids_root = Path(saved.data["bids_root"])
    root, selection = cfg.resolve_bids_root(bids_root), _selection(project, subject, session)

    def run(where: Path, sel: Selection) -> int:
        return run_apply(cfg, where, sel, saved=saved, yes=yes, jobs=jobs, deep=deep, repair_drift=repair_drift,
                         keep_dicom=keep_dicom, git_commit=git_commit, run_validator=run_validator,
                         reconvert_outdated=reconvert_outdated, full=full, executor=executor, dry_run=dry_run,
                         wait=wait, accept_older_lock=accept_older_lock, accept_missing_lock=accept_missing_lock,
                         accept_unmounted=accept_unmounted, config_option=_config_option(config))

    if plan_file is not None and cfg.layout == "pi-study":  # a saved plan is one study's
        raise typer.Exit(run(*_one_study(cfg, root, selection, "--plan applies to", by_project=False)))
    raise typer.Exit(for_each_study(cfg, root, selection, run))


class _SavedPlan(NamedTuple):
    """A plan file given with `apply --plan`, read once."""

    path: Path
    data: dict


def _git_commit(root: Path, report, *, say_none: bool = True) -> None:
    from reconcile.vcs import commit_apply

    commit = commit_apply(root, "xnat2bids apply", report)
    if commit or say_none:
        echo(f"git commit {commit}" if commit else "git: nothing to commit", outcome=bool(commit))


def _refuse_whitespace(root: Path) -> None:
    """Before any session is exported (recovery and a commit, which convert nothing, go ahead)."""
    problem = unconvertible(root)
    if problem is not None:
        raise problem


_FORGET_ADVICE = re.compile(r"`xnat2bids forget ([^`\s]+)`")


def _config_option(config: Path | None) -> str:
    """` -c FILE` for the config file given (`-c`, before or after the command, or $XNAT2BIDS_CONFIG,
    which another shell may not have set); "" for none. Advice that names a command (`forget`, a
    saved plan's `apply --plan`) works only with the config it was made with."""
    given = config if config is not None else _root_config
    if given is None and os.environ.get(ENV_CONFIG):
        given = Path(os.environ[ENV_CONFIG])
    return f" -c {shlex.quote(str(given))}" if given is not None else ""


def _forget_here(plan: Plan, where: str) -> Plan:
    """The plan's `xnat2bids forget ID` advice with the root and config it was made for (`where`):
    run bare, forget would look in the default root."""
    from dataclasses import replace

    def told(text: str | None) -> str | None:
        return _FORGET_ADVICE.sub(lambda m: f"`xnat2bids forget {m.group(1)}{where}`", text) if text else text

    return replace(plan, notes=tuple(map(told, plan.notes)),
                   problems=tuple(replace(p, message=told(p.message), hint=told(p.hint)) for p in plan.problems))


def _create_root(root: Path, layout: str) -> None:
    """The BIDS root, created if missing (see `workarea.uncreatable`)."""
    problem = uncreatable(root, layout)
    if problem is not None:
        raise problem
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create BIDS root {root}: {exc.strerror or exc}",
                          hint=write_hint(exc, exc.filename or root)) from exc


def _held_back(plan: Plan, todo: tuple[Change, ...]) -> tuple[Change, ...]:
    """The creates and updates from XNAT apply does not carry out: their sessions' files changed
    on disk, which only --repair-drift replaces."""
    carried = set(map(id, todo))
    return tuple(c for c in plan.changes if c.action in (Action.CREATE, Action.UPDATE) and id(c) not in carried)


def _say_held_back(held: tuple[Change, ...]) -> None:
    """On stderr, why apply ends with status 1 although nothing failed: XNAT has changes the
    dataset did not take, which cron and scripts must hear of."""
    said = _held_back_said(held)
    if said:
        echo(f"error: {said}", err=True)


def _not_taken_up(plan: Plan, held: tuple[Change, ...]) -> list[tuple[str, str]]:
    """(kind, summary) of what an apply of `plan` leaves undone as errors, for its history entry:
    the plan's errors (without a server's words they quote) and the updates held back."""
    held_back = _held_back_said(held)
    return [*(("plan", p.summary or p.message) for p in plan.problems), *([("held", held_back)] if held_back else [])]


def _held_back_said(held: tuple[Change, ...]) -> str | None:
    if not held:
        return None
    edited = [c for c in held if c.edited]
    # Named where their changed files are: a rename held back has not moved them.
    names = ", ".join((c.before.address if c.before else c.address).path for c in edited[:3]) + (
        ", …" if len(edited) > 3 else "")
    waiting = len(held) - len(edited)  # sessions of a subject rename that moves whole, with an edited one
    also = f"; {waiting} more of the same subject wait{'s' if waiting == 1 else ''} with them" if waiting else ""
    return (f"{len(held)} change{'s' if len(held) != 1 else ''} from XNAT held back ({names}): files of "
            f"{'these sessions' if len(edited) != 1 else 'this session'} changed on disk{also}; apply --repair-drift "
            "carries them out, keeping a copy of each changed file")


def _left_alone(plan: Plan, todo: tuple[Change, ...], held: tuple[Change, ...]) -> str:
    """What apply leaves as it is by design (drift and updates over edited outputs unless
    --repair-drift, orphans), for its summary:
    " Left as they are: 1 drifted, 1 update held back, 2 orphaned (see the plan's notes)." or ""."""
    carried = set(map(id, todo))
    left = [c.action for c in plan.changes if id(c) not in carried]
    stopped = sum(1 for p in plan.problems if p.experiment_id)  # a collision, an unsafe label: sessions left out
    parts = [f"{n} {word}" for n, word in (
        (left.count(Action.DRIFT), "drifted"),
        (len(held), "update held back" if len(held) == 1 else "updates held back"),
        (left.count(Action.ORPHAN), "orphaned"),
        (stopped, "session error" if stopped == 1 else "session errors"),
    ) if n]
    see = "the plan's errors and notes" if stopped else "the plan's notes"
    if _quiet:  # which it did not print
        see = "`xnat2bids plan`, which tells why"
    return f" Left as they are: {', '.join(parts)} (see {see})." if parts else ""


def _recover_and_plan(
    client, root: Path, cfg: Config, selection: Selection, *, saved: _SavedPlan | None, deep: bool,
    reconvert_outdated: bool, full: bool, repair_drift: bool, warn: Callable[[str], None] | None,
    accept_older_lock: bool = False, config_option: str = "", asking: bool = False,
) -> tuple[Plan, tuple[Change, ...], tuple[Change, ...]]:
    """What both executors do first under the state lock: settle interrupted commits and token
    revocations (not without the lock: `warn` None), then plan and show it, and refuse a plan whose
    commits would update a dataset file git left conflicted.
    Returns (plan, the changes to carry out, the updates held back)."""
    from reconcile.apply import recover
    from reconcile.dataset import check_dataset_level_files, refuse_unresolved_conflicts
    from reconcile.plan import subjects_written

    if warn is not None:
        for exp_id in recover(root, warn=warn):
            echo(f"recovered the interrupted commit of {exp_id}", outcome=True)
        _retry_token_revocations(root, client, warn)
    plan = _load_or_make_plan(client, root, cfg, selection, saved=saved, deep=deep,
                              reconvert_outdated=reconvert_outdated, full=full, accept_older_lock=accept_older_lock)
    shown = _forget_here(plan, f" {shlex.quote(str(root))}{config_option}")
    _show_plan(repairing(shown) if repair_drift else shown, outcome=False, asking=asking)
    todo = plan.actionable(repair_drift=repair_drift)
    if todo and warn is not None:  # not for a --dry-run (no lock taken), which writes nothing
        # Before any download: every commit updates participants.tsv, and a session would be
        # exported, converted and then failed at its commit.
        refuse_unresolved_conflicts(root, subjects_written(todo))
        check_dataset_level_files(root)  # one not UTF-8 (or not JSON) too
    return plan, todo, _held_back(plan, todo)


def _nothing_to_apply(root: Path, plan: Plan, held: tuple[Change, ...], untouched: str, *, git_commit: bool,
                      record: bool) -> int:
    """`record`: the run holds the state lock, and tells the history of a plan whose errors (a
    listing that failed) left nothing to apply."""
    from reconcile.render import problems

    # Said as a failure: after "Nothing planned", a cron mail must not read as a quiet night.
    # Under --quiet, what is left as it is (a file gone from the dataset, a session deleted in
    # XNAT) is said on stderr, night after night until it is dealt with: cron mails it.
    echo(f"Nothing applied: {problems(plan)} above.{untouched}" if plan.problems else f"Nothing to apply.{untouched}",
         err=_quiet and bool(untouched) and not plan.problems, outcome=bool(untouched) and not plan.problems)
    if git_commit:  # what recovery completed, or a run killed before its commit, is committed still
        from reconcile.apply import ApplyReport

        _git_commit(root, ApplyReport(), say_none=False)
    errors = _not_taken_up(plan, held)
    if record and errors:  # after the commit: a night that failed is no commit of its own
        _record_failed_run(root, errors, locked=True)
    _say_held_back(held)
    return EXIT_ERROR if plan.problems or held else EXIT_OK


def _record_failed_run(root: Path, errors: list[tuple[str, str]], *, locked: bool = False) -> None:
    """Tell the history of an apply that failed before it applied anything (`errors`: each one's
    kind and summary), so that a night XNAT was down does not read as one cron did not run. Only
    in a dataset with its lock and work area (neither is made for this), and under the state lock
    (`locked`: held already): an apply that holds it is at work, and tells its own story."""
    from reconcile import statelock
    from reconcile.apply import append_failed_run
    from reconcile.lock import lock_path

    if not lock_path(root).is_file() or not (root / WORK_DIR).is_dir():
        return
    warn = lambda m: echo(f"warning: {m}", err=True)  # noqa: E731
    share_with_group(root)  # failed before apply did so: a history made now is the group's too
    try:
        with contextlib.nullcontext() if locked else statelock.held(root, "apply", warn=warn):
            append_failed_run(root, errors)
    except XnatBidsError:  # the state lock is another run's, or the history may not be written to now
        pass
    except OSError as exc:
        warn(f"could not append this failed apply to the history ({exc.strerror or exc}): {exc.filename or root}")


def _load_or_make_plan(
    client, root: Path, cfg: Config, selection: Selection, *, saved: _SavedPlan | None, deep: bool,
    reconvert_outdated: bool, full: bool, accept_older_lock: bool = False,
):
    """A saved plan (checked against the lock) or a fresh one; refused over a lock older than the
    history unless `accept_older_lock`."""
    from reconcile.apply import check_plan_fresh
    from reconcile.observe import lost_lock, make_plan
    from reconcile.render import plan_from_dict

    def refuse_older(lock: Lock) -> None:
        # Applied, it would commit (and with --git-commit, share) a lock without what was exported
        # since, under serials the history has used already.
        lost = None if accept_older_lock else lost_lock(root, lock)
        if lost is not None:
            raise LockfileError(f"apply refused: {lost}", hint="`git log -- .xnat2bids.lock` or the backups may "
                                "hold it; --accept-older-lock goes on with this lock (what it lacks stays unrecorded, "
                                "and plan names the folders of it)")

    if saved is None:
        run = make_plan(client, root, cfg, selection, deep=deep, reconvert_outdated=reconvert_outdated, full=full)
        unconfigured = _no_config_but_lock_had_one(cfg, run.lock, root)
        if unconfigured:
            # Unattended (cron, --update), this would rename or re-convert every session.
            raise ConfigError(unconfigured, hint="pass --config FILE (or set $XNAT2BIDS_CONFIG) with the lab's config; an empty file goes back to the defaults")
        refuse_older(run.lock)
        return run.plan
    from reconcile.lock import read_lock

    lock = read_lock(root)
    refuse_older(lock or Lock.new())
    plan, header = plan_from_dict(saved.data, str(saved.path), lock)
    check_plan_fresh(plan, root, cfg, planned_root=header["bids_root"], planned_config=header.get("config_fingerprint"),
                     planned_url=header.get("xnat_url"), url=client.url, planned_changes=header["changes"])
    return plan


def _read_plan_file(plan_file: Path) -> dict:
    try:
        data = json.loads(plan_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read plan {plan_file}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{plan_file} is not an xnat2bids plan")
    from reconcile.schema import load_schema

    missing = [key for key in load_schema("plan")["required"] if key not in data]
    if missing:
        raise ConfigError(f"{plan_file} is not an xnat2bids plan: it lacks {', '.join(missing)}",
                          hint="save one with `xnat2bids plan --out FILE`")
    if data.get("format_version") == 2:  # format 1 is refused with what it lacks by check_plan_fresh
        raise StalePlanError(f"{plan_file} was saved by an older xnat2bids (plan format 2), which did not record a "
                             "digest of its content", hint="run plan --out again")
    from reconcile.render import plan_from_dict

    plan_from_dict(data, str(plan_file))  # an invalid or edited plan is refused before the root is touched
    return data


def _settle_slurm_batch(root: Path, warn) -> None:
    """Refuse while a SLURM batch holds the root; merge one whose finalize job never finished."""
    from reconcile import statelock
    from reconcile.executors import slurm as sx

    holder = statelock.read_holder(root) if root.is_dir() else None
    if holder is None or not holder.jobs:
        return
    batch = next((b for b in sx.list_batches(root) if b.id == holder.id), None)
    reporter = _reporter(len(batch.sessions) if batch else 0)
    try:
        merged = sx.settle_previous(root, on_event=reporter, warn=warn)
    finally:
        reporter.close()
    if merged is not None:
        echo(f"Merged the results of SLURM batch {merged.batch.id}, whose finalize job did not finish: "
             f"{_finalize_summary(merged)}", outcome=True)


def _retry_token_revocations(root: Path, client, warn) -> None:
    """Invalidate the alias tokens of earlier SLURM batches that XNAT could not invalidate then, and
    of batches whose submission was killed before it recorded their jobs."""
    from reconcile.executors import slurm as sx

    for gone in sx.discard_unsubmitted(root, warn=warn):
        echo(f"Removed SLURM batch {gone}, whose submission was interrupted before it recorded its jobs "
             "(they never ran); its credentials are deleted.", outcome=True)
    for done in sx.retry_revocations(root, client, warn=warn):
        echo(f"Invalidated the alias token of SLURM batch {done.batch} on XNAT (its revocation was pending "
             f"since {done.since}).", outcome=True)


def _finalize_summary(result) -> str:
    from reconcile.apply import Status

    report = result.report
    text = (f"{report.count(Status.DONE)} done, {report.count(Status.FAILED)} failed, "
            f"{report.count(Status.SKIPPED)} skipped; lock serial {report.lock.serial if report.lock else result.plan.serial}")
    if result.validation is not None:
        text += f"; {result.validation.summary()}"
    if result.git_commit:
        text += f"; git commit {result.git_commit}"
    for problem in result.problems:
        text += f"; {problem}"
    return text + "."


def run_slurm_apply(
    cfg: Config,
    root: Path,
    selection: Selection,
    client,
    *,
    saved: _SavedPlan | None = None,
    yes: bool = False,
    jobs: int | None = None,
    deep: bool = False,
    repair_drift: bool = False,
    keep_dicom: bool = False,
    git_commit: bool = False,
    run_validator: bool = False,
    reconvert_outdated: bool = False,
    full: bool = False,
    dry_run: bool = False,
    accept_older_lock: bool = False,
    config_option: str = "",
) -> tuple[int, Any]:
    """Plan, confirm, then submit the sessions as one job array plus a finalize job.

    The state lock taken here is handed to the batch (it records the job IDs); the finalize
    job releases it. With --dry-run nothing is locked, written or submitted. Returns the exit
    code and the batch submitted (None when none was).
    """
    import shlex
    import uuid
    from dataclasses import replace

    from reconcile import statelock
    from reconcile.executors import slurm as sx
    from reconcile.render import render_json

    warn = lambda m: echo(f"warning: {m}", err=True)  # noqa: E731
    if not dry_run:
        _settle_slurm_batch(root, warn)
    holder = None if dry_run else statelock.acquire(root, "apply --executor slurm", warn=warn)
    submitted = False
    batch = None
    try:
        plan, todo, held = _recover_and_plan(client, root, cfg, selection, saved=saved, deep=deep,
                                             reconvert_outdated=reconvert_outdated, full=full,
                                             repair_drift=repair_drift, warn=warn if holder else None,
                                             accept_older_lock=accept_older_lock or dry_run, config_option=config_option,
                                             asking=not yes and not dry_run)
        if not todo:
            return _nothing_to_apply(root, plan, held, _left_alone(plan, todo, held),
                                     git_commit=git_commit and not dry_run, record=holder is not None), None
        _refuse_whitespace(root)
        if not yes and not dry_run:
            if not stdin_is_terminal():
                raise ConfigError("apply needs confirmation; without a terminal pass --yes")
            if not _confirmed(root, holder, f"Submit {len(todo)} session(s) of {root} to SLURM?"):
                echo("Cancelled; nothing submitted.", outcome=True)
                return EXIT_ERROR, None
        settings = cfg.slurm
        kind = sx.credentials_kind(client)
        batch = sx.new_batch(
            root, holder.id if holder else uuid.uuid4().hex[:12], plan, cfg, xnat_url=client.url, credentials=kind,
            options=sx.BatchOptions(repair_drift=repair_drift, keep_dicom=keep_dicom or cfg.keep_dicom,
                                    git_commit=git_commit, validate=run_validator),
            max_parallel=jobs or settings.max_parallel,
        )
        token_file = batch.credentials_path if kind == "alias-token" else None
        array, finalize_job = sx.build_jobs(batch, settings, token_file=token_file)
        try:
            sx.check_array_size(batch)
        except SlurmError as exc:
            if not dry_run:
                raise
            echo(f"# warning: {exc.summary}; a real submission is refused ({exc.hint})", outcome=True)
        if dry_run:  # the scripts are what a dry run is asked for: its outcome
            echo(f"\n# Dry run: {len(todo)} session(s) would be submitted as batch {batch.id}; nothing was written.",
                 outcome=True)
            for job in (array, finalize_job):
                command = job.command(dependency="<array job ID>" if job.kind == "finalize" else None)
                echo(f"\n# ---- {job.script_path} ({job.kind} job), submitted with:\n# {shlex.join(command)}",
                     outcome=True)
                echo(job.script.rstrip("\n"), outcome=True)
            echo(f"\n# ---- {batch.setup_path} (the [slurm] setup snippet, sourced by both jobs)", outcome=True)
            echo(settings.setup.rstrip("\n") or "# (empty)", outcome=True)
            how = {"netrc": "~/.netrc (or $NETRC)", "token-file": "$XNAT_TOKEN_FILE"}.get(
                kind, f"an alias token written to {batch.credentials_path} (mode 0600)")
            echo(f"\n# The jobs log in to {batch.xnat_url} with {how}.", outcome=True)
            return EXIT_OK, None
        plan_json = render_json(plan, bids_root=str(root), config_fingerprint=cfg.fingerprint(), xnat_url=client.url,
                                created_at=utc_now())
        _own_ignores(root)
        sx.write_batch(batch, plan_json, settings, (array, finalize_job))
        if token_file is not None:
            written = sx.write_job_credentials(client, token_file)
            if written == "password-file":
                warn(f"{batch.xnat_url} issued no alias token; the jobs read your password from {token_file} "
                     "(mode 0600), which the finalize job deletes")
            batch = replace(batch, credentials=written)
        batch, holder = sx.submit(root, holder, batch, array, finalize_job, env=sx.job_environment(os.environ))
        submitted = True
    finally:
        if holder is not None and not submitted:
            if batch is not None:
                import shutil

                sx.revoke_job_token(batch, warn=warn)  # issued for jobs that will never run
                shutil.rmtree(batch.dir, ignore_errors=True)
            statelock.release(root, holder)
    echo(f"\nSubmitted batch {batch.id}: array job {batch.array_job} ({_count(len(batch.sessions), 'session')}, "
         f"at most {min(batch.max_parallel, len(batch.sessions))} at once), finalize job {batch.finalize_job} "
         f"(after the array, whatever happens).", outcome=True)
    echo(f"Follow it with `xnat2bids status {root}` or `squeue -j {batch.array_job},{batch.finalize_job}`; "
         f"job logs in {batch.logs_dir}.", outcome=True)
    _say_held_back(held)
    # As a local apply: what the batch cannot carry out (problems, updates held back) fails the run.
    return EXIT_ERROR if plan.problems or held else EXIT_OK, batch


def _confirmed(root: Path, holder: Holder, question: str) -> bool:
    """Ask the user at the terminal; the lock file says meanwhile that its holder waits for an answer."""
    from reconcile import statelock

    with statelock.asking(root, holder):
        return typer.confirm(question, default=False)


def _wait_for_batch(batch) -> int:
    from reconcile.executors import slurm as sx

    seen: set[int] = set()

    def progress() -> None:
        for entry in batch.sessions:
            if entry.index in seen:
                continue
            result = sx.read_result(batch, entry.index)
            if result is None:
                continue
            seen.add(entry.index)
            mark = "✓" if result.get("status") == "done" else "✗"
            detail = f" ({result.get('message')})" if result.get("message") else ""
            echo(f"[{len(seen)}/{len(batch.sessions)}] {mark} staged {entry.address} ({entry.project}/{entry.experiment_id})"
                 f" by task {result.get('job')}{detail}", outcome=True)

    stopped_by: list[int] = []
    previous: dict[int, Any] = {}

    def on_stop(signum, frame):  # noqa: ANN001 - signal's
        stopped_by.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, on_stop)
    try:
        echo("Waiting for the finalize job…")
        sx.wait_for_job(batch.finalize_job, on_poll=progress)
    except KeyboardInterrupt:  # stops the waiting, not the batch
        signum = stopped_by[0] if stopped_by else signal.SIGINT
        echo(f"\nStopped waiting ({'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}); "
             f"batch {batch.id} was not cancelled and goes on on the cluster: follow it with `xnat2bids status "
             f"{batch.root}`; to cancel it: `scancel {' '.join(batch.jobs)}`", err=True)
        raise _StoppedWaiting(128 + signum) from None
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    progress()
    done = sx.read_finalized(batch)
    if done is None:
        try:
            state = sx.job_state(batch.finalize_job)
        except XnatBidsError:  # SLURM could not be asked: the way out is the same
            state = None
        see = f"; see {batch.finalize_output}" if batch.finalize_output.exists() else ""
        echo(f"error: the finalize job {batch.finalize_job} ended ({state.state if state else 'state unknown'}) "
             f"without merging the results{see}", err=True)
        try:
            array_runs = bool(sx.active_jobs([batch.array_job]))
        except XnatBidsError:  # SLURM could not be asked: finalize says if the array still runs
            array_runs = False
        if array_runs:
            echo(f"hint: the array job {batch.array_job} still runs; once it has ended (`xnat2bids status "
                 f"{batch.root}`), run `xnat2bids finalize {batch.root}` to merge the results", err=True)
        else:
            echo(f"hint: run `xnat2bids finalize {batch.root}` to merge them", err=True)
        return EXIT_ERROR
    s = done["summary"]
    echo(f"Batch {batch.id} finalized: {s.get('done', 0)} done, {s.get('failed', 0)} failed, {s.get('skipped', 0)} skipped; "
         f"lock serial {done['lock_serial']}.", outcome=True)
    if done.get("validator_errors") is not None:
        echo(f"BIDS validator: {done['validator_errors']} error(s); the report is in "
             f"{batch.root / '.xnat2bids/logs/bids-validator.json'}", outcome=True)
    if done.get("git_commit"):
        echo(f"git commit {done['git_commit']}", outcome=True)
    for problem in done.get("problems", []):
        echo(f"problem: {problem}", outcome=True)
    return EXIT_OK if done["ok"] else EXIT_ERROR


@app.command()
def status(
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the batch state as JSON."),
    project: Optional[list[str]] = StudyOpt,
) -> None:
    """Show the SLURM batch of a BIDS root: job IDs and per-session state.

    Example: xnat2bids status ~/bids-export
    """
    _offline_command(config, bids_root, as_json, lambda where: _dataset_status(where, as_json=as_json),
                     none=lambda root: _no_datasets(root, "no SLURM batch"), projects=project)


def _dataset_status(root: Path, *, as_json: bool) -> int:
    import shutil
    from dataclasses import asdict

    from reconcile import statelock
    from reconcile.executors import slurm as sx

    holder = statelock.read_holder(root) if root.is_dir() else None
    batches = sx.list_batches(root)
    pending = sx.pending_revocations(root)
    current = next((b for b in batches if holder is not None and b.id == holder.id), batches[-1] if batches else None)
    if as_json:
        if current is not None:
            data = sx.batch_status(current, query=shutil.which("scontrol") is not None).to_dict()
        else:
            data = sx.no_batch_status(root)
        data["holder"] = {**asdict(holder), "gone": statelock.gone(holder)} if holder is not None else None
        data["pending_revocations"] = [
            {"batch": p.batch, "since": p.since, "attempts": p.attempts, "last_error": p.last_error, "xnat_url": p.xnat_url}
            for p in pending
        ]
        echo(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    if current is None:
        dead = statelock.gone(holder) if holder is not None else None
        if dead is not None:  # the judgement `apply` takes the lock over on, not a live holder's words
            echo(f"{root} is locked by a process that is gone ({dead}): {holder.describe()}")
            echo(f"  it ended without releasing the lock; the next `xnat2bids apply` takes it over, or run "
                 f"`xnat2bids force-unlock {holder.id} {root}`")
        elif holder is not None:
            echo(f"{root} is locked: {holder.describe()}")
        else:
            echo(f"No SLURM batch in {root}.")
        _echo_revocations(pending)
        return EXIT_OK
    if not current.submitted and not current.finalized_path.exists():
        b = current
        echo(f"Batch {b.id} of {root}, written {b.created_at} by {b.user}@{b.host}: its submission was interrupted "
             "before it recorded its jobs, so nothing of it ran; the next `xnat2bids apply` removes it (cancelling "
             "a job it may have queued) and submits anew")
        _echo_revocations(pending)
        return EXIT_OK
    st = sx.batch_status(current, query=shutil.which("scontrol") is not None)
    b = st.batch
    echo(f"Batch {b.id} of {root}, submitted {b.created_at} by {b.user}@{b.host}")
    echo(f"  array job {b.array_job} ({_count(len(b.sessions), 'task')}, at most {min(b.max_parallel, len(b.sessions))} at once), "
         f"finalize job {b.finalize_job}: "
         f"{st.finalize.describe() if st.finalize else st.unasked or 'no longer known to SLURM'}")
    if st.finalized is not None:
        s = st.finalized["summary"]
        echo(f"  finalized {st.finalized['finished_at']}: {s.get('done', 0)} done, {s.get('failed', 0)} failed, "
             f"{s.get('skipped', 0)} skipped; lock serial {st.finalized['lock_serial']}")
    elif st.holds_lock and not st.unasked and shutil.which("scontrol") and (st.finalize is None or not st.finalize.active):
        # its finalize job is over (or so long over that SLURM forgot it)
        if any(s.queued for s in st.sessions):  # the finalize job alone was cancelled
            echo(f"  not finalized, and its finalize job is over while the array still runs: once the array has "
                 f"ended, merge it with `xnat2bids finalize {root}`")
        else:
            echo(f"  not finalized, and its finalize job is over; the batch holds the state lock: merge it with "
                 f"`xnat2bids finalize {root}`")
    elif st.holds_lock:
        echo("  not finalized yet; the batch holds the state lock")
    else:
        echo(f"  not finalized and not holding the state lock; merge it with `xnat2bids finalize {root} --batch {b.id}`")
    width = max((len(s.entry.address) for s in st.sessions), default=0)
    for s in st.sessions:
        line = f"  {s.entry.index:>3}  {s.state:<10} {s.entry.address:<{width}}  {s.entry.project}/{s.entry.experiment_id}"
        if s.detail:
            line += f"  {s.detail}"
        echo(line)
        if s.log and s.state not in ("done", "pending"):
            echo(f"       log: {s.log}")
    _echo_revocations(pending)
    return EXIT_OK


def _echo_revocations(pending) -> None:  # noqa: ANN001 - list of slurm.PendingRevocation
    """Alias tokens of finished batches that XNAT has not invalidated yet (never the alias itself)."""
    if not pending:
        return
    echo(f"Token revocations pending: {len(pending)} (retried by the next apply, submit or finalize "
         "with XNAT credentials)")
    for p in pending:
        tried = f", {p.attempts} attempt(s), last: {p.last_error}" if p.attempts else ""
        echo(f"  batch {p.batch} on {p.xnat_url}, since {p.since}{tried}")


@app.command()
def finalize(
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    batch_id: Optional[str] = typer.Option(None, "--batch", help="Finalize this batch (default: the one holding the state lock)."),
) -> None:
    """Merge a SLURM batch's staged sessions into the dataset and release the state lock.

    The batch's finalize job runs this; run it yourself when that job was cancelled or died.
    Example: xnat2bids finalize ~/bids-export
    """
    from reconcile.executors import slurm as sx

    cfg = _load_config(config)
    root = cfg.resolve_bids_root(bids_root)
    if batch_id is not None and not one_dataset(cfg, root):
        from reconcile.layout import dataset_roots

        # Batch IDs are unique: finalize it in whichever study submitted it.
        holders = {where for where in dataset_roots(root) if any(b.id == batch_id for b in sx.list_batches(where))}
        if not holders:
            raise ConfigError(f"no batch {batch_id} in the <pi>/study-<study>/bids datasets under {root}",
                              hint=f"`xnat2bids status {root}` lists each study's batch")
        raise typer.Exit(_finalize_dataset(holders.pop(), batch_id))

    def none() -> int:
        echo(f"Nothing to finalize in {root}: no <pi>/study-<study>/bids datasets.")
        return EXIT_OK

    raise typer.Exit(for_each_dataset(cfg, root, lambda where: _finalize_dataset(where, batch_id), none=none))


def _finalize_dataset(root: Path, batch_id: str | None) -> int:
    from reconcile import statelock
    from reconcile.executors import slurm as sx

    share_with_group(root)
    warn = lambda m: echo(f"warning: {m}", err=True)  # noqa: E731
    if batch_id is not None:
        batch = sx.read_batch(root, batch_id)
    else:
        holder = statelock.read_holder(root) if root.is_dir() else None
        batch = next((b for b in sx.list_batches(root) if holder is not None and b.id == holder.id), None)
        if batch is None:
            echo(f"Nothing to finalize in {root}.")
            for left in sx.unfinalized_batches(root):
                echo(f"note: batch {left.id} ({left.created_at}) was never finalized; "
                     f"`xnat2bids finalize {root} --batch {left.id}` merges it")
            return EXIT_OK
    done = sx.read_finalized(batch)
    if done is not None:
        holder = statelock.read_holder(root)
        if holder is not None and holder.id == batch.id:
            statelock.release(root, holder)  # finalize died between its last write and the release
        echo(f"Batch {batch.id} was already finalized at {done['finished_at']}.")
        return EXIT_OK if done["ok"] else EXIT_ERROR
    if not batch.submitted:  # merged, it would be marked finalized, and a job it queued held for ever
        raise SlurmError(f"batch {batch.id} of {root} was never submitted: its submission was interrupted before it "
                         "recorded its jobs, so nothing of it ran",
                         hint="`xnat2bids apply` removes it (cancelling a job it may have queued) and submits anew")
    # This is the batch's finalize job only when SLURM says so: an interactive allocation (srun --pty,
    # salloc) has a SLURM_JOB_ID of its own.
    own_job = os.environ.get("SLURM_JOB_ID") if os.environ.get("SLURM_JOB_ID") == batch.finalize_job else None
    sx.check_batch_idle(batch, own_job=own_job)  # before saying it starts
    echo(f"Finalizing batch {batch.id} of {root} ({_count(len(batch.sessions), 'session')})")
    reporter = _reporter(len(batch.sessions))
    try:
        result = sx.finalize_batch(batch, own_job=own_job, on_event=reporter, warn=warn)
    finally:
        reporter.close()
    for err in result.validation.errors if result.validation else ():
        echo(f"validator: {err}")
    echo(f"\nFinalize complete: {_finalize_summary(result)}")
    return EXIT_OK if result.ok else EXIT_ERROR


@app.command("slurm-task", hidden=True)
def slurm_task(
    batch_dir: Path = typer.Argument(..., help="The batch directory under .xnat2bids/batches/."),
    index: int = typer.Option(..., "--index", help="The array task index ($SLURM_ARRAY_TASK_ID)."),
) -> None:
    """One array task: stage one session of a SLURM batch and write its result record."""
    from reconcile.executors import slurm as sx

    cancel = threading.Event()
    # scancel and the time limit send SIGTERM first: stop cleanly and still write a record.
    signal.signal(signal.SIGTERM, lambda signum, frame: cancel.set())
    record = sx.run_task(batch_dir.absolute(), index, cancel=cancel)
    echo(f"{record['address']} ({record['project']}/{record['experiment_id']}): {record['status']}"
         + (f": {record['message']}" if record.get("message") else "")
         + f"; log: {record['log']}; {record['seconds']:.1f} s")
    raise typer.Exit(EXIT_OK if record["status"] == "done" else EXIT_ERROR)


_SINCE_FORMS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S")
_SINCE_OFFSET = re.compile(r"[+-]\d\d:\d\d$")


def _since(value: Optional[str]) -> Optional[str]:
    """`--since` as the history writes times (2026-11-01T00:00:00Z), which then compare as text."""
    if value is None:
        return None
    from datetime import datetime, timezone

    when, offset = value.removesuffix("Z"), None
    zone = _SINCE_OFFSET.search(when)  # a time with its offset from UTC: `date -Iminutes` prints one
    if zone and "T" in when:
        when, offset = when[:zone.start()], zone.group()
    for form in _SINCE_FORMS:
        try:
            at = datetime.strptime(when, form)
        except ValueError:
            continue
        if offset is not None:
            at = datetime.fromisoformat(at.isoformat() + offset).astimezone(timezone.utc)
        return at.strftime("%Y-%m-%dT%H:%M:%SZ")
    raise typer.BadParameter(f"{value!r} is not a date or date-time: give YYYY-MM-DD, YYYY-MM-DDTHH:MM or "
                             "YYYY-MM-DDTHH:MM:SS (UTC, as history prints times, unless followed by an offset such "
                             "as +09:00), e.g. 2026-11-01 or 2026-11-01T12:00")


@app.command()
def history(
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the raw JSON lines."),
    project: Optional[list[str]] = StudyOpt,
    last: Optional[int] = typer.Option(None, "--last", "-n", min=1, metavar="N", help="Only the last N entries."),
    since: Optional[str] = typer.Option(None, "--since", metavar="WHEN", callback=_since,
                                        help="Only entries at or after WHEN: a date or date-time in UTC "
                                             "(2026-11-01, 2026-11-01T12:00)."),
) -> None:
    """Print the dataset's append-only apply history.

    Example: xnat2bids history ~/bids-export

    Example: xnat2bids history ~/bids-export --since 2026-11-01 -n 5
    """
    def show(where: Path) -> int:
        return _print_history(where, as_json=as_json, last=last, since=since)

    _offline_command(config, bids_root, as_json, show, none=show, projects=project)


def _print_history(root: Path, *, as_json: bool, last: int | None = None, since: str | None = None) -> int:
    """`last`, `since`: only the last N entries by time, only those at or after a time."""
    from reconcile.apply import failed_run, read_history

    entries = read_history(root, warn=lambda m: echo(f"warning: {m}", err=True))
    if not entries and not as_json:  # JSON lines: none
        echo("No history yet.")
    # A git merge of two clones' histories (a union) interleaves them: chosen by time, and people
    # read them by time (--json keeps the file's order).
    by_time = sorted(entries, key=lambda e: e["time"])
    chosen = [e for e in by_time if since is None or e["time"] >= since][-last if last else None:]
    if entries and not chosen and not as_json:
        echo(f"No history since {since}.")
    if as_json:
        kept = set(map(id, chosen))
        chosen = [e for e in entries if id(e) in kept]
    for e in chosen:
        if as_json:
            echo(json.dumps(e, sort_keys=True))
            continue
        s = e["summary"]
        if isinstance(e.get("unlocked"), dict):  # force-unlock: no session, no lock change
            what = f"removed the state lock held by {_unlocked(e['unlocked'])}"
        elif failed_run(e):  # errors before anything was applied: no session, no lock change
            what = "failed, nothing applied"  # its serial is the history's: not the lock's when that is older
        else:
            what = (f"{s.get('done', 0)} done, {s.get('failed', 0)} failed, {s.get('skipped', 0)} skipped; "
                    f"serial {e['lock_serial']['before']} → {e['lock_serial']['after']}")
        echo(f"{e['time']}  {e['operation']} by {e['user']}@{e['host']} (xnat2bids {e['xnat2bids']})"
             f"{' (cancelled)' if e.get('cancelled') else ''}: {what}")
        for error in e["errors"] if isinstance(e.get("errors"), list) else ():
            echo(f"    error: {error.get('message') if isinstance(error, dict) else error}")
        heads = [f"    {row['result']:<7} {row['action']:<6} {row['address']} ({row['project']}/{row['experiment_id']})"
                 for row in e["sessions"]]
        width = max(map(len, heads), default=0)
        for head, row in zip(heads, e["sessions"]):
            # Each row's reasons, as plan showed them (the first beside the row, the others below
            # it); entries written before reasons were recorded show a date change instead.
            details = list(row.get("reasons") or _date_moved(row))
            if row.get("error"):
                details.append(f"error: {row['error']}")
            details += [f"warning: {w}" for w in row.get("warnings", ())]
            echo(f"{head:<{width}}  {details[0]}" if details else head)
            for detail in details[1:]:
                echo(" " * (width + 2) + detail)
    return EXIT_OK


def _unlocked(record: dict) -> str:
    """The holder a `force-unlock` entry tells of, in the words force-unlock used."""
    from reconcile.statelock import Holder

    try:
        return Holder(**{**record, "jobs": tuple(record.get("jobs", ()))}).describe()
    except TypeError:  # an entry edited by hand, or written by a newer version
        return f"lock ID {record.get('id')}"


def _date_moved(row: dict) -> list[str]:
    dates = row.get("date") or {}
    before, after = dates.get("before"), dates.get("after")
    return [f"date {before} → {after}"] if before and after and before != after else []


@app.command("force-unlock")
def force_unlock(
    lock_id: str = typer.Argument(..., help="The lock ID shown in the 'another xnat2bids holds' message, or 'unreadable' to remove a lock file that cannot be read."),
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Remove a state lock left by an apply that cannot release it (e.g. on another node).

    Example: xnat2bids force-unlock 3f2a9c1b77d0 ~/bids-export
    """
    from reconcile import statelock
    from reconcile.apply import append_forced_unlock

    cfg = _load_config(config)
    root = cfg.resolve_bids_root(bids_root)
    if not one_dataset(cfg, root):
        root = _locked_study(root, lock_id)
    unasked = _refuse_if_batch_running(root, lock_id)
    share_with_group(root)
    holder = statelock.force_unlock(root, lock_id)
    echo(f"Removed the state lock of {root} held by {holder.describe()}")
    try:  # best effort: the lock is gone whatever the history can be told
        append_forced_unlock(root, holder)
    except (OSError, XnatBidsError) as exc:  # a full disk, a history another member made read-only
        why = exc.summary if isinstance(exc, XnatBidsError) else exc.strerror or exc
        echo(f"warning: the history of {root} could not be told of the forced unlock ({why})", err=True)
    if holder.jobs and unasked:  # its jobs may still run elsewhere: their credentials stay
        echo(f"warning: the credentials of SLURM batch {holder.id}'s jobs are left as they are; "
             f"`xnat2bids finalize --batch {holder.id} {root}` on the cluster merges the batch and revokes them", err=True)
    elif holder.jobs:
        _end_batch_credentials(root, holder.id)


def _end_batch_credentials(root: Path, batch_id: str) -> None:
    """A force-unlocked batch's jobs will not run again: the alias token issued for them is
    invalidated on XNAT now (or recorded for the next apply to retry), and its file deleted."""
    from reconcile.executors import slurm as sx

    warn = lambda m: echo(f"warning: {m}", err=True)  # noqa: E731
    try:
        batch = sx.read_batch(root, batch_id)
    except XnatBidsError:  # no manifest (pruned, or never written): no token file either
        return
    if batch.credentials_path.exists():
        if sx.revoke_job_token(batch, warn=warn):
            echo(f"Invalidated the alias token of SLURM batch {batch.id} on XNAT.")
        batch.credentials_path.unlink(missing_ok=True)
    echo(f"Its staged sessions are merged only by `xnat2bids finalize --batch {batch.id} {root}`.")

def _refuse_if_batch_running(root: Path, lock_id: str) -> bool:
    """A SLURM batch's lock is not removed while its jobs are queued or running: its tasks would
    share the work area with the next apply, and its finalize job would commit afterwards. Nor
    while SLURM cannot be asked. True when there is no SLURM here to ask (squeue not on PATH)."""
    from reconcile import statelock

    try:
        holder = statelock.read_holder(root)
    except XnatBidsError:  # unreadable: force_unlock words it
        return False
    if holder is None or holder.id != lock_id or not holder.jobs:
        return False
    import shutil

    if shutil.which("squeue") is None:
        echo(f"warning: no SLURM here to ask whether jobs {', '.join(holder.jobs)} still run; removing the lock "
             "as asked", err=True)
        return True
    from reconcile.executors.slurm import active_jobs, listed_jobs

    try:
        active = active_jobs(holder.jobs)
    except (XnatBidsError, OSError) as exc:
        raise LockHeldError(f"SLURM could not be asked whether the jobs of batch {lock_id} still run "
                            f"({getattr(exc, 'summary', None) or exc})",
                            hint="run force-unlock again when the SLURM controller answers") from exc
    if active:
        listed = listed_jobs(active)
        raise LockHeldError(f"the state lock of {root} is held by SLURM batch {lock_id}, whose jobs are still queued "
                            f"or running: {listed}",
                            hint=f"let them finish, or stop them with `scancel {' '.join(holder.jobs)}` and then "
                                 f"merge what finished with `xnat2bids finalize {root}` (or force-unlock it)")
    return False


def _locked_study(root: Path, lock_id: str) -> Path:
    """The pi-study dataset under `root` whose state lock has ID `lock_id` (or is unreadable)."""
    from reconcile import statelock
    from reconcile.layout import dataset_roots

    found = []
    for where in dataset_roots(root):
        try:
            holder = statelock.read_holder(where)
        except XnatBidsError:  # unreadable: only the word `unreadable` names it
            if lock_id == statelock.UNREADABLE:
                found.append(where)
            continue
        if holder is not None and holder.id == lock_id:
            found.append(where)
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise ConfigError(f"{what} <pi>/study-<study>/bids dataset under {root} has a state lock {lock_id}",
                          hint="pass the study's bids folder" if found else f"`xnat2bids status {root}` shows each study's state lock and its ID")
    return found[0]


@app.command()
def forget(
    experiment_id: str = typer.Argument(..., help="XNAT experiment ID to drop from the lock (an orphan)."),
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
) -> None:
    """Drop a session from the lock (files stay on disk); for orphans you have dealt with.

    Example: xnat2bids forget XNAT_E00042 ~/bids-export --yes
    """
    from reconcile import statelock
    from reconcile.apply import append_lock_change, recover, refuse_conflicted_history
    from reconcile.dataset import refuse_unfinished_merge
    from reconcile.lock import read_lock, write_lock

    cfg = _load_config(config)
    root = _dataset_of(cfg, cfg.resolve_bids_root(bids_root), experiment_id)
    share_with_group(root)
    _need_dataset_folder(root)
    refuse_unfinished_merge(root, nothing="nothing was forgotten")
    refuse_conflicted_history(root, nothing="nothing was forgotten")
    warn = lambda m: echo(f"warning: {m}", err=True)  # noqa: E731
    with statelock.held(root, "forget", warn=warn):
        # A commit a crash interrupted is settled first, as apply would, or it would bring the
        # forgotten session back.
        for exp_id in recover(root, warn=warn):
            echo(f"recovered the interrupted commit of {exp_id}")
        lock = read_lock(root)
        if lock is None or experiment_id not in lock.sessions:
            raise ConfigError(f"{experiment_id} is not in the lock of {root}")
        record = lock.sessions[experiment_id]
        # Offline, forget cannot tell an orphan from a session still in XNAT (a mistyped ID): the
        # session is named before it goes, and the way back is a new export.
        what = f"{experiment_id} ({record.project}/{record.session_label}, {record.address.path})"
        if not yes:
            if not stdin_is_terminal():
                raise ConfigError(f"forget needs confirmation to drop {what}; without a terminal pass --yes")
            if not typer.confirm(f"Forget {what}? Its files stay; exporting it again means moving them out first",
                                 default=False):
                echo("Cancelled; nothing changed.")
                raise typer.Exit(EXIT_ERROR)
        written = write_lock(root, lock.without_session(experiment_id), expected_serial=lock.serial)
        try:
            append_lock_change(root, "forget", (lock.serial, written.serial), [record],
                               action="forget", dropped=True,
                               reason="dropped from the lock by `xnat2bids forget`; its files were left on disk")
        except OSError as exc:  # the lock is written: say so rather than fail (the next run records it)
            warn(f"could not add the forget to the history ({exc.strerror or exc})")
    echo(f"Forgot {experiment_id}; its files were left on disk. Lock serial {written.serial}.")
    folder = record.address.path
    if (root / folder).is_dir():  # forget works offline: it cannot tell an orphan from a live session
        echo(f"note: if XNAT still has {experiment_id}, plan now finds {folder} in its way; to export it again, "
             "move that folder out of the BIDS root first")


@app.command("merge-lock")
def merge_lock(
    base: Path = typer.Argument(..., help="The common ancestor's lock (git's %O; an empty file when there is none)."),
    ours: Path = typer.Argument(..., help="This clone's lock (git's %A): replaced by the merge."),
    theirs: Path = typer.Argument(..., help="The other clone's lock (git's %B)."),
) -> None:
    """Merge two clones' locks session by session: a git merge driver.

    Set it up once per clone: `git config merge.xnat2bids.driver "$(command -v xnat2bids) merge-lock %O %A %B"`,
    and in the dataset's .gitattributes: `.xnat2bids.lock merge=xnat2bids`. A session both clones
    changed differently is a conflict (exit 1): the merged lock keeps the other sessions merged
    and git's "ours" side of each conflicting one.
    """
    from reconcile.durable import write_atomic
    from reconcile.lock import LOCK_NAME, dumps_lock, loads_lock
    from reconcile.lockmerge import Sides, merge_locks

    def read(path: Path) -> str:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from exc

    rebasing = _git_rebasing()
    # In a rebase git's "ours" (%A) is the upstream being rebased onto, "theirs" the commit replayed.
    sides = Sides("upstream", "in the commit being replayed") if rebasing else Sides()
    ancestor = read(base)
    merged = merge_locks(loads_lock(ancestor, str(base)) if ancestor.strip() else None,
                         loads_lock(read(ours), str(ours)), loads_lock(read(theirs), str(theirs)), sides)
    for conflict in merged.conflicts:
        echo(f"conflict: {conflict}", err=True)
    if merged.lock is None:
        # `ours` is git's temporary copy (.merge_file_XXXX): the user knows the lock by its name.
        echo(f"xnat2bids merge-lock: the lock ({LOCK_NAME}) is left as it was", err=True)
        raise typer.Exit(EXIT_ERROR)
    write_atomic(ours, dumps_lock(merged.lock))
    if merged.conflicts:
        side, abort, go_on = (("the upstream's", "git rebase --abort", "git rebase --continue") if rebasing
                              else ("this clone's", "git merge --abort", "git commit"))
        echo(f"xnat2bids merge-lock: {len(merged.conflicts)} conflict(s); the lock ({LOCK_NAME}) holds every "
             f"session both sides merged, and {side} side of the sessions named", err=True)
        echo(f"hint: take {side} folders of those sessions too (`git checkout --ours -- sub-…`), then "
             f"`git add {LOCK_NAME} sub-…` and `{go_on}`; or `{abort}`. Then `xnat2bids plan` shows what "
             "is left to export again", err=True)
        raise typer.Exit(EXIT_ERROR)
    echo(f"xnat2bids merge-lock: {_count(len(merged.lock.sessions), 'session')}, serial {merged.lock.serial}", err=True)


def _git_rebasing() -> bool:
    """Whether git, which runs a merge driver at the top of the work tree, is rebasing there."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--git-path", "rebase-merge", "--git-path", "rebase-apply"],
                             capture_output=True, encoding="utf-8", errors="replace", timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(Path(line).is_dir() for line in out.stdout.splitlines())


def _dataset_of(cfg: Config, root: Path, experiment_id: str) -> Path:
    """The BIDS dataset whose lock records `experiment_id`: `root` itself in the flat layout, the
    study under it that does in the pi-study one."""
    if one_dataset(cfg, root):
        return root
    from reconcile.errors import LockfileError
    from reconcile.layout import dataset_roots
    from reconcile.lock import read_lock

    unreadable = []
    for where in dataset_roots(root):
        try:
            lock = read_lock(where)
        except LockfileError:  # another study's damage: reported if the session is not found elsewhere
            unreadable.append(str(where))
            continue
        if lock is not None and experiment_id in lock.sessions:
            return where
    raise ConfigError(f"{experiment_id} is in no lock of the <pi>/study-<study>/bids datasets under {root}",
                      detail=f"unreadable locks: {', '.join(unreadable)}" if unreadable else None)


@app.command()
def check(
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    full: bool = typer.Option(False, "--full", help="Also compare sha256 of every output."),
    as_json: bool = typer.Option(False, "--json", help="Print the verdict as JSON (schemas/check.schema.json)."),
    project: Optional[list[str]] = StudyOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="For cron: print nothing when every output is verified; "
                                                             "problems and the verdict go to stderr."),
) -> None:
    """Verify offline that every output the lock records is on disk (for CI).

    Example: xnat2bids check ~/bids-export --full

    Example (crontab): 0 6 * * * xnat2bids check ~/bids-export --quiet
    """
    _be_quiet(quiet)
    def none(root: Path) -> int:
        raise ConfigError(f"no <pi>/study-<study>/bids datasets under {root}", hint="run `xnat2bids apply` first")

    _offline_command(config, bids_root, as_json, lambda where: _check_dataset(where, full=full, as_json=as_json),
                     none=none, projects=project)


def _check_dataset(root: Path, *, full: bool, as_json: bool = False) -> int:
    from reconcile.lock import lock_path, read_lock

    _need_dataset_folder(root)
    _say_if_busy(root)
    _say_if_merging(root, as_json=as_json)
    lock = read_lock(root)
    if lock is None:
        from reconcile.apply import history_serial

        # A first apply stopped or failed before its first commit (a work area, no history of a
        # commit): nothing recorded, nothing amiss. A history of commits without its lock is a lost lock.
        if not (root / WORK_DIR).is_dir():
            raise _not_exported(root)
        try:
            serial = history_serial(root)
        except OSError as exc:  # a history that cannot be read tells nothing either way
            raise ConfigError(f"no lock at {lock_path(root)}, and its history cannot be read: {exc.strerror or exc}",
                              hint="restore the lock (from git or a backup) if this root was exported to") from exc
        if serial > 0:  # something was recorded once
            raise ConfigError(f"no lock at {lock_path(root)}",
                              hint="its history tells of exports: restore the lock (from git or a backup)")
        from reconcile.lock import Lock

        lock = Lock.new()
    return run_check(root, lock, full=full, as_json=as_json)


def _subject_folders(root: Path) -> str | None:
    """'N subject folders (sub-01, sub-02, sub-03 and 4 more)' in `root`; None if it has none."""
    try:
        with os.scandir(root) as entries:
            subjects = sorted(e.name for e in entries if e.name.startswith("sub-") and e.is_dir())
    except OSError:
        return None
    if not subjects:
        return None
    shown = ", ".join(subjects[:3]) + (f" and {len(subjects) - 3} more" if len(subjects) > 3 else "")
    return f"{_count(len(subjects), 'subject folder')} ({shown})"


def _not_exported(root: Path) -> ConfigError:
    """Why `check` has nothing to verify in `root`, which has neither a lock nor a work area: no
    export yet, or an export by another tool (the lab's old script), whose subject folders
    xnat2bids cannot vouch for. Not "apply first": an apply into such a tree refuses the sessions
    already there and leaves no lock when that is all of them."""
    from reconcile.lock import lock_path

    subjects = _subject_folders(root)
    if not subjects:
        return ConfigError(f"no lock at {lock_path(root)}", hint="run `xnat2bids apply` first")
    where = shlex.quote(str(root))
    return ConfigError(
        f"{root} was not exported by xnat2bids: it has no .xnat2bids.lock, but holds {subjects}",
        hint=f"xnat2bids records only what it exports itself (README: Moving over from the old script): move the "
             f"old export aside (`mv {where} {shlex.quote(str(root) + '.old')}`), run `xnat2bids apply {where}`, "
             "then compare and delete the old copy; or apply into it as it is, which exports only the sessions "
             "whose folders are missing or empty (`xnat2bids plan` names the others)",
    )


def run_check(root: Path, lock: Lock, *, full: bool, as_json: bool = False) -> int:
    """Check the lock's outputs on disk, print the verdict and return the exit code."""
    from reconcile.check import CRLF_NOTE, CheckCode, check_outputs

    report = check_outputs(root, lock, full=full)
    if as_json:
        echo(json.dumps({
            "format_version": 2, "bids_root": str(root), "lock_serial": lock.serial,
            "mode": "sha256" if full else "size", "ok": report.ok, "sessions": report.sessions,
            "outputs": report.outputs, "problems": [p.as_json() for p in report.problems],
            "pending": list(report.pending),
        }, indent=2, sort_keys=True))
        return EXIT_OK if report.ok else EXIT_ERROR
    for note in report.pending:
        echo(f"pending: {note}")
    bad = {"outcome": True, "err": _quiet}  # a failed check under --quiet: on stderr, for cron to mail
    for problem in report.problems:
        echo(f"problem: {problem.message}", **bad)
    mode = "size and sha256" if full else "size"
    if report.ok:
        echo(f"OK: lock serial {lock.serial}, {_count(report.sessions, 'session')}, {_count(report.outputs, 'output')} verified ({mode}) "
             f"in {root}.")
        return EXIT_OK
    echo(f"FAILED: {len(report.problems)} problem(s); {_count(report.sessions, 'session')}, {_count(report.outputs, 'output')} checked "
         f"({mode}) in {root}.", **bad)
    if any(p.code is CheckCode.CONTENT for p in report.problems):
        echo("hint: `xnat2bids plan --full` shows the sessions with other content as drift; "
             "`xnat2bids apply --full --repair-drift` exports them again", **bad)
    crlf = [p.path for p in report.problems if p.message.endswith(CRLF_NOTE)]
    if crlf:  # the files named alone: a checkout of more would drop uncommitted work (a lock not yet committed)
        shown = " ".join(shlex.quote(path) for path in crlf[:10]) + (" …" if len(crlf) > 10 else "")
        echo(f"hint: git changed their line ends on checkout: `git config core.autocrlf false` in this clone, then "
             f"`git checkout -- {shown}` writes them as committed", **bad)
    return EXIT_ERROR


@app.command()
def show(
    bids_root: Optional[Path] = RootArg,
    config: Optional[Path] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    project: Optional[list[str]] = StudyOpt,
) -> None:
    """Summarise the lock: lineage, serial and the sessions it records.

    Example: xnat2bids show ~/bids-export
    """
    _offline_command(config, bids_root, as_json, lambda where: _show_dataset(where, as_json=as_json),
                     none=lambda root: _no_datasets(root, "nothing exported yet"), projects=project)


def _show_dataset(root: Path, *, as_json: bool) -> int:
    from reconcile.lock import lock_path, read_lock

    lock = read_lock(root)
    if lock is None and not as_json:
        subjects = _subject_folders(root)
        echo(f"No lock at {lock_path(root)}: nothing exported yet." if subjects is None else
             f"No lock at {lock_path(root)}: nothing exported by xnat2bids here, though it holds {subjects} "
             "(another export; README: Moving over from the old script).")
        return EXIT_OK
    rows = sorted(lock.sessions.values(), key=lambda r: (r.address, r.experiment_id)) if lock else []
    if as_json:
        doc = {  # without a lock: no lineage yet, serial 0, no sessions
            "format_version": 1,
            "lineage": lock.lineage if lock else None,
            "serial": lock.serial if lock else 0,
            "sessions": [
                {
                    "experiment_id": r.experiment_id,
                    "project": r.project,
                    "address": r.address.path,
                    "date": r.date,
                    "outputs": len(r.outputs),
                    "exported_at": r.exported_at,
                }
                for r in rows
            ],
        }
        echo(json.dumps(doc, indent=2, sort_keys=True))
        return EXIT_OK
    echo(f"{lock_path(root)}: lineage {lock.lineage}, serial {lock.serial}, {_count(len(rows), 'session')}")
    for r in rows:
        echo(f"  {r.address.path:<28} {r.project}/{r.experiment_id:<16} date {r.date or '-':<10}  {len(r.outputs):>4} files  exported {r.exported_at}")
    return EXIT_OK


@app.command()
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where to put the demo BIDS root (default: a temp dir)."),
) -> None:
    """Run plan/apply against the built-in XNAT emulator: no server needed.

    Example: xnat2bids demo
    """
    from reconcile.demo import run_demo

    raise typer.Exit(run_demo(workdir, echo))


@emulator_app.command("serve")
def emulator_serve(
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port on 127.0.0.1."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    data: Optional[Path] = typer.Option(None, "--data", help="Load DICOM laid out PROJECT/SUBJECT/SESSION/SCANID/*.dcm."),
    user: str = typer.Option("admin", "--user", help="Login of the emulated user."),
    password: str = typer.Option("admin", "--password", help="Password of the emulated user (a test fixture, not a real secret)."),
    project: str = typer.Option("PROJ", "--project", help="Project for --demo-sessions and --synthetic-sessions."),
    demo_sessions: int = typer.Option(0, "--demo-sessions", help="Add N sessions of small real DICOM that convert (subjects 001, 002, …; sessions 001_MR1, …), as `xnat2bids demo` serves."),
    synthetic_sessions: int = typer.Option(0, "--synthetic-sessions", help="Add N sessions of deterministic bytes, not DICOM (benchmarks)."),
    scans_per_session: int = typer.Option(2, "--scans-per-session"),
    files_per_scan: int = typer.Option(3, "--files-per-scan"),
    file_size: int = typer.Option(1024, "--file-size"),
    fault: Optional[list[str]] = typer.Option(
        None, "--fault", help="Misbehave, to rehearse failures: KIND:ROUTE[:KNOB=VALUE,...], ROUTE a regular "
        "expression on the request path; KIND status, latency, truncate, reset, auth_expire, corrupt, html_200 or "
        "invalid_json; KNOBs times, after, method, status, message, seconds, fraction. Repeatable. E.g. "
        "latency:/files:seconds=60 or status:/experiments$:status=503,times=3."),
) -> None:
    """Serve an emulated XNAT until interrupted.

    Example: xnat2bids emulator serve --port 8080 --demo-sessions 2 --project LAB_STUDY
    """
    from reconcile.emulator import Archive, EmulatorApp, load_dicom_dir
    from reconcile.emulator.faults import parse_fault
    from reconcile.emulator.serve import serve_forever

    try:
        faults = [parse_fault(f) for f in fault or ()]
    except ValueError as exc:
        raise ConfigError(f"--fault: {exc}") from exc
    archive = Archive()
    archive.add_user(user, password)
    if data is not None:
        if not data.is_dir():
            raise ConfigError(f"--data {data} is not a folder", hint="give a folder laid out PROJECT/SUBJECT/SESSION/SCANID/*.dcm")
        if not load_dicom_dir(archive, data):
            echo(f"warning: --data {data} holds no sessions (a folder laid out PROJECT/SUBJECT/SESSION/SCANID/*.dcm "
                 "is loaded)", err=True)
    if demo_sessions:
        from datetime import date, timedelta

        from reconcile.demo import populate

        first = date(2024, 1, 10)
        populate(archive, project, [(f"{i:03d}", f"{i:03d}_MR1", (first + timedelta(days=i - 1)).isoformat())
                                    for i in range(1, demo_sessions + 1)])
    if synthetic_sessions:
        if project not in archive.projects:
            archive.add_project(project)
        archive.add_synthetic_sessions(
            project, n=synthetic_sessions, scans_per_session=scans_per_session,
            files_per_scan=files_per_scan, file_size=file_size,
        )
    sessions = len(archive.sessions())
    app = EmulatorApp(archive)
    for rule in faults:
        app.faults.add(rule)
    serve_forever(
        archive, host, port, app=app,
        on_ready=lambda url: echo(f"XNAT emulator on {url} ({_count(sessions, 'session')}, user {user}); Ctrl-C to stop"),
    )


def _errors_as_json(as_json: bool) -> None:
    """A script reading `--json` output gets a document on a fatal error too, not an empty stdout."""
    global _json_errors
    _json_errors = as_json


def _render_error(exc: XnatBidsError) -> None:
    echo(f"error: {exc.summary}", err=True)
    if exc.detail:
        for line in exc.detail.splitlines():
            echo(f"  {line}", err=True)
    if exc.hint:
        echo(f"hint: {exc.hint}", err=True)
    _error_json(exc.kind, exc.summary, exc.detail, exc.hint)


def _error_json(kind: str, message: str, detail: str | None = None, hint: str | None = None) -> None:
    """The error as schemas/error.schema.json, on stdout, when the command was given --json."""
    if _json_errors:
        error = {"kind": kind, "message": message, "detail": detail, "hint": hint}
        echo(json.dumps({"format_version": 1, "error": error}, sort_keys=True), outcome=True)  # the document, --quiet or not


def _argv(argv: list[str]) -> list[str]:
    """The command line as click is to read it.

    `--diff`/`--update` without a ROOT mean the configured root, as in the seed tool: click
    cannot give an option an optional value, so a bare one (last, or before another option)
    becomes `--diff=`, which the callback reads as "no ROOT given". `--debug` is the whole
    program's option, but it is as often typed after the command (`plan --debug`): moved first.
    """
    end = argv.index("--") if "--" in argv else len(argv)
    out = [arg for arg in argv[:end] if arg != "--debug"]
    out = (["--debug"] if len(out) < end else []) + out + argv[end:]
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg in ("--diff", "--update") and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = arg + "="
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: any failure (usage error, Ctrl-C, bug) is exit 1 and a short message.

    click would exit 2 on a usage error (read as "changes pending") and typer 130 on Ctrl-C.
    """
    # SIGTERM (`timeout`, systemd, a SLURM time limit, `kill`) stops a command as Ctrl-C does:
    # state lock released, history written; apply turns both into a clean cancel.
    in_main_thread = threading.current_thread() is threading.main_thread()
    tolerate_locale(sys.stdout, sys.stderr)  # a nightly apply under LANG=en_US.ISO-8859-1 must not die on "…"
    previous_term = signal.signal(signal.SIGTERM, signal.default_int_handler) if in_main_thread else None
    try:
        code = _run(argv)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)
    sys.exit(code)


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=_argv(argv), prog_name="xnat2bids", standalone_mode=False)
    except ClickException as exc:  # usage errors and bad parameters
        seed = next((a for a in argv if a.split("=")[0] in ("--diff", "--update")), None)
        if seed is not None and getattr(exc, "possibilities", None):
            exc.possibilities = []  # click's "did you mean" among the root's own options: not what was meant
        exc.show(file=sys.stderr)
        if seed is not None and isinstance(exc, UsageError):
            command = "plan --detailed-exitcode" if seed.startswith("--diff") else "apply"
            echo(f"hint: {seed.split('=')[0]} takes a ROOT (and --config) only; for other options use "
                 f"`xnat2bids {command} [ROOT] …`", err=True)
        code = EXIT_ERROR
    except Abort:
        echo("Aborted.", err=True)
        code = EXIT_ERROR
    except XnatBidsError as exc:
        if _debug:
            traceback.print_exc()
        _render_error(exc)
        code = EXIT_ERROR
    except _PipeClosed:  # `xnat2bids history | head`: the reader had enough; nothing to say
        with contextlib.suppress(OSError, ValueError):  # no second error when Python flushes stdout at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 128 + signal.SIGPIPE  # as a coreutils tool killed by SIGPIPE reports it
    except OSError as exc:  # a file or folder the user named: say which, no traceback
        if _debug:
            traceback.print_exc()
        where = f": {exc.filename}" if exc.filename else ""
        echo(f"error: {exc.strerror or exc}{where}", err=True)
        hint = write_hint(exc, exc.filename or os.getcwd())
        if hint:
            echo(f"hint: {hint}", err=True)
        _error_json("os", f"{exc.strerror or exc}{where}", hint=hint)
        code = EXIT_ERROR
    except _StoppedWaiting as exc:  # what goes on, and how to follow it, is said already
        code = exc.code
    except (_Interrupted, KeyboardInterrupt):  # as a cancelled apply does: exit 1, not 130
        if _debug:
            traceback.print_exc()
        echo("Interrupted.", err=True)
        _error_json("interrupted", "Interrupted.")
        code = EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a bug: one line, the traceback only when asked for
        if _debug:
            traceback.print_exc()
        lines = str(exc).strip().splitlines()
        message = f"internal error: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")
        echo(f"error: {message}", err=True)
        _error_json("internal", message)
        if not _debug:
            echo("hint: run again with --debug for the traceback", err=True)
        code = EXIT_ERROR
    return code if isinstance(code, int) else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()
