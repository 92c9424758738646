"""Wiring: from :class:`~coalmine.settings.Settings` to a running daemon.

Everything is built here, once, and passed down: the store, one HTTP client (TLS verified),
the Cloudflare client and its rate limiter, the sources, the actuator, the outbox, metrics on
their own registry, and one :class:`~coalmine.daemon.ScriptLoop` per script the policies
govern. :func:`run` is one task group: the HTTP server, the outbox and every loop are its
children; cancelling it (SIGTERM) lets each loop finish the write it is in.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx
import structlog
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from coalmine import __version__
from coalmine.cloudflare.actuator import Actuator
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient, CloudflareError, GraphQLAnswerError
from coalmine.cloudflare.discovery import CHECK as DISCOVERY
from coalmine.cloudflare.discovery import Discovery, Watch
from coalmine.cloudflare.planner import BudgetPlanner, Watched
from coalmine.daemon import ACTIVE, ScriptLoop, Shared
from coalmine.engine import Engine, Options, RolloutState
from coalmine.errors import CoalmineError, ConfigError, LocalError, StoreError
from coalmine.guard import Guard
from coalmine.notify.outbox import Outbox, Receivers
from coalmine.policy import Policy
from coalmine.policyfile import load_policies
from coalmine.replicas import LeaseKeeper
from coalmine.server.api import Api
from coalmine.server.health import Health
from coalmine.server.http import serve
from coalmine.server.metrics import Metrics
from coalmine.settings import Settings
from coalmine.sources import Source
from coalmine.sources.build import build_sources, cover
from coalmine.sources.cloudflare import CHECK, CloudflareAnalytics, schema_page
from coalmine.sources.pagerduty import NAME as PAGERDUTY_API
from coalmine.sources.pagerduty import IncidentFreeze
from coalmine.store import StateStore, open_store
from coalmine.store.kept import KeepingStore
from coalmine.store.leases import OUTBOX, exclusive_file, shared
from coalmine.store.records import StoreIdentity, Verification

log = structlog.get_logger("coalmine")
JOURNAL_CHECK_EVERY = 3600.0  # seconds between hash-chain checks of the journal
GOLDEN = (5**0.5 - 1) / 2
Task = Callable[[], Coroutine[Any, Any, object]]
Start = Callable[[Task], None]  # runs a task in the daemon's task group


def loop_phase(i: int) -> float:
    """Where in its interval the ``i``-th loop (from 1) ticks, as a share of the interval.

    Loops started together in step send their calls at one instant: each then waits behind
    the others in the HTTP pool, and the pool's bookkeeping grows with the crowd. The
    golden-ratio sequence spreads any run of consecutive loops (one policy's scripts) evenly.
    """
    return ((i * GOLDEN) % 1.0) or 1.0


def _now() -> datetime:
    return datetime.now(UTC)


def _secret(value: object) -> str | None:
    getter = getattr(value, "get_secret_value", None)
    return getter() if getter else None


def check_live_settings(settings: Settings, policies: list[Policy]) -> None:
    """Refuse to start without what live use needs, naming the variables."""
    missing = [
        name
        for name, value in (
            ("COALMINE_CLOUDFLARE_ACCOUNT_ID", settings.cloudflare_account_id),
            ("COALMINE_CLOUDFLARE_API_TOKEN", settings.cloudflare_api_token),
        )
        if not value
    ]
    sources = {r.source for p in policies for r in p.rules}
    if "prometheus" in sources and not settings.prometheus_url:
        missing.append("COALMINE_PROMETHEUS_URL (the policies have prometheus rules)")
    if "grafana" in sources and not (
        settings.grafana_url and settings.grafana_token and settings.grafana_datasource_uid
    ):
        missing.append(
            "COALMINE_GRAFANA_URL, COALMINE_GRAFANA_TOKEN and COALMINE_GRAFANA_DATASOURCE_UID"
            " (the policies have grafana rules)"
        )
    if any(p.freeze for p in policies) and not settings.pagerduty_api_token:
        missing.append("COALMINE_PAGERDUTY_API_TOKEN (the policies have an incident freeze)")
    if missing:
        raise ConfigError("missing settings: " + "; ".join(missing))


def prepare(settings: Settings) -> list[Policy]:
    """Load the policies and check the settings live use needs; raise a LocalError if not."""
    policies = list(load_policies([settings.policies]).values())
    check_live_settings(settings, policies)
    return policies


@dataclass
class Daemon:
    """Everything a running coalmine is made of; built by :func:`open_daemon`."""

    settings: Settings
    store: StateStore
    shared: Shared
    loops: dict[str, ScriptLoop]
    api: Api
    outbox: Outbox
    metrics: Metrics
    health: Health
    leases: LeaseKeeper | None = None
    planner: BudgetPlanner | None = None
    discovery: Discovery | None = None  # the account-wide signal of new splits
    # what the settings build for a set of policies (a reload's new rules may need more)
    build: Callable[[list[Policy]], dict[str, Source]] | None = None

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTP, deliver notifications and run every script's loop until cancelled.

        Pending traffic changes from before a crash are reconciled before any loop starts.
        Reports the bound HTTP port once ready.
        """
        host, port = self.settings.listen_address
        async with anyio.create_task_group() as tg:
            try:
                bound = await tg.start(
                    lambda task_status: serve(
                        self.api, host, port, task_status=task_status, on_accept=self.accepting
                    )
                )
            except OSError as exc:  # taken, or not an address of this host: not a bug
                why = exc.strerror or str(exc)
                raise ConfigError(f"COALMINE_LISTEN {host}:{port}: cannot listen: {why}") from None
            if self.settings.public_url is None:  # links in pages: the port actually bound
                self.shared.public_url = _listen_url(host, bound)
            if self.leases is None:
                for loop in self.loops.values():
                    await loop.reconcile()
                tg.start_soon(self.outbox.run)
            else:  # each holder reconciles its own scripts as it takes them
                tg.start_soon(self.keep_leases)
                tg.start_soon(self.leases.while_held, OUTBOX, self.outbox.run)
            tg.start_soon(self.check_analytics_schema)
            if self.discovery is not None:
                tg.start_soon(self.discovery.run)
            tg.start_soon(self.shared.guard.run)
            tg.start_soon(self.verify_journal_every, JOURNAL_CHECK_EVERY)
            for i, loop in enumerate(self.loops.values(), start=1):
                tg.start_soon(loop.run, loop_phase(i))
            self.api.ready = True
            log.info(
                "coalmine started",
                version=__version__,
                listen=f"{host}:{bound}",
                scripts=sorted(self.loops),
                dry_run=self.settings.dry_run,
                replica=self.leases.replica if self.leases else None,
                auto_rollback=self.settings.auto_rollback,
                auto_promote=self.settings.auto_promote,
            )
            task_status.started(bound)

    async def check_analytics_schema(self, retry_every: float = 60.0) -> str | None:
        """Check the Cloudflare analytics query against Cloudflare's schema (introspection),
        retrying until Cloudflare answers; a missing field is named in /health, the log and
        one warning page. Returns the problem, or None."""
        source = self.shared.sources.get("cloudflare")
        if not isinstance(source, CloudflareAnalytics):
            return None
        while True:
            try:
                problem = await source.check_schema()
                break
            except GraphQLAnswerError as exc:  # introspection refused: the query may still work
                log.warning("analytics schema not checked: introspection refused", error=str(exc))
                return None
            except CloudflareError as exc:
                log.warning("analytics schema check: Cloudflare did not answer", error=str(exc))
                await anyio.sleep(retry_every)
        self.health.record(CHECK, 0.0, problem)
        if problem is not None and self.loops:
            log.error("analytics query does not fit Cloudflare's schema", problem=problem)
            loop = next(iter(self.loops.values()))  # the page is the daemon's, not a script's
            now = self.shared.clock()
            try:
                await self.store.commit(
                    loop.script, loop.state.to_json(), [], [schema_page(problem)], now
                )
            except CoalmineError as exc:
                # the store is down, or (replicas) another replica holds that script and pages
                # instead: /health and the log above still say it; a task of the daemon's task
                # group must not raise, or the whole daemon stops
                log.warning("analytics schema page not queued", error=str(exc))
            else:
                self.outbox.wake()
        return problem

    def accepting(self, error: str | None) -> None:
        """The HTTP server's accept started failing (EMFILE, ...) or works again: /health
        shows its ``http`` check failing meanwhile; the loops go on."""
        self.health.record("http", 0.0, error)
        if error is None:
            log.info("accepting HTTP connections again")
        else:
            log.error("cannot accept HTTP connections", error=error)

    async def reload(self, start: Start) -> bool:
        """Load the policies again (SIGHUP): validated first, an invalid set refused with a
        warning and the running policies kept. A valid set replaces the loops' policies:
        ``start`` runs a loop for each new script, a removed script's loop stops after its
        current tick, and running rollouts keep their state. The sources grow to serve the new
        rules (:func:`~coalmine.sources.build.cover`); a changed analytics query has its schema
        checked again (``start`` runs that too)."""
        try:
            policies = prepare(self.settings)
        except LocalError as exc:
            log.warning(
                "policies NOT reloaded: the new set is invalid; the running ones stay",
                error=str(exc),
            )
            return False
        if self.build is not None:
            fresh = self.build(policies)
            self.health.expect(*(name for name in fresh if name not in self.shared.sources))
            if cover(self.shared.sources, fresh, policies) is not None:
                start(self.check_analytics_schema)
        options = Options(
            self.settings.auto_rollback, self.settings.auto_promote, self.settings.dry_run
        )
        try:
            saved = await self.store.states()
        except StoreError:
            saved = {}
        wanted: dict[str, tuple[Policy, Engine]] = {}
        for policy in policies:
            engine = Engine(policy, options)
            for script in policy.scripts:
                wanted[script] = (policy, engine)
        for script in [s for s in self.loops if s not in wanted]:
            self.loops.pop(script).stop()
        for script, (policy, engine) in wanted.items():
            if script in self.loops:
                self.loops[script].use_policy(policy, engine)
                continue
            state = (
                RolloutState.from_json(saved[script])
                if script in saved
                else engine.new_state(script)
            )
            self.loops[script] = loop = ScriptLoop(script, policy, engine, state, self.shared)
            start(loop.run)
        if self.planner is not None:
            self.planner.watch(watched(self.loops))
        log.info(
            "policies reloaded",
            scripts=sorted(self.loops),
            policies=sorted(p.name for p in policies),
        )
        return True

    async def keep_leases(self) -> None:
        """Keep this replica's leases (given back when the daemon closes, after the loops'
        last writes)."""
        keeper = self.leases
        assert keeper is not None
        keeper.on_round = self._after_lease_round

        def store_ok(ok: bool) -> None:  # a replica holding nothing still reports its store
            self.health.store_ok = ok

        keeper.on_store = store_ok
        keeper.on_conflict = lambda problem: self.health.record("replica_id", 0.0, problem)
        await keeper.run()

    async def _after_lease_round(self, acquired: set[str], lost: set[str]) -> None:
        """Wake the loops of scripts just taken; show the holders' state for the others."""
        keeper = self.leases
        assert keeper is not None
        for script in (acquired | keeper.queued) & self.loops.keys():
            self.loops[script].wake()
        saved = await self.store.states()
        for script, loop in self.loops.items():
            if keeper.fence(script) is None and script in saved:
                loop.state = RolloutState.from_json(saved[script])
                self.metrics.record(loop.state, loop.engine.rules, [])  # as the holder sees it
                self.shared.on_canary(script, loop.state.phase in ACTIVE)  # the token's plan

    async def verify_journal(self) -> bool:
        """Check the journal's hash chain now and export the result."""
        try:
            result = await self.store.verify_journal()
        except StoreError as exc:
            log.error("journal could not be read for verification", error=str(exc))
            return False
        return self._export_verification(result)

    def _export_verification(self, result: Verification) -> bool:
        identity: StoreIdentity = self.shared.guard.expected
        log.info(
            "journal verified" if result.ok else "journal broken",
            entries=result.entries,
            store_id=identity.id,
            created_at=identity.created_at.isoformat(),
        )
        self.metrics.journal_verified.set(1 if result.ok else 0)
        self.metrics.journal_entries.set(result.entries)
        if not result.ok:
            log.error(
                "journal verification FAILED", problem=result.problem, good_entries=result.entries
            )
        return result.ok

    async def verify_journal_every(self, seconds: float) -> None:
        """Verify the journal at start-up and then every ``seconds``, off the event loop."""
        while True:
            try:
                result = await self.store.verify_journal()
            except StoreError as exc:
                log.error("journal could not be read for verification", error=str(exc))
            else:
                self._export_verification(result)
            await anyio.sleep(seconds)


@asynccontextmanager
async def open_daemon(
    settings: Settings,
    policies: list[Policy],
    *,
    clock: Callable[[], datetime] = _now,
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    transport: httpx.AsyncBaseTransport | None = None,
    replicas: bool | None = None,
) -> AsyncIterator[Daemon]:
    """Build the daemon from settings and policies (from :func:`prepare`); close it after.

    ``clock`` and ``sleep`` are the daemon's time: the wall clock by default, a virtual clock
    in tests and backtests (the rate limiter and retries then wait in virtual time too).
    ``replicas``: share the scripts with other replicas through leases (default: when the
    store supports it and is not SQLite, which allows one process).
    """
    monotonic = time.monotonic if clock is _now else (lambda: clock().timestamp())
    options = Options(settings.auto_rollback, settings.auto_promote, settings.dry_run)
    async with AsyncExitStack() as stack:
        try:  # unreadable, malformed, unwritable: a local mistake to fix (exit 2), not a bug
            raw = open_store(settings.state_url)
            stack.push_async_callback(raw.aclose)
            expected = await raw.identity()
        except StoreError as exc:
            raise ConfigError(f"COALMINE_STATE_URL: {exc}") from None
        store = KeepingStore(raw, clock)
        stack.push_async_callback(store.last_flush)  # before the store is closed
        http = await stack.enter_async_context(httpx.AsyncClient(transport=transport, verify=True))
        metrics = Metrics(CollectorRegistry())
        health = Health(monotonic)  # failing-for times and the unhealthy limit in the daemon's time
        planner = BudgetPlanner(settings, metrics, health)

        def observe(name: str, seconds: float, error: str | None) -> None:
            metrics.observe_call(name, seconds, error)
            health.record(name, seconds, error)

        rest = TokenBucket(settings.cloudflare_rate_limit, clock=monotonic, sleep=sleep)
        cloudflare = CloudflareClient(
            http,
            base_url=settings.cloudflare_api_url,
            account_id=settings.cloudflare_account_id or "",
            token=_secret(settings.cloudflare_api_token) or "",
            limiter=rest,
            graphql_limiter=rest.sibling(settings.cloudflare_graphql_rate_limit),
            observe=observe,
            sleep=sleep,
        )
        metrics.watch_budgets(cloudflare.budgets)
        discovery = _discovery(settings, cloudflare, clock, health, planner)
        sources = build_sources(settings, http, cloudflare, observe, policies, sleep)
        health.expect("cloudflare", *sources)
        receivers = Receivers(
            pagerduty_url=settings.pagerduty_url if settings.pagerduty_routing_key else None,
            pagerduty_routing_key=_secret(settings.pagerduty_routing_key),
            slack_webhook_url=_secret(settings.slack_webhook_url),
            grafana_url=settings.grafana_url,
            grafana_token=_secret(settings.grafana_token),
        )

        def delivered(channel: str, error: str | None) -> None:
            metrics.notifications.labels(channel, "error" if error else "ok").inc()
            health.record(channel, 0.0, error)

        outbox = Outbox(store, http, receivers, clock, on_result=delivered)
        keeper = _keeper(settings, raw, policies, metrics, replicas)
        if keeper is not None:  # on the way out, after the loops' last writes
            await keeper.announce()  # this id is now this process's: an older one stands aside
            planner.share_with(keeper, cloudflare.budgets.values())  # its share of the token
            stack.push_async_callback(_step_down, keeper)
            http.event_hooks = {**http.event_hooks, "request": [keeper.request_hook]}
        actuator = Actuator(cloudflare, store, clock, fence=keeper.check if keeper else None)
        # a replica looks for changes to the scripts it holds
        discovery.held = (lambda script: keeper.fence(script) is not None) if keeper else None
        freeze = _freeze(settings, policies, http, health, observe, monotonic)
        guard = Guard(store, outbox, health, metrics, clock, expected)
        shared = Shared(
            store,
            cloudflare,
            actuator,
            sources,
            metrics,
            health,
            outbox,
            clock,
            settings.discovery_interval,
            guard,
            freeze=freeze,
            leases=keeper,
            public_url=settings.public_url or _listen_url(*settings.listen_address),
            on_canary=planner.canary,
            watch=discovery.watch,
        )
        saved = await store.states()
        loops = {}
        for policy in policies:
            engine = Engine(policy, options)
            for script in policy.scripts:
                state = (
                    RolloutState.from_json(saved[script])
                    if script in saved
                    else engine.new_state(script)
                )
                loops[script] = ScriptLoop(script, policy, engine, state, shared)
        planner.watch(watched(loops))
        api = Api(
            loops,
            metrics,
            health,
            _secret(settings.admin_token),
            lambda: outbox.pending,
            budget=planner.describe,
        )
        yield Daemon(
            settings,
            raw,
            shared,
            loops,
            api,
            outbox,
            metrics,
            health,
            keeper,
            planner,
            discovery,
            lambda ps: build_sources(settings, http, cloudflare, observe, ps, sleep),
        )


def watched(loops: dict[str, ScriptLoop]) -> list[Watched]:
    """Each loop's script, policy and whether it has a live canary, for the budget plan."""
    return [Watched(s, loop.policy, loop.state.phase in ACTIVE) for s, loop in loops.items()]


def _discovery(
    settings: Settings,
    cloudflare: CloudflareClient,
    clock: Callable[[], datetime],
    health: Health,
    planner: BudgetPlanner,
) -> Discovery:
    """The account-wide signal, and the record of each script's deployment as last read (every
    read of a live deployment, the actuator's too, is recorded)."""
    watch = Watch(
        discovery_interval=settings.discovery_interval,
        drift_interval=settings.drift_interval,
        canary_drift_interval=settings.canary_drift_interval,
    )
    cloudflare.on_current = lambda script, live: watch.saw(script, live, clock())
    return Discovery(
        cloudflare,
        settings.cloudflare_account_id or "",
        watch,
        clock,
        on_result=lambda problem: _discovery_result(health, planner, problem),
    )


def _freeze(
    settings: Settings,
    policies: list[Policy],
    http: httpx.AsyncClient,
    health: Health,
    observe: Callable[[str, float, str | None], None],
    monotonic: Callable[[], float],
) -> IncidentFreeze | None:
    """PagerDuty's incidents, when a policy has an incident freeze."""
    if not any(p.freeze for p in policies):
        return None
    health.expect(PAGERDUTY_API)
    token = _secret(settings.pagerduty_api_token)
    return IncidentFreeze(http, settings.pagerduty_api_url, token, observe=observe, clock=monotonic)


def _discovery_result(health: Health, planner: BudgetPlanner, problem: str | None) -> None:
    """Discovery works (None) or has fallen back (why): /health, and the budget plan (idle
    scripts then cost one read per discovery interval)."""
    health.record(DISCOVERY, 0.0, problem)
    planner.fallback(problem)


async def _step_down(keeper: LeaseKeeper) -> None:
    """Give the leases back so that another replica takes over at once, not a TTL later."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await keeper.step_down()
        except CoalmineError as exc:
            log.warning("leases not given back; they expire instead", error=str(exc))


def _keeper(
    settings: Settings,
    store: StateStore,
    policies: list[Policy],
    metrics: Metrics,
    replicas: bool | None,
) -> LeaseKeeper | None:
    """The lease keeper of a replica sharing ``store``; None when it runs alone."""
    leased = shared(store)
    if replicas is None:
        replicas = not settings.state_url.startswith("sqlite:")
    if not replicas or leased is None:
        return None
    scripts = [script for policy in policies for script in policy.scripts]
    ttl = settings.lease_ttl.total_seconds()
    keeper = LeaseKeeper(leased, settings.replica, ttl, scripts, metrics.leases)
    leased.fence = keeper.holdings  # every tick's write checks the lease in its transaction
    return keeper


async def run_until_signalled(settings: Settings, policies: list[Policy]) -> None:
    """``coalmine run``: the daemon, stopped cleanly by SIGTERM or SIGINT; SIGHUP reloads
    the policies. The store is opened before anything runs, so an unusable one is a plain
    error (exit 2), and closed only after every loop has finished its write. SQLite allows
    one process: a second one on the same file is refused."""
    # the store is opened (and an unusable one named) before the lock beside it is taken
    async with open_daemon(settings, policies) as daemon:
        with ExitStack() as stack:
            if settings.state_url.startswith("sqlite:"):
                stack.enter_context(exclusive_file(settings.state_path))
            async with anyio.create_task_group() as tg:

                def start(run: Task) -> None:
                    tg.start_soon(run)

                async def watch_signals() -> None:
                    with anyio.open_signal_receiver(
                        signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                    ) as signals:
                        async for signum in signals:
                            if signum == signal.SIGHUP:
                                log.info("reloading the policies", signal="SIGHUP")
                                await daemon.reload(start)
                                continue
                            log.info("stopping", signal=signal.Signals(signum).name)
                            tg.cancel_scope.cancel()
                            return

                tg.start_soon(watch_signals)
                await daemon.serve()


def _listen_url(host: str, port: int) -> str:
    """``http://`` and the listen address (a wildcard host is named as loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
