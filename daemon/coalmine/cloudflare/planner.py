"""The budget plan kept current: logged, on /metrics and in /health.

A thin shell around the pure :mod:`coalmine.cloudflare.plan`. The daemon tells it which scripts
it watches under which policy (at start and on every reload), whether each has a live canary
(after each of its ticks), and whether discovery runs account-wide; it recomputes the plan when
any of that changes. Each new plan is one log line (``budget plan``, info); a plan that does
not fit is a warning naming the changes that would make it fit, and the ``cloudflare_budget``
check of /health fails (coalmine is degraded) until a plan fits again.

Replicas (:meth:`BudgetPlanner.share_with`): after every lease round the planner learns how
many replicas are live and which scripts this one holds. It re-sizes this replica's token
buckets to its share of the token (:meth:`~coalmine.cloudflare.budgets.TokenBucket.share`)
and plans the scripts it holds against that share, and every watched script against the
token's whole limits (:mod:`coalmine.cloudflare.plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.plan import Budget, Group, Inputs, Plan, from_durations, plan
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


class Keeper(Protocol):
    """A replica's lease keeper, as the planner sees it (:class:`coalmine.replicas.LeaseKeeper`)."""

    live: list[str]
    on_share: Callable[[int, set[str]], None]


class BudgetPlanner:
    """Keeps the budget plan for the scripts watched now, and says when it changes."""

    def __init__(self, settings: Settings, metrics: Metrics, health: Health) -> None:
        self._settings = settings
        self._metrics = metrics
        self._health = health
        self._scripts: dict[str, Watched] = {}
        self._fallback: str | None = None
        self._replicas = 1  # live replicas sharing the token
        self._held: frozenset[str] | None = None  # replicas: the scripts this one holds
        self._buckets: tuple[TokenBucket, ...] = ()
        self.plan: Plan | None = None

    def share_with(self, keeper: Keeper, buckets: Iterable[TokenBucket]) -> None:
        """This daemon is a replica: size ``buckets`` (the Cloudflare client's) to its share of
        the token and plan the scripts it holds, now (as its first heartbeat counted the live
        replicas, holding nothing yet) and after every lease round."""
        self._buckets = tuple(buckets)
        self._held = frozenset()
        keeper.on_share = self.share
        self.share(len(keeper.live), set())

    def share(self, replicas: int, held: set[str]) -> None:
        """A lease round: ``replicas`` live replicas share the token and this one holds ``held``
        (lease names; the outbox's is not a script): re-size the buckets, and re-plan when
        either changed."""
        replicas = max(1, replicas)
        scripts = frozenset(held & self._scripts.keys())
        for bucket in self._buckets:
            bucket.share(replicas)
        if replicas == self._replicas and scripts == self._held:
            return
        why = "replicas changed" if replicas != self._replicas else "leases changed"
        self._replicas, self._held = replicas, scripts
        if self.plan is not None:  # else: the first plan comes with the scripts watched
            self._recompute(why)

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
        described: dict[str, Any] = {
            "fits": current.fits,
            **_parts(current.rest, current.graphql),
            "live_canaries": current.inputs.live,
            "more_canaries": current.more_canaries,
            "changes": current.changes,
        }
        if current.token is not None:
            described["replicas"] = current.inputs.replicas
            described["token"] = _parts(*current.token)
        return described

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
            "rest_limit": _limit(new.rest.limit),
            "graphql": round(new.graphql.planned, 1),
            "graphql_limit": _limit(new.graphql.limit),
            "more_canaries": new.more_canaries,
        }
        if new.token is not None:
            fields["replicas"] = new.inputs.replicas
        if self._fallback is not None:
            fields["discovery_fallback"] = self._fallback
        if new.fits:
            log.info("budget plan", **fields)
        else:
            log.warning("budget plan does NOT fit", change=new.changes, **fields)

    def _inputs(self) -> Inputs:
        every = _groups(self._scripts.values())
        held = self._held
        mine = every if held is None else _groups(w for s, w in self._scripts.items() if s in held)
        settings = self._settings
        inputs = from_durations(
            mine,
            discovery=settings.discovery_interval,
            drift=settings.drift_interval,
            canary_drift=settings.canary_drift_interval,
            rest_limit=settings.cloudflare_rate_limit,
            graphql_limit=settings.cloudflare_graphql_rate_limit,
            account_wide=self._fallback is None,
        )
        if held is None:
            return inputs  # alone: every watched script against the whole limits
        return inputs._replace(replicas=self._replicas, account=every)


def _groups(scripts: Iterable[Watched]) -> tuple[Group, ...]:
    """Scripts cost alike when their policies poll alike (a reload may leave a running rollout
    on its old policy of the same name)."""
    groups: dict[tuple[str, float, bool, float], list[int]] = {}
    for w in scripts:
        windows = [r.window.total_seconds() for r in w.policy.rules if r.source == "cloudflare"]
        interval = w.policy.analysis.interval.total_seconds()
        key = (w.policy.name, interval, bool(windows), max(windows, default=0.0))
        counts = groups.setdefault(key, [0, 0])
        counts[0 if w.live else 1] += 1
    return tuple(
        Group(name, interval, analytics, live, idle, window)
        for (name, interval, analytics, window), (live, idle) in sorted(groups.items())
    )


def _limit(limit: float) -> float:
    """A limit as shown: whole when it is (600), else to a tenth (a share: 66.7)."""
    return int(limit) if limit == int(limit) else round(limit, 1)


def _parts(rest: Budget, graphql: Budget) -> dict[str, Any]:
    """Each API's plan as /health shows it."""
    return {
        b.api: {
            "planned": round(b.planned, 1),
            "limit": _limit(b.limit),
            "reserve": round(b.reserve, 1),
        }
        for b in (rest, graphql)
    }
