"""The budget plan in a real daemon against the simulator: logged at start, recomputed when a
canary starts or ends and on reload, on /metrics, and in /health (degraded while it does not
fit)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import httpx
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from coalmine.cli import main
from coalmine.cloudflare.planner import CHECK
from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour
from tests.e2e.harness import POLICY, harness, served

# the harness reads a canary's deployment every tick; the plan is shown at the default cadence
DEFAULT_READS = {"COALMINE_CANARY_DRIFT_INTERVAL": "2m"}

pytestmark = pytest.mark.anyio


async def budget(client: httpx.AsyncClient) -> dict[str, float]:
    """The budget plan's samples on /metrics, as ``name{api}`` (or ``name``) to value."""
    text = (await client.get("/metrics")).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name.startswith("coalmine_cloudflare_budget_")
                and "tokens" not in sample.name
            ):
                api = sample.labels.get("api")
                found[f"{sample.name}{{{api}}}" if api else sample.name] = sample.value
    return found


def plan_lines(logs: list[dict[str, object]]) -> list[dict[str, object]]:
    """The budget plan's log lines."""
    return [e for e in logs if str(e["event"]).startswith("budget plan")]


async def test_the_plan_follows_a_canary_on_metrics_and_health(tmp_path: Path) -> None:
    """Idle: one read per drift interval; once the canary is seen, its reads, writes and one
    analytics query: /metrics and /health show the numbers against the defaults (the harness
    reads a canary's deployment every tick; here at the default canary drift interval)."""
    async with harness(tmp_path, env=DEFAULT_READS) as h, served(h) as client:
        idle = await budget(client)
        await h.tick()
        assert h.phase is RolloutPhase.CANARY
        live = await budget(client)
        health = (await client.get("/health")).json()
    assert idle == {
        "coalmine_cloudflare_budget_planned{rest}": 0.2,  # 300 s / 30 min
        "coalmine_cloudflare_budget_planned{graphql}": 5.0,  # discovery every minute
        "coalmine_cloudflare_budget_limit{rest}": 600.0,
        "coalmine_cloudflare_budget_limit{graphql}": 200.0,
        "coalmine_cloudflare_budget_reserve{rest}": 6.0,
        "coalmine_cloudflare_budget_reserve{graphql}": 0.0,
        "coalmine_cloudflare_budget_more_canaries": 1.0,
        # alone, the token's whole plan and limit are the daemon's own
        "coalmine_cloudflare_budget_token_planned{rest}": 0.2,
        "coalmine_cloudflare_budget_token_planned{graphql}": 5.0,
        "coalmine_cloudflare_budget_token_limit{rest}": 600.0,
        "coalmine_cloudflare_budget_token_limit{graphql}": 200.0,
    }
    assert live["coalmine_cloudflare_budget_planned{rest}"] == 4.5  # 2.5 reads + 2 writes
    assert live["coalmine_cloudflare_budget_planned{graphql}"] == 15.0  # + every 30 s
    assert live["coalmine_cloudflare_budget_more_canaries"] == 0.0  # no idle script left
    assert health["status"] == "healthy"
    assert health["checks"][CHECK] == {"status": "healthy", "latency_ms": None}
    assert health["budget_plan"] == {
        "fits": True,
        "rest": {"planned": 4.5, "limit": 600, "reserve": 6.0},
        "graphql": {"planned": 15.0, "limit": 200, "reserve": 0.0},
        "live_canaries": 1,
        "more_canaries": 0,
        "changes": [],
    }


async def test_a_canary_over_the_budget_degrades_health_until_it_ends(tmp_path: Path) -> None:
    """With room for discovery only, the canary's analytics overflow GraphQL: a warning naming
    the change, /health degraded with the reason; its rollback ends it and the plan fits."""
    env = {"COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT": "10"}
    with structlog.testing.capture_logs() as logs:
        async with (
            harness(tmp_path, env=DEFAULT_READS | env, canary=Behaviour(exception_rate=0.2)) as h,
            served(h) as client,
        ):
            await h.tick()
            over = (await client.get("/health")).json()
            metrics = await budget(client)
            await h.run_until(lambda h: "rollback" in h.actions(), limit=timedelta(minutes=10))
            await h.tick()
            assert h.phase is RolloutPhase.ROLLED_BACK
            after = (await client.get("/health")).json()
    change = "analysis.interval 1m in policy e2e (now 30s)"  # 5 + 5: fits 10
    assert [(e["log_level"], e["why"]) for e in plan_lines(logs)] == [
        ("info", "scripts watched"),
        ("warning", "canary started"),
        ("info", "canary ended"),
    ]
    warning = plan_lines(logs)[1]
    assert change in warning["change"]  # type: ignore[operator]
    assert "GraphQL 15/10 per 5 min (discovery 5, analytics 10)" in str(warning["plan"])
    assert over["status"] == "degraded"
    assert over["checks"][CHECK]["status"] == "failing"
    assert over["checks"][CHECK]["latency_ms"] is None
    assert change in over["checks"][CHECK]["error"]
    assert over["budget_plan"]["fits"] is False and change in over["budget_plan"]["changes"]
    assert metrics["coalmine_cloudflare_budget_planned{graphql}"] == 15.0
    assert metrics["coalmine_cloudflare_budget_limit{graphql}"] == 10.0
    assert after["checks"][CHECK]["status"] == "healthy"
    assert after["budget_plan"]["fits"] is True


async def test_an_over_budget_start_warns_once_naming_the_change(tmp_path: Path) -> None:
    """A 1 s discovery interval is 300 GraphQL queries per 5 minutes, over 200: at start one
    warning line, naming the discovery interval that fits."""
    env = {"COALMINE_DISCOVERY_INTERVAL": "1s"}
    with structlog.testing.capture_logs() as logs:
        async with harness(tmp_path, env=DEFAULT_READS | env, start_canary=False) as h:
            status = h.daemon.health.status
    [line] = plan_lines(logs)
    assert line["log_level"] == "warning" and line["event"] == "budget plan does NOT fit"
    assert (line["graphql"], line["graphql_limit"]) == (300.0, 200)
    assert "raise COALMINE_DISCOVERY_INTERVAL to 5s (now 1s)" in line["change"]  # type: ignore[operator]
    assert status == "degraded"


async def test_a_reload_recomputes_the_plan_for_the_new_scripts(tmp_path: Path) -> None:
    """SIGHUP's reload with 59 more scripts: 60 idle scripts' reads, logged and exported."""
    async with harness(tmp_path, env=DEFAULT_READS, start_canary=False) as h, served(h) as client:
        names = ", ".join(["api", *(f"w{i}" for i in range(59))])
        (tmp_path / "policy.yaml").write_text(
            POLICY.replace("scripts: [api]", f"scripts: [{names}]")
        )
        with structlog.testing.capture_logs() as logs:
            assert await h.daemon.reload(lambda loop: None)
        metrics = await budget(client)
    [line] = plan_lines(logs)
    assert line["why"] == "scripts watched" and line["rest"] == 10.0
    assert metrics["coalmine_cloudflare_budget_planned{rest}"] == 10.0  # 60 x 300 s / 30 min
    assert metrics["coalmine_cloudflare_budget_more_canaries"] == 60.0


async def status_lines(client: httpx.AsyncClient, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """``coalmine status`` against the served daemon (in a thread: it blocks), its lines."""
    capsys.readouterr()
    code = await anyio.to_thread.run_sync(lambda: main(["status", "--url", str(client.base_url)]))
    assert code == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith("budget:")]


async def test_status_shows_the_plan_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine status` ends with the plan: the numbers and the room, or the first change."""
    env = {"COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT": "10"}
    async with harness(tmp_path, env=DEFAULT_READS | env) as h, served(h) as client:
        idle = await status_lines(client, capsys)
        await h.tick()
        live = await status_lines(client, capsys)
    # one canary more would need 15 GraphQL queries of the 10
    assert idle == ["budget: REST 1/600, GraphQL 5/10 per 5 min; 0 more canaries would fit"]
    assert live == [
        "budget: OVER: REST 5/600, GraphQL 15/10 per 5 min;"
        " fix: analysis.interval 1m in policy e2e (now 30s)"
    ]


async def test_discovery_falling_back_recomputes_the_plan(tmp_path: Path) -> None:
    """Without account-wide discovery an idle script costs a read per discovery interval (not
    per drift interval) until it is back; a new reason alone logs nothing."""
    async with harness(tmp_path, env=DEFAULT_READS, start_canary=False) as h, served(h) as client:
        planner = h.daemon.planner
        assert planner is not None
        with structlog.testing.capture_logs() as logs:
            planner.fallback("no Account Analytics Read")
            planner.fallback("the GraphQL budget refused")
            fell = await budget(client)
            planner.fallback(None)
        back = await budget(client)
    assert [(e["why"], e.get("discovery_fallback")) for e in plan_lines(logs)] == [
        ("discovery fell back", "no Account Analytics Read"),
        ("account-wide discovery back", None),
    ]
    assert fell["coalmine_cloudflare_budget_planned{rest}"] == 5.0  # every minute
    assert back["coalmine_cloudflare_budget_planned{rest}"] == 0.2  # every 30 minutes
