"""coalmine's HTTP endpoints: /metrics, /health, /healthz, /readyz and the admin API.

Writes (``POST /api/v1/rollouts/{script}/{command}``) need ``Authorization: Bearer`` with
``COALMINE_ADMIN_TOKEN``, compared in constant time; with no token configured every write is
refused. Reads are open: bind to loopback (the default) or put coalmine behind your network
policy.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, get_args

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coalmine import __version__
from coalmine.daemon import CommandFailed, CommandQueued, ScriptLoop
from coalmine.engine import Command
from coalmine.engine.model import CommandKind
from coalmine.health import Health
from coalmine.httpserver import Request, Response
from coalmine.metrics import Metrics

COMMANDS = get_args(CommandKind)
PREFIX = "/api/v1/rollouts"


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
        self.ready = False

    async def __call__(self, request: Request) -> Response:
        """Handle one request."""
        path = request.path.rstrip("/") or "/"
        if request.method == "POST" and path.startswith(PREFIX + "/"):
            return await self._command(request, path)
        if request.method not in ("GET", "HEAD"):
            return Response.json(405, {"error": "method not allowed"}, [("allow", "GET")])
        if path == "/metrics":
            self._metrics.outbox_backlog.set(self._backlog())
            return Response(
                200,
                generate_latest(self._metrics.registry),
                [("content-type", CONTENT_TYPE_LATEST)],
            )
        if path == "/healthz":
            return Response.text(200, "ok\n")
        if path == "/readyz":
            return Response.text(200, "ready\n") if self.ready else Response.text(503, "starting\n")
        if path == "/health":
            return self._health_response()
        if path == PREFIX:
            return Response.json(
                200, {"rollouts": [loop.describe() for loop in self._loops.values()]}
            )
        if path.startswith(PREFIX + "/"):
            loop = self._loops.get(path.removeprefix(PREFIX + "/"))
            if loop is None:
                return Response.json(404, {"error": "no such script"})
            return Response.json(200, loop.describe())
        return Response.json(404, {"error": "not found"})

    def _health_response(self) -> Response:
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
        return Response.json(503 if status == "unhealthy" else 200, body)

    def _authorized(self, request: Request) -> Response | None:
        if self._token is None:
            return Response.json(
                403, {"error": "writes are disabled: set COALMINE_ADMIN_TOKEN to enable them"}
            )
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return Response.json(
                401,
                {"error": "missing bearer token"},
                [("www-authenticate", 'Bearer realm="coalmine"')],
            )
        if not hmac.compare_digest(credential.strip().encode(), self._token):
            return Response.json(403, {"error": "wrong token"})
        return None

    async def _command(self, request: Request, path: str) -> Response:
        refused = self._authorized(request)
        if refused is not None:
            return refused
        script, _, kind = path.removeprefix(PREFIX + "/").rpartition("/")
        loop = self._loops.get(script)
        if loop is None:
            return Response.json(404, {"error": f"no such script {script!r}"})
        if kind not in COMMANDS:
            return Response.json(
                404, {"error": f"unknown command {kind!r}; one of {', '.join(COMMANDS)}"}
            )
        version = None
        if kind == "start":
            try:
                body: Any = request.json()
            except ValueError:
                return Response.json(400, {"error": 'body must be JSON: {"version": "..."}'})
            version = body.get("version") if isinstance(body, dict) else None
            if not isinstance(version, str) or not version:
                return Response.json(400, {"error": 'start needs {"version": "<version id>"}'})
        try:
            decisions = await loop.submit(Command(kind, version))  # type: ignore[arg-type]
        except CommandFailed as exc:
            return Response.json(503, {"error": f"not applied: {exc}; try again"})
        except CommandQueued as exc:
            return Response.json(202, {"script": script, "command": kind, "queued": str(exc)})
        refused_by_engine = bool(decisions) and all(d.action == "warn" for d in decisions)
        body_out = {
            "script": script,
            "command": kind,
            "decisions": [d.to_dict() for d in decisions],
        }
        return Response.json(409 if refused_by_engine else 200, body_out)
