"""Three `coalmine run` processes on one real PostgreSQL, against the simulator: a holder
SIGKILLed mid-step is replaced and the rollout finishes with every deployment POST made once;
a holder SIGSTOPped past its lease's TTL wakes up to find it taken over, sends nothing, and
steps down.

The lease TTL is 2 s and the analysis interval 1 s, so a takeover comes within a few seconds;
the tests wait for it with generous deadlines and never assert how long it took (that is
``bench/takeover.py``'s job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import httpx
import psycopg
import pytest

from coalmine.cli.localprom import free_port
from coalmine.errors import ConfigError
from coalmine.settings import load_settings
from coalmine.simulator import Simulator
from coalmine.store.postgres import PostgresStore

pytestmark = pytest.mark.anyio
TOKEN = "replicas-test-admin-token-0123456789"
POLICY = """
version: 1
name: replicas
scripts: [api]
analysis: {interval: 1s, warmup: 0s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 2s}, {weight: 50, hold: 4s}, {weight: 100}]
post_promotion: {watch: 2s}
rules:
  - {name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m, above: 1000, on_breach: rollback}
  - {name: traffic, source: cloudflare, signal: requests, window: 1m, above: 0, on_breach: page}
"""


@dataclass
class Cluster:
    """The simulator, the database, and the replicas by id."""

    sim: Simulator
    url: str
    folder: Path
    base: dict[str, str]
    canary: str
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, replica: str, cloudflare_host: str = "127.0.0.1") -> None:
        """`coalmine run` as ``replica``, calling Cloudflare by ``cloudflare_host``."""
        port = free_port()
        api = self.base["COALMINE_CLOUDFLARE_API_URL"].replace("127.0.0.1", cloudflare_host)
        env = {
            **self.base,
            "COALMINE_LISTEN": f"127.0.0.1:{port}",
            "COALMINE_REPLICA_ID": replica,
            "COALMINE_CLOUDFLARE_API_URL": api,
        }
        with (self.folder / f"{replica}.log").open("ab") as out:
            self.processes[replica] = subprocess.Popen(
                [sys.executable, "-m", "coalmine", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.ports[replica] = port

    def lease(self) -> tuple[str, int] | None:
        """Who holds `api`'s lease now, and at which epoch (None: nobody)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            try:
                row = conn.execute(
                    "SELECT holder, epoch FROM leases WHERE name = 'api'"
                    " AND expires_at > clock_timestamp()"
                ).fetchone()
            except psycopg.errors.UndefinedTable:  # no replica has created the schema yet
                return None
        return (str(row[0]), int(row[1])) if row else None

    def posts(self) -> list[list[float]]:
        """The percentages of every deployment POST Cloudflare received."""
        return [[v["percentage"] for v in p["versions"]] for p in self.sim.deployment_posts("api")]

    async def metric(self, replica: str, sample: str) -> float | None:
        """One sample of a replica's /metrics (None while it does not answer)."""
        try:
            async with httpx.AsyncClient() as client:
                url = f"http://127.0.0.1:{self.ports[replica]}/metrics"
                text = (await client.get(url, timeout=2)).text
        except httpx.TransportError:
            return None
        for line in text.splitlines():
            if line.startswith(sample + " "):
                return float(line.split()[-1])
        return None

    def logs(self) -> str:
        """Every replica's log, for failure messages."""
        return "\n".join(
            f"--- {p.stem}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.folder.glob("*.log"))
        )

    def stop_all(self) -> None:
        """SIGTERM (after SIGCONT) every replica still running; wait for each."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@asynccontextmanager
async def cluster(tmp_path: Path, url: str) -> AsyncIterator[Cluster]:
    """A wall-clock simulator with `api` and its canary uploaded 10 minutes ago (so Cloudflare's
    analytics, read 3 minutes behind, have data); replicas started by the test."""
    back = [timedelta(minutes=10)]
    sim = Simulator(seed=7, clock=lambda: datetime.now(UTC) - back[0])
    sim.slack.limiter.limit = None
    sim.add_script("api", requests_per_minute=600)
    canary = sim.upload_version("api")
    sim.start_canary("api", canary, percent=10)
    back[0] = timedelta(0)
    (tmp_path / "policy.yaml").write_text(POLICY)
    async with sim.running():
        base = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
            **sim.environment(),
            "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
            "COALMINE_STATE_URL": url,
            "COALMINE_ADMIN_TOKEN": TOKEN,
            "COALMINE_DISCOVERY_INTERVAL": "1s",
            "COALMINE_DRIFT_INTERVAL": "1s",  # idle scripts read every second
            "COALMINE_CANARY_DRIFT_INTERVAL": "1s",  # and canaries at every tick
            "COALMINE_LEASE_TTL": "2s",
        }
        world = Cluster(sim, url, tmp_path, base, canary)
        try:
            yield world
        finally:
            await anyio.to_thread.run_sync(world.stop_all)


async def until(
    condition: Callable[[], object], what: str, world: Cluster, limit: float = 60
) -> None:
    """Wait for ``condition()`` with a deadline; fail with the replicas' logs."""
    with anyio.move_on_after(limit):
        while not await anyio.to_thread.run_sync(condition):
            await anyio.sleep(0.1)
        return
    pytest.fail(f"{what}: not within {limit:g}s\n{world.logs()}")


async def finished(world: Cluster, url: str) -> None:
    """The rollout ended promoted: each step posted once, pages once, the journal whole."""
    await until(lambda: world.posts() == [[50, 50], [100]], "promotion", world)
    store = PostgresStore(url)
    try:

        async def done() -> bool:
            states = await store.states()
            return states.get("api", {}).get("phase") == "idle" and not await store.open_intents()

        with anyio.fail_after(60):
            while not await done():
                await anyio.sleep(0.2)
        verification = await store.verify_journal()
        assert verification.ok, verification.problem
        actions = Counter(e.action for e in await store.journal())
    finally:
        await store.aclose()
    assert world.posts() == [[50, 50], [100]], "a deployment POST repeated or missing"
    assert actions["applied"] == 2, actions
    alerts = Counter(a.dedup_key for a in world.sim.pagerduty.alerts)
    assert alerts and set(alerts.values()) == {1}, alerts


@contextmanager
def noted(world: Cluster) -> Iterator[None]:
    """On failure, the replicas' logs go with the message."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{world.logs()}") from None


async def test_sigkill_of_the_holder_mid_step_hands_the_rollout_over(
    tmp_path: Path, postgres_url: str
) -> None:
    """Kill -9 the holder at 50%: another replica takes over and the rollout finishes with no
    repeated and no missing deployment POST, one PagerDuty alert per key, a verified journal."""
    async with cluster(tmp_path, postgres_url) as world:
        for replica in ("A", "B", "C"):
            world.start(replica)
        await until(lambda: world.posts() == [[50, 50]], "the 50% step", world)
        before = world.lease()
        assert before is not None
        holder, epoch = before
        world.processes[holder].kill()
        await anyio.to_thread.run_sync(world.processes[holder].wait)
        await until(
            lambda: (now := world.lease()) is not None and now[0] != holder, "a takeover", world
        )
        after = world.lease()
        assert after is not None and after[1] > epoch
        with noted(world):
            await finished(world, postgres_url)


async def test_a_holder_paused_past_its_ttl_sends_nothing_and_steps_down(
    tmp_path: Path, postgres_url: str
) -> None:
    """SIGSTOP the holder in a hold for longer than its lease: another replica takes over and
    goes on; after SIGCONT the old holder makes no Cloudflare call and reports the lease lost."""
    async with cluster(tmp_path, postgres_url) as world:
        world.start("paused", cloudflare_host="localhost")  # its calls are told apart by Host
        await until(lambda: (world.lease() or ("",))[0] == "paused", "the first lease", world)
        world.start("B")
        world.start("C")
        await until(lambda: world.posts() == [[50, 50]], "the 50% step", world)
        world.processes["paused"].send_signal(signal.SIGSTOP)
        stopped = datetime.now(UTC)
        await until(
            lambda: (now := world.lease()) is not None and now[0] != "paused", "a takeover", world
        )
        await until(lambda: world.posts() == [[50, 50], [100]], "the promotion", world)
        resumed = datetime.now(UTC)
        world.processes["paused"].send_signal(signal.SIGCONT)

        async def stepped_down() -> bool:
            held = await world.metric("paused", 'coalmine_lease_held{script="api"}')
            lost = await world.metric("paused", 'coalmine_lease_lost_total{script="api"}')
            return held == 0 and (lost or 0) >= 1

        with anyio.fail_after(60):
            while not await stepped_down():
                await anyio.sleep(0.1)
        with noted(world):
            await finished(world, postgres_url)
            mine = [
                r
                for r in world.sim.cloudflare.requests
                if r.headers["host"].startswith("localhost")
            ]
            writes = [r.path for r in mine if r.method != "GET" and r.at >= stopped]
            assert writes == [], f"the paused replica wrote after it was stopped: {writes}"
            late = [(r.method, r.path) for r in mine if r.at >= resumed]
            assert late == [], f"the paused replica called Cloudflare after it resumed: {late}"


async def test_a_second_coalmine_run_on_one_sqlite_file_is_refused(tmp_path: Path) -> None:
    """SQLite allows one process: a second `coalmine run` on the file exits 2 naming the first's
    pid and pointing to PostgreSQL; the first keeps running."""
    async with cluster(tmp_path, f"sqlite:///{tmp_path / 'state.db'}") as world:
        world.start("first")
        first = world.processes["first"]

        def serving() -> bool:
            try:
                url = f"http://127.0.0.1:{world.ports['first']}/readyz"
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        await until(serving, "the first daemon ready", world)
        env = {**world.base, "COALMINE_LISTEN": f"127.0.0.1:{free_port()}"}
        second = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "coalmine", "run"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        )
        assert second.returncode == 2, second.stderr
        assert f"in use by another coalmine (pid {first.pid})" in second.stderr
        assert "postgresql://" in second.stderr
        assert first.poll() is None


def test_a_malformed_replica_id_is_refused() -> None:
    """COALMINE_REPLICA_ID with a space is a clear error naming the variable (empty: unset)."""
    with pytest.raises(ConfigError, match="COALMINE_REPLICA_ID: must be up to 200 printable"):
        load_settings({"COALMINE_REPLICA_ID": "pod 0"})
    assert load_settings({"COALMINE_REPLICA_ID": ""}).replica_id is None
