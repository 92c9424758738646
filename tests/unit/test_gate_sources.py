"""The webhook source and the incident-freeze reader against ``httpx.MockTransport``: what each
answer becomes."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from coalmine.policyfile import parse_policy
from coalmine.sources import Target
from coalmine.sources.pagerduty import IncidentFreeze
from coalmine.sources.webhook import WebhookSource
from tests.support import T0

pytestmark = pytest.mark.anyio

Handler = Callable[[httpx.Request], httpx.Response]
RULE = parse_policy(
    "version: 1\nname: p\nscripts: [api]\nsteps: [{weight: 10}, {weight: 100}]\n"
    "rules:\n  - {name: smoke, source: webhook, url: 'https://hooks.example/smoke?token=s3cret',"
    " timeout: 5s}\n"
).rules[0]
TARGET = Target("api", "canary", "v2", "v2", "v1", 2, 50, "canary")


async def call(handler: Handler) -> tuple[float | None, str | None]:
    """One webhook call through ``handler``: the observation's value and error."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        obs = await WebhookSource(client).fetch(RULE, TARGET, T0)
    assert (obs.rule, obs.role, obs.samples) == ("smoke", "canary", None)
    return obs.value, obs.error


@pytest.mark.parametrize(("status", "value"), [(200, 0.0), (204, 0.0), (302, 302.0), (503, 503.0)])
async def test_a_2xx_passes_and_any_other_status_is_the_value(status: int, value: float) -> None:
    """2xx is 0; anything else (a redirect too: never followed) is the status itself."""
    headers = {"location": "https://elsewhere.example/"} if status == 302 else {}
    assert await call(lambda _: httpx.Response(status, headers=headers)) == (value, None)


async def test_the_context_is_posted_as_json() -> None:
    """The body is {script, canary, stable, step, weight, phase, when}."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200)

    await call(handler)
    (request,) = seen
    assert request.method == "POST"
    assert json.loads(request.content) == {
        "script": "api",
        "canary": "v2",
        "stable": "v1",
        "step": 2,
        "weight": 50,
        "phase": "canary",
        "when": "before_advance",
    }


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (httpx.ConnectError("refused"), "connection error: ConnectError"),
        (httpx.ReadTimeout("slow"), "timeout after 5s"),
    ],
)
async def test_no_answer_is_inconclusive_and_never_names_the_url(
    error: Exception, why: str
) -> None:
    """A refused connection or a timeout is an error (inconclusive) that does not leak the URL's
    token."""

    def handler(_: httpx.Request) -> httpx.Response:
        raise error

    value, message = await call(handler)
    assert (value, message) == (None, why)


async def freeze(handler: Handler, token: str | None = "tok") -> str | None:
    """One freeze check of PX1 through ``handler``."""
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        return await IncidentFreeze(client, "https://pd.example", token).check(["PX1"])


def incidents(*items: dict[str, object]) -> Handler:
    """A handler answering ``GET /incidents`` with ``items``."""
    return lambda _: httpx.Response(200, json={"incidents": list(items), "more": False})


async def test_no_open_incident_is_no_freeze() -> None:
    """An empty list of incidents: not frozen."""
    assert await freeze(incidents()) is None


async def test_an_open_incident_is_named() -> None:
    """The first open incident is named with its number, title, status and service."""
    found = {
        "id": "Q1",
        "incident_number": 7,
        "title": "db down",
        "status": "acknowledged",
        "service": {"id": "PX1"},
    }
    assert await freeze(incidents(found, {**found, "incident_number": 8})) == (
        "incident freeze: PagerDuty incident #7 'db down' (acknowledged) on service PX1 and 1 more"
    )


@pytest.mark.parametrize(
    ("handler", "token", "why"),
    [
        (lambda _: httpx.Response(401, json={}), "tok", "PagerDuty refused the token (HTTP 401)"),
        (
            lambda _: httpx.Response(200, text="<html>"),
            "tok",
            "PagerDuty's answer could not be read",
        ),
        (
            lambda _: httpx.Response(200, json={"x": 1}),
            "tok",
            "PagerDuty's answer could not be read",
        ),
        (incidents(), None, "COALMINE_PAGERDUTY_API_TOKEN is not set"),
    ],
)
async def test_what_cannot_be_read_is_unknown_and_freezes(
    handler: Handler, token: str | None, why: str
) -> None:
    """An error status, a body that is not the incidents list, or no token: unknown, which
    freezes too, saying why."""
    assert await freeze(handler, token) == (
        f"incident freeze unknown: {why}; not advancing on what could not be checked"
    )


async def test_the_request_and_its_reuse() -> None:
    """The query filters by service and open statuses with a Token header; one answer serves
    every check of the same services within the ttl."""
    seen: list[httpx.Request] = []
    now = [0.0]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"incidents": []})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        reader = IncidentFreeze(client, "https://pd.example/", "tok", clock=lambda: now[0], ttl=15)
        await reader.check(["PX1", "PX2"])
        await reader.check(["PX2", "PX1"])
        now[0] = 16
        await reader.check(["PX1", "PX2"])
    assert len(seen) == 2
    request = seen[0]
    assert request.url.path == "/incidents"
    assert request.url.params.get_list("service_ids[]") == ["PX1", "PX2"]
    assert request.url.params.get_list("statuses[]") == ["triggered", "acknowledged"]
    assert request.headers["authorization"] == "Token token=tok"
