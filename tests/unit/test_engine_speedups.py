"""The engine's hand-written fast paths: ``copy`` keeps every field, ``durable`` the right
ones, ``conclusive`` says what ``inconclusive_reason`` says."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalmine.engine import (
    Deployment,
    Observation,
    RolloutPhase,
    RolloutState,
    RuleStatus,
    RuleTrack,
)
from coalmine.engine.compare import Evidence
from coalmine.engine.judge import CompiledRule, conclusive, inconclusive_reason
from coalmine.policy import Rule

T = datetime(2026, 3, 3, 18, tzinfo=UTC)
READINGS = (
    "value",
    "samples",
    "stable_value",
    "detail",
    "evaluated_at",
    "interval_low",
    "interval_high",
    "stable_breaching",
)


def full_state() -> RolloutState:
    """A state with no field left at its default."""
    track = RuleTrack(
        status=RuleStatus.BREACHING,
        value=0.2,
        samples=900.0,
        stable_value=0.01,
        detail="x",
        evaluated_at=T,
        breaching=True,
        breached_since=T - timedelta(minutes=1),
        tripped=True,
        inconclusive_since=T - timedelta(minutes=2),
        paged=True,
        inconclusive_paged=True,
        interval_low=1.1,
        interval_high=3.0,
        evidence=Evidence(canary_events=3.0, canary_samples=900.0, windows=2),
        stable_breaching=True,
        shared=True,
    )
    return RolloutState(
        script="api",
        phase=RolloutPhase.STOOD_DOWN,
        stable="v1",
        canary="v2",
        step=1,
        canary_percent=50,
        started_at=T - timedelta(hours=1),
        step_started_at=T - timedelta(minutes=30),
        warmup_until=T - timedelta(minutes=29),
        promoted_at=T - timedelta(minutes=5),
        stood_down_from=RolloutPhase.CANARY,
        expected=Deployment("v1", "v2", 50),
        live=Deployment("v1", "v2", 40),
        hold_reason="window",
        last_tick=T,
        rules={"error_rate": track},
    )


def test_copy_keeps_every_field() -> None:
    """A copy equals its original field by field, with a rules dict of its own."""
    state = full_state()
    clone = state.copy()
    for f in fields(RolloutState):
        assert getattr(clone, f.name) == getattr(state, f.name), f.name
    assert clone.rules is not state.rules


def test_every_field_of_a_full_state_differs_from_the_default() -> None:
    """The fixture above leaves no field at its default (or the copy test would miss one)."""
    state, default = full_state(), RolloutState(script="other")
    for f in fields(RolloutState):
        assert getattr(state, f.name) != getattr(default, f.name), f.name
    track = state.rules["error_rate"]
    for name, value in zip(RuleTrack._fields, track, strict=True):
        assert value != RuleTrack._field_defaults.get(name), name


@pytest.mark.parametrize("name", READINGS)
def test_durable_leaves_out_the_latest_readings(name: str) -> None:
    """Two states that differ in one rule's latest reading resume the same rollout."""
    state = full_state()
    other = state.copy()
    track = other.rules["error_rate"]
    changed: Any = (not getattr(track, name)) if isinstance(getattr(track, name), bool) else None
    other.rules["error_rate"] = track._replace(**{name: changed})
    other.last_tick = T + timedelta(seconds=30)
    assert other.durable() == state.durable()


@pytest.mark.parametrize(
    "name", [n for n in RuleTrack._fields if n not in READINGS] + ["rules order"]
)
def test_durable_keeps_the_rest(name: str) -> None:
    """A change to any other field of a rule's track shows in ``durable()``; the order of the
    rules does not (a state read back from the store has them sorted)."""
    state = full_state()
    state.rules["a_rule"] = RuleTrack()
    other = state.copy()
    if name == "rules order":
        other.rules = dict(reversed(list(other.rules.items())))
        assert other.durable() == state.durable()
        return
    track = other.rules["error_rate"]
    value = getattr(track, name)
    changed = not value if isinstance(value, bool) else RuleStatus.OK if name == "status" else None
    other.rules["error_rate"] = track._replace(**{name: changed})
    assert other.durable() != state.durable()


@pytest.mark.parametrize(
    "name", [f.name for f in fields(RolloutState) if f.name not in ("rules", "last_tick")]
)
def test_durable_keeps_every_state_field(name: str) -> None:
    """A change to any field of the state but ``last_tick`` shows in ``durable()``."""
    state = full_state()
    other = state.copy()
    setattr(other, name, getattr(RolloutState(script="other"), name))
    assert other.durable() != state.durable()


OBSERVATIONS = st.builds(
    Observation,
    rule=st.just("r"),
    role=st.just("canary"),
    value=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    samples=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    error=st.one_of(st.none(), st.just("timeout")),
)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.none(), OBSERVATIONS), st.one_of(st.none(), st.floats(0, 1e6)))
def test_conclusive_is_inconclusive_reason_none(obs: Observation | None, least: float) -> None:
    """``conclusive`` (the engine's fast check) agrees with ``inconclusive_reason`` always."""
    rule = CompiledRule.of(
        Rule.model_validate(
            {"name": "r", "source": "prometheus", "query": "q", "window": "1m", "above": 1.0}
            | ({"min_samples": least} if least is not None else {})
        )
    )
    assert conclusive(rule, obs) == (inconclusive_reason(rule, obs) is None)
