"""Compare rules in the live daemon: both versions fetched from Cloudflare's analytics."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour
from tests.e2e.harness import harness, served

pytestmark = pytest.mark.anyio

POLICY = """
version: 1
name: compare
scripts: [api]
analysis: {interval: 30s, warmup: 1m, inconclusive_page_after: 30m}
steps:
  - {weight: 10, hold: 10m}
  - {weight: 100}
rules:
  - name: exceptions_vs_stable
    source: cloudflare
    signal: errors
    compare: {max_ratio: 1.5, confidence: 0.99}
    on_breach: rollback
  - {name: exception_ratio, source: cloudflare, signal: error_ratio, window: 2m,
     min_samples: 50, above: 0.02, for: 2m, on_breach: page}
"""
BASE = Behaviour(exception_rate=0.01)


async def test_a_canary_worse_than_stable_is_rolled_back_with_its_interval(
    tmp_path: Path,
) -> None:
    """Canary throwing 10x as often as the stable: rolled back on the compare rule, with the
    ratio and its bounds in the decision and the page."""
    async with harness(
        tmp_path, policy=POLICY, canary=Behaviour(exception_rate=0.1), requests_per_minute=1200
    ) as h:
        h.sim.schedule_fault("api", h.stable, exception_rate=0.01)
        await h.run_until(lambda h: h.phase is RolloutPhase.ROLLED_BACK, timedelta(minutes=15))
        rollback = next(d for d in h.decisions if d.action == "rollback")
        assert rollback.rule == "exceptions_vs_stable"
        assert rollback.interval is not None and rollback.interval[0] >= 1.5
        assert "canary/stable rate ratio" in rollback.reason
        page = next(p for p in h.sim.pages if p.get("event_action") == "trigger")
        assert page["dedup_key"] == f"coalmine/api/{h.canary}/exceptions_vs_stable"
        details = page["payload"]["custom_details"]  # type: ignore[index]
        assert details["interval"][0] >= 1.5  # type: ignore[index]
        assert details["threshold"] == 1.5  # type: ignore[index]


async def test_the_admin_api_and_metrics_show_the_comparison(tmp_path: Path) -> None:
    """With auto-rollback off the breaching comparison stays up: the admin API shows its
    bounds and counts, /metrics its bounds."""
    async with harness(
        tmp_path,
        policy=POLICY,
        canary=Behaviour(exception_rate=0.1),
        requests_per_minute=1200,
        env={"COALMINE_AUTO_ROLLBACK": "false"},
    ) as h:
        h.sim.schedule_fault("api", h.stable, exception_rate=0.01)
        await h.run_until(lambda h: "hold" in h.actions(), timedelta(minutes=15))
        async with served(h) as client:
            rollout = (await client.get("/api/v1/rollouts/api")).json()
            metrics = (await client.get("/metrics")).text
        rule = rollout["rules"]["exceptions_vs_stable"]
        assert rule["breaching"] is True
        assert rule["interval"][0] >= 1.5
        assert rule["counts"]["canary_events"] > 0
        assert rule["counts"]["stable_samples"] > rule["counts"]["canary_samples"]
        bound = 'coalmine_rule_ratio_bound{bound="low",rule="exceptions_vs_stable",script="api"}'
        assert bound in metrics


async def test_a_shared_incident_trips_the_absolute_rule_but_not_the_comparison(
    tmp_path: Path,
) -> None:
    """Both versions throwing 10% together: the compare rule does not blame the canary; the
    absolute rule pages and says both versions are affected."""
    async with harness(
        tmp_path, policy=POLICY, canary=Behaviour(exception_rate=0.1), requests_per_minute=1200
    ) as h:
        h.sim.schedule_fault("api", h.stable, exception_rate=0.1)
        for _ in range(18):  # 9 minutes, inside the 10-minute hold
            await h.tick()
        assert "rollback" not in h.actions()
        track = h.loop.state.rules["exceptions_vs_stable"]
        assert not track.breaching
        assert track.evidence is not None and track.evidence.canary_events > 20
        page = next(d for d in h.decisions if d.action == "page")
        assert page.rule == "exception_ratio"
        assert "both versions are affected" in page.reason
