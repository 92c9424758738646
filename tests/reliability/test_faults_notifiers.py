"""PagerDuty and Slack away for minutes: decisions do not wait, and nothing is lost or repeated."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour
from tests.e2e.harness import served
from tests.reliability.conftest import (
    CANARY,
    CLOUDFLARE_POLICY,
    SCRIPT,
    STABLE,
    FaultHarness,
    assert_degraded,
    assert_delivered_once,
    assert_healthy,
    assert_journal_complete,
    fault_harness,
    health,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

OUTAGE = timedelta(minutes=15)
Step = Callable[[FaultHarness], Awaitable[None]]


async def pagerduty_down(h: FaultHarness) -> None:
    """Connections to PagerDuty are refused."""
    await h.sim.pagerduty.go_down()


async def pagerduty_up(h: FaultHarness) -> None:
    """PagerDuty listens again."""
    await h.sim.pagerduty.go_up()


async def pagerduty_throttles(h: FaultHarness) -> None:
    """PagerDuty refuses every event with 429 (it documents no retry-after)."""
    body = {"status": "throttle event", "message": "Requests are arriving too quickly."}
    h.sim.pagerduty.inject(path="/v2/*", status=429, body=body, times=None)


async def slack_down(h: FaultHarness) -> None:
    """Connections to Slack are refused."""
    await h.sim.slack.go_down()


async def slack_up(h: FaultHarness) -> None:
    """Slack listens again."""
    await h.sim.slack.go_up()


async def slack_throttles(h: FaultHarness) -> None:
    """Slack refuses every message with 429 and a retry-after."""
    headers = [("content-type", "text/plain"), ("retry-after", "30")]
    h.sim.slack.inject(status=429, body="rate_limited", headers=headers, times=None)


async def both_down(h: FaultHarness) -> None:
    """PagerDuty and Slack both refuse connections."""
    await pagerduty_down(h)
    await slack_down(h)


async def both_up(h: FaultHarness) -> None:
    """Both listen again."""
    await pagerduty_up(h)
    await slack_up(h)


async def clear_faults(h: FaultHarness) -> None:
    """Receivers answer normally again."""
    h.sim.pagerduty.faults.clear()
    h.sim.slack.faults.clear()


# outage -> (start it, end it, the /health checks it fails)
OUTAGES: dict[str, tuple[Step, Step, tuple[str, ...]]] = {
    "pagerduty_down": (pagerduty_down, pagerduty_up, ("pagerduty", "pagerduty_change")),
    "pagerduty_429": (pagerduty_throttles, clear_faults, ("pagerduty", "pagerduty_change")),
    "slack_down": (slack_down, slack_up, ("slack",)),
    "slack_429": (slack_throttles, clear_faults, ("slack",)),
    "pagerduty_and_slack_down": (both_down, both_up, ("pagerduty", "pagerduty_change", "slack")),
}


@pytest.mark.parametrize("outage", OUTAGES)
async def test_receiver_outage_delays_no_rollback_and_delivers_everything_once(
    tmp_path: Path, outage: str
) -> None:
    """A receiver away for 15 minutes while analytics fail for 6 (an inconclusive page, then
    its resolve) and then a faulty canary trips: the rollback is not delayed, /health is
    degraded; once the receiver is back, every page, change event and message arrives once,
    each resolve after its trigger."""
    start, end, checks = OUTAGES[outage]
    async with (
        fault_harness(
            tmp_path, policy=CLOUDFLARE_POLICY, canary=Behaviour(exception_rate=0.3)
        ) as h,
        served(h) as client,
    ):
        await start(h)
        back_at = h.clock() + OUTAGE
        h.sim.cloudflare.inject(
            method="POST",
            path="*/graphql",
            status=503,
            times=None,
            until=h.clock() + timedelta(minutes=6),
        )
        await h.run_until(lambda h: h.phase is RolloutPhase.ROLLED_BACK, timedelta(minutes=10))
        assert h.sim.cloudflare.current(SCRIPT).split == {STABLE: 100}
        await h.run_until(lambda h: h.clock() >= back_at, OUTAGE)
        during = await health(client)
        for check in checks:
            assert_degraded(during, check)
        waiting = h.db.backlog()
        assert waiting > 0
        assert during["outbox_backlog"] == waiting
        if "pagerduty" in checks:
            assert h.sim.pages == [] and h.sim.pagerduty.changes == []
        if "slack" in checks:
            assert h.sim.slack_messages == []

        await end(h)
        await h.run_until(lambda h: h.db.backlog() == 0, timedelta(minutes=10))
        assert_healthy(await health(client))
        assert_delivered_once(h)
        assert_journal_complete(h)
        rule_key = f"coalmine/{SCRIPT}/{CANARY}/exceptions"
        # order is kept per dedup key (a resolve never overtakes its trigger), not across keys
        triggers = [p for p in h.sim.pagerduty.events if p["event_action"] == "trigger"]
        assert sorted((p["dedup_key"], p["payload"]["severity"]) for p in triggers) == [
            (rule_key, "critical"),
            (f"{rule_key}/inconclusive", "warning"),
        ]
        alerts = {
            a.dedup_key: [e["event_action"] for e in a.events] for a in h.sim.pagerduty.alerts
        }
        assert alerts == {f"{rule_key}/inconclusive": ["trigger", "resolve"], rule_key: ["trigger"]}
