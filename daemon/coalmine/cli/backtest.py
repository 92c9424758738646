"""``coalmine backtest``: a policy replayed on real history, by the same engine as ``replay``.

For every evaluation time from ``--from`` to ``--to`` at the policy's ``analysis.interval``, each
canary rule's value is read for the canary and the stable version: Prometheus (or Grafana's
proxy) rules with one ``query_range`` per query and version, stepped at the interval, so each
point is exactly what an instant query at that tick would have answered; Cloudflare rules from
the per-minute rows of the whole range, fetched first in as few GraphQL queries as Cloudflare's
limits allow (:class:`~coalmine.sources.cloudflare_history.CloudflareHistory`), each tick's
window then read from them as the live source reads its own. The versions and the starting
split come from the script's Cloudflare deployments in the range (the first one that splits
traffic), or from ``--canary`` and ``--stable`` (then the canary starts at the first step's
weight at ``--from``). The engine's own traffic decisions are applied to the replayed split at
once; later real deployments are ignored (the backtest asks what *this policy* would have done).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from coalmine.cli.replay import Record, replay
from coalmine.cloudflare.client import CloudflareClient, to_engine
from coalmine.engine import Decision, Deployment, Engine, Observation, Options
from coalmine.engine.model import Role, format_time
from coalmine.errors import ConfigError, RemoteError
from coalmine.policy import Policy, Rule
from coalmine.sources import Source, Target
from coalmine.sources.cloudflare_history import CloudflareHistory
from coalmine.sources.promql import render

PROMQL_SOURCES = ("prometheus", "grafana")
MAX_POINTS = 11_000  # Prometheus refuses a query_range of more points than this


@dataclass(frozen=True, slots=True)
class Query:
    """One query the backtest runs (or, with ``--dry``, would run)."""

    rule: str
    role: Role
    source: str
    part: str  # "query", "samples", "events" or a Cloudflare signal
    text: str

    def describe(self, start: datetime, end: datetime, step: timedelta) -> str:
        """One line for ``--dry``."""
        where = (
            f"query_range start={format_time(start)} end={format_time(end)} "
            f"step={step.total_seconds():g}s"
            if self.source in PROMQL_SOURCES
            else f"ticks from {format_time(start)} to {format_time(end)}, each window read from"
            " rows fetched first, in as few GraphQL queries as Cloudflare's limits allow"
        )
        return f"{self.rule} [{self.role}] {self.source} {self.part}, {where}:\n  {self.text}"


@dataclass
class Backtest:
    """What a backtest found: the decisions and each rule's series, for the report."""

    policy: Policy
    script: str
    start: datetime
    end: datetime
    split: Deployment
    decisions: list[Decision]
    series: dict[str, dict[Role, list[tuple[datetime, float | None]]]] = field(default_factory=dict)


def ticks(start: datetime, end: datetime, step: timedelta) -> list[datetime]:
    """Every evaluation time from ``start`` to ``end`` inclusive."""
    count = int((end - start) / step)
    return [start + i * step for i in range(count + 1)]


def queries(policy: Policy, script: str, split: Deployment) -> list[Query]:
    """The queries the backtest runs: each canary rule, for each version."""
    canary = split.canary or "$canary"
    out: list[Query] = []
    for rule in policy.rules:
        if "canary" not in rule.phases:
            continue
        pairs: tuple[tuple[Role, str], ...] = (("canary", canary), ("stable", split.stable))
        for role, version in pairs:
            target = Target(script, role, version, canary, split.stable)
            if rule.source in PROMQL_SOURCES:
                first = ("events", rule.events) if rule.compare else ("query", rule.query)
                parts = [first, ("samples", rule.samples)]
                for part, text in parts:
                    if text is not None:
                        out.append(
                            Query(rule.name, role, rule.source, part, render(text, rule, target))
                        )
            else:
                signal = rule.signal or "?"
                out.append(Query(rule.name, role, rule.source, signal, f"{signal} of {version}"))
    return out


async def find_split(
    cloudflare: CloudflareClient, script: str, start: datetime, end: datetime
) -> tuple[Deployment, datetime]:
    """The first deployment in the range that splits traffic, and when it was made."""
    versions = await cloudflare.versions(script)
    found: list[tuple[datetime, Deployment]] = []
    for live in await cloudflare.deployments(script):
        made = datetime.fromisoformat(live.created_on.replace("Z", "+00:00"))
        split = to_engine(live, versions)
        if start <= made <= end and split.is_split:
            found.append((made, split))
    if not found:
        raise ConfigError(
            f"no deployment of {script} split traffic between {format_time(start)} and "
            f"{format_time(end)}; name the versions with --canary V --stable V"
        )
    made, split = min(found, key=lambda pair: pair[0])
    return split, made


async def run_backtest(
    policy: Policy,
    script: str,
    start: datetime,
    end: datetime,
    split: Deployment,
    *,
    http: httpx.AsyncClient,
    prometheus_url: str | None,
    sources: dict[str, Source],
    options: Options | None = None,
) -> Backtest:
    """Fetch every rule's history and run the engine over it."""
    interval = policy.analysis.interval
    times = ticks(start, end, interval)
    if len(times) > MAX_POINTS:
        raise ConfigError(
            f"{len(times)} evaluations from --from to --to at {interval.total_seconds():g}s; "
            f"at most {MAX_POINTS}: shorten the range"
        )
    assert split.canary is not None
    result = Backtest(policy, script, start, end, split, [])
    observations: dict[datetime, list[Observation]] = {t: [] for t in times}
    for name, history in sources.items():
        if isinstance(history, CloudflareHistory):  # its rows first, in as few queries as may be
            rules = [r for r in policy.rules if r.source == name and "canary" in r.phases]
            await history.load(script, (split.canary, split.stable), rules, times)
    for rule in policy.rules:
        if "canary" not in rule.phases:
            continue
        pairs: tuple[tuple[Role, str], ...] = (("canary", split.canary), ("stable", split.stable))
        for role, version in pairs:
            target = Target(script, role, version, split.canary, split.stable)
            if rule.source in PROMQL_SOURCES:
                if not prometheus_url:
                    raise ConfigError(
                        f"rule {rule.name} reads Prometheus: set COALMINE_PROMETHEUS_URL"
                    )
                got = await _promql_rule(http, prometheus_url, rule, target, times)
            else:
                source = sources.get(rule.source)
                if source is None:
                    raise ConfigError(
                        f"rule {rule.name} reads {rule.source}: set "
                        "COALMINE_CLOUDFLARE_ACCOUNT_ID and COALMINE_CLOUDFLARE_API_TOKEN"
                    )
                got = [await source.fetch(rule, target, t) for t in times]
            for t, obs in zip(times, got, strict=True):
                observations[t].append(obs)
            result.series.setdefault(rule.name, {})[role] = [
                (t, obs.value) for t, obs in zip(times, got, strict=True)
            ]
    records = [Record(start, 0, deployment=split)]
    for t in times:
        records += [Record(t, 0, observation=o) for o in observations[t]]
    engine = Engine(policy, options)
    result.decisions = list(replay(engine, records, script))
    return result


async def _promql_rule(
    http: httpx.AsyncClient, url: str, rule: Rule, target: Target, times: list[datetime]
) -> list[Observation]:
    first = rule.events if rule.compare else rule.query
    assert first is not None
    values = await query_range(http, url, render(first, rule, target), times)
    samples: list[float | str | None] = [None] * len(times)
    if rule.samples is not None:
        samples = await query_range(http, url, render(rule.samples, rule, target), times)
    out = []
    for t, value, counted in zip(times, values, samples, strict=True):
        if isinstance(value, str) or isinstance(counted, str):
            why = value if isinstance(value, str) else f"samples query: {counted}"
            out.append(Observation(rule.name, target.role, None, None, str(why)))
            continue
        count = 0.0 if counted is not None and math.isnan(counted) else counted
        if rule.compare is None:
            out.append(Observation(rule.name, target.role, value, count))
        else:
            rate = value / count if value is not None and count else None
            span = (t - rule.window, t)
            out.append(Observation(rule.name, target.role, rate, count, events=value, span=span))
    return out


async def query_range(
    http: httpx.AsyncClient, url: str, query: str, times: list[datetime]
) -> list[float | str | None]:
    """One value per time: a float, None (no data), or a string saying why there is none."""
    step = (times[1] - times[0]).total_seconds() if len(times) > 1 else 60.0
    params = {
        "query": query,
        "start": f"{times[0].timestamp():.3f}",
        "end": f"{times[-1].timestamp():.3f}",
        "step": f"{step:g}",
    }
    try:
        response = await http.post(url.rstrip("/") + "/api/v1/query_range", data=params)
    except httpx.HTTPError as exc:
        raise RemoteError(f"Prometheus at {url} unreachable ({type(exc).__name__})") from None
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        raise RemoteError(
            f"Prometheus refused {query!r}: {error or f'HTTP {response.status_code}'}"
        )
    result = body["data"]["result"]
    if len(result) > 1:
        return [f"{len(result)} series; the query must aggregate to one"] * len(times)
    points: dict[float, float] = {}
    for t, text in result[0]["values"] if result else []:
        points[round(float(t), 3)] = float(text)
    return [points.get(round(t.timestamp(), 3)) for t in times]


def parse_time(text: str) -> datetime:
    """An RFC 3339 time (``Z`` or an offset; naive times are UTC)."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{text!r} is not an RFC 3339 time, e.g. 2026-03-03T18:00:00Z") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def describe(decisions: Iterable[Decision]) -> list[dict[str, Any]]:
    """The decisions as JSON objects (the replay output format)."""
    return [d.to_dict() for d in decisions]
