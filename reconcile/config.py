"""Reading and validating `xnat2bids.toml`.

Owns the config's shape (via `schemas/config.schema.json`), friendly errors for unknown keys,
and the per-session conversion settings whose fingerprints the lock records. No network here.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from reconcile.errors import ConfigError
from reconcile.schema import load_schema

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_BIDS_ROOT = "~/bids-export"
CONFIG_NAME = "xnat2bids.toml"


def _digest(value: Any) -> str:
    blob = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class ConversionSettings:
    """What decides how a session is converted; a change re-converts the sessions it touches."""

    heuristic: str = "reproin"
    include: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    bidsmap: tuple[tuple[str, str], ...] = ()
    heuristic_sha: str = ""  # content of a custom heuristic file, read when the config is loaded

    def __hash__(self) -> int:
        # Cached: settings key the memos planning consults per recorded session and scan, and a
        # tuple's hash is computed anew each time (the bidsmap's pairs too).
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((self.heuristic, self.include, self.skip, self.bidsmap, self.heuristic_sha))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:
        # str hashes differ between processes: a copy elsewhere computes its own.
        return {k: v for k, v in self.__dict__.items() if k != "_hash"}

    def merged(self, table: dict[str, Any]) -> ConversionSettings:
        return ConversionSettings(
            heuristic=table.get("heuristic", self.heuristic),
            include=tuple(table.get("include", self.include)),
            skip=tuple(table.get("skip", self.skip)),
            bidsmap=tuple(sorted(table["bidsmap"].items())) if "bidsmap" in table else self.bidsmap,
        )

    def digests(self) -> dict[str, str]:
        return dict(_conversion_digests(self))  # a copy: the cached one is shared

    def fingerprint(self) -> str:
        return _digest(self.digests())

    def legacy_digests(self) -> dict[str, str]:
        """The include/skip digests of the lists as written, which locks written before the
        digests ignored order and repeats hold: equal to them, nothing changed."""
        return _legacy_digests(self)  # shared, as `digests()` copies: callers only compare

    def selects(self, scan_id: str, series_description: str) -> bool:
        """Include/skip by scan ID, ID ranges ('1-4,6') or series-description globs."""
        if self.include and not any(_matches(p, scan_id, series_description) for p in self.include):
            return False
        return not any(_matches(p, scan_id, series_description) for p in self.skip)

    def scan_name(self, description: str, protocol_name: str) -> str | None:
        """The ReproIn name the conversion gives a series by the bidsmap: by its SeriesDescription,
        else by its ProtocolName, as the generated heuristic renames; None when no entry matches.
        Raises ValueError, as the conversion refuses the session, when entries that disagree
        match the name it selects by (the description, or the protocol name without one)."""
        if not self.bidsmap:
            return None
        bidsmap_target(description or protocol_name, self.bidsmap)
        for name in (description, protocol_name):
            try:
                target = bidsmap_target(name, self.bidsmap)
            except ValueError:  # the heuristic leaves such a name as it is
                target = None
            if target is not None:
                return target if name == description else sbref_target(description, target)
        return None


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


def sbref_target(description: str, target: str) -> str:
    """The ReproIn name of a series the bidsmap names by its ProtocolName (`target`): a Siemens
    single-band reference, whose SeriesDescription is its protocol's with `_SBRef`, is the BOLD's
    sbref, not one more BOLD run. The generated heuristic embeds this function's source too."""
    if description.endswith("_SBRef") and target.startswith("func-bold"):
        return "func-sbref" + target[len("func-bold"):]
    return target


@functools.cache  # planning asks once per session (10,000s of times) about a handful of settings
def _conversion_digests(settings: ConversionSettings) -> dict[str, str]:
    return {
        # A custom heuristic counts by its name and content: editing it re-converts,
        # moving the config folder does not.
        "heuristic": _digest([Path(settings.heuristic).name, settings.heuristic_sha])
        if settings.heuristic_sha
        else _digest(settings.heuristic),
        # Either list selects by any of its patterns: order and repeats change nothing.
        "include": _digest(sorted(set(settings.include))),
        "skip": _digest(sorted(set(settings.skip))),
        "bidsmap": _digest([list(p) for p in settings.bidsmap]),
    }


@functools.cache  # asked per session whose recorded digests differ: every one of an older lock
def _legacy_digests(settings: ConversionSettings) -> dict[str, str]:
    return {"include": _digest(list(settings.include)), "skip": _digest(list(settings.skip))}


def _matches(pattern: str, scan_id: str, description: str) -> bool:
    for part in pattern.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if sep and lo.isdigit() and hi.isdigit() and scan_id.isdigit():
            if int(lo) <= int(scan_id) <= int(hi):
                return True
        elif part == scan_id or fnmatchcase(description, part):
            return True
    return False


@dataclass(frozen=True)
class NamingSettings:
    session_label: str = "label"  # or "strip-subject": "<subject>_<session>" → "<session>"
    subjects: dict[str, str] = field(default_factory=dict)  # XNAT subject label → BIDS label
    sessions: dict[str, str] = field(default_factory=dict)  # experiment ID or label → BIDS label


@dataclass(frozen=True)
class SlurmSettings:
    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    account: str | None = None
    qos: str | None = None
    max_parallel: int = 4
    extra_args: tuple[str, ...] = ()
    setup: str = ""


@dataclass(frozen=True)
class Config:
    xnat_url: str | None = None
    bids_root: str | None = None
    projects: tuple[str, ...] = ()
    layout: str = "flat"
    executor: str = "local"
    jobs: int | None = None
    verify_tls: bool = True
    timeout: float = 30.0  # seconds XNAT may take to start answering a request
    keep_dicom: bool = False
    naming: NamingSettings = field(default_factory=NamingSettings)
    conversion: ConversionSettings = field(default_factory=ConversionSettings)
    project_tables: dict[str, dict[str, Any]] = field(default_factory=dict)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    source: str | None = None
    heuristic_shas: dict[str, str] = field(default_factory=dict)  # custom heuristic path → sha256

    def fingerprint(self) -> str:
        """Digest of everything that decides what apply produces (not URLs, jobs or SLURM)."""
        naming = {"session_label": self.naming.session_label, "subjects": self.naming.subjects,
                  "sessions": self.naming.sessions}
        parts: dict[str, Any] = {"conversion": self.conversion.digests(), "naming": naming,
                                 "projects": self.project_tables}
        if self.heuristic_shas:  # a custom heuristic's content (only then: other configs keep their fingerprint)
            parts["heuristics"] = sorted(self.heuristic_shas.values())
        return _digest(parts)

    def conversion_for(self, project: str, session_label: str, experiment_id: str = "") -> ConversionSettings:
        settings = self.conversion
        table = self.project_tables.get(project, {})
        settings = settings.merged(table.get("conversion", {}))
        own = self.session_table_key(project, session_label, experiment_id)
        if own is not None:
            settings = settings.merged(table["sessions"][own])
        return replace(settings, heuristic_sha=self.heuristic_shas.get(settings.heuristic, ""))

    def exclusions(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each project's `exclude` globs, for `Selection.excluded`: sessions no plan takes up."""
        return tuple((project, tuple(table["exclude"]))
                     for project, table in sorted(self.project_tables.items()) if table.get("exclude"))

    def session_table_key(self, project: str, session_label: str, experiment_id: str = "") -> str | None:
        """The key of a session's own table in [project.P.sessions]: its experiment ID or its
        label, the ID first, as in [naming.sessions]; None when it has none."""
        sessions = self.project_tables.get(project, {}).get("sessions", {})
        if experiment_id and experiment_id in sessions:
            return experiment_id
        return session_label if session_label in sessions else None

    def resolve_bids_root(self, argument: str | os.PathLike[str] | None) -> Path:
        """BIDS root: command-line argument > `bids_root` in the config > ~/bids-export."""
        chosen = argument if argument is not None else (self.bids_root or DEFAULT_BIDS_ROOT)
        return Path(os.path.expanduser(os.fspath(chosen))).absolute()


def _unknown_keys(data: Any, schema: dict[str, Any], root: dict[str, Any], where: str) -> list[str]:
    """Walk the data against the schema and explain every key the schema does not know."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    if not isinstance(data, dict) or schema.get("type") != "object":
        return []
    problems = []
    props = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key in props:
            problems += _unknown_keys(value, props[key], root, path)
        elif isinstance(extra, dict):
            problems += _unknown_keys(value, extra, root, path)
        elif extra is False:
            close = difflib.get_close_matches(key, list(props), n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(f"unknown key '{path}'{hint}")
    return problems


# Installed with the package (a link to the one at the top of the source tree).
EXAMPLE = Path(__file__).resolve().parent / "xnat2bids.toml.example"

_TYPES = {"integer": "a whole number", "number": "a number", "string": "a string", "boolean": "true or false",
          "array": "a list", "object": "a table"}


def _said(error: Any) -> str:
    """A schema violation in a config's words: what the value must be."""
    bound = error.validator_value
    value = json.dumps(error.instance)  # as the file spells it: "four", true
    if error.validator == "type":
        kinds = bound if isinstance(bound, list) else [bound]
        return f"must be {' or '.join(_TYPES.get(k, k) for k in kinds)}, not {value}"
    if error.validator == "minimum":
        return f"must be at least {bound}, not {value}"
    if error.validator == "exclusiveMinimum":
        return f"must be greater than {bound}, not {value}"
    if error.validator == "maximum":
        return f"must be at most {bound}, not {value}"
    if error.validator == "enum":
        return f"must be one of {', '.join(json.dumps(v) for v in bound)}, not {value}"
    if error.validator == "minLength" and bound == 1:
        return "must not be empty"
    return error.message


def parse_config(data: dict[str, Any], source: str | None = None) -> Config:
    schema = load_schema("config")
    where = source or "config"
    unknown = _unknown_keys(data, schema, schema, "")
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}",
            detail="\n".join(unknown[1:]) or None,
            hint=f"every key is in {EXAMPLE}",
        )
    url = data.get("xnat_url")
    if "xnat_url" in data and not isinstance(url, str):  # never quoted: it may hold a password
        raise ConfigError(f"{where}: invalid value for 'xnat_url': not a string", hint='xnat_url = "https://xnat.example.org"')
    if isinstance(url, str) and "@" in url:
        raise ConfigError(
            f"{where}: xnat_url holds a user name or password (an '@')",
            hint="credentials never go in the config: use ~/.netrc, XNAT_USER/XNAT_PASS or the prompt",
        )
    if isinstance(data.get("projects"), dict):  # [projects.LAB.conversion]: the plural is the list's key
        raise ConfigError(f"{where}: 'projects' is the list of projects to export, not a table; did you mean "
                          f"[project.{next(iter(data['projects']), '<ID>')}]?",
                          hint='projects = ["LAB"] lists them; a project\'s settings go in [project.LAB] (singular)')
    import jsonschema  # here, not at the top: ~80 ms that a run without a config file never needs

    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        path = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"{where}: invalid value for '{path}': {_said(e)}", hint=f"every key is in {EXAMPLE}")
    bad_target = _unsafe_bidsmap_target(data)  # after the schema: the tables have their shapes
    if bad_target:
        raise ConfigError(
            f"{where}: bidsmap target {bad_target[1]!r} for {bad_target[0]!r} is not a ReproIn series name",
            hint="a ReproIn name such as \"anat-T1w_acq-mprage\": ASCII letters and digits, '-', '_' and '+' only "
                 "(BIDS labels hold letters and digits alone)",
        )
    naming = data.get("naming", {})
    slurm = data.get("slurm", {})
    return Config(
        xnat_url=data.get("xnat_url"),
        bids_root=data.get("bids_root"),
        projects=tuple(data.get("projects", ())),
        layout=data.get("layout", "flat"),
        executor=data.get("executor", "local"),
        jobs=data.get("jobs"),
        verify_tls=data.get("verify_tls", True),
        timeout=float(data.get("timeout", 30.0)),
        keep_dicom=data.get("keep_dicom", False),
        naming=NamingSettings(
            session_label=naming.get("session_label", "label"),
            subjects=dict(naming.get("subjects", {})),
            sessions=dict(naming.get("sessions", {})),
        ),
        conversion=ConversionSettings().merged(data.get("conversion", {})),
        project_tables=dict(data.get("project", {})),
        slurm=SlurmSettings(**{**slurm, "extra_args": tuple(slurm.get("extra_args", ()))}),
        source=source,
    )


# BIDS labels are ASCII letters and digits: a ReproIn name is those, '-', '_' and '+' (`_run+`).
NOT_REPROIN = re.compile(r"[^A-Za-z0-9_+\-]")


def _conversion_tables(data: dict[str, Any]) -> list[Any]:
    """The config's conversion tables: the top one, each project's and each session's."""
    tables = [data.get("conversion")]
    for project in (data.get("project") or {}).values():
        if isinstance(project, dict):
            tables.append(project.get("conversion"))
            tables += list((project.get("sessions") or {}).values())
    return tables


def _unsafe_bidsmap_target(data: dict[str, Any]) -> tuple[str, str] | None:
    """(key, target) of a bidsmap target that would put a path into heudiconv's output names."""
    for table in _conversion_tables(data):
        bidsmap = table.get("bidsmap") if isinstance(table, dict) else None
        for key, target in (bidsmap.items() if isinstance(bidsmap, dict) else ()):
            if isinstance(target, str) and NOT_REPROIN.search(target):
                return key, target
    return None


ENV_CONFIG = "XNAT2BIDS_CONFIG"


def config_candidates(env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where a config is looked for when none is given: $XNAT2BIDS_CONFIG, ./xnat2bids.toml,
    then the user's ($XDG_CONFIG_HOME or ~/.config)/xnat2bids/xnat2bids.toml, so that cron jobs
    and SLURM tasks started elsewhere find the same one."""
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path(CONFIG_NAME), Path(base) / "xnat2bids" / CONFIG_NAME]


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load the config file; with no path, the first of `config_candidates` that exists, else
    the defaults (`Config.source` None)."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None  # set, it must name a readable file
    if path is None:
        path = next((c for c in config_candidates() if c.is_file()), None)
        if path is None:
            return Config()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    # Relative paths in it are relative to the file's own folder (through any link to it, as a
    # lab's shared config linked into ~/.config), the same from any working directory.
    base = path.resolve().parent
    config = _heuristics_relative_to(parse_config(data, source=str(path)), base)
    if config.bids_root and not os.path.isabs(os.path.expanduser(config.bids_root)):
        config = replace(config, bids_root=str(base / config.bids_root))
    return replace(config, heuristic_shas=_heuristic_shas(config, str(path)))


def _heuristic_shas(config: Config, source: str) -> dict[str, str]:
    """sha256 of every custom heuristic file the config names; a file that cannot be read is a
    config error now, not a failed conversion after the download."""
    names = {config.conversion.heuristic}
    for table in config.project_tables.values():
        names.add(table.get("conversion", {}).get("heuristic", "reproin"))
        names.update(t.get("heuristic", "reproin") for t in table.get("sessions", {}).values())
    shas = {}
    for name in names - {"reproin"}:
        if not _is_heuristic_file(name):
            continue  # one of heudiconv's own heuristics, by name
        try:
            shas[name] = hashlib.sha256(Path(name).read_bytes()).hexdigest()
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read heuristic {name}: {exc.strerror or exc}") from exc
    return shas


def _is_heuristic_file(name: str) -> bool:
    return "/" in name or name.endswith(".py")


def _heuristics_relative_to(config: Config, base: Path) -> Config:
    """A custom heuristic given as a relative path is relative to the config file, not the cwd."""

    def fix(table: dict[str, Any]) -> dict[str, Any]:
        h = table.get("heuristic")
        if h and h != "reproin" and _is_heuristic_file(h):
            h = os.path.expanduser(h)
            return {**table, "heuristic": h if Path(h).is_absolute() else str((base / h).resolve())}
        return table

    conversion = config.conversion
    if conversion.heuristic != "reproin":
        conversion = conversion.merged(fix({"heuristic": conversion.heuristic}))
    projects = {
        name: {
            **table,
            **({"conversion": fix(table["conversion"])} if "conversion" in table else {}),
            **({"sessions": {k: fix(v) for k, v in table["sessions"].items()}} if "sessions" in table else {}),
        }
        for name, table in config.project_tables.items()
    }
    return replace(config, conversion=conversion, project_tables=projects)


# fnmatch's metacharacters: XNAT project IDs never contain them, globs such as SMITH_* do.
_GLOB = re.compile(r"[*?\[]")


def is_pattern(name: str) -> bool:
    """True for a glob (`*`, `?`, `[…]`), which selects projects instead of naming one."""
    return _GLOB.search(name) is not None


def expand_projects(wanted: Sequence[str], known: Sequence[str], *, where: str,
                    hint: str = "a glob selects among the projects already known; name a new project by its XNAT ID",
                    ) -> tuple[str, ...]:
    """--project values as project IDs: an ID stands for itself, a glob for the `known` projects
    it matches. XNAT is never asked for a pattern, nor a folder named after one, so a glob that
    matches none of them (known `where`) is an error."""
    chosen: dict[str, None] = {}
    for value in wanted:
        if not is_pattern(value):
            chosen[value] = None
            continue
        matches = [p for p in known if fnmatchcase(p, value)]
        if not matches:
            raise ConfigError(
                f"project pattern {value!r} matches no project {where}",
                hint=hint,
            )
        chosen.update(dict.fromkeys(matches))
    return tuple(chosen)


def select(patterns: tuple[str, ...], *values: str) -> bool:
    """True when no patterns are given or any pattern matches any of the values."""
    return not patterns or any(fnmatchcase(v, p) for p in patterns for v in values)
