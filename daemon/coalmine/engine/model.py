"""The engine's inputs and outputs: observations, commands, deployments, options, decisions."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC as _UTC
from datetime import datetime, timedelta
from typing import Any, Literal

from coalmine.durations import format_duration

Role = Literal["canary", "stable"]
CommandKind = Literal["pause", "resume", "promote", "rollback", "start"]
Action = Literal[
    "set_traffic",
    "promote",
    "rollback",
    "hold",
    "page",
    "resolve",
    "warn",
    # Extensions of DESIGN.md's list, so that a timeline shows who took charge and when:
    "start",
    "pause",
    "resume",
]


@dataclass(frozen=True, slots=True)
class Observation:
    """One rule's measurement of one version at one tick.

    ``value`` None means no data; NaN and ±Inf are kept as floats (all three are inconclusive).
    ``error`` is set when the query failed (timeout, HTTP error, malformed response).
    A compare rule's observation counts ``events`` among ``samples`` requests in the window
    ``span`` (start, end); None: the rule's window ending at the tick.
    """

    rule: str
    role: Role
    value: float | None
    samples: float | None = None
    error: str | None = None
    events: float | None = None
    span: tuple[datetime, datetime] | None = None


@dataclass(frozen=True, slots=True)
class Command:
    """An operator's command; ``version`` only for ``start``.

    ``requested_by`` (who) and ``reason`` (why) are copied onto every decision it makes, for
    the journal's change-management trail.
    """

    kind: CommandKind
    version: str | None = None
    requested_by: str | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    """The live traffic split of one script: ``canary`` at ``canary_percent``, the rest stable.

    A single version at 100% is ``Deployment(stable=that_version)``; build through
    :meth:`of` to get that normal form from any description.
    """

    stable: str
    canary: str | None = None
    canary_percent: int = 0

    @classmethod
    def of(cls, stable: str, canary: str | None, canary_percent: int) -> Deployment:
        """The normal form: 0% is the stable alone, 100% the canary alone."""
        if canary is None or canary_percent <= 0 or canary == stable:
            return cls(stable)
        if canary_percent >= 100:
            return cls(canary)
        return cls(stable, canary, canary_percent)

    @property
    def is_split(self) -> bool:
        """True when two versions share traffic."""
        return self.canary is not None

    def describe(self) -> str:
        """``v2 at 10% over v1`` or ``v1 at 100%``."""
        if self.canary is None:
            return f"{self.stable} at 100%"
        return f"{self.canary} at {self.canary_percent}% over {self.stable}"


@dataclass(frozen=True, slots=True)
class Options:
    """The switches operators set through the environment."""

    auto_rollback: bool = True
    auto_promote: bool = True
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """One thing the engine decided, with everything needed to understand why."""

    t: datetime
    action: Action
    reason: str
    script: str
    canary: str | None = None
    stable: str | None = None
    actor: Literal["coalmine", "operator"] = "coalmine"
    canary_percent: int | None = None
    rule: str | None = None
    value: float | None = None
    threshold: float | None = None
    window: timedelta | None = None
    samples: float | None = None
    breached_since: datetime | None = None
    stable_value: float | None = None
    interval: tuple[float, float] | None = None  # a compare rule's confidence interval
    severity: str | None = None
    dedup_key: str | None = None
    dry_run: bool = False
    requested_by: str | None = None  # the person behind an operator command
    request_reason: str | None = None  # the reason they gave (``--reason``)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; absent fields are left out, non-finite values become strings."""
        out: dict[str, Any] = {"t": format_time(self.t), "action": self.action}
        for name in (
            "canary_percent",
            "rule",
            "value",
            "threshold",
            "window",
            "samples",
            "breached_since",
            "stable_value",
            "interval",
            "severity",
            "dedup_key",
            "requested_by",
            "request_reason",
        ):
            value = getattr(self, name)
            if value is not None:
                whole = name == "samples" and isinstance(value, float) and value.is_integer()
                out[name] = int(value) if whole else _json_value(value)
        out["reason"] = self.reason
        out.update(script=self.script, canary=self.canary, stable=self.stable, actor=self.actor)
        if self.dry_run:
            out["dry_run"] = True
        return out


def format_time(t: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, seconds precision unless there are fractions."""
    text = t.astimezone(_UTC).isoformat()
    return text.replace("+00:00", "Z")


def _json_value(value: object) -> object:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float):
        return encode_float(value)
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, timedelta):
        return format_duration(value)
    return value


def encode_float(value: float) -> float | str:
    """A float for JSON: NaN and ±Inf as the strings the replay format uses."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return value


def decode_float(value: float | int | str | None) -> float | None:
    """The inverse of :func:`encode_float`; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}[value]
    return float(value)
