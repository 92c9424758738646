"""Per-dependency health for /health: the latest call's status and latency, and when it failed."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Status = Literal["healthy", "degraded", "unhealthy"]
STORE_UNHEALTHY_AFTER = 300.0  # seconds of failing writes before /health says unhealthy (503)


@dataclass(slots=True)
class Check:
    """What the latest calls to one dependency showed."""

    ok: bool = True
    latency_ms: float | None = None
    error: str | None = None
    failing_since: float | None = None


class Health:
    """Collects call outcomes per dependency; a failing dependency makes coalmine degraded."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._checks: dict[str, Check] = {}
        self._store_failing_since: float | None = None
        self.store_problem: str | None = None  # why the state store is not ok, when known
        self.store_lost = False  # deleted or replaced under the daemon: nothing can be recorded
        self.store_kept = 0  # records waiting in memory for the state store

    def expect(self, *dependencies: str) -> None:
        """Dependencies that appear in /health even before their first call."""
        for name in dependencies:
            self._checks.setdefault(name, Check())

    def record(self, dependency: str, seconds: float, error: str | None) -> None:
        """A call finished."""
        self.condition(dependency, error)
        self._checks[dependency].latency_ms = round(seconds * 1000, 1)

    def condition(self, name: str, problem: str | None) -> None:
        """A condition of coalmine's own, with no call behind it (so no latency): failing,
        and coalmine degraded, while ``problem`` says why."""
        check = self._checks.setdefault(name, Check())
        if problem is None:
            check.ok, check.error, check.failing_since = True, None, None
        else:
            if check.ok:
                check.failing_since = self._clock()
            check.ok, check.error = False, problem

    @property
    def store_ok(self) -> bool:
        """Whether the latest state-store write worked."""
        return self._store_failing_since is None

    @store_ok.setter
    def store_ok(self, ok: bool) -> None:
        if ok:
            self._store_failing_since = None
        elif self._store_failing_since is None:
            self._store_failing_since = self._clock()

    @property
    def not_ready(self) -> str | None:
        """Why /readyz fails: the state store cannot record (None when it can)."""
        if self.store_ok and not self.store_lost and not self.store_kept:
            return None
        return self.store_problem or "the state store is failing"

    @property
    def status(self) -> Status:
        """``degraded`` while any dependency fails; ``unhealthy`` once the state store has failed
        for longer than :data:`STORE_UNHEALTHY_AFTER`, or at once when it is lost (no decision
        can be recorded)."""
        since = self._store_failing_since
        if self.store_lost or (since is not None and self._clock() - since > STORE_UNHEALTHY_AFTER):
            return "unhealthy"
        healthy = since is None and all(c.ok for c in self._checks.values())
        return "healthy" if healthy else "degraded"

    def snapshot(self) -> dict[str, Any]:
        """The ``checks`` object of /health."""
        now = self._clock()
        out: dict[str, Any] = {}
        for name, check in sorted(self._checks.items()):
            entry: dict[str, Any] = {
                "status": "healthy" if check.ok else "failing",
                "latency_ms": check.latency_ms,
            }
            if not check.ok:
                entry["error"] = check.error
                entry["failing_for_s"] = round(now - (check.failing_since or now), 1)
            out[name] = entry
        store: dict[str, Any] = {"status": "healthy", "latency_ms": None}
        if self.not_ready is not None:
            since = self._store_failing_since
            store["status"] = "failing"
            store["error"] = self.not_ready
            store["failing_for_s"] = round(now - (since or now), 1)
            if self.store_kept:
                store["kept_in_memory"] = self.store_kept
        out["state_store"] = store
        return out
