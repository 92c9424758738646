"""``coalmine backtest`` of Cloudflare rules: GraphQL queries and wall time for a long range.

Run from the repository root::

    .venv/bin/python bench/backtest.py                      # 24 h at 30 s, the range path
    .venv/bin/python bench/backtest.py --path per-tick      # one query per tick (the old way)
    .venv/bin/python bench/backtest.py --hours 2
    .venv/bin/python bench/backtest.py --path per-tick --unthrottled   # count its queries only

The simulator serves on loopback with Cloudflare's own GraphQL limit (300 queries / 5 min,
counted on a clock that runs with wall time once the history is made); coalmine's client has
the default budgets (600 REST and ``COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT`` 200 GraphQL per
5 min), as ``coalmine backtest`` builds it. The history: one script at 1,200 requests a minute,
a canary at 10% from the start. The policy: four Cloudflare rules (ratio, quantile, rate and a
compare rule). ``--unthrottled`` lifts both budgets (coalmine's and the simulator's), to count
the queries of a run that would take hours at the default budget. Its last line (one line)::

    backtest: path=P hours=H interval_s=30 budget=B ticks=T graphql_queries=Q rows=R
        wall_s=W verdict=V decisions=N/DIGEST

(the digest of the decisions' JSON: the same on both paths).

A benchmark, not a test: it prints and exits 0. docs/benchmarks.md ("Backtest") has results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from datetime import datetime, timedelta

import anyio
import httpx

from coalmine.cli.backtest import run_backtest
from coalmine.cli.replay import verdict
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.engine import Deployment
from coalmine.policy import Policy
from coalmine.policyfile import parse_policy
from coalmine.settings import Settings
from coalmine.simulator import Behaviour, RateLimits, Simulator
from coalmine.simulator.traffic import DEFAULT_START
from coalmine.sources import Source
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.cloudflare_history import CloudflareHistory
from machine import code_version, cpu_model, load

POLICY = """
version: 1
name: bench-backtest
scripts: [api]
analysis: {interval: 30s, warmup: 1m, inconclusive_page_after: 30m}
steps:
  - {weight: 10, hold: 1h}
  - {weight: 50, hold: 1h}
  - {weight: 100}
post_promotion: {watch: 30m}
rules:
  - {name: exceptions, source: cloudflare, signal: error_ratio, window: 2m, min_samples: 50,
     above: 0.02, for: 2m, on_breach: rollback}
  - {name: cpu, source: cloudflare, signal: cpu_time_p99, window: 5m, min_samples: 50,
     above: 50, on_breach: hold}
  - {name: thrown, source: cloudflare, signal: errors_per_minute, window: 1m, above: 50,
     on_breach: page}
  - {name: exceptions_vs_stable, source: cloudflare, signal: errors,
     compare: {max_ratio: 1.5, confidence: 0.99}, on_breach: rollback}
"""


class BenchClock:
    """Virtual while the history is made, then running with wall time (so that the
    simulator's GraphQL limit, 300 a 5-minute window, refills as Cloudflare's does)."""

    def __init__(self, start: datetime) -> None:
        self._now = start
        self._since: float | None = None

    def advance(self, delta: timedelta) -> None:
        """Move the virtual time (before :meth:`run`)."""
        self._now += delta

    def run(self) -> None:
        """From now on, time passes as on the wall."""
        self._since = time.monotonic()

    def __call__(self) -> datetime:
        if self._since is None:
            return self._now
        return self._now + timedelta(seconds=time.monotonic() - self._since)


async def bench(path: str, hours: float, unthrottled: bool) -> None:
    """Make the history, run the backtest, print the figures."""
    clock = BenchClock(DEFAULT_START)
    lifted = RateLimits(requests=None, graphql=None) if unthrottled else None
    sim = Simulator(clock=clock, seed=11, rate_limits=lifted)
    stable = sim.add_script("api", requests_per_minute=1200)
    canary = sim.upload_version("api", Behaviour(exception_rate=0.001))
    clock.advance(timedelta(minutes=10))
    sim.start_canary("api", canary, percent=10)
    start = DEFAULT_START + timedelta(minutes=20)
    end = start + timedelta(hours=hours)
    clock.advance(end - DEFAULT_START + timedelta(minutes=10))
    clock.run()
    policy: Policy = parse_policy(POLICY, "<bench>")
    settings = Settings()
    rest, graphql = settings.cloudflare_rate_limit, settings.cloudflare_graphql_rate_limit
    if unthrottled:
        rest = graphql = 1_000_000
    async with sim.running(), httpx.AsyncClient(timeout=60.0) as http:
        cloudflare = CloudflareClient(
            http,
            base_url=sim.cloudflare_api_url,
            account_id=sim.account_id,
            token=sim.api_token,
            limiter=TokenBucket(rest),
            graphql_limiter=TokenBucket(graphql),
        )
        windows = [r.window for r in policy.rules if r.source == "cloudflare"]
        source: Source
        if path == "per-tick":
            source = CloudflareAnalytics(cloudflare, sim.account_id, longest_window=max(windows))
        else:
            source = CloudflareHistory(cloudflare, sim.account_id)
        began = time.perf_counter()
        result = await run_backtest(
            policy,
            "api",
            start,
            end,
            Deployment(stable, canary, 10),
            http=http,
            prometheus_url=None,
            sources={"cloudflare": source},
        )
        wall = time.perf_counter() - began
    asked = [r for r in sim.cloudflare.requests if r.path.endswith("/graphql")]
    answered = sum(1 for r in asked if r.status == 200)
    rows = getattr(source, "rows", "-")
    ticks = int((end - start) / policy.analysis.interval) + 1
    code = {0: "promoted", 1: "rolled_back"}.get(verdict(result.decisions), "none")
    text = json.dumps([d.to_dict() for d in result.decisions], sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    print(f"machine: {cpu_model()}; code {code_version()}; load {load()}")
    print(f"graphql requests: {len(asked)} ({answered} answered 200)")
    print(
        f"backtest: path={path} hours={hours:g} interval_s=30 budget={graphql}/5min ticks={ticks} "
        f"graphql_queries={len(asked)} rows={rows} wall_s={wall:.1f} verdict={code} "
        f"decisions={len(result.decisions)}/{digest}"
    )


def main() -> None:
    """Parse the flags and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=("range", "per-tick"), default="range")
    parser.add_argument("--hours", type=float, default=24.0)
    parser.add_argument("--unthrottled", action="store_true", help="lift every GraphQL budget")
    args = parser.parse_args()
    anyio.run(bench, args.path, args.hours, args.unthrottled)


if __name__ == "__main__":
    main()
