"""Input hygiene: Worker names checked, operator text escaped, misspelt variables refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from coalmine.cli import main
from coalmine.engine import Decision, RolloutState
from coalmine.errors import ConfigError
from coalmine.notify.outbox import notifications, plain, slack_escape
from coalmine.settings import load_settings
from tests.support import at

STEPS = "steps:\n  - {weight: 10, hold: 5m}\n  - {weight: 100}\n"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder (no .env) with no COALMINE_* variable in the environment."""
    monkeypatch.chdir(tmp_path)
    for name in [n for n in os.environ if n.upper().startswith("COALMINE_")]:
        monkeypatch.delenv(name)
    return tmp_path


def check_policy(text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """Run check-policy on ``text`` as p.yaml: (exit code, stderr lines)."""
    Path("p.yaml").write_text(text, encoding="utf-8")
    code = main(["check-policy", "p.yaml"])
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.usefixtures("workdir")
def test_script_names_follow_cloudflares_rule(capsys: pytest.CaptureFixture[str]) -> None:
    """check-policy refuses names Cloudflare would not accept (path tricks, query strings,
    capitals, a leading dash), each at its file:line:field, exit 2; valid names pass."""
    text = (
        "version: 1\nname: t\n"
        "scripts:\n"
        "  - api_v2-edge\n"
        "  - x/../../zones\n"
        "  - 'api?force=true&'\n"
        "  - Shop\n"
        "  - -lead\n" + STEPS
    )
    code, errors = check_policy(text, capsys)
    rule = (
        "is not a Cloudflare Worker name: lowercase letters, digits, - and _, not starting with -"
    )
    assert (code, errors) == (
        2,
        [
            f"p.yaml:5: scripts[1]: 'x/../../zones' {rule}",
            f"p.yaml:6: scripts[2]: 'api?force=true&' {rule}",
            f"p.yaml:7: scripts[3]: 'Shop' {rule}",
            f"p.yaml:8: scripts[4]: '-lead' {rule}",
        ],
    )
    code, errors = check_policy("version: 1\nname: t\nscripts: [_a, b-9, c_d]\n" + STEPS, capsys)
    assert (code, errors) == (0, [])


def decision(action: str, reason: str, script: str = "api") -> Decision:
    """A decision carrying operator-supplied text in its reason."""
    return Decision(
        t=at(60),
        action=action,
        reason=reason,
        script=script,
        canary="v2",
        stable="v1",
        severity="critical",
        dedup_key="coalmine/api/v2/x",
    )


def test_operator_text_cannot_ping_or_link_in_slack() -> None:
    """&, < and > in an operator's text reach Slack escaped: no <!channel>, no forged link."""
    reason = "operator rollback: <!channel> see <https://evil.example|the runbook> & more"
    items = notifications([decision("rollback", reason)], RolloutState("api"))
    text = next(n for n in items if n.channel == "slack").payload["text"]
    assert "<" not in text.replace(":rotating_light:", "")
    assert ">" not in text
    assert "&lt;!channel&gt;" in text
    assert "&amp; more" in text
    assert slack_escape("a&b<c>d") == "a&amp;b&lt;c&gt;d"


def test_pagerduty_text_stays_one_plain_line() -> None:
    """Line breaks and control characters in operator text become spaces in PagerDuty text."""
    reason = "paused by ops\nSEVERITY: resolved\r\x1b[31mred\x00"
    items = notifications([decision("page", reason)], RolloutState("api"))
    summary = next(n for n in items if n.channel == "pagerduty").payload["payload"]["summary"]
    assert summary == "coalmine api: paused by ops SEVERITY: resolved  [31mred "
    assert plain("a\u2028b\tc") == "a b c"


def test_a_misspelt_variable_is_refused_with_a_suggestion() -> None:
    """COALMINE_DRYRUN is no setting: a ConfigError names it and suggests COALMINE_DRY_RUN."""
    with pytest.raises(ConfigError) as caught:
        load_settings({"COALMINE_DRYRUN": "true"})
    assert str(caught.value) == (
        "COALMINE_DRYRUN: unknown variable; did you mean COALMINE_DRY_RUN?"
    )


def test_an_unlike_unknown_variable_points_at_the_reference() -> None:
    """A name close to no setting points at docs/configuration.md; other prefixes are ignored."""
    with pytest.raises(ConfigError, match="COALMINE_ZZZ: unknown variable; see docs/config"):
        load_settings({"COALMINE_ZZZ": "1", "CRASH_TEST_SEED": "4", "OTHER": "x"})
    assert load_settings({"CRASH_TEST_SEED": "4", "COALMINE_DEBUG": "1"}).dry_run is False


def test_unknown_variable_in_the_environment_stops_start_up_with_exit_2(
    workdir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`coalmine run` with COALMINE_DRYRUN=true set exits 2 before starting, saying which."""
    monkeypatch.setenv("COALMINE_DRYRUN", "true")
    assert main(["run"]) == 2
    assert "COALMINE_DRYRUN: unknown variable; did you mean COALMINE_DRY_RUN?" in (
        capsys.readouterr().err
    )


def test_unknown_variable_in_dotenv_is_refused_too(workdir: Path) -> None:
    """A misspelt name in .env is refused, and the message says it came from .env."""
    (workdir / ".env").write_text("COALMINE_LISTEN=127.0.0.1:0\ncoalmine_auto_rolback=false\n")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "COALMINE_AUTO_ROLBACK (in .env): unknown variable; did you mean COALMINE_AUTO_ROLLBACK?"
    )
