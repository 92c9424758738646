"""One analytics query per window for every live canary's Cloudflare rules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.cloudflare.plan import Group, budgets
from coalmine.engine import Observation
from coalmine.retry import RetryPolicy
from coalmine.sources import Target
from coalmine.sources.cloudflare import CloudflareAnalytics
from tests.unit.test_budget_plan import ACCOUNT
from tests.unit.test_cloudflare_analytics import rule

pytestmark = pytest.mark.anyio
AT = datetime(2026, 3, 3, 18, 10, 30, tzinfo=UTC)
SCRIPTS = [f"s{i}" for i in range(5)]


def target(script: str, role: str = "canary") -> Target:
    """The canary (or stable) of a script: versions named after it."""
    canary, stable = f"{script}-new", f"{script}-old"
    return Target(script, role, canary if role == "canary" else stable, canary, stable)


def group(script: str, version: str, minute: int, requests: int, errors: int) -> dict[str, Any]:
    """One row of a batched answer."""
    return {
        "sum": {"requests": requests, "errors": errors},
        "avg": {"sampleInterval": 1},
        "dimensions": {
            "datetimeMinute": f"2026-03-03T18:{minute:02d}:00Z",
            "scriptName": script,
            "scriptVersion": version,
        },
    }


def rows_for(scripts: list[str]) -> list[dict[str, Any]]:
    """Script i's canary: 10 * (i + 1) requests and i errors a minute; its stable 100 and none."""
    out = []
    for i, script in enumerate(scripts):
        for minute in range(3, 9):
            out.append(group(script, f"{script}-new", minute, 10 * (i + 1), i))
            out.append(group(script, f"{script}-old", minute, 100, 0))
    return out


def ok(body: dict[str, Any]) -> httpx.Response:
    """A 200 carrying the answer to the query in ``body``: rows of the scripts it asks for."""
    where = body["variables"]["filter"]
    scripts = where.get("scriptName_in") or [where["scriptName"]]
    rows = rows_for(SCRIPTS)
    rows = [r for r in rows if r["dimensions"]["scriptName"] in scripts]
    if "scriptName_in" not in where:
        for r in rows:
            del r["dimensions"]["scriptName"]
    return httpx.Response(
        200, json={"data": {"viewer": {"accounts": [{"workersInvocationsAdaptive": rows}]}}}
    )


async def fetch_scripts(
    handler: Callable[[dict[str, Any]], httpx.Response],
    waves: list[list[str]],
    source_set: Callable[[CloudflareAnalytics], None] = lambda s: None,
) -> tuple[list[dict[str, Any]], list[list[Observation]]]:
    """Each wave: every script's canary and stable fetched concurrently at AT through one source
    (a wave after the first: the scripts' later ticks in the same minute)."""
    sent: list[dict[str, Any]] = []

    def transport(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        return handler(body)

    out: list[list[Observation]] = []
    async with httpx.AsyncClient(transport=httpx.MockTransport(transport)) as http:
        client = CloudflareClient(
            http,
            base_url="https://cf/client/v4",
            account_id="acc",
            token="t",
            limiter=TokenBucket(600),
            retry=RetryPolicy(1),
        )
        source = CloudflareAnalytics(client, "acc", longest_window=timedelta(minutes=2))
        source_set(source)
        for i, wave in enumerate(waves):
            got: list[Observation] = []

            async def one(script: str, role: str, at: datetime, into: list[Observation]) -> None:
                into.append(await source.fetch(rule("errors"), target(script, role), at))

            async with anyio.create_task_group() as tg:
                for script in wave:
                    for role in ("canary", "stable"):
                        tg.start_soon(one, script, role, AT + timedelta(seconds=i), got)
            out.append(got)
    return sent, out


async def test_a_canary_new_in_a_window_asks_once_and_its_later_ticks_share_the_answer() -> None:
    """Canaries never seen before each ask for themselves at their first tick; their later
    ticks in the same window read the answers already there, each from its own rows."""
    sent, waves = await fetch_scripts(ok, [[s] for s in SCRIPTS] + [[s] for s in SCRIPTS])
    assert len(sent) == len(SCRIPTS)
    for i, wave in enumerate(waves):
        canary = next(o for o in wave if o.role == "canary")
        assert canary.error is None and canary.value == 2 * (i % len(SCRIPTS))


@asynccontextmanager
async def recording(**kwargs: Any) -> AsyncIterator[tuple[CloudflareAnalytics, list[Any]]]:
    """A source (``kwargs`` its options) on a transport answering :func:`ok`, and the bodies
    of the queries it sent."""
    sent: list[dict[str, Any]] = []

    def transport(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        return ok(body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(transport)) as http:
        client = CloudflareClient(
            http,
            base_url="https://cf/client/v4",
            account_id="acc",
            token="t",
            limiter=TokenBucket(600),
            retry=RetryPolicy(1),
        )
        yield CloudflareAnalytics(client, "acc", **kwargs), sent


async def next_window(longest: timedelta) -> tuple[list[dict[str, Any]], dict[str, Observation]]:
    """Every script's first tick a window before, then its canary and stable at the next: the
    queries sent for the next window, and what each got."""
    seen: dict[str, Observation] = {}
    async with recording(longest_window=longest) as (source, sent):
        for script in SCRIPTS:  # their first ticks, a window earlier
            await source.fetch(rule("errors"), target(script), AT - timedelta(minutes=1))
        before = len(sent)
        for script in SCRIPTS:
            for role in ("canary", "stable"):
                seen[f"{script}/{role}"] = await source.fetch(
                    rule("errors"), target(script, role), AT + timedelta(minutes=1)
                )
    return sent[before:], seen


async def test_one_query_per_window_once_the_canaries_are_known() -> None:
    """At the next window every known canary's rules are served by one query, each script's
    observations from its own rows."""
    batch, seen = await next_window(timedelta(minutes=2))
    assert len(batch) == 1
    where = batch[0]["variables"]["filter"]
    assert where["scriptName_in"] == SCRIPTS
    assert "scriptName scriptVersion" in batch[0]["query"]
    for i, script in enumerate(SCRIPTS):
        assert seen[f"{script}/canary"].value == 2 * i  # its own errors, two minutes
        assert seen[f"{script}/canary"].samples == 2 * 10 * (i + 1)
        assert seen[f"{script}/stable"].value == 0


async def test_a_malformed_batch_is_inconclusive_for_every_rule() -> None:
    """A batched answer with a row lacking its script name: every canary's rules are
    inconclusive (never a pass on a guess)."""

    def broken(body: dict[str, Any]) -> httpx.Response:
        answer = ok(body)
        data = answer.json()
        rows = data["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]
        if rows and "scriptName_in" in body["variables"]["filter"]:
            del rows[0]["dimensions"]["scriptName"]
        return httpx.Response(200, json=data)

    later = AT + timedelta(minutes=1)
    observations: list[Observation] = []
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda r: broken(json.loads(r.content)))
    ) as http:
        client = CloudflareClient(
            http,
            base_url="https://cf/client/v4",
            account_id="acc",
            token="t",
            limiter=TokenBucket(600),
            retry=RetryPolicy(1),
        )
        source = CloudflareAnalytics(client, "acc", longest_window=timedelta(minutes=2))
        for script in SCRIPTS:
            await source.fetch(rule("errors"), target(script), AT - timedelta(minutes=1))
        for script in SCRIPTS:
            for role in ("canary", "stable"):
                observations.append(await source.fetch(rule("errors"), target(script, role), later))
    assert len(observations) == 2 * len(SCRIPTS)
    for obs in observations:
        assert obs.value is None and obs.error is not None
        assert obs.error.startswith("malformed analytics answer")


async def test_without_script_name_in_each_script_asks_for_itself() -> None:
    """A schema without scriptName_in (batched=False): one query per script and window, as
    before."""

    def per_script(source: CloudflareAnalytics) -> None:
        source.batched = False

    sent, waves = await fetch_scripts(ok, [SCRIPTS, SCRIPTS], per_script)
    assert len(sent) == len(SCRIPTS)
    assert all("scriptName" in s["variables"]["filter"] for s in sent)
    assert all("scriptName_in" not in s["variables"]["filter"] for s in sent)
    assert all(o.error is None for wave in waves for o in wave)


async def test_canaries_beyond_a_page_of_rows_ask_as_many_queries_as_the_plan_counts() -> None:
    """A day-long window fills a page with two canaries' rows: the five known canaries are
    asked in three queries, each script's observation from its own rows; the budget plan
    counts those three per interval, not one."""
    sent, seen = await next_window(timedelta(days=1))
    batches = [b["variables"]["filter"].get("scriptName_in", ["one"]) for b in sent]
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(s for b in batches for s in b if s != "one") == SCRIPTS[:4]
    assert [seen[f"{s}/canary"].value for s in SCRIPTS] == [2 * i for i in range(len(SCRIPTS))]
    planned = Group("p", 30.0, True, live=len(SCRIPTS), idle=0, window=86400.0)
    _, graphql = budgets(ACCOUNT._replace(groups=(planned,)))
    assert dict(graphql.parts)["analytics"] == len(batches) * 300 / 30


async def test_a_reload_with_a_longer_window_or_a_new_signal_asks_anew() -> None:
    """A source built for 2-minute windows and error counts: covering a 10-minute rule (a
    reload) forgets the answer already in and asks over 10 minutes, at the same window end; a
    quantile signal changes the query's fields (True: the schema must be checked)."""
    async with recording(longest_window=timedelta(minutes=2), signals={"errors"}) as (
        source,
        sent,
    ):
        await source.fetch(rule("errors"), target("s0"), AT)
        assert source.cover([rule("errors", "2m")]) is False
        longer = rule("errors", "10m")
        assert source.cover([longer]) is False  # the same fields, a longer span
        await source.fetch(longer, target("s0"), AT)
        assert source.cover([rule("cpu_time_p99")]) is True
        assert "cpuTimeP99" in source.query and "cpuTimeP99" in source.batch_query
    spans = [
        datetime.fromisoformat(s["variables"]["filter"]["datetime_lt"])
        - datetime.fromisoformat(s["variables"]["filter"]["datetime_geq"])
        for s in sent
    ]
    assert spans == [timedelta(minutes=2), timedelta(minutes=10)]
