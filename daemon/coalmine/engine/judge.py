"""Judging one rule at one tick: inconclusive, breaching, sustained.

This is DESIGN.md's "Rule semantics" and nothing else; the engine decides what a trip does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from coalmine.engine.compare import DEFAULT_HORIZON, Evidence
from coalmine.engine.model import Observation
from coalmine.engine.state import RuleStatus, RuleTrack, replace_track
from coalmine.policy import Rule

COMPARE_MIN_SAMPLES = 1000.0
"""A compare rule without ``min_samples`` cannot pass until the canary served this many requests
in the step: with fewer, "no evidence the canary is worse" is mostly no evidence at all (at a
0.5% error rate, a thousand requests are five errors). It can breach at any count."""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A policy rule reduced to what judging it needs, computed once."""

    name: str
    above: bool
    threshold: float
    for_: timedelta
    min_samples: float | None
    on_breach: str
    gating: bool
    severity: str
    window: timedelta
    phases: frozenset[str]
    confidence: float | None = None  # set for compare rules only (threshold is max_ratio)
    shared_hold: bool = False  # a rollback rule holds while the stable version breaches too
    when: str | None = None  # webhook rules: before_advance | every_tick | after_promotion | ...
    horizon: int = DEFAULT_HORIZON  # compare rules: the canary's planned length, in windows

    @property
    def compares(self) -> bool:
        """Whether the rule judges the canary against the stable version."""
        return self.confidence is not None

    @classmethod
    def of(cls, rule: Rule, canary_hold: timedelta = timedelta(0)) -> CompiledRule:
        """Compile a validated policy rule; ``canary_hold``: the policy's canary steps' holds
        together (a compare rule's change detector is tuned to that length)."""
        default_severity = "critical" if rule.on_breach == "rollback" else "error"
        min_samples = rule.min_samples
        if rule.compare is not None and min_samples is None:
            min_samples = COMPARE_MIN_SAMPLES
        when = rule.when if rule.source == "webhook" else None
        on_breach, phases = rule.on_breach, frozenset(rule.phases)
        if when == "after_promotion":
            phases = frozenset({"post_promotion"})
        elif when == "after_rollback":  # runs after a rollback: there is nothing to roll back
            on_breach, phases, default_severity = "page", frozenset(), "critical"
        return cls(
            name=rule.name,
            above=rule.below is None or rule.compare is not None,
            threshold=rule.threshold,
            for_=rule.for_,
            min_samples=min_samples,
            on_breach=on_breach,
            gating=rule.gating,
            severity=rule.severity
            if on_breach != "rollback" and rule.severity
            else default_severity,
            window=rule.window,
            phases=phases,
            confidence=rule.compare.confidence if rule.compare is not None else None,
            shared_hold=rule.shared_incident == "hold" and on_breach == "rollback",
            when=when,
            horizon=max(1, math.ceil(canary_hold / rule.window))
            if canary_hold
            else DEFAULT_HORIZON,
        )

    @property
    def operator(self) -> str:
        """``>`` or ``<``: the comparison that breaches."""
        return ">" if self.above else "<"


def inconclusive_reason(rule: CompiledRule, obs: Observation | None) -> str | None:
    """Why an observation cannot be judged, or None when it is conclusive."""
    if obs is None:
        return "no observation"
    if obs.error is not None:
        return f"source error: {obs.error}"
    value = obs.value
    if value is None:
        return "no data"
    if math.isnan(value):
        return "value is NaN"
    if math.isinf(value):
        return "value is +Inf" if value > 0 else "value is -Inf"
    if rule.min_samples is not None:
        samples = obs.samples
        if samples is None:
            return f"no sample count (min_samples {rule.min_samples:g})"
        if not samples >= rule.min_samples:  # NaN samples fail this too
            return f"{samples:g} samples < min_samples {rule.min_samples:g}"
    return None


def conclusive(rule: CompiledRule, obs: Observation | None) -> bool:
    """``inconclusive_reason(rule, obs) is None``, without writing the reason."""
    if obs is None or obs.error is not None or obs.value is None or not math.isfinite(obs.value):
        return False
    return rule.min_samples is None or (obs.samples is not None and obs.samples >= rule.min_samples)


def judge(
    rule: CompiledRule,
    prev: RuleTrack,
    canary: Observation | None,
    stable: Observation | None,
    now: datetime,
    warming_up: bool,
) -> RuleTrack:
    """The rule's track after this tick's canary observation.

    - inconclusive: neither confirms nor clears a breach; starts the inconclusive clock;
    - warm-up: conclusive but not judged: neither starts nor clears a breach;
    - breaching: the first one sets ``breached_since``; trips at ``breached_since + for``;
    - not breaching: clears the breach and the trip.
    """
    stable_value = stable.value if stable is not None and stable.error is None else None
    # the stable version breaches too, judged as the canary would be (min_samples included);
    # the comparison first: the stable version rarely breaches (and NaN never does)
    stable_breaching = (
        stable_value is not None
        and (stable_value > rule.threshold if rule.above else stable_value < rule.threshold)
        and conclusive(rule, stable)
    )
    if canary is not None and conclusive(rule, canary):
        value = canary.value
        assert value is not None  # conclusive implies a finite value
        # breaches() and _verdict(), written out: this is the engine's most frequent path
        breaching = value > rule.threshold if rule.above else value < rule.threshold
        if warming_up:  # judged later: neither starts nor clears a breach
            status, since, tripped = RuleStatus.WARMUP, prev.breached_since, prev.tripped
        elif breaching:
            since = prev.breached_since or now
            status, tripped = RuleStatus.BREACHING, prev.tripped or now >= since + rule.for_
        else:
            status, since, tripped = RuleStatus.OK, None, False
        return RuleTrack(
            status=status,
            value=value,
            samples=canary.samples,
            stable_value=stable_value,
            detail="",
            evaluated_at=now,
            breaching=breaching,
            breached_since=since,
            tripped=tripped,
            inconclusive_since=None,
            paged=prev.paged,
            inconclusive_paged=prev.inconclusive_paged,
            stable_breaching=stable_breaching,
            shared=prev.shared and tripped,
        )
    why = inconclusive_reason(rule, canary)
    assert why is not None
    return RuleTrack(
        status=RuleStatus.INCONCLUSIVE,
        value=canary.value if canary is not None and canary.error is None else None,
        samples=canary.samples if canary is not None else None,
        stable_value=stable_value,
        detail=why,
        evaluated_at=now,
        breached_since=prev.breached_since,
        tripped=prev.tripped,
        inconclusive_since=prev.inconclusive_since or now,
        paged=prev.paged,
        inconclusive_paged=prev.inconclusive_paged,
        stable_breaching=stable_breaching,
        shared=prev.shared,
    )


def breaches(rule: CompiledRule, value: float) -> bool:
    """Whether a conclusive value is on the wrong side of the rule's threshold."""
    return value > rule.threshold if rule.above else value < rule.threshold


def _verdict(
    rule: CompiledRule, prev: RuleTrack, breaching: bool, now: datetime, warming_up: bool
) -> tuple[RuleStatus, datetime | None, bool]:
    """Status, breached_since and tripped after a conclusive evaluation."""
    if warming_up:  # judged later: neither starts nor clears a breach
        return RuleStatus.WARMUP, prev.breached_since, prev.tripped
    if breaching:
        since = prev.breached_since or now
        return RuleStatus.BREACHING, since, prev.tripped or now >= since + rule.for_
    return RuleStatus.OK, None, False


_MAX_COUNT = 1e15  # more events or requests than that in one window is a broken query


def _counts(obs: Observation | None) -> tuple[float, float] | str:
    """A compare observation's (events, samples), or why it cannot be counted."""
    if obs is None:
        return "no observation"
    if obs.error is not None:
        return f"source error: {obs.error}"
    events, samples = obs.events, obs.samples
    if events is None or samples is None:
        return "no data" if events is None else "no sample count"
    for name, count in (("events", events), ("samples", samples)):
        if not 0 <= count <= _MAX_COUNT:  # NaN fails this too
            return f"{name} is {count:g}, not a count"
    # increase() extrapolates: 0.6 of an event is one event; requests only enter as a ratio
    return float(round(events)), samples


def judge_compare(
    rule: CompiledRule,
    prev: RuleTrack,
    canary: Observation | None,
    stable: Observation | None,
    now: datetime,
    warming_up: bool,
    step_started_at: datetime | None,
) -> RuleTrack:
    """A compare rule's track after this tick: count the window, then test the evidence.

    A window is counted once, only if it starts at or after the step began and after the last
    window counted (windows never overlap, so no event is counted twice). Evidence carries
    across steps. The test then judges everything counted since the canary started: breaching
    when its change detector rejects "canary <= max_ratio x stable" at the rule's confidence (a
    regression from the start or from any later window). Either version's observation missing:
    inconclusive, as for any rule. Short of ``min_samples`` canary requests since the canary
    started (or with no stable requests): inconclusive unless the test already rejects, never a
    pass.
    """
    assert rule.confidence is not None
    max_ratio = rule.threshold
    evidence = prev.evidence or Evidence()
    canary_counts, stable_counts = _counts(canary), _counts(stable)
    why: str | None = None  # why this tick cannot be judged at all
    thin: str | None = None  # why the evidence is too thin to pass (it may still breach)
    if isinstance(canary_counts, str):
        why = canary_counts
    elif isinstance(stable_counts, str):
        why = f"stable: {stable_counts}"
    else:
        span = canary.span if canary is not None else None
        start, end = span or (now - rule.window, now)
        # ticks run a little late or early: a sliver of overlap is not a second count
        slack = rule.window / 10
        fresh = evidence.covered_until is None or start >= evidence.covered_until - slack
        if fresh and (step_started_at is None or start >= step_started_at - slack):
            # the first window of a step: a fault that shows under the new load starts here
            new_step = step_started_at is not None and (
                evidence.covered_until is None or evidence.covered_until <= step_started_at + slack
            )
            evidence = evidence.add(
                max_ratio,
                *canary_counts,
                *stable_counts,
                end=end,
                horizon=rule.horizon,
                new_step=new_step,
            )
        if rule.min_samples is not None and not evidence.canary_samples >= rule.min_samples:
            thin = (
                f"{evidence.canary_samples:g} canary requests since the canary started "
                f"< min_samples {rule.min_samples:g}"
            )
        elif evidence.stable_samples <= 0:
            thin = "no stable requests to compare with yet"
    low, high = evidence.interval(rule.confidence, max_ratio)
    stable_rate = (
        evidence.stable_events / evidence.stable_samples if evidence.stable_samples > 0 else None
    )
    common = {
        "value": evidence.estimate(),
        "samples": evidence.canary_samples,
        "stable_value": stable_rate,
        "evaluated_at": now,
        "interval_low": low,
        "interval_high": high,
        "evidence": evidence,
    }
    # The test's guarantee holds at any sample size, so a rejection counts however little
    # evidence there is; only passing needs the minimum.
    breaching = why is None and evidence.alarm(max_ratio) >= 1.0 / (1.0 - rule.confidence)
    why = why or (None if breaching else thin)
    if why is not None:
        return replace_track(
            prev,
            status=RuleStatus.INCONCLUSIVE,
            detail=why,
            breaching=False,
            inconclusive_since=prev.inconclusive_since or now,
            **common,
        )
    status, since, tripped = _verdict(rule, prev, breaching, now, warming_up)
    return replace_track(
        prev,
        status=status,
        detail="",
        breaching=breaching,
        breached_since=since,
        tripped=tripped,
        inconclusive_since=None,
        **common,
    )
