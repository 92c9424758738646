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
  - ``300 / COALMINE_DISCOVERY_INTERVAL``: the account-wide query, one per 2,000 scripts;
  - ``300 / interval`` for each distinct ``analysis.interval`` among the live canaries with
    ``source: cloudflare`` rules: one batched analytics query for all of them, or as many as
    one page of rows needs (:func:`canaries_per_query`);
  - the schema introspection at start-up: once, not counted.

The plan fits when REST's total leaves the rollbacks' reserve of the REST token bucket
(:func:`~coalmine.cloudflare.budgets.write_reserve`) untouched and GraphQL's is within its
limit.

Replicas sharing one token (:attr:`Inputs.replicas` > 1) each plan what *they* will spend: the
scripts they hold (:attr:`Inputs.groups`), against their share of each limit (the limit over the
live replicas, less their share of the reserve: what their token buckets allow). The scripts
held, not a fair share of all: the leases balance the number of scripts, not their cost, and a
replica whose scripts need more than its share waits on its own bucket whatever the others
spend. The whole account (:attr:`Inputs.account`, every watched script) must fit the token's
whole limits too, with one discovery query per interval from each replica holding scripts and
one analytics query per interval from each replica holding such canaries (at most; more when
there are more scripts or canaries than one query answers). Summed
over the replicas, their own plans are the account's: so an account that does not fit always
shows as some replica whose own plan does not fit.

When a plan does not fit, :func:`plan` computes concrete changes, each of which (alone, or with
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
ROWS_PER_QUERY = 10000  # workersInvocationsAdaptive's page (limit)
SCRIPTS_PER_DISCOVERY = 2000  # scripts one discovery query asks for (a few rows each)

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


def canaries_per_query(longest: float) -> int:
    """Canaries one analytics query answers in a page: two versions, a row a minute over the
    longest ``source: cloudflare`` window (seconds) and the minute it straddles."""
    minutes = math.ceil(max(longest, 60.0) / 60) + 1
    return max(1, ROWS_PER_QUERY // (2 * minutes) - 1)


class Group(NamedTuple):
    """The watched scripts of one policy: they cost alike. (Named tuples, as are
    :class:`Inputs`: the fixes' search builds a few thousand variants, and ``_replace`` is
    several times cheaper than :func:`dataclasses.replace`.)"""

    policy: str
    interval: float  # the policy's analysis.interval, seconds
    analytics: bool  # whether the policy has `source: cloudflare` rules
    live: int  # scripts with a live canary
    idle: int  # scripts without one
    window: float = 0.0  # its longest `source: cloudflare` rule window, seconds


class Inputs(NamedTuple):
    """Everything the plan depends on; durations in seconds."""

    groups: tuple[Group, ...]
    discovery: float
    drift: float
    canary_drift: float
    rest_limit: int  # the token's whole limits
    graphql_limit: int
    account_wide: bool = True  # False: discovery fell back to one read per idle script
    replicas: int = 1  # live replicas sharing the token; each plans its share
    # replicas: every watched script (``groups`` are then the scripts this replica holds);
    # None: a daemon alone, whose ``groups`` are every watched script
    account: tuple[Group, ...] | None = None

    @property
    def live(self) -> int:
        """Scripts with a live canary (of those this replica holds)."""
        return sum(g.live for g in self.groups)

    @property
    def idle(self) -> int:
        """Scripts without one (of those this replica holds)."""
        return sum(g.idle for g in self.groups)

    @property
    def watched(self) -> tuple[Group, ...]:
        """Every watched script, whoever holds it."""
        return self.groups if self.account is None else self.account


@dataclass(frozen=True, slots=True)
class Budget:
    """One API's plan: its parts (requests per 5 minutes) against its limit."""

    api: Api
    limit: float  # a replica's share of the token's limit (the whole limit when alone)
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
        return f"{name} {self.numbers()} per 5 min ({', '.join(parts)})"

    def numbers(self) -> str:
        """``384/600``: planned (rounded up) of the limit."""
        return f"{_count(self.planned)}/{limit_text(self.limit)}"


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
            group = next(g for g in inputs.watched if g.policy == self.policy)
            return (
                f"analysis.interval {_duration(value)} in policy {self.policy}"
                f" (now {_duration(group.interval)})"
            )
        if kind in ("rest_limit", "graphql_limit"):
            most = REST_MAX if kind == "rest_limit" else GRAPHQL_MAX
            now = getattr(inputs, kind)
            return f"raise {VARIABLES[kind]} to {int(value)} (now {now}, at most {most})"
        idle = sum(g.idle for g in inputs.watched)
        return f"watch {int(value)} fewer idle scripts (now {idle})"

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
                return inputs._replace(
                    groups=_with_interval(inputs.groups, self.policy, value) or (),
                    account=_with_interval(inputs.account, self.policy, value),
                )
        if inputs.account is None:
            return inputs._replace(groups=_drop_idle(inputs.groups, int(value)))
        # fewer scripts in all: the leases rebalance, each replica holds that share fewer
        return inputs._replace(
            groups=_drop_idle(inputs.groups, int(value) // max(1, inputs.replicas)),
            account=_drop_idle(inputs.account, int(value)),
        )


Fix = tuple[Change, ...]  # changes made together


@dataclass(frozen=True, slots=True)
class Plan:
    """The budget plan for one set of inputs."""

    inputs: Inputs
    rest: Budget  # this replica's (the daemon's, alone)
    graphql: Budget
    more_canaries: int  # how many more canaries could start at once, the costliest first
    fixes: tuple[Fix, ...]  # each makes the plan fit; empty when it fits
    # replicas: the whole account against the token's whole limits (None: a daemon alone)
    token: tuple[Budget, Budget] | None = None

    @property
    def fits(self) -> bool:
        """Whether both APIs' plans fit (this replica's share, and the token's whole)."""
        return all(b.fits for b in self.all_budgets())

    def all_budgets(self) -> tuple[Budget, ...]:
        """This replica's budgets, then the token's (replicas only)."""
        return (self.rest, self.graphql, *(self.token or ()))

    @property
    def changes(self) -> list[str]:
        """Each fix as one line (two changes of one fix joined by "and")."""
        return [" and ".join(c.text(self.inputs) for c in fix) for fix in self.fixes]

    def summary(self) -> str:
        """The plan in one line, as logged."""
        i = self.inputs
        held = "" if self.token is None else " held"
        canaries = f"{i.live} live canaries of {i.live + i.idle} scripts{held}"
        if self.fits:
            canaries += f", {self.more_canaries} more would fit"
        mode = "" if i.account_wide else "; discovery: one read per idle script (fallback)"
        line = f"{self.rest.describe()}; {self.graphql.describe()}; {canaries}{mode}"
        if self.token is not None:
            line += f"; {self.token_summary()}"
        return line

    def token_summary(self) -> str:
        """``the token, shared by 3 replicas: REST 384/600, GraphQL 25/200 per 5 min``."""
        rest, graphql = self.token or budgets(self.inputs)
        n = self.inputs.replicas
        who = f"shared by {n} replicas" if n > 1 else "one replica's alone"
        return f"the token, {who}: REST {rest.numbers()}, GraphQL {graphql.numbers()} per 5 min"

    def problem(self) -> str | None:
        """Why the plan does not fit and what to change, or None when it fits."""
        if self.fits:
            return None
        over = [b.describe() for b in (self.rest, self.graphql) if not b.fits]
        if self.token is not None:
            share = f"this replica's share (1/{self.inputs.replicas} of the token): "
            over = [share + text for text in over]
            token = [f"the token's whole: {b.describe()}" for b in self.token if not b.fits]
            # the leases balance scripts, not their cost
            over += token or ["the token's whole fits: this replica holds more than its share"]
        text = f"the Cloudflare budget plan does not fit: {'; '.join(over)}"
        if self.changes:
            return f"{text}; change one of: {' | '.join(self.changes)}"
        return (
            f"{text}; no change of one or two settings makes it fit: fewer canaries at once,"
            " or split the scripts between coalmine instances with API tokens of their own"
        )


def budgets(inputs: Inputs) -> tuple[Budget, Budget]:
    """REST's and GraphQL's plans for this replica (the daemon, alone) against its share."""
    replicas = max(1, inputs.replicas)
    queriers = 1 if inputs.account is None or inputs.live + inputs.idle else 0
    return _budgets(inputs, inputs.groups, replicas, queriers)


def token_budgets(inputs: Inputs) -> tuple[Budget, Budget] | None:
    """Every watched script's plans against the token's whole limits (replicas only): a
    discovery query from each replica holding scripts, an analytics query per interval from
    each holding such canaries (at most)."""
    if inputs.account is None:
        return None
    scripts = sum(g.live + g.idle for g in inputs.account)
    return _budgets(inputs, inputs.account, 1, min(max(1, inputs.replicas), scripts))


def _budgets(
    inputs: Inputs, groups: tuple[Group, ...], share: int, queriers: int
) -> tuple[Budget, Budget]:
    """REST's and GraphQL's plans for ``groups``, part by part, against 1/``share`` of the
    limits; ``queriers`` replicas send each account-wide query (one pass over the groups: the
    fixes' search computes this a few hundred times)."""
    window = WINDOW
    canary_drift = max(inputs.canary_drift, 1.0)
    canary_reads, live, idle, longest = 0.0, 0, 0, 0.0
    intervals: dict[float, int] = {}
    for g in groups:
        if g.live:
            canary_reads += g.live * window / max(g.interval, canary_drift)
            live += g.live
            if g.analytics:
                intervals[g.interval] = intervals.get(g.interval, 0) + g.live
        longest = max(longest, g.window if g.analytics else 0.0)  # the source spans them all
        idle += g.idle
    if inputs.account_wide:
        idle_part = ("idle reads", idle * window / max(inputs.drift, 1.0))
    else:
        idle_part = ("idle discovery reads", idle * window / max(inputs.discovery, 1.0))
    replicas = max(1, inputs.replicas)
    # each replica's bucket keeps its share's reserve: the token keeps them all
    reserve = write_reserve(inputs.rest_limit, replicas=replicas) * replicas / share
    rest = Budget(
        "rest",
        inputs.rest_limit / share,
        reserve,
        (("canary reads", canary_reads), ("canary writes", WRITES_PER_CANARY * live), idle_part),
    )
    # per interval, a query from each replica holding such canaries (at most) or one per page
    # their rows fill; discovery: one from each replica holding scripts, or one per 2,000
    most = canaries_per_query(longest)
    analytics = sum(
        window / max(i, 1.0) * max(min(n, queriers), math.ceil(n / most))
        for i, n in intervals.items()
    )
    asks = queriers * max(1, math.ceil((live + idle) / max(queriers, 1) / SCRIPTS_PER_DISCOVERY))
    graphql = Budget(
        "graphql",
        inputs.graphql_limit / share,
        0.0,  # GraphQL's bucket keeps no reserve: rollbacks are REST calls
        (("discovery", asks * window / max(inputs.discovery, 1.0)), ("analytics", analytics)),
    )
    return rest, graphql


def plan(inputs: Inputs) -> Plan:
    """The plan for ``inputs``: the numbers, the room for more canaries, and the fixes."""
    rest, graphql = budgets(inputs)
    token = token_budgets(inputs)
    fits = all(b.fits for b in (rest, graphql, *(token or ())))
    more = _more_canaries(inputs, (rest, graphql), token) if fits else 0
    return Plan(inputs, rest, graphql, more, () if fits else _fixes(inputs), token)


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


# ---- How many more canaries fit -------------------------------------------------------------


def _more_canaries(
    inputs: Inputs, mine: tuple[Budget, Budget], token: tuple[Budget, Budget] | None
) -> int:
    """How many idle scripts (of this replica's) could become canaries at once with the plan
    (and the token's) still fitting, taking the costliest first: so any that many may start."""
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
    # what is left of this replica's share, and of the token's whole (the same spending)
    return min(_fitting(deltas, queries, pair) for pair in (mine, *([token] if token else [])))


def _fitting(deltas: list[float], queries: list[float], budgets: tuple[Budget, Budget]) -> int:
    """How many of ``deltas`` (REST) and ``queries`` (GraphQL), in order, fit ``budgets``."""
    rest, graphql = budgets
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
    if not (rest.fits and graphql.fits):
        return False
    token = token_budgets(inputs)  # replicas: the token's whole must fit too
    return token is None or (token[0].fits and token[1].fits)


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
    watched = inputs.watched  # replicas: the settings and policies are every replica's
    idle, live = sum(g.idle for g in watched), sum(g.live for g in watched)
    if not inputs.account_wide:
        yield _Lever("account_wide", (1.0,))
    if inputs.account_wide and idle:
        yield _ladder("drift", inputs.drift)
    yield _ladder("discovery", inputs.discovery)
    if live:
        yield _ladder("canary_drift", inputs.canary_drift)
    for policy in sorted({g.policy for g in watched if g.live}):
        interval = next(g.interval for g in watched if g.policy == policy and g.live)
        yield _ladder("interval", interval, policy)
    yield _limits("rest_limit", inputs.rest_limit, REST_MAX)
    yield _limits("graphql_limit", inputs.graphql_limit, GRAPHQL_MAX)
    if idle:
        yield _Lever("fewer_idle", range(1, idle + 1))


def _ladder(kind: ChangeKind, now: float, policy: str | None = None) -> _Lever:
    return _Lever(kind, tuple(float(s) for s in LADDER if now < s <= MOST[kind]), policy)


def _limits(kind: ChangeKind, now: int, most: int) -> _Lever:
    start = (now // LIMIT_STEP + 1) * LIMIT_STEP
    steps = [float(n) for n in range(start, most, LIMIT_STEP)]
    if now < most:
        steps.append(float(most))
    return _Lever(kind, steps)


def _with_interval(
    groups: tuple[Group, ...] | None, policy: str | None, interval: float
) -> tuple[Group, ...] | None:
    """``groups`` with ``policy``'s analysis.interval at ``interval``."""
    if groups is None:
        return None
    return tuple(g._replace(interval=interval) if g.policy == policy else g for g in groups)


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


def limit_text(limit: float) -> str:
    """A limit or a replica's share of it: ``600``, ``66.7``."""
    return str(round(limit)) if abs(limit - round(limit)) < 0.05 else f"{limit:.1f}"


def _duration(seconds: float) -> str:
    return format_duration(timedelta(seconds=seconds))
