"""Daemon benchmarks: how soon a fault becomes a rollback, and what 100 watched scripts cost.

Run from the repository root::

    .venv/bin/python bench/daemon.py                        # both parts, defaults
    .venv/bin/python bench/daemon.py --only detection --runs 20
    .venv/bin/python bench/daemon.py --only footprint --scripts 100 --seconds 120
    .venv/bin/python bench/daemon.py --only footprint --limiter lifted --profile daemon.prof

This is a benchmark, not a test: it prints numbers and exits 0 whether or not a target is met.
Everything runs on loopback against coalmine's simulator (``coalmine.simulator``) on the wall
clock. docs/benchmarks.md ("Daemon") has the method, the results and the caveats.

detection
    One process holds the simulator and the daemon (``open_daemon`` + ``Daemon.serve``); Debian's
    Prometheus scrapes the simulated Worker every second. Each run starts a new daemon at a
    random moment (so its ticks take a new phase against the scrapes), uploads a canary, splits
    it 50/50, waits until the daemon judges it healthy, then schedules a 5xx fault at a random
    moment. Meanwhile this script asks Prometheus for the
    rule's own query every 50 ms: the fault is *visible in the source* at the first query whose
    value is above the threshold. The run ends at the rollback request (the deployment POST
    putting the stable version at 100%) in the simulator's Cloudflare request log.
    Detection = rollback request - visible, also given as a multiple of ``for`` + one interval.

footprint
    ``python -m coalmine run`` as its own process, pinned to one core, watching ``--scripts``
    Workers (one policy, each script split 10% to its own canary) every second with Cloudflare
    analytics rules, for ``--seconds``. Its CPU time and peak RSS come from /proc; poll lateness
    from its own ``coalmine_tick_lateness_seconds`` histogram. Run twice: with the rate limiter
    as shipped (``COALMINE_CLOUDFLARE_RATE_LIMIT=1200``, the most it accepts) and with the
    limiter's period shrunk from 5 minutes to 1 second by a bootstrap (``--limiter``), because
    1,200 calls per 5 minutes cannot feed 100 polls a second.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from coalmine.app import open_daemon, prepare
from coalmine.cli import localprom
from coalmine.daemon import ScriptLoop
from coalmine.engine import RolloutPhase
from coalmine.engine.state import RuleStatus
from coalmine.logs import configure as configure_logging
from coalmine.policy import Policy, Rule
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, LoggedRequest, RateLimits, Simulator
from coalmine.sources import Target
from coalmine.sources.promql import BadAnswer, render, single_value
from machine import code_version, cpu_model, load

ROOT = Path(__file__).resolve().parent.parent

# ---- detection ------------------------------------------------------------------------------

DETECT_SCRIPT = "bench-worker"
DETECT_RULE = "error_rate"
DETECT_PERCENT = 50
DETECT_RPM = 6000  # 100 requests a second: 50 a second on the canary at 50%
FAULT_5XX_RATE = 0.2  # ten times the threshold
POLL_PERIOD = 0.05  # seconds between this script's own queries to Prometheus
ALLOWANCE = 2.0  # seconds allowed on top of `for` + one interval


def detection_policy(interval: int, for_: int, window: int) -> str:
    """The fast policy: one Prometheus 5xx-ratio rule; the canary sits at 50% for an hour."""
    selector = 'script="$script",version="$version"'
    return f"""\
version: 1
name: bench-detection
scripts: [{DETECT_SCRIPT}]
analysis: {{interval: {interval}s, warmup: 2s, inconclusive_page_after: 1h}}
steps:
  - {{weight: 10, hold: 1h}}
  - {{weight: 50, hold: 1h}}
  - {{weight: 100}}
rules:
  - name: {DETECT_RULE}
    source: prometheus
    query: >-
      (sum(rate(http_requests_total{{{selector},code=~"5.."}}[$window])) or vector(0))
      / sum(rate(http_requests_total{{{selector}}}[$window]))
    samples: sum(increase(http_requests_total{{{selector}}}[$window]))
    window: {window}s
    min_samples: 20
    above: 0.02
    for: {for_}s
    on_breach: rollback
"""


@dataclass
class Visibility:
    """What this script's own polling of the rule's query saw."""

    first_above: float | None = None  # the instant (the query's `time`) of the first value above
    last_below: float | None = None  # the last instant before it with a value at or below
    above_before_fault: bool = False
    fell_back: bool = False  # below again after first_above (a flapping source)
    polls: int = 0
    errors: int = 0


@dataclass
class DetectionRun:
    """One fault, from its start to the rollback request (epoch seconds)."""

    fault: float
    visible: float
    scrape_visible: float | None
    rollback: float
    breached_since: float  # the daemon's first breaching evaluation (its tick time)
    tripped: float  # the tick that tripped the rule and decided the rollback
    polls: int
    notes: str = ""

    def detection(self) -> float:
        return self.rollback - self.visible


async def poll_rule(
    http: httpx.AsyncClient,
    prometheus: str,
    query: str,
    threshold: float,
    seen: Visibility,
    fault_at: Callable[[], float | None],
) -> None:
    """Query Prometheus every POLL_PERIOD at the present instant until cancelled."""
    url = f"{prometheus}/api/v1/query"
    due = time.time()
    while True:
        at = round(time.time(), 3)
        try:
            response = await http.post(url, data={"query": query, "time": f"{at:.3f}"})
            value = single_value(response.json())
        except (httpx.HTTPError, ValueError, BadAnswer):
            seen.errors += 1
        else:
            seen.polls += 1
            above = not math.isnan(value) and value > threshold
            start = fault_at()
            if above and (start is None or at < start):
                seen.above_before_fault = True
            elif above and seen.first_above is None:
                seen.first_above = at
            elif not above and seen.first_above is None:
                seen.last_below = at
            elif not above:
                seen.fell_back = True
        due += POLL_PERIOD
        await anyio.sleep(max(0.0, due - time.time()))


async def scrape_visibility(
    http: httpx.AsyncClient,
    prometheus: str,
    query: str,
    threshold: float,
    selector: str,
    since: float,
    until: float,
) -> float | None:
    """The first scrape timestamp in [since, until] at which the rule's query is above threshold.

    The cross-check from scrape timing: it evaluates the query at each stored sample's own
    timestamp, after the fact, so it leaves out the time Prometheus took to ingest the scrape
    and the polling period.
    """
    url = f"{prometheus}/api/v1/query"
    span = math.ceil(until - since) + 2
    answer = await http.post(url, data={"query": f"{selector}[{span}s]", "time": f"{until:.3f}"})
    result = answer.json()["data"]["result"]
    if not result:
        return None
    stamps = sorted(float(ts) for ts, _ in result[0]["values"] if since <= float(ts) <= until)
    for stamp in stamps:
        response = await http.post(url, data={"query": query, "time": f"{stamp:.3f}"})
        try:
            value = single_value(response.json())
        except BadAnswer:
            continue
        if not math.isnan(value) and value > threshold:
            return stamp
    return None


def rollback_request(
    requests: list[LoggedRequest], script: str, stable: str
) -> LoggedRequest | None:
    """The first deployment POST that puts ``stable`` at 100%."""
    suffix = f"/workers/scripts/{script}/deployments"
    for request in requests:
        if request.method != "POST" or not request.path.rstrip("/").endswith(suffix):
            continue
        body = request.body if isinstance(request.body, dict) else {}
        versions = body.get("versions") or []
        if any(v.get("version_id") == stable and v.get("percentage") == 100 for v in versions):
            return request
    return None


def healthy_canary(loop: ScriptLoop, canary: str) -> bool:
    """The canary is adopted at 50%, past its warm-up, and the rule judges it healthy."""
    state = loop.state
    track = state.rules.get(DETECT_RULE)
    return (
        state.phase is RolloutPhase.CANARY
        and state.canary == canary
        and state.canary_percent == DETECT_PERCENT
        and track is not None
        and track.status is RuleStatus.OK
    )


async def wait_until(predicate: Callable[[], bool], seconds: float, what: str) -> None:
    """Check ``predicate`` every 20 ms; raise TimeoutError(what) after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await anyio.sleep(0.02)


async def one_detection(
    sim: Simulator,
    loop: ScriptLoop,
    http: httpx.AsyncClient,
    prometheus: str,
    rule: Rule,
    rng: random.Random,
    interval: float,
    stable: str,
) -> DetectionRun:
    """Split to a new canary, let it settle, break it, and time the way to the rollback."""
    canary = sim.upload_version(DETECT_SCRIPT, Behaviour())
    sim.start_canary(DETECT_SCRIPT, canary, percent=DETECT_PERCENT)
    await wait_until(lambda: healthy_canary(loop, canary), 60, "canary never judged healthy")
    # Healthy for two more intervals, so the rule's window holds only the canary's healthy
    # traffic and nothing of the split's start.
    settled = time.monotonic() + 2 * interval
    await wait_until(
        lambda: time.monotonic() >= settled and healthy_canary(loop, canary),
        60,
        "canary did not stay healthy",
    )
    threshold = rule.threshold
    target = Target(DETECT_SCRIPT, "canary", canary, canary, stable)
    assert rule.query is not None
    query = render(rule.query, rule, target)
    seen = Visibility()
    fault: list[float] = []
    logged = len(sim.cloudflare.requests)
    async with anyio.create_task_group() as tg:
        tg.start_soon(
            poll_rule, http, prometheus, query, threshold, seen, lambda: fault[0] if fault else None
        )
        await anyio.sleep(0.5 + rng.uniform(0.0, max(interval, 1.0)))  # a random phase
        started = sim.schedule_fault(DETECT_SCRIPT, canary, http_5xx_rate=FAULT_5XX_RATE).start
        fault.append(started.timestamp())

        def rolled_back() -> bool:
            return (
                rollback_request(sim.cloudflare.requests[logged:], DETECT_SCRIPT, stable)
                is not None
            )

        await wait_until(rolled_back, 60, "no rollback within 60 s")
        await wait_until(lambda: seen.first_above is not None, 5, "never visible in Prometheus")
        tg.cancel_scope.cancel()
    request = rollback_request(sim.cloudflare.requests[logged:], DETECT_SCRIPT, stable)
    assert request is not None
    assert seen.first_above is not None
    await wait_until(lambda: loop.state.phase is RolloutPhase.ROLLED_BACK, 10, "not rolled back")
    decision = next(
        (d for d in reversed(loop.recent) if d.action == "rollback" and d.canary == canary), None
    )
    if decision is None or decision.rule != DETECT_RULE or decision.breached_since is None:
        raise RuntimeError(f"the rollback was not {DETECT_RULE} tripping: {decision}")
    selector = f'http_requests_total{{script="{DETECT_SCRIPT}",version="{canary}",code="200"}}'
    scraped = await scrape_visibility(
        http, prometheus, query, threshold, selector, fault[0], seen.first_above + 0.5
    )
    flags = []
    if seen.above_before_fault:
        flags.append("above threshold before the fault")
    if seen.fell_back:
        flags.append("fell below the threshold after becoming visible")
    if seen.errors:
        flags.append(f"{seen.errors} failed polls")
    if seen.last_below is not None and seen.first_above - seen.last_below > 2 * POLL_PERIOD:
        gap = (seen.first_above - seen.last_below) * 1000
        flags.append(f"visible within a {gap:.0f} ms poll gap")
    return DetectionRun(
        fault=fault[0],
        visible=seen.first_above,
        scrape_visible=scraped,
        rollback=request.at.timestamp(),
        breached_since=decision.breached_since.timestamp(),
        tripped=decision.t.timestamp(),
        polls=seen.polls,
        notes="; ".join(flags),
    )


async def detection(runs: int, interval: int, for_: int, window: int, seed: int) -> None:
    configure_logging("console", "error")
    sim = Simulator(seed=seed)
    sim.slack.limiter.limit = None
    sim.pagerduty.limiter.limit = None
    stable = sim.add_script(DETECT_SCRIPT, requests_per_minute=DETECT_RPM)
    rng = random.Random(seed)
    async with AsyncExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coalmine-bench-")))
        await stack.enter_async_context(sim.running())
        prometheus = await anyio.to_thread.run_sync(
            stack.enter_context, localprom.running_prometheus([sim.prometheus_metrics_url])
        )
        # Prometheus (started above, unpinned) keeps every core; this process takes one.
        core = pin_to_one_core()
        policy_file = folder / "policy.yaml"
        policy_file.write_text(detection_policy(interval, for_, window))
        settings = load_settings(
            {
                **sim.environment(),
                "COALMINE_PROMETHEUS_URL": prometheus,
                "COALMINE_POLICIES": str(policy_file),
                "COALMINE_STATE_URL": f"sqlite:///{folder / 'state.db'}",
                "COALMINE_LISTEN": "127.0.0.1:0",
                "COALMINE_DISCOVERY_INTERVAL": "1s",
            }
        )
        policies: list[Policy] = prepare(settings)
        rule = next(r for r in policies[0].rules if r.name == DETECT_RULE)
        http = await stack.enter_async_context(httpx.AsyncClient(timeout=5.0))
        budget = for_ + interval
        print_machine(f"this process pinned to core {core}" if core is not None else "not pinned")
        print(
            f"policy:  interval {interval}s, rule {DETECT_RULE} above {rule.threshold:g} "
            f"over a {window}s window for {for_}s (for + interval = {budget}s); warm-up 2s"
        )
        print(
            f"traffic: {DETECT_RPM / 60:g} req/s, canary at {DETECT_PERCENT}%, fault: "
            f"5xx rate {FAULT_5XX_RATE:g} from a random phase; Prometheus scrapes every 1s, "
            f"polled every {POLL_PERIOD * 1000:g} ms"
        )
        print()
        print(RUN_HEADER)
        results: list[DetectionRun] = []
        for i in range(runs):
            # A new daemon for every run, started at a random moment: a running daemon's ticks
            # keep one phase against Prometheus's scrapes (both every second), and that phase
            # decides how long a visible fault waits for the next tick.
            await anyio.sleep(rng.uniform(0.0, interval))
            async with open_daemon(settings, policies) as daemon, anyio.create_task_group() as tg:
                await tg.start(daemon.serve)
                loop = daemon.loops[DETECT_SCRIPT]
                run = await one_detection(sim, loop, http, prometheus, rule, rng, interval, stable)
                tg.cancel_scope.cancel()
            results.append(run)
            print(run_line(i + 1, run, budget), flush=True)
    print()
    print_detection_summary(results, budget)


RUN_HEADER = (
    "      fault→   visible→         |  visible→   breaching   trip tick   scrape→\n"
    "run  visible   rollback  ratio  |  breaching  → trip      → POST      poll     notes"
)


def run_line(number: int, run: DetectionRun, budget: float) -> str:
    """One run: the headline numbers, then where the detection delay went."""
    scrape = (
        f"{(run.visible - run.scrape_visible) * 1000:5.0f} ms"
        if run.scrape_visible is not None
        else "     n/a"
    )
    return (
        f"{number:3d}  {run.visible - run.fault:5.2f} s  {run.detection():6.2f} s  "
        f"{run.detection() / budget:5.2f}  |  {run.breached_since - run.visible:6.2f} s  "
        f"{run.tripped - run.breached_since:6.2f} s  "
        f"{(run.rollback - run.tripped) * 1000:6.0f} ms  "
        f"{scrape}  {run.notes}"
    )


def print_detection_summary(results: list[DetectionRun], budget: float) -> None:
    delays = [r.detection() for r in results]
    lags = [r.visible - r.fault for r in results]
    ends = [r.rollback - r.fault for r in results]
    ratios = [d / budget for d in delays]
    limit = budget + ALLOWANCE
    rows = [
        ("fault → visible in Prometheus", lags, "s", "-"),
        ("visible → rollback request", delays, "s", f"≤ {limit:g} s"),
        ("detection ÷ (for + interval)", ratios, "", f"≤ {limit / budget:.2f}"),
        ("fault → rollback request", ends, "s", "-"),
        (
            "  visible → first breaching tick",
            [r.breached_since - r.visible for r in results],
            "s",
            "-",
        ),
        (
            "  first breaching → tripping tick",
            [r.tripped - r.breached_since for r in results],
            "s",
            "-",
        ),
        ("  tripping tick → POST logged", [r.rollback - r.tripped for r in results], "s", "-"),
    ]
    print(f"{len(results)} runs; for + interval = {budget:g}s; target: ≤ {budget:g}s + 2s")
    print(f"{'measure':34}  {'median':>8}  {'min':>8}  {'max':>8}  target")
    for name, values, unit, target in rows:
        cells = [f"{v:.2f}{' ' + unit if unit else ''}" for v in _summary(values)]
        print(f"{name:34}  {cells[0]:>8}  {cells[1]:>8}  {cells[2]:>8}  {target}")
    worst = max(delays)
    verdict = "met" if worst <= limit else "MISSED"
    print(f"target {verdict}: worst detection {worst:.2f} s against {limit:g} s")
    strict = sum(1 for d in delays if d <= budget)
    print(f"within for + interval alone (ratio ≤ 1.0): {strict} of {len(delays)} runs")


def _summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# ---- footprint ------------------------------------------------------------------------------

LIFTED_WINDOW = 1.0  # seconds: the token bucket's period in the "lifted" run (shipped: 300)
BOOTSTRAP = (
    "import sys, coalmine.cloudflare.budgets as r; r.WINDOW = {window!r}; "
    "from coalmine.cli import main; sys.exit(main(['run']))"
)
# --profile: cProfile in the daemon, from SIGUSR1 (sent as the measured window opens) to exit
PROFILED = (
    "import signal, sys, cProfile, coalmine.cloudflare.budgets as r; r.WINDOW = {window!r}; "
    "from coalmine.cli import main; p = cProfile.Profile(); "
    "signal.signal(signal.SIGUSR1, lambda *a: p.enable()); "
    "c = main(['run']); p.disable(); p.dump_stats({path!r}); sys.exit(c)"
)
FOOTPRINT_TARGETS = {"cpu": 0.25, "rss_mb": 150.0, "p99": 0.25}
FLOOR_TARGET = 1.2  # issue 13: CPU per poll at most 1.2x the bare asyncio + httpx floor
SLICE = 10.0  # seconds: CPU share is also reported per slice of the run


def footprint_policy(scripts: list[str]) -> str:
    """Every script in one policy, polled every second, judged by two Cloudflare signals."""
    names = ", ".join(scripts)
    return f"""\
version: 1
name: bench-footprint
scripts: [{names}]
analysis: {{interval: 1s, warmup: 5s, inconclusive_page_after: 1h}}
steps:
  - {{weight: 10, hold: 1h}}
  - {{weight: 50, hold: 1h}}
  - {{weight: 100}}
rules:
  - {{name: exceptions, source: cloudflare, signal: errors_per_minute, window: 1m,
      above: 1000, for: 10s, on_breach: rollback}}
  - {{name: cpu_p99, source: cloudflare, signal: cpu_time_p99, window: 2m,
      above: 50, for: 10s, on_breach: hold}}
"""


@dataclass
class ProcSample:
    cpu_seconds: float
    rss_kb: int
    hwm_kb: int


def proc_sample(pid: int) -> ProcSample:
    """CPU time (user + system) from /proc/<pid>/stat; VmRSS and VmHWM from its status."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    status = Path(f"/proc/{pid}/status").read_text()
    memory = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            memory[key] = int(value.split()[0])
    return ProcSample(ticks / os.sysconf("SC_CLK_TCK"), memory["VmRSS"], memory["VmHWM"])


@dataclass
class Histogram:
    """One cumulative histogram: upper bounds to counts, and the count."""

    buckets: dict[float, float]
    count: float

    def minus(self, earlier: Histogram) -> Histogram:
        return Histogram(
            {le: n - earlier.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> tuple[float, float, float]:
        """As PromQL's histogram_quantile: (estimate, bucket low, bucket high)."""
        bounds = sorted(self.buckets)
        if self.count <= 0:
            return math.nan, math.nan, math.nan
        rank = q * self.count
        low, below = 0.0, 0.0
        for le in bounds:
            n = self.buckets[le]
            if n >= rank:
                if math.isinf(le):
                    return low, low, le
                share = (rank - below) / (n - below) if n > below else 1.0
                return low + (le - low) * share, low, le
            low, below = le, n
        return bounds[-1], bounds[-1], bounds[-1]


def histogram(exposition: str, name: str, labels: dict[str, str] | None = None) -> Histogram:
    buckets: dict[float, float] = {}
    count = 0.0
    for family in text_string_to_metric_families(exposition):
        if family.name != name:
            continue
        for sample in family.samples:
            own = {k: v for k, v in sample.labels.items() if k != "le"}
            if labels is not None and own != labels:
                continue
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
    return Histogram(buckets, count)


@dataclass
class Footprint:
    limiter: str
    scripts: int
    seconds: float
    cpu_seconds: float
    rss_mb_end: float
    rss_mb_max_sampled: float
    hwm_mb: float
    lateness: Histogram
    ticks: float  # polls that ran between the two scrapes of /metrics
    ticks_span: float  # seconds between those scrapes
    calls: Counter[str] = field(default_factory=Counter)
    call_latency: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    sim_cpu_seconds: float = 0.0
    adopted: int = 0
    adopt_seconds: float = 0.0
    log_lines: int = 0
    core: int | None = None
    cpu_slices: list[float] = field(default_factory=list)
    server_cpu_seconds: float = 0.0  # a database server's CPU over the same window (PostgreSQL)
    window: list[LoggedRequest] = field(default_factory=list)  # Cloudflare calls while measured
    floor: Floor | None = None  # bench/floor.py making the same requests, right after

    @property
    def cpu_share(self) -> float:
        return self.cpu_seconds / self.seconds

    @property
    def cpu_per_poll_ms(self) -> float:
        """CPU per second over polls per second (each over its own measured span)."""
        if not self.ticks:
            return math.nan
        return self.cpu_share / (self.ticks / self.ticks_span) * 1000


@dataclass
class Floor:
    """bare asyncio + httpx (bench/floor.py) making the daemon's requests of one poll per script
    every second, on the same core, measured over the same length of time."""

    cpu_seconds: float
    polls: float
    requests_per_poll: float  # the floor's
    daemon_requests_per_poll: float  # the daemon's, on average (the floor's, rounded)

    @property
    def cpu_per_poll_ms(self) -> float:
        return self.cpu_seconds / self.polls * 1000 if self.polls else math.nan


def call_kind(request: LoggedRequest) -> str:
    if request.path.endswith("/graphql"):
        return "graphql"
    if request.method == "POST":
        return "deploy"
    if request.path.endswith("/versions"):
        return "versions"
    return "deployments"


async def get_text(http: httpx.AsyncClient, url: str) -> str:
    response = await http.get(url, timeout=10.0)
    response.raise_for_status()
    return response.text


async def footprint(
    scripts: int,
    seconds: float,
    limiter: str,
    seed: int,
    state_url: str | None = None,
    server_cpu: Callable[[], float] | None = None,
    floor: bool = False,
    profile: str | None = None,
) -> Footprint:
    """One measured run of ``coalmine run`` watching ``scripts`` canaries every second, on a
    SQLite file of its own or on ``state_url``; ``server_cpu`` (CPU seconds so far of a
    database server) is sampled over the same window as the daemon."""
    sim = Simulator(seed=seed, rate_limits=RateLimits(requests=None, graphql=None))
    sim.slack.limiter.limit = None
    sim.pagerduty.limiter.limit = None
    names = [f"bench-{i:03d}" for i in range(scripts)]
    for name in names:
        sim.add_script(name, requests_per_minute=600)
    canaries = {name: sim.upload_version(name, Behaviour()) for name in names}
    with tempfile.TemporaryDirectory(prefix="coalmine-bench-") as tmp:
        folder = Path(tmp)
        (folder / "policy.yaml").write_text(footprint_policy(names))
        async with sim.running():
            for name in names:
                sim.start_canary(name, canaries[name], percent=10)
            listen = f"127.0.0.1:{localprom.free_port()}"
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
                **sim.environment(),
                "COALMINE_POLICIES": str(folder / "policy.yaml"),
                "COALMINE_STATE_URL": state_url or f"sqlite:///{folder / 'state.db'}",
                "COALMINE_LISTEN": listen,
                "COALMINE_CLOUDFLARE_RATE_LIMIT": "1200",
            }
            window = LIFTED_WINDOW if limiter == "lifted" else 300.0
            if profile is not None:
                path = str(Path(profile).resolve())
                command = [sys.executable, "-c", PROFILED.format(window=window, path=path)]
            elif limiter == "shipped":
                command = [sys.executable, "-m", "coalmine", "run"]
            else:
                command = [sys.executable, "-c", BOOTSTRAP.format(window=LIFTED_WINDOW)]
            log_path = folder / "run.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
                )
            try:
                with pinned_apart(process.pid) as core:
                    result = await measure(
                        process, sim, names, listen, seconds, limiter, server_cpu, profile
                    )
                    result.core = core
            finally:
                process.send_signal(signal.SIGTERM)
                code = await anyio.to_thread.run_sync(lambda: process.wait(timeout=60))
            text = log_path.read_text(errors="replace")
            result.log_lines = text.count("\n")
            if code != 0:
                print(f"  coalmine run exited with {code}; its log:\n{text[-3000:]}")
            if floor:
                result.floor = await run_floor(sim, names, result, folder, seconds)
    return result


def one_poll(
    sim: Simulator, names: list[str], result: Footprint
) -> tuple[dict[str, list[list[Any]]], float]:
    """Each script's requests of one poll as the daemon made them (its last ones in the
    measured window, as many as it made per poll on average), and that average."""
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(sim.cloudflare_api_url))
    per_script: dict[str, list[LoggedRequest]] = {name: [] for name in names}
    for request in result.window:
        where = request.path + " " + json.dumps(request.body)
        for name in names:
            if f"/scripts/{name}/" in where or f'"{name}"' in where:
                per_script[name].append(request)
                break
    per_poll = sum(len(r) for r in per_script.values()) / result.ticks if result.ticks else 1.0
    count = max(1, round(per_poll))
    polls = {
        name: [
            [
                r.method,
                origin + r.path + (f"?{urlencode(r.query, doseq=True)}" if r.query else ""),
                r.body,
            ]
            for r in requests[-count:]
        ]
        for name, requests in per_script.items()
    }
    return polls, per_poll


async def run_floor(
    sim: Simulator, names: list[str], result: Footprint, folder: Path, seconds: float
) -> Floor:
    """bench/floor.py on the daemon's core for ``seconds`` (after 5 s to start), measured as
    the daemon was: CPU from /proc, polls from the requests the simulator received."""
    polls, per_poll = one_poll(sim, names, result)
    config = folder / "floor.json"
    config.write_text(
        json.dumps({"seconds": seconds + 10.0, "token": sim.api_token, "polls": polls})
    )
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "floor.py"), str(config)],
        stdout=subprocess.DEVNULL,
        cwd=ROOT,
    )
    try:
        if result.core is not None:
            os.sched_setaffinity(process.pid, {result.core})
        await anyio.sleep(5.0)
        before, logged = proc_sample(process.pid), len(sim.cloudflare.requests)
        t0 = time.monotonic()
        await anyio.sleep(seconds)
        after, received = proc_sample(process.pid), len(sim.cloudflare.requests) - logged
        wall = time.monotonic() - t0
    finally:
        process.send_signal(signal.SIGTERM)
        await anyio.to_thread.run_sync(lambda: process.wait(timeout=60))
    sent = sum(len(r) for r in polls.values()) / len(polls)
    cpu = (after.cpu_seconds - before.cpu_seconds) * seconds / wall
    return Floor(cpu, received / sent * seconds / wall, sent, per_poll)


async def measure(
    process: subprocess.Popen[bytes],
    sim: Simulator,
    names: list[str],
    listen: str,
    seconds: float,
    limiter: str,
    server_cpu: Callable[[], float] | None = None,
    profile: str | None = None,
) -> Footprint:
    base = f"http://{listen}"
    started = time.monotonic()
    async with httpx.AsyncClient() as http:

        async def adopted() -> int:
            try:
                body = (await http.get(f"{base}/health", timeout=10.0)).json()
            except (httpx.HTTPError, ValueError):
                return 0
            return sum(1 for r in body.get("rollouts", []) if r["phase"] == "canary")

        count = 0
        with anyio.move_on_after(180):
            while (count := await adopted()) < len(names):
                if process.poll() is not None:
                    raise RuntimeError(f"coalmine run exited with {process.returncode}")
                await anyio.sleep(0.5)
        adopt_seconds = time.monotonic() - started
        await anyio.sleep(5.0)  # past every warm-up
        before_metrics = await get_text(http, f"{base}/metrics")
        scraped = time.monotonic()
        if profile is not None:
            process.send_signal(signal.SIGUSR1)  # the profile covers the measured window
        before = proc_sample(process.pid)
        server_before = server_cpu() if server_cpu else 0.0
        sim_before = time.process_time()
        logged = len(sim.cloudflare.requests)
        t0 = time.monotonic()
        peak_rss = before.rss_kb
        slices: list[float] = []  # CPU share of each SLICE seconds, to show the spread
        mark, mark_cpu = t0, before.cpu_seconds
        while (elapsed := time.monotonic() - t0) < seconds:
            await anyio.sleep(min(1.0, seconds - elapsed))
            sample = proc_sample(process.pid)
            peak_rss = max(peak_rss, sample.rss_kb)
            if (now := time.monotonic()) - mark >= SLICE:
                slices.append((sample.cpu_seconds - mark_cpu) / (now - mark))
                mark, mark_cpu = now, sample.cpu_seconds
        after = proc_sample(process.pid)
        server_after = server_cpu() if server_cpu else 0.0
        sim_after = time.process_time()
        wall = time.monotonic() - t0
        window = sim.cloudflare.requests[logged:]
        after_metrics = await get_text(http, f"{base}/metrics")
        span = time.monotonic() - scraped  # what the histogram's difference covers
    lateness = histogram(after_metrics, "coalmine_tick_lateness_seconds").minus(
        histogram(before_metrics, "coalmine_tick_lateness_seconds")
    )
    latency = {}
    for source in ("cloudflare", "cloudflare_analytics"):
        h = histogram(after_metrics, "coalmine_source_request_duration_seconds", {"source": source})
        h = h.minus(
            histogram(
                before_metrics, "coalmine_source_request_duration_seconds", {"source": source}
            )
        )
        if h.count > 0:
            latency[source] = h.quantile(0.5)
    return Footprint(
        limiter=limiter,
        scripts=len(names),
        seconds=wall,
        cpu_seconds=after.cpu_seconds - before.cpu_seconds,
        rss_mb_end=after.rss_kb / 1024,
        rss_mb_max_sampled=peak_rss / 1024,
        hwm_mb=after.hwm_kb / 1024,
        lateness=lateness,
        ticks=lateness.count,
        ticks_span=span,
        calls=Counter(call_kind(r) for r in window),
        call_latency=latency,
        sim_cpu_seconds=sim_after - sim_before,
        adopted=count,
        adopt_seconds=adopt_seconds,
        cpu_slices=slices,
        server_cpu_seconds=server_after - server_before,
        window=window,
    )


@contextmanager
def pinned_apart(pid: int) -> Iterator[int | None]:
    """Pin ``pid`` to the idlest core and this process (the simulator) to the others."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        yield None
        return
    if len(allowed) < 2:
        yield None
        return
    core = idlest(allowed)
    os.sched_setaffinity(pid, {core})
    os.sched_setaffinity(0, allowed - {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, allowed)


def print_footprint(results: list[Footprint]) -> None:
    cpu_t, rss_t, p99_t = (FOOTPRINT_TARGETS[k] for k in ("cpu", "rss_mb", "p99"))
    for r in results:
        p99, low, high = r.lateness.quantile(0.99)
        p50, _, _ = r.lateness.quantile(0.5)
        scheduled = r.scripts * r.ticks_span  # one poll per script per second
        calls = sum(r.calls.values())
        print(
            f"-- limiter {r.limiter}: {r.scripts} scripts at 1 s for {r.seconds:.0f} s, "
            f"daemon pinned to core {r.core}"
        )
        print(
            f"   adopted {r.adopted}/{r.scripts} canaries {r.adopt_seconds:.0f} s after start; "
            f"{r.log_lines} log lines in all"
        )
        print(
            f"   polls done: {r.ticks:,.0f} of {scheduled:,.0f} scheduled "
            f"({r.ticks / r.ticks_span:.1f}/s, {r.ticks / scheduled:.0%}); "
            f"Cloudflare calls {calls / r.seconds:.1f}/s "
            + ", ".join(f"{k} {v / r.seconds:.1f}/s" for k, v in sorted(r.calls.items()))
        )
        for source, (median, _, _) in r.call_latency.items():
            print(f"   median {source} call latency seen by the daemon: {median * 1000:.0f} ms")
        print(f"   simulator (this process): {r.sim_cpu_seconds / r.seconds:.0%} of a core")
        if r.cpu_slices:
            mid, least, most = _summary(r.cpu_slices)
            print(
                f"   daemon CPU per {SLICE:g} s slice: median {mid:.1%}, min {least:.1%}, "
                f"max {most:.1%} ({len(r.cpu_slices)} slices)"
            )
        rows = [
            (
                "CPU, share of one core",
                f"{r.cpu_share:.1%}",
                f"≤ {cpu_t:.0%}",
                r.cpu_share <= cpu_t,
            ),
            (
                "peak RSS (VmHWM)",
                f"{r.hwm_mb:.1f} MB",
                f"≤ {rss_t:.0f} MB",
                r.hwm_mb <= rss_t,
            ),
            (
                "RSS, most seen / at end",
                f"{r.rss_mb_max_sampled:.1f} / {r.rss_mb_end:.1f} MB",
                "-",
                None,
            ),
            (
                "poll lateness p99",
                f"{p99 * 1000:.0f} ms (bucket {low * 1000:g}–{high * 1000:g} ms)",
                f"≤ {p99_t * 1000:.0f} ms",
                p99 <= p99_t,
            ),
            ("poll lateness p50", f"{p50 * 1000:.0f} ms", "-", None),
        ]
        if r.floor is not None:
            ratio = r.cpu_per_poll_ms / r.floor.cpu_per_poll_ms
            rows += [
                ("CPU per poll", f"{r.cpu_per_poll_ms:.2f} ms", "-", None),
                (
                    "floor: bare httpx, per poll",
                    f"{r.floor.cpu_per_poll_ms:.2f} ms ({r.floor.requests_per_poll:g} req;"
                    f" coalmine {r.floor.daemon_requests_per_poll:.2f})",
                    "-",
                    None,
                ),
                ("coalmine ÷ floor", f"{ratio:.2f}×", f"≤ {FLOOR_TARGET}×", ratio <= FLOOR_TARGET),
            ]
        for name, value, target, ok in rows:
            verdict = "" if ok is None else ("ok" if ok else "MISSED")
            print(f"   {name:27} {value:>33}  {target:>9}  {verdict}")
        print("   (lateness: linear within the histogram's buckets; the first one is 0-10 ms)")
        if r.ticks < 0.95 * scheduled:
            print(
                f"   note: {1 - r.ticks / scheduled:.0%} of the scheduled polls never ran (missed"
                " ticks are coalesced), and the lateness histogram does not count them"
            )
        print()


def print_repeats(results: list[Footprint]) -> None:
    """The median, min and max over repeated runs of one setting."""
    rows = [
        ("CPU, share of one core", [r.cpu_share * 100 for r in results], "%"),
        ("peak RSS (VmHWM)", [r.hwm_mb for r in results], " MB"),
        ("poll lateness p99", [r.lateness.quantile(0.99)[0] * 1000 for r in results], " ms"),
        ("polls per second", [r.ticks / r.ticks_span for r in results], "/s"),
    ]
    print(f"-- limiter {results[0].limiter}, {len(results)} runs: median (min–max)")
    for name, values, unit in rows:
        mid, low, high = _summary(values)
        print(f"   {name:24} {mid:.1f}{unit} ({low:.1f}–{high:.1f})")
    print()


# ---- machine --------------------------------------------------------------------------------


def idle_ticks() -> dict[int, int]:
    idle = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            idle[int(name[3:])] = int(values[3])
    return idle


def idlest(allowed: set[int]) -> int:
    try:
        before = idle_ticks()
        time.sleep(0.25)
        after = idle_ticks()
    except OSError:
        return min(allowed)
    return max(sorted(allowed), key=lambda c: after.get(c, 0) - before.get(c, 0))


def pin_to_one_core() -> int | None:
    """Pin this process to the idlest core it may run on; None where that is not possible."""
    try:
        core = idlest(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        return None
    return core


def print_machine(pinning: str) -> None:
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({pinning}), load average {load()}")
    print(
        f"python:  {platform.python_implementation()} {platform.python_version()} "
        f"on {platform.system()} {platform.release()} ({platform.machine()})"
    )
    print(f"date:    {time.strftime('%Y-%m-%dT%H:%M:%S%z')}")
    print(f"code:    {code_version()}")


# ---- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--only", choices=("detection", "footprint"), help="run one part")
    parser.add_argument("--runs", type=int, default=12, help="detection: faults timed (12)")
    parser.add_argument("--interval", type=int, default=1, help="detection: seconds (1)")
    parser.add_argument(
        "--for", dest="for_", metavar="FOR", type=int, default=5, help="detection: seconds (5)"
    )
    parser.add_argument("--window", type=int, default=5, help="detection: seconds (5)")
    parser.add_argument("--scripts", type=int, default=100, help="footprint: scripts (100)")
    parser.add_argument("--seconds", type=float, default=120, help="footprint: seconds (120)")
    parser.add_argument(
        "--limiter",
        choices=("shipped", "lifted", "both"),
        default="both",
        help="footprint: the rate limiter as shipped, lifted, or one run of each (both)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="footprint: runs of each limiter setting (1)"
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="footprint: cProfile the daemon over the measured window into FILE"
        " (read it with python -m pstats FILE); its numbers then include the profiler's cost",
    )
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument(
        "--no-floor",
        action="store_true",
        help="footprint: skip the bare asyncio + httpx floor measured after each lifted run",
    )
    args = parser.parse_args(argv)
    if args.only in (None, "detection"):
        if localprom.binary() is None:
            print("detection needs Debian's prometheus (apt-get install prometheus); skipped")
        else:
            print("== detection: fault visible in Prometheus → rollback request")
            anyio.run(detection, args.runs, args.interval, args.for_, args.window, args.seed)
            print()
    if args.only in (None, "footprint"):
        print("== footprint: `coalmine run` watching many canaries every second")
        print_machine("the daemon pinned to one core, the simulator to the others")
        print(f"load average before: {load()}")
        print()
        limiters = ("shipped", "lifted") if args.limiter == "both" else (args.limiter,)
        for limiter in limiters:
            results = []
            for _ in range(args.repeats):
                result = anyio.run(
                    footprint,
                    args.scripts,
                    args.seconds,
                    limiter,
                    args.seed,
                    None,
                    None,
                    limiter == "lifted" and not args.no_floor,
                    args.profile,
                )
                print_footprint([result])
                results.append(result)
            if len(results) > 1:
                print_repeats(results)
        print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
