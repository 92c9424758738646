"""The budget plan: the Cloudflare requests per 5 minutes the daemon will need, against its limits.

Pure: it takes the watched scripts (grouped by policy), which of them have a live canary, and
the settings, and returns numbers and changes; it reads no clock and calls nothing, so the
daemon recomputes it whenever a canary starts or ends and on every reload.

The request model (issue 13's contract), per 5 minutes (300 s):

REST
  - a script with a live canary: ``300 / max(analysis.interval, COALMINE_CANARY_DRIFT_INTERVAL)``
    deployment reads, plus one write and its read-back (2) as the allowance for a step, a
    promotion or a rollback;
  - an idle script: ``300 / COALMINE_DRIFT_INTERVAL`` reads; when account-wide discovery is
    unavailable (the fallback), ``300 / COALMINE_DISCOVERY_INTERVAL`` instead.
GraphQL
  - ``300 / COALMINE_DISCOVERY_INTERVAL``: the account-wide query;
  - ``300 / interval`` for each distinct ``analysis.interval`` among the live canaries with
    ``source: cloudflare`` rules: one batched analytics query for all of them;
  - the schema introspection at start-up: once, not counted.

The plan fits when REST's total leaves the rollbacks' reserve of the REST token bucket
(:func:`~coalmine.cloudflare.budgets.write_reserve`) untouched and GraphQL's is within its
limit. When it does not, :func:`plan` computes concrete changes, each of which (alone, or with
the one other change it names) makes it fit: checked by computing the plan again, never canned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal, NamedTuple

from coalmine.cloudflare.budgets import WINDOW, write_reserve
from coalmine.durations import format_duration

Api = Literal["rest", "graphql"]
REST_MAX = 1200  # Cloudflare's REST budget per token and 5 minutes (the setting's bound)
GRAPHQL_MAX = 300  # Cloudflare's GraphQL budget per 5 minutes (the setting's bound)
WRITES_PER_CANARY = 2.0  # a write and its read-back per live canary per 5 minutes
LIMIT_STEP = 10  # suggested limits are rounded up to this

# Durations a suggestion may name, shortest first; the last of each kind's ladder is the most
# that is still sensible (an idle script read once a day; a canary judged every 10 minutes).
LADDER: tuple[int, ...] = (5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300, 600, 900, 1200)
LADDER += (1800, 2700, 3600, 5400, 7200, 10800, 14400, 21600, 43200, 86400)
MOST = {"drift": 86400, "discovery": 900, "canary_drift": 900, "interval": 600}

ChangeKind = Literal[
    "account_wide",
    "drift",
    "discovery",
    "canary_drift",
    "interval",
    "rest_limit",
    "graphql_limit",
    "fewer_idle",
]
VARIABLES = {
    "drift": "COALMINE_DRIFT_INTERVAL",
    "discovery": "COALMINE_DISCOVERY_INTERVAL",
    "canary_drift": "COALMINE_CANARY_DRIFT_INTERVAL",
    "rest_limit": "COALMINE_CLOUDFLARE_RATE_LIMIT",
    "graphql_limit": "COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT",
}


class Group(NamedTuple):
    """The watched scripts of one policy: they cost alike. (Named tuples, as are
    :class:`Inputs`: the fixes' search builds a few thousand variants, and ``_replace`` is
    several times cheaper than :func:`dataclasses.replace`.)"""

    policy: str
    interval: float  # the policy's analysis.interval, seconds
    analytics: bool  # whether the policy has `source: cloudflare` rules
    live: int  # scripts with a live canary
    idle: int  # scripts without one


class Inputs(NamedTuple):
    """Everything the plan depends on; durations in seconds."""

    groups: tuple[Group, ...]
    discovery: float
    drift: float
    canary_drift: float
    rest_limit: int
    graphql_limit: int
    account_wide: bool = True  # False: discovery fell back to one read per idle script

    @property
    def live(self) -> int:
        """Scripts with a live canary."""
        return sum(g.live for g in self.groups)

    @property
    def idle(self) -> int:
        """Scripts without one."""
        return sum(g.idle for g in self.groups)


@dataclass(frozen=True, slots=True)
class Budget:
    """One API's plan: its parts (requests per 5 minutes) against its limit."""

    api: Api
    limit: int
    reserve: float  # kept for rollbacks: never planned
    parts: tuple[tuple[str, float], ...]

    @property
    def planned(self) -> float:
        """Requests per 5 minutes the plan needs."""
        return sum(n for _, n in self.parts)

    @property
    def room(self) -> float:
        """Requests per 5 minutes the plan may use: the limit less the reserve."""
        return self.limit - self.reserve

    @property
    def fits(self) -> bool:
        """Whether the plan needs no more than its room."""
        return self.planned <= self.room + 1e-9

    def describe(self) -> str:
        """``REST 384/600 per 5 min (idle reads 159, ...; 6 kept for rollbacks)``."""
        name = "REST" if self.api == "rest" else "GraphQL"
        parts = [f"{label} {_count(n)}" for label, n in self.parts]
        if self.reserve:
            parts.append(f"{_count(self.reserve)} kept for rollbacks")
        return f"{name} {_count(self.planned)}/{self.limit} per 5 min ({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Change:
    """One concrete change to the settings, a policy or the scripts watched."""

    kind: ChangeKind
    value: float = 0.0  # seconds, a limit or a number of scripts
    policy: str | None = None  # for `interval`

    def text(self, inputs: Inputs) -> str:
        """What to do, said as an operator would do it (with today's value)."""
        kind, value = self.kind, self.value
        if kind == "account_wide":
            return (
                "restore account-wide discovery (one GraphQL query, not a read per idle script;"
                " the token needs Account Analytics Read)"
            )
        if kind in ("drift", "discovery", "canary_drift"):
            now = getattr(inputs, kind)
            return f"raise {VARIABLES[kind]} to {_duration(value)} (now {_duration(now)})"
        if kind == "interval":
            group = next(g for g in inputs.groups if g.policy == self.policy)
            return (
                f"analysis.interval {_duration(value)} in policy {self.policy}"
                f" (now {_duration(group.interval)})"
            )
        if kind in ("rest_limit", "graphql_limit"):
            most = REST_MAX if kind == "rest_limit" else GRAPHQL_MAX
            now = getattr(inputs, kind)
            return f"raise {VARIABLES[kind]} to {int(value)} (now {now}, at most {most})"
        return f"watch {int(value)} fewer idle scripts (now {inputs.idle})"

    def apply(self, inputs: Inputs) -> Inputs:
        """The inputs as they would be after this change."""
        value = self.value
        match self.kind:
            case "account_wide":
                return inputs._replace(account_wide=True)
            case "drift":
                return inputs._replace(drift=value)
            case "discovery":
                return inputs._replace(discovery=value)
            case "canary_drift":
                return inputs._replace(canary_drift=value)
            case "rest_limit":
                return inputs._replace(rest_limit=int(value))
            case "graphql_limit":
                return inputs._replace(graphql_limit=int(value))
            case "interval":
                groups = tuple(
                    g._replace(interval=value) if g.policy == self.policy else g
                    for g in inputs.groups
                )
                return inputs._replace(groups=groups)
        return inputs._replace(groups=_drop_idle(inputs.groups, int(value)))


Fix = tuple[Change, ...]  # changes made together


@dataclass(frozen=True, slots=True)
class Plan:
    """The budget plan for one set of inputs."""

    inputs: Inputs
    rest: Budget
    graphql: Budget
    more_canaries: int  # how many more canaries could start at once, the costliest first
    fixes: tuple[Fix, ...]  # each makes the plan fit; empty when it fits

    @property
    def fits(self) -> bool:
        """Whether both APIs' plans fit."""
        return self.rest.fits and self.graphql.fits

    @property
    def changes(self) -> list[str]:
        """Each fix as one line (two changes of one fix joined by "and")."""
        return [" and ".join(c.text(self.inputs) for c in fix) for fix in self.fixes]

    def summary(self) -> str:
        """The plan in one line, as logged."""
        i = self.inputs
        canaries = f"{i.live} live canaries of {i.live + i.idle} scripts"
        if self.fits:
            canaries += f", {self.more_canaries} more would fit"
        mode = "" if i.account_wide else "; discovery: one read per idle script (fallback)"
        return f"{self.rest.describe()}; {self.graphql.describe()}; {canaries}{mode}"

    def problem(self) -> str | None:
        """Why the plan does not fit and what to change, or None when it fits."""
        if self.fits:
            return None
        over = [b.describe() for b in (self.rest, self.graphql) if not b.fits]
        text = f"the Cloudflare budget plan does not fit: {'; '.join(over)}"
        if self.changes:
            return f"{text}; change one of: {' | '.join(self.changes)}"
        return (
            f"{text}; no change of one or two settings makes it fit: fewer canaries at once,"
            " or split the scripts between coalmine instances with API tokens of their own"
        )


def budgets(inputs: Inputs) -> tuple[Budget, Budget]:
    """REST's and GraphQL's plans, part by part (one pass over the groups: the fixes'
    search computes this a few hundred times)."""
    window = WINDOW
    canary_drift = max(inputs.canary_drift, 1.0)
    canary_reads, live, idle = 0.0, 0, 0
    intervals: set[float] = set()
    for g in inputs.groups:
        if g.live:
            canary_reads += g.live * window / max(g.interval, canary_drift)
            live += g.live
            if g.analytics:
                intervals.add(g.interval)
        idle += g.idle
    if inputs.account_wide:
        idle_part = ("idle reads", idle * window / max(inputs.drift, 1.0))
    else:
        idle_part = ("idle discovery reads", idle * window / max(inputs.discovery, 1.0))
    rest = Budget(
        "rest",
        inputs.rest_limit,
        write_reserve(inputs.rest_limit),
        (("canary reads", canary_reads), ("canary writes", WRITES_PER_CANARY * live), idle_part),
    )
    analytics = sum(window / max(i, 1.0) for i in intervals)
    graphql = Budget(
        "graphql",
        inputs.graphql_limit,
        0.0,  # GraphQL's bucket keeps no reserve: rollbacks are REST calls
        (("discovery", window / max(inputs.discovery, 1.0)), ("analytics", analytics)),
    )
    return rest, graphql


def plan(inputs: Inputs) -> Plan:
    """The plan for ``inputs``: the numbers, the room for more canaries, and the fixes."""
    rest, graphql = budgets(inputs)
    fits = rest.fits and graphql.fits
    more = _more_canaries(inputs, rest, graphql) if fits else 0
    return Plan(inputs, rest, graphql, more, () if fits else _fixes(inputs))


def from_durations(
    groups: tuple[Group, ...],
    *,
    discovery: timedelta,
    drift: timedelta,
    canary_drift: timedelta,
    rest_limit: int,
    graphql_limit: int,
    account_wide: bool = True,
) -> Inputs:
    """:class:`Inputs` from the settings' durations."""
    return Inputs(
        groups,
        discovery.total_seconds(),
        drift.total_seconds(),
        canary_drift.total_seconds(),
        rest_limit,
        graphql_limit,
        account_wide,
    )


# How to read the plan: docs/configuration.md's section, generated with the rest of that file
# (coalmine.settings.reference) so that it names what this module computes.
READING = """\
## Reading the budget plan

coalmine works out how many Cloudflare requests per 5 minutes it will need for the scripts
it watches and the canaries live now, and checks them against its limits: at start, after a
reload (SIGHUP), and whenever a canary starts or ends. Each time it logs one line, event
`budget plan`, with the fields `plan`, `rest`, `rest_limit`, `graphql`, `graphql_limit`,
`more_canaries` and `why`. For 1,000 scripts, 50 of them canaries of the runbook, `plan` reads:

```
REST 384/600 per 5 min (canary reads 125, canary writes 100, idle reads 159, 6 kept for
rollbacks); GraphQL 15/200 per 5 min (discovery 5, analytics 10); 50 live canaries of 1000
scripts, 48 more would fit
```

REST, against `COALMINE_CLOUDFLARE_RATE_LIMIT`:

- *canary reads*: a script with a live canary (running, paused, or in its post-promotion
  watch) reads its deployment every `analysis.interval` or every
  `COALMINE_CANARY_DRIFT_INTERVAL`, whichever is longer;
- *canary writes*: 2 per live canary, a traffic change (step, promotion, rollback) and its
  read-back;
- *idle reads*: every other script once per `COALMINE_DRIFT_INTERVAL`. While account-wide
  discovery is unavailable, *idle discovery reads*: once per `COALMINE_DISCOVERY_INTERVAL`;
- *kept for rollbacks*: the reserve of the REST token bucket that only writes may take. The
  plan never counts on it: REST fits when its total is at most the limit less the reserve.

GraphQL, against `COALMINE_CLOUDFLARE_GRAPHQL_RATE_LIMIT`:

- *discovery*: one account-wide query per `COALMINE_DISCOVERY_INTERVAL`;
- *analytics*: one query for all live canaries with `source: cloudflare` rules per
  `analysis.interval`, one for each distinct interval among them (two policies at 30s share
  one, a third at 1m adds another). The schema check at start is one query, not counted.

*N more would fit*: how many idle scripts could start a canary at once with the plan still
fitting, counting the costliest first.

When the plan does not fit, the line is a warning, `budget plan does NOT fit`, and its
`change` lists changes that would each make it fit (two joined by "and" go together),
computed for that moment's scripts and canaries: `raise COALMINE_DRIFT_INTERVAL to 45m (now
30m)`, `analysis.interval 1m in policy runbook (now 30s)`, `watch 120 fewer idle scripts (now
950)`, a higher limit when the token has room. Nothing is refused meanwhile; calls wait on the
token buckets, so deployments are read, canaries judged and new splits adopted late. Until a
plan fits, `GET /health` is `degraded` with the `cloudflare_budget` check failing and the
same reason, and its `budget_plan` has the numbers. On `/metrics`:
`coalmine_cloudflare_budget_planned{api}`, `coalmine_cloudflare_budget_limit{api}`,
`coalmine_cloudflare_budget_reserve{api}` and `coalmine_cloudflare_budget_more_canaries`; the
alert `CoalmineBudgetPlanOverLimit` watches them. `coalmine status` ends with one line, e.g.
`budget: REST 384/600, GraphQL 15/200 per 5 min; 48 more canaries would fit`, or `budget:
OVER: ...; fix: ...` with the first change. Sizing an account:
[deploy.md](deploy.md#sizing-an-account).
"""


# ---- How many more canaries fit -------------------------------------------------------------


def _more_canaries(inputs: Inputs, rest: Budget, graphql: Budget) -> int:
    """How many idle scripts could become canaries at once with the plan still fitting, taking
    the costliest first: so any that many may start."""
    window = WINDOW
    idle_cost = window / max(inputs.drift if inputs.account_wide else inputs.discovery, 1.0)
    deltas: list[float] = []
    for g in inputs.groups:
        read = window / max(g.interval, inputs.canary_drift, 1.0)
        deltas += [read + WRITES_PER_CANARY - idle_cost] * g.idle
    deltas.sort(reverse=True)
    live = {g.interval for g in inputs.groups if g.live and g.analytics}
    # each new canary may bring at most one new analytics interval: the shortest first
    new = _new_intervals(inputs.groups, live)
    queries = sorted((window / max(g.interval, 1.0) for g in new), reverse=True)
    rest_left, graphql_left = rest.room - rest.planned, graphql.room - graphql.planned
    more = 0
    for k, delta in enumerate(deltas):
        rest_left -= delta
        if k < len(queries):
            graphql_left -= queries[k]
        if rest_left < -1e-9 or graphql_left < -1e-9:
            break
        more = k + 1
    return more


def _new_intervals(groups: tuple[Group, ...], live: set[float]) -> list[Group]:
    """One group per analytics interval that idle scripts would add to the live ones."""
    seen: dict[float, Group] = {}
    for g in groups:
        if g.idle and g.analytics and g.interval not in live:
            seen.setdefault(g.interval, g)
    return list(seen.values())


# ---- Fixes ----------------------------------------------------------------------------------

MAX_FIXES = 8


@dataclass(frozen=True, slots=True)
class _Lever:
    """One thing an operator can change, and its steps from the mildest (a lazy sequence:
    ``range`` for counts, so thousands of scripts cost nothing until a step is tried)."""

    kind: ChangeKind
    steps: Sequence[float]
    policy: str | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> Change:
        return Change(self.kind, float(self.steps[i]), self.policy)


def _fixes(inputs: Inputs) -> tuple[Fix, ...]:
    """Changes that make the plan fit: single changes first, in the order an operator would
    try them; then, for the levers no single change of which is enough, pairs of them (not
    two policies' intervals: a pair of policies is rarely what an operator would change)."""
    levers = [lever for lever in _levers(inputs) if len(lever)]
    found: list[Fix] = []
    short: list[_Lever] = []  # levers that cannot make it fit alone
    for lever in levers:
        whole = _first(lever, lambda c: _fits(c.apply(inputs)), bisect=lever.kind != "interval")
        if whole is not None:
            found.append((whole,))
        else:
            short.append(lever)
    for i, one in enumerate(short):
        for other in short[i + 1 :]:
            if one.kind == other.kind == "interval":
                continue
            pair = _pair(inputs, one, other)
            if pair is not None:
                found.append(pair)
            if len(found) >= MAX_FIXES:
                return tuple(found)
    return tuple(found)


def _pair(inputs: Inputs, one: _Lever, other: _Lever) -> Fix | None:
    """The mildest step of ``one`` that fits with the strongest of ``other``, then the mildest
    step of ``other`` that fits with it; None when even both strongest do not fit."""
    strongest = other[len(other) - 1]
    first = _first(one, lambda c: _fits(strongest.apply(c.apply(inputs))))
    if first is None:
        return None
    after = first.apply(inputs)
    second = _first(other, lambda c: _fits(c.apply(after)))
    return None if second is None else (first, second)


def _fits(inputs: Inputs) -> bool:
    rest, graphql = budgets(inputs)
    return rest.fits and graphql.fits


def _first(lever: _Lever, good: Callable[[Change], bool], *, bisect: bool = True) -> Change | None:
    """The mildest step of ``lever`` that is ``good``. Bisection assumes each step costs
    no more than the one before. A policy's interval may break that (a new interval is a new
    analytics query), so a single change of it is looked for step by step (``bisect=False``);
    in a pair, bisection still returns a good step, if not always the mildest."""
    if not len(lever):
        return None
    if not bisect:
        return next((c for c in map(lever.__getitem__, range(len(lever))) if good(c)), None)
    if not good(lever[len(lever) - 1]):
        return None
    low, high = 0, len(lever) - 1
    while low < high:
        middle = (low + high) // 2
        if good(lever[middle]):
            high = middle
        else:
            low = middle + 1
    return lever[low]


def _levers(inputs: Inputs) -> Iterator[_Lever]:
    """Each thing an operator can change, in the order they would try it."""
    if not inputs.account_wide:
        yield _Lever("account_wide", (1.0,))
    if inputs.account_wide and inputs.idle:
        yield _ladder("drift", inputs.drift)
    yield _ladder("discovery", inputs.discovery)
    if inputs.live:
        yield _ladder("canary_drift", inputs.canary_drift)
    for g in sorted(inputs.groups, key=lambda g: g.policy):
        if g.live:
            yield _ladder("interval", g.interval, g.policy)
    yield _limits("rest_limit", inputs.rest_limit, REST_MAX)
    yield _limits("graphql_limit", inputs.graphql_limit, GRAPHQL_MAX)
    if inputs.idle:
        yield _Lever("fewer_idle", range(1, inputs.idle + 1))


def _ladder(kind: ChangeKind, now: float, policy: str | None = None) -> _Lever:
    return _Lever(kind, tuple(float(s) for s in LADDER if now < s <= MOST[kind]), policy)


def _limits(kind: ChangeKind, now: int, most: int) -> _Lever:
    start = (now // LIMIT_STEP + 1) * LIMIT_STEP
    steps = [float(n) for n in range(start, most, LIMIT_STEP)]
    if now < most:
        steps.append(float(most))
    return _Lever(kind, steps)


def _drop_idle(groups: tuple[Group, ...], count: int) -> tuple[Group, ...]:
    """``groups`` with ``count`` fewer idle scripts, taken from the last groups first."""
    out = list(groups)
    for i in reversed(range(len(out))):
        if count <= 0:
            break
        taken = min(count, out[i].idle)
        if taken:
            out[i] = out[i]._replace(idle=out[i].idle - taken)
            count -= taken
    return tuple(out)


def _count(n: float) -> str:
    return str(math.ceil(n - 1e-9))


def _duration(seconds: float) -> str:
    return format_duration(timedelta(seconds=seconds))
