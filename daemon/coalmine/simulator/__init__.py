"""A simulated world for coalmine to run against: Cloudflare, the Workers' metrics, the notifiers.

Real HTTP servers on loopback ports, so the daemon under test talks to them exactly as it would
to the real services::

    clock = VirtualClock()
    sim = Simulator(clock=clock, seed=7)
    stable = sim.add_script("api", requests_per_minute=600)
    canary = sim.upload_version("api", Behaviour(http_5xx_rate=0.05))
    async with sim.running():
        sim.start_canary("api", canary, percent=10)   # as `wrangler versions deploy`
        ...  # point coalmine at sim.cloudflare_api_url, sim.prometheus_metrics_url, ...
        clock.advance(60)

Parts: :class:`~coalmine.simulator.traffic.World` (the traffic model),
:class:`~coalmine.simulator.cloudflare.CloudflareApi` (REST and GraphQL),
:class:`~coalmine.simulator.prometheus.MetricsExporter` (``/metrics``), and the receivers
:class:`~coalmine.simulator.receivers.PagerDuty`, :class:`~coalmine.simulator.receivers.Slack`
and :class:`~coalmine.simulator.receivers.Grafana`. Each server is a
:class:`~coalmine.simulator.service.Service` with a request log, injected faults and
``go_down()``/``go_up()``.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Unpack

import anyio
from anyio.abc import TaskStatus

from coalmine.simulator.cloudflare import CloudflareApi, RateLimits
from coalmine.simulator.deployments import ApiError, Deployment, Version
from coalmine.simulator.graphql import AnalyticsLimits
from coalmine.simulator.hooks import Incident, PagerDutyRest, WebhookReceiver
from coalmine.simulator.prometheus import MetricsExporter, render
from coalmine.simulator.receivers import Alert, Grafana, PagerDuty, Slack
from coalmine.simulator.service import Injection, LoggedRequest, Service
from coalmine.simulator.traffic import (
    Behaviour,
    BehaviourChanges,
    Clock,
    Counters,
    Fault,
    MinuteRow,
    VirtualClock,
    World,
    wall_clock,
)

__all__ = [
    "Alert",
    "AnalyticsLimits",
    "ApiError",
    "Behaviour",
    "BehaviourChanges",
    "Clock",
    "CloudflareApi",
    "Counters",
    "Deployment",
    "Fault",
    "Grafana",
    "Incident",
    "Injection",
    "LoggedRequest",
    "MetricsExporter",
    "MinuteRow",
    "PagerDuty",
    "PagerDutyRest",
    "RateLimits",
    "Service",
    "Simulator",
    "Slack",
    "Version",
    "VirtualClock",
    "WebhookReceiver",
    "World",
    "render",
    "wall_clock",
]


class Simulator:
    """Every simulated service, sharing one clock and one traffic model."""

    def __init__(
        self,
        *,
        clock: Clock = wall_clock,
        seed: int = 0,
        noise: bool = True,
        analytics: AnalyticsLimits | None = None,
        rate_limits: RateLimits | None = None,
        prometheus_url: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        secrets = random.Random(f"{seed}/secrets")
        self.clock = clock
        self.world = World(clock, seed=seed, noise=noise)
        self.cloudflare = CloudflareApi(
            self.world,
            clock,
            account_id=f"{secrets.getrandbits(128):032x}",
            api_token=f"{secrets.getrandbits(160):040x}",
            seed=seed,
            analytics=analytics,
            rate_limits=rate_limits,
            host=host,
        )
        self.metrics = MetricsExporter(self.world, clock, host=host)
        self.pagerduty_routing_key = f"{secrets.getrandbits(128):032x}"
        self.pagerduty = PagerDuty(clock, routing_key=self.pagerduty_routing_key, host=host)
        self.slack = Slack(clock, host=host)
        self.grafana = Grafana(
            clock,
            token=f"glsa_{secrets.getrandbits(128):032x}",
            prometheus_url=prometheus_url,
            host=host,
        )
        self.webhooks = WebhookReceiver(clock, host=host)  # smoke tests for webhook rules
        self.pagerduty_api = PagerDutyRest(
            clock, token=f"u+{secrets.getrandbits(96):024x}", host=host
        )  # incidents, for freezes
        self.services: list[Service] = [
            self.cloudflare,
            self.metrics,
            self.pagerduty,
            self.slack,
            self.grafana,
            self.webhooks,
            self.pagerduty_api,
        ]

    # -- running -------------------------------------------------------------------------------

    async def serve(
        self, *, task_status: TaskStatus[Simulator] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve every service until cancelled; ready (every port bound) once started."""
        async with anyio.create_task_group() as tg:
            for service in self.services:
                await tg.start(service.serve)
            task_status.started(self)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Simulator]:
        """Serve for the duration of the block."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.serve)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    # -- what to configure coalmine with -------------------------------------------------------

    @property
    def account_id(self) -> str:
        """``COALMINE_CLOUDFLARE_ACCOUNT_ID``."""
        return self.cloudflare.account_id

    @property
    def api_token(self) -> str:
        """``COALMINE_CLOUDFLARE_API_TOKEN``."""
        return self.cloudflare.api_token

    @property
    def cloudflare_api_url(self) -> str:
        """``COALMINE_CLOUDFLARE_API_URL``: ``http://127.0.0.1:PORT/client/v4``."""
        return self.cloudflare.url

    @property
    def prometheus_metrics_url(self) -> str:
        """The Workers' metrics for a Prometheus to scrape: ``http://127.0.0.1:PORT/metrics``."""
        return self.metrics.url

    @property
    def pagerduty_url(self) -> str:
        """``COALMINE_PAGERDUTY_URL``."""
        return self.pagerduty.url

    @property
    def slack_webhook_url(self) -> str:
        """``COALMINE_SLACK_WEBHOOK_URL``."""
        return self.slack.url

    @property
    def grafana_url(self) -> str:
        """``COALMINE_GRAFANA_URL``."""
        return self.grafana.url

    @property
    def grafana_token(self) -> str:
        """``COALMINE_GRAFANA_TOKEN``."""
        return self.grafana.token

    @property
    def grafana_datasource_uid(self) -> str:
        """``COALMINE_GRAFANA_DATASOURCE_UID``."""
        return self.grafana.datasource_uid

    def environment(self) -> dict[str, str]:
        """The ``COALMINE_*`` variables that point coalmine at this simulator."""
        return {
            "COALMINE_CLOUDFLARE_ACCOUNT_ID": self.account_id,
            "COALMINE_CLOUDFLARE_API_TOKEN": self.api_token,
            "COALMINE_CLOUDFLARE_API_URL": self.cloudflare_api_url,
            "COALMINE_PAGERDUTY_ROUTING_KEY": self.pagerduty_routing_key,
            "COALMINE_PAGERDUTY_URL": self.pagerduty_url,
            "COALMINE_SLACK_WEBHOOK_URL": self.slack_webhook_url,
            "COALMINE_GRAFANA_URL": self.grafana_url,
            "COALMINE_GRAFANA_TOKEN": self.grafana_token,
            "COALMINE_GRAFANA_DATASOURCE_UID": self.grafana_datasource_uid,
            "COALMINE_PAGERDUTY_API_URL": self.pagerduty_api.url,
            "COALMINE_PAGERDUTY_API_TOKEN": self.pagerduty_api.token,
        }

    # -- shaping the world ---------------------------------------------------------------------

    def add_script(
        self,
        name: str,
        *,
        requests_per_minute: float = 600.0,
        behaviour: Behaviour | None = None,
        version_id: str | None = None,
    ) -> str:
        """A Worker with one version serving all its traffic; returns that version's id."""
        return self.cloudflare.add_script(
            name,
            requests_per_minute=requests_per_minute,
            behaviour=behaviour,
            version_id=version_id,
        )

    def upload_version(
        self,
        script: str,
        behaviour: Behaviour | None = None,
        *,
        version_id: str | None = None,
        message: str | None = None,
    ) -> str:
        """Upload a version without deploying it; returns its id."""
        return self.cloudflare.upload_version(
            script, behaviour, version_id=version_id, message=message
        )

    def start_canary(
        self, script: str, canary: str, *, percent: float = 10, message: str | None = None
    ) -> Deployment:
        """Split traffic as ``wrangler versions deploy`` would: the canary at ``percent``, the
        version serving the most traffic now at the rest."""
        current = self.cloudflare.current(script).split
        stable = max(current, key=lambda v: current[v])
        if stable == canary:
            raise ValueError(f"{canary} already serves most of {script}'s traffic")
        return self.cloudflare.deploy(
            script, [(canary, percent), (stable, 100 - percent)], message=message
        )

    def deploy_by_hand(
        self,
        script: str,
        versions: Mapping[str, float] | Sequence[tuple[str, float]],
        *,
        message: str = "changed in the dashboard",
    ) -> Deployment:
        """Someone changes the split outside coalmine (drift)."""
        return self.cloudflare.deploy_by_hand(script, versions, message=message)

    def schedule_fault(
        self,
        script: str,
        version: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        duration: timedelta | None = None,
        **changes: Unpack[BehaviourChanges],
    ) -> Fault:
        """Change a version's behaviour from ``start`` (default now) until ``end``, or for
        ``duration`` (default: for good), e.g. ``http_5xx_rate=0.2``."""
        return self.world.schedule_fault(script, version, start, end, duration=duration, **changes)

    def set_requests_per_minute(self, script: str, requests_per_minute: float) -> None:
        """From now on, the script receives this much traffic."""
        self.world.set_rate(script, requests_per_minute)

    def counters(self, script: str, version: str) -> Counters:
        """A version's cumulative counters now, as ``/metrics`` shows them."""
        return self.world.counters(script, version)

    # -- what came in --------------------------------------------------------------------------

    @property
    def errors(self) -> list[BaseException]:
        """Exceptions the simulated services raised while answering (their bugs)."""
        return [e for service in self.services for e in service.errors]

    def deployment_posts(self, script: str | None = None) -> list[object]:
        """The bodies of deployment POSTs Cloudflare received, in order."""
        return self.cloudflare.deployment_posts(script)

    @property
    def pages(self) -> list[dict[str, object]]:
        """Every PagerDuty alert event accepted, in order."""
        return self.pagerduty.events

    @property
    def slack_messages(self) -> list[dict[str, object]]:
        """Every Slack message accepted, in order."""
        return self.slack.messages

    @property
    def annotations(self) -> list[dict[str, object]]:
        """Every Grafana annotation, by id order."""
        return list(self.grafana.annotations.values())

    def scrape(self) -> str:
        """The exposition ``/metrics`` serves now (without HTTP)."""
        return render(self.world)
