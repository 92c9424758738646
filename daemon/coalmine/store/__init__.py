"""The state store: rollout state, traffic intents, the notification outbox and the journal.

:class:`~coalmine.store.base.StateStore` is the daemon's seam; :func:`open_store` picks the
backend from ``COALMINE_STATE_URL``: SQLite (:mod:`coalmine.store.sqlite`), the embedded
default, or PostgreSQL (:mod:`coalmine.store.postgres`), which several processes may share.
The journal's hash chain (:mod:`coalmine.store.journal`) is the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from coalmine.store.base import StateStore
from coalmine.store.sqlite import SqliteStore
from coalmine.store.threaded import ThreadedSqlite
from coalmine.store.urls import is_postgres_url


def open_store(url: str) -> StateStore:
    """The store ``url`` names (``sqlite:///PATH`` or ``postgresql://…``); raises StoreError
    when it cannot open. A PostgreSQL store connects at its first call."""
    if is_postgres_url(url):
        # imported here: only a PostgreSQL store pays for the driver's import
        from coalmine.store.postgres import PostgresStore  # noqa: PLC0415

        return PostgresStore(url)
    path = Path(url.removeprefix("sqlite:///"))
    return ThreadedSqlite(SqliteStore(path))


__all__ = ["StateStore", "open_store"]
