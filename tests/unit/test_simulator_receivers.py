"""The simulator's /metrics and receivers over loopback HTTP: PagerDuty, Slack, Grafana."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import timedelta
from typing import Any

import anyio
import httpx
import pytest

from coalmine.simulator import Behaviour, PagerDuty, Simulator, Slack, VirtualClock
from coalmine.simulator.service import Request, Response, serve

pytestmark = pytest.mark.anyio

ROUTING_KEY = "r" * 32


def trigger(dedup_key: str | None = "coalmine/api/v2/error_rate", **payload: Any) -> dict[str, Any]:
    """A PagerDuty trigger event."""
    event: dict[str, Any] = {
        "routing_key": ROUTING_KEY,
        "event_action": "trigger",
        "payload": {
            "summary": "error rate 2% > 0.5%",
            "source": "coalmine",
            "severity": "critical",
            **payload,
        },
    }
    if dedup_key is not None:
        event["dedup_key"] = dedup_key
    return event


async def test_metrics_exposition_matches_the_counters_and_passes_promtool() -> None:
    """/metrics serves both families per version; counts match the model; promtool accepts it."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, seed=4)
    stable = sim.add_script("api", requests_per_minute=1200)
    canary = sim.upload_version("api", Behaviour(exception_rate=0.01, http_5xx_rate=0.05))
    sim.start_canary("api", canary, percent=10)
    clock.advance(timedelta(minutes=3, seconds=17))
    async with sim.running(), httpx.AsyncClient() as client:
        response = await client.get(sim.prometheus_metrics_url)
    text = response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    counters = sim.counters("api", canary)
    labels = f'script="api",version="{canary}"'
    assert f'http_requests_total{{{labels},code="200"}} {counters.ok}\n' in text
    assert f'http_requests_total{{{labels},code="500"}} {counters.exceptions}\n' in text
    assert f'http_requests_total{{{labels},code="503"}} {counters.http_5xx}\n' in text
    assert (
        f'http_request_duration_seconds_bucket{{{labels},le="+Inf"}} {counters.requests}\n' in text
    )
    assert f"http_request_duration_seconds_count{{{labels}}} {counters.requests}\n" in text
    assert 'le="0.005"' in text and 'le="10.0"' in text
    assert f'version="{stable}",code="200"' in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


async def test_a_version_without_5xx_has_no_5xx_series() -> None:
    """As with a real exporter, a code series appears only once it counted something."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, noise=False)
    sim.add_script("api", behaviour=Behaviour(exception_rate=0.0, http_5xx_rate=0.0))
    clock.advance(60)
    text = sim.scrape()
    assert re.findall(r'code="(\d+)"', text) == ["200"]


async def test_pagerduty_accepts_deduplicates_and_resolves() -> None:
    """202 with the dedup key; a second trigger joins the open alert; after resolve a trigger opens a new one."""
    async with anyio.create_task_group() as tg:
        pagerduty = PagerDuty(VirtualClock(), routing_key=ROUTING_KEY)
        await tg.start(pagerduty.serve)
        async with httpx.AsyncClient(base_url=pagerduty.url) as client:
            first = await client.post("/v2/enqueue", json=trigger())
            await client.post("/v2/enqueue", json=trigger())
            generated = await client.post("/v2/enqueue", json=trigger(dedup_key=None))
            resolve = {
                "routing_key": ROUTING_KEY,
                "event_action": "resolve",
                "dedup_key": "coalmine/api/v2/error_rate",
            }
            await client.post("/v2/enqueue", json=resolve)
            await client.post("/v2/enqueue", json=trigger(severity="error"))
            change = await client.post(
                "/v2/change/enqueue",
                json={
                    "routing_key": ROUTING_KEY,
                    "payload": {"summary": "canary at 10%", "source": "coalmine"},
                },
            )
        tg.cancel_scope.cancel()
    assert first.status_code == 202
    assert first.json() == {
        "status": "success",
        "message": "Event processed",
        "dedup_key": "coalmine/api/v2/error_rate",
    }
    assert len(generated.json()["dedup_key"]) == 32
    alerts = [a for a in pagerduty.alerts if a.dedup_key == "coalmine/api/v2/error_rate"]
    assert [(a.status, len(a.events), a.severity) for a in alerts] == [
        ("resolved", 3, "critical"),
        ("triggered", 1, "error"),
    ]
    assert change.status_code == 202
    assert pagerduty.changes[0]["payload"]["summary"] == "canary at 10%"


@pytest.mark.parametrize(
    ("event", "complaint"),
    [
        (trigger(summary="x" * 1025), "longer than 1024"),
        (trigger(summary=""), "summary"),
        (trigger(source=None), "source"),
        (trigger(severity="page"), "severity"),
        ({**trigger(), "routing_key": "short"}, "routing_key"),
        ({**trigger(), "routing_key": "k" * 32}, "Invalid routing key"),
        ({"routing_key": ROUTING_KEY, "event_action": "resolve"}, "dedup_key"),
        ({**trigger(), "event_action": "page"}, "event_action"),
        ({**trigger(), "dedup_key": "d" * 256}, "dedup_key"),
    ],
)
async def test_pagerduty_refuses_invalid_events(event: dict[str, Any], complaint: str) -> None:
    """An invalid event is a 400 'invalid event' naming the problem, and is not recorded."""
    sim = Simulator(clock=VirtualClock())
    sim.pagerduty.routing_key = ROUTING_KEY
    async with sim.running(), httpx.AsyncClient() as client:
        response = await client.post(f"{sim.pagerduty_url}/v2/enqueue", json=event)
    assert response.status_code == 400
    assert response.json()["status"] == "invalid event"
    assert any(complaint in e for e in response.json()["errors"])
    assert sim.pages == []


async def test_pagerduty_throttles_per_routing_key() -> None:
    """Over the events-per-minute budget PagerDuty answers 429 until the minute passes."""
    clock = VirtualClock()
    async with anyio.create_task_group() as tg:
        pagerduty = PagerDuty(clock, events_per_minute=2)
        await tg.start(pagerduty.serve)
        async with httpx.AsyncClient(base_url=pagerduty.url) as client:
            statuses = [
                (await client.post("/v2/enqueue", json=trigger())).status_code for _ in range(3)
            ]
            clock.advance(60)
            later = await client.post("/v2/enqueue", json=trigger())
        tg.cancel_scope.cancel()
    assert statuses == [202, 202, 429]
    assert later.status_code == 202


async def test_slack_answers_ok_and_plain_text_errors() -> None:
    """ok for a message; invalid_payload, no_text, no_service; rate_limited with Retry-After past a burst."""
    clock = VirtualClock()
    async with anyio.create_task_group() as tg:
        slack = Slack(clock, burst=2)
        await tg.start(slack.serve)
        async with httpx.AsyncClient() as client:
            ok = await client.post(slack.url, json={"text": "canary at 10%"})
            blocks = await client.post(slack.url, json={"blocks": [{"type": "section"}]})
            limited = await client.post(slack.url, json={"text": "third"})
            clock.advance(2)
            bad = await client.post(slack.url, content=b"{nope")
            empty = await client.post(slack.url, json={"text": ""})
            unknown = await client.post(f"{slack.base_url}/services/other", json={"text": "x"})
        tg.cancel_scope.cancel()
    assert (ok.status_code, ok.text) == (200, "ok")
    assert blocks.status_code == 200
    assert (limited.status_code, limited.text, limited.headers["retry-after"]) == (
        429,
        "rate_limited",
        "2",
    )
    assert (bad.status_code, bad.text) == (400, "invalid_payload")
    assert (empty.status_code, empty.text) == (400, "no_text")
    assert (unknown.status_code, unknown.text) == (404, "no_service")
    assert [m.get("text") for m in slack.messages] == ["canary at 10%", None]


async def test_grafana_annotations_need_the_token_and_can_be_patched() -> None:
    """Add returns the id; PATCH closes a region; a wrong token is 401; a bad body is 400."""
    sim = Simulator(clock=VirtualClock())
    auth = {"Authorization": f"Bearer {sim.grafana_token}"}
    async with sim.running(), httpx.AsyncClient(base_url=sim.grafana_url) as client:
        added = await client.post(
            "/api/annotations",
            headers=auth,
            json={"time": 1, "tags": ["coalmine"], "text": "canary 10%"},
        )
        patched = await client.patch(
            f"/api/annotations/{added.json()['id']}", headers=auth, json={"timeEnd": 5}
        )
        missing = await client.patch("/api/annotations/99", headers=auth, json={"timeEnd": 5})
        bad = await client.post("/api/annotations", headers=auth, json={"tags": ["no text"]})
        refused = await client.post("/api/annotations", json={"text": "x"})
    assert added.json() == {"message": "Annotation added", "id": 1}
    assert patched.status_code == 200
    assert sim.annotations[0]["timeEnd"] == 5 and sim.annotations[0]["tags"] == ["coalmine"]
    assert (missing.status_code, bad.status_code, refused.status_code) == (404, 400, 401)


async def test_grafana_proxies_prometheus_queries() -> None:
    """The datasource proxy forwards path and query to Prometheus and returns its answer."""
    seen: list[str] = []

    async def prometheus(request: Request) -> Response:
        seen.append(request.target)
        return Response.json(
            200, {"status": "success", "data": {"resultType": "vector", "result": []}}
        )

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(prometheus, "127.0.0.1", 0, task_status=task_status)
        )
        sim = Simulator(clock=VirtualClock(), prometheus_url=f"http://127.0.0.1:{port}")
        auth = {"Authorization": f"Bearer {sim.grafana_token}"}
        async with (
            sim.running(),
            httpx.AsyncClient(base_url=sim.grafana_url, headers=auth) as client,
        ):
            uid = sim.grafana_datasource_uid
            answer = await client.get(
                f"/api/datasources/proxy/uid/{uid}/api/v1/query", params={"query": "up"}
            )
            unknown = await client.get(
                "/api/datasources/proxy/uid/other/api/v1/query", params={"query": "up"}
            )
        tg.cancel_scope.cancel()
    assert answer.json()["status"] == "success"
    assert seen == ["/api/v1/query?query=up"]
    assert unknown.status_code == 404


async def test_a_service_that_goes_down_refuses_connections_until_it_is_back() -> None:
    """go_down closes the port (connection refused); go_up listens on the same port again."""
    sim = Simulator(clock=VirtualClock())
    async with sim.running(), httpx.AsyncClient() as client:
        url = sim.slack_webhook_url
        await sim.slack.go_down()
        with pytest.raises(httpx.ConnectError):
            await client.post(url, json={"text": "lost"})
        await sim.slack.go_up()
        back = await client.post(url, json={"text": "back"})
    assert back.status_code == 200
    assert url == sim.slack_webhook_url
    assert [m["text"] for m in sim.slack_messages] == ["back"]


async def test_receivers_answer_injected_failures() -> None:
    """A receiver can be made to fail with 5xx for a number of requests, then recovers."""
    sim = Simulator(clock=VirtualClock())
    sim.pagerduty.inject(path="/v2/enqueue", status=500, body={"status": "error"}, times=2)
    event = {**trigger(), "routing_key": sim.pagerduty_routing_key}
    async with sim.running(), httpx.AsyncClient() as client:
        statuses = [
            (await client.post(f"{sim.pagerduty_url}/v2/enqueue", json=event)).status_code
            for _ in range(3)
        ]
    assert statuses == [500, 500, 202]
    assert len(sim.pages) == 1
    assert sim.environment()["COALMINE_PAGERDUTY_URL"] == sim.pagerduty_url
