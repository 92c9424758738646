"""``coalmine replay``: the pure engine over recorded observations (DESIGN.md's replay format).

Each input line is one of::

    {"t": …, "deployment": {"canary": "v2", "stable": "v1", "canary_percent": 10}}
    {"t": …, "rule": "error_rate", "version": "canary"|"stable", "value": 0.01, "samples": 1800}
    {"t": …, "rule": "error_rate", "version": "canary", "error": "timeout"}
    {"t": …, "rule": "errors_vs_stable", "version": "canary", "events": 3, "samples": 1800}
    {"t": …, "command": "pause"|"resume"|"promote"|"rollback"}   (or "start" with "version")
    {"t": …, "freeze": "PagerDuty incident #7 …"|null}   (an incident freeze from t on; null lifts)

Lines sharing a ``t`` form one tick: deployments and commands apply first, in file order, then
the engine evaluates the tick's observations (only when there are any).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC as _UTC
from datetime import datetime
from typing import Any, NamedTuple, get_args

from coalmine.engine import Command, Decision, Deployment, Engine, Observation
from coalmine.engine.model import CommandKind, encode_float, format_time
from coalmine.errors import ReplayFormatError

_COMMANDS = get_args(CommandKind)
_EARLIEST = datetime(1970, 1, 1, tzinfo=_UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=_UTC)  # room for every duration added to it
_VALUE_STRINGS = {"NaN": math.nan, "+Inf": math.inf, "-Inf": -math.inf}


class Record(NamedTuple):
    """One parsed input line: exactly one of deployment, command, observation, freeze is set
    (``freeze`` "" lifts a freeze). A named tuple: a day's replay builds a hundred thousand."""

    t: datetime
    line: int
    deployment: Deployment | None = None
    command: Command | None = None
    observation: Observation | None = None
    freeze: str | None = None

    def to_json(self) -> str:
        """The record as one replay line (the inverse of parsing it)."""
        out: dict[str, Any] = {"t": format_time(self.t)}
        if self.deployment is not None:
            d = self.deployment
            out["deployment"] = {
                "canary": d.canary,
                "stable": d.stable,
                "canary_percent": d.canary_percent,
            }
        elif self.command is not None:
            out["command"] = self.command.kind
            if self.command.version is not None:
                out["version"] = self.command.version
        elif self.freeze is not None:
            out["freeze"] = self.freeze or None
        elif self.observation is not None:
            o = self.observation
            out.update(rule=o.rule, version=o.role)
            if o.error is not None:
                out["error"] = o.error
            elif o.events is not None:
                out["events"] = encode_float(o.events)
            else:
                out["value"] = None if o.value is None else encode_float(o.value)
            if o.samples is not None:
                out["samples"] = encode_float(o.samples)
        return json.dumps(out)


def parse_records(
    lines: Iterable[str | bytes], file: str, rules: Iterable[str]
) -> Iterator[Record]:
    """Parse replay lines lazily; raise :class:`ReplayFormatError` naming the first bad line."""
    known = set(rules)
    last: datetime | None = None
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            raise ReplayFormatError(file, number, f"not UTF-8 text ({exc.reason})") from None
        text = text.strip()
        if not text:
            continue
        try:
            record = _parse_line(text, number, known)
        except _Bad as exc:
            raise ReplayFormatError(file, number, str(exc)) from None
        if last is not None and record.t < last:
            raise ReplayFormatError(file, number, f"t goes back in time (after {last.isoformat()})")
        last = record.t
        yield record


class _Bad(Exception):
    pass


def _parse_line(text: str, number: int, known: set[str]) -> Record:
    """One line, stripped of surrounding whitespace."""
    try:
        # JSONDecoder.decode without its two regex scans for whitespace (the line is
        # stripped); anything but one whole value goes through decode for its error message
        data, end = _SCAN(text, 0)
    except (StopIteration, ValueError):
        end = -1
    try:
        if end != len(text):
            data = _DECODER.decode(text)
    except ValueError as exc:
        raise _Bad(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _Bad("each line must be a JSON object")
    t = _time(data.get("t"))
    if "deployment" in data:
        _only(data, {"t", "deployment"})
        return Record(t, number, deployment=_deployment(data["deployment"]))
    if "command" in data:
        _only(data, {"t", "command", "version"})
        return Record(t, number, command=_command(data))
    if "freeze" in data:
        _only(data, {"t", "freeze"})
        why = data["freeze"]
        if why is not None and (not isinstance(why, str) or not why):
            raise _Bad('"freeze" must be the reason advancing is frozen, or null to lift it')
        return Record(t, number, freeze=why or "")
    if "rule" in data:
        _only(data, {"t", "rule", "version", "value", "samples", "events", "error"})
        return Record(t, number, observation=_observation(data, known))
    raise _Bad('a line needs one of "deployment", "rule", "command" or "freeze"')


def _refuse_constant(name: str) -> None:
    raise _Bad(f'bare {name} is not JSON; write the string "NaN", "+Inf" or "-Inf"')


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
# What decode() calls, with the decoder's hooks (typeshed leaves the attribute out).
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _only(data: dict[str, Any], allowed: set[str]) -> None:
    if data.keys() <= allowed:
        return
    raise _Bad(f"unknown field {sorted(set(data) - allowed)[0]!r}")


def _time(value: object) -> datetime:
    if not isinstance(value, str):
        raise _Bad('"t" must be an RFC 3339 time string, e.g. "2026-03-03T18:00:00Z"')
    return _parse_time(value)


@functools.lru_cache(maxsize=256)  # a tick's lines share their "t"
def _parse_time(value: str) -> datetime:
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        raise _Bad(f'"t" {value!r} is not an RFC 3339 time') from None
    if t.tzinfo is None:
        raise _Bad(f'"t" {value!r} has no timezone; add Z or an offset')
    if not _EARLIEST <= t <= _LATEST:
        raise _Bad(f'"t" {value!r} is outside 1970-01-01 .. 9000-01-01')
    return t


def _deployment(value: object) -> Deployment:
    if not isinstance(value, dict):
        raise _Bad('"deployment" must be an object with canary, stable and canary_percent')
    _only(value, {"canary", "stable", "canary_percent"})
    stable, canary, percent = (
        value.get("stable"),
        value.get("canary"),
        value.get("canary_percent", 0),
    )
    if not isinstance(stable, str) or not stable:
        raise _Bad('"deployment.stable" must be a version id')
    if canary is not None and not isinstance(canary, str):
        raise _Bad('"deployment.canary" must be a version id or null')
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise _Bad('"deployment.canary_percent" must be a whole number from 0 to 100')
    return Deployment.of(stable, canary, percent)


def _command(data: dict[str, Any]) -> Command:
    kind = data["command"]
    if kind not in _COMMANDS:
        raise _Bad(f'"command" must be one of {", ".join(_COMMANDS)}')
    version = data.get("version")
    if kind == "start" and (not isinstance(version, str) or not version):
        raise _Bad('a "start" command needs "version"')
    if kind != "start" and "version" in data:
        raise _Bad('only a "start" command takes "version"')
    return Command(kind, version)


def _observation(data: dict[str, Any], known: set[str]) -> Observation:
    rule = data["rule"]
    if not isinstance(rule, str) or rule not in known:
        raise _Bad(
            f"unknown rule {rule!r}; the policy has: {', '.join(sorted(known)) or 'no rules'}"
        )
    role = data.get("version")
    if role not in ("canary", "stable"):
        raise _Bad('"version" must be "canary" or "stable"')
    error = data.get("error")
    if error is not None and not isinstance(error, str):
        raise _Bad('"error" must be a string')
    if error is None and "value" not in data and "events" not in data:
        raise _Bad(
            'an observation needs "value" (a number, null, "NaN", "+Inf", "-Inf"), '
            '"events" (a compare rule\'s count) or "error"'
        )
    # a float is taken as it is (the usual case: no call); anything else is checked
    samples, events, value = data.get("samples"), data.get("events"), data.get("value")
    if samples is not None and type(samples) is not float:
        samples = _number(samples, "samples")
    if events is not None and type(events) is not float:
        events = _number(events, "events")
    if value is not None and type(value) is not float:
        value = _number(value, "value")
    if value is None and events is not None and samples:
        value = events / samples  # the rate, for a table; compare rules judge the counts
    return Observation(rule, role, value, samples, error, events)


def _number(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _VALUE_STRINGS:
        return _VALUE_STRINGS[value]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(f'"{name}" must be a number, null, "NaN", "+Inf" or "-Inf"')
    try:
        return float(value)
    except OverflowError:
        raise _Bad(f'"{name}" is too large for a float; write "+Inf" or "-Inf"') from None


def replay(engine: Engine, records: Iterable[Record], script: str) -> Iterator[Decision]:
    """Run the engine over records, yielding its decisions in order."""
    state = engine.new_state(script)
    pending: list[Observation] = []
    tick_at: datetime | None = None
    frozen: str | None = None
    for record in records:
        if tick_at is not None and record.t != tick_at:
            if pending:
                outcome = engine.tick(state, tick_at, pending, frozen=frozen)
                state = outcome.state
                yield from outcome.decisions
            pending = []
        tick_at = record.t
        if record.observation is not None:
            pending.append(record.observation)
            continue
        if record.freeze is not None:
            frozen = record.freeze or None
            continue
        if record.deployment is not None:
            outcome = engine.observe_deployment(state, record.deployment, record.t)
        else:
            assert record.command is not None
            outcome = engine.command(state, record.command, record.t, frozen=frozen)
        state = outcome.state
        yield from outcome.decisions
    if pending and tick_at is not None:
        yield from engine.tick(state, tick_at, pending, frozen=frozen).decisions


def format_table(decisions: Iterable[Decision]) -> Iterator[str]:
    """A readable timeline, one decision a line."""
    yield f"{'time (UTC)':<20}  {'action':<11}  {'canary':>6}  reason"
    for d in decisions:
        percent = f"{d.canary_percent}%" if d.canary_percent is not None else ""
        flag = " [dry run]" if d.dry_run else ""
        severity = f"[{d.severity}] " if d.severity else ""
        when = d.t.astimezone(_UTC).strftime("%Y-%m-%d %H:%M:%S")
        yield f"{when:<20}  {d.action:<11}  {percent:>6}  {severity}{d.reason}{flag}"


PROMOTED, ROLLED_BACK, NO_VERDICT = 0, 1, 3


def verdict(decisions: Iterable[Decision]) -> int:
    """The exit code of a replay or backtest, like ``validate``: 0 promoted, 1 rolled back,
    3 no verdict. The last real promote or rollback counts (a dry run's never do)."""
    code = NO_VERDICT
    for d in decisions:
        if d.dry_run:
            continue
        if d.action == "promote":
            code = PROMOTED
        elif d.action == "rollback":
            code = ROLLED_BACK
    return code
