"""Account-wide discovery: the signal's parsing, which scripts it wakes, and when a tick reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import httpx
import pytest

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient, LiveDeployment
from coalmine.cloudflare.discovery import (
    MAX_ROWS,
    Discovery,
    Malformed,
    Mode,
    Watch,
    serving,
)
from coalmine.cloudflare.plan import Group, budgets
from coalmine.retry import RetryPolicy
from tests.unit.test_budget_plan import ACCOUNT

NOW = datetime(2026, 3, 3, 18, 10, 5, tzinfo=UTC)
MINUTE = timedelta(minutes=1)


def deployment(*versions: tuple[str, float]) -> LiveDeployment:
    """A live deployment of these versions."""
    return LiveDeployment("d", "2026-03-03T18:00:00Z", tuple(versions))


def groups(*rows: tuple[str, str, int]) -> list[dict[str, Any]]:
    """GraphQL groups of (script, version, requests)."""
    return [
        {"sum": {"requests": n}, "dimensions": {"scriptName": s, "scriptVersion": v}}
        for s, v, n in rows
    ]


def answer(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The data of an answer carrying these groups."""
    return {"viewer": {"accounts": [{"workersInvocationsAdaptive": rows}]}}


class FakeLoop:
    """A loop that counts its wakes."""

    def __init__(self, idle: bool = True) -> None:
        self.woken = 0
        self._idle = idle

    def wake(self) -> None:
        """Count."""
        self.woken += 1

    @property
    def idle(self) -> bool:
        """As constructed."""
        return self._idle


def watch_of(**live: tuple[str, ...]) -> tuple[Watch, dict[str, FakeLoop]]:
    """A watch over scripts whose deployments were read with these versions."""
    watch = Watch()
    loops = {}
    for script, versions in live.items():
        loops[script] = FakeLoop()
        watch.add(script, loops[script])
        share = 100 / len(versions)
        watch.saw(script, deployment(*((v, share) for v in versions)), NOW - 10 * MINUTE)
    return watch, loops


# ---- the answer ---------------------------------------------------------------------------


def test_serving_versions_are_those_with_requests() -> None:
    """Rows with requests name the versions serving; a row of zero requests does not."""
    data = answer(groups(("a", "v1", 10), ("a", "v2", 3), ("b", "w1", 0), ("b", "w2", 1)))
    assert serving(data) == {"a": {"v1", "v2"}, "b": {"w2"}}


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"viewer": {"accounts": [{}]}},
        answer([{"sum": {}, "dimensions": {"scriptName": "a", "scriptVersion": "v"}}]),
        answer([{"sum": {"requests": 1}, "dimensions": {"scriptVersion": "v"}}]),
        answer(groups(("a", "v", -1))),
        answer([{"sum": {"requests": "1"}, "dimensions": {"scriptName": "a", "scriptVersion": 2}}]),
        answer(groups(*[("a", f"v{i}", 1) for i in range(MAX_ROWS)])),
    ],
)
def test_a_malformed_or_full_answer_is_refused(data: Any) -> None:
    """Not the documented shape, or a full page (maybe cut short): Malformed, never a guess."""
    with pytest.raises(Malformed):
        serving(data)


# ---- which scripts the signal wakes -------------------------------------------------------


def test_a_second_version_on_an_idle_script_wakes_it_once() -> None:
    """A split appears: the script is woken and marked to read; the same signal again does not
    wake it again, a different one does."""
    watch, _ = watch_of(a=("v1",), b=("w1",))
    since = NOW - 5 * MINUTE
    assert watch.changed({"a": {"v1", "v2"}, "b": {"w1"}}, since) == ["a"]
    assert watch.scripts["a"].forced and not watch.scripts["b"].forced
    assert watch.changed({"a": {"v1", "v2"}, "b": {"w1"}}, since) == []
    assert watch.changed({"a": {"v2"}, "b": {"w1"}}, since) == ["a"]


def test_a_version_coalmine_saw_leave_in_the_window_is_no_news() -> None:
    """After coalmine's own promotion the old version still shows in the window: not a change."""
    watch, _ = watch_of(a=("v1", "v2"))
    watch.saw("a", deployment(("v2", 100)), NOW - 2 * MINUTE)
    assert watch.changed({"a": {"v1", "v2"}}, NOW - 5 * MINUTE) == []
    # ... but a version that left before the window and serves again is
    assert watch.changed({"a": {"v1", "v2"}}, NOW - MINUTE) == ["a"]


def test_a_silent_canary_wakes_its_script() -> None:
    """A live split whose canary served nothing while the stable served: rolled back by hand?"""
    watch, _ = watch_of(a=("v1", "v2"))
    assert watch.changed({"a": {"v1"}}, NOW - 5 * MINUTE) == ["a"]


def test_no_traffic_is_no_signal() -> None:
    """A script that served nothing is not woken (its drift interval reads it)."""
    watch, _ = watch_of(a=("v1",), b=("w1", "w2"))
    assert watch.changed({}, NOW - 5 * MINUTE) == []


def test_a_script_never_read_is_woken_only_for_a_split() -> None:
    """Before any read: one version serving is taken as its deployment, two are news."""
    watch = Watch()
    watch.add("a", FakeLoop())
    watch.add("b", FakeLoop())
    assert watch.changed({"a": {"v1"}, "b": {"w1", "w2"}}, NOW - 5 * MINUTE) == ["b"]
    assert watch.changed({"a": {"v1", "v9"}}, NOW - 5 * MINUTE) == ["a"]


def test_versions_of_a_saved_rollout_are_known() -> None:
    """A script whose saved rollout names its versions is judged against them at once."""
    watch = Watch()
    watch.add("a", FakeLoop(), ("v1", None))
    assert watch.changed({"a": {"v1"}}, NOW - 5 * MINUTE) == []
    assert watch.changed({"a": {"v1", "v2"}}, NOW - 5 * MINUTE) == ["a"]


# ---- when a tick reads ----------------------------------------------------------------------


def reads(watch: Watch, active: bool, interval: timedelta, ticks: int) -> list[int]:
    """The ticks (numbered from 0, ``interval`` apart) that read, each read recorded."""
    out = []
    for i in range(ticks):
        now = NOW + i * interval
        if watch.due("a", active, interval, now, commands=False):
            out.append(i)
            watch.saw("a", deployment(("v1", 100)), now)
    return out


def test_a_canary_reads_every_canary_drift_interval() -> None:
    """30 s ticks, 2 min canary drift: the first tick reads, then every fourth."""
    watch = Watch(canary_drift_interval=timedelta(minutes=2))
    assert reads(watch, True, timedelta(seconds=30), 10) == [0, 4, 8]


def test_a_canary_slower_than_its_drift_interval_reads_every_tick() -> None:
    """An interval longer than the canary drift interval: every tick reads."""
    watch = Watch(canary_drift_interval=timedelta(minutes=2))
    assert reads(watch, True, timedelta(minutes=5), 4) == [0, 1, 2, 3]


def test_an_idle_script_on_the_signal_skips_only_its_start_up_read() -> None:
    """With the signal, idle loops tick every drift interval and read at each tick but the
    first (their start-up reads are spread by their phases, not made all at once)."""
    watch = Watch(drift_interval=timedelta(minutes=30))
    watch.mode = Mode.SIGNAL
    assert watch.idle_interval == timedelta(minutes=30)
    assert reads(watch, False, timedelta(minutes=30), 4) == [1, 2, 3]


@pytest.mark.parametrize("mode", [Mode.OFF, Mode.FALLBACK])
def test_without_the_signal_every_idle_tick_reads(mode: Mode) -> None:
    """No signal (fallback, or no discovery running): idle scripts read at each tick, every
    discovery interval, as before."""
    watch = Watch(discovery_interval=timedelta(seconds=60))
    watch.mode = mode
    assert watch.idle_interval == timedelta(seconds=60)
    assert reads(watch, False, timedelta(seconds=60), 3) == [0, 1, 2]


def test_a_signal_a_command_or_a_write_makes_the_next_tick_read() -> None:
    """Forced (signal, new lease) or an operator command: the tick reads though not due; a read
    elsewhere (the actuator's) counts as the script's latest read."""
    watch = Watch(canary_drift_interval=timedelta(minutes=2))
    interval = timedelta(seconds=30)
    assert watch.due("a", True, interval, NOW, commands=False)
    watch.saw("a", deployment(("v1", 90), ("v2", 10)), NOW)
    assert not watch.due("a", True, interval, NOW + 30 * MINUTE / 60, commands=False)
    assert watch.due("a", True, interval, NOW + MINUTE, commands=True)
    watch.force("a")
    assert watch.due("a", True, interval, NOW + MINUTE, commands=False)
    watch.saw("a", deployment(("v2", 100)), NOW + MINUTE)
    assert not watch.due("a", True, interval, NOW + 90 * MINUTE / 60, commands=False)
    assert watch.last("a") == deployment(("v2", 100))


# ---- the query ------------------------------------------------------------------------------


def discovery(
    handler: Callable[[httpx.Request], httpx.Response], watch: Watch, http: httpx.AsyncClient
) -> Discovery:
    """A discovery on a mock transport, its clock stopped at NOW."""
    client = CloudflareClient(
        http,
        base_url="https://cf/client/v4",
        account_id="acc",
        token="t",
        limiter=TokenBucket(600),
        retry=RetryPolicy(1),
    )
    return Discovery(client, "acc", watch, lambda: NOW)


@pytest.mark.anyio
async def test_one_query_for_every_script_wakes_the_changed_ones() -> None:
    """One GraphQL query, filtered to the watched scripts over the last minutes, wakes only the
    script whose versions changed."""
    watch, loops = watch_of(a=("v1",), b=("w1",), c=("x1",))
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        rows = groups(("a", "v1", 9), ("a", "v2", 1), ("b", "w1", 5))
        return httpx.Response(200, json={"data": answer(rows)})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        found = discovery(handler, watch, http)
        assert await found.once() is False
    assert len(sent) == 1
    where = sent[0]["variables"]["filter"]
    assert where["scriptName_in"] == ["a", "b", "c"]
    assert where["datetime_geq"] == "2026-03-03T18:05:00Z"
    assert where["datetime_lt"] == "2026-03-03T18:10:05Z"
    assert "dimensions { scriptName scriptVersion }" in sent[0]["query"]
    assert [loops[s].woken for s in "abc"] == [1, 0, 0]
    assert watch.mode is Mode.SIGNAL


@pytest.mark.anyio
async def test_failures_fall_back_at_start_and_after_two_intervals() -> None:
    """Never worked: the first failure falls back (idle scripts read every discovery interval).
    After a success, a failure within two intervals keeps the signal (its look-back covers the
    gap); a query that works again restores it."""
    watch, _ = watch_of(a=("v1",))
    status = [500]

    def handler(request: httpx.Request) -> httpx.Response:
        if status[0] != 200:
            return httpx.Response(status[0], json={"errors": [{"message": "down"}]})
        return httpx.Response(200, json={"data": answer(groups(("a", "v1", 1)))})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        found = discovery(handler, watch, http)
        assert await found.once() is True
        assert watch.mode is Mode.FALLBACK and watch.problem is not None
        assert watch.idle_interval == watch.discovery_interval
        status[0] = 200
        assert await found.once() is False and watch.mode is Mode.SIGNAL
        status[0] = 403
        assert await found.once() is False and watch.mode is Mode.SIGNAL  # within two intervals
        found.last_ok = NOW - 3 * MINUTE
        assert await found.once() is True and watch.mode is Mode.FALLBACK


@pytest.mark.anyio
async def test_a_malformed_answer_never_wakes_anything() -> None:
    """A malformed answer is a failed query: no script is woken on its strength."""
    watch, loops = watch_of(a=("v1",))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": {"viewer": {"accounts": [{"x": 1}]}}})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        assert await discovery(handler, watch, http).once() is True
    assert loops["a"].woken == 0 and watch.mode is Mode.FALLBACK


@pytest.mark.anyio
async def test_a_replica_asks_only_for_the_scripts_it_holds() -> None:
    """Replicas: the query names only the scripts this replica holds; holding none, it sends
    nothing (a replica paused past its leases makes no call when it resumes)."""
    watch, _ = watch_of(a=("v1",), b=("w1",))
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"data": answer([])})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        found = discovery(handler, watch, http)
        found.held = lambda script: script == "b"
        assert await found.once() is False
        found.held = lambda script: False
        assert await found.once() is False
    assert [s["variables"]["filter"]["scriptName_in"] for s in sent] == [["b"]]


@pytest.mark.anyio
async def test_falling_back_wakes_the_idle_loops_not_the_canaries() -> None:
    """Cloudflare down from the start: discovery falls back at once and wakes every idle loop
    (asleep for a drift interval) so that it reads the old way; a canary's loop is left alone."""
    watch = Watch(discovery_interval=timedelta(milliseconds=30))
    idle, canary = FakeLoop(idle=True), FakeLoop(idle=False)
    watch.add("a", idle)
    watch.add("b", canary)

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"errors": [{"message": "down"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        found = discovery(handler, watch, http)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(found.run)
                while not idle.woken:
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    assert watch.mode is Mode.FALLBACK
    assert idle.woken >= 1 and canary.woken == 0


@pytest.mark.anyio
async def test_scripts_beyond_one_query_are_asked_in_chunks_the_plan_counts() -> None:
    """4,500 scripts: three queries of at most 2,000 names, and the budget plan counts those
    three per discovery interval, not one."""
    watch, _ = watch_of(**{f"s{i:04d}": ("v1",) for i in range(4500)})
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, json={"data": answer([])})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        assert await discovery(handler, watch, http).once() is False
    assert [len(s["variables"]["filter"]["scriptName_in"]) for s in sent] == [2000, 2000, 500]
    idle = Group("p", 30.0, False, live=0, idle=4500)
    _, graphql = budgets(ACCOUNT._replace(groups=(idle,)))
    assert dict(graphql.parts)["discovery"] == len(sent) * 300 / 60
