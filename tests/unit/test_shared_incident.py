"""DESIGN.md "Shared incidents": ``shared_incident: hold`` on an absolute rollback rule.

"With `hold`, a `rollback` rule that trips while the stable version's evaluation of the same rule,
at the same tick, is conclusive and breaching holds and pages ("both versions breach: shared
incident") instead of rolling back; once the stable version recovers and the canary still
breaches, it rolls back as usual."
"""

from __future__ import annotations

import pytest

from coalmine.engine import Decision, Observation, RolloutPhase, RolloutState
from coalmine.errors import PolicyError
from coalmine.policy import Policy
from tests.support import Rollout, make_policy

P = RolloutPhase
KEY = "coalmine/api/v2/err"


def policy(shared: str = "hold", extra: str = "") -> Policy:
    """One step of 10% (hold 10m) and an error-rate rollback rule with ``shared_incident``."""
    return make_policy(
        f"""
version: 1
name: shared
scripts: [api]
analysis: {{interval: 10s, warmup: 0s}}
steps: [{{weight: 10, hold: 10m}}, {{weight: 100}}]
rules:
  - {{name: err, source: prometheus, query: q, samples: s, min_samples: 100, above: 0.05,
      for: 20s, on_breach: rollback, shared_incident: {shared}{extra}}}
"""
    )


def both(
    r: Rollout, seconds: float, canary: float, stable: float | None, samples: float = 1000
) -> list[Decision]:
    """A tick with the canary's and (unless None) the stable version's error rate."""
    obs = [Observation("err", "canary", canary, 1000)]
    if stable is not None:
        obs.append(Observation("err", "stable", stable, samples))
    return r.tick(seconds, *obs)


def shared_trip() -> Rollout:
    """Both versions at 20% errors from 10s: the rule trips at 30s and holds."""
    r = Rollout(policy())
    assert both(r, 10, 0.2, 0.2) == []
    decisions = both(r, 30, 0.2, 0.2)
    assert r.actions(decisions) == ["page", "hold"]
    return r


def test_a_shared_breach_holds_and_pages_instead_of_rolling_back() -> None:
    """A trip while the stable breaches too: one critical page saying "shared incident" and a
    hold; the canary stays at its step."""
    r = shared_trip()
    page, hold = r.decisions[-2:]
    assert (page.severity, page.dedup_key) == ("critical", KEY)
    assert "both versions breach: shared incident" in page.reason
    assert "shared incident" in hold.reason
    assert r.state.phase is P.CANARY
    assert both(r, 40, 0.2, 0.2) == []  # still shared: nothing new


def test_it_rolls_back_once_the_stable_recovers_and_the_canary_still_breaches() -> None:
    """The stable version back under the threshold while the canary still breaches: the
    rollback happens as usual, at once (the rule has already tripped)."""
    r = shared_trip()
    decisions = both(r, 40, 0.2, 0.01)
    assert r.actions(decisions) == ["rollback", "page"]
    assert r.state.phase is P.ROLLED_BACK


def test_the_page_resolves_when_both_recover() -> None:
    """The shared incident ends with the canary recovering: its page resolves, no rollback."""
    r = shared_trip()
    (resolve,) = both(r, 40, 0.01, 0.01)
    assert (resolve.action, resolve.dedup_key) == ("resolve", KEY)
    assert r.state.phase is P.CANARY


def test_a_held_shared_incident_blocks_advancing() -> None:
    """While held for a shared incident the rule is breaching: the canary does not advance
    after its hold."""
    r = shared_trip()
    both(r, 600, 0.2, 0.2)
    assert r.state.canary_percent == 10
    assert "rollback" not in r.actions() and "set_traffic" not in r.actions()


def test_an_inconclusive_canary_decides_nothing_while_held() -> None:
    """Held, then an inconclusive canary tick while the stable recovers: no rollback on an
    inconclusive evaluation; the next conclusive breaching one rolls back."""
    r = shared_trip()
    assert r.tick(40, Observation("err", "stable", 0.01, 1000)) == []
    assert r.state.phase is P.CANARY
    assert r.actions(both(r, 50, 0.2, 0.01)) == ["rollback", "page"]


@pytest.mark.parametrize(
    ("stable", "samples"),
    [(None, 1000), (0.2, 10)],
    ids=["no stable observation", "stable under min_samples"],
)
def test_an_inconclusive_stable_is_no_shared_incident(stable: float | None, samples: float) -> None:
    """Only a conclusive, breaching stable evaluation at the same tick holds: a missing one, or
    one under min_samples, lets the rule roll back."""
    r = Rollout(policy())
    both(r, 10, 0.2, stable, samples)
    assert r.actions(both(r, 30, 0.2, stable, samples)) == ["rollback", "page"]


def test_the_default_rolls_back_whatever_the_stable_does() -> None:
    """`shared_incident: rollback` (the default) rolls back though the stable breaches too,
    and the page says both versions are affected."""
    r = Rollout(policy("rollback"))
    both(r, 10, 0.2, 0.2)
    rollback, _ = both(r, 30, 0.2, 0.2)
    assert rollback.action == "rollback"
    assert "both versions are affected" in rollback.reason


def test_a_shared_incident_with_auto_rollback_off_pages_once_then_holds_for_an_operator() -> None:
    """Auto-rollback off: the shared hold pages; when the stable recovers the usual "not
    rolling back, holding" page follows."""
    r = Rollout(policy(), auto_rollback=False)
    both(r, 10, 0.2, 0.2)
    assert r.actions(both(r, 30, 0.2, 0.2)) == ["page", "hold"]
    decisions = both(r, 40, 0.2, 0.01)
    assert r.actions(decisions) == ["page", "hold"]
    assert "auto-rollback is off" in decisions[0].reason
    assert r.state.phase is P.CANARY


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "{name: r, source: cloudflare, signal: errors, compare: {max_ratio: 2},"
            " on_breach: rollback, shared_incident: hold}",
            "rules[0].shared_incident: a compare rule already judges the canary against the "
            "stable version; shared_incident is for above/below rules",
        ),
        (
            "{name: r, source: prometheus, query: q, above: 1, on_breach: page,"
            " shared_incident: hold}",
            "rules[0].shared_incident: only a rollback rule can hold for a shared incident, "
            "not a page rule",
        ),
        (
            "{name: r, source: prometheus, query: q, above: 1, shared_incident: later}",
            "rules[0].shared_incident: Input should be 'rollback' or 'hold'",
        ),
    ],
)
def test_check_policy_refuses_shared_incident_where_it_means_nothing(
    rule: str, message: str
) -> None:
    """`shared_incident: hold` only on absolute rollback rules; other values are refused."""
    text = (
        "version: 1\nname: p\nscripts: [api]\nsteps: [{weight: 10}, {weight: 100}]\n"
        f"rules:\n  - {rule}\n"
    )
    with pytest.raises(PolicyError) as caught:
        make_policy(text)
    assert [str(p) for p in caught.value.problems] == [f"<test>:6: {message}"]


def test_shared_incident_survives_the_policy_and_state_round_trip() -> None:
    """The held flag is part of the persisted state: a restart keeps holding, then rolls back
    when the stable recovers."""
    r = shared_trip()
    r.state = RolloutState.from_json(r.state.to_json())
    assert r.state.rules["err"].shared
    assert r.actions(both(r, 40, 0.2, 0.01)) == ["rollback", "page"]
