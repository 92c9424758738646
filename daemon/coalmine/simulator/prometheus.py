"""The simulated Workers' own metrics, in the text exposition format Prometheus scrapes.

Two families, per script and version, cumulative from the traffic model:

- ``http_requests_total{script, version, code}``: ``200``, ``500`` for requests that threw
  (Cloudflare answers the client with a 500), ``503`` for 5xx answers the Worker returned
  itself. A code series appears once its count is positive, as with a real exporter, so "no
  5xx series at all" happens here as it does in life.
- ``http_request_duration_seconds`` histogram (``_bucket{le}``, ``_sum``, ``_count``), buckets
  0.005 … 10 and ``+Inf``.

A version appears once it has served a request. Served at ``/metrics`` by
:class:`MetricsExporter`; :func:`render` gives the same text for tests and ``promtool``.
"""

from __future__ import annotations

from datetime import datetime

from coalmine.simulator.service import Request, Response, Service
from coalmine.simulator.traffic import LATENCY_BUCKETS, Clock, Counters, World

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CODE_OK, CODE_THREW, CODE_5XX = "200", "500", "503"

_REQUESTS_HELP = "HTTP requests served by the Worker, by script, version and status code."
_DURATION_HELP = "HTTP request duration in seconds, by script and version."


def render(world: World, at: datetime | None = None) -> str:
    """The exposition of every script and version at ``at`` (default now)."""
    series = [
        (script, version, world.counters(script, version, at))
        for script in world.scripts()
        for version in world.versions(script)
    ]
    series = [(s, v, c) for s, v, c in series if c.requests > 0]
    lines = [
        "# HELP http_requests_total " + _REQUESTS_HELP,
        "# TYPE http_requests_total counter",
    ]
    for script, version, counters in series:
        for code, count in _by_code(counters):
            labels = _labels(script=script, version=version, code=code)
            lines.append(f"http_requests_total{labels} {count}")
    lines += [
        "# HELP http_request_duration_seconds " + _DURATION_HELP,
        "# TYPE http_request_duration_seconds histogram",
    ]
    for script, version, counters in series:
        lines += _histogram(script, version, counters)
    return "\n".join(lines) + "\n"


class MetricsExporter(Service):
    """``GET /metrics``: the exposition at the clock's now."""

    def __init__(self, world: World, clock: Clock, *, host: str = "127.0.0.1") -> None:
        super().__init__(clock, host=host)
        self.world = world

    @property
    def url(self) -> str:
        """The scrape URL, ``http://127.0.0.1:PORT/metrics``."""
        return f"{self.base_url}/metrics"

    async def route(self, request: Request) -> Response:
        """Serve the exposition."""
        if request.path != "/metrics":
            return Response.text(404, "not found\n")
        if request.method != "GET":
            return Response.text(405, "method not allowed\n")
        return Response.text(200, render(self.world), CONTENT_TYPE)


def _by_code(counters: Counters) -> list[tuple[str, int]]:
    counts = [
        (CODE_OK, counters.ok),
        (CODE_THREW, counters.exceptions),
        (CODE_5XX, counters.http_5xx),
    ]
    return [(code, count) for code, count in counts if count > 0]


def _histogram(script: str, version: str, counters: Counters) -> list[str]:
    name = "http_request_duration_seconds"
    lines = []
    for bound, count in zip(LATENCY_BUCKETS, counters.latency_buckets, strict=True):
        labels = _labels(script=script, version=version, le=_go_float(bound))
        lines.append(f"{name}_bucket{labels} {count}")
    labels = _labels(script=script, version=version, le="+Inf")
    lines.append(f"{name}_bucket{labels} {counters.requests}")
    labels = _labels(script=script, version=version)
    lines.append(f"{name}_sum{labels} {counters.latency_sum!r}")
    lines.append(f"{name}_count{labels} {counters.requests}")
    return lines


def _labels(**labels: str) -> str:
    text = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + text + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _go_float(value: float) -> str:
    """Bounds as Prometheus' client libraries write them: ``0.005``, ``1.0``, ``10.0``."""
    return repr(float(value))
