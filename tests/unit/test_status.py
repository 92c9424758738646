"""`coalmine status` as people read it: what it waits for, in 100 columns, colour on terminals."""

from __future__ import annotations

import io
from typing import Any

from coalmine.cli.status import WIDTH, render, use_colour

CANARY = "0c3f5e2a-1b2c-4d5e-8f90-123456789abc"
STABLE = "9a8b7c6d-5e4f-4a3b-9c2d-1e0f9a8b7c6d"


def rollout(**changes: Any) -> dict[str, Any]:
    """A rollout object as the API answers it: a canary at 10%, its hold running."""
    base: dict[str, Any] = {
        "script": "slidecraft-api",
        "policy": "runbook",
        "phase": "canary",
        "canary": CANARY,
        "stable": STABLE,
        "canary_percent": 10,
        "step": 1,
        "steps": [10, 50, 100],
        "rules": {},
        "recent_decisions": [],
        "dry_run": False,
        "live": {"stable": STABLE, "canary": CANARY, "canary_percent": 10},
        "hold_remaining_seconds": 754.2,
        "next_step_at": "2026-03-03T18:30:00Z",
        "next_percent": 50,
        "waiting_for": [],
        "watch_ends_at": None,
        "traffic_change": None,
    }
    return base | changes


def test_status_shows_the_hold_remaining_and_the_next_step() -> None:
    """A running hold: time left and when the next step is due, versions shortened."""
    lines = render([rollout()])
    assert lines[0] == "slidecraft-api  CANARY  step 1/3  canary 0c3f5e2a over 9a8b7c6d"
    assert lines[1] == "  split 10% (live)"
    assert lines[2] == "  hold 12m35s left; next step 50% at 18:30:00Z"


def test_status_says_what_blocks_the_next_step_and_which_rules_fail() -> None:
    """After the hold: the blockers, breaching rules with value vs threshold, and why others
    are inconclusive."""
    rules = {
        "error_rate": {"status": "breaching", "value": 0.0123, "threshold": 0.005, "operator": ">"},
        "latency_p99": {"status": "inconclusive", "detail": "source prometheus failed: timeout"},
        "cpu": {"status": "ok", "value": 3.0, "threshold": 50, "operator": ">"},
    }
    waiting = ["error_rate breaching (0.0123 > 0.005)", "outside the deployment windows"]
    lines = render([rollout(hold_remaining_seconds=0, waiting_for=waiting, rules=rules)])
    assert lines[2:5] == [
        "  hold done; next step 50% waits for:",
        "    - error_rate breaching (0.0123 > 0.005)",
        "    - outside the deployment windows",
    ]
    assert "  breaching error_rate: 0.0123 > 0.005" in lines
    assert "  inconclusive latency_p99: source prometheus failed: timeout" in lines
    assert not [line for line in lines if "cpu" in line]


def test_a_dry_run_shows_the_live_split_beside_the_one_it_would_have_set() -> None:
    """Dry run: the headline says DRY RUN; the live 10% stands beside the would-be 50%."""
    lines = render([rollout(dry_run=True, canary_percent=50, step=2)])
    assert "DRY RUN" in lines[0]
    assert lines[1] == "  live 10%; coalmine would have set 50% (dry run: traffic unchanged)"


def test_a_manual_change_shows_both_splits_and_how_to_adopt_it() -> None:
    """Stood down after drift: the live 30% beside coalmine's 10%, and `resume` named."""
    live = {"stable": STABLE, "canary": CANARY, "canary_percent": 30}
    lines = render([rollout(phase="stood_down", live=live, next_percent=None)])
    assert lines[1] == "  live 30%; coalmine set 10%"
    assert "`coalmine resume` adopts the live split" in lines[2]


def test_a_refused_traffic_change_is_shown() -> None:
    """A Cloudflare change that is refused is shown with the error."""
    change = {"state": "refused", "kind": "set_traffic", "error": "HTTP 429: rate limited"}
    lines = render([rollout(traffic_change=change)])
    assert lines[-1] == "  traffic change refused: set_traffic: HTTP 429: rate limited"


def test_every_line_fits_100_columns_even_in_colour() -> None:
    """Long reasons are cut at 100 visible columns, colour escapes not counted."""
    rules = {f"rule_{i}": {"status": "inconclusive", "detail": "x" * 300} for i in range(3)}
    long = rollout(script="s" * 63, rules=rules, waiting_for=["y" * 300], hold_remaining_seconds=0)
    for colour in (False, True):
        for line in render([long], colour=colour):
            visible = line
            for code in ("\x1b[0m", "\x1b[1m", "\x1b[31m", "\x1b[33m", "\x1b[35m"):
                visible = visible.replace(code, "")
            assert len(visible) <= WIDTH, line


def test_colour_only_on_a_terminal() -> None:
    """A pipe gets plain text; colour is for terminals."""
    assert use_colour(io.StringIO()) is False
    assert "\x1b[" not in "".join(render([rollout()], colour=False))
    assert "\x1b[" in "".join(render([rollout()], colour=True))


def test_an_idle_script_is_one_line() -> None:
    """A script with no canary is a single line with its stable version."""
    assert render([rollout(phase="idle", canary=None, canary_percent=0, step=0)]) == [
        "slidecraft-api  IDLE  stable 9a8b7c6d"
    ]


def test_status_names_the_replica_holding_each_script() -> None:
    """Replicas: the headline names the lease's holder and epoch, "-" while none holds it;
    a daemon running alone (no lease field) shows no holder."""
    held = render([rollout(lease={"holder": "coalmine-1", "epoch": 4})])
    lapsed = render([rollout(lease={"holder": None, "epoch": 4})])
    assert held[0].startswith("slidecraft-api  CANARY  holder coalmine-1@4  step 1/3")
    assert "holder -" in lapsed[0]
    assert "holder" not in render([rollout()])[0]
