"""Settings: DESIGN.md's configuration table, and errors that name the variable."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from coalmine.errors import ConfigError
from coalmine.settings import Settings, env_name, load_settings


def test_defaults_are_the_documented_ones() -> None:
    """With nothing set, every default is DESIGN.md's."""
    s = load_settings({})
    assert s.policies == Path("policies/runbook.yaml")
    assert s.cloudflare_api_url == "https://api.cloudflare.com/client/v4"
    assert s.pagerduty_url == "https://events.pagerduty.com"
    assert (s.auto_rollback, s.auto_promote, s.dry_run) == (True, True, False)
    assert s.state_url == "sqlite:///coalmine.db"
    assert s.cloudflare_rate_limit == 600
    assert s.discovery_interval == timedelta(seconds=60)
    assert s.listen_address == ("127.0.0.1", 9300)  # loopback by default
    assert s.admin_token is None
    assert (s.log_format, s.log_level) == ("json", "info")


def test_values_from_the_environment() -> None:
    """COALMINE_* variables set the fields, booleans and durations included."""
    s = load_settings(
        {
            "COALMINE_AUTO_ROLLBACK": "false",
            "COALMINE_DRY_RUN": "1",
            "COALMINE_DISCOVERY_INTERVAL": "2m",
            "COALMINE_LISTEN": "0.0.0.0:9400",
            "COALMINE_STATE_URL": "sqlite:////var/lib/coalmine/state.db",
            "COALMINE_PROMETHEUS_URL": "http://prometheus:9090/",
        }
    )
    assert (s.auto_rollback, s.dry_run) == (False, True)
    assert s.discovery_interval == timedelta(minutes=2)
    assert s.listen_address == ("0.0.0.0", 9400)
    assert s.state_path == Path("/var/lib/coalmine/state.db")
    assert s.prometheus_url == "http://prometheus:9090"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("COALMINE_AUTO_ROLLBACK", "maybe", "valid boolean"),
        ("COALMINE_AUTO_PROMOTE", "yes please", "valid boolean"),
        ("COALMINE_CLOUDFLARE_RATE_LIMIT", "lots", "valid integer"),
        ("COALMINE_CLOUDFLARE_RATE_LIMIT", "0", "greater than 0"),
        ("COALMINE_CLOUDFLARE_RATE_LIMIT", "5000", "less than or equal to 1200"),
        ("COALMINE_DISCOVERY_INTERVAL", "60", "is not a duration"),
        ("COALMINE_LISTEN", "9300", "must be host:port"),
        ("COALMINE_LISTEN", "localhost:http", "must be host:port"),
        ("COALMINE_PROMETHEUS_URL", "prometheus:9090", "http(s) URL"),
        ("COALMINE_STATE_URL", "mysql://db/coalmine", "sqlite:///PATH"),
        ("COALMINE_STATE_URL", "postgres://db.internal", "name the database"),
        (
            "COALMINE_STATE_URL",
            "postgresql://u@db/c?colour=red",
            'invalid URI query parameter: "colour"',
        ),
        ("COALMINE_LOG_FORMAT", "xml", "'json' or 'console'"),
        ("COALMINE_LOG_LEVEL", "loud", "'debug'"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str, message: str) -> None:
    """A malformed variable raises ConfigError starting with its name."""
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value})
    assert str(caught.value).startswith(f"{variable}: ")
    assert message in str(caught.value)


def test_secrets_never_show() -> None:
    """Tokens, keys and webhook URLs are hidden in repr, str and errors."""
    secret = "sk-live-0123456789abcdef"
    s = load_settings(
        {
            "COALMINE_CLOUDFLARE_API_TOKEN": secret,
            "COALMINE_ADMIN_TOKEN": secret,
            "COALMINE_PAGERDUTY_ROUTING_KEY": secret,
            "COALMINE_GRAFANA_TOKEN": secret,
            "COALMINE_SLACK_WEBHOOK_URL": f"https://hooks.slack.com/services/{secret}",
        }
    )
    assert secret not in repr(s) and secret not in str(s.model_dump())
    assert s.admin_token is not None and s.admin_token.get_secret_value() == secret
    with pytest.raises(ConfigError) as caught:
        load_settings({"COALMINE_SLACK_WEBHOOK_URL": f"not-a-url-{secret}"})
    assert secret not in str(caught.value)
    assert str(caught.value).startswith("COALMINE_SLACK_WEBHOOK_URL: ")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://coalmine:s3cret-pw@db.internal:5432/coalmine",
        "postgres://coalmine@db.internal/coalmine?password=s3cret-pw&sslmode=verify-full",
    ],
)
def test_postgres_state_url_is_accepted_and_its_password_never_shows(url: str) -> None:
    """postgresql:// and postgres:// URLs are accepted; their password is not in the settings'
    repr, nor in the error about a malformed one."""
    s = load_settings({"COALMINE_STATE_URL": url})
    assert s.state_url == url
    assert "s3cret-pw" not in repr(s) and "s3cret-pw" not in str(s)
    with pytest.raises(ConfigError) as caught:
        load_settings({"COALMINE_STATE_URL": url + ("&" if "?" in url else "?") + "colour=red"})
    assert "s3cret-pw" not in str(caught.value)
    assert str(caught.value).startswith("COALMINE_STATE_URL: ")


def test_every_field_has_a_variable_and_description() -> None:
    """Each setting maps to COALMINE_<FIELD> and says what it is for."""
    for name, field in Settings.model_fields.items():
        assert env_name(name) == "COALMINE_" + name.upper()
        assert field.description, name


def test_configuration_reference_is_generated_from_the_model() -> None:
    """docs/configuration.md is exactly what the settings model generates (regenerate it with
    `python -c "from coalmine.settings import reference; print(reference(), end='')"`)."""
    from coalmine.settings import reference
    from tests.support import ROOT

    assert (ROOT / "docs" / "configuration.md").read_text() == reference()
