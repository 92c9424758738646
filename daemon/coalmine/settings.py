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

from coalmine.durations import format_duration
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
        default=Path("policies/runbook.yaml"),
        description="A policy file, or a folder whose *.yaml files are all loaded.",
    )
    cloudflare_account_id: str | None = Field(
        default=None, description="Account that owns the Workers. Required to run."
    )
    cloudflare_api_token: SecretStr | None = Field(
        default=None,
        description="API token: Workers Scripts Edit, Account Analytics Read. Required to run.",
    )
    cloudflare_api_url: str = Field(
        default="https://api.cloudflare.com/client/v4",
        description="Cloudflare API base; GraphQL analytics at {url}/graphql.",
    )
    prometheus_url: str | None = Field(
        default=None, description="Prometheus for `prometheus` rules, e.g. http://prometheus:9090."
    )
    grafana_url: str | None = Field(
        default=None, description="Grafana, for `grafana` rules (datasource proxy) and annotations."
    )
    grafana_token: SecretStr | None = Field(
        default=None, description="Grafana service-account token (Editor, for annotations)."
    )
    grafana_datasource_uid: str | None = Field(
        default=None, description="UID of the Prometheus datasource `grafana` rules query."
    )
    pagerduty_routing_key: SecretStr | None = Field(
        default=None,
        description="PagerDuty Events v2 routing key: pages and change events. Unset: none sent.",
    )
    pagerduty_url: str = Field(
        default="https://events.pagerduty.com", description="PagerDuty Events API base."
    )
    slack_webhook_url: SecretStr | None = Field(
        default=None,
        description="Slack incoming webhook for warnings and outcomes. Unset: none sent.",
    )
    auto_rollback: bool = Field(
        default=True,
        description="`false`: a tripped rollback rule pages and holds instead of rolling back.",
    )
    auto_promote: bool = Field(
        default=True, description="`false`: stop before each advance until an operator promotes."
    )
    dry_run: bool = Field(
        default=False, description="`true`: evaluate, journal and notify, never change traffic."
    )
    state_url: str = Field(
        default="sqlite:///coalmine.db",
        description="SQLite file for rollout state, intents, outbox and the journal.",
    )
    cloudflare_rate_limit: int = Field(
        default=600,
        gt=0,
        le=1200,
        description="Cloudflare API calls per 5 minutes (the token's budget is 1,200).",
    )
    discovery_interval: Duration = Field(
        default=timedelta(seconds=60),
        description="How often scripts without a canary are checked for a new split.",
    )
    listen: str = Field(
        default="127.0.0.1:9300",
        description="host:port of /metrics, /health and the admin API (port 0: any).",
    )
    public_url: str | None = Field(
        default=None,
        description="Where people reach coalmine's listener, for the links in pages "
        "(default: http:// and `COALMINE_LISTEN`).",
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for the admin API's writes. Unset: writes refused."
    )
    log_format: Literal["json", "console"] = Field(
        default="json", description="`json` lines or a `console` renderer, on stderr."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level logged: debug, info, warning, error."
    )

    @field_validator(
        "cloudflare_api_url", "prometheus_url", "grafana_url", "pagerduty_url", "public_url"
    )
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


def reference() -> str:
    """The configuration reference (docs/configuration.md), generated from :class:`Settings`."""
    lines = [
        "# Configuration",
        "",
        "coalmine reads its settings from environment variables (or a `.env` file in the working",
        "directory). A malformed value stops it with a message naming the variable (exit 2).",
        "Secrets are never printed, logged or exported. This file is generated from",
        "`coalmine.settings.Settings`; a test fails when the two differ.",
        "",
        "| variable | default | meaning |",
        "|---|---|---|",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, timedelta):
            shown = f"`{format_duration(default)}`"
        elif default is None:
            shown = "—"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default}`"
        secret = " (secret)" if "SecretStr" in str(field.annotation) else ""
        lines.append(f"| `{env_name(name)}` | {shown} | {field.description}{secret} |")
    lines += [
        "",
        "One more variable is read by the command line only: `COALMINE_DEBUG=1` makes an",
        "internal error (a bug, exit 70) print its Python traceback instead of one line.",
    ]
    return "\n".join(lines) + "\n"
