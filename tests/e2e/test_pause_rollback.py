"""An operator's pause racing an automatic rollback: the rollback is neither lost nor delayed.

The daemon applies a tick's queued commands before it judges the rules, so a pause that lands
in the tick where a rollback rule trips is applied first and the rollback still comes, at that
same tick. Run here with a pause sent over the API before every tick, against the same faulty
canary left alone: the rollback is decided at the same moment and made by one call.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import anyio
import httpx
import pytest

from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour
from tests.e2e.harness import ADMIN_TOKEN, Harness, harness, served

pytestmark = pytest.mark.anyio
FAULTY = Behaviour(exception_rate=0.2)
LIMIT = timedelta(minutes=15)  # virtual: the rollback comes after about 4


async def paused_tick(h: Harness, client: httpx.AsyncClient) -> int:
    """POST a pause, run the tick that applies it, and return the API's answer's status."""
    answers: list[int] = []

    async def pause() -> None:
        response = await client.post(
            "/api/v1/rollouts/api/pause", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        answers.append(response.status_code)

    async with anyio.create_task_group() as tg:
        tg.start_soon(pause)
        with anyio.fail_after(20):
            while not h.loop._pending:  # queued: this tick takes it
                await anyio.sleep(0.01)
        await h.tick()
    return answers[0]


async def rollback_at(tmp_path: Path, *, pausing: bool) -> tuple[datetime, list[str], Harness]:
    """Tick a faulty canary until it is rolled back, pausing it before every tick if asked;
    returns when the rollback was decided, every action, and the harness (closed)."""
    tmp_path.mkdir()
    async with harness(tmp_path, canary=FAULTY) as h, served(h) as client:
        await h.tick()  # the daemon adopts the 10% split
        deadline = h.clock() + LIMIT
        while h.phase is not RolloutPhase.ROLLED_BACK:
            assert h.clock() < deadline, h.actions()
            if pausing:
                # refused (409) only once the rollout has ended: a pause never outlives it
                status = await paused_tick(h, client)
                assert status == 200 or h.phase is RolloutPhase.ROLLED_BACK, (status, h.phase)
            else:
                await h.tick()
        rollback = next(d for d in h.decisions if d.action == "rollback")
        return rollback.t, h.actions(), h


async def test_a_pause_at_every_tick_neither_loses_nor_delays_the_rollback(
    tmp_path: Path,
) -> None:
    """Paused before every tick, a faulty canary is rolled back at the same tick as when left
    alone, by one deployment call, with its critical page."""
    alone, alone_actions, _ = await rollback_at(tmp_path / "alone", pausing=False)
    paused, actions, h = await rollback_at(tmp_path / "paused", pausing=True)
    assert paused == alone, (alone_actions, actions)
    assert actions.count("pause") == 1  # the later pauses: "already paused", no decision
    assert actions.index("pause") < actions.index("rollback")
    assert actions.count("rollback") == 1 and "page" in actions
    posts = [r for r in h.sim.cloudflare.requests if r.method == "POST"]
    assert len([r for r in posts if r.path.endswith("/deployments")]) == 1
    assert h.sim.cloudflare.current("api").split == {h.stable: 100}
