"""The Cloudflare analytics source: built-in per-version signals from GraphQL.

One query per closed window serves every Cloudflare rule of every live canary: the first
``fetch`` for a window asks for all the scripts whose rules asked lately (``scriptName_in``,
rows grouped by script, version and minute), and every other rule of that window, of any
script, reads its rows from the same answer; a script whose canary changed since asks again.
A malformed answer, or one that fills the whole page (it may have been cut short), is
inconclusive for every rule it was to serve. Without ``scriptName_in`` in Cloudflare's schema
the query is made per script, as before. The window closes ``delay`` before the evaluation
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
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
import structlog

from coalmine.cloudflare.client import CloudflareClient, CloudflareError
from coalmine.cloudflare.plan import ROWS_PER_QUERY, canaries_per_query
from coalmine.engine import Observation
from coalmine.engine.model import format_time
from coalmine.policy import Rule
from coalmine.sources import Target
from coalmine.store.records import NewNotification

log = structlog.get_logger("coalmine")
CHECK = "cloudflare_analytics_schema"  # its name in /health
MAX_ROWS = ROWS_PER_QUERY  # the dataset's page size
WANTED_FOR = timedelta(minutes=10)  # a script stays in the batch this long after it last asked
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


def query_for(
    quantiles: Iterable[str] = _QUANTILES.values(), *, batched: bool = False, limit: int = MAX_ROWS
) -> str:
    """coalmine's analytics query, asking for these quantiles (Cloudflare's names) only, for
    one script or (``batched``) rows of several, by script, at most ``limit`` rows."""
    wanted = " ".join(sorted(set(quantiles)))
    asked = f"\n      quantiles {{ {wanted} }}" if wanted else ""
    by = "datetimeMinute scriptName scriptVersion" if batched else "datetimeMinute scriptVersion"
    return f"""
query CoalmineCanary($accountTag: string!, $filter: {FILTER_TYPE}) {{
  viewer {{ accounts(filter: {{accountTag: $accountTag}}) {{
    workersInvocationsAdaptive(limit: {limit}, filter: $filter) {{
      sum {{ requests errors }}{asked}
      avg {{ sampleInterval }}
      dimensions {{ {by} }}
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
    script: str = ""

    @property
    def kept(self) -> tuple[float, float]:
        """The requests and errors actually sampled (the estimates ÷ the interval)."""
        return self.requests / self.sample_interval, self.errors / self.sample_interval


@dataclass
class _Query:
    done: anyio.Event = field(default_factory=anyio.Event)
    rows: list[Row] = field(default_factory=list)
    error: str | None = None
    covers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # script → versions asked
    _by: dict[tuple[str, str], list[Row]] | None = None
    # what ready() made of it: (rule name, script, role, version) → (rule, observation)
    made: dict[tuple[str, str, str, str], tuple[Rule, Observation]] = field(default_factory=dict)

    def of(self, script: str, version: str) -> list[Row]:
        """The rows of one script's version (indexed once: a batch has every canary's)."""
        if self._by is None:
            self._by = {}
            for row in self.rows:
                self._by.setdefault((row.script, row.version), []).append(row)
        return self._by.get((script, version), [])


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
        self._queries: dict[datetime, list[_Query]] = {}  # by the window's end
        self._answered: dict[tuple[datetime, str], _Query] = {}  # (end, script): the last
        self._wanted: dict[str, tuple[tuple[str, ...], datetime]] = {}  # versions, last end
        chosen = _QUANTILES if signals is None else set(signals) & set(_QUANTILES)
        self._quantiles = sorted({_QUANTILES[s] for s in chosen})
        self.query = query_for(self._quantiles)
        self.batch_query = query_for(self._quantiles, batched=True)
        self.schema_problem: str | None = None  # set by check_schema when a field is missing
        self.batched = True  # one query for every script (the schema has scriptName_in)
        self.queries = 0

    def cover(self, rules: Iterable[Rule]) -> bool:
        """Serve these rules too (a reload): the query spans their longest window if it is
        longer (never shorter: running rollouts keep their old rules) and asks for their
        signals' quantiles as well. Answers asked over the old span are forgotten, so no rule
        is judged on rows that were never asked for. True when the query's fields changed
        (Cloudflare's schema must be checked for them)."""
        rules = [r for r in rules if r.source == "cloudflare"]
        longest = max([self._longest, *(r.window for r in rules)])
        signals = {r.signal for r in rules if r.signal in _QUANTILES}
        quantiles = sorted({*self._quantiles, *(_QUANTILES[s] for s in signals if s)})
        if longest == self._longest and quantiles == self._quantiles:
            return False
        self._longest = longest
        self._queries.clear()
        self._answered.clear()
        if quantiles == self._quantiles:
            return False
        self._quantiles = quantiles
        self.query = query_for(quantiles)
        self.batch_query = query_for(quantiles, batched=True)
        return True

    async def check_schema(self) -> str | None:
        """Ask Cloudflare (introspection) whether its schema has every type and field the query
        uses; the problem naming the missing ones, or None. Raises CloudflareError when
        Cloudflare could not be asked."""
        data = await self._client.graphql(INTROSPECTION, {})
        missing = _missing(data, self._quantiles)
        self.batched = not missing_fields(data, ("scriptName_in",), {"dimensions": ("scriptName",)})
        if not self.batched:
            log.warning(
                "analytics: the schema has no scriptName_in or scriptName dimension;"
                " one query per script and window instead of one for all"
            )
        self.schema_problem = (
            "Cloudflare's analytics schema lacks " + ", ".join(missing) + " (see /health)"
            if missing
            else None
        )
        return self.schema_problem

    def window(self, rule: Rule, at: datetime) -> tuple[datetime, datetime]:
        """The closed window judged at ``at``: whole minutes ending ``delay`` before it."""
        return closed_window(rule, at, self._delay)

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The rule's signal for the target version; failures are inconclusive."""
        assert rule.signal is not None
        start, end = self.window(rule, at)
        if self.schema_problem is not None:
            return Observation(rule.name, target.role, None, None, self.schema_problem)
        return self._observation(rule, target, await self._rows(target, end), start, end)

    def ready(self, rule: Rule, target: Target, at: datetime) -> Observation | None:
        """The observation :meth:`fetch` would make, when the answer it needs is in already
        (most ticks: the window moves once a minute); None when it must be asked for."""
        if self.schema_problem is not None or rule.signal is None:
            return None
        start, end = self.window(rule, at)
        versions = tuple(sorted({target.canary, target.stable}))
        query = self._answered.get((end, target.script))
        if query is None or query.covers.get(target.script) != versions:
            return None
        self._wanted[target.script] = (versions, end)
        key = (rule.name, target.script, target.role, target.version)
        made = query.made.get(key)
        if made is None or made[0] is not rule:  # the same window gives the same answer
            made = query.made[key] = (rule, self._observation(rule, target, query, start, end))
        return made[1]

    def _observation(
        self, rule: Rule, target: Target, query: _Query, start: datetime, end: datetime
    ) -> Observation:
        assert rule.signal is not None
        if query.error is not None:
            return Observation(rule.name, target.role, None, None, query.error)
        # the rows of this script's version only (indexed once per answer)
        return observe(rule, target, (start, end), query.of(target.script, target.version))

    async def _rows(self, target: Target, end: datetime) -> _Query:
        versions = tuple(sorted({target.canary, target.stable}))
        self._wanted[target.script] = (versions, end)
        asked = self._queries.get(end, [])
        for query in asked:
            if query.covers.get(target.script) == versions:
                await query.done.wait()
                return query
        self._forget_older(end)
        query = _Query(covers=self._batch(target.script, versions, end, asked))
        self._queries.setdefault(end, []).append(query)
        try:
            query.rows = await self._ask(query.covers, end)
        except CloudflareError as exc:
            query.error = str(exc)
        except Malformed as exc:
            query.error = f"malformed analytics answer: {exc}"
        except BaseException:
            # cancelled (a fetch timeout) or a bug: never leave an empty answer behind
            query.error = "analytics query did not complete"
            with suppress(ValueError):
                self._queries.get(end, []).remove(query)
            raise
        finally:
            query.done.set()
        for script in query.covers:  # answered: later ticks find it at once (ready)
            self._answered[(end, script)] = query
        return query

    def _batch(
        self, script: str, versions: tuple[str, ...], end: datetime, asked: list[_Query]
    ) -> dict[str, tuple[str, ...]]:
        """This script and, batched, every other one that asked lately and is not asked yet."""
        covers = {script: versions}
        if not self.batched:
            return covers
        most = canaries_per_query(self._longest.total_seconds())  # what the budget plan counts
        for other, (wanted, last) in self._wanted.items():
            if len(covers) >= most:
                break
            if last < end - WANTED_FOR or other in covers:
                continue
            if not any(q.covers.get(other) == wanted for q in asked):
                covers[other] = wanted
        return covers

    async def _ask(self, covers: dict[str, tuple[str, ...]], end: datetime) -> list[Row]:
        start = end - max(self._longest, timedelta(minutes=1))
        span = {"datetime_geq": format_time(start), "datetime_lt": format_time(end)}
        versions = sorted({v for vs in covers.values() for v in vs})
        only = next(iter(covers)) if len(covers) == 1 else None
        where: dict[str, Any] = (  # one script: the query as Cloudflare's public examples make it
            {"scriptName": only, **span, "scriptVersion_in": versions}
            if only is not None
            else {"scriptName_in": sorted(covers), **span, "scriptVersion_in": versions}
        )
        variables = {"accountTag": self._account, "filter": where}
        self.queries += 1
        data = await self._client.graphql(
            self.query if only is not None else self.batch_query, variables
        )
        return parse_rows(data, only)

    def _forget_older(self, end: datetime) -> None:
        for key in sorted(self._queries)[:-2]:
            if key < end:
                del self._queries[key]
        for gone in [k for k in self._answered if k[0] not in self._queries]:
            del self._answered[gone]
        for script in [s for s, (_, last) in self._wanted.items() if last < end - WANTED_FOR]:
            del self._wanted[script]


class Malformed(Exception):
    """An analytics answer that does not have the shape the query asked for."""


class FullPage(Malformed):
    """An answer of as many rows as the query's limit: it may have been cut short."""


def parse_rows(data: dict[str, Any], script: str | None = None, limit: int = MAX_ROWS) -> list[Row]:
    """The rows of an answer; without ``script`` (a batch) each row names its script. An
    answer that fills the page (``limit`` rows) raises :class:`FullPage`."""
    try:
        accounts = data["viewer"]["accounts"]
        groups = accounts[0]["workersInvocationsAdaptive"] if accounts else []
    except (KeyError, TypeError, IndexError):
        raise Malformed("no viewer.accounts[0].workersInvocationsAdaptive") from None
    if not isinstance(groups, list):
        raise Malformed("workersInvocationsAdaptive is not a list")
    if len(groups) >= limit:
        raise FullPage(f"{len(groups)} rows: a full page may have been cut short")
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
                    script if script is not None else _text(dims["scriptName"]),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise Malformed(f"bad row ({type(exc).__name__}: {exc})") from None
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
    needed = {**GROUP_FIELDS, **({"quantiles": tuple(quantiles)} if quantiles else {})}
    return missing_fields(data, FILTER_FIELDS, needed)


def missing_fields(
    data: dict[str, Any], filters: Iterable[str], needed: dict[str, tuple[str, ...]]
) -> list[str]:
    """The filter fields and group fields (by part: ``sum``, ``dimensions``, ...) that an
    answer to :data:`INTROSPECTION` lacks, named as Cloudflare's types spell them."""
    if not isinstance(data.get("filter"), dict):
        return [f"the filter type {FILTER_TYPE}"]
    have = {f.get("name") for f in data["filter"].get("inputFields") or [] if isinstance(f, dict)}
    missing = [f"{FILTER_TYPE}.{name}" for name in filters if name not in have]
    if not isinstance(data.get("group"), dict):
        return [*missing, f"the group type {GROUP_TYPE}"]
    parts = {
        f.get("name"): f.get("type") or {}
        for f in data["group"].get("fields") or []
        if isinstance(f, dict)
    }
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


def closed_window(rule: Rule, at: datetime, delay: timedelta) -> tuple[datetime, datetime]:
    """The closed window judged at ``at``: the rule's window in whole minutes, ending ``delay``
    before ``at`` (rounded down to the minute)."""
    end = (at - delay).replace(second=0, microsecond=0)
    minutes = max(1, math.ceil(rule.window.total_seconds() / 60))
    return end - timedelta(minutes=minutes), end


def observe(
    rule: Rule, target: Target, window: tuple[datetime, datetime], rows: Iterable[Row]
) -> Observation:
    """The rule's observation of the target version over ``window``, from rows that may hold
    other versions, scripts and minutes (the live source's and the backtest's one reading)."""
    assert rule.signal is not None
    start, end = window
    mine = [
        r
        for r in rows
        if r.version == target.version and r.script == target.script and start <= r.minute < end
    ]
    if rule.compare is not None:
        # counts, for the canary-vs-stable test: a version idle in the window counts 0 of 0;
        # sampled windows count what was kept, not the estimates
        requests = sum(r.kept[0] for r in mine)
        errors = sum(r.kept[1] for r in mine)
        rate = errors / requests if requests else None
        return Observation(rule.name, target.role, rate, requests, events=errors, span=window)
    if not any(r.requests > 0 for r in mine):
        # no requests from this version in the window: nothing was measured
        span = f"{format_time(start)} .. {format_time(end)}"
        why = f"no data: no requests from {target.version} in {span}"
        return Observation(rule.name, target.role, None, 0.0, why)
    minutes = (end - start).total_seconds() / 60
    try:
        value, samples = _signal(rule.signal, mine, minutes)
    except KeyError as exc:
        why = f"analytics answer lacks {exc.args[0]} (a field Cloudflare does not document)"
        return Observation(rule.name, target.role, None, None, why)
    return Observation(rule.name, target.role, value, samples)


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
