"""The sources the settings and policies need: built at start, grown on a reload.

A policy reloaded by SIGHUP may bring rules the running sources were not built for: a first
``source: webhook`` or ``source: cloudflare`` rule, a Cloudflare rule with a longer window or a
signal the analytics query does not ask for yet. :func:`cover` makes the running sources serve
them, as a restart would; it never narrows what they serve (running rollouts keep their old
policy's rules until they end).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import httpx

from coalmine.cloudflare.client import CloudflareClient
from coalmine.policy import Policy
from coalmine.settings import Settings
from coalmine.sources import Source
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.prometheus import PrometheusSource
from coalmine.sources.webhook import WebhookSource


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
    rules = [r for p in policies for r in p.rules if r.source == "cloudflare"]
    if rules and settings.cloudflare_account_id:
        sources["cloudflare"] = CloudflareAnalytics(
            cloudflare,
            settings.cloudflare_account_id,
            longest_window=max(r.window for r in rules),
            signals={r.signal for r in rules if r.signal is not None},
        )
    if any(r.source == "webhook" for p in policies for r in p.rules):
        sources["webhook"] = WebhookSource(http, observe=observe)
    return sources


def cover(
    sources: dict[str, Source], fresh: dict[str, Source], policies: list[Policy]
) -> CloudflareAnalytics | None:
    """Make ``sources`` (running) serve every rule of ``policies`` (reloaded), given
    ``fresh``, what :func:`build_sources` builds for them: a source they need and that is not
    running is added; the running Cloudflare source widens to their windows and signals.
    Returns the Cloudflare source when its query is new or changed: Cloudflare's schema must
    be checked for it again."""
    running = sources.get("cloudflare")
    for name, source in fresh.items():
        sources.setdefault(name, source)
    if not isinstance(running, CloudflareAnalytics):
        new = sources.get("cloudflare")
        return new if isinstance(new, CloudflareAnalytics) else None
    rules = [r for p in policies for r in p.rules if r.source == "cloudflare"]
    return running if running.cover(rules) else None
