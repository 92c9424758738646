"""The incident freeze's reader: PagerDuty's open incidents on a policy's services.

DESIGN.md "Incident freeze": while PagerDuty has a triggered or acknowledged incident on one of
the services, no canary starts or advances. This asks the REST API
(``GET {url}/incidents?service_ids[]=…&statuses[]=triggered&statuses[]=acknowledged``, header
``Authorization: Token token=…``) and says why advancing is frozen, naming the incident. An
answer it cannot read (no token, refused, an error status, a malformed body) is *unknown*, and
unknown freezes too: coalmine never advances on what it could not check.

Every loop of a policy asks at every tick; one answer per set of services is reused for
``ttl`` seconds, so a thousand scripts make one request, not a thousand.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import httpx

from coalmine.sources.prometheus import Observe

NAME = "pagerduty_api"  # as /health and /metrics name the dependency
_STATUSES = ("triggered", "acknowledged")


class IncidentFreeze:
    """Whether a policy's PagerDuty services have an open incident."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: str,
        token: str | None,
        *,
        observe: Observe | None = None,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = 15.0,
        timeout: float = 10.0,
    ) -> None:
        self._client = client
        self._url = url.rstrip("/") + "/incidents"
        self._token = token
        self._observe = observe
        self._clock = clock
        self._ttl = ttl
        self._timeout = timeout
        self._lock = anyio.Lock()
        self._answers: dict[tuple[str, ...], tuple[float, str | None]] = {}

    async def check(self, services: Sequence[str]) -> str | None:
        """Why advancing is frozen now (the open incident, or that none could be read); None
        when PagerDuty answered that no incident is open on ``services``."""
        key = tuple(sorted(set(services)))
        async with self._lock:  # loops asking at once share one request
            answer = self._answers.get(key)
            if answer is not None and self._clock() < answer[0]:
                return answer[1]
            why = await self._ask(key)
            self._answers[key] = (self._clock() + self._ttl, why)
            return why

    async def _ask(self, services: tuple[str, ...]) -> str | None:
        if not self._token:
            return _unknown("COALMINE_PAGERDUTY_API_TOKEN is not set")
        params = {"service_ids[]": list(services), "statuses[]": list(_STATUSES)}
        headers = {
            "Authorization": f"Token token={self._token}",
            "Accept": "application/vnd.pagerduty+json;version=2",
        }
        started, error, body = time.perf_counter(), None, None
        try:
            response = await self._client.get(
                self._url, params=params, headers=headers, timeout=self._timeout
            )
            error = None if response.status_code == 200 else f"http_{response.status_code}"
            body = response.json() if error is None else None
        except httpx.TimeoutException:
            error = "timeout"
        except httpx.HTTPError:
            error = "connection"
        except ValueError:
            error = "bad_answer"
        incidents = _incidents(body) if error is None else None
        if error is None and incidents is None:
            error = "bad_answer"
        if self._observe is not None:
            self._observe(NAME, time.perf_counter() - started, error)
        if incidents is None:
            return _unknown(_ERRORS.get(error or "", error or "unreadable answer"))
        return _frozen(incidents) if incidents else None


_ERRORS = {
    "timeout": "PagerDuty did not answer in time",
    "connection": "PagerDuty could not be reached",
    "bad_answer": "PagerDuty's answer could not be read",
    "http_401": "PagerDuty refused the token (HTTP 401)",
    "http_403": "the token may not read incidents (HTTP 403)",
}


def _incidents(body: Any) -> list[dict[str, Any]] | None:
    if not isinstance(body, dict) or not isinstance(body.get("incidents"), list):
        return None
    found = [i for i in body["incidents"] if isinstance(i, dict)]
    return [i for i in found if i.get("status") in _STATUSES]


def _frozen(incidents: list[dict[str, Any]]) -> str:
    first = incidents[0]
    number = first.get("incident_number")
    name = f"#{number}" if number is not None else str(first.get("id", "?"))
    title = str(first.get("title", ""))[:120]
    service = first.get("service")
    on = f" on service {service['id']}" if isinstance(service, dict) and "id" in service else ""
    more = f" and {len(incidents) - 1} more" if len(incidents) > 1 else ""
    return f"incident freeze: PagerDuty incident {name} {title!r} ({first.get('status')}){on}{more}"


def _unknown(why: str) -> str:
    return f"incident freeze unknown: {why}; not advancing on what could not be checked"
