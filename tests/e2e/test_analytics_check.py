"""The daemon's start-up check of its analytics query, and sampled analytics, end to end."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from coalmine.engine import RolloutPhase
from coalmine.simulator.graphql import SCHEMA_FILE, AnalyticsLimits, error_body, load_schema
from coalmine.sources import Target
from coalmine.sources.cloudflare import CHECK, FILTER_TYPE, CloudflareAnalytics
from tests.e2e.harness import harness, served

pytestmark = pytest.mark.anyio
MISSING = f"{FILTER_TYPE}.scriptVersion_in"


async def test_start_up_check_names_a_field_cloudflare_lacks(tmp_path: Path) -> None:
    """With scriptVersion_in taken out of Cloudflare's schema, the check names it in /health,
    in one warning page and in every Cloudflare rule's reason; nothing advances."""
    async with harness(tmp_path) as h, served(h) as client:
        sdl = SCHEMA_FILE.read_text().replace("  scriptVersion_in: [string!]\n", "")
        h.sim.cloudflare.analytics_schema = load_schema(sdl)
        problem = await h.daemon.check_analytics_schema()
        assert problem is not None and MISSING in problem

        health = (await client.get("/health")).json()
        assert health["status"] == "degraded"
        assert health["checks"][CHECK]["status"] == "failing"
        assert MISSING in health["checks"][CHECK]["error"]

        for _ in range(12):
            await h.tick()
        pages = [p for p in h.sim.pages if p["dedup_key"] == f"coalmine/{CHECK}"]
        assert len(pages) == 1 and MISSING in pages[0]["payload"]["summary"]
        assert pages[0]["payload"]["severity"] == "warning"
        exceptions = h.loop.state.rules["exceptions"]
        assert exceptions.detail is not None and MISSING in exceptions.detail
        assert (h.phase, h.loop.state.canary_percent) == (RolloutPhase.CANARY, 10)


async def test_a_failing_store_while_paging_a_schema_problem_does_not_stop_the_daemon(
    tmp_path: Path,
) -> None:
    """The schema check runs as a task of the daemon's task group: a store that cannot take
    its page is logged, never raised (raised, it would stop every loop); /health still names
    the missing field."""
    async with harness(tmp_path) as h:
        sdl = SCHEMA_FILE.read_text().replace("  scriptVersion_in: [string!]\n", "")
        h.sim.cloudflare.analytics_schema = load_schema(sdl)
        with closing(sqlite3.connect(h.db.path, isolation_level=None)) as db:
            db.execute(
                "CREATE TRIGGER fault BEFORE INSERT ON outbox"
                " BEGIN SELECT RAISE(ABORT, 'disk I/O error (injected)'); END"
            )
            problem = await h.daemon.check_analytics_schema()
            db.execute("DROP TRIGGER fault")
        assert problem is not None and MISSING in problem
        assert MISSING in (h.daemon.health.snapshot()[CHECK]["error"] or "")


async def test_start_up_check_passes_on_the_shipped_schema(tmp_path: Path) -> None:
    """Against the simulator's schema the check finds nothing missing and /health says so."""
    async with harness(tmp_path) as h:
        assert await h.daemon.check_analytics_schema() is None
        assert h.daemon.health.snapshot()[CHECK]["status"] == "healthy"


async def test_start_up_check_waits_for_cloudflare_then_checks(tmp_path: Path) -> None:
    """GraphQL down (503) for the first attempts: the check tries again until Cloudflare
    answers, then finds nothing missing."""
    async with harness(tmp_path) as h:
        h.sim.cloudflare.inject(method="POST", path="*/graphql", status=503, times=6)
        with anyio.fail_after(10):
            assert await h.daemon.check_analytics_schema(retry_every=0.01) is None
        graphql = [r.status for r in h.sim.cloudflare.requests if r.path.endswith("/graphql")]
        assert graphql[-1] == 200 and graphql.count(503) == 6
        assert h.daemon.health.snapshot()[CHECK]["status"] == "healthy"


async def test_refused_introspection_is_not_taken_for_a_missing_field(tmp_path: Path) -> None:
    """If Cloudflare answers the introspection with errors, nothing is reported missing, no
    page goes out, and the rules keep using the query."""
    async with harness(tmp_path) as h:
        refused = error_body("introspection is not allowed", "authz")
        h.sim.cloudflare.inject(method="POST", path="*/graphql", status=200, body=refused)
        assert await h.daemon.check_analytics_schema(retry_every=0.01) is None
        source = h.daemon.shared.sources["cloudflare"]
        assert isinstance(source, CloudflareAnalytics) and source.schema_problem is None
        assert CHECK not in h.daemon.health.snapshot()
        await h.tick()
        assert [p for p in h.sim.pages if p["dedup_key"] == f"coalmine/{CHECK}"] == []


async def test_sampled_windows_count_what_was_kept(tmp_path: Path) -> None:
    """At one invocation in ten, a rule's sample count is the kept invocations (a tenth of the
    estimated requests) while its value comes from the estimates."""
    async with harness(tmp_path, start_canary=True) as h:
        h.sim.cloudflare.analytics = AnalyticsLimits(sample_interval=10)
        h.clock.advance(600)
        source = h.daemon.shared.sources["cloudflare"]
        assert isinstance(source, CloudflareAnalytics)
        rule = h.loop.policy.rules[0]  # exceptions: error_ratio over 2 minutes
        target = Target("api", "stable", h.stable, h.canary, h.stable)
        requests = rule.model_copy(update={"signal": "requests", "name": "requests"})
        obs = await source.fetch(requests, target, h.clock())
        assert obs.error is None and obs.value is not None and obs.samples is not None
        assert obs.value % 10 == 0
        assert obs.samples == pytest.approx(obs.value / 10)
        assert obs.value == pytest.approx(2 * 540, rel=0.2)  # 90% of 600 a minute, estimated
        assert timedelta(minutes=2) == rule.window
