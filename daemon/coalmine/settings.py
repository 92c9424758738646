"""The daemon's configuration: environment variables ``COALMINE_*`` or a ``.env`` file.

Built once in ``main`` with :func:`load_settings` and passed down; nothing reads the
environment anywhere else. A ``COALMINE_*`` variable that is no setting (a misspelling) stops
start-up with a "did you mean". Secrets are :class:`~pydantic.SecretStr`, so they print as
``**********`` in logs, reprs and errors. A bad value raises :class:`ConfigError` naming the
variable.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, DotEnvSettingsSource, SettingsConfigDict

from coalmine.cloudflare.reading import READING
from coalmine.durations import format_duration
from coalmine.errors import ConfigError
from coalmine.policy import Duration
from coalmine.store.urls import is_postgres_url, postgres_url_problem

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
    pagerduty_api_token: SecretStr | None = Field(
        default=None,
        description="PagerDuty REST API token (read-only) for incident freezes. "
        "Required when a policy has `freeze`.",
    )
    pagerduty_api_url: str = Field(
        default="https://api.pagerduty.com", description="PagerDuty REST API base."
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
        repr=False,  # a PostgreSQL URL may carry a password
        description="Where rollout state, intents, outbox and the journal live: `sqlite:///PATH` "
        "(one process) or `postgresql://USER:PASSWORD@HOST:PORT/DB` (shared by replicas).",
    )
    lease_ttl: Duration = Field(
        default=timedelta(seconds=15),
        description="Replicas on PostgreSQL: how long a script's lease lasts unrenewed before"
        " another replica takes the script over (renewed every third of it).",
    )
    replica_id: str | None = Field(
        default=None,
        description="This replica's name in leases, /metrics and `coalmine status`; one live"
        " process per id (an older process still running under it acts on nothing)."
        " Unset: hostname-pid.",
    )
    cloudflare_rate_limit: int = Field(
        default=600,
        gt=0,
        le=1200,
        description="Cloudflare API calls per 5 minutes (the token's budget is 1,200). Replicas"
        " on one token share it: each spends at most this over the live replicas.",
    )
    cloudflare_graphql_rate_limit: int = Field(
        default=200,
        gt=0,
        le=300,
        description="GraphQL analytics queries per 5 minutes, a budget apart from the REST one"
        " (Cloudflare's is 300; 1 a second when it answers `X-Rate-Limit-Type: account-based`)."
        " Replicas on one token share it, as the REST one.",
    )
    discovery_interval: Duration = Field(
        default=timedelta(seconds=60),
        description="How often coalmine looks for new splits across the account: one GraphQL"
        " query for every watched script's serving versions (without it, one deployment read"
        " per idle script).",
    )
    drift_interval: Duration = Field(
        default=timedelta(minutes=30),
        description="An idle script's deployment is read at least this often, signal or not"
        " (a split on a script with no traffic, a missed signal).",
    )
    canary_drift_interval: Duration = Field(
        default=timedelta(minutes=2),
        description="A script with a live canary reads its deployment at least this often"
        " (every tick when its interval is longer), before every write, and when the signal"
        " says its versions changed: how late a hand-made change can be noticed.",
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
        "cloudflare_api_url",
        "prometheus_url",
        "grafana_url",
        "pagerduty_url",
        "pagerduty_api_url",
        "public_url",
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

    @field_validator("replica_id")
    @classmethod
    def _check_replica_id(cls, value: str | None) -> str | None:
        if not value:  # empty: unset
            return None
        if len(value) > 200 or not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError("must be up to 200 printable characters without spaces, e.g. pod-0")
        return value

    @field_validator("lease_ttl")
    @classmethod
    def _check_lease_ttl(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("must be at least 1s, e.g. 15s")
        return value

    @field_validator("drift_interval", "canary_drift_interval")
    @classmethod
    def _check_drift_interval(cls, value: timedelta) -> timedelta:
        if value < timedelta(seconds=1):
            raise ValueError("must be at least 1s, e.g. 30m")
        return value

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
        if is_postgres_url(value):
            problem = postgres_url_problem(value)
            if problem:
                raise ValueError(f"not a usable PostgreSQL URL: {problem}")
            return value
        if not value.startswith("sqlite:///") or value == "sqlite:///":
            raise ValueError(
                "must be sqlite:///PATH (e.g. sqlite:///coalmine.db)"
                " or postgresql://USER:PASSWORD@HOST:PORT/DB"
            )
        return value

    @property
    def listen_address(self) -> tuple[str, int]:
        """``listen`` split into host and port."""
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def replica(self) -> str:
        """This replica's id: ``COALMINE_REPLICA_ID``, else hostname-pid."""
        return self.replica_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def state_path(self) -> Path:
        """The SQLite file named by ``state_url``."""
        return Path(self.state_url.removeprefix("sqlite:///"))


def env_name(field: str) -> str:
    """The environment variable of a settings field."""
    return PREFIX + field.upper()


# Read outside the settings model (by the command line), so not unknown.
NOT_SETTINGS = frozenset({"COALMINE_DEBUG"})


def unknown_variables(names: Iterable[str], where: str = "") -> list[str]:
    """A problem for each ``COALMINE_*`` name that is no setting, with the likeliest meant."""
    known = sorted({env_name(field) for field in Settings.model_fields} | NOT_SETTINGS)
    problems = []
    for name in sorted({n.upper() for n in names if n.upper().startswith(PREFIX)}):
        if name in known:
            continue
        # compared without the prefix, which every name shares and would make all look alike
        tails = [k.removeprefix(PREFIX) for k in known]
        close = difflib.get_close_matches(name.removeprefix(PREFIX), tails, n=1, cutoff=0.6)
        hint = f"did you mean {PREFIX}{close[0]}?" if close else "see docs/configuration.md"
        problems.append(f"{name}{where}: unknown variable; {hint}")
    return problems


def _check_names(env: Mapping[str, str] | None, env_file: str | None) -> None:
    """A misspelt variable would be ignored silently (``COALMINE_DRYRUN=true`` running live):
    refuse every ``COALMINE_*`` name that is no setting, from the environment or ``.env``."""
    problems = unknown_variables(os.environ if env is None else env)
    if env is None and env_file is not None and Path(env_file).is_file():
        dotenv = DotEnvSettingsSource(Settings, env_file=env_file).env_vars
        problems += unknown_variables(dotenv, f" (in {env_file})")
    if problems:
        raise ConfigError("; ".join(problems))


def load_settings(
    env: Mapping[str, str] | None = None, *, env_file: str | None = ".env"
) -> Settings:
    """Build the settings from the environment (or ``env``); raise :class:`ConfigError`,
    also for a ``COALMINE_*`` variable that is no setting."""
    _check_names(env, env_file)
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
        "directory). A malformed value stops it with a message naming the variable (exit 2), and",
        "so does a `COALMINE_*` variable that is none of these, in the environment or `.env` (a",
        "misspelt variable would otherwise be ignored): the message names the likeliest meant.",
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
        "`COALMINE_STATE_URL` picks the state store. `sqlite:///PATH` (the default) is one file",
        "for one process. `postgresql://USER:PASSWORD@HOST:PORT/DB` (or `postgres://`; libpq's",
        "parameters may follow, e.g. `?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem`) keeps",
        "the same tables in PostgreSQL, which several processes may share; coalmine creates and",
        "migrates its tables at start. Off loopback, a URL without `sslmode` (and no `PGSSLMODE`)",
        "connects over TLS and verifies the server's certificate against the system's roots. The",
        "password is never printed: logs, `/health` and errors show the URL without it.",
        "",
        "One more variable is read by the command line only: `COALMINE_DEBUG=1` makes an",
        "internal error (a bug, exit 70) print its Python traceback instead of one line.",
        "",
        "Settings are read once, at start. SIGHUP reloads the policies only (`COALMINE_POLICIES`),",
        "validated first: an invalid set is refused with a warning and the running policies stay",
        '(see [reliability.md, "Signals"](reliability.md#signals)). At start, a',
        "`COALMINE_STATE_URL` whose database cannot be used (a missing or read-only folder, a file",
        "that is not a SQLite database or is corrupt, a schema from a newer coalmine) stops",
        "coalmine with exit 2, naming the file and the cause.",
        "",
        READING,
    ]
    return "\n".join(lines)
