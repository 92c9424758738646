"""Takeover benchmark: how long a script goes unwatched when its holder is SIGKILLed.

Run from the repository root::

    .venv/bin/python bench/takeover.py                    # 20 kills, TTL 3 s, interval 1 s
    .venv/bin/python bench/takeover.py --kills 40 --ttl 15 --interval 5

This is a benchmark, not a test: it prints numbers and exits 0 whether or not the bound holds.
It starts a PostgreSQL (Debian's package, durable: fsync on, in a temporary folder on a loopback
port), the simulator on the wall clock with one Worker split 10% to a canary that holds for an
hour, and three ``python -m coalmine run`` replicas sharing the database. Then, ``--kills``
times: wait until the script's holder is ticking, wait a random 0..interval more (so the kill
lands anywhere in its tick and renewal cycles), SIGKILL the holder, and poll the database every
20 ms. The takeover ends at the new holder's first tick: the first write of the script's state
stamped after the new lease was acquired. Takeover = that tick's time - the kill's. The killed
replica is started again before the next kill, so three replicas always run.

The bound checked against is ``TTL + interval + 2 s``: the lease runs out at most one TTL after
the kill, a survivor's next look comes within a third of a TTL, and its loop ticks at once.
Each run's times come from one host's clock (the database, the daemons' ticks and this script
share it).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import anyio
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.integration.postgres starts the server

from tests.integration.postgres import running_postgres  # noqa: E402

from coalmine.cli.localprom import free_port  # noqa: E402
from coalmine.simulator import Simulator  # noqa: E402
from machine import code_version, cpu_model, load  # noqa: E402

POLICY = """
version: 1
name: takeover
scripts: [api]
analysis: {{interval: {interval}s, warmup: 0s, inconclusive_page_after: 1h}}
steps: [{{weight: 10, hold: 1h}}, {{weight: 100}}]
rules:
  - name: exceptions
    source: cloudflare
    signal: errors_per_minute
    window: 1m
    above: 1000000
    on_breach: page
"""


def lease(url: str) -> tuple[str, datetime] | None:
    """The live holder of `api` and when it acquired the lease."""
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            row = conn.execute(
                "SELECT holder, acquired_at FROM leases WHERE name = 'api'"
                " AND expires_at > clock_timestamp()"
            ).fetchone()
        except psycopg.errors.UndefinedTable:  # no replica has created the schema yet
            return None
    return (str(row[0]), row[1]) if row else None


def last_tick(url: str) -> datetime | None:
    """When `api`'s state was last written (the holder's latest tick)."""
    with psycopg.connect(url, autocommit=True) as conn:
        try:
            row = conn.execute("SELECT updated_at FROM rollouts WHERE script = 'api'").fetchone()
        except psycopg.errors.UndefinedTable:
            return None
    return datetime.fromisoformat(str(row[0])) if row else None


class Replicas:
    """Three `coalmine run` processes, by id."""

    def __init__(self, env: dict[str, str], folder: Path) -> None:
        self.env = env
        self.folder = folder
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        """Start (or restart) replica ``name``."""
        env = {
            **self.env,
            "COALMINE_REPLICA_ID": name,
            "COALMINE_LISTEN": f"127.0.0.1:{free_port()}",
        }
        with (self.folder / f"{name}.log").open("ab") as out:
            self.processes[name] = subprocess.Popen(
                [sys.executable, "-m", "coalmine", "run"], env=env, stdout=out, stderr=out
            )

    def stop(self) -> None:
        """SIGTERM every replica and wait."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def wait_for(condition: object, seconds: float = 120.0, every: float = 0.02) -> object:
    """Poll ``condition()`` until truthy; raise after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()  # type: ignore[operator]
        if result:
            return result
        time.sleep(every)
    raise TimeoutError("condition not met")


def one_kill(url: str, replicas: Replicas, interval: float, rng: random.Random) -> float:
    """Kill the ticking holder; return seconds until the new holder's first tick."""
    holder = wait_for(lambda: lease(url))
    assert isinstance(holder, tuple)
    since = datetime.now(UTC)
    wait_for(lambda: (t := last_tick(url)) is not None and t > since)  # it is ticking
    time.sleep(rng.uniform(0, interval))
    name = holder[0]
    killed_at = datetime.now(UTC)
    replicas.processes[name].kill()
    replicas.processes[name].wait()

    def new_tick() -> datetime | None:
        now = lease(url)
        if now is None or now[0] == name:
            return None
        tick = last_tick(url)
        return tick if tick is not None and tick >= now[1] else None

    tick = wait_for(new_tick)
    assert isinstance(tick, datetime)
    replicas.start(name)
    return (tick - killed_at).total_seconds()


@contextmanager
def world(ttl: int, interval: int, folder: Path) -> Iterator[tuple[str, Replicas]]:
    """PostgreSQL, the simulator in a thread, and three replicas."""
    with running_postgres(durable=True) as server:
        url = server.new_database("takeover")
        sim = Simulator(seed=9)
        sim.add_script("api", requests_per_minute=600)
        canary = sim.upload_version("api")
        ready = threading.Event()
        policy = folder / "policy.yaml"
        policy.write_text(POLICY.format(interval=interval))

        async def serve() -> None:
            async with sim.running():
                sim.start_canary("api", canary, percent=10)
                ready.set()
                await anyio.sleep_forever()

        with anyio.from_thread.start_blocking_portal() as portal:
            future = portal.start_task_soon(serve)
            ready.wait(timeout=30)
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
                **sim.environment(),
                "COALMINE_POLICIES": str(policy),
                "COALMINE_STATE_URL": url,
                "COALMINE_DISCOVERY_INTERVAL": f"{interval}s",
                "COALMINE_LEASE_TTL": f"{ttl}s",
                "COALMINE_LOG_LEVEL": "warning",
            }
            replicas = Replicas(env, folder)
            for name in ("r1", "r2", "r3"):
                replicas.start(name)
            try:
                yield url, replicas
            finally:
                replicas.stop()
                future.cancel()


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--ttl", type=int, default=3, help="COALMINE_LEASE_TTL in seconds")
    parser.add_argument("--interval", type=int, default=1, help="analysis interval, seconds")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    bound = args.ttl + args.interval + 2
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; code {code_version()}")
    print(f"load before: {load()}; seed {seed}")
    print(f"TTL {args.ttl}s, interval {args.interval}s, bound TTL + interval + 2s = {bound}s")
    times = []
    with (
        tempfile.TemporaryDirectory(prefix="coalmine-takeover-") as tmp,
        world(args.ttl, args.interval, Path(tmp)) as (url, replicas),
    ):
        for n in range(1, args.kills + 1):
            seconds = one_kill(url, replicas, args.interval, rng)
            times.append(seconds)
            print(f"  kill {n:2}: takeover {seconds:6.2f}s", flush=True)
    over = sum(1 for t in times if t > bound)
    print(
        f"takeover over {len(times)} kills: median {statistics.median(times):.2f}s,"
        f" p90 {statistics.quantiles(times, n=10)[-1]:.2f}s, max {max(times):.2f}s,"
        f" min {min(times):.2f}s; over the bound: {over}"
    )
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
