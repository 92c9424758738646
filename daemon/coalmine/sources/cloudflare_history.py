"""Cloudflare rules over a past range, for ``coalmine backtest``: rows fetched once, windows
answered from them.

The live source (:mod:`coalmine.sources.cloudflare`) asks GraphQL for each closed window as
its tick comes; a backtest knows every tick in advance, so :meth:`CloudflareHistory.load` asks
once for the per-minute rows of the script's two versions over the whole range the ticks'
windows cover, in as few queries as Cloudflare allows: each at most the dataset's
``maxDuration`` wide and expecting fewer rows than its ``maxPageSize`` (one row a minute and
version), both read from the account's ``settings`` node (Cloudflare's defaults when it has
none). :meth:`CloudflareHistory.fetch` then answers each tick's window from those rows through
the live source's own :func:`~coalmine.sources.cloudflare.closed_window` and
:func:`~coalmine.sources.cloudflare.observe`: the same window arithmetic, signals, sampling and
"no data" rule.

A query fails as a live one does: the client retries 429s, 5xx and network errors by its
rules, waiting up to :data:`MAX_WAIT` for the GraphQL budget (a backtest has no tick to keep);
whatever still fails makes every window that touches its range inconclusive, with the reason.
An answer that fills the page may have been cut short: its range is asked again in halves (at
most :data:`MAX_SPLITS` times), and what is still full is inconclusive, never truncated.

Cloudflare picks a sampling resolution per query (its adaptive bit rate: by range, rows and
load), so a day-long query may keep fewer invocations than the live five-minute ones did. Each
row says its own ``sampleInterval`` and is read as the live source reads it: values from the
estimates, sample counts from what was kept, so a coarser answer can only make a window less
conclusive (``min_samples``), never more; the fetch report says how coarse it was.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from coalmine.cloudflare.client import CloudflareClient, CloudflareError
from coalmine.engine import Observation
from coalmine.engine.model import format_time
from coalmine.policy import Rule
from coalmine.sources import Target
from coalmine.sources.cloudflare import (
    MAX_ROWS,
    FullPage,
    Malformed,
    Row,
    closed_window,
    observe,
    parse_rows,
    query_for,
)

MINUTE = timedelta(minutes=1)
DEFAULT_MAX_DURATION = timedelta(days=1)  # when the settings node does not say
MAX_WAIT = 360.0  # seconds a query may wait for the GraphQL budget: past a 5-minute block
MAX_SPLITS = 4  # a full page is asked again in halves at most this deep
SETTINGS = """
query CoalmineDatasetSettings($accountTag: string!) {
  viewer { accounts(filter: {accountTag: $accountTag}) {
    settings { workersInvocationsAdaptive { maxDuration maxPageSize } } } }
}
""".strip()


@dataclass(frozen=True, slots=True)
class Limits:
    """How wide a range and how many rows one query may ask for."""

    max_duration: timedelta = DEFAULT_MAX_DURATION
    page_size: int = MAX_ROWS
    source: str = "Cloudflare's settings node"


@dataclass
class _Span:
    """One range asked for: fetched (its rows kept by script and version), or why not."""

    start: datetime
    end: datetime
    error: str | None = None


@dataclass
class _Versions:
    """One version's rows, by minute."""

    minutes: list[datetime] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)


class CloudflareHistory:
    """Cloudflare rules for a backtest: :meth:`load` the range, then :meth:`fetch` each tick."""

    name = "cloudflare"

    def __init__(
        self,
        client: CloudflareClient,
        account_id: str,
        *,
        delay: timedelta = timedelta(minutes=3),
        report: Callable[[str], None] | None = None,
    ) -> None:
        self._client = client
        self._account = account_id
        self._delay = delay
        self._report = report or (lambda _line: None)
        self._spans: dict[tuple[str, tuple[str, ...]], list[_Span]] = {}
        self._rows: dict[tuple[str, str], _Versions] = {}
        self.limits: Limits | None = None
        self.queries = 0  # GraphQL queries sent for rows (the settings query not counted)
        self.rows = 0
        self.failed = 0

    def span(self, rules: Sequence[Rule], times: Sequence[datetime]) -> tuple[datetime, datetime]:
        """The whole minutes every rule's window at every time covers."""
        first = [closed_window(rule, times[0], self._delay)[0] for rule in rules]
        return min(first), max(closed_window(rule, times[-1], self._delay)[1] for rule in rules)

    async def load(
        self, script: str, versions: Sequence[str], rules: Sequence[Rule], times: Sequence[datetime]
    ) -> None:
        """Fetch the rows of ``versions`` of ``script`` for every window of ``rules`` at
        ``times``; never raises for a remote failure (the windows it touches are inconclusive)."""
        if not rules or not times:
            return
        start, end = self.span(rules, times)
        if self.limits is None:
            self.limits = await self._limits()
        wanted = tuple(sorted(set(versions)))
        chunks = plan(start, end, self.limits, len(wanted))
        self._report(
            f"cloudflare: {script} ({', '.join(wanted)}) from {format_time(start)} to "
            f"{format_time(end)}: {len(chunks)} GraphQL quer{'y' if len(chunks) == 1 else 'ies'}"
            f" (at most {_hours(self.limits.max_duration)} and {self.limits.page_size} rows"
            f" each, from {self.limits.source})"
        )
        before = (self.queries, self.rows, self.failed)
        for low, high in chunks:
            await self._fetch(script, wanted, low, high, depth=0)
        for held in self._rows.values():  # by minute, for fetch's bisection
            held.rows.sort(key=lambda row: row.minute)
            held.minutes = [row.minute for row in held.rows]
        queries, rows, failed = (
            self.queries - before[0],
            self.rows - before[1],
            self.failed - before[2],
        )
        sampled = max((r.sample_interval for h in self._rows.values() for r in h.rows), default=1)
        self._report(
            f"cloudflare: fetched {rows} rows in {queries} quer{'y' if queries == 1 else 'ies'}"
            + (f"; sampled, as few as 1 in {sampled:g} kept" if sampled > 1 else "")
            + (f"; {failed} failed: the windows they cover are inconclusive" if failed else "")
        )

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        """The rule's signal for the target version at ``at``, from the loaded rows; a window
        that touches a failed or unloaded range is inconclusive."""
        start, end = closed_window(rule, at, self._delay)
        covered = start
        versions = tuple(sorted({target.canary, target.stable}))
        for span in self._spans.get((target.script, versions), []):
            if span.end <= start or span.start >= end:
                continue
            if span.error is not None:
                return Observation(rule.name, target.role, None, None, span.error)
            if span.start <= covered:
                covered = max(covered, span.end)
        if covered < end:
            why = f"analytics not loaded for {format_time(start)} .. {format_time(end)}"
            return Observation(rule.name, target.role, None, None, why)
        held = self._rows.get((target.script, target.version), _Versions())
        low = bisect.bisect_left(held.minutes, start)
        high = bisect.bisect_left(held.minutes, end)
        return observe(rule, target, (start, end), held.rows[low:high])

    async def _limits(self) -> Limits:
        """The dataset's range and page limits, from the settings node, else the defaults."""
        try:
            data = await self._client.graphql(
                SETTINGS, {"accountTag": self._account}, max_wait=MAX_WAIT
            )
        except CloudflareError as exc:
            return self._defaults(str(exc))
        try:
            node = data["viewer"]["accounts"][0]["settings"]["workersInvocationsAdaptive"]
            seconds, page = node["maxDuration"], node["maxPageSize"]
        except (KeyError, IndexError, TypeError):
            return self._defaults("no settings.workersInvocationsAdaptive in the answer")
        if not (_positive(seconds) and _positive(page)):
            return self._defaults(f"maxDuration {seconds!r}, maxPageSize {page!r}")
        return Limits(timedelta(seconds=seconds), min(page, MAX_ROWS))

    def _defaults(self, why: str) -> Limits:
        self._report(f"cloudflare: the dataset's limits are unknown ({why}); using defaults")
        return Limits(source="defaults: the settings node did not say")

    async def _fetch(
        self, script: str, versions: tuple[str, ...], start: datetime, end: datetime, *, depth: int
    ) -> None:
        assert self.limits is not None
        limit = self.limits.page_size
        where: dict[str, Any] = {
            "scriptName": script,
            "datetime_geq": format_time(start),
            "datetime_lt": format_time(end),
            "scriptVersion_in": list(versions),
        }
        self.queries += 1
        error: str | None = None
        try:
            data = await self._client.graphql(
                query_for(limit=limit),
                {"accountTag": self._account, "filter": where},
                max_wait=MAX_WAIT,
            )
            rows = parse_rows(data, script, limit)
        except FullPage as exc:
            halves = split(start, end)
            if depth < MAX_SPLITS and halves is not None:
                self._report(f"cloudflare: {exc} for {_range(start, end)}; asking in halves")
                for low, high in halves:
                    await self._fetch(script, versions, low, high, depth=depth + 1)
                return
            error = f"malformed analytics answer: {exc}"
        except CloudflareError as exc:
            error = str(exc)
        except Malformed as exc:
            error = f"malformed analytics answer: {exc}"
        spans = self._spans.setdefault((script, versions), [])
        if error is not None:
            self.failed += 1
            self._report(f"cloudflare: query for {_range(start, end)} failed: {error}")
            spans.append(_Span(start, end, f"{error} (backtest query {_range(start, end)})"))
            return
        spans.append(_Span(start, end))
        self.rows += len(rows)
        for row in rows:
            self._rows.setdefault((row.script, row.version), _Versions()).rows.append(row)


def plan(
    start: datetime, end: datetime, limits: Limits, versions: int
) -> list[tuple[datetime, datetime]]:
    """``[start, end)`` in whole-minute ranges, each within the limits: at most
    ``max_duration`` wide and expecting fewer rows than a page (a row a minute and version)."""
    by_rows = max(1, (limits.page_size - 1) // max(1, versions))
    by_time = max(1, int(limits.max_duration / MINUTE))
    step = min(by_rows, by_time) * MINUTE
    out = []
    low = start
    while low < end:
        out.append((low, min(end, low + step)))
        low += step
    return out


def split(start: datetime, end: datetime) -> tuple[tuple[datetime, datetime], ...] | None:
    """``[start, end)`` in two whole-minute halves; None for a single minute."""
    minutes = int((end - start) / MINUTE)
    if minutes < 2:
        return None
    middle = start + (minutes // 2) * MINUTE
    return (start, middle), (middle, end)


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _hours(span: timedelta) -> str:
    return f"{span.total_seconds() / 3600:g}h"


def _range(start: datetime, end: datetime) -> str:
    return f"{format_time(start)} .. {format_time(end)}"
