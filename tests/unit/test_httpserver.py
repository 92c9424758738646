"""The small HTTP server: requests, keep-alive, limits, and a handler's failure."""

from __future__ import annotations

import anyio
import httpx
import pytest

from coalmine.server.httpserver import Request, Response, serve

pytestmark = pytest.mark.anyio


async def echo(request: Request) -> Response:
    """Echo the request, or fail on /boom."""
    if request.path == "/boom":
        raise RuntimeError("handler bug")
    return Response.json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": request.body.decode(),
        },
    )


async def test_serves_requests_with_keep_alive_and_reports_the_port() -> None:
    """A request gets the handler's answer; several share one connection; port 0 picks one."""
    errors: list[BaseException] = []
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(
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


async def test_oversized_body_is_413() -> None:
    """A body over the limit is refused with 413 before the handler runs."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(echo, "127.0.0.1", 0, task_status=task_status, max_body=10)
        )
        async with httpx.AsyncClient() as client:
            response = await client.post(f"http://127.0.0.1:{port}/x", content=b"x" * 11)
        tg.cancel_scope.cancel()
    assert response.status_code == 413


async def test_garbage_does_not_kill_the_server() -> None:
    """A client speaking nonsense is dropped; the next client is served."""
    async with anyio.create_task_group() as tg:
        port = await tg.start(
            lambda task_status: serve(echo, "127.0.0.1", 0, task_status=task_status)
        )
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"\x00\x01 NOT HTTP\r\n\r\n")
            reply = b""
            with anyio.move_on_after(5):
                try:
                    while True:
                        reply += await stream.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass
        async with httpx.AsyncClient() as client:
            ok = await client.get(f"http://127.0.0.1:{port}/still-up")
        tg.cancel_scope.cancel()
    assert ok.status_code == 200
    assert b"200" not in reply[:12]
