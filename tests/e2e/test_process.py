"""`coalmine run` as a process: endpoints, the CLI against it, SIGTERM, and SIGKILL + restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from coalmine.cli.localprom import free_port
from coalmine.simulator import Simulator
from coalmine.store.sqlite import SqliteStore as Store

pytestmark = pytest.mark.anyio
TOKEN = "process-test-admin-token"
POLICY = """
version: 1
name: process
scripts: [api]
analysis: {interval: 1s, warmup: 0s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 2s}, {weight: 50, hold: 1h}, {weight: 100}]
rules:
  - {name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m, above: 1000, on_breach: page}
"""


@asynccontextmanager
async def simulated(tmp_path: Path) -> AsyncIterator[tuple[Simulator, dict[str, str]]]:
    """A wall-clock simulator with script `api` split 10% to a canary, and coalmine's env."""
    sim = Simulator(seed=5)
    sim.slack.limiter.limit = None
    sim.add_script("api", requests_per_minute=600)
    canary = sim.upload_version("api")
    (tmp_path / "policy.yaml").write_text(POLICY)
    async with sim.running():
        sim.start_canary("api", canary, percent=10)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
            **sim.environment(),
            "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
            "COALMINE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
            "COALMINE_LISTEN": f"127.0.0.1:{free_port()}",
            "COALMINE_ADMIN_TOKEN": TOKEN,
            "COALMINE_DISCOVERY_INTERVAL": "1s",
            # idle scripts read every second too (the split above is not in the account-wide
            # signal until its first minute of analytics is complete)
            "COALMINE_DRIFT_INTERVAL": "1s",
        }
        yield sim, env


def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`coalmine run` in the background, logging to a file."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "coalmine", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


async def wait_for(
    predicate: object, seconds: float = 90.0, *, log: Path | None = None, seen: object = None
) -> None:
    """Poll an async predicate until true, with a deadline; failing, show what it last saw
    and the daemon's log (the failure message is what a CI machine keeps)."""
    with anyio.move_on_after(seconds):
        while not await predicate():  # type: ignore[operator]
            await anyio.sleep(0.1)
        return
    lines = log.read_text(errors="replace").splitlines() if log and log.exists() else []
    raise AssertionError(
        f"not true within {seconds:g}s; last seen {seen}; the daemon's log:\n" + "\n".join(lines)
    )


def url(env: dict[str, str]) -> str:
    """The daemon's base URL."""
    return "http://" + env["COALMINE_LISTEN"]


async def get_json(env: dict[str, str], path: str) -> dict[str, object] | None:
    """GET a JSON endpoint, None while the daemon is not up."""
    try:
        async with httpx.AsyncClient() as client:
            response = await client.get(url(env) + path, timeout=2)
        return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]
    except httpx.TransportError:
        return None


async def at_percent(env: dict[str, str], percent: int) -> bool:
    """Whether the daemon reports the canary at ``percent``."""
    rollout = await get_json(env, "/api/v1/rollouts/api")
    return rollout is not None and rollout["canary_percent"] == percent


async def test_run_serves_endpoints_takes_commands_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The process gets ready, advances the canary, obeys `coalmine pause`, exits 0 on SIGTERM."""
    async with simulated(tmp_path) as (_, env):
        process = start(env, tmp_path / "run.log")
        try:
            await wait_for(lambda: at_percent(env, 50), log=tmp_path / "run.log")
            async with httpx.AsyncClient() as client:
                assert (await client.get(url(env) + "/readyz")).status_code == 200
                metrics = (await client.get(url(env) + "/metrics")).text
            assert 'coalmine_canary_weight_percent{script="api"} 50.0' in metrics
            paused = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "coalmine", "pause", "api"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
            )
            assert paused.returncode == 0, paused.stderr
            assert paused.stdout.startswith("pause: paused by an operator")
            status = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "coalmine", "status"],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
            )
            assert status.stdout.splitlines()[0].split()[:2] == ["api", "PAUSED"]
        finally:
            process.send_signal(signal.SIGTERM)
            code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
        assert code == 0, (tmp_path / "run.log").read_text()
        with Store(tmp_path / "state.db") as store:
            assert store.verify_journal().ok


async def test_sigkill_mid_canary_resumes_at_the_same_step(tmp_path: Path) -> None:
    """kill -9 at 50% and restart: same step, no repeated or skipped deployment call.

    The kill lands wherever the daemon happens to be once it reports 50%: after the
    50% intent is recorded, and either before or after its deployment call. Either
    way the restarted daemon must end with that call made exactly once.
    """
    async with simulated(tmp_path) as (sim, env):
        process = start(env, tmp_path / "run.log")
        try:
            await wait_for(lambda: at_percent(env, 50), log=tmp_path / "run.log")
        finally:
            process.kill()
            await anyio.to_thread.run_sync(process.wait)
        process = start(env, tmp_path / "run.log")
        try:
            await wait_for(lambda: at_percent(env, 50), log=tmp_path / "run.log")

            seen: dict[str, object] = {}

            async def applied_and_ticked_again() -> bool:
                health = await get_json(env, "/health")
                with Store(tmp_path / "state.db") as store:
                    settled = store.open_intents() == []
                seen.update(health=health, settled=settled, posts=sim.deployment_posts("api"))
                return (
                    settled
                    and bool(sim.deployment_posts("api"))
                    and health is not None
                    and health["checks"]["cloudflare"]["latency_ms"] is not None  # type: ignore[index]
                )

            await wait_for(applied_and_ticked_again, log=tmp_path / "run.log", seen=seen)
        finally:
            process.send_signal(signal.SIGTERM)
            await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))
        posts = sim.deployment_posts("api")
        assert [[v["percentage"] for v in post["versions"]] for post in posts] == [[50, 50]]
        with Store(tmp_path / "state.db") as store:
            assert store.verify_journal().ok
            assert store.open_intents() == []
            assert store.states()["api"]["canary_percent"] == 50


async def test_a_listen_address_already_taken_is_a_clear_error_not_a_bug(tmp_path: Path) -> None:
    """A port another process listens on: exit 2 naming COALMINE_LISTEN and the cause, not
    "internal error" (exit 70), before any tick."""
    async with simulated(tmp_path) as (sim, env):
        with socket.create_server(("127.0.0.1", 0)) as taken:
            env["COALMINE_LISTEN"] = f"127.0.0.1:{taken.getsockname()[1]}"
            ran = await anyio.to_thread.run_sync(
                lambda: subprocess.run(
                    [sys.executable, "-m", "coalmine", "run"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
            )
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert f"coalmine: COALMINE_LISTEN {env['COALMINE_LISTEN']}: cannot listen" in ran.stderr
    assert "Address already in use" in ran.stderr and "internal error" not in ran.stderr
    assert sim.deployment_posts("api") == []
