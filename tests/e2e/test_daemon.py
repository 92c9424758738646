"""The daemon end to end: the simulator's Cloudflare, analytics, PagerDuty, Slack and Grafana."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour
from tests.e2e.harness import Harness, harness
from tests.stores import Backend

pytestmark = pytest.mark.anyio
P = RolloutPhase


def promoted_or_done(h: Harness) -> bool:
    """The rollout has completed (idle again with the canary stable)."""
    return h.phase is P.IDLE and h.loop.state.stable == h.canary


async def test_healthy_canary_is_promoted_with_exact_deployment_calls(
    tmp_path: Path, backend: Backend
) -> None:
    """A healthy canary goes 10 -> 50 -> 100 through exactly these deployment POSTs (on each
    state store: SQLite, PostgreSQL)."""
    async with harness(tmp_path, env={"COALMINE_STATE_URL": backend.url}) as h:
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
        verification = await h.store.verify_journal()
        assert verification.ok and verification.entries == len(await h.store.journal())
        assert [e.action for e in await h.store.journal() if e.action != "applied"] == h.actions()
        assert await h.store.backlog() == 0
        assert await h.store.open_intents() == []
        assert [a["tags"] for a in h.sim.annotations] == [["coalmine", "api", "promoted"]]


async def test_faulty_canary_is_rolled_back_within_for_plus_one_interval(
    tmp_path: Path, backend: Backend
) -> None:
    """Exceptions at 20% from the 50% step: rolled back within `for` + one interval of showing
    (on each state store: SQLite, PostgreSQL)."""
    async with harness(tmp_path, env={"COALMINE_STATE_URL": backend.url}) as h:
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
        assert (await h.store.verify_journal()).ok


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
        assert h.db.open_intents() == []


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
        assert h.db.open_intents() == []
        posts = h.sim.deployment_posts("api")
        assert posts[-1]["versions"] == [{"version_id": h.stable, "percentage": 100}]  # type: ignore[index]
        statuses = [
            r.status
            for r in h.sim.cloudflare.requests
            if r.method == "POST" and r.path.endswith("/deployments")
        ]
        assert statuses[-2:] == [429, 200]


async def test_intent_left_open_by_a_crash_is_applied_once_on_restart(
    tmp_path: Path, backend: Backend
) -> None:
    """Cloudflare refuses the 50% call until the daemon stops; a new daemon applies it once
    (on each state store: SQLite, PostgreSQL)."""
    async with harness(tmp_path, env={"COALMINE_STATE_URL": backend.url}) as h:
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=503, times=None)
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=20))
        assert len(await h.store.open_intents()) == 1  # decided and recorded, not applied
        h.sim.cloudflare.faults.clear()
        # "restart": a second daemon on the same state database reconciles before anything else
        from coalmine.app import open_daemon, prepare

        settings = h.daemon.settings
        async with open_daemon(settings, prepare(settings), clock=h.clock, replicas=False) as again:
            outcomes = await again.shared.actuator.reconcile("api")
            assert [type(o).__name__ for _, o in outcomes] == ["Applied"]
            assert again.loops["api"].state.canary_percent == 50
            assert await again.store.open_intents() == []
        ok_posts = [
            r
            for r in h.sim.cloudflare.requests
            if r.method == "POST" and r.path.endswith("/deployments") and r.status == 200
        ]
        assert len(ok_posts) == 1
        assert (await h.store.verify_journal()).ok


async def test_intent_already_live_after_a_crash_is_not_repeated(tmp_path: Path) -> None:
    """An intent whose change is already live (crash after the call) is recorded, not re-sent."""
    async with harness(tmp_path) as h:
        await h.tick()
        store = h.db
        intent_id = store.begin_intent(
            "api",
            "set_traffic",
            {"versions": [[h.canary, 10], [h.stable, 90]], "message": "m"},
            h.clock(),
        )
        # written behind the daemon's back, as a crashed process left it: a starting daemon
        # knows no script quiet yet (its first reconcile reads them all)
        h.daemon.shared.actuator.forget("api")
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


PROMETHEUS_POLICY = """
version: 1
name: e2e-prometheus
scripts: [api]
analysis: {interval: 30s, warmup: 0s, inconclusive_page_after: 5m}
steps: [{weight: 10, hold: 5m}, {weight: 50, hold: 5m}, {weight: 100}]
rules:
  - {name: error_rate, source: prometheus, query: 'errors{version="$version"}', samples: 'requests{version="$version"}',
     min_samples: 100, above: 0.01, for: 1m, on_breach: rollback}
"""


async def test_prometheus_down_holds_and_pages_never_promotes_then_carries_on(
    tmp_path: Path,
) -> None:
    """Prometheus unreachable: inconclusive, hold, a warning page, no advance; back: it goes on."""
    from coalmine.cli.localprom import free_port
    from coalmine.simulator.service import Request, Response, serve

    port = free_port()

    async def prometheus(request: Request) -> Response:
        query = request.query.get("query", [""])[0] or dict(
            p.split("=", 1) for p in request.body.decode().split("&")
        ).get("query", "")
        value = "1000" if "requests" in query else "0.001"
        return Response.json(
            200,
            {
                "status": "success",
                "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, value]}]},
            },
        )

    env = {"COALMINE_PROMETHEUS_URL": f"http://127.0.0.1:{port}"}
    async with harness(tmp_path, policy=PROMETHEUS_POLICY, env=env) as h:
        for _ in range(24):  # 12 minutes with nothing listening
            await h.tick()
        assert h.loop.state.canary_percent == 10
        assert not {"set_traffic", "promote", "rollback"} & set(h.actions())
        pages = [p for p in h.sim.pages if p.get("event_action") == "trigger"]
        assert [p["payload"]["severity"] for p in pages] == ["warning"]  # type: ignore[index]
        assert h.daemon.health.snapshot()["prometheus"]["status"] == "failing"
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: serve(prometheus, "127.0.0.1", port, task_status=task_status)
            )
            await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=10))
            tg.cancel_scope.cancel()
        assert [p["event_action"] for p in h.sim.pages] == ["trigger", "resolve"]


async def test_operator_start_splits_traffic(tmp_path: Path) -> None:
    """`coalmine start api VERSION` on an idle script: the first step's split, POSTed once."""
    from coalmine.engine import Command

    async with harness(tmp_path, start_canary=False) as h:
        await h.tick()
        assert h.phase is P.IDLE
        async with anyio.create_task_group() as tg:
            results: list[object] = []

            async def submit() -> None:
                results.append(await h.loop.submit(Command("start", h.canary)))

            tg.start_soon(submit)
            with anyio.fail_after(10):
                while not h.loop._pending:
                    await anyio.sleep(0.01)
            await h.tick()
        assert h.sim.deployment_posts("api") == [
            {
                "strategy": "percentage",
                "versions": [
                    {"version_id": h.canary, "percentage": 10},
                    {"version_id": h.stable, "percentage": 90},
                ],
                "annotations": {"workers/message": "coalmine: canary to 10%"},
            }
        ]
        await h.tick()
        assert h.phase is P.CANARY and h.loop.state.canary_percent == 10
        assert "warn" not in h.actions()  # its own split read back is not drift


async def test_locked_database_skips_the_tick_reports_degraded_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """Another process holds the state database: the tick is not recorded (and so not acted
    on), /health is degraded, nothing crashes; once released, the next tick records and acts."""
    import sqlite3

    async with harness(tmp_path) as h:
        await h.tick()
        h.db._db.execute("PRAGMA busy_timeout = 200")
        locker = sqlite3.connect(h.db.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            await h.run_until(lambda h: h.daemon.health.status == "degraded", timedelta(minutes=10))
            assert h.daemon.health.snapshot()["state_store"]["status"] == "failing"
            assert h.sim.deployment_posts("api") == []  # undecided ticks change nothing
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=20))
        assert h.daemon.health.status == "healthy"
        assert h.db.verify_journal().ok
        assert [e.action for e in h.db.journal()][:2] == ["start", "set_traffic"]


async def test_a_change_cloudflare_refuses_for_good_does_not_stop_a_rollback(
    tmp_path: Path,
) -> None:
    """The 50% step is refused for good (10021): it is sent once and withdrawn, the rollout
    holds at 10% with one page saying why, rules still run, and a fault still rolls the
    canary back."""
    refuse = {
        "success": False,
        "errors": [{"code": 10021, "message": "validation"}],
        "messages": [],
        "result": None,
    }
    async with harness(tmp_path) as h:
        h.sim.cloudflare.inject(
            method="POST", path="*/deployments", status=400, body=refuse, times=None
        )
        await h.run_until(lambda h: "set_traffic" in h.actions(), timedelta(minutes=20))
        for _ in range(6):
            await h.tick()
        assert h.loop.state.canary_percent == 10
        assert len(h.sim.deployment_posts("api")) == 1  # not retried
        assert [p["dedup_key"] for p in h.sim.pages] == ["coalmine/api/refused"]
        h.sim.cloudflare.faults.clear()
        h.sim.schedule_fault("api", h.canary, start=h.clock(), exception_rate=0.5)
        await h.run_until(lambda h: h.phase is P.ROLLED_BACK, timedelta(minutes=15))
        await h.tick()
        assert h.sim.cloudflare.current("api").split == {h.stable: 100}
        posted = [p["versions"] for p in h.sim.deployment_posts("api")]  # type: ignore[index]
        assert posted[-1] == [{"version_id": h.stable, "percentage": 100}]
        assert len(posted) == 2
        assert h.db.open_intents() == []
        assert h.sim.pagerduty.alert("coalmine/api/refused").status == "resolved"  # type: ignore[union-attr]


async def test_a_pending_change_never_undoes_a_manual_rollback(tmp_path: Path) -> None:
    """Cloudflare is down while the 50% step is pending; an SRE rolls back by hand; when the API
    returns, coalmine does not re-apply 50% over them: it stands down and warns."""
    async with harness(tmp_path) as h:
        h.sim.cloudflare.inject(method="POST", path="*/deployments", status=503, times=None)
        await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=20))
        h.sim.deploy_by_hand("api", {h.stable: 100})
        h.sim.cloudflare.faults.clear()
        for _ in range(4):
            await h.tick()
        assert h.sim.cloudflare.current("api").split == {h.stable: 100}
        assert h.db.open_intents() == []
        assert [e.action for e in h.db.journal()].count("superseded") == 1
        assert h.phase is P.STOOD_DOWN
        assert h.actions().count("warn") == 1
