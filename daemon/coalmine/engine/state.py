"""A rollout's state: everything the engine needs to carry from one tick to the next.

The state is a plain value. The engine never mutates the state it is given; it copies what
it changes. ``to_json``/``from_json`` round-trip it without loss so the daemon can persist it
after every tick and resume exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import Enum, StrEnum
from typing import Any

from coalmine.engine.compare import Evidence
from coalmine.engine.lifecycle import RolloutPhase
from coalmine.engine.model import Deployment, decode_float, encode_float, format_time


class RuleStatus(StrEnum):
    """A rule's latest evaluation."""

    NONE = "none"  # not evaluated in this rollout yet
    OK = "ok"  # conclusive, not breaching
    BREACHING = "breaching"  # conclusive, on the wrong side of the threshold
    INCONCLUSIVE = "inconclusive"  # no data, NaN, ±Inf, error, too few samples
    WARMUP = "warmup"  # conclusive, but inside the warm-up after a traffic change

    @property
    def passes_gate(self) -> bool:
        """Only a conclusive, non-breaching, judged evaluation lets a canary advance."""
        return self is RuleStatus.OK


@dataclass(frozen=True, slots=True)
class RuleTrack:
    """One rule's latest evaluation and its breach and paging bookkeeping."""

    status: RuleStatus = RuleStatus.NONE
    value: float | None = None
    samples: float | None = None
    stable_value: float | None = None
    detail: str = ""  # why it is inconclusive, when it is
    evaluated_at: datetime | None = None
    breaching: bool = False  # value on the wrong side, judged or not (exported in warm-up too)
    breached_since: datetime | None = None
    tripped: bool = False
    inconclusive_since: datetime | None = None
    paged: bool = False  # a trip page is open under the rule's dedup key
    inconclusive_paged: bool = False  # an inconclusive page is open
    # compare rules: the ratio's confidence interval and the step's evidence so far
    interval_low: float | None = None
    interval_high: float | None = None
    evidence: Evidence | None = None
    # absolute rules: the stable version's evaluation at this tick was conclusive and breaching;
    # ``shared``: a tripped rollback rule is holding for a shared incident instead of rolling back
    stable_breaching: bool = False
    shared: bool = False

    def cleared(self) -> RuleTrack:
        """The same track with its breach tracking forgotten (after a traffic change). A compare
        rule's evidence carries on: each window is judged at its own split."""
        if self.breached_since is None and not self.tripped:
            return self
        return _replace(self, breached_since=None, tripped=False, shared=False)


@dataclass(slots=True)
class RolloutState:
    """One Worker script's rollout. Mutated only by the engine, on its own copy."""

    script: str
    phase: RolloutPhase = RolloutPhase.IDLE
    stable: str | None = None
    canary: str | None = None
    step: int = 0  # index into the policy's steps
    canary_percent: int = 0  # the split coalmine believes is live (or would be, in dry run)
    started_at: datetime | None = None
    step_started_at: datetime | None = None
    warmup_until: datetime | None = None
    promoted_at: datetime | None = None
    stood_down_from: RolloutPhase | None = None
    expected: Deployment | None = None  # what coalmine last set or adopted: drift is live != this
    live: Deployment | None = None  # the live deployment as last seen
    hold_reason: str | None = None  # the blockers last reported, so each is reported once
    last_tick: datetime | None = None
    rules: dict[str, RuleTrack] = field(default_factory=dict)

    def copy(self) -> RolloutState:
        """A copy the engine may change; rule tracks are immutable and shared."""
        clone = _copy_slots(self)
        clone.rules = dict(self.rules)
        return clone

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (strict JSON: no NaN literals)."""
        out = {f.name: _encode(getattr(self, f.name)) for f in fields(self) if f.name != "rules"}
        out["rules"] = {
            name: {f.name: _encode(getattr(track, f.name)) for f in fields(track)}
            for name, track in self.rules.items()
        }
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RolloutState:
        """The inverse of :meth:`to_json`."""
        state = cls(script=data["script"])
        for f in fields(cls):
            if f.name in ("script", "rules") or f.name not in data:
                continue
            setattr(state, f.name, _decode(f.name, data[f.name]))
        state.rules = {
            name: RuleTrack(**{k: _decode(k, v) for k, v in track.items()})
            for name, track in data.get("rules", {}).items()
        }
        return state


_TIMES = {
    "started_at",
    "step_started_at",
    "warmup_until",
    "promoted_at",
    "last_tick",
    "evaluated_at",
    "breached_since",
    "inconclusive_since",
}
_FLOATS = {"value", "samples", "stable_value", "interval_low", "interval_high"}


def _encode(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, Evidence):
        return value.to_json()
    if isinstance(value, Deployment):
        return {
            "stable": value.stable,
            "canary": value.canary,
            "canary_percent": value.canary_percent,
        }
    return value


def _decode(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _TIMES:
        return datetime.fromisoformat(value)
    if name in _FLOATS:
        return decode_float(value)
    if name in ("phase", "stood_down_from"):
        return RolloutPhase(value)
    if name == "status":
        return RuleStatus(value)
    if name == "evidence":
        return Evidence.from_json(value)
    if name in ("expected", "live"):
        return Deployment(value["stable"], value["canary"], value["canary_percent"])
    return value


def replace_track(track: RuleTrack, **changes: Any) -> RuleTrack:
    """A copy of ``track`` with ``changes``."""
    return _replace(track, **changes)


def _replace(track: RuleTrack, **changes: Any) -> RuleTrack:
    values = {f.name: getattr(track, f.name) for f in fields(track)}
    values.update(changes)
    return RuleTrack(**values)


def _copy_slots(state: RolloutState) -> RolloutState:
    clone = object.__new__(RolloutState)
    for name in RolloutState.__slots__:
        object.__setattr__(clone, name, getattr(state, name))
    return clone
