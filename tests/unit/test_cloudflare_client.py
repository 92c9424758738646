"""The Cloudflare client against the API's contract (reference/cloudflare-api.md)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import (
    CloudflareClient,
    CloudflareError,
    LiveDeployment,
    Version,
    to_engine,
)
from coalmine.engine import Deployment
from coalmine.retry import RetryPolicy

pytestmark = pytest.mark.anyio
TOKEN = "cf-token-SECRET-0123456789"
BASE = "https://api.example/client/v4"


def ok(result: Any) -> httpx.Response:
    """A success envelope."""
    return httpx.Response(
        200, json={"success": True, "errors": [], "messages": [], "result": result}
    )


def fail(status: int, code: int, message: str) -> httpx.Response:
    """An error envelope."""
    body = {
        "success": False,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": None,
    }
    return httpx.Response(status, json=body)


DEPLOYMENT = {
    "id": "d1",
    "created_on": "2026-03-03T18:00:00.000000Z",
    "source": "api",
    "strategy": "percentage",
    "versions": [{"version_id": "v2", "percentage": 10}, {"version_id": "v1", "percentage": 90}],
    "annotations": {"workers/message": "hello", "workers/triggered_by": "deployment"},
}


async def call(
    handler: Callable[[httpx.Request], httpx.Response], fn: Callable[[CloudflareClient], Any]
) -> tuple[Any, list[float]]:
    """Run ``fn`` on a client over a mock transport; return its result and the sleeps."""
    slept: list[float] = []
    now = [0.0]

    async def sleep(seconds: float) -> None:  # a virtual clock: sleeping advances it
        slept.append(seconds)
        now[0] += seconds

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        client = CloudflareClient(
            http,
            base_url=BASE,
            account_id="acc",
            token=TOKEN,
            limiter=TokenBucket(600, sleep=sleep, clock=lambda: now[0]),
            retry=RetryPolicy(3, 0.01, 0.1),
            sleep=sleep,
        )
        return await fn(client), slept


async def test_lists_deployments_from_result_deployments() -> None:
    """Deployments are read from result.deployments (not items), with the bearer token."""

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/client/v4/accounts/acc/workers/scripts/api/deployments"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        return ok({"deployments": [DEPLOYMENT]})

    (live,), _ = await call(handler, lambda c: c.deployments("api"))
    assert live == LiveDeployment(
        "d1", "2026-03-03T18:00:00.000000Z", (("v2", 10.0), ("v1", 90.0)), "hello"
    )


async def test_deploy_sends_what_wrangler_sends() -> None:
    """A step is a percentage deployment of two versions with a message of at most 50 chars."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return ok(DEPLOYMENT)

    await call(
        handler,
        lambda c: c.deploy("api", [("v2", 10), ("v1", 90)], "coalmine: canary to 10%" + "!" * 60),
    )
    assert sent == [
        {
            "strategy": "percentage",
            "versions": [
                {"version_id": "v2", "percentage": 10},
                {"version_id": "v1", "percentage": 90},
            ],
            "annotations": {"workers/message": ("coalmine: canary to 10%" + "!" * 60)[:50]},
        }
    ]


async def test_rollback_blocked_by_secrets_is_forced() -> None:
    """Error 10220 on a rollback is retried once with force=true."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url.params))
        if "force" not in request.url.params:
            return fail(400, 10220, "secrets changed since this version")
        return ok(DEPLOYMENT)

    await call(
        handler, lambda c: c.deploy("api", [("v1", 100)], "coalmine: rollback", rollback=True)
    )
    assert seen == ["", "force=true"]


async def test_write_error_envelope_is_a_clear_error_without_the_token() -> None:
    """A 400 envelope raises CloudflareError with its codes; the token never shows."""

    def handler(request: httpx.Request) -> httpx.Response:
        return fail(400, 100405, "versions declare different Durable Object exports")

    with pytest.raises(CloudflareError) as caught:
        await call(handler, lambda c: c.deploy("api", [("v2", 10), ("v1", 90)], "m"))
    assert caught.value.codes == (100405,)
    assert "100405: versions declare different Durable Object exports" in str(caught.value)
    assert TOKEN not in str(caught.value)


async def test_429_waits_retry_after_then_succeeds() -> None:
    """429 with retry-after: the whole bucket waits, then the call goes through."""
    answers = iter(
        [
            httpx.Response(429, headers={"retry-after": "30"}, json={}),
            ok({"deployments": [DEPLOYMENT]}),
        ]
    )
    result, slept = await call(lambda _: next(answers), lambda c: c.deployments("api"))
    assert len(result) == 1
    assert 30.0 in slept


async def test_5xx_and_resets_are_retried_then_reported() -> None:
    """Persistent 503s end in a CloudflareError after the attempt budget."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, text="<html>upstream</html>")

    with pytest.raises(CloudflareError, match="HTTP 503"):
        await call(handler, lambda c: c.deployments("api"))
    assert len(calls) == 3


@pytest.mark.parametrize(
    "body",
    [
        {"success": True, "result": {"items": []}},
        {"success": True, "result": {"deployments": [{"versions": "x"}]}},
        ["not", "an", "envelope"],
    ],
)
async def test_malformed_answers_raise_not_crash(body: Any) -> None:
    """An answer of the wrong shape is a CloudflareError, never a KeyError or TypeError."""
    with pytest.raises(CloudflareError):
        await call(lambda _: httpx.Response(200, json=body), lambda c: c.deployments("api"))


async def test_graphql_errors_inside_a_200_raise() -> None:
    """GraphQL errors in a 200 answer are errors, with the message."""
    body = {
        "data": None,
        "errors": [{"message": "quota exceeded", "extensions": {"code": "budget"}}],
    }
    with pytest.raises(CloudflareError, match="quota exceeded"):
        await call(lambda _: httpx.Response(200, json=body), lambda c: c.graphql("query", {}))


def test_canary_is_the_later_upload() -> None:
    """Of two versions, the later upload is the canary, at its share, the other stable."""
    live = LiveDeployment("d", "", (("old", 90.0), ("new", 10.0)))
    versions = {"old": Version("old", 4, ""), "new": Version("new", 5, "")}
    assert to_engine(live, versions) == Deployment("old", "new", 10)
    assert to_engine(LiveDeployment("d", "", (("new", 100.0),)), versions) == Deployment("new")


def test_unknown_versions_fall_back_to_the_smaller_share() -> None:
    """Without version numbers, the smaller share is the canary; shares round to whole percents."""
    live = LiveDeployment("d", "", (("a", 99.5), ("b", 0.5)))
    assert to_engine(live, {}) == Deployment("a", "b", 1)


async def test_a_write_the_server_may_have_applied_is_not_repeated_blind() -> None:
    """A deployment POST answered 503 is not retried in the call (the actuator re-reads first)."""
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        return httpx.Response(503, text="upstream")

    with pytest.raises(CloudflareError, match="not retried"):
        await call(handler, lambda c: c.deploy("api", [("v2", 50), ("v1", 50)], "m"))
    assert calls == ["POST"]


async def test_a_refused_connection_on_a_write_is_retried() -> None:
    """A connection refused before sending is safe to retry, even for a write."""
    answers = iter(["refuse", "ok"])

    def handler(request: httpx.Request) -> httpx.Response:
        if next(answers) == "refuse":
            raise httpx.ConnectError("refused", request=request)
        return ok(DEPLOYMENT)

    result, _ = await call(handler, lambda c: c.deploy("api", [("v2", 10), ("v1", 90)], "m"))
    assert result.id == "d1"
