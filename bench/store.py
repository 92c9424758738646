"""State-store benchmark: SQLite and PostgreSQL side by side, in one run, on one machine.

Run from the repository root (PostgreSQL: Debian's package, as `make test` installs it)::

    .venv/bin/python bench/store.py                          # both parts, defaults
    .venv/bin/python bench/store.py --only daemon --seconds 120 --repeats 2
    .venv/bin/python bench/store.py --only seam --scripts 100 --seconds 30

This is a benchmark, not a test: it prints numbers and exits 0. docs/benchmarks.md ("State
store: SQLite and PostgreSQL") has the method, the results and the caveats.

daemon
    bench/daemon.py's footprint run — ``coalmine run`` as its own process pinned to one core,
    ``--scripts`` Workers polled every second with Cloudflare analytics rules, the rate
    limiter's period lifted to 1 s so that every script really ticks every second (one store
    commit per script per second) — once with ``COALMINE_STATE_URL=sqlite:///…`` and once with
    ``postgresql://…``, alternating, ``--repeats`` times each. Reported per run: the daemon's
    CPU, the PostgreSQL server's CPU over the same window (its processes, from /proc), poll
    lateness p50/p99 (the daemon's ``coalmine_tick_lateness_seconds``), polls done.

seam
    The store alone, through the daemon's awaitable seam (``open_store(url).commit``): ``--scripts``
    tasks each commit one tick a second (a state of about the size the daemon writes; a journal
    entry and an outbox item every 10th tick) for ``--seconds``. Reported: commit latency
    p50/p99/max and CPU of this process and of the server.

PostgreSQL runs durable (fsync and synchronous commit on, its defaults), in a temporary folder
on the same file system as the SQLite file, on a loopback port: both pay for an fsync per commit.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.integration

from tests.integration.postgres import RunningPostgres, running_postgres

from coalmine.store import open_store
from coalmine.store.records import NewEntry, NewNotification
from daemon import Footprint, footprint, pin_to_one_core, print_machine
from machine import load

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu(server: RunningPostgres) -> float:
    """CPU seconds used so far by the server: the postmaster (with its reaped children) and
    every live process it started."""
    main = int((server.data / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        pid, parent = int(entry.name), int(fields[1])
        if pid == main:
            total += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
        elif parent == main:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


# ---- daemon ----------------------------------------------------------------------------------


def print_daemon_row(backend: str, r: Footprint) -> None:
    p50, _, _ = r.lateness.quantile(0.5)
    p99, low, high = r.lateness.quantile(0.99)
    scheduled = r.scripts * r.ticks_span
    server = f"{r.server_cpu_seconds / r.seconds:6.1%}" if backend == "postgres" else "     -"
    print(
        f"   {backend:8} daemon CPU {r.cpu_share:6.1%}  server CPU {server}  "
        f"lateness p50 {p50 * 1000:4.0f} ms  p99 {p99 * 1000:4.0f} ms "
        f"(bucket {low * 1000:g}–{high * 1000:g})  polls {r.ticks / r.ticks_span:5.1f}/s "
        f"({r.ticks / scheduled:.0%})  RSS peak {r.hwm_mb:.0f} MB"
    )


def daemon_part(server: RunningPostgres, scripts: int, seconds: float, repeats: int) -> None:
    runs: dict[str, list[Footprint]] = {"sqlite": [], "postgres": []}
    for repeat in range(repeats):
        for backend in ("sqlite", "postgres"):
            if backend == "postgres":
                url = server.new_database(f"bench_daemon_{repeat}")
                result = anyio.run(
                    footprint, scripts, seconds, "lifted", 3, url, lambda: server_cpu(server)
                )
            else:
                result = anyio.run(footprint, scripts, seconds, "lifted", 3)
            runs[backend].append(result)
            print_daemon_row(backend, result)
    if repeats > 1:
        print(f"   median of {repeats} runs each:")
        for backend, results in runs.items():
            cpu = statistics.median(r.cpu_share for r in results)
            srv = statistics.median(r.server_cpu_seconds / r.seconds for r in results)
            p99 = statistics.median(r.lateness.quantile(0.99)[0] for r in results)
            p50 = statistics.median(r.lateness.quantile(0.5)[0] for r in results)
            print(
                f"   {backend:8} daemon CPU {cpu:6.1%}  server CPU {srv:6.1%}  "
                f"lateness p50 {p50 * 1000:4.0f} ms  p99 {p99 * 1000:4.0f} ms"
            )


# ---- seam ------------------------------------------------------------------------------------


def tick_state(script: str, tick: int) -> dict[str, object]:
    """A rollout state of about the daemon's size (two rules, versions, timestamps)."""
    rule = {
        "breached_since": None,
        "inconclusive_since": None,
        "last_value": 0.0012 * tick,
        "last_samples": 600 + tick,
        "paged": False,
        "evaluated_at": f"2026-03-03T18:{tick // 60 % 60:02d}:{tick % 60:02d}Z",
    }
    return {
        "script": script,
        "phase": "canary",
        "stable": "00000000-0000-4000-8000-0000000000a1",
        "canary": "00000000-0000-4000-8000-0000000000b2",
        "canary_percent": 10,
        "step": 0,
        "step_started_at": "2026-03-03T18:00:00Z",
        "warmup_until": "2026-03-03T18:00:05Z",
        "paused": False,
        "rules": {"exceptions": rule, "cpu_p99": dict(rule)},
        "history": [{"t": f"2026-03-03T18:00:{i:02d}Z", "percent": 10} for i in range(6)],
    }


@dataclass
class SeamResult:
    latencies: list[float]
    wall: float
    cpu: float
    server_cpu: float


async def seam(
    url: str, scripts: int, seconds: float, server: RunningPostgres | None
) -> SeamResult:
    store = open_store(url)
    await store.states()
    latencies: list[float] = []
    start = time.monotonic()
    cpu0, srv0 = time.process_time(), server_cpu(server) if server else 0.0

    async def writer(number: int) -> None:
        script = f"bench-{number:03d}"
        due = start + number / scripts  # spread over the second, as the daemon's ticks are
        tick = 0
        while due < start + seconds:
            await anyio.sleep(max(0.0, due - time.monotonic()))
            entries, notes = [], []
            if tick % 10 == 9:
                entries = [NewEntry(datetime.now(UTC), script, "coalmine", "hold", {"tick": tick})]
                notes = [NewNotification("slack", {"text": f"{script} {tick}"})]
            began = time.perf_counter()
            await store.commit(script, tick_state(script, tick), entries, notes)
            latencies.append(time.perf_counter() - began)
            tick += 1
            due += 1.0

    async with anyio.create_task_group() as tg:
        for number in range(scripts):
            tg.start_soon(writer, number)
    wall = time.monotonic() - start
    cpu, srv = time.process_time() - cpu0, (server_cpu(server) if server else 0.0) - srv0
    verified = await store.verify_journal()
    await store.aclose()
    assert verified.ok, verified.problem
    return SeamResult(latencies, wall, cpu, srv)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def seam_part(server: RunningPostgres, scripts: int, seconds: float, repeats: int) -> None:
    for repeat in range(repeats):
        for backend in ("sqlite", "postgres"):
            with tempfile.TemporaryDirectory(prefix="coalmine-bench-") as tmp:
                if backend == "sqlite":
                    result = anyio.run(seam, f"sqlite:///{tmp}/state.db", scripts, seconds, None)
                else:
                    url = server.new_database(f"bench_seam_{repeat}")
                    result = anyio.run(seam, url, scripts, seconds, server)
            lat = result.latencies
            server_share = (
                f"{result.server_cpu / result.wall:6.1%}" if backend == "postgres" else "     -"
            )
            print(
                f"   {backend:8} {len(lat) / result.wall:5.1f} commits/s  latency p50"
                f" {quantile(lat, 0.5) * 1000:5.2f} ms  p99 {quantile(lat, 0.99) * 1000:6.2f} ms"
                f"  max {max(lat) * 1000:6.1f} ms  this process CPU"
                f" {result.cpu / result.wall:6.1%}  server CPU {server_share}"
            )


# ---- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=("daemon", "seam"), help="run one part")
    parser.add_argument("--scripts", type=int, default=100, help="scripts ticking at 1 s (100)")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per run (60)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each backend (1)")
    args = parser.parse_args(argv)
    with running_postgres(durable=True) as server:
        print(f"PostgreSQL: {server.bin.parent.name}, durable (fsync on), port {server.port}")
        if args.only in (None, "daemon"):
            print(f"== daemon: `coalmine run`, {args.scripts} scripts at 1 s, limiter lifted")
            print_machine("the daemon pinned to one core, the simulator to the others")
            print(f"load average before: {load()}")
            daemon_part(server, args.scripts, args.seconds, args.repeats)
            print(f"load average after: {load()}")
            print()
        if args.only in (None, "seam"):
            core = pin_to_one_core()
            print(f"== seam: {args.scripts} writers committing once a second, through open_store")
            print_machine(f"this process pinned to core {core}")
            print(f"load average before: {load()}")
            seam_part(server, args.scripts, args.seconds, args.repeats)
            print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
