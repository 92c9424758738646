"""The embedded demo and its policy file stay one and the same."""

from __future__ import annotations

from coalmine.cli import main
from coalmine.cli.demo import FAST_POLICY
from tests.support import ROOT


def test_embedded_policy_is_the_example_file() -> None:
    """`coalmine demo` runs exactly policies/examples/fast.yaml."""
    assert (ROOT / "policies" / "examples" / "fast.yaml").read_text() == FAST_POLICY


def test_demo_promotes_one_canary_and_rolls_back_the_other(capsys) -> None:  # type: ignore[no-untyped-def]
    """The demo's healthy canary is promoted and completes; the faulty one is rolled back; the
    shared incident is held through (a critical page, no rollback) and then promoted."""
    assert main(["demo", "--format", "jsonl"]) == 0
    actions = [line for line in capsys.readouterr().out.splitlines() if line]
    text = "\n".join(actions)
    assert text.count('"action": "promote"') == 2
    assert text.count('"action": "complete"') == 2
    assert text.count('"action": "rollback"') == 1
    assert "both versions breach: shared incident" in text
