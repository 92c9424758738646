"""PromQL shared by the Prometheus and Grafana sources: placeholders and the answer envelope."""

from __future__ import annotations

import math
import re
from typing import Any

from coalmine.durations import format_duration
from coalmine.policy import Rule
from coalmine.sources import Target

_PLACEHOLDER = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


class BadAnswer(Exception):
    """The answer cannot give one number; the message says why (the observation's error)."""


def escape_label(value: str) -> str:
    """A label value safe inside a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(query: str, rule: Rule, target: Target) -> str:
    """Substitute ``$script``, ``$version``, ``$canary``, ``$stable`` and ``$window``."""
    values = {
        "script": escape_label(target.script),
        "version": escape_label(target.version),
        "canary": escape_label(target.canary),
        "stable": escape_label(target.stable),
        "window": format_duration(rule.window),
    }
    return _PLACEHOLDER.sub(lambda m: values[m[1] or m[2]], query)


def single_value(body: Any) -> float:
    """The one number of a Prometheus ``/api/v1/query`` answer; :class:`BadAnswer` otherwise.

    NaN and ±Inf are returned as floats (the engine calls them inconclusive); an error envelope,
    an empty vector, several series or a malformed body raise.
    """
    if not isinstance(body, dict):
        raise BadAnswer("malformed answer: not a JSON object")
    if body.get("status") == "error":
        raise BadAnswer(f"{body.get('errorType', 'error')}: {body.get('error', 'no message')}")
    data = body.get("data")
    if body.get("status") != "success" or not isinstance(data, dict):
        raise BadAnswer("malformed answer: no status/data")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar":
        return _sample(result)
    if kind != "vector" or not isinstance(result, list):
        raise BadAnswer(f"unexpected result type {kind!r}; the query must give one number")
    if not result:
        raise BadAnswer("empty result (no series)")
    if len(result) > 1:
        raise BadAnswer(f"{len(result)} series; the query must aggregate to one")
    series = result[0]
    if not isinstance(series, dict):
        raise BadAnswer("malformed answer: series is not an object")
    return _sample(series.get("value"))


def _sample(pair: Any) -> float:
    if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[1], str):
        raise BadAnswer('malformed answer: sample is not [time, "value"]')
    try:
        value = float(pair[1])  # accepts "NaN", "+Inf", "-Inf"
    except ValueError:
        raise BadAnswer(f"malformed answer: sample value {pair[1][:40]!r}") from None
    return value if not math.isnan(value) else math.nan
