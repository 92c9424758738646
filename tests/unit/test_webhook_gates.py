"""DESIGN.md "Webhook rules" and "Incident freeze", in the engine: when a webhook is due, what
its answer does, and what a freeze holds.

A webhook's observation is its value: 0 for a 2xx answer, the HTTP status otherwise, an error for
a timeout. The virtual clock is ``at(s)`` = T0 + s.
"""

from __future__ import annotations

import pytest

from coalmine.engine import Command, Observation, RolloutPhase, RuleStatus
from coalmine.errors import PolicyError
from coalmine.policy import Policy
from tests.support import Rollout, at, make_policy

P = RolloutPhase
ERR = "  - {name: err, source: prometheus, query: q, above: 0.05, on_breach: rollback}"


def policy(*rules: str, watch: str = "10m", extra: str = "") -> Policy:
    """10% held 60s, then 100%; warm-up 0s; the given rules (YAML list items)."""
    body = "\n".join(rules)
    return make_policy(
        f"""
version: 1
name: hooks
scripts: [api]
analysis: {{interval: 10s, warmup: 0s, inconclusive_page_after: 1m}}
steps: [{{weight: 10, hold: 60s}}, {{weight: 100}}]
post_promotion: {{watch: {watch}}}
{extra}
rules:
{body}
"""
    )


def hook(when: str, **fields: str) -> str:
    """A webhook rule `smoke` called ``when``."""
    more = "".join(f", {k}: {v}" for k, v in fields.items())
    return (
        f"  - {{name: smoke, source: webhook, url: 'http://127.0.0.1:9/smoke', when: {when}{more}}}"
    )


def due(r: Rollout, seconds: float, frozen: str | None = None) -> list[str]:
    """The names of the rules a tick at ``seconds`` would evaluate."""
    return [rule.name for rule in r.engine.active_rules(r.state, at(seconds), frozen)]


def tick(
    r: Rollout, seconds: float, err: float | None = 0.01, smoke: float | None = None
) -> list[str]:
    """A tick with `err` and, when given, the webhook's value; the actions."""
    obs = [Observation("err", "canary", err)] if err is not None else []
    if smoke is not None:
        obs.append(Observation("smoke", "canary", smoke))
    return r.actions(r.tick(seconds, *obs))


def test_before_advance_is_called_once_the_hold_elapsed_and_every_other_gate_passes() -> None:
    """Not due before the hold; due at the first tick after it while `err` passed at the tick
    before; a 2xx answer at that tick advances (here: promotes)."""
    r = Rollout(policy(ERR, hook("before_advance")))
    tick(r, 10)
    assert due(r, 50) == ["err"]
    tick(r, 50)
    assert due(r, 60) == ["err", "smoke"]
    assert tick(r, 60, smoke=0) == ["promote"]


def test_before_advance_is_not_called_while_another_gate_fails() -> None:
    """A breaching (or not yet evaluated) gate at the tick before: the smoke test waits."""
    r = Rollout(
        policy(
            ERR, "  - {name: gate, source: prometheus, query: g, above: 1}", hook("before_advance")
        )
    )
    assert due(r, 60) == ["err", "gate"]  # nothing evaluated yet
    r.tick(60, Observation("err", "canary", 0.01), Observation("gate", "canary", 5))
    assert due(r, 70) == ["err", "gate"]


def test_before_advance_failing_holds_and_is_called_every_tick_until_it_passes() -> None:
    """A 503 breaches: the canary holds (a hold rule pages); it is called at every tick while
    it fails, whatever the other gates, and a later 2xx advances."""
    r = Rollout(policy(ERR.replace("rollback", "hold"), hook("before_advance")))
    tick(r, 50)
    assert tick(r, 60, smoke=503) == ["page", "hold"]
    assert r.state.rules["smoke"].value == 503
    assert r.state.canary_percent == 10
    tick(r, 70, err=0.5, smoke=503)  # err breaches: still due while failing
    assert due(r, 80) == ["err", "smoke"]
    assert tick(r, 80, smoke=0) == ["resolve", "resolve", "promote"]  # err, smoke


def test_before_advance_rollback_rolls_back_on_a_failing_smoke_test() -> None:
    """`on_breach: rollback`: a non-2xx answer rolls the canary back, as any rollback rule."""
    r = Rollout(policy(ERR, hook("before_advance", on_breach="rollback")))
    tick(r, 50)
    assert tick(r, 60, smoke=500) == ["rollback", "page"]
    assert r.state.phase is P.ROLLED_BACK


def test_before_advance_timeout_is_inconclusive_and_holds() -> None:
    """A timeout is inconclusive: the canary holds, nothing rolls back, and it is called again."""
    r = Rollout(policy(ERR, hook("before_advance", on_breach="rollback")))
    tick(r, 50)
    r.tick(
        60,
        Observation("err", "canary", 0.01),
        Observation("smoke", "canary", None, error="timeout after 30s"),
    )
    assert r.state.rules["smoke"].status is RuleStatus.INCONCLUSIVE
    assert r.state.phase is P.CANARY
    assert due(r, 70) == ["err", "smoke"]


def test_a_pass_at_an_earlier_tick_does_not_let_the_canary_advance_later() -> None:
    """Only a call made at this tick counts: a smoke test that passed while another gate
    then failed is called again before the canary advances."""
    gate = "  - {name: gate, source: prometheus, query: g, above: 1}"
    r = Rollout(policy(ERR, gate, hook("before_advance")))
    r.tick(50, Observation("err", "canary", 0.01), Observation("gate", "canary", 0))
    decisions = r.tick(
        60,
        Observation("err", "canary", 0.01),
        Observation("gate", "canary", 5),
        Observation("smoke", "canary", 0),
    )
    assert r.actions(decisions) == ["page", "hold"]  # the gate trips
    r.tick(70, Observation("err", "canary", 0.01), Observation("gate", "canary", 0))
    assert r.state.canary_percent == 10  # the smoke test was not called at 70s
    assert due(r, 80) == ["err", "gate", "smoke"]


def test_every_tick_is_always_called() -> None:
    """`when: every_tick` runs at every tick of its phases."""
    r = Rollout(policy(ERR, hook("every_tick")))
    assert due(r, 10) == ["err", "smoke"]


def test_after_promotion_runs_after_promotion_until_it_passes() -> None:
    """`after_promotion`: not in the canary phase; after promotion until a call passes; a
    failing call with on_breach rollback rolls the promoted version back."""
    r = Rollout(policy(ERR, hook("after_promotion", on_breach="rollback")))
    assert due(r, 10) == ["err"]
    tick(r, 50)
    assert tick(r, 60) == ["promote"]
    assert due(r, 70) == ["smoke"]
    assert r.actions(r.tick(70, Observation("smoke", "canary", 502))) == ["rollback", "page"]
    assert r.state.phase is P.ROLLED_BACK


def test_after_promotion_stops_once_it_passed() -> None:
    """A 2xx after promotion: not called again during the watch."""
    r = Rollout(policy(ERR, hook("after_promotion")))
    tick(r, 50)
    tick(r, 60)
    r.tick(70, Observation("smoke", "canary", 0))
    assert due(r, 80) == []


def test_after_rollback_runs_after_a_rollback_and_pages_critical_when_it_fails() -> None:
    """`after_rollback`: called after the rollback until a call passes; a failing call pages
    critical; a later pass resolves the page."""
    r = Rollout(policy(ERR, hook("after_rollback")))
    assert due(r, 10) == ["err"]
    assert tick(r, 10, err=0.5) == ["rollback", "page"]
    assert due(r, 20) == ["smoke"]
    (page,) = r.tick(20, Observation("smoke", "canary", 500))
    assert (page.action, page.severity, page.dedup_key) == (
        "page",
        "critical",
        "coalmine/api/v2/smoke",
    )
    (resolve,) = r.tick(30, Observation("smoke", "canary", 0))
    assert resolve.action == "resolve"
    assert due(r, 40) == []


def test_a_new_rollout_resolves_a_failing_after_rollback_page() -> None:
    """An open after_rollback page is resolved when a new rollout starts."""
    r = Rollout(policy(ERR, hook("after_rollback")))
    tick(r, 10, err=0.5)
    r.tick(20, Observation("smoke", "canary", 500))
    decisions = r.deploy(30, "v1", "v3", 10)
    assert r.actions(decisions) == ["resolve", "start"]


# ---- incident freeze -------------------------------------------------------------------------

FROZEN = "incident freeze: PagerDuty incident #42 'db down' (triggered) on PX1"


def test_a_freeze_holds_advancing_and_names_the_incident() -> None:
    """While frozen the canary does not advance after its hold; the hold names the incident;
    advancing resumes once the freeze lifts."""
    r = Rollout(policy(ERR))
    r.engine.tick(r.state, at(10), [Observation("err", "canary", 0.01)], frozen=FROZEN)
    outcome = r.engine.tick(r.state, at(60), [Observation("err", "canary", 0.01)], frozen=FROZEN)
    r.state = outcome.state
    (hold,) = outcome.decisions
    assert hold.action == "hold"
    assert "#42 'db down'" in hold.reason
    assert tick(r, 70) == ["promote"]


def test_a_freeze_never_stops_a_rollback() -> None:
    """Rollbacks are never frozen."""
    r = Rollout(policy(ERR))
    outcome = r.engine.tick(r.state, at(10), [Observation("err", "canary", 0.5)], frozen=FROZEN)
    assert [d.action for d in outcome.decisions] == ["rollback", "page"]


@pytest.mark.parametrize("kind", ["start", "promote"])
def test_a_freeze_refuses_start_and_promote(kind: str) -> None:
    """`coalmine start` and an operator's `promote` are refused while frozen, naming why."""
    r = Rollout(policy(ERR), percent=0 if kind == "start" else 10)
    if kind == "start":
        r.deploy(0, "v1", None, 0)
    outcome = r.engine.command(r.state, Command(kind, "v2"), at(20), frozen=FROZEN)  # type: ignore[arg-type]
    (warn,) = outcome.decisions
    assert (warn.action, warn.reason) == ("warn", f"{kind} refused: {FROZEN}")
    assert outcome.state.phase is r.state.phase


def test_a_freeze_keeps_before_advance_webhooks_waiting() -> None:
    """A freeze is a gate: a before_advance smoke test is not called while frozen."""
    r = Rollout(policy(ERR, hook("before_advance")))
    tick(r, 50)
    assert due(r, 60, FROZEN) == ["err"]
    assert due(r, 60) == ["err", "smoke"]


# ---- check-policy --------------------------------------------------------------------------

URL = "url: 'https://smoke.example/run'"


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "{name: s, source: webhook}",
            "rules[0].url: a webhook rule needs a url, http:// or https://",
        ),
        (
            "{name: s, source: webhook, url: 'ftp://x/y'}",
            "rules[0].url: a webhook rule needs a url, http:// or https://",
        ),
        (
            f"{{name: s, source: webhook, {URL}, above: 1}}",
            "rules[0].above: a webhook rule takes no `above`: a 2xx answer passes, any other status breaches",
        ),
        (
            "{name: s, source: prometheus, query: q, above: 1, when: every_tick}",
            "rules[0].when: only a webhook rule takes `when`",
        ),
        (
            "{name: s, source: prometheus, query: q, above: 1, url: 'http://x/'}",
            "rules[0].url: only a webhook rule takes `url`",
        ),
        (
            f"{{name: s, source: webhook, {URL}, on_breach: page}}",
            "rules[0].on_breach: a before_advance webhook gates advancing: on_breach rollback or hold",
        ),
        (
            f"{{name: s, source: webhook, {URL}, when: after_rollback, phases: [canary]}}",
            "rules[0].phases: when: after_rollback sets the phase; leave `phases` out",
        ),
        (
            f"{{name: s, source: webhook, {URL}, when: after_rollback, on_breach: rollback}}",
            "rules[0].on_breach: an after_rollback webhook pages critical when it fails; leave `on_breach` out",
        ),
        (
            f"{{name: s, source: webhook, {URL}, timeout: 0s}}",
            "rules[0].timeout: must be longer than 0s",
        ),
        (
            f"{{name: s, source: webhook, {URL}, when: later}}",
            "rules[0].when: Input should be 'before_advance', 'every_tick', 'after_promotion' or 'after_rollback'",
        ),
    ],
)
def test_check_policy_explains_bad_webhook_rules(rule: str, message: str) -> None:
    """Each misuse of a webhook rule's fields is one clear problem naming the field."""
    text = f"version: 1\nname: p\nscripts: [api]\nsteps: [{{weight: 10}}, {{weight: 100}}]\nrules:\n  - {rule}\n"
    with pytest.raises(PolicyError) as caught:
        make_policy(text)
    assert [str(p) for p in caught.value.problems] == [f"<test>:6: {message}"]


def test_a_webhook_and_a_freeze_load() -> None:
    """A policy with every kind of webhook and a freeze loads; the freeze keeps its services."""
    pol = policy(
        ERR,
        hook("before_advance", on_breach="rollback", timeout="10s"),
        hook("after_rollback").replace("smoke", "after", 1),
        extra="freeze: {pagerduty_services: [PX1, PX2]}",
    )
    assert pol.freeze is not None and pol.freeze.pagerduty_services == ["PX1", "PX2"]
    assert [r.source for r in pol.rules] == ["prometheus", "webhook", "webhook"]


def test_an_empty_freeze_is_refused() -> None:
    """`freeze` needs at least one service."""
    with pytest.raises(PolicyError, match="pagerduty_services"):
        policy(ERR, extra="freeze: {pagerduty_services: []}")
