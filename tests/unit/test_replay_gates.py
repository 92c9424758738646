"""`coalmine replay` with the gates' inputs: a `freeze` line freezes advancing from its `t`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_replay import DEPLOY, obs, run

FREEZE = '{"t": "2026-03-03T18:00:00Z", "freeze": "incident freeze: PagerDuty incident #7"}'
LIFT = '{"t": "2026-03-03T18:01:05Z", "freeze": null}'


def test_a_freeze_line_holds_until_a_null_lifts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Frozen from 18:00: the hold after the step's minute names the incident; lifted at 18:01:05,
    that tick advances."""
    lines = [DEPLOY, FREEZE]
    lines += [obs(f"00:{s:02d}", 0.0, samples=100) for s in range(15, 60, 5)]
    lines += [obs("01:00", 0.0, samples=100), LIFT, obs("01:05", 0.0, samples=100)]
    code, decisions, _ = run(tmp_path, capsys, *lines)
    assert code == 3  # advanced, never promoted: no verdict
    actions = [(d["action"], d["t"][11:19]) for d in decisions]
    assert actions == [("start", "18:00:00"), ("hold", "18:01:00"), ("set_traffic", "18:01:05")]
    assert "PagerDuty incident #7" in decisions[1]["reason"]


def test_a_bad_freeze_line_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`freeze` must be a reason or null."""
    bad = '{"t": "2026-03-03T18:00:00Z", "freeze": 3}'
    code, _, err = run(tmp_path, capsys, DEPLOY, bad)
    assert code == 2
    assert '"freeze" must be the reason advancing is frozen, or null to lift it' in err
