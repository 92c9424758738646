"""SQLite behind the daemon's awaitable seam: every call in one worker thread."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from coalmine.store.leases import Fence, LeaseRow
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
from coalmine.store.sqlite import SqliteStore, verify_file

T = TypeVar("T")


class ThreadedSqlite:
    """A :class:`SqliteStore` behind the awaitable :class:`~coalmine.store.base.StateStore`
    seam: every call runs in a worker thread, one at a time, so an fsync never stalls the
    event loop. A call that has started finishes even when its caller is cancelled."""

    def __init__(self, store: SqliteStore) -> None:
        self.sync = store
        self._one = anyio.CapacityLimiter(1)

    @property
    def location(self) -> str:
        """The database file."""
        return self.sync.path

    @property
    def path(self) -> str:
        """The database file."""
        return self.sync.path

    @property
    def fence(self) -> Mapping[str, Fence] | None:
        """The leases this replica's writes need (see :mod:`coalmine.store.leases`)."""
        return self.sync.fence

    @fence.setter
    def fence(self, value: Mapping[str, Fence] | None) -> None:
        self.sync.fence = value

    async def _run(self, call: Callable[[], T]) -> T:
        return await anyio.to_thread.run_sync(call, limiter=self._one)

    async def identity(self) -> StoreIdentity:
        """See :meth:`SqliteStore.identity` (its own connection: not behind the writer)."""
        return await anyio.to_thread.run_sync(self.sync.identity)

    async def restore(self) -> None:
        """See :meth:`SqliteStore.restore` (behind the writer: no write is lost in between)."""
        await self._run(self.sync.restore)

    async def commit(
        self,
        script: str,
        state: dict[str, Any],
        entries: Sequence[NewEntry] = (),
        notifications: Sequence[NewNotification] = (),
        now: datetime | None = None,
        intents: Sequence[NewIntent] = (),
    ) -> list[int]:
        """See :meth:`SqliteStore.commit`."""
        return await self._run(
            lambda: self.sync.commit(script, state, entries, notifications, now, intents)
        )

    async def states(self) -> dict[str, dict[str, Any]]:
        """See :meth:`SqliteStore.states`."""
        return await self._run(self.sync.states)

    async def journal(self, since: int = 0) -> list[JournalEntry]:
        """See :meth:`SqliteStore.journal`."""
        return await self._run(lambda: list(self.sync.journal(since)))

    async def verify_journal(self) -> Verification:
        """Verify over a read-only connection of its own, beside the writer."""
        return await anyio.to_thread.run_sync(verify_file, self.sync.path)

    async def finish_intent(
        self, intent_id: int, result: dict[str, Any], now: datetime, entry: NewEntry | None = None
    ) -> None:
        """See :meth:`SqliteStore.finish_intent`."""
        await self._run(lambda: self.sync.finish_intent(intent_id, result, now, entry))

    async def open_intents(self) -> list[Intent]:
        """See :meth:`SqliteStore.open_intents`."""
        return await self._run(self.sync.open_intents)

    async def due(self, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """See :meth:`SqliteStore.due`."""
        return await self._run(lambda: self.sync.due(now, limit))

    async def delivered(self, item_id: int, now: datetime) -> None:
        """See :meth:`SqliteStore.delivered`."""
        await self._run(lambda: self.sync.delivered(item_id, now))

    async def failed(self, item_id: int, error: str, retry_at: datetime) -> None:
        """See :meth:`SqliteStore.failed`."""
        await self._run(lambda: self.sync.failed(item_id, error, retry_at))

    async def backlog(self) -> int:
        """See :meth:`SqliteStore.backlog`."""
        return await self._run(self.sync.backlog)

    async def aclose(self) -> None:
        """Close the database."""
        await self._run(self.sync.close)

    # ---- leases (see coalmine.store.leases) ---------------------------------------------------

    async def heartbeat(
        self, replica: str, ttl: float, instance: str, *, claim: bool = False
    ) -> list[str]:
        """See :meth:`~coalmine.store.leases.LeaseOps.heartbeat`."""
        return await self._run(lambda: self.sync.heartbeat(replica, ttl, instance, claim=claim))

    async def renew(self, replica: str, held: Mapping[str, int], ttl: float) -> dict[str, int]:
        """See :meth:`~coalmine.store.leases.LeaseOps.renew`."""
        return await self._run(lambda: self.sync.renew(replica, held, ttl))

    async def acquire(
        self, replica: str, names: Sequence[str], ttl: float, limit: int
    ) -> dict[str, int]:
        """See :meth:`~coalmine.store.leases.LeaseOps.acquire`."""
        return await self._run(lambda: self.sync.acquire(replica, names, ttl, limit))

    async def release(self, replica: str, held: Mapping[str, int]) -> None:
        """See :meth:`~coalmine.store.leases.LeaseOps.release`."""
        await self._run(lambda: self.sync.release(replica, held))

    async def holds(self, name: str, fence: Fence) -> bool:
        """See :meth:`~coalmine.store.leases.LeaseOps.holds`."""
        return await self._run(lambda: self.sync.holds(name, fence))

    async def leases(self) -> list[LeaseRow]:
        """See :meth:`~coalmine.store.leases.LeaseOps.leases`."""
        return await self._run(self.sync.leases)

    async def post_command(self, script: str, body: dict[str, Any], replica: str) -> int:
        """See :meth:`~coalmine.store.leases.LeaseOps.post_command`."""
        return await self._run(lambda: self.sync.post_command(script, body, replica))

    async def take_commands(self, script: str, replica: str) -> list[tuple[int, dict[str, Any]]]:
        """See :meth:`~coalmine.store.leases.LeaseOps.take_commands`."""
        return await self._run(lambda: self.sync.take_commands(script, replica))

    async def queued(self) -> set[str]:
        """See :meth:`~coalmine.store.leases.LeaseOps.queued`."""
        return await self._run(self.sync.queued)

    async def answer_command(self, command_id: int, answer: dict[str, Any]) -> None:
        """See :meth:`~coalmine.store.leases.LeaseOps.answer_command`."""
        await self._run(lambda: self.sync.answer_command(command_id, answer))

    async def command_answer(self, command_id: int) -> tuple[bool, dict[str, Any] | None]:
        """See :meth:`~coalmine.store.leases.LeaseOps.command_answer`."""
        return await self._run(lambda: self.sync.command_answer(command_id))

    async def withdraw_command(self, command_id: int) -> bool:
        """See :meth:`~coalmine.store.leases.LeaseOps.withdraw_command`."""
        return await self._run(lambda: self.sync.withdraw_command(command_id))
