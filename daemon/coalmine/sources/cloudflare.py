"""The Cloudflare analytics source: built-in per-version signals from GraphQL.

One query per script and closed window serves every Cloudflare rule of a tick: concurrent
``fetch`` calls for the same script share it. The window closes ``delay`` before the evaluation
time, because the last minutes of the adaptive datasets are often incomplete, and both versions
are measured over the same window. Signals, per version, over the rule's ``window``:

- ``requests``, ``errors`` (invocations that threw: *not* HTTP 5xx responses);
- a version with no requests in the window is inconclusive ("no data") for every signal;
- ``error_ratio`` = errors / requests; ``errors_per_minute`` = errors / window minutes;
- ``cpu_time_p50``, ``cpu_time_p99``, ``wall_time_p99`` in milliseconds: the request-weighted
  mean of the per-minute quantiles (Cloudflare reports microseconds);
- a compare rule (signal ``errors``) gets the counts, ``events`` errors of ``samples`` requests,
  with the window, so that the engine counts each closed window once.

The sample count of every signal is the version's requests in the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio

from coalmine.cloudflare.client import CloudflareClient, CloudflareError
from coalmine.engine import Observation
from coalmine.engine.model import format_time
from coalmine.policy import Rule
from coalmine.sources import Target

QUERY = """
query Canary($accountTag: string!, $script: string!, $start: Time!, $end: Time!,
             $versions: [string!]) {
  viewer { accounts(filter: {accountTag: $accountTag}) {
    workersInvocationsAdaptive(limit: 10000,
      filter: {scriptName: $script, datetime_geq: $start, datetime_lt: $end,
               scriptVersion_in: $versions},
      orderBy: [datetimeMinute_ASC]) {
      sum { requests errors subrequests }
      quantiles { cpuTimeP50 cpuTimeP99 wallTimeP50 wallTimeP99 }
      avg { sampleInterval }
      dimensions { datetimeMinute scriptVersion }
    } } }
}
""".strip()

_QUANTILES = {
    "cpu_time_p50": "cpuTimeP50",
    "cpu_time_p99": "cpuTimeP99",
    "wall_time_p99": "wallTimeP99",
}


@dataclass(frozen=True, slots=True)
class Row:
    """One minute of one version."""

    minute: datetime
    version: str
    requests: float
    errors: float
    quantiles: dict[str, float | None]


@dataclass
class _Query:
    done: anyio.Event = field(default_factory=anyio.Event)
    rows: list[Row] = field(default_factory=list)
    error: str | None = None


class CloudflareAnalytics:
    """Per-version Workers analytics for Cloudflare rules."""

    name = "cloudflare"

    def __init__(
        self,
        client: CloudflareClient,
        account_id: str,
        *,
        delay: timedelta = timedelta(minutes=3),
        longest_window: timedelta = timedelta(minutes=5),
    ) -> None:
        self._client = client
        self._account = account_id
        self._delay = delay
        self._longest = longest_window
        self._queries: dict[tuple[str, datetime, tuple[str, ...]], _Query] = {}

    def window(self, rule: Rule, at: datetime) -> tuple[datetime, datetime]:
        """The closed window judged at ``at``: whole minutes ending ``delay`` before it."""
        end = (at - self._delay).replace(second=0, microsecond=0)
        minutes = max(1, math.ceil(rule.window.total_seconds() / 60))
        return end - timedelta(minutes=minutes), end

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The rule's signal for the target version; failures are inconclusive."""
        assert rule.signal is not None
        start, end = self.window(rule, at)
        query = await self._rows(target, end)
        if query.error is not None:
            return Observation(rule.name, target.role, None, None, query.error)
        rows = [r for r in query.rows if r.version == target.version and start <= r.minute < end]
        if rule.compare is not None:
            # counts, for the canary-vs-stable test: a version idle in the window counts 0 of 0
            requests = sum(r.requests for r in rows)
            errors = sum(r.errors for r in rows)
            rate = errors / requests if requests else None
            return Observation(
                rule.name, target.role, rate, requests, events=errors, span=(start, end)
            )
        if not any(r.requests > 0 for r in rows):
            # no requests from this version in the window: nothing was measured
            window = f"{format_time(start)} .. {format_time(end)}"
            why = f"no data: no requests from {target.version} in {window}"
            return Observation(rule.name, target.role, None, 0.0, why)
        minutes = (end - start).total_seconds() / 60
        try:
            value, samples = _signal(rule.signal, rows, minutes)
        except KeyError as exc:
            why = f"analytics answer lacks {exc.args[0]} (a field Cloudflare does not document)"
            return Observation(rule.name, target.role, None, None, why)
        return Observation(rule.name, target.role, value, samples)

    async def _rows(self, target: Target, end: datetime) -> _Query:
        versions = tuple(sorted({target.canary, target.stable}))
        key = (target.script, end, versions)
        query = self._queries.get(key)
        if query is not None:
            await query.done.wait()
            return query
        self._forget_older(target.script, end)
        query = self._queries[key] = _Query()
        try:
            start = end - max(self._longest, timedelta(minutes=1))
            variables = {
                "accountTag": self._account,
                "script": target.script,
                "start": format_time(start),
                "end": format_time(end),
                "versions": list(versions),
            }
            data = await self._client.graphql(QUERY, variables)
            query.rows = _parse(data)
        except CloudflareError as exc:
            query.error = str(exc)
        except _Malformed as exc:
            query.error = f"malformed analytics answer: {exc}"
        except BaseException:
            # cancelled (a fetch timeout) or a bug: never leave an empty answer behind
            query.error = "analytics query did not complete"
            self._queries.pop(key, None)
            raise
        finally:
            query.done.set()
        return query

    def _forget_older(self, script: str, end: datetime) -> None:
        for key in [k for k in self._queries if k[0] == script and k[1] < end]:
            del self._queries[key]


class _Malformed(Exception):
    pass


def _parse(data: dict[str, Any]) -> list[Row]:
    try:
        accounts = data["viewer"]["accounts"]
        groups = accounts[0]["workersInvocationsAdaptive"] if accounts else []
    except (KeyError, TypeError, IndexError):
        raise _Malformed("no viewer.accounts[0].workersInvocationsAdaptive") from None
    if not isinstance(groups, list):
        raise _Malformed("workersInvocationsAdaptive is not a list")
    rows = []
    for group in groups:
        try:
            dims, sums = group["dimensions"], group["sum"]
            quantiles = group.get("quantiles") or {}
            minute = datetime.fromisoformat(_text(dims["datetimeMinute"]).replace("Z", "+00:00"))
            rows.append(
                Row(
                    minute,
                    _text(dims["scriptVersion"]),
                    _count(sums["requests"]),
                    _count(sums["errors"]),
                    {k: _number(quantiles.get(k)) for k in _QUANTILES.values() if k in quantiles},
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _Malformed(f"bad row ({type(exc).__name__}: {exc})") from None
    return rows


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _count(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"expected a count, got {value!r}")
    return float(value)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _signal(signal: str, rows: list[Row], minutes: float) -> tuple[float | None, float]:
    requests = sum(r.requests for r in rows)
    errors = sum(r.errors for r in rows)
    if signal == "requests":
        return requests, requests
    if signal == "errors":
        return errors, requests
    if signal == "errors_per_minute":
        return errors / minutes, requests
    if signal == "error_ratio":
        return errors / requests, requests
    name = _QUANTILES[signal]
    weighted = [(r.quantiles[name], r.requests) for r in rows if r.requests > 0]
    known = [(q, n) for q, n in weighted if q is not None]
    if not known:
        return None, requests
    return sum(q * n for q, n in known) / sum(n for _, n in known) / 1000.0, requests
