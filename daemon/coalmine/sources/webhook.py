"""The webhook source: POST the rollout's context to a rule's ``url``; the answer is the value.

DESIGN.md "Webhook rules": a 2xx answer passes (value 0), any other status breaches (value =
the status), a timeout or a connection error is inconclusive. Redirects are not followed (a 3xx
is a status like any other), the body of the answer is not read for a verdict, and the URL is
never logged or put in an observation: it may carry a token.
"""

from __future__ import annotations

import time
from datetime import datetime

import httpx

from coalmine.engine import Observation
from coalmine.policy import Rule
from coalmine.sources import Target
from coalmine.sources.prometheus import Observe


class WebhookSource:
    """Calls ``source: webhook`` rules."""

    name = "webhook"

    def __init__(self, client: httpx.AsyncClient, *, observe: Observe | None = None) -> None:
        self._client = client
        self._observe = observe

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """One call: 0 for a 2xx answer, the status otherwise; inconclusive when none came."""
        assert rule.url is not None
        context = {
            "script": target.script,
            "canary": target.canary,
            "stable": target.stable,
            "step": target.step,
            "weight": target.weight,
            "phase": target.phase,
            "when": rule.when,
        }
        timeout = rule.timeout.total_seconds()
        started, error = time.perf_counter(), None
        try:
            response = await self._client.post(
                rule.url, json=context, timeout=timeout, follow_redirects=False
            )
        except httpx.TimeoutException:
            error = f"timeout after {timeout:g}s"
        except httpx.HTTPError as exc:  # refused, reset, TLS, a malformed answer
            error = f"connection error: {type(exc).__name__}"
        finally:
            if self._observe is not None:
                kind = None if error is None else error.split(" ", 1)[0]
                self._observe(self.name, time.perf_counter() - started, kind)
        if error is not None:
            return Observation(rule.name, target.role, None, None, error)
        status = response.status_code
        return Observation(rule.name, target.role, 0.0 if 200 <= status < 300 else float(status))
