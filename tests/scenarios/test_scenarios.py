"""The replay scenarios: recorded canaries through `coalmine replay`, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from coalmine.cli import main
from tests.support import ROOT

HERE = Path(__file__).resolve().parent
FAST = ROOT / "policies" / "examples" / "fast.yaml"


def replay(
    capsys: pytest.CaptureFixture[str], name: str, *flags: str, policy: Path = FAST
) -> list[dict[str, Any]]:
    """Replay a scenario file and return its decisions."""
    code = main(["replay", "--policy", str(policy), "--input", str(HERE / f"{name}.jsonl"), *flags])
    captured = capsys.readouterr()
    decisions = [json.loads(line) for line in captured.out.splitlines()]
    real = [d["action"] for d in decisions if not d.get("dry_run")]
    verdicts = [a for a in real if a in ("promote", "rollback")]
    expected = {"promote": 0, "rollback": 1}[verdicts[-1]] if verdicts else 3
    assert code == expected, captured.err  # like validate: 0 promoted, 1 rolled back, 3 none
    return decisions


def actions(decisions: list[dict[str, Any]]) -> list[str]:
    """The actions in order."""
    return [d["action"] for d in decisions]


def observations(name: str) -> list[dict[str, Any]]:
    """The observation lines of a scenario."""
    lines = (json.loads(line) for line in (HERE / f"{name}.jsonl").read_text().splitlines())
    return [line for line in lines if "rule" in line]


def test_healthy_canary_promoted_through_every_step(capsys: pytest.CaptureFixture[str]) -> None:
    """A healthy canary goes 10% -> 50% -> 100%, is watched, and becomes stable."""
    decisions = replay(capsys, "healthy-promotion")
    assert actions(decisions) == ["start", "set_traffic", "promote", "complete"]
    assert [d.get("canary_percent") for d in decisions[:3]] == [10, 50, 100]


def test_fault_at_50_is_rolled_back(capsys: pytest.CaptureFixture[str]) -> None:
    """A canary whose errors start at the 50% step is rolled back, with a critical page."""
    decisions = replay(capsys, "fault-at-50")
    assert actions(decisions) == ["start", "set_traffic", "rollback", "page"]
    rollback, page = decisions[2], decisions[3]
    # the comparison with the stable version trips first: 20 s into the step (the change
    # detector weighs the 10% step's healthy evidence against the fault), where the absolute
    # error_rate rule, warming up for 10 s, would still be waiting out its `for: 20s`
    assert rollback["canary_percent"] == 0 and rollback["rule"] == "errors_vs_stable"
    assert rollback["t"] == "2026-03-03T18:00:40Z"
    assert rollback["value"] > rollback["threshold"] == 1.5
    assert rollback["interval"][0] >= 1.5
    assert rollback["samples"] >= 50
    assert (
        page["severity"] == "critical"
        and page["dedup_key"] == "coalmine/demo-worker/v2/errors_vs_stable"
    )
    assert "promote" not in actions(decisions)


def test_flapping_metric_that_never_sustains_is_promoted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A metric breaching on every other tick never breaches for `for` in a row: promoted."""
    breaching = [
        o
        for o in observations("flapping")
        if o["rule"] == "latency_p99"
        and o["version"] == "canary"
        and isinstance(o["value"], float)
        and o["value"] > 1.0
    ]
    assert len(breaching) >= 5  # the metric really flaps
    assert actions(replay(capsys, "flapping")) == ["start", "set_traffic", "promote", "complete"]


def test_nan_storm_holds_and_pages_never_promotes(capsys: pytest.CaptureFixture[str]) -> None:
    """Every value NaN for minutes: the rollout holds, pages (warning) once, never advances."""
    decisions = replay(capsys, "nan-storm")
    assert not {"set_traffic", "promote", "rollback"} & set(actions(decisions))
    (page,) = [d for d in decisions if d["action"] == "page"]  # one outage, one page
    assert page["severity"] == "warning"
    assert page["dedup_key"].endswith("/inconclusive")
    for rule in ("error_rate", "errors_vs_stable", "latency_p99", "latency_p50_gate"):
        assert rule in page["reason"]
    assert "hold" in actions(decisions)


def test_traffic_under_min_samples_holds(capsys: pytest.CaptureFixture[str]) -> None:
    """At two requests a second the canary's windows are under min_samples: it holds."""
    decisions = replay(capsys, "low-traffic")
    assert not {"set_traffic", "promote", "rollback"} & set(actions(decisions))
    hold = next(d for d in decisions if d["action"] == "hold")
    assert "inconclusive" in hold["reason"]
    assert any(
        "samples < min_samples 20" in d["reason"] for d in decisions if d["action"] == "page"
    )


def test_pause_and_resume(capsys: pytest.CaptureFixture[str]) -> None:
    """Paused in the first step, the canary waits; resumed, it advances at once (hold elapsed)."""
    decisions = replay(capsys, "pause-resume")
    sequence = [a for a in actions(decisions) if a != "hold"]
    assert sequence == ["start", "pause", "resume", "set_traffic", "promote", "complete"]
    resume = next(d for d in decisions if d["action"] == "resume")
    advance = next(d for d in decisions if d["action"] == "set_traffic")
    assert advance["t"] == resume["t"] == "2026-03-03T18:01:00Z"
    assert all(
        "paused" in d["reason"] for d in decisions if d["action"] == "hold" and d["t"] < resume["t"]
    )


def test_canary_ready_outside_window_waits_for_it(capsys: pytest.CaptureFixture[str]) -> None:
    """Ready at Tue 16:00:30 Los Angeles, after the window closed: promoted at Wed 10:00 PST."""
    decisions = replay(capsys, "outside-window", policy=HERE / "windowed.yaml")
    assert actions(decisions) == ["start", "hold", "promote", "complete"]
    assert "next opens 2026-03-04T18:00:00Z" in decisions[1]["reason"]
    assert decisions[2]["t"] == "2026-03-04T18:00:30Z"  # the first tick inside the window


def test_no_auto_rollback_pages_and_holds(capsys: pytest.CaptureFixture[str]) -> None:
    """--no-auto-rollback: the faulty canary is paged (critical) and held, not rolled back."""
    decisions = replay(capsys, "fault-at-50", "--no-auto-rollback")
    assert "rollback" not in actions(decisions)
    page = next(d for d in decisions if d["action"] == "page")
    assert page["severity"] == "critical"
    assert actions(decisions)[-1] in ("hold", "page")


def test_no_auto_promote_stops_before_advancing(capsys: pytest.CaptureFixture[str]) -> None:
    """--no-auto-promote: the healthy canary holds at 10% waiting for an operator."""
    decisions = replay(capsys, "healthy-promotion", "--no-auto-promote")
    assert actions(decisions) == ["start", "hold"]
    assert "auto-promote is off" in decisions[1]["reason"]


def test_scenarios_are_what_the_generator_writes() -> None:
    """The committed files are the simulator's output (regenerate with tests.scenarios.generate)."""
    from coalmine.cli.simulate import run
    from tests.scenarios.generate import scenarios

    for name, sim in scenarios().items():
        records, _ = run(sim)
        expected = "".join(r.to_json() + "\n" for r in records)
        assert (HERE / f"{name}.jsonl").read_text() == expected, name
