"""A whole account within Cloudflare's budget: 1,000 Workers, 50 live canaries (issue 13).

Run from the repository root::

    .venv/bin/python bench/account.py --minutes 10
    .venv/bin/python bench/account.py --minutes 30      # the RSS growth target is over 30 min

This is a benchmark, not a test (it is not in ``make test``): it prints numbers and exits 0
whether or not a target is met. docs/benchmarks.md ("Account") has the results.

``python -m coalmine run`` as its own process, pinned to one core, against the simulator in
this process (on the other core) with Cloudflare's real default budgets: the simulator refuses
over 1,200 REST calls and 300 GraphQL queries per 5 minutes (429), and the daemon runs its
rate limiter as shipped (``COALMINE_CLOUDFLARE_RATE_LIMIT`` 600, GraphQL 200; nothing lifted),
with every setting at its default (discovery 60 s, drift 30 min, canary drift 2 min).

- ``--canaries`` scripts (50) have a canary at 10% from the start, held for a day and judged
  every 30 s by two Cloudflare analytics rules;
- the rest are idle (one version at 100%). A wrangler-like client here starts a new split
  (a new version at 10%) on a random idle script every ``--split-every`` seconds on average
  (exponential gaps); their policy advances it 10% → 50% → 100% in a few minutes, so the
  account keeps about 50 live canaries;
- every Cloudflare answer takes ``--latency`` seconds.

Measured after ``--warmup``: REST and GraphQL calls per 5 minutes as the simulator received
them; adoption delay, from the split to the daemon's first read of that script's deployment
(the tick that adopts it), p95; tick lateness p99 from the daemon's own
``coalmine_tick_lateness_seconds``; the daemon's CPU over the wall time; RSS growth (the median
of the last 5 minutes over the first 5 after the warm-up, or of the last and first third of a
shorter run). The last line is the issue's summary line.
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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import anyio
import httpx

from coalmine.cli import localprom
from coalmine.simulator import Behaviour, LoggedRequest, RateLimits, Simulator
from daemon import Histogram, get_text, histogram, pinned_apart, print_machine, proc_sample
from load import churn_policy, quantile, steady_policy
from machine import load

ROOT = Path(__file__).resolve().parent.parent
RSS_EVERY = 10.0
TARGETS = {"rest": 600, "graphql": 250, "late_ms": 1000.0, "cpu": 25.0, "rss": 5.0}


@dataclass
class Tally:
    """The simulator's Cloudflare request log, drained as the run goes."""

    counting: bool = False
    calls: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    splits: dict[str, datetime] = field(default_factory=dict)  # script → split started
    adopted: dict[str, float] = field(default_factory=dict)  # script → seconds to first read
    posts: Counter[str] = field(default_factory=Counter)  # scripts split here: POSTs seen

    def drain(self, sim: Simulator) -> None:
        log = sim.cloudflare.requests
        taken, log[:] = log[:], []
        for request in taken:
            self._one(request)

    def _one(self, request: LoggedRequest) -> None:
        graphql = request.path.endswith("/graphql")
        parts = request.path.split("/")
        script = parts[parts.index("scripts") + 1] if "scripts" in parts else ""
        if request.method == "GET" and request.path.endswith("/deployments"):
            started = self.splits.get(script)
            if started is not None and script not in self.adopted and request.at >= started:
                self.adopted[script] = (request.at - started).total_seconds()
        if request.method == "POST" and not graphql and script in self.splits:
            self.posts[script] += 1
        if self.counting:
            self.calls["graphql" if graphql else "rest"] += 1
            what = parts[-1]
            if graphql and isinstance(request.body, dict):
                text = str(request.body.get("query", ""))
                what = text.split("(", maxsplit=1)[0].removeprefix("query ").strip() or "graphql"
            self.calls[f"{request.method} {what}"] += 1
            self.statuses[request.status or 0] += 1


@dataclass
class Run:
    scripts: int
    canaries: int
    measured: float = 0.0
    cpu_seconds: float = 0.0
    rss: list[tuple[float, int]] = field(default_factory=list)
    lateness: Histogram | None = None
    tally: Tally = field(default_factory=Tally)
    loads: list[str] = field(default_factory=list)
    exit_code: int | None = None
    sim_cpu: float = 0.0
    log_tail: str = ""
    warnings: list[str] = field(default_factory=list)


async def wrangler(
    sim: Simulator, idle: list[str], every: float, rng: random.Random, run: Run
) -> None:
    """Start a new 10% split on a random never-split idle script, at exponential gaps."""
    fresh = list(idle)
    rng.shuffle(fresh)
    while fresh:
        await anyio.sleep(rng.expovariate(1.0 / every))
        script = fresh.pop()
        version = sim.upload_version(script, Behaviour())
        sim.start_canary(script, version, percent=10)
        run.tally.splits[script] = sim.clock()


async def sample(process: subprocess.Popen[bytes], sim: Simulator, run: Run, t0: float) -> None:
    while True:
        run.rss.append((time.monotonic() - t0, proc_sample(process.pid).rss_kb))
        run.tally.drain(sim)
        await anyio.sleep(RSS_EVERY - (time.monotonic() - t0) % RSS_EVERY)


async def measure(
    process: subprocess.Popen[bytes],
    sim: Simulator,
    listen: str,
    run: Run,
    args: argparse.Namespace,
) -> None:
    base = f"http://{listen}"
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(120):
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"coalmine run exited with {process.returncode}")
                try:
                    if (await http.get(f"{base}/healthz", timeout=5)).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await anyio.sleep(0.5)
        t0 = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(sample, process, sim, run, t0)
            await anyio.sleep(args.warmup)
            run.tally.drain(sim)
            run.tally.counting = True
            before_metrics = await get_text(http, f"{base}/metrics")
            before = proc_sample(process.pid)
            sim_before, start = time.process_time(), time.monotonic()
            while (left := t0 + args.warmup + args.minutes * 60 - time.monotonic()) > 0:
                await anyio.sleep(min(60.0, left))
                run.loads.append(load())
            after = proc_sample(process.pid)
            run.measured = time.monotonic() - start
            run.sim_cpu = (time.process_time() - sim_before) / run.measured
            after_metrics = await get_text(http, f"{base}/metrics")
            run.tally.drain(sim)
            tg.cancel_scope.cancel()
    run.cpu_seconds = after.cpu_seconds - before.cpu_seconds
    name = "coalmine_tick_lateness_seconds"
    run.lateness = histogram(after_metrics, name).minus(histogram(before_metrics, name))


async def account_run(args: argparse.Namespace) -> Run:
    sim = Simulator(seed=args.seed, rate_limits=RateLimits())  # Cloudflare's real budgets
    sim.slack.limiter.limit = None
    sim.pagerduty.limiter.limit = None
    sim.cloudflare.latency = args.latency
    names = [f"acct-{i:04d}" for i in range(args.scripts)]
    canaries, idle = names[: args.canaries], names[args.canaries :]
    for name in names:
        sim.add_script(name, requests_per_minute=600)
    uploaded = {name: sim.upload_version(name, Behaviour()) for name in canaries}
    run = Run(args.scripts, args.canaries)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="coalmine-account-") as tmp:
        folder = Path(tmp)
        (folder / "policies").mkdir()
        (folder / "policies" / "canaries.yaml").write_text(steady_policy(canaries, 30))
        (folder / "policies" / "idle.yaml").write_text(churn_policy(idle, 30))
        async with sim.running():
            for name in canaries:
                sim.start_canary(name, uploaded[name], percent=10)
            listen = f"127.0.0.1:{localprom.free_port()}"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
                **sim.environment(),
                "COALMINE_POLICIES": str(folder / "policies"),
                "COALMINE_STATE_URL": f"sqlite:///{folder / 'state.db'}",
                "COALMINE_LISTEN": listen,
            }
            log_path = folder / "run.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "coalmine", "run"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            try:
                with pinned_apart(process.pid):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(wrangler, sim, idle, args.split_every, rng, run)
                        await measure(process, sim, listen, run, args)
                        tg.cancel_scope.cancel()
            finally:
                process.send_signal(signal.SIGTERM)
                run.exit_code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=60))
            text = log_path.read_text(errors="replace")
            run.warnings = [
                line[:200] for line in text.splitlines() if '"level": "warning"' in line
            ][-5:]
            if run.exit_code != 0:
                run.log_tail = text[-3000:]
    return run


def rss_growth(rss: list[tuple[float, int]], warmup: float) -> tuple[float, str]:
    """RSS growth in percent: medians of the last and first spans after the warm-up (5 min
    each when the run is long enough, else a third of it each)."""
    kept = [(t, kb) for t, kb in rss if t >= warmup]
    if len(kept) < 3:
        return float("nan"), "too short"
    length = kept[-1][0] - kept[0][0]
    span = 300.0 if length >= 600 else length / 3
    first = [kb for t, kb in kept if t < kept[0][0] + span]
    last = [kb for t, kb in kept if t > kept[-1][0] - span]
    a, b = statistics.median(first), statistics.median(last)
    minutes = f"{span / 60:.1f} min"
    return (b / a - 1) * 100, f"median of the last {minutes} over the first {minutes}"


def report(run: Run, args: argparse.Namespace) -> None:
    per5 = 300.0 / run.measured if run.measured else float("nan")
    rest = run.tally.calls["rest"] * per5
    graphql = run.tally.calls["graphql"] * per5
    delays = sorted(run.tally.adopted.values())
    adopt = quantile(delays, 0.95) if delays else float("nan")
    lateness = run.lateness or Histogram({}, 0.0)
    late = lateness.quantile(0.99)
    cpu = run.cpu_seconds / run.measured * 100 if run.measured else float("nan")
    growth, how = rss_growth(run.rss, args.warmup)
    print(
        f"measured {run.measured:.0f} s after a {args.warmup:g} s warm-up; exit code "
        f"{run.exit_code}; simulator (this process) {run.sim_cpu:.0%} of a core"
    )
    print(f"load average each minute: {'; '.join(run.loads)}")
    print(
        "Cloudflare calls in the measured window: "
        + ", ".join(f"{k} {v}" for k, v in sorted(run.tally.calls.items()))
    )
    print(f"answers by status: {dict(sorted(run.tally.statuses.items()))}")
    split = len(run.tally.splits)
    advanced = sum(1 for s in run.tally.splits if run.tally.posts[s] > 0)
    print(
        f"splits started by the wrangler-like client: {split}; read by coalmine after the "
        f"split: {len(delays)}; advanced by coalmine (a deployment POST): {advanced}"
    )
    if delays:
        print(
            f"adoption delay (split → first read): min {delays[0]:.1f} s, median "
            f"{statistics.median(delays):.1f} s, p95 {adopt:.1f} s, max {delays[-1]:.1f} s"
        )
    print(
        f"tick lateness: {lateness.count:.0f} ticks, p99 {late[0] * 1000:.0f} ms "
        f"(bucket {late[1] * 1000:g}–{late[2] * 1000:g} ms), p50 "
        f"{lateness.quantile(0.5)[0] * 1000:.0f} ms"
    )
    rss = [kb for _, kb in run.rss]
    print(
        f"RSS min / median / max {min(rss) / 1024:.1f} / {statistics.median(rss) / 1024:.1f} / "
        f"{max(rss) / 1024:.1f} MB; growth {growth:+.2f}% ({how})"
    )
    minutes: dict[int, list[int]] = {}
    for t, kb in run.rss:
        minutes.setdefault(int(t // 60), []).append(kb)
    cells = [f"{m}:{statistics.median(v) / 1024:.1f}" for m, v in sorted(minutes.items())]
    print("RSS, median per minute since start (MB):")
    for i in range(0, len(cells), 10):
        print("   " + "  ".join(cells[i : i + 10]))
    limit = 60 + 30  # the discovery interval + one poll
    checks = [
        ("rest_per_5min", rest, f"≤ {TARGETS['rest']}", rest <= TARGETS["rest"]),
        ("graphql_per_5min", graphql, f"≤ {TARGETS['graphql']}", graphql <= TARGETS["graphql"]),
        ("adopt_p95_s", adopt, f"≤ {limit}", adopt <= limit),
        ("late_p99_ms", late[0] * 1000, "≤ 1000", late[0] * 1000 <= TARGETS["late_ms"]),
        ("cpu_pct", cpu, "≤ 25", cpu <= TARGETS["cpu"]),
        ("rss_growth_pct", growth, "≤ 5 over 30 min", growth <= TARGETS["rss"]),
    ]
    for name, value, target, ok in checks:
        print(f"   {name:18} {value:10.1f}  {target:16} {'ok' if ok else 'MISSED'}")
    for line in run.warnings:
        print(f"   daemon warning: {line}")
    if run.log_tail:
        print(f"coalmine run exited with {run.exit_code}; its log:\n{run.log_tail}")
    print(
        f"account: scripts={run.scripts} canaries={run.canaries} rest_per_5min={rest:.0f} "
        f"graphql_per_5min={graphql:.0f} adopt_p95_s={adopt:.1f} late_p99_ms={late[0] * 1000:.0f} "
        f"cpu_pct={cpu:.1f} rss_growth_pct={growth:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--scripts", type=int, default=1000, help="watched scripts (1000)")
    parser.add_argument("--canaries", type=int, default=50, help="live canaries (50)")
    parser.add_argument(
        "--split-every", type=float, default=20.0, help="mean seconds between new splits (20)"
    )
    parser.add_argument("--latency", type=float, default=0.02, help="seconds per answer (0.02)")
    parser.add_argument("--minutes", type=float, default=10.0, help="measured minutes (10)")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds not measured (120)")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    command = " ".join(["bench/account.py", *(argv if argv is not None else sys.argv[1:])])
    print("== account: 1,000 Workers within Cloudflare's default budgets")
    print_machine("the daemon pinned to one core, the simulator to the other")
    print(f"command: {command}")
    run = anyio.run(account_run, args)
    report(run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
