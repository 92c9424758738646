"""The daemon end to end: the simulator's Cloudflare, analytics, PagerDuty, Slack and Grafana."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour
from tests.e2e.harness import Harness, harness

pytestmark = pytest.mark.anyio
P = RolloutPhase


def promoted_or_done(h: Harness) -> bool:
    """The rollout has completed (idle again with the canary stable)."""
    return h.phase is P.IDLE and h.loop.state.stable == h.canary


async def test_healthy_canary_is_promoted_with_exact_deployment_calls(tmp_path: Path) -> None:
    """A healthy canary goes 10 -> 50 -> 100 through exactly these deployment POSTs."""
    async with harness(tmp_path) as h:
        await h.run_until(promoted_or_done, timedelta(hours=1))
        posts = h.sim.deployment_posts("api")
        assert posts == [
            {
                "strategy": "percentage",
                "versions": [
                    {"version_id": h.canary, "percentage": 50},
                    {"version_id": h.stable, "percentage": 50},
                ],
                "annotations": {"workers/message": "coalmine: canary to 50%"},
            },
            {
                "strategy": "percentage",
                "versions": [{"version_id": h.canary, "percentage": 100}],
                "annotations": {"workers/message": "coalmine: promote to 100%"},
            },
        ]
        assert h.actions() == ["start", "set_traffic", "promote", "complete"]
        assert h.daemon.store.verify_journal().ok
        assert h.daemon.store.backlog() == 0
        assert [a["tags"] for a in h.sim.annotations] == [["coalmine", "api", "promoted"]]


async def test_faulty_canary_is_rolled_back_within_for_plus_one_interval(tmp_path: Path) -> None:
    """Exceptions at 20% from the 50% step: rolled back within `for` + one interval of showing."""
    async with harness(tmp_path) as h:
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=20))
        fault_at = h.clock()
        h.sim.schedule_fault("api", h.canary, start=fault_at, exception_rate=0.2)
        await h.run_until(lambda h: h.phase is P.ROLLED_BACK, timedelta(minutes=15))
        rollback = next(d for d in h.decisions if d.action == "rollback")
        posts = h.sim.deployment_posts("api")
        assert posts[-1]["versions"] == [{"version_id": h.stable, "percentage": 100}]  # type: ignore[index]
        # the fault shows in a closed analytics window after its minute closes plus the data delay
        shows = fault_at.replace(second=0) + timedelta(minutes=1) + timedelta(minutes=3)
        assert rollback.t - shows <= timedelta(minutes=2) + timedelta(seconds=30) + timedelta(
            minutes=1
        )
        pages = [p for p in h.sim.pages if p.get("event_action") == "trigger"]
        assert pages and pages[0]["payload"]["severity"] == "critical"  # type: ignore[index]
        assert pages[0]["dedup_key"] == f"coalmine/api/{h.canary}/exceptions"


async def test_auto_rollback_off_pages_and_holds(tmp_path: Path) -> None:
    """COALMINE_AUTO_ROLLBACK=false: a tripped rollback rule pages critical, and no rollback call."""
    async with harness(
        tmp_path, env={"COALMINE_AUTO_ROLLBACK": "false"}, canary=Behaviour(exception_rate=0.3)
    ) as h:
        await h.run_until(
            lambda h: any(d.action == "page" for d in h.decisions), timedelta(minutes=20)
        )
        for _ in range(10):
            await h.tick()
        assert "rollback" not in h.actions()
        assert h.sim.deployment_posts("api") == []  # the split was made by "wrangler", not coalmine
        assert h.phase is P.CANARY


async def test_dry_run_never_writes(tmp_path: Path) -> None:
    """COALMINE_DRY_RUN=true: decisions are made and journaled; Cloudflare gets no write."""
    async with harness(tmp_path, env={"COALMINE_DRY_RUN": "true"}) as h:
        await h.run_until(lambda h: "promote" in h.actions(), timedelta(hours=1))
        assert h.sim.deployment_posts("api") == []
        assert all(d.dry_run for d in h.decisions if d.action in ("set_traffic", "promote"))
        assert h.daemon.store.open_intents() == []


async def test_manual_change_makes_coalmine_stand_down(tmp_path: Path) -> None:
    """Someone moves the split by hand: coalmine warns once and stops changing traffic."""
    async with harness(tmp_path) as h:
        await h.tick()
        h.sim.deploy_by_hand("api", {h.canary: 30, h.stable: 70})
        await h.tick()
        assert h.phase is P.STOOD_DOWN
        posts_before = len(h.sim.deployment_posts("api"))
        for _ in range(30):
            await h.tick()
        assert len(h.sim.deployment_posts("api")) == posts_before
        assert h.actions().count("warn") == 1
        assert any("drift" in str(m.get("text")) for m in h.sim.slack_messages)


async def test_rollback_after_429_is_applied_after_retry_after(tmp_path: Path) -> None:
    """A 429 on the rollback POST: the call waits retry-after and goes through once."""
    async with harness(tmp_path, canary=Behaviour(exception_rate=0.3)) as h:
        h.sim.cloudflare.inject(
            method="POST",
            path="*/deployments",
            status=429,
            headers=[("retry-after", "20")],
            times=1,
        )
        await h.run_until(lambda h: h.phase is P.ROLLED_BACK, timedelta(minutes=20))
        assert h.daemon.store.open_intents() == []
        posts = h.sim.deployment_posts("api")
        assert posts[-1]["versions"] == [{"version_id": h.stable, "percentage": 100}]  # type: ignore[index]
        statuses = [
            r.status
            for r in h.sim.cloudflare.requests
            if r.method == "POST" and r.path.endswith("/deployments")
        ]
        assert statuses[-2:] == [429, 200]


async def test_intent_left_open_by_a_crash_is_applied_once_on_restart(tmp_path: Path) -> None:
    """Cloudflare refuses the 50% call until the daemon stops; a new daemon applies it once."""
    async with harness(tmp_path) as h:
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=503, times=None)
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=20))
        assert len(h.daemon.store.open_intents()) == 1  # decided and recorded, not applied
        h.sim.cloudflare.faults.clear()
        # "restart": a second daemon on the same state database reconciles before anything else
        from coalmine.app import open_daemon, prepare

        settings = h.daemon.settings
        async with open_daemon(settings, prepare(settings), clock=h.clock) as again:
            outcomes = await again.shared.actuator.reconcile("api")
            assert [type(o).__name__ for _, o in outcomes] == ["LiveDeployment"]
            assert again.loops["api"].state.canary_percent == 50
            assert again.store.open_intents() == []
        ok_posts = [
            r
            for r in h.sim.cloudflare.requests
            if r.method == "POST" and r.path.endswith("/deployments") and r.status == 200
        ]
        assert len(ok_posts) == 1
        assert h.daemon.store.verify_journal().ok


async def test_intent_already_live_after_a_crash_is_not_repeated(tmp_path: Path) -> None:
    """An intent whose change is already live (crash after the call) is recorded, not re-sent."""
    async with harness(tmp_path) as h:
        await h.tick()
        store = h.daemon.store
        intent_id = store.begin_intent(
            "api",
            "set_traffic",
            {"versions": [[h.canary, 10], [h.stable, 90]], "message": "m"},
            h.clock(),
        )
        (outcome,) = await h.daemon.shared.actuator.reconcile("api")
        assert outcome[0].id == intent_id
        assert h.sim.deployment_posts("api") == []
        applied = [e for e in store.journal() if e.action == "applied"]
        assert applied[-1].body["outcome"] == "already live"


async def test_source_outage_holds_and_pages_then_carries_on(tmp_path: Path) -> None:
    """Analytics down: inconclusive, the rollout holds and pages, never promotes; back: it goes on."""
    async with harness(tmp_path) as h:
        h.sim.cloudflare.inject(method="POST", path="*/graphql", status=503, times=None)
        for _ in range(40):  # 20 minutes
            await h.tick()
        assert h.loop.state.canary_percent == 10
        assert not {"set_traffic", "promote", "rollback"} & set(h.actions())
        warnings = [p for p in h.sim.pages if p.get("event_action") == "trigger"]
        assert warnings and all(p["payload"]["severity"] == "warning" for p in warnings)  # type: ignore[index]
        assert h.daemon.health.status == "degraded"
        h.sim.cloudflare.faults.clear()
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=20))
        resolves = [p for p in h.sim.pages if p.get("event_action") == "resolve"]
        assert {r["dedup_key"] for r in resolves} == {p["dedup_key"] for p in warnings}
        assert h.daemon.health.status == "healthy"
