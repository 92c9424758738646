"""README.md stays true: its replay example prints exactly what coalmine prints."""

from __future__ import annotations

import re

import pytest

from coalmine.cli import main
from tests.support import ROOT


def test_readme_replay_example_output_is_current(capsys: pytest.CaptureFixture[str]) -> None:
    """The timeline shown under "Backtest a policy" is the real output of the command above it."""
    readme = (ROOT / "README.md").read_text()
    shown = re.search(r"--format table\n```\n\n```\n(.*?)```", readme, re.S)
    assert shown is not None, "README lost its replay example"
    policy = ROOT / "policies" / "examples" / "fast.yaml"
    scenario = ROOT / "tests" / "scenarios" / "fault-at-50.jsonl"
    assert (
        main(["replay", "--policy", str(policy), "--input", str(scenario), "--format", "table"])
        == 1  # rolled back
    )
    assert capsys.readouterr().out == shown.group(1)
