"""Head-to-head: coalmine's engine against Flagger's and Argo Rollouts' canary analysis.

Run from the repository root::

    .venv/bin/python bench/compare.py                   # 240 canaries, seed 1
    .venv/bin/python bench/compare.py --seed 7 --n 1000
    .venv/bin/python bench/compare.py --markdown        # the tables as Markdown
    .venv/bin/python bench/compare.py --detail          # one line per canary: what each did

This is a benchmark, not a test: it prints a table and exits 0 whatever the figures.
docs/benchmarks.md ("Head-to-head") has the method, the results and what they mean.

The corpus. Every canary is generated from its own seeded generator (``--seed`` and its place
in its category), so a canary does not change when ``--n`` does. It is a time series of 10-second
buckets over two hours: Poisson request and error counts for the canary and for stable, drawn
from a per-minute traffic rate that wanders (an AR(1) on its logarithm) around a base rate, and
from each version's error probability at that moment. The schedule is the runbook's: the canary
at 10% for 30 minutes, then 50% for an hour, then promotion. Counts are drawn for both splits,
and each system sees the split its own decisions put in force. Categories, with their labels:

- healthy: 1,000-30,000 requests/min, both versions at 0.1-0.3% errors;
- low traffic: 10-60 requests/min in all, half healthy, half with a step fault;
- slow burn (bad): the canary's error rate ramps linearly to 2-6% over 10-60 minutes; its fault
  starts when the ramp crosses the rule's threshold (0.5%);
- step fault (bad): at a random moment between minute 3 and 80 the canary's error rate jumps to
  2-10%;
- flapping (healthy): 3-8 canary blips of 20 s-2 min at 2-10% errors, 2-15 minutes apart. The
  runbook's "sustained 5 min" means to ignore these, so they are labelled healthy;
- provider outage (healthy): for 1-15 minutes every query fails (an error, or an empty result);
- shared incident (healthy): both versions' error rates rise together by 1-10% for 2-20 minutes
  (a dependency is down, not the canary).

The systems, each reading the same query (errors / requests of the canary over the rule's
``window``, 1 minute) and the same threshold (0.5%, the runbook's):

- coalmine: ``Engine`` under policies/runbook.yaml restricted to the rules on this signal: its
  ``error_rate`` rollback rule (with the file's ``shared_incident``), the gate on the same query
  (``gate_error_rate``) and the compare rule on 5xx among requests (``errors_vs_stable``: it
  reads the same counts, as events and requests), every ``analysis.interval`` (30 s), from a
  Tuesday 10:00 Pacific start, so the deployment windows are open throughout;
- Flagger: its analysis loop with its documented defaults (interval 1 min, ``threshold: 5``);
- Argo Rollouts: a background AnalysisRun with its defaults (``failureLimit: 0``,
  ``consecutiveErrorLimit: 4``, errors retried after 10 s) and a 1-minute interval.

Each run ends at a rollback, at promotion, or "held" at two hours (the runbook's 90 minutes and
30 more for holds). A healthy canary rolled back is a false rollback; a bad canary promoted or
still held at two hours is missed; time to detect is rollback - fault start.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Literal, NamedTuple

from coalmine.engine import Deployment, Engine, Observation, Options
from coalmine.engine.model import Role
from coalmine.policy import Policy, Rule
from coalmine.policyfile import load_policy
from machine import code_version, cpu_model

ROOT = Path(__file__).resolve().parent.parent
RUNBOOK = ROOT / "policies" / "runbook.yaml"
SCRIPT = "slidecraft-api"
RATE_RULE = "error_rate"

# Tuesday 2026-03-03 10:00 America/Los_Angeles (PST, UTC-8): inside the runbook's deployment
# windows (Tue-Thu 10:00-16:00) for the whole two hours, so they never hold a canary here.
TUESDAY_10AM = datetime.fromisoformat("2026-03-03T18:00:00+00:00")

BUCKET = 10  # seconds: the resolution of the counts (Argo retries errors after 10 s)
HORIZON = 120 * 60  # seconds: the runbook's 90 minutes, and 30 more for holds
BUCKETS = HORIZON // BUCKET
MINUTE = 60

# ---- Flagger, with its documented defaults ----------------------------------------------------
# reference/prior-art.md, "Flagger"; fluxcd/flagger pkg/controller/scheduler.go (advanceCanary)
# and scheduler_metrics.go (runBuiltinMetricChecks).
FLAGGER_INTERVAL = 60  # `analysis.interval`, default 60 s; also the query's range ([1m])
FLAGGER_THRESHOLD = 5  # failed checks before rollback; cumulative, never reset by a pass

# ---- Argo Rollouts, with its documented defaults ----------------------------------------------
# reference/prior-art.md, "Argo Rollouts"; argoproj/argo-rollouts analysis/analysis.go.
ARGO_INTERVAL = 60  # `interval` has no default; 1 min, like the others
ARGO_FAILURE_LIMIT = 0  # default 0: the first Failed measurement fails the run
ARGO_CONSECUTIVE_ERROR_LIMIT = 4  # default 4: the 5th error in a row errors the run
ARGO_ERROR_RETRY = 10  # DefaultErrorRetryInterval: an errored measurement is retried after 10 s


# ---- Poisson counts ---------------------------------------------------------------------------


def poisson(rng: random.Random, lam: float) -> int:
    """A Poisson draw: Knuth's product of uniforms below 12, Hörmann's PTRS (exact) above."""
    if lam <= 0.0:
        return 0
    if lam < 12.0:
        limit, k, product = math.exp(-lam), 0, rng.random()
        while product > limit:
            k += 1
            product *= rng.random()
        return k
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_inv_alpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2.0)
    while True:
        u = rng.random() - 0.5
        v = rng.random()
        us = 0.5 - abs(u)
        if us <= 0.0:
            continue
        k = math.floor((2.0 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k
        if k < 0 or (us < 0.013 and v > us):
            continue
        accept = -lam + k * loglam - math.lgamma(k + 1)
        if math.log(v) + log_inv_alpha - math.log(a / (us * us) + b) <= accept:
            return k


# ---- the corpus -------------------------------------------------------------------------------

OutageKind = Literal["error", "empty"]


@dataclass
class Scenario:
    """What happens to one canary, before any count is drawn."""

    rpm: float  # mean requests per minute, both versions together
    stable_p: list[float]  # error probability per bucket
    canary_p: list[float]
    fault_start: int | None = None  # seconds; None for a healthy canary
    outages: list[tuple[int, int, OutageKind]] = field(default_factory=list)
    story: str = ""


Prefix = tuple[list[int], list[int]]  # prefix sums of requests and errors per bucket


@dataclass
class Canary:
    """One generated canary: its label, its story and its counts under each traffic split."""

    index: int
    category: str
    bad: bool
    fault_start: int | None
    rpm: float
    story: str
    outages: list[tuple[int, int, OutageKind]]
    counts: dict[int, dict[Role, Prefix]]  # canary percent -> role -> prefix sums

    def outage_at(self, t: int) -> OutageKind | None:
        for start, end, kind in self.outages:
            if start <= t < end:
                return kind
        return None


def _base(rng: random.Random, *, low: bool = False) -> Scenario:
    if low:
        rpm = rng.uniform(10.0, 60.0)
    else:
        rpm = math.exp(rng.uniform(math.log(1_000.0), math.log(30_000.0)))
    stable, canary = rng.uniform(0.001, 0.003), rng.uniform(0.001, 0.003)
    story = f"{rpm:,.0f} req/min, errors {canary:.2%} canary / {stable:.2%} stable"
    return Scenario(rpm, [stable] * BUCKETS, [canary] * BUCKETS, story=story)


def _when(t: int) -> str:
    return f"{t / 60:.1f} min"


def healthy(rng: random.Random, _: float) -> Scenario:
    return _base(rng)


def low_healthy(rng: random.Random, _: float) -> Scenario:
    return _base(rng, low=True)


def _step_fault(s: Scenario, rng: random.Random) -> Scenario:
    start = rng.randrange(3 * MINUTE, 80 * MINUTE, BUCKET)
    level = rng.uniform(0.02, 0.10)
    for b in range(start // BUCKET, BUCKETS):
        s.canary_p[b] = level
    s.fault_start = start
    s.story += f"; canary errors jump to {level:.1%} at {_when(start)}"
    return s


def step(rng: random.Random, _: float) -> Scenario:
    return _step_fault(_base(rng), rng)


def low_step(rng: random.Random, _: float) -> Scenario:
    return _step_fault(_base(rng, low=True), rng)


def slow_burn(rng: random.Random, threshold: float) -> Scenario:
    s = _base(rng)
    start = rng.randrange(0, 50 * MINUTE, BUCKET)
    length = rng.randrange(10 * MINUTE, 60 * MINUTE, BUCKET)
    top = rng.uniform(0.02, 0.06)
    base = s.canary_p[0]
    for b in range(start // BUCKET, BUCKETS):
        s.canary_p[b] = base + (top - base) * min(1.0, (b * BUCKET - start) / length)
        if s.fault_start is None and s.canary_p[b] > threshold:
            s.fault_start = b * BUCKET  # bad from the moment it crosses the threshold
    assert s.fault_start is not None
    s.story += (
        f"; ramp from {_when(start)} to {top:.1%} over {_when(length)}, "
        f"over {threshold:.1%} at {_when(s.fault_start)}"
    )
    return s


def flapping(rng: random.Random, _: float) -> Scenario:
    s = _base(rng)
    blips, t = rng.randint(3, 8), rng.randrange(MINUTE, 10 * MINUTE, BUCKET)
    shown = []
    while blips and t < 88 * MINUTE:
        length = rng.randrange(20, 121, BUCKET)
        level = rng.uniform(0.02, 0.10)
        for b in range(t // BUCKET, min(BUCKETS, (t + length) // BUCKET)):
            s.canary_p[b] = level
        shown.append(f"{_when(t)} {length}s {level:.0%}")
        t += length + rng.randrange(2 * MINUTE, 15 * MINUTE, BUCKET)
        blips -= 1
    s.story += "; canary blips at " + ", ".join(shown)
    return s


def outage(rng: random.Random, _: float) -> Scenario:
    s = _base(rng)
    start = rng.randrange(2 * MINUTE, 80 * MINUTE, BUCKET)
    length = rng.randrange(MINUTE, 15 * MINUTE + 1, BUCKET)
    kind: OutageKind = rng.choice(("error", "empty"))
    s.outages.append((start, start + length, kind))
    s.story += f"; metrics source {kind} from {_when(start)} for {_when(length)}"
    return s


def shared(rng: random.Random, _: float) -> Scenario:
    s = _base(rng)
    start = rng.randrange(2 * MINUTE, 80 * MINUTE, BUCKET)
    length = rng.randrange(2 * MINUTE, 20 * MINUTE + 1, BUCKET)
    extra = rng.uniform(0.01, 0.10)
    for b in range(start // BUCKET, min(BUCKETS, (start + length) // BUCKET)):
        s.canary_p[b] += extra
        s.stable_p[b] += extra
    s.story += f"; both versions +{extra:.1%} errors from {_when(start)} for {_when(length)}"
    return s


@dataclass(frozen=True)
class Category:
    name: str
    share: float  # of the corpus
    bad: bool
    build: Callable[[random.Random, float], Scenario]


CATEGORIES = (
    Category("healthy", 0.20, False, healthy),
    Category("low traffic, healthy", 0.10, False, low_healthy),
    Category("flapping", 0.125, False, flapping),
    Category("provider outage", 0.125, False, outage),
    Category("shared incident", 0.10, False, shared),
    Category("slow burn", 0.125, True, slow_burn),
    Category("step fault", 0.125, True, step),
    Category("low traffic, step fault", 0.10, True, low_step),
)


def allocate(n: int) -> list[int]:
    """How many canaries of each category: largest remainders, so that they add up to n."""
    exact = [n * c.share for c in CATEGORIES]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    return counts


def draw_counts(
    s: Scenario, rng: random.Random, percents: Sequence[int]
) -> dict[int, dict[Role, Prefix]]:
    """Poisson counts per 10 s bucket for both versions under each canary percent."""
    per_bucket = []
    wander = 0.0
    for _ in range(HORIZON // MINUTE):  # per-minute traffic, wandering ±10% or so
        wander = 0.9 * wander + rng.gauss(0.0, 0.05)
        per_bucket += [s.rpm * math.exp(wander) * BUCKET / MINUTE] * (MINUTE // BUCKET)
    counts: dict[int, dict[Role, Prefix]] = {}
    for percent in percents:
        counts[percent] = {}
        roles: tuple[tuple[Role, float, list[float]], ...] = (
            ("canary", percent / 100, s.canary_p),
            ("stable", 1 - percent / 100, s.stable_p),
        )
        for role, share, p in roles:
            requests, errors = [0], [0]
            for b in range(BUCKETS):
                lam = per_bucket[b] * share
                bad = poisson(rng, lam * p[b])
                good = poisson(rng, lam * (1.0 - p[b]))
                requests.append(requests[-1] + bad + good)
                errors.append(errors[-1] + bad)
            counts[percent][role] = (requests, errors)
    return counts


def build_corpus(n: int, seed: int, threshold: float, percents: Sequence[int]) -> list[Canary]:
    corpus: list[Canary] = []
    for category, count in zip(CATEGORIES, allocate(n), strict=True):
        for k in range(count):
            rng = random.Random(f"coalmine-compare/{seed}/{category.name}/{k}")
            s = category.build(rng, threshold)
            assert (s.fault_start is not None) == category.bad
            canary = Canary(
                index=len(corpus),
                category=category.name,
                bad=category.bad,
                fault_start=s.fault_start,
                rpm=s.rpm,
                story=s.story,
                outages=s.outages,
                counts=draw_counts(s, rng, percents),
            )
            corpus.append(canary)
    return corpus


# ---- what a metrics source answers ------------------------------------------------------------


class Reading(NamedTuple):
    """One query's answer: a value, NaN (0/0: no request in the window), empty, or an error."""

    kind: Literal["value", "nan", "empty", "error"]
    value: float = math.nan
    samples: int = 0


class Source:
    """The metrics source as one system sees it: the counts under its own traffic split.

    The query is the runbook's: 5xx / all requests of one version over a window. With no
    request in the window it is 0/0, NaN; before the version's first request its series does
    not exist and the result is empty. During an outage it fails or comes back empty.
    Scrape delay and rate() extrapolation are left out, for every system. A scrape delay would
    add empty results at the start, which Argo counts as errors and Flagger as failed checks.
    """

    def __init__(self, canary: Canary, percent: int) -> None:
        self.canary = canary
        self.splits: list[tuple[int, int]] = [(0, percent)]  # (from bucket, canary percent)

    def set_percent(self, t: int, percent: int) -> None:
        self.splits.append((t // BUCKET, percent))

    def _sum(self, role: Role, which: int, lo: int, hi: int) -> int:
        total = 0
        for i, (start, percent) in enumerate(self.splits):
            end = self.splits[i + 1][0] if i + 1 < len(self.splits) else BUCKETS
            a, b = max(lo, start), min(hi, end)
            if a < b:
                prefix = self.canary.counts[percent][role][which]
                total += prefix[b] - prefix[a]
        return total

    def query(self, role: Role, t: int, window: int) -> Reading:
        outage = self.canary.outage_at(t)
        if outage is not None:
            return Reading(outage)
        hi = min(t // BUCKET, BUCKETS)
        lo = max(0, hi - window // BUCKET)
        if role == "canary" and self._sum(role, 0, 0, hi) == 0:
            return Reading("empty")  # no series yet: the canary has served no request
        requests = self._sum(role, 0, lo, hi)
        if requests == 0:
            return Reading("nan")
        return Reading("value", self._sum(role, 1, lo, hi) / requests, requests)


# ---- the three systems ------------------------------------------------------------------------


class Result(NamedTuple):
    action: Literal["rollback", "promote", "held"]
    t: int  # seconds after the canary started
    why: str = ""  # what made the decision
    paged: bool = False  # coalmine: an "inconclusive" page went to a person
    no_data: bool = False  # the rollback counted a failed query or no data against the canary


@dataclass(frozen=True)
class Setup:
    """What the systems share: the policy's schedule, threshold and window."""

    policy: Policy
    rules: tuple[Rule, ...]  # the rules coalmine is given
    threshold: float
    window: int  # seconds
    weights: tuple[int, ...]  # below 100
    holds: tuple[int, ...]  # seconds, one per weight

    @classmethod
    def of(cls, full: Policy) -> Setup:
        """The runbook cut down to its error-rate rollback rule, the gates on that query and
        the compare rules on 5xx among requests."""
        rate = next(r for r in full.rules if r.name == RATE_RULE)
        rules = tuple(
            r
            for r in full.rules
            if r is rate
            or (r.query == rate.query and r.gating and "canary" in r.phases)
            or (r.compare is not None and 'code=~"5.."' in (r.events or ""))
        )
        policy = full.model_copy(update={"rules": list(rules)})
        steps = [s for s in full.steps if s.weight < 100]
        return cls(
            policy=policy,
            rules=rules,
            threshold=rate.threshold,
            window=int(rate.window.total_seconds()),
            weights=tuple(s.weight for s in steps),
            holds=tuple(int(s.hold.total_seconds()) for s in steps),
        )


def _observation(rule: str, role: Role, r: Reading, counts: bool = False) -> Observation:
    if r.kind == "error":
        return Observation(rule, role, None, error="query failed")
    if r.kind == "empty":
        return Observation(rule, role, None)
    if counts:  # a compare rule: the window's events among its requests
        events = 0.0 if r.kind == "nan" else round(r.value * r.samples)
        return Observation(rule, role, None, float(r.samples), events=float(events))
    return Observation(rule, role, r.value, float(r.samples))


def run_coalmine(setup: Setup, engine: Engine, canary: Canary) -> Result:
    """coalmine's engine, ticked every ``analysis.interval`` with both versions' observations."""
    source = Source(canary, setup.weights[0])
    interval = int(setup.policy.analysis.interval.total_seconds())
    windows = [(r.name, int(r.window.total_seconds()), r.compare is not None) for r in setup.rules]
    state = engine.new_state(SCRIPT)
    live = Deployment.of("v1", "v2", setup.weights[0])
    state = engine.observe_deployment(state, live, TUESDAY_10AM).state
    paged = False
    for t in range(interval, HORIZON + 1, interval):
        observations = [
            _observation(name, role, source.query(role, t, window), counts)
            for name, window, counts in windows
            for role in ("canary", "stable")
        ]
        outcome = engine.tick(state, TUESDAY_10AM + timedelta(seconds=t), observations)
        state = outcome.state
        for d in outcome.decisions:
            if d.action in ("rollback", "promote"):
                return Result(d.action, t, d.rule or "", paged)
            if d.action == "set_traffic" and d.canary_percent is not None:
                source.set_percent(t, d.canary_percent)
            if d.action == "page" and (d.dedup_key or "").endswith("/inconclusive"):
                paged = True
    why = state.hold_reason or ""
    return Result("held", HORIZON, why, paged)


def run_flagger(setup: Setup, canary: Canary) -> Result:
    """Flagger's analysis loop (fluxcd/flagger pkg/controller/scheduler.go, advanceCanary).

    - Every ``interval`` (1 min) the loop first checks ``failedChecks >= threshold`` and rolls
      back if so; only then does it run the metric checks. So the rollback comes one interval
      after the 5th failed check: detection ≈ interval * threshold (prior-art.md).
    - ``failedChecks`` is cumulative and never reset by a passing check (prior-art.md): five
      scattered blips in a canary roll it back.
    - A query error, or "no values found" (no series, or NaN from 0/0 when the canary had no
      request in the window), fails the check (scheduler_metrics.go; prior-art.md: #1035,
      #1090, #1330, #1633, #1689).
    - request-success-rate with ``thresholdRange.min``: fails when the success rate is below
      the minimum. Flagger's usual example is 99 (1% errors); we use 99.5 (0.5% errors), the
      runbook's threshold, so that all three judge the same line.
    - A failed check halts advancement (the loop returns before shifting traffic), so the
      runbook's schedule is counted in passing checks: 30 at 10%, 60 at 50%, then promotion.
    """
    source = Source(canary, setup.weights[0])
    needed = [hold // FLAGGER_INTERVAL for hold in setup.holds]
    failed = no_data = passed = step_index = 0
    for t in range(FLAGGER_INTERVAL, HORIZON + 1, FLAGGER_INTERVAL):
        if failed >= FLAGGER_THRESHOLD:
            why = f"{failed} failed checks, {no_data} of them no data or a query error"
            return Result("rollback", t, why, no_data=no_data > 0)
        r = source.query("canary", t, FLAGGER_INTERVAL)
        if r.kind != "value" or r.value > setup.threshold:
            failed += 1
            no_data += r.kind != "value"
            continue
        passed += 1
        if passed >= needed[step_index]:
            step_index += 1
            passed = 0
            if step_index == len(setup.weights):
                return Result("promote", t, f"{failed} failed checks")
            source.set_percent(t, setup.weights[step_index])
    return Result("held", HORIZON)


def run_argo(setup: Setup, canary: Canary) -> Result:
    """Argo Rollouts: canary steps setWeight/pause, with a background AnalysisRun from step 0.

    The AnalysisTemplate has one metric, the runbook's query over ``[1m]``, ``interval: 1m``,
    ``failureCondition: result[0] > 0.005`` and nothing else, so every default applies
    (argoproj/argo-rollouts analysis/analysis.go; prior-art.md):

    - no ``initialDelay``: the first measurement is taken when the run starts;
    - ``failureLimit: 0``: the first Failed measurement (failed > 0) fails the run and the
      rollout aborts, canary weight to 0;
    - an empty result is an Error (``result[0]`` of an empty vector, #1466), and so is a failed
      query; an errored measurement is retried after 10 s (DefaultErrorRetryInterval), and the
      5th consecutive error (> consecutiveErrorLimit 4) errors the run and aborts the rollout:
      about 40 s of outage;
    - NaN passes: ``NaN > 0.005`` is false, and with no successCondition the measurement is
      Successful (the template fails open);
    - the steps do not wait for the analysis: promotion comes after the pauses (30 + 60 min).
    """
    source = Source(canary, setup.weights[0])
    changes = []  # (time, percent), percent 100 = promotion
    at = 0
    for i, hold in enumerate(setup.holds):
        at += hold
        changes.append((at, setup.weights[i + 1] if i + 1 < len(setup.weights) else 100))
    t = errors = failed = 0
    while t <= HORIZON:
        while changes and changes[0][0] <= t:
            when, percent = changes.pop(0)
            if percent == 100:
                return Result("promote", when)
            source.set_percent(when, percent)
        r = source.query("canary", t, ARGO_INTERVAL)
        if r.kind in ("error", "empty"):
            errors += 1
            if errors > ARGO_CONSECUTIVE_ERROR_LIMIT:
                why = f"Error: {errors} consecutive errors ({r.kind})"
                return Result("rollback", t, why, no_data=True)
            t += ARGO_ERROR_RETRY
            continue
        errors = 0
        if r.value > setup.threshold:  # False for NaN: it passes
            failed += 1
            if failed > ARGO_FAILURE_LIMIT:
                why = f"Failed: {r.value:.4f} > {setup.threshold:g} ({r.samples} requests)"
                return Result("rollback", t, why)
        t += ARGO_INTERVAL
    return Result("held", HORIZON)


SYSTEMS = ("coalmine", "Flagger", "Argo Rollouts")


def run_all(setup: Setup, corpus: list[Canary]) -> dict[str, list[Result]]:
    engine = Engine(setup.policy, Options())
    return {
        "coalmine": [run_coalmine(setup, engine, c) for c in corpus],
        "Flagger": [run_flagger(setup, c) for c in corpus],
        "Argo Rollouts": [run_argo(setup, c) for c in corpus],
    }


# ---- scoring ----------------------------------------------------------------------------------


@dataclass
class Score:
    """One system over a set of canaries."""

    healthy: int = 0
    false_rollbacks: int = 0
    healthy_promoted: int = 0
    healthy_held: int = 0
    healthy_paged: int = 0  # coalmine: an inconclusive page was sent
    promote_minutes: list[float] = field(default_factory=list)  # healthy canaries promoted
    bad: int = 0
    missed_promoted: int = 0
    missed_held: int = 0
    missed_held_paged: int = 0
    early: int = 0  # bad canaries rolled back before their fault started
    detect: list[float] = field(default_factory=list)  # minutes from fault start to rollback

    @property
    def missed(self) -> int:
        return self.missed_promoted + self.missed_held

    def add(self, canary: Canary, r: Result) -> None:
        if not canary.bad:
            self.healthy += 1
            self.false_rollbacks += r.action == "rollback"
            self.healthy_held += r.action == "held"
            self.healthy_paged += r.paged
            if r.action == "promote":
                self.healthy_promoted += 1
                self.promote_minutes.append(r.t / 60)
            return
        assert canary.fault_start is not None
        self.bad += 1
        if r.action == "rollback":
            if r.t < canary.fault_start:
                self.early += 1
            else:
                self.detect.append((r.t - canary.fault_start) / 60)
        elif r.action == "promote":
            self.missed_promoted += 1
        else:
            self.missed_held += 1
            self.missed_held_paged += r.paged


def score(corpus: list[Canary], results: list[Result], category: str | None = None) -> Score:
    s = Score()
    for canary, r in zip(corpus, results, strict=True):
        if category is None or canary.category == category:
            s.add(canary, r)
    return s


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _minutes(values: list[float], q: float) -> str:
    if not values:
        return "-"
    value = statistics.median(values) if q == 0.5 else percentile(values, q)
    return f"{value:.1f} min"


def _count(k: int, n: int) -> str:
    return f"{k} ({k / n:.0%})" if n else "-"


# ---- reporting --------------------------------------------------------------------------------


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        for row in rows:
            print("| " + " | ".join(row) + " |")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        print("  ".join(cells).rstrip())


def summary(corpus: list[Canary], results: dict[str, list[Result]], markdown: bool) -> None:
    first = score(corpus, results[SYSTEMS[0]])
    header = (
        "system",
        f"false rollbacks (of {first.healthy} healthy)",
        f"missed (of {first.bad} bad)",
        "missed: promoted",
        "missed: held at 2 h",
        "bad rolled back before its fault",
        "detect median",
        "detect p95",
    )
    rows = []
    for name in SYSTEMS:
        s = score(corpus, results[name])
        held = str(s.missed_held)
        if s.missed_held_paged:
            held += f" ({s.missed_held_paged} paged)"
        rows.append(
            (
                name,
                _count(s.false_rollbacks, s.healthy),
                _count(s.missed, s.bad),
                str(s.missed_promoted),
                held,
                str(s.early),
                _minutes(s.detect, 0.5),
                _minutes(s.detect, 0.95),
            )
        )
    print_table(header, rows, markdown)


def by_category(corpus: list[Canary], results: dict[str, list[Result]], markdown: bool) -> None:
    healthy_rows, bad_rows = [], []
    for category in CATEGORIES:
        scores = [score(corpus, results[name], category.name) for name in SYSTEMS]
        n = scores[0].bad if category.bad else scores[0].healthy
        if not n:
            continue
        if not category.bad:
            cells = [_count(s.false_rollbacks, n) for s in scores]
            coal = scores[0]
            extra = (str(coal.healthy_held), str(coal.healthy_paged))
            healthy_rows.append((category.name, str(n), *cells, *extra))
            continue
        cells = []
        for s in scores:
            detect = "-"
            if s.detect:
                detect = f"{_minutes(s.detect, 0.5)} / {_minutes(s.detect, 0.95)}"
            early = f" ({s.early} early)" if s.early else ""
            cells.append(f"{s.missed}{early}; {detect}")
        bad_rows.append((category.name, str(n), *cells))
    print("Healthy canaries: false rollbacks (count, share of the category)")
    header = ("category", "n", *SYSTEMS, "coalmine: held at 2 h", "coalmine: paged inconclusive")
    print_table(header, healthy_rows, markdown)
    print()
    print(
        "Bad canaries: missed (and rolled back before the fault); "
        "time to detect from the fault's start, median / p95"
    )
    print_table(("category", "n", *SYSTEMS), bad_rows, markdown)


def notes(corpus: list[Canary], results: dict[str, list[Result]]) -> None:
    """Figures behind the discussion in docs/benchmarks.md."""
    for name in SYSTEMS:
        s = score(corpus, results[name])
        healthy = [r for c, r in zip(corpus, results[name], strict=True) if not c.bad]
        false = [r for r in healthy if r.action == "rollback"]
        line = f"{name}: healthy promoted {_count(s.healthy_promoted, s.healthy)}"
        if s.promote_minutes:
            line += f", after {statistics.median(s.promote_minutes):.1f} min median"
            line += f" ({max(s.promote_minutes):.1f} at most)"
        if false:
            no_data = sum(r.no_data for r in false)
            first = sum(r.t <= 2 * MINUTE for r in false)
            line += (
                f"; of its false rollbacks, {no_data} counted a failed query or no data "
                f"against the canary and {first} came in the first 2 minutes"
            )
        print(line)


def detail(corpus: list[Canary], results: dict[str, list[Result]]) -> None:
    for canary in corpus:
        label = "BAD" if canary.bad else "ok"
        print(f"#{canary.index:<4} {canary.category:<24} {label:<3} {canary.story}")
        for name in SYSTEMS:
            r = results[name][canary.index]
            said = [x for x in (r.why, "paged inconclusive" if r.paged else "") if x]
            why = f" ({'; '.join(said)})" if said else ""
            print(f"      {name + ':':<15} {r.action} at {_when(r.t)}{why}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=1, help="corpus seed (1)")
    parser.add_argument("--n", type=int, default=240, help="canaries in the corpus (240)")
    parser.add_argument("--policy", type=Path, default=RUNBOOK, help="default: the runbook")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--detail", action="store_true", help="one line per canary and system")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    started = time.perf_counter()
    setup = Setup.of(load_policy(args.policy))
    corpus = build_corpus(args.n, args.seed, setup.threshold, setup.weights)
    built = time.perf_counter()
    results = run_all(setup, corpus)
    done = time.perf_counter()

    print("coalmine head-to-head: coalmine vs Flagger vs Argo Rollouts")
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; python {platform.python_version()}")
    print(f"date:    {datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"code:    {code_version('daemon/coalmine', 'policies')}")
    rules = ", ".join(r.name for r in setup.rules)
    bad = sum(c.bad for c in corpus)
    healthy = len(corpus) - bad
    print(f"corpus:  {len(corpus)} canaries (seed {args.seed}): {healthy} healthy, {bad} bad")
    print(
        f"judged:  error rate > {setup.threshold:g} over {setup.window}s windows; "
        f"coalmine rules: {rules}"
    )
    print(f"time:    corpus {built - started:.1f} s, systems {done - built:.1f} s")
    print()
    summary(corpus, results, args.markdown)
    print()
    by_category(corpus, results, args.markdown)
    print()
    notes(corpus, results)
    if args.detail:
        print()
        detail(corpus, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
