"""`coalmine backtest` before it fetches anything: --dry shows the queries; bad input is exit 2."""

from __future__ import annotations

import pytest

from coalmine.cli import main
from tests.support import ROOT

RUNBOOK = str(ROOT / "policies" / "runbook.yaml")
RANGE = ["--from", "2026-03-03T18:00:00Z", "--to", "2026-03-03T20:00:00Z"]


def test_dry_prints_each_query_range_with_versions_filled_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--dry prints every canary rule's rendered query for both versions, and exits 0."""
    code = main(
        ["backtest", "--policy", RUNBOOK, *RANGE, "--canary", "v2", "--stable", "v1", "--dry"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "error_rate [canary] prometheus query, query_range start=2026-03-03T18:00:00Z" in out
    assert 'version="v2"' in out and 'version="v1"' in out
    assert "step=30s" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "2026-03-03T20:00:00Z", "--to", "2026-03-03T18:00:00Z"], "--to must be after"),
        (["--from", "yesterday", "--to", "2026-03-03T18:00:00Z"], "not an RFC 3339 time"),
        ([*RANGE, "--canary", "v2"], "--canary and --stable go together"),
        ([*RANGE], "COALMINE_CLOUDFLARE_ACCOUNT_ID"),
    ],
)
def test_bad_input_is_exit_2_with_a_clear_message(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backwards ranges, bad times, half a version pair, missing credentials: exit 2."""
    monkeypatch.delenv("COALMINE_CLOUDFLARE_ACCOUNT_ID", raising=False)
    assert main(["backtest", "--policy", RUNBOOK, *argv]) == 2
    assert message in capsys.readouterr().err
