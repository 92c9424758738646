"""The state store: SQLite in WAL mode with versioned migrations.

What it keeps, per table:

- ``rollouts``: each script's :class:`~coalmine.engine.RolloutState` as JSON;
- ``intents``: a traffic change persisted *before* the API call, finished after it, so a crash
  between the two is reconciled against the live deployment on restart;
- ``outbox``: notifications waiting for delivery, retried until delivered, across restarts;
- ``journal``: every decision, append-only (triggers refuse UPDATE and DELETE) and hash-chained:
  each entry's ``hash`` is SHA-256 over the previous hash and the entry's canonical JSON, so
  :meth:`Store.verify_journal` finds any edit, deletion or reordering.

State, journal entries and outbox items of one tick are written in one transaction
(:meth:`Store.commit`): after a crash either all of a tick's effects are recorded or none.
Every ``sqlite3`` error becomes a :class:`~coalmine.errors.StoreError`.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coalmine.engine.model import format_time
from coalmine.errors import StoreError
from coalmine.store.journal import GENESIS, canonical, entry_hash, verify_entries
from coalmine.store.leases import INSTANCE_MIGRATION, LEASE_MIGRATION, SqliteLeaseOps
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

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE rollouts (
        script     TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE intents (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        script      TEXT NOT NULL,
        kind        TEXT NOT NULL,
        body        TEXT NOT NULL,
        created_at  TEXT NOT NULL,
        finished_at TEXT,
        result      TEXT
    );
    CREATE INDEX intents_open ON intents (script) WHERE finished_at IS NULL;
    CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY AUTOINCREMENT,
        channel         TEXT NOT NULL,
        dedup_key       TEXT,
        payload         TEXT NOT NULL,
        created_at      TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TEXT NOT NULL,
        delivered_at    TEXT,
        last_error      TEXT
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;
    CREATE TABLE journal (
        seq         INTEGER PRIMARY KEY,
        t           TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        script      TEXT NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        body        TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    );
    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
    CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
        BEGIN SELECT RAISE(ABORT, 'the journal is append-only'); END;
    """,
    # The store's identity: made once, so that a database that restarted at zero (deleted and
    # created again) is told apart from the one it replaced. A database from before this
    # migration dates from its first journal entry.
    """
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO meta (key, value) VALUES ('store_id', lower(hex(randomblob(16))));
    INSERT INTO meta (key, value) VALUES ('created_at', coalesce(
        (SELECT recorded_at FROM journal ORDER BY seq LIMIT 1),
        strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));
    """,
    LEASE_MIGRATION,
    INSTANCE_MIGRATION,
)
SQLITE_HEADER = b"SQLite format 3\x00"

# What SQLite's messages mean for an operator, by a word they contain.
_CAUSES = (
    ("not a database", "it is not a SQLite database (overwritten, or not coalmine's file)"),
    ("malformed", "it is corrupt (SQLite: database disk image is malformed)"),
    ("readonly", "it cannot be written (a read-only file or file system)"),
    ("read-only", "it cannot be written (a read-only file or file system)"),
    ("unable to open", "it cannot be opened (permissions, or a read-only or missing folder)"),
    ("disk is full", "its file system is full"),
    ("disk i/o", "the disk failed to read or write it (I/O error)"),
)


def explain(path: str, exc: sqlite3.Error) -> str:
    """An operator's account of why the database at ``path`` cannot be used."""
    text = str(exc)
    for word, cause in _CAUSES:
        if word in text.lower():
            return f"state database {path}: {cause}"
    return f"state database {path}: {text}"


def _ts(t: datetime) -> str:
    """A fixed-width UTC timestamp, so that SQL compares them correctly as text."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _file_id(path: str | int) -> tuple[int, int]:
    """The file system's name for the file at ``path`` (or open as ``path``): (device, inode)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _hold(path: str) -> int:
    """A descriptor on the database file, held open as long as the store's connection.

    The store reads the file itself (its header) only through this descriptor, never through
    one it opens and closes again: closing *any* descriptor of a file drops every POSIX lock
    the process holds on it, SQLite's included, and the next connection of another process
    to close (an operator's ``sqlite3``, a backup, ``coalmine journal verify``) then takes
    itself for the last one, checkpoints and deletes the WAL under the daemon: what the daemon
    commits afterwards is lost at its next crash (https://sqlite.org/howtocorrupt.html, 2.2).
    """
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


class SqliteStore(SqliteLeaseOps):
    """One SQLite database, used from the daemon's event-loop thread only (writes are small)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        folder = Path(self.path).parent
        if not folder.is_dir():
            raise StoreError(f"state database {self.path}: its folder {folder} does not exist")
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=2.0
            )
        except sqlite3.Error as exc:
            raise StoreError(explain(self.path, exc)) from None
        try:
            self._fd = _hold(self.path)
        except OSError as exc:
            self._db.close()
            raise StoreError(f"state database {self.path} cannot be read: {exc}") from None
        try:
            self._file = _file_id(self._fd)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._db.execute(  # proves, at start, that the database can be written
                "INSERT INTO meta (key, value) VALUES ('opened_at', ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (_ts(datetime.now(UTC)),),
            )
            self.opened_identity = self._read_identity(self._db)
        except (sqlite3.Error, StoreError) as exc:
            self.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(explain(self.path, exc)) from None

    def close(self) -> None:
        """Close the database (the connection first: only then may its file's lock go)."""
        self._db.close()
        fd, self._fd = self._fd, -1  # closed once: its number may be another file's next
        if fd >= 0:
            with suppress(OSError):
                os.close(fd)

    def restore(self) -> None:
        """Write the database back to :attr:`path` from the open connection, after its file
        was deleted under it (the deleted file lives on while it is open), and use the new
        file from then on: journal, state, intents and outbox as they were, identity kept.

        Raises StoreError when the path is taken (replaced: nothing is overwritten) or the
        copy cannot be made (a missing folder, a full disk).
        """
        target = Path(self.path)
        if target.exists():
            raise StoreError(f"state database {self.path} was replaced: not restoring over it")
        part = target.with_name(target.name + ".restoring")
        try:
            copy = sqlite3.connect(part)
            try:
                self._db.backup(copy)
            finally:
                copy.close()
            os.link(part, target)  # fails if someone put a file there meanwhile
        except (OSError, sqlite3.Error) as exc:
            part.unlink(missing_ok=True)
            raise StoreError(f"state database {self.path} cannot be restored: {exc}") from None
        part.unlink()
        self.close()  # its -wal and -shm belong to the deleted file: never to the copy
        for suffix in ("-wal", "-shm"):
            Path(self.path + suffix).unlink(missing_ok=True)
        try:
            self._db = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=2.0
            )
            self._fd = _hold(self.path)
            self._file = _file_id(self._fd)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"state database {self.path}: restored, not reopened: {exc}") from None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # ---- schema ------------------------------------------------------------------------------

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise StoreError(
                f"state database {self.path} has schema {version}, newer than this coalmine "
                f"({len(MIGRATIONS)}); upgrade coalmine or point COALMINE_STATE_URL elsewhere"
            )
        for number in range(version, len(MIGRATIONS)):
            with self._transaction() as db:
                db.executescript(
                    f"BEGIN IMMEDIATE; {MIGRATIONS[number]};"
                    f" PRAGMA user_version = {number + 1}; COMMIT;"
                )

    def _read_identity(self, db: sqlite3.Connection) -> StoreIdentity:
        rows = dict(db.execute("SELECT key, value FROM meta").fetchall())
        try:
            return StoreIdentity(rows["store_id"], datetime.fromisoformat(rows["created_at"]))
        except (KeyError, TypeError, ValueError):
            raise StoreError(
                f"state database {self.path}: its identity (table meta) is missing or damaged"
            ) from None

    def identity(self) -> StoreIdentity:
        """The identity of the database at :attr:`path` now, read over a connection of its own.

        Raises :class:`StoreError` when the path no longer holds the file this store opened:
        deleted, replaced, truncated or overwritten. (SQLite goes on writing to a deleted file
        without a word; nothing written there survives a restart.)
        """
        try:
            if _file_id(self.path) != self._file:
                raise StoreError(f"state database {self.path} was replaced by another file")
            header = os.pread(self._fd, len(SQLITE_HEADER), 0)  # the file at the path: see _hold
        except FileNotFoundError:
            raise StoreError(f"state database {self.path} was deleted") from None
        except OSError as exc:
            raise StoreError(f"state database {self.path} cannot be read: {exc}") from None
        if header != SQLITE_HEADER:
            raise StoreError(
                f"state database {self.path} was truncated or overwritten: no SQLite header"
            )
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=2.0)
        except sqlite3.Error as exc:
            raise StoreError(explain(self.path, exc)) from None
        try:
            return self._read_identity(db)
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) or "busy" in str(exc):
                return self.opened_identity  # the same file, its header intact: just busy
            raise StoreError(explain(self.path, exc)) from None
        except sqlite3.Error as exc:
            raise StoreError(explain(self.path, exc)) from None
        finally:
            db.close()

    @property
    def schema_version(self) -> int:
        """The schema version the database is at."""
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            yield self._db
        except BaseException as exc:
            with suppress(sqlite3.Error):  # a closed or broken connection has nothing to undo
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"state database {self.path}: {exc}") from None
            raise

    # ---- one tick, atomically ----------------------------------------------------------------

    def commit(
        self,
        script: str,
        state: dict[str, Any],
        entries: Sequence[NewEntry] = (),
        notifications: Sequence[NewNotification] = (),
        now: datetime | None = None,
        intents: Sequence[NewIntent] = (),
    ) -> list[int]:
        """Persist a script's new state with its journal entries, notifications and traffic
        intents, atomically; returns the intents' ids."""
        recorded = _ts(now or datetime.now(UTC))
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            epoch = self.fenced(db, script)
            db.execute(
                "INSERT INTO rollouts (script, state, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (script) DO UPDATE"
                " SET state = excluded.state, updated_at = excluded.updated_at",
                (script, canonical(state), recorded),
            )
            self._append(db, entries, recorded)
            for item in notifications:
                db.execute(
                    "INSERT INTO outbox (channel, dedup_key, payload, created_at, next_attempt_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (item.channel, item.dedup_key, canonical(item.payload), recorded, recorded),
                )
            ids = [self._insert_intent(db, intent, recorded) for intent in intents]
            db.executemany("UPDATE intents SET epoch = ? WHERE id = ?", [(epoch, i) for i in ids])
            db.execute("COMMIT")
        return ids

    @staticmethod
    def _insert_intent(db: sqlite3.Connection, intent: NewIntent, recorded: str) -> int:
        if intent.kind == "rollback":  # a rollback overtakes every change still pending
            db.execute(
                "UPDATE intents SET finished_at = ?, result = ?"
                " WHERE script = ? AND finished_at IS NULL",
                (recorded, canonical({"outcome": "superseded by a rollback"}), intent.script),
            )
        cursor = db.execute(
            "INSERT INTO intents (script, kind, body, created_at) VALUES (?, ?, ?, ?)",
            (intent.script, intent.kind, canonical(intent.body), recorded),
        )
        return int(cursor.lastrowid or 0)

    def _append(self, db: sqlite3.Connection, entries: Sequence[NewEntry], recorded: str) -> None:
        row = db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (row[0], row[1]) if row else (0, GENESIS)
        for entry in entries:
            seq += 1
            t = format_time(entry.t)
            digest = entry_hash(
                prev, seq, t, recorded, entry.script, entry.actor, entry.action, entry.body
            )
            db.execute(
                "INSERT INTO journal"
                " (seq, t, recorded_at, script, actor, action, body, prev_hash, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    t,
                    recorded,
                    entry.script,
                    entry.actor,
                    entry.action,
                    canonical(entry.body),
                    prev,
                    digest,
                ),
            )
            prev = digest

    def states(self) -> dict[str, dict[str, Any]]:
        """Every script's last persisted state."""
        with self._transaction() as db:
            rows = db.execute("SELECT script, state FROM rollouts").fetchall()
        return {script: json.loads(state) for script, state in rows}

    # ---- journal -----------------------------------------------------------------------------

    def journal(self, since: int = 0) -> Iterator[JournalEntry]:
        """Journal entries with ``seq > since``, oldest first."""
        with self._transaction() as db:
            cursor = db.execute(
                "SELECT seq, t, recorded_at, script, actor, action, body, prev_hash, hash "
                "FROM journal WHERE seq > ? ORDER BY seq",
                (since,),
            )
            for seq, t, recorded, script, actor, action, body, prev, digest in cursor:
                yield JournalEntry(
                    seq, t, recorded, script, actor, action, json.loads(body), prev, digest
                )

    def verify_journal(self) -> Verification:
        """Recompute the hash chain; report the first entry that does not match."""
        return verify_entries(self.journal())

    # ---- intents -----------------------------------------------------------------------------

    def begin_intent(self, script: str, kind: str, body: dict[str, Any], now: datetime) -> int:
        """Record a traffic change about to be made; returns its id."""
        with self._transaction() as db:
            return self._insert_intent(db, NewIntent(script, kind, body), _ts(now))

    def finish_intent(
        self, intent_id: int, result: dict[str, Any], now: datetime, entry: NewEntry | None = None
    ) -> None:
        """Mark an intent done with what the API answered, journaling ``entry`` with it."""
        recorded = _ts(now)
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute(
                "UPDATE intents SET finished_at = ?, result = ? WHERE id = ?" + self.once,
                (recorded, canonical(result), intent_id),
            )
            if cursor.rowcount:  # replicas: a stale holder's late finish journals nothing
                self._append(db, [entry] if entry else [], recorded)
            db.execute("COMMIT")

    def open_intents(self) -> list[Intent]:
        """Intents started and never finished (a crash in between)."""
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, script, kind, body, created_at FROM intents"
                " WHERE finished_at IS NULL ORDER BY id"
            ).fetchall()
        return [Intent(i, s, k, json.loads(b), datetime.fromisoformat(c)) for i, s, k, b, c in rows]

    # ---- outbox ------------------------------------------------------------------------------

    def due(self, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """Undelivered notifications whose next attempt is due, oldest first.

        Items sharing a dedup key go out in order: one waits while an older one with its key
        is undelivered, so a resolve never overtakes its trigger.
        """
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, channel, dedup_key, payload, attempts, next_attempt_at FROM outbox AS o"
                " WHERE delivered_at IS NULL AND next_attempt_at <= ?"
                " AND (dedup_key IS NULL OR NOT EXISTS (SELECT 1 FROM outbox AS older"
                "  WHERE older.dedup_key = o.dedup_key AND older.channel = o.channel"
                "  AND older.delivered_at IS NULL AND older.id < o.id))"
                " ORDER BY id LIMIT ?",
                (_ts(now), limit),
            ).fetchall()
        return [
            OutboxItem(i, c, d, json.loads(p), a, datetime.fromisoformat(n))
            for i, c, d, p, a, n in rows
        ]

    def delivered(self, item_id: int, now: datetime) -> None:
        """Mark a notification delivered."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET delivered_at = ?, attempts = attempts + 1, last_error = NULL"
                " WHERE id = ?",
                (_ts(now), item_id),
            )

    def failed(self, item_id: int, error: str, retry_at: datetime) -> None:
        """Record a failed attempt and when to try again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
                " WHERE id = ?",
                (error[:500], _ts(retry_at), item_id),
            )

    def backlog(self) -> int:
        """How many notifications are waiting for delivery."""
        with self._transaction() as db:
            return int(
                db.execute("SELECT count(*) FROM outbox WHERE delivered_at IS NULL").fetchone()[0]
            )


def verify_file(path: str | Path) -> Verification:
    """Verify a database's journal over its own read-only connection (safe in a thread)."""
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open state database {path}: {exc}") from None
    try:
        rows = db.execute(
            "SELECT seq, t, recorded_at, script, actor, action, body, prev_hash, hash"
            " FROM journal ORDER BY seq"
        )
        entries = (
            JournalEntry(seq, t, rec, script, actor, action, json.loads(body), prev, digest)
            for seq, t, rec, script, actor, action, body, prev, digest in rows
        )
        return verify_entries(entries)
    except sqlite3.Error as exc:
        raise StoreError(f"state database {path}: {exc}") from None
    finally:
        db.close()
