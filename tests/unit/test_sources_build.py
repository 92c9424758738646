"""The sources a reload's policies need are added to the running ones (sources/build.py)."""

from __future__ import annotations

import httpx
import pytest

from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.policy import Policy
from coalmine.policyfile import parse_policy
from coalmine.settings import load_settings
from coalmine.sources import Source
from coalmine.sources.build import build_sources, cover
from coalmine.sources.cloudflare import CloudflareAnalytics
from coalmine.sources.webhook import WebhookSource

pytestmark = pytest.mark.anyio
PROMETHEUS_ONLY = """
version: 1
name: p
scripts: [api]
steps: [{weight: 10, hold: 5m}, {weight: 100}]
rules:
  - {name: errors, source: prometheus, query: 'sum(rate(x[1m]))', above: 1, on_breach: rollback}
"""
BOTH = PROMETHEUS_ONLY + (
    "  - {name: cf, source: cloudflare, signal: errors_per_minute, window: 5m, above: 10,"
    " on_breach: rollback}\n"
    "  - {name: gate, source: webhook, url: 'http://127.0.0.1:9/check', on_breach: hold}\n"
)


async def test_a_reload_adds_the_cloudflare_and_webhook_sources_it_needs() -> None:
    """Started with Prometheus rules only, reloaded with a Cloudflare and a webhook rule: both
    sources are added, the Cloudflare one returned (its schema is to be checked); a second
    reload of the same set changes nothing and returns None."""
    settings = load_settings(
        {"COALMINE_PROMETHEUS_URL": "http://127.0.0.1:9090", "COALMINE_CLOUDFLARE_ACCOUNT_ID": "a"},
        env_file=None,
    )
    async with httpx.AsyncClient() as http:
        cloudflare = CloudflareClient(
            http,
            base_url="https://cf/client/v4",
            account_id="a",
            token="t",
            limiter=TokenBucket(600),
        )

        def build(text: str) -> tuple[list[Policy], dict[str, Source]]:
            policies = [parse_policy(text)]
            return policies, build_sources(settings, http, cloudflare, lambda *_: None, policies)

        _, running = build(PROMETHEUS_ONLY)
        assert sorted(running) == ["prometheus"]
        policies, fresh = build(BOTH)
        added = cover(running, fresh, policies)
        assert isinstance(added, CloudflareAnalytics) and running["cloudflare"] is added
        assert isinstance(running["webhook"], WebhookSource)
        prometheus = running["prometheus"]
        policies, fresh = build(BOTH)
        assert cover(running, fresh, policies) is None
        assert running["cloudflare"] is added and running["prometheus"] is prometheus
