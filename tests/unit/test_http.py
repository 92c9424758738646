"""coalmine's HTTP server (uvicorn in our task group) at its edges, and the simulator's adapter."""

from __future__ import annotations

import resource
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from coalmine.server.http import Limits, serve
from coalmine.simulator.service import Request
from coalmine.simulator.service import Response as SimResponse
from coalmine.simulator.service import serve as serve_handler

pytestmark = pytest.mark.anyio

TCP_CLOSE, TCP_CLOSE_WAIT = 7, 8  # Linux tcpi_state values: reset, and FIN received


async def echo(request: Request) -> SimResponse:
    """Echo the request, or fail on /boom."""
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    return SimResponse.json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode(),
        },
    )


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """/big answers 4 MB; anything else answers its path."""
    if scope["path"] == "/big":
        await Response(b"x" * 4_000_000)(scope, receive, send)
        return
    await PlainTextResponse(scope["path"])(scope, receive, send)


@asynccontextmanager
async def serving(
    limits: Limits, on_accept: Callable[[str | None], None] | None = None
) -> AsyncIterator[int]:
    """``app`` served on a free loopback port."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(
                app, "127.0.0.1", 0, task_status=task_status, limits=limits, on_accept=on_accept
            )
        )
        yield port
        tg.cancel_scope.cancel()


def tcp_state(sock: socket.socket) -> int:
    """The socket's TCP state (Linux TCP_INFO), read without touching its receive buffer."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


async def closed_by_server(sock: socket.socket, within: float = 10.0) -> bool:
    """Whether the server closes or resets the connection within ``within`` seconds."""
    with anyio.move_on_after(within):
        while tcp_state(sock) not in (TCP_CLOSE, TCP_CLOSE_WAIT):
            await anyio.sleep(0.05)
        return True
    return False


async def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes; everything the server answers until it closes (or ``timeout``)."""
    reply = b""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(data)
        with anyio.move_on_after(timeout):
            try:
                while True:
                    reply += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                pass
    return reply


async def test_serves_requests_with_keep_alive_and_reports_the_port() -> None:
    """A request gets the handler's answer; several share one connection; port 0 picks one."""
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve_handler(
                echo,
                "127.0.0.1",
                0,
                task_status=task_status,
                on_error=lambda r, e: errors.append(e),
            )
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            first = await client.post("/a/b?x=1&x=2", content=b"hello")
            second = await client.get("/c")
            boom = await client.get("/boom")
            after = await client.get("/d")
        tg.cancel_scope.cancel()
    assert first.json() == {
        "method": "POST",
        "path": "/a/b",
        "query": {"x": ["1", "2"]},
        "body": "hello",
    }
    assert second.json()["path"] == "/c"
    assert (boom.status_code, boom.text) == (500, "internal error\n")
    assert "handler bug" not in boom.text
    assert [str(e) for e in errors] == ["handler bug"]
    assert after.status_code == 200


async def test_oversized_bodies_are_413_declared_or_chunked() -> None:
    """A body over the limit is 413, whether its length is declared or it comes chunked."""
    async with serving(Limits(max_body=10)) as port, httpx.AsyncClient() as client:
        declared = await client.post(f"http://127.0.0.1:{port}/x", content=b"x" * 11)
        chunked = await client.post(f"http://127.0.0.1:{port}/x", content=_chunks(b"x" * 6, 2))
        fits = await client.post(f"http://127.0.0.1:{port}/x", content=b"x" * 10)
    assert (declared.status_code, chunked.status_code, fits.status_code) == (413, 413, 200)


async def test_garbage_does_not_kill_the_server() -> None:
    """A client speaking nonsense gets a 400 and is dropped; the next client is served."""
    async with serving(Limits()) as port:
        reply = await exchange(port, b"\x00\x01 NOT HTTP\r\n\r\n")
        async with httpx.AsyncClient() as client:
            ok = await client.get(f"http://127.0.0.1:{port}/still-up")
    assert ok.status_code == 200
    assert reply.startswith(b"HTTP/1.1 400")


async def test_content_length_with_transfer_encoding_is_400_and_closes() -> None:
    """CL+TE is 400 with the connection closed: the request smuggled after the body is never served."""
    smuggle = (
        b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    async with serving(Limits()) as port:
        reply = await exchange(port, smuggle)
    assert reply.startswith(b"HTTP/1.1 400")
    assert reply.count(b"HTTP/1.1") == 1
    assert b"/smuggled" not in reply


@pytest.mark.parametrize(
    "target", [b"http://[/healthz", b"*", b"healthz", b"//[::1", b"/%ZZ", b"/\xff\xfe"]
)
async def test_malformed_targets_are_4xx(target: bytes) -> None:
    """A request target that is no path, or not well encoded, is answered 4xx, never 500."""
    async with serving(Limits()) as port:
        reply = await exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", 2)
    assert reply[:10] == b"HTTP/1.1 4" or reply.startswith(b"HTTP/1.1 200"), reply[:40]
    assert b" 500 " not in reply[:20]


async def test_oversized_headers_are_refused() -> None:
    """A 1 MB header is refused (400 or 431) or the connection dropped; never served."""
    async with serving(Limits()) as port:
        reply = await exchange(
            port, b"GET /a HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 1_000_000 + b"\r\n\r\n"
        )
        small = await exchange(
            port, b"GET /a HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 50_000 + b"\r\n\r\n"
        )
    assert reply == b"" or reply[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 431")
    assert small.startswith(b"HTTP/1.1 431")


async def test_a_slowloris_head_is_dropped() -> None:
    """A request head trickled byte by byte is dropped after head_timeout, though bytes keep coming."""
    async with serving(Limits(head_timeout=1.0)) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\n")
            dropped = False
            with anyio.move_on_after(10):
                while tcp_state(sock) not in (TCP_CLOSE, TCP_CLOSE_WAIT):
                    try:
                        sock.sendall(b"X-a: b\r\n")
                    except OSError:
                        break
                    await anyio.sleep(0.1)
                dropped = True
    assert dropped


async def test_a_client_that_never_reads_is_dropped() -> None:
    """A peer that takes no bytes of a 4 MB answer for write_timeout is reset, not kept for ever."""
    async with serving(Limits(write_timeout=1.0)) as port:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", port))
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await closed_by_server(sock)


async def test_past_the_cap_the_longest_idle_connection_goes() -> None:
    """At the connection cap a new client is served and the longest-idle connection is closed."""
    async with serving(Limits(max_connections=5)) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(f"http://127.0.0.1:{port}/probe")
            assert response.status_code == 200
            assert await closed_by_server(idle[0])
            assert tcp_state(idle[-1]) not in (TCP_CLOSE, TCP_CLOSE_WAIT)
        finally:
            for sock in idle:
                sock.close()


async def test_accept_errors_degrade_and_recover() -> None:
    """EMFILE on accept is reported (then its recovery) and never stops the server."""
    heard: list[str | None] = []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with serving(Limits(max_connections=10_000), heard.append) as port:
        clients: list[socket.socket] = []
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (_open_fds() + 40, hard))
            try:
                while True:  # fill the fd table before the server gets to accept
                    clients.append(socket.create_connection(("127.0.0.1", port)))
            except OSError:
                pass
            with anyio.fail_after(10):
                while not heard:
                    await anyio.sleep(0.02)
        finally:
            for sock in clients:
                sock.close()
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 10
            response = await client.get(f"http://127.0.0.1:{port}/after")
            while None not in heard and time.monotonic() < deadline:
                await anyio.sleep(0.02)
    assert response.status_code == 200
    assert heard[0] is not None and "Too many open files" in heard[0]
    assert heard[-1] is None


async def _chunks(chunk: bytes, times: int) -> AsyncIterator[bytes]:
    for _ in range(times):
        yield chunk


def _open_fds() -> int:
    import os

    return len(os.listdir("/proc/self/fd"))


async def test_answers_are_not_held_back_by_nagle() -> None:
    """Accepted sockets have TCP_NODELAY (asyncio skips it for sockets from create_server)."""
    from coalmine.server import http

    seen: list[int] = []

    async def nodelay(scope: Scope, receive: Receive, send: Send) -> None:
        connection = http._CONNECTION.get()
        assert connection is not None
        sock = connection.transport.get_extra_info("socket")
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        await PlainTextResponse("ok")(scope, receive, send)

    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(nodelay, "127.0.0.1", 0, task_status=task_status)
        )
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/")).status_code == 200
        tg.cancel_scope.cancel()
    assert seen == [1]
