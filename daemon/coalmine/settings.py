"""The daemon's configuration: environment variables ``COALMINE_*`` or a ``.env`` file.

Built once in ``main`` with :func:`load_settings` and passed down; nothing reads the
environment anywhere else. Secrets are :class:`~pydantic.SecretStr`, so they print as
``**********`` in logs, reprs and errors. A bad value raises :class:`ConfigError` naming the
variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coalmine.errors import ConfigError
from coalmine.policy import Duration

PREFIX = "COALMINE_"


def _url(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL, e.g. https://example.com")
    return value.rstrip("/")


class Settings(BaseSettings):
    """Every setting of DESIGN.md's configuration table, with its default."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_file=".env", extra="ignore", frozen=True, validate_default=True
    )

    policies: Path = Field(
        default=Path("policies/runbook.yaml"), description="A policy file or a folder of them."
    )
    cloudflare_account_id: str | None = Field(default=None, description="Required for live use.")
    cloudflare_api_token: SecretStr | None = Field(
        default=None, description="Required for live use."
    )
    cloudflare_api_url: str = Field(
        default="https://api.cloudflare.com/client/v4", description="GraphQL at {url}/graphql."
    )
    prometheus_url: str | None = Field(default=None, description="e.g. http://prometheus:9090.")
    grafana_url: str | None = Field(
        default=None, description="Grafana, for queries and annotations."
    )
    grafana_token: SecretStr | None = Field(
        default=None, description="Grafana service-account token."
    )
    grafana_datasource_uid: str | None = Field(
        default=None, description="Prometheus datasource UID."
    )
    pagerduty_routing_key: SecretStr | None = Field(default=None, description="Events v2 key.")
    pagerduty_url: str = Field(default="https://events.pagerduty.com", description="Events API.")
    slack_webhook_url: SecretStr | None = Field(default=None, description="Incoming webhook.")
    auto_rollback: bool = Field(default=True, description="false: page and hold instead.")
    auto_promote: bool = Field(default=True, description="false: stop before each advance.")
    dry_run: bool = Field(default=False, description="Evaluate, journal, notify; never write.")
    state_url: str = Field(default="sqlite:///coalmine.db", description="State and journal.")
    cloudflare_rate_limit: int = Field(
        default=600, gt=0, le=1200, description="Cloudflare requests per 5 minutes."
    )
    discovery_interval: Duration = Field(
        default=timedelta(seconds=60), description="How often idle scripts are checked."
    )
    listen: str = Field(default="127.0.0.1:9300", description="HTTP endpoints, host:port.")
    admin_token: SecretStr | None = Field(default=None, description="Bearer token for writes.")
    log_format: Literal["json", "console"] = Field(default="json", description="structlog output.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged."
    )

    @field_validator("cloudflare_api_url", "prometheus_url", "grafana_url", "pagerduty_url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return _url(value)

    @field_validator("slack_webhook_url")
    @classmethod
    def _check_secret_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            _url(value.get_secret_value())
        return value or None

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("must be host:port, e.g. 127.0.0.1:9300 (port 0: any free port)")
        return value

    @field_validator("state_url")
    @classmethod
    def _check_state_url(cls, value: str) -> str:
        if not value.startswith("sqlite:///") or value == "sqlite:///":
            raise ValueError("must be sqlite:///PATH (e.g. sqlite:///coalmine.db)")
        return value

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` split into host and port."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def state_path(self) -> Path:
        """The SQLite file named by ``state_url``."""
        return Path(self.state_url.removeprefix("sqlite:///"))


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return PREFIX + field.upper()


def load_settings(
    env: Mapping[str, str] | None = None, *, env_file: str | None = ".env"
) -> Settings:
    """Build the settings from the environment (or ``env``); raise :class:`ConfigError`."""
    try:
        if env is None:
            return Settings(_env_file=env_file)
        values: dict[str, Any] = {
            key.removeprefix(PREFIX).lower(): value
            for key, value in env.items()
            if key.startswith(PREFIX)
        }
        return Settings(_env_file=None, **values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{env_name(field)}: {message}")
        raise ConfigError("; ".join(lines)) from None
