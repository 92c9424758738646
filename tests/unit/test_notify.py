"""Notifications: payloads per the receivers' contracts, and the outbox's delivery."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest

from coalmine.engine import Decision, RolloutState
from coalmine.notify.outbox import Outbox, Receivers, notifications
from coalmine.store.sqlite import SqliteStore as Store
from coalmine.store.threaded import ThreadedSqlite
from tests.support import at

pytestmark = pytest.mark.anyio
ROUTING_KEY = "R0UT1NGKEY0123456789abcdefabcdef"
WEBHOOK = "https://hooks.slack.com/services/T000/B000/SECRETSECRET"


def page(reason: str = "err tripped") -> Decision:
    """A critical page decision."""
    return Decision(
        t=at(60),
        action="page",
        reason=reason,
        script="api",
        canary="v2",
        stable="v1",
        rule="err",
        value=0.2,
        threshold=0.05,
        samples=900.0,
        severity="critical",
        dedup_key="coalmine/api/v2/err",
    )


def test_page_becomes_a_pagerduty_trigger_with_details() -> None:
    """A page is an Events v2 trigger: dedup key, severity, custom_details with the evidence."""
    (item,) = notifications([page()], RolloutState("api"))
    assert item.channel == "pagerduty" and item.dedup_key == "coalmine/api/v2/err"
    event = item.payload
    assert event["event_action"] == "trigger"
    assert event["payload"]["severity"] == "critical"
    assert event["payload"]["source"] == "coalmine"
    details = event["payload"]["custom_details"]
    assert (details["rule"], details["value"], details["threshold"], details["samples"]) == (
        "err",
        0.2,
        0.05,
        900,
    )
    assert (details["canary"], details["stable"]) == ("v2", "v1")
    assert "routing_key" not in event  # added at send time, never stored


def test_summary_is_cut_to_1024_characters() -> None:
    """PagerDuty rejects summaries over 1,024 characters, so they are cut before sending."""
    (item,) = notifications([page("x" * 5000)], RolloutState("api"))
    assert len(item.payload["payload"]["summary"]) == 1024


def test_rollback_sends_change_event_slack_and_a_grafana_region() -> None:
    """A rollback is a change event, a Slack message and a region annotation from the start."""
    before = RolloutState("api", started_at=at(0))
    rollback = Decision(
        t=at(90),
        action="rollback",
        reason="err tripped",
        script="api",
        canary="v2",
        stable="v1",
        canary_percent=0,
    )
    channels = {n.channel: n.payload for n in notifications([rollback], before)}
    assert set(channels) == {"pagerduty_change", "slack", "grafana"}
    assert channels["grafana"]["time"] == int(at(0).timestamp() * 1000)
    assert channels["grafana"]["timeEnd"] == int(at(90).timestamp() * 1000)
    assert channels["grafana"]["tags"] == ["coalmine", "api", "rolled_back"]


async def test_outbox_retries_until_delivered_and_adds_credentials(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A 429 then a 202: delivered on the second pass, with the routing key added at send time."""
    store = Store(tmp_path / "s.db")
    store.commit("api", {}, [], notifications([page()], RolloutState("api")), now=at(0))
    answers = iter(
        [httpx.Response(429, text="slow"), httpx.Response(202, json={"status": "success"})]
    )
    bodies: list[dict] = []  # type: ignore[type-arg]

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        assert request.url.path == "/v2/enqueue"
        return next(answers)

    clock = [at(0)]
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        outbox = Outbox(
            ThreadedSqlite(store),
            http,
            Receivers("http://pd", ROUTING_KEY, WEBHOOK),
            lambda: clock[0],
        )
        assert await outbox.deliver_due() == 0
        assert store.backlog() == 1
        assert await outbox.deliver_due() == 0  # not due yet: backoff
        clock[0] = at(0) + timedelta(minutes=10)
        assert await outbox.deliver_due() == 1
    assert store.backlog() == 0
    assert [b["routing_key"] for b in bodies] == [ROUTING_KEY, ROUTING_KEY]
    with store._db:  # the stored payload never held the key
        rows = store._db.execute("SELECT payload, last_error FROM outbox").fetchall()
    assert all(ROUTING_KEY not in row[0] for row in rows)


async def test_unconfigured_channels_are_skipped(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Without a routing key or webhook, items are marked done without a call."""
    store = Store(tmp_path / "s.db")
    store.commit("api", {}, [], notifications([page()], RolloutState("api")), now=at(0))

    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no call expected")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        outbox = Outbox(ThreadedSqlite(store), http, Receivers(), lambda: at(0))
        assert await outbox.deliver_due() == 1


async def test_a_receiver_answering_garbage_encoding_is_retried_not_fatal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A broken Content-Encoding (httpx DecodingError) is a failed delivery, never a crash."""
    store = Store(tmp_path / "s.db")
    store.commit("api", {}, [], notifications([page()], RolloutState("api")), now=at(0))

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(202, headers={"content-encoding": "gzip"}, content=b"not gzip at all")

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        outbox = Outbox(
            ThreadedSqlite(store), http, Receivers("http://pd", ROUTING_KEY), lambda: at(0)
        )
        assert await outbox.deliver_due() == 0
    assert store.backlog() == 1
