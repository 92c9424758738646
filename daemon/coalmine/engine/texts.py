"""The words of decisions: how a rule's value, trip and recovery read in a page or a hold."""

from __future__ import annotations

from datetime import datetime

from coalmine.durations import format_duration
from coalmine.engine.judge import CompiledRule
from coalmine.engine.model import format_time
from coalmine.engine.state import RuleStatus, RuleTrack


def interval(rule: CompiledRule, track: RuleTrack) -> tuple[float, float] | None:
    if not rule.compares or track.interval_low is None or track.interval_high is None:
        return None
    return track.interval_low, track.interval_high


def num(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def value_text(rule: CompiledRule, track: RuleTrack) -> str:
    if rule.compares:
        return compare_text(rule, track, rule.operator)
    samples = f", {num(track.samples)} samples" if track.samples is not None else ""
    window = format_duration(rule.window)
    return f"{num(track.value)} {rule.operator} {num(rule.threshold)}, window {window}{samples}"


def compare_text(rule: CompiledRule, track: RuleTrack, operator: str) -> str:
    """``canary/stable rate ratio 4.1 (99% CI 2.4-7.9) > 1.5: canary 23 of 1800, ...``."""
    assert rule.confidence is not None
    ev = track.evidence
    counts = (
        f": canary {num(ev.canary_events)} of {num(ev.canary_samples)}, "
        f"stable {num(ev.stable_events)} of {num(ev.stable_samples)} since the canary started"
        if ev is not None
        else ""
    )
    low, high = track.interval_low, track.interval_high
    ci = (
        f" ({rule.confidence * 100:.4g}% CI {num(low)}-{num(high)})"
        if low is not None and high is not None
        else ""
    )
    return (
        f"canary/stable rate ratio {num(track.value)}{ci} {operator} "
        f"max_ratio {num(rule.threshold)}{counts}"
    )


def recovered_text(rule: CompiledRule, track: RuleTrack) -> str:
    if rule.compares:
        return compare_text(rule, track, "no longer shown above")
    bound = "<=" if rule.above else ">="
    return (
        f"{num(track.value)} {bound} {num(rule.threshold)}, window {format_duration(rule.window)}"
    )


def inconclusive_text(track: RuleTrack) -> str:
    if track.status is RuleStatus.WARMUP:
        return "in warm-up"
    if track.status is RuleStatus.NONE:
        return "not evaluated yet"
    return f"inconclusive ({track.detail})"


def when(t: datetime) -> str:
    return format_time(t.replace(microsecond=0))


def trip_text(rule: CompiledRule, track: RuleTrack, consequence: str) -> str:
    since = when(track.breached_since) if track.breached_since else "now"
    stable = ""
    if rule.compares:
        stable = f" (stable rate {num(track.stable_value)})"
    elif track.stable_value is not None:
        both = breaches(rule, track.stable_value)
        stable = (
            f" (stable {num(track.stable_value)} breaches too: both versions are affected,"
            " a shared incident rather than the canary alone)"
            if both
            else f" (stable {num(track.stable_value)})"
        )
    return (
        f"{rule.name} tripped: {value_text(rule, track)}{stable}, breaching since {since} "
        f"(for {format_duration(rule.for_)}): {consequence}"
    )


def breaches(rule: CompiledRule, value: float) -> bool:
    return value > rule.threshold if rule.above else value < rule.threshold
