"""Generated answers from Prometheus and Cloudflare: never a crash, never a pass.

Each property runs a source (or the REST client) over httpx's in-process transport, which
answers with the generated status and body: hundreds of examples in seconds. The loopback
simulators of tests/e2e and tests/reliability cover the same code over real sockets.

- Prometheus: whatever the answer, ``fetch`` returns an observation; it is conclusive (a finite
  value and no error) only when the answer is a well-formed success with exactly one finite
  sample (reference/observability-apis.md), and then the value is that sample's.
- Cloudflare GraphQL: an answer that is not the documented shape, or carries GraphQL errors,
  is inconclusive for every signal, compare rules included.
- Cloudflare REST: listing deployments returns deployments or raises ``CloudflareError``,
  nothing else, whatever the status, headers and body.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient, CloudflareError
from coalmine.engine import Observation
from coalmine.policy import Rule
from coalmine.retry import RetryPolicy
from coalmine.sources import Target
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.prometheus import PrometheusSource

AT = datetime(2026, 3, 3, 18, 10, 30, tzinfo=UTC)
CANARY = Target("api", "canary", "v2", "v2", "v1")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**6), max_value=10**6)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)
NUMBER_TEXT = st.sampled_from(
    ["0", "0.25", "12", "1e3", "NaN", "+Inf", "-Inf", "1e400", "", " 1", "0x10", "one", "1,5"]
)
SAMPLE = st.fixed_dictionaries(
    {
        "metric": st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
        "value": st.one_of(
            st.tuples(st.floats(0, 2e9) | st.integers(0, 2**31), NUMBER_TEXT).map(list),
            JSON,
        ),
    }
)
PROMETHEUS_BODY = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {
            "status": st.sampled_from(["success", "error", "", None]),
            "data": st.one_of(
                JSON,
                st.fixed_dictionaries(
                    {
                        "resultType": st.sampled_from(["vector", "scalar", "matrix", "string", 7]),
                        "result": st.one_of(
                            st.lists(SAMPLE, max_size=3),
                            st.tuples(st.floats(0, 2e9), NUMBER_TEXT).map(list),
                            JSON,
                        ),
                    }
                ),
            ),
        }
    ),
)
ANSWER = st.tuples(
    st.sampled_from([200, 200, 200, 400, 404, 422, 429, 500, 503]),
    st.one_of(PROMETHEUS_BODY.map(lambda b: json.dumps(b).encode()), st.binary(max_size=40)),
)


def prometheus_value(status: int, body: bytes) -> float | None:
    """The one finite value a well-formed success carries (the reference's contract), or None."""
    if status != 200:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("status") != "success":
        return None
    inner = data.get("data")
    if not isinstance(inner, dict):
        return None
    kind, result = inner.get("resultType"), inner.get("result")
    if kind == "scalar":
        pair = result
    elif kind == "vector" and isinstance(result, list) and len(result) == 1:
        sample = result[0]
        pair = sample.get("value") if isinstance(sample, dict) else None
    else:
        return None
    if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], str)):
        return None
    try:
        value = float(pair[1])
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def rule(**fields: Any) -> Rule:
    """A rule from its fields."""
    return Rule.model_validate({"name": "r", **fields})


ABSOLUTE = rule(source="prometheus", query="up", above=1)
COMPARE = rule(source="prometheus", events="errors", samples="requests", compare={"max_ratio": 1.5})


def run_fetch(
    answer: Callable[[httpx.Request], httpx.Response], fetch: Callable[..., Any], *args: Any
) -> Any:
    """Run one async fetch over the in-process transport."""

    async def main() -> Any:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
            return await fetch(http, *args)

    return anyio.run(main)


class VirtualTime:
    """A clock that sleeping advances: retry-after and rate-limit waits cost no wall time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


async def no_sleep(_: float) -> None:
    """Retries without waiting."""


def cloudflare(http: httpx.AsyncClient, attempts: int) -> CloudflareClient:
    """A Cloudflare client on virtual time."""
    time = VirtualTime()
    return CloudflareClient(
        http,
        base_url="https://cf/client/v4",
        account_id="acc",
        token="t",
        limiter=TokenBucket(600, clock=time, sleep=time.sleep),
        retry=RetryPolicy(attempts, 0.0, 0.0),
        sleep=time.sleep,
    )


async def prometheus_fetch(http: httpx.AsyncClient, r: Rule) -> Observation:
    """One Prometheus fetch of rule ``r``."""
    source = PrometheusSource(
        http, "http://prometheus:9090", retry=RetryPolicy(2, 0.0, 0.0), sleep=no_sleep
    )
    return await source.fetch(r, CANARY, AT)


@SETTINGS
@given(ANSWER)
def test_a_prometheus_answer_is_conclusive_only_when_well_formed(answer: tuple[int, bytes]) -> None:
    """Never a crash; a finite value only from a well-formed single-sample success."""
    status, body = answer
    obs = run_fetch(lambda _: httpx.Response(status, content=body), prometheus_fetch, ABSOLUTE)
    assert isinstance(obs, Observation)
    expected = prometheus_value(status, body)
    if obs.error is None and obs.value is not None and math.isfinite(obs.value):
        assert obs.value == expected
    if expected is None:
        assert obs.error is not None or obs.value is None or not math.isfinite(obs.value)


@SETTINGS
@given(ANSWER)
def test_a_prometheus_answer_gives_a_compare_rule_counts_only_when_well_formed(
    answer: tuple[int, bytes],
) -> None:
    """The compare rule's events and samples come only from well-formed answers."""
    status, body = answer
    obs = run_fetch(lambda _: httpx.Response(status, content=body), prometheus_fetch, COMPARE)
    assert isinstance(obs, Observation)
    expected = prometheus_value(status, body)
    if obs.error is None and obs.events is not None and math.isfinite(obs.events):
        assert obs.events == expected
    if expected is None:
        assert obs.error is not None or obs.events is None or not math.isfinite(obs.events)


# ---- Cloudflare ---------------------------------------------------------------------------


def group(minute: int, version: str) -> dict[str, Any]:
    """One well-formed analytics group."""
    return {
        "sum": {"requests": 100, "errors": 1, "subrequests": 0},
        "quantiles": {"cpuTimeP50": 1000, "cpuTimeP99": 4000, "wallTimeP50": 1, "wallTimeP99": 2},
        "avg": {"sampleInterval": 1},
        "dimensions": {"datetimeMinute": f"2026-03-03T18:0{minute}:00Z", "scriptVersion": version},
    }


def good() -> dict[str, Any]:
    """A well-formed analytics answer: both versions, two closed minutes."""
    groups = [group(m, v) for m in (5, 6) for v in ("v1", "v2")]
    return {"data": {"viewer": {"accounts": [{"workersInvocationsAdaptive": groups}]}}}


NOT_A_NUMBER = st.one_of(
    st.none(), st.text(max_size=5).filter(lambda t: not _numeric(t)), st.lists(JSON, max_size=2)
)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@st.composite
def broken_graphql(draw: st.DrawFn) -> Any:
    """An analytics answer that is not the documented shape, or that carries errors."""
    kind = draw(st.sampled_from(["json", "errors", "field", "drop"]))
    if kind == "json":
        return draw(JSON.filter(lambda v: not isinstance(v, dict) or "data" not in v))
    body = good()
    if kind == "errors":
        body["errors"] = [{"message": draw(st.text(min_size=1, max_size=10))}]
        return body
    groups = body["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]
    target = groups[draw(st.integers(0, len(groups) - 1))]
    section, name = draw(
        st.sampled_from(
            [
                ("sum", "requests"),
                ("sum", "errors"),
                ("dimensions", "datetimeMinute"),
                ("dimensions", "scriptVersion"),
            ]
        )
    )
    if kind == "drop":
        del target[section][name]
    else:
        target[section][name] = (
            draw(NOT_A_NUMBER)
            if section == "sum"
            else draw(
                st.one_of(
                    st.none(),
                    st.lists(JSON, max_size=2),
                    st.dictionaries(st.text(max_size=3), JSON, max_size=2),
                )
            )
        )
        if name == "datetimeMinute" and isinstance(target[section][name], str):
            target[section][name] = None
    return body


SIGNALS = ["requests", "errors", "error_ratio", "errors_per_minute", "cpu_time_p99"]


async def analytics_fetch(http: httpx.AsyncClient, rules: list[Rule]) -> list[Observation]:
    """Every rule through one analytics source (one query serves them all)."""
    source = CloudflareAnalytics(cloudflare(http, 1), "acc", delay=timedelta(minutes=3))
    out: list[Observation] = []
    for r in rules:
        out.append(await source.fetch(r, CANARY, AT))
    return out


ANALYTICS_RULES = [
    *(rule(name=s, source="cloudflare", signal=s, window="2m", above=1) for s in SIGNALS),
    rule(name="vs", source="cloudflare", signal="errors", window="2m", compare={"max_ratio": 2}),
]


@SETTINGS
@given(broken_graphql())
def test_a_broken_analytics_answer_is_inconclusive_for_every_signal(body: Any) -> None:
    """Not the documented shape, or GraphQL errors inside a 200: inconclusive, never a value."""
    observations = run_fetch(
        lambda _: httpx.Response(200, json=body), analytics_fetch, ANALYTICS_RULES
    )
    for obs in observations:
        assert obs.error is not None, (obs, body)


def test_the_well_formed_analytics_answer_is_conclusive() -> None:
    """The control: the unbroken answer gives every signal a value."""
    observations = run_fetch(
        lambda _: httpx.Response(200, json=good()), analytics_fetch, ANALYTICS_RULES
    )
    assert all(o.error is None for o in observations), observations
    assert observations[-1].events == 2 and observations[-1].samples == 200


REST_ANSWER = st.tuples(
    st.sampled_from([200, 200, 200, 400, 403, 404, 429, 500, 502, 503]),
    st.dictionaries(
        st.sampled_from(["retry-after", "content-type"]),
        st.text(max_size=6).map(lambda t: t.encode("ascii", "ignore").decode()),
        max_size=2,
    ),
    st.one_of(
        JSON.map(lambda b: json.dumps(b).encode()),
        st.fixed_dictionaries(
            {"success": st.sampled_from([True, False]), "errors": JSON, "result": JSON}
        ).map(lambda b: json.dumps(b).encode()),
        st.binary(max_size=30),
    ),
)


async def list_deployments(http: httpx.AsyncClient) -> Any:
    """The REST call the daemon makes every tick."""
    try:
        return await cloudflare(http, 2).deployments("api")
    except CloudflareError as exc:
        return exc


@SETTINGS
@given(REST_ANSWER)
def test_a_rest_answer_is_deployments_or_a_cloudflare_error(
    answer: tuple[int, dict[str, str], bytes],
) -> None:
    """Whatever the status, headers and body: deployments, or a CloudflareError, never a crash."""
    status, headers, body = answer
    result = run_fetch(
        lambda _: httpx.Response(status, headers=headers, content=body), list_deployments
    )
    assert isinstance(result, CloudflareError | list), result
