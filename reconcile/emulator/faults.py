"""Fault injection for the XNAT emulator: which requests misbehave, how, and how often.

This module owns the fault rules and their counters; `app.py` asks `FaultSet.fire()` per request
and carries the faults out (status pages, sleeps, truncated or corrupted bodies, dropped sockets).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

KINDS = frozenset(
    {"status", "latency", "truncate", "reset", "auth_expire", "corrupt", "html_200", "invalid_json"}
)


@dataclass
class Fault:
    """One misbehaviour rule.

    `route` is a regular expression searched in the request path (query string excluded).
    The first `after` matching requests pass untouched; then the fault fires `times` times
    (None: for ever). Kind-specific knobs: `status` and `message` for "status"/"html_200",
    `seconds` for "latency", `fraction` (of the body kept) for "truncate".
    """

    route: str
    kind: str
    times: int | None = None
    after: int = 0
    method: str | None = None
    status: int = 500
    message: str | None = None
    seconds: float = 1.0
    fraction: float = 0.5
    seen: int = field(default=0, init=False)
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; expected one of {sorted(KINDS)}")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError("fraction must be in [0, 1)")
        self._pattern = re.compile(self.route)

    def matches(self, method: str, path: str) -> bool:
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self._pattern.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.fired >= self.times


_KNOBS = {"times": int, "after": int, "method": str, "status": int, "message": str, "seconds": float,
          "fraction": float}


def parse_fault(text: str) -> Fault:
    """A fault as `emulator serve --fault` takes it: KIND:ROUTE[:KNOB=VALUE,...], e.g.
    `latency:/files:seconds=60` or `status:/experiments$:status=503,times=3`. ValueError, saying
    what is wrong, for anything else."""
    kind, route, knobs = (text.split(":", 2) + ["", ""])[:3]
    if not route:
        raise ValueError(f"fault {text!r}: expected KIND:ROUTE[:KNOB=VALUE,...]")
    options: dict[str, object] = {}
    for knob in filter(None, knobs.split(",")):
        name, sep, value = knob.partition("=")
        if not sep or name not in _KNOBS:
            raise ValueError(f"fault {text!r}: {knob!r} is not one of {', '.join(f'{k}=…' for k in _KNOBS)}")
        options[name] = _KNOBS[name](value)
    return Fault(route=route, kind=kind, **options)  # type: ignore[arg-type]


class FaultSet:
    """The faults active on one emulator; thread-safe."""

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.auth_expired = False

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            self._faults.remove(fault)

    def clear(self) -> None:
        """Drop every fault and end an `auth_expire` outage."""
        with self._lock:
            self._faults.clear()
            self.auth_expired = False

    def __iter__(self):
        with self._lock:
            return iter(list(self._faults))

    def __len__(self) -> int:
        return len(self._faults)

    def fire(self, method: str, path: str) -> list[Fault]:
        """Count this request against every matching fault; return those that fire now."""
        firing: list[Fault] = []
        with self._lock:
            for fault in self._faults:
                if not fault.matches(method, path):
                    continue
                fault.seen += 1
                if fault.seen <= fault.after or fault.exhausted:
                    continue
                fault.fired += 1
                firing.append(fault)
                if fault.kind == "auth_expire":
                    self.auth_expired = True
        return firing
