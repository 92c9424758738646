"""A rollout's state: everything the engine needs to carry from one tick to the next.

The state is a plain value. The engine never mutates the state it is given; it copies what
it changes. ``to_json``/``from_json`` round-trip it without loss so the daemon can persist it
and resume exactly where it stopped; ``durable`` is the part a restart needs, so the daemon
commits a tick only when that part changed (or the tick decided something).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from enum import Enum, StrEnum
from operator import attrgetter
from typing import Any, NamedTuple

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


class RuleTrack(NamedTuple):
    """One rule's latest evaluation and its breach and paging bookkeeping.

    Immutable, as a named tuple rather than a frozen dataclass: the engine builds one per rule
    at every tick, and a frozen dataclass's ``__init__`` costs about twice as much (one
    ``object.__setattr__`` call per field).
    """

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
        return self._replace(breached_since=None, tripped=False, shared=False)


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
        # Field by field: the engine copies the state at every call, and this is several
        # times faster than a loop over the slots (tests/unit/test_engine_speedups.py checks
        # that every field is copied).
        clone = _new_state(RolloutState)
        clone.script = self.script
        clone.phase = self.phase
        clone.stable = self.stable
        clone.canary = self.canary
        clone.step = self.step
        clone.canary_percent = self.canary_percent
        clone.started_at = self.started_at
        clone.step_started_at = self.step_started_at
        clone.warmup_until = self.warmup_until
        clone.promoted_at = self.promoted_at
        clone.stood_down_from = self.stood_down_from
        clone.expected = self.expected
        clone.live = self.live
        clone.hold_reason = self.hold_reason
        clone.last_tick = self.last_tick
        clone.rules = dict(self.rules)
        return clone

    def durable(self) -> tuple[object, ...]:
        """What a restart needs of this state, in a form to compare: everything but the
        readings of the latest evaluation, which the next tick takes again (each rule's value,
        samples, stable value, detail, evaluation time, confidence interval and whether the
        stable version breached) and ``last_tick``. Two states with equal ``durable()``
        resume the same rollout: the breach and inconclusive clocks, the pages, a compare
        rule's evidence, the step and its hold are all in it (docs/reliability.md)."""
        rules = {name: _durable_track(track) for name, track in self.rules.items()}
        return _durable_fields(self), rules  # a dict: the rules' order does not matter

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (strict JSON: no NaN literals)."""
        values = zip(_STATE_FIELDS, _state_values(self), strict=True)
        out = {name: _encode(value) for name, value in values}
        out["rules"] = {
            name: {key: _encode(value) for key, value in zip(_TRACK_FIELDS, track, strict=True)}
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
    return track._replace(**changes)


_new_state = object.__new__
_TRACK_FIELDS = RuleTrack._fields
_STATE_FIELDS = tuple(f.name for f in fields(RolloutState) if f.name != "rules")
_state_values = attrgetter(*_STATE_FIELDS)
_durable_fields = attrgetter(*(name for name in _STATE_FIELDS if name != "last_tick"))
_durable_track = attrgetter(
    "status",
    "breaching",
    "breached_since",
    "tripped",
    "inconclusive_since",
    "paged",
    "inconclusive_paged",
    "evidence",
    "shared",
)
