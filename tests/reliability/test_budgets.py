"""Two Cloudflare budgets: a GraphQL 429 storm must not delay a rollback on the REST API."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from pathlib import Path

import pytest

from coalmine.engine import RolloutPhase
from tests.e2e.harness import served
from tests.reliability.conftest import (
    SCRIPT,
    STABLE,
    assert_degraded,
    assert_held,
    fault_harness,
    health,
    traffic_posts,
    vector,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

# The rollback gate reads Prometheus; a Cloudflare rule makes every tick query GraphQL too.
POLICY = """
version: 1
name: budgets
scripts: [api]
analysis: {interval: 30s, warmup: 0s, inconclusive_page_after: 30m}
steps: [{weight: 10, hold: 30m}, {weight: 100}]
rules:
  - name: error_rate
    source: prometheus
    query: sum(rate(errors_total{script="$script",version="$version"}[$window]))
    window: 1m
    above: 0.01
    for: 1m
    on_breach: rollback
  - {name: cpu, source: cloudflare, signal: cpu_time_p99, window: 2m, above: 50,
     on_breach: hold}
"""


async def test_graphql_429_storm_does_not_delay_a_due_rollback(tmp_path: Path) -> None:
    """Every GraphQL query answered 429 (retry-after 300) for 20 minutes; the canary's error
    rate breaches: the rollback is decided one `for` after the breach is seen and its POST
    reaches Cloudflare at that same instant, not after the GraphQL block; GraphQL is not
    asked again inside its retry-after."""
    async with (
        fault_harness(tmp_path, policy=POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.tick()
        assert_held(h, 10)
        storm = h.sim.cloudflare.inject(
            method="POST",
            path="*/graphql",
            status=429,
            headers=[("retry-after", "300")],
            body={"data": None, "errors": [{"message": "rate limited"}]},
            times=None,
            until=h.clock() + timedelta(minutes=20),
        )
        await h.ticks(3, held_at=10)
        assert_degraded(await health(client), "cloudflare_analytics")
        metrics = (await client.get("/metrics")).text
        assert 'coalmine_cloudflare_budget_tokens{api="graphql"} 0.0' in metrics
        rest = next(
            line
            for line in metrics.splitlines()
            if line.startswith('coalmine_cloudflare_budget_tokens{api="rest"}')
        )
        assert float(rest.split()[-1]) > 1  # REST spends from its own budget

        assert h.prometheus is not None
        h.prometheus.inject(path="/api/v1/query", status=200, body=vector(0, "0.05"), times=None)
        breach_seen = h.clock() + timedelta(seconds=30)
        await h.run_until(lambda h: "rollback" in h.actions(), timedelta(minutes=3))
        rollback = next(d for d in h.decisions if d.action == "rollback")
        assert rollback.t - breach_seen <= timedelta(minutes=1, seconds=30)
        posts = [
            r
            for r in h.sim.cloudflare.requests
            if r.method == "POST" and r.path.endswith("/deployments")
        ]
        assert [p.status for p in posts] == [200]
        assert posts[0].at == rollback.t  # sent in the tick that decided it: no wait at all
        assert h.phase is RolloutPhase.ROLLED_BACK
        assert h.sim.cloudflare.current(SCRIPT).split == {STABLE: 100}
        assert traffic_posts(h) == [200]

        graphql = [r for r in h.sim.cloudflare.requests if r.path.endswith("/graphql")]
        refused = [r for r in graphql if r.status == 429]
        assert refused, "the storm never hit"
        for first, later in pairwise(refused):
            assert later.at - first.at >= timedelta(seconds=300)
        assert storm.times is None
