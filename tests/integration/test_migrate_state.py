"""`coalmine migrate-state`: a SQLite state file into an empty PostgreSQL, chain and all."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from coalmine.cli.commands import main
from coalmine.store.leases import exclusive_file
from coalmine.store.postgres import PostgresStore
from coalmine.store.records import NewEntry, NewIntent, NewNotification
from coalmine.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio
NOW = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)


def filled(path: Path) -> str:
    """A SQLite state with two scripts, journal entries, an open intent and a page waiting;
    returns its journal's head."""
    with SqliteStore(path) as store:
        entries = [
            NewEntry(NOW, "api", "coalmine", "start", {"canary": "v2", "n": i}) for i in range(3)
        ]
        page = NewNotification("pagerduty", {"event_action": "trigger"}, "coalmine/api/x")
        store.commit("api", {"phase": "canary"}, entries, [page], NOW)
        store.commit(
            "web",
            {"phase": "idle"},
            [NewEntry(NOW, "web", "operator", "pause", {})],
            now=NOW,
            intents=[NewIntent("web", "rollback", {"versions": [["v1", 100]]})],
        )
        return store.verify_journal().head


async def test_everything_is_copied_and_the_chain_goes_on(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """States, the open intent, the waiting page and the journal (same head) arrive; the
    daemon's next entry extends the copied chain."""
    head = filled(tmp_path / "state.db")
    argv = ["migrate-state", "--from", f"sqlite:///{tmp_path / 'state.db'}", "--to", postgres_url]
    assert await anyio.to_thread.run_sync(main, argv) == 0  # the command runs its own loop
    assert f"4 journal entries (head {head})" in capsys.readouterr().out
    store = PostgresStore(postgres_url)
    try:
        assert await store.states() == {"api": {"phase": "canary"}, "web": {"phase": "idle"}}
        [intent] = await store.open_intents()
        assert (intent.script, intent.kind) == ("web", "rollback")
        assert await store.backlog() == 1
        verified = await store.verify_journal()
        assert verified.ok and verified.entries == 4 and verified.head == head
        await store.commit(
            "api", {"phase": "promoted"}, [NewEntry(NOW, "api", "coalmine", "promote", {})]
        )
        after = await store.verify_journal()
        assert after.ok and after.entries == 5
    finally:
        await store.aclose()


def test_a_database_with_state_is_refused(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second copy into the same database is refused (exit 2); nothing is doubled."""
    filled(tmp_path / "state.db")
    argv = ["migrate-state", "--from", f"sqlite:///{tmp_path / 'state.db'}", "--to", postgres_url]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already holds coalmine state" in capsys.readouterr().err


def test_a_running_daemons_file_is_not_copied(
    tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """While `coalmine run` holds the SQLite file, the copy is refused: stop it first."""
    filled(tmp_path / "state.db")
    with exclusive_file(tmp_path / "state.db"):
        code = main(
            ["migrate-state", "--from", f"sqlite:///{tmp_path / 'state.db'}", "--to", postgres_url]
        )
    assert code == 2
    assert "in use by another coalmine" in capsys.readouterr().err
