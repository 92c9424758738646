"""The outside world coalmine's gates ask: smoke-test webhooks and PagerDuty's incidents.

- :class:`WebhookReceiver`: answers the POSTs of ``source: webhook`` rules. Every path answers
  ``200`` until told otherwise: ``answer("/smoke", 503)`` (from now on), and ``inject(...)``
  (from :class:`~coalmine.simulator.service.Service`) for a hang (a timeout) or a dropped
  connection. ``calls(path)`` is what was POSTed there, in order.
- :class:`PagerDutyRest`: the REST API's ``GET /incidents`` with ``service_ids[]`` and
  ``statuses[]`` filters, behind ``Authorization: Token token=…`` (401 otherwise), answering
  ``{"incidents": [...], "limit": 25, "offset": 0, "more": false, "total": null}`` with each
  incident's ``id``, ``incident_number``, ``title``, ``status``, ``html_url`` and ``service``
  reference. ``open_incident(...)``, ``acknowledge(...)`` and ``resolve(...)`` shape it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coalmine.simulator.service import Request, Response, Service, json_body
from coalmine.simulator.traffic import Clock

PAGE_LIMIT = 25


class WebhookReceiver(Service):
    """Smoke tests and load tests behind webhooks: a status per path, 200 by default."""

    def __init__(self, clock: Clock, *, host: str = "127.0.0.1") -> None:
        super().__init__(clock, host=host)
        self._status: dict[str, int] = {}
        self.received: list[tuple[str, Any]] = []  # (path, JSON body) in order

    def url(self, path: str = "/smoke") -> str:
        """The URL a rule's ``url`` names for ``path``."""
        return f"{self.base_url}{path}"

    def answer(self, path: str, status: int) -> None:
        """From now on, POSTs to ``path`` get ``status``."""
        self._status[path] = status

    def calls(self, path: str = "/smoke") -> list[Any]:
        """The JSON bodies POSTed to ``path``, in order."""
        return [body for p, body in self.received if p == path]

    async def route(self, request: Request) -> Response:
        """Record the call and answer with the path's status."""
        if request.method != "POST":
            return Response.json(405, {"error": "POST only"})
        ok, body = json_body(request)
        self.received.append((request.path, body if ok else None))
        status = self._status.get(request.path, 200)
        return Response.json(status, {"status": status})


@dataclass
class Incident:
    """One PagerDuty incident, as the REST API lists it."""

    id: str
    number: int
    title: str
    service_id: str
    status: str = "triggered"  # triggered | acknowledged | resolved

    def to_json(self, base_url: str) -> dict[str, Any]:
        """The incident object of ``GET /incidents``."""
        return {
            "id": self.id,
            "type": "incident",
            "incident_number": self.number,
            "title": self.title,
            "summary": f"[#{self.number}] {self.title}",
            "status": self.status,
            "html_url": f"{base_url}/incidents/{self.id}",
            "service": {"id": self.service_id, "type": "service_reference"},
        }


class PagerDutyRest(Service):
    """PagerDuty's REST API, the part an incident freeze reads."""

    def __init__(self, clock: Clock, *, token: str, host: str = "127.0.0.1") -> None:
        super().__init__(clock, host=host)
        self.token = token
        self.incidents: list[Incident] = []

    @property
    def url(self) -> str:
        """``COALMINE_PAGERDUTY_API_URL``."""
        return self.base_url

    def open_incident(self, service_id: str, title: str, status: str = "triggered") -> Incident:
        """A new incident on ``service_id``."""
        number = len(self.incidents) + 1
        incident = Incident(f"Q{number:06d}SIM", number, title, service_id, status)
        self.incidents.append(incident)
        return incident

    def acknowledge(self, incident: Incident) -> None:
        """Someone is on it."""
        incident.status = "acknowledged"

    def resolve(self, incident: Incident) -> None:
        """It is over."""
        incident.status = "resolved"

    async def route(self, request: Request) -> Response:
        """``GET /incidents``; 401 without the token, 404 elsewhere."""
        if request.headers.get("authorization") != f"Token token={self.token}":
            return Response.json(401, {"error": {"message": "Unauthorized", "code": 2006}})
        if request.path != "/incidents":
            return Response.json(404, {"error": {"message": "Not Found", "code": 2100}})
        if request.method != "GET":
            return Response.json(405, {"error": {"message": "Method Not Allowed"}})
        services = set(request.query.get("service_ids[]", []))
        statuses = set(request.query.get("statuses[]", []))
        found = [
            i.to_json(self.base_url)
            for i in self.incidents
            if (not services or i.service_id in services) and (not statuses or i.status in statuses)
        ]
        page = {
            "incidents": found[:PAGE_LIMIT],
            "limit": PAGE_LIMIT,
            "offset": 0,
            "more": len(found) > PAGE_LIMIT,
            "total": None,
        }
        return Response.json(200, page)
