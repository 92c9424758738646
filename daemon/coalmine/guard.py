"""Guarding while the state store fails: a rollback and its page wait for nothing.

:class:`Guard` is what every script's loop shares for this:

- :meth:`Guard.keep`: a tick that rolls back (or pages critically) and that the store refused is
  kept in memory (:class:`~coalmine.store.kept.KeepingStore`), its rollback applied by the
  actuator as usual, its critical pages sent at once past the stored outbox and retried from
  memory until delivered (or, the store back, handed to the outbox);
- :meth:`Guard.watch`: every few seconds, the identity of the store found at its location
  against the one opened at start. A database deleted under the daemon is written back from
  the open file where the backend can (:class:`~coalmine.store.base.Restorable`: SQLite).
  One that cannot be written back, or was replaced, truncated or overwritten, is *lost*:
  nothing is written to it, no rollout advances, coalmine pages once (critical, dedup key
  :data:`STORE_PAGE_KEY`), /health is unhealthy and /readyz fails. Found again (written back
  once its folder is there again, or the same file back in place), what was kept is written
  and the page resolved;
- :meth:`Guard.settle`: retry the pages and the writing of what is kept (each tick, and every
  second in :meth:`Guard.run`).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timedelta
from typing import Any

import anyio
import structlog

from coalmine.engine.model import format_time
from coalmine.errors import StoreError
from coalmine.notify.outbox import DeliveryError, Outbox
from coalmine.server.health import Health
from coalmine.server.metrics import Metrics
from coalmine.store.base import Restorable
from coalmine.store.kept import KeepingStore
from coalmine.store.records import NewEntry, NewIntent, NewNotification, StoreIdentity

log = structlog.get_logger("coalmine")
STORE_PAGE_KEY = "coalmine/state-store"
CHECK_EVERY = timedelta(seconds=5)


def critical_page(note: NewNotification) -> bool:
    """A PagerDuty trigger of severity critical (a rollback rule's page)."""
    payload = note.payload.get("payload") or {}
    return (
        note.channel == "pagerduty"
        and note.payload.get("event_action") == "trigger"
        and payload.get("severity") == "critical"
    )


class Guard:
    """Keeps coalmine guarding while its state store cannot record."""

    def __init__(
        self,
        store: KeepingStore,
        outbox: Outbox,
        health: Health,
        metrics: Metrics,
        clock: Callable[[], datetime],
        expected: StoreIdentity,
    ) -> None:
        self.store = store
        self.expected = expected
        self._outbox = outbox
        self._health = health
        self._metrics = metrics
        self._clock = clock
        self._page: NewNotification | None = None  # the lost store's page, until delivered
        self._checked: datetime | None = None
        self._checking = False
        self._wake = anyio.Event()
        metrics.store.info({"store_id": expected.id})
        metrics.store_created.set(expected.created_at.timestamp())

    @property
    def blocked(self) -> str | None:
        """Why no rollout may advance now (None: the store records)."""
        if self.store.lost is not None:
            return f"the state store is lost ({self.store.lost})"
        if self.store.kept:
            return "decisions wait in memory for the state store"
        return None

    async def keep(
        self,
        script: str,
        state: dict[str, Any],
        entries: list[NewEntry],
        notifications: list[NewNotification],
        now: datetime,
        intents: list[NewIntent],
    ) -> None:
        """Keep a tick the store refused, and send its critical pages now."""
        self.store.keep(script, state, entries, notifications, now, intents)
        log.error(
            "state store cannot record; acting anyway, the decisions kept in memory",
            script=script,
            decisions=[e.action for e in entries],
            error=self.store.why,
        )
        self.report()
        self._wake.set()  # :meth:`run` sends the pages now, beside the rollback

    async def send_pages(self) -> None:
        """Send the kept ticks' critical pages not delivered yet (and the lost store's)."""
        if self._page is not None and await self._deliver(self._page):
            self._page = None
        for tick in self.store.kept_ticks():
            async with self.store.lock:
                if tick not in self.store.kept:
                    continue  # written meanwhile: the outbox has what was not sent
                for index, note in enumerate(tick.notifications):
                    if index not in tick.sent and critical_page(note) and await self._deliver(note):
                        tick.sent.add(index)

    async def _deliver(self, note: NewNotification) -> bool:
        try:
            await self._outbox.send_now(note)
        except DeliveryError as exc:
            log.warning("critical page not delivered yet; retrying", error=str(exc))
            return False
        except Exception:  # a bug must not stop the retries (nor the daemon)
            log.exception("internal error sending a page directly; retrying")
            return False
        return True

    async def watch(self, now: datetime) -> None:
        """Check, at most every :data:`CHECK_EVERY`, that the store is still the one opened."""
        if self._checking or (self._checked is not None and now - self._checked < CHECK_EVERY):
            return
        self._checking = True
        try:
            problem = await self._problem()
        finally:
            self._checking = False
            self._checked = now
        if problem is not None and self.store.lost is None:
            self.store.lost = problem
            log.critical(
                "state store LOST: rolling back still works, nothing advances;"
                " restore the database and restart coalmine",
                problem=problem,
            )
            self._page = self._lost_page(problem, now)
        elif problem is None and self.store.lost is not None:
            self.store.lost = None
            log.warning("state store found again", location=self.store.location)
            self._page = NewNotification(
                "pagerduty",
                {"event_action": "resolve", "dedup_key": STORE_PAGE_KEY},
                STORE_PAGE_KEY,
            )
        await self.settle()

    async def _problem(self) -> str | None:
        """What is wrong with the store at its location, after restoring a deleted database
        from its open file where the backend can (SQLite)."""
        problem = await self._check()
        inner = self.store.inner
        if problem is None or not isinstance(inner, Restorable):
            return problem
        try:
            await inner.restore()
        except StoreError as exc:
            log.debug("state store not restored", error=str(exc))
            return problem
        log.error(
            "state database deleted under coalmine: written back from its open file",
            location=self.store.location,
            problem=problem,
        )
        return await self._check()

    async def _check(self) -> str | None:
        try:
            identity = await self.store.identity()
        except StoreError as exc:
            return str(exc)
        except Exception:  # a bug is logged, never taken for a lost (or found) store
            log.exception("internal error checking the state store")
            self._metrics.internal_errors.inc()
            return self.store.lost
        if identity != self.expected:
            return (
                f"{self.store.location} now holds another store (id {identity.id}, created"
                f" {format_time(identity.created_at)}), not the one coalmine opened"
                f" (id {self.expected.id})"
            )
        return None

    def _lost_page(self, problem: str, now: datetime) -> NewNotification:
        summary = (
            f"coalmine: state store lost: {problem}. Canaries still roll back; none advances."
            " Restore the database and restart coalmine."
        )
        event = {
            "event_action": "trigger",
            "dedup_key": STORE_PAGE_KEY,
            "payload": {
                "summary": summary[:1024],
                "source": "coalmine",
                "severity": "critical",
                "timestamp": format_time(now),
                "component": "coalmine",
                "class": "state_store",
                "custom_details": {
                    "location": self.store.location,
                    "store_id": self.expected.id,
                    "created_at": format_time(self.expected.created_at),
                    "problem": problem,
                },
            },
        }
        return NewNotification("pagerduty", event, STORE_PAGE_KEY)

    async def settle(self) -> None:
        """Retry undelivered pages; write what is kept once the store takes it."""
        await self.send_pages()
        if self.store.kept and self.store.lost is None:
            with suppress(StoreError):
                await self.store.flush()
        self.report()

    def report(self) -> None:
        """Export the store's condition to /health and /metrics."""
        health = self._health
        health.store_ok = self.store.ok
        health.store_problem = self.store.why
        health.store_lost = self.store.lost is not None
        health.store_kept = len(self.store.kept)
        self._metrics.store_lost.set(1 if health.store_lost else 0)
        self._metrics.store_kept.set(health.store_kept)

    async def run(self, every: float = 1.0) -> None:
        """Watch and settle every ``every`` seconds, and at once when a tick is kept."""
        while True:
            try:
                await self.watch(self._clock())
                await self.settle()
            except Exception:  # the guard must outlive its own bugs: they are logged
                log.exception("internal error guarding the state store")
                self._metrics.internal_errors.inc()
            with anyio.move_on_after(every):
                await self._wake.wait()
            self._wake = anyio.Event()
