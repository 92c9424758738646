"""One script's versions and deployments as Cloudflare keeps them, and the create rules.

The objects render exactly the fields of reference/cloudflare-api.md and the OpenAPI extract:
a deployment is ``id``, ``created_on``, ``source``, ``strategy: "percentage"``,
``versions[{version_id, percentage}]``, ``author_email`` and ``annotations``
(``workers/message`` as sent, ``workers/triggered_by`` added by the server); a version item is
``id``, ``number`` and ``metadata{author_email, author_id, created_on, modified_on, source,
hasPreview}``, and its detail adds ``resources``.

:func:`validate` applies the reference's rules to a create body, in the order a client would
want to hear about them; each refusal is an :class:`ApiError` with a status and a code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

INVALID = 10021
SECRETS_CHANGED = 10220
DEPLOYABLE = 100  # only the last 100 uploaded versions can be deployed
MESSAGE_LIMIT = 50


class ApiError(Exception):
    """A refusal the API answers with its error envelope."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status, self.code, self.message = status, code, message


def cloudflare_time(when: datetime) -> str:
    """``2022-11-08T17:19:29.176266Z``, the API's timestamp format."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Version:
    """An uploaded version of a script."""

    id: str
    number: int
    created_on: datetime
    message: str | None = None
    source: str = "wrangler"
    author_email: str = "developer@example.com"
    author_id: str = "b4a1e8c0d35f4c1c9f8e2a7d6b5c4e3f"

    def item(self) -> dict[str, Any]:
        """The list form (``GET …/versions``)."""
        created = cloudflare_time(self.created_on)
        return {
            "id": self.id,
            "number": self.number,
            "metadata": {
                "author_email": self.author_email,
                "author_id": self.author_id,
                "created_on": created,
                "modified_on": created,
                "source": self.source,
                "hasPreview": False,
            },
        }

    def detail(self) -> dict[str, Any]:
        """The full form (``GET …/versions/{id}``)."""
        annotations = {"workers/triggered_by": "upload"}
        if self.message is not None:
            annotations["workers/message"] = self.message
        return {
            **self.item(),
            "annotations": annotations,
            "resources": {
                "bindings": [],
                "script": {
                    "etag": f"{self.number:064x}",
                    "handlers": ["fetch"],
                    "last_deployed_from": self.source,
                },
                "script_runtime": {"usage_model": "standard"},
            },
        }


@dataclass(frozen=True, slots=True)
class Deployment:
    """A deployment: which versions serve, at what percentages."""

    id: str
    created_on: datetime
    source: str
    versions: list[tuple[str, float]]  # (version_id, percentage) as requested
    author_email: str
    message: str | None
    triggered_by: str

    @property
    def split(self) -> dict[str, float]:
        """Percent by version id."""
        return {v: float(p) for v, p in self.versions}

    def as_json(self) -> dict[str, Any]:
        """The object the API returns."""
        annotations = {"workers/triggered_by": self.triggered_by}
        if self.message is not None:
            annotations["workers/message"] = self.message
        return {
            "id": self.id,
            "created_on": cloudflare_time(self.created_on),
            "source": self.source,
            "strategy": "percentage",
            "versions": [{"version_id": v, "percentage": p} for v, p in self.versions],
            "author_email": self.author_email,
            "annotations": annotations,
        }


@dataclass
class ScriptState:
    """A script's versions (upload order) and deployments (oldest first)."""

    name: str
    versions: list[Version] = field(default_factory=list)
    deployments: list[Deployment] = field(default_factory=list)
    secrets_changed_after: int = 0  # versions numbered up to this predate the last secret change

    def version(self, version_id: str) -> Version | None:
        """A version by id."""
        return next((v for v in self.versions if v.id == version_id), None)

    def deployment(self, deployment_id: str) -> Deployment | None:
        """A deployment by id."""
        return next((d for d in self.deployments if d.id == deployment_id), None)

    def deployable(self) -> list[Version]:
        """The versions a deployment may use: the last 100 uploaded, newest first."""
        return self.versions[::-1][:DEPLOYABLE]

    def serving_number(self) -> int:
        """The number of the newest version serving now (0 before any deployment)."""
        if not self.deployments:
            return 0
        return max(self._number(v) for v, _ in self.deployments[-1].versions)

    def trigger(self, versions: list[tuple[str, float]]) -> str:
        """The ``workers/triggered_by`` the server records for a create with these versions.

        One version older than the newest serving is a rollback; the newer side of a split
        taking all traffic is a promotion; anything else a deployment.
        """
        if len(versions) == 1 and self.deployments:
            number, serving = self._number(versions[0][0]), self.serving_number()
            if number < serving:
                return "rollback"
            if number == serving and len(self.deployments[-1].versions) == 2:
                return "promotion"
        return "deployment"

    def _number(self, version_id: str) -> int:
        version = self.version(version_id)
        return version.number if version else 0


def validate(
    state: ScriptState, body: Any, *, force: bool
) -> tuple[list[tuple[str, float]], str | None]:
    """The (version_id, percentage) pairs and message of a valid create body, or ApiError."""
    if not isinstance(body, dict):
        raise ApiError(400, INVALID, "request body must be a JSON object")
    if body.get("strategy") != "percentage":
        raise ApiError(400, INVALID, 'strategy must be "percentage"')
    versions = _versions(body.get("versions"))
    message = _message(body.get("annotations"))
    deployable = {v.id for v in state.deployable()}
    for version_id, _ in versions:
        if state.version(version_id) is None:
            raise ApiError(400, INVALID, f"version {version_id} not found for {state.name}")
        if version_id not in deployable:
            raise ApiError(400, INVALID, f"version {version_id} is not among the last 100 uploaded")
    if not force:
        _check_secrets(state, versions)
    return versions, message


def _versions(raw: Any) -> list[tuple[str, float]]:
    if not isinstance(raw, list) or not 1 <= len(raw) <= 2:
        raise ApiError(400, INVALID, "versions must list one or two versions")
    pairs: list[tuple[str, float]] = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise ApiError(400, INVALID, "each versions entry must be an object")
        version_id, percentage = entry.get("version_id"), entry.get("percentage")
        if not isinstance(version_id, str) or not version_id:
            raise ApiError(400, INVALID, "versions[].version_id must be a string")
        if (
            isinstance(percentage, bool)
            or not isinstance(percentage, int | float)
            or not math.isfinite(percentage)
            or not 0.01 <= percentage <= 100
        ):
            raise ApiError(400, INVALID, "versions[].percentage must be between 0.01 and 100")
        pairs.append((version_id, percentage))
    if len({v for v, _ in pairs}) != len(pairs):
        raise ApiError(400, INVALID, "a version may appear only once")
    if not math.isclose(sum(p for _, p in pairs), 100.0, abs_tol=1e-6):
        raise ApiError(400, INVALID, "percentages across all versions must total 100")
    return pairs


def _message(raw: Any) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ApiError(400, INVALID, "annotations must be an object")
    unknown = sorted(set(raw) - {"workers/message"})
    if unknown:
        raise ApiError(400, INVALID, f"annotations may only set workers/message, not {unknown}")
    message = raw.get("workers/message")
    if message is None:
        return None
    if not isinstance(message, str):
        raise ApiError(400, INVALID, "workers/message must be a string")
    if len(message) > MESSAGE_LIMIT:
        raise ApiError(400, INVALID, f"workers/message is longer than {MESSAGE_LIMIT} characters")
    return message


def _check_secrets(state: ScriptState, versions: list[tuple[str, float]]) -> None:
    found = [state.version(v) for v, _ in versions]
    newest = max(v.number for v in found if v is not None)
    if newest >= state.serving_number():
        return  # not a rollback
    if any(v is not None and v.number <= state.secrets_changed_after for v in found):
        raise ApiError(
            400,
            SECRETS_CHANGED,
            "Secrets have changed since the version you are rolling back to was uploaded; "
            "deploy it with force=true to use the current secrets",
        )
