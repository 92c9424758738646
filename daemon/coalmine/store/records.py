"""What the store keeps, as plain values shared by every backend (SQLite, PostgreSQL)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled decision (or operator action) as stored."""

    seq: int
    t: str
    recorded_at: str
    script: str
    actor: str
    action: str
    body: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """The entry as exported for auditors."""
        return {
            "seq": self.seq,
            "t": self.t,
            "recorded_at": self.recorded_at,
            "script": self.script,
            "actor": self.actor,
            "action": self.action,
            "body": self.body,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A notification waiting for delivery."""

    id: int
    channel: str
    dedup_key: str | None
    payload: dict[str, Any]
    attempts: int
    next_attempt_at: datetime


@dataclass(frozen=True, slots=True)
class Intent:
    """A traffic change coalmine meant to make; unfinished ones are reconciled at start-up."""

    id: int
    script: str
    kind: str
    body: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Verification:
    """The result of checking the journal's hash chain."""

    ok: bool
    entries: int
    head: str
    problem: str = ""


@dataclass(frozen=True, slots=True)
class NewEntry:
    """A journal entry to append: the hash chain is computed by the store."""

    t: datetime
    script: str
    actor: str
    action: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewIntent:
    """A traffic change to record before it is made."""

    script: str
    kind: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class NewNotification:
    """An outbox item to enqueue."""

    channel: str
    payload: dict[str, Any]
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """Which store this is: an id made once, when the store was created, and that moment.

    A journal that restarted at zero (its file deleted, a new database in its place) has a
    new identity, so the restart is visible in ``journal verify`` and on /metrics.
    """

    id: str
    created_at: datetime
