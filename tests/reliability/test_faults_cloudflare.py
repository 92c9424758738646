"""Cloudflare failing: 5xx, 429 storms, connection resets, truncated bodies, GraphQL errors in a 200.

Analytics faults leave the gate without data: the canary must hold. API faults leave coalmine
unable to read the live deployment: ticks are skipped, retries stay bounded. Faults on the
traffic change itself must neither lose the change nor repeat it.
"""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from coalmine.engine import RolloutPhase
from tests.e2e.harness import served
from tests.reliability.conftest import (
    CANARY,
    CLOUDFLARE_POLICY,
    SCRIPT,
    STABLE,
    assert_degraded,
    assert_delivered_once,
    assert_healthy,
    assert_held,
    assert_journal_complete,
    degraded,
    fault_harness,
    health,
    inconclusive_pages,
    traffic_posts,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]


def envelope_error(code: int, message: str) -> dict[str, Any]:
    """Cloudflare's error envelope."""
    return {"success": False, "errors": [{"code": code, "message": message}], "messages": []}


GRAPHQL_ERROR = {
    "data": None,
    "errors": [
        {
            "message": "internal server error, please retry",
            "path": ["viewer", "accounts", 0, "workersInvocationsAdaptive"],
            "extensions": {"code": "INTERNAL_SERVER_ERROR"},
        }
    ],
}

ANALYTICS_FAULTS: dict[str, dict[str, Any]] = {
    "http_502": {"status": 502, "body": "<html><h1>502 Bad Gateway</h1></html>"},
    "connection_reset": {"action": "drop"},
    "truncated_body": {"action": "truncate"},
    "graphql_error_in_200": {"status": 200, "body": GRAPHQL_ERROR},
}


@pytest.mark.parametrize("fault", ANALYTICS_FAULTS)
async def test_analytics_fault_holds_pages_then_carries_on(tmp_path: Path, fault: str) -> None:
    """GraphQL failing for 8 minutes (the hold ends after 2): held at 10%, a warning page,
    /health degraded; then the canary advances, the page resolves, every decision journaled."""
    async with fault_harness(tmp_path, policy=CLOUDFLARE_POLICY) as h, served(h) as client:
        await h.tick()
        assert_held(h, 10)
        h.sim.cloudflare.inject(
            method="POST", path="*/graphql", times=None, **ANALYTICS_FAULTS[fault]
        )
        await h.ticks(16, held_at=10, check=degraded(client, "cloudflare_analytics"))
        assert [p["payload"]["severity"] for p in inconclusive_pages(h)] == ["warning"]

        h.sim.cloudflare.faults.clear()
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=5))
        assert_healthy(await health(client))
        assert len(inconclusive_pages(h, "resolve")) == 1
        assert traffic_posts(h) == [200]
        assert_journal_complete(h)
        assert_delivered_once(h)


API_FAULTS: dict[str, dict[str, Any]] = {
    "http_503": {"status": 503, "body": envelope_error(10013, "service unavailable")},
    "connection_reset": {"action": "drop"},
    "truncated_body": {"action": "truncate"},
}


@pytest.mark.parametrize("fault", API_FAULTS)
async def test_api_outage_changes_nothing_then_carries_on(tmp_path: Path, fault: str) -> None:
    """Every Cloudflare call failing for 6 minutes: ticks are skipped (each after at most four
    attempts), nothing is decided or sent, /health degraded; then the rollout goes on."""
    async with fault_harness(tmp_path, policy=CLOUDFLARE_POLICY) as h, served(h) as client:
        await h.tick()
        assert_held(h, 10)
        began = h.clock()
        h.sim.cloudflare.inject(
            path="*", times=None, until=began + timedelta(minutes=6), **API_FAULTS[fault]
        )
        await h.ticks(10, held_at=10, check=degraded(client, "cloudflare"))
        during = [r for r in h.sim.cloudflare.requests if r.at > began]
        assert 10 <= len(during) <= 4 * 10  # every tick tried, none more than four times
        assert {r.path.rsplit("/", 1)[-1] for r in during} == {"deployments"}

        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=5))
        assert_healthy(await health(client))
        assert traffic_posts(h) == [200]
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_429_storm_is_waited_out_honouring_retry_after(tmp_path: Path) -> None:
    """Every call answered 429 (retry-after 60) for 5 minutes: no request inside a retry-after,
    nothing decided meanwhile, /health degraded; after the storm the rollout goes on."""
    async with fault_harness(tmp_path, policy=CLOUDFLARE_POLICY) as h, served(h) as client:
        await h.tick()
        storm_ends = h.clock() + timedelta(minutes=5)
        h.sim.cloudflare.inject(
            path="*",
            status=429,
            headers=[("retry-after", "60")],
            body=envelope_error(971, "Please wait and consider throttling your request speed"),
            times=None,
            until=storm_ends,
        )
        await h.tick()  # four attempts, a minute apart, all refused: the tick is skipped
        assert_held(h, 10)
        assert_degraded(await health(client), "cloudflare")
        await h.run_until(lambda h: h.clock() >= storm_ends, timedelta(minutes=6))
        assert_held(h, 10)

        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=6))
        assert_healthy(await health(client))
        requests = h.sim.cloudflare.requests
        refused = [r for r in requests if r.status == 429]
        assert 1 <= len(refused) <= 6  # one a minute at most, over five minutes
        for refusal, following in pairwise(requests):
            if refusal.status == 429:
                assert following.at - refusal.at >= timedelta(seconds=60)
        assert traffic_posts(h) == [200]
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_connection_reset_on_a_traffic_change_applies_it_once(tmp_path: Path) -> None:
    """The POST moving the canary to 50% is cut off unanswered: coalmine does not repeat it
    blind; the next tick reads the live split back, still 10%, and applies the change once."""
    async with fault_harness(tmp_path, policy=CLOUDFLARE_POLICY) as h, served(h) as client:
        h.sim.cloudflare.inject(method="POST", path="*/deployments", action="drop", times=1)
        await h.run_until(lambda h: "set_traffic" in h.actions(), timedelta(minutes=10))
        assert traffic_posts(h) == [None]
        assert len(h.db.open_intents()) == 1
        assert_degraded(await health(client), "cloudflare")

        await h.run_until(lambda h: h.db.open_intents() == [], timedelta(minutes=2))
        assert traffic_posts(h) == [None, 200]
        assert h.sim.cloudflare.current(SCRIPT).split == {CANARY: 50, STABLE: 50}
        assert_healthy(await health(client))
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_truncated_answer_to_a_traffic_change_is_not_repeated(tmp_path: Path) -> None:
    """Cloudflare applies the 50% POST but its answer is cut short: coalmine does not repeat
    the POST; reading back finds the split live, recorded once as "already live"."""
    async with fault_harness(tmp_path, policy=CLOUDFLARE_POLICY) as h, served(h) as client:
        h.sim.cloudflare.inject(method="POST", path="*/deployments", action="truncate", times=1)
        await h.run_until(lambda h: "set_traffic" in h.actions(), timedelta(minutes=10))
        assert traffic_posts(h) == [200]
        assert_degraded(await health(client), "cloudflare")

        await h.run_until(lambda h: h.db.open_intents() == [], timedelta(minutes=2))
        assert traffic_posts(h) == [200]
        applied = [e.body["outcome"] for e in h.db.journal() if e.action == "applied"]
        assert applied == ["already live"]
        await h.run_until(lambda h: h.phase is RolloutPhase.IDLE, timedelta(minutes=10))
        assert traffic_posts(h) == [200, 200]
        assert_healthy(await health(client))
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_writes_refused_for_minutes_apply_the_change_once_and_page_meanwhile(
    tmp_path: Path,
) -> None:
    """Every deployment POST answered 503 for 6 minutes from the moment the 50% step is due:
    the live split stays at 10%, nothing advances past the stuck change, a critical page says
    so; once writes work, the change is applied once, its hold counts from then, the page
    resolves."""
    async with fault_harness(tmp_path, policy=CLOUDFLARE_POLICY) as h, served(h) as client:
        refusal = envelope_error(10013, "service unavailable")
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=503, body=refusal)
        await h.run_until(lambda h: "set_traffic" in h.actions(), timedelta(minutes=10))
        ends = h.clock() + timedelta(minutes=6)
        h.sim.cloudflare.inject(
            method="POST", path="*/deployments", status=503, body=refusal, times=None, until=ends
        )
        stuck_key = f"coalmine/{SCRIPT}/actuator"
        while h.clock() < ends - timedelta(seconds=30):
            await h.tick()
            assert h.sim.cloudflare.current(SCRIPT).split == {CANARY: 10, STABLE: 90}
            assert h.actions().count("set_traffic") == 1
            assert "promote" not in h.actions()
            assert_degraded(await health(client), "cloudflare")
        assert [p["event_action"] for p in h.sim.pages if p["dedup_key"] == stuck_key] == [
            "trigger"
        ]

        await h.run_until(lambda h: h.db.open_intents() == [], timedelta(minutes=2))
        took_effect = h.clock()
        assert traffic_posts(h).count(200) == 1
        assert h.sim.cloudflare.current(SCRIPT).split == {CANARY: 50, STABLE: 50}
        assert_healthy(await health(client))
        await h.run_until(lambda h: "promote" in h.actions(), timedelta(minutes=10))
        promote = next(d for d in h.decisions if d.action == "promote")
        assert promote.t - took_effect >= timedelta(minutes=2)  # the 50% step's hold, in full
        assert [p["event_action"] for p in h.sim.pages if p["dedup_key"] == stuck_key] == [
            "trigger",
            "resolve",
        ]
        assert traffic_posts(h).count(200) == 2
        assert_journal_complete(h)
        assert_delivered_once(h)
