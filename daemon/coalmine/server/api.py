"""coalmine's HTTP endpoints: /metrics, /health, /healthz, /readyz and the admin API.

Writes (``POST /api/v1/rollouts/{script}/{command}``) need ``Authorization: Bearer`` with
``COALMINE_ADMIN_TOKEN``, compared in constant time; with no token configured every write is
refused. Reads are open: bind to loopback (the default) or put coalmine behind your network
policy.

Requests are routed through one table of ``(method, path template)``; the OpenAPI document in
:mod:`coalmine.server.openapi` (served at ``/api/v1/openapi.json``) describes exactly that table. A
known path with another method is 405 with ``Allow``; GET routes answer HEAD too.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, get_args
from urllib.parse import unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coalmine import __version__
from coalmine.daemon import CommandFailed, CommandQueued, ScriptLoop
from coalmine.engine import Command
from coalmine.engine.model import CommandKind, encode_float
from coalmine.server import page
from coalmine.server.health import Health
from coalmine.server.httpserver import Request, Response
from coalmine.server.metrics import Metrics
from coalmine.server.openapi import OPENAPI_PATH, openapi_document

COMMANDS: tuple[CommandKind, ...] = get_args(CommandKind)
PREFIX = "/api/v1/rollouts"

Params = dict[str, str]
RouteHandler = Callable[[Request, Params], Awaitable[Response]]


class Api:
    """Routes requests to the daemon's state."""

    def __init__(
        self,
        loops: dict[str, ScriptLoop],
        metrics: Metrics,
        health: Health,
        admin_token: str | None,
        backlog: Callable[[], int],
    ) -> None:
        self._loops = loops
        self._metrics = metrics
        self._health = health
        self._token = admin_token.encode() if admin_token else None
        self._backlog = backlog
        self._openapi = _json(200, openapi_document())
        self.ready = False
        self._routes: dict[str, tuple[str, RouteHandler]] = {
            "/metrics": ("GET", self._get_metrics),
            "/health": ("GET", self._get_health),
            "/healthz": ("GET", self._get_healthz),
            "/readyz": ("GET", self._get_readyz),
            OPENAPI_PATH: ("GET", self._get_openapi),
            PREFIX: ("GET", self._get_rollouts),
            PREFIX + "/{script}": ("GET", self._get_rollout),
            **{
                f"{PREFIX}/{{script}}/{kind}": ("POST", partial(self._post_command, kind=kind))
                for kind in COMMANDS
            },
        }

    @property
    def routes(self) -> list[tuple[str, str]]:
        """Every ``(method, path template)`` served, templates in OpenAPI's ``{name}`` form."""
        return [(method, template) for template, (method, _) in self._routes.items()]

    async def __call__(self, request: Request) -> Response:
        """Handle one request."""
        segments = _segments(request.path)
        if not segments and request.method in ("GET", "HEAD"):
            return self._get_page()
        for template, (method, handler) in self._routes.items():
            params = _match(template, segments)
            if params is None:
                continue
            allowed = (method, "HEAD") if method == "GET" else (method,)
            if request.method not in allowed:
                return _json(405, {"error": "method not allowed"}, [("allow", ", ".join(allowed))])
            return await handler(request, params)
        if len(segments) == 5 and "/" + "/".join(segments[:3]) == PREFIX:
            return _json(
                404, {"error": f"unknown command {segments[4]!r}; one of {', '.join(COMMANDS)}"}
            )
        return _json(404, {"error": "not found"})

    def _get_page(self) -> Response:
        """The read-only status page (no token: it shows what the open GET routes show)."""
        rollouts = [loop.describe() for loop in self._loops.values()]
        history = {
            s: {n: list(v) for n, v in loop.history.items()} for s, loop in self._loops.items()
        }
        now = max((loop.now() for loop in self._loops.values()), default=datetime.now(UTC))
        html = page.render(_finite(rollouts), history, now)
        return Response(
            200,
            html.encode(),
            [
                ("content-type", "text/html; charset=utf-8"),
                ("content-security-policy", page.POLICY),
            ],
        )

    async def _get_metrics(self, request: Request, params: Params) -> Response:
        self._metrics.outbox_backlog.set(self._backlog())
        return Response(
            200, generate_latest(self._metrics.registry), [("content-type", CONTENT_TYPE_LATEST)]
        )

    async def _get_healthz(self, request: Request, params: Params) -> Response:
        return Response.text(200, "ok\n")

    async def _get_readyz(self, request: Request, params: Params) -> Response:
        return Response.text(200, "ready\n") if self.ready else Response.text(503, "starting\n")

    async def _get_openapi(self, request: Request, params: Params) -> Response:
        return self._openapi

    async def _get_health(self, request: Request, params: Params) -> Response:
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
        return _json(503 if status == "unhealthy" else 200, body)

    async def _get_rollouts(self, request: Request, params: Params) -> Response:
        return _json(200, {"rollouts": [loop.describe() for loop in self._loops.values()]})

    async def _get_rollout(self, request: Request, params: Params) -> Response:
        loop = self._loops.get(params["script"])
        if loop is None:
            return _json(404, {"error": f"no such script {params['script']!r}"})
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
                [("www-authenticate", 'Bearer realm="coalmine"')],
            )
        if not hmac.compare_digest(credential.strip().encode(), self._token):
            return _json(403, {"error": "wrong token"})
        return None

    async def _post_command(self, request: Request, params: Params, kind: CommandKind) -> Response:
        refused = self._authorized(request)
        if refused is not None:
            return refused
        script = params["script"]
        loop = self._loops.get(script)
        if loop is None:
            return _json(404, {"error": f"no such script {script!r}"})
        version = None
        body: Any = {}
        if kind == "start" or request.body:
            try:
                body = request.json()
            except ValueError:
                body = ""
            if not isinstance(body, dict):
                return _json(400, {"error": 'the body must be a JSON object: {"reason": "..."}'})
        if kind == "start":
            version = body.get("version")
            if not isinstance(version, str) or not version:
                return _json(400, {"error": 'start needs {"version": "<version id>"}'})
        reason = body.get("reason")
        if "reason" in body and not isinstance(reason, str):
            return _json(400, {"error": '"reason" must be a string'})
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


def _segments(path: str) -> list[str]:
    """The path's segments, percent-decoded one by one (``%2F`` stays inside its segment)."""
    if not path.startswith("/"):
        return ["\0"]  # matches no template
    return [unquote(s) for s in path.rstrip("/").split("/")[1:]]


def _match(template: str, segments: list[str]) -> Params | None:
    parts = template.split("/")[1:]
    if len(parts) != len(segments):
        return None
    params: Params = {}
    for part, segment in zip(parts, segments, strict=True):
        if part.startswith("{"):
            params[part[1:-1]] = segment
        elif part != segment:
            return None
    return params


def _json(status: int, value: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    """Strict JSON: a NaN or ±Inf (a rule's value can be one) becomes its string form."""
    return Response.json(status, _finite(value), headers)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return encode_float(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
