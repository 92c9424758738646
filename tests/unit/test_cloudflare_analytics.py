"""The Cloudflare analytics source: one GraphQL query per script and window, signals per version."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.engine import Observation
from coalmine.policy import Rule
from coalmine.retry import RetryPolicy
from coalmine.sources import Target
from coalmine.sources.cloudflare import CloudflareAnalytics

pytestmark = pytest.mark.anyio
AT = datetime(2026, 3, 3, 18, 10, 30, tzinfo=UTC)
CANARY = Target("api", "canary", "v2", "v2", "v1")


def rule(signal: str, window: str = "2m", **extra: Any) -> Rule:
    """A cloudflare rule."""
    return Rule.model_validate(
        {
            "name": signal,
            "source": "cloudflare",
            "signal": signal,
            "window": window,
            "above": 1,
            **extra,
        }
    )


def row(
    minute: str, version: str, requests: int, errors: int, cpu50: float = 2000, **quantiles: float
) -> dict[str, Any]:
    """One GraphQL group."""
    q = {
        "cpuTimeP50": cpu50,
        "cpuTimeP99": cpu50 * 4,
        "wallTimeP50": 10000,
        "wallTimeP99": 50000,
        **quantiles,
    }
    return {
        "sum": {"requests": requests, "errors": errors, "subrequests": 0},
        "quantiles": q,
        "avg": {"sampleInterval": 1},
        "dimensions": {"datetimeMinute": f"2026-03-03T18:{minute}:00Z", "scriptVersion": version},
    }


def answer(rows: list[dict[str, Any]]) -> httpx.Response:
    """A GraphQL answer with the given groups."""
    return httpx.Response(
        200,
        json={
            "data": {"viewer": {"accounts": [{"workersInvocationsAdaptive": rows}]}},
            "errors": None,
        },
    )


ROWS = [
    row("05", "v2", 60, 3, cpu50=2000),
    row("06", "v2", 40, 1, cpu50=4000),
    row("05", "v1", 540, 0),
    row("06", "v1", 560, 1),
    row("07", "v2", 999, 999),  # inside the data delay: not judged
]


async def fetch_all(
    handler: Callable[[httpx.Request], httpx.Response], rules: list[Rule], target: Target = CANARY
) -> list[Observation]:
    """Fetch every rule concurrently through one source."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = CloudflareClient(
            http,
            base_url="https://cf/client/v4",
            account_id="acc",
            token="t",
            limiter=TokenBucket(600),
            retry=RetryPolicy(1),
        )
        source = CloudflareAnalytics(
            client, "acc", delay=timedelta(minutes=3), longest_window=timedelta(minutes=5)
        )
        out: list[Observation] = []

        async def one(r: Rule) -> None:
            out.append(await source.fetch(r, target, AT))

        async with anyio.create_task_group() as tg:
            for r in rules:
                tg.start_soon(one, r)
    return sorted(out, key=lambda o: o.rule)


async def test_one_query_serves_every_rule_over_a_closed_window() -> None:
    """Concurrent rules share one query whose window ends `delay` before now, whole minutes."""
    queries: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        queries.append(json.loads(request.content))
        return answer(ROWS)

    rules = [rule("requests"), rule("errors"), rule("error_ratio"), rule("errors_per_minute")]
    obs = {o.rule: o for o in await fetch_all(handler, rules)}
    assert len(queries) == 1
    variables = queries[0]["variables"]
    assert variables == {
        "accountTag": "acc",
        "filter": {
            "scriptName": "api",
            "datetime_geq": "2026-03-03T18:02:00Z",
            "datetime_lt": "2026-03-03T18:07:00Z",
            "scriptVersion_in": ["v1", "v2"],
        },
    }
    assert "$filter: AccountWorkersInvocationsAdaptiveFilter_InputObject" in queries[0]["query"]
    assert (obs["requests"].value, obs["requests"].samples) == (100, 100)
    assert obs["errors"].value == 4
    assert obs["error_ratio"].value == pytest.approx(0.04)
    assert obs["errors_per_minute"].value == pytest.approx(2.0)


async def test_cpu_time_is_request_weighted_in_milliseconds() -> None:
    """cpu_time_p50: per-minute quantiles weighted by requests, microseconds to milliseconds."""
    (obs,) = await fetch_all(lambda _: answer(ROWS), [rule("cpu_time_p50")])
    assert obs.value == pytest.approx((60 * 2.0 + 40 * 4.0) / 100)


@pytest.mark.parametrize(
    "signal", ["errors", "errors_per_minute", "error_ratio", "requests", "cpu_time_p50"]
)
async def test_no_traffic_is_no_data_for_every_signal(signal: str) -> None:
    """No requests from the version in the window: inconclusive (no data), never a 0 that passes."""
    (obs,) = await fetch_all(lambda _: answer([row("05", "v1", 500, 0)]), [rule(signal)])
    assert obs.value is None
    assert obs.samples == 0
    assert obs.error is not None
    assert obs.error.startswith("no data: no requests from v2")


async def test_a_cancelled_query_is_not_cached_as_empty() -> None:
    """A query cut short by the fetch timeout leaves no cached answer; the next fetch asks again."""
    calls: list[int] = []
    never = anyio.Event()

    async def slow_then_fast(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            await never.wait()  # the first answer never comes in time
        return answer(ROWS)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow_then_fast)) as http:
        client = CloudflareClient(
            http,
            base_url="https://cf/client/v4",
            account_id="acc",
            token="t",
            limiter=TokenBucket(600),
            retry=RetryPolicy(1),
        )
        source = CloudflareAnalytics(client, "acc")
        with anyio.move_on_after(0.2):
            await source.fetch(rule("errors"), CANARY, AT)
        obs = await source.fetch(rule("errors"), CANARY, AT)
    assert len(calls) == 2
    assert obs.value == 4


async def test_graphql_error_inside_200_is_inconclusive() -> None:
    """errors inside a 200: an error observation with the message."""
    body = {
        "data": None,
        "errors": [
            {"message": "dataset limit", "path": ["viewer"], "extensions": {"code": "limit"}}
        ],
    }
    (obs,) = await fetch_all(lambda _: httpx.Response(200, json=body), [rule("errors")])
    assert obs.value is None and obs.error is not None and "dataset limit" in obs.error


async def test_malformed_rows_are_inconclusive() -> None:
    """A row without sums is a malformed answer, not a crash."""
    (obs,) = await fetch_all(lambda _: answer([{"dimensions": {}}]), [rule("errors")])
    assert obs.error is not None and obs.error.startswith("malformed analytics answer")


async def test_missing_unverified_field_says_so() -> None:
    """wallTimeP99 is not in Cloudflare's documented schema: its absence is named clearly."""
    rows = [row("05", "v2", 10, 0)]
    del rows[0]["quantiles"]["wallTimeP99"]
    (obs,) = await fetch_all(lambda _: answer(rows), [rule("wall_time_p99")])
    assert obs.error is not None and "wallTimeP99" in obs.error
