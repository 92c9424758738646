"""coalmine's HTTP server: uvicorn (its pure-Python h11 protocol) inside the caller's task group.

:func:`serve` runs an ASGI application until cancelled and reports the bound port through
``task_status`` (port 0 picks one). uvicorn parses HTTP/1.1 (h11: a request with both
``Content-Length`` and ``Transfer-Encoding`` is answered 400 and the connection closed, RFC 9112
§6.1) and owns keep-alive; coalmine owns signals, so uvicorn installs no signal handler.

What uvicorn leaves open is closed here, per :class:`Limits`:

- **connections**: at most ``max_connections`` at once (by default 1,024, fewer when the
  process's soft fd limit leaves less room). A new connection past the cap evicts the
  connection that has been idle longest (no request being answered); if every connection is
  busy, the new one is closed. An idle crowd (slowloris, a port scanner's open sockets) can
  never starve the fd table nor lock out ``/healthz``.
- **request heads**: a connection must deliver a whole request head within ``head_timeout`` of
  connecting or of its previous answer, however slowly it trickles bytes (slowloris); headers
  past ``max_header`` bytes are refused (400 or 431).
- **bodies**: read whole before the application sees them, at most ``max_body`` bytes (413),
  within ``head_timeout`` (408).
- **writes**: uvicorn has no write timeout and asyncio's ``close()`` waits for the send buffer
  to drain, so a peer that never reads would keep its connection and its queued answer for
  ever. A sweep every :data:`SWEEP_EVERY` seconds aborts any connection whose send buffer has
  not shrunk for ``write_timeout`` (transport level: it covers answers queued whole as well as
  those waiting for the peer). The kernel's send buffer per connection is capped at
  :data:`SEND_BUFFER`, so a peer that never reads stalls the buffer soon and holds little.
- **accept errors** (EMFILE, ENFILE, ...): asyncio already survives them (it stops accepting for
  a second and retries); they are reported through ``on_accept`` so ``/health`` can say so,
  and never escape the task group.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio
import uvicorn
from anyio.abc import TaskStatus
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_BODY = 64 * 1024
ACCEPT_RETRY_DELAY = 1.0  # asyncio's: after an accept error it listens again this much later
SEND_BUFFER = 256 * 1024  # kernel send buffer per connection (Linux may autotune it to 4 MiB)
SWEEP_EVERY = 1.0
# asyncio accepts up to its backlog argument at once, before any connection is counted against
# the cap: keep that batch inside FD_RESERVE, and the kernel's queue of pending ones long.
ACCEPT_BATCH = 64
LISTEN_BACKLOG = 1024  # seconds between checks of head, body and write timeouts
FD_RESERVE = 256  # file descriptors kept for everything but inbound connections
DEFAULT_MAX_CONNECTIONS = 1024

OnAccept = Callable[[str | None], None]
_CONNECTION: ContextVar[_Protocol | None] = ContextVar("coalmine_http_connection", default=None)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may hold of the server."""

    max_connections: int | None = None  # None: DEFAULT_MAX_CONNECTIONS, less if fds are short
    max_header: int = 16 * 1024  # a request head larger than this is 400 or 431
    max_body: int = MAX_BODY  # a request body larger than this is 413
    keep_alive: float = 5.0  # an idle kept-alive connection is closed after this long
    head_timeout: float = 10.0  # a request head (and body) must arrive within this long
    write_timeout: float = 10.0  # a peer that takes no bytes for this long is dropped
    shutdown_grace: float = 1.0  # on cancel, answers in progress get this long to finish

    def connection_cap(self) -> int:
        """The connection cap: the configured one, or what the soft fd limit leaves room for."""
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return DEFAULT_MAX_CONNECTIONS
        return max(16, min(DEFAULT_MAX_CONNECTIONS, soft - FD_RESERVE))


async def serve(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    limits: Limits = Limits(),
    on_accept: OnAccept | None = None,
) -> None:
    """Serve ``app`` until cancelled; reports the bound port through ``task_status``.

    ``on_accept`` hears an accept error's text when accepting starts failing (EMFILE, ...) and
    ``None`` once a connection is accepted again.
    """
    sock = socket.create_server((host, port), family=_family(host), backlog=LISTEN_BACKLOG)
    watch = _Watch(limits, on_accept or (lambda _error: None), sock)
    protocol = type("CoalmineH11Protocol", (_Protocol,), {"watch": watch})
    config = uvicorn.Config(
        RequestGuard(app, limits),
        http=protocol,
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,
        log_level="error",  # uvicorn's notices go nowhere; an application bug still logs
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        backlog=ACCEPT_BATCH,
        # connections are capped (plus one accept batch, transiently) by _Watch.admit: this
        # caps the tasks answering requests, a backstop that a 503 would announce
        limit_concurrency=watch.cap + ACCEPT_BATCH + 1,
        timeout_keep_alive=max(1, round(limits.keep_alive)),
        h11_max_incomplete_event_size=limits.max_header,
    )
    server = _Server(config)
    with watch.accept_errors():
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve_until_cancelled, sock, watch)
            tg.start_soon(watch.sweep_forever, server.server_state.connections)
            task_status.started(sock.getsockname()[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Server(uvicorn.Server):
    """uvicorn's server, started and stopped by :func:`serve` inside its task group."""

    _ready: TaskStatus[None] = anyio.TASK_STATUS_IGNORED

    async def serve_until_cancelled(
        self, sock: socket.socket, watch: _Watch, *, task_status: TaskStatus[None]
    ) -> None:
        """Listen on ``sock`` until cancelled; then stop (see :func:`_stop`)."""
        self._ready = task_status
        try:
            await self.serve(sockets=[sock])
        finally:
            with anyio.CancelScope(shield=True):
                await _stop(self, watch)
                sock.close()

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        """coalmine owns SIGTERM and SIGINT: install nothing."""
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Listen, then report readiness."""
        await super().startup(sockets)
        for sock in sockets or []:  # asyncio listened with the batch size: queue more
            sock.listen(LISTEN_BACKLOG)
        self._ready.started()

    async def main_loop(self) -> None:
        """Wait for cancellation (no 0.1 s tick: no date header, no request-count exit)."""
        await anyio.sleep_forever()


async def _stop(server: _Server, watch: _Watch) -> None:
    """Stop listening, close idle connections, give answers in progress their grace, abort.

    After an accept error asyncio listens again a second later, by a timer that closing the
    server does not cancel (its callback would then fail on the closed socket): it is waited
    out first.
    """
    if not server.started:
        return
    retry = watch.accept_failed_at + ACCEPT_RETRY_DELAY + 0.1 - time.monotonic()
    if retry > 0:
        await anyio.sleep(retry)
    for listener in server.servers:
        listener.close()
    connections = server.server_state.connections
    for connection in list(connections):
        connection.shutdown()
    with anyio.move_on_after(watch.limits.shutdown_grace):
        while connections:
            await anyio.sleep(0.01)
    for task in list(server.server_state.tasks):
        task.cancel()
    for connection in list(connections):
        _reset(connection.transport)
    server.started = False


class _Watch:
    """The limits uvicorn does not enforce, for every connection of one server."""

    def __init__(self, limits: Limits, on_accept: OnAccept, sock: socket.socket) -> None:
        self.limits = limits
        self.cap = limits.connection_cap()
        self._on_accept = on_accept
        self._sock = sock
        self.accept_failing = False
        self.accept_failed_at = -ACCEPT_RETRY_DELAY
        # open connections, longest idle first (dicts keep insertion order): O(1) eviction
        self.open: dict[_Protocol, None] = {}

    def admit(self, new: _Protocol) -> None:
        """A connection was accepted: past the cap, reset the longest-idle one."""
        if self.accept_failing:
            self.accept_failing = False
            self._on_accept(None)
        self.open[new] = None
        while len(self.open) > self.cap:
            victim = next((c for c in self.open if c is not new and c.idle), new)
            self.forget(victim)
            _reset(victim.transport)

    def rested(self, connection: _Protocol) -> None:
        """The connection answered: it is now the most recently idle."""
        if connection in self.open:
            self.open.pop(connection)
            self.open[connection] = None

    def forget(self, connection: _Protocol) -> None:
        """The connection is closed, or being reset."""
        self.open.pop(connection, None)

    async def sweep_forever(self, connections: set[Any]) -> None:
        """Every :data:`SWEEP_EVERY` seconds, drop connections past their timeouts."""
        while True:
            await anyio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            for connection in list(connections):
                if isinstance(connection, _Protocol):
                    connection.check(now, self.limits)

    @contextmanager
    def accept_errors(self) -> Iterator[None]:
        """Hear asyncio's accept failures on this server's socket (it retries by itself)."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            sock = context.get("socket")  # asyncio's TransportSocket around ours
            ours = sock is not None and sock.fileno() == self._sock.fileno()
            if ours and "accept" in context.get("message", ""):
                self.accept_failed_at = time.monotonic()
                if not self.accept_failing:
                    self.accept_failing = True
                    self._on_accept(f"accepting connections failed: {context.get('exception')}")
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)
        try:
            yield
        finally:
            if loop.get_exception_handler() is handler:
                loop.set_exception_handler(previous)


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol, with a connection cap, a request-head timeout, a write timeout."""

    watch: ClassVar[_Watch]

    idle_since: float = 0.0
    _stalled_since: float | None = None
    _buffered: int = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Count the connection against the cap, and start its request-head clock."""
        super().connection_made(transport)  # type: ignore[arg-type]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with suppress(OSError):
                # asyncio sets TCP_NODELAY only on sockets whose protocol number says TCP, and
                # one accepted from socket.create_server's says 0: without it an answer's
                # head and body meet Nagle and delayed ACKs (40 ms a request)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                # the kernel's share of a stalled peer's backlog, bounded
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.idle_since = time.monotonic()
        self.watch.admit(self)

    def on_response_complete(self) -> None:
        """The answer is queued: the next request head's clock starts."""
        self.idle_since = time.monotonic()
        self.watch.rested(self)
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Closed: no longer counted against the cap."""
        self.watch.forget(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse; a request's task starts here and knows its connection (:func:`abort`)."""
        token = _CONNECTION.set(self)
        try:
            super().data_received(data)
        finally:
            _CONNECTION.reset(token)

    @property
    def idle(self) -> bool:
        """No request is being answered."""
        return self.cycle is None or self.cycle.response_complete

    def _drop(self) -> None:
        self.watch.forget(self)
        _reset(self.transport)

    def check(self, now: float, limits: Limits) -> None:
        """Drop the connection if its head, body or peer's reading is overdue."""
        transport = self.transport
        buffered = transport.get_write_buffer_size()
        if buffered == 0 or buffered < self._buffered:
            self._stalled_since = None if buffered == 0 else now
        elif self._stalled_since is None:
            self._stalled_since = now
        self._buffered = buffered
        if self._stalled_since is not None and now - self._stalled_since > limits.write_timeout:
            self._drop()  # the peer does not read: close() would wait for it for ever
        elif (
            self.idle and not transport.is_closing() and now - self.idle_since > limits.head_timeout
        ):
            self._drop()  # no whole request head in time (slowloris)


_NO_LINGER = struct.pack("ii", 1, 0)


def _reset(transport: asyncio.Transport) -> None:
    """Close at once with a reset: the kernel keeps no unsent data (an orphaned socket waiting
    for a peer that never reads would hold its memory for minutes)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):  # already closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    transport.abort()


class RequestGuard:
    """Checks a request before the application sees it, and reads its whole body.

    400 and close for a request with both ``Content-Length`` and ``Transfer-Encoding`` (h11
    takes the chunked framing and would go on to serve what follows the body: a smuggled
    request, RFC 9112 §6.1 says close) and for a target that is not a path (``GET http://[/x``);
    431 for headers over ``max_header`` bytes (h11's own limit only applies to a head that
    arrives in pieces); 413 for a body over ``max_body`` bytes; 408 when the body does not
    arrive within ``timeout``. Every refusal closes the connection.
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse, or buffer the body and call the application with it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _plain(send, *refusal)
            return
        body = bytearray()
        with anyio.move_on_after(self.limits.head_timeout) as waited:
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.limits.max_body:
                    await _plain(send, 413, f"body larger than {self.limits.max_body} bytes\n")
                    return
        if waited.cancelled_caught:
            await _plain(send, 408, "request body not received in time\n")
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        names = {name for name, _ in headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            return 400, "both Content-Length and Transfer-Encoding\n"
        if not scope.get("raw_path", b"/").startswith(b"/"):
            return 400, "the request target must be a path\n"
        if sum(len(name) + len(value) + 4 for name, value in headers) > self.limits.max_header:
            return 431, "request headers too large\n"
        declared = dict(headers).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limits.max_body:
            return 413, f"body larger than {self.limits.max_body} bytes\n"
        return None


def abort() -> None:
    """Close the connection of the request being handled at once, answering nothing (the
    simulator's injected faults). The caller then awaits ``receive()``: ``http.disconnect``."""
    connection = _CONNECTION.get()
    if connection is None:
        raise RuntimeError("abort() outside a request served by coalmine.server.http")
    connection.transport.abort()


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # http.disconnect, when it comes

    return replay


async def _plain(send: Send, status: int, text: str) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def json_or_none(body: bytes) -> tuple[bool, Any]:
    """(True, value) when the body is JSON, else (False, None): never raises, however deep."""
    try:
        return True, json.loads(body or b"null")
    except (ValueError, RecursionError):
        return False, None
