"""Compare judge: coalmine's compare rule, Kayenta's Mann-Whitney judge and an absolute rule.

Run from the repository root::

    .venv/bin/python bench/judge.py                  # 1,000 canaries per scenario
    .venv/bin/python bench/judge.py --quick          # 60 per scenario: a smoke run
    .venv/bin/python bench/judge.py --canaries 4000 --seed 2 --markdown
    .venv/bin/python bench/judge.py --only late3x,burn --canaries 200   # some scenarios, fast
    .venv/bin/python bench/judge.py --only x10_1000 --judges "compare 1.5,oracle 1.5: knows onset"

This is a benchmark, not a test (it is not part of ``make test``): it prints a table and exits 0
whatever the figures, and writes no file. docs/benchmarks.md ("Compare judge") has the results.

Traffic. A Worker serves ``per_minute`` requests a minute, 10% of them by the canary. Time runs in
30 s intervals (coalmine's ``analysis.interval``). In each interval every version's errors and
successes are independent Poisson counts with means ``requests x share x p`` and
``requests x share x (1 - p)``: exactly a Poisson request count split binomially between the
versions, and each version's requests binomially into errors. Stable's error rate ``p`` is
0.5%, except in one A/A scenario at 0.2% (0.5% is the runbook's threshold itself, where an
absolute rule cannot help tripping); the canary's is ``p`` times the scenario's factor. In a
shared incident both versions' rates are multiplied by 10 from minute 5. One A/A scenario
steps outside that Poisson model on purpose: there each version's error rate wanders on its
own (its logarithm an AR(1) with sd 0.5 and correlation 0.9 per interval, mean rate unchanged),
as when session affinity pins a bursty client to one version. Every canary is drawn from its
own generator, seeded from ``--seed``, the scenario and its index, and every judge sees the
same counts.

The judges, each deciding on the same canary:

- ``compare 1.5`` and ``compare 1.2``: coalmine's ``Engine`` with one compare rule,
  ``compare: {max_ratio: 1.5 or 1.2, confidence: 0.99}``, ``window: 30s``, the default
  ``min_samples`` (1,000 canary requests in the step before it can pass; it can trip at once),
  observed at every tick with the interval's requests and errors of each version.
- ``Kayenta``: Kayenta's NetflixACAJudge / MannWhitneyClassifier re-implemented (see
  ``kayenta_classify``) on per-minute error rates, canary against stable, judged every
  15 minutes on every minute since the start; a canary fails at its first High. Configured as
  one would for an error rate: ``direction: increase``, ``effectSize.allowedIncrease: 1.0``
  (the default), outliers kept and NaN (a minute without requests) read as 0, the defaults.
- ``Kayenta, baseline``: the same judge against a baseline the size of the canary running the
  stable version, as Kayenta's docs advise (a Workers gradual deployment has no room for a third
  version: this column shows what Kayenta gets in its own setting).
- ``absolute``: coalmine's ``Engine`` with policies/runbook.yaml's ``error_rate`` rule as the
  file has it (at the time of writing: ratio > 0.5% over a 1m window, ``min_samples: 100``,
  ``for: 5m``); ``absolute 5m``: the same rule with DESIGN.md's example window (5m window,
  ``min_samples: 500``). Its value is the canary's errors / requests over the window, its samples
  the requests in it (a window reaching before the start covers what there is).

Every coalmine judge runs under steps ``[{weight: 10, hold: 30m}, {weight: 100}]`` and
``analysis: {interval: 30s, warmup: 1m}``. A trip is a ``rollback`` decision; its time to detect
counts from the canary's start. In the A/A scenarios auto-promote is off, so that the 10% step
(and every rule) is watched for the whole 90 minutes. A bad canary is *promoted* when it was
not caught in the 30-minute step and the judge would let it advance: coalmine's engine promotes
it at 30:00 (its rule conclusive and not breaching), or Kayenta's judgement at minute 30 passed.

Oracles (bench/oracle.py): tests with the compare rule's guarantee that are told the regression's
ratio at every minute (``oracle 1.5: knows ratio``, a Shiryaev-Roberts detector over every window
of the 90 planned minutes) and its onset too (``oracle 1.5: knows onset``, Wald's sequential
test from the onset), and, printed under the table, the floor no test with the guarantee can
beat: the first minute by which the most powerful test for that minute alone catches half the
regressions. They say whether a target is reachable at all at the scenario's traffic.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from statistics import NormalDist

from coalmine.engine import Deployment, Engine, Observation, Options
from coalmine.engine.compare import Evidence
from coalmine.engine.model import Role
from coalmine.policy import Policy, Rule
from coalmine.policyfile import load_policy
from machine import code_version, cpu_model, load
from oracle import Window, np_floor, sprt_trip, sr_trip

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "policies" / "runbook.yaml"
SCRIPT = "slidecraft-api"
T0 = datetime.fromisoformat("2026-03-03T18:00:00+00:00")
INTERVAL = 30  # seconds: coalmine's analysis.interval and the resolution of the counts
STEP_MINUTES = 30  # the 10% step's hold
STABLE_ERROR_RATE = 0.005
CANARY_SHARE = 0.10

# ---- traffic ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """One kind of canary: its traffic, how much worse it is, and how long it is watched."""

    key: str
    label: str
    per_minute: float  # requests a minute, both versions together
    factor: float  # the canary's error rate over the stable's
    minutes: int  # how long the canary is watched
    shared_from: float | None = None  # minute from which both versions' rates are x10
    hold_to_end: bool = False  # auto-promote off: the 10% step lasts all ``minutes``
    stable_rate: float = STABLE_ERROR_RATE
    wander: float = 0.0  # sd of each version's own log error-rate drift (AR(1), 0: none)
    share: float = CANARY_SHARE  # the canary's share of requests
    onset: float = 0.0  # minute from which the canary is ``factor`` times worse
    ramp: tuple[float, float] | None = None  # (to rate, over minutes) from ``onset``: a slow burn

    def canary_rate(self, minute: float, p: float) -> float:
        """The canary's error rate at ``minute`` when the stable's is ``p``."""
        if minute < self.onset:
            return p
        if self.ramp is not None:
            to, over = self.ramp
            return p + (to - p) * min(1.0, (minute - self.onset) / over)
        return p * self.factor

    @property
    def intervals(self) -> int:
        return self.minutes * 60 // INTERVAL

    @property
    def onset_window(self) -> int:
        return math.ceil(self.onset * 60 / INTERVAL)

    def ratio_at(self, k: int) -> float:
        """The canary's error rate over the stable's in interval ``k`` (the oracles' truth)."""
        return self.canary_rate(k * INTERVAL / 60, self.stable_rate) / self.stable_rate

    def ratio_since(self, m: int) -> float:
        """The regression's ratio ``m`` intervals after its onset."""
        return self.ratio_at(self.onset_window + m)

    @property
    def regresses(self) -> bool:
        return self.ramp is not None or self.factor > 1


SCENARIOS = (
    Scenario("aa60", "A/A, 60 req/min", 60, 1.0, 90, hold_to_end=True),
    Scenario("aa1000", "A/A, 1,000 req/min", 1000, 1.0, 90, hold_to_end=True),
    Scenario(
        "aa1000low", "A/A, 1,000 req/min, 0.2%", 1000, 1.0, 90, hold_to_end=True, stable_rate=0.002
    ),
    Scenario(
        "aa1000drift",
        "A/A, 1,000 req/min, rates wander",
        1000,
        1.0,
        90,
        hold_to_end=True,
        wander=0.5,
    ),
    Scenario("x4_600", "canary 4x, 600 req/min", 600, 4.0, STEP_MINUTES),
    Scenario("x4_60", "canary 4x, 60 req/min", 60, 4.0, STEP_MINUTES),
    Scenario("x10_1000", "canary 10x, 1,000 req/min", 1000, 10.0, STEP_MINUTES),
    Scenario("shared", "both 10x from minute 5, 1,000 req/min", 1000, 1.0, STEP_MINUTES, 5.0),
    # the least favourable null of max_ratio 1.5: where its guarantee binds
    Scenario("atmax", "canary 1.5x, 1,000 req/min", 1000, 1.5, 90, hold_to_end=True),
    # the runbook's second step: 50% for an hour
    Scenario("late3x", "3x from minute 40 of the 50% hour", 1000, 3.0, 60, share=0.5, onset=40),
    Scenario(
        "burn",
        "0.2% -> 2% over 45 min from minute 5 of the 50% hour",
        1000,
        1.0,
        60,
        stable_rate=0.002,
        share=0.5,
        onset=5,
        ramp=(0.02, 45),
    ),
)


SCENARIO_KEYS = tuple(s.key for s in SCENARIOS)


@dataclass(slots=True)
class Counts:
    """One version's requests and errors, one entry per 30 s interval."""

    requests: list[int] = field(default_factory=list)
    errors: list[int] = field(default_factory=list)

    def per_minute_rates(self, minutes: int) -> list[float]:
        """Errors / requests of each whole minute; a minute without requests counts as 0.

        That is Kayenta's default ``nanStrategy`` ("none": NaN replaced by 0).
        """
        rates = []
        for m in range(minutes):
            requests = self.requests[2 * m] + self.requests[2 * m + 1]
            errors = self.errors[2 * m] + self.errors[2 * m + 1]
            rates.append(errors / requests if requests else 0.0)
        return rates


@dataclass(slots=True)
class Traffic:
    canary: Counts
    stable: Counts
    baseline: Counts  # a canary-sized deployment of the stable version, for Kayenta's setting


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw: multiplication under 10, else Hörmann's PTRS (as numpy does)."""
    if lam <= 0:
        return 0
    if lam < 10:
        limit, k, p = math.exp(-lam), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        if math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b) <= (
            -lam + k * loglam - math.lgamma(k + 1)
        ):
            return k


def _draw(rng: random.Random, counts: Counts, mean_requests: float, p: float) -> None:
    errors = poisson(rng, mean_requests * p)
    counts.errors.append(errors)
    counts.requests.append(errors + poisson(rng, mean_requests * (1 - p)))


WANDER_PHI = 0.9  # per 30 s interval: the drift's correlation falls to 1/e in about 5 minutes


def simulate(scenario: Scenario, rng: random.Random) -> Traffic:
    """The counts of one canary, interval by interval."""
    traffic = Traffic(Counts(), Counts(), Counts())
    per_interval = scenario.per_minute * INTERVAL / 60
    canary_mean = per_interval * scenario.share
    stable_mean = per_interval - canary_mean
    sigma, innovation = scenario.wander, math.sqrt(1 - WANDER_PHI**2)
    drift = [rng.gauss(0.0, 1.0) for _ in range(3)] if sigma else [0.0, 0.0, 0.0]
    for k in range(scenario.intervals):
        p = scenario.stable_rate
        if scenario.shared_from is not None and k * INTERVAL >= scenario.shared_from * 60:
            p *= 10
        if sigma:
            drift = [WANDER_PHI * z + innovation * rng.gauss(0.0, 1.0) for z in drift]
        c, s, b = (math.exp(sigma * z - sigma * sigma / 2) for z in drift)
        rate = scenario.canary_rate(k * INTERVAL / 60, p)
        _draw(rng, traffic.canary, canary_mean, min(1.0, rate * c))
        _draw(rng, traffic.stable, stable_mean, min(1.0, p * s))
        _draw(rng, traffic.baseline, canary_mean, min(1.0, p * b))
    return traffic


# ---- verdicts -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a judge did with one canary: tripped (when, in seconds), promoted, or neither."""

    tripped_at: float | None = None
    promoted: bool = False
    applies: bool = True  # False: the judge has nothing to say here (an oracle without a fault)


class Judge:
    """A named way of deciding a canary's fate from its traffic."""

    name: str

    def decide(self, scenario: Scenario, traffic: Traffic) -> Verdict:
        raise NotImplementedError


# ---- coalmine: the real engine ----------------------------------------------------------------


def bench_policy(rule: dict[str, object]) -> Policy:
    """The policy every coalmine judge runs under: the runbook's steps, 10% for 30 minutes,
    50% for an hour, then 100% (a compare rule's detector is tuned to those 90 minutes)."""
    return Policy.model_validate(
        {
            "version": 1,
            "name": "judge-bench",
            "scripts": [SCRIPT],
            "analysis": {"interval": f"{INTERVAL}s", "warmup": "1m"},
            "steps": [
                {"weight": 10, "hold": f"{STEP_MINUTES}m"},
                {"weight": 50, "hold": "1h"},
                {"weight": 100},
            ],
            "rules": [rule],
        }
    )


def compare_rule(max_ratio: float, confidence: float = 0.99) -> dict[str, object]:
    """The compare rule of issue 6: canary errors against stable's, one 30 s window a tick."""
    return {
        "name": "errors_vs_stable",
        "source": "prometheus",
        "events": 'sum(increase(http_requests_total{version="$version",code=~"5.."}[$window]))',
        "samples": 'sum(increase(http_requests_total{version="$version"}[$window]))',
        "compare": {"max_ratio": max_ratio, "confidence": confidence},
        "window": f"{INTERVAL}s",  # min_samples: the default, 1,000 canary requests to pass
        "on_breach": "rollback",
    }


def runbook_rule(**changes: object) -> dict[str, object]:
    """policies/runbook.yaml's ``error_rate`` rule, with ``changes``."""
    runbook = load_policy(RUNBOOK)
    rule: Rule = next(r for r in runbook.rules if r.name == "error_rate")
    data = rule.model_dump(by_alias=True, exclude_none=True)
    data.update(changes)
    return data


class EngineJudge(Judge):
    """coalmine's engine, ticked every 30 s with one observation of each version."""

    def __init__(self, name: str, rule: dict[str, object]) -> None:
        self.name = name
        self.policy = bench_policy(rule)
        self.rule = self.policy.rules[0]
        self.compares = self.rule.compare is not None
        self.window = int(self.rule.window.total_seconds()) // INTERVAL
        self.engines = {
            hold: Engine(self.policy, Options(auto_promote=not hold)) for hold in (False, True)
        }
        ticks = max(s.intervals for s in SCENARIOS)
        self.times = [T0 + timedelta(seconds=INTERVAL * k) for k in range(1, 1 + ticks)]

    def describe(self) -> str:
        r = self.rule
        if r.compare is not None:
            return (
                f"compare max_ratio {r.compare.max_ratio:g}, confidence {r.compare.confidence:g}, "
                f"window {INTERVAL}s, min_samples "
                f"{'1000 (the default)' if r.min_samples is None else format(r.min_samples, 'g')}"
            )
        return (
            f"error ratio > {r.threshold:g} over {r.window.total_seconds() / 60:g}m, "
            f"min_samples {r.min_samples:g}, for {r.for_.total_seconds() / 60:g}m"
        )

    def observations(self, traffic: Traffic, k: int) -> list[Observation]:
        """The observations of the tick that ends interval ``k`` (0-based)."""
        name = self.rule.name
        if self.compares:
            c, s = traffic.canary, traffic.stable
            return [
                Observation(name, "canary", None, float(c.requests[k]), events=float(c.errors[k])),
                Observation(name, "stable", None, float(s.requests[k]), events=float(s.errors[k])),
            ]
        first = max(0, k + 1 - self.window)
        out = []
        versions: tuple[tuple[Role, Counts], ...] = (
            ("canary", traffic.canary),
            ("stable", traffic.stable),
        )
        for role, counts in versions:
            requests = sum(counts.requests[first : k + 1])
            errors = sum(counts.errors[first : k + 1])
            value = errors / requests if requests else math.nan
            out.append(Observation(name, role, value, float(requests)))
        return out

    def decide(self, scenario: Scenario, traffic: Traffic) -> Verdict:
        engine = self.engines[scenario.hold_to_end]
        live = Deployment("v1", "v2", round(100 * scenario.share))
        state = engine.observe_deployment(engine.new_state(SCRIPT), live, T0).state
        step_end = scenario.minutes * 60
        for k in range(scenario.intervals):
            outcome = engine.tick(state, self.times[k], self.observations(traffic, k))
            state = outcome.state
            for decision in outcome.decisions:
                if decision.action == "rollback":
                    return Verdict(tripped_at=INTERVAL * (k + 1))
                if decision.action in ("promote", "set_traffic"):  # the step ended: advanced
                    return Verdict(promoted=INTERVAL * (k + 1) == step_end)
        return Verdict()


class SinceStartJudge(Judge):
    """The compare rule as it was before the change detector (issue 12): the mixture test of
    everything since the step began, tripping at its first judged tick (after the 1m warm-up)
    with an e-value of at least ``1 / (1 - confidence)``; re-implemented on :class:`Evidence`."""

    def __init__(self, name: str, max_ratio: float, confidence: float = 0.99) -> None:
        self.name = name
        self.max_ratio = max_ratio
        self.bar = 1.0 / (1.0 - confidence)

    def decide(self, scenario: Scenario, traffic: Traffic) -> Verdict:
        evidence = Evidence()
        c, s = traffic.canary, traffic.stable
        for k in range(scenario.intervals):
            evidence = evidence.add(
                self.max_ratio, c.errors[k], c.requests[k], s.errors[k], s.requests[k], T0
            )
            if k >= 1 and evidence.e_value(self.max_ratio) >= self.bar:
                return Verdict(tripped_at=INTERVAL * (k + 1))
        # it passes at the step's end once it saw 1,000 canary requests
        return Verdict(promoted=not scenario.hold_to_end and evidence.canary_samples >= 1000)


def windows_of(traffic: Traffic, intervals: int) -> list[Window]:
    c, s = traffic.canary, traffic.stable
    return [(c.errors[k], c.requests[k], s.errors[k], s.requests[k]) for k in range(intervals)]


class OracleJudge(Judge):
    """A test with the compare rule's guarantee that is told the regression's ratio at every
    interval (``knows="ratio"``: a Shiryaev-Roberts detector over the 90 planned minutes) or its
    onset too (``knows="onset"``: Wald's SPRT from the onset); bench/oracle.py."""

    def __init__(self, max_ratio: float, knows: str, confidence: float = 0.99) -> None:
        self.name = f"oracle {max_ratio:g}: knows {knows}"
        self.max_ratio, self.knows = max_ratio, knows
        self.bar = 1.0 / (1.0 - confidence)

    def decide(self, scenario: Scenario, traffic: Traffic) -> Verdict:
        if not any(scenario.ratio_at(k) > self.max_ratio for k in range(scenario.intervals)):
            return Verdict(applies=False)  # no regression to know of: it cannot trip
        windows = windows_of(traffic, scenario.intervals)
        if self.knows == "onset":
            k = sprt_trip(
                windows, scenario.ratio_at, scenario.onset_window, self.max_ratio, self.bar
            )
        else:
            horizon = 90 * 60 // INTERVAL  # the runbook's canary: 30 min at 10%, 1 h at 50%
            k = sr_trip(windows, scenario.ratio_since, self.max_ratio, self.bar, horizon)
        if k is not None:
            return Verdict(tripped_at=INTERVAL * (k + 1))
        return Verdict()  # an oracle neither passes nor holds: its "promoted" row is "-"


# ---- Kayenta: NetflixACAJudge's Mann-Whitney classifier -----------------------------------------

KAYENTA_CONFIDENCE = 0.98  # NetflixACAJudge: MannWhitneyClassifier(tolerance=0.25, confLevel=0.98)
KAYENTA_TOLERANCE = 0.25
KAYENTA_ALLOWED_INCREASE = 1.0  # effectSize.allowedIncrease (default 1.0, measure meanRatio)
KAYENTA_EVERY = 15  # minutes between judgements


def _z(shifted: Sequence[float], y: Sequence[float], quantile: float) -> float:
    """Kayenta's ``wilcoxonDiff`` at one shift, ranks computed exactly (ties averaged)."""
    nx, ny = len(shifted), len(y)
    n = nx + ny
    order = sorted([(v, 0) for v in shifted] + [(v, 1) for v in y])
    rank_sum, ties, i = 0.0, 0, 0
    while i < n:
        j = i
        while j + 1 < n and order[j + 1][0] == order[i][0]:
            j += 1
        run = j - i + 1
        ties += run**3 - run
        average = (i + j) / 2 + 1
        rank_sum += average * sum(1 for t in range(i, j + 1) if order[t][1] == 0)
        i = j + 1
    dz = rank_sum - nx * (nx + 1) / 2 - nx * ny / 2
    sigma = math.sqrt(nx * ny / 12 * ((n + 1) - ties / (n * (n - 1))))
    if sigma == 0:
        raise ZeroDivisionError("all observations tied")
    return (dz - math.copysign(0.5, dz) * (dz != 0)) / sigma - quantile


class _ShiftTest:
    """The Wilcoxon rank-sum statistic of ``x - mu`` against ``y`` as a function of ``mu``.

    Kayenta (kayenta-mannwhitney, from R's ``wilcox.test``) finds the confidence limits and the
    Hodges-Lehmann estimate with a Brent solver on ``(dz(mu) - 0.5 sign dz) / sigma - q``.
    Between two consecutive pairwise differences ``x_i - y_j`` that function is constant
    (``dz`` counts the pairs above ``mu``; ties inside each sample set ``sigma``), so the solver
    converges to the difference where it changes sign: this finds that difference directly.
    """

    def __init__(self, x: Sequence[float], y: Sequence[float]) -> None:
        self.x, self.y = x, y
        nx, ny = len(x), len(y)
        n = nx + ny
        self.pairs = nx * ny
        self.diffs = sorted([a - b for a in x for b in y])
        self.unique = sorted(set(self.diffs))
        ties = sum(t**3 - t for t in Counter(x).values()) + sum(
            t**3 - t for t in Counter(y).values()
        )
        self.sigma = math.sqrt(nx * ny / 12 * ((n + 1) - ties / (n * (n - 1))))

    def _between(self, k: int, quantile: float) -> float:
        """The function just above ``unique[k]`` (no pair tied with the shift there)."""
        above = self.pairs - bisect_right(self.diffs, self.unique[k])
        dz = above - self.pairs / 2
        return (dz - math.copysign(0.5, dz) * (dz != 0)) / self.sigma - quantile

    def _at(self, mu: float, quantile: float) -> float:
        return _z([v - mu for v in self.x], self.y, quantile)

    def root(self, quantile: float, *, bracketed: bool = False) -> float:
        """Kayenta's ``findRoot`` (or, ``bracketed``, the bare solver it uses for the estimate)."""
        lo, hi = self.unique[0], self.unique[-1]
        if not bracketed:
            if self._at(lo, quantile) <= 0:
                return lo
            if self._at(hi, quantile) >= 0:
                return hi
        # the first gap between differences where the function is <= 0
        first, last = 0, len(self.unique) - 1
        while first < last:
            mid = (first + last) // 2
            if self._between(mid, quantile) <= 0:
                last = mid
            else:
                first = mid + 1
        if first >= len(self.unique) - 1 or self._between(first, quantile) < 0:
            return self.unique[first]
        # exactly 0 over a run of gaps: the solver stops anywhere in it; take its middle
        end = first
        while end + 1 < len(self.unique) - 1 and self._between(end + 1, quantile) == 0:
            end += 1
        return (self.unique[first] + self.unique[end + 1]) / 2


def mann_whitney(
    x: Sequence[float], y: Sequence[float], confidence: float
) -> tuple[float, float, float]:
    """Kayenta's Mann-Whitney confidence interval and estimate of the shift ``x - y``."""
    test = _ShiftTest(x, y)
    zq = NormalDist().inv_cdf((1 - confidence) / 2)  # negative
    lower = test.root(-zq)
    upper = test.root(zq)
    estimate = test.root(0.0, bracketed=True)
    return lower, upper, estimate


def kayenta_classify(
    control: Sequence[float], experiment: Sequence[float], rng: random.Random
) -> str:
    """MannWhitneyClassifier.classify, direction ``increase``: "High", "Pass" or "Error".

    "Error" is Kayenta's solver failing on data all tied at one shift; the judge counts it as a
    failed canary, as Kayenta does for a critical metric.

    Kayenta's checks in order: identical data, a single value overall -> Pass; both samples
    constant -> a little Gaussian noise (1e-5 of the value); then High when the lower
    confidence limit of the shift exceeds ``tolerance x |estimate|`` *and* the mean ratio
    (canary mean / control mean, 1.0 when the control's mean is 0) reaches ``allowedIncrease``.
    """
    if sorted(experiment) == sorted(control):
        return "Pass"
    if len(set(experiment) | set(control)) == 1:
        return "Pass"
    x, y = list(experiment), list(control)
    if len(set(x)) == 1 and len(set(y)) == 1:
        x = [v + rng.gauss(0.0, x[0] * 1e-5) for v in x]
        y = [v + rng.gauss(0.0, y[0] * 1e-5) for v in y]
    try:
        lower, _, estimate = mann_whitney(x, y, KAYENTA_CONFIDENCE)
    except ZeroDivisionError:
        return "Error"
    control_mean = statistics.fmean(y)
    ratio = 1.0 if control_mean == 0 else statistics.fmean(x) / control_mean
    if lower > KAYENTA_TOLERANCE * abs(estimate) and ratio >= KAYENTA_ALLOWED_INCREASE:
        return "High"
    return "Pass"


class KayentaJudge(Judge):
    """Kayenta judged every 15 minutes on the per-minute error rates since the start."""

    def __init__(self, name: str, control: Callable[[Traffic], Counts]) -> None:
        self.name = name
        self.control = control

    def decide(self, scenario: Scenario, traffic: Traffic) -> Verdict:
        canary = traffic.canary.per_minute_rates(scenario.minutes)
        control = self.control(traffic).per_minute_rates(scenario.minutes)
        rng = random.Random(0)
        for minute in range(KAYENTA_EVERY, scenario.minutes + 1, KAYENTA_EVERY):
            if kayenta_classify(control[:minute], canary[:minute], rng) != "Pass":
                return Verdict(tripped_at=minute * 60)
        return Verdict(promoted=True)


# ---- the run ----------------------------------------------------------------------------------


def judges() -> list[Judge]:
    return [
        EngineJudge("compare 1.5", compare_rule(1.5)),
        EngineJudge("compare 1.2", compare_rule(1.2)),
        SinceStartJudge("since-start 1.5", 1.5),
        KayentaJudge("Kayenta", lambda t: t.stable),
        KayentaJudge("Kayenta, baseline", lambda t: t.baseline),
        EngineJudge("absolute", runbook_rule()),
        EngineJudge("absolute 5m", runbook_rule(window="5m", min_samples=500)),
        OracleJudge(1.5, "ratio"),
        OracleJudge(1.5, "onset"),
        OracleJudge(1.2, "ratio"),
        OracleJudge(1.2, "onset"),
    ]


FLOOR_RATIOS = (1.5, 1.2, 1.0)  # 1.0: "no worse than stable", the strictest null


@dataclass(slots=True)
class Results:
    """Every verdict, by scenario and judge, and the CPU time each scenario took."""

    verdicts: dict[tuple[str, str], list[Verdict]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    floors: dict[tuple[str, float], float | None] = field(default_factory=dict)  # minutes


def run(
    canaries: int, seed: int, all_judges: list[Judge], scenarios: Sequence[Scenario] = SCENARIOS
) -> Results:
    results = Results()
    for scenario in scenarios:
        started = time.process_time()
        kept: list[list[Window]] = []
        for i in range(canaries):
            traffic = simulate(scenario, random.Random(f"judge/{seed}/{scenario.key}/{i}"))
            if scenario.regresses and not scenario.hold_to_end:
                kept.append(windows_of(traffic, scenario.intervals))
            for judge in all_judges:
                verdict = judge.decide(scenario, traffic)
                results.verdicts.setdefault((scenario.key, judge.name), []).append(verdict)
        for max_ratio in FLOOR_RATIOS if kept else ():
            k = np_floor(kept, scenario.ratio_at, scenario.onset_window, max_ratio, 0.99, seed)
            floor = None if k is None else INTERVAL * (k + 1) / 60 - scenario.onset
            results.floors[(scenario.key, max_ratio)] = floor
        results.seconds[scenario.key] = time.process_time() - started
    return results


# ---- the table ----------------------------------------------------------------------------


def _share(verdicts: list[Verdict], hit: Callable[[Verdict], bool]) -> str:
    count = sum(1 for v in verdicts if hit(v))
    return f"{100 * count / len(verdicts):.1f}% ({count})"


def _median_minutes(verdicts: list[Verdict], horizon: int, onset: float = 0.0) -> str:
    """The median time to a trip, counted from ``onset`` (minutes); a trip before the onset is
    a false alarm, counted as never."""
    times = [
        v.tripped_at - onset * 60
        if v.tripped_at is not None and v.tripped_at >= onset * 60
        else math.inf
        for v in verdicts
    ]
    middle = statistics.median_high(times)
    return f"> {horizon} min" if math.isinf(middle) else f"{middle / 60:.1f} min"


def _before(onset: float) -> Callable[[Verdict], bool]:
    return lambda v: v.tripped_at is not None and v.tripped_at < onset * 60


@dataclass(frozen=True, slots=True)
class Row:
    scenario: str
    label: str
    target: str
    cell: Callable[[list[Verdict]], str]


def _tripped(v: Verdict) -> bool:
    return v.tripped_at is not None


def _promoted(v: Verdict) -> bool:
    return v.promoted


ROWS = (
    Row("aa60", "A/A, 60 req/min, 90 min: false trips", "≤ 1%", lambda vs: _share(vs, _tripped)),
    Row(
        "aa1000", "A/A, 1,000 req/min, 90 min: false trips", "≤ 1%", lambda vs: _share(vs, _tripped)
    ),
    Row(
        "aa1000low",
        "A/A, 1,000 req/min, stable 0.2%, 90 min: false trips",
        "≤ 1%",
        lambda vs: _share(vs, _tripped),
    ),
    Row(
        "aa1000drift",
        "A/A, 1,000 req/min, rates wander, 90 min: false trips",
        "-",
        lambda vs: _share(vs, _tripped),
    ),
    Row("x4_600", "4x, 600 req/min: caught in 30 min", "≥ 95%", lambda vs: _share(vs, _tripped)),
    Row("x4_600", "4x, 600 req/min: median detect", "-", lambda vs: _median_minutes(vs, 30)),
    Row("x4_600", "4x, 600 req/min: promoted", "-", lambda vs: _share(vs, _promoted)),
    Row("x4_60", "4x, 60 req/min: caught in 30 min", "-", lambda vs: _share(vs, _tripped)),
    Row("x4_60", "4x, 60 req/min: median detect", "-", lambda vs: _median_minutes(vs, 30)),
    Row("x4_60", "4x, 60 req/min: promoted", "-", lambda vs: _share(vs, _promoted)),
    Row("x10_1000", "10x, 1,000 req/min: caught in 30 min", "-", lambda vs: _share(vs, _tripped)),
    Row(
        "x10_1000",
        "10x, 1,000 req/min: median detect",
        "≤ 1.5 min",
        lambda vs: _median_minutes(vs, 30),
    ),
    Row(
        "shared", "both 10x from min 5, 1,000 req/min: trips", "0", lambda vs: _share(vs, _tripped)
    ),
    Row(
        "late3x",
        "3x from min 40 of the 50% hour, 1,000 req/min: median detect after onset",
        "≤ 5 min",
        lambda vs: _median_minutes(vs, 20, onset=40),
    ),
    Row(
        "late3x",
        "3x from min 40 of the 50% hour: caught before the hour ends",
        "-",
        lambda vs: _share(vs, lambda v: v.tripped_at is not None and v.tripped_at >= 40 * 60),
    ),
    Row(
        "late3x",
        "3x from min 40: tripped before the onset",
        "-",
        lambda vs: _share(vs, _before(40)),
    ),
    Row(
        "burn",
        "0.2% -> 2% over 45 min at 50%, 1,000 req/min: median detect after ramp start",
        "≤ 10 min",
        lambda vs: _median_minutes(vs, 55, onset=5),
    ),
    Row("burn", "slow burn: tripped before the ramp", "-", lambda vs: _share(vs, _before(5))),
    Row(
        "atmax",
        "canary 1.5x (at max_ratio 1.5), 1,000 req/min, 90 min: trips",
        "≤ 1% at 1.5",
        lambda vs: _share(vs, _tripped),
    ),
)


def table(results: Results, names: list[str], keys: set[str]) -> list[list[str]]:
    header = ["scenario: measure", "target", *names]
    rows = [header]
    for row in ROWS:
        if row.scenario not in keys:
            continue
        cells = [
            row.cell(verdicts)
            if any(v.applies for v in verdicts)
            and not (name.startswith("oracle") and row.label.endswith("promoted"))
            else "-"
            for name in names
            for verdicts in [results.verdicts[(row.scenario, name)]]
        ]
        rows.append([row.label, row.target, *cells])
    return rows


def print_text(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())


def print_markdown(rows: list[list[str]]) -> None:
    print("| " + " | ".join(rows[0]) + " |")
    print("|---|---:|" + "---:|" * (len(rows[0]) - 2))
    for row in rows[1:]:
        print("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--canaries", type=int, default=1000, help="canaries per scenario (1000)")
    parser.add_argument(
        "--quick", action="store_true", help="60 canaries per scenario: a smoke run"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of every generator (1)")
    parser.add_argument("--markdown", action="store_true", help="the table as Markdown")
    parser.add_argument(
        "--only", help="scenarios to run, comma-separated keys: " + ",".join(SCENARIO_KEYS)
    )
    parser.add_argument("--judges", help="judges to run, comma-separated names (all)")
    args = parser.parse_args(argv)
    keys = args.only.split(",") if args.only else list(SCENARIO_KEYS)
    unknown = [k for k in keys if k not in SCENARIO_KEYS]
    if unknown:
        parser.error(f"unknown scenario {', '.join(unknown)}: one of {', '.join(SCENARIO_KEYS)}")
    scenarios = [s for s in SCENARIOS if s.key in keys]
    canaries = 60 if args.quick else args.canaries
    shown = sys.argv[1:] if argv is None else argv
    print("coalmine compare-judge benchmark")
    print(f"command: .venv/bin/python bench/judge.py {shlex.join(shown)}".rstrip())
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, load average {load()}")
    print(
        f"python:  {platform.python_implementation()} {platform.python_version()} "
        f"on {platform.system()} {platform.release()} ({platform.machine()})"
    )
    print(f"date:    {datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"code:    {code_version('daemon/coalmine', 'bench/judge.py')}")
    all_judges = judges()
    if args.judges:
        names = [n.strip() for n in args.judges.split(",")]
        known = {j.name for j in all_judges}
        if missing := [n for n in names if n not in known]:
            parser.error(f"unknown judge {', '.join(missing)}: one of {', '.join(sorted(known))}")
        all_judges = [j for j in all_judges if j.name in names]
    for judge in all_judges:
        if isinstance(judge, EngineJudge):
            print(f"{judge.name + ':':<19}{judge.describe()}")
    print(f"canaries: {canaries:,} per scenario, seed {args.seed}")
    print()
    started = time.perf_counter()
    results = run(canaries, args.seed, all_judges, scenarios)
    wall = time.perf_counter() - started
    rows = table(results, [j.name for j in all_judges], set(keys))
    (print_markdown if args.markdown else print_text)(rows)
    if results.floors:
        print()
        print("floor: the first minute after the onset by which the most powerful test at 1%")
        print("for that minute alone, told the onset and the ratio, catches half the regressions:")
        for (key, max_ratio), floor in results.floors.items():
            shown = "never" if floor is None else f"{floor:.1f} min"
            print(f"  {key}, max_ratio {max_ratio:g}: {shown}")
    print()
    cpu = ", ".join(f"{key} {seconds:.0f} s" for key, seconds in results.seconds.items())
    print(f"run time: {wall:.0f} s wall ({cpu} CPU); load average after: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
