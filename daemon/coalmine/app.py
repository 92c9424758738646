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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import httpx
import structlog
from anyio.abc import TaskStatus
from prometheus_client import CollectorRegistry

from coalmine import __version__
from coalmine.cloudflare.actuator import Actuator
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.daemon import ScriptLoop, Shared
from coalmine.engine import Engine, Options, RolloutState
from coalmine.errors import ConfigError, StoreError
from coalmine.notify.outbox import Outbox, Receivers
from coalmine.policy import Policy
from coalmine.policyfile import load_policies
from coalmine.server.api import Api
from coalmine.server.health import Health
from coalmine.server.httpserver import serve
from coalmine.server.metrics import Metrics
from coalmine.settings import Settings
from coalmine.sources import Source
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.prometheus import PrometheusSource
from coalmine.store.sqlite import Store, Verification, verify_file

log = structlog.get_logger("coalmine")
JOURNAL_CHECK_EVERY = 3600.0  # seconds between hash-chain checks of the journal
GOLDEN = (5**0.5 - 1) / 2


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


def build_sources(
    settings: Settings,
    http: httpx.AsyncClient,
    cloudflare: CloudflareClient,
    observe: Callable[[str, float, str | None], None],
    policies: list[Policy],
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
) -> dict[str, Source]:
    """The configured sources, each call reported through ``observe``."""
    sources: dict[str, Source] = {}
    if settings.prometheus_url:
        sources["prometheus"] = PrometheusSource(
            http, settings.prometheus_url, observe=observe, sleep=sleep
        )
    if settings.grafana_url and settings.grafana_token and settings.grafana_datasource_uid:
        proxy = (
            f"{settings.grafana_url}/api/datasources/proxy/uid/{settings.grafana_datasource_uid}"
        )
        headers = {"Authorization": f"Bearer {settings.grafana_token.get_secret_value()}"}
        sources["grafana"] = PrometheusSource(
            http, proxy, observe=observe, headers=headers, name="grafana", sleep=sleep
        )
    windows = [r.window for p in policies for r in p.rules if r.source == "cloudflare"]
    if windows and settings.cloudflare_account_id:
        sources["cloudflare"] = CloudflareAnalytics(
            cloudflare, settings.cloudflare_account_id, longest_window=max(windows)
        )
    return sources


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
    store: Store
    shared: Shared
    loops: dict[str, ScriptLoop]
    api: Api
    outbox: Outbox
    metrics: Metrics
    health: Health

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve HTTP, deliver notifications and run every script's loop until cancelled.

        Pending traffic changes from before a crash are reconciled before any loop starts.
        Reports the bound HTTP port once ready.
        """
        host, port = self.settings.listen_address
        async with anyio.create_task_group() as tg:
            bound = await tg.start(
                lambda task_status: serve(self.api, host, port, task_status=task_status)
            )
            for loop in self.loops.values():
                await self.shared.actuator.reconcile(loop.script)
            tg.start_soon(self.outbox.run)
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
                auto_rollback=self.settings.auto_rollback,
                auto_promote=self.settings.auto_promote,
            )
            task_status.started(bound)

    def verify_journal(self) -> bool:
        """Check the journal's hash chain now and export the result."""
        try:
            result = self.store.verify_journal()
        except StoreError as exc:
            log.error("journal could not be read for verification", error=str(exc))
            return False
        return self._export_verification(result)

    def _export_verification(self, result: Verification) -> bool:
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
                result = await anyio.to_thread.run_sync(verify_file, self.store.path)
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
) -> AsyncIterator[Daemon]:
    """Build the daemon from settings and policies (from :func:`prepare`); close it after.

    ``clock`` and ``sleep`` are the daemon's time: the wall clock by default, a virtual clock
    in tests and backtests (the rate limiter and retries then wait in virtual time too).
    """
    monotonic = time.monotonic if clock is _now else (lambda: clock().timestamp())
    options = Options(settings.auto_rollback, settings.auto_promote, settings.dry_run)
    async with AsyncExitStack() as stack:
        store = stack.enter_context(Store(settings.state_path))
        http = await stack.enter_async_context(httpx.AsyncClient(transport=transport, verify=True))
        metrics = Metrics(CollectorRegistry())
        health = Health(monotonic)  # failing-for times and the unhealthy limit in the daemon's time

        def observe(name: str, seconds: float, error: str | None) -> None:
            metrics.observe_call(name, seconds, error)
            health.record(name, seconds, error)

        cloudflare = CloudflareClient(
            http,
            base_url=settings.cloudflare_api_url,
            account_id=settings.cloudflare_account_id or "",
            token=_secret(settings.cloudflare_api_token) or "",
            limiter=TokenBucket(settings.cloudflare_rate_limit, clock=monotonic, sleep=sleep),
            observe=observe,
            sleep=sleep,
        )
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
        actuator = Actuator(cloudflare, store, clock)
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
            public_url=settings.public_url or _listen_url(settings),
        )
        saved = store.states()
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
        api = Api(loops, metrics, health, _secret(settings.admin_token), store.backlog)
        yield Daemon(settings, store, shared, loops, api, outbox, metrics, health)


async def run_until_signalled(settings: Settings, policies: list[Policy]) -> None:
    """``coalmine run``: the daemon, stopped cleanly by SIGTERM or SIGINT."""
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("stopping", signal=signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch_signals)
        async with open_daemon(settings, policies) as daemon:
            await daemon.serve()


def _listen_url(settings: Settings) -> str:
    """``http://`` and the listen address (a wildcard host is named as loopback)."""
    host, port = settings.listen_address
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
