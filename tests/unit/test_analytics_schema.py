"""The simulator's GraphQL analytics checked against a schema, and coalmine's query against it."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from coalmine.simulator import Behaviour, Simulator, VirtualClock
from coalmine.simulator.graphql import SCHEMA_FILE, AnalyticsLimits, answer, load_schema
from coalmine.simulator.traffic import DEFAULT_START
from coalmine.sources.cloudflare import FILTER_TYPE, INTROSPECTION, QUERY, _missing, query_for

ACCOUNT = "acc0123"
HEALTHY = Behaviour(exception_rate=0.0, http_5xx_rate=0.0)


def world(sample_interval: int = 1) -> tuple[Simulator, str, str, AnalyticsLimits]:
    """Script ``api``: a stable and a canary at 10% of 600 requests a minute, 10 minutes on."""
    clock = VirtualClock(DEFAULT_START)
    sim = Simulator(clock=clock, seed=5)
    stable = sim.add_script("api", requests_per_minute=600, behaviour=HEALTHY)
    canary = sim.upload_version("api", Behaviour(exception_rate=0.05, http_5xx_rate=0.0))
    sim.start_canary("api", canary, percent=10)
    clock.advance(timedelta(minutes=10))
    return sim, stable, canary, AnalyticsLimits(sample_interval=sample_interval)


def ask(query: str, variables: dict[str, Any] | None = None, **kwargs: Any) -> tuple[int, Any]:
    """POST one GraphQL request to the simulator's handler: (status, body)."""
    sim, _, _, limits = world(kwargs.pop("sample_interval", 1))
    response = answer(
        sim.world,
        {"query": query, "variables": variables or {}},
        account_id=ACCOUNT,
        limits=limits,
        **kwargs,
    )
    return response.status, json.loads(response.body)


def coalmine_variables(**filter_: Any) -> dict[str, Any]:
    """The variables coalmine sends: the account and one filter object."""
    start = DEFAULT_START.strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (DEFAULT_START + timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "accountTag": ACCOUNT,
        "filter": {"scriptName": "api", "datetime_geq": start, "datetime_lt": end, **filter_},
    }


def rejected(body: Any) -> str:
    """The message of a Cloudflare-style refusal: data null, errors with a code."""
    assert body["data"] is None, body
    (error, *_) = body["errors"]
    assert set(error) == {"message", "path", "extensions"} and error["extensions"]["code"]
    return str(error["message"])


def test_coalmines_query_passes_and_gets_per_minute_rows() -> None:
    """The daemon's real query validates and returns one row per minute and version."""
    status, body = ask(QUERY, coalmine_variables())
    assert status == 200 and body["errors"] is None, body
    groups = body["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]
    assert len(groups) == 10  # 5 minutes, 2 versions
    assert set(groups[0]) == {"sum", "quantiles", "avg", "dimensions"}
    assert groups[0]["dimensions"]["datetimeMinute"].endswith(":00Z")


def test_a_misspelt_field_is_refused() -> None:
    """`sum { request }` is not a field: 200 with errors naming it, no data."""
    status, body = ask(QUERY.replace("sum { requests errors }", "sum { request errors }"))
    assert status == 200
    assert "request" in rejected(body) and "AccountWorkersInvocationsAdaptiveSum" in rejected(body)


def test_a_variable_of_the_wrong_type_is_refused() -> None:
    """Declaring the filter as a String is a validation error, as is a Time that is not one."""
    wrong = QUERY.replace(f"$filter: {FILTER_TYPE}", "$filter: String")
    status, body = ask(wrong, coalmine_variables())
    assert status == 200
    assert "String" in rejected(body) and FILTER_TYPE in rejected(body)
    status, body = ask(QUERY, coalmine_variables(datetime_geq="yesterday"))
    assert status == 200 and "'yesterday' is not a Time" in rejected(body)
    status, body = ask(QUERY, coalmine_variables(scriptVersions=["x"]))
    assert status == 200 and "scriptVersions" in rejected(body)


def test_an_unknown_dataset_is_refused() -> None:
    """A made-up dataset name is a validation error, not data."""
    status, body = ask(QUERY.replace("workersInvocationsAdaptive(", "workersInvocationsAdaptiv("))
    assert status == 200 and "workersInvocationsAdaptiv" in rejected(body)


def test_a_syntax_error_is_refused() -> None:
    """A query that does not parse is a 200 with a parse error."""
    status, body = ask(QUERY[:-3])
    assert status == 200 and "Syntax Error" in rejected(body)


def test_limit_is_honoured() -> None:
    """`limit: 2` gives at most two rows; a limit over the page size is refused."""
    status, body = ask(QUERY.replace("limit: 10000", "limit: 2"), coalmine_variables())
    assert status == 200
    assert len(body["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]) == 2
    _, body = ask(QUERY.replace("limit: 10000", "limit: 20000"), coalmine_variables())
    assert "at most 10000" in rejected(body)


def test_introspection_answers_and_the_shipped_schema_fits_the_query() -> None:
    """The start-up introspection gets the filter and group types; nothing is missing."""
    status, body = ask(INTROSPECTION)
    assert status == 200 and body["errors"] is None
    assert _missing(body["data"], ["cpuTimeP50", "cpuTimeP99", "wallTimeP99"]) == []


@pytest.mark.parametrize(
    ("removed", "named"),
    [
        ("  scriptVersion_in: [string!]\n", f"{FILTER_TYPE}.scriptVersion_in"),
        ("  datetimeMinute: Time!\n", "AccountWorkersInvocationsAdaptiveDimensions.datetimeMinute"),
        ("  wallTimeP99: float64!\n", "AccountWorkersInvocationsAdaptiveQuantiles.wallTimeP99"),
        ("  avg: AccountWorkersInvocationsAdaptiveAvg\n", "AccountWorkersInvocationsAdaptive.avg"),
    ],
)
def test_introspection_names_a_field_the_schema_lacks(removed: str, named: str) -> None:
    """With a field taken out of the schema, the check names exactly that field."""
    sdl = SCHEMA_FILE.read_text()
    assert removed in sdl
    schema = load_schema(sdl.replace(removed, ""))
    _, body = ask(INTROSPECTION, schema=schema)
    assert _missing(body["data"], ["cpuTimeP50", "cpuTimeP99", "wallTimeP99"]) == [named]


def test_an_unused_quantile_is_neither_asked_nor_checked() -> None:
    """Without wall-time rules the query does not ask wallTimeP99, and the check does not need it."""
    query = query_for(["cpuTimeP99"])
    assert "wallTimeP99" not in query and "cpuTimeP99" in query
    sdl = SCHEMA_FILE.read_text().replace("  wallTimeP99: float64!\n", "")
    status, body = ask(query, coalmine_variables(), schema=load_schema(sdl))
    assert status == 200 and body["errors"] is None


def test_sampled_rows_are_estimates_with_their_interval() -> None:
    """At one in ten, counts are multiples of ten and avg.sampleInterval says 10."""
    status, body = ask(QUERY, coalmine_variables(), sample_interval=10)
    assert status == 200 and body["errors"] is None
    for group in body["data"]["viewer"]["accounts"][0]["workersInvocationsAdaptive"]:
        assert group["avg"]["sampleInterval"] == 10
        assert group["sum"]["requests"] % 10 == 0 and group["sum"]["errors"] % 10 == 0


def test_another_account_is_refused() -> None:
    """An account the token does not own: 200, no data, an authz error."""
    status, body = ask(QUERY, {**coalmine_variables(), "accountTag": "someone-else"})
    assert status == 200 and "not authorized" in rejected(body)
