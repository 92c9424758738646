"""The daemon against the simulator, over loopback HTTP, on a virtual clock.

The simulator's servers are real; the daemon is built by ``open_daemon`` exactly as
``coalmine run`` builds it, but its scripts' ticks are driven here, one at a time, while the
test moves the shared virtual clock. Waits (rate limits, retry-after) advance that clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx

from coalmine.app import Daemon, open_daemon, prepare
from coalmine.engine import Decision, RolloutPhase
from coalmine.server.http import serve
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, Simulator, VirtualClock
from coalmine.store import StateStore
from coalmine.store.sqlite import SqliteStore
from coalmine.store.threaded import ThreadedSqlite

START = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)  # Tuesday 10:00 in Los Angeles
ADMIN_TOKEN = "admin-token-for-tests-0123456789"
POLICY = """
version: 1
name: e2e
scripts: [api]
analysis: {interval: 30s, warmup: 1m, inconclusive_page_after: 10m}
steps:
  - {weight: 10, hold: 5m}
  - {weight: 50, hold: 5m}
  - {weight: 100}
post_promotion: {watch: 10m}
rules:
  - name: exceptions
    source: cloudflare
    signal: error_ratio
    window: 2m
    min_samples: 50
    above: 0.02
    for: 2m
    on_breach: rollback
  - name: cpu
    source: cloudflare
    signal: cpu_time_p99
    window: 2m
    min_samples: 50
    above: 50
    on_breach: hold
"""


@dataclass
class Harness:
    """A running simulator and a daemon pointed at it."""

    sim: Simulator
    clock: VirtualClock
    daemon: Daemon
    stable: str
    canary: str
    decisions: list[Decision]

    @property
    def store(self) -> StateStore:
        """The daemon's state store, whichever backend (``COALMINE_STATE_URL`` in ``env``)."""
        return self.daemon.store

    @property
    def db(self) -> SqliteStore:
        """The daemon's SQLite database, for synchronous checks between ticks."""
        store = self.daemon.store
        assert isinstance(store, ThreadedSqlite)
        return store.sync

    @property
    def loop(self) -> Any:
        """The one script's loop."""
        return self.daemon.loops["api"]

    @property
    def phase(self) -> RolloutPhase:
        """The rollout's phase."""
        return self.loop.state.phase  # type: ignore[no-any-return]

    async def tick(self, seconds: float = 30) -> list[Decision]:
        """Advance the clock, run one tick (as the loop's schedule would), deliver notifications."""
        self.clock.advance(seconds)
        before = len(self.loop.recent)
        await self.loop.tick_safely(self.clock())
        await self.daemon.outbox.deliver_due()
        new = list(self.loop.recent[before:]) if len(self.loop.recent) >= before else []
        self.decisions += new
        return new

    async def run_until(
        self, done: Callable[[Harness], bool], limit: timedelta, step: float = 30
    ) -> None:
        """Tick until ``done`` holds, failing after ``limit`` of virtual time."""
        deadline = self.clock() + limit
        while not done(self):
            if self.clock() >= deadline:
                raise AssertionError(
                    f"not done after {limit}; phase {self.phase}, decisions {[d.action for d in self.decisions]}"
                )
            await self.tick(step)

    def actions(self) -> list[str]:
        """Every decision's action so far."""
        return [d.action for d in self.decisions]


async def virtual_sleep(clock: VirtualClock, seconds: float) -> None:
    """Waiting in virtual time: the clock moves, the event loop gets a turn."""
    clock.advance(max(0.0, seconds))
    await anyio.sleep(0)


@asynccontextmanager
async def harness(
    tmp_path: Path,
    *,
    policy: str | Callable[[Simulator], str] = POLICY,
    env: dict[str, str] | None = None,
    canary: Behaviour | None = None,
    start_canary: bool = True,
    requests_per_minute: float = 600,
) -> AsyncIterator[Harness]:
    """A simulator with script ``api`` (a stable version and an uploaded canary) and a daemon.

    ``policy`` may be a function of the running simulator (for URLs of its servers)."""
    clock = VirtualClock(START)
    sim = Simulator(clock=clock, seed=11)
    stable = sim.add_script("api", requests_per_minute=requests_per_minute)
    canary_id = sim.upload_version("api", canary or Behaviour())
    path = tmp_path / "policy.yaml"
    async with sim.running():
        path.write_text(policy(sim) if callable(policy) else policy)
        settings = load_settings(
            {
                **sim.environment(),
                "COALMINE_POLICIES": str(path),
                "COALMINE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
                "COALMINE_LISTEN": "127.0.0.1:0",
                "COALMINE_ADMIN_TOKEN": ADMIN_TOKEN,
                # every 30 s tick reads the deployment, as these tests were written for; the
                # read cadence has its own tests (tests/e2e/test_discovery.py)
                "COALMINE_CANARY_DRIFT_INTERVAL": "30s",
                **(env or {}),
            }
        )
        policies = prepare(settings)
        async with open_daemon(  # ticks driven here, one daemon: no leases, even on PostgreSQL
            settings,
            policies,
            clock=clock,
            sleep=lambda s: virtual_sleep(clock, s),
            replicas=False,
        ) as daemon:
            if start_canary:
                sim.start_canary("api", canary_id, percent=10)
            yield Harness(sim, clock, daemon, stable, canary_id, [])


@asynccontextmanager
async def served(h: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """The daemon's HTTP endpoints on a free loopback port, and a client for them."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(h.daemon.api, "127.0.0.1", 0, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
        tg.cancel_scope.cancel()
