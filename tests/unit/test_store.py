"""The state store: migrations, atomic ticks, the hash-chained journal, intents, the outbox."""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.cli import main
from coalmine.errors import StoreError
from coalmine.store.records import NewEntry, NewNotification
from coalmine.store.sqlite import MIGRATIONS
from coalmine.store.sqlite import SqliteStore as Store
from tests.support import at


def entry(seconds: float, action: str = "hold", **body: object) -> NewEntry:
    """A journal entry at T0 + seconds."""
    return NewEntry(at(seconds), "api", "coalmine", action, {"reason": "test", **body})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A fresh database."""
    return Store(tmp_path / "state.db")


def test_new_database_is_migrated_to_the_latest_schema(store: Store) -> None:
    """Opening a new file applies every migration and records the version."""
    assert store.schema_version == len(MIGRATIONS)
    assert store.states() == {}


def test_database_from_a_newer_coalmine_is_refused(tmp_path: Path) -> None:
    """A schema newer than this build is a clear StoreError, not a silent downgrade."""
    path = tmp_path / "state.db"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this coalmine"):
        Store(path)


def test_commit_persists_state_journal_and_outbox_together(tmp_path: Path) -> None:
    """One tick's state, journal entries and notifications survive a reopen."""
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.commit(
            "api",
            {"phase": "canary", "step": 1},
            [entry(10, "set_traffic", canary_percent=50)],
            [NewNotification("pagerduty", {"event_action": "trigger"}, "coalmine/api/v2/err")],
            now=at(10),
        )
    with Store(path) as store:
        assert store.states() == {"api": {"phase": "canary", "step": 1}}
        (journaled,) = store.journal()
        assert (journaled.seq, journaled.action, journaled.body["canary_percent"]) == (
            1,
            "set_traffic",
            50,
        )
        (due,) = store.due(at(10))
        assert (due.channel, due.dedup_key, due.payload) == (
            "pagerduty",
            "coalmine/api/v2/err",
            {"event_action": "trigger"},
        )
        assert store.backlog() == 1


def test_failed_commit_leaves_nothing_behind(store: Store) -> None:
    """A tick whose journal entry cannot be written stores neither its state nor its outbox."""
    bad = NewEntry(at(1), "api", "coalmine", "hold", {"value": float("nan")})  # not strict JSON
    with pytest.raises(ValueError, match="JSON"):
        store.commit("api", {"phase": "canary"}, [bad], [NewNotification("slack", {"text": "x"})])
    assert store.states() == {}
    assert store.backlog() == 0
    assert list(store.journal()) == []


def test_journal_chain_verifies(store: Store) -> None:
    """Entries appended over several commits form one chain that verifies."""
    for i in range(5):
        store.commit("api", {"i": i}, [entry(i), entry(i, "page")], now=at(i))
    result = store.verify_journal()
    assert result.ok and result.entries == 10
    assert result.head == list(store.journal())[-1].hash


def test_journal_is_append_only(store: Store) -> None:
    """UPDATE and DELETE on the journal are refused by the database itself."""
    store.commit("api", {}, [entry(1)])
    db = sqlite3.connect(store.path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE journal SET action = 'promote'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM journal")
    db.close()


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
def test_tampering_is_found(store: Store, tamper: str, problem: str) -> None:
    """An edited, deleted or re-linked entry breaks verification at that entry."""
    store.commit("api", {}, [entry(1), entry(2), entry(3)])
    db = sqlite3.connect(store.path)
    db.executescript(f"DROP TRIGGER journal_no_update; DROP TRIGGER journal_no_delete; {tamper};")
    db.close()
    result = store.verify_journal()
    assert not result.ok
    assert problem in result.problem
    assert result.entries == 1 if "2" in problem else result.entries == 2


def test_intents_open_until_finished(store: Store) -> None:
    """An intent begun and never finished is reported as open (a crash between the two)."""
    first = store.begin_intent("api", "set_traffic", {"canary_percent": 50}, at(1))
    second = store.begin_intent("api", "rollback", {"canary_percent": 0}, at(2))
    store.finish_intent(first, {"deployment_id": "d1"}, at(3))
    (open_intent,) = store.open_intents()
    assert (open_intent.id, open_intent.kind, open_intent.body) == (
        second,
        "rollback",
        {"canary_percent": 0},
    )


def test_outbox_retry_schedule(store: Store) -> None:
    """A failed delivery is retried only once due; a delivered one never again."""
    store.commit(
        "api",
        {},
        [],
        [NewNotification("slack", {"text": "a"}), NewNotification("slack", {"text": "b"})],
        now=at(0),
    )
    first, second = store.due(at(0))
    store.failed(first.id, "HTTP 503", at(60))
    store.delivered(second.id, at(1))
    assert store.due(at(30)) == []
    (retry,) = store.due(at(60))
    assert (retry.id, retry.attempts) == (first.id, 1)
    assert retry.next_attempt_at == at(0) + timedelta(seconds=60)
    assert store.backlog() == 1


def test_cli_journal_verify_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`coalmine journal verify` exits 0 on a good chain, 1 on a broken one; export writes JSONL."""
    path = tmp_path / "state.db"
    with Store(path) as store:
        store.commit("api", {}, [entry(1), entry(2, "promote")])
    assert main(["journal", "verify", "--state", str(path)]) == 0
    assert capsys.readouterr().out.startswith("journal ok: 2 entries, head ")
    assert main(["journal", "export", "--state", str(path), "--since", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["action"] == "promote"
    db = sqlite3.connect(path)
    db.executescript(
        "DROP TRIGGER journal_no_update; UPDATE journal SET actor = 'mallory' WHERE seq = 1;"
    )
    db.close()
    assert main(["journal", "verify", "--state", str(path)]) == 1
    assert "entry 1: content does not match its hash" in capsys.readouterr().err


def test_cli_journal_without_database_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Verifying a database that does not exist is a clear local error, not a new empty file."""
    assert main(["journal", "verify", "--state", str(tmp_path / "none.db")]) == 2
    assert "no state database" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


def test_items_with_one_dedup_key_go_out_in_order(store: Store) -> None:
    """A resolve waits while its trigger is undelivered, however their backoffs fall."""
    key = "coalmine/api/v2/err"
    store.commit(
        "api", {}, [], [NewNotification("pagerduty", {"event_action": "trigger"}, key)], now=at(0)
    )
    (trigger,) = store.due(at(0))
    store.failed(trigger.id, "HTTP 500", at(600))  # backing off for 10 minutes
    store.commit(
        "api", {}, [], [NewNotification("pagerduty", {"event_action": "resolve"}, key)], now=at(60)
    )
    store.commit("api", {}, [], [NewNotification("slack", {"text": "other"})], now=at(60))
    assert [i.channel for i in store.due(at(60))] == ["slack"]  # the resolve must wait
    assert [i.payload["event_action"] for i in store.due(at(600)) if i.dedup_key] == ["trigger"]
    store.delivered(trigger.id, at(600))
    assert [i.payload["event_action"] for i in store.due(at(600)) if i.dedup_key] == ["resolve"]
