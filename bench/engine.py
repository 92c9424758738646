"""Engine benchmarks: one tick over a fleet of rollouts, and a day's replay of one rollout.

Run from the repository root::

    .venv/bin/python bench/engine.py              # the results table
    .venv/bin/python bench/engine.py --profile    # cProfile of the fleet tick, top 25 by tottime

This is a benchmark, not a test: it prints numbers and exits 0 whether or not a target is met.
Method: the process is pinned to one core (the idlest), every workload is built before the clock
starts and run once to warm up, then the workloads take turns for ``--repeats`` rounds, with a
``gc.collect()`` before each run (the collector stays on, as in the daemon). The table gives the
median, fastest and slowest wall-clock run (``time.perf_counter_ns``) and the median CPU time of
the thread: a wall-clock median well above it means another process shared the core.

a. ``tick``: 1,000 rollouts of the runbook, each adopted at 10% and ticked past its warm-up,
   with ages spread over 4-45 minutes so that about a third are past their first hold: with
   the deployment window open most of those have moved on to the next step already. One timed
   run is ``engine.tick`` once per rollout with a canary and a stable observation for every
   active rule: mostly healthy, some breaching, some NaN, None or errors.
   The same fleet is also built and timed outside the deployment windows (no target), where
   every rollout past its hold is blocked and looks up the next opening at every tick.
b. ``replay``: 24 h of 30 s ticks (2,880) for one rollout, from Tuesday 10:00
   America/Los_Angeles, with a canary and a stable observation for every rule at every tick.
   The rollout promotes within two hours and spends the rest of the day in its post-promotion
   watch. Timed twice: the engine alone over pre-built observations, and the full path from
   JSON Lines text through ``parse_records`` and ``replay`` to ``json.dumps`` of each decision.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import json
import os
import platform
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from coalmine.cli.replay import parse_records, replay
from coalmine.engine import Deployment, Engine, Observation, Options, RolloutPhase, RolloutState
from coalmine.engine.judge import CompiledRule
from coalmine.engine.model import Decision, Role, encode_float, format_time
from coalmine.policy import Policy
from coalmine.policyfile import load_policy
from machine import code_version, cpu_model, load

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "policies" / "runbook.yaml"
SCRIPT = "slidecraft-api"

# Tuesday 2026-03-03 10:00 America/Los_Angeles (PST, UTC-8): the deployment window is open.
TUESDAY_10AM = datetime.fromisoformat("2026-03-03T18:00:00+00:00")
FLEET_SIZE = 1_000
DAY = timedelta(hours=24)

TICK_TARGET_NS = 50_000_000
REPLAY_TARGET_NS = 1_000_000_000


# ---- observations ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mix:
    """How often an observation is something other than healthy (fractions of all)."""

    breaching: float = 0.0
    nan: float = 0.0
    none: float = 0.0
    error: float = 0.0
    few_samples: float = 0.0


class Metrics:
    """Plausible rule values around each rule's threshold, from a seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def healthy(self, rule: CompiledRule) -> float:
        scale = self.rng.uniform(0.05, 0.7) if rule.above else self.rng.uniform(1.3, 3.0)
        return rule.threshold * scale if rule.threshold else self.rng.uniform(0.0, 0.1)

    def breaching(self, rule: CompiledRule) -> float:
        scale = self.rng.uniform(1.2, 4.0) if rule.above else self.rng.uniform(0.1, 0.8)
        return rule.threshold * scale if rule.threshold else 1.0

    def samples(self, rule: CompiledRule, share: float) -> float | None:
        if rule.min_samples is None:
            return None
        return float(round(rule.min_samples * self.rng.uniform(3.0, 30.0) * share))

    def observe(
        self, rule: CompiledRule, role: Role, mix: Mix, *, breach: bool = False
    ) -> Observation:
        """One observation of ``rule`` for ``role``; ``breach`` forces a breaching value."""
        share = 1.0 if role == "canary" else 9.0
        samples = self.samples(rule, share)
        roll = self.rng.random()
        if breach or roll < mix.breaching:
            return Observation(rule.name, role, self.breaching(rule), samples)
        roll -= mix.breaching
        if roll < mix.nan:
            return Observation(rule.name, role, float("nan"), samples)
        roll -= mix.nan
        if roll < mix.none:
            return Observation(rule.name, role, None, samples)
        roll -= mix.none
        if roll < mix.error:
            return Observation(rule.name, role, None, error="timeout")
        roll -= mix.error
        if roll < mix.few_samples and rule.min_samples is not None:
            samples = float(self.rng.randrange(int(rule.min_samples)))
        return Observation(rule.name, role, self.healthy(rule), samples)


def both_roles(
    metrics: Metrics, rules: list[CompiledRule], mix: Mix, breach: frozenset[str] = frozenset()
) -> list[Observation]:
    """A canary and a stable observation of every rule; stable is always healthy."""
    out = []
    for rule in rules:
        out.append(metrics.observe(rule, "canary", mix, breach=rule.name in breach))
        out.append(metrics.observe(rule, "stable", Mix()))
    return out


# ---- a. one tick over a fleet ---------------------------------------------------------------


@dataclass
class Fleet:
    """Rollouts ready for their next tick at ``now``, with that tick's observations."""

    now: datetime
    work: list[tuple[RolloutState, list[Observation]]]


# The timed tick: mostly healthy, some breaching, some inconclusive.
TICK_MIX = Mix(breaching=0.02, nan=0.01, none=0.01, error=0.005, few_samples=0.01)


def build_fleet(engine: Engine, now: datetime, seed: int = 1) -> Fleet:
    """1,000 rollouts adopted 4-45 min before ``now`` and ticked for the 90 s before it.

    Rollouts past their hold have already advanced or recorded why not during those ticks, as
    in a running daemon. Ages whose hold would end at ``now - 60s`` or ``now - 30s`` are left
    out: an advance there would still be warming up at ``now``.
    """
    policy = engine.policy
    rules = [CompiledRule.of(r) for r in policy.rules if "canary" in r.phases]
    slow = [r.name for r in rules if r.for_ >= timedelta(minutes=5)]
    interval = policy.analysis.interval
    first_hold = policy.steps[0].hold
    metrics = Metrics(seed)
    rng = metrics.rng
    work = []
    for i in range(FLEET_SIZE):
        age = timedelta(seconds=rng.randrange(4 * 60, 45 * 60, 30))
        while first_hold < age < first_hold + 3 * interval:
            age = timedelta(seconds=rng.randrange(4 * 60, 45 * 60, 30))
        state = engine.new_state(SCRIPT)
        live = Deployment("v1", f"v2-{i}", policy.steps[0].weight)
        state = engine.observe_deployment(state, live, now - age).state
        # One rollout in ten carries a breach that started before the timed tick.
        carried = frozenset({rng.choice(slow)}) if slow and rng.random() < 0.1 else frozenset()
        for back in (3, 2, 1):
            observations = both_roles(metrics, rules, Mix(), carried)
            state = engine.tick(state, now - back * interval, observations).state
        assert state.phase is RolloutPhase.CANARY, state.phase
        assert state.warmup_until is not None
        assert state.warmup_until <= now
        keep = carried if rng.random() < 0.5 else frozenset()
        work.append((state, both_roles(metrics, rules, TICK_MIX, keep)))
    return Fleet(now, work)


def tick_fleet(engine: Engine, fleet: Fleet) -> int:
    """One tick of every rollout in the fleet; returns the number of decisions."""
    tick, now = engine.tick, fleet.now
    decisions = 0
    for state, observations in fleet.work:
        decisions += len(tick(state, now, observations).decisions)
    return decisions


# ---- b. a day's replay ----------------------------------------------------------------------


REPLAY_MIX = Mix(breaching=0.003, nan=0.005, none=0.005, error=0.002, few_samples=0.005)


@dataclass
class ReplayDay:
    """One rollout's day: the adoption, then every tick's observations, and the same as text."""

    start: datetime
    deployment: Deployment
    ticks: list[tuple[datetime, list[Observation]]]
    text: str

    @property
    def lines(self) -> int:
        return 1 + sum(len(obs) for _, obs in self.ticks)


def build_day(policy: Policy, start: datetime = TUESDAY_10AM, seed: int = 2) -> ReplayDay:
    """24 h of 30 s ticks with an observation of every rule for both versions at each tick.

    Breaching blips touch only rules with a ``for`` of 5 min or more, so a blip alone never
    trips; from hour 6 to 7 the database CPU is high for an hour, so ``post_db_cpu`` pages and
    then resolves.
    """
    rules = [CompiledRule.of(r) for r in policy.rules]
    blips = Mix(
        breaching=0.0,
        nan=REPLAY_MIX.nan,
        none=REPLAY_MIX.none,
        error=REPLAY_MIX.error,
        few_samples=REPLAY_MIX.few_samples,
    )
    metrics = Metrics(seed)
    interval = policy.analysis.interval
    deployment = Deployment("v1", "v2", policy.steps[0].weight)
    ticks = []
    elapsed = interval
    while elapsed <= DAY:
        t = start + elapsed
        incident = timedelta(hours=6) <= elapsed < timedelta(hours=7)
        observations = []
        for rule in rules:
            mix = REPLAY_MIX if rule.for_ >= timedelta(minutes=5) else blips
            breach = incident and rule.name == "post_db_cpu"
            observations.append(metrics.observe(rule, "canary", mix, breach=breach))
            observations.append(metrics.observe(rule, "stable", Mix()))
        ticks.append((t, observations))
        elapsed += interval
    return ReplayDay(start, deployment, ticks, _as_jsonl(start, deployment, ticks))


def _as_jsonl(
    start: datetime, deployment: Deployment, ticks: list[tuple[datetime, list[Observation]]]
) -> str:
    head = {
        "t": format_time(start),
        "deployment": {
            "canary": deployment.canary,
            "stable": deployment.stable,
            "canary_percent": deployment.canary_percent,
        },
    }
    lines = [json.dumps(head)]
    for t, observations in ticks:
        stamp = format_time(t)
        for obs in observations:
            line: dict[str, Any] = {"t": stamp, "rule": obs.rule, "version": obs.role}
            if obs.error is not None:
                line["error"] = obs.error
            else:
                line["value"] = None if obs.value is None else encode_float(obs.value)
            if obs.samples is not None:
                line["samples"] = obs.samples
            lines.append(json.dumps(line))
    return "\n".join(lines) + "\n"


def replay_engine_only(engine: Engine, day: ReplayDay) -> list[Decision]:
    """The engine over pre-built observations, the way ``replay`` drives it."""
    state = engine.new_state(SCRIPT)
    outcome = engine.observe_deployment(state, day.deployment, day.start)
    state, decisions = outcome.state, list(outcome.decisions)
    tick = engine.tick
    for t, observations in day.ticks:
        outcome = tick(state, t, observations)
        state = outcome.state
        decisions += outcome.decisions
    return decisions


def replay_full_path(engine: Engine, day: ReplayDay, rule_names: list[str]) -> str:
    """JSON Lines text to decisions JSON Lines text, through the replay module."""
    records = parse_records(day.text.splitlines(), "bench.jsonl", rule_names)
    return "".join(json.dumps(d.to_dict()) + "\n" for d in replay(engine, records, SCRIPT))


# ---- timing and reporting -------------------------------------------------------------------


def pin_to_one_core() -> int | None:
    """Pin this process to the idlest core it may run on; None where that is not possible."""
    try:
        allowed = os.sched_getaffinity(0)
        before = _idle_ticks()
        time.sleep(0.25)
        after = _idle_ticks()
        core = max(sorted(allowed), key=lambda c: after.get(c, 0) - before.get(c, 0))
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        return None
    return core


def _idle_ticks() -> dict[int, int]:
    """Idle time per core from /proc/stat (empty where there is none)."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return {}
    idle = {}
    for line in text.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            idle[int(name[3:])] = int(values[3])
    return idle


def timed_in_rounds(
    workloads: list[Callable[[], object]], repeats: int
) -> list[tuple[list[int], list[int]]]:
    """Each workload's wall-clock and CPU times of its runs in nanoseconds, after one warm-up.

    The workloads take turns, one run each per round, so that a slow spell of the machine (a
    busy neighbour on a shared host) lands on all of them rather than on whichever ran then.
    CPU time (this thread's) leaves out time spent waiting for the core, so a wall-clock time
    well above it means the core was shared.
    """
    for fn in workloads:
        fn()
    runs: list[tuple[list[int], list[int]]] = [([], []) for _ in workloads]
    for _ in range(repeats):
        for fn, (wall, cpu) in zip(workloads, runs, strict=True):
            gc.collect()
            started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
            fn()
            cpu.append(time.thread_time_ns() - started_cpu)
            wall.append(time.perf_counter_ns() - started)
    return runs


@dataclass
class Result:
    name: str
    runs: list[int]
    cpu_runs: list[int]
    target_ns: int | None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def verdict(self) -> str:
        if self.target_ns is None:
            return "-"
        return "ok" if self.median <= self.target_ns else "MISSED"


def _ms(ns: float) -> str:
    return f"{ns / 1e6:,.1f} ms"


def print_table(results: list[Result]) -> None:
    header = ("benchmark", "median", "min", "max", "cpu median", "target", "", "runs")
    rows = [
        (
            r.name,
            _ms(r.median),
            _ms(min(r.runs)),
            _ms(max(r.runs)),
            _ms(statistics.median(r.cpu_runs)),
            f"≤ {_ms(r.target_ns)}" if r.target_ns else "-",
            r.verdict,
            str(len(r.runs)),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())
    for r in results:
        if r.note:
            print(f"  {r.name}: {r.note}")


def print_machine(core: int | None) -> None:
    pinned = f"pinned to core {core}" if core is not None else "not pinned"
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores ({pinned}), load average {load()}")
    print(
        f"python:  {platform.python_implementation()} {platform.python_version()} "
        f"on {platform.system()} {platform.release()} ({platform.machine()})"
    )
    print(f"date:    {datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"code:    {code_version()}")


@dataclass
class Workload:
    name: str
    fn: Callable[[], object]
    target_ns: int | None
    note: str


def workloads(policy: Policy) -> list[Workload]:
    """Build every workload and check that the two replay paths agree."""
    engine = Engine(policy, Options())
    out = []
    window = TUESDAY_10AM + timedelta(hours=1)  # Tuesday 11:00 Pacific: inside the window
    night = TUESDAY_10AM + timedelta(hours=12)  # Tuesday 22:00 Pacific: outside every window
    for when, target, label in ((window, TICK_TARGET_NS, "open"), (night, None, "closed")):
        fleet = build_fleet(engine, when)
        rules = len(fleet.work[0][1]) // 2
        out.append(
            Workload(
                f"a. tick: {FLEET_SIZE:,} rollouts × {rules} rules, window {label}",
                functools.partial(tick_fleet, engine, fleet),
                target,
                f"{tick_fleet(engine, fleet)} decisions per run",
            )
        )
    day = build_day(policy)
    names = [r.name for r in policy.rules]
    alone = replay_engine_only(engine, day)
    full = replay_full_path(engine, day, names)
    expected = "".join(json.dumps(d.to_dict()) + "\n" for d in alone)
    assert full == expected, "the engine alone and the replay path disagree"
    actions = ", ".join(sorted({d.action for d in alone}))
    out.append(
        Workload(
            f"b. replay 24 h, engine only: {len(day.ticks):,} ticks",
            functools.partial(replay_engine_only, engine, day),
            REPLAY_TARGET_NS,
            f"{len(alone)} decisions ({actions})",
        )
    )
    out.append(
        Workload(
            f"b. replay 24 h, JSONL → decisions: {day.lines:,} lines",
            functools.partial(replay_full_path, engine, day, names),
            REPLAY_TARGET_NS,
            f"{len(day.text) / 1e6:.1f} MB in, {len(full) / 1e3:.1f} kB out",
        )
    )
    return out


def run_benchmarks(policy: Policy, repeats: int) -> list[Result]:
    built = workloads(policy)
    runs = timed_in_rounds([w.fn for w in built], repeats)
    return [
        Result(w.name, wall, cpu, w.target_ns, w.note)
        for w, (wall, cpu) in zip(built, runs, strict=True)
    ]


def profile(policy: Policy, which: str, top: int = 25) -> None:
    """cProfile one workload and print the top functions by own time."""
    engine = Engine(policy, Options())
    if which == "tick":
        fleet = build_fleet(engine, TUESDAY_10AM + timedelta(hours=1))
        tick_fleet(engine, fleet)

        def workload() -> object:
            return tick_fleet(engine, fleet)

        runs = 10
    else:
        day = build_day(policy)
        names = [r.name for r in policy.rules]

        def workload() -> object:
            return replay_full_path(engine, day, names)

        runs = 1
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(runs):
        workload()
    profiler.disable()
    print(f"cProfile of {which} ({runs} run{'s' if runs > 1 else ''}), top {top} by tottime:")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--policy", type=Path, default=RUNBOOK, help="default: the runbook")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each workload (15)")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="tick",
        choices=("tick", "replay"),
        help="profile a workload (default: tick) instead of timing",
    )
    args = parser.parse_args(argv)
    core = pin_to_one_core()
    policy = load_policy(args.policy)
    if args.profile:
        profile(policy, args.profile)
        return 0
    print("coalmine engine benchmark")
    print_machine(core)
    shown = args.policy.relative_to(ROOT) if args.policy.is_relative_to(ROOT) else args.policy
    print(f"policy:  {shown}")
    print()
    print_table(run_benchmarks(policy, args.repeats))
    print(f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
