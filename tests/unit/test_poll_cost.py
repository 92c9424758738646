"""What a poll no longer does when nothing needs it, and that it still does it when something
does: the open-intent read (the actuator's quiet scripts), the analytics answer already in
(``ready``), the gauges a tick did not change (issue 13, less CPU per poll)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from coalmine.cloudflare.actuator import QUIET_RECHECK, Actuator
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.engine import Engine, Observation, RolloutPhase
from coalmine.engine.state import RolloutState, RuleStatus, RuleTrack
from coalmine.errors import StoreError
from coalmine.policy import Rule
from coalmine.retry import RetryPolicy
from coalmine.server.metrics import Metrics
from coalmine.sources import Target, observe
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.store.kept import KeepingStore
from coalmine.store.records import Intent, NewIntent
from coalmine.store.sqlite import SqliteStore
from coalmine.store.threaded import ThreadedSqlite
from tests.support import at, make_policy
from tests.unit.test_analytics_batch import AT, SCRIPTS, ok, target
from tests.unit.test_cloudflare_analytics import rule

pytestmark = pytest.mark.anyio
ROLLBACK = NewIntent("api", "rollback", {"versions": [["stable", 100]], "message": "m"})


def client(http: httpx.AsyncClient) -> CloudflareClient:
    """A Cloudflare client over ``http``, one attempt per call."""
    return CloudflareClient(
        http,
        base_url="https://cf/client/v4",
        account_id="acc",
        token="t",
        limiter=TokenBucket(600),
        retry=RetryPolicy(1),
    )


# ---- the open-intent read ------------------------------------------------------------------


class CountingStore(ThreadedSqlite):
    """SQLite in its worker thread, counting the open-intent reads."""

    reads = 0

    async def open_intents(self) -> list[Intent]:
        self.reads += 1
        return await super().open_intents()


def down(request: httpx.Request) -> httpx.Response:
    """Cloudflare failing every call (an intent read is then tried, not applied)."""
    return httpx.Response(503, json={"success": False, "errors": [{"code": 10000}]})


async def test_a_script_with_no_open_intent_is_not_read_again_until_one_is_written(
    tmp_path: Path,
) -> None:
    """Found quiet, a script's next reconciles read nothing; an intent committed through the
    store is read (and tried) at the very next one."""
    inner = CountingStore(SqliteStore(tmp_path / "state.db"))
    store = KeepingStore(inner, lambda: at(0))
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), store, lambda: at(0))
        assert await actuator.reconcile("api") == []
        assert await actuator.reconcile("api") == []
        assert inner.reads == 1
        await store.commit("api", {"n": 1}, now=at(0), intents=[ROLLBACK])
        ((intent, outcome),) = await actuator.reconcile("api")
    assert inner.reads == 2
    assert intent.kind == "rollback" and isinstance(outcome, Exception)


async def test_a_kept_intent_is_read_at_the_next_reconcile(tmp_path: Path) -> None:
    """An intent kept in memory (the store failing) wakes a quiet script too."""
    inner = CountingStore(SqliteStore(tmp_path / "state.db"))
    store = KeepingStore(inner, lambda: at(0))
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), store, lambda: at(0))
        assert await actuator.reconcile("api") == []
        store.keep("api", {"n": 1}, [], [], at(0), [ROLLBACK])
        ((intent, _),) = await actuator.reconcile("api")
    assert intent.id < 0  # the kept one


@pytest.mark.parametrize("wake", ["forget", "recheck"])
async def test_an_intent_written_by_another_process_is_read_after_forget_or_a_while(
    tmp_path: Path, wake: str
) -> None:
    """An intent another process wrote straight into the database (a replica that held the
    lease) is read once :meth:`Actuator.forget` is called (the lease taken over) or, at the
    latest, QUIET_RECHECK after the script was last found quiet."""
    sync = SqliteStore(tmp_path / "state.db")
    inner = CountingStore(sync)
    store = KeepingStore(inner, lambda: at(0))
    now = [at(0)]
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), store, lambda: now[0])
        assert await actuator.reconcile("api") == []
        await inner.commit("api", {"n": 1}, now=at(1), intents=[ROLLBACK])  # not through store
        now[0] = at(1)
        assert await actuator.reconcile("api") == []  # quiet: not read
        if wake == "forget":
            actuator.forget("api")
        else:
            now[0] = at(0) + QUIET_RECHECK
        ((intent, _),) = await actuator.reconcile("api")
    assert intent.kind == "rollback"
    assert inner.reads == 2


async def test_a_store_without_the_write_count_is_read_every_time(tmp_path: Path) -> None:
    """A store that does not count its intent writes (not a KeepingStore) is read at every
    reconcile: nothing is assumed quiet."""
    inner = CountingStore(SqliteStore(tmp_path / "state.db"))
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), inner, lambda: at(0))
        for _ in range(3):
            assert await actuator.reconcile("api") == []
    assert inner.reads == 3


class GatedStore(CountingStore):
    """A store whose open-intent read takes its snapshot, then waits at a gate (its I/O), so
    something can happen between the two; or fails while ``unreadable``."""

    gate: anyio.Event | None = None
    reading: anyio.Event | None = None
    unreadable = False

    async def open_intents(self) -> list[Intent]:
        if self.unreadable:
            raise StoreError("database is locked")
        snapshot = await super().open_intents()
        if self.gate is not None and self.reading is not None:
            self.reading.set()
            await self.gate.wait()
        return snapshot


async def test_a_kept_rollback_written_during_a_read_is_tried_at_the_next_reconcile(
    tmp_path: Path,
) -> None:
    """A rollback kept while the store was down, and not yet applied (Cloudflare failing):
    the store is back and another tick's flush writes it while api's read is under way; the
    read saw it in neither place, yet the next reconcile reads again and tries it (it was
    skipped for QUIET_RECHECK, 60 s, before)."""
    inner = GatedStore(SqliteStore(tmp_path / "state.db"))
    store = KeepingStore(inner, lambda: at(0))
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), store, lambda: at(1))
        store.keep("api", {"n": 1}, [], [], at(0), [ROLLBACK])
        ((_, failed),) = await actuator.reconcile("api")
        assert isinstance(failed, Exception)
        inner.gate, inner.reading = anyio.Event(), anyio.Event()
        seen: list[object] = []

        async def read() -> None:
            seen.append(await actuator.reconcile("api"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await inner.reading.wait()
            await store.flush()
            inner.gate.set()
        inner.gate = None
        assert seen == [[]]  # in neither half of that read
        ((intent, outcome),) = await actuator.reconcile("api")
    assert intent.kind == "rollback" and isinstance(outcome, Exception)


async def test_a_read_of_kept_intents_only_never_makes_a_script_quiet(tmp_path: Path) -> None:
    """While the store cannot be read, a reconcile sees only what is kept in memory; api's
    stored rollback is not among it, and api is read again once the store answers."""
    inner = GatedStore(SqliteStore(tmp_path / "state.db"))
    store = KeepingStore(inner, lambda: at(0))
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), store, lambda: at(1))
        await store.commit("api", {}, now=at(0), intents=[ROLLBACK])
        ((_, failed),) = await actuator.reconcile("api")
        assert isinstance(failed, Exception)
        other = dataclasses.replace(ROLLBACK, script="web")
        store.keep("web", {}, [], [], at(0), [other])
        inner.unreadable = True
        assert await actuator.reconcile("api") == []
        inner.unreadable = False
        ((intent, _),) = await actuator.reconcile("api")
    assert intent.script == "api" and intent.kind == "rollback"


async def test_a_clock_stepped_back_does_not_stretch_the_quiet_time(tmp_path: Path) -> None:
    """Found quiet at 12:00, the clock stepped back an hour: the next reconcile reads again
    (a wall clock stepping back never stretches QUIET_RECHECK)."""
    inner = CountingStore(SqliteStore(tmp_path / "state.db"))
    store = KeepingStore(inner, lambda: at(0))
    now = [at(3600)]
    async with httpx.AsyncClient(transport=httpx.MockTransport(down)) as http:
        actuator = Actuator(client(http), store, lambda: now[0])
        assert await actuator.reconcile("api") == []
        now[0] = at(0)
        assert await actuator.reconcile("api") == []
    assert inner.reads == 2


# ---- the analytics answer already in -------------------------------------------------------


async def test_ready_answers_as_fetch_does_once_the_window_is_asked_and_not_before() -> None:
    """Before the window's query, ``ready`` says nothing (the tick must ask); after it, each
    rule and version gets exactly what ``fetch`` gives, a rule changed by a reload its own
    answer, and the next window is asked again."""
    sent: list[dict[str, Any]] = []

    def transport(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        return ok(body)

    errors, reloaded = rule("errors"), rule("errors", window="1m")
    async with httpx.AsyncClient(transport=httpx.MockTransport(transport)) as http:
        source = CloudflareAnalytics(client(http), "acc", longest_window=timedelta(minutes=2))
        assert source.ready(errors, target("s1"), AT) is None
        await source.fetch(errors, target("s1"), AT)
        later = AT + timedelta(seconds=20)
        for each in (errors, reloaded, rule("error_ratio")):
            for role in ("canary", "stable"):
                ready = source.ready(each, target("s1", role), later)
                assert ready is not None
                assert ready == await source.fetch(each, target("s1", role), later)
        wide, narrow = (source.ready(r, target("s1"), later) for r in (errors, reloaded))
        assert wide is not None and narrow is not None
        assert wide.samples != narrow.samples  # same name, another window: not the cached one
        assert source.ready(errors, target("s2"), later) is None  # not in that query
        assert source.ready(errors, target("s1"), AT + timedelta(minutes=1)) is None
    assert len(sent) == 1


async def test_a_failed_query_is_ready_as_the_same_inconclusive_answer() -> None:
    """A query that failed answers every later tick of its window with the same error, never a
    value."""

    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": None, "errors": [{"message": "boom"}]})

    async with httpx.AsyncClient(transport=httpx.MockTransport(failing)) as http:
        source = CloudflareAnalytics(client(http), "acc", longest_window=timedelta(minutes=2))
        fetched = await source.fetch(rule("errors"), target("s1"), AT)
        ready = source.ready(rule("errors"), target("s1"), AT + timedelta(seconds=5))
    assert fetched.value is None and fetched.error is not None
    assert ready == fetched


@dataclasses.dataclass
class FakeSource:
    """A source with a ready answer (or a broken ``ready``), counting its fetches."""

    answer: Observation | None
    broken: bool = False
    name: str = "cloudflare"
    fetches: int = 0

    def ready(self, rule: Rule, target: Target, at: datetime) -> Observation | None:
        if self.broken:
            raise RuntimeError("a bug in ready")
        return self.answer

    async def fetch(self, rule: Rule, target: Target, at: datetime) -> Observation:
        self.fetches += 1
        return Observation(rule.name, target.role, 7.0, 100.0)


async def test_observe_uses_ready_answers_and_fetches_the_rest() -> None:
    """Pairs a source has in already are not fetched; without one (or when ``ready`` raises)
    they are, and every pair gets its observation."""
    pairs = [
        (rule("errors"), target(s, role)) for s in SCRIPTS[:2] for role in ("canary", "stable")
    ]
    known = Observation("errors", "canary", 1.0, 10.0)
    for source, fetched in (
        (FakeSource(known), 0),
        (FakeSource(None), 4),
        (FakeSource(known, broken=True), 4),
    ):
        got = await observe({"cloudflare": source}, pairs, AT, 5.0)
        assert len(got) == 4
        assert source.fetches == fetched
        assert all(o.value == (1.0 if fetched == 0 else 7.0) for o in got)


# ---- the gauges ------------------------------------------------------------------------------

POLICY = """
version: 1
name: p
scripts: [api]
steps: [{weight: 10, hold: 1m}, {weight: 100}]
rules:
  - {name: errors, source: prometheus, query: "q", above: 1, for: 1m, on_breach: rollback}
"""


def exported(metrics: Metrics) -> set[str]:
    """The rollout's sample lines of /metrics."""
    text = generate_latest(metrics.registry).decode()
    return {line for line in text.splitlines() if 'script="api"' in line and "_created" not in line}


@pytest.mark.parametrize(
    "change",
    [
        {"phase": RolloutPhase.PROMOTED},
        {"canary_percent": 50},
        {"step": 1},
        {"value": 2.5},
        {"stable_value": 0.5},
        {"samples": 900.0},
        {"breaching": True},
        {"status": RuleStatus.INCONCLUSIVE},
    ],
)
def test_every_exported_value_that_changes_is_exported_again(change: dict[str, Any]) -> None:
    """Recording a state that differs from the last in any exported value changes /metrics;
    recording the same state again changes nothing."""
    engine = Engine(make_policy(POLICY))
    metrics = Metrics(CollectorRegistry())
    track = RuleTrack(value=1.0, samples=100.0, stable_value=0.4)
    state = RolloutState("api", RolloutPhase.CANARY, "s", "c", 0, 10, rules={"errors": track})
    metrics.record(state, engine.rules, [])
    first = exported(metrics)
    metrics.record(state, engine.rules, [])
    assert exported(metrics) == first
    changed = state.copy()
    on_track = {k: v for k, v in change.items() if k in RuleTrack._fields}
    for key, value in change.items():
        if key not in on_track:
            setattr(changed, key, value)
    changed.rules = {"errors": track._replace(**on_track)}
    metrics.record(changed, engine.rules, [])
    assert exported(metrics) != first
