"""The PostgreSQL store's own promises, on a real server: one gap-free journal chain however
many writers append at once, migrations that race safely, and a password that never shows."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest

from coalmine.cli import main
from coalmine.errors import StoreError
from coalmine.store import open_store
from coalmine.store.postgres import PostgresStore, connection_string
from coalmine.store.records import NewEntry, NewIntent, NewNotification
from tests.e2e.test_process import at_percent, simulated, start, wait_for
from tests.e2e.test_process import url as daemon_url
from tests.integration.postgres import PASSWORD, RunningPostgres
from tests.stores import Backend
from tests.support import at

pytestmark = pytest.mark.anyio


def entry(seconds: float, script: str, n: int) -> NewEntry:
    """A journal entry from writer ``script``, its ``n``-th."""
    return NewEntry(at(seconds), script, "coalmine", "hold", {"reason": "test", "n": n})


async def test_concurrent_writers_keep_one_gap_free_chain(postgres_url: str) -> None:
    """Eight stores (eight pools, as eight replicas would have) committing ticks at once leave
    one chain: seq 1..N without a gap, every entry once, and it verifies."""
    writers, ticks = 8, 15
    stores = [open_store(postgres_url) for _ in range(writers)]
    await stores[0].states()

    async def write(number: int) -> None:
        store = stores[number]
        for tick in range(ticks):
            await store.commit(
                f"script-{number}",
                {"tick": tick},
                [entry(tick, f"script-{number}", tick), entry(tick, f"script-{number}", -tick)],
                [NewNotification("slack", {"text": f"{number}/{tick}"})],
                now=at(tick),
            )

    try:
        async with anyio.create_task_group() as tg:
            for number in range(writers):
                tg.start_soon(write, number)
        result = await stores[0].verify_journal()
        journal = await stores[0].journal()
    finally:
        for store in stores:
            await store.aclose()
    assert result.ok, result.problem
    assert result.entries == writers * ticks * 2
    assert [e.seq for e in journal] == list(range(1, writers * ticks * 2 + 1))
    for number in range(writers):  # each writer's entries in its own order, none lost
        mine = [e.body["n"] for e in journal if e.script == f"script-{number}"]
        assert mine == [n for tick in range(ticks) for n in (tick, -tick)]


async def test_stores_opening_a_new_database_together_migrate_it_once(postgres_url: str) -> None:
    """Replicas starting at once on an empty database all open it; the schema is made once."""
    stores = [open_store(postgres_url) for _ in range(6)]
    try:
        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(store.states)
    finally:
        for store in stores:
            await store.aclose()
    rows = Backend("postgres", postgres_url).rows("SELECT version FROM schema_version")
    assert len(rows) == 1


async def test_a_rollback_intent_supersedes_the_open_ones_across_stores(postgres_url: str) -> None:
    """A rollback committed through one connection finishes the intent another one opened."""
    first, second = open_store(postgres_url), open_store(postgres_url)
    try:
        await first.commit("api", {}, intents=[NewIntent("api", "set_traffic", {"w": 50})])
        (rollback,) = await second.commit(
            "api", {}, intents=[NewIntent("api", "rollback", {"w": 0})]
        )
        assert [i.id for i in await first.open_intents()] == [rollback]
    finally:
        await first.aclose()
        await second.aclose()


async def test_password_never_shows_in_location_or_errors(
    postgres_server: RunningPostgres, postgres_url: str
) -> None:
    """The URL's password is in neither the store's location nor any StoreError: a wrong
    password, a missing database, a server that refuses."""
    store = open_store(postgres_url)
    try:
        await store.states()
        assert PASSWORD not in store.location
        assert store.location == postgres_url.replace(f":{PASSWORD}@", "@")
    finally:
        await store.aclose()
    wrong = postgres_url.replace(PASSWORD, "wrong-" + PASSWORD)
    missing = postgres_server.url("no_such_database")
    refused = f"postgresql://coalmine:{PASSWORD}@127.0.0.1:1/db?connect_timeout=2"
    for url, cause in (
        (wrong, "password authentication failed"),
        (missing, 'database "no_such_database" does not exist'),
        (refused, "refused"),
    ):
        bad = open_store(url)
        with pytest.raises(StoreError) as caught:
            await bad.states()
        await bad.aclose()
        assert cause in str(caught.value)
        assert PASSWORD not in str(caught.value) and PASSWORD not in bad.location


def drop_connections(server: RunningPostgres, url: str) -> None:
    """Have the server end every connection to ``url``'s database (a restart, a failover)."""
    dbname = url.rsplit("/", 1)[1]
    Backend("postgres", server.url()).execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        f" WHERE datname = '{dbname}' AND pid <> pg_backend_pid()"
    )


async def test_idle_connections_the_server_closed_are_replaced_before_use(
    postgres_server: RunningPostgres, postgres_url: str
) -> None:
    """After the server dropped the pooled connections, a connection idle past
    check_after_idle is checked and replaced: the next calls work."""
    store = PostgresStore(postgres_url)
    store.check_after_idle = 0.0  # every connection counts as idle
    try:
        await store.commit("api", {"n": 1})
        drop_connections(postgres_server, postgres_url)
        await store.commit("api", {"n": 2})
        assert await store.states() == {"api": {"n": 2}}
    finally:
        await store.aclose()


async def test_busy_connections_the_server_closed_fail_one_call_each_then_recover(
    postgres_server: RunningPostgres, postgres_url: str
) -> None:
    """A connection used moments ago is trusted; if the server dropped it, that call is a
    StoreError (never a psycopg error), the connection is discarded, and calls work again."""
    store = PostgresStore(postgres_url)
    try:
        await store.commit("api", {"n": 1})
        drop_connections(postgres_server, postgres_url)
        failures = 0
        for n in range(2, 20):
            try:
                await store.commit("api", {"n": n})
                break
            except StoreError:
                failures += 1
        assert failures <= 16  # at most one per pooled connection
        assert (await store.states())["api"]["n"] == n
    finally:
        await store.aclose()


def test_journal_commands_refuse_a_database_without_coalmine(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine journal verify` on an empty PostgreSQL database says so, exits 1, and creates
    no tables there."""
    assert main(["journal", "verify", "--state", postgres_url]) == 1
    err = capsys.readouterr().err
    assert "no coalmine state in this database" in err and PASSWORD not in err
    assert Backend("postgres", postgres_url).rows("SELECT to_regclass('journal')") == [(None,)]


def test_servers_off_loopback_are_reached_over_verified_tls() -> None:
    """A URL off loopback without sslmode gets verify-full against the system's roots; an
    explicit sslmode and loopback URLs are left as they are."""
    remote = connection_string("postgresql://c:pw@db.example.com:5432/c")
    assert "sslmode=verify-full" in remote and "sslrootcert=system" in remote
    explicit = "postgresql://c:pw@db.example.com/c?sslmode=require&connect_timeout=9"
    assert connection_string(explicit) == explicit
    for local in ("postgresql://c@127.0.0.1/c", "postgresql:///c?host=/run/postgresql"):
        assert "sslmode" not in connection_string(local)
        assert "connect_timeout=5" in connection_string(local)


async def test_operations_started_finish_when_their_caller_is_cancelled(postgres_url: str) -> None:
    """A commit whose caller is cancelled mid-way still lands whole (as on SQLite)."""
    store = PostgresStore(postgres_url)
    try:
        await store.states()
        with anyio.CancelScope() as scope:
            scope.cancel()
            await store.commit("api", {"n": 1}, [entry(1, "api", 1)])
        assert await store.states() == {"api": {"n": 1}}
        assert (await store.verify_journal()).entries == 1
    finally:
        await store.aclose()


async def test_identity_is_made_once_and_a_new_database_has_another(
    postgres_server: RunningPostgres,
) -> None:
    """The store's id and creation time are made by the first migration and read back the same
    by every later open; a new database gets a new id; a dropped schema is a StoreError."""
    url = postgres_server.new_database()
    first = PostgresStore(url)
    try:
        made = await first.identity()
    finally:
        await first.aclose()
    again = PostgresStore(url)
    try:
        assert await again.identity() == made
        other = PostgresStore(postgres_server.new_database())
        try:
            assert (await other.identity()).id != made.id
        finally:
            await other.aclose()
        Backend("postgres", url).execute("DROP TABLE meta")
        with pytest.raises(StoreError, match="identity"):
            await again.identity()
    finally:
        await again.aclose()


async def test_coalmine_run_on_postgres_never_shows_the_password(
    tmp_path: Path, postgres_server: RunningPostgres, postgres_url: str
) -> None:
    """`coalmine run` on a PostgreSQL URL advances a canary and stops cleanly, and the URL's
    password is in none of its log, /health, /metrics, nor `journal verify`; with a wrong
    password it stops, and its output (traceback included) does not show the password."""
    async with simulated(tmp_path) as (_, env):
        env["COALMINE_STATE_URL"] = postgres_url
        log = tmp_path / "run.log"
        process = start(env, log)
        try:
            await wait_for(lambda: at_percent(env, 50))
            async with httpx.AsyncClient() as client:
                health = (await client.get(daemon_url(env) + "/health")).text
                metrics = (await client.get(daemon_url(env) + "/metrics")).text
        finally:
            process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
        assert code == 0, log.read_text()
        verify = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "coalmine", "journal", "verify"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        )
        assert verify.returncode == 0, verify.stderr
        assert verify.stdout.startswith("journal ok: ")
        for text in (log.read_text(), health, metrics, verify.stdout + verify.stderr):
            assert PASSWORD not in text

        env["COALMINE_STATE_URL"] = postgres_url.replace(PASSWORD, "wrong-" + PASSWORD)
        env["COALMINE_DEBUG"] = "1"  # a traceback, if any, must not show it either
        refused = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "coalmine", "run"],
                env=env,
                capture_output=True,
                text=True,
                check=False,
                timeout=60,
            )
        )
        assert refused.returncode != 0
        assert PASSWORD not in refused.stdout + refused.stderr
