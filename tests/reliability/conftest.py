"""The fault suite's world, and the four promises every case checks.

Every case drives the real daemon (built by ``open_daemon`` exactly as ``coalmine run`` builds
it) against the simulator on a virtual clock (``tests/e2e/harness.py``), so minutes of outage
cost no wall time. It breaks one dependency, then checks:

- safe decisions: no traffic change while a gate's data is missing (:func:`assert_held`);
- /health, over HTTP: the dependency ``failing`` and the status ``degraded`` during the fault,
  ``healthy`` after (:func:`health`, :func:`assert_degraded`);
- notifications: every page, change event, Slack message and annotation decided is delivered
  exactly once, however long the receiver was away (:func:`assert_delivered_once`);
- the journal: its hash chain verifies, it holds every decision, and every traffic change is
  recorded as applied exactly once (:func:`assert_journal_complete`).

Prometheus is either :class:`FakePrometheus` (its query API on a loopback port, for answers a
real server cannot be made to give on demand) or a real one (``tests/integration/prometheus.py``)
for the faults of the process itself: killed, paused.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx

from coalmine.app import open_daemon, prepare
from coalmine.cli.localprom import wait_until_ready
from coalmine.engine import Decision, RolloutPhase
from coalmine.errors import StoreError
from coalmine.notify.outbox import CHANGE_ACTIONS, SLACK_ACTIONS
from coalmine.settings import load_settings
from coalmine.simulator import Behaviour, Service, Simulator, VirtualClock
from coalmine.simulator.service import Request, Response
from tests.e2e.harness import ADMIN_TOKEN, START, Harness, virtual_sleep
from tests.integration.prometheus import RunningPrometheus, Series, prometheus_with_history

SCRIPT = "api"
STABLE = "00000000-0000-4000-8000-0000000000a1"
CANARY = "00000000-0000-4000-8000-0000000000b2"

# coalmine's own timeouts (10 s a Prometheus query, 15 s a Cloudflare call) have no setting;
# calls to a server a case stalls get this many seconds instead, so that each stalled tick
# costs about a second of wall time, not thirty.
TIMEOUT_CAP = 0.3

# Gates on Prometheus: the hold (1m) elapses at the third tick, data is there at once.
PROMETHEUS_POLICY = """
version: 1
name: faults-prometheus
scripts: [api]
analysis: {interval: 30s, warmup: 0s, inconclusive_page_after: 1m}
steps: [{weight: 10, hold: 1m}, {weight: 50, hold: 1m}, {weight: 100}]
rules:
  - name: error_rate
    source: prometheus
    query: >-
      sum(rate(errors_total{script="$script",version="$version"}[$window]))
      / sum(rate(requests_total{script="$script",version="$version"}[$window]))
    samples: sum(increase(requests_total{script="$script",version="$version"}[$window]))
    window: 1m
    min_samples: 100
    above: 0.01
    for: 1m
    on_breach: rollback
"""

# Gates on Cloudflare's analytics, whose data lags 3 minutes: conclusive from about 4 minutes.
CLOUDFLARE_POLICY = """
version: 1
name: faults-cloudflare
scripts: [api]
analysis: {interval: 30s, warmup: 1m, inconclusive_page_after: 5m}
steps: [{weight: 10, hold: 2m}, {weight: 50, hold: 2m}, {weight: 100}]
post_promotion: {watch: 2m}
rules:
  - {name: exceptions, source: cloudflare, signal: error_ratio, window: 2m, min_samples: 50,
     above: 0.02, for: 1m, on_breach: rollback}
"""


# ---- the daemon under test ---------------------------------------------------------------------


@dataclass
class FaultHarness(Harness):
    """The e2e harness, with a loopback Prometheus when asked for, and ticks that survive a
    failing state store the way the daemon's own outbox task does."""

    prometheus: FakePrometheus | None = None

    async def tick(self, seconds: float = 30) -> list[Decision]:
        """Advance the clock, run one tick, deliver the notifications due (a store error there
        is what ``Outbox.run`` logs and retries at its next poll)."""
        self.clock.advance(seconds)
        last = self.loop.recent[-1] if self.loop.recent else None
        await self.loop.tick_safely(self.clock())
        new = _decided_after(self.loop.recent, last)
        self.decisions += new
        with suppress(StoreError):
            await self.daemon.outbox.deliver_due()
        return new

    async def ticks(
        self,
        count: int,
        *,
        held_at: int | None = None,
        check: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run ``count`` ticks; after each, check that traffic stayed ``held_at`` and ``check``."""
        for _ in range(count):
            await self.tick()
            if held_at is not None:
                assert_held(self, held_at)
            if check is not None:
                await check()


def _decided_after(recent: list[Decision], last: Decision | None) -> list[Decision]:
    """The decisions appended to the loop's (bounded) recent list since ``last``."""
    if last is None:
        return list(recent)
    for i in range(len(recent) - 1, -1, -1):
        if recent[i] is last:
            return list(recent[i + 1 :])
    raise AssertionError("more decisions in one tick than the loop keeps: some were not seen")


class CappedTimeouts(httpx.AsyncBaseTransport):
    """The real HTTP transport; requests to ``ports`` get at most ``seconds`` per timeout."""

    def __init__(self, seconds: float, ports: Collection[int]) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._cap = seconds
        self._ports = set(ports)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Cap the request's timeouts when it goes to a stalled server, then send it."""
        if request.url.port in self._ports:
            timeouts = request.extensions.get("timeout", {})
            request.extensions["timeout"] = {
                name: self._cap if value is None else min(value, self._cap)
                for name, value in timeouts.items()
            }
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        """Close the connections."""
        await self._inner.aclose()


@asynccontextmanager
async def fault_harness(
    tmp_path: Path,
    *,
    policy: str,
    canary: Behaviour | None = None,
    fake_prometheus: bool = False,
    prometheus_url: str | None = None,
) -> AsyncIterator[FaultHarness]:
    """Script ``api`` (STABLE at 100%, CANARY uploaded), then split 10% by "wrangler"; a daemon
    pointed at the simulator and at a fake or real Prometheus."""
    clock = VirtualClock(START)
    sim = Simulator(clock=clock, seed=11)
    sim.add_script(SCRIPT, requests_per_minute=600, version_id=STABLE)
    sim.upload_version(SCRIPT, canary or Behaviour(), version_id=CANARY)
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    async with sim.running(), anyio.create_task_group() as tg:
        fake = None
        if fake_prometheus:
            fake = FakePrometheus(clock)
            await tg.start(fake.serve)
            prometheus_url = fake.base_url
        env = {
            **sim.environment(),
            "COALMINE_POLICIES": str(path),
            "COALMINE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
            "COALMINE_LISTEN": "127.0.0.1:0",
            "COALMINE_ADMIN_TOKEN": ADMIN_TOKEN,
            # every 30 s tick reads the deployment, as these cases count on
            "COALMINE_CANARY_DRIFT_INTERVAL": "30s",
        }
        ports = []
        if prometheus_url:
            env["COALMINE_PROMETHEUS_URL"] = prometheus_url
            ports.append(urlsplit(prometheus_url).port or 80)
        settings = load_settings(env)
        async with open_daemon(
            settings,
            prepare(settings),
            clock=clock,
            sleep=lambda s: virtual_sleep(clock, s),
            replicas=False,  # ticks driven by the case, one daemon
            transport=CappedTimeouts(TIMEOUT_CAP, ports),
        ) as daemon:
            sim.start_canary(SCRIPT, CANARY, percent=10)
            yield FaultHarness(sim, clock, daemon, STABLE, CANARY, [], fake)
        tg.cancel_scope.cancel()


# ---- Prometheus ----------------------------------------------------------------------------------


def vector(at: float, value: str) -> dict[str, Any]:
    """A Prometheus instant-query answer with one sample."""
    return {
        "status": "success",
        "data": {"resultType": "vector", "result": [{"metric": {}, "value": [at, value]}]},
    }


class FakePrometheus(Service):
    """Prometheus's ``/api/v1/query`` (reference/observability-apis.md) answering every rule
    healthy: an error ratio of 0.001 over 1,000 requests. ``delay`` seconds before each answer
    make it slower than its clients' timeout; the Service's fault queue and ``go_down()`` do the
    rest."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__(clock)
        self.delay = 0.0
        self.error_ratio = "0.001"  # what every ratio query answers (set above 0.01 to breach)

    async def route(self, request: Request) -> Response:
        """Answer one instant query."""
        if request.path != "/api/v1/query":
            return Response.json(
                404, {"status": "error", "errorType": "not_found", "error": "not found"}
            )
        if self.delay:
            await anyio.sleep(self.delay)
        params = request.query if request.method == "GET" else parse_qs(request.body.decode())
        query = params.get("query", [""])[0]
        at = float(params.get("time", ["0"])[0])
        return Response.json(200, vector(at, "1000" if "increase(" in query else self.error_ratio))


def history() -> list[Series]:
    """Both versions serve 10 requests a second, 0.1% of them errors (below the 1% gate)."""
    return [
        (name, {"script": SCRIPT, "version": version}, per_second)
        for version in (STABLE, CANARY)
        for name, per_second in (("requests_total", 10.0), ("errors_total", 0.01))
    ]


@contextmanager
def real_prometheus(tmp_path: Path) -> Iterator[RunningPrometheus]:
    """A real Prometheus with an hour of :func:`history` from 10 minutes before START."""
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    start = int(START.timestamp())
    with prometheus_with_history(workdir, history(), start - 600, start + 3600) as running:
        yield running


@contextmanager
def restarted(running: RunningPrometheus) -> Iterator[subprocess.Popen[bytes]]:
    """The same Prometheus (command line, port, data) started again after it died."""
    process = subprocess.Popen(
        running.process.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_ready(running.url, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (``T``: stopped)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


async def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` (real time) until it holds; fail after ``timeout`` seconds."""
    with anyio.move_on_after(timeout):
        while not condition():
            await anyio.sleep(0.01)
        return
    raise AssertionError(f"not {what} after {timeout:g}s")


# ---- the promises --------------------------------------------------------------------------------


async def health(client: httpx.AsyncClient) -> dict[str, Any]:
    """GET /health; its HTTP status must agree with the body (503 only when unhealthy)."""
    response = await client.get("/health")
    body: dict[str, Any] = response.json()
    assert response.status_code == (503 if body["status"] == "unhealthy" else 200), body
    return body


def assert_degraded(body: dict[str, Any], dependency: str) -> None:
    """/health says degraded because ``dependency`` fails."""
    assert body["status"] == "degraded", body
    assert body["checks"][dependency]["status"] == "failing", body["checks"]


def degraded(client: httpx.AsyncClient, dependency: str) -> Callable[[], Awaitable[None]]:
    """A check for :meth:`FaultHarness.ticks`: /health degraded by ``dependency``."""

    async def check() -> None:
        assert_degraded(await health(client), dependency)

    return check


def assert_healthy(body: dict[str, Any]) -> None:
    """/health says healthy, every check included."""
    assert body["status"] == "healthy", body
    assert all(c["status"] == "healthy" for c in body["checks"].values()), body["checks"]


def healthy(client: httpx.AsyncClient) -> Callable[[], Awaitable[None]]:
    """A check for :meth:`FaultHarness.ticks`: /health healthy."""

    async def check() -> None:
        assert_healthy(await health(client))

    return check


def assert_held(h: Harness, percent: int) -> None:
    """The canary is still at ``percent``: no advance was decided, none was sent."""
    assert h.phase is RolloutPhase.CANARY, h.phase
    assert h.loop.state.canary_percent == percent
    assert not {"set_traffic", "promote"} & set(h.actions()), h.actions()
    live = h.sim.cloudflare.current(SCRIPT).split
    assert live == {CANARY: percent, STABLE: 100 - percent}, live


def traffic_posts(h: Harness) -> list[int | None]:
    """The statuses of every deployment POST Cloudflare received (None: dropped)."""
    return [
        r.status
        for r in h.sim.cloudflare.requests
        if r.method == "POST" and r.path.endswith("/deployments")
    ]


def inconclusive_pages(h: Harness, action: str = "trigger") -> list[dict[str, Any]]:
    """The inconclusive (warning) page events PagerDuty accepted."""
    return [
        p
        for p in h.sim.pages
        if p["event_action"] == action and str(p["dedup_key"]).endswith("/inconclusive")
    ]


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def assert_journal_complete(h: Harness) -> None:
    """The chain verifies; the journal holds exactly the decisions made, in order; each traffic
    decision was carried out and recorded once."""
    store = h.db
    verification = store.verify_journal()
    assert verification.ok, verification.problem
    entries = list(store.journal())
    decided = [e.body for e in entries if e.action not in ("applied", "superseded")]
    assert decided == [_json(d.to_dict()) for d in h.decisions]
    applied = [e for e in entries if e.action == "applied"]
    traffic = [d for d in h.decisions if d.action in ("set_traffic", "promote", "rollback")]
    assert store.open_intents() == []
    assert [e.body["kind"] for e in applied] == [d.action for d in traffic]


def assert_delivered_once(h: Harness) -> None:
    """Every notification the decisions called for reached its receiver exactly once."""
    assert h.db.backlog() == 0
    decided = h.decisions
    expected_pages = Counter(
        (d.dedup_key, "trigger" if d.action == "page" else "resolve")
        for d in decided
        if d.action in ("page", "resolve") and d.dedup_key
    )
    received_pages = Counter(
        (p["dedup_key"], p["event_action"])
        for p in h.sim.pages
        # the daemon's own (a stuck traffic change, a lost state store), not a decision's
        if not str(p["dedup_key"]).endswith(("/actuator", "/state-store"))
    )
    assert received_pages == expected_pages
    assert len(h.sim.pagerduty.changes) == sum(d.action in CHANGE_ACTIONS for d in decided)
    assert len(h.sim.slack_messages) == sum(d.action in SLACK_ACTIONS for d in decided)
    assert len(h.sim.annotations) == sum(d.action in ("rollback", "complete") for d in decided)
    assert not h.sim.errors
