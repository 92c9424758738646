"""The seam between the daemon and its state store: :class:`StateStore`.

Every backend (SQLite in a worker thread, PostgreSQL over an async driver) offers the same
awaitable operations. One tick's state, journal entries, notifications and traffic intents
are written in one transaction (:meth:`StateStore.commit`); every backend failure is a
:class:`~coalmine.errors.StoreError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

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


class StateStore(Protocol):
    """What the daemon needs of a state store."""

    @property
    def location(self) -> str:
        """Where the store lives, fit to print (a file path, or a URL without its password)."""
        ...

    async def identity(self) -> StoreIdentity:
        """The identity of the store found at :attr:`location` now.

        Raises :class:`~coalmine.errors.StoreError` when none can be read there, or when the
        location no longer holds the store that was opened (a database file deleted or replaced
        under a running daemon): the daemon compares it with the identity it started with.
        """
        ...

    async def commit(
        self,
        script: str,
        state: dict[str, Any],
        entries: Sequence[NewEntry] = (),
        notifications: Sequence[NewNotification] = (),
        now: datetime | None = None,
        intents: Sequence[NewIntent] = (),
    ) -> list[int]:
        """Persist one tick atomically; returns the new intents' ids."""
        ...

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every script's last persisted state."""
        ...

    async def journal(self, since: int = 0) -> list[JournalEntry]:
        """Journal entries with ``seq > since``, oldest first."""
        ...

    async def verify_journal(self) -> Verification:
        """Recompute the journal's hash chain."""
        ...

    async def finish_intent(
        self, intent_id: int, result: dict[str, Any], now: datetime, entry: NewEntry | None = None
    ) -> None:
        """Mark an intent done, journaling ``entry`` with it."""
        ...

    async def open_intents(self) -> list[Intent]:
        """Intents started and never finished."""
        ...

    async def due(self, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """Undelivered notifications whose next attempt is due, in order."""
        ...

    async def delivered(self, item_id: int, now: datetime) -> None:
        """Mark a notification delivered."""
        ...

    async def failed(self, item_id: int, error: str, retry_at: datetime) -> None:
        """Record a failed delivery attempt and when to try again."""
        ...

    async def backlog(self) -> int:
        """How many notifications wait for delivery."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections."""
        ...


@runtime_checkable
class Restorable(Protocol):
    """A store that can write itself back to its location from the open connection when its
    file was deleted under the running daemon (SQLite: the deleted file lives on while open)."""

    async def restore(self) -> None:
        """Put the store back at its location; raise StoreError if it cannot."""
        ...
