"""Account-wide discovery: when each script's live deployment is read.

Reading every idle script's deployment once a ``COALMINE_DISCOVERY_INTERVAL`` costs one REST
call per script per interval: 1,000 scripts at 60 s need more than Cloudflare's whole budget.
Instead, :class:`Discovery` asks GraphQL once per interval for the whole account: which versions
of the watched scripts served requests over the last few minutes (``workersInvocationsAdaptive``
grouped by ``scriptName`` and ``scriptVersion``, filtered by ``scriptName_in``). A script whose
serving versions do not fit what coalmine last read of its deployment (a version coalmine has
not seen live: a new split, or a new version at 100%; one version of a live split serving
nothing while the other serves: the canary or the stable gone) has its deployment read at once:
its loop is woken. The same signal never wakes a script twice.

:class:`Watch` keeps, per script, what coalmine last read (every read passes through
:meth:`Watch.saw`, the actuator's reads and read-backs included) and decides whether a tick
reads (:meth:`Watch.due`), purely, from the time:

- a script with a live canary: at its first tick, when the signal, an operator command or a
  new lease asks, and at least every ``COALMINE_CANARY_DRIFT_INTERVAL`` (every
  tick when its interval is longer). Every write also reads first: the actuator reads the live
  deployment before it writes and does not undo a split that differs from the one the tick
  started from (the one last read), so a hand-made change is never overwritten;
- an idle script, while the signal works: its loop ticks every ``COALMINE_DRIFT_INTERVAL``
  (spread by its phase) and reads at each tick but the first at start-up, so the idle scripts'
  reads are spread over the drift interval instead of going all at once;
- an idle script without the signal (*fallback*): every ``COALMINE_DISCOVERY_INTERVAL``, as
  before. coalmine falls back when the schema lacks a field the query needs, or when no query
  has worked for two discovery intervals (no analytics permission, the GraphQL budget spent,
  a malformed answer), says so in the log and in /health (``cloudflare_discovery``), and comes
  back once a query works again. A short outage costs nothing: the query looks back further
  than two intervals, so a split started meanwhile is still seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol

import anyio
import structlog

from coalmine.cloudflare.client import (
    CloudflareClient,
    CloudflareError,
    GraphQLAnswerError,
    LiveDeployment,
)
from coalmine.cloudflare.plan import ROWS_PER_QUERY, SCRIPTS_PER_DISCOVERY
from coalmine.engine.model import format_time
from coalmine.sources.cloudflare import FILTER_TYPE, INTROSPECTION, missing_fields

log = structlog.get_logger("coalmine")
CHECK = "cloudflare_discovery"  # its name in /health
MAX_ROWS = ROWS_PER_QUERY  # the dataset's page size; a full page may have been cut short
CHUNK = SCRIPTS_PER_DISCOVERY  # scripts per query (a few versions each stay far under a page)
MIN_LOOKBACK = timedelta(minutes=5)
REQUIRED_FILTERS = ("datetime_geq", "datetime_lt")
REQUIRED_GROUP = {"sum": ("requests",), "dimensions": ("scriptName", "scriptVersion")}
ALIGN = 5.0  # seconds past the minute: Cloudflare's rows are per minute, complete after it


class Mode(StrEnum):
    """Where the idle scripts' reads come from."""

    OFF = "off"  # no discovery runs (tests driving ticks by hand): every idle tick reads
    STARTING = "starting"  # the first query is under way
    SIGNAL = "signal"  # the account-wide query works
    FALLBACK = "fallback"  # it does not: every idle tick reads, at the discovery interval


QUERY = f"""
query CoalmineDiscovery($accountTag: string!, $filter: {FILTER_TYPE}) {{
  viewer {{ accounts(filter: {{accountTag: $accountTag}}) {{
    workersInvocationsAdaptive(limit: {MAX_ROWS}, filter: $filter) {{
      sum {{ requests }}
      dimensions {{ scriptName scriptVersion }}
    }} }} }}
}}
""".strip()  # the account-wide query: requests per script and version


class Malformed(Exception):
    """The answer is not the documented shape, or may have been cut short."""


def serving(data: Any) -> dict[str, set[str]]:
    """The versions that served requests, by script, from an answer to :func:`query`."""
    try:
        accounts = data["viewer"]["accounts"]
        groups = accounts[0]["workersInvocationsAdaptive"] if accounts else []
    except (KeyError, TypeError, IndexError):
        raise Malformed("no viewer.accounts[0].workersInvocationsAdaptive") from None
    if not isinstance(groups, list):
        raise Malformed("workersInvocationsAdaptive is not a list")
    if len(groups) >= MAX_ROWS:
        raise Malformed(f"{len(groups)} rows: a full page may have been cut short")
    out: dict[str, set[str]] = {}
    for group in groups:
        try:
            dims, requests = group["dimensions"], group["sum"]["requests"]
            script, version = dims["scriptName"], dims["scriptVersion"]
        except (KeyError, TypeError) as exc:
            raise Malformed(f"bad row ({type(exc).__name__}: {exc})") from None
        if not isinstance(script, str) or not isinstance(version, str):
            raise Malformed("a row's scriptName or scriptVersion is not a string")
        if isinstance(requests, bool) or not isinstance(requests, int | float):
            raise Malformed(f"a row's requests is not a number: {requests!r}")
        if not math.isfinite(requests) or requests < 0:
            raise Malformed(f"a row's requests is not a count: {requests!r}")
        if requests > 0:
            out.setdefault(script, set()).add(version)
    return out


@dataclass
class Seen:
    """What coalmine knows of one script's deployment."""

    live: frozenset[str] | None = None  # the versions of the deployment last read
    retired: dict[str, datetime] = field(default_factory=dict)  # version → when seen gone
    deployment: LiveDeployment | None = None
    read_at: datetime | None = None
    forced: bool = False  # read at the next tick
    flagged: frozenset[str] | None = None  # the signal that last woke it
    ticks: int = 0


class Loop(Protocol):
    """A script's loop, as discovery sees it."""

    def wake(self) -> None: ...

    @property
    def idle(self) -> bool: ...


class Watch:
    """Per script: what coalmine last read of its deployment, and whether a tick reads now."""

    def __init__(
        self,
        *,
        discovery_interval: timedelta = timedelta(minutes=1),
        drift_interval: timedelta = timedelta(minutes=30),
        canary_drift_interval: timedelta = timedelta(minutes=2),
    ) -> None:
        self.discovery_interval = discovery_interval
        self.drift_interval = drift_interval
        self.canary_drift_interval = canary_drift_interval
        self.mode = Mode.OFF
        self.problem: str | None = None  # why the signal is not used, in fallback
        self.scripts: dict[str, Seen] = {}
        self.loops: dict[str, Loop] = {}

    @property
    def signal(self) -> bool:
        """Whether idle scripts rely on the account-wide signal now."""
        return self.mode in (Mode.STARTING, Mode.SIGNAL)

    @property
    def idle_interval(self) -> timedelta:
        """How often an idle script's loop ticks."""
        return self.drift_interval if self.signal else self.discovery_interval

    def add(self, script: str, loop: Loop, versions: Iterable[str | None] = ()) -> None:
        """Watch a script; ``versions``: the ones its saved rollout names (known to serve)."""
        self.loops[script] = loop
        known = frozenset(v for v in versions if v)
        self.scripts.setdefault(script, Seen(live=known or None))

    def remove(self, script: str) -> None:
        """No longer watched."""
        self.loops.pop(script, None)
        self.scripts.pop(script, None)

    def saw(self, script: str, deployment: LiveDeployment | None, at: datetime) -> None:
        """A read of the script's live deployment (by a tick or the actuator)."""
        seen = self.scripts.setdefault(script, Seen())
        versions = frozenset(v for v, _ in deployment.versions) if deployment else frozenset()
        for gone in (seen.live or frozenset()) - versions:
            seen.retired[gone] = at
        for back in versions & seen.retired.keys():
            del seen.retired[back]
        seen.live, seen.deployment, seen.read_at, seen.forced = versions, deployment, at, False

    def last(self, script: str) -> LiveDeployment | None:
        """The deployment last read, if any."""
        seen = self.scripts.get(script)
        return seen.deployment if seen is not None else None

    def force(self, script: str) -> None:
        """Read the script's deployment at its next tick."""
        self.scripts.setdefault(script, Seen()).forced = True

    def due(
        self, script: str, active: bool, interval: timedelta, now: datetime, commands: bool
    ) -> bool:
        """Whether this tick reads the live deployment (see the module's docstring)."""
        seen = self.scripts.setdefault(script, Seen())
        first, seen.ticks = seen.ticks == 0, seen.ticks + 1
        if seen.forced or commands or (seen.read_at is None and (active or not self.signal)):
            return True
        if not active and not self.signal:
            return True
        if seen.read_at is None:
            return not first
        every = self.canary_drift_interval if active else self.drift_interval
        elapsed = (now - seen.read_at).total_seconds() + interval.total_seconds() / 2
        return elapsed >= every.total_seconds()

    def changed(self, serving: Mapping[str, set[str]], since: datetime) -> list[str]:
        """The watched scripts whose serving versions (since ``since``) do not fit what was
        last read, each once per signal; marks them to be read at their next tick."""
        out = []
        for script, seen in self.scripts.items():
            versions = frozenset(serving.get(script, ()))
            if seen.live is None:  # never read: a split (two versions serving) is news
                odd = len(versions) > 1
                if not odd and len(versions) == 1:
                    seen.live = versions  # one version serving: taken as the live one
            else:
                recent = {v for v, t in seen.retired.items() if t >= since}
                unseen = versions - seen.live - recent
                silent = seen.live - versions if len(seen.live) > 1 and versions else frozenset()
                odd = bool(unseen or silent)
            if not odd:
                seen.flagged = None
            elif seen.flagged != versions:
                seen.flagged, seen.forced = versions, True
                out.append(script)
        return out

    def wake(self, scripts: Iterable[str]) -> None:
        """Wake these scripts' loops (each reads at its next tick)."""
        for script in scripts:
            loop = self.loops.get(script)
            if loop is not None:
                loop.wake()


@dataclass
class Discovery:
    """The account-wide query, once per discovery interval, and the fallback without it."""

    client: CloudflareClient
    account_id: str
    watch: Watch
    clock: Callable[[], datetime]
    on_result: Callable[[str | None], None] = lambda problem: None  # /health
    filtered: bool = True  # the schema has scriptName_in
    # replicas: only the scripts this replica holds (none held: no query)
    held: Callable[[str], bool] | None = None
    last_ok: datetime | None = None
    queries: int = 0

    @property
    def lookback(self) -> timedelta:
        """How far back each query looks: a split is still seen after two failed queries."""
        return max(MIN_LOOKBACK, 3 * self.watch.discovery_interval)

    async def check_schema(self) -> str | None:
        """Whether Cloudflare's schema has what the query needs (introspection); the problem,
        or None. Without ``scriptName_in`` the query asks for every script of the account."""
        try:
            data = await self.client.graphql(INTROSPECTION, {})
        except GraphQLAnswerError as exc:  # refused: the query may still work
            log.warning("discovery schema not checked: introspection refused", error=str(exc))
            return None
        missing = missing_fields(data, REQUIRED_FILTERS, REQUIRED_GROUP)
        if missing:
            return "Cloudflare's analytics schema lacks " + ", ".join(missing)
        if missing_fields(data, ("scriptName_in",), {}):
            self.filtered = False
            log.warning(
                "discovery: the schema has no scriptName_in; asking for every script of the"
                " account and keeping the watched ones"
            )
        return None

    async def run(self) -> None:
        """Query every discovery interval, just after a minute closes, until cancelled."""
        self.watch.mode = Mode.STARTING
        problem: str | None = None
        while True:
            try:
                problem = await self.check_schema()
                break
            except CloudflareError as exc:
                if self._failed(f"schema check failed: {exc}"):
                    await self._spread_wakes()
                await anyio.sleep(self.watch.discovery_interval.total_seconds())
        if problem is not None:  # for good: until a restart
            self.fall_back(problem)
            await self._spread_wakes()
            return
        while True:
            try:
                went = await self.once()
            except Exception as exc:  # a bug must not stop the daemon: the loops go on
                log.exception("discovery failed", error=repr(exc))
                went = self._failed(f"discovery failed: {type(exc).__name__}")
            if went:
                await self._spread_wakes()
            step = self.watch.discovery_interval.total_seconds()
            wait = step - (self.clock().timestamp() - ALIGN) % step
            await anyio.sleep(wait)

    async def once(self) -> bool:
        """One query; wakes the scripts whose versions changed. True when the signal has just
        become unusable (the idle scripts must then be read the old way)."""
        now = self.clock()
        start = now.replace(second=0, microsecond=0) - self.lookback
        scripts = sorted(s for s in self.watch.scripts if self.held is None or self.held(s))
        if not scripts and self.held is not None:
            return False
        found: dict[str, set[str]] = {}
        try:
            for i in range(0, max(1, len(scripts)), CHUNK):
                where: dict[str, Any] = {
                    "datetime_geq": format_time(start),
                    "datetime_lt": format_time(now),
                }
                if self.filtered:
                    where["scriptName_in"] = scripts[i : i + CHUNK]
                variables = {"accountTag": self.account_id, "filter": where}
                self.queries += 1
                data = await self.client.graphql(QUERY, variables)
                for script, versions in serving(data).items():
                    found.setdefault(script, set()).update(versions)
                if not self.filtered:
                    break  # one query answered for the whole account
        except (CloudflareError, Malformed) as exc:
            return self._failed(f"discovery query failed: {exc}")
        if self.watch.mode is Mode.FALLBACK:
            log.info("discovery works again: idle scripts read on its signal")
        self.watch.mode, self.watch.problem, self.last_ok = Mode.SIGNAL, None, now
        self.on_result(None)
        woken = self.watch.changed(found, start)
        if woken:
            log.info("discovery: versions changed; reading deployments", scripts=woken[:20])
        self.watch.wake(woken)
        return False

    def _failed(self, why: str) -> bool:
        """A query failed: fall back once none has worked for two intervals."""
        log.warning(why)
        if self.watch.mode is Mode.FALLBACK:
            self.watch.problem = why
            self.on_result(why)
            return False
        now = self.clock()
        limit = 2 * self.watch.discovery_interval
        if self.last_ok is not None and now - self.last_ok < limit:
            return False
        self.fall_back(why)
        return True

    def fall_back(self, why: str) -> None:
        """Stop relying on the signal: idle scripts read every discovery interval."""
        self.watch.mode, self.watch.problem = Mode.FALLBACK, why
        self.on_result(why)
        log.warning(
            "discovery unavailable: reading every idle script's deployment each"
            " COALMINE_DISCOVERY_INTERVAL instead (more REST calls)",
            problem=why,
        )

    async def _spread_wakes(self) -> None:
        """Wake the idle loops, spread over one discovery interval (they were sleeping for a
        drift interval, and a burst would queue behind the REST budget)."""
        idle = [loop for loop in list(self.watch.loops.values()) if loop.idle]
        gap = self.watch.discovery_interval.total_seconds() / max(1, len(idle))
        for loop in idle:
            loop.wake()
            await anyio.sleep(gap)
