"""A simulated Worker on a virtual clock: the engine in a closed loop, no network.

Each tick the simulator measures both versions at the split the engine last chose, hands the
observations to the engine, and applies its traffic decisions at once, the way the daemon will
against Cloudflare. The records it writes replay to the same decisions, so the simulator also
produces replay files for tests and backtests. ``coalmine demo`` runs two canaries through it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from coalmine.cli.replay import Record
from coalmine.engine import Command, Decision, Deployment, Engine, Observation, RolloutPhase
from coalmine.engine.judge import CompiledRule
from coalmine.policy import Policy, Rule

DEFAULT_START = datetime.fromisoformat("2026-03-03T18:00:00+00:00")


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How one version behaves: what its metrics would show on a large sample."""

    error_rate: float = 0.002
    p50: float = 0.08
    p99: float = 0.35
    exceptions_per_minute: float = 0.5
    no_data: bool = False  # the source answers, but with no series (NaN / empty)


Script = Callable[[timedelta, int], Behaviour]
"""A version's behaviour by time since the canary started and its traffic percent."""


def steady(behaviour: Behaviour) -> Script:
    """The same behaviour throughout."""
    return lambda _elapsed, _percent: behaviour


@dataclass
class Simulation:
    """Inputs of one simulated canary."""

    policy: Policy
    canary: Script
    stable: Script = field(default_factory=lambda: steady(Behaviour()))
    requests_per_second: float = 50.0
    start: datetime = DEFAULT_START
    duration: timedelta = timedelta(minutes=30)
    seed: int = 1
    commands: dict[timedelta, Command] = field(default_factory=dict)
    script: str | None = None


def metric_of(rule: Rule) -> str:
    """Which simulated metric a rule reads, guessed from its signal or query."""
    if rule.source == "cloudflare":
        return {"errors_per_minute": "exceptions", "error_ratio": "error_rate"}.get(
            rule.signal or "", "exceptions"
        )
    query = rule.query or rule.events or ""
    if "histogram_quantile(0.99" in query:
        return "p99"
    if "histogram_quantile(0.5" in query:
        return "p50"
    return "error_rate"


def run(sim: Simulation) -> tuple[list[Record], list[Decision]]:
    """Play one canary to its end (or ``duration``); return the replay records and decisions."""
    policy = sim.policy
    engine = Engine(policy)
    script = sim.script or policy.scripts[0]
    rng = random.Random(sim.seed)
    rules = [(rule, CompiledRule.of(rule), metric_of(rule)) for rule in policy.rules]
    interval = policy.analysis.interval
    state = engine.new_state(script)
    records: list[Record] = []
    decisions: list[Decision] = []
    live = Deployment("v1", "v2", policy.steps[0].weight)
    records.append(Record(sim.start, len(records) + 1, deployment=live))
    outcome = engine.observe_deployment(state, live, sim.start)
    state, line = outcome.state, 0
    decisions += outcome.decisions
    elapsed = timedelta(0)
    while elapsed < sim.duration and state.phase not in (
        RolloutPhase.IDLE,
        RolloutPhase.ROLLED_BACK,
    ):
        elapsed += interval
        now = sim.start + elapsed
        for at in sorted(c for c in sim.commands if elapsed - interval < c <= elapsed):
            command = sim.commands[at]
            records.append(Record(now, line, command=command))
            outcome = engine.command(state, command, now)
            state = outcome.state
            decisions += outcome.decisions
        percent = state.canary_percent if state.phase is not RolloutPhase.PROMOTED else 100
        observations = list(_measure(sim, rules, rng, elapsed, percent))
        records += [Record(now, line, observation=o) for o in observations]
        outcome = engine.tick(state, now, observations)
        state = outcome.state
        decisions += outcome.decisions
    return records, decisions


def _measure(
    sim: Simulation,
    rules: list[tuple[Rule, CompiledRule, str]],
    rng: random.Random,
    elapsed: timedelta,
    percent: int,
) -> Iterator[Observation]:
    for role, share, script in (
        ("canary", percent / 100, sim.canary),
        ("stable", 1 - percent / 100, sim.stable),
    ):
        behaviour = script(elapsed, percent)
        for rule, compiled, metric in rules:
            seconds = compiled.window.total_seconds()
            requests = _poisson(rng, sim.requests_per_second * share * seconds)
            if rule.compare is not None:  # counts: errors (or exceptions) among the requests
                yield _counts(rule, role, metric, behaviour, requests, seconds, rng)
                continue
            if behaviour.no_data or requests == 0:
                yield Observation(rule.name, role, math.nan, float(requests))  # type: ignore[arg-type]
                continue
            yield Observation(
                rule.name,
                role,  # type: ignore[arg-type]
                _value(metric, behaviour, requests, seconds, rng),
                float(requests),
            )


def _counts(
    rule: Rule,
    role: str,
    metric: str,
    b: Behaviour,
    requests: int,
    seconds: float,
    rng: random.Random,
) -> Observation:
    if b.no_data:
        return Observation(rule.name, role, None, None)  # type: ignore[arg-type]
    if metric == "exceptions":
        events = min(requests, _poisson(rng, b.exceptions_per_minute * seconds / 60))
    else:
        events = sum(1 for _ in range(requests) if rng.random() < b.error_rate)
    rate = events / requests if requests else None
    return Observation(rule.name, role, rate, float(requests), events=float(events))  # type: ignore[arg-type]


def _value(metric: str, b: Behaviour, requests: int, seconds: float, rng: random.Random) -> float:
    if metric == "error_rate":
        errors = sum(1 for _ in range(requests) if rng.random() < b.error_rate)
        return errors / requests
    if metric == "exceptions":
        return _poisson(rng, b.exceptions_per_minute * seconds / 60) * 60 / seconds
    base = b.p99 if metric == "p99" else b.p50
    return round(base * rng.lognormvariate(0, 0.08), 4)


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1
