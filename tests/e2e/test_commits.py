"""Ticks that decide nothing are not committed, and the store still holds what a restart needs."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.engine import RolloutPhase, RolloutState
from coalmine.simulator import Behaviour
from tests.e2e.harness import Harness, harness
from tests.stores import Backend

pytestmark = pytest.mark.anyio
P = RolloutPhase


async def ticks_checking_the_store(h: Harness, limit: timedelta) -> tuple[int, int]:
    """Tick until the rollout is over (or ``limit``); after every tick the stored state resumes
    the same rollout as the one in memory. Returns (ticks, ticks that wrote no state)."""
    ticks = unwritten = 0
    deadline = h.clock() + limit
    while h.clock() < deadline and not (ticks and h.phase in (P.IDLE, P.ROLLED_BACK)):
        await h.tick()
        ticks += 1
        stored = (await h.store.states())["api"]
        memory = h.loop.state
        assert RolloutState.from_json(stored).durable() == memory.durable(), f"tick {ticks}"
        if stored["last_tick"] != memory.to_json()["last_tick"]:
            unwritten += 1
    return ticks, unwritten


async def test_a_promotion_commits_only_what_a_restart_needs(
    tmp_path: Path, backend: Backend
) -> None:
    """Through a whole promotion, every tick leaves the store resuming exactly the rollout in
    memory, and the ticks that changed nothing durable wrote nothing (SQLite, PostgreSQL)."""
    async with harness(tmp_path, env={"COALMINE_STATE_URL": backend.url}) as h:
        ticks, unwritten = await ticks_checking_the_store(h, timedelta(hours=1))
        assert h.phase is P.IDLE and h.loop.state.stable == h.canary
        assert h.actions() == ["start", "set_traffic", "promote", "complete"]
        assert unwritten > ticks // 2, (ticks, unwritten)


async def test_a_breach_is_committed_when_it_starts(tmp_path: Path) -> None:
    """A canary that starts breaching: the tick that first sees the breach commits it (the
    rollback's `for` counts from there after a restart), and the rollback follows."""
    async with harness(tmp_path, canary=Behaviour(exception_rate=0.3)) as h:
        breach_seen = False
        for _ in range(40):
            await h.tick()
            track = h.loop.state.rules.get("exceptions")
            stored = RolloutState.from_json((await h.store.states())["api"])
            if track is not None and track.breached_since is not None:
                breach_seen = True
                assert stored.rules["exceptions"].breached_since == track.breached_since
            if h.phase is P.ROLLED_BACK:
                break
        assert breach_seen
        assert "rollback" in h.actions()
