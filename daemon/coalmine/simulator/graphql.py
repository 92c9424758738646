"""Cloudflare's GraphQL Analytics endpoint, for the one dataset coalmine reads.

No GraphQL parser: a query that mentions ``workersInvocationsAdaptive`` is answered from its
``variables`` (``accountTag``, ``script``, ``start``, ``end``, ``versions``), the way coalmine's
query uses them, with one row per (minute, version) as reference/cloudflare-api.md shows:
``sum{requests errors subrequests}``, ``quantiles{cpuTimeP50 cpuTimeP99 wallTimeP50
wallTimeP99}`` in microseconds, ``avg{sampleInterval}`` and ``dimensions{datetimeMinute
scriptVersion}``. A query that also mentions ``settings`` gets the dataset's limits instead.

Like the real API, a 200 can carry ``{"data": null, "errors": [{message, path,
extensions{code}}]}`` (bad variables, another account); a range too long or too old is a 400;
only minutes that are complete and older than the data delay are reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from coalmine.simulator.service import Response
from coalmine.simulator.traffic import MinuteRow, World

DATASET = "workersInvocationsAdaptive"
MAX_ROWS = 10000  # the `limit` of coalmine's query, and the dataset's page size


@dataclass(frozen=True, slots=True)
class AnalyticsLimits:
    """The dataset's limits and the lag of its data."""

    delay: timedelta = timedelta(0)  # minutes younger than this are not reported yet
    max_duration: timedelta = timedelta(days=1)  # the longest range one query may ask for
    not_older_than: timedelta = timedelta(days=31)  # how far back data is kept


def answer(world: World, body: Any, *, account_id: str, limits: AnalyticsLimits) -> Response:
    """The endpoint's answer to one POSTed GraphQL request."""
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        return error(400, "request body must be a JSON object with a query string", "BAD_REQUEST")
    query: str = body["query"]
    raw = body.get("variables")
    variables: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if DATASET not in query:
        return error(200, "this simulator answers workersInvocationsAdaptive only", "UNSUPPORTED")
    if variables.get("accountTag") != account_id:
        return error(200, "not authorized for that account", "authz", ["viewer", "accounts", 0])
    if "settings" in query:
        return _settings(limits)
    try:
        script, start, end, versions = _arguments(variables)
    except _BadVariable as exc:
        return error(200, str(exc), "VALIDATION", ["viewer", "accounts", 0, DATASET])
    now = world.now()
    if end - start > limits.max_duration:
        hours = limits.max_duration.total_seconds() / 3600
        return error(400, f"time range too large: at most {hours:g}h per query", "QUOTA")
    if start < now - limits.not_older_than:
        return error(400, "start is older than the dataset keeps", "QUOTA")
    rows = world.rows(script, start, end, versions=versions, complete_before=now - limits.delay)
    groups = [_group(row) for row in rows[:MAX_ROWS]]
    return Response.json(
        200, {"data": {"viewer": {"accounts": [{DATASET: groups}]}}, "errors": None}
    )


def error(status: int, message: str, code: str, path: list[Any] | None = None) -> Response:
    """A GraphQL error answer: ``data`` null and one error."""
    entry: dict[str, Any] = {"message": message, "path": path, "extensions": {"code": code}}
    return Response.json(status, {"data": None, "errors": [entry]})


def error_body(message: str, code: str = "INTERNAL") -> dict[str, Any]:
    """The body of a GraphQL error inside a 200, for fault injection."""
    return {
        "data": None,
        "errors": [{"message": message, "path": ["viewer"], "extensions": {"code": code}}],
    }


class _BadVariable(Exception):
    pass


def _arguments(variables: dict[str, Any]) -> tuple[str, datetime, datetime, list[str] | None]:
    script = variables.get("script")
    if not isinstance(script, str) or not script:
        raise _BadVariable("variable $script: a non-empty string is required")
    start, end = _time(variables, "start"), _time(variables, "end")
    versions = variables.get("versions")
    if versions is not None and (
        not isinstance(versions, list) or not all(isinstance(v, str) for v in versions)
    ):
        raise _BadVariable("variable $versions: a list of strings is required")
    return script, start, end, versions


def _time(variables: dict[str, Any], name: str) -> datetime:
    text = variables.get(name)
    if not isinstance(text, str):
        raise _BadVariable(f"variable ${name}: a Time (RFC 3339) is required")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise _BadVariable(f"variable ${name}: {text!r} is not a Time (RFC 3339)") from None
    if value.tzinfo is None:
        raise _BadVariable(f"variable ${name}: {text!r} has no time zone")
    return value


def _group(row: MinuteRow) -> dict[str, Any]:
    return {
        "sum": {"requests": row.requests, "errors": row.errors, "subrequests": row.subrequests},
        "quantiles": {
            "cpuTimeP50": row.cpu_time_p50,
            "cpuTimeP99": row.cpu_time_p99,
            "wallTimeP50": row.wall_time_p50,
            "wallTimeP99": row.wall_time_p99,
        },
        "avg": {"sampleInterval": 1},
        "dimensions": {
            "datetimeMinute": row.minute.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "scriptVersion": row.version,
        },
    }


def _settings(limits: AnalyticsLimits) -> Response:
    settings = {
        "enabled": True,
        "maxDuration": int(limits.max_duration.total_seconds()),
        "maxPageSize": MAX_ROWS,
        "notOlderThan": int(limits.not_older_than.total_seconds()),
    }
    account = {"settings": {DATASET: settings}}
    return Response.json(200, {"data": {"viewer": {"accounts": [account]}}, "errors": None})
