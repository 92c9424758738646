"""The state store, on both backends (SQLite and PostgreSQL) through the daemon's awaitable
seam: migrations, atomic ticks, the hash-chained append-only journal, intents, the outbox, and
the ``coalmine journal`` commands."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from coalmine.cli import main
from coalmine.errors import StoreError
from coalmine.store import StateStore
from coalmine.store.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from coalmine.store.records import NewEntry, NewIntent, NewNotification
from coalmine.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from tests.stores import Backend, DatabaseError
from tests.support import at

pytestmark = pytest.mark.anyio

MIGRATIONS = {"sqlite": SQLITE_MIGRATIONS, "postgres": POSTGRES_MIGRATIONS}


def entry(seconds: float, action: str = "hold", **body: object) -> NewEntry:
    """A journal entry at T0 + seconds."""
    return NewEntry(at(seconds), "api", "coalmine", action, {"reason": "test", **body})


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[StateStore]:
    """A fresh store on the backend under test."""
    opened = backend.open()
    await opened.states()  # created and migrated
    yield opened
    await opened.aclose()


def schema_version(backend: Backend) -> int:
    """The schema version the database records."""
    if backend.name == "sqlite":
        return int(backend.rows("PRAGMA user_version")[0][0])
    return int(backend.rows("SELECT version FROM schema_version")[0][0])


async def test_new_database_is_migrated_to_the_latest_schema(
    backend: Backend, store: StateStore
) -> None:
    """Opening a new database applies every migration and records the version."""
    assert schema_version(backend) == len(MIGRATIONS[backend.name])
    assert await store.states() == {}


async def test_database_from_a_newer_coalmine_is_refused(backend: Backend) -> None:
    """A schema newer than this build is a clear StoreError, not a silent downgrade."""
    first = backend.open()
    await first.states()
    await first.aclose()
    newer = len(MIGRATIONS[backend.name]) + 1
    if backend.name == "sqlite":
        backend.execute(f"PRAGMA user_version = {newer}")
    else:
        backend.execute(f"UPDATE schema_version SET version = {newer}")

    async def reopen() -> None:
        again = backend.open()
        try:
            await again.states()
        finally:
            await again.aclose()

    with pytest.raises(StoreError, match="newer than this coalmine"):
        await reopen()


async def test_commit_persists_state_journal_and_outbox_together(backend: Backend) -> None:
    """One tick's state, journal entries and notifications survive a reopen."""
    store = backend.open()
    await store.commit(
        "api",
        {"phase": "canary", "step": 1},
        [entry(10, "set_traffic", canary_percent=50)],
        [NewNotification("pagerduty", {"event_action": "trigger"}, "coalmine/api/v2/err")],
        now=at(10),
    )
    await store.aclose()
    store = backend.open()
    try:
        assert await store.states() == {"api": {"phase": "canary", "step": 1}}
        (journaled,) = await store.journal()
        assert (journaled.seq, journaled.action, journaled.body["canary_percent"]) == (
            1,
            "set_traffic",
            50,
        )
        (due,) = await store.due(at(10))
        assert (due.channel, due.dedup_key, due.payload) == (
            "pagerduty",
            "coalmine/api/v2/err",
            {"event_action": "trigger"},
        )
        assert await store.backlog() == 1
    finally:
        await store.aclose()


async def test_failed_commit_leaves_nothing_behind(store: StateStore) -> None:
    """A tick whose journal entry cannot be written stores neither its state nor its outbox."""
    bad = NewEntry(at(1), "api", "coalmine", "hold", {"value": float("nan")})  # not strict JSON
    with pytest.raises(ValueError, match="JSON"):
        await store.commit(
            "api", {"phase": "canary"}, [bad], [NewNotification("slack", {"text": "x"})]
        )
    assert await store.states() == {}
    assert await store.backlog() == 0
    assert await store.journal() == []


async def test_journal_chain_verifies(store: StateStore) -> None:
    """Entries appended over several commits form one chain that verifies."""
    for i in range(5):
        await store.commit("api", {"i": i}, [entry(i), entry(i, "page")], now=at(i))
    result = await store.verify_journal()
    assert result.ok and result.entries == 10
    assert result.head == (await store.journal())[-1].hash


async def test_journal_is_append_only(backend: Backend, store: StateStore) -> None:
    """UPDATE and DELETE on the journal are refused by the database itself."""
    await store.commit("api", {}, [entry(1)])
    with pytest.raises(DatabaseError, match="append-only"):
        backend.execute("UPDATE journal SET action = 'promote'")
    with pytest.raises(DatabaseError, match="append-only"):
        backend.execute("DELETE FROM journal")
    assert len(await store.journal()) == 1


async def test_journal_cannot_be_truncated_on_postgres(
    postgres_url: str, postgres_server: object
) -> None:
    """TRUNCATE, which skips row triggers, is refused on PostgreSQL too."""
    backend = Backend("postgres", postgres_url)
    store = backend.open()
    await store.commit("api", {}, [entry(1)])
    await store.aclose()
    with pytest.raises(DatabaseError, match="append-only"):
        backend.execute("TRUNCATE journal")
    assert len(backend.rows("SELECT seq FROM journal")) == 1


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        (
            'UPDATE journal SET body = \'{"reason":"edited"}\' WHERE seq = 2',
            "entry 2: content does not match its hash",
        ),
        ("DELETE FROM journal WHERE seq = 2", "entry 2 is missing"),
        ("UPDATE journal SET prev_hash = hash WHERE seq = 3", "entry 3: prev_hash does not match"),
    ],
)
async def test_tampering_is_found(
    backend: Backend, store: StateStore, tamper: str, problem: str
) -> None:
    """An edited, deleted or re-linked entry breaks verification at that entry."""
    await store.commit("api", {}, [entry(1), entry(2), entry(3)])
    backend.tamper(tamper)
    result = await store.verify_journal()
    assert not result.ok
    assert problem in result.problem
    assert result.entries == 1 if "2" in problem else result.entries == 2


async def test_intents_open_until_finished(store: StateStore) -> None:
    """An intent begun and never finished is reported as open (a crash between the two)."""
    first, second = await store.commit(
        "api",
        {},
        now=at(1),
        intents=[
            NewIntent("api", "set_traffic", {"canary_percent": 50}),
            NewIntent("other", "set_traffic", {"canary_percent": 10}),
        ],
    )
    (third,) = await store.commit(
        "api", {}, now=at(2), intents=[NewIntent("other", "rollback", {"canary_percent": 0})]
    )
    await store.finish_intent(first, {"deployment_id": "d1"}, at(3), entry(3, "applied"))
    (open_intent,) = await store.open_intents()
    assert (open_intent.id, open_intent.kind, open_intent.body) == (
        third,
        "rollback",
        {"canary_percent": 0},
    )
    assert open_intent.created_at == at(2)
    assert second < third  # superseded by the rollback, not open
    assert [e.action for e in await store.journal()] == ["applied"]


async def test_outbox_retry_schedule(store: StateStore) -> None:
    """A failed delivery is retried only once due; a delivered one never again."""
    await store.commit(
        "api",
        {},
        [],
        [NewNotification("slack", {"text": "a"}), NewNotification("slack", {"text": "b"})],
        now=at(0),
    )
    first, second = await store.due(at(0))
    await store.failed(first.id, "HTTP 503", at(60))
    await store.delivered(second.id, at(1))
    assert await store.due(at(30)) == []
    (retry,) = await store.due(at(60))
    assert (retry.id, retry.attempts) == (first.id, 1)
    assert retry.next_attempt_at == at(0) + timedelta(seconds=60)
    assert await store.backlog() == 1


async def test_items_with_one_dedup_key_go_out_in_order(store: StateStore) -> None:
    """A resolve waits while its trigger is undelivered, however their backoffs fall."""
    key = "coalmine/api/v2/err"
    trigger = NewNotification("pagerduty", {"event_action": "trigger"}, key)
    await store.commit("api", {}, [], [trigger], now=at(0))
    (sent,) = await store.due(at(0))
    await store.failed(sent.id, "HTTP 500", at(600))  # backing off for 10 minutes
    resolve = NewNotification("pagerduty", {"event_action": "resolve"}, key)
    await store.commit("api", {}, [], [resolve], now=at(60))
    await store.commit("api", {}, [], [NewNotification("slack", {"text": "other"})], now=at(60))
    assert [i.channel for i in await store.due(at(60))] == ["slack"]  # the resolve must wait
    assert [i.payload["event_action"] for i in await store.due(at(600)) if i.dedup_key] == [
        "trigger"
    ]
    await store.delivered(sent.id, at(600))
    assert [i.payload["event_action"] for i in await store.due(at(600)) if i.dedup_key] == [
        "resolve"
    ]


def test_cli_journal_verify_and_export(
    backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine journal verify` exits 0 on a good chain, 1 on a broken one; export writes JSONL;
    both take a file or a URL."""

    async def write() -> None:  # the CLI runs an event loop of its own: this test is sync
        store = backend.open()
        await store.commit("api", {}, [entry(1), entry(2, "promote")])
        await store.aclose()

    anyio.run(write)
    assert main(["journal", "verify", "--state", backend.cli_state]) == 0
    assert capsys.readouterr().out.startswith("journal ok: 2 entries, head ")
    assert main(["journal", "export", "--state", backend.cli_state, "--since", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["action"] == "promote"
    backend.tamper("UPDATE journal SET actor = 'mallory' WHERE seq = 1")
    assert main(["journal", "verify", "--state", backend.cli_state]) == 1
    assert "entry 1: content does not match its hash" in capsys.readouterr().err


def test_cli_journal_without_database_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verifying a database that does not exist is a clear local error, not a new empty file."""
    assert main(["journal", "verify", "--state", str(tmp_path / "none.db")]) == 2
    assert "no state database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
