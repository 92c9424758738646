"""The state database locked by another process, or refusing writes: nothing is acted on that
is not recorded, nothing recorded is lost, and /health says so until it recovers.

Both faults are made from a second SQLite connection, as another process would make them:

- *locked*: a transaction holding the write lock (``BEGIN EXCLUSIVE``) past coalmine's busy
  timeout (2 s), as a backup tool or an operator's ``sqlite3`` shell can;
- *a write failing*: triggers that raise inside every INSERT and UPDATE, so each of coalmine's
  writes fails mid-transaction the way SQLITE_FULL or SQLITE_IOERR would. (chmod cannot make
  the files unwritable: coalmine holds them open, and CI runs as root; a full filesystem would
  need a mount.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from tests.e2e.harness import served
from tests.reliability.conftest import (
    PROMETHEUS_POLICY,
    assert_degraded,
    assert_delivered_once,
    assert_healthy,
    assert_held,
    assert_journal_complete,
    fault_harness,
    health,
    traffic_posts,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

HOLD = timedelta(minutes=1)  # PROMETHEUS_POLICY's first step
TABLES = ("rollouts", "journal", "outbox", "intents")


@contextmanager
def write_lock(path: str) -> Iterator[None]:
    """Another connection holds the database's write lock for the duration of the block."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            db.execute("ROLLBACK")


@contextmanager
def failing_writes(path: str) -> Iterator[None]:
    """Every INSERT and UPDATE on coalmine's tables fails for the duration of the block."""
    names = [f"fault_{table}_{op.lower()}" for table in TABLES for op in ("INSERT", "UPDATE")]
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        for table in TABLES:
            for op in ("INSERT", "UPDATE"):
                db.execute(
                    f"CREATE TRIGGER fault_{table}_{op.lower()} BEFORE {op} ON {table}"
                    " BEGIN SELECT RAISE(ABORT, 'disk I/O error (injected)'); END"
                )
        try:
            yield
        finally:
            for name in names:
                db.execute(f"DROP TRIGGER {name}")


async def test_database_locked_when_the_step_is_due_changes_nothing_until_released(
    tmp_path: Path,
) -> None:
    """The write lock is held by another process as the hold ends: the advance is neither
    recorded nor sent, /health degraded; released: it is recorded once, sent once."""
    async with (
        fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.ticks(2, held_at=10)
        journaled = len(list(h.db.journal()))
        with write_lock(h.db.path):
            await h.tick()
            step_started = h.loop.state.step_started_at
            assert step_started is not None and step_started + HOLD <= h.clock()  # was due
            await h.tick()
            assert_held(h, 10)
            assert traffic_posts(h) == []
            assert len(list(h.db.journal())) == journaled
            assert_degraded(await health(client), "state_store")

        await h.tick()
        assert h.actions()[-1] == "set_traffic"
        assert traffic_posts(h) == [200]
        assert_healthy(await health(client))
        await h.run_until(lambda h: "complete" in h.actions(), timedelta(minutes=5))
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_writes_failing_for_minutes_degrade_then_unhealthy_then_recover(
    tmp_path: Path,
) -> None:
    """Every write fails for 6 minutes: nothing is changed or sent, /health degraded and,
    past 5 minutes, unhealthy (503); writes work again: healthy, and the rollout goes on."""
    async with (
        fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.ticks(1, held_at=10)
        journaled = len(list(h.db.journal()))
        with failing_writes(h.db.path):
            await h.ticks(2, held_at=10)
            assert_degraded(await health(client), "state_store")
            await h.ticks(10, held_at=10)
            body = await health(client)
            assert body["status"] == "unhealthy"
            assert body["checks"]["state_store"]["status"] == "failing"
            assert traffic_posts(h) == []
            assert len(list(h.db.journal())) == journaled
            assert h.db.open_intents() == []

        await h.tick()
        assert h.actions()[-1] == "set_traffic"
        assert traffic_posts(h) == [200]
        assert_healthy(await health(client))
        await h.run_until(lambda h: "complete" in h.actions(), timedelta(minutes=5))
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_a_message_sent_while_writes_fail_is_not_sent_again(tmp_path: Path) -> None:
    """Slack comes back while the database refuses writes: each queued message is sent, its
    delivery cannot be recorded, yet it is not sent again; recorded once writes work."""
    async with fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h:
        await h.sim.slack.go_down()
        await h.ticks(1, held_at=10)
        assert h.db.backlog() == 1  # the "start" message
        with failing_writes(h.db.path):
            await h.sim.slack.go_up()
            await h.ticks(4, held_at=10)
            assert len(h.sim.slack_messages) == 1
        await h.run_until(lambda h: h.db.backlog() == 0, timedelta(minutes=2))
        await h.run_until(lambda h: "complete" in h.actions(), timedelta(minutes=5))
        assert_journal_complete(h)
        assert_delivered_once(h)
