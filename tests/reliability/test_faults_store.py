"""The state database locked by another process, refusing writes, full, or deleted, replaced
or overwritten under the daemon: progress is never acted on unrecorded, a breach still rolls
back and pages at once (the decisions kept in memory and journaled, in order, once the store is
back), nothing recorded is lost, and /health and /readyz say so until it recovers.

Both faults are made from a second SQLite connection, as another process would make them:

- *locked*: a transaction holding the write lock (``BEGIN EXCLUSIVE``) past coalmine's busy
  timeout (2 s), as a backup tool or an operator's ``sqlite3`` shell can;
- *a write failing*: triggers that raise inside every INSERT and UPDATE, so each of coalmine's
  writes fails mid-transaction the way SQLITE_FULL or SQLITE_IOERR would. (chmod cannot make
  the files unwritable: coalmine holds them open, and CI runs as root.)
- *disk full*: the state folder on a small tmpfs, filled up (needs root to mount: skipped,
  saying so, otherwise);
- *read-only*: the database and its WAL made immutable (``chattr +i``: read-only to root too;
  skipped, saying why, where the file system has no such flag). Not the ``-shm`` file: SQLite
  maps it, and a write to it then kills the process with SIGBUS;
- *lost*: the file deleted (written back from the open file), its folder removed (lost until
  the folder is back), or overwritten with garbage while the daemon runs.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from coalmine.guard import STORE_PAGE_KEY
from tests.e2e.harness import ADMIN_TOKEN, served
from tests.reliability.conftest import (
    CANARY,
    PROMETHEUS_POLICY,
    SCRIPT,
    STABLE,
    FaultHarness,
    assert_degraded,
    assert_delivered_once,
    assert_healthy,
    assert_held,
    assert_journal_complete,
    fault_harness,
    health,
    traffic_posts,
    wait_until,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

HOLD = timedelta(minutes=1)  # PROMETHEUS_POLICY's first step
TABLES = ("rollouts", "journal", "outbox", "intents")
# PROMETHEUS_POLICY's rollback rule: `for` 1m, at an interval of 30s
ROLLBACK_BOUND = timedelta(minutes=1) + timedelta(seconds=30) + timedelta(seconds=2)


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
            # the first tick decided nothing new and wrote nothing: the store failed from the
            # second one on (the first write it was asked for)
            await h.ticks(11, held_at=10)
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


# ---- a breach while the store cannot record -----------------------------------------------------


@contextmanager
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted in ``tmp_path`` (root only: skip, saying why, otherwise)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a full disk) needs root; CI runs the tests as root")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?): {mounted.stderr}"
        )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextmanager
def disk_full(folder: Path) -> Iterator[None]:
    """The file system of ``folder`` has no byte left for the duration of the block."""
    filler = folder / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        yield
    finally:
        filler.unlink()


def rollback_pages(h: FaultHarness) -> list[dict[str, Any]]:
    """The critical page triggers PagerDuty accepted for the canary's rollback rule."""
    key = f"coalmine/{SCRIPT}/{CANARY}/error_rate"
    return [p for p in h.sim.pages if p["dedup_key"] == key and p["event_action"] == "trigger"]


async def breach_rolls_back_in_time(h: FaultHarness) -> None:
    """The canary starts breaching its rollback rule now: traffic is back on the stable version
    within ``for`` + interval + 2 s (a deadline on the condition, in the daemon's time)."""
    assert h.prometheus is not None
    h.prometheus.error_ratio = "0.5"
    deadline = h.clock() + ROLLBACK_BOUND
    while h.sim.cloudflare.current(SCRIPT).split != {STABLE: 100}:
        assert h.clock() <= deadline, f"no rollback by {ROLLBACK_BOUND}: {h.actions()}"
        await h.tick()
    assert "rollback" in h.actions()
    assert not {"set_traffic", "promote"} & set(h.actions())


async def ready(client: httpx.AsyncClient) -> tuple[int, str]:
    """GET /readyz."""
    response = await client.get("/readyz")
    return response.status_code, response.text


async def test_a_breach_while_writes_fail_rolls_back_pages_once_and_is_journaled_after(
    tmp_path: Path,
) -> None:
    """Every write fails as the canary breaches: it is rolled back in time anyway, paged once
    (directly), /health and /readyz say why; writes back: the journal holds every decision."""
    async with (
        fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        h.daemon.api.ready = True
        await h.ticks(1, held_at=10)
        journaled = len(list(h.db.journal()))
        with failing_writes(h.db.path):
            await breach_rolls_back_in_time(h)
            assert len(rollback_pages(h)) == 1
            assert len(list(h.db.journal())) == journaled  # nothing could be written
            body = await health(client)
            assert body["checks"]["state_store"]["status"] == "failing"
            assert body["checks"]["state_store"]["kept_in_memory"] >= 1
            status, why = await ready(client)
            assert status == 503, why
            await h.ticks(2)
            assert len(rollback_pages(h)) == 1

        await h.ticks(2)
        assert await ready(client) == (200, "ready\n")
        assert_healthy(await health(client))
        assert [p["versions"] for p in h.sim.deployment_posts(SCRIPT)] == [
            [{"version_id": STABLE, "percentage": 100}]
        ]
        assert len(rollback_pages(h)) == 1
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_an_operator_rollback_while_writes_fail_is_applied_not_refused(
    tmp_path: Path,
) -> None:
    """`coalmine rollback` while every write fails: 200 and the stable version at 100% (it
    used to answer 503); journaled once writes work again."""
    async with (
        fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.ticks(1, held_at=10)
        answers: list[httpx.Response] = []

        async def post() -> None:
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            answers.append(await client.post("/api/v1/rollouts/api/rollback", headers=headers))

        with failing_writes(h.db.path):
            async with anyio.create_task_group() as tg:
                tg.start_soon(post)
                await wait_until(lambda: bool(h.loop._pending), "queued")
                await h.tick()
            (response,) = answers
            assert response.status_code == 200, response.text
            assert [d["action"] for d in response.json()["decisions"]] == ["rollback"]
            assert h.sim.cloudflare.current(SCRIPT).split == {STABLE: 100}
            assert (await health(client))["checks"]["state_store"]["status"] == "failing"
        await h.ticks(2)
        assert_healthy(await health(client))
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_a_breach_on_a_full_disk_rolls_back_and_is_journaled_once_space_is_back(
    tmp_path: Path,
) -> None:
    """The state folder's file system is full as the canary breaches: rolled back in time,
    paged once; space freed: every decision journaled, every notification delivered once."""
    with small_disk(tmp_path) as folder:
        async with fault_harness(folder, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h:
            await h.ticks(1, held_at=10)
            journaled = len(list(h.db.journal()))
            with disk_full(folder):
                await breach_rolls_back_in_time(h)
                assert len(rollback_pages(h)) == 1
                await h.ticks(2)
                assert len(list(h.db.journal())) == journaled
            await h.ticks(2)
            assert len(rollback_pages(h)) == 1
            assert_journal_complete(h)
            assert_delivered_once(h)


@contextmanager
def read_only(path: str) -> Iterator[None]:
    """The database file and its WAL refuse every write, root's too, for the block."""
    files = [path, path + "-wal"]
    made = subprocess.run(["chattr", "+i", *files], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        subprocess.run(["chattr", "-i", *files], capture_output=True, check=False)
        pytest.skip(f"cannot make the files immutable here: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *files], check=True)


async def test_a_breach_on_a_read_only_database_rolls_back_and_is_journaled_once_writable(
    tmp_path: Path,
) -> None:
    """The database turns read-only as the canary breaches: rolled back in time, paged once;
    writable again: every decision journaled, every notification delivered once."""
    async with fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h:
        await h.ticks(1, held_at=10)
        journaled = len(list(h.db.journal()))
        with read_only(h.db.path):
            await breach_rolls_back_in_time(h)
            assert len(rollback_pages(h)) == 1
            await h.ticks(2)
            assert len(list(h.db.journal())) == journaled
        await h.ticks(2)
        assert len(rollback_pages(h)) == 1
        assert_journal_complete(h)
        assert_delivered_once(h)


# ---- a store lost under the daemon ------------------------------------------------------------


def store_pages(h: FaultHarness, action: str = "trigger") -> list[dict[str, Any]]:
    """The daemon's own state-store page events PagerDuty accepted."""
    return [
        p for p in h.sim.pages if p["dedup_key"] == STORE_PAGE_KEY and p["event_action"] == action
    ]


async def lost_then_breach(h: FaultHarness, client: httpx.AsyncClient) -> None:
    """The store was just lost: noticed at the next tick (paged once, unhealthy, not ready,
    nothing advances even with the hold over), and a breach still rolls back in time."""
    h.daemon.api.ready = True
    await h.ticks(4, held_at=10)  # the 1m hold is long over: nothing advances
    body = await health(client)
    assert body["status"] == "unhealthy", body
    assert body["checks"]["state_store"]["status"] == "failing"
    assert (await ready(client))[0] == 503
    await breach_rolls_back_in_time(h)
    await h.ticks(3)
    assert len(rollback_pages(h)) == 1
    assert len(store_pages(h)) == 1
    metrics = (await client.get("/metrics")).text
    assert "coalmine_store_lost 1.0" in metrics
    genesis = h.daemon.shared.guard.expected  # still shown: the store coalmine opened
    assert f'coalmine_store_info{{store_id="{genesis.id}"}} 1.0' in metrics
    (created,) = [
        float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith("coalmine_store_created_timestamp_seconds ")
    ]
    assert created == genesis.created_at.timestamp()


async def test_a_state_file_deleted_under_the_daemon_is_written_back_and_a_breach_rolls_back(
    tmp_path: Path,
) -> None:
    """The database file (and its -wal, -shm) deleted while coalmine runs: written back at its
    path from the open file at the next check, identity kept; a breach then rolls back in
    time, pages once, and the journal holds every decision, from before the deletion on."""
    async with (
        fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.ticks(1, held_at=10)
        genesis = h.daemon.shared.guard.expected
        for suffix in ("", "-wal", "-shm"):
            Path(h.db.path + suffix).unlink(missing_ok=True)
        await breach_rolls_back_in_time(h)
        assert h.db.identity() == genesis
        await h.ticks(2)
        assert_healthy(await health(client))
        assert len(rollback_pages(h)) == 1
        assert store_pages(h) == []
        assert_journal_complete(h)
        assert_delivered_once(h)


async def test_a_state_file_overwritten_with_garbage_is_noticed_and_a_breach_rolls_back(
    tmp_path: Path,
) -> None:
    """The database file is overwritten in place with garbage: noticed, paged once, no
    advance, a breach still rolls back and pages once."""
    async with (
        fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.ticks(1, held_at=10)
        with Path(h.db.path).open("r+b") as f:
            f.write(os.urandom(8192))
        await lost_then_breach(h, client)


async def test_a_state_folder_removed_is_lost_and_found_again_when_it_is_back(
    tmp_path: Path,
) -> None:
    """The whole state folder removed (nowhere to write the database back): lost, paged once,
    nothing advances, a breach rolls back; the folder back: the database is written back, the
    page resolved, and the journal holds every decision, in order."""
    folder = tmp_path / "state"
    folder.mkdir()
    async with (
        fault_harness(folder, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h,
        served(h) as client,
    ):
        await h.ticks(1, held_at=10)
        shutil.rmtree(folder)
        await lost_then_breach(h, client)
        folder.mkdir()
        await h.ticks(2)
        assert_healthy(await health(client))
        assert len(store_pages(h, "resolve")) == 1
        assert len(rollback_pages(h)) == 1
        assert_journal_complete(h)
        assert_delivered_once(h)


@pytest.mark.parametrize("store_back_first", [False, True])
async def test_a_page_the_store_cannot_queue_is_retried_from_memory_and_sent_once(
    tmp_path: Path, store_back_first: bool
) -> None:
    """Writes fail and PagerDuty is down as the canary breaches: rolled back in time anyway
    (the rollback waits for neither); the page is retried from memory, or handed to the outbox
    if the store is back first, and reaches PagerDuty exactly once."""
    async with fault_harness(tmp_path, policy=PROMETHEUS_POLICY, fake_prometheus=True) as h:
        await h.ticks(1, held_at=10)
        await h.sim.pagerduty.go_down()
        with failing_writes(h.db.path):
            await breach_rolls_back_in_time(h)
            await h.ticks(2)
            assert rollback_pages(h) == []
            if not store_back_first:
                await h.sim.pagerduty.go_up()
                await h.ticks(1)
                assert len(rollback_pages(h)) == 1
        await h.ticks(2)
        await h.sim.pagerduty.go_up()
        await h.run_until(lambda h: h.db.backlog() == 0, timedelta(minutes=10))
        assert len(rollback_pages(h)) == 1
        assert_journal_complete(h)
        assert_delivered_once(h)
