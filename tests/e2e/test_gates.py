"""Webhook rules and the incident freeze in the live daemon, against the simulator's webhook
receiver and PagerDuty REST API (DESIGN.md "Webhook rules", "Incident freeze")."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.app import prepare
from coalmine.engine import RolloutPhase
from coalmine.errors import ConfigError
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, Simulator
from tests.e2e.harness import Harness, harness, served

pytestmark = pytest.mark.anyio

P = RolloutPhase
POLICY = """
version: 1
name: gates
scripts: [api]
analysis: {{interval: 30s, warmup: 30s, inconclusive_page_after: 30m}}
steps:
  - {{weight: 10, hold: 2m}}
  - {{weight: 100}}
post_promotion: {{watch: 5m}}
{extra}
rules:
  - {{name: exceptions, source: cloudflare, signal: error_ratio, window: 2m, min_samples: 20,
     above: 0.05, on_breach: rollback}}
{rules}
"""
SERVICE = "PSIM001"


def policy(when: str | None = None, more: str = "", extra: str = "") -> Callable[[Simulator], str]:
    """The gates policy, with a webhook rule `smoke` on the simulator's receiver when ``when``
    is given, and extra top-level fields."""

    def text(sim: Simulator) -> str:
        rules = ""
        if when is not None:
            url = sim.webhooks.url("/smoke")
            rules = f"  - {{name: smoke, source: webhook, url: '{url}', when: {when}{more}}}"
        return POLICY.format(rules=rules, extra=extra)

    return text


def holds(h: Harness) -> list[str]:
    """The reasons of every hold so far."""
    return [d.reason for d in h.decisions if d.action == "hold"]


async def test_a_passing_smoke_test_promotes_with_the_rollouts_context(tmp_path: Path) -> None:
    """before_advance: not called during the hold; then called once per tick (not once per
    version) with {script, canary, stable, step, weight, phase, when}; its 200 promotes."""
    async with harness(tmp_path, policy=policy("before_advance")) as h:
        await h.run_until(lambda h: h.phase is P.PROMOTED, timedelta(minutes=6))
        calls = h.sim.webhooks.calls("/smoke")
        assert calls == [
            {
                "script": "api",
                "canary": h.canary,
                "stable": h.stable,
                "step": 1,
                "weight": 10,
                "phase": "canary",
                "when": "before_advance",
            }
        ]
        promote = next(d for d in h.decisions if d.action == "promote")
        start = next(d for d in h.decisions if d.action == "start")
        assert promote.t - start.t >= timedelta(minutes=2)


async def test_a_failing_smoke_test_rolls_back(tmp_path: Path) -> None:
    """A 503 from a before_advance smoke test with on_breach rollback rolls the canary back and
    pages critical, its value the status."""
    async with harness(tmp_path, policy=policy("before_advance", ", on_breach: rollback")) as h:
        h.sim.webhooks.answer("/smoke", 503)
        await h.run_until(lambda h: h.phase is P.ROLLED_BACK, timedelta(minutes=6))
        rollback = next(d for d in h.decisions if d.action == "rollback")
        assert (rollback.rule, rollback.value) == ("smoke", 503)
        assert h.sim.deployment_posts("api")  # traffic really went back


async def test_a_smoke_test_that_times_out_holds_and_is_retried(tmp_path: Path) -> None:
    """A call that outlives the rule's timeout is inconclusive: the canary holds at 10% and the
    call is made again next tick; once it answers, the canary is promoted."""
    async with harness(tmp_path, policy=policy("before_advance", ", timeout: 1s")) as h:
        h.sim.webhooks.inject(method="POST", path="/smoke", action="hang", times=1)
        await h.run_until(lambda h: len(h.sim.webhooks.requests) >= 1, timedelta(minutes=6))
        track = h.loop.state.rules["smoke"]
        assert track.status.value == "inconclusive"
        assert track.detail == "source error: timeout after 1s"
        assert h.phase is P.CANARY
        h.sim.webhooks.faults.clear()
        await h.run_until(lambda h: h.phase is P.PROMOTED, timedelta(minutes=2))
        assert len(h.sim.webhooks.requests) == 2


async def test_a_failing_after_rollback_smoke_test_pages_critical(tmp_path: Path) -> None:
    """after_rollback: called after the canary is rolled back; a 500 pages critical under the
    rule's key; a later 200 resolves it."""
    bad = Behaviour(exception_rate=0.5)
    async with harness(tmp_path, policy=policy("after_rollback"), canary=bad) as h:
        h.sim.webhooks.answer("/smoke", 500)
        await h.run_until(lambda h: h.phase is P.ROLLED_BACK, timedelta(minutes=6))
        assert h.sim.webhooks.calls("/smoke") == []
        key = f"coalmine/api/{h.canary}/smoke"
        await h.run_until(lambda h: key in h.sim.pagerduty.open_alerts(), timedelta(minutes=3))
        assert h.sim.pagerduty.open_alerts()[key].severity == "critical"
        assert h.sim.webhooks.calls("/smoke")[0]["phase"] == "rolled_back"
        h.sim.webhooks.answer("/smoke", 200)
        await h.run_until(lambda h: key not in h.sim.pagerduty.open_alerts(), timedelta(minutes=3))


async def test_an_open_incident_freezes_advancing_until_it_is_resolved(tmp_path: Path) -> None:
    """A triggered incident on a frozen service: the canary holds past its hold, the hold (and
    the rollout's ``waiting_for``) names the incident; resolved, the canary is promoted."""
    freeze = f"freeze: {{pagerduty_services: [{SERVICE}]}}"
    async with harness(tmp_path, policy=policy(extra=freeze)) as h:
        incident = h.sim.pagerduty_api.open_incident(SERVICE, "checkout database down")
        await h.run_until(lambda h: bool(holds(h)), timedelta(minutes=4))
        assert "incident #1 'checkout database down' (triggered)" in holds(h)[-1]
        await h.tick(120)
        assert h.phase is P.CANARY
        waiting = h.loop.describe()["waiting_for"]
        assert any("'checkout database down'" in why for why in waiting), waiting
        request = h.sim.pagerduty_api.requests[-1]
        assert request.query["service_ids[]"] == [SERVICE]
        assert request.query["statuses[]"] == ["triggered", "acknowledged"]
        assert request.headers["authorization"] == "Token ***"
        h.sim.pagerduty_api.resolve(incident)
        await h.run_until(lambda h: h.phase is P.PROMOTED, timedelta(minutes=2))


async def test_an_unreachable_pagerduty_holds_and_health_says_so(tmp_path: Path) -> None:
    """PagerDuty's API down: the freeze is unknown, so the canary holds (never advanced
    unchecked), the hold says why, and /health shows the PagerDuty API failing."""
    freeze = f"freeze: {{pagerduty_services: [{SERVICE}]}}"
    async with harness(tmp_path, policy=policy(extra=freeze)) as h:
        await h.sim.pagerduty_api.go_down()
        await h.run_until(lambda h: bool(holds(h)), timedelta(minutes=4))
        assert "incident freeze unknown: PagerDuty could not be reached" in holds(h)[-1]
        assert h.phase is P.CANARY
        async with served(h) as client:
            health = (await client.get("/health")).json()
        assert health["status"] == "degraded"
        assert health["checks"]["pagerduty_api"]["status"] == "failing"
        await h.sim.pagerduty_api.go_up()
        await h.run_until(lambda h: h.phase is P.PROMOTED, timedelta(minutes=2))


async def test_a_freeze_without_a_token_is_a_configuration_error(tmp_path: Path) -> None:
    """A policy with a freeze and no COALMINE_PAGERDUTY_API_TOKEN: coalmine refuses to start,
    naming the variable."""
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(rules="", extra=f"freeze: {{pagerduty_services: [{SERVICE}]}}"))
    settings = load_settings(
        {
            "COALMINE_POLICIES": str(path),
            "COALMINE_CLOUDFLARE_ACCOUNT_ID": "a" * 32,
            "COALMINE_CLOUDFLARE_API_TOKEN": "t" * 40,
        }
    )
    with pytest.raises(ConfigError, match="COALMINE_PAGERDUTY_API_TOKEN"):
        prepare(settings)
