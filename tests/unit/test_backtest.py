"""`coalmine backtest` before it fetches anything: --dry shows the queries; bad input is exit 2."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from coalmine.cli import main
from coalmine.cli.backtest import find_split, run_backtest
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.engine import Deployment
from coalmine.errors import ConfigError
from coalmine.simulator import Behaviour, Simulator, VirtualClock
from coalmine.sources.cloudflare import CloudflareAnalytics
from tests.e2e.harness import POLICY
from tests.support import ROOT, make_policy

RUNBOOK = str(ROOT / "policies" / "runbook.yaml")
RANGE = ["--from", "2026-03-03T18:00:00Z", "--to", "2026-03-03T20:00:00Z"]


def test_dry_prints_each_query_range_with_versions_filled_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry prints every canary rule's rendered query for both versions, and exits 0."""
    code = main(
        ["backtest", "--policy", RUNBOOK, *RANGE, "--canary", "v2", "--stable", "v1", "--dry"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "error_rate [canary] prometheus query, query_range start=2026-03-03T18:00:00Z" in out
    assert 'version="v2"' in out and 'version="v1"' in out
    assert "step=30s" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "2026-03-03T20:00:00Z", "--to", "2026-03-03T18:00:00Z"], "--to must be after"),
        (["--from", "yesterday", "--to", "2026-03-03T18:00:00Z"], "not an RFC 3339 time"),
        ([*RANGE, "--canary", "v2"], "--canary and --stable go together"),
        ([*RANGE], "COALMINE_CLOUDFLARE_ACCOUNT_ID"),
    ],
)
def test_bad_input_is_exit_2_with_a_clear_message(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backwards ranges, bad times, half a version pair, missing credentials: exit 2."""
    monkeypatch.delenv("COALMINE_CLOUDFLARE_ACCOUNT_ID", raising=False)
    assert main(["backtest", "--policy", RUNBOOK, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.anyio
async def test_versions_come_from_the_first_split_deployment_of_the_range() -> None:
    """Without --canary/--stable, the canary and stable are the range's first split deployment,
    read from Cloudflare's deployments (here the simulator's), from when it was made."""
    clock = VirtualClock(datetime(2026, 3, 3, 18, 0, tzinfo=UTC))
    sim = Simulator(clock=clock, seed=3)
    stable = sim.add_script("api")
    async with sim.running(), httpx.AsyncClient() as http:
        clock.advance(600)
        canary = sim.upload_version("api", Behaviour())
        sim.start_canary("api", canary, percent=10)
        cloudflare = CloudflareClient(
            http,
            base_url=sim.cloudflare_api_url,
            account_id=sim.account_id,
            token=sim.api_token,
            limiter=TokenBucket(600),
        )
        start = datetime(2026, 3, 3, 18, 5, tzinfo=UTC)
        split, made = await find_split(cloudflare, "api", start, start + timedelta(hours=1))
        with pytest.raises(ConfigError, match="no deployment of api split traffic"):
            await find_split(cloudflare, "api", start - timedelta(hours=2), start)
    assert (split.canary, split.stable, split.canary_percent) == (canary, stable, 10)
    assert made == datetime(2026, 3, 3, 18, 10, tzinfo=UTC)


@pytest.mark.anyio
async def test_cloudflare_rules_are_backtested_from_analytics() -> None:
    """A policy of Cloudflare rules reads each tick's analytics: a faulty canary rolls back."""
    clock = VirtualClock(datetime(2026, 3, 3, 18, 0, tzinfo=UTC))
    sim = Simulator(clock=clock, seed=5)
    stable = sim.add_script("api", requests_per_minute=1200)
    canary = sim.upload_version("api", Behaviour(exception_rate=0.2))
    sim.start_canary("api", canary, percent=10)
    clock.advance(3600)  # an hour of history
    async with sim.running(), httpx.AsyncClient() as http:
        cloudflare = CloudflareClient(
            http,
            base_url=sim.cloudflare_api_url,
            account_id=sim.account_id,
            token=sim.api_token,
            limiter=TokenBucket(100_000),
            graphql_limiter=TokenBucket(100_000),  # one query per tick and version, unthrottled
        )
        source = CloudflareAnalytics(
            cloudflare, sim.account_id, longest_window=timedelta(minutes=2)
        )
        start = datetime(2026, 3, 3, 18, 10, tzinfo=UTC)
        result = await run_backtest(
            make_policy(POLICY),
            "api",
            start,
            start + timedelta(minutes=15),
            Deployment(stable, canary, 10),
            http=http,
            prometheus_url=None,
            sources={"cloudflare": source},
        )
    rollback = next(d for d in result.decisions if d.action == "rollback")
    assert rollback.rule == "exceptions"
    assert rollback.value is not None and rollback.value > 0.1
    assert result.series["exceptions"]["canary"][-1][1] is not None
