"""The budget plan kept current: logged, on /metrics and in /health.

A thin shell around the pure :mod:`coalmine.cloudflare.plan`. The daemon tells it which scripts
it watches under which policy (at start and on every reload), whether each has a live canary
(after each of its ticks), and whether discovery runs account-wide; it recomputes the plan when
any of that changes. Each new plan is one log line (``budget plan``, info); a plan that does
not fit is a warning naming the changes that would make it fit, and the ``cloudflare_budget``
check of /health fails (coalmine is degraded) until a plan fits again.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from coalmine.cloudflare.plan import Group, Inputs, Plan, from_durations, plan
from coalmine.policy import Policy
from coalmine.server.health import Health
from coalmine.server.metrics import Metrics
from coalmine.settings import Settings

log = structlog.get_logger("coalmine")
CHECK = "cloudflare_budget"  # its name in /health's checks


@dataclass(frozen=True, slots=True)
class Watched:
    """A script the daemon watches, its policy, and whether it has a live canary."""

    script: str
    policy: Policy
    live: bool


class BudgetPlanner:
    """Keeps the budget plan for the scripts watched now, and says when it changes."""

    def __init__(self, settings: Settings, metrics: Metrics, health: Health) -> None:
        self._settings = settings
        self._metrics = metrics
        self._health = health
        self._scripts: dict[str, Watched] = {}
        self._fallback: str | None = None
        self.plan: Plan | None = None

    def watch(self, scripts: Iterable[Watched]) -> None:
        """The scripts watched now (at start, after a reload): recompute and log the plan."""
        self._scripts = {w.script: w for w in scripts}
        self._recompute("scripts watched")

    def canary(self, script: str, live: bool) -> None:
        """A script's tick ended with (``live``) or without a live canary: a canary that
        started or ended changes the plan."""
        watched = self._scripts.get(script)
        if watched is None or watched.live == live:
            return
        self._scripts[script] = Watched(script, watched.policy, live)
        self._recompute("canary started" if live else "canary ended")

    def fallback(self, reason: str | None) -> None:
        """Account-wide discovery is unavailable (``reason``) or back (None): idle scripts
        then cost one read per discovery interval, or one per drift interval again."""
        if (reason is None) == (self._fallback is None):
            self._fallback = reason
            return
        self._fallback = reason
        self._recompute("discovery fell back" if reason else "account-wide discovery back")

    def describe(self) -> dict[str, Any] | None:
        """The plan as /health shows it (None before the first)."""
        current = self.plan
        if current is None:
            return None
        return {
            "fits": current.fits,
            **{
                b.api: {
                    "planned": round(b.planned, 1),
                    "limit": b.limit,
                    "reserve": round(b.reserve, 1),
                }
                for b in (current.rest, current.graphql)
            },
            "live_canaries": current.inputs.live,
            "more_canaries": current.more_canaries,
            "changes": current.changes,
        }

    def _recompute(self, why: str) -> None:
        try:
            new = plan(self._inputs())
        except Exception:  # a bug here must not stop a loop's tick or the daemon's start
            log.exception("internal error computing the budget plan", why=why)
            return
        self.plan = new
        self._metrics.record_plan(new)
        self._health.condition(CHECK, new.problem())
        fields: dict[str, Any] = {
            "why": why,
            "plan": new.summary(),
            "rest": round(new.rest.planned, 1),
            "rest_limit": new.rest.limit,
            "graphql": round(new.graphql.planned, 1),
            "graphql_limit": new.graphql.limit,
            "more_canaries": new.more_canaries,
        }
        if self._fallback is not None:
            fields["discovery_fallback"] = self._fallback
        if new.fits:
            log.info("budget plan", **fields)
        else:
            log.warning("budget plan does NOT fit", change=new.changes, **fields)

    def _inputs(self) -> Inputs:
        # scripts cost alike when their policies poll alike (a reload may leave a running
        # rollout on its old policy of the same name)
        groups: dict[tuple[str, float, bool], list[int]] = {}
        for w in self._scripts.values():
            analytics = any(r.source == "cloudflare" for r in w.policy.rules)
            key = (w.policy.name, w.policy.analysis.interval.total_seconds(), analytics)
            counts = groups.setdefault(key, [0, 0])
            counts[0 if w.live else 1] += 1
        settings = self._settings
        return from_durations(
            tuple(Group(*key, *counts) for key, counts in sorted(groups.items())),
            discovery=settings.discovery_interval,
            drift=settings.drift_interval,
            canary_drift=settings.canary_drift_interval,
            rest_limit=settings.cloudflare_rate_limit,
            graphql_limit=settings.cloudflare_graphql_rate_limit,
            account_wide=self._fallback is None,
        )
