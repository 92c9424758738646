"""``coalmine migrate-state``: copy a SQLite state file into an empty PostgreSQL database.

What is copied, verbatim: every script's state, the intents not yet finished (the new store's
holder reconciles them), the notifications not yet delivered, and the whole journal with its
hashes, so its chain (and anyone's copy of its head) stays valid. The SQLite file is held with
the same lock ``coalmine run`` takes, so the copy cannot race a running daemon; the target must
be empty; the journal is verified inside the copying transaction before it commits, so a
failed copy leaves the target as it was.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import psycopg

from coalmine.errors import ConfigError, StoreError
from coalmine.store.journal import GENESIS, verify_entries
from coalmine.store.leases import exclusive_file
from coalmine.store.postgres import PostgresStore, connection_string
from coalmine.store.records import JournalEntry
from coalmine.store.urls import is_postgres_url, redact, scrub

COPIED = ("rollouts", "intents", "outbox", "journal")


@dataclass(frozen=True, slots=True)
class Copied:
    """How much was copied."""

    states: int
    intents: int
    notifications: int
    entries: int
    head: str


def migrate_state(source: str, target: str) -> Copied:
    """Copy ``source`` (``sqlite:///PATH``) into ``target`` (``postgresql://…``, empty)."""
    if not source.startswith("sqlite:///"):
        raise ConfigError(f"--from must be sqlite:///PATH, not {redact(source)}")
    if not is_postgres_url(target):
        raise ConfigError(f"--to must be a postgresql:// URL, not {redact(target)}")
    path = Path(source.removeprefix("sqlite:///"))
    if not path.is_file():
        raise ConfigError(f"--from: no state database at {path}")
    anyio.run(_create_schema, target)
    with exclusive_file(path):
        rows = _read_sqlite(path)
        try:
            with psycopg.connect(connection_string(target), connect_timeout=10) as conn:
                return _write(conn, rows)
        except psycopg.Error as exc:
            message = scrub(str(exc).strip() or type(exc).__name__, target)
            raise StoreError(f"state database {redact(target)}: {message}") from None


async def _create_schema(url: str) -> None:
    store = PostgresStore(url)
    try:
        await store.schema_version()
    finally:
        await store.aclose()


def _read_sqlite(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """The rows to copy, read in one read transaction of the file."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state database {path}: {exc}") from None
    try:
        db.execute("BEGIN")
        return {
            "rollouts": db.execute("SELECT script, state, updated_at FROM rollouts").fetchall(),
            "intents": db.execute(
                "SELECT script, kind, body, created_at FROM intents"
                " WHERE finished_at IS NULL ORDER BY id"
            ).fetchall(),
            "outbox": db.execute(
                "SELECT channel, dedup_key, payload, created_at, attempts, next_attempt_at"
                " FROM outbox WHERE delivered_at IS NULL ORDER BY id"
            ).fetchall(),
            "journal": db.execute(
                "SELECT seq, t, recorded_at, script, actor, action, body, prev_hash, hash"
                " FROM journal ORDER BY seq"
            ).fetchall(),
        }
    except sqlite3.Error as exc:
        raise StoreError(f"state database {path}: {exc}") from None
    finally:
        db.close()


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _write(conn: psycopg.Connection[Any], rows: dict[str, list[tuple[Any, ...]]]) -> Copied:
    """Insert everything in one transaction, verify the journal, commit."""
    with conn.transaction():
        for table in COPIED:
            found = conn.execute(f"SELECT count(*) FROM {table}".encode()).fetchone()
            if found and found[0]:
                raise ConfigError(
                    f"--to: the database already holds coalmine state ({found[0]} rows in"
                    f" {table}); migrate into an empty database"
                )
        for script, state, updated in rows["rollouts"]:
            conn.execute(
                "INSERT INTO rollouts (script, state, updated_at) VALUES (%s, %s, %s)",
                (script, state, updated),
            )
        for script, kind, body, created in rows["intents"]:
            conn.execute(
                "INSERT INTO intents (script, kind, body, created_at) VALUES (%s, %s, %s, %s)",
                (script, kind, body, _time(created)),
            )
        for channel, key, payload, created, attempts, due in rows["outbox"]:
            conn.execute(
                "INSERT INTO outbox (channel, dedup_key, payload, created_at, attempts,"
                " next_attempt_at) VALUES (%s, %s, %s, %s, %s, %s)",
                (channel, key, payload, _time(created), attempts, _time(due)),
            )
        with conn.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO journal (seq, t, recorded_at, script, actor, action, body,"
                " prev_hash, hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                rows["journal"],
            )
        last = rows["journal"][-1] if rows["journal"] else (0, *[None] * 7, GENESIS)
        conn.execute("UPDATE journal_head SET seq = %s, hash = %s", (last[0], last[-1]))
        result = verify_entries(_journal(conn))
        if not result.ok or result.entries != len(rows["journal"]):
            raise StoreError(f"the copied journal does not verify: {result.problem}; not copied")
    return Copied(
        len(rows["rollouts"]),
        len(rows["intents"]),
        len(rows["outbox"]),
        result.entries,
        result.head,
    )


def _journal(conn: psycopg.Connection[Any]) -> list[JournalEntry]:
    cursor = conn.execute(
        "SELECT seq, t, recorded_at, script, actor, action, body, prev_hash, hash"
        " FROM journal ORDER BY seq"
    )
    return [
        JournalEntry(seq, t, rec, script, actor, action, json.loads(body), prev, digest)
        for seq, t, rec, script, actor, action, body, prev, digest in cursor.fetchall()
    ]
