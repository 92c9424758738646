"""The lease SQL on PostgreSQL (see :mod:`coalmine.store.leases` for the rules it keeps).

Time is ``clock_timestamp()``: the server's clock at the moment of each statement, never a
replica's. Two replicas acquiring one expired lease at once are ordered by PostgreSQL's row
lock: ``INSERT … ON CONFLICT DO UPDATE … WHERE expired`` re-checks the condition on the row
the first one committed, so only one wins. A tick's write takes ``FOR SHARE`` on its lease
row (:meth:`PostgresLeaseOps.fenced`): a takeover waits for that write to commit, so a write
is either before the takeover (and reconciled by the new holder) or refused.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg

from coalmine.store.journal import canonical
from coalmine.store.leases import HEARTBEATS_KEPT, Fence, LeaseLost, LeaseRow, ReplicaIdInUse

T = TypeVar("T")
Connection = psycopg.AsyncConnection[Any]

LEASE_MIGRATION = """
    CREATE TABLE leases (
        name        TEXT PRIMARY KEY,
        holder      TEXT NOT NULL,
        epoch       BIGINT NOT NULL,
        expires_at  TIMESTAMPTZ NOT NULL,
        acquired_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE replicas (
        id         TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE commands (
        id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        script       TEXT NOT NULL,
        body         TEXT NOT NULL,
        submitted_by TEXT NOT NULL,
        created_at   TIMESTAMPTZ NOT NULL,
        taken_by     TEXT,
        answer       TEXT
    );
    CREATE INDEX commands_open ON commands (script) WHERE taken_by IS NULL;
    ALTER TABLE intents ADD COLUMN epoch BIGINT;
"""
"""The PostgreSQL schema of leases, heartbeats and forwarded commands."""

INSTANCE_MIGRATION = "ALTER TABLE replicas ADD COLUMN instance TEXT"
"""Each heartbeat carries its process's token: a process sees another announce its id."""

_NOW = "clock_timestamp()"
_LATER = "clock_timestamp() + make_interval(secs => %s)"
# a heartbeat renews its id's row only while the row is its own, tokenless, or expired
_OURS = (
    " WHERE replicas.instance IS NULL OR replicas.instance = excluded.instance"
    f" OR replicas.expires_at <= {_NOW}"
)


class PostgresLeaseOps:
    """The lease operations, mixed into :class:`~coalmine.store.postgres.PostgresStore`."""

    fence: Mapping[str, Fence] | None = None  # set on a replica: the leases its writes need

    @property
    def once(self) -> str:
        """Replicas finish an intent once: the holder that took over may have finished it."""
        return " AND finished_at IS NULL" if self.fence is not None else ""

    async def _run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def fenced(self, conn: Connection, script: str) -> int | None:
        """Inside a write transaction: the epoch the write is made under, or LeaseLost."""
        if self.fence is None:
            return None
        fence = self.fence.get(script)
        if fence is None:
            raise LeaseLost(f"this replica does not hold {script}; nothing written")
        cursor = await conn.execute(
            f"SELECT holder, epoch, expires_at > {_NOW} FROM leases WHERE name = %s FOR SHARE",
            (script,),
        )
        row = await cursor.fetchone()
        if row is None or (row[0], row[1]) != (fence.holder, fence.epoch) or not row[2]:
            now = f"held by {row[0]} at epoch {row[1]}" if row else "not held"
            raise LeaseLost(
                f"lease on {script} lost (epoch {fence.epoch}; now {now}); nothing written"
            )
        return fence.epoch

    async def heartbeat(
        self, replica: str, ttl: float, instance: str, *, claim: bool = False
    ) -> list[str]:
        """See :meth:`~coalmine.store.leases.LeaseOps.heartbeat`."""

        async def work(conn: Connection) -> list[str]:
            async with conn.transaction():
                cursor = await conn.execute(
                    "INSERT INTO replicas (id, instance, started_at, expires_at)"
                    f" VALUES (%s, %s, {_NOW}, {_LATER})"
                    " ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at,"
                    " instance = excluded.instance" + ("" if claim else _OURS),
                    (replica, instance, ttl),
                )
                if cursor.rowcount != 1:
                    cursor = await conn.execute(
                        f"SELECT extract(epoch FROM expires_at - {_NOW}) FROM replicas"
                        " WHERE id = %s",
                        (replica,),
                    )
                    row = await cursor.fetchone()
                    raise ReplicaIdInUse(replica, float(row[0]) if row else 0.0)
                await conn.execute(
                    f"DELETE FROM replicas WHERE expires_at < {_NOW} - make_interval(secs => %s)",
                    (HEARTBEATS_KEPT,),
                )
                await conn.execute(
                    f"DELETE FROM commands WHERE created_at < {_NOW} - make_interval(secs => %s)",
                    (HEARTBEATS_KEPT,),
                )
                cursor = await conn.execute(
                    f"SELECT id FROM replicas WHERE expires_at > {_NOW} ORDER BY id"
                )
                return [r[0] for r in await cursor.fetchall()]

        return await self._run(work)

    async def renew(self, replica: str, held: Mapping[str, int], ttl: float) -> dict[str, int]:
        """See :meth:`~coalmine.store.leases.LeaseOps.renew`."""

        async def work(conn: Connection) -> dict[str, int]:
            cursor = await conn.execute(
                f"UPDATE leases SET expires_at = {_LATER}"
                f" WHERE holder = %s AND name = ANY(%s) AND expires_at > {_NOW}"
                " RETURNING name, epoch",
                (ttl, replica, list(held)),
            )
            rows = await cursor.fetchall()
            return {n: int(e) for n, e in rows if held.get(n) == int(e)}

        return await self._run(work) if held else {}

    async def acquire(
        self, replica: str, names: Sequence[str], ttl: float, limit: int
    ) -> dict[str, int]:
        """See :meth:`~coalmine.store.leases.LeaseOps.acquire`."""

        async def work(conn: Connection) -> dict[str, int]:
            got: dict[str, int] = {}
            for name in names:
                if len(got) >= limit:
                    break
                cursor = await conn.execute(
                    "INSERT INTO leases (name, holder, epoch, expires_at, acquired_at)"
                    f" VALUES (%s, %s, 1, {_LATER}, {_NOW})"
                    " ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,"
                    " epoch = leases.epoch + 1, expires_at = excluded.expires_at,"
                    f" acquired_at = excluded.acquired_at WHERE leases.expires_at <= {_NOW}"
                    # a replica restarted under its id (a pod's container) takes its own back
                    " OR leases.holder = excluded.holder"
                    " RETURNING epoch",
                    (name, replica, ttl),
                )
                row = await cursor.fetchone()
                if row is not None:
                    got[name] = int(row[0])
            return got

        return await self._run(work)

    async def release(self, replica: str, held: Mapping[str, int]) -> None:
        """See :meth:`~coalmine.store.leases.LeaseOps.release`."""

        async def work(conn: Connection) -> None:
            async with conn.transaction():
                for name, epoch in held.items():
                    await conn.execute(
                        f"UPDATE leases SET expires_at = {_NOW}"
                        " WHERE name = %s AND holder = %s AND epoch = %s",
                        (name, replica, epoch),
                    )

        await self._run(work)

    async def holds(self, name: str, fence: Fence) -> bool:
        """See :meth:`~coalmine.store.leases.LeaseOps.holds`."""

        async def work(conn: Connection) -> bool:
            cursor = await conn.execute(
                "SELECT 1 FROM leases WHERE name = %s AND holder = %s AND epoch = %s"
                f" AND expires_at > {_NOW}",
                (name, fence.holder, fence.epoch),
            )
            return await cursor.fetchone() is not None

        return await self._run(work)

    async def leases(self) -> list[LeaseRow]:
        """See :meth:`~coalmine.store.leases.LeaseOps.leases`."""

        async def work(conn: Connection) -> list[tuple[str, str, int, float]]:
            cursor = await conn.execute(
                "SELECT name, holder, epoch,"
                f" extract(epoch FROM expires_at - {_NOW})::float8 FROM leases ORDER BY name"
            )
            return await cursor.fetchall()

        return [LeaseRow(n, h, int(e), float(x)) for n, h, e, x in await self._run(work)]

    async def post_command(self, script: str, body: dict[str, Any], replica: str) -> int:
        """See :meth:`~coalmine.store.leases.LeaseOps.post_command`."""

        async def work(conn: Connection) -> int:
            cursor = await conn.execute(
                "INSERT INTO commands (script, body, submitted_by, created_at)"
                f" VALUES (%s, %s, %s, {_NOW}) RETURNING id",
                (script, canonical(body), replica),
            )
            row = await cursor.fetchone()
            assert row is not None
            return int(row[0])

        return await self._run(work)

    async def take_commands(self, script: str, replica: str) -> list[tuple[int, dict[str, Any]]]:
        """See :meth:`~coalmine.store.leases.LeaseOps.take_commands`."""

        async def work(conn: Connection) -> list[tuple[int, str]]:
            cursor = await conn.execute(
                "UPDATE commands SET taken_by = %s WHERE script = %s AND taken_by IS NULL"
                " RETURNING id, body",
                (replica, script),
            )
            return await cursor.fetchall()

        return sorted((int(i), json.loads(b)) for i, b in await self._run(work))

    async def queued(self) -> set[str]:
        """See :meth:`~coalmine.store.leases.LeaseOps.queued`."""

        async def work(conn: Connection) -> set[str]:
            cursor = await conn.execute(
                "SELECT DISTINCT script FROM commands WHERE taken_by IS NULL"
            )
            return {r[0] for r in await cursor.fetchall()}

        return await self._run(work)

    async def answer_command(self, command_id: int, answer: dict[str, Any]) -> None:
        """See :meth:`~coalmine.store.leases.LeaseOps.answer_command`."""

        async def work(conn: Connection) -> None:
            await conn.execute(
                "UPDATE commands SET answer = %s WHERE id = %s", (canonical(answer), command_id)
            )

        await self._run(work)

    async def command_answer(self, command_id: int) -> tuple[bool, dict[str, Any] | None]:
        """See :meth:`~coalmine.store.leases.LeaseOps.command_answer`."""

        async def work(conn: Connection) -> tuple[str | None, str | None] | None:
            cursor = await conn.execute(
                "SELECT taken_by, answer FROM commands WHERE id = %s", (command_id,)
            )
            return await cursor.fetchone()

        row = await self._run(work)
        if row is None:
            return False, None
        return row[0] is not None, (json.loads(row[1]) if row[1] is not None else None)

    async def withdraw_command(self, command_id: int) -> bool:
        """See :meth:`~coalmine.store.leases.LeaseOps.withdraw_command`."""

        async def work(conn: Connection) -> int:
            cursor = await conn.execute(
                "DELETE FROM commands WHERE id = %s AND taken_by IS NULL", (command_id,)
            )
            return cursor.rowcount

        return await self._run(work) == 1
