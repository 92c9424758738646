"""Prometheus failing every way it can: coalmine holds, pages, reports degraded, then carries on."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tests.e2e.harness import served
from tests.reliability.conftest import (
    PROMETHEUS_POLICY,
    FakePrometheus,
    FaultHarness,
    assert_degraded,
    assert_delivered_once,
    assert_healthy,
    assert_held,
    assert_journal_complete,
    degraded,
    fault_harness,
    health,
    healthy,
    inconclusive_pages,
    process_state,
    real_prometheus,
    restarted,
    traffic_posts,
    vector,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

FAULT_TICKS = 4  # 2 minutes: past the 1m hold and the 1m inconclusive page


def _error(status: int, error_type: str, message: str) -> Callable[[FakePrometheus], None]:
    def start(prometheus: FakePrometheus) -> None:
        body = {"status": "error", "errorType": error_type, "error": message}
        prometheus.inject(path="/api/v1/query", status=status, body=body, times=None)

    return start


def _answer(status: int, body: object) -> Callable[[FakePrometheus], None]:
    def start(prometheus: FakePrometheus) -> None:
        prometheus.inject(path="/api/v1/query", status=status, body=body, times=None)

    return start


def _truncated(prometheus: FakePrometheus) -> None:
    prometheus.inject(path="/api/v1/query", action="truncate", times=None)


def _slow(prometheus: FakePrometheus) -> None:
    prometheus.delay = 1.0  # more than the client's (capped) timeout, on every attempt


# fault -> (how to start it, whether Prometheus itself is failing in /health)
FAULTS: dict[str, tuple[Callable[[FakePrometheus], None], bool]] = {
    "http_400_bad_data": (_error(400, "bad_data", "parse error at char 5"), True),
    "http_503_timeout": (_error(503, "timeout", "query timed out in expression evaluation"), True),
    "malformed_json": (_answer(200, "<html><body>Bad Gateway</body></html>"), True),
    "truncated_json": (_truncated, True),
    "slower_than_timeout": (_slow, True),
    # a working Prometheus whose answer is NaN (0/0: no traffic): inconclusive data, not a
    # failing dependency, so /health stays healthy while the rollout holds and pages
    "nan": (_answer(200, vector(0, "NaN")), False),
}


@pytest.mark.parametrize("fault", FAULTS)
async def test_prometheus_fault_holds_pages_then_carries_on(tmp_path: Path, fault: str) -> None:
    """Prometheus answers badly for 2 minutes: held at 10%, a warning page, /health degraded;
    then healthy: the canary advances, the page resolves, every decision journaled."""
    start, failing = FAULTS[fault]
    async with fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h:
        assert h.prometheus is not None
        async with served(h) as client:
            await h.tick()
            assert_held(h, 10)
            start(h.prometheus)
            check = degraded(client, "prometheus") if failing else healthy(client)
            await h.ticks(FAULT_TICKS, held_at=10, check=check)
            assert [p["payload"]["severity"] for p in inconclusive_pages(h)] == ["warning"]
            assert traffic_posts(h) == []

            h.prometheus.faults.clear()
            h.prometheus.delay = 0.0
            await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=2))
            assert_healthy(await health(client))
            assert len(inconclusive_pages(h, "resolve")) == 1
            assert traffic_posts(h) == [200]
            assert_journal_complete(h)
            assert_delivered_once(h)


async def _recovers(h: FaultHarness) -> None:
    """The rollout goes on to 50% once the real Prometheus answers again."""
    await h.run_until(lambda h: h.loop.state.canary_percent == 50, timedelta(minutes=2))
    assert traffic_posts(h) == [200]
    assert len(inconclusive_pages(h, "resolve")) == 1
    assert_journal_complete(h)
    assert_delivered_once(h)


async def test_real_prometheus_killed_holds_then_carries_on_after_restart(tmp_path: Path) -> None:
    """A real Prometheus SIGKILLed mid-canary: held, paged, degraded; restarted on the same port
    and data: the canary advances and /health is healthy again."""
    with real_prometheus(tmp_path) as running:
        async with (
            fault_harness(tmp_path, policy=PROMETHEUS_POLICY, prometheus_url=running.url) as h,
            served(h) as client,
        ):
            await h.tick()
            assert h.loop.state.rules["error_rate"].value == pytest.approx(0.001)
            running.process.kill()
            running.process.wait(timeout=10)
            await h.ticks(FAULT_TICKS, held_at=10, check=degraded(client, "prometheus"))
            failing = (await health(client))["checks"]["prometheus"]
            assert failing["error"] == "connection"
            assert failing["failing_for_s"] >= 90  # in the daemon's (virtual) time
            assert len(inconclusive_pages(h)) == 1
            with restarted(running):
                await _recovers(h)
                assert_healthy(await health(client))


async def test_real_prometheus_paused_holds_then_carries_on_after_resume(tmp_path: Path) -> None:
    """A real Prometheus SIGSTOPped (connections accepted, never answered): every query times
    out, held, paged, degraded; SIGCONT: the canary advances, /health healthy."""
    with real_prometheus(tmp_path) as running:
        async with (
            fault_harness(tmp_path, policy=PROMETHEUS_POLICY, prometheus_url=running.url) as h,
            served(h) as client,
        ):
            await h.tick()
            assert h.loop.state.rules["error_rate"].value == pytest.approx(0.001)
            pid = running.process.pid
            os.kill(pid, signal.SIGSTOP)
            try:
                await wait_until(lambda: process_state(pid) == "T", "stopped")
                await h.ticks(FAULT_TICKS, held_at=10, check=degraded(client, "prometheus"))
                body = await health(client)
                assert body["checks"]["prometheus"]["error"] == "timeout"
                assert len(inconclusive_pages(h)) == 1
            finally:
                os.kill(pid, signal.SIGCONT)
            await _recovers(h)
            assert_healthy(await health(client))


async def test_prometheus_answering_json_that_is_not_its_envelope_is_degraded(
    tmp_path: Path,
) -> None:
    """A 200 whose JSON is not Prometheus's envelope (a proxy's own answer) fails Prometheus."""
    async with fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h:
        assert h.prometheus is not None
        async with served(h) as client:
            await h.tick()
            _answer(200, {"message": "no healthy upstream"})(h.prometheus)
            await h.ticks(FAULT_TICKS, held_at=10)
            assert [p["payload"]["severity"] for p in inconclusive_pages(h)] == ["warning"]
            assert_degraded(await health(client), "prometheus")
