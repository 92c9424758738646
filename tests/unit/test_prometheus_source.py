"""The Prometheus source against Prometheus's HTTP API contract (reference/observability-apis.md).

A loopback-free fake: ``httpx.MockTransport`` answering exactly as Prometheus 2.42 does,
envelopes, errorTypes and status codes included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest

from coalmine.engine import Observation
from coalmine.policy import Rule
from coalmine.retry import RetryPolicy
from coalmine.sources import Target
from coalmine.sources.prometheus import PrometheusSource

pytestmark = pytest.mark.anyio
AT = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)
TARGET = Target(script='api"x', role="canary", version="v2", canary="v2", stable="v1")
RULE = Rule.model_validate(
    {
        "name": "err",
        "source": "prometheus",
        "query": 'sum(rate(x{script="$script",version="$version"}[$window])) / $canary',
        "samples": 'sum(increase(x{script="$script",version="$version"}[$window]))',
        "window": "1m30s",
        "above": 0.01,
    }
)


def vector(*values: str) -> dict[str, Any]:
    """A success envelope with one series per value."""
    result = [{"metric": {"n": str(i)}, "value": [1772560800, v]} for i, v in enumerate(values)]
    return {"status": "success", "data": {"resultType": "vector", "result": result}}


def error(kind: str, message: str) -> dict[str, Any]:
    """An error envelope."""
    return {"status": "error", "errorType": kind, "error": message}


Handler = Callable[[httpx.Request], httpx.Response]


async def fetch(
    handler: Handler, rule: Rule = RULE, **kwargs: Any
) -> tuple[Observation, list[float]]:
    """Fetch one observation through a source on a mock transport; also return the sleeps."""
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        source = PrometheusSource(
            client, "http://prom:9090/", retry=RetryPolicy(3, 0.1, 1.0), sleep=sleep, **kwargs
        )
        return await source.fetch(rule, TARGET, AT), slept


async def test_query_is_rendered_and_sent_at_evaluation_time() -> None:
    """Placeholders are substituted (label values escaped) and the query runs at `at`."""
    seen: list[dict[str, list[str]]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/query"
        seen.append(parse_qs(request.content.decode()))
        return httpx.Response(200, json=vector("0.02" if len(seen) == 1 else "1800"))

    obs, _ = await fetch(handler)
    assert obs == Observation("err", "canary", 0.02, 1800.0)
    assert seen[0]["query"] == ['sum(rate(x{script="api\\"x",version="v2"}[1m30s])) / v2']
    assert seen[0]["time"] == [f"{AT.timestamp():.3f}"]
    assert seen[1]["query"] == ['sum(increase(x{script="api\\"x",version="v2"}[1m30s]))']


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (vector(), 200, "query: empty result (no series)"),
        (vector("1", "2"), 200, "query: 2 series; the query must aggregate to one"),
        (error("bad_data", "parse error at char 5"), 400, "query: bad_data: parse error at char 5"),
        (
            error("execution", "many-to-many matching"),
            422,
            "query: execution: many-to-many matching",
        ),
        (
            {"status": "success", "data": {"resultType": "matrix", "result": []}},
            200,
            "unexpected result type 'matrix'",
        ),
        (
            {"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, 2]}]}},
            200,
            "sample is not",
        ),
        (
            {
                "status": "success",
                "data": {"resultType": "vector", "result": [{"value": [1, "high"]}]},
            },
            200,
            "sample value 'high'",
        ),
        ({"data": 1}, 200, "malformed answer: no status/data"),
    ],
)
async def test_unusable_answers_are_inconclusive_with_a_reason(
    body: Any, status: int, reason: str
) -> None:
    """Empty, multi-series, error envelopes and malformed bodies: an error observation, no value."""
    obs, slept = await fetch(lambda _: httpx.Response(status, json=body))
    assert obs.value is None and obs.error is not None
    assert reason in obs.error
    assert slept == []  # a bad query is not retried


@pytest.mark.parametrize(
    ("text", "expected"), [("NaN", math.nan), ("+Inf", math.inf), ("-Inf", -math.inf)]
)
async def test_non_finite_values_are_passed_on(text: str, expected: float) -> None:
    """NaN and ±Inf arrive as floats (the engine calls them inconclusive), never as errors."""
    obs, _ = await fetch(lambda _: httpx.Response(200, json=vector(text)))
    assert obs.error is None and obs.value is not None
    assert (math.isnan(obs.value) and math.isnan(expected)) or obs.value == expected


async def test_not_json_is_inconclusive() -> None:
    """A truncated or HTML body is an error observation, never a crash."""
    obs, _ = await fetch(lambda _: httpx.Response(200, text='{"status": "succ'))
    assert obs.error == "query: HTTP 200: malformed answer (not JSON)"


async def test_503_timeout_is_retried_then_succeeds() -> None:
    """errorType timeout (503) is retried with jittered backoff, within the attempt budget."""
    answers = iter(
        [
            httpx.Response(503, json=error("timeout", "query timed out")),
            httpx.Response(200, json=vector("0.5")),
        ]
    )
    obs, slept = await fetch(
        lambda _: next(answers), rule=RULE.model_copy(update={"samples": None})
    )
    assert obs.value == 0.5 and obs.error is None
    assert len(slept) == 1 and 0 <= slept[0] <= 0.1


async def test_retries_run_out_into_an_error_observation() -> None:
    """Three 500s in a row: inconclusive with the last reason, after exactly two waits."""
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(500, json=error("internal", "boom"))

    obs, slept = await fetch(handler)
    assert obs.error == "query: internal: boom"
    assert len(calls) == 3 and len(slept) == 2


async def test_429_retry_after_is_honoured() -> None:
    """A 429 with retry-after waits that long before the next attempt."""
    answers = iter(
        [
            httpx.Response(429, headers={"retry-after": "7"}, text="slow down"),
            httpx.Response(200, json=vector("1")),
        ]
    )
    obs, slept = await fetch(
        lambda _: next(answers), rule=RULE.model_copy(update={"samples": None})
    )
    assert obs.value == 1.0
    assert slept == [7.0]


async def test_connection_errors_are_retried_then_inconclusive() -> None:
    """A refused connection is retried, then reported as a connection error."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    obs, slept = await fetch(handler)
    assert obs.error == "query: connection error: ConnectError"
    assert len(slept) == 2


async def test_failed_samples_query_is_named() -> None:
    """When only the samples query fails, the reason says so."""
    answers = iter([httpx.Response(200, json=vector("0.01")), httpx.Response(200, json=vector())])
    obs, _ = await fetch(lambda _: next(answers))
    assert obs.error == "samples query: empty result (no series)"


async def test_metrics_hook_sees_every_attempt() -> None:
    """Each attempt reports its latency and error kind (for /metrics)."""
    seen: list[tuple[str, str | None]] = []
    answers = iter(
        [httpx.Response(503, json=error("timeout", "t")), httpx.Response(200, json=vector("1"))]
    )
    await fetch(
        lambda _: next(answers),
        rule=RULE.model_copy(update={"samples": None}),
        observe=lambda name, seconds, err: seen.append((name, err)),
    )
    assert seen == [("prometheus", "http_503"), ("prometheus", None)]


def test_rule_json_roundtrip_unaffected() -> None:
    """The test rule is a valid policy rule (guards the fixtures above)."""
    assert json.loads(RULE.model_dump_json(by_alias=True))["window"] == "1m30s"


async def test_undecodable_body_is_inconclusive() -> None:
    """A body that cannot be decoded (broken Content-Encoding) is an error observation."""
    obs, _ = await fetch(
        lambda _: httpx.Response(200, headers={"content-encoding": "gzip"}, content=b"garbage")
    )
    assert obs.value is None
    assert obs.error is not None and "bad HTTP answer: DecodingError" in obs.error
