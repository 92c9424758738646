"""The runbook's PromQL evaluated by a real Prometheus through the Prometheus source."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from coalmine.engine import Deployment, Engine, Observation, RuleStatus
from coalmine.policy import Policy
from coalmine.policyfile import load_policy
from coalmine.retry import RetryPolicy
from coalmine.sources import Target
from coalmine.sources.prometheus import PrometheusSource
from tests.integration.prometheus import RunningPrometheus, Series, prometheus_with_history
from tests.support import ROOT, make_policy

pytestmark = pytest.mark.anyio
SCRIPT = "slidecraft-api"
NOW = int(datetime.now(UTC).timestamp()) // 60 * 60
START, END = NOW - 3 * 3600, NOW - 3600
AT = datetime.fromtimestamp(NOW - 2 * 3600, UTC)
BUCKETS = {"0.1": 5.0, "0.25": 8.0, "0.5": 9.0, "1": 9.8, "2.5": 9.95, "5": 10.0, "+Inf": 10.0}


def history() -> list[Series]:
    """v2 (canary): 2% of requests 5xx, latency buckets; v1: no 5xx series at all; v3: no traffic."""
    series: list[Series] = [
        ("http_requests_total", {"script": SCRIPT, "version": "v2", "code": "200"}, 9.8),
        ("http_requests_total", {"script": SCRIPT, "version": "v2", "code": "503"}, 0.2),
        ("http_requests_total", {"script": SCRIPT, "version": "v1", "code": "200"}, 90.0),
        ("http_requests_total", {"script": SCRIPT, "version": "v3", "code": "200"}, 0.0),
    ]
    series += [
        (
            "http_request_duration_seconds_bucket",
            {"script": SCRIPT, "version": "v2", "le": le},
            rate,
        )
        for le, rate in BUCKETS.items()
    ]
    return series


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPrometheus]:
    """One Prometheus with the history above, for the whole module."""
    with prometheus_with_history(
        tmp_path_factory.mktemp("prometheus"), history(), START, END
    ) as running:
        yield running


@pytest.fixture(scope="module")
def runbook() -> Policy:
    """policies/runbook.yaml."""
    return load_policy(ROOT / "policies" / "runbook.yaml")


async def measure(
    server: RunningPrometheus, policy: Policy, rule_name: str, version: str
) -> Observation:
    """One observation of a runbook rule for a version, at AT."""
    rule = next(r for r in policy.rules if r.name == rule_name)
    target = Target(SCRIPT, "canary", version, canary=version, stable="v1")
    async with httpx.AsyncClient() as client:
        source = PrometheusSource(client, server.url, retry=RetryPolicy(2, 0.01, 0.05))
        return await source.fetch(rule, target, AT)


async def test_error_rate_of_a_canary_with_errors(
    server: RunningPrometheus, runbook: Policy
) -> None:
    """The runbook's error-rate PromQL gives 5xx / all over the 1m window, with the request count."""
    obs = await measure(server, runbook, "error_rate", "v2")
    assert obs.error is None
    assert obs.value == pytest.approx(0.2 / 10.0, rel=1e-6)
    assert obs.samples == pytest.approx(600, rel=0.01)


async def test_error_rate_without_any_5xx_series_is_zero(
    server: RunningPrometheus, runbook: Policy
) -> None:
    """No 5xx series at all: `or vector(0)` makes it 0, conclusive (not an empty result)."""
    obs = await measure(server, runbook, "error_rate", "v1")
    assert (obs.value, obs.error) == (0.0, None)
    assert obs.samples == pytest.approx(5400, rel=0.01)


async def test_no_traffic_is_nan_and_inconclusive(
    server: RunningPrometheus, runbook: Policy
) -> None:
    """A version with no requests: 0/0 = NaN, zero samples; the engine calls it inconclusive."""
    obs = await measure(server, runbook, "error_rate", "v3")
    assert obs.error is None and obs.value is not None and math.isnan(obs.value)
    assert obs.samples == 0
    engine = Engine(runbook)
    state = engine.observe_deployment(
        engine.new_state(SCRIPT), Deployment.of("v1", "v3", 10), AT
    ).state
    state = engine.tick(state, AT + timedelta(minutes=2), [obs]).state
    assert state.rules["error_rate"].status is RuleStatus.INCONCLUSIVE


async def test_unknown_version_is_an_empty_result(
    server: RunningPrometheus, runbook: Policy
) -> None:
    """A version Prometheus has never seen: an empty vector, reported as such."""
    obs = await measure(server, runbook, "error_rate", "v9")
    assert obs.value is None
    assert obs.error == "query: empty result (no series)"


async def test_p99_from_histogram_buckets(server: RunningPrometheus, runbook: Policy) -> None:
    """The runbook's P99 PromQL interpolates inside the (1, 2.5] bucket: 2.0 seconds."""
    obs = await measure(server, runbook, "latency_p99", "v2")
    assert obs.error is None
    assert obs.value == pytest.approx(2.0, rel=1e-6)


async def test_p99_without_histogram_is_empty(server: RunningPrometheus, runbook: Policy) -> None:
    """No bucket series for the version: empty result, inconclusive."""
    obs = await measure(server, runbook, "latency_p99", "v1")
    assert obs.error is not None and "empty result" in obs.error


async def test_bad_query_is_bad_data(server: RunningPrometheus, runbook: Policy) -> None:
    """Prometheus's own bad_data error comes back as the observation's error."""
    broken = runbook.model_copy(
        update={
            "rules": [runbook.rules[0].model_copy(update={"query": "sum(rate(", "samples": None})]
        }
    )
    obs = await measure(server, broken, "error_rate", "v2")
    assert obs.error is not None and obs.error.startswith("query: bad_data: ")


COMPARE = """
version: 1
name: compare
scripts: [slidecraft-api]
steps: [{weight: 10}, {weight: 100}]
rules:
  - name: slow_requests_vs_stable
    source: prometheus
    events: >-
      sum(increase(http_request_duration_seconds_bucket{script="$script",version="$version",le="+Inf"}[$window]))
      - sum(increase(http_request_duration_seconds_bucket{script="$script",version="$version",le="1"}[$window]))
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    compare: {max_ratio: 1.2, confidence: 0.99}
    on_breach: rollback
  - name: errors_vs_stable
    source: prometheus
    events: >-
      sum(increase(http_requests_total{script="$script",version="$version",code=~"5.."}[$window]))
      or vector(0)
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    compare: {max_ratio: 1.5}
    on_breach: rollback
"""


async def test_compare_rules_count_events_and_requests_over_the_window(
    server: RunningPrometheus,
) -> None:
    """The issue's histogram-bucket rule counts requests slower than 1 s among all requests
    (0.2/s of 10/s over 1m), and a version without any 5xx series counts zero events."""
    policy = make_policy(COMPARE)
    slow = await measure(server, policy, "slow_requests_vs_stable", "v2")
    assert slow.error is None
    assert slow.events == pytest.approx(12, rel=0.01)
    assert slow.samples == pytest.approx(600, rel=0.01)
    assert slow.span == (AT - timedelta(minutes=1), AT)
    errors = await measure(server, policy, "errors_vs_stable", "v1")
    assert (errors.events, errors.error) == (0.0, None)
    assert errors.samples == pytest.approx(5400, rel=0.01)
