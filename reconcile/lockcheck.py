"""Validation of a lock document: `schemas/lock.schema.json` compiled into plain closures (a quick
yes/no and a full check that names every problem), plus the consistency rules a schema cannot state.

Works on parsed documents only: no TOML, no files, no records.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Mapping
from datetime import date
from functools import cache
from typing import Any

from reconcile.errors import LockfileError
from reconcile.schema import load_schema

# jsonschema needs ~7 ms per session here (minutes for a 10,000-session lock), so the schema is
# compiled once into plain closures for the keywords it uses. An unsupported keyword is an error
# at compile time, so the schema cannot gain a rule that is silently not enforced.
_Where = tuple[Any, ...]  # linked (parent, key) pairs, flattened only when reporting an error
_Check = Callable[[Any, _Where, list[tuple[_Where, str]]], None]
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description"})
_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    # Stricter than JSON Schema, which also accepts 1.0: a float would not round-trip as an int.
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
}
_TYPE_NAMES = {"object": "a table", "array": "an array", "string": "a string", "integer": "an integer"}


def _ecma_pattern(pattern: str) -> re.Pattern[str]:
    # ECMA-262 '$' matches only at the very end; Python's also before a final newline.
    return re.compile(re.sub(r"(?<!\\)\$", r"\\Z", pattern))


def _compile(schema: Mapping[str, Any], root: Mapping[str, Any]) -> _Check:
    if "$ref" in schema:
        ref = schema["$ref"]
        if set(schema) - {"$ref"} or not ref.startswith("#/$defs/"):
            raise ValueError(f"unsupported $ref use: {schema}")
        return _compile(root["$defs"][ref.removeprefix("#/$defs/")], root)
    unknown = set(schema) - _ANNOTATIONS - {
        "type", "const", "pattern", "minLength", "maxLength", "minimum", "maximum",
        "properties", "required", "additionalProperties", "propertyNames", "items",
    }
    if unknown:
        raise ValueError(f"schema keywords not supported by the lock validator: {sorted(unknown)}")
    checks: list[_Check] = []
    described = f"not {schema['description']}" if "description" in schema else None

    if "type" in schema:
        name = schema["type"]
        is_type = _TYPES[name]

        def check_type(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if not is_type(v):
                errs.append((where, f"{v!r} is not {_TYPE_NAMES[name]}"))

        checks.append(check_type)
    if "const" in schema:
        const = schema["const"]

        def check_const(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if v != const or type(v) is not type(const):
                errs.append((where, f"{v!r} is not {const!r}"))

        checks.append(check_const)
    if "pattern" in schema or "minLength" in schema or "maxLength" in schema:
        rx = _ecma_pattern(schema["pattern"]) if "pattern" in schema else None
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", float("inf"))

        if described:
            problem = described
        elif rx is not None:
            problem = f"does not match {schema['pattern']}"
        else:
            problem = "empty" if hi == float("inf") else f"not {lo} to {hi} characters long"

        def check_string(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if isinstance(v, str) and not (lo <= len(v) <= hi and (rx is None or rx.search(v))):
                errs.append((where, f"{v!r} is {problem}"))

        checks.append(check_string)
    if "minimum" in schema or "maximum" in schema:
        low, high = schema.get("minimum", float("-inf")), schema.get("maximum", float("inf"))

        def check_range(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if isinstance(v, int) and not isinstance(v, bool) and not low <= v <= high:
                bound = f"at least {low}" if v < low else f"at most {high}"
                errs.append((where, f"{v!r} must be {bound}"))

        checks.append(check_range)
    if {"properties", "required", "additionalProperties", "propertyNames"} & set(schema):
        props = {k: _compile(s, root) for k, s in schema.get("properties", {}).items()}
        required = tuple(schema.get("required", ()))
        extra = schema.get("additionalProperties", True)
        extra_check = _compile(extra, root) if isinstance(extra, Mapping) else None
        names = _compile(schema["propertyNames"], root) if "propertyNames" in schema else None

        def check_object(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if not isinstance(v, dict):
                return
            for key in required:
                if key not in v:
                    errs.append((where, f"missing required key {key!r}"))
            for key, item in v.items():
                if names is not None:
                    names(key, (where, key), errs)
                sub = props.get(key, extra_check)
                if sub is not None:
                    sub(item, (where, key), errs)
                elif extra is False and key not in props:
                    errs.append((where, f"unknown key {key!r}"))

        checks.append(check_object)
    if "items" in schema:
        item_check = _compile(schema["items"], root)

        def check_items(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
            if isinstance(v, list):
                for i, item in enumerate(v):
                    item_check(item, (where, i), errs)

        checks.append(check_items)

    if len(checks) == 1:
        return checks[0]

    def check_all(v: Any, where: _Where, errs: list[tuple[_Where, str]]) -> None:
        for check in checks:
            check(v, where, errs)

    return check_all


# The checks above collect every problem with its place; most documents have none. So a second,
# yes/no form of each check runs first, and the first form only when it says no.
_Valid = Callable[[Any], Any]
_INF = float("inf")
_STRING_KEYS, _INTEGER_KEYS = frozenset({"pattern", "minLength", "maxLength"}), frozenset({"minimum", "maximum"})
_OBJECT_KEYS = frozenset({"properties", "required", "additionalProperties", "propertyNames"})


def _compile_valid(schema: Mapping[str, Any], root: Mapping[str, Any]) -> _Valid:
    """Truthy only if `_compile(schema)` finds no problem. Stricter where that is simpler (exact
    types), False for keyword mixes the lock schema does not use; may raise TypeError."""
    if "$ref" in schema:
        return _compile_valid(root["$defs"][schema["$ref"].removeprefix("#/$defs/")], root)
    keys = set(schema) - _ANNOTATIONS
    kind = schema.get("type")
    if keys == {"const"}:
        const, const_type = schema["const"], type(schema["const"])
        return lambda v: type(v) is const_type and v == const
    if (kind == "string" or (kind is None and "pattern" in keys)) and keys <= {"type"} | _STRING_KEYS:
        search = _ecma_pattern(schema["pattern"]).search if "pattern" in schema else None
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", _INF)
        if search is not None and (lo, hi) == (0, _INF):
            return search  # a match, or None; TypeError for anything but a string
        if search is not None:
            return lambda v: type(v) is str and lo <= len(v) <= hi and search(v)
        return lambda v: type(v) is str and lo <= len(v) <= hi
    if kind == "integer" and keys <= {"type"} | _INTEGER_KEYS:
        low, high = schema.get("minimum", -_INF), schema.get("maximum", _INF)
        return lambda v: type(v) is int and low <= v <= high
    if kind == "array" and keys == {"type", "items"}:
        item = _compile_valid(schema["items"], root)
        return lambda v: type(v) is list and all(map(item, v))
    if kind == "object" and keys <= {"type"} | _OBJECT_KEYS:
        return _compile_valid_object(schema, root)
    return lambda v: False  # not sped up: the full check decides


def _compile_valid_object(schema: Mapping[str, Any], root: Mapping[str, Any]) -> _Valid:
    props = {k: _compile_valid(s, root) for k, s in schema.get("properties", {}).items()}
    required = frozenset(schema.get("required", ()))
    extra = schema.get("additionalProperties", True)
    other = _compile_valid(extra, root) if isinstance(extra, Mapping) else (lambda v: True) if extra else None
    names = _compile_valid(schema["propertyNames"], root) if "propertyNames" in schema else None
    if other is None and names is None and required == props.keys():  # exactly these keys
        pairs = tuple(props.items())

        def valid_record(v: Any) -> bool:
            if type(v) is not dict or v.keys() != required:
                return False
            for key, sub in pairs:
                if not sub(v[key]):
                    return False
            return True

        return valid_record

    def valid_object(v: Any) -> bool:
        if type(v) is not dict or not required <= v.keys():
            return False
        for key, item in v.items():
            sub = props.get(key, other)
            if sub is None or not sub(item) or (names is not None and not names(key)):
                return False
        return True

    return valid_object


@cache
def _lock_check() -> tuple[_Valid, _Check]:
    schema = load_schema("lock")
    return _compile_valid(schema, schema), _compile(schema, schema)


@cache
def _sessions_check() -> _Valid:
    schema = load_schema("lock")
    return _compile_valid(schema["properties"]["sessions"], schema)


def _sessions_valid(sessions: Any) -> bool:
    """Yes/no: would these sessions pass `_problems` as the `sessions` table of a lock? The schema
    has no rule across sessions, so a lock's sessions can be checked a few at a time."""
    try:
        return bool(_sessions_check()(sessions)) and not _consistency_problems({"sessions": sessions})
    except TypeError:
        return False


def _flatten(where: _Where) -> str:
    parts: list[str] = []
    while where:
        where, key = where
        parts.append(str(key))
    return "/".join(reversed(parts)) or "(top level)"


def _schema_problems(doc: Any) -> list[str]:
    valid, check = _lock_check()
    with contextlib.suppress(TypeError):
        if valid(doc):
            return []
    errs: list[tuple[_Where, str]] = []
    check(doc, (), errs)
    return [f"{_flatten(where)}: {message}" for where, message in errs]


def _consistency_problems(doc: Mapping[str, Any]) -> list[str]:
    """What a schema cannot say: keys that must agree with fields, and uniqueness within arrays."""
    out = []
    for key, session in doc["sessions"].items():
        if session["experiment_id"] != key:
            out.append(
                f"sessions/{key}/experiment_id: {session['experiment_id']!r} disagrees with its table key {key!r}"
            )
        for kind, field_name in (("scans", "id"), ("outputs", "path"), ("unselected_scans", "id")):
            seen: set[str] = set()
            for i, item in enumerate(session.get(kind, ())):
                if item[field_name] in seen:
                    out.append(f"sessions/{key}/{kind}/{i}/{field_name}: {item[field_name]!r} is listed twice")
                seen.add(item[field_name])
        if "date" in session and not _is_calendar_date(session["date"]):
            out.append(f"sessions/{key}/date: {session['date']!r} is not a date on the calendar")
        selected = {scan["id"] for scan in session["scans"]}
        for i, item in enumerate(session.get("unselected_scans", ())):
            if item["id"] in selected:
                out.append(f"sessions/{key}/unselected_scans/{i}/id: {item['id']!r} is among the session's scans too")
    return out


def _is_calendar_date(text: str) -> bool:
    """The schema's pattern admits 2024-13-45; XNAT never lists one."""
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _problems(doc: Any) -> list[str]:
    return _schema_problems(doc) or _consistency_problems(doc)


def _raise_invalid(summary: str, problems: list[str]) -> None:
    raise LockfileError(
        f"{summary}: {problems[0]}",
        detail="\n".join(problems[1:21]) or None,
        hint="restore the lock from a backup or version control, or move it away to start afresh",
    )
