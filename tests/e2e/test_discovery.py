"""Account-wide discovery and batched analytics against the simulator, on a virtual clock."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from coalmine.cloudflare.discovery import CHECK, Mode
from coalmine.engine import RolloutPhase
from coalmine.simulator import Behaviour, Simulator
from coalmine.simulator.graphql import SCHEMA_FILE, load_schema
from tests.e2e.harness import POLICY, Harness, harness

pytestmark = pytest.mark.anyio
IDLE = ("b", "c", "d")


def with_scripts(*names: str) -> object:
    """The harness's policy over ``api`` and these scripts (added to the simulator)."""

    def policy(sim: Simulator) -> str:
        for name in names:
            sim.add_script(name, requests_per_minute=600)
        return POLICY.replace("scripts: [api]", f"scripts: [api, {', '.join(names)}]")

    return policy


def reads(h: Harness) -> Counter[str]:
    """Deployment GETs the simulator answered, by script."""
    out: Counter[str] = Counter()
    for r in h.sim.cloudflare.requests:
        if r.method == "GET" and r.path.endswith("/deployments"):
            out[r.path.split("/")[-2]] += 1
    return out


def queries(h: Harness, name: str) -> int:
    """GraphQL queries of this operation name the simulator answered."""
    return sum(
        1
        for r in h.sim.cloudflare.requests
        if r.path.endswith("/graphql") and f"query {name}(" in str((r.body or {}).get("query"))
    )


async def test_a_split_on_an_idle_script_is_adopted_on_the_signal_without_polling(
    tmp_path: Path,
) -> None:
    """Four idle scripts: their start-up ticks read nothing; a split started by hand on one
    of them shows in the next account-wide query, which wakes that script alone; its next tick
    reads its deployment (once) and adopts the canary. No other script's deployment is read."""
    policy = with_scripts(*IDLE)
    async with harness(tmp_path, policy=policy, start_canary=False) as h:  # type: ignore[arg-type]
        discovery = h.daemon.discovery
        assert discovery is not None
        watch = h.daemon.shared.watch
        watch.mode = Mode.STARTING  # as Daemon.serve starts it
        assert await discovery.check_schema() is None
        for loop in h.daemon.loops.values():  # the start-up ticks
            await loop.tick_safely(h.clock())
        assert all(loop.interval == watch.drift_interval for loop in h.daemon.loops.values())
        h.clock.advance(120)
        assert await discovery.once() is False
        assert not any(s.forced for s in watch.scripts.values())

        h.sim.start_canary("api", h.canary, percent=10)
        h.clock.advance(65)  # the split's first minute of analytics is complete
        assert await discovery.once() is False
        assert [s for s, seen in watch.scripts.items() if seen.forced] == ["api"]
        await h.loop.tick_safely(h.clock())  # woken: the loop ticks now
        assert h.phase is RolloutPhase.CANARY and h.loop.state.canary == h.canary
        assert reads(h) == Counter({"api": 1})
        assert queries(h, "CoalmineDiscovery") == 2

        assert await discovery.once() is False  # the same signal again wakes nothing
        assert not watch.scripts["api"].forced


async def test_without_the_field_discovery_falls_back_and_says_so(tmp_path: Path) -> None:
    """A schema without the scriptName dimension: the check names it, /health says so, and idle
    scripts are read at every tick, every discovery interval, as before."""
    async with harness(tmp_path, start_canary=False) as h:
        sdl = SCHEMA_FILE.read_text().replace("  scriptName: string!\n", "")
        h.sim.cloudflare.analytics_schema = load_schema(sdl)
        discovery = h.daemon.discovery
        assert discovery is not None
        problem = await discovery.check_schema()
        assert problem is not None and "Dimensions.scriptName" in problem
        discovery.fall_back(problem)
        watch = h.daemon.shared.watch
        assert watch.mode is Mode.FALLBACK
        assert h.daemon.health.snapshot()[CHECK]["status"] == "failing"
        assert h.loop.interval == watch.discovery_interval
        for _ in range(3):
            await h.tick(60)
        assert reads(h) == Counter({"api": 3})
        h.sim.start_canary("api", h.canary, percent=10)
        await h.tick(60)
        assert h.phase is RolloutPhase.CANARY


async def test_canaries_share_one_analytics_query_per_window(tmp_path: Path) -> None:
    """Two canaries ticking in the same minutes: once both have asked, one analytics query per
    window serves both, and each script's rules get its own rows (one canary throws at 1.2%,
    the other not at all)."""

    def policy(sim: Simulator) -> str:
        sim.add_script("b", requests_per_minute=600)
        faulty = sim.upload_version("b", Behaviour(exception_rate=0.012))
        sim.start_canary("b", faulty, percent=50)
        return POLICY.replace("scripts: [api]", "scripts: [api, b]")

    async with harness(tmp_path, policy=policy) as h:
        b = h.daemon.loops["b"]
        h.clock.advance(300)  # minutes of analytics for both canaries
        await h.loop.tick_safely(h.clock())
        await b.tick_safely(h.clock())
        before = queries(h, "CoalmineCanary")
        for _ in range(4):  # four windows, each loop once a minute
            h.clock.advance(60)
            await h.loop.tick_safely(h.clock())
            h.clock.advance(10)
            await b.tick_safely(h.clock())
        assert queries(h, "CoalmineCanary") - before == 4
        assert h.loop.state.rules["exceptions"].value == pytest.approx(0.0, abs=0.002)
        assert b.state.rules["exceptions"].value == pytest.approx(0.012, abs=0.006)
        assert b.state.phase is RolloutPhase.CANARY
