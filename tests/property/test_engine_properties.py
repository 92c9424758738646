"""Engine properties over generated rollouts: gates, trips, rollbacks, windows, determinism, state.

Each property drives the pure engine through a generated sequence of inputs (live deployments,
operator commands, ticks of observations) and checks every step against an oracle that
re-derives DESIGN.md's rule semantics from the raw inputs, never from the engine's rule tracks.
The oracle's only use of the engine's output is to find traffic changes (a decision carrying
``canary_percent``, a ``start`` or ``complete``, leaving a stand-down), which start a warm-up and
clear every breach.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from itertools import product
from typing import Literal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from coalmine.engine import (
    TRANSITIONS,
    Command,
    Decision,
    Deployment,
    Engine,
    Event,
    Observation,
    Options,
    Outcome,
    RolloutPhase,
    RolloutState,
    transition,
)
from coalmine.engine.core import DRY_RUN
from coalmine.engine.model import CommandKind, Role
from coalmine.errors import IllegalTransition
from coalmine.policy import DAYS, DeploymentWindows, Policy, Rule
from coalmine.policyfile import load_policy
from tests.support import ROOT, T0, make_policy

P = RolloutPhase
PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],  # no slow "explain"
)
ADVANCING = ("set_traffic", "promote")

# ---- inputs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tick:
    """One evaluation with this tick's observations."""

    t: datetime
    observations: tuple[Observation, ...]

    def __repr__(self) -> str:
        obs = ", ".join(
            f"{o.rule}/{o.role}={o.value!r}"
            + (f"[{o.samples!r}]" if o.samples is not None else "")
            + (f"!{o.error}" if o.error else "")
            for o in self.observations
        )
        return f"{_clock(self.t)} tick({obs})"


@dataclass(frozen=True)
class Live:
    """The live deployment as read; None is what coalmine last set (never drift)."""

    t: datetime
    deployment: Deployment | None

    def __repr__(self) -> str:
        live = self.deployment.describe() if self.deployment else "as expected"
        return f"{_clock(self.t)} live({live})"


@dataclass(frozen=True)
class Operator:
    """An operator's command."""

    t: datetime
    command: Command

    def __repr__(self) -> str:
        version = f" {self.command.version}" if self.command.version else ""
        return f"{_clock(self.t)} {self.command.kind}{version}"


Input = Tick | Live | Operator


@dataclass(frozen=True)
class Scenario:
    """A policy, the operator switches, and the inputs in time order."""

    label: str
    policy: Policy
    options: Options
    inputs: tuple[Input, ...]

    def __repr__(self) -> str:
        o = self.options
        switches = f"auto_rollback={o.auto_rollback} auto_promote={o.auto_promote}"
        lines = "\n  ".join(repr(i) for i in self.inputs)
        return f"Scenario({self.label}; {switches} dry_run={o.dry_run}\n  {lines})"


def _clock(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- policies -----------------------------------------------------------------------------

_RUNBOOK = load_policy(ROOT / "policies" / "runbook.yaml")
_FAST = load_policy(ROOT / "policies" / "examples" / "fast.yaml")
# The oracle models absolute rules; compare rules have their own tests (tests/unit/test_compare.py,
# test_change_detection.py). Stable observations here never breach, so `shared_incident: hold`
# never engages (tests/unit/test_shared_incident.py covers it).
RUNBOOK = _RUNBOOK.model_copy(update={"rules": [r for r in _RUNBOOK.rules if r.compare is None]})
FAST = _FAST.model_copy(update={"rules": [r for r in _FAST.rules if r.compare is None]})

_RULE_SHAPES = (
    "{name: r0, source: prometheus, query: q, samples: n, min_samples: 100, above: 0.01",
    "{name: r1, source: cloudflare, signal: wall_time_p99, below: 5",
    "{name: r2, source: cloudflare, signal: errors_per_minute, above: 30",
    "{name: r3, source: grafana, query: q, samples: n, min_samples: 0, above: -2.5",
)
_STEPS = ((10, 50, 100), (1, 100), (5, 20, 60, 100))
_PHASES = ("[canary]", "[canary]", "[post_promotion]", "[canary, post_promotion]")
_ON_BREACH = ("rollback", "hold", "page", "warn")
_SHORT = ("0s", "10s", "30s", "1m")

WINDOWS = {
    "weekdays": '[{days: [tue, wed, thu], from: "10:00", to: "16:00"}]',
    "dst_small_hours": '[{days: [sun], from: "01:30", to: "03:00"}]',
    "overnight": (
        '[{days: [sat], from: "22:00", to: "02:30"}, {days: [sun], from: "12:00", to: "24:00"}]'
    ),
    "two_minutes_daily": (
        '[{days: [mon, tue, wed, thu, fri, sat, sun], from: "01:59", to: "02:01"}]'
    ),
}


@lru_cache(maxsize=512)
def _inline(
    steps: tuple[int, ...],
    hold: str,
    warmup: str,
    watch: str,
    rules: tuple[tuple[str, str, str], ...],
    window: str | None,
) -> Policy:
    lines = [
        "version: 1",
        "name: inline",
        "scripts: [svc]",
        f"analysis: {{interval: 10s, warmup: {warmup}, inconclusive_page_after: 1m}}",
        "steps:",
        *(f"  - {{weight: {w}, hold: {hold}}}" for w in steps[:-1]),
        "  - {weight: 100}",
        f"post_promotion: {{watch: {watch}}}",
    ]
    if window is not None:
        lines += [
            "deployment_windows:",
            "  timezone: America/Los_Angeles",
            f"  allow: {WINDOWS[window]}",
        ]
    lines.append("rules:")
    for shape, (on_breach, for_, phases) in zip(_RULE_SHAPES, rules, strict=False):
        lines.append(f"  - {shape}, for: {for_}, on_breach: {on_breach}, phases: {phases}}}")
    return make_policy("\n".join(lines) + "\n")


@st.composite
def inline_policies(draw: st.DrawFn, windows: Sequence[str | None] = (None,)) -> tuple[str, Policy]:
    """Small inline policies: steps, hold, warm-up, watch, rules' for/on_breach/phases vary."""
    steps = draw(st.sampled_from(_STEPS))
    hold = draw(st.sampled_from(_SHORT))
    warmup = draw(st.sampled_from(_SHORT[:3]))
    watch = draw(st.sampled_from(("30s", "0s", "2m")))
    count = draw(st.integers(1, len(_RULE_SHAPES)))
    rules = tuple(
        (
            draw(st.sampled_from(_ON_BREACH)),
            draw(st.sampled_from(_SHORT)),
            draw(st.sampled_from(_PHASES)),
        )
        for _ in range(count)
    )
    window = draw(st.sampled_from(windows))
    label = f"inline steps={steps} hold={hold} warmup={warmup} watch={watch} window={window} "
    label += "rules=" + ", ".join(f"r{i}:{b}/for {f}/{p}" for i, (b, f, p) in enumerate(rules))
    return label, _inline(steps, hold, warmup, watch, rules, window)


ANY_POLICY = st.one_of(
    inline_policies(),
    st.sampled_from([("runbook.yaml", RUNBOOK), ("fast.yaml", FAST)]),
)
WINDOWED_POLICY = st.one_of(  # mostly inline: their short holds reach the windows' edges
    *[inline_policies(windows=(name,)) for name in WINDOWS],
    st.just(("runbook.yaml", RUNBOOK)),
)

# ---- scenarios ----------------------------------------------------------------------------

# How a scenario's observations lean: each observation's kind is drawn from one of these.
PROFILES = {
    "clean": ("ok",) * 30 + ("equal", "breach", "nan", "missing"),
    "healthy": ("ok",) * 10 + ("equal", "breach", "none", "nan", "missing", "few"),
    "mixed": (
        *("ok", "ok", "breach", "breach", "equal", "none", "nan"),
        *("inf", "-inf", "error", "missing", "few"),
    ),
    "sick": ("breach",) * 6 + ("ok", "equal", "none", "error", "missing", "few"),
}
LIVE = (
    *(Deployment.of("v1", "v2", p) for p in (1, 5, 10, 25, 50, 75, 99)),
    Deployment("v1"),
    Deployment("v2"),
    Deployment.of("v1", "v3", 10),
    Deployment.of("v2", "v3", 50),
    Deployment.of("v2", "v1", 10),
)
FIRST_LIVE = st.sampled_from((Deployment.of("v1", "v2", 10), Deployment("v1"), LIVE[4]))
_COMMAND_KINDS: tuple[CommandKind, ...] = ("pause", "pause", "resume", "resume", "rollback")
COMMANDS = st.sampled_from(
    (
        *(Command(kind) for kind in _COMMAND_KINDS),
        *(Command("promote"),) * 3,
        Command("start", "v2"),
        Command("start", "v3"),
    )
)
INPUT_KINDS = st.sampled_from(("tick",) * 8 + ("echo", "echo", "live") + ("command",) * 3)
QUIET_INPUT_KINDS = st.sampled_from(("tick",) * 12 + ("echo", "live", "command"))
PROMOTE_INPUT_KINDS = st.sampled_from(("tick",) * 4 + ("promote", "promote", "echo", "command"))
OPTIONS = st.builds(
    Options,
    auto_rollback=st.sampled_from((True, True, False)),
    auto_promote=st.sampled_from((True, True, True, False)),
    dry_run=st.sampled_from((False, False, True)),
)
PROMOTING_OPTIONS = st.builds(
    Options, auto_rollback=st.booleans(), auto_promote=st.just(True), dry_run=st.booleans()
)


def _gaps(policy: Policy, extra: Sequence[timedelta], longest: timedelta | None) -> list[timedelta]:
    """Time steps, mostly the poll interval, some on the policy's own boundaries."""
    a = policy.analysis
    others = {
        timedelta(0),
        timedelta(seconds=1),
        2 * a.interval,
        3 * a.interval,
        a.warmup,
        a.inconclusive_page_after,
        policy.post_promotion.watch,
        *(s.hold for s in policy.steps),
        *(r.for_ for r in policy.rules),
        *extra,
    }
    others = {gap for gap in others if longest is None or gap <= longest}
    return [a.interval] * 3 + sorted(others - {a.interval})


Reading = tuple[float | None, float | None, str | None]  # value, samples, error


def _readings(rule: Rule, kind: str) -> list[Reading]:
    """Four canary readings of one kind for one rule (equal counts keep the profile's weights)."""
    threshold = rule.threshold
    worse = 1.0 if rule.above is not None else -1.0
    deltas = [max(abs(threshold), 1.0) * f for f in (0.5, 1e-3, 2.0, 1e6)]
    minimum = rule.min_samples
    enough = max(minimum or 0.0, 1.0) * 10
    samples = (enough, minimum if minimum else None, enough, 1e12)
    fixed: dict[str, float | None] = {
        "equal": threshold,
        "none": None,
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
    }
    if kind in fixed:
        return [(fixed[kind], n, None) for n in samples]
    ok = [threshold - worse * d for d in deltas]
    bad = [threshold + worse * d for d in deltas]
    if kind == "ok":
        return [(v, n, None) for v, n in zip(ok, samples, strict=True)]
    if kind == "breach":
        return [(v, n, None) for v, n in zip(bad, samples, strict=True)]
    if kind == "error":
        return [
            (None, None, "timeout"),
            (bad[0], enough, "timeout"),
            (ok[0], enough, "HTTP 500"),
            (None, enough, "malformed response"),
        ]
    assert kind == "few"
    few = (None, math.nan, 0.0, minimum - 1 if minimum else None)
    return [(v, n, None) for v, n in zip((bad[0], ok[0], bad[2], ok[1]), few, strict=True)]


def _rule_strategy(rule: Rule, kinds: Sequence[str]) -> st.SearchStrategy[tuple[Observation, ...]]:
    """One tick's observations of one rule: canary (missing, one, or a duplicate whose last
    wins) and sometimes stable context."""

    def obs(role: Role, reading: Reading) -> Observation:
        return Observation(rule.name, role, *reading)

    canary: list[tuple[Observation, ...]] = []
    for kind in kinds:
        if kind == "missing":
            canary += [()] * 4
            continue
        readings = _readings(rule, kind)
        canary += [(obs("canary", r),) for r in readings[:3]]
        canary.append((obs("canary", _readings(rule, "breach")[1]), obs("canary", readings[3])))
    stable = [(), (), *((obs("stable", r),) for r in _readings(rule, "ok")[:2])]
    return st.tuples(st.sampled_from(canary), st.sampled_from(stable)).map(
        lambda pair: pair[0] + pair[1]
    )


_TICKS: dict[tuple[int, str], tuple[Policy, st.SearchStrategy[tuple[Observation, ...]]]] = {}


def _ticks(policy: Policy, profile: str) -> st.SearchStrategy[tuple[Observation, ...]]:
    """One tick's observations of every rule of the policy, built once per policy and profile."""
    cached = _TICKS.get((id(policy), profile))
    if cached is None or cached[0] is not policy:
        per_rule = [_rule_strategy(rule, PROFILES[profile]) for rule in policy.rules]
        strategy = st.tuples(*per_rule).map(lambda parts: tuple(o for p in parts for o in p))
        cached = _TICKS[(id(policy), profile)] = (policy, strategy)
    return cached[1]


@st.composite
def scenarios(
    draw: st.DrawFn,
    policies: st.SearchStrategy[tuple[str, Policy]] = ANY_POLICY,
    *,
    starts: Callable[[Policy], st.SearchStrategy[datetime]] = lambda _: st.just(T0),
    extra_gaps: Sequence[timedelta] = (),
    longest_gap: timedelta | None = None,
    profiles: Sequence[str] = tuple(PROFILES),
    options: st.SearchStrategy[Options] = OPTIONS,
    input_kinds: st.SearchStrategy[str] = INPUT_KINDS,
    max_inputs: int = 30,
) -> Scenario:
    """A policy, options, and a time-ordered sequence of deployments, commands and ticks."""
    label, policy = draw(policies)
    chosen = draw(options)
    profile = draw(st.sampled_from(profiles))
    ticks = _ticks(policy, profile)
    gaps = st.sampled_from(_gaps(policy, extra_gaps, longest_gap))
    t = draw(starts(policy))
    inputs: list[Input] = [Live(t, draw(FIRST_LIVE))]
    for _ in range(draw(st.integers(1, max_inputs))):
        t += draw(gaps)
        kind = draw(input_kinds)
        if kind == "tick":
            inputs.append(Tick(t, draw(ticks)))
        elif kind == "echo":
            inputs.append(Live(t, None))
        elif kind == "promote":
            inputs.append(Operator(t, Command("promote")))
        elif kind == "live":
            inputs.append(Live(t, draw(st.sampled_from(LIVE))))
        else:
            inputs.append(Operator(t, draw(COMMANDS)))
    return Scenario(f"{label}; {profile}", policy, chosen, tuple(inputs))


# ---- running ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One input, the state before it, and what the engine made of it."""

    input: Input
    before: RolloutState
    after: RolloutState
    decisions: list[Decision]


def apply(engine: Engine, state: RolloutState, given_input: Input) -> Outcome:
    """Hand one input to the engine."""
    if isinstance(given_input, Tick):
        return engine.tick(state, given_input.t, given_input.observations)
    if isinstance(given_input, Operator):
        return engine.command(state, given_input.command, given_input.t)
    live = given_input.deployment or state.expected or Deployment("v1")
    return engine.observe_deployment(state, live, given_input.t)


def run(engine: Engine, inputs: Sequence[Input], state: RolloutState | None = None) -> list[Step]:
    """Every input in order, from ``state`` (default: a new script's)."""
    state = state or engine.new_state(engine.policy.scripts[0])
    trace = []
    for given_input in inputs:
        outcome = apply(engine, state, given_input)
        trace.append(Step(given_input, state, outcome.state, outcome.decisions))
        state = outcome.state
    return trace


def engine_for(scenario: Scenario) -> Engine:
    """A fresh engine for the scenario's policy and switches."""
    return Engine(scenario.policy, scenario.options)


def state_json(state: RolloutState) -> str:
    """The state as strict JSON text (fails on NaN or ±Inf)."""
    return json.dumps(state.to_json(), sort_keys=True, allow_nan=False)


def round_trip(state: RolloutState) -> RolloutState:
    """The state through to_json, strict json.dumps, json.loads and from_json."""
    return RolloutState.from_json(json.loads(state_json(state)))


def described(decisions: Sequence[Decision]) -> list[str]:
    """Decisions compared field by field (repr: NaN equals NaN, times keep their zone)."""
    return [repr(d) for d in decisions]


# ---- the oracle ---------------------------------------------------------------------------

Status = Literal["inconclusive", "warmup", "ok", "breaching"]


def _conclusive(rule: Rule, obs: Observation | None) -> bool:
    if obs is None or obs.error is not None or obs.value is None or not math.isfinite(obs.value):
        return False
    if rule.min_samples is None:
        return True
    return obs.samples is not None and obs.samples >= rule.min_samples  # NaN is never enough


def _breaching(rule: Rule, value: float) -> bool:
    return value > rule.above if rule.above is not None else value < rule.threshold


def _changes_traffic(step: Step) -> bool:
    if step.before.phase is P.STOOD_DOWN and step.after.phase is not P.STOOD_DOWN:
        return True
    return any(
        d.canary_percent is not None or d.action in ("start", "complete") for d in step.decisions
    )


class Oracle:
    """DESIGN.md's rule semantics, recomputed from the inputs of a trace."""

    def __init__(self, policy: Policy, trace: Sequence[Step]) -> None:
        self.policy = policy
        self.trace = trace
        self.rules = {r.name: r for r in policy.rules}
        self.segment: list[int] = []  # per step: the index of the last traffic change before it
        last = -1
        for k, step in enumerate(trace):
            self.segment.append(last)
            if _changes_traffic(step):
                last = k

    def changed_at(self, k: int) -> datetime | None:
        """When traffic last changed before step k (None: no rollout yet)."""
        start = self.segment[k]
        return None if start < 0 else self.trace[start].input.t

    def status(self, k: int, rule: Rule) -> Status:
        """The rule's evaluation at tick k, judged from its (last) canary observation."""
        tick = self.trace[k].input
        assert isinstance(tick, Tick)
        obs = {o.rule: o for o in tick.observations if o.role == "canary"}.get(rule.name)
        if not _conclusive(rule, obs):
            return "inconclusive"
        assert obs is not None and obs.value is not None
        changed = self.changed_at(k)
        if changed is not None and tick.t < changed + self.policy.analysis.warmup:
            return "warmup"
        return "breaching" if _breaching(rule, obs.value) else "ok"

    def latest(self, k: int, rule: Rule) -> Status | None:
        """The rule's latest evaluation before step k in this rollout step (None: not yet)."""
        for j in range(k - 1, self.segment[k], -1):
            if isinstance(self.trace[j].input, Tick):
                return self.status(j, rule)
        return None

    def breached_since(self, k: int, rule: Rule) -> datetime | None:
        """The first breaching evaluation not since cleared, as of tick k."""
        since = None
        for j in range(self.segment[k] + 1, k + 1):
            step = self.trace[j]
            if isinstance(step.input, Tick):
                status = self.status(j, rule)
                if status == "breaching":
                    since = since or step.input.t
                elif status == "ok":
                    since = None
        return since

    def tripped(self, k: int, rule: Rule) -> bool:
        """Whether the rule trips at tick k: breaching now, and for at least its ``for``."""
        since = self.breached_since(k, rule)
        now = self.trace[k].input.t
        return (
            self.status(k, rule) == "breaching" and since is not None and now >= since + rule.for_
        )

    def timeline(self, k: int) -> str:
        """The steps of the rollout segment up to k, for failure messages."""
        lines = []
        for j in range(max(self.segment[k], 0), k + 1):
            step = self.trace[j]
            actions = ", ".join(
                f"{d.action}({d.rule or d.canary_percent or ''})" for d in step.decisions
            )
            lines.append(f"  [{j}] {step.input!r} -> {step.after.phase.value}: {actions}")
        return "\n".join(lines)


def _rule_active(rule: Rule, state: RolloutState) -> bool:
    phase = state.stood_down_from if state.phase is P.STOOD_DOWN else state.phase
    if phase in (P.CANARY, P.PAUSED):
        return "canary" in rule.phases
    return phase is P.PROMOTED and "post_promotion" in rule.phases


def inside_windows(windows: DeploymentWindows | None, t: datetime) -> bool:
    """DESIGN.md's windows: local wall clock, ``from`` inclusive, ``to`` exclusive."""
    if windows is None:
        return True
    local = t.astimezone(ZoneInfo(windows.timezone))
    seconds = local.hour * 3600 + local.minute * 60 + local.second + local.microsecond / 1e6
    today, yesterday = DAYS[local.weekday()], DAYS[(local.weekday() + 6) % 7]
    for window in windows.allow:
        start = window.from_.hour * 3600 + window.from_.minute * 60
        end = 86400 if window.to == time.max else window.to.hour * 3600 + window.to.minute * 60
        if start < end:
            inside = today in window.days and start <= seconds < end
        else:  # past midnight: belongs to the day it opens on
            inside = (today in window.days and seconds >= start) or (
                yesterday in window.days and seconds < end
            )
        if inside:
            return True
    return False


# ---- properties ---------------------------------------------------------------------------


def _advances(step: Step) -> list[Decision]:
    return [d for d in step.decisions if d.action in ADVANCING and d.actor == "coalmine"]


@PROPERTY
@given(scenarios())
def test_never_advances_past_a_failing_gate(scenario: Scenario) -> None:
    """coalmine advances only on a tick where every gating rule is conclusive, judged, passing."""
    policy = scenario.policy
    trace = run(engine_for(scenario), scenario.inputs)
    oracle = Oracle(policy, trace)
    gating = [r for r in policy.rules if r.gating and "canary" in r.phases]
    for k, step in enumerate(trace):
        advances = _advances(step)
        if not advances:
            continue
        where = f"advance at step {k}:\n{oracle.timeline(k)}"
        assert isinstance(step.input, Tick), where
        assert len(advances) == 1, where
        assert step.before.phase is P.CANARY, where
        assert scenario.options.auto_promote, where
        blocking = {r.name: oracle.status(k, r) for r in gating}
        assert set(blocking.values()) <= {"ok"}, f"{blocking}; {where}"
        changed = oracle.changed_at(k)
        assert changed is not None, where
        assert step.input.t >= changed + policy.steps[step.before.step].hold, where


@PROPERTY
@given(scenarios(input_kinds=PROMOTE_INPUT_KINDS))
def test_operator_promote_refused_while_breaching_or_paused(scenario: Scenario) -> None:
    """An operator's promote advances a running canary unless a gating rule's latest evaluation
    breaches; otherwise (or paused) it is refused with a warn."""
    trace = run(engine_for(scenario), scenario.inputs)
    oracle = Oracle(scenario.policy, trace)
    gating = [r for r in scenario.policy.rules if r.gating and "canary" in r.phases]
    for k, step in enumerate(trace):
        if not isinstance(step.input, Operator) or step.input.command.kind != "promote":
            continue
        where = f"promote at step {k}:\n{oracle.timeline(k)}"
        advanced = [d for d in step.decisions if d.action in ADVANCING]
        latest = {r.name: oracle.latest(k, r) for r in gating}
        if step.before.phase is P.PROMOTED:
            assert not advanced, where  # already at 100%: nothing to do
        elif step.before.phase is not P.CANARY or "breaching" in latest.values():
            assert [d.action for d in step.decisions] == ["warn"], f"{latest}; {where}"
        elif None not in latest.values():  # unjudged since the last traffic change: either way
            assert len(advanced) == 1, f"{latest}; {where}"
            assert advanced[0].actor == "operator", where


@PROPERTY
@given(scenarios())
def test_never_rolls_back_without_a_tripped_rule_or_an_operator(scenario: Scenario) -> None:
    """A rollback is an operator's command, or a rollback rule that breached for its `for`."""
    trace = run(engine_for(scenario), scenario.inputs)
    oracle = Oracle(scenario.policy, trace)
    for k, step in enumerate(trace):
        for decision in (d for d in step.decisions if d.action == "rollback"):
            where = f"rollback at step {k}: {decision.reason}\n{oracle.timeline(k)}"
            if decision.actor == "operator":
                assert isinstance(step.input, Operator), where
                assert step.input.command.kind == "rollback", where
                continue
            assert isinstance(step.input, Tick), where
            assert scenario.options.auto_rollback, where
            assert step.before.phase is not P.STOOD_DOWN, where
            rule = oracle.rules[decision.rule or ""]
            assert rule.on_breach == "rollback", where
            assert _rule_active(rule, step.before), where
            assert oracle.tripped(k, rule), where


@PROPERTY
@given(scenarios())
def test_rules_never_trip_before_their_for(scenario: Scenario) -> None:
    """A rule's rollback, page or hold comes no earlier than `for` after its first breach."""
    trace = run(engine_for(scenario), scenario.inputs)
    oracle = Oracle(scenario.policy, trace)
    for k, step in enumerate(trace):
        for decision in step.decisions:
            if decision.action not in ("rollback", "page", "hold") or decision.rule is None:
                continue
            if (decision.dedup_key or "").endswith("/inconclusive"):
                continue  # the inconclusive page is not a trip
            where = f"{decision.action} at step {k}: {decision.reason}\n{oracle.timeline(k)}"
            assert isinstance(step.input, Tick), where
            rule = oracle.rules[decision.rule]
            if decision.action == "hold" and decision.reason.removeprefix(DRY_RUN).startswith(
                "not advancing"
            ):
                assert oracle.status(k, rule) != "ok", where  # names a blocking rule
                continue
            assert _rule_active(rule, step.before), where
            assert oracle.tripped(k, rule), where


# Days around America/Los_Angeles's daylight saving changes (2026-03-08 spring forward,
# 2026-11-01 fall back, both at 02:00 local) and a plain week.
EDGE_DAYS = (
    *(date(2026, 3, d) for d in (3, 5, 7, 8, 9, 10, 12)),
    *(date(2026, 10, d) for d in (29, 31)),
    *(date(2026, 11, d) for d in (1, 2, 3, 5)),
)
BEFORE_EDGE = tuple(timedelta(minutes=m) for m in (0, 1, 2, 5, 30))


def window_edges(windows: DeploymentWindows) -> list[datetime]:
    """Every instant a window opens or closes on EDGE_DAYS, both sides of an ambiguous hour."""
    zone = ZoneInfo(windows.timezone)
    edges = set()
    for day, window in product(EDGE_DAYS, windows.allow):
        if DAYS[day.weekday()] not in window.days:
            continue
        closes_on = day if window.from_ < window.to else day + timedelta(days=1)
        for when in (
            datetime.combine(day, window.from_, tzinfo=zone),
            datetime.combine(closes_on, window.to, tzinfo=zone)
            if window.to != time.max  # 24:00 is the next day's midnight
            else datetime.combine(closes_on + timedelta(days=1), time(0), tzinfo=zone),
        ):
            edges |= {when.replace(fold=fold).astimezone(UTC) for fold in (0, 1)}
    return sorted(edges)


_EDGES: dict[int, tuple[Policy, st.SearchStrategy[datetime]]] = {}


def near_window_edges(policy: Policy) -> st.SearchStrategy[datetime]:
    """A start shortly before one of the policy's window edges (built once per policy)."""
    cached = _EDGES.get(id(policy))
    if cached is None or cached[0] is not policy:
        assert policy.deployment_windows is not None
        strategy = st.builds(
            lambda edge, before: edge - before,
            st.sampled_from(window_edges(policy.deployment_windows)),
            st.sampled_from(BEFORE_EDGE),
        )
        cached = _EDGES[id(policy)] = (policy, strategy)
    return cached[1]


@settings(PROPERTY, max_examples=500)
@given(
    scenarios(
        WINDOWED_POLICY,
        starts=near_window_edges,
        extra_gaps=(timedelta(minutes=5), timedelta(minutes=15)),
        longest_gap=timedelta(hours=1),
        profiles=("clean", "healthy"),
        options=PROMOTING_OPTIONS,
        input_kinds=QUIET_INPUT_KINDS,
    )
)
def test_never_advances_outside_a_deployment_window(scenario: Scenario) -> None:
    """coalmine advances only inside a deployment window, across DST changes too."""
    windows = scenario.policy.deployment_windows
    for k, step in enumerate(run(engine_for(scenario), scenario.inputs)):
        if _advances(step):
            local = step.input.t.astimezone(ZoneInfo("America/Los_Angeles"))
            assert inside_windows(windows, step.input.t), f"advanced at step {k}, {local}"


@PROPERTY
@given(scenarios(st.one_of(ANY_POLICY, WINDOWED_POLICY)))
def test_same_inputs_same_outputs(scenario: Scenario) -> None:
    """Two fresh engines given the same inputs decide the same and never touch the given state."""
    first = run(engine_for(scenario), scenario.inputs)
    engine = engine_for(scenario)
    state = engine.new_state(scenario.policy.scripts[0])
    for k, step in enumerate(first):
        before = state_json(state)
        outcome = apply(engine, state, step.input)
        assert state_json(state) == before, f"step {k} changed the state it was given"
        assert described(outcome.decisions) == described(step.decisions), f"step {k}"
        for decision in outcome.decisions:
            json.dumps(decision.to_dict(), allow_nan=False)
        state = outcome.state
    assert state_json(state) == state_json(first[-1].after)


@PROPERTY
@given(scenarios(), st.data())
def test_state_round_trips_through_strict_json(scenario: Scenario, data: st.DataObject) -> None:
    """At any point the state survives strict JSON, and continuing from it decides the same."""
    engine = engine_for(scenario)
    trace = run(engine, scenario.inputs)
    for k, step in enumerate(trace):
        restored = round_trip(step.before)
        assert state_json(restored) == state_json(step.before), f"step {k}"
        outcome = apply(engine, restored, step.input)
        assert described(outcome.decisions) == described(step.decisions), f"step {k}"
        assert state_json(outcome.state) == state_json(step.after), f"step {k}"
    cut = data.draw(st.integers(0, len(trace) - 1), label="cut")
    rest = run(engine, scenario.inputs[cut:], round_trip(trace[cut].before))
    assert [described(s.decisions) for s in rest] == [described(s.decisions) for s in trace[cut:]]
    assert state_json(rest[-1].after) == state_json(trace[-1].after)


@pytest.mark.parametrize(("phase", "event"), list(product(RolloutPhase, Event)))
def test_lifecycle_moves_only_by_the_table(phase: RolloutPhase, event: Event) -> None:
    """Every (phase, event) outside TRANSITIONS raises IllegalTransition; the rest follow it."""
    if (phase, event) in TRANSITIONS:
        assert transition(phase, event) is TRANSITIONS[(phase, event)]
    else:
        with pytest.raises(IllegalTransition):
            transition(phase, event)
