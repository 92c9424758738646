"""Leases on a real PostgreSQL: the server's clock, takeover epochs, fencing, commands."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import anyio
import pytest

from coalmine.store.leases import Fence, LeaseLost, ReplicaIdInUse
from coalmine.store.postgres import PostgresStore
from coalmine.store.records import NewIntent

pytestmark = pytest.mark.anyio
NOW = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)


@asynccontextmanager
async def two(url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two replicas' stores on one database."""
    a, b = PostgresStore(url), PostgresStore(url)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


async def eventually(condition: Callable[[], Awaitable[object]], limit: float = 10.0) -> object:
    """Poll ``condition`` until it is truthy; fail after ``limit`` seconds."""
    with anyio.fail_after(limit):
        while not (result := await condition()):
            await anyio.sleep(0.02)
    return result


async def test_takeover_after_expiry_bumps_the_epoch(postgres_url: str) -> None:
    """A held lease is refused to others; once expired by the server's clock, it moves on."""
    async with two(postgres_url) as (a, b):
        assert await a.acquire("A", ["api"], 60, 1) == {"api": 1}
        assert await b.acquire("B", ["api"], 60, 1) == {}
        assert await a.renew("A", {"api": 1}, 0.05) == {"api": 1}
        assert await eventually(lambda: b.acquire("B", ["api"], 60, 1)) == {"api": 2}
        assert await a.renew("A", {"api": 1}, 60) == {}
        assert not await a.holds("api", Fence("A", 1))
        assert await b.holds("api", Fence("B", 2))
        [row] = await a.leases()
        assert (row.holder, row.epoch) == ("B", 2) and row.expires_in > 50


async def test_a_stale_holders_tick_writes_nothing(postgres_url: str) -> None:
    """The commit's transaction checks the lease: a replaced holder's state and intent are
    refused; the live holder's intent carries its epoch."""
    async with two(postgres_url) as (a, b):
        await a.acquire("A", ["api"], 0.05, 1)
        a.fence = {"api": Fence("A", 1)}
        await a.commit("api", {"phase": "canary"}, now=NOW)
        await eventually(lambda: b.acquire("B", ["api"], 60, 1))
        intent = NewIntent("api", "promote", {"versions": [["v2", 100]]})
        with pytest.raises(LeaseLost, match="held by B at epoch 2"):
            await a.commit("api", {"phase": "promoted"}, now=NOW, intents=[intent])
        assert await b.states() == {"api": {"phase": "canary"}}
        b.fence = {"api": Fence("B", 2)}
        await b.commit("api", {"phase": "promoted"}, now=NOW, intents=[intent])
        [opened] = await b.open_intents()
        assert opened.kind == "promote"


async def test_racing_replicas_take_a_free_lease_once(postgres_url: str) -> None:
    """Ten concurrent acquisitions of one expired lease: exactly one wins."""
    stores = [PostgresStore(postgres_url) for _ in range(10)]
    won: list[dict[str, int]] = []
    try:

        async def grab(i: int) -> None:
            won.append(await stores[i].acquire(f"R{i}", ["api"], 60, 1))

        async with anyio.create_task_group() as tg:
            for i in range(10):
                tg.start_soon(grab, i)
        assert sorted(won, key=len) == [{}] * 9 + [{"api": 1}]
    finally:
        for store in stores:
            await store.aclose()


async def test_heartbeats_and_forwarded_commands(postgres_url: str) -> None:
    """Live replicas are counted, a live id is not shared (a starting process claims it); a
    forwarded command is taken once and answered back."""
    async with two(postgres_url) as (a, b):
        assert await a.heartbeat("A", 60, "a") == ["A"]
        assert await b.heartbeat("B", 60, "b") == ["A", "B"]
        with pytest.raises(ReplicaIdInUse, match="'A' is in use"):
            await b.heartbeat("A", 60, "b")  # a second live process under A's id
        assert await b.heartbeat("A", 60, "b", claim=True) == ["A", "B"]  # b started as A
        with pytest.raises(ReplicaIdInUse):
            await a.heartbeat("A", 60, "a")
        command_id = await b.post_command("api", {"kind": "pause", "version": None}, "B")
        assert await a.take_commands("api", "A") == [
            (command_id, {"kind": "pause", "version": None})
        ]
        assert await a.take_commands("api", "A") == []
        assert not await b.withdraw_command(command_id)
        await a.answer_command(command_id, {"decisions": []})
        assert await b.command_answer(command_id) == (True, {"decisions": []})
