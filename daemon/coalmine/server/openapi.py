"""The OpenAPI 3.1 description of coalmine's HTTP endpoints, served at ``/api/v1/openapi.json``.

The document is built from the engine's own enumerations (phases, rule statuses, decision
actions, command kinds), so those lists cannot drift from the code; the paths are checked
against the routes :class:`coalmine.api.Api` serves by ``tests/unit/test_openapi.py``, and the
response shapes against the live daemon by ``tests/e2e/test_api_schema.py`` (schemathesis).
"""

from __future__ import annotations

from typing import Any, get_args

from coalmine import __version__
from coalmine.engine import RolloutPhase, RuleStatus
from coalmine.engine.model import Action, CommandKind

OPENAPI_PATH = "/api/v1/openapi.json"
ROLLOUTS = "/api/v1/rollouts"
NON_FINITE = ["NaN", "+Inf", "-Inf"]  # how JSON bodies carry non-finite floats
_COUNTS = ("canary_events", "canary_samples", "stable_events", "stable_samples")  # compare rules

_DESCRIPTION = """\
coalmine's HTTP endpoints: Prometheus metrics, health and readiness, and the admin API over
the rollouts it watches. Reads are open (bind to loopback, the default, or put coalmine behind
your network policy). Writes need `Authorization: Bearer $COALMINE_ADMIN_TOKEN`; with no token
configured every write is refused (403). Non-finite numbers in JSON bodies are the strings
`"NaN"`, `"+Inf"` and `"-Inf"`. Request bodies over 64 KiB are refused (413).
"""


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
        "additionalProperties": False,
    }


def _pair(items: dict[str, Any]) -> dict[str, Any]:
    """A compare rule's confidence interval: [low, high]."""
    return {"type": "array", "items": items, "minItems": 2, "maxItems": 2}


def _json(description: str, schema_name: str, **extra: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref(schema_name)}},
        **extra,
    }


def _text(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }


def _schemas() -> dict[str, Any]:
    string, text = {"type": "string"}, {"type": "string"}
    time = {"type": "string", "format": "date-time"}
    percent = {"type": "integer", "minimum": 0, "maximum": 100}
    number = _ref("Number")
    return {
        "Error": _object({"error": {"type": "string", "description": "what went wrong"}}),
        "Number": {
            "description": "a float; NaN and ±Inf as strings (JSON has no literal for them)",
            "anyOf": [{"type": "number"}, {"enum": NON_FINITE}],
        },
        "Phase": {"enum": [p.value for p in RolloutPhase]},
        "Decision": _object(
            {
                "t": time,
                "action": {"enum": list(get_args(Action))},
                "reason": text,
                "script": string,
                "canary": _nullable(string),
                "stable": _nullable(string),
                "actor": {"enum": ["coalmine", "operator"]},
            },
            {
                "canary_percent": percent,
                "rule": string,
                "value": number,
                "threshold": number,
                "window": {"type": "string", "description": "a duration such as 2m or 1h30m"},
                "samples": number,
                "breached_since": time,
                "stable_value": number,
                "interval": _pair(number),
                "severity": string,
                "dedup_key": string,
                "dry_run": {"const": True, "description": "decided in a dry run"},
                "requested_by": {"type": "string", "description": "who sent the command"},
                "request_reason": {"type": "string", "description": "the reason they gave"},
            },
        ),
        "Rule": _object(
            {
                "status": {"enum": [s.value for s in RuleStatus]},
                "value": _nullable(number),
                "stable_value": _nullable(number),
                "samples": _nullable(number),
                "breaching": {"type": "boolean"},
                "breached_since": _nullable(time),
                "detail": {"type": "string", "description": "why it is inconclusive, if it is"},
            },
            {
                "threshold": number,
                "operator": {"enum": [">", "<"], "description": "breaching: value OP threshold"},
                "on_breach": {"enum": ["rollback", "hold", "page", "warn"]},
                "interval": _pair(number),
                "counts": _nullable(_object({name: number for name in _COUNTS})),
            },
        ),
        "Rollout": _object(
            {
                "script": string,
                "policy": string,
                "phase": _ref("Phase"),
                "canary": _nullable(string),
                "stable": _nullable(string),
                "canary_percent": percent,
                "step": {"type": "integer", "minimum": 0, "description": "1-based; 0 if none"},
                "steps": {"type": "array", "items": percent},
                "rules": {"type": "object", "additionalProperties": _ref("Rule")},
                "recent_decisions": {"type": "array", "items": _ref("Decision"), "maxItems": 20},
                **_progress(string, time, percent),
            },
            {
                "lease": _object(
                    {
                        "holder": _nullable(string),
                        "epoch": {"type": "integer", "minimum": 1},
                    }
                )
            },
        ),
        "Split": _object(
            {"stable": string, "canary": _nullable(string), "canary_percent": percent}
        ),
        "TrafficChange": _object(
            {
                "state": {"enum": ["pending", "refused"]},
                "kind": string,
                "error": _nullable({"type": "string", "description": "Cloudflare's refusal"}),
            }
        ),
        "Rollouts": _object({"rollouts": {"type": "array", "items": _ref("Rollout")}}),
        "Check": _object(
            {
                "status": {"enum": ["healthy", "failing"]},
                "latency_ms": _nullable({"type": "number", "minimum": 0}),
            },
            {
                "error": string,
                "failing_for_s": {"type": "number", "minimum": 0},
                "kept_in_memory": {"type": "integer", "minimum": 0},
            },
        ),
        "Health": _object(
            {
                "status": {"enum": ["healthy", "degraded", "unhealthy"]},
                "version": string,
                "checks": {"type": "object", "additionalProperties": _ref("Check")},
                "rollouts": {
                    "type": "array",
                    "items": _object(
                        {
                            "script": string,
                            "phase": _ref("Phase"),
                            "canary": _nullable(string),
                            "canary_percent": percent,
                        }
                    ),
                },
                "outbox_backlog": {"type": "integer", "minimum": 0},
            },
            {"budget_plan": _ref("BudgetPlan")},
        ),
        "BudgetPlan": _object(
            {
                "fits": {"type": "boolean"},
                "rest": _ref("BudgetPart"),
                "graphql": _ref("BudgetPart"),
                "live_canaries": {"type": "integer", "minimum": 0},
                "more_canaries": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "how many more canaries could start at once and still fit",
                },
                "changes": {
                    "type": "array",
                    "items": string,
                    "description": "when it does not fit: each would make it fit",
                },
            },
            {
                "replicas": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "replicas only: the live replicas sharing the token",
                },
                "token": {
                    **_object({"rest": _ref("BudgetPart"), "graphql": _ref("BudgetPart")}),
                    "description": "replicas only: every watched script against the token's"
                    " whole limits",
                },
            },
        ),
        "BudgetPart": _object(
            {
                "planned": {
                    "type": "number",
                    "minimum": 0,
                    "description": "Cloudflare requests per 5 minutes the plan needs",
                },
                "limit": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "description": "replicas: this replica's share of the limit",
                },
                "reserve": {
                    "type": "number",
                    "minimum": 0,
                    "description": "kept for rollbacks, never planned",
                },
            }
        ),
        "StartBody": {
            "type": "object",
            "required": ["version"],
            "properties": {
                "version": {
                    "type": "string",
                    "minLength": 1,
                    "description": "the Worker version id to start as the canary",
                },
                "reason": _REASON,
            },
        },
        "CommandBody": {"type": "object", "properties": {"reason": _REASON}},
        "CommandResult": _object(
            {
                "script": string,
                "command": {"enum": list(get_args(CommandKind))},
                "decisions": {"type": "array", "items": _ref("Decision")},
            }
        ),
        "CommandQueued": _object(
            {
                "script": string,
                "command": {"enum": list(get_args(CommandKind))},
                "queued": {"type": "string", "description": "why the answer is not final yet"},
            }
        ),
    }


def _progress(string: Any, time: Any, percent: Any) -> dict[str, Any]:
    """The Rollout fields that say where it stands and what it waits for."""
    seconds = {"type": "number", "minimum": 0}
    return {
        "dry_run": {"type": "boolean", "description": "true: decisions never change traffic"},
        "auto_promote": {"type": "boolean"},
        "auto_rollback": {"type": "boolean"},
        "live": _nullable(_ref("Split")) | {"description": "the split Cloudflare serves"},
        "started_at": _nullable(time),
        "step_started_at": _nullable(time),
        "hold_remaining_seconds": _nullable(seconds),
        "next_step_at": _nullable(time) | {"description": "when the step's hold ends"},
        "next_percent": _nullable(percent),
        "waiting_for": {
            "type": "array",
            "items": string,
            "description": "what keeps the canary from advancing, besides the hold",
        },
        "watch_ends_at": _nullable(time),
        "traffic_change": _nullable(_ref("TrafficChange")),
    }


_SCRIPT = {
    "name": "script",
    "in": "path",
    "required": True,
    "description": "the Worker script's name, as in the policy's `scripts`",
    "schema": {"type": "string", "minLength": 1},
}

_REASON = {"type": "string", "description": "why, for the journal (first 500 characters)"}
_ACTOR = {
    "name": "X-Coalmine-Actor",
    "in": "header",
    "required": False,
    "description": "who sends the command, for the journal (`coalmine` sends the OS user)",
    "schema": {"type": "string"},
}

_COMMANDS: dict[str, str] = {
    "pause": "Stop advancing the canary (rules still act: a breach still rolls back).",
    "resume": "Let a paused canary advance again.",
    "promote": "Advance the canary one step now, skipping the hold (refused while breaching).",
    "rollback": "Send all traffic back to the stable version now.",
    "start": 'Start a canary of `version` at the first step (body `{"version": "<id>"}`).',
}


def _command(kind: str) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": kind,
        "tags": ["admin"],
        "summary": _COMMANDS[kind],
        "description": "Queued for the script's loop and answered once a tick has applied it.",
        "security": [{"bearer": []}],
        "parameters": [{"$ref": "#/components/parameters/script"}],
        "responses": {
            "200": _json("applied; the decisions the command produced", "CommandResult"),
            "202": _json("a tick is applying it; see GET the rollout", "CommandQueued"),
            "401": _json(
                "no bearer token",
                "Error",
                headers={
                    "WWW-Authenticate": {"required": True, "schema": {"type": "string"}},
                },
            ),
            "403": _json("a wrong token, or writes are disabled (no token configured)", "Error"),
            "404": _json("no such script (start: no such version, Cloudflare's message)", "Error"),
            "409": _json("refused by the engine (the decisions are warnings)", "CommandResult"),
            "413": _text("body over 64 KiB"),
            "503": _json("not applied (the tick failed or none came); try again", "Error"),
        },
    }
    operation["parameters"].append(_ACTOR)
    operation["requestBody"] = {
        "required": kind == "start",
        "content": {
            "application/json": {"schema": _ref("StartBody" if kind == "start" else "CommandBody")}
        },
    }
    operation["responses"]["400"] = _json("the body is not the JSON described", "Error")
    return {"post": operation}


def _get(operation_id: str, summary: str, responses: dict[str, Any], **extra: Any) -> Any:
    return {
        "get": {"operationId": operation_id, "summary": summary, "responses": responses, **extra}
    }


def _paths() -> dict[str, Any]:
    script = {"parameters": [{"$ref": "#/components/parameters/script"}]}
    return {
        "/metrics": _get(
            "metrics",
            "Prometheus exposition (text format), every name prefixed coalmine_.",
            {"200": _text("the metrics")},
            tags=["operations"],
        ),
        "/health": _get(
            "health",
            "Each dependency's latest call, and the active rollouts.",
            {
                "200": _json("healthy or degraded", "Health"),
                "503": _json("unhealthy: the state store has been failing", "Health"),
            },
            tags=["operations"],
        ),
        "/healthz": _get(
            "healthz", "Liveness.", {"200": _text("alive: `ok`")}, tags=["operations"]
        ),
        "/readyz": _get(
            "readyz",
            "Readiness: 200 once every script's loop runs and while the state store records.",
            {"200": _text("`ready`"), "503": _text("`starting`, or why the store cannot record")},
            tags=["operations"],
        ),
        OPENAPI_PATH: _get(
            "openapi",
            "This document.",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            tags=["admin"],
        ),
        ROLLOUTS: _get(
            "listRollouts",
            "Every watched script's rollout.",
            {"200": _json("the rollouts", "Rollouts")},
            tags=["admin"],
        ),
        ROLLOUTS + "/{script}": _get(
            "getRollout",
            "One script's rollout: phase, step, weights, rule values, recent decisions.",
            {"200": _json("the rollout", "Rollout"), "404": _json("no such script", "Error")},
            tags=["admin"],
            **script,
        ),
        **{f"{ROLLOUTS}/{{script}}/{kind}": _command(kind) for kind in get_args(CommandKind)},
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document, as a JSON-ready dict (a new one on every call)."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "coalmine",
            "version": __version__,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "servers": [{"url": "http://127.0.0.1:9300", "description": "the default COALMINE_LISTEN"}],
        "tags": [
            {"name": "operations", "description": "metrics, health and readiness"},
            {"name": "admin", "description": "rollouts: reads are open, writes need the token"},
        ],
        "security": [],
        "paths": _paths(),
        "components": {
            "schemas": _schemas(),
            "parameters": {"script": _SCRIPT},
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "COALMINE_ADMIN_TOKEN; unset on the daemon = writes refused",
                }
            },
        },
    }
