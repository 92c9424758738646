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

Cloudflare samples its adaptive datasets: a row's ``avg { sampleInterval }`` of ``k`` means one
invocation in ``k`` was kept and its sums are estimates (kept times ``k``). Values (requests,
errors, ratios, quantiles) use the estimates; the sample count of every signal, and the counts
a compare rule tests, are the invocations actually kept (each row's sums ÷ its interval), so
``min_samples`` counts measured invocations and a sampled window is never taken for more
evidence than it holds. Without sampling (``k`` = 1) both are the version's requests.

The query passes its filter as one variable of Cloudflare's input-object type
(``AccountWorkersInvocationsAdaptiveFilter_InputObject``), so it declares no scalar type whose
name public queries disagree on (``Time`` or ``string``). :meth:`CloudflareAnalytics.check_schema`
asks Cloudflare by introspection whether the filter and group types have every field the query
uses; a missing one makes every Cloudflare rule inconclusive with a reason naming it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio

from coalmine.cloudflare.client import CloudflareClient, CloudflareError
from coalmine.engine import Observation
from coalmine.engine.model import format_time
from coalmine.policy import Rule
from coalmine.sources import Target
from coalmine.store.records import NewNotification

CHECK = "cloudflare_analytics_schema"  # its name in /health
FILTER_TYPE = "AccountWorkersInvocationsAdaptiveFilter_InputObject"
GROUP_TYPE = "AccountWorkersInvocationsAdaptive"
_QUANTILES = {
    "cpu_time_p50": "cpuTimeP50",
    "cpu_time_p99": "cpuTimeP99",
    "wall_time_p99": "wallTimeP99",
}
# what the query needs of Cloudflare's schema, by the group's field (quantiles: as asked)
FILTER_FIELDS = ("scriptName", "datetime_geq", "datetime_lt", "scriptVersion_in")
GROUP_FIELDS = {
    "sum": ("requests", "errors"),
    "avg": ("sampleInterval",),
    "dimensions": ("datetimeMinute", "scriptVersion"),
}
INTROSPECTION = f"""
query CoalmineSchemaCheck {{
  filter: __type(name: "{FILTER_TYPE}") {{ inputFields {{ name }} }}
  group: __type(name: "{GROUP_TYPE}") {{
    fields {{ name type {{ name fields {{ name }} ofType {{ name fields {{ name }} }} }} }}
  }}
}}
""".strip()


def schema_page(problem: str) -> NewNotification:
    """The one warning page saying the analytics query does not fit Cloudflare's schema."""
    key = f"coalmine/{CHECK}"
    event = {
        "event_action": "trigger",
        "dedup_key": key,
        "payload": {
            "summary": f"coalmine: every Cloudflare rule is inconclusive: {problem}"[:1024],
            "source": "coalmine",
            "severity": "warning",
            "class": CHECK,
            "custom_details": {"problem": problem},
        },
    }
    return NewNotification("pagerduty", event, key)


def query_for(quantiles: Iterable[str] = _QUANTILES.values()) -> str:
    """coalmine's analytics query, asking for these quantiles (Cloudflare's names) only."""
    wanted = " ".join(sorted(set(quantiles)))
    asked = f"\n      quantiles {{ {wanted} }}" if wanted else ""
    return f"""
query CoalmineCanary($accountTag: string!, $filter: {FILTER_TYPE}) {{
  viewer {{ accounts(filter: {{accountTag: $accountTag}}) {{
    workersInvocationsAdaptive(limit: 10000, filter: $filter) {{
      sum {{ requests errors }}{asked}
      avg {{ sampleInterval }}
      dimensions {{ datetimeMinute scriptVersion }}
    }} }} }}
}}
""".strip()


QUERY = query_for()


@dataclass(frozen=True, slots=True)
class Row:
    """One minute of one version."""

    minute: datetime
    version: str
    requests: float  # estimates when sampled
    errors: float
    quantiles: dict[str, float | None]
    sample_interval: float = 1.0  # one invocation in this many was kept

    @property
    def kept(self) -> tuple[float, float]:
        """The requests and errors actually sampled (the estimates ÷ the interval)."""
        return self.requests / self.sample_interval, self.errors / self.sample_interval


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
        signals: Iterable[str] | None = None,
    ) -> None:
        self._client = client
        self._account = account_id
        self._delay = delay
        self._longest = longest_window
        self._queries: dict[tuple[str, datetime, tuple[str, ...]], _Query] = {}
        chosen = _QUANTILES if signals is None else set(signals) & set(_QUANTILES)
        self._quantiles = sorted({_QUANTILES[s] for s in chosen})
        self.query = query_for(self._quantiles)
        self.schema_problem: str | None = None  # set by check_schema when a field is missing

    async def check_schema(self) -> str | None:
        """Ask Cloudflare (introspection) whether its schema has every type and field the query
        uses; the problem naming the missing ones, or None. Raises CloudflareError when
        Cloudflare could not be asked."""
        data = await self._client.graphql(INTROSPECTION, {})
        missing = _missing(data, self._quantiles)
        self.schema_problem = (
            "Cloudflare's analytics schema lacks " + ", ".join(missing) + " (see /health)"
            if missing
            else None
        )
        return self.schema_problem

    def window(self, rule: Rule, at: datetime) -> tuple[datetime, datetime]:
        """The closed window judged at ``at``: whole minutes ending ``delay`` before it."""
        end = (at - self._delay).replace(second=0, microsecond=0)
        minutes = max(1, math.ceil(rule.window.total_seconds() / 60))
        return end - timedelta(minutes=minutes), end

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The rule's signal for the target version; failures are inconclusive."""
        assert rule.signal is not None
        start, end = self.window(rule, at)
        if self.schema_problem is not None:
            return Observation(rule.name, target.role, None, None, self.schema_problem)
        query = await self._rows(target, end)
        if query.error is not None:
            return Observation(rule.name, target.role, None, None, query.error)
        rows = [r for r in query.rows if r.version == target.version and start <= r.minute < end]
        if rule.compare is not None:
            # counts, for the canary-vs-stable test: a version idle in the window counts 0 of 0;
            # sampled windows count what was kept, not the estimates
            requests = sum(r.kept[0] for r in rows)
            errors = sum(r.kept[1] for r in rows)
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
                "filter": {
                    "scriptName": target.script,
                    "datetime_geq": format_time(start),
                    "datetime_lt": format_time(end),
                    "scriptVersion_in": list(versions),
                },
            }
            data = await self._client.graphql(self.query, variables)
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
            interval = (group.get("avg") or {}).get("sampleInterval", 1)
            minute = datetime.fromisoformat(_text(dims["datetimeMinute"]).replace("Z", "+00:00"))
            rows.append(
                Row(
                    minute,
                    _text(dims["scriptVersion"]),
                    _count(sums["requests"]),
                    _count(sums["errors"]),
                    {k: _number(quantiles.get(k)) for k in _QUANTILES.values() if k in quantiles},
                    _interval(interval),
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


def _interval(value: Any) -> float:
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value < math.inf:
        raise ValueError(f"expected a sample interval of at least 1, got {value!r}")
    return float(value)


def _missing(data: dict[str, Any], quantiles: list[str]) -> list[str]:
    """The types and fields the query needs that an introspection answer lacks."""
    if not isinstance(data.get("filter"), dict):
        return [f"the filter type {FILTER_TYPE}"]
    have = {f.get("name") for f in data["filter"].get("inputFields") or [] if isinstance(f, dict)}
    missing = [f"{FILTER_TYPE}.{name}" for name in FILTER_FIELDS if name not in have]
    if not isinstance(data.get("group"), dict):
        return [*missing, f"the group type {GROUP_TYPE}"]
    parts = {
        f.get("name"): f.get("type") or {}
        for f in data["group"].get("fields") or []
        if isinstance(f, dict)
    }
    needed = {**GROUP_FIELDS, **({"quantiles": tuple(quantiles)} if quantiles else {})}
    for part, names in needed.items():
        if part not in parts:
            missing.append(f"{GROUP_TYPE}.{part}")
            continue
        kind = parts[part]
        kind = kind if kind.get("fields") is not None else (kind.get("ofType") or {})
        fields = {f.get("name") for f in kind.get("fields") or [] if isinstance(f, dict)}
        type_name = kind.get("name") or part
        missing += [f"{type_name}.{name}" for name in names if name not in fields]
    return missing


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _signal(signal: str, rows: list[Row], minutes: float) -> tuple[float | None, float]:
    """The signal's value (from the estimates) and its sample count (invocations kept)."""
    requests = sum(r.requests for r in rows)
    errors = sum(r.errors for r in rows)
    kept = sum(r.kept[0] for r in rows)
    if signal == "requests":
        return requests, kept
    if signal == "errors":
        return errors, kept
    if signal == "errors_per_minute":
        return errors / minutes, kept
    if signal == "error_ratio":
        return errors / requests, kept
    name = _QUANTILES[signal]
    weighted = [(r.quantiles[name], r.requests) for r in rows if r.requests > 0]
    known = [(q, n) for q, n in weighted if q is not None]
    if not known:
        return None, kept
    return sum(q * n for q, n in known) / sum(n for _, n in known) / 1000.0, kept
