"""The simulated Workers' traffic: what each version of each script serves, moment by moment.

A script receives ``requests_per_minute``, split between its versions by the percentages of the
deployment serving at each moment. Each version has a :class:`Behaviour`: the probability that
a request throws (Cloudflare analytics count it in ``errors``; the client gets Cloudflare's 500),
the probability that the Worker answers an HTTP 5xx itself (only Prometheus sees it: Cloudflare
does not count a returned 5xx as an error), lognormal latency and CPU time given by median and
p99, and subrequests per request. A :class:`Fault` changes a version's behaviour between two
instants.

Time is an input: the :class:`World` reads an injected clock and nothing else. Every change
(a split, a rate, a behaviour) takes effect at the clock's ``now``, and faults may not start in
the past, so what has been counted is never rewritten. Everything is computed lazily from that
timeline, deterministically from the seed:

- :meth:`World.counters` are Prometheus-style cumulative counters at any instant, the floor of
  the expected counts integrated over time (piecewise constant between changes), so they rise
  smoothly within a minute and never fall. One checkpoint per version at a minute boundary
  keeps them cheap: a thousand scripts cost a few milliseconds a minute.
- :meth:`World.rows` are Cloudflare-style per-minute rows, Poisson-sampled from the same
  expectations, so thin traffic is as noisy as it is in life.

With ``noise=True`` (the default) the counters' rate also wanders from minute to minute by a
seeded multiplier of about one Poisson standard deviation, and rows are sampled;
``noise=False`` makes both views exact expectations (rows rounded), for tests that assert exact
numbers.
"""

from __future__ import annotations

import dataclasses
import math
import random
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Generic, TypedDict, TypeVar, Unpack, cast

from coalmine.simulator._stats import (
    binomial,
    fractions_below,
    lognormal_mean,
    mixture_quantile,
    poisson,
)

Clock = Callable[[], datetime]
"""Returns the current time as an aware UTC datetime."""

DEFAULT_START = datetime(2026, 3, 3, 18, 0, tzinfo=UTC)
MINUTE = timedelta(minutes=1)
FOREVER = datetime.max.replace(tzinfo=UTC)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Upper bounds (seconds) of the latency histogram's buckets, +Inf implied."""

T = TypeVar("T")

# Positions in an expectation vector: counts by outcome, then sums, then histogram buckets.
_OK, _EXC, _5XX, _SUB, _LAT = range(5)
_BUCKET0 = 5
_WIDTH = _BUCKET0 + len(LATENCY_BUCKETS)


def wall_clock() -> datetime:
    """The real time, for the demo."""
    return datetime.now(UTC)


class VirtualClock:
    """A clock the caller moves: tests and backtests advance it instead of sleeping."""

    def __init__(self, start: datetime = DEFAULT_START) -> None:
        self._now = _utc(start)

    def __call__(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        """Move forward by ``delta`` (a timedelta or seconds); returns the new time."""
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        if step < timedelta(0):
            raise ValueError("a clock does not run backwards")
        self._now += step
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to ``when``, which must not be earlier than now."""
        when = _utc(when)
        if when < self._now:
            raise ValueError("a clock does not run backwards")
        self._now = when


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How one version serves its requests."""

    exception_rate: float = 0.0002  # P(request throws): Cloudflare `errors`, HTTP 500 to clients
    http_5xx_rate: float = 0.001  # P(the Worker answers 5xx itself): Prometheus only
    latency_p50: float = 0.06  # seconds, lognormal by median and p99
    latency_p99: float = 0.45
    cpu_p50_ms: float = 1.5  # CPU time per request, lognormal by median and p99
    cpu_p99_ms: float = 9.0
    subrequests_per_request: float = 1.0

    def __post_init__(self) -> None:
        for name in ("exception_rate", "http_5xx_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.exception_rate + self.http_5xx_rate > 1.0:
            raise ValueError("exception_rate + http_5xx_rate cannot exceed 1")
        for low, high in (("latency_p50", "latency_p99"), ("cpu_p50_ms", "cpu_p99_ms")):
            if not 0.0 < getattr(self, low) <= getattr(self, high):
                raise ValueError(f"need 0 < {low} <= {high}")
        if self.subrequests_per_request < 0:
            raise ValueError("subrequests_per_request cannot be negative")


class BehaviourChanges(TypedDict, total=False):
    """The fields of :class:`Behaviour` a fault may change."""

    exception_rate: float
    http_5xx_rate: float
    latency_p50: float
    latency_p99: float
    cpu_p50_ms: float
    cpu_p99_ms: float
    subrequests_per_request: float


@dataclass(frozen=True, slots=True)
class Fault:
    """Between ``start`` (inclusive) and ``end`` (exclusive) a version behaves differently."""

    script: str
    version: str
    start: datetime
    end: datetime
    changes: Mapping[str, float]

    def active_at(self, when: datetime) -> bool:
        """Whether the fault is in effect at ``when``."""
        return self.start <= when < self.end

    def apply(self, behaviour: Behaviour) -> Behaviour:
        """The behaviour with this fault's changes."""
        return dataclasses.replace(behaviour, **self.changes)


@dataclass(frozen=True, slots=True)
class Counters:
    """A version's cumulative counters at one instant, as an exporter would report them."""

    requests: int  # all requests; = ok + exceptions + http_5xx
    exceptions: int  # requests that threw (Cloudflare `errors`)
    http_5xx: int  # 5xx answers the Worker returned (not Cloudflare `errors`)
    subrequests: int
    latency_buckets: tuple[int, ...]  # cumulative count at or under each LATENCY_BUCKETS bound
    latency_sum: float  # seconds

    @property
    def ok(self) -> int:
        """Requests answered without a 5xx."""
        return self.requests - self.exceptions - self.http_5xx


@dataclass(frozen=True, slots=True)
class MinuteRow:
    """One minute of one version, as ``workersInvocationsAdaptive`` reports it."""

    minute: datetime
    version: str
    requests: int
    errors: int
    subrequests: int
    cpu_time_p50: float  # microseconds, as Cloudflare
    cpu_time_p99: float
    wall_time_p50: float  # microseconds
    wall_time_p99: float


class _Steps(Generic[T]):
    """A value that changes at instants; the latest change at or before a time wins."""

    def __init__(self, initial: T) -> None:
        self._initial = initial
        self._times: list[datetime] = []
        self._values: list[T] = []

    def set(self, when: datetime, value: T) -> None:
        if self._times and when < self._times[-1]:
            raise ValueError(f"a change at {when} comes before the last one ({self._times[-1]})")
        if self._times and when == self._times[-1]:
            self._values[-1] = value
        else:
            self._times.append(when)
            self._values.append(value)

    def at(self, when: datetime) -> T:
        i = bisect_right(self._times, when)
        return self._values[i - 1] if i else self._initial

    def inside(self, start: datetime, end: datetime) -> list[datetime]:
        """Change instants strictly between start and end."""
        return self._times[bisect_right(self._times, start) : bisect_left(self._times, end)]


@dataclass
class _Version:
    behaviour: _Steps[Behaviour]
    created: datetime  # the minute it was added: nothing was served before
    faults: list[Fault] = field(default_factory=list)
    checkpoint_at: datetime = DEFAULT_START  # expectations summed up to this minute boundary
    checkpoint: list[float] = field(default_factory=lambda: [0.0] * _WIDTH)

    def effective(self, when: datetime) -> Behaviour:
        behaviour = self.behaviour.at(when)
        for fault in self.faults:
            if fault.active_at(when):
                behaviour = fault.apply(behaviour)
        return behaviour


@dataclass
class _Script:
    rate: _Steps[float]  # requests per minute, whole script
    split: _Steps[Mapping[str, float]]  # version -> percent
    versions: dict[str, _Version] = field(default_factory=dict)


class World:
    """Every simulated script's traffic, from an injected clock and a seed."""

    def __init__(self, clock: Clock, *, seed: int = 0, noise: bool = True) -> None:
        self._clock = clock
        self.seed = seed
        self.noise = noise
        self._scripts: dict[str, _Script] = {}

    def now(self) -> datetime:
        """The clock's time (aware, UTC)."""
        return _utc(self._clock())

    # -- the timeline --------------------------------------------------------------------------

    def add_script(self, script: str, requests_per_minute: float) -> None:
        """A script with no versions yet, receiving this many requests a minute once deployed."""
        if script in self._scripts:
            raise ValueError(f"script {script!r} exists")
        _check_rate(requests_per_minute)
        self._scripts[script] = _Script(_Steps(float(requests_per_minute)), _Steps({}))

    def add_version(self, script: str, version: str, behaviour: Behaviour) -> None:
        """A version of a script; it serves nothing until a split gives it a share."""
        entry = self._script(script)
        if version in entry.versions:
            raise ValueError(f"version {version!r} of {script!r} exists")
        minute = _minute(self.now())
        entry.versions[version] = _Version(_Steps(behaviour), minute, checkpoint_at=minute)

    def scripts(self) -> list[str]:
        """Every script, in the order added."""
        return list(self._scripts)

    def versions(self, script: str) -> list[str]:
        """A script's versions, in the order added."""
        return list(self._script(script).versions)

    def set_split(self, script: str, split: Mapping[str, float]) -> None:
        """From now on, the script's traffic goes to these versions in these percentages."""
        entry = self._script(script)
        unknown = set(split) - set(entry.versions)
        if unknown:
            raise ValueError(f"unknown versions of {script!r}: {sorted(unknown)}")
        entry.split.set(self.now(), dict(split))

    def split(self, script: str, at: datetime | None = None) -> dict[str, float]:
        """The percentages serving at ``at`` (default now)."""
        return dict(self._script(script).split.at(self._at(at)))

    def set_rate(self, script: str, requests_per_minute: float) -> None:
        """From now on, the script receives this many requests a minute."""
        _check_rate(requests_per_minute)
        self._script(script).rate.set(self.now(), float(requests_per_minute))

    def set_behaviour(self, script: str, version: str, behaviour: Behaviour) -> None:
        """From now on, the version behaves like this (scheduled faults still apply)."""
        self._version(script, version).behaviour.set(self.now(), behaviour)

    def behaviour(self, script: str, version: str, at: datetime | None = None) -> Behaviour:
        """How the version behaves at ``at`` (default now), faults included."""
        return self._version(script, version).effective(self._at(at))

    def schedule_fault(
        self,
        script: str,
        version: str,
        start: datetime | None = None,
        end: datetime | None = None,
        *,
        duration: timedelta | None = None,
        **changes: Unpack[BehaviourChanges],
    ) -> Fault:
        """Change the version's behaviour from ``start`` (default now; never in the past) until
        ``end``, or for ``duration`` (default: for good)."""
        entry = self._version(script, version)
        now = self.now()
        start = now if start is None else _utc(start)
        if start < now:
            raise ValueError("a fault cannot start in the past: what was counted stays counted")
        if end is None:
            end = start + duration if duration is not None else FOREVER
        end = _utc(end)
        if end <= start:
            raise ValueError("a fault must end after it starts")
        fault = Fault(script, version, start, end, dict(cast(Mapping[str, float], changes)))
        fault.apply(entry.behaviour.at(start))  # unknown fields or bad values fail now
        entry.faults.append(fault)
        return fault

    # -- what the exporters see ----------------------------------------------------------------

    def counters(self, script: str, version: str, at: datetime | None = None) -> Counters:
        """Cumulative counters at ``at`` (default now; never later than now)."""
        state = self._version(script, version)
        at = self._at(at)
        minute = _minute(at)
        if state.checkpoint_at <= minute:
            while state.checkpoint_at < minute:
                following = state.checkpoint_at + MINUTE
                _add_into(
                    state.checkpoint, self._span(script, version, state.checkpoint_at, following)[0]
                )
                state.checkpoint_at = following
            total = list(state.checkpoint)
        else:  # an instant before the checkpoint: recount from the start, keep the checkpoint
            total, t = [0.0] * _WIDTH, state.created
            while t < minute:
                _add_into(total, self._span(script, version, t, t + MINUTE)[0])
                t += MINUTE
        if at > minute:
            _add_into(total, self._span(script, version, minute, at)[0])
        return _counters(total)

    def rows(
        self,
        script: str,
        start: datetime,
        end: datetime,
        *,
        versions: Iterable[str] | None = None,
        complete_before: datetime | None = None,
    ) -> list[MinuteRow]:
        """Per-minute rows for ``start <= t < end``, by minute then version.

        Only minutes that ended at or before ``complete_before`` (default now) are reported,
        and a version's minute without requests has no row, as in Cloudflare's analytics.
        """
        entry = self._scripts.get(script)
        if entry is None:
            return []
        start, end = _utc(start), _utc(end)
        cutoff = min(_utc(complete_before), self.now()) if complete_before else self.now()
        wanted = set(versions) if versions is not None else None
        names = [v for v in entry.versions if wanted is None or v in wanted]
        rows: list[MinuteRow] = []
        minute = _minute(start)
        while minute < end and minute + MINUTE <= cutoff:
            low, high = max(minute, start), min(minute + MINUTE, end)
            for name in names:
                row = self._row(script, name, minute, low, high)
                if row is not None:
                    rows.append(row)
            minute += MINUTE
        return rows

    # -- integration ---------------------------------------------------------------------------

    def _span(
        self, script: str, name: str, start: datetime, end: datetime, *, wobble: bool = True
    ) -> tuple[list[float], list[tuple[float, Behaviour]]]:
        """Expected counts over [start, end), inside one minute, and the behaviours mixed."""
        entry = self._scripts[script]
        version = entry.versions[name]
        cuts = {start, end, *entry.rate.inside(start, end), *entry.split.inside(start, end)}
        cuts.update(version.behaviour.inside(start, end))
        for fault in version.faults:
            cuts.update(t for t in (fault.start, fault.end) if start < t < end)
        deviation = self._wobble(script, name, _minute(start)) if wobble else 0.0
        total, parts = [0.0] * _WIDTH, []
        for low, high in pairwise(sorted(cuts)):
            per_second = entry.rate.at(low) / 60.0 * entry.split.at(low).get(name, 0.0) / 100.0
            if per_second <= 0:
                continue
            if deviation:
                per_second *= max(0.0, 1.0 + deviation / math.sqrt(max(1.0, per_second * 60.0)))
            expected = per_second * (high - low).total_seconds()
            behaviour = version.effective(low)
            _expect(total, expected, behaviour)
            parts.append((expected, behaviour))
        return total, parts

    def _row(
        self, script: str, name: str, minute: datetime, low: datetime, high: datetime
    ) -> MinuteRow | None:
        # Rows are Poisson-sampled, which is their noise: no wobble on top.
        totals, parts = self._span(script, name, low, high, wobble=False)
        expected = totals[_OK] + totals[_EXC] + totals[_5XX]
        if expected <= 0:
            return None
        if self.noise:
            rng = random.Random(f"{self.seed}/{script}/{name}/{low.isoformat()}/{high.isoformat()}")
            requests = poisson(rng, expected)
            errors = binomial(rng, requests, totals[_EXC] / expected)
        else:
            requests = round(expected)
            errors = min(requests, round(totals[_EXC]))
        if requests == 0:
            return None
        cpu = [(w, b.cpu_p50_ms, b.cpu_p99_ms) for w, b in parts]
        wall = [(w, b.latency_p50, b.latency_p99) for w, b in parts]
        return MinuteRow(
            minute=minute,
            version=name,
            requests=requests,
            errors=errors,
            subrequests=round(totals[_SUB] * requests / expected),
            cpu_time_p50=round(mixture_quantile(0.5, cpu) * 1e3, 1),
            cpu_time_p99=round(mixture_quantile(0.99, cpu) * 1e3, 1),
            wall_time_p50=round(mixture_quantile(0.5, wall) * 1e6, 1),
            wall_time_p99=round(mixture_quantile(0.99, wall) * 1e6, 1),
        )

    def _wobble(self, script: str, version: str, minute: datetime) -> float:
        """This minute's seeded deviation of a version's rate, in standard deviations."""
        if not self.noise:
            return 0.0
        return random.Random(f"{self.seed}/{script}/{version}/{minute.isoformat()}").gauss(0, 1)

    def _script(self, script: str) -> _Script:
        try:
            return self._scripts[script]
        except KeyError:
            raise KeyError(f"unknown script {script!r}") from None

    def _version(self, script: str, version: str) -> _Version:
        try:
            return self._script(script).versions[version]
        except KeyError:
            raise KeyError(f"unknown version {version!r} of {script!r}") from None

    def _at(self, at: datetime | None) -> datetime:
        now = self.now()
        return now if at is None else min(_utc(at), now)


def _expect(total: list[float], expected: float, behaviour: Behaviour) -> None:
    """Add ``expected`` requests of one behaviour to an expectation vector."""
    exceptions = expected * behaviour.exception_rate
    http_5xx = expected * behaviour.http_5xx_rate
    total[_OK] += expected - exceptions - http_5xx
    total[_EXC] += exceptions
    total[_5XX] += http_5xx
    total[_SUB] += expected * behaviour.subrequests_per_request
    total[_LAT] += expected * lognormal_mean(behaviour.latency_p50, behaviour.latency_p99)
    shares = fractions_below(LATENCY_BUCKETS, behaviour.latency_p50, behaviour.latency_p99)
    for i, share in enumerate(shares):
        total[_BUCKET0 + i] += expected * share


def _add_into(total: list[float], more: list[float]) -> None:
    for i, value in enumerate(more):
        total[i] += value


def _counters(total: list[float]) -> Counters:
    # Each count is the floor of a non-decreasing expectation, so none ever falls; requests is
    # their sum, and buckets are capped by it so the histogram stays cumulative.
    ok, exceptions, http_5xx = (math.floor(total[i]) for i in (_OK, _EXC, _5XX))
    requests = ok + exceptions + http_5xx
    buckets = tuple(min(requests, math.floor(v)) for v in total[_BUCKET0:])
    return Counters(
        requests=requests,
        exceptions=exceptions,
        http_5xx=http_5xx,
        subrequests=math.floor(total[_SUB]),
        latency_buckets=buckets,
        latency_sum=total[_LAT],
    )


def _check_rate(requests_per_minute: float) -> None:
    if not requests_per_minute >= 0 or math.isinf(requests_per_minute):
        raise ValueError(
            f"requests_per_minute must be a finite number >= 0, got {requests_per_minute}"
        )


def _minute(when: datetime) -> datetime:
    return when.replace(second=0, microsecond=0)


def _utc(when: datetime) -> datetime:
    if when.tzinfo is None:
        raise ValueError(f"{when} has no time zone: the simulator keeps aware UTC times")
    return when.astimezone(UTC)
