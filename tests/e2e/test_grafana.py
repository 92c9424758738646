"""`grafana` rules: PromQL through Grafana's datasource proxy with a service-account token."""

from __future__ import annotations

import anyio
import httpx
import pytest

from coalmine.cli.localprom import free_port
from coalmine.cloudflare.budgets import TokenBucket
from coalmine.cloudflare.client import CloudflareClient
from coalmine.policy import Rule
from coalmine.settings import load_settings
from coalmine.simulator import Simulator
from coalmine.simulator.service import Request, Response, serve
from coalmine.sources import Target
from coalmine.sources.build import build_sources
from tests.support import T0

pytestmark = pytest.mark.anyio
RULE = Rule.model_validate(
    {
        "name": "p99",
        "source": "grafana",
        "query": 'p99{script="$script",version="$version"}',
        "above": 1,
    }
)


async def test_grafana_rule_queries_through_the_datasource_proxy() -> None:
    """The query reaches Prometheus via /api/datasources/proxy/uid/{uid}, authorised by the token."""
    port = free_port()
    seen: list[str] = []

    async def prometheus(request: Request) -> Response:
        seen.append(request.body.decode() or request.target)
        body = {
            "status": "success",
            "data": {"resultType": "vector", "result": [{"metric": {}, "value": [0, "0.42"]}]},
        }
        return Response.json(200, body)

    sim = Simulator(prometheus_url=f"http://127.0.0.1:{port}")
    async with anyio.create_task_group() as tg:
        await tg.start(
            lambda task_status: serve(prometheus, "127.0.0.1", port, task_status=task_status)
        )
        async with sim.running(), httpx.AsyncClient() as http:
            settings = load_settings(sim.environment())
            cloudflare = CloudflareClient(
                http,
                base_url=sim.cloudflare_api_url,
                account_id="a",
                token="t",
                limiter=TokenBucket(600),
            )
            sources = build_sources(settings, http, cloudflare, lambda *_: None, [])
            obs = await sources["grafana"].fetch(
                RULE, Target("api", "canary", "v2", "v2", "v1"), T0
            )
            proxied = [r for r in sim.grafana.requests if "/api/datasources/proxy/uid/" in r.path]
        tg.cancel_scope.cancel()
    assert (obs.value, obs.error) == (0.42, None)
    assert proxied and proxied[0].headers.get("authorization") == "Bearer ***"  # the log hides it
    assert any(
        "p99%7Bscript%3D%22api%22%2Cversion%3D%22v2%22%7D" in s
        or 'p99{script="api",version="v2"}' in s
        for s in seen
    )
