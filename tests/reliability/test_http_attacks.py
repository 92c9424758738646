"""Hostile HTTP clients against the real `coalmine run` process, started under a 1,024 fd limit.

Each case starts the daemon (``prlimit --nofile=1024``, systemd's default soft limit) against a
wall-clock simulator and a Prometheus query API whose answer the test controls, attacks it from
loopback, and checks throughout that ``/healthz`` answers on a fresh connection within a 1 s
client timeout (a timeout is a failure), that nothing is ever answered 500, and that the
process lives. The crowd case also injects a breach mid-attack: the canary must still roll
back. Attack sockets are plain blocking sockets driven from worker threads, so the test's own
event loop (the simulator, the prober) stays responsive.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import anyio
import httpx
import pytest

from coalmine.cli.localprom import free_port
from coalmine.simulator import Service, Simulator, wall_clock
from coalmine.simulator.service import Request, Response

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)"),
]

TOKEN = "attack-test-admin-token"
POLICY = """
version: 1
name: attacks
scripts: [api]
analysis: {interval: 1s, warmup: 0s, inconclusive_page_after: 1h}
steps: [{weight: 10, hold: 1h}, {weight: 100}]
rules:
  - name: error_rate
    source: prometheus
    query: 'error_ratio{script="$script",version="$version"}'
    window: 1m
    above: 0.01
    on_breach: rollback
"""
TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # Linux tcpi_state values


class Prometheus(Service):
    """Prometheus's instant-query API answering ``ratio`` for every query."""

    def __init__(self) -> None:
        super().__init__(wall_clock)
        self.ratio = "0.001"

    async def route(self, request: Request) -> Response:
        """One instant query."""
        params = request.query if request.method == "GET" else parse_qs(request.body.decode())
        at = float(params.get("time", ["0"])[0])
        result = [{"metric": {}, "value": [at, self.ratio]}]
        return Response.json(
            200, {"status": "success", "data": {"resultType": "vector", "result": result}}
        )


@dataclass
class Target:
    """The daemon under attack, and what the prober saw."""

    sim: Simulator
    prometheus: Prometheus
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path
    stable: str
    probes: int = 0
    probe_failures: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)  # every attack answer parsed

    @property
    def url(self) -> str:
        """The daemon's base URL."""
        return f"http://{self.host}:{self.port}"

    def connect(self) -> socket.socket:
        """A raw connection to the daemon."""
        return socket.create_connection((self.host, self.port), timeout=5)

    def check(self) -> None:
        """The promises every case keeps."""
        assert self.process.poll() is None, self.log.read_text()
        assert self.probes > 0
        assert self.probe_failures == [], self.probe_failures
        assert 500 not in self.statuses
        assert "Traceback" not in self.log.read_text()


async def probe_forever(target: Target) -> None:
    """GET /healthz on a fresh connection every 0.2 s with a 1 s timeout; note any failure."""
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=1.0, limits=limits) as client:
        while True:
            try:
                response = await client.get(target.url + "/healthz")
                if response.status_code != 200:
                    target.probe_failures.append(f"status {response.status_code}")
            except httpx.HTTPError as exc:
                target.probe_failures.append(f"{type(exc).__name__}: {exc}")
            target.probes += 1
            await anyio.sleep(0.2)


async def wait_for(predicate: Callable[[], bool], seconds: float = 30.0) -> None:
    """Poll until true, with a deadline."""
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.1)


async def ready(target: Target) -> bool:
    """Whether the daemon answers /readyz."""
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(target.url + "/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


@asynccontextmanager
async def attacked(tmp_path: Path) -> AsyncIterator[Target]:
    """The daemon under ``prlimit --nofile=1024``, ready, with the prober running."""
    sim = Simulator(seed=11)
    sim.slack.limiter.limit = None
    stable = sim.add_script("api", requests_per_minute=600)
    canary = sim.upload_version("api")
    prometheus = Prometheus()
    (tmp_path / "policy.yaml").write_text(POLICY)
    async with sim.running(), anyio.create_task_group() as tg:
        await tg.start(prometheus.serve)
        sim.start_canary("api", canary, percent=10)
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("COALMINE_")},
            **sim.environment(),
            "COALMINE_POLICIES": str(tmp_path / "policy.yaml"),
            "COALMINE_STATE_URL": f"sqlite:///{tmp_path / 'state.db'}",
            "COALMINE_LISTEN": f"127.0.0.1:{port}",
            "COALMINE_ADMIN_TOKEN": TOKEN,
            "COALMINE_PROMETHEUS_URL": prometheus.base_url,
        }
        log = tmp_path / "run.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["prlimit", "--nofile=1024", "--", sys.executable, "-m", "coalmine", "run"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        target = Target(sim, prometheus, process, "127.0.0.1", port, log, stable)
        try:
            with anyio.fail_after(30):
                while not await ready(target):
                    assert process.poll() is None, log.read_text()
                    await anyio.sleep(0.1)
            tg.start_soon(probe_forever, target)
            yield target
        finally:
            tg.cancel_scope.cancel()
            process.send_signal(signal.SIGTERM)
            with anyio.CancelScope(shield=True):  # the scope is cancelled: wait all the same
                await anyio.to_thread.run_sync(lambda: process.wait(timeout=30))


def status_of(reply: bytes) -> int | None:
    """The status of the first answer in ``reply``, if any."""
    if not reply.startswith(b"HTTP/1.1 "):
        return None
    return int(reply[9:12])


def exchange(target: Target, data: bytes) -> bytes:
    """Send raw bytes; everything answered until the server closes (5 s at most)."""
    reply = b""
    with suppress(OSError), target.connect() as sock:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


class Crowd:
    """Many raw connections held from a worker thread; slowloris ones trickle header bytes."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sockets: list[socket.socket] = []
        self.stop = threading.Event()

    def open(self, count: int, first_bytes: bytes = b"") -> None:
        """Open ``count`` connections (some may be refused or reset: that is the point); stop
        early once told to (a worker thread cannot be cancelled: it must end by itself)."""
        for _ in range(count):
            if self.stop.is_set():
                return
            with suppress(OSError):
                sock = self.target.connect()
                if first_bytes:
                    sock.sendall(first_bytes)
                self.sockets.append(sock)

    def trickle(self) -> None:
        """Until stopped, send every connection one more header line every 3 seconds."""
        while not self.stop.wait(3.0):
            for sock in list(self.sockets):
                try:
                    sock.send(b"X-a: b\r\n")
                except OSError:
                    self.sockets.remove(sock)
                    sock.close()

    def close(self) -> None:
        """Close every connection."""
        self.stop.set()
        for sock in self.sockets:
            sock.close()


async def test_idle_and_slowloris_crowds_and_a_breach_still_rolls_back(tmp_path: Path) -> None:
    """1,100 idle then 1,500 slowloris connections under a 1,024 fd limit: /healthz answers,
    and a breach injected mid-attack rolls the canary back."""
    async with attacked(tmp_path) as target:
        idle, slow = Crowd(target), Crowd(target)
        try:
            await anyio.to_thread.run_sync(idle.open, 1100)
            async with anyio.create_task_group() as tg:
                tg.start_soon(anyio.to_thread.run_sync, slow.trickle)
                try:
                    await anyio.to_thread.run_sync(slow.open, 1500, b"GET /healthz HTTP/1.1\r\n")
                    target.prometheus.ratio = "0.5"  # the canary breaks while under attack

                    def rolled_back() -> bool:
                        posts = target.sim.deployment_posts("api")
                        last = posts[-1] if posts else {}
                        return last.get("versions") == [  # type: ignore[attr-defined]
                            {"version_id": target.stable, "percentage": 100}
                        ]

                    await wait_for(rolled_back, 60)
                finally:
                    # inside the task group: it waits for the trickle thread, which ends only
                    # when told to (set outside, a failed wait hung the test forever)
                    slow.stop.set()
        finally:
            idle.close()
            slow.close()
        target.check()


async def test_clients_that_never_read_are_dropped(tmp_path: Path) -> None:
    """Clients pipelining 500 requests for the OpenAPI document (about 8 MB of answers each)
    and never reading are reset; /healthz answers meanwhile."""
    request = b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: a\r\n\r\n" * 500
    async with attacked(tmp_path) as target:
        socks = []
        for _ in range(20):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((target.host, target.port))
            with suppress(OSError):
                sock.setblocking(False)
                sock.send(request)
            socks.append(sock)
        try:

            def all_dropped() -> bool:
                return all(_tcp_state(s) in (TCP_CLOSE, TCP_CLOSE_WAIT) for s in socks)

            await wait_for(all_dropped, 40)
        finally:
            for sock in socks:
                sock.close()
        target.check()


SMUGGLING = [
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcdGET /metrics HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    b"POST /healthz HTTP/1.1\r\nHost: a\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]
TARGETS = [b"http://[/healthz", b"*", b"healthz", b"//[::1]", b"/%ZZ", b"/\xff", b"/a/../../etc"]


async def test_smuggling_malformed_targets_big_headers_and_deep_json(tmp_path: Path) -> None:
    """Smuggling forms, malformed targets, 1 MB headers and 30,000-deep JSON: 4xx or dropped,
    never a 500; no request hidden in a body is served (an obs-folded Transfer-Encoding is
    unfolded into the previous header, as RFC 9112 allows, so its "body" is a bad request)."""
    deep = b"[" * 30_000 + b"]" * 30_000
    deep_object = b'{"version":' * 5_000 + b"1" + b"}" * 5_000
    start = "POST /api/v1/rollouts/api/start HTTP/1.1\r\nHost: a\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n"
    async with attacked(tmp_path) as target:
        replies = []
        for data in SMUGGLING:
            reply = await anyio.to_thread.run_sync(exchange, target, data)
            # every answer 4xx, and the GET /metrics hidden in the body never served
            assert b"HTTP/1.1 2" not in reply and b"coalmine_" not in reply, reply
            replies.append(reply)
        for path in TARGETS:
            data = b"GET " + path + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            replies.append(await anyio.to_thread.run_sync(exchange, target, data))
        big = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 1_000_000 + b"\r\n\r\n"
        replies.append(await anyio.to_thread.run_sync(exchange, target, big))
        for body in (deep, deep_object):
            head = start.format(TOKEN, len(body)).encode()
            replies.append(await anyio.to_thread.run_sync(exchange, target, head + body))
        statuses = [status_of(r) for r in replies]
        target.statuses += [s for s in statuses if s is not None]
        assert all(s is None or 400 <= s < 500 for s in statuses), statuses
        assert statuses[-2:] == [400, 400]  # deep JSON: refused as bad JSON, not a crash
        target.check()


async def test_a_storm_of_authenticated_commands(tmp_path: Path) -> None:
    """200 authenticated commands at once: each answered (applied, queued, refused or
    retry), none 500, /healthz answers throughout."""
    async with attacked(tmp_path) as target:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        commands = ["pause", "resume"] * 100

        async def send(command: str) -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                response = await client.post(
                    f"{target.url}/api/v1/rollouts/api/{command}", headers=headers
                )
            target.statuses.append(response.status_code)

        async with anyio.create_task_group() as tg:
            for command in commands:
                tg.start_soon(send, command)
        assert len(target.statuses) == 200
        assert set(target.statuses) <= {200, 202, 409, 503}, target.statuses
        target.check()


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
