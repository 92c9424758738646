"""Decisions that wait in memory for the state store: :class:`KeepingStore`.

A rollback and its critical page never wait for the state store. When the store cannot commit
a tick that rolls back, the daemon keeps the tick here (:meth:`KeepingStore.keep`) and carries
it out at once:

- the kept tick's traffic intents are offered to the actuator like stored ones, under
  provisional negative ids, and what became of them is kept with the tick;
- an intent's outcome that the store cannot record (``finish_intent`` failing after the
  Cloudflare call) is kept too, and the intent is no longer offered as open;
- when the store works again, every kept tick and outcome is written, oldest first, before
  any other write (:meth:`KeepingStore.flush`): the journal holds every decision, chained and
  in order. Until then every commit is refused (raises :class:`StoreError`), so nothing
  overtakes what is kept: progress (start, advance, promote) waits for its durable intent.

Notifications of a kept tick that were delivered directly (its critical page) are marked
``sent`` and left out when the tick is written; the rest go to the outbox then.

What is kept lives in this process only: a crash while the store is down loses it (the
decisions are in the log). A *lost* store (``lost``: its file deleted or replaced under the
running daemon) is never written: every write is kept until the store is found again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import anyio
import structlog

from coalmine.errors import StoreError
from coalmine.store.base import StateStore
from coalmine.store.records import (
    Intent,
    JournalEntry,
    NewEntry,
    NewIntent,
    NewNotification,
    OutboxItem,
    StoreIdentity,
    Verification,
)

log = structlog.get_logger("coalmine")


@dataclass
class KeptTick:
    """One tick's record that the store could not take, and what was done about it since."""

    script: str
    state: dict[str, Any]
    entries: Sequence[NewEntry]
    notifications: Sequence[NewNotification]
    now: datetime
    intents: Sequence[NewIntent]
    ids: list[int]  # the intents' provisional (negative) ids
    finished: dict[int, tuple[dict[str, Any], datetime, NewEntry | None]] = field(
        default_factory=dict
    )  # by the intent's index: what the actuator recorded
    sent: set[int] = field(default_factory=set)  # notifications (by index) delivered directly


@dataclass(frozen=True)
class KeptFinish:
    """A stored intent's outcome that the store could not record."""

    intent_id: int
    result: dict[str, Any]
    now: datetime
    entry: NewEntry | None


class KeepingStore:
    """A :class:`StateStore` that keeps in memory what its store cannot take, in order."""

    def __init__(self, inner: StateStore, clock: Callable[[], datetime]) -> None:
        self.inner = inner
        self.kept: list[KeptTick | KeptFinish] = []
        self.lost: str | None = None  # why the store must not be written (set by the watch)
        self.problem: str | None = None  # the last write's error, until a write works
        self.lock = anyio.Lock()  # flushing, and sending a kept tick's pages, one at a time
        self._clock = clock
        self._provisional = 0
        self._renamed: dict[int, int] = {}  # provisional id -> stored id, once written
        # moves whenever open intents may have moved: written or kept by this process, kept
        # records written, a read that could see only the kept ones. A reader that found none
        # open trusts that only while this stands still, read before and after (the
        # actuator's quiet scripts)
        self.intent_writes = 0

    @property
    def ok(self) -> bool:
        """The store takes writes and nothing waits in memory."""
        return self.lost is None and self.problem is None and not self.kept

    @property
    def why(self) -> str | None:
        """Why the store is not ok, for /health and the logs."""
        if self.lost is not None:
            return self.lost
        if self.problem is not None:
            return self.problem
        if self.kept:
            return "records wait in memory for the state store"
        return None

    @property
    def location(self) -> str:
        """See :attr:`StateStore.location`."""
        return self.inner.location

    async def identity(self) -> StoreIdentity:
        """See :meth:`StateStore.identity`."""
        return await self.inner.identity()

    # ---- keeping -----------------------------------------------------------------------------

    def keep(
        self,
        script: str,
        state: dict[str, Any],
        entries: Sequence[NewEntry],
        notifications: Sequence[NewNotification],
        now: datetime,
        intents: Sequence[NewIntent],
    ) -> KeptTick:
        """Keep a tick the store could not commit; its intents become open (provisionally)."""
        self.intent_writes += bool(intents)
        ids = []
        for _ in intents:
            self._provisional -= 1
            ids.append(self._provisional)
        tick = KeptTick(script, state, entries, notifications, now, intents, ids)
        self.kept.append(tick)
        return tick

    def kept_ticks(self) -> list[KeptTick]:
        """The kept ticks, oldest first."""
        return [item for item in self.kept if isinstance(item, KeptTick)]

    async def flush(self) -> None:
        """Write everything kept, oldest first; raise StoreError while the store cannot."""
        if self.lost is not None:
            raise StoreError(self.lost)
        if not self.kept:
            return
        async with self.lock:
            written = 0
            while self.kept:
                try:
                    self.kept[:1] = await self._write(self.kept[0])
                except StoreError as exc:
                    self.problem = str(exc)
                    raise
                written += 1
            self.problem = None
            log.warning("state store back: what was kept in memory is recorded", records=written)

    async def _write(self, item: KeptTick | KeptFinish) -> list[KeptTick | KeptFinish]:
        """Write one kept item; returns what remains of it (a tick's intents' outcomes)."""
        self.intent_writes += 1  # its intents move from memory to the store, maybe mid-read
        if isinstance(item, KeptFinish):
            await self.inner.finish_intent(item.intent_id, item.result, item.now, item.entry)
            return []
        notes = [n for i, n in enumerate(item.notifications) if i not in item.sent]
        ids = await self.inner.commit(
            item.script, item.state, item.entries, notes, self._clock(), item.intents
        )
        rest: list[KeptTick | KeptFinish] = []
        for index, (provisional, stored) in enumerate(zip(item.ids, ids, strict=True)):
            self._renamed[provisional] = stored
            if index in item.finished:
                result, now, entry = item.finished[index]
                if entry is not None and entry.body.get("intent") == provisional:
                    entry = replace(entry, body={**entry.body, "intent": stored})
                rest.append(KeptFinish(stored, result, now, entry))
        return rest

    # ---- the StateStore seam -----------------------------------------------------------------

    async def commit(
        self,
        script: str,
        state: dict[str, Any],
        entries: Sequence[NewEntry] = (),
        notifications: Sequence[NewNotification] = (),
        now: datetime | None = None,
        intents: Sequence[NewIntent] = (),
    ) -> list[int]:
        """Write what is kept, then this tick; raise StoreError (keeping nothing) if either
        cannot be written."""
        await self.flush()
        self.intent_writes += bool(intents)  # counted before: a failed write may still land
        try:
            ids = await self.inner.commit(script, state, entries, notifications, now, intents)
        except StoreError as exc:
            self.problem = str(exc)
            raise
        self.problem = None
        return ids

    async def finish_intent(
        self, intent_id: int, result: dict[str, Any], now: datetime, entry: NewEntry | None = None
    ) -> None:
        """Record an intent's outcome; kept when the store cannot (the change is made)."""
        intent_id = self._renamed.get(intent_id, intent_id)
        if intent_id < 0:
            for tick in self.kept_ticks():
                if intent_id in tick.ids:
                    tick.finished[tick.ids.index(intent_id)] = (result, now, entry)
                    return
            raise StoreError(f"intent {intent_id} is neither kept nor stored")  # a bug
        try:
            await self.flush()
            await self.inner.finish_intent(intent_id, result, now, entry)
        except StoreError as exc:
            self.problem = self.problem or str(exc)
            self.kept.append(KeptFinish(intent_id, result, now, entry))
            log.error(
                "state store failed; the traffic change's outcome is kept in memory",
                intent=intent_id,
                error=str(exc),
            )

    async def open_intents(self) -> list[Intent]:
        """Stored open intents (unless a kept rollback overtook them), then the kept ones.

        When the store cannot be read, only the kept ones: a rollback must not wait for it.
        """
        try:
            stored = await self.inner.open_intents()
        except StoreError as exc:
            if not self.kept:
                raise
            log.error("state store unreadable; applying kept intents only", error=str(exc))
            self.intent_writes += 1  # stored ones unseen: nobody may conclude there are none
            stored = []
        finished = {item.intent_id for item in self.kept if isinstance(item, KeptFinish)}
        ticks = self.kept_ticks()
        overtaken = {t.script for t in ticks for i in t.intents if i.kind == "rollback"}
        out = [i for i in stored if i.id not in finished and i.script not in overtaken]
        for tick in ticks:
            for index, intent in enumerate(tick.intents):
                if index not in tick.finished:
                    out.append(
                        Intent(tick.ids[index], intent.script, intent.kind, intent.body, tick.now)
                    )
        return out

    async def states(self) -> dict[str, dict[str, Any]]:
        """See :meth:`StateStore.states`."""
        return await self.inner.states()

    async def journal(self, since: int = 0) -> list[JournalEntry]:
        """See :meth:`StateStore.journal` (what is kept is not in it yet)."""
        return await self.inner.journal(since)

    async def verify_journal(self) -> Verification:
        """See :meth:`StateStore.verify_journal`."""
        return await self.inner.verify_journal()

    async def due(self, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """See :meth:`StateStore.due`."""
        return await self.inner.due(now, limit)

    async def delivered(self, item_id: int, now: datetime) -> None:
        """See :meth:`StateStore.delivered`."""
        await self.inner.delivered(item_id, now)

    async def failed(self, item_id: int, error: str, retry_at: datetime) -> None:
        """See :meth:`StateStore.failed`."""
        await self.inner.failed(item_id, error, retry_at)

    async def backlog(self) -> int:
        """See :meth:`StateStore.backlog`."""
        return await self.inner.backlog()

    async def aclose(self) -> None:
        """See :meth:`StateStore.aclose`."""
        await self.inner.aclose()

    async def last_flush(self) -> None:
        """At stop: write what is kept if the store takes it; say what is lost if not."""
        with suppress(StoreError):
            await self.flush()
        if self.kept:
            log.error(
                "stopping with records the state store never took: they are lost"
                " (their decisions are in this log)",
                records=len(self.kept),
                scripts=sorted({t.script for t in self.kept_ticks()}),
                error=self.why,
            )
