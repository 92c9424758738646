"""Leases: which replica owns which script, fenced by an epoch, on the database's clock.

Any number of ``coalmine run`` processes may share one PostgreSQL. Each watched script is
owned through a row of ``leases`` (name, holder, epoch, expiry): only the holder judges and
acts on it. The rules this module keeps:

- **The database's clock decides.** Expiry is written and compared with the database's own
  ``now`` (``clock_timestamp()`` in PostgreSQL, ``julianday('now')`` in SQLite), never with
  a replica's clock, so a replica whose clock is wrong cannot extend or steal a lease.
- **Takeover bumps the epoch.** A lease is acquired only when it has expired (or was never
  taken, or was this replica id's: a process restarted under its id takes its leases back at
  once); acquiring sets a new holder *and* ``epoch + 1``. Renewal keeps the epoch, and fails
  once the lease has expired: the holder must then acquire it again, under a new epoch.
- **Fencing.** A store with a ``fence`` checks, in the transaction that records a tick, that
  the script's lease is still this replica's, at this epoch, unexpired; otherwise it raises
  :class:`LeaseLost` and writes nothing. Intents carry the epoch that decided them, and the
  actuator asks :meth:`LeaseOps.holds` right before every Cloudflare write.
- **Heartbeats** (``replicas``) tell each replica how many are alive, so each takes at most its
  fair share of the scripts. **Commands** (``commands``) carry an operator's command from the
  replica that received it to the script's holder, and the answer back.

The outbox has a lease of its own, :data:`OUTBOX` (``*`` is in no Worker script's name).
:class:`SqliteLeaseOps` is the SQL on SQLite; SQLite allows one process (see
:func:`exclusive_file`), so it runs these leases only in tests of their semantics.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from coalmine.errors import ConfigError, RemoteError, StoreError
from coalmine.store.base import StateStore
from coalmine.store.journal import canonical

OUTBOX = "*outbox"
ACTING_FOR: ContextVar[str | None] = ContextVar("coalmine_acting_for", default=None)
"""The script whose lease the Cloudflare calls of the current task are made under (set by the
actuator); a replica's HTTP client refuses to send one once that lease is gone."""
HEARTBEATS_KEPT = 3600.0  # seconds a dead replica's heartbeat (and a command) stays, for the record

LEASE_MIGRATION = """
    CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        epoch       INTEGER NOT NULL,
        expires_at  REAL NOT NULL,
        acquired_at REAL NOT NULL
    );
    CREATE TABLE replicas (
        id         TEXT PRIMARY KEY,
        started_at REAL NOT NULL,
        expires_at REAL NOT NULL
    );
    CREATE TABLE commands (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        script       TEXT NOT NULL,
        body         TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        created_at   REAL NOT NULL,
        taken_by     TEXT,
        answer       TEXT
    );
    CREATE INDEX commands_open ON commands (script) WHERE taken_by IS NULL;
    ALTER TABLE intents ADD COLUMN epoch INTEGER;
"""
"""The SQLite schema of leases, heartbeats and forwarded commands (appended to its migrations)."""

INSTANCE_MIGRATION = "ALTER TABLE replicas ADD COLUMN instance TEXT"
"""Each heartbeat carries its process's token: a process sees another announce its id."""

# SQLite's clock, in Unix seconds with milliseconds: the database's, not the caller's
_NOW = "((julianday('now') - 2440587.5) * 86400.0)"
# a heartbeat renews its id's row only while the row is its own, tokenless, or expired
_OURS = (
    " WHERE replicas.instance IS NULL OR replicas.instance = excluded.instance"
    f" OR replicas.expires_at <= {_NOW}"
)


class LeaseLost(RemoteError):
    """This replica no longer holds a lease it acted under: it must not act, and steps down."""


class ReplicaIdInUse(RemoteError):
    """Another live process announces itself under this replica's id: leases name their holder
    by id, so two processes with one id would both act on them. This one must act on nothing."""

    def __init__(self, replica: str, expires_in: float) -> None:
        self.replica = replica
        super().__init__(
            f"replica id {replica!r} is in use by another live process (its heartbeat"
            f" lasts {max(0.0, expires_in):.0f} s more); give each replica its own"
            " COALMINE_REPLICA_ID"
        )


@dataclass(frozen=True, slots=True)
class Fence:
    """The lease a write must be made under: this replica's id and the epoch it holds."""

    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class LeaseRow:
    """One lease as stored; ``expires_in`` is in seconds by the database's clock (< 0: expired)."""

    name: str
    holder: str
    epoch: int
    expires_in: float


class LeaseOps(Protocol):
    """The lease operations a store shared by replicas offers (all on the database's clock)."""

    async def heartbeat(
        self, replica: str, ttl: float, instance: str, *, claim: bool = False
    ) -> list[str]:
        """Announce ``replica`` alive for ``ttl`` seconds; return every live replica's id.

        ``instance`` is the announcing process's own random token. With ``claim`` (a process
        starting) the id becomes this process's whatever announced it before: the newest
        process wins, as a restarted container takes its own leases back at once. Otherwise,
        when a live heartbeat of the id carries another token, nothing is written and
        :class:`ReplicaIdInUse` is raised (a row without a token, from before tokens, is
        taken over)."""
        ...

    async def renew(self, replica: str, held: Mapping[str, int], ttl: float) -> dict[str, int]:
        """Extend the unexpired leases of ``held`` (name → epoch); return those still held."""
        ...

    async def acquire(
        self, replica: str, names: Sequence[str], ttl: float, limit: int
    ) -> dict[str, int]:
        """Take up to ``limit`` of ``names`` that are free or expired; return them with epochs."""
        ...

    async def release(self, replica: str, held: Mapping[str, int]) -> None:
        """Give up leases (they expire now, keeping their epoch for the next holder to bump)."""
        ...

    async def holds(self, name: str, fence: Fence) -> bool:
        """Whether ``fence`` still holds lease ``name``: same holder and epoch, unexpired."""
        ...

    async def leases(self) -> list[LeaseRow]:
        """Every lease."""
        ...

    async def post_command(self, script: str, body: dict[str, Any], replica: str) -> int:
        """Queue an operator command for the script's holder; returns its id."""
        ...

    async def take_commands(self, script: str, replica: str) -> list[tuple[int, dict[str, Any]]]:
        """Claim the script's queued commands, oldest first."""
        ...

    async def queued(self) -> set[str]:
        """The scripts with commands no holder has taken yet."""
        ...

    async def answer_command(self, command_id: int, answer: dict[str, Any]) -> None:
        """Answer a claimed command."""
        ...

    async def command_answer(self, command_id: int) -> tuple[bool, dict[str, Any] | None]:
        """Whether a holder has taken the command, and its answer once there is one."""
        ...

    async def withdraw_command(self, command_id: int) -> bool:
        """Withdraw a command no holder has taken; False when one already has."""
        ...


class SharedStore(StateStore, LeaseOps, Protocol):
    """A store replicas share: the state store, its leases, and the fence its writes check."""

    fence: Mapping[str, Fence] | None


def shared(store: StateStore) -> SharedStore | None:
    """``store`` as a store replicas can share, or None when it has no leases."""
    return cast("SharedStore", store) if hasattr(store, "acquire") else None


class SqliteLeaseOps:
    """The lease SQL on SQLite, mixed into :class:`~coalmine.store.sqlite.SqliteStore`."""

    _db: sqlite3.Connection
    fence: Mapping[str, Fence] | None = None  # set on a replica: the leases its writes need

    @property
    def once(self) -> str:
        """Replicas finish an intent once: the holder that took over may have finished it."""
        return " AND finished_at IS NULL" if self.fence is not None else ""

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def fenced(self, db: sqlite3.Connection, script: str) -> int | None:
        """Inside a write transaction: the epoch the write is made under, or LeaseLost."""
        if self.fence is None:
            return None
        fence = self.fence.get(script)
        if fence is None:
            raise LeaseLost(f"this replica does not hold {script}; nothing written")
        row = db.execute(
            f"SELECT holder, epoch, expires_at > {_NOW} FROM leases WHERE name = ?", (script,)
        ).fetchone()
        if row is None or (row[0], row[1]) != (fence.holder, fence.epoch) or not row[2]:
            now = f"held by {row[0]} at epoch {row[1]}" if row else "not held"
            raise LeaseLost(
                f"lease on {script} lost (epoch {fence.epoch}; now {now}); nothing written"
            )
        return fence.epoch

    def heartbeat(
        self, replica: str, ttl: float, instance: str, *, claim: bool = False
    ) -> list[str]:
        """See :meth:`LeaseOps.heartbeat`."""
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            cursor = db.execute(
                "INSERT INTO replicas (id, instance, started_at, expires_at)"
                f" VALUES (?, ?, {_NOW}, {_NOW} + ?)"
                " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at,"
                " instance = excluded.instance" + ("" if claim else _OURS),
                (replica, instance, ttl),
            )
            if cursor.rowcount != 1:
                row = db.execute(
                    f"SELECT expires_at - {_NOW} FROM replicas WHERE id = ?", (replica,)
                ).fetchone()
                raise ReplicaIdInUse(replica, float(row[0]) if row else 0.0)
            db.execute(f"DELETE FROM replicas WHERE expires_at < {_NOW} - ?", (HEARTBEATS_KEPT,))
            db.execute(f"DELETE FROM commands WHERE created_at < {_NOW} - ?", (HEARTBEATS_KEPT,))
            rows = db.execute(
                f"SELECT id FROM replicas WHERE expires_at > {_NOW} ORDER BY id"
            ).fetchall()
            db.execute("COMMIT")
        return [r[0] for r in rows]

    def renew(self, replica: str, held: Mapping[str, int], ttl: float) -> dict[str, int]:
        """See :meth:`LeaseOps.renew`."""
        kept: dict[str, int] = {}
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            for name, epoch in held.items():
                cursor = db.execute(
                    f"UPDATE leases SET expires_at = {_NOW} + ?"
                    f" WHERE name = ? AND holder = ? AND epoch = ? AND expires_at > {_NOW}",
                    (ttl, name, replica, epoch),
                )
                if cursor.rowcount == 1:
                    kept[name] = epoch
            db.execute("COMMIT")
        return kept

    def acquire(self, replica: str, names: Sequence[str], ttl: float, limit: int) -> dict[str, int]:
        """See :meth:`LeaseOps.acquire`."""
        got: dict[str, int] = {}
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            for name in names:
                if len(got) >= limit:
                    break
                row = db.execute(
                    "INSERT INTO leases (name, holder, epoch, expires_at, acquired_at)"
                    f" VALUES (?, ?, 1, {_NOW} + ?, {_NOW})"
                    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                    " epoch = leases.epoch + 1, expires_at = excluded.expires_at,"
                    f" acquired_at = excluded.acquired_at WHERE leases.expires_at <= {_NOW}"
                    # a replica restarted under its id (a pod's container) takes its own back
                    " OR leases.holder = excluded.holder"
                    " RETURNING epoch",
                    (name, replica, ttl),
                ).fetchone()
                if row is not None:
                    got[name] = int(row[0])
            db.execute("COMMIT")
        return got

    def release(self, replica: str, held: Mapping[str, int]) -> None:
        """See :meth:`LeaseOps.release`."""
        with self._transaction() as db:
            db.execute("BEGIN IMMEDIATE")
            for name, epoch in held.items():
                db.execute(
                    f"UPDATE leases SET expires_at = {_NOW}"
                    " WHERE name = ? AND holder = ? AND epoch = ?",
                    (name, replica, epoch),
                )
            db.execute("COMMIT")

    def holds(self, name: str, fence: Fence) -> bool:
        """See :meth:`LeaseOps.holds`."""
        with self._transaction() as db:
            row = db.execute(
                f"SELECT 1 FROM leases WHERE name = ? AND holder = ? AND epoch = ?"
                f" AND expires_at > {_NOW}",
                (name, fence.holder, fence.epoch),
            ).fetchone()
        return row is not None

    def leases(self) -> list[LeaseRow]:
        """See :meth:`LeaseOps.leases`."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT name, holder, epoch, expires_at - {_NOW} FROM leases ORDER BY name"
            ).fetchall()
        return [LeaseRow(n, h, int(e), float(x)) for n, h, e, x in rows]

    def post_command(self, script: str, body: dict[str, Any], replica: str) -> int:
        """See :meth:`LeaseOps.post_command`."""
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO commands (script, body, submitted_by, created_at)"
                f" VALUES (?, ?, ?, {_NOW})",
                (script, canonical(body), replica),
            )
        return int(cursor.lastrowid or 0)

    def take_commands(self, script: str, replica: str) -> list[tuple[int, dict[str, Any]]]:
        """See :meth:`LeaseOps.take_commands`."""
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE commands SET taken_by = ? WHERE script = ? AND taken_by IS NULL"
                " RETURNING id, body",
                (replica, script),
            ).fetchall()
        return sorted((int(i), json.loads(b)) for i, b in rows)

    def queued(self) -> set[str]:
        """See :meth:`LeaseOps.queued`."""
        with self._transaction() as db:
            rows = db.execute("SELECT DISTINCT script FROM commands WHERE taken_by IS NULL")
            return {r[0] for r in rows}

    def answer_command(self, command_id: int, answer: dict[str, Any]) -> None:
        """See :meth:`LeaseOps.answer_command`."""
        with self._transaction() as db:
            db.execute(
                "UPDATE commands SET answer = ? WHERE id = ?", (canonical(answer), command_id)
            )

    def command_answer(self, command_id: int) -> tuple[bool, dict[str, Any] | None]:
        """See :meth:`LeaseOps.command_answer`."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT taken_by, answer FROM commands WHERE id = ?", (command_id,)
            ).fetchone()
        if row is None:
            return False, None
        return row[0] is not None, (json.loads(row[1]) if row[1] is not None else None)

    def withdraw_command(self, command_id: int) -> bool:
        """See :meth:`LeaseOps.withdraw_command`."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM commands WHERE id = ? AND taken_by IS NULL", (command_id,)
            )
        return cursor.rowcount == 1


@contextmanager
def exclusive_file(path: str | Path) -> Iterator[None]:
    """Hold ``PATH.lock`` exclusively while running: SQLite allows one ``coalmine run``.

    The lock is the kernel's (``flock``): it is released when the process ends, however it
    ends, so a crashed daemon never leaves a stale lock behind.
    """
    lock = Path(f"{path}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open lock file {lock}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(
                f"COALMINE_STATE_URL: {path} is in use by another coalmine (pid {other}); SQLite"
                " allows one process: run replicas on PostgreSQL (COALMINE_STATE_URL="
                "postgresql://...)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
