"""A restart applies the traffic change a crash left open, and the step counts from then.

DESIGN: a step's hold counts from the moment its split took effect. A change decided before a
crash and applied only by the restart's reconciliation took effect at the restart, so its hold
(and warm-up) count from there, as they do when a tick applies a change late.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from coalmine.app import open_daemon, prepare
from coalmine.engine import RolloutPhase
from coalmine.settings import load_settings
from tests.e2e.harness import ADMIN_TOKEN, harness, virtual_sleep

pytestmark = pytest.mark.anyio
DEPLOYMENTS = "/client/v4/accounts/*/workers/scripts/api/deployments"
DOWN = timedelta(minutes=10)  # longer than the 50% step's 5 m hold


async def test_a_change_applied_at_restart_holds_its_step_from_the_restart(tmp_path: Path) -> None:
    """The 50% step decided, its call failing, the daemon down for 10 minutes: the restart
    applies it once, and the 5 m hold counts from the restart (no promotion at once)."""
    async with harness(tmp_path) as h:
        h.sim.cloudflare.inject(method="POST", path=DEPLOYMENTS, status=503, times=None)
        await h.run_until(
            lambda h: "set_traffic" in h.actions(), limit=timedelta(minutes=15), step=30
        )
        decided = h.loop.state.step_started_at
        assert h.db.open_intents(), "the 50% call should still be pending"
        assert h.sim.cloudflare.current("api").split == {h.canary: 10, h.stable: 90}
        h.sim.cloudflare.faults.clear()
        h.clock.advance(DOWN.total_seconds())  # the daemon is down (never ticked again)
        restart = h.clock()
        settings = load_settings(
            {
                **h.sim.environment(),
                "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
                "COALMINE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
                "COALMINE_LISTEN": "127.0.0.1:0",
                "COALMINE_ADMIN_TOKEN": ADMIN_TOKEN,
                "COALMINE_CANARY_DRIFT_INTERVAL": "30s",
            }
        )
        async with open_daemon(
            settings,
            prepare(settings),
            clock=h.clock,
            sleep=lambda s: virtual_sleep(h.clock, s),
            replicas=False,
        ) as daemon:
            loop = daemon.loops["api"]
            async with anyio.create_task_group() as tg:
                await tg.start(daemon.serve)  # reconciles before it reports ready
                with anyio.fail_after(10):
                    while loop.state.last_tick == decided:  # its first tick, at the restart
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            assert (loop.state.phase, loop.state.canary_percent) == (RolloutPhase.CANARY, 50)
            assert decided is not None and decided < restart
            started = loop.state.step_started_at
            assert started is not None and started >= restart, (decided, started, restart)
            h.clock.advance(60)
            await loop.tick_safely(h.clock())
            assert (loop.state.phase, loop.state.canary_percent) == (RolloutPhase.CANARY, 50)
    assert h.sim.cloudflare.current("api").split == {h.canary: 50, h.stable: 50}
    made = [d for d in h.sim.cloudflare.deployments("api") if d.source == "api"]
    assert len(made) == 1  # the 50% split, made once (the attempts before were 503s)
