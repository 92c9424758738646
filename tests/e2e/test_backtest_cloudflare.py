"""`coalmine backtest` of Cloudflare rules against the simulator's GraphQL (every query checked
against the schema): the whole range in a handful of queries, each tick's window answered
exactly as the live, per-tick source answers it, failures inconclusive and never a pass."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from coalmine.cli import main
from coalmine.cli.backtest import Backtest, run_backtest, ticks
from coalmine.cli.replay import PROMOTED, verdict
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.engine import Deployment, Observation
from coalmine.engine.model import Role
from coalmine.policy import Policy, Rule
from coalmine.simulator import AnalyticsLimits, Behaviour, RateLimits, Simulator, VirtualClock
from coalmine.simulator.graphql import MAX_ROWS, error_body
from coalmine.sources import Source, Target
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.cloudflare_history import CloudflareHistory, Limits, plan
from tests.support import make_policy

SCRIPT = "api"
ORIGIN = datetime(2026, 3, 3, 12, 0, tzinfo=UTC)
POLICY = """
version: 1
name: backtested
scripts: [api]
analysis: {interval: 30s, warmup: 1m, inconclusive_page_after: 30m}
steps:
  - {weight: 10, hold: 20m}
  - {weight: 50, hold: 20m}
  - {weight: 100}
rules:
  - {name: exceptions, source: cloudflare, signal: error_ratio, window: 2m, min_samples: 20,
     above: 0.05, for: 1m, on_breach: rollback}
  - {name: cpu, source: cloudflare, signal: cpu_time_p99, window: 5m, above: 50, on_breach: hold}
  - {name: thrown, source: cloudflare, signal: errors_per_minute, window: 1m, above: 100,
     on_breach: page}
  - {name: served, source: cloudflare, signal: requests, window: 3m, below: 1, on_breach: page}
  - {name: exceptions_vs_stable, source: cloudflare, signal: errors,
     compare: {max_ratio: 2.0, confidence: 0.99}, on_breach: rollback}
"""
UNLIMITED = RateLimits(requests=None, graphql=None)


@dataclass
class World:
    """A simulator with hours of history: a canary split from ``ORIGIN`` + 10 minutes."""

    sim: Simulator
    clock: VirtualClock
    stable: str
    canary: str

    @property
    def split(self) -> Deployment:
        """The canary at 10%."""
        return Deployment(self.stable, self.canary, 10)

    def client(self, http: httpx.AsyncClient, *, graphql_budget: int = 200) -> CloudflareClient:
        """coalmine's Cloudflare client; by default with the default GraphQL budget."""

        async def no_backoff(_seconds: float) -> None:
            """The client's retry backoff, skipped (its budget still waits)."""

        return CloudflareClient(
            http,
            base_url=self.sim.cloudflare_api_url,
            account_id=self.sim.account_id,
            token=self.sim.api_token,
            limiter=TokenBucket(600),
            graphql_limiter=TokenBucket(graphql_budget),
            sleep=no_backoff,
        )

    def target(self, role: Role) -> Target:
        """The canary or the stable version of the split."""
        version = self.canary if role == "canary" else self.stable
        return Target(SCRIPT, role, version, self.canary, self.stable)

    def graphql_requests(self) -> int:
        """GraphQL requests the simulator received."""
        return sum(1 for r in self.sim.cloudflare.requests if r.path.endswith("/graphql"))


def make_world(
    hours: float,
    *,
    analytics: AnalyticsLimits | None = None,
    rate_limits: RateLimits = UNLIMITED,
    requests_per_minute: float = 1200,
    fault_at: timedelta | None = None,
    idle_at: timedelta | None = None,
) -> World:
    """The history: the stable version from ``ORIGIN``, a canary at 10% from 10 minutes on
    (throwing 30% for 20 minutes from ``fault_at``, if given; no traffic at all for 8 minutes
    from ``idle_at``, if given), ``hours`` after that."""
    clock = VirtualClock(ORIGIN)
    sim = Simulator(clock=clock, seed=7, analytics=analytics, rate_limits=rate_limits)
    stable = sim.add_script(SCRIPT, requests_per_minute=requests_per_minute)
    canary = sim.upload_version(SCRIPT, Behaviour())
    clock.advance(timedelta(minutes=10))
    sim.start_canary(SCRIPT, canary, percent=10)
    if fault_at is not None:
        start = ORIGIN + fault_at
        sim.schedule_fault(
            SCRIPT, canary, start=start, end=start + timedelta(minutes=20), exception_rate=0.3
        )
    end = clock() + timedelta(hours=hours, minutes=30)
    if idle_at is not None:
        clock.set(ORIGIN + idle_at)
        sim.set_requests_per_minute(SCRIPT, 0)
        clock.advance(timedelta(minutes=8))
        sim.set_requests_per_minute(SCRIPT, requests_per_minute)
    clock.set(end)
    return World(sim, clock, stable, canary)


@dataclass
class Remembered:
    """A source that asks once per rule, version and time, and gives the same answer again."""

    source: Source
    name: str = "cloudflare"
    seen: dict[tuple[str, str, datetime], Observation] = field(default_factory=dict)

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The wrapped source's answer, asked the first time only."""
        key = (rule.name, target.role, at)
        if key not in self.seen:
            self.seen[key] = await self.source.fetch(rule, target, at)
        return self.seen[key]


async def answers(
    source: Source, policy: Policy, world: World, times: list[datetime]
) -> list[Observation]:
    """Every Cloudflare rule's observation of both versions at every time, tick by tick."""
    pairs: tuple[tuple[Role, str], ...] = (("canary", world.canary), ("stable", world.stable))
    out = []
    for t in times:
        for rule in policy.rules:
            for role, version in pairs:
                target = Target(SCRIPT, role, version, world.canary, world.stable)
                out.append(await source.fetch(rule, target, t))
    return out


async def backtest(
    source: Source, policy: Policy, world: World, http: httpx.AsyncClient, hours: float
) -> Backtest:
    """run_backtest from ``ORIGIN`` + 20 minutes for ``hours``."""
    start = ORIGIN + timedelta(minutes=20)
    return await run_backtest(
        policy,
        SCRIPT,
        start,
        start + timedelta(hours=hours),
        world.split,
        http=http,
        prometheus_url=None,
        sources={"cloudflare": source},
    )


@asynccontextmanager
async def serving(world: World) -> AsyncIterator[httpx.AsyncClient]:
    """The simulator up, and an HTTP client."""
    async with world.sim.running(), httpx.AsyncClient() as http:
        yield http


@pytest.mark.anyio
async def test_a_day_long_backtest_makes_three_graphql_queries() -> None:
    """24 hours at 30 s (2,881 ticks, five rules, two versions) with the default GraphQL budget:
    one settings query and two range queries (the dataset's 1-day maximum), every window
    measured."""
    policy = make_policy(POLICY)
    world = make_world(24.5)
    lines: list[str] = []
    async with serving(world) as http:
        history = CloudflareHistory(world.client(http), world.sim.account_id, report=lines.append)
        result = await backtest(history, policy, world, http, 24)
    assert world.graphql_requests() == 3
    assert (history.queries, history.failed) == (2, 0)
    assert history.limits == Limits(timedelta(days=1), MAX_ROWS)
    assert history.rows > 2 * 24 * 60  # two versions, a row a minute
    assert f"fetched {history.rows} rows in 2 queries" in lines[-1]
    for rule, series in result.series.items():
        for role, points in series.items():
            assert all(value is not None for _, value in points), (rule, role)
    assert verdict(result.decisions) == PROMOTED


@pytest.mark.anyio
@pytest.mark.parametrize(
    "analytics",
    [
        pytest.param(AnalyticsLimits(), id="default-limits"),
        pytest.param(AnalyticsLimits(sample_interval=10), id="sampled"),
        pytest.param(
            AnalyticsLimits(max_duration=timedelta(minutes=45), max_page_size=60),
            id="small-ranges-and-pages",
        ),
    ],
)
async def test_every_window_is_answered_as_the_per_tick_path_answers_it(
    analytics: AnalyticsLimits,
) -> None:
    """Over 90 minutes with a canary fault, idle minutes (sampled away) and windows across
    query boundaries, the range path's observation of every rule, version and tick equals the
    live source's per-tick one, and so do the decisions. (The live source asks for 10,000 rows
    a query, so it reads the same seeded history from a simulator with the default limits.)"""
    policy = make_policy(POLICY)

    def history_with(limits: AnalyticsLimits) -> World:
        fault, idle = timedelta(minutes=50), timedelta(minutes=30)
        return make_world(
            1.5, analytics=limits, requests_per_minute=200, fault_at=fault, idle_at=idle
        )

    world = history_with(analytics)
    same = history_with(AnalyticsLimits(sample_interval=analytics.sample_interval))
    times = ticks(
        ORIGIN + timedelta(minutes=20), ORIGIN + timedelta(minutes=110), timedelta(seconds=30)
    )
    async with serving(same) as http:
        live = Remembered(
            CloudflareAnalytics(
                same.client(http, graphql_budget=100_000),
                same.sim.account_id,
                longest_window=timedelta(minutes=5),
            )
        )
        expected = await answers(live, policy, same, times)
        per_tick = await backtest(live, policy, same, http, 1.5)  # on the answers just seen
    async with serving(world) as http:
        lines: list[str] = []
        history = CloudflareHistory(world.client(http), world.sim.account_id, report=lines.append)
        ranged = await backtest(history, policy, world, http, 1.5)
        got = await answers(history, policy, world, times)
    assert got == expected
    assert any(o.error and o.error.startswith("no data") for o in expected)
    assert sum(1 for o in expected if o.error is None) > len(expected) / 2
    assert ranged.decisions == per_tick.decisions
    assert any(d.action == "rollback" for d in per_tick.decisions)
    assert ("sampled, as few as 1 in 10 kept" in lines[-1]) == (analytics.sample_interval == 10)
    if analytics.max_page_size == 60:
        assert history.queries == 4  # 99 minutes in ranges of 29 (under 60 rows of 2 versions)


@pytest.mark.anyio
async def test_without_the_settings_node_the_default_limits_apply() -> None:
    """Cloudflare does not answer the dataset's settings: the backtest says so and asks for at
    most a day and 10,000 rows a query, and every window is still measured."""
    policy = make_policy(POLICY)
    world = make_world(3)
    lines: list[str] = []
    async with serving(world) as http:
        history = CloudflareHistory(world.client(http), world.sim.account_id, report=lines.append)
        world.sim.cloudflare.inject(
            path="/client/v4/graphql", status=200, body=error_body("unknown field settings")
        )
        result = await backtest(history, policy, world, http, 2)
    assert "the dataset's limits are unknown (GraphQL error: unknown field settings" in lines[0]
    assert history.limits == Limits(source="defaults: the settings node did not say")
    assert (history.queries, history.failed) == (1, 0)
    assert all(v is not None for _, v in result.series["exceptions"]["canary"])


@pytest.mark.anyio
async def test_a_full_page_is_asked_again_in_halves() -> None:
    """An answer that fills the page (it may have been cut short) is never used: its range is
    asked again in two halves, and the windows come out as without it."""
    policy = make_policy(POLICY)
    world = make_world(3)
    times = ticks(
        ORIGIN + timedelta(minutes=20), ORIGIN + timedelta(hours=3), timedelta(seconds=30)
    )
    rules = [r for r in policy.rules if r.source == "cloudflare"]
    row = {
        "sum": {"requests": 1, "errors": 0},
        "avg": {"sampleInterval": 1},
        "dimensions": {"datetimeMinute": "2026-03-03T12:30:00Z", "scriptVersion": world.canary},
    }
    full = {"data": {"viewer": {"accounts": [{"workersInvocationsAdaptive": [row] * 100}]}}}
    lines: list[str] = []
    async with serving(world) as http:
        clean = CloudflareHistory(world.client(http), world.sim.account_id)
        await clean.load(SCRIPT, (world.canary, world.stable), rules, times)
        history = CloudflareHistory(world.client(http), world.sim.account_id, report=lines.append)
        history.limits = Limits(timedelta(days=1), 100)  # known: no settings query
        world.sim.cloudflare.inject(path="/client/v4/graphql", status=200, body=full)
        await history.load(SCRIPT, (world.canary, world.stable), rules, times)
        expected = await answers(clean, policy, world, times)
        got = await answers(history, policy, world, times)
    assert any("100 rows: a full page may have been cut short" in line for line in lines)
    assert history.failed == 0
    chunks = plan(*history.span(rules, times), Limits(timedelta(days=1), 100), 2)
    assert history.queries == len(chunks) + 2  # the full page, then its two halves again
    assert got == expected


@pytest.mark.anyio
async def test_a_range_cloudflare_refuses_leaves_its_windows_inconclusive() -> None:
    """Cloudflare refuses the older range (past the dataset's notOlderThan, HTTP 400): the
    windows it covers are inconclusive with its reason, the others are measured, the failure is
    reported, and the canary advances only on measured windows."""
    policy = make_policy(POLICY)
    limits = AnalyticsLimits(max_duration=timedelta(hours=1), not_older_than=timedelta(hours=2))
    world = make_world(2, analytics=limits)
    lines: list[str] = []
    async with serving(world) as http:
        history = CloudflareHistory(world.client(http), world.sim.account_id, report=lines.append)
        result = await backtest(history, policy, world, http, 2)
    assert history.failed >= 1
    assert f"{history.failed} failed: the windows they cover are inconclusive" in lines[-1]
    first = await history.fetch(policy.rules[0], world.target("canary"), result.start)
    assert first.value is None
    assert first.error is not None and "older than the dataset keeps" in first.error
    canary = result.series["exceptions"]["canary"]
    measured = next(t for t, value in canary if value is not None)
    assert measured > result.start + timedelta(minutes=30)
    advances = [d for d in result.decisions if d.action in ("set_traffic", "promote")]
    assert advances and all(d.t > measured for d in advances)


@pytest.mark.anyio
async def test_a_rate_limited_query_is_retried_after_cloudflares_wait() -> None:
    """Cloudflare's GraphQL budget spent (HTTP 429 with retry-after): the client waits it out
    on the budget's clock and asks again, and every window is measured."""
    hourly = AnalyticsLimits(max_duration=timedelta(hours=1))
    world = make_world(2, analytics=hourly, rate_limits=RateLimits(requests=None, graphql=2))
    clock = world.clock

    async def advance(seconds: float) -> None:
        """Waiting moves the simulator's clock (so its window refills)."""
        clock.advance(seconds)

    policy = make_policy(POLICY)
    async with serving(world) as http:
        client = CloudflareClient(
            http,
            base_url=world.sim.cloudflare_api_url,
            account_id=world.sim.account_id,
            token=world.sim.api_token,
            limiter=TokenBucket(600),
            graphql_limiter=TokenBucket(200, clock=lambda: clock().timestamp(), sleep=advance),
            sleep=advance,
        )
        history = CloudflareHistory(client, world.sim.account_id, delay=timedelta(minutes=3))
        result = await backtest(history, policy, world, http, 2)
    statuses = [r.status for r in world.sim.cloudflare.requests if r.path.endswith("/graphql")]
    assert 429 in statuses
    assert (history.queries, history.failed) == (3, 0)
    assert all(v is not None for _, v in result.series["exceptions"]["canary"])


def test_the_command_reports_what_it_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine backtest` on Cloudflare rules says on stderr what it fetches (range, queries,
    limits) and fetched (rows, queries), and prints the decisions."""
    world = make_world(3)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    start = ORIGIN + timedelta(minutes=20)
    argv = ["backtest", "--policy", str(policy), "--format", "jsonl"]
    argv += ["--from", start.isoformat(), "--to", (start + timedelta(hours=2)).isoformat()]
    argv += ["--canary", world.canary, "--stable", world.stable]
    with _running(world):
        monkeypatch.setenv("COALMINE_CLOUDFLARE_API_URL", world.sim.cloudflare_api_url)
        monkeypatch.setenv("COALMINE_CLOUDFLARE_ACCOUNT_ID", world.sim.account_id)
        monkeypatch.setenv("COALMINE_CLOUDFLARE_API_TOKEN", world.sim.api_token)
        code = main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "1 GraphQL query (at most 24h and 10000 rows each" in out.err
    assert "cloudflare: fetched " in out.err and "rows in 1 query" in out.err
    decisions = [json.loads(line) for line in out.out.splitlines()]
    assert any(d["action"] == "promote" for d in decisions)
    assert world.graphql_requests() == 2


@contextmanager
def _running(world: World) -> Iterator[None]:
    """The simulator serving from a thread of its own, for a command that runs its own loop."""
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(world.sim.running()),
    ):
        yield
