"""The Cloudflare API: Workers deployments and versions (REST), and GraphQL analytics.

Follows reference/cloudflare-api.md: the ``{success, errors, messages, result}`` envelope,
``result.deployments`` (not ``items``) for deployments, ``result.items`` for versions, errors
inside a 200 for GraphQL, 429 with ``retry-after``. Every REST call passes the REST
:class:`~coalmine.cloudflare.budgets.TokenBucket`, every GraphQL query the GraphQL one (a 429
blocks only the bucket it came from; ``X-Rate-Limit-Type: account-based`` slows GraphQL to one
query a second); every call has a timeout and is retried (bounded, jittered) on 429, 5xx and
network errors. Script names and ids are percent-encoded into every URL. Failures surface as
:class:`CloudflareError`; the token never appears in any message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import anyio
import httpx

from coalmine.cloudflare.budgets import BudgetBlocked, Kind, TokenBucket
from coalmine.engine import Deployment
from coalmine.errors import RemoteError
from coalmine.retry import Retryable, RetryPolicy, with_retries

SECRETS_CHANGED = 10220  # rolling back to a version older than a secret change needs force=true
DEFAULT_GRAPHQL_RATE_LIMIT = 200  # queries per 5 minutes: well under GraphQL's 300
GRAPHQL_MAX_WAIT = 10.0  # seconds a query may wait for its budget; longer: inconclusive now
Observe = Callable[[str, float, str | None], None]


class CloudflareError(RemoteError):
    """A Cloudflare call failed; ``codes`` are the API's error codes, if it sent any."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        codes: Sequence[int] = (),
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.codes = tuple(codes)
        self.detail = detail or message  # Cloudflare's own words, without the request line


class GraphQLAnswerError(CloudflareError):
    """Cloudflare's GraphQL API answered, with errors instead of data (a 200 with ``errors``)."""


@dataclass(frozen=True, slots=True)
class LiveDeployment:
    """A deployment as the API returns it."""

    id: str
    created_on: str
    versions: tuple[tuple[str, float], ...]  # (version_id, percentage)
    message: str | None = None

    def matches(self, versions: Sequence[tuple[str, float]]) -> bool:
        """Whether this deployment serves exactly these versions at these percentages."""
        return sorted((v, round(p, 2)) for v, p in self.versions) == sorted(
            (v, round(p, 2)) for v, p in versions
        )


@dataclass(frozen=True, slots=True)
class Version:
    """An uploaded version: ``number`` rises with each upload."""

    id: str
    number: int
    created_on: str


def to_engine(live: LiveDeployment, versions: dict[str, Version]) -> Deployment:
    """The engine's view of a live deployment: which version is the canary, at what percent.

    Of two versions, the canary is the one uploaded later (higher version number); if either
    version is unknown (older than the last 100 uploads), the one with the smaller share.
    """
    if len(live.versions) == 1:
        return Deployment(live.versions[0][0])
    (a, pa), (b, pb) = live.versions[:2]
    va, vb = versions.get(a), versions.get(b)
    if va is not None and vb is not None and va.number != vb.number:
        canary, share, stable = (a, pa, b) if va.number > vb.number else (b, pb, a)
    else:
        canary, share, stable = (a, pa, b) if pa <= pb else (b, pb, a)
    return Deployment.of(stable, canary, min(99, max(1, round(share))))


class CloudflareClient:
    """REST and GraphQL calls for one account."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        base_url: str,
        account_id: str,
        token: str,
        limiter: TokenBucket,
        graphql_limiter: TokenBucket | None = None,
        timeout: float = 15.0,
        retry: RetryPolicy | None = None,
        observe: Observe | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._account = account_id
        self._headers = {"Authorization": f"Bearer {token}"}
        self._limiter = limiter
        self._graphql_limiter = graphql_limiter or limiter.sibling(DEFAULT_GRAPHQL_RATE_LIMIT)
        self._timeout = timeout
        self._retry = retry or RetryPolicy(attempts=4, base_delay=0.5, max_delay=8.0)
        self._observe = observe
        self._sleep = sleep
        self._rng = rng or random.Random()
        # told of every live deployment read (discovery's record of what coalmine last saw)
        self.on_current: Callable[[str, LiveDeployment | None], None] | None = None

    @property
    def budgets(self) -> dict[str, TokenBucket]:
        """The token buckets by API (``rest``, ``graphql``), for /metrics."""
        return {"rest": self._limiter, "graphql": self._graphql_limiter}

    def _script_url(self, script: str) -> str:
        # percent-encoded: a name like ``x/../../zones`` or ``a?force=true`` must stay one
        # path segment of this account's scripts, never another endpoint or a query string
        account, name = quote(self._account, safe=""), quote(script, safe="")
        return f"{self._base}/accounts/{account}/workers/scripts/{name}"

    async def deployments(self, script: str) -> list[LiveDeployment]:
        """The script's deployments, newest (the one serving traffic) first."""
        result = await self._call("GET", f"{self._script_url(script)}/deployments", kind="read")
        items = result.get("deployments") if isinstance(result, dict) else None
        if not isinstance(items, list):
            raise CloudflareError("malformed deployments answer: no result.deployments list")
        return [_deployment(item) for item in items]

    async def current(self, script: str) -> LiveDeployment | None:
        """The deployment serving traffic now, if any."""
        deployments = await self.deployments(script)
        live = deployments[0] if deployments else None
        if self.on_current is not None:
            self.on_current(script, live)
        return live

    async def versions(self, script: str) -> dict[str, Version]:
        """The deployable versions by id."""
        result = await self._call(
            "GET",
            f"{self._script_url(script)}/versions",
            params={"deployable": "true"},
            kind="read",
        )
        items = result.get("items") if isinstance(result, dict) else None
        if not isinstance(items, list):
            raise CloudflareError("malformed versions answer: no result.items list")
        versions = (_version(item) for item in items)
        return {v.id: v for v in versions if v is not None}

    async def version(self, script: str, version_id: str) -> Version:
        """One version of the script; a version that does not exist raises
        :class:`CloudflareError` with status 404 and Cloudflare's message."""
        url = f"{self._script_url(script)}/versions/{quote(version_id, safe='')}"
        found = _version(await self._call("GET", url, kind="read"))
        if found is None:
            raise CloudflareError("malformed version answer: no result.id")
        return found

    async def deploy(
        self,
        script: str,
        versions: Sequence[tuple[str, float]],
        message: str,
        *,
        rollback: bool = False,
    ) -> LiveDeployment:
        """Create a deployment (a split, a promotion or a rollback); a rollback blocked by
        changed secrets (10220) is retried with ``force=true``."""
        body = {
            "strategy": "percentage",
            "versions": [{"version_id": v, "percentage": _percent(p)} for v, p in versions],
            "annotations": {"workers/message": message[:50]},
        }
        kind: Kind = "rollback" if rollback else "write"
        url = f"{self._script_url(script)}/deployments"
        try:
            result = await self._call("POST", url, json=body, kind=kind)
        except CloudflareError as exc:
            if not (rollback and SECRETS_CHANGED in exc.codes):
                raise
            result = await self._call("POST", url, json=body, params={"force": "true"}, kind=kind)
        return _deployment(result)

    async def graphql(
        self, query: str, variables: dict[str, Any], *, max_wait: float = GRAPHQL_MAX_WAIT
    ) -> dict[str, Any]:
        """Run a GraphQL query; errors inside a 200 raise :class:`CloudflareError`. It waits at
        most ``max_wait`` seconds for its budget (a backtest, which no tick waits on, may wait
        out Cloudflare's block)."""
        body = await self._request(
            "POST",
            f"{self._base}/graphql",
            json={"query": query, "variables": variables},
            kind="read",
            limiter=self._graphql_limiter,
            max_wait=max_wait,
        )
        if not isinstance(body, dict):
            raise CloudflareError("malformed GraphQL answer: not an object")
        errors = body.get("errors")
        if errors:
            first = (
                errors[0]
                if isinstance(errors, list) and errors and isinstance(errors[0], dict)
                else {}
            )
            code = (
                (first.get("extensions") or {}).get("code")
                if isinstance(first.get("extensions"), dict)
                else None
            )
            raise GraphQLAnswerError(
                f"GraphQL error: {str(first.get('message', errors))[:200]}"
                + (f" ({code})" if code else "")
            )
        data = body.get("data")
        if not isinstance(data, dict):
            raise CloudflareError("malformed GraphQL answer: no data")
        return data

    async def _call(self, method: str, url: str, *, kind: Kind, **kwargs: Any) -> Any:
        body = await self._request(method, url, kind=kind, **kwargs)
        if not isinstance(body, dict) or "success" not in body:
            raise CloudflareError("malformed answer: not a Cloudflare envelope")
        if body.get("success") is not True:
            raise _envelope_error(body, None)
        return body.get("result")

    async def _request(
        self,
        method: str,
        url: str,
        *,
        kind: Kind,
        limiter: TokenBucket | None = None,
        max_wait: float | None = None,
        **kwargs: Any,
    ) -> Any:
        # an analytics query does not wait out a long 429 inside a tick (its answer would be
        # stale by then): it is inconclusive now and asked again at the next tick (GraphQL's
        # max_wait); REST calls wait for their budget
        bucket = limiter or self._limiter

        async def attempt() -> Any:
            try:
                await bucket.take(kind, max_wait=max_wait)
            except BudgetBlocked as exc:
                raise CloudflareError(
                    f"{method} {_path(url)}: not sent, {_api(url)} budget spent ({exc})"
                ) from None
            try:
                return await self._attempt(method, url, bucket, **kwargs)
            except Retryable as exc:
                if method == "POST" and kind != "read" and exc.sent:
                    # a write the server may have applied: never repeat it blind; the actuator
                    # reads the live deployment before trying again
                    raise CloudflareError(
                        f"{method} {_path(url)}: {exc.reason} (not retried)"
                    ) from None
                raise

        try:
            return await with_retries(attempt, self._retry, rng=self._rng, sleep=self._sleep)
        except Retryable as exc:
            raise CloudflareError(f"{method} {_path(url)}: {exc.reason}") from None

    async def _attempt(self, method: str, url: str, bucket: TokenBucket, **kwargs: Any) -> Any:
        started = time.perf_counter()
        error: str | None = None
        try:
            response = await self._http.request(
                method, url, headers=self._headers, timeout=self._timeout, **kwargs
            )
        except httpx.TimeoutException as exc:
            error = "timeout"
            sent = not isinstance(exc, httpx.ConnectTimeout)
            raise Retryable(f"timeout after {self._timeout:g}s", sent=sent) from None
        except httpx.TransportError as exc:
            error = "connection"
            sent = not isinstance(exc, httpx.ConnectError)
            raise Retryable(f"connection error: {type(exc).__name__}", sent=sent) from None
        except httpx.HTTPError as exc:  # decoding, redirects: a bad answer
            error = "bad_answer"
            raise CloudflareError(
                f"{method} {_path(url)}: bad HTTP answer ({type(exc).__name__})"
            ) from None
        finally:
            if error and self._observe:
                self._observe(_dependency(url), time.perf_counter() - started, error)
        try:
            body = response.json()
        except ValueError:
            body = None
        if self._observe:
            failure = _failure(response.status_code, body)
            self._observe(_dependency(url), time.perf_counter() - started, failure)
        if bucket is self._graphql_limiter and _account_based(response):
            bucket.at_most_per_second(1.0)  # Cloudflare's account-based GraphQL mode: 1 query/s
        return _judge(response, body, bucket, f"{method} {_path(url)}: ")


def _account_based(response: httpx.Response) -> bool:
    return bool(response.headers.get("x-rate-limit-type", "").lower() == "account-based")


def _judge(response: httpx.Response, body: Any, bucket: TokenBucket, prefix: str) -> Any:
    """The body of a good answer; a bad one raises (:class:`Retryable` when worth retrying)."""
    status = response.status_code
    if status == 429:
        after = _seconds(response.headers.get("retry-after"), default=60.0)
        bucket.block(after)  # the next attempt's take() waits it out, on this API only
        raise Retryable(f"rate limited (429, retry-after {after:g}s)", after=0.0, sent=False)
    if status >= 500:
        raise Retryable(f"HTTP {status}" + _codes_text(body))
    if body is None:
        if status >= 400:
            raise CloudflareError(f"{prefix}HTTP {status}", status=status)
        raise Retryable(f"HTTP {status}: malformed answer (not JSON)")
    if status >= 400:
        raise _envelope_error(body, status, prefix)
    return body


def _failure(status: int, body: Any) -> str | None:
    """The error kind of an answer for /health and /metrics, None for a good one. A 2xx cut
    short (not JSON) or carrying errors (GraphQL's errors inside a 200) failed as surely as a
    5xx did."""
    if status >= 400:
        return f"http_{status}"
    if body is None:
        return "bad_answer"
    if isinstance(body, dict) and (body.get("errors") or body.get("success") is False):
        return "api_error"
    return None


def _api(url: str) -> str:
    return "GraphQL" if url.endswith("/graphql") else "REST"


def _version(item: Any) -> Version | None:
    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
        return None
    raw_meta = item.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    number = item.get("number")
    return Version(
        item["id"],
        int(number) if isinstance(number, int | float) else 0,
        str(meta.get("created_on", "")),
    )


def _dependency(url: str) -> str:
    """Health and metrics name of a call: analytics (GraphQL) apart from the REST API."""
    return "cloudflare_analytics" if url.endswith("/graphql") else "cloudflare"


def _percent(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 2)


def _deployment(item: Any) -> LiveDeployment:
    if not isinstance(item, dict) or not isinstance(item.get("versions"), list):
        raise CloudflareError("malformed deployment: no versions list")
    versions = []
    for v in item["versions"]:
        if (
            not isinstance(v, dict)
            or not isinstance(v.get("version_id"), str)
            or not isinstance(v.get("percentage"), int | float)
        ):
            raise CloudflareError("malformed deployment: bad versions entry")
        versions.append((v["version_id"], float(v["percentage"])))
    if not 1 <= len(versions) <= 2:
        raise CloudflareError(f"malformed deployment: {len(versions)} versions")
    annotations = item.get("annotations") if isinstance(item.get("annotations"), dict) else {}
    message = annotations.get("workers/message") if isinstance(annotations, dict) else None
    return LiveDeployment(
        str(item.get("id", "")), str(item.get("created_on", "")), tuple(versions), message
    )


def _envelope_error(body: Any, status: int | None, prefix: str = "") -> CloudflareError:
    errors = body.get("errors") if isinstance(body, dict) else None
    codes, messages = [], []
    for e in errors if isinstance(errors, list) else []:
        if isinstance(e, dict):
            if isinstance(e.get("code"), int):
                codes.append(e["code"])
            messages.append(f"{e.get('code', '?')}: {str(e.get('message', ''))[:200]}")
    text = "; ".join(messages) or (f"HTTP {status}" if status else "unsuccessful answer")
    return CloudflareError(prefix + text, status=status, codes=codes, detail=text)


def _codes_text(body: Any) -> str:
    error = _envelope_error(body, None) if isinstance(body, dict) else None
    return f" ({error})" if error and error.codes else ""


def _seconds(value: str | None, default: float) -> float:
    try:
        return max(0.0, min(float(value), 300.0)) if value is not None else default
    except ValueError:
        return default


def _path(url: str) -> str:
    return httpx.URL(url).path


def parse_time(text: str) -> datetime:
    """A Cloudflare timestamp (``2022-11-08T17:19:29.176266Z``) as an aware datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
