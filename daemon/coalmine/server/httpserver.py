"""A small HTTP/1.1 server on anyio and h11, for coalmine's endpoints and the simulator.

One handler coroutine per request, keep-alive, a body size limit (413), a read timeout, and a
500 (never a traceback on the wire) when a handler raises. Bound to whatever the caller says;
coalmine's default is loopback.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import h11
from anyio.abc import SocketStream, TaskStatus

MAX_BODY = 64 * 1024
READ_TIMEOUT = 30.0


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
        return json.loads(self.body or b"null")


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


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
    max_body: int = MAX_BODY,
    on_error: OnError | None = None,
) -> None:
    """Serve until cancelled; reports the bound port through ``task_status`` (0 picks one)."""

    async def connection(stream: SocketStream) -> None:
        async with stream:
            await _serve_connection(stream, handler, max_body, on_error)

    listener = await anyio.create_tcp_listener(local_host=host, local_port=port, reuse_port=False)
    async with listener:
        task_status.started(listener.extra(anyio.abc.SocketAttribute.local_port))
        await listener.serve(connection)


async def _serve_connection(
    stream: SocketStream, handler: Handler, max_body: int, on_error: OnError | None
) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    while True:
        try:
            request = await _read_request(stream, conn, max_body)
        except _Reject as reject:
            await _send(stream, conn, Response.text(reject.status, reject.message), close=True)
            return
        except (
            h11.RemoteProtocolError,
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            OSError,
            TimeoutError,
        ):
            return
        if request is None:
            return
        try:
            response = await handler(request)
        except Exception as exc:  # the handler's bug must not kill the server
            if on_error:
                on_error(request, exc)
            response = Response.text(500, "internal error\n")
        try:
            await _send(stream, conn, response, close=False)
        except (anyio.BrokenResourceError, OSError, h11.LocalProtocolError):
            return
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


class _Reject(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status, self.message = status, message


async def _read_request(
    stream: SocketStream, conn: h11.Connection, max_body: int
) -> Request | None:
    head: h11.Request | None = None
    body = bytearray()
    with anyio.fail_after(READ_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive(65536)
                except anyio.EndOfStream:
                    data = b""
                conn.receive_data(data)
                if not data and head is None and conn.their_state is h11.IDLE:
                    return None
                continue
            if isinstance(event, h11.Request):
                head = event
                length = dict(event.headers).get(b"content-length")
                if length is not None and length.isdigit() and int(length) > max_body:
                    raise _Reject(413, f"body larger than {max_body} bytes\n")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    raise _Reject(413, f"body larger than {max_body} bytes\n")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                headers = {
                    k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers
                }
                return Request(
                    head.method.decode(), head.target.decode("latin-1"), headers, bytes(body)
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None


async def _send(
    stream: SocketStream, conn: h11.Connection, response: Response, *, close: bool
) -> None:
    headers = [(k.encode(), v.encode()) for k, v in response.headers]
    headers.append((b"content-length", str(len(response.body)).encode()))
    if close:
        headers.append((b"connection", b"close"))
    await stream.send(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")
    if response.body:
        await stream.send(conn.send(h11.Data(data=response.body)) or b"")
    await stream.send(conn.send(h11.EndOfMessage()) or b"")
