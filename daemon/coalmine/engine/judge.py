"""Judging one rule at one tick: inconclusive, breaching, sustained.

This is DESIGN.md's "Rule semantics" and nothing else; the engine decides what a trip does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from coalmine.engine.model import Observation
from coalmine.engine.state import RuleStatus, RuleTrack
from coalmine.policy import Rule


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

    @classmethod
    def of(cls, rule: Rule) -> CompiledRule:
        """Compile a validated policy rule."""
        default_severity = "critical" if rule.on_breach == "rollback" else "error"
        return cls(
            name=rule.name,
            above=rule.above is not None,
            threshold=rule.threshold,
            for_=rule.for_,
            min_samples=rule.min_samples,
            on_breach=rule.on_breach,
            gating=rule.gating,
            severity=rule.severity
            if rule.on_breach != "rollback" and rule.severity
            else default_severity,
            window=rule.window,
            phases=frozenset(rule.phases),
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
    why = inconclusive_reason(rule, canary)
    stable_value = stable.value if stable is not None and stable.error is None else None
    samples = canary.samples if canary is not None else None
    value = canary.value if canary is not None and canary.error is None else None
    if why is not None:
        return RuleTrack(
            status=RuleStatus.INCONCLUSIVE,
            value=value,
            samples=samples,
            stable_value=stable_value,
            detail=why,
            evaluated_at=now,
            breached_since=prev.breached_since,
            tripped=prev.tripped,
            inconclusive_since=prev.inconclusive_since or now,
            paged=prev.paged,
            inconclusive_paged=prev.inconclusive_paged,
        )
    assert value is not None  # conclusive implies a finite value
    breaching = value > rule.threshold if rule.above else value < rule.threshold
    if warming_up:
        status, since, tripped = RuleStatus.WARMUP, prev.breached_since, prev.tripped
    elif breaching:
        status = RuleStatus.BREACHING
        since = prev.breached_since or now
        tripped = prev.tripped or now >= since + rule.for_
    else:
        status, since, tripped = RuleStatus.OK, None, False
    return RuleTrack(
        status=status,
        value=value,
        samples=samples,
        stable_value=stable_value,
        detail="",
        evaluated_at=now,
        breaching=breaching,
        breached_since=since,
        tripped=tripped,
        inconclusive_since=None,
        paged=prev.paged,
        inconclusive_paged=prev.inconclusive_paged,
    )
