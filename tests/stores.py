"""Both state-store backends behind one test helper: open the store as the daemon does, and
look at (or tamper with) its tables over a connection of the test's own."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from coalmine.store import StateStore, open_store

BACKENDS = ("sqlite", "postgres")
DatabaseError = (sqlite3.Error, psycopg.Error)


@dataclass(frozen=True)
class Backend:
    """A state store's URL (``COALMINE_STATE_URL``) and raw access to its tables.

    SQL is written with ``?`` placeholders, translated for PostgreSQL.
    """

    name: str
    url: str

    @staticmethod
    def sqlite(path: Path) -> Backend:
        """A SQLite file (created at first open)."""
        return Backend("sqlite", f"sqlite:///{path}")

    @property
    def path(self) -> Path:
        """The SQLite file."""
        assert self.name == "sqlite"
        return Path(self.url.removeprefix("sqlite:///"))

    @property
    def cli_state(self) -> str:
        """What ``coalmine journal --state`` takes: the file, or the URL."""
        return str(self.path) if self.name == "sqlite" else self.url

    def open(self) -> StateStore:
        """The store, exactly as the daemon opens it."""
        return open_store(self.url)

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        """A query's rows; empty before the store created its tables."""
        if self.name == "sqlite":
            if not self.path.exists():
                return []
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise
            finally:
                db.close()
        with psycopg.connect(self.url, autocommit=True) as conn:
            try:
                return conn.execute(sql.replace("?", "%s").encode(), args).fetchall()
            except psycopg.errors.UndefinedTable:
                return []

    def execute(self, sql: str) -> None:
        """Run statements as a client of the database would (the store's rules apply)."""
        if self.name == "sqlite":
            db = sqlite3.connect(self.path)
            try:
                db.executescript(sql)
            finally:
                db.close()
            return
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.encode())

    def tamper(self, sql: str) -> None:
        """Run statements on the journal with its append-only triggers out of the way (as an
        attacker with the database's owner rights could)."""
        if self.name == "sqlite":
            self.execute(f"DROP TRIGGER journal_no_update; DROP TRIGGER journal_no_delete; {sql};")
        else:
            self.execute(f"ALTER TABLE journal DISABLE TRIGGER USER; {sql};")
