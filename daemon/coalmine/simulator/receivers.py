"""PagerDuty, Slack and Grafana as coalmine's notifiers meet them: they record what they get and
answer like the real services (reference/observability-apis.md).

- :class:`PagerDuty`: Events API v2. ``POST /v2/enqueue`` → 202 ``{"status": "success",
  "message": "Event processed", "dedup_key": …}``; 400 ``{"status": "invalid event", …}`` for an
  invalid event (a summary over 1,024 characters is rejected, not truncated); 429 over
  ``events_per_minute`` per routing key. Alerts open, deduplicate and resolve by ``dedup_key``.
  ``POST /v2/change/enqueue`` → 202.
- :class:`Slack`: an incoming webhook. 200 ``ok``; plain-text errors (400 ``invalid_payload``,
  400 ``no_text``, 404 ``no_service``, 429 ``rate_limited`` with ``Retry-After``).
- :class:`Grafana`: ``POST /api/annotations`` → 200 ``{"message": "Annotation added", "id": N}``,
  ``PATCH /api/annotations/{id}``, ``GET /api/annotations``, and the datasource proxy
  ``/api/datasources/proxy/uid/{uid}/api/v1/…`` forwarded to a Prometheus, all behind
  ``Authorization: Bearer``.

Each is a :class:`~coalmine.simulator.service.Service`: ``inject(...)`` forces answers (5xx,
429 for a while, dropped connections), ``go_down()`` refuses connections.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx

from coalmine.simulator.service import (
    Request,
    Response,
    Service,
    WindowLimiter,
    json_body,
    retry_after,
)
from coalmine.simulator.traffic import Clock

SEVERITIES = ("critical", "error", "warning", "info")
ACTIONS = ("trigger", "acknowledge", "resolve")
SUMMARY_LIMIT = 1024
DEDUP_LIMIT = 255


@dataclass
class Alert:
    """One PagerDuty alert: the events that share its ``dedup_key`` while it is open."""

    dedup_key: str
    status: str  # triggered | acknowledged | resolved
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def severity(self) -> str:
        """The severity of its latest trigger."""
        triggers = [e for e in self.events if e.get("event_action") == "trigger"]
        return str(triggers[-1]["payload"]["severity"]) if triggers else ""


class PagerDuty(Service):
    """PagerDuty's Events API v2."""

    def __init__(
        self,
        clock: Clock,
        *,
        routing_key: str | None = None,
        events_per_minute: int | None = 120,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(clock, host=host)
        self.routing_key = routing_key  # None: any 32-character key is accepted
        self.events: list[dict[str, Any]] = []  # accepted alert events, in order
        self.changes: list[dict[str, Any]] = []  # accepted change events, in order
        self.alerts: list[Alert] = []  # every alert ever opened, in order
        self.limiter = WindowLimiter(clock, events_per_minute, timedelta(minutes=1))  # per key
        self._generated = 0

    @property
    def url(self) -> str:
        """The base URL (``COALMINE_PAGERDUTY_URL``); events go to ``{url}/v2/enqueue``."""
        return self.base_url

    def open_alerts(self) -> dict[str, Alert]:
        """Alerts not resolved, by dedup key."""
        return {a.dedup_key: a for a in self.alerts if a.status != "resolved"}

    def alert(self, dedup_key: str) -> Alert | None:
        """The latest alert with this dedup key."""
        return next((a for a in reversed(self.alerts) if a.dedup_key == dedup_key), None)

    async def route(self, request: Request) -> Response:
        """Accept or refuse one event."""
        if request.path not in ("/v2/enqueue", "/v2/change/enqueue"):
            return Response.json(404, {"status": "not found", "message": "Not Found"})
        if request.method != "POST":
            return Response.json(405, {"status": "method not allowed", "message": "POST only"})
        ok, body = json_body(request)
        if not ok or not isinstance(body, dict):
            return _invalid(["Could not parse the request body as a JSON object"])
        change = request.path == "/v2/change/enqueue"
        problems = self._key_problems(body) + (
            _change_problems(body) if change else _event_problems(body)
        )
        if problems:
            return _invalid(problems)
        if self.limiter.admit(str(body["routing_key"])) is not None:
            message = "Requests for this service are arriving too quickly. Please retry later."
            return Response.json(429, {"status": "throttle event", "message": message})
        if change:
            self.changes.append(body)
            return Response.json(202, {"status": "success", "message": "Change event processed"})
        return Response.json(202, self._accept(body))

    def _key_problems(self, body: dict[str, Any]) -> list[str]:
        key = body.get("routing_key")
        if not isinstance(key, str) or len(key) != 32:
            return ["'routing_key' must be a 32-character string"]
        if self.routing_key is not None and key != self.routing_key:
            return ["Invalid routing key"]
        return []

    def _accept(self, event: dict[str, Any]) -> dict[str, Any]:
        key = event.get("dedup_key")
        if not isinstance(key, str):
            self._generated += 1
            key = f"{self._generated:032x}"
            event = {**event, "dedup_key": key}
        self.events.append(event)
        action, alert = event["event_action"], self.open_alerts().get(key)
        if action == "trigger":
            if alert is None:
                alert = Alert(key, "triggered")
                self.alerts.append(alert)
            alert.events.append(event)
        elif alert is not None:
            alert.status = "acknowledged" if action == "acknowledge" else "resolved"
            alert.events.append(event)
        return {"status": "success", "message": "Event processed", "dedup_key": key}


def _event_problems(body: dict[str, Any]) -> list[str]:
    action = body.get("event_action")
    if action not in ACTIONS:
        return ["'event_action' must be one of trigger, acknowledge, resolve"]
    problems = []
    key = body.get("dedup_key")
    if key is not None and (not isinstance(key, str) or not key or len(key) > DEDUP_LIMIT):
        problems.append(f"'dedup_key' must be a non-empty string of at most {DEDUP_LIMIT}")
    if action != "trigger":
        if key is None:
            problems.append(f"'dedup_key' is required to {action}")
        return problems
    payload = body.get("payload")
    if not isinstance(payload, dict):
        return [*problems, "'payload' is missing or not an object"]
    problems += _summary_problems(payload)
    if not isinstance(payload.get("source"), str) or not payload["source"]:
        problems.append("'payload.source' is missing or blank")
    if payload.get("severity") not in SEVERITIES:
        problems.append("'payload.severity' must be one of critical, error, warning, info")
    if "timestamp" in payload and not _is_time(payload["timestamp"]):
        problems.append("'payload.timestamp' must be an ISO 8601 time")
    return problems + _links_problems(body)


def _change_problems(body: dict[str, Any]) -> list[str]:
    payload = body.get("payload")
    if not isinstance(payload, dict):
        return ["'payload' is missing or not an object"]
    problems = _summary_problems(payload)
    if "timestamp" in payload and not _is_time(payload["timestamp"]):
        problems.append("'payload.timestamp' must be an ISO 8601 time")
    return problems + _links_problems(body)


def _summary_problems(payload: dict[str, Any]) -> list[str]:
    summary = payload.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        return ["'payload.summary' is missing or blank"]
    if len(summary) > SUMMARY_LIMIT:
        return [f"'payload.summary' is longer than {SUMMARY_LIMIT} characters"]
    return []


def _links_problems(body: dict[str, Any]) -> list[str]:
    links = body.get("links", [])
    if not isinstance(links, list) or not all(
        isinstance(link, dict) and isinstance(link.get("href"), str) for link in links
    ):
        return ["'links' must be a list of objects with an 'href'"]
    return []


def _is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _invalid(errors: list[str]) -> Response:
    body = {"status": "invalid event", "message": "Event object is invalid", "errors": errors}
    return Response.json(400, body)


class Slack(Service):
    """A Slack incoming webhook."""

    def __init__(
        self,
        clock: Clock,
        *,
        path: str = "/services/T0SIMULATE/B0SIMULATE/x0simulator0webhook0secret",
        burst: int | None = 5,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(clock, host=host)
        self.path = path
        self.messages: list[dict[str, Any]] = []  # accepted payloads, in order
        # About one message a second with short bursts: at most `burst` in `burst` seconds.
        self.limiter = WindowLimiter(clock, burst, timedelta(seconds=burst or 1))

    @property
    def url(self) -> str:
        """The webhook URL (``COALMINE_SLACK_WEBHOOK_URL``)."""
        return f"{self.base_url}{self.path}"

    async def route(self, request: Request) -> Response:
        """Accept or refuse one message."""
        if request.path != self.path:
            return Response.text(404, "no_service")
        if request.method != "POST":
            return Response.text(405, "invalid_method")
        ok, body = json_body(request)
        if not ok or not isinstance(body, dict):
            return Response.text(400, "invalid_payload")
        text, blocks = body.get("text"), body.get("blocks")
        if not (isinstance(text, str) and text.strip()) and not (
            isinstance(blocks, list) and blocks
        ):
            return Response.text(400, "no_text")
        wait = self.limiter.admit(self.path)
        if wait is not None:
            headers = [("content-type", "text/plain"), ("retry-after", retry_after(wait))]
            return Response(429, b"rate_limited", headers)
        self.messages.append(body)
        return Response.text(200, "ok", "text/html")


_ANNOTATION = re.compile(r"^/api/annotations/(?P<id>\d+)$")
_PROXY = re.compile(r"^/api/datasources/proxy/uid/(?P<uid>[^/]+)(?P<rest>/.*)$")


class Grafana(Service):
    """Grafana's annotations API and its Prometheus datasource proxy."""

    def __init__(
        self,
        clock: Clock,
        *,
        token: str,
        datasource_uid: str = "prometheus",
        prometheus_url: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(clock, host=host)
        self.token = token
        self.datasource_uid = datasource_uid
        self.prometheus_url = prometheus_url  # where the datasource proxy forwards
        self.annotations: dict[int, dict[str, Any]] = {}  # by id, as stored

    @property
    def url(self) -> str:
        """The base URL (``COALMINE_GRAFANA_URL``)."""
        return self.base_url

    async def route(self, request: Request) -> Response:
        """Answer one API call."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token.strip() != self.token:
            return Response.json(401, {"message": "Unauthorized"})
        proxy = _PROXY.match(request.path)
        if proxy:
            return await self._proxy(request, proxy["uid"], proxy["rest"])
        if request.path == "/api/annotations":
            if request.method == "POST":
                return self._add(request)
            if request.method == "GET":
                return Response.json(200, list(self.annotations.values()))
            return Response.json(405, {"message": "Method Not Allowed"})
        match = _ANNOTATION.match(request.path)
        if match and request.method == "PATCH":
            return self._patch(int(match["id"]), request)
        return Response.json(404, {"message": "Not found"})

    def _add(self, request: Request) -> Response:
        ok, body = json_body(request)
        if not ok or not isinstance(body, dict) or not _valid_annotation(body, adding=True):
            return Response.json(400, {"message": "bad request data"})
        now_ms = int(self.clock().timestamp() * 1000)
        annotation_id = len(self.annotations) + 1
        time = body.get("time") or now_ms
        self.annotations[annotation_id] = {
            "id": annotation_id,
            "dashboardUID": body.get("dashboardUID"),
            "panelId": body.get("panelId", 0),
            "time": time,
            "timeEnd": body.get("timeEnd") or time,
            "text": body["text"],
            "tags": list(body.get("tags") or []),
            "created": now_ms,
            "updated": now_ms,
        }
        return Response.json(200, {"message": "Annotation added", "id": annotation_id})

    def _patch(self, annotation_id: int, request: Request) -> Response:
        annotation = self.annotations.get(annotation_id)
        if annotation is None:
            return Response.json(404, {"message": "Annotation not found"})
        ok, body = json_body(request)
        if not ok or not isinstance(body, dict) or not _valid_annotation(body, adding=False):
            return Response.json(400, {"message": "bad request data"})
        for key in ("time", "timeEnd", "text", "tags"):
            if key in body:
                annotation[key] = body[key]
        annotation["updated"] = int(self.clock().timestamp() * 1000)
        return Response.json(200, {"message": "Annotation patched"})

    async def _proxy(self, request: Request, uid: str, rest: str) -> Response:
        if uid != self.datasource_uid:
            return Response.json(404, {"message": "Data source not found"})
        if self.prometheus_url is None:
            return Response.json(502, {"message": "Bad Gateway"})
        query = request.target.partition("?")[2]
        url = self.prometheus_url.rstrip("/") + rest + (f"?{query}" if query else "")
        headers = {k: v for k, v in request.headers.items() if k == "content-type"}
        try:
            async with httpx.AsyncClient(timeout=30.0) as client:
                answer = await client.request(
                    request.method, url, content=request.body, headers=headers
                )
        except httpx.HTTPError:
            return Response.json(502, {"message": "Bad Gateway"})
        kept = [("content-type", answer.headers.get("content-type", "application/json"))]
        return Response(answer.status_code, answer.content, kept)


def _valid_annotation(body: dict[str, Any], *, adding: bool) -> bool:
    text = body.get("text")
    if (adding or "text" in body) and not (isinstance(text, str) and text):
        return False
    for key in ("time", "timeEnd", "panelId"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            return False
    tags = body.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        return False
    board = body.get("dashboardUID")
    return board is None or isinstance(board, str)
