"""The OpenAPI document against the routes coalmine.server.api actually serves."""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from prometheus_client import CollectorRegistry

from coalmine.server.api import Api
from coalmine.server.health import Health
from coalmine.server.metrics import Metrics
from coalmine.server.openapi import OPENAPI_PATH, openapi_document

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def _api() -> Api:
    return Api({}, Metrics(CollectorRegistry()), Health(), "token", lambda: 0)


async def _call(method: str, target: str, headers: dict[str, str]) -> httpx.Response:
    """One request to a fresh Api, in process (ASGI)."""
    transport = httpx.ASGITransport(app=_api())
    async with httpx.AsyncClient(transport=transport, base_url="http://coalmine") as client:
        return await client.request(method, target, headers=headers)


def _documented() -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        for method in item
        if method in METHODS
    }


def test_document_paths_are_exactly_the_served_routes() -> None:
    """Every (method, path) in the document is a route of Api, and every route is documented."""
    assert _documented() == set(_api().routes)


def test_the_document_is_valid_openapi_and_strict_json() -> None:
    """The document passes the OpenAPI 3.1 meta-schema and has no NaN, so it serves as JSON."""
    document = openapi_document()
    assert document["openapi"].startswith("3.1.")
    schemathesis.openapi.from_dict(document).validate()
    assert json.loads(json.dumps(document, allow_nan=False)) == document


def test_writes_declare_the_bearer_scheme_and_reads_none() -> None:
    """POSTs need the bearer token (401 documented with WWW-Authenticate); reads are open."""
    document = openapi_document()
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method == "post":
                assert operation["security"] == [{"bearer": []}], path
                assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]
            else:
                assert "security" not in operation, path
    assert document["security"] == []


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "path"), sorted(_documented()))
async def test_every_documented_operation_is_routed(method: str, path: str) -> None:
    """A documented operation reaches its handler: not the router's 404 nor a 405."""
    target = path.replace("{script}", "no-such-script")
    response = await _call(method, target, {"authorization": "Bearer token"})
    assert response.status_code != 405
    if response.status_code == 404:
        assert response.json()["error"].startswith("no such script")


@pytest.mark.anyio
@pytest.mark.parametrize(("method", "path"), sorted(_documented()))
async def test_other_methods_are_405_with_allow(method: str, path: str) -> None:
    """Any method the document does not list for a path is 405, with Allow naming the one it does."""
    target = path.replace("{script}", "no-such-script")
    allow = "GET, HEAD" if method == "GET" else method
    for other in sorted({m.upper() for m in METHODS} - set(allow.split(", "))):
        response = await _call(other, target, {"authorization": "Bearer token"})
        assert response.status_code == 405, other
        assert response.headers["allow"] == allow


@pytest.mark.anyio
async def test_the_document_is_served() -> None:
    """GET /api/v1/openapi.json answers the document as JSON."""
    response = await _call("GET", OPENAPI_PATH, {})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == openapi_document()
