"""Three daemons sharing one store through leases, in one process, on the wall clock.

Each is built by ``open_daemon`` as ``coalmine run`` builds it, with its own replica id and
HTTP port, against one simulator. The store is one SQLite file opened by each (SQLite's
statements keep the same lease semantics as PostgreSQL's; ``coalmine run`` itself refuses a
second process on one SQLite file). These pin what the daemon does with leases: one holder
acts, another replica forwards an operator's command to it, and a replica that stops hands
its scripts over at once. The replicas sharing the Cloudflare token's budget run on a real
PostgreSQL, as production does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coalmine.app import Daemon, open_daemon, prepare
from coalmine.server.openapi import openapi_document
from coalmine.settings import load_settings
from coalmine.simulator import Simulator

pytestmark = pytest.mark.anyio
TOKEN = "replica-test-admin-token-0123456789"
POLICY = """
version: 1
name: replicas
scripts: [api, web]
analysis: {interval: 1s, warmup: 0s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 1s}, {weight: 50, hold: 1h}, {weight: 100}]
rules:
  - {name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m, above: 1000, on_breach: page}
"""


@dataclass
class Replica:
    """One running daemon: its id, its port, and the scope that stops it."""

    name: str
    daemon: Daemon
    port: int
    closing: AsyncExitStack
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    async def stop(self) -> None:
        """Stop as SIGTERM stops `coalmine run`: end the loops, then close the daemon."""
        self.scope.cancel()
        await self.closing.aclose()

    def holds(self, script: str) -> bool:
        """Whether this replica may act on ``script`` now."""
        leases = self.daemon.leases
        return leases is not None and leases.fence(script) is not None


@asynccontextmanager
async def replicas(
    tmp_path: Path, names: str = "ABC", state_url: str | None = None
) -> AsyncIterator[tuple[Simulator, list[Replica]]]:
    """A simulator with `api` and `web` split 10% to a canary, and a daemon per name (on one
    SQLite file, or on ``state_url``)."""
    sim = Simulator(seed=3)
    sim.slack.limiter.limit = None
    canaries = {}
    for script in ("api", "web"):
        sim.add_script(script, requests_per_minute=600)
        canaries[script] = sim.upload_version(script)
    (tmp_path / "policy.yaml").write_text(POLICY)
    async with sim.running(), anyio.create_task_group() as tg, AsyncExitStack() as stack:
        running = []
        for name in names:
            settings = load_settings(
                {
                    **sim.environment(),
                    "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
                    "COALMINE_STATE_URL": state_url or f"sqlite:///{tmp_path / 'state.db'}",
                    "COALMINE_LISTEN": "127.0.0.1:0",
                    "COALMINE_ADMIN_TOKEN": TOKEN,
                    "COALMINE_DISCOVERY_INTERVAL": "1s",
                    "COALMINE_DRIFT_INTERVAL": "1s",  # idle scripts read every second
                    "COALMINE_CANARY_DRIFT_INTERVAL": "1s",  # and canaries at every tick
                    "COALMINE_LEASE_TTL": "2s",
                    "COALMINE_REPLICA_ID": name,
                }
            )
            closing = await stack.enter_async_context(AsyncExitStack())
            daemon = await closing.enter_async_context(
                open_daemon(settings, prepare(settings), replicas=True)
            )
            replica = Replica(name, daemon, 0, closing)

            async def serve(replica: Replica, *, task_status: Any) -> None:
                with replica.scope:
                    await replica.daemon.serve(task_status=task_status)

            replica.port = await tg.start(serve, replica)
            running.append(replica)
        for script, canary in canaries.items():
            sim.start_canary(script, canary, percent=10)
        yield sim, running
        tg.cancel_scope.cancel()


async def until(condition: Any, seconds: float = 30.0) -> None:
    """Wait for ``condition()`` (sync or async) to hold, with a deadline."""
    with anyio.fail_after(seconds):
        while True:
            result = condition()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await anyio.sleep(0.05)


def holders(running: list[Replica], script: str) -> list[str]:
    """The replicas that may act on ``script`` now."""
    return [r.name for r in running if r.holds(script)]


async def test_each_script_has_one_holder_and_the_rollout_advances_once(tmp_path: Path) -> None:
    """Two scripts over three replicas: one holder each; each step is posted exactly once."""
    async with replicas(tmp_path) as (sim, running):
        await until(lambda: all(len(holders(running, s)) == 1 for s in ("api", "web")))
        await until(lambda: len(sim.deployment_posts("api")) == 1)
        await until(lambda: len(sim.deployment_posts("web")) == 1)
        for script in ("api", "web"):
            posts = sim.deployment_posts(script)
            assert [[v["percentage"] for v in p["versions"]] for p in posts] == [[50, 50]]
            assert len(holders(running, script)) == 1


async def test_a_command_sent_to_any_replica_is_applied_by_the_holder(tmp_path: Path) -> None:
    """`pause` posted to a replica that does not hold the script is forwarded (with who asked
    and why) and answered; `coalmine status` against any replica shows who holds what; each
    replica's page links point at the port it bound (COALMINE_LISTEN asked for port 0)."""
    async with replicas(tmp_path) as (_, running):
        assert [r.daemon.shared.public_url for r in running] == [
            f"http://127.0.0.1:{r.port}" for r in running
        ]
        await until(lambda: len(holders(running, "api")) == 1)
        other = next(r for r in running if not r.holds("api"))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{other.port}") as client:
            response = await client.post(
                "/api/v1/rollouts/api/pause",
                headers={"Authorization": f"Bearer {TOKEN}", "X-Coalmine-Actor": "ana"},
                json={"reason": "INC-7"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            (pause,) = response.json()["decisions"]
            assert pause["action"] == "pause"
            assert (pause["requested_by"], pause["request_reason"]) == ("ana", "INC-7")
            holder = next(r for r in running if r.holds("api"))
            assert holder.daemon.loops["api"].state.phase.value == "paused"
            recent = holder.daemon.loops["api"].recent
            assert next(d for d in recent if d.action == "pause").requested_by == "ana"

            async def shown_paused_with_its_holder() -> bool:
                body = (await client.get("/api/v1/rollouts/api")).json()
                return bool(body["phase"] == "paused" and body["lease"]["holder"] == holder.name)

            await until(shown_paused_with_its_holder)
        status = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "coalmine",
                    "status",
                    "--url",
                    f"http://127.0.0.1:{other.port}",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
        )
        (headline,) = [line for line in status.stdout.splitlines() if line.startswith("api ")]
        epoch = holder.daemon.leases.fence("api").epoch  # type: ignore[union-attr]
        assert f"holder {holder.name}@{epoch}" in headline, status.stdout + status.stderr


async def test_a_stopping_replica_hands_its_scripts_over_at_once(tmp_path: Path) -> None:
    """A replica stopped cleanly gives its leases back; another takes them before they expire."""
    async with replicas(tmp_path, "AB") as (sim, running):
        await until(lambda: len(holders(running, "api")) == 1)
        first = next(r for r in running if r.holds("api"))
        epoch = first.daemon.leases.fence("api").epoch  # type: ignore[union-attr]
        await first.stop()
        other = next(r for r in running if r is not first)
        assert other.daemon.leases is not None
        row = {r.name: r for r in await other.daemon.leases.store.leases()}["api"]
        assert row.holder == other.name or row.expires_in <= 0, "given back, not left to expire"
        await until(lambda: other.holds("api"))
        taken = other.daemon.leases.fence("api")  # type: ignore[union-attr]
        assert taken is not None and taken.epoch == epoch + 1
        await until(lambda: len(sim.deployment_posts("api")) == 1)
        metrics = other.daemon.metrics.registry.get_sample_value(
            "coalmine_lease_held", {"script": "api"}
        )
        assert metrics == 1.0


def plan_of(replica: Replica) -> tuple[int, float, float, int]:
    """A replica's budget plan: live replicas, REST and GraphQL limits, scripts planned."""
    planner = replica.daemon.planner
    assert planner is not None
    plan = planner.plan
    if plan is None:
        return (0, 0.0, 0.0, 0)
    inputs = plan.inputs
    return (inputs.replicas, plan.rest.limit, plan.graphql.limit, inputs.live + inputs.idle)


async def budget_metrics(replica: Replica) -> dict[str, float]:
    """The replica's budget gauges, by name and api, read over HTTP."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{replica.port}") as client:
        text = (await client.get("/metrics", timeout=10)).text
    return {
        f"{s.name}{{{s.labels['api']}}}": s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("coalmine_cloudflare_budget_") and "api" in s.labels
    }


async def test_two_replicas_each_spend_half_the_token_and_one_alone_the_whole(
    tmp_path: Path, postgres_url: str
) -> None:
    """Two live replicas on PostgreSQL: each plans the script it holds against half of each
    limit and its buckets refill at half the rate (/metrics and /health say so); once one
    stops, the other plans both scripts against the whole and refills at the whole rate."""
    async with replicas(tmp_path, "AB", postgres_url) as (_, running):
        first, second = running
        await until(lambda: all(plan_of(r) == (2, 300, 100, 1) for r in running))
        for replica in running:
            rest = replica.daemon.shared.cloudflare.budgets["rest"]
            graphql = replica.daemon.shared.cloudflare.budgets["graphql"]
            assert (rest.rate, rest.capacity, rest.reserve) == pytest.approx((1.0, 30.0, 3.0))
            assert graphql.rate == pytest.approx(100 / 300)
            metrics = await budget_metrics(replica)
            assert metrics["coalmine_cloudflare_budget_limit{rest}"] == 300
            assert metrics["coalmine_cloudflare_budget_limit{graphql}"] == 100
            assert metrics["coalmine_cloudflare_budget_reserve{rest}"] == 3
            assert metrics["coalmine_cloudflare_budget_token_limit{rest}"] == 600
            assert metrics["coalmine_cloudflare_budget_token_limit{graphql}"] == 200
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{replica.port}") as client:
                plan = (await client.get("/health", timeout=10)).json()["budget_plan"]
            schemas = openapi_document()["components"]
            jsonschema.validate(
                plan, {"$ref": "#/components/schemas/BudgetPlan", "components": schemas}
            )  # the OpenAPI document describes a replica's plan too
            assert plan["replicas"] == 2
            assert (plan["rest"]["limit"], plan["graphql"]["limit"]) == (300, 100)
            assert (plan["token"]["rest"]["limit"], plan["token"]["graphql"]["limit"]) == (600, 200)
            assert plan["token"]["rest"]["reserve"] == 6
        await first.stop()
        await until(lambda: plan_of(second) == (1, 600, 200, 2))
        rest = second.daemon.shared.cloudflare.budgets["rest"]
        assert (rest.rate, rest.capacity, rest.reserve) == pytest.approx((2.0, 60.0, 6.0))
        assert second.daemon.shared.cloudflare.budgets["graphql"].rate == pytest.approx(200 / 300)
        metrics = await budget_metrics(second)
        assert metrics["coalmine_cloudflare_budget_limit{rest}"] == 600
        assert metrics["coalmine_cloudflare_budget_limit{graphql}"] == 200
