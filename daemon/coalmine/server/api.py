"""coalmine's HTTP endpoints: the status page at /, /metrics, /health, /healthz, /readyz and the
admin API.

Writes (``POST /api/v1/rollouts/{script}/{command}``) need ``Authorization: Bearer`` with
``COALMINE_ADMIN_TOKEN``, compared in constant time; with no token configured every write is
refused. Reads are open: bind to loopback (the default) or put coalmine behind your network
policy.

Served by Starlette (:mod:`coalmine.server.http` runs it under uvicorn). Routes are one table
of ``(method, path template, endpoint)`` in :meth:`Api.__init__`: add a line to serve another
page. The OpenAPI document in :mod:`coalmine.server.openapi` (served at
``/api/v1/openapi.json``) describes exactly that table. A known path with another method is 405
with ``Allow``; GET routes answer HEAD too. Path parameters are matched on the raw path and
percent-decoded one by one, so ``%2F`` stays inside its segment.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, get_args
from urllib.parse import unquote

from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from coalmine import __version__
from coalmine.daemon import CommandFailed, CommandQueued, ScriptLoop
from coalmine.engine import Command
from coalmine.engine.model import CommandKind, encode_float
from coalmine.server import page
from coalmine.server.health import Health
from coalmine.server.http import json_or_none
from coalmine.server.metrics import Metrics
from coalmine.server.openapi import OPENAPI_PATH, openapi_document

COMMANDS: tuple[CommandKind, ...] = get_args(CommandKind)
PREFIX = "/api/v1/rollouts"

Endpoint = Callable[[Request], Awaitable[Response]] | ASGIApp


class Api:
    """Routes requests to the daemon's state; an ASGI application."""

    def __init__(
        self,
        loops: dict[str, ScriptLoop],
        metrics: Metrics,
        health: Health,
        admin_token: str | None,
        backlog: Callable[[], int],
        *,
        budget: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self._loops = loops
        self._metrics = metrics
        self._health = health
        self._token = admin_token.encode() if admin_token else None
        self._backlog = backlog
        self._budget = budget
        self._openapi = _json(200, openapi_document())
        self.ready = False
        self._table: list[tuple[str, str, Endpoint]] = [
            ("GET", "/metrics", _Exposition(metrics, backlog)),
            ("GET", "/health", self._get_health),
            ("GET", "/healthz", self._get_healthz),
            ("GET", "/readyz", self._get_readyz),
            ("GET", OPENAPI_PATH, self._get_openapi),
            ("GET", PREFIX, self._get_rollouts),
            ("GET", PREFIX + "/{script}", self._get_rollout),
            *(
                ("POST", f"{PREFIX}/{{script}}/{kind}", partial(self._post_command, kind=kind))
                for kind in COMMANDS
            ),
        ]
        routes: list[BaseRoute] = [
            Route(template, endpoint, methods=[method])
            for method, template, endpoint in self._table
        ]
        routes.append(Route("/", self._get_page, methods=["GET"]))  # HTML, not in the OpenAPI
        self._app = Starlette(
            routes=routes,
            exception_handlers={404: _not_found, 405: _not_allowed},
        )

    @property
    def routes(self) -> list[tuple[str, str]]:
        """Every ``(method, path template)`` served, templates in OpenAPI's ``{name}`` form."""
        return [(method, template) for method, template, _ in self._table]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one request (ASGI), routed on its raw path."""
        if scope["type"] == "http":
            scope = {**scope, "path": _route_path(scope)}
        await self._app(scope, receive, send)

    async def _get_page(self, request: Request) -> Response:
        """The read-only status page (no token: it shows what the open GET routes show)."""
        rollouts = [loop.describe() for loop in self._loops.values()]
        history = {
            s: {n: list(v) for n, v in loop.history.items()} for s, loop in self._loops.items()
        }
        now = max((loop.now() for loop in self._loops.values()), default=datetime.now(UTC))
        html = page.render(_finite(rollouts), history, now)
        return HTMLResponse(html, headers={"content-security-policy": page.POLICY})

    async def _get_healthz(self, request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def _get_readyz(self, request: Request) -> Response:
        if not self.ready:
            return PlainTextResponse("starting\n", status_code=503)
        why = self._health.not_ready
        if why is not None:
            return PlainTextResponse(why + "\n", status_code=503)
        return PlainTextResponse("ready\n")

    async def _get_openapi(self, request: Request) -> Response:
        return self._openapi

    async def _get_health(self, request: Request) -> Response:
        status = self._health.status
        body = {
            "status": status,
            "version": __version__,
            "checks": self._health.snapshot(),
            "rollouts": [
                {
                    "script": s,
                    "phase": loop.state.phase.value,
                    "canary": loop.state.canary,
                    "canary_percent": loop.state.canary_percent,
                }
                for s, loop in self._loops.items()
            ],
            "outbox_backlog": self._backlog(),
        }
        if (plan := self._budget()) is not None:
            body["budget_plan"] = plan
        return _json(503 if status == "unhealthy" else 200, body)

    async def _get_rollouts(self, request: Request) -> Response:
        return _json(200, {"rollouts": [loop.describe() for loop in self._loops.values()]})

    async def _get_rollout(self, request: Request) -> Response:
        script = _param(request, "script")
        loop = self._loops.get(script)
        if loop is None:
            return _json(404, {"error": f"no such script {script!r}"})
        return _json(200, loop.describe())

    def _authorized(self, request: Request) -> Response | None:
        if self._token is None:
            return _json(
                403, {"error": "writes are disabled: set COALMINE_ADMIN_TOKEN to enable them"}
            )
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return _json(
                401,
                {"error": "missing bearer token"},
                {"www-authenticate": 'Bearer realm="coalmine"'},
            )
        if not hmac.compare_digest(credential.strip().encode(), self._token):
            return _json(403, {"error": "wrong token"})
        return None

    async def _post_command(self, request: Request, kind: CommandKind) -> Response:
        refused = self._authorized(request)
        if refused is not None:
            return refused
        script = _param(request, "script")
        loop = self._loops.get(script)
        if loop is None:
            return _json(404, {"error": f"no such script {script!r}"})
        version = None
        body: Any = {}
        raw = await request.body()
        if kind == "start" or raw:
            parsed, body = json_or_none(raw)
            if not parsed or not isinstance(body, dict):
                return _json(400, {"error": 'the body must be a JSON object: {"reason": "..."}'})
        if kind == "start":
            version = body.get("version")
            if not isinstance(version, str) or not version:
                return _json(400, {"error": 'start needs {"version": "<version id>"}'})
        reason = body.get("reason")
        if "reason" in body and not isinstance(reason, str):
            return _json(400, {"error": '"reason" must be a string'})
        if version is not None and (problem := await loop.version_problem(version)):
            return _json(problem[0], {"error": problem[1]})
        actor = request.headers.get("x-coalmine-actor", "").strip()[:100] or None
        try:
            decisions = await loop.submit(
                Command(kind, version, requested_by=actor, reason=reason and reason[:500])
            )
        except CommandFailed as exc:
            return _json(503, {"error": f"not applied: {exc}; try again"})
        except CommandQueued as exc:
            return _json(202, {"script": script, "command": kind, "queued": str(exc)})
        refused_by_engine = bool(decisions) and all(d.action == "warn" for d in decisions)
        body_out = {
            "script": script,
            "command": kind,
            "decisions": [d.to_dict() for d in decisions],
        }
        return _json(409 if refused_by_engine else 200, body_out)


class _Exposition:
    """prometheus-client's own ASGI exposition, with the outbox backlog read first."""

    def __init__(self, metrics: Metrics, backlog: Callable[[], int]) -> None:
        self._metrics = metrics
        self._backlog = backlog
        self._app = make_asgi_app(metrics.registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._metrics.outbox_backlog.set(self._backlog())
        await self._app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The raw path, undecoded (its parameters are decoded by :func:`_param`), trailing ``/``
    dropped; a target that is not a path matches nothing."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    path = raw.decode("latin-1")
    if not path.startswith("/"):
        return "/\0"
    return path.rstrip("/") or "/"


def _param(request: Request, name: str) -> str:
    return unquote(str(request.path_params[name]), errors="replace")


async def _not_found(request: Request, exc: Exception) -> Response:
    segments = request.scope["path"].split("/")[1:]
    if len(segments) == 5 and "/" + "/".join(segments[:3]) == PREFIX:
        command = unquote(segments[4], errors="replace")
        return _json(404, {"error": f"unknown command {command!r}; one of {', '.join(COMMANDS)}"})
    return _json(404, {"error": "not found"})


async def _not_allowed(request: Request, exc: Exception) -> Response:
    headers = exc.headers if isinstance(exc, HTTPException) else None
    allowed = sorted(m.strip() for m in (headers or {}).get("Allow", "").split(","))
    return _json(405, {"error": "method not allowed"}, {"allow": ", ".join(allowed)})


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    """Strict JSON: a NaN or ±Inf (a rule's value can be one) becomes its string form."""
    return JSONResponse(_finite(value), status, headers)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return encode_float(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
