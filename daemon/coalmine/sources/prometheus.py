"""The Prometheus source: an instant query at the evaluation time, per rule and version."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import anyio
import httpx

from coalmine.engine import Observation
from coalmine.policy import Rule
from coalmine.retry import Retryable, RetryPolicy, with_retries
from coalmine.sources import Target
from coalmine.sources.promql import BadAnswer, render, single_value

# errorType -> retry? (reference/observability-apis.md: bad_data 400, execution 422,
# timeout/canceled 503, internal 500, not_found 404)
_RETRYABLE_STATUS = {429, 500, 502, 503, 504}

Observe = Callable[[str, float, str | None], None]
"""Called after every query with (source name, seconds, error kind or None): for /metrics."""


class PrometheusSource:
    """Instant queries against ``{url}/api/v1/query`` (or a proxy with the same API)."""

    name = "prometheus"

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        *,
        timeout: float = 10.0,
        retry: RetryPolicy | None = None,
        observe: Observe | None = None,
        headers: dict[str, str] | None = None,
        name: str = "prometheus",
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._client = client
        self._url = url.rstrip("/") + "/api/v1/query"
        self._timeout = timeout
        self._retry = retry or RetryPolicy(attempts=3, base_delay=0.25, max_delay=2.0)
        self._observe = observe
        self._headers = headers or {}
        self._rng = rng or random.Random()
        self._sleep = sleep
        self.name = name

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The rule's value and sample count at ``at`` (a compare rule's event and request
        counts over its window); every failure is inconclusive."""
        first, part = (rule.events, "events query") if rule.compare else (rule.query, "query")
        assert first is not None
        try:
            with anyio.fail_after(self._timeout * 1.5):
                value = await self._query(render(first, rule, target), at)
                samples = None
                if rule.samples is not None:
                    part = "samples query"
                    samples = await self._query(render(rule.samples, rule, target), at)
        except BadAnswer as exc:
            return Observation(rule.name, target.role, None, None, f"{part}: {exc}")
        except TimeoutError:
            why = f"{part}: timeout after {self._timeout * 1.5:g}s"
            return Observation(rule.name, target.role, None, None, why)
        if samples is not None and math.isnan(samples):
            samples = 0.0  # no requests in the window at all
        if rule.compare is None:
            return Observation(rule.name, target.role, value, samples)
        rate = value / samples if samples else None
        return Observation(
            rule.name, target.role, rate, samples, events=value, span=(at - rule.window, at)
        )

    async def _query(self, query: str, at: datetime) -> float:
        params = {"query": query, "time": f"{at.timestamp():.3f}", "timeout": f"{self._timeout:g}s"}
        try:
            body = await with_retries(
                lambda: self._attempt(params), self._retry, rng=self._rng, sleep=self._sleep
            )
        except Retryable as exc:
            raise BadAnswer(exc.reason) from None
        return single_value(body)

    async def _attempt(self, params: dict[str, str]) -> Any:
        started = time.perf_counter()
        error: str | None = None
        try:
            response = await self._client.post(
                self._url, data=params, headers=self._headers, timeout=self._timeout
            )
        except httpx.TimeoutException:
            error = "timeout"
            raise Retryable(f"timeout after {self._timeout:g}s") from None
        except httpx.TransportError as exc:
            error = "connection"
            raise Retryable(f"connection error: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:  # decoding, redirects: a bad answer, not worth a retry
            error = "bad_answer"
            raise BadAnswer(f"bad HTTP answer: {type(exc).__name__}") from None
        finally:
            if error is not None and self._observe:
                self._observe(self.name, time.perf_counter() - started, error)
        elapsed = time.perf_counter() - started
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code in _RETRYABLE_STATUS:
            if self._observe:
                self._observe(self.name, elapsed, f"http_{response.status_code}")
            detail = _error_text(body) or f"HTTP {response.status_code}"
            raise Retryable(detail, after=_retry_after(response))
        if self._observe:
            self._observe(self.name, elapsed, _call_error(response.status_code, body))
        if body is None:
            raise BadAnswer(f"HTTP {response.status_code}: malformed answer (not JSON)")
        if response.status_code != 200:  # 4xx: Prometheus's own error, or a proxy's page
            raise BadAnswer(_error_text(body) or f"HTTP {response.status_code}")
        return body


def _call_error(status: int, body: Any) -> str | None:
    """How /health counts a non-retried answer: a 200 is a healthy call only when it is
    Prometheus's own envelope (a proxy's page, or JSON of another shape, fails every query)."""
    if status != 200:
        return f"http_{status}"
    if not (isinstance(body, dict) and body.get("status") == "success"):
        return "bad_answer"
    return None


def _error_text(body: Any) -> str | None:
    if isinstance(body, dict) and body.get("status") == "error":
        return f"{body.get('errorType', 'error')}: {body.get('error', '')}"
    return None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return min(float(value), 60.0)
    except ValueError:
        return None
