"""A store that knows itself (identity, a file deleted or replaced under it) and one that keeps
in memory, in order, what its store cannot take (:class:`KeepingStore`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from coalmine.cli import main
from coalmine.errors import StoreError
from coalmine.store.kept import KeepingStore
from coalmine.store.records import NewEntry, NewIntent, NewNotification
from coalmine.store.sqlite import MIGRATIONS, SqliteStore
from coalmine.store.threaded import ThreadedSqlite
from tests.support import at

pytestmark = pytest.mark.anyio
ROLLBACK = NewIntent("api", "rollback", {"versions": [["stable", 100]], "message": "m"})
PAGE = NewNotification("pagerduty", {"event_action": "trigger"}, "coalmine/api/c/err")


def entry(seconds: float, action: str) -> NewEntry:
    """A journal entry at T0 + seconds."""
    return NewEntry(at(seconds), "api", "coalmine", action, {"reason": action})


@contextmanager
def failing_writes(path: str) -> Iterator[None]:
    """Every INSERT into the journal fails for the duration of the block."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(
            "CREATE TRIGGER fail BEFORE INSERT ON journal"
            " BEGIN SELECT RAISE(ABORT, 'disk I/O error (injected)'); END"
        )
        try:
            yield
        finally:
            db.execute("DROP TRIGGER fail")


# ---- identity ----------------------------------------------------------------------------------


def test_a_store_keeps_its_identity_across_reopens(tmp_path: Path) -> None:
    """The id and creation time are made once, with the database, and read back the same."""
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        first = store.identity()
        assert first == store.opened_identity
        assert len(first.id) == 32
    with SqliteStore(path) as store:
        assert store.identity() == first
    with SqliteStore(tmp_path / "other.db") as other:
        assert other.identity().id != first.id


def test_a_database_from_before_identities_dates_from_its_first_entry(tmp_path: Path) -> None:
    """Upgrading a schema-1 database gives it an identity created at its first journal entry."""
    path = tmp_path / "state.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.executescript(f"BEGIN; {MIGRATIONS[0]}; PRAGMA user_version = 1; COMMIT;")
        db.execute(
            "INSERT INTO journal VALUES (1, 't', '2026-01-02T03:04:05.000000Z', 'api', 'c', 'a',"
            " '{}', 'p', 'h')"
        )
    with SqliteStore(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.identity().created_at.isoformat() == "2026-01-02T03:04:05+00:00"


@pytest.mark.parametrize(
    ("harm", "said"),
    [
        (lambda p: p.unlink(), "was deleted"),
        (lambda p: p.rename(p.with_name("moved.db")), "was deleted"),
        (lambda p: p.write_bytes(b""), "truncated or overwritten"),
        (lambda p: p.write_bytes(b"garbage" * 1000), "truncated or overwritten"),
    ],
)
def test_a_file_deleted_or_overwritten_under_the_store_is_an_error(
    tmp_path: Path, harm: object, said: str
) -> None:
    """identity() fails, saying what happened, once the path no longer holds the opened file."""
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        harm(path)  # type: ignore[operator]
        with pytest.raises(StoreError, match=said):
            store.identity()


def test_a_file_replaced_by_a_copy_of_itself_is_an_error(tmp_path: Path) -> None:
    """A copy moved over the path (a new file, the same identity) is noticed: coalmine would
    write to the old, unlinked file."""
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        copy = tmp_path / "copy.db"
        copy.write_bytes(path.read_bytes())
        copy.replace(path)
        with pytest.raises(StoreError, match="replaced by another file"):
            store.identity()


# ---- keeping ------------------------------------------------------------------------------------


async def test_kept_ticks_are_written_in_order_before_the_next_commit(tmp_path: Path) -> None:
    """Ticks kept while writes fail, and the outcome of their intent, are written oldest
    first, under stored ids, before the commit that found the store back; the chain verifies."""
    sync = SqliteStore(tmp_path / "state.db")
    store = KeepingStore(ThreadedSqlite(sync), lambda: at(100))
    await store.commit("api", {"n": 0}, [entry(0, "start")], now=at(0))
    with failing_writes(sync.path):
        with pytest.raises(StoreError):
            await store.commit("api", {"n": 1}, [entry(10, "warn")], now=at(10))
        tick = store.keep("api", {"n": 1}, [entry(10, "rollback")], [PAGE], at(10), [ROLLBACK])
        tick.sent.add(0)  # the page went out directly
        (open_intent,) = await store.open_intents()
        assert open_intent.id < 0
        finished = NewEntry(at(11), "api", "coalmine", "applied", {"intent": open_intent.id})
        await store.finish_intent(open_intent.id, {"outcome": "applied"}, at(11), finished)
        assert await store.open_intents() == []
        with pytest.raises(StoreError):
            await store.commit("api", {"n": 2}, [entry(20, "warn")], now=at(20))
        assert not store.ok
    await store.commit("api", {"n": 3}, [entry(30, "complete")], now=at(30))
    assert store.ok
    actions = [(e.action, e.body) for e in sync.journal()]
    assert [a for a, _ in actions] == ["start", "rollback", "applied", "complete"]
    (intent_id,) = [row[0] for row in sync._db.execute("SELECT id FROM intents")]
    assert actions[2][1] == {"intent": intent_id}
    assert sync.open_intents() == []
    assert sync.backlog() == 0  # the page sent directly is not queued again
    assert sync.states() == {"api": {"n": 3}}
    assert sync.verify_journal().ok


async def test_an_outcome_the_store_cannot_record_is_kept_and_not_offered_again(
    tmp_path: Path,
) -> None:
    """finish_intent failing after the change was made: kept, the intent no longer open, and
    recorded once the store takes writes."""
    sync = SqliteStore(tmp_path / "state.db")
    store = KeepingStore(ThreadedSqlite(sync), lambda: at(100))
    (intent_id,) = await store.commit("api", {}, [], [], at(0), [ROLLBACK])
    with failing_writes(sync.path):
        done = NewEntry(at(1), "api", "coalmine", "applied", {"intent": intent_id})
        await store.finish_intent(intent_id, {"outcome": "applied"}, at(1), done)
        assert await store.open_intents() == []
        assert len(sync.open_intents()) == 1
    await store.flush()
    assert sync.open_intents() == []
    assert [e.action for e in sync.journal()] == ["applied"]


async def test_a_lost_store_is_never_written(tmp_path: Path) -> None:
    """While the store is lost every commit is refused and nothing reaches the file; found
    again, what was kept is written."""
    sync = SqliteStore(tmp_path / "state.db")
    store = KeepingStore(ThreadedSqlite(sync), lambda: at(100))
    store.lost = "state database was deleted"
    with pytest.raises(StoreError, match="deleted"):
        await store.commit("api", {"n": 1}, [entry(1, "warn")], now=at(1))
    store.keep("api", {"n": 1}, [entry(1, "rollback")], [], at(1), [])
    with pytest.raises(StoreError):
        await store.flush()
    assert list(sync.journal()) == []
    store.lost = None
    await store.flush()
    assert [e.action for e in sync.journal()] == ["rollback"]


def test_journal_verify_shows_the_genesis(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine journal verify` names the store and its creation time, so a journal that
    restarted from zero (a new store) is told apart from the one it replaced."""
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        identity = store.identity()
    assert main(["journal", "verify", "--state", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("journal ok: 0 entries, head ")
    assert f"genesis: store {identity.id} created {identity.created_at.isoformat()}" in out


def test_journal_verify_of_a_garbage_file_is_exit_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not a SQLite database: exit 2, the file and the cause, no traceback."""
    path = tmp_path / "state.db"
    path.write_bytes(b"garbage" * 1000)
    assert main(["journal", "verify", "--state", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err
    assert "not a SQLite database" in err


async def test_what_is_kept_is_written_at_stop_if_the_store_takes_it(tmp_path: Path) -> None:
    """Stopping with records kept: written if the store takes writes by then, else left
    (and logged as lost) without raising."""
    sync = SqliteStore(tmp_path / "state.db")
    store = KeepingStore(ThreadedSqlite(sync), lambda: at(100))
    store.keep("api", {"n": 1}, [entry(1, "rollback")], [], at(1), [])
    with failing_writes(sync.path):
        await store.last_flush()
        assert len(store.kept) == 1
    await store.last_flush()
    assert store.kept == []
    assert [e.action for e in sync.journal()] == ["rollback"]


def test_a_deleted_database_is_written_back_from_the_open_file(tmp_path: Path) -> None:
    """restore() after the file (and its -wal, -shm) was deleted: the same identity, journal
    and state at the path, and writes after it survive a reopen."""
    path = tmp_path / "state.db"
    store = SqliteStore(path)
    store.commit("api", {"n": 1}, [entry(1, "start")], now=at(1))
    identity = store.identity()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    store.restore()
    assert store.identity() == identity
    store.commit("api", {"n": 2}, [entry(2, "warn")], now=at(2))
    store.close()
    with SqliteStore(path) as again:
        assert again.identity() == identity
        assert [e.action for e in again.journal()] == ["start", "warn"]
        assert again.states() == {"api": {"n": 2}}
        assert again.verify_journal().ok


def test_a_replaced_database_is_not_overwritten_by_restore(tmp_path: Path) -> None:
    """restore() refuses when another file is at the path: nothing is overwritten."""
    path = tmp_path / "state.db"
    with SqliteStore(path) as store:
        path.unlink()
        path.write_bytes(b"someone else's file")
        with pytest.raises(StoreError, match="replaced"):
            store.restore()
        assert path.read_bytes() == b"someone else's file"
