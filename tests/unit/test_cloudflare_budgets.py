"""Two Cloudflare budgets (REST and GraphQL), and URLs that stay what they mean."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from coalmine.cloudflare.budgets import BudgetBlocked, TokenBucket
from coalmine.cloudflare.client import CloudflareClient, CloudflareError, Version
from coalmine.retry import RetryPolicy
from coalmine.server.metrics import Metrics
from tests.unit.test_cloudflare_client import DEPLOYMENT, fail, ok

pytestmark = pytest.mark.anyio
GRAPHQL_DATA = {"data": {"viewer": {"accounts": []}}, "errors": None}


class Clock:
    """A virtual monotonic clock whose sleep advances it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def client(http: httpx.AsyncClient, clock: Clock, graphql: int = 200) -> CloudflareClient:
    """A client whose two buckets and retries wait on ``clock``."""
    rest = TokenBucket(600, clock=clock, sleep=clock.sleep)
    return CloudflareClient(
        http,
        base_url="https://api.example/client/v4",
        account_id="acc",
        token="t",
        limiter=rest,
        graphql_limiter=rest.sibling(graphql),
        retry=RetryPolicy(3, 0.01, 0.1),
        sleep=clock.sleep,
    )


def transport(graphql: httpx.Response, rest: httpx.Response | None = None) -> httpx.MockTransport:
    """GraphQL answered with ``graphql``; REST with ``rest`` (a deployment by default)."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/graphql"):
            return graphql
        return rest or ok(DEPLOYMENT)

    return httpx.MockTransport(handler)


async def test_a_graphql_429_never_delays_a_rollback() -> None:
    """GraphQL answers 429 (retry-after 300): the query fails at once, and a rollback right
    after goes without waiting a second."""
    clock = Clock()
    refused = httpx.Response(429, headers={"retry-after": "300"}, json={})
    async with httpx.AsyncClient(transport=transport(refused)) as http:
        cf = client(http, clock)
        with pytest.raises(CloudflareError, match="GraphQL budget spent"):
            await cf.graphql("query { viewer { accounts { x } } }", {})
        assert clock.now < 1.0  # not waited out inside the tick
        before = clock.now
        await cf.deploy("api", [("v1", 100)], "coalmine: rollback", rollback=True)
        assert clock.now == before
        assert cf.budgets["graphql"].tokens == 0.0  # blocked: nothing may go
        assert cf.budgets["rest"].tokens > 0


async def test_a_rest_429_does_not_block_analytics() -> None:
    """The REST API answers 429 (retry-after 120): a GraphQL query still goes at once."""
    clock = Clock()
    refused = httpx.Response(429, headers={"retry-after": "120"}, json={})
    graphql = httpx.Response(200, json=GRAPHQL_DATA)
    async with httpx.AsyncClient(transport=transport(graphql, refused)) as http:
        cf = client(http, clock)
        cf.budgets["rest"].block(120)
        assert await cf.graphql("query { viewer { accounts { x } } }", {}) == GRAPHQL_DATA["data"]
        assert clock.slept == []


async def test_account_based_limits_slow_graphql_to_one_query_a_second() -> None:
    """After an answer says X-Rate-Limit-Type: account-based, queries go one a second at most,
    where the same budget without that header lets a burst go at once."""

    async def gaps(headers: dict[str, str]) -> list[float]:
        clock = Clock()
        answer = httpx.Response(200, headers=headers, json=GRAPHQL_DATA)
        async with httpx.AsyncClient(transport=transport(answer)) as http:
            cf = client(http, clock, graphql=300)
            sent: list[float] = []
            for _ in range(6):
                await cf.graphql("query { viewer { accounts { x } } }", {})
                sent.append(clock.now)
        return [b - a for a, b in itertools.pairwise(sent)]

    assert await gaps({}) == [0.0] * 5
    slowed = await gaps({"X-Rate-Limit-Type": "account-based"})
    assert slowed == pytest.approx([1.0] * 5)


async def test_the_account_based_header_on_a_rest_answer_changes_nothing() -> None:
    """The header only concerns GraphQL: on a REST answer it does not slow REST down."""
    clock = Clock()
    answer = ok({"deployments": []})
    answer.headers["X-Rate-Limit-Type"] = "account-based"
    async with httpx.AsyncClient(transport=httpx.MockTransport(lambda _: answer)) as http:
        cf = client(http, clock)
        for _ in range(5):
            await cf.deployments("api")
    assert clock.slept == []
    assert cf.budgets["rest"].capacity == 60.0


def test_graphql_bucket_keeps_its_own_budget() -> None:
    """The GraphQL bucket spends at most its budget (plus its burst) in 5 minutes, apart from
    REST's; it keeps no write reserve (no write goes through GraphQL)."""
    clock = Clock()
    graphql = TokenBucket(600, clock=clock).sibling(200)
    taken = 0
    while clock.now < 300:
        if graphql.wait_for("read") == 0:
            taken += 1
        else:
            clock.now += 0.01
    assert 200 <= taken <= 200 + graphql.capacity
    assert graphql.reserve == 0.0


async def test_take_refuses_to_wait_past_max_wait() -> None:
    """A bucket blocked for 300 s raises BudgetBlocked for a caller who waits at most 10 s."""
    clock = Clock()
    bucket = TokenBucket(200, clock=clock, sleep=clock.sleep)
    bucket.block(300)
    with pytest.raises(BudgetBlocked):
        await bucket.take("read", max_wait=10)
    assert clock.slept == []


def test_budget_left_is_exported_per_api() -> None:
    """/metrics carries coalmine_cloudflare_budget_tokens for rest and graphql, read at scrape."""
    clock = Clock()
    rest = TokenBucket(600, clock=clock)
    graphql = rest.sibling(200)
    metrics = Metrics(CollectorRegistry())
    metrics.watch_budgets({"rest": rest, "graphql": graphql})
    graphql.block(60)
    text = generate_latest(metrics.registry).decode()
    assert 'coalmine_cloudflare_budget_tokens{api="rest"} 60.0' in text
    assert 'coalmine_cloudflare_budget_tokens{api="graphql"} 0.0' in text


@pytest.mark.parametrize(
    ("script", "raw_path"),
    [
        (
            "x/../../zones",
            "/client/v4/accounts/acc/workers/scripts/x%2F..%2F..%2Fzones/deployments",
        ),
        (
            "api?force=true&",
            "/client/v4/accounts/acc/workers/scripts/api%3Fforce%3Dtrue%26/deployments",
        ),
        ("a b#c", "/client/v4/accounts/acc/workers/scripts/a%20b%23c/deployments"),
    ],
)
async def test_script_names_are_percent_encoded_into_one_path_segment(
    script: str, raw_path: str
) -> None:
    """A script name cannot reach another endpoint or add a query string: it is one segment."""
    seen: list[httpx.URL] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url)
        return ok({"deployments": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        await client(http, Clock()).deployments(script)
    assert seen[0].raw_path.decode() == raw_path
    assert seen[0].query == b""


async def test_one_version_is_read_by_id() -> None:
    """version() reads …/versions/{id} (encoded) and returns its id, number and upload time."""
    seen: list[str] = []
    item: dict[str, Any] = {"id": "v2", "number": 7, "metadata": {"created_on": "2026-01-01"}}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return ok(item)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        version = await client(http, Clock()).version("api", "v2")
    assert version == Version("v2", 7, "2026-01-01")
    assert seen == ["/client/v4/accounts/acc/workers/scripts/api/versions/v2"]


async def test_a_missing_version_is_a_404_with_cloudflares_message_and_no_retry() -> None:
    """An unknown version: CloudflareError status 404 with Cloudflare's message, asked once."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return fail(404, 10007, "version nope not found")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        with pytest.raises(CloudflareError, match="version nope not found") as caught:
            await client(http, Clock()).version("api", "nope")
    assert caught.value.status == 404
    assert calls == [1]
