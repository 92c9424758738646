"""Cloudflare's GraphQL Analytics endpoint, checked against a schema of what it serves.

Every request is parsed and validated against ``cloudflare-analytics.graphql`` (beside this
file; its header says where each name comes from) with graphql-core, then executed: a syntax
error, a misspelt field, a variable of the wrong type or an unknown dataset is answered as
Cloudflare answers it, HTTP 200 with ``{"data": null, "errors": [{message, path,
extensions{code}}]}``. Introspection (``__type``, ``__schema``) works as on any GraphQL server.

``workersInvocationsAdaptive`` reports rows grouped by the dimensions the query selects
(per minute and version, as coalmine asks, by default), honouring ``limit`` (at most
``AnalyticsLimits.max_page_size``, :data:`MAX_ROWS` by default), the filter's time range
(``datetime_geq``/``_gt`` to ``_lt``/``_leq``), ``scriptName``/``_in`` and
``scriptVersion``/``_in``, and ``orderBy`` on the time. A range
too long or too old is a 400; only minutes complete and older than the data delay are
reported. With ``AnalyticsLimits.sample_interval`` above 1 the data is sampled as Cloudflare's
adaptive datasets are: one invocation in ``k`` is kept, counts are reported as estimates
(kept times k) and ``avg { sampleInterval }`` says ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    GraphQLError,
    GraphQLResolveInfo,
    GraphQLScalarType,
    GraphQLSchema,
    StringValueNode,
    build_schema,
    execute_sync,
    parse,
    validate,
)
from graphql.language import IntValueNode, ValueNode

from coalmine.simulator.service import Response
from coalmine.simulator.traffic import MinuteRow, World

DATASET = "workersInvocationsAdaptive"
MAX_ROWS = 10000  # the dataset's page size: the largest `limit` accepted
SCHEMA_FILE = Path(__file__).with_name("cloudflare-analytics.graphql")
_MINUTE_DIMENSIONS = ("datetime", "datetimeMinute")


@dataclass(frozen=True, slots=True)
class AnalyticsLimits:
    """The dataset's limits, the lag of its data, and its sampling."""

    delay: timedelta = timedelta(0)  # minutes younger than this are not reported yet
    max_duration: timedelta = timedelta(days=1)  # the longest range one query may ask for
    not_older_than: timedelta = timedelta(days=31)  # how far back data is kept
    max_page_size: int = MAX_ROWS  # the largest `limit` accepted
    sample_interval: int = 1  # 1: every invocation; k: one in k, counts reported k times kept


def load_schema(sdl: str | None = None) -> GraphQLSchema:
    """The analytics schema (``cloudflare-analytics.graphql``, or ``sdl``) with Cloudflare's
    scalars: ``Time`` is RFC 3339 with a zone, ``uint64`` a non-negative integer."""
    schema = build_schema(sdl if sdl is not None else SCHEMA_FILE.read_text())
    for name, (parse_value, serialize) in _SCALARS.items():
        scalar = schema.type_map.get(name)
        if isinstance(scalar, GraphQLScalarType):
            # graphql-core 3.3 reads coerce_*; the parse_*/serialize names are its older API
            scalar.parse_value = parse_value  # type: ignore[method-assign,assignment]
            scalar.coerce_input_value = parse_value
            scalar.parse_literal = _literal(parse_value)  # type: ignore[method-assign]
            scalar.serialize = serialize  # type: ignore[method-assign,assignment]
            scalar.coerce_output_value = serialize
    return schema


@cache
def default_schema() -> GraphQLSchema:
    """The shipped schema, parsed once."""
    return load_schema()


def answer(
    world: World,
    body: Any,
    *,
    account_id: str,
    limits: AnalyticsLimits,
    schema: GraphQLSchema | None = None,
) -> Response:
    """The endpoint's answer to one POSTed GraphQL request."""
    if not isinstance(body, dict) or not isinstance(body.get("query"), str):
        return error(400, "request body must be a JSON object with a query string", "BAD_REQUEST")
    raw = body.get("variables")
    if raw is not None and not isinstance(raw, dict):
        return error(200, "variables must be an object", "BAD_REQUEST")
    try:
        document, problems = _checked(schema or default_schema(), body["query"])
    except GraphQLError as exc:
        return error(200, exc.message, "GRAPHQL_PARSE_FAILED")
    if problems:
        return _errors(200, problems, "GRAPHQL_VALIDATION_FAILED")
    schema = schema or default_schema()
    name = body.get("operationName")
    root = {"viewer": {"accounts": _accounts(world, account_id, limits)}}
    result = execute_sync(
        schema,
        document,
        root_value=root,
        variable_values=raw,
        operation_name=name if isinstance(name, str) else None,
    )
    errors = result.errors or []
    quota = [e for e in errors if isinstance(e.original_error, _Quota)]
    if quota:
        return _errors(400, quota, "QUOTA")
    if errors:  # Cloudflare answers an error with no data at all
        return _errors(200, errors, "VALIDATION")
    return Response.json(200, {"data": result.data, "errors": None})


@lru_cache(maxsize=64)
def _checked(schema: GraphQLSchema, query: str) -> tuple[DocumentNode, list[GraphQLError]]:
    """The parsed query and its validation errors; a client sends the same few queries over
    and over, so each is parsed and validated once (load tests send thousands a minute)."""
    document = parse(query)
    return document, validate(schema, document)


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


def _errors(status: int, errors: Iterable[GraphQLError], code: str) -> Response:
    return Response.json(status, {"data": None, "errors": [_entry(e, code) for e in errors]})


def _entry(exc: GraphQLError, code: str) -> dict[str, Any]:
    own = exc.extensions.get("code") if exc.extensions else None
    return {"message": exc.message, "path": exc.path, "extensions": {"code": own or code}}


class _Quota(Exception):
    """A dataset limit: Cloudflare answers these with HTTP 400."""


# ---- scalars ------------------------------------------------------------------------------


def _time(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise GraphQLError(f"Time must be an RFC 3339 string, not {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise GraphQLError(f"{value!r} is not a Time (RFC 3339)") from None
    if parsed.tzinfo is None:
        raise GraphQLError(f"{value!r} has no time zone")
    return parsed


def _time_text(value: Any) -> str:
    return _time(value).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _uint64(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GraphQLError(f"uint64 must be a non-negative integer, not {value!r}")
    return value


def _float64(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise GraphQLError(f"float64 must be a number, not {value!r}")
    return float(value)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise GraphQLError(f"string must be a string, not {type(value).__name__}")
    return value


_SCALARS: dict[str, tuple[Callable[[Any], Any], Callable[[Any], Any]]] = {
    "Time": (_time, _time_text),
    "uint64": (_uint64, _uint64),
    "float64": (_float64, _float64),
    "string": (_string, _string),
}


def _literal(parse_value: Callable[[Any], Any]) -> Callable[..., Any]:
    def parse_literal(node: ValueNode, _variables: Any = None) -> Any:
        if isinstance(node, StringValueNode):
            return parse_value(node.value)
        if isinstance(node, IntValueNode):
            return parse_value(int(node.value))
        raise GraphQLError(f"unexpected literal {type(node).__name__}")

    return parse_literal


# ---- resolvers ----------------------------------------------------------------------------


def _accounts(world: World, account_id: str, limits: AnalyticsLimits) -> Callable[..., Any]:
    def accounts(_info: GraphQLResolveInfo[Any], filter: dict[str, Any]) -> list[dict[str, Any]]:
        if filter.get("accountTag") != account_id:
            raise GraphQLError("not authorized for that account", extensions={"code": "authz"})
        return [
            {
                "settings": {DATASET: _settings(limits)},
                DATASET: lambda info, **args: _groups(world, limits, info, **args),
            }
        ]

    return accounts


def _settings(limits: AnalyticsLimits) -> dict[str, Any]:
    return {
        "enabled": True,
        "maxDuration": int(limits.max_duration.total_seconds()),
        "maxPageSize": limits.max_page_size,
        "notOlderThan": int(limits.not_older_than.total_seconds()),
    }


def _groups(
    world: World,
    limits: AnalyticsLimits,
    info: GraphQLResolveInfo[Any],
    limit: int,
    filter: dict[str, Any] | None = None,
    orderBy: list[str] | None = None,  # Cloudflare's argument name
) -> list[dict[str, Any]]:
    if limit > limits.max_page_size:
        raise GraphQLError(
            f"limit must be at most {limits.max_page_size}", extensions={"code": "QUOTA"}
        )
    where = filter or {}
    start = where.get("datetime_geq") or where.get("datetime_gt")
    end = where.get("datetime_lt") or where.get("datetime_leq")
    if start is None or end is None:
        raise GraphQLError("the filter needs a time range: datetime_geq and datetime_lt")
    if where.get("datetime_leq") is not None and where.get("datetime_lt") is None:
        end = end + timedelta(microseconds=1)  # inclusive end
    now = world.now()
    if end - start > limits.max_duration:
        hours = limits.max_duration.total_seconds() / 3600
        raise _Quota(f"time range too large: at most {hours:g}h per query")
    if start < now - limits.not_older_than:
        raise _Quota("start is older than the dataset keeps")
    rows = [
        (script, row)
        for script in _chosen(world.scripts(), where, "scriptName")
        for row in world.rows(
            script,
            start,
            end,
            versions=where.get("scriptVersion_in"),
            complete_before=now - limits.delay,
        )
        if _allowed(row.version, where, "scriptVersion")
    ]
    groups = _grouped(rows, _dimensions(info), max(1, limits.sample_interval))
    if orderBy and any(o.endswith("_DESC") for o in orderBy):
        groups.reverse()
    return groups[:limit]


def _chosen(names: list[str], where: dict[str, Any], field: str) -> list[str]:
    return [n for n in names if _allowed(n, where, field)]


def _allowed(value: str, where: dict[str, Any], field: str) -> bool:
    if where.get(field) is not None and value != where[field]:
        return False
    if where.get(f"{field}_in") is not None and value not in where[f"{field}_in"]:
        return False
    return not (where.get(f"{field}_neq") is not None and value == where[f"{field}_neq"])


def _dimensions(info: GraphQLResolveInfo[Any]) -> set[str]:
    """The dimension fields the query selects: rows are grouped by them."""
    wanted: set[str] = set()
    for node in info.field_nodes:
        for field in node.selection_set.selections if node.selection_set else ():
            if isinstance(field, FieldNode) and field.name.value == "dimensions":
                for dim in field.selection_set.selections if field.selection_set else ():
                    if isinstance(dim, FieldNode):
                        wanted.add(dim.name.value)
    return wanted


def _grouped(
    rows: list[tuple[str, MinuteRow]], dimensions: set[str], k: int
) -> list[dict[str, Any]]:
    by_minute = bool(dimensions & set(_MINUTE_DIMENSIONS))
    buckets: dict[tuple[Any, ...], list[tuple[str, MinuteRow]]] = {}
    for script, row in rows:
        key = (
            row.minute if by_minute else None,
            script if "scriptName" in dimensions else None,
            row.version if "scriptVersion" in dimensions else None,
        )
        buckets.setdefault(key, []).append((script, row))
    groups = [_group(key, members, k) for key, members in buckets.items()]
    return [g for g in groups if g["sum"]["requests"] > 0]  # no invocation kept: no row


def _group(key: tuple[Any, ...], members: list[tuple[str, MinuteRow]], k: int) -> dict[str, Any]:
    kept = [(r, r.requests // k, min(r.requests // k, round(r.errors / k))) for _, r in members]
    requests = sum(n for _, n, _ in kept)
    weight = requests or 1

    def weighted(name: str) -> float:
        return float(sum(getattr(r, name) * n for r, n, _ in kept) / weight)

    minute, script, version = key
    return {
        "sum": {
            "requests": requests * k,
            "errors": sum(e for _, _, e in kept) * k,
            "subrequests": sum(r.subrequests for _, r in members),
        },
        "quantiles": {
            "cpuTimeP50": weighted("cpu_time_p50"),
            "cpuTimeP99": weighted("cpu_time_p99"),
            "wallTimeP50": weighted("wall_time_p50"),
            "wallTimeP99": weighted("wall_time_p99"),
        },
        "avg": {"sampleInterval": float(k)},
        "dimensions": {
            "datetime": minute,
            "datetimeMinute": minute,
            "scriptName": script,
            "scriptVersion": version,
        },
    }
