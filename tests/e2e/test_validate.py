"""`coalmine validate`: the CI gate's three verdicts, against the simulator and a real Prometheus."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from coalmine.app import prepare
from coalmine.cli import localprom
from coalmine.cli.validate import NO_VERDICT, PROMOTED, ROLLED_BACK, validate
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, Simulator
from tests.integration.prometheus import binaries

pytestmark = pytest.mark.anyio
POLICY = """
version: 1
name: gate
scripts: [api]
analysis: {interval: 1s, warmup: 2s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 3s}, {weight: 50, hold: 3s}, {weight: 100}]
rules:
  - name: error_rate
    source: prometheus
    query: >-
      (sum(rate(http_requests_total{script="$script",version="$version",code=~"5.."}[$window])) or vector(0))
      / sum(rate(http_requests_total{script="$script",version="$version"}[$window]))
    samples: sum(increase(http_requests_total{script="$script",version="$version"}[$window]))
    window: 5s
    min_samples: 20
    above: 0.05
    for: 3s
    on_breach: rollback
"""


@asynccontextmanager
async def gate(
    tmp_path: Path, canary: Behaviour | None, split: bool = True
) -> AsyncIterator[tuple[Simulator, dict[str, str]]]:
    """A wall-clock simulator scraped by a real Prometheus, and coalmine's settings for it."""
    binaries()  # skip (or fail in CI) without Debian's prometheus
    sim = Simulator(seed=3)
    sim.slack.limiter.limit = None
    sim.add_script("api", requests_per_minute=6000)
    version = sim.upload_version("api", canary or Behaviour())
    (tmp_path / "policy.yaml").write_text(POLICY)
    async with sim.running():
        with localprom.running_prometheus([sim.prometheus_metrics_url]) as prometheus:
            if split:
                sim.start_canary("api", version, percent=10)
            env = {
                **sim.environment(),
                "COALMINE_PROMETHEUS_URL": prometheus,
                "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
                "COALMINE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
                "COALMINE_LISTEN": "127.0.0.1:0",
                "COALMINE_DISCOVERY_INTERVAL": "1s",
                "COALMINE_DRIFT_INTERVAL": "1s",  # idle scripts read every second
                "COALMINE_CANARY_DRIFT_INTERVAL": "1s",  # and canaries at every tick
            }
            yield sim, env


async def run_gate(env: dict[str, str], seconds: float) -> tuple[int, str]:
    """Run validate in-process; return its exit code and what it printed."""
    settings = load_settings(env)
    out = io.StringIO()
    with anyio.fail_after(seconds + 30):
        code = await validate(settings, prepare(settings), "api", timedelta(seconds=seconds), out)
    return code, out.getvalue()


async def test_healthy_canary_passes_the_gate(tmp_path: Path) -> None:
    """A healthy canary is promoted: exit 0, each step printed."""
    async with gate(tmp_path, Behaviour()) as (_, env):
        code, printed = await run_gate(env, 60)
    assert code == PROMOTED, printed
    assert printed.splitlines()[-1] == "verdict: promoted"
    actions = [line.split()[2] for line in printed.splitlines()[2:-1]]
    assert [a for a in actions if a != "hold"] == ["start", "set_traffic", "promote", "complete"]


async def test_faulty_canary_fails_the_gate(tmp_path: Path) -> None:
    """A canary answering 30% 5xx is rolled back: exit 1."""
    async with gate(tmp_path, Behaviour(http_5xx_rate=0.3)) as (sim, env):
        code, printed = await run_gate(env, 60)
        assert sim.deployment_posts("api")[-1]["versions"][0]["percentage"] == 100  # type: ignore[index]
    assert code == ROLLED_BACK, printed
    assert printed.splitlines()[-1] == "verdict: rolled back"


async def test_no_canary_is_no_verdict(tmp_path: Path) -> None:
    """Nothing to judge within the duration: exit 3, never a pass."""
    async with gate(tmp_path, Behaviour(), split=False) as (_, env):
        code, printed = await run_gate(env, 3)
    assert code == NO_VERDICT
    assert printed.splitlines()[-1] == "verdict: no verdict within 0:00:03"
