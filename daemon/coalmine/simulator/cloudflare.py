"""The Cloudflare API under ``/client/v4``: Workers deployments and versions, and GraphQL.

Built field by field from reference/cloudflare-api.md and the OpenAPI extract beside it:

- ``GET  /accounts/{a}/workers/scripts/{s}/deployments`` → ``result.deployments``, newest
  first (the first serves traffic); ``since``/``until``/``page``/``per_page`` honoured.
- ``GET  …/deployments/{id}``, ``DELETE …/deployments/{id}`` (not the active one).
- ``POST …/deployments[?force=true]`` validated as the reference says (see :func:`_validate`);
  the server adds ``workers/triggered_by``.
- ``GET  …/versions[?deployable=true]`` → ``result.items`` newest first (deployable: the last
  100 uploads); ``GET …/versions/{id}`` → the full item with ``resources``.
- ``POST /graphql`` (:mod:`coalmine.simulator.graphql`).

Every answer uses the ``{success, errors, messages, result}`` envelope. ``Authorization:
Bearer`` is checked (missing: 401, wrong: 403, code 10000); a sliding window per token enforces
the shared budget (1,200 requests / 5 min, GraphQL also 300 / 5 min) with 429 and
``retry-after``. Tests change state in-process: :meth:`CloudflareApi.add_script`,
:meth:`~CloudflareApi.upload_version`, :meth:`~CloudflareApi.deploy` (what ``wrangler versions
deploy`` sends), :meth:`~CloudflareApi.deploy_by_hand` (drift) and
:meth:`~CloudflareApi.change_secrets` (rollbacks then need ``force=true``: error 10220).
Codes the reference does not fix (10007, 10021, 7001, 971) are this simulator's choice.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar

from coalmine.simulator import graphql
from coalmine.simulator.deployments import (
    INVALID,
    ApiError,
    Deployment,
    ScriptState,
    Version,
    validate,
)
from coalmine.simulator.service import (
    Request,
    Response,
    Service,
    WindowLimiter,
    json_body,
    retry_after,
)
from coalmine.simulator.traffic import Behaviour, Clock, World

AUTH_ERROR = 10000
NOT_FOUND = 10007
NO_ROUTE = 7003
METHOD_NOT_ALLOWED = 7001
RATE_LIMITED = 971

_SCRIPT = r"^/client/v4/accounts/(?P<account>[^/]+)/workers/scripts/(?P<script>[^/]+)"
_ROUTES = [
    ("deployments", re.compile(_SCRIPT + r"/deployments/?$")),
    ("deployment", re.compile(_SCRIPT + r"/deployments/(?P<id>[^/]+)$")),
    ("versions", re.compile(_SCRIPT + r"/versions/?$")),
    ("version", re.compile(_SCRIPT + r"/versions/(?P<id>[^/]+)$")),
]
_GRAPHQL = "/client/v4/graphql"
T = TypeVar("T")
_METHODS = {
    "deployments": {"GET", "POST"},
    "deployment": {"GET", "DELETE"},
    "versions": {"GET"},
    "version": {"GET"},
}


def envelope(result: Any) -> dict[str, Any]:
    """A successful answer."""
    return {"success": True, "errors": [], "messages": [], "result": result}


def error_envelope(code: int, message: str) -> dict[str, Any]:
    """A failed answer: Cloudflare's error envelope."""
    return {
        "success": False,
        "errors": [{"code": code, "message": message}],
        "messages": [],
        "result": None,
    }


def error_response(
    status: int, code: int, message: str, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    """An HTTP answer carrying the error envelope."""
    return Response.json(status, error_envelope(code, message), list(headers))


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The API budget per token (None: unlimited)."""

    requests: int | None = 1200
    graphql: int | None = 300
    window: timedelta = timedelta(minutes=5)
    # Cloudflare's account-based GraphQL mode: answers say `X-Rate-Limit-Type: account-based`
    # and at most one query a second is admitted
    account_based: bool = False


@dataclass
class _Identity:
    account_id: str
    api_token: str
    token_owner: str = "coalmine@example.com"  # author_email of deployments made over the API
    seed: int = 0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}/cloudflare")

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))


class CloudflareApi(Service):
    """The simulated Cloudflare API for one account and one API token."""

    def __init__(
        self,
        world: World,
        clock: Clock,
        *,
        account_id: str,
        api_token: str,
        seed: int = 0,
        analytics: graphql.AnalyticsLimits | None = None,
        rate_limits: RateLimits | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        super().__init__(clock, host=host)
        self.world = world
        self.analytics = analytics or graphql.AnalyticsLimits()
        # the schema GraphQL requests are validated against (tests may swap in a changed one)
        self.analytics_schema = graphql.default_schema()
        self.rate_limits = rate_limits or RateLimits()
        self._id = _Identity(account_id, api_token, seed=seed)
        self._scripts: dict[str, ScriptState] = {}
        window = self.rate_limits.window
        self.budget = WindowLimiter(clock, self.rate_limits.requests, window)  # per token
        self.graphql_budget = WindowLimiter(clock, self.rate_limits.graphql, window)
        per_second = 1 if self.rate_limits.account_based else None
        self.account_budget = WindowLimiter(clock, per_second, timedelta(seconds=1))

    @property
    def account_id(self) -> str:
        """The account the API serves."""
        return self._id.account_id

    @property
    def api_token(self) -> str:
        """The one token it accepts."""
        return self._id.api_token

    @property
    def url(self) -> str:
        """The API's base URL, ``http://127.0.0.1:PORT/client/v4``."""
        return f"{self.base_url}/client/v4"

    # -- in-process changes (what wrangler, the dashboard and people do) -----------------------

    def add_script(
        self,
        name: str,
        *,
        requests_per_minute: float = 600.0,
        behaviour: Behaviour | None = None,
        version_id: str | None = None,
    ) -> str:
        """A script with one version deployed at 100% (``wrangler deploy``); its version id."""
        if not re.fullmatch(r"[a-z0-9_][a-z0-9-_]*", name):
            raise ValueError(f"{name!r} is not a valid script name ([a-z0-9_][a-z0-9-_]*)")
        if name in self._scripts:
            raise ValueError(f"script {name!r} exists")
        self.world.add_script(name, requests_per_minute)
        self._scripts[name] = ScriptState(name)
        return self.upload_version(name, behaviour, version_id=version_id, deploy=True)

    def upload_version(
        self,
        script: str,
        behaviour: Behaviour | None = None,
        *,
        version_id: str | None = None,
        message: str | None = None,
        deploy: bool = False,
    ) -> str:
        """Upload a version (``wrangler versions upload``); ``deploy`` also sends it all traffic
        (``wrangler deploy``). Returns its id."""
        state = self._state(script)
        if message is not None and len(message) > 50:
            raise ValueError("a version's workers/message is at most 50 characters")
        version = Version(
            id=version_id or self._id.new_id(),
            number=len(state.versions) + 1,
            created_on=self.clock(),
            message=message,
        )
        if state.version(version.id) is not None:
            raise ValueError(f"version {version.id!r} of {script!r} exists")
        self.world.add_version(script, version.id, behaviour or Behaviour())
        state.versions.append(version)
        if deploy:
            self._record(state, [(version.id, 100)], message, "wrangler", "upload")
        return version.id

    def deploy(
        self,
        script: str,
        versions: Mapping[str, float] | Sequence[tuple[str, float]],
        *,
        message: str | None = None,
        source: str = "wrangler",
        author_email: str = "developer@example.com",
        force: bool = False,
    ) -> Deployment:
        """Deploy as ``wrangler versions deploy`` does: the same body, the same validation
        (raises :class:`ApiError`), not through HTTP and not in the request log."""
        pairs = list(versions.items()) if isinstance(versions, Mapping) else list(versions)
        body: dict[str, Any] = {
            "strategy": "percentage",
            "versions": [{"version_id": v, "percentage": p} for v, p in pairs],
        }
        if message is not None:
            body["annotations"] = {"workers/message": message}
        return self._create(self._state(script), body, force, source, author_email)

    def deploy_by_hand(
        self,
        script: str,
        versions: Mapping[str, float] | Sequence[tuple[str, float]],
        *,
        message: str = "changed in the dashboard",
    ) -> Deployment:
        """Someone changes the split in the dashboard: drift, from coalmine's point of view."""
        return self.deploy(
            script, versions, message=message, source="dash", author_email="someone@example.com"
        )

    def change_secrets(self, script: str) -> None:
        """A secret changes now: a rollback (only versions older than the newest one serving) to
        a version uploaded before now is refused with 10220 unless ``force=true``."""
        state = self._state(script)
        state.secrets_changed_after = len(state.versions)

    # -- reading the state ---------------------------------------------------------------------

    def deployments(self, script: str) -> list[Deployment]:
        """The script's deployments, newest (serving) first."""
        return list(reversed(self._state(script).deployments))

    def current(self, script: str) -> Deployment:
        """The deployment serving now."""
        return self._state(script).deployments[-1]

    def versions(self, script: str) -> list[Version]:
        """The script's versions, newest first."""
        return list(reversed(self._state(script).versions))

    def scripts(self) -> list[str]:
        """Every script, in the order added."""
        return list(self._scripts)

    def deployment_posts(self, script: str | None = None) -> list[Any]:
        """The bodies of every deployment POST received (for ``script``, or all), in order."""
        suffix = f"/workers/scripts/{script}/deployments" if script else "/deployments"
        return [
            r.body
            for r in self.requests
            if r.method == "POST" and r.path.rstrip("/").endswith(suffix)
        ]

    # -- HTTP ----------------------------------------------------------------------------------

    async def route(self, request: Request) -> Response:
        """Answer one request as Cloudflare would."""
        token = _bearer(request)
        refused = self._over_budget(request, token)
        if refused is not None:
            return refused
        if token is None:
            return error_response(401, AUTH_ERROR, "Authentication error")
        if token != self.api_token:
            return error_response(403, AUTH_ERROR, "Authentication error")
        if request.path == _GRAPHQL:
            if request.method != "POST":
                return error_response(405, METHOD_NOT_ALLOWED, "Method not allowed")
            _, body = json_body(request)
            answer = graphql.answer(
                self.world,
                body,
                account_id=self.account_id,
                limits=self.analytics,
                schema=self.analytics_schema,
            )
            if self.rate_limits.account_based:
                answer.headers.append(("x-rate-limit-type", "account-based"))
            return answer
        for name, pattern in _ROUTES:
            match = pattern.match(request.path)
            if match:
                return self._dispatch(name, match.groupdict(), request)
        return error_response(404, NO_ROUTE, "No route for the URI")

    def _over_budget(self, request: Request, token: str | None) -> Response | None:
        key = token or "anonymous"
        limiters = [self.budget]
        if request.path == _GRAPHQL:
            limiters += [self.graphql_budget, self.account_budget]
        for limiter in limiters:
            wait = limiter.admit(key)
            if wait is not None:
                return error_response(
                    429,
                    RATE_LIMITED,
                    "Please wait and consider throttling your request speed",
                    [("retry-after", retry_after(wait))],
                )
        return None

    def _dispatch(self, name: str, params: dict[str, str], request: Request) -> Response:
        if request.method not in _METHODS[name]:
            return error_response(405, METHOD_NOT_ALLOWED, "Method not allowed")
        if params["account"] != self.account_id:
            return error_response(403, AUTH_ERROR, "Authentication error")
        state = self._scripts.get(params["script"])
        if state is None:
            return error_response(404, NOT_FOUND, "This Worker does not exist on your account.")
        try:
            result = self._answer(name, request, state, params.get("id"))
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        if name == "deployment" and request.method == "DELETE":
            return Response.json(200, {"success": True, "errors": [], "messages": []})
        return Response.json(200, envelope(result))

    def _answer(self, name: str, request: Request, state: ScriptState, key: str | None) -> Any:
        query = request.query
        if name == "deployments" and request.method == "GET":
            return {"deployments": [d.as_json() for d in _listed(state, query)]}
        if name == "deployments":
            ok, body = json_body(request)
            if not ok:
                raise ApiError(400, INVALID, "request body is not valid JSON")
            force = query.get("force", ["false"])[-1].lower() == "true"
            created = self._create(state, body, force, "api", self._id.token_owner)
            return created.as_json()
        if name == "deployment":
            deployment = state.deployment(key or "")
            if deployment is None:
                raise ApiError(404, NOT_FOUND, f"deployment {key} not found")
            if request.method == "DELETE":
                if deployment is state.deployments[-1]:
                    raise ApiError(400, INVALID, "the active deployment cannot be deleted")
                state.deployments.remove(deployment)
            return deployment.as_json()
        if name == "versions":
            deployable = query.get("deployable", ["false"])[-1].lower() == "true"
            items = state.deployable() if deployable else _paged(state.versions[::-1], query)
            return {"items": [v.item() for v in items]}
        version = state.version(key or "")
        if version is None:
            raise ApiError(404, NOT_FOUND, f"version {key} not found")
        return version.detail()

    def _create(
        self, state: ScriptState, body: Any, force: bool, source: str, author: str
    ) -> Deployment:
        versions, message = validate(state, body, force=force)
        return self._record(state, versions, message, source, state.trigger(versions), author)

    def _record(
        self,
        state: ScriptState,
        versions: list[tuple[str, float]],
        message: str | None,
        source: str,
        trigger: str,
        author: str = "developer@example.com",
    ) -> Deployment:
        deployment = Deployment(
            id=self._id.new_id(),
            created_on=self.clock(),
            source=source,
            versions=versions,
            author_email=author,
            message=message,
            triggered_by=trigger,
        )
        state.deployments.append(deployment)
        self.world.set_split(state.name, {v: float(p) for v, p in versions})
        return deployment

    def _state(self, script: str) -> ScriptState:
        try:
            return self._scripts[script]
        except KeyError:
            raise KeyError(f"unknown script {script!r}") from None


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _listed(state: ScriptState, query: dict[str, list[str]]) -> list[Deployment]:
    newest_first = state.deployments[::-1]
    since, until = _query_time(query, "since"), _query_time(query, "until")
    chosen = [
        d
        for d in newest_first
        if (since is None or d.created_on >= since) and (until is None or d.created_on <= until)
    ]
    return _paged(chosen, query)


def _paged(items: list[T], query: dict[str, list[str]]) -> list[T]:
    try:
        per_page = int(query["per_page"][-1]) if "per_page" in query else None
        page = int(query.get("page", ["1"])[-1])
    except ValueError:
        raise ApiError(400, INVALID, "page and per_page must be integers") from None
    if per_page is None:
        return items
    if per_page < 1 or page < 1:
        raise ApiError(400, INVALID, "page and per_page must be at least 1")
    return items[(page - 1) * per_page : page * per_page]


def _query_time(query: dict[str, list[str]], name: str) -> datetime | None:
    if name not in query:
        return None
    text = query[name][-1]
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, INVALID, f"{name}: {text!r} is not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise ApiError(400, INVALID, f"{name}: {text!r} has no time zone")
    return value
