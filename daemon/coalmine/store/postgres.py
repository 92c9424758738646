"""The state store on PostgreSQL: psycopg 3 over an async connection pool.

It keeps what :mod:`coalmine.store.sqlite` keeps, in the same shape (``rollouts``, ``intents``,
``outbox``, the append-only hash-chained ``journal``), so that any number of coalmine processes
can share one database:

- one tick is one transaction (:meth:`PostgresStore.commit`);
- the journal stays one gap-free chain whoever writes: every append first locks the one-row
  ``journal_head`` table (``SELECT … FOR UPDATE``), so appenders queue, each sees the head its
  predecessor committed, and ``seq`` is assigned by coalmine, not by a sequence with gaps;
- triggers refuse UPDATE, DELETE and TRUNCATE on the journal;
- migrations are versioned in ``schema_version`` and applied under an advisory lock, so replicas
  starting together migrate once;
- ``meta`` holds the store's identity: a random id and the time the schema was created.

Every psycopg error becomes a :class:`~coalmine.errors.StoreError`, and no message, log line or
``location`` ever carries the URL's password. A call that has started finishes even when its
caller is cancelled (as with SQLite), bounded by :data:`OPERATION_TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import AsyncConnectionPool

from coalmine.engine.model import format_time
from coalmine.errors import StoreError
from coalmine.store.journal import GENESIS, canonical, entry_hash, verify_entries
from coalmine.store.pg_leases import INSTANCE_MIGRATION, LEASE_MIGRATION, PostgresLeaseOps
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
from coalmine.store.urls import is_postgres_url, redact, scrub

CONNECT_TIMEOUT = 5  # seconds to open one connection
OPERATION_TIMEOUT = 15.0  # seconds for one store call, waiting for a connection included
POOL_SIZE = (2, 16)
# a pooled connection idle this long is checked (one round trip) before it is handed out;
# one used more recently is trusted, so that a busy daemon pays nothing for the check
CHECK_AFTER_IDLE = 2.0
# pg_advisory_xact_lock key serialising migrations: "coalmine" in ASCII
MIGRATION_LOCK = 0x636F616C6D696E65
LOOPBACK = frozenset({"", "localhost", "127.0.0.1", "::1"})

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (
        one        BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        id         TEXT NOT NULL,
        created_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO meta (id, created_at) VALUES (gen_random_uuid()::text, now());
    CREATE TABLE rollouts (
        script     TEXT PRIMARY KEY,
        state      TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE TABLE intents (
        id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        script      TEXT NOT NULL,
        kind        TEXT NOT NULL,
        body        TEXT NOT NULL,
        created_at  TIMESTAMPTZ NOT NULL,
        finished_at TIMESTAMPTZ,
        result      TEXT
    );
    CREATE INDEX intents_open ON intents (script) WHERE finished_at IS NULL;
    CREATE TABLE outbox (
        id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        channel         TEXT NOT NULL,
        dedup_key       TEXT,
        payload         TEXT NOT NULL,
        created_at      TIMESTAMPTZ NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        next_attempt_at TIMESTAMPTZ NOT NULL,
        delivered_at    TIMESTAMPTZ,
        last_error      TEXT
    );
    CREATE INDEX outbox_due ON outbox (next_attempt_at) WHERE delivered_at IS NULL;
    -- t and recorded_at are hashed as text: kept as the exact strings that were hashed
    CREATE TABLE journal (
        seq         BIGINT PRIMARY KEY,
        t           TEXT NOT NULL,
        recorded_at TEXT NOT NULL,
        script      TEXT NOT NULL,
        actor       TEXT NOT NULL,
        action      TEXT NOT NULL,
        body        TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    );
    CREATE TABLE journal_head (
        one  BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (one),
        seq  BIGINT NOT NULL,
        hash TEXT NOT NULL
    );
    INSERT INTO journal_head (seq, hash) VALUES (0, repeat('0', 64));
    CREATE FUNCTION coalmine_journal_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the journal is append-only'; END
    $$;
    CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
        FOR EACH ROW EXECUTE FUNCTION coalmine_journal_append_only();
    CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
        FOR EACH ROW EXECUTE FUNCTION coalmine_journal_append_only();
    CREATE TRIGGER journal_no_truncate BEFORE TRUNCATE ON journal
        FOR EACH STATEMENT EXECUTE FUNCTION coalmine_journal_append_only();
    """,
    LEASE_MIGRATION,
    INSTANCE_MIGRATION,
)

T = TypeVar("T")
Connection = psycopg.AsyncConnection[Any]


def connection_string(url: str) -> str:
    """libpq's connection string for ``url``: as given, except that connecting gives up after
    :data:`CONNECT_TIMEOUT` seconds and a server off loopback is reached over TLS with its
    certificate verified against the system's roots (``sslmode=verify-full``,
    ``sslrootcert=system``), unless the URL (or libpq's ``PGCONNECT_TIMEOUT``, ``PGSSLMODE``)
    says otherwise."""
    params = conninfo_to_dict(url)
    extra: dict[str, str] = {}
    if "connect_timeout" not in params and not os.environ.get("PGCONNECT_TIMEOUT"):
        extra["connect_timeout"] = str(CONNECT_TIMEOUT)
    hosts = str(params.get("host", "")).split(",")
    local = all(h in LOOPBACK or h.startswith("/") for h in hosts)
    if not (local or "sslmode" in params or os.environ.get("PGSSLMODE")):
        extra["sslmode"] = "verify-full"
        if "sslrootcert" not in params and not os.environ.get("PGSSLROOTCERT"):
            extra["sslrootcert"] = "system"
    return make_conninfo(url, **extra) if extra else url


def _ts(t: datetime) -> str:
    """The fixed-width UTC timestamp the journal hashes (the same text as in SQLite)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


async def _configure(conn: Connection) -> None:
    """Every pooled connection works in UTC and never waits on a statement for ever."""
    await conn.execute("SET TIME ZONE 'UTC'")
    await conn.execute(f"SET statement_timeout = '{int(OPERATION_TIMEOUT * 1000)}ms'")


class PostgresStore(PostgresLeaseOps):
    """A PostgreSQL database behind the :class:`~coalmine.store.base.StateStore` seam.

    Nothing connects until the first call: that call opens a direct connection to migrate the
    schema (so its error names the cause: refused, bad password, no such database), then the
    pool. Every later call borrows a pooled connection. ``create=False`` (the journal commands)
    migrates nothing and refuses a database without coalmine's schema.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        if not is_postgres_url(url):
            raise StoreError(f"not a PostgreSQL URL: {redact(url)}")
        self._url = url
        self._location = redact(url)
        self._create = create
        try:
            self._conninfo = connection_string(url)
        except psycopg.Error as exc:
            raise self._error(exc) from None
        self._pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},
            min_size=POOL_SIZE[0],
            max_size=POOL_SIZE[1],
            open=False,
            configure=_configure,
            # after a failover or a restart of the server, dead pooled connections are
            # replaced, not handed out to fail a tick each
            check=self._check,
            timeout=OPERATION_TIMEOUT,
            name="coalmine-state",
        )
        self._ready = False
        self._opening = anyio.Lock()
        self._used: weakref.WeakKeyDictionary[Connection, float] = weakref.WeakKeyDictionary()
        self.check_after_idle = CHECK_AFTER_IDLE

    @property
    def location(self) -> str:
        """The database's URL without its password."""
        return self._location

    def _error(self, exc: BaseException) -> StoreError:
        message = scrub(str(exc).strip() or type(exc).__name__, self._url)
        return StoreError(f"state database {self._location}: {message}")

    # ---- connections -------------------------------------------------------------------------

    async def _check(self, conn: Connection) -> None:
        used = self._used.get(conn)
        if used is None or time.monotonic() - used >= self.check_after_idle:
            await AsyncConnectionPool.check_connection(conn)

    async def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``work`` on a pooled connection: shielded from the caller's cancellation,
        bounded in time, psycopg errors translated."""
        with anyio.CancelScope(shield=True):
            try:
                with anyio.fail_after(OPERATION_TIMEOUT * 2):
                    await self._open()
                    async with self._pool.connection() as conn:
                        result = await work(conn)
                        self._used[conn] = time.monotonic()
            except psycopg.Error as exc:
                raise self._error(exc) from None
            except TimeoutError:
                raise StoreError(
                    f"state database {self._location}: no answer within {OPERATION_TIMEOUT * 2:g}s"
                ) from None
        return result

    async def _open(self) -> None:
        if self._ready:
            return
        async with self._opening:
            if self._ready:
                return
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            try:
                await _configure(conn)
                await self._migrate(conn)
            finally:
                await conn.close()
            await self._pool.open()
            self._ready = True

    async def _migrate(self, conn: Connection) -> None:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            if not self._create:
                cursor = await conn.execute("SELECT to_regclass('schema_version') IS NOT NULL")
                if not (await cursor.fetchone() or (False,))[0]:
                    raise StoreError(
                        f"state database {self._location}: no coalmine state in this database"
                        " (coalmine never ran on it)"
                    )
                return
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            cursor = await conn.execute("SELECT version FROM schema_version")
            row = await cursor.fetchone()
            if row is None:
                await conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            version = int(row[0]) if row else 0
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"state database {self._location} has schema {version}, newer than this"
                    f" coalmine ({len(MIGRATIONS)}); upgrade coalmine or point"
                    " COALMINE_STATE_URL elsewhere"
                )
            for number in range(version, len(MIGRATIONS)):
                await conn.execute(MIGRATIONS[number].encode())
                await conn.execute("UPDATE schema_version SET version = %s", (number + 1,))

    async def identity(self) -> StoreIdentity:
        """The identity of the store in the database now (the ``meta`` row made by the first
        migration); a StoreError when it cannot be read there (the schema dropped, say)."""

        async def read(conn: Connection) -> tuple[str, datetime] | None:
            try:
                cursor = await conn.execute("SELECT id, created_at FROM meta")
            except psycopg.errors.UndefinedTable:
                return None
            return await cursor.fetchone()

        row = await self._run(read)
        if row is None:
            raise StoreError(
                f"state database {self._location}: its identity (table meta) is missing"
            )
        return StoreIdentity(row[0], row[1])

    async def schema_version(self) -> int:
        """The schema version the database is at."""

        async def read(conn: Connection) -> int:
            cursor = await conn.execute("SELECT version FROM schema_version")
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return await self._run(read)

    async def aclose(self) -> None:
        """Close the pool's connections."""
        with anyio.CancelScope(shield=True):
            try:
                await self._pool.close()
            except psycopg.Error as exc:
                raise self._error(exc) from None

    # ---- one tick, atomically ----------------------------------------------------------------

    async def commit(
        self,
        script: str,
        state: dict[str, Any],
        entries: Sequence[NewEntry] = (),
        notifications: Sequence[NewNotification] = (),
        now: datetime | None = None,
        intents: Sequence[NewIntent] = (),
    ) -> list[int]:
        """Persist a script's new state with its journal entries, notifications and traffic
        intents in one transaction; returns the intents' ids."""
        moment = now or datetime.now(UTC)
        recorded = _ts(moment)
        # serialised before the transaction: a value that is not strict JSON fails here
        state_text = canonical(state)
        journal = [(entry, canonical(entry.body)) for entry in entries]
        outbox = [(item, canonical(item.payload)) for item in notifications]
        changes = [(intent, canonical(intent.body)) for intent in intents]

        async def work(conn: Connection) -> list[int]:
            # pipelined: a tick without journal entries or intents is one round trip
            async with conn.pipeline(), conn.transaction():
                epoch = await self.fenced(conn, script)  # replicas: still the holder?
                await conn.execute(
                    "INSERT INTO rollouts (script, state, updated_at) VALUES (%s, %s, %s)"
                    " ON CONFLICT (script) DO UPDATE"
                    " SET state = excluded.state, updated_at = excluded.updated_at",
                    (script, state_text, recorded),
                )
                await _append(conn, journal, recorded)
                if outbox:
                    async with conn.cursor() as insert:
                        await insert.executemany(
                            "INSERT INTO outbox"
                            " (channel, dedup_key, payload, created_at, next_attempt_at)"
                            " VALUES (%s, %s, %s, %s, %s)",
                            [(i.channel, i.dedup_key, p, moment, moment) for i, p in outbox],
                        )
                ids = [await _insert_intent(conn, i, body, moment) for i, body in changes]
                for intent_id in ids:
                    await conn.execute(
                        "UPDATE intents SET epoch = %s WHERE id = %s", (epoch, intent_id)
                    )
                return ids

        return await self._run(work)

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every script's last persisted state."""

        async def read(conn: Connection) -> list[tuple[str, str]]:
            cursor = await conn.execute("SELECT script, state FROM rollouts")
            return await cursor.fetchall()

        return {script: json.loads(state) for script, state in await self._run(read)}

    # ---- journal -----------------------------------------------------------------------------

    async def journal(self, since: int = 0) -> list[JournalEntry]:
        """Journal entries with ``seq > since``, oldest first."""
        return await self._run(lambda conn: _read_journal(conn, since))

    async def verify_journal(self) -> Verification:
        """Recompute the hash chain over one consistent snapshot of the journal."""

        async def read(conn: Connection) -> list[JournalEntry]:
            async with conn.transaction():
                await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return await _read_journal(conn, 0)

        return verify_entries(await self._run(read))

    # ---- intents -----------------------------------------------------------------------------

    async def begin_intent(
        self, script: str, kind: str, body: dict[str, Any], now: datetime
    ) -> int:
        """Record a traffic change about to be made; returns its id."""
        text = canonical(body)

        async def work(conn: Connection) -> int:
            async with conn.transaction():
                return await _insert_intent(conn, NewIntent(script, kind, body), text, now)

        return await self._run(work)

    async def finish_intent(
        self, intent_id: int, result: dict[str, Any], now: datetime, entry: NewEntry | None = None
    ) -> None:
        """Mark an intent done with what the API answered, journaling ``entry`` with it."""
        text = canonical(result)
        journal = [(entry, canonical(entry.body))] if entry else []

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                cursor = await conn.execute(
                    "UPDATE intents SET finished_at = %s, result = %s WHERE id = %s" + self.once,
                    (now, text, intent_id),
                )
                if cursor.rowcount:  # replicas: a stale holder's late finish journals nothing
                    await _append(conn, journal, _ts(now))

        await self._run(work)

    async def open_intents(self) -> list[Intent]:
        """Intents started and never finished (a crash in between)."""

        async def read(conn: Connection) -> list[tuple[int, str, str, str, datetime]]:
            cursor = await conn.execute(
                "SELECT id, script, kind, body, created_at FROM intents"
                " WHERE finished_at IS NULL ORDER BY id"
            )
            return await cursor.fetchall()

        return [Intent(i, s, k, json.loads(b), c) for i, s, k, b, c in await self._run(read)]

    # ---- outbox ------------------------------------------------------------------------------

    async def due(self, now: datetime, limit: int = 50) -> list[OutboxItem]:
        """Undelivered notifications whose next attempt is due, oldest first; one waits while
        an older one with its dedup key is undelivered (a resolve never overtakes its trigger)."""

        async def read(conn: Connection) -> list[tuple[int, str, str | None, str, int, datetime]]:
            cursor = await conn.execute(
                "SELECT id, channel, dedup_key, payload, attempts, next_attempt_at"
                " FROM outbox AS o"
                " WHERE delivered_at IS NULL AND next_attempt_at <= %s"
                " AND (dedup_key IS NULL OR NOT EXISTS (SELECT 1 FROM outbox AS older"
                "  WHERE older.dedup_key = o.dedup_key AND older.channel = o.channel"
                "  AND older.delivered_at IS NULL AND older.id < o.id))"
                " ORDER BY id LIMIT %s",
                (now, limit),
            )
            return await cursor.fetchall()

        return [
            OutboxItem(i, c, d, json.loads(p), a, n) for i, c, d, p, a, n in await self._run(read)
        ]

    async def delivered(self, item_id: int, now: datetime) -> None:
        """Mark a notification delivered."""
        await self._run(
            lambda conn: conn.execute(
                "UPDATE outbox SET delivered_at = %s, attempts = attempts + 1, last_error = NULL"
                " WHERE id = %s",
                (now, item_id),
            )
        )

    async def failed(self, item_id: int, error: str, retry_at: datetime) -> None:
        """Record a failed attempt and when to try again."""
        await self._run(
            lambda conn: conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, last_error = %s, next_attempt_at = %s"
                " WHERE id = %s",
                (error[:500], retry_at, item_id),
            )
        )

    async def backlog(self) -> int:
        """How many notifications are waiting for delivery."""

        async def read(conn: Connection) -> int:
            cursor = await conn.execute("SELECT count(*) FROM outbox WHERE delivered_at IS NULL")
            row = await cursor.fetchone()
            return int(row[0]) if row else 0

        return await self._run(read)


async def _insert_intent(conn: Connection, intent: NewIntent, body: str, now: datetime) -> int:
    if intent.kind == "rollback":  # a rollback overtakes every change still pending
        await conn.execute(
            "UPDATE intents SET finished_at = %s, result = %s"
            " WHERE script = %s AND finished_at IS NULL",
            (now, canonical({"outcome": "superseded by a rollback"}), intent.script),
        )
    cursor = await conn.execute(
        "INSERT INTO intents (script, kind, body, created_at) VALUES (%s, %s, %s, %s) RETURNING id",
        (intent.script, intent.kind, body, now),
    )
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


async def _append(conn: Connection, entries: Sequence[tuple[NewEntry, str]], recorded: str) -> None:
    """Append to the chain inside the caller's transaction, holding the head's row lock until
    it commits: concurrent appenders (other replicas) wait, then continue from the new head."""
    if not entries:
        return
    cursor = await conn.execute("SELECT seq, hash FROM journal_head FOR UPDATE")
    row = await cursor.fetchone()
    seq, prev = (int(row[0]), str(row[1])) if row else (0, GENESIS)
    rows = []
    for entry, body in entries:
        seq += 1
        t = format_time(entry.t)
        digest = entry_hash(
            prev, seq, t, recorded, entry.script, entry.actor, entry.action, entry.body
        )
        rows.append((seq, t, recorded, entry.script, entry.actor, entry.action, body, prev, digest))
        prev = digest
    async with conn.cursor() as insert:
        await insert.executemany(
            "INSERT INTO journal"
            " (seq, t, recorded_at, script, actor, action, body, prev_hash, hash)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            rows,
        )
    await conn.execute("UPDATE journal_head SET seq = %s, hash = %s", (seq, prev))


async def _read_journal(conn: Connection, since: int) -> list[JournalEntry]:
    cursor = await conn.execute(
        "SELECT seq, t, recorded_at, script, actor, action, body, prev_hash, hash"
        " FROM journal WHERE seq > %s ORDER BY seq",
        (since,),
    )
    return [
        JournalEntry(seq, t, recorded, script, actor, action, json.loads(body), prev, digest)
        for seq, t, recorded, script, actor, action, body, prev, digest in await cursor.fetchall()
    ]
