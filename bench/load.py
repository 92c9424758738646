"""Load and soak: ``coalmine run`` watching 1,000 Worker scripts every 5 s against the simulator.

Run from the repository root::

    .venv/bin/python bench/load.py                  # 5 minutes: CPU, RSS, lateness, in flight
    .venv/bin/python bench/load.py --minutes 30     # the soak: RSS growth over 30 minutes

This is a benchmark, not a test (it is not in ``make test``): it prints numbers and exits 0
whether or not a target is met. docs/reliability.md ("Load and soak") has the method, the
results and the caveats.

The daemon runs as its own process (``python -m coalmine run`` through the same bootstrap as
bench/daemon.py's "lifted" setting: the rate limiter's period shrunk from 5 minutes to 1 s,
because 1,000 scripts every 5 s are far over Cloudflare's budget), pinned to one core; this
process holds the simulator on the other. The scripts are of three kinds:

- *steady*: a canary at 10% from the start, held for a day (``--active``), judged every
  ``analysis.interval`` on two Cloudflare analytics rules;
- *churn*: this script starts a new canary (10%) on one of them every ``--churn-every``
  seconds; most are healthy and go 10% → 50% → 100% → idle, one in four throws and is rolled
  back, so traffic changes, journal entries and pages go on all through the run;
- *idle*: one version at 100%, checked for a new deployment every ``--discovery`` seconds.

Measured, after ``--warmup`` (RSS from the start): the daemon's CPU time over the wall time
(/proc/<pid>/stat), its RSS every 10 s and peak RSS (VmHWM), poll lateness from its own
``coalmine_tick_lateness_seconds`` histogram, the gaps between one script's deployment reads
as the simulator saw them, and the most requests in flight at once per script and source
(REST API, GraphQL) as the simulator counts them (``Service.in_flight``), over the whole run.
Every Cloudflare answer takes ``--latency`` seconds, so two overlapping requests would show.
The soak's figure: RSS growth = the median of the last 5 minutes over the median of the first
5 minutes after the warm-up, minus one.
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
import time
from collections import Counter
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import httpx

from coalmine.cli import localprom
from coalmine.simulator import Behaviour, LoggedRequest, RateLimits, Simulator
from daemon import (
    BOOTSTRAP,
    LIFTED_WINDOW,
    Histogram,
    get_text,
    histogram,
    pinned_apart,
    print_machine,
    proc_sample,
)
from machine import load

ROOT = Path(__file__).resolve().parent.parent
RSS_EVERY = 10.0  # seconds between RSS samples
LOAD_EVERY = 60.0  # seconds between load-average readings
GROWTH_SPAN = 300.0  # seconds: the soak compares the medians of two spans this long
GROWTH_TARGET = 0.05
FAULTY_SHARE = 0.25  # of churn canaries: throw, and are rolled back
CHURN_IDLE = 75.0  # seconds a churn script stays idle before its next canary
RULES = """\
rules:
  - {name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m,
     above: 5, for: 0s, on_breach: rollback}
  - {name: cpu_p99, source: cloudflare, signal: cpu_time_p99, window: 2m,
     above: 50, for: 1m, on_breach: hold}
"""


def steady_policy(scripts: list[str], interval: int) -> str:
    """Canaries held for a day: judged every interval, never advanced."""
    return f"""\
version: 1
name: load-steady
scripts: [{", ".join(scripts)}]
analysis: {{interval: {interval}s, warmup: 10s, inconclusive_page_after: 1h}}
steps:
  - {{weight: 10, hold: 24h}}
  - {{weight: 100}}
{RULES}"""


def churn_policy(scripts: list[str], interval: int) -> str:
    """Short holds and watch, so a canary is promoted (or rolled back) within minutes."""
    return f"""\
version: 1
name: load-churn
scripts: [{", ".join(scripts)}]
analysis: {{interval: {interval}s, warmup: 10s, inconclusive_page_after: 1h}}
steps:
  - {{weight: 10, hold: 30s}}
  - {{weight: 50, hold: 30s}}
  - {{weight: 100}}
post_promotion: {{watch: 1m}}
{RULES}"""


def flight_key(request: LoggedRequest) -> Hashable | None:
    """(script, "rest" | "graphql"): what "one request in flight per script and source" counts."""
    if request.path.endswith("/graphql"):
        variables = request.body.get("variables") if isinstance(request.body, dict) else None
        script = variables.get("script") if isinstance(variables, dict) else None
        return (str(script), "graphql")
    parts = request.path.split("/")
    if "scripts" in parts and parts.index("scripts") + 1 < len(parts):
        return (parts[parts.index("scripts") + 1], "rest")
    return None


@dataclass
class Tally:
    """What the simulator's Cloudflare log showed, read and emptied as the run goes."""

    calls: Counter[str] = field(default_factory=Counter)
    changes: Counter[str] = field(default_factory=Counter)  # deployment POSTs by kind
    last_read: dict[str, float] = field(default_factory=dict)  # script → its last GET
    gaps: list[float] = field(default_factory=list)  # seconds between one script's GETs
    counting: bool = False  # calls and gaps are counted only after the warm-up

    def drain(self, sim: Simulator) -> None:
        log = sim.cloudflare.requests
        taken, log[:] = log[:], []
        for request in taken:
            self._one(request)

    def _one(self, request: LoggedRequest) -> None:
        key = flight_key(request)
        kind = key[1] if isinstance(key, tuple) else "other"
        if request.method == "POST" and kind == "rest":
            body = request.body if isinstance(request.body, dict) else {}
            notes = body.get("annotations") if isinstance(body.get("annotations"), dict) else {}
            message = str(notes.get("workers/message") or "")
            self.changes[message.removeprefix("coalmine: ").split(" (")[0] or "no message"] += 1
        if not self.counting:
            return
        self.calls[f"{request.method} {kind}"] += 1
        if request.method == "GET" and request.path.endswith("/deployments"):
            script, at = str(key[0]) if isinstance(key, tuple) else "", request.at.timestamp()
            if script in self.last_read:
                self.gaps.append(at - self.last_read[script])
            self.last_read[script] = at


@dataclass
class Run:
    """Everything one run measured."""

    scripts: int
    steady: int
    churn: int
    interval: int
    discovery: int
    latency: float
    adopt_seconds: float = 0.0
    core: int | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, kB)
    # (seconds since start, {RssAnon, RssFile, RssShmem} in kB): the heap or mapped files
    rss_parts: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    loads: list[tuple[float, str]] = field(default_factory=list)
    cpu_slices: list[float] = field(default_factory=list)  # CPU share per minute
    measured_seconds: float = 0.0
    cpu_seconds: float = 0.0
    hwm_kb: int = 0
    lateness: Histogram | None = None
    polls: float = 0.0
    tally: Tally = field(default_factory=Tally)
    peak_in_flight: dict[str, int] = field(default_factory=dict)  # source → most at once
    over_one: list[tuple[Hashable, int]] = field(default_factory=list)
    peak_total: int = 0  # after the warm-up
    peak_total_start: int = 0  # during start-up and the warm-up
    started_canaries: int = 0
    pages: int = 0
    sim_cpu_share: float = 0.0
    log_lines: int = 0
    exit_code: int | None = None

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.measured_seconds if self.measured_seconds else 0.0


async def churn(
    sim: Simulator, names: list[str], every: float, rng: random.Random, run: Run
) -> None:
    """Every ``every`` seconds, start a canary on the next churn script idle for a while.

    "A while" outlasts the post-promotion watch: a split during the watch would be drift.
    """
    idle_since: dict[str, float] = {}
    turn = 0
    while True:
        await anyio.sleep(every)
        now = time.monotonic()
        for name in names:
            if len(sim.cloudflare.current(name).split) > 1:
                idle_since.pop(name, None)
            else:
                idle_since.setdefault(name, now)
        for _ in range(len(names)):
            name = names[turn % len(names)]
            turn += 1
            if now - idle_since.get(name, now) >= CHURN_IDLE:
                faulty = rng.random() < FAULTY_SHARE
                behaviour = Behaviour(exception_rate=0.2) if faulty else Behaviour()
                sim.start_canary(name, sim.upload_version(name, behaviour), percent=10)
                idle_since.pop(name)
                run.started_canaries += 1
                break


async def sample(process: subprocess.Popen[bytes], sim: Simulator, run: Run, t0: float) -> None:
    """RSS every RSS_EVERY s, the load average every LOAD_EVERY s, the request log drained."""
    next_load = 0.0
    while True:
        elapsed = time.monotonic() - t0
        run.rss.append((elapsed, proc_sample(process.pid).rss_kb))
        run.rss_parts.append((elapsed, rss_parts(process.pid)))
        if elapsed >= next_load:
            run.loads.append((elapsed, load()))
            next_load += LOAD_EVERY
        run.tally.drain(sim)
        await anyio.sleep(RSS_EVERY - (time.monotonic() - t0) % RSS_EVERY)


def rss_parts(pid: int) -> dict[str, int]:
    """RssAnon (the heap), RssFile and RssShmem (mapped files: SQLite's) in kB."""
    parts = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            parts[key] = int(value.split()[0])
    return parts


async def adopted(http: httpx.AsyncClient, base: str) -> int:
    """Rollouts the daemon counts as canaries, from its /health."""
    try:
        body = (await http.get(f"{base}/health", timeout=30.0)).json()
    except (httpx.HTTPError, ValueError):
        return 0
    return sum(1 for r in body.get("rollouts", []) if r["phase"] == "canary")


async def measure(
    process: subprocess.Popen[bytes],
    sim: Simulator,
    listen: str,
    run: Run,
    seconds: float,
    warmup: float,
) -> None:
    base = f"http://{listen}"
    started = time.monotonic()
    async with httpx.AsyncClient() as http:
        with anyio.move_on_after(300):
            while await adopted(http, base) < run.steady:
                if process.poll() is not None:
                    raise RuntimeError(f"coalmine run exited with {process.returncode}")
                await anyio.sleep(1.0)
        run.adopt_seconds = time.monotonic() - started
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample, process, sim, run, t0)
            await anyio.sleep(warmup)
            run.tally.drain(sim)
            run.tally.counting = True
            flights = sim.cloudflare.in_flight
            run.peak_total_start, flights.peak_total = flights.peak_total, flights.total
            before_metrics = await get_text(http, f"{base}/metrics")
            before = proc_sample(process.pid)
            sim_before = time.process_time()
            mark, mark_cpu = time.monotonic(), before.cpu_seconds
            while (left := t0 + seconds - time.monotonic()) > 0:
                await anyio.sleep(min(60.0, left))
                now, cpu = time.monotonic(), proc_sample(process.pid).cpu_seconds
                if now - mark >= 30.0:
                    run.cpu_slices.append((cpu - mark_cpu) / (now - mark))
                mark, mark_cpu = now, cpu
            after = proc_sample(process.pid)
            run.measured_seconds = time.monotonic() - (t0 + warmup)
            run.sim_cpu_share = (time.process_time() - sim_before) / run.measured_seconds
            after_metrics = await get_text(http, f"{base}/metrics")
            run.tally.drain(sim)
            run.loads.append((time.monotonic() - t0, load()))
            tg.cancel_scope.cancel()
    run.cpu_seconds = after.cpu_seconds - before.cpu_seconds
    run.hwm_kb = after.hwm_kb
    name = "coalmine_tick_lateness_seconds"
    run.lateness = histogram(after_metrics, name).minus(histogram(before_metrics, name))
    run.polls = run.lateness.count


async def load_run(args: argparse.Namespace) -> Run:
    """One daemon, ``args.minutes`` long, against a simulator shaped by ``args``."""
    sim = Simulator(seed=args.seed, rate_limits=RateLimits(requests=None, graphql=None))
    sim.slack.limiter.limit = None
    sim.pagerduty.limiter.limit = None
    sim.cloudflare.latency = args.latency
    sim.cloudflare.in_flight.key = flight_key
    names = [f"load-{i:04d}" for i in range(args.scripts)]
    steady, churners = names[: args.active], names[args.active : args.active + args.churn]
    for name in names:
        sim.add_script(name, requests_per_minute=600)
    canaries = {name: sim.upload_version(name, Behaviour()) for name in steady}
    run = Run(args.scripts, len(steady), len(churners), args.interval, args.discovery, args.latency)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="coalmine-load-") as tmp:
        folder = Path(tmp)
        (folder / "policies").mkdir()
        # idle scripts are governed by the steady policy: they have no canary to judge
        idle = names[args.active + args.churn :]
        (folder / "policies" / "steady.yaml").write_text(
            steady_policy(steady + idle, args.interval)
        )
        if churners:
            (folder / "policies" / "churn.yaml").write_text(churn_policy(churners, args.interval))
        async with sim.running():
            for name in steady:
                sim.start_canary(name, canaries[name], percent=10)
            listen = f"127.0.0.1:{localprom.free_port()}"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
                **sim.environment(),
                "COALMINE_POLICIES": str(folder / "policies"),
                "COALMINE_STATE_URL": f"sqlite:///{folder / 'state.db'}",
                "COALMINE_LISTEN": listen,
                "COALMINE_CLOUDFLARE_RATE_LIMIT": "1200",
                "COALMINE_DISCOVERY_INTERVAL": f"{args.discovery}s",
            }
            command = [sys.executable, "-c", BOOTSTRAP.format(window=LIFTED_WINDOW)]
            log_path = folder / "run.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            try:
                with pinned_apart(process.pid) as core:
                    run.core = core
                    async with anyio.create_task_group() as tg:
                        if churners:
                            tg.start_soon(churn, sim, churners, args.churn_every, rng, run)
                        await measure(process, sim, listen, run, args.minutes * 60, args.warmup)
                        tg.cancel_scope.cancel()
            finally:
                process.send_signal(signal.SIGTERM)
                run.exit_code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=60))
            flights = sim.cloudflare.in_flight
            for key, peak in flights.peak.items():
                source = key[1]  # flight_key's (script, source)
                run.peak_in_flight[source] = max(run.peak_in_flight.get(source, 0), peak)
            run.over_one = sorted((k, n) for k, n in flights.peak.items() if n > 1)[:10]
            run.peak_total = flights.peak_total
            run.pages = len(sim.pages)
            text = log_path.read_text(errors="replace")
            run.log_lines = text.count("\n")
            if run.exit_code != 0:
                print(f"coalmine run exited with {run.exit_code}; its log:\n{text[-3000:]}")
    return run


def growth(rss: list[tuple[float, int]], warmup: float) -> tuple[float, float, float] | None:
    """(first median, last median, last / first - 1), or None when the run is too short."""
    end = rss[-1][0] if rss else 0.0
    if end < warmup + 2 * GROWTH_SPAN:
        return None
    first = [kb for t, kb in rss if warmup <= t < warmup + GROWTH_SPAN]
    last = [kb for t, kb in rss if t > end - GROWTH_SPAN]
    a, b = statistics.median(first), statistics.median(last)
    return a, b, b / a - 1


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def report(run: Run, args: argparse.Namespace, command: str) -> None:
    idle = run.scripts - run.steady - run.churn
    nominal = (run.steady + run.churn) / run.interval + idle / run.discovery
    mb = 1024.0
    print(f"command: {command}")
    print(
        f"scripts: {run.scripts} ({run.steady} steady canaries, {run.churn} churn, {idle} idle); "
        f"analysis.interval {run.interval}s, COALMINE_DISCOVERY_INTERVAL {run.discovery}s; "
        f"every Cloudflare answer takes {run.latency * 1000:g} ms"
    )
    print(
        f"daemon pinned to core {run.core}; {run.steady} canaries adopted "
        f"{run.adopt_seconds:.0f} s after start; warm-up {args.warmup:g} s, then measured "
        f"{run.measured_seconds:.0f} s; exit code {run.exit_code}; {run.log_lines} log lines"
    )
    print("load average (1, 5, 15 min) during the run:")
    for t, text in run.loads:
        print(f"   {t / 60:5.1f} min  {text}")
    calls = sum(run.tally.calls.values())
    print(
        f"Cloudflare calls: {calls / run.measured_seconds:.1f}/s ("
        + ", ".join(
            f"{k} {v / run.measured_seconds:.1f}/s" for k, v in sorted(run.tally.calls.items())
        )
        + ")"
    )
    print(
        f"traffic changes over the whole run: {dict(run.tally.changes)}; "
        f"{run.started_canaries} churn canaries started; {run.pages} PagerDuty events"
    )
    print(f"simulator (this process): {run.sim_cpu_share:.0%} of a core")
    lateness = run.lateness or Histogram({}, 0.0)
    p99, low, high = lateness.quantile(0.99)
    p50, _, _ = lateness.quantile(0.5)
    gaps = run.tally.gaps
    cpu = run.cpu_slices
    rows = [
        ("CPU, share of one core", f"{run.cpu_share:.1%}"),
        (
            "  per minute: median (min–max)",
            f"{statistics.median(cpu):.1%} ({min(cpu):.1%}–{max(cpu):.1%})" if cpu else "n/a",
        ),
        ("CPU per poll", f"{run.cpu_seconds / run.polls * 1000:.2f} ms" if run.polls else "n/a"),
        ("polls done / nominal", f"{run.polls / run.measured_seconds:.1f}/s of {nominal:.1f}/s"),
        ("peak RSS (VmHWM)", f"{run.hwm_kb / mb:.1f} MB"),
        (
            "RSS min / median / max",
            f"{min(kb for _, kb in run.rss) / mb:.1f} / "
            f"{statistics.median(kb for _, kb in run.rss) / mb:.1f} / "
            f"{max(kb for _, kb in run.rss) / mb:.1f} MB",
        ),
        (
            "poll lateness p99",
            f"< {high * 1000:g} ms (the first bucket)"
            if low == 0
            else f"{p99 * 1000:.0f} ms (bucket {low * 1000:g}–{high * 1000:g} ms)",
        ),
        ("poll lateness p50", f"{p50 * 1000:.0f} ms"),
        (
            "gap between a script's reads",
            f"p50 {quantile(gaps, 0.5):.2f} s, p99 {quantile(gaps, 0.99):.2f} s, "
            f"max {max(gaps, default=float('nan')):.2f} s",
        ),
        (
            "most in flight per script",
            ", ".join(f"{s} {n}" for s, n in sorted(run.peak_in_flight.items())) or "none seen",
        ),
        (
            "most in flight in all",
            f"{run.peak_total} (start-up and warm-up: {run.peak_total_start})",
        ),
    ]
    for name, value in rows:
        print(f"   {name:30} {value}")
    if run.over_one:
        print(f"   MORE THAN ONE IN FLIGHT for: {run.over_one}")
    found = growth(run.rss, args.warmup)
    if found is None:
        print(
            f"   RSS growth: n/a (needs ≥ {(args.warmup + 2 * GROWTH_SPAN) / 60:.1f} min measured)"
        )
    else:
        first, last, ratio = found
        verdict = "ok" if ratio <= GROWTH_TARGET else "MISSED"
        print(
            f"   RSS growth (median of the last 5 min / of the first 5 min after warm-up - 1): "
            f"{first / mb:.1f} → {last / mb:.1f} MB = {ratio:+.2%} (target ≤ 5%) {verdict}"
        )
    print("RSS, median per minute since the canaries were adopted (MB):")
    minutes: dict[int, list[int]] = {}
    for t, kb in run.rss:
        minutes.setdefault(int(t // 60), []).append(kb)
    cells = [f"{m}:{statistics.median(v) / mb:.1f}" for m, v in sorted(minutes.items())]
    for i in range(0, len(cells), 10):
        print("   " + "  ".join(cells[i : i + 10]))
    print("RSS parts, median per 5 minutes (MB): anon (heap) / file / shmem")
    spans: dict[int, list[dict[str, int]]] = {}
    for t, parts in run.rss_parts:
        spans.setdefault(int(t // 300), []).append(parts)
    for span, samples in sorted(spans.items()):
        anon, file, shmem = (
            statistics.median(p.get(k, 0) for p in samples) / mb
            for k in ("RssAnon", "RssFile", "RssShmem")
        )
        print(f"   {span * 5:3d}–{span * 5 + 5} min: {anon:.1f} / {file:.1f} / {shmem:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scripts", type=int, default=1000, help="watched scripts (1000)")
    parser.add_argument("--active", type=int, default=200, help="steady canaries (200)")
    parser.add_argument("--churn", type=int, default=50, help="churn scripts (50)")
    parser.add_argument(
        "--churn-every", type=float, default=6.0, help="seconds between new churn canaries (6)"
    )
    parser.add_argument("--interval", type=int, default=5, help="analysis.interval, s (5)")
    parser.add_argument(
        "--discovery", type=int, default=5, help="COALMINE_DISCOVERY_INTERVAL, s (5)"
    )
    parser.add_argument(
        "--latency", type=float, default=0.02, help="seconds each Cloudflare answer takes (0.02)"
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="run length after adoption (5)")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds not measured (120)")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)
    if args.active + args.churn > args.scripts:
        parser.error("--active + --churn must not exceed --scripts")
    command = " ".join(["bench/load.py", *(argv if argv is not None else sys.argv[1:])])
    print("== load: `coalmine run` watching many scripts against the simulator")
    print_machine("the daemon pinned to one core, the simulator to the other")
    print(f"load average before: {load()}")
    run = anyio.run(load_run, args)
    report(run, args, command)
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
