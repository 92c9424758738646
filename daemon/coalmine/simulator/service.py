"""What every simulated service shares: a listener that can go down, a log, injected faults.

A :class:`Service` answers HTTP on a loopback port: its handler takes a :class:`Request` and gives a
:class:`Response`, served by :func:`serve` (Starlette's request parsing, uvicorn through
:func:`coalmine.server.http.serve`, the daemon's own stack).
Every request is logged (the ``Authorization`` header redacted) before anything else happens;
then the first matching :class:`Injection` in the fault queue, if any, answers in the service's
place; otherwise the service's own ``route`` does. ``go_down()`` closes the listening socket, so
clients get *connection refused* until ``go_up()`` listens again on the same port.

An injection can answer with any status, headers and body; ``drop`` closes the connection
without an answer; ``truncate`` sends the real answer's first half (well framed: coalmine's
server always frames bodies correctly, so the client sees JSON cut short, not a short read);
``hang`` holds the request until the queue is cleared or the service stops, for timeouts;
``apply_then_hang`` lets the service act on the request, then holds its answer the same way
(a client that dies meanwhile never learns that its call took effect), and sends it once released.

For load tests, ``latency`` makes every answer take that long, and ``in_flight`` counts the
requests being answered at once under a key of the test's choosing (:class:`InFlight`).
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import anyio
from anyio.abc import TaskStatus
from starlette.requests import Request as AsgiRequest
from starlette.types import ASGIApp, Receive, Scope, Send

from coalmine.server import http
from coalmine.simulator.traffic import Clock

Action = Literal["answer", "drop", "truncate", "hang", "apply_then_hang"]

# The simulator answers like the far-away APIs it plays: slow peers are kept for 30 s, and a
# service that goes down drops its connections at once.
LIMITS = http.Limits(keep_alive=30.0, head_timeout=30.0, shutdown_grace=0.0)


@dataclass(frozen=True, slots=True)
class Request:
    """An HTTP request with its whole body."""

    method: str
    target: str
    headers: dict[str, str]  # lower-case names; the last of repeated headers
    body: bytes = b""

    @property
    def path(self) -> str:
        """The path without the query string."""
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        """The query string's parameters."""
        return parse_qs(urlsplit(self.target).query)

    def json(self) -> Any:
        """The body as JSON (``ValueError`` when it is not)."""
        try:
            return json.loads(self.body or b"null")
        except RecursionError as exc:
            raise ValueError("JSON nested too deep") from exc


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP response."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(
        cls, status: int, value: Any, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        """A JSON response."""
        body = json.dumps(value).encode()
        return cls(status, body, [("content-type", "application/json"), *(headers or [])])

    @classmethod
    def text(
        cls, status: int, text: str, content_type: str = "text/plain; charset=utf-8"
    ) -> Response:
        """A plain-text response."""
        return cls(status, text.encode(), [("content-type", content_type)])


Handler = Callable[[Request], Awaitable[Response]]
OnError = Callable[[Request, BaseException], None]

# Answering this closes the connection at once, sending nothing: that is how ``drop`` is made.
_DROP = Response(599)


def handler_app(handler: Handler, on_error: OnError | None = None) -> ASGIApp:
    """An ASGI application answering every request with ``handler``; a handler's exception is
    a 500 (``on_error`` hears it, the wire gets no traceback)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        asgi = AsgiRequest(scope, receive)
        query = scope.get("query_string", b"")
        target = scope.get("raw_path", b"/") + (b"?" + query if query else b"")
        request = Request(
            asgi.method,
            target.decode("latin-1"),
            {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]},
            await asgi.body(),
        )
        try:
            response = await handler(request)
        except Exception as exc:  # the handler's bug must not kill the server
            if on_error:
                on_error(request, exc)
            response = Response.text(500, "internal error\n")
        if response is _DROP:
            http.abort()
            await receive()  # http.disconnect
            return
        headers = [(k.lower().encode(), v.encode()) for k, v in response.headers]
        headers.append((b"content-length", str(len(response.body)).encode()))
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    return app


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    on_error: OnError | None = None,
    limits: http.Limits = LIMITS,
) -> None:
    """Serve ``handler`` until cancelled; reports the bound port through ``task_status``."""
    await http.serve(
        handler_app(handler, on_error), host, port, task_status=task_status, limits=limits
    )


@dataclass
class LoggedRequest:
    """One request as a service received it, and the status it answered (None: dropped)."""

    at: datetime
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any  # parsed JSON, else the text, else None when empty
    status: int | None = None

    @classmethod
    def of(cls, request: Request, at: datetime) -> LoggedRequest:
        """Log a request; the authorization header's credentials are replaced by ``***``."""
        headers = dict(request.headers)
        if "authorization" in headers:
            scheme = headers["authorization"].split(" ", 1)[0]
            headers["authorization"] = f"{scheme} ***"
        return cls(at, request.method, request.path, request.query, headers, _body(request.body))


@dataclass
class Injection:
    """A forced answer for requests matching ``method`` and ``path`` (fnmatch patterns).

    It applies to the next ``times`` matching requests (None: every one) while the clock is
    before ``until`` (None: no deadline).
    """

    method: str = "*"
    path: str = "*"
    status: int = 503
    body: Any = None  # bytes or str as is; anything else as JSON
    headers: Sequence[tuple[str, str]] = ()
    action: Action = "answer"
    times: int | None = 1
    until: datetime | None = None

    def matches(self, request: Request) -> bool:
        """Whether the request is one this injection answers."""
        return fnmatch.fnmatchcase(request.method.upper(), self.method.upper()) and (
            fnmatch.fnmatchcase(request.path, self.path)
        )

    def response(self) -> Response:
        """The forced answer for ``action == "answer"``."""
        if isinstance(self.body, bytes | str):
            body = self.body.encode() if isinstance(self.body, str) else self.body
            return Response(self.status, body, list(self.headers))
        if self.body is None:
            return Response(self.status, b"", list(self.headers))
        return Response.json(self.status, self.body, list(self.headers))


class FaultQueue:
    """Injections in the order added; the first that matches a request answers it."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._queue: list[Injection] = []
        self._released = anyio.Event()

    def add(self, injection: Injection) -> Injection:
        """Queue an injection."""
        if injection.times is not None and injection.times < 1:
            raise ValueError("an injection applies to at least one request")
        self._queue.append(injection)
        return injection

    def clear(self) -> None:
        """Forget every injection and release hung requests."""
        self._queue.clear()
        self._released.set()
        self._released = anyio.Event()

    def pending(self) -> list[Injection]:
        """The injections still to apply."""
        now = self._clock()
        self._queue = [i for i in self._queue if i.until is None or now < i.until]
        return list(self._queue)

    def take(self, request: Request) -> Injection | None:
        """The injection that answers this request, counting it against ``times``."""
        for injection in self.pending():
            if injection.matches(request):
                if injection.times is not None:
                    injection.times -= 1
                    if injection.times == 0:
                        self._queue.remove(injection)
                return injection
        return None

    async def apply(
        self, injection: Injection, real: Callable[[], Awaitable[Response]]
    ) -> Response:
        """The answer an injection gives (``real`` is the service's own answer)."""
        if injection.action == "drop":
            return _DROP
        if injection.action == "truncate":
            answer = await real()
            return Response(answer.status, answer.body[: len(answer.body) // 2], answer.headers)
        if injection.action == "hang":
            await self._released.wait()
            return _DROP
        if injection.action == "apply_then_hang":
            released = self._released  # a clear() while the service acts still releases it
            answer = await real()
            await released.wait()
            return answer
        return injection.response()


class WindowLimiter:
    """At most ``limit`` requests per key in any ``window``; past it, refuse until one expires.

    ``limit = None`` admits everything; both attributes may be changed at any time.
    """

    def __init__(self, clock: Clock, limit: int | None, window: timedelta) -> None:
        self._clock = clock
        self.limit = limit
        self.window = window
        self._seen: dict[str, deque[datetime]] = {}

    def admit(self, key: str) -> float | None:
        """Count a request; None if admitted, else the seconds until one would be."""
        if self.limit is None:
            return None
        now = self._clock()
        seen = self._seen.setdefault(key, deque())
        while seen and seen[0] <= now - self.window:
            seen.popleft()
        if len(seen) >= self.limit:
            return (seen[0] + self.window - now).total_seconds()
        seen.append(now)
        return None


@dataclass
class InFlight:
    """How many requests are being answered at once, counted under a key (for load tests).

    ``key`` maps each logged request to what it is counted under (say, its script and API), or
    to None to leave it out; no ``key``, nothing is counted. ``peak`` keeps the most requests
    seen at once under each key, ``peak_total`` the most of all counted requests at once.
    """

    key: Callable[[LoggedRequest], Hashable | None] | None = None
    now: dict[Hashable, int] = field(default_factory=dict)
    peak: dict[Hashable, int] = field(default_factory=dict)
    total: int = 0
    peak_total: int = 0

    def enter(self, request: LoggedRequest) -> Hashable | None:
        """Count a request being answered; returns the key to hand to :meth:`leave`."""
        key = self.key(request) if self.key is not None else None
        if key is None:
            return None
        count = self.now[key] = self.now.get(key, 0) + 1
        self.peak[key] = max(self.peak.get(key, 0), count)
        self.total += 1
        self.peak_total = max(self.peak_total, self.total)
        return key

    def leave(self, key: Hashable | None) -> None:
        """The request counted under ``key`` has its answer."""
        if key is None:
            return
        self.total -= 1
        self.now[key] -= 1
        if not self.now[key]:
            del self.now[key]


def retry_after(seconds: float) -> str:
    """A ``retry-after`` value: whole seconds, at least one."""
    return str(max(1, math.ceil(seconds)))


class Service:
    """A simulated HTTP service on a loopback port."""

    def __init__(self, clock: Clock, *, host: str = "127.0.0.1") -> None:
        self.clock = clock
        self.host = host
        self.port: int | None = None
        self.requests: list[LoggedRequest] = []
        self.faults = FaultQueue(clock)
        self.errors: list[BaseException] = []  # the service's own bugs, for tests to assert on
        self.latency = 0.0  # wall-clock seconds every answer takes (a far-away API); 0: none
        self.in_flight = InFlight()  # set its ``key`` to count requests answered at once
        self._up = True
        self._scope: anyio.CancelScope | None = None
        self._wake = anyio.Event()
        self._opened = anyio.Event()
        self._closed = anyio.Event()

    @property
    def base_url(self) -> str:
        """``http://host:port`` once serving."""
        if self.port is None:
            raise RuntimeError(f"{type(self).__name__} is not serving yet")
        return f"http://{self.host}:{self.port}"

    def inject(
        self,
        *,
        method: str = "*",
        path: str = "*",
        status: int = 503,
        body: Any = None,
        headers: Sequence[tuple[str, str]] = (),
        action: Action = "answer",
        times: int | None = 1,
        until: datetime | None = None,
    ) -> Injection:
        """Queue an :class:`Injection`: force answers to matching requests (see its fields)."""
        return self.faults.add(Injection(method, path, status, body, headers, action, times, until))

    async def route(self, request: Request) -> Response:
        """The service's own answer (subclasses implement it)."""
        raise NotImplementedError

    async def handle(self, request: Request) -> Response:
        """Log, apply an injected fault or route, and record the status."""
        entry = LoggedRequest.of(request, self.clock())
        self.requests.append(entry)
        flight = self.in_flight.enter(entry)
        try:
            if self.latency > 0:
                await anyio.sleep(self.latency)
            injection = self.faults.take(request)
            if injection is None:
                response = await self.route(request)
            else:
                response = await self.faults.apply(injection, partial(self.route, request))
        finally:
            self.in_flight.leave(flight)
        entry.status = None if response is _DROP else response.status
        return response

    async def serve(self, *, task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen (port reported through ``task_status``), going down and up on request."""
        reported = False
        while True:
            if not self._up:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            with anyio.CancelScope() as scope:
                self._scope = scope
                async with anyio.create_task_group() as tg:
                    self.port = await tg.start(self._listen)
                    self._opened.set()
                    if not reported:
                        task_status.started(self.port)
                        reported = True
            self._scope = None
            self._closed.set()

    async def go_down(self) -> None:
        """Stop listening: connections are refused until :meth:`go_up`."""
        if not self._up:
            return
        self._up = False
        self._closed = anyio.Event()
        if self._scope is not None:
            self._scope.cancel()
            await self._closed.wait()

    async def go_up(self) -> None:
        """Listen again on the same port."""
        if self._up:
            return
        self._up = True
        self._opened = anyio.Event()
        self._wake.set()
        await self._opened.wait()

    async def _listen(self, *, task_status: TaskStatus[int]) -> None:
        await serve(
            self.handle,
            self.host,
            self.port or 0,
            task_status=task_status,
            on_error=lambda _request, exc: self.errors.append(exc),
        )


def json_body(request: Request) -> tuple[bool, Any]:
    """(True, value) when the body is JSON, else (False, None)."""
    return http.json_or_none(request.body)


def _body(raw: bytes) -> Any:
    if not raw:
        return None
    parsed, value = http.json_or_none(raw)
    return value if parsed else raw.decode("utf-8", errors="replace")
