"""The simulated Cloudflare API over real loopback HTTP: envelopes, validation, limits, GraphQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import anyio
import httpx
import pytest

from coalmine.simulator import (
    AnalyticsLimits,
    ApiError,
    Behaviour,
    RateLimits,
    Simulator,
    VirtualClock,
)
from coalmine.simulator.graphql import error_body
from coalmine.simulator.traffic import DEFAULT_START

pytestmark = pytest.mark.anyio

QUERY = """
query Canary($accountTag: string!, $script: string!, $start: Time!, $end: Time!, $versions: [string!]) {
  viewer { accounts(filter: {accountTag: $accountTag}) {
    workersInvocationsAdaptive(limit: 10000,
      filter: {scriptName: $script, datetime_geq: $start, datetime_lt: $end, scriptVersion_in: $versions},
      orderBy: [datetimeMinute_ASC]) {
      sum { requests errors subrequests }
      quantiles { cpuTimeP50 cpuTimeP99 wallTimeP50 wallTimeP99 }
      avg { sampleInterval }
      dimensions { datetimeMinute scriptVersion }
    } } }
}
"""
HEALTHY = Behaviour(exception_rate=0.0, http_5xx_rate=0.0)


@asynccontextmanager
async def api(sim: Simulator, token: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """A running simulator and a client for its Cloudflare API, authorised by default."""
    headers = {"Authorization": f"Bearer {token or sim.api_token}"}
    async with (
        sim.running(),
        httpx.AsyncClient(base_url=sim.cloudflare_api_url, headers=headers) as client,
    ):
        yield client
    assert sim.errors == []


def scripts(sim: Simulator, script: str = "api") -> str:
    """The script's path under the API base."""
    return f"/accounts/{sim.account_id}/workers/scripts/{script}"


def split_body(canary: str, stable: str, percent: float, message: str = "canary") -> dict[str, Any]:
    """A create body as wrangler and coalmine send it."""
    return {
        "strategy": "percentage",
        "versions": [
            {"version_id": canary, "percentage": percent},
            {"version_id": stable, "percentage": 100 - percent},
        ],
        "annotations": {"workers/message": message},
    }


async def graphql(client: httpx.AsyncClient, sim: Simulator, **variables: Any) -> httpx.Response:
    """POST coalmine's analytics query."""
    values = {"accountTag": sim.account_id, "script": "api", **variables}
    return await client.post("/graphql", json={"query": QUERY, "variables": values})


def stamp(minutes: float) -> str:
    """The simulated start plus some minutes, as coalmine formats times."""
    return (DEFAULT_START + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


async def test_lists_deployments_in_the_reference_shape() -> None:
    """A new script has one deployment at 100%, in the envelope and with the reference's fields."""
    sim = Simulator(clock=VirtualClock())
    stable = sim.add_script("api")
    async with api(sim) as client:
        response = await client.get(f"{scripts(sim)}/deployments")
    body = response.json()
    assert response.status_code == 200
    assert (body["success"], body["errors"], body["messages"]) == (True, [], [])
    (deployment,) = body["result"]["deployments"]
    assert set(deployment) == {
        "id",
        "created_on",
        "source",
        "strategy",
        "versions",
        "author_email",
        "annotations",
    }
    assert deployment["strategy"] == "percentage"
    assert deployment["versions"] == [{"version_id": stable, "percentage": 100}]
    assert deployment["annotations"] == {"workers/triggered_by": "upload"}
    assert deployment["created_on"] == "2026-03-03T18:00:00.000000Z"


async def test_a_posted_split_serves_first_and_shifts_traffic() -> None:
    """POST creates the deployment that serves now; GET by id returns it; traffic follows."""
    clock = VirtualClock()
    sim = Simulator(clock=clock)
    stable = sim.add_script("api")
    canary = sim.upload_version("api")
    async with api(sim) as client:
        clock.advance(5)
        created = await client.post(
            f"{scripts(sim)}/deployments", json=split_body(canary, stable, 10)
        )
        listed = await client.get(f"{scripts(sim)}/deployments")
        one = await client.get(f"{scripts(sim)}/deployments/{created.json()['result']['id']}")
    result = created.json()["result"]
    assert created.status_code == 200
    assert result["versions"] == [
        {"version_id": canary, "percentage": 10},
        {"version_id": stable, "percentage": 90},
    ]
    assert result["annotations"] == {
        "workers/message": "canary",
        "workers/triggered_by": "deployment",
    }
    assert (result["source"], result["author_email"]) == ("api", "coalmine@example.com")
    assert listed.json()["result"]["deployments"][0]["id"] == result["id"]
    assert one.json()["result"] == result
    assert sim.world.split("api") == {canary: 10.0, stable: 90.0}


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"strategy": "all", "versions": []}, "strategy"),
        ({"strategy": "percentage", "versions": []}, "one or two"),
        ({"strategy": "percentage"}, "one or two"),
        (
            {
                "strategy": "percentage",
                "versions": [
                    {"version_id": "C", "percentage": 0},
                    {"version_id": "S", "percentage": 100},
                ],
            },
            "0.01",
        ),
        (
            {
                "strategy": "percentage",
                "versions": [
                    {"version_id": "C", "percentage": 10},
                    {"version_id": "S", "percentage": 80},
                ],
            },
            "total 100",
        ),
        (
            {
                "strategy": "percentage",
                "versions": [
                    {"version_id": "C", "percentage": "10"},
                    {"version_id": "S", "percentage": 90},
                ],
            },
            "percentage",
        ),
        (
            {
                "strategy": "percentage",
                "versions": [
                    {"version_id": "C", "percentage": 50},
                    {"version_id": "C", "percentage": 50},
                ],
            },
            "once",
        ),
        (
            {
                "strategy": "percentage",
                "versions": [{"version_id": "C", "percentage": 100}],
                "annotations": {"workers/triggered_by": "rollback"},
            },
            "only set workers/message",
        ),
        (
            {
                "strategy": "percentage",
                "versions": [{"version_id": "C", "percentage": 100}],
                "annotations": {"workers/message": "x" * 51},
            },
            "50 characters",
        ),
        (
            {"strategy": "percentage", "versions": [{"version_id": "nope", "percentage": 100}]},
            "not found",
        ),
        ("not json", "not valid JSON"),
    ],
)
async def test_invalid_create_bodies_are_400_with_the_error_envelope(
    body: Any, complaint: str
) -> None:
    """Each rule of the reference refuses the body with 400 and changes nothing."""
    sim = Simulator(clock=VirtualClock())
    stable = sim.add_script("api", version_id="S")
    sim.upload_version("api", version_id="C")
    async with api(sim) as client:
        if isinstance(body, str):
            response = await client.post(f"{scripts(sim)}/deployments", content=body)
        else:
            response = await client.post(f"{scripts(sim)}/deployments", json=body)
    assert response.status_code == 400
    error = response.json()
    assert (error["success"], error["messages"], error["result"]) == (False, [], None)
    assert error["errors"][0]["code"] == 10021
    assert complaint in error["errors"][0]["message"]
    assert sim.cloudflare.current("api").split == {stable: 100.0}


async def test_a_rollback_after_a_secret_change_needs_force() -> None:
    """Error 10220 refuses a rollback after secrets changed; force=true goes through; promotion does not need it."""
    sim = Simulator(clock=VirtualClock())
    stable = sim.add_script("api")
    canary = sim.upload_version("api")
    sim.start_canary("api", canary, percent=10)
    sim.cloudflare.change_secrets("api")
    rollback = {"strategy": "percentage", "versions": [{"version_id": stable, "percentage": 100}]}
    async with api(sim) as client:
        refused = await client.post(f"{scripts(sim)}/deployments", json=rollback)
        forced = await client.post(
            f"{scripts(sim)}/deployments", params={"force": "true"}, json=rollback
        )
    assert refused.status_code == 400
    assert refused.json()["errors"][0]["code"] == 10220
    assert forced.json()["result"]["annotations"]["workers/triggered_by"] == "rollback"
    sim.start_canary("api", canary, percent=50)
    promoted = sim.cloudflare.deploy("api", {canary: 100})
    assert promoted.triggered_by == "promotion"


async def test_versions_list_newest_first_and_only_the_last_100_are_deployable() -> None:
    """Versions list in the reference shape; detail adds resources; the 101st-newest cannot be deployed."""
    sim = Simulator(clock=VirtualClock())
    first = sim.add_script("api")
    for _ in range(100):
        newest = sim.upload_version("api")
    async with api(sim) as client:
        deployable = await client.get(f"{scripts(sim)}/versions", params={"deployable": "true"})
        paged = await client.get(f"{scripts(sim)}/versions", params={"per_page": 5, "page": 2})
        detail = await client.get(f"{scripts(sim)}/versions/{newest}")
        missing = await client.get(f"{scripts(sim)}/versions/nope")
    items = deployable.json()["result"]["items"]
    assert len(items) == 100 and items[0]["id"] == newest and items[0]["number"] == 101
    assert first not in {i["id"] for i in items}
    assert set(items[0]["metadata"]) == {
        "author_email",
        "author_id",
        "created_on",
        "modified_on",
        "source",
        "hasPreview",
    }
    assert [i["number"] for i in paged.json()["result"]["items"]] == [96, 95, 94, 93, 92]
    assert detail.json()["result"]["resources"]["script"]["handlers"] == ["fetch"]
    assert (missing.status_code, missing.json()["errors"][0]["code"]) == (404, 10007)
    with pytest.raises(ApiError, match="last 100"):
        sim.cloudflare.deploy("api", {first: 100})


@pytest.mark.parametrize(
    ("token", "path", "status", "code"),
    [
        ("", "/deployments", 401, 10000),
        ("wrong", "/deployments", 403, 10000),
        (None, "/other-account", 403, 10000),
        (None, "/unknown-script", 404, 10007),
        (None, "/no/such/route", 404, 7003),
    ],
)
async def test_authentication_and_routing_errors(
    token: str | None, path: str, status: int, code: int
) -> None:
    """A missing or wrong token, another account, an unknown script or route: the error envelope."""
    sim = Simulator(clock=VirtualClock())
    sim.add_script("api")
    urls = {
        "/deployments": f"{scripts(sim)}/deployments",
        "/other-account": "/accounts/0123/workers/scripts/api/deployments",
        "/unknown-script": f"{scripts(sim, 'nope')}/deployments",
        "/no/such/route": "/zones",
    }
    async with sim.running(), httpx.AsyncClient(base_url=sim.cloudflare_api_url) as client:
        headers = {} if token == "" else {"Authorization": f"Bearer {token or sim.api_token}"}
        response = await client.get(urls[path], headers=headers)
    assert response.status_code == status
    assert response.json()["success"] is False
    assert response.json()["errors"][0]["code"] == code


async def test_the_budget_is_enforced_with_429_and_retry_after() -> None:
    """Past the per-token budget every call is 429 with retry-after until the window slides."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, rate_limits=RateLimits(requests=3, graphql=None))
    sim.add_script("api")
    async with api(sim) as client:
        statuses = []
        for _ in range(3):
            statuses.append((await client.get(f"{scripts(sim)}/deployments")).status_code)
            clock.advance(10)
        refused = await client.get(f"{scripts(sim)}/deployments")
        clock.advance(int(refused.headers["retry-after"]))
        again = await client.get(f"{scripts(sim)}/deployments")
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "270"
    assert refused.json()["errors"][0]["code"] == 971
    assert again.status_code == 200


async def test_account_based_graphql_mode_says_so_and_admits_one_query_a_second() -> None:
    """In account-based mode every GraphQL answer carries X-Rate-Limit-Type: account-based and
    a second query in the same second is 429 with retry-after; a second later it goes."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, rate_limits=RateLimits(account_based=True))
    sim.add_script("api")
    clock.advance(120)
    async with api(sim) as client:
        first = await graphql(client, sim, start=stamp(0), end=stamp(1))
        second = await graphql(client, sim, start=stamp(0), end=stamp(1))
        clock.advance(1)
        third = await graphql(client, sim, start=stamp(0), end=stamp(1))
    assert [r.status_code for r in (first, second, third)] == [200, 429, 200]
    assert first.headers["x-rate-limit-type"] == "account-based"
    assert second.headers["retry-after"] == "1"


async def test_graphql_rows_follow_the_traffic_split() -> None:
    """10% of 600 req/min gives about 60 canary requests a minute, in Cloudflare's row shape."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, seed=11)
    stable = sim.add_script("api", requests_per_minute=600, behaviour=HEALTHY)
    canary = sim.upload_version("api", HEALTHY)
    sim.start_canary("api", canary, percent=10)
    clock.advance(timedelta(minutes=10, seconds=20))
    async with api(sim) as client:
        response = await graphql(
            client, sim, start=stamp(0), end=stamp(10), versions=[canary, stable]
        )
    body = response.json()
    assert response.status_code == 200 and body["errors"] is None
    rows = body["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]
    assert len(rows) == 20
    first = rows[0]
    assert set(first) == {"sum", "quantiles", "avg", "dimensions"}
    assert set(first["quantiles"]) == {"cpuTimeP50", "cpuTimeP99", "wallTimeP50", "wallTimeP99"}
    assert first["avg"] == {"sampleInterval": 1}
    assert first["dimensions"]["datetimeMinute"] == "2026-03-03T18:00:00Z"
    minutes = [r["dimensions"]["datetimeMinute"] for r in rows]
    assert minutes == sorted(minutes)
    per_canary = [r["sum"]["requests"] for r in rows if r["dimensions"]["scriptVersion"] == canary]
    per_stable = [r["sum"]["requests"] for r in rows if r["dimensions"]["scriptVersion"] == stable]
    assert all(35 <= n <= 90 for n in per_canary)
    assert sum(per_canary) == pytest.approx(600, rel=0.1)
    assert sum(per_stable) == pytest.approx(5400, rel=0.05)
    assert all(r["sum"]["errors"] == 0 for r in rows)


async def test_graphql_reports_only_minutes_older_than_the_delay() -> None:
    """With a 3-minute data delay the last minutes are missing, and versions filter rows."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, noise=False, analytics=AnalyticsLimits(delay=timedelta(minutes=3)))
    sim.add_script("api")
    canary = sim.upload_version("api")
    sim.start_canary("api", canary, percent=10)
    clock.advance(timedelta(minutes=6, seconds=30))
    async with api(sim) as client:
        response = await graphql(client, sim, start=stamp(0), end=stamp(7), versions=[canary])
    rows = response.json()["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]
    assert [r["dimensions"]["datetimeMinute"][11:16] for r in rows] == ["18:00", "18:01", "18:02"]
    assert {r["dimensions"]["scriptVersion"] for r in rows} == {canary}


async def test_graphql_errors_come_inside_a_200_and_limits_as_400() -> None:
    """Another account, bad variables and injected errors are 200 with errors; a long range is 400."""
    clock = VirtualClock(DEFAULT_START + timedelta(days=2))
    sim = Simulator(clock=clock)
    sim.add_script("api")
    sim.cloudflare.inject(
        path="/client/v4/graphql", status=200, body=error_body("timeout", "INTERNAL")
    )
    async with api(sim) as client:
        injected = await graphql(client, sim, start=stamp(0), end=stamp(1))
        other = await graphql(client, sim, accountTag="someone-else", start=stamp(0), end=stamp(1))
        bad = await graphql(client, sim, start="yesterday", end=stamp(1))
        too_long = await graphql(client, sim, start=stamp(0), end=stamp(60 * 25))
        settings = await client.post(
            "/graphql",
            json={
                "query": "query($accountTag: string!){viewer{accounts(filter:{accountTag:"
                "$accountTag}){settings{workersInvocationsAdaptive{maxDuration}}}}}",
                "variables": {"accountTag": sim.account_id},
            },
        )
    for response, code in ((injected, "INTERNAL"), (other, "authz"), (bad, "VALIDATION")):
        assert response.status_code == 200
        assert response.json()["data"] is None
        (error,) = response.json()["errors"]
        assert set(error) == {"message", "path", "extensions"}
        assert error["extensions"]["code"] == code
    assert too_long.status_code == 400
    limits = settings.json()["data"]["viewer"]["accounts"][0]["settings"][
        "workersInvocationsAdaptive"
    ]
    assert limits["maxDuration"] == 86400


async def test_drift_and_the_request_log() -> None:
    """A split changed by hand serves first; the log keeps every request and the exact POST bodies."""
    sim = Simulator(clock=VirtualClock())
    stable = sim.add_script("api")
    canary = sim.upload_version("api")
    async with api(sim) as client:
        await client.post(
            f"{scripts(sim)}/deployments", json=split_body(canary, stable, 10, "step 1")
        )
        await client.post(
            f"{scripts(sim)}/deployments", json=split_body(canary, stable, 50, "step 2")
        )
        sim.deploy_by_hand("api", {stable: 100})
        listed = await client.get(f"{scripts(sim)}/deployments")
    latest = listed.json()["result"]["deployments"][0]
    assert (latest["source"], latest["author_email"]) == ("dash", "someone@example.com")
    assert latest["annotations"]["workers/triggered_by"] == "rollback"
    assert sim.deployment_posts("api") == [
        split_body(canary, stable, 10, "step 1"),
        split_body(canary, stable, 50, "step 2"),
    ]
    log = sim.cloudflare.requests
    assert [(r.method, r.status) for r in log] == [("POST", 200), ("POST", 200), ("GET", 200)]
    assert log[0].headers["authorization"] == "Bearer ***"
    assert sim.api_token not in json.dumps([r.headers for r in log])


async def test_injected_answers_then_real_ones() -> None:
    """Forced answers apply to the matching requests, N times or until a time, then the real API answers."""
    clock = VirtualClock()
    sim = Simulator(clock=clock)
    sim.add_script("api")
    sim.cloudflare.inject(method="GET", path="*/deployments", status=503, body="busy", times=2)
    sim.cloudflare.inject(
        method="POST",
        path="*/graphql",
        status=429,
        headers=[("retry-after", "30")],
        body={"errors": []},
        times=None,
        until=clock() + timedelta(seconds=30),
    )
    async with api(sim) as client:
        first = [(await client.get(f"{scripts(sim)}/deployments")).status_code for _ in range(3)]
        limited = await graphql(client, sim, start=stamp(0), end=stamp(1))
        clock.advance(30)
        after = await graphql(client, sim, start=stamp(0), end=stamp(1))
    assert first == [503, 503, 200]
    assert (limited.status_code, limited.headers["retry-after"]) == (429, "30")
    assert after.status_code == 200
    assert sim.cloudflare.faults.pending() == []


async def test_dropped_truncated_and_hung_answers() -> None:
    """A dropped connection and a cut-short body reach the client as such; a hang lasts until cleared."""
    sim = Simulator(clock=VirtualClock())
    sim.add_script("api")
    sim.cloudflare.inject(path="*/deployments", action="drop")
    sim.cloudflare.inject(path="*/deployments", action="truncate")
    sim.cloudflare.inject(path="*/versions", action="hang")
    async with api(sim) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{scripts(sim)}/deployments")
        truncated = await client.get(f"{scripts(sim)}/deployments")
        with pytest.raises(json.JSONDecodeError):
            truncated.json()
        outcome: list[BaseException] = []

        async def hung() -> None:
            try:
                await client.get(f"{scripts(sim)}/versions")
            except httpx.HTTPError as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(hung)
            with anyio.fail_after(5):
                while not any(r.path.endswith("/versions") for r in sim.cloudflare.requests):
                    await anyio.sleep(0.01)
            assert outcome == []
            sim.cloudflare.faults.clear()
        assert len(outcome) == 1
    assert [r.status for r in sim.cloudflare.requests] == [None, 200, None]


async def test_http_5xx_reach_prometheus_but_not_cloudflare_errors() -> None:
    """A fault of 5xx answers shows in /metrics as code 503 while GraphQL errors stay at zero."""
    clock = VirtualClock()
    sim = Simulator(clock=clock, noise=False)
    sim.add_script("api", requests_per_minute=600, behaviour=HEALTHY)
    canary = sim.upload_version("api", HEALTHY)
    sim.start_canary("api", canary, percent=50)
    sim.schedule_fault("api", canary, duration=timedelta(minutes=2), http_5xx_rate=0.2)
    clock.advance(timedelta(minutes=3))
    async with api(sim) as client:
        response = await graphql(client, sim, start=stamp(0), end=stamp(3), versions=[canary])
        metrics = (await client.get(sim.prometheus_metrics_url)).text
    rows = response.json()["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]
    assert [(r["sum"]["requests"], r["sum"]["errors"]) for r in rows] == [(300, 0)] * 3
    assert f'http_requests_total{{script="api",version="{canary}",code="503"}} 120\n' in metrics
    assert 'code="500"' not in metrics


async def test_wall_clock_faults_start_now() -> None:
    """With the wall clock a fault scheduled without a start begins now, not in the past."""
    sim = Simulator()
    stable = sim.add_script("api")
    fault = sim.schedule_fault("api", stable, duration=timedelta(minutes=1), exception_rate=0.5)
    assert fault.end - fault.start == timedelta(minutes=1)
    assert sim.world.behaviour("api", stable).exception_rate == 0.5
