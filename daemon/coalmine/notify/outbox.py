"""Notifications: what a decision tells PagerDuty, Slack and Grafana, and their delivery.

Decisions become outbox items in the same transaction as the state that made them (see
:mod:`coalmine.store.sqlite`); :class:`Outbox` delivers them in the background, retrying with
backoff until each receiver accepts, across restarts. Payloads are stored *without* credentials (the
routing key, the webhook URL and the Grafana token are added at send time), so the outbox
never holds a secret.

- ``pagerduty``: Events v2 trigger / resolve under the decision's dedup key, summary cut to
  1,024 characters (longer is rejected, not truncated, by PagerDuty), ``custom_details`` with
  rule, value, threshold, window, samples, versions and the reason;
- ``pagerduty_change``: a change event for every step, promotion, rollback and completion;
- ``slack``: warnings and outcomes, with ``&``, ``<`` and ``>`` escaped (an operator's text
  cannot ping a channel or forge a link); PagerDuty summaries are one line of plain text;
- ``grafana``: one region annotation per rollout, from its start to its end, tagged
  ``coalmine``, the script and the outcome.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import anyio
import httpx
import structlog

from coalmine.engine import Decision, RolloutState
from coalmine.engine.model import format_time
from coalmine.errors import StoreError
from coalmine.store.base import StateStore
from coalmine.store.records import NewNotification, OutboxItem

log = structlog.get_logger("coalmine")
SUMMARY_LIMIT = 1024
CHANGE_ACTIONS = ("start", "set_traffic", "promote", "rollback", "complete")
SLACK_ACTIONS = (
    "warn",
    "start",
    "set_traffic",
    "promote",
    "rollback",
    "complete",
    "pause",
    "resume",
)


def notifications(
    decisions: Sequence[Decision], before: RolloutState, links: dict[str, str] | None = None
) -> list[NewNotification]:
    """The outbox items for a tick's decisions (``before``: the state the tick started from)."""
    out: list[NewNotification] = []
    for d in decisions:
        if d.action in ("page", "resolve") and d.dedup_key:
            out.append(NewNotification("pagerduty", _pagerduty_event(d, links or {}), d.dedup_key))
        if d.action in CHANGE_ACTIONS:
            out.append(NewNotification("pagerduty_change", _change_event(d)))
        if d.action in SLACK_ACTIONS:
            out.append(NewNotification("slack", {"text": _slack_text(d)}))
        if d.action in ("rollback", "complete") and before.started_at is not None:
            outcome = "rolled_back" if d.action == "rollback" else "promoted"
            out.append(NewNotification("grafana", _annotation(d, before.started_at, outcome)))
    return out


def slack_escape(text: str) -> str:
    """Text as Slack shows it literally: ``&``, ``<`` and ``>`` are its control characters
    (``<!channel>``, ``<url|label>``), so an operator-supplied string cannot ping or link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029], " ")


def plain(text: str) -> str:
    """Text safe as one line of plain text (PagerDuty summaries): control characters and line
    breaks become spaces, so an operator-supplied string cannot forge a line of its own."""
    return text.translate(_CONTROL)


def _details(d: Decision) -> dict[str, Any]:
    details = {k: v for k, v in d.to_dict().items() if k not in ("t", "action", "dedup_key")}
    details["decided_at"] = format_time(d.t)
    return details


def _pagerduty_event(d: Decision, links: dict[str, str]) -> dict[str, Any]:
    if d.action == "resolve":
        return {"event_action": "resolve", "dedup_key": d.dedup_key}
    summary = plain(f"coalmine {d.script}: {d.reason}")
    return {
        "event_action": "trigger",
        "dedup_key": d.dedup_key,
        "payload": {
            "summary": summary[: SUMMARY_LIMIT - 1] + "…"
            if len(summary) > SUMMARY_LIMIT
            else summary,
            "source": "coalmine",
            "severity": d.severity or "error",
            "timestamp": format_time(d.t),
            "component": plain(d.script),
            "class": plain(d.rule or "rollout"),
            "custom_details": _details(d),
        },
        "links": [{"href": href, "text": text} for text, href in links.items()],
    }


def _change_event(d: Decision) -> dict[str, Any]:
    percent = f" ({d.canary_percent}%)" if d.canary_percent is not None else ""
    dry = "DRY RUN " if d.dry_run else ""
    return {
        "payload": {
            "summary": plain(f"coalmine {d.script}: {dry}{d.action} {d.canary}{percent}")[
                :SUMMARY_LIMIT
            ],
            "source": "coalmine",
            "timestamp": format_time(d.t),
            "custom_details": _details(d),
        }
    }


def _slack_text(d: Decision) -> str:
    icon = {
        "warn": ":warning:",
        "rollback": ":rotating_light:",
        "complete": ":white_check_mark:",
    }.get(d.action, ":bird:")
    dry = "[DRY RUN] " if d.dry_run else ""
    who = " — ".join(x for x in (d.requested_by, d.request_reason) if x)
    who = f" ({slack_escape(who)})" if who else ""
    return f"{icon} {dry}*{slack_escape(d.script)}* {d.action}: {slack_escape(d.reason)}{who}"


def _annotation(d: Decision, started: datetime, outcome: str) -> dict[str, Any]:
    dry = "DRY RUN (traffic never changed): " if d.dry_run else ""
    return {
        "time": int(started.timestamp() * 1000),
        "timeEnd": int(d.t.timestamp() * 1000),
        "tags": ["coalmine", d.script, outcome, *(["dry_run"] if d.dry_run else [])],
        "text": f"{dry}coalmine canary {d.canary} over {d.stable}: {outcome} ({d.reason})"[:2000],
    }


@dataclass(frozen=True, slots=True)
class Receivers:
    """Where notifications go; None means that channel is not configured (items are dropped)."""

    pagerduty_url: str | None = None
    pagerduty_routing_key: str | None = None
    slack_webhook_url: str | None = None
    grafana_url: str | None = None
    grafana_token: str | None = None


class DeliveryError(Exception):
    """A receiver refused or was unreachable; the item is retried later."""

    def __init__(
        self, reason: str, retry_after: float | None = None, permanent: bool = False
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.permanent = permanent


class Outbox:
    """Delivers outbox items until each is accepted; never blocks the decision loop."""

    def __init__(
        self,
        store: StateStore,
        http: httpx.AsyncClient,
        receivers: Receivers,
        clock: Callable[[], datetime],
        *,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        poll: float = 1.0,
        max_backoff: float = 300.0,
        rng: random.Random | None = None,
        on_result: Callable[[str, str | None], None] | None = None,
    ) -> None:
        self._store = store
        self._http = http
        self._receivers = receivers
        self._clock = clock
        self._sleep = sleep
        self._poll = poll
        self._max_backoff = max_backoff
        self._rng = rng or random.Random()
        self._wake = anyio.Event()
        self._on_result = on_result
        # accepted by their receiver, but the store failed to record it: recorded at the next
        # pass and never sent again (a store down for minutes must not spam every receiver)
        self._sent: set[int] = set()
        self.pending = 0  # notifications waiting, as of the last delivery pass

    def wake(self) -> None:
        """New items were committed: deliver without waiting for the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Deliver forever; a failing state store is retried at the next poll."""
        while True:
            try:
                await self.deliver_due()
            except StoreError as exc:
                log.error("outbox: state store failed; retrying", error=str(exc))
            with anyio.move_on_after(self._poll):
                await self._wake.wait()
            self._wake = anyio.Event()

    async def deliver_due(self) -> int:
        """One pass over the due items; returns how many were delivered."""
        delivered = await self._deliver_due()
        self.pending = await self._store.backlog()
        return delivered

    async def _deliver_due(self) -> int:
        delivered = 0
        for item in await self._store.due(self._clock()):
            if item.id not in self._sent:
                try:
                    await self._send(item)
                except DeliveryError as exc:
                    await self._failed(item, exc)
                    continue
                except Exception as exc:  # one bad item must not stop the others
                    log.exception("outbox: unexpected error delivering", channel=item.channel)
                    await self._failed(item, DeliveryError(f"internal error: {type(exc).__name__}"))
                    continue
                self._sent.add(item.id)
            await self._store.delivered(item.id, self._clock())
            self._sent.discard(item.id)
            delivered += 1
            if self._on_result:
                self._on_result(item.channel, None)
        return delivered

    async def _failed(self, item: OutboxItem, exc: DeliveryError) -> None:
        backoff = exc.retry_after if exc.retry_after is not None else self._backoff(item.attempts)
        if exc.permanent:
            backoff = self._max_backoff
        await self._store.failed(item.id, str(exc), self._clock() + timedelta(seconds=backoff))
        if self._on_result:
            self._on_result(item.channel, str(exc))

    async def send_now(self, note: NewNotification) -> None:
        """Deliver one notification at once, past the stored outbox (for when the state store
        cannot take it: a rollback's page must not wait); raises DeliveryError if refused."""
        item = OutboxItem(0, note.channel, note.dedup_key, note.payload, 0, self._clock())
        try:
            await self._send(item)
        except DeliveryError as exc:
            if self._on_result:
                self._on_result(note.channel, str(exc))
            raise
        if self._on_result:
            self._on_result(note.channel, None)

    def _backoff(self, attempts: int) -> float:
        return self._rng.uniform(0.5, 1.0) * min(self._max_backoff, 2.0 ** min(attempts, 12))

    async def _send(self, item: OutboxItem) -> None:
        r = self._receivers
        if item.channel in ("pagerduty", "pagerduty_change"):
            if not (r.pagerduty_url and r.pagerduty_routing_key):
                return  # not configured: nothing to deliver to
            path = "/v2/enqueue" if item.channel == "pagerduty" else "/v2/change/enqueue"
            body = {"routing_key": r.pagerduty_routing_key, **item.payload}
            await self._post(r.pagerduty_url.rstrip("/") + path, body, {}, ok=(200, 202))
        elif item.channel == "slack":
            if r.slack_webhook_url:
                await self._post(r.slack_webhook_url, item.payload, {}, ok=(200,))
        elif item.channel == "grafana" and r.grafana_url and r.grafana_token:
            headers = {"Authorization": f"Bearer {r.grafana_token}"}
            await self._post(
                r.grafana_url.rstrip("/") + "/api/annotations", item.payload, headers, ok=(200,)
            )

    async def _post(
        self, url: str, body: dict[str, Any], headers: dict[str, str], ok: tuple[int, ...]
    ) -> None:
        try:
            response = await self._http.post(url, json=body, headers=headers, timeout=10.0)
        except httpx.TimeoutException:
            raise DeliveryError("timeout") from None
        except httpx.TransportError as exc:
            raise DeliveryError(f"connection error: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:  # decoding, redirects: the receiver answered badly
            raise DeliveryError(f"bad answer: {type(exc).__name__}") from None
        if response.status_code in ok:
            return
        after = response.headers.get("retry-after")
        retry_after = float(after) if after and after.replace(".", "", 1).isdigit() else None
        text = response.text[:200].replace("\n", " ")
        permanent = response.status_code in (400, 403, 404, 410)
        raise DeliveryError(f"HTTP {response.status_code}: {text}", retry_after, permanent)
