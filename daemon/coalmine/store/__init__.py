"""The state store: rollout state, traffic intents, the notification outbox and the journal.

:class:`~coalmine.store.base.StateStore` is the daemon's seam; :func:`open_store` picks the
backend from ``COALMINE_STATE_URL``. SQLite (:mod:`coalmine.store.sqlite`) is the embedded
default; the journal's hash chain (:mod:`coalmine.store.journal`) is the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from coalmine.store.base import StateStore
from coalmine.store.sqlite import SqliteStore, ThreadedSqlite


def open_store(url: str) -> StateStore:
    """The store ``url`` names (``sqlite:///PATH``); raises StoreError when it cannot open."""
    path = Path(url.removeprefix("sqlite:///"))
    return ThreadedSqlite(SqliteStore(path))


__all__ = ["StateStore", "open_store"]
