"""Leases, heartbeats, fencing and forwarded commands on the SQL the replicas share.

Several connections to one SQLite file stand in for replicas (the same statements and
semantics as on PostgreSQL); expiry is the database's clock, so a test waits for it with a
deadline instead of moving a virtual clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import httpx
import pytest
from prometheus_client import CollectorRegistry

from coalmine.errors import ConfigError, StoreError
from coalmine.replicas import Holdings, LeaseKeeper
from coalmine.server.metrics import LeaseMetrics
from coalmine.store.leases import (
    ACTING_FOR,
    OUTBOX,
    Fence,
    LeaseLost,
    ReplicaIdInUse,
    exclusive_file,
)
from coalmine.store.records import NewEntry, NewIntent
from coalmine.store.sqlite import SqliteStore
from coalmine.store.threaded import ThreadedSqlite

pytestmark = pytest.mark.anyio
NOW = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Callable[[], SqliteStore]]:
    """Open connections to one database file, closed after the test."""
    opened: list[SqliteStore] = []

    def connect() -> SqliteStore:
        opened.append(SqliteStore(tmp_path / "state.db"))
        return opened[-1]

    yield connect
    for store in opened:
        store.close()


def eventually(condition: Callable[[], object], limit: float = 10.0) -> object:
    """Poll ``condition`` until it is truthy; fail after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while not (result := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)
    return result


def test_a_lease_has_one_holder_until_it_expires(replicas: Callable[[], SqliteStore]) -> None:
    """A held lease cannot be taken; once expired it is, under the next epoch."""
    a, b = replicas(), replicas()
    assert a.acquire("A", ["api"], 60, 1) == {"api": 1}
    assert b.acquire("B", ["api"], 60, 1) == {}
    assert a.renew("A", {"api": 1}, 0.05) == {"api": 1}
    taken = eventually(lambda: b.acquire("B", ["api"], 60, 1))
    assert taken == {"api": 2}
    assert a.renew("A", {"api": 1}, 60) == {}, "the old holder cannot renew after a takeover"
    assert [(r.holder, r.epoch) for r in a.leases()] == [("B", 2)]


def test_an_expired_lease_is_not_renewed_even_by_its_holder(
    replicas: Callable[[], SqliteStore],
) -> None:
    """Renewal fails once the lease expired: the holder re-acquires it under a new epoch."""
    a = replicas()
    a.acquire("A", ["api"], 0.05, 1)
    eventually(lambda: a.leases()[0].expires_in < 0)
    assert a.renew("A", {"api": 1}, 60) == {}
    assert a.acquire("A", ["api"], 60, 1) == {"api": 2}


def test_a_released_lease_is_taken_at_once_and_the_epoch_moves(
    replicas: Callable[[], SqliteStore],
) -> None:
    """Giving a lease back lets another replica take it immediately, fenced by a new epoch."""
    a, b = replicas(), replicas()
    a.acquire("A", ["api", "web"], 60, 2)
    a.release("A", {"api": 1})
    assert b.acquire("B", ["api", "web"], 60, 2) == {"api": 2}
    assert not a.holds("api", Fence("A", 1))
    assert b.holds("api", Fence("B", 2))
    assert a.holds("web", Fence("A", 1))


def test_acquire_takes_no_more_than_asked(replicas: Callable[[], SqliteStore]) -> None:
    """A replica takes at most its share, leaving the rest for others."""
    a = replicas()
    assert a.acquire("A", ["a", "b", "c"], 60, 2) == {"a": 1, "b": 1}


def test_a_write_under_a_lost_lease_is_refused_and_nothing_is_written(
    replicas: Callable[[], SqliteStore],
) -> None:
    """The tick's transaction checks the lease: a stale holder's state and intent never land."""
    a, b = replicas(), replicas()
    a.acquire("A", ["api"], 0.05, 1)
    a.fence = {"api": Fence("A", 1)}
    a.commit("api", {"phase": "canary"}, now=NOW)
    eventually(lambda: b.acquire("B", ["api"], 60, 1))
    intent = NewIntent("api", "promote", {"versions": [["v2", 100]]})
    with pytest.raises(LeaseLost, match="epoch 1"):
        a.commit("api", {"phase": "promoted"}, now=NOW, intents=[intent])
    assert b.states() == {"api": {"phase": "canary"}}
    assert b.open_intents() == []


def test_intents_carry_the_epoch_that_decided_them(replicas: Callable[[], SqliteStore]) -> None:
    """Every intent records the fencing epoch of the replica that wrote it."""
    a = replicas()
    a.acquire("A", ["api"], 60, 1)
    a.fence = {"api": Fence("A", 1)}
    (intent_id,) = a.commit(
        "api", {}, now=NOW, intents=[NewIntent("api", "rollback", {"versions": []})]
    )
    row = a._db.execute("SELECT epoch FROM intents WHERE id = ?", (intent_id,)).fetchone()
    assert row == (1,)


def test_a_replica_without_the_lease_writes_nothing(replicas: Callable[[], SqliteStore]) -> None:
    """A store fenced for other scripts refuses a write for a script it does not hold."""
    a = replicas()
    a.fence = {}
    with pytest.raises(LeaseLost, match="does not hold api"):
        a.commit("api", {}, now=NOW)


def test_heartbeats_count_live_replicas_only(replicas: Callable[[], SqliteStore]) -> None:
    """A replica whose heartbeat lapsed is no longer counted alive."""
    a, b = replicas(), replicas()
    assert a.heartbeat("A", 60, "a") == ["A"]
    assert b.heartbeat("B", 0.05, "b") == ["A", "B"]
    eventually(lambda: a.heartbeat("A", 60, "a") == ["A"])


def test_a_second_live_process_under_one_id_is_refused_its_heartbeat(
    replicas: Callable[[], SqliteStore],
) -> None:
    """A heartbeat under an id whose live heartbeat is another process's writes nothing and
    names the id; once that heartbeat lapses, the id is free again."""
    first, second = replicas(), replicas()
    assert first.heartbeat("pod-0", 0.2, "first") == ["pod-0"]
    with pytest.raises(ReplicaIdInUse, match="'pod-0' is in use by another live process"):
        second.heartbeat("pod-0", 60, "second")
    assert first.heartbeat("pod-0", 0.2, "first") == ["pod-0"]  # still the first's

    def taken() -> bool:
        try:
            return second.heartbeat("pod-0", 60, "second") == ["pod-0"]
        except ReplicaIdInUse:
            return False

    eventually(taken)  # the first's heartbeat lapsed
    with pytest.raises(ReplicaIdInUse):
        first.heartbeat("pod-0", 60, "first")


def test_a_starting_process_claims_its_id_at_once(replicas: Callable[[], SqliteStore]) -> None:
    """A process starting under an id claims it at once (a restarted container need not wait
    a TTL); the older process, if alive, is refused at its next heartbeat."""
    old, new = replicas(), replicas()
    old.heartbeat("pod-0", 60, "old")
    assert new.heartbeat("pod-0", 60, "new", claim=True) == ["pod-0"]
    with pytest.raises(ReplicaIdInUse):
        old.heartbeat("pod-0", 60, "old")
    assert new.heartbeat("pod-0", 60, "new") == ["pod-0"]


def test_a_forwarded_command_is_taken_once_and_answered(
    replicas: Callable[[], SqliteStore],
) -> None:
    """The holder takes a forwarded command once; the sender reads the answer back."""
    a, b = replicas(), replicas()
    command_id = b.post_command("api", {"kind": "pause", "version": None}, "B")
    assert b.command_answer(command_id) == (False, None)
    assert a.queued() == {"api"}
    assert a.take_commands("api", "A") == [(command_id, {"kind": "pause", "version": None})]
    assert a.queued() == set()
    assert a.take_commands("api", "A") == []
    assert not b.withdraw_command(command_id), "a taken command cannot be withdrawn"
    a.answer_command(command_id, {"decisions": []})
    assert b.command_answer(command_id) == (True, {"decisions": []})


def test_an_untaken_command_is_withdrawn(replicas: Callable[[], SqliteStore]) -> None:
    """A command no holder took can be withdrawn, and then no holder ever applies it."""
    b = replicas()
    command_id = b.post_command("api", {"kind": "resume"}, "B")
    assert b.withdraw_command(command_id)
    assert b.take_commands("api", "A") == []


def test_holdings_lapse_at_their_local_deadline() -> None:
    """A lease is not trusted past its renewal time plus TTL on the replica's own clock."""
    now = [100.0]
    held = Holdings(lambda: now[0])
    held.set("api", Fence("A", 3), until=110.0)
    assert held.get("api") == Fence("A", 3)
    assert list(held) == ["api"]
    now[0] = 110.0
    assert held.get("api") is None
    assert list(held) == []
    assert held.epochs() == {"api": 3}, "still renewable: the database decides"


async def test_keepers_share_the_scripts_fairly_and_one_takes_the_outbox(
    tmp_path: Path,
) -> None:
    """Two replicas split four scripts two and two; exactly one delivers the outbox."""
    path = tmp_path / "state.db"
    stores = [ThreadedSqlite(SqliteStore(path)) for _ in range(2)]
    scripts = ["a", "b", "c", "d"]
    keepers = [
        LeaseKeeper(s, name, 60, scripts, LeaseMetrics(CollectorRegistry()))
        for s, name in zip(stores, "AB", strict=True)
    ]
    try:
        await keepers[0].round()
        assert sorted(keepers[0].holdings) == [OUTBOX, *scripts], "alone, it takes all"
        await keepers[1].round()  # B is seen alive: A gives two back at its next round
        await keepers[0].round()
        await keepers[1].round()
        mine = [sorted(set(k.holdings) - {OUTBOX}) for k in keepers]
        assert sorted(map(len, mine)) == [2, 2]
        assert set(mine[0]).isdisjoint(mine[1])
        assert [OUTBOX in k.holdings for k in keepers] == [True, False]
        assert keepers[1].table["a"].epoch in (1, 2)
    finally:
        for s in stores:
            await s.aclose()


async def test_a_dead_replicas_scripts_are_taken_over_with_new_epochs(tmp_path: Path) -> None:
    """When a replica stops renewing, another takes all its leases once they expire."""
    path = tmp_path / "state.db"
    stores = [ThreadedSqlite(SqliteStore(path)) for _ in range(2)]
    a = LeaseKeeper(stores[0], "A", 1.0, ["x", "y"], LeaseMetrics(CollectorRegistry()))
    b = LeaseKeeper(stores[1], "B", 1.0, ["x", "y"], LeaseMetrics(CollectorRegistry()))
    try:
        await a.round()
        assert sorted(a.holdings) == [OUTBOX, "x", "y"]
        deadline = time.monotonic() + 10
        while len(b.holdings) < 3:  # A is dead: it never renews again
            assert time.monotonic() < deadline, "no takeover"
            await b.round()
            await anyio.sleep(0.05)  # a poll period while the database's clock runs
        assert {n: f.epoch for n, f in b.holdings.items()} == {OUTBOX: 2, "x": 2, "y": 2}
        with pytest.raises(LeaseLost):
            await a.check("x")
    finally:
        for s in stores:
            await s.aclose()


async def test_an_older_process_under_a_claimed_id_acts_on_nothing(tmp_path: Path) -> None:
    """Two live processes with one replica id: the one started last claims the id, the other
    drops every lease it held without giving them back, says why, and shows it in /metrics;
    once the newer one is gone, it acts again."""
    path = tmp_path / "state.db"
    stores = [ThreadedSqlite(SqliteStore(path)) for _ in range(2)]
    registry = CollectorRegistry()
    old = LeaseKeeper(stores[0], "pod-0", 1.0, ["api"], LeaseMetrics(registry))
    problems: list[str | None] = []
    old.on_conflict = problems.append
    try:
        await old.announce()
        await old.round()
        assert sorted(old.holdings) == [OUTBOX, "api"]
        new = LeaseKeeper(stores[1], "pod-0", 1.0, ["api"], LeaseMetrics(CollectorRegistry()))
        await new.announce()
        with pytest.raises(ReplicaIdInUse):
            await old.round()
        assert not old.holdings
        assert registry.get_sample_value("coalmine_replica_id_conflict") == 1
        assert registry.get_sample_value("coalmine_lease_held", {"script": "api"}) == 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(old.run)
            deadline = time.monotonic() + 10
            while not problems or problems[-1] is not None:  # the newer one never renews
                assert time.monotonic() < deadline, f"still standing aside: {problems}"
                await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        assert problems[0] is not None and "COALMINE_REPLICA_ID" in problems[0]
        assert registry.get_sample_value("coalmine_replica_id_conflict") == 0
    finally:
        for s in stores:
            await s.aclose()


async def test_a_rollback_goes_out_under_a_fresh_lease_while_the_database_is_down(
    tmp_path: Path,
) -> None:
    """With the database unreachable, a lease still good by the holder's own renewal lets a
    rollback through (it never waits for the store); every other write waits."""
    store = ThreadedSqlite(SqliteStore(tmp_path / "state.db"))
    keeper = LeaseKeeper(store, "A", 60, ["api"], LeaseMetrics(CollectorRegistry()))
    await keeper.round()
    await keeper.check("api")  # the database says the lease is ours
    store.sync.close()  # from now on every statement fails: the store is down
    await keeper.check("api", rollback=True)
    with pytest.raises(StoreError):
        await keeper.check("api")


def test_a_second_process_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    """SQLite allows one `coalmine run`: a second one is a clear error naming the holder."""
    path = tmp_path / "state.db"
    pattern = r"in use by another coalmine \(pid \d+\)"
    with exclusive_file(path), pytest.raises(ConfigError, match=pattern), exclusive_file(path):
        pass
    with exclusive_file(path):  # released with the first
        pass


def test_a_replica_finishes_an_intent_once(replicas: Callable[[], SqliteStore]) -> None:
    """A stale holder finishing an intent its successor already finished journals nothing."""
    a, b = replicas(), replicas()
    a.acquire("A", ["api"], 60, 1)
    a.fence = {"api": Fence("A", 1)}
    b.fence = {}
    (intent_id,) = a.commit(
        "api", {}, now=NOW, intents=[NewIntent("api", "set_traffic", {"versions": []})]
    )
    entry = NewEntry(NOW, "api", "coalmine", "applied", {"intent": intent_id})
    b.finish_intent(intent_id, {"outcome": "already live"}, NOW, entry)
    a.finish_intent(intent_id, {"outcome": "applied"}, NOW, entry)
    assert [e.action for e in b.journal()] == ["applied"]
    assert b.verify_journal().ok


def test_a_replica_restarted_under_its_id_takes_its_leases_back_at_once(
    replicas: Callable[[], SqliteStore],
) -> None:
    """A pod's restarted container (same id) need not wait a TTL; it fences its old self."""
    first, restarted, other = replicas(), replicas(), replicas()
    first.acquire("pod-0", ["api"], 60, 1)
    assert other.acquire("pod-1", ["api"], 60, 1) == {}
    assert restarted.acquire("pod-0", ["api"], 60, 1) == {"api": 2}
    assert not first.holds("api", Fence("pod-0", 1))


async def test_no_call_goes_out_for_a_script_whose_lease_lapsed(tmp_path: Path) -> None:
    """The HTTP hook refuses a request made for a script once its lease lapsed locally (a
    process paused while it waited for a rate-limit token); other requests pass."""
    now = [0.0]
    store = ThreadedSqlite(SqliteStore(tmp_path / "state.db"))
    keeper = LeaseKeeper(
        store, "A", 3.0, ["api"], LeaseMetrics(CollectorRegistry()), clock=lambda: now[0]
    )
    keeper.holdings.set("api", Fence("A", 1), until=2.0)
    request = httpx.Request("POST", "https://api.cloudflare.com/client/v4/x")
    try:
        acting = ACTING_FOR.set("api")
        await keeper.request_hook(request)  # held: it goes out
        now[0] = 2.0
        with pytest.raises(LeaseLost, match="POST not sent"):
            await keeper.request_hook(request)
        ACTING_FOR.reset(acting)
        await keeper.request_hook(request)  # not made for a script: not this hook's business
    finally:
        await store.aclose()
