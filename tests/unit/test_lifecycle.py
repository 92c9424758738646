"""The rollout lifecycle, one test per sentence of DESIGN.md that pins it.

Covers "Rollout lifecycle (per Worker script)" and the lifecycle bullets of "Exact semantics",
plus the operator switches (auto-rollback, auto-promote, dry run). Each test is a short timeline
on the virtual clock against a small inline policy; every engine call made through
:class:`Timeline` also checks that the state handed in was left untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from coalmine.engine import (
    Command,
    Decision,
    Deployment,
    Engine,
    Observation,
    Options,
    Outcome,
    RolloutPhase,
    RolloutState,
    RuleStatus,
)
from coalmine.engine.model import CommandKind
from coalmine.policy import Policy
from tests.support import T0, make_policy

P = RolloutPhase

ERR = "  - {name: err, source: prometheus, query: err, above: 0.05, for: 20s, on_breach: rollback}"
GATE = "  - {name: gate, source: prometheus, query: gate, above: 0.2, for: 5m, on_breach: hold}"
STEPS = """\
  - {weight: 10, hold: 60s}
  - {weight: 50, hold: 90s}
  - {weight: 100}"""
WINDOWS = """\
deployment_windows:
  timezone: America/Los_Angeles
  allow: [{days: [tue, wed, thu], from: "10:00", to: "16:00"}]"""
# Saturday 2026-03-07 03:00 in Los Angeles (PST): far outside the windows above.
SATURDAY_NIGHT = datetime(2026, 3, 7, 11, 0, tzinfo=UTC)
ERR_KEY = "coalmine/api/v2/err"


def policy(
    *rules: str,
    steps: str = STEPS,
    watch: str = "120s",
    page_after: str = "5m",
    extra: str = "",
) -> Policy:
    """A small policy for script `api`: 10% (60s) → 50% (90s) → 100%, warm-up 10s."""
    rule_lines = "\n".join(rules or (ERR,))
    return make_policy(
        f"""\
version: 1
name: lifecycle
scripts: [api]
analysis: {{interval: 10s, warmup: 10s, inconclusive_page_after: {page_after}}}
steps:
{steps}
post_promotion: {{watch: {watch}}}
{extra}
rules:
{rule_lines}
"""
    )


class Timeline:
    """Script `api` driven by hand: every call happens at ``base`` + seconds."""

    def __init__(self, pol: Policy, *, base: datetime = T0, options: Options | None = None) -> None:
        self.engine = Engine(pol, options)
        self.state = self.engine.new_state("api")
        self.base = base

    def at(self, seconds: float) -> datetime:
        """The instant ``seconds`` after this timeline's base."""
        return self.base + timedelta(seconds=seconds)

    def _take(self, call: Callable[..., Outcome], *args: object) -> list[Decision]:
        before = self.state.to_json()
        outcome = call(self.state, *args)
        assert self.state.to_json() == before, "the engine mutated the state it was given"
        self.state = outcome.state
        return outcome.decisions

    def deploy(
        self, seconds: float, stable: str, canary: str | None = None, percent: int = 0
    ) -> list[Decision]:
        """The live deployment as read at ``seconds``."""
        live = Deployment.of(stable, canary, percent)
        return self._take(self.engine.observe_deployment, live, self.at(seconds))

    def command(
        self, seconds: float, kind: CommandKind, version: str | None = None
    ) -> list[Decision]:
        """An operator's command at ``seconds``."""
        return self._take(self.engine.command, Command(kind, version), self.at(seconds))

    def tick(self, seconds: float, **values: float | None) -> list[Decision]:
        """One evaluation; each keyword is a rule's canary value (1000 samples); others missing."""
        observations = [Observation(rule, "canary", v, 1000) for rule, v in values.items()]
        return self._take(self.engine.tick, self.at(seconds), observations)


def acts(decisions: list[Decision]) -> list[tuple[str, int | None]]:
    """Each decision as (action, canary_percent)."""
    return [(d.action, d.canary_percent) for d in decisions]


def adopted(pol: Policy | None = None, percent: int = 10, **options: bool) -> Timeline:
    """A timeline that adopted v2 at ``percent`` over v1 at 0s."""
    run = Timeline(pol or policy(), options=Options(**options))
    assert acts(run.deploy(0, "v1", "v2", percent)) == [("start", percent)]
    return run


def promoted() -> Timeline:
    """The default policy's canary promoted at 150s by healthy ticks (v2 over v1)."""
    run = adopted()
    assert acts(run.tick(60, err=0.01)) == [("set_traffic", 50)]
    assert acts(run.tick(150, err=0.01)) == [("promote", 100)]
    return run


# ---- Rollout lifecycle (per Worker script) -----------------------------------------------


def test_a_healthy_canary_goes_idle_canary_promoted_idle() -> None:
    """ "`IDLE` (one version at 100%) → `CANARY` (step i: canary at weight w_i) → `PROMOTED` (canary at 100%, post-promotion watch) → `IDLE`; or → `ROLLED_BACK` (stable at 100%)."

    The healthy path passes through every phase with the weights and steps it names.
    """
    run = Timeline(policy())
    assert run.state.phase is P.IDLE
    assert run.deploy(0, "v1") == []
    assert (run.state.phase, run.state.stable, run.state.canary) == (P.IDLE, "v1", None)
    assert acts(run.deploy(10, "v1", "v2", 10)) == [("start", 10)]
    assert (run.state.phase, run.state.step, run.state.canary_percent) == (P.CANARY, 0, 10)
    assert acts(run.tick(70, err=0.01)) == [("set_traffic", 50)]
    assert (run.state.phase, run.state.step, run.state.canary_percent) == (P.CANARY, 1, 50)
    assert acts(run.tick(160, err=0.01)) == [("promote", 100)]
    assert (run.state.phase, run.state.canary_percent) == (P.PROMOTED, 100)
    assert run.state.expected == Deployment("v2")
    assert acts(run.tick(280)) == [("complete", None)]
    assert (run.state.phase, run.state.stable, run.state.canary) == (P.IDLE, "v2", None)


@pytest.mark.parametrize("phase_at_trip", ["canary", "promoted"])
def test_a_tripped_rollout_ends_rolled_back_with_stable_at_100(phase_at_trip: str) -> None:
    """ "`IDLE` (one version at 100%) → `CANARY` (step i: canary at weight w_i) → `PROMOTED` (canary at 100%, post-promotion watch) → `IDLE`; or → `ROLLED_BACK` (stable at 100%)."

    A rollback from the canary or from the post-promotion watch leaves v1 alone at 100%.
    """
    post = (
        "  - {name: post, source: prometheus, query: post, above: 0.05, on_breach: rollback,"
        " phases: [post_promotion]}"
    )
    run = Timeline(policy(ERR, post))
    run.deploy(0, "v1", "v2", 10)
    if phase_at_trip == "canary":
        run.tick(10, err=1.0)
        assert acts(run.tick(30, err=1.0)) == [("rollback", 0), ("page", None)]
    else:
        run.tick(60, err=0.01)
        run.tick(150, err=0.01)
        assert run.state.phase is P.PROMOTED
        assert acts(run.tick(170, post=1.0)) == [("rollback", 0), ("page", None)]
    assert run.state.phase is P.ROLLED_BACK
    assert run.state.expected == Deployment("v1")
    assert run.state.canary_percent == 0
    assert run.deploy(200, "v1") == []
    assert run.state.phase is P.ROLLED_BACK


def test_operators_can_pause_and_resume_a_canary() -> None:
    """ "Operators can `PAUSE`/`RESUME` a canary."

    pause and resume move CANARY → PAUSED → CANARY as operator decisions; pausing no canary warns.
    """
    idle = Timeline(policy())
    assert acts(idle.command(0, "pause")) == [("warn", None)]
    assert idle.state.phase is P.IDLE
    run = adopted()
    paused = run.command(20, "pause")
    assert acts(paused) == [("pause", None)]
    assert paused[0].actor == "operator"
    assert run.state.phase is P.PAUSED
    resumed = run.command(30, "resume")
    assert acts(resumed) == [("resume", None)]
    assert resumed[0].actor == "operator"
    assert run.state.phase is P.CANARY


def test_a_split_deployment_starts_a_canary_with_the_split_roles() -> None:
    """ "A canary starts when coalmine sees a deployment that splits traffic between two versions (started by `wrangler versions deploy` or by `coalmine start`); the version with the smaller share that was uploaded later is the canary, the other is stable."

    A split read from Cloudflare starts a canary (actor coalmine); a single version does not.
    """
    run = Timeline(policy())
    assert run.deploy(0, "v1") == []
    assert run.state.phase is P.IDLE
    started = run.deploy(30, "v1", "v2", 10)
    assert acts(started) == [("start", 10)]
    assert (started[0].canary, started[0].stable, started[0].actor) == ("v2", "v1", "coalmine")
    assert started[0].t == run.at(30)
    assert (run.state.phase, run.state.canary, run.state.stable) == (P.CANARY, "v2", "v1")
    assert run.state.expected == Deployment("v1", "v2", 10)


def test_coalmine_start_starts_a_canary_at_the_first_step() -> None:
    """ "A canary starts when coalmine sees a deployment that splits traffic between two versions (started by `wrangler versions deploy` or by `coalmine start`); the version with the smaller share that was uploaded later is the canary, the other is stable."

    `start v2` over a known v1 sets v2 to the first weight; reading that split back is no drift.
    """
    run = Timeline(policy())
    assert acts(run.command(0, "start", "v2")) == [("warn", None)]  # no live deployment seen yet
    run.deploy(5, "v1")
    assert acts(run.command(5, "start", "v1")) == [("warn", None)]  # already the stable version
    started = run.command(10, "start", "v2")
    assert acts(started) == [("start", None), ("set_traffic", 10)]
    assert all(d.actor == "operator" for d in started)
    assert (run.state.phase, run.state.canary, run.state.stable) == (P.CANARY, "v2", "v1")
    assert run.state.expected == Deployment("v1", "v2", 10)
    assert run.state.warmup_until == run.at(20)
    assert run.deploy(15, "v1", "v2", 10) == []
    assert run.state.phase is P.CANARY
    assert acts(run.command(20, "start", "v3")) == [("warn", None)]  # one rollout at a time
    assert run.tick(69, err=0.01) == []
    assert acts(run.tick(70, err=0.01)) == [("set_traffic", 50)]  # hold counted from the start


def test_drift_stands_down_warns_and_waits_for_resume() -> None:
    """ "If the live deployment ever differs from what coalmine last set (someone changed it by hand), coalmine stops acting on that rollout, warns, and waits for `resume`."

    A hand-set 30% warns and stands down; nothing advances after the hold until `resume`.
    """
    run = adopted()
    drift = run.deploy(30, "v1", "v2", 30)
    assert acts(drift) == [("warn", None)]
    assert run.state.phase is P.STOOD_DOWN
    assert run.state.expected == Deployment("v1", "v2", 10)
    assert run.tick(100, err=0.01) == []
    assert run.tick(1000, err=0.01) == []
    assert run.state.phase is P.STOOD_DOWN
    assert acts(run.command(1010, "resume")) == [("resume", 30)]
    assert run.state.phase is P.CANARY


def test_hold_counts_from_when_coalmine_set_the_split() -> None:
    """ "A step's `hold` counts from the moment its traffic split took effect (for an adopted canary, from when coalmine first saw the split)."

    After coalmine moves to 50% at 60s, the 90s hold ends at 150s, not earlier.
    """
    run = adopted()
    assert acts(run.tick(60, err=0.01)) == [("set_traffic", 50)]
    assert run.state.step_started_at == run.at(60)
    assert run.tick(149, err=0.01) == []
    assert acts(run.tick(150, err=0.01)) == [("promote", 100)]


def test_hold_of_an_adopted_canary_counts_from_first_sight() -> None:
    """ "A step's `hold` counts from the moment its traffic split took effect (for an adopted canary, from when coalmine first saw the split)."

    First seen at 45s, the 60s hold ends at 105s; seeing the same split again does not restart it.
    """
    run = Timeline(policy())
    run.deploy(0, "v1")
    assert acts(run.deploy(45, "v1", "v2", 10)) == [("start", 10)]
    assert run.deploy(80, "v1", "v2", 10) == []
    assert run.tick(104, err=0.01) == []
    assert acts(run.tick(105, err=0.01)) == [("set_traffic", 50)]


@pytest.mark.parametrize(
    ("percent", "step", "hold", "next_decision"),
    [
        (30, 0, 60, ("set_traffic", 50)),
        (49, 0, 60, ("set_traffic", 50)),
        (50, 1, 90, ("promote", 100)),
        (75, 1, 90, ("promote", 100)),
    ],
)
def test_adopted_split_off_the_weights_is_the_highest_step_not_above_it(
    percent: int, step: int, hold: int, next_decision: tuple[str, int]
) -> None:
    """ "An adopted split that is not one of the policy's weights is treated as the highest step whose weight does not exceed it."

    The adopted percent picks the step, its hold, and so the next weight.
    """
    run = adopted(percent=percent)
    assert (run.state.step, run.state.canary_percent) == (step, percent)
    assert run.tick(hold - 1, err=0.01) == []
    assert acts(run.tick(hold, err=0.01)) == [next_decision]


def test_gating_rules_are_the_active_rollback_and_hold_rules() -> None:
    """ "*Gating rules* are the rules active in the current phase whose `on_breach` is `rollback` or `hold`."

    Missing rollback/hold rules block advancing; breaching page/warn and post-promotion rules do not.
    """
    run = adopted(
        policy(
            ERR,
            GATE,
            "  - {name: pg, source: prometheus, query: pg, above: 1, for: 5m, on_breach: page}",
            "  - {name: wn, source: prometheus, query: wn, above: 1, for: 5m, on_breach: warn}",
            "  - {name: post, source: prometheus, query: post, above: 1, on_breach: rollback,"
            " phases: [post_promotion]}",
        )
    )
    held = run.tick(60, err=0.01, pg=5, wn=5)
    assert acts(held) == [("hold", None)]
    assert held[0].rule == "gate"
    assert "gate" in held[0].reason
    assert not any(name in held[0].reason for name in ("pg", "wn", "post", "err"))
    held = run.tick(70, gate=0.1, pg=5, wn=5)
    assert acts(held) == [("hold", None)]
    assert held[0].rule == "err"
    assert acts(run.tick(80, err=0.01, gate=0.1, pg=5, wn=5)) == [("set_traffic", 50)]


def test_advancing_needs_the_hold_elapsed() -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    With every gate passing, the first step advances exactly when its 60s hold has elapsed.
    """
    run = adopted()
    assert run.tick(30, err=0.01) == []
    assert run.tick(59, err=0.01) == []
    assert acts(run.tick(60, err=0.01)) == [("set_traffic", 50)]


def test_advancing_needs_every_gating_rule_conclusive_and_not_breaching() -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    The latest evaluation counts: inconclusive holds, breaching (not yet tripped) holds, OK advances.
    """
    run = adopted(policy(ERR, GATE))
    run.tick(30, err=0.01, gate=0.1)
    held = run.tick(60, err=0.01, gate=None)
    assert acts(held) == [("hold", None)]
    assert held[0].rule == "gate"
    assert run.state.rules["gate"].status is RuleStatus.INCONCLUSIVE
    held = run.tick(70, err=0.01, gate=0.3)
    assert acts(held) == [("hold", None)]
    assert (held[0].rule, held[0].value) == ("gate", 0.3)
    assert run.state.rules["gate"].status is RuleStatus.BREACHING
    assert acts(run.tick(80, err=0.01, gate=0.1)) == [("set_traffic", 50)]


def test_advancing_only_inside_a_deployment_window() -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    Adopted at 15:59 Tuesday (LA), the canary holds at 16:00 and advances at Wednesday 10:00.
    """
    base = T0 + timedelta(hours=5, minutes=59)
    run = Timeline(policy(extra=WINDOWS), base=base)
    run.deploy(0, "v1", "v2", 10)
    held = run.tick(60, err=0.01)
    assert acts(held) == [("hold", None)]
    assert "deployment window" in held[0].reason
    wednesday_10 = (T0 + timedelta(days=1) - base).total_seconds()
    assert run.tick(wednesday_10 - 1, err=0.01) == []
    assert acts(run.tick(wednesday_10, err=0.01)) == [("set_traffic", 50)]


def test_advancing_stops_while_paused() -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    A paused canary with every gate passing holds once its hold has elapsed, and never advances.
    """
    run = adopted()
    run.command(20, "pause")
    assert run.tick(30, err=0.01) == []
    held = run.tick(60, err=0.01)
    assert acts(held) == [("hold", None)]
    assert "paused" in held[0].reason
    assert run.tick(600, err=0.01) == []
    assert (run.state.phase, run.state.canary_percent) == (P.PAUSED, 10)


def test_advancing_needs_auto_promote_on() -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    With auto-promote off a healthy canary holds after its hold and stays at 10%.
    """
    run = adopted(auto_promote=False)
    held = run.tick(60, err=0.01)
    assert acts(held) == [("hold", None)]
    assert "auto-promote" in held[0].reason
    assert run.tick(600, err=0.01) == []
    assert run.state.canary_percent == 10


def test_operator_promote_skips_hold_window_auto_promote_and_inconclusive_gates() -> None:
    """ "An operator's `promote` advances one step at once, skipping the hold, the deployment window, auto-promote and inconclusive gates, but not while a gating rule is breaching."

    Saturday night, 5s into the hold, auto-promote off, gates inconclusive: promote moves to 50%.
    """
    run = Timeline(
        policy(ERR, GATE, extra=WINDOWS), base=SATURDAY_NIGHT, options=Options(auto_promote=False)
    )
    run.deploy(0, "v1", "v2", 10)
    run.tick(3, err=None)
    promoted_ = run.command(5, "promote")
    assert acts(promoted_) == [("set_traffic", 50)]
    assert promoted_[0].actor == "operator"
    assert (run.state.step, run.state.canary_percent) == (1, 50)
    assert acts(run.command(6, "promote")) == [("promote", 100)]
    assert run.state.phase is P.PROMOTED


def test_operator_promote_is_refused_while_a_gating_rule_is_breaching() -> None:
    """ "An operator's `promote` advances one step at once, skipping the hold, the deployment window, auto-promote and inconclusive gates, but not while a gating rule is breaching."

    A rollback rule breaching (not yet tripped) refuses promote; once it passes, promote works.
    """
    run = adopted()
    run.tick(20, err=1.0)
    refused = run.command(25, "promote")
    assert acts(refused) == [("warn", None)]
    assert refused[0].rule == "err"
    assert (run.state.phase, run.state.canary_percent) == (P.CANARY, 10)
    run.tick(30, err=0.01)
    assert acts(run.command(35, "promote")) == [("set_traffic", 50)]


def test_rollback_needs_a_tripped_rollback_rule() -> None:
    """ "Rolling back needs a tripped `rollback` rule and auto-rollback on (or an operator's `rollback`), and is allowed at any hour."

    Breaching for less than `for` does nothing; the trip at breached_since + `for` rolls back.
    """
    run = adopted()
    assert run.tick(10, err=1.0) == []
    assert run.state.rules["err"].breached_since == run.at(10)
    assert run.tick(29, err=1.0) == []
    decisions = run.tick(30, err=1.0)
    assert acts(decisions) == [("rollback", 0), ("page", None)]
    assert decisions[1].severity == "critical"
    assert decisions[1].dedup_key == ERR_KEY
    assert run.state.phase is P.ROLLED_BACK


def test_a_tripped_hold_rule_pages_but_does_not_roll_back() -> None:
    """ "Rolling back needs a tripped `rollback` rule and auto-rollback on (or an operator's `rollback`), and is allowed at any hour."

    A `hold` rule tripping pages (error) and holds; the canary stays at 10%.
    """
    hold_rule = "  - {name: gate, source: prometheus, query: gate, above: 0.2, on_breach: hold}"
    run = adopted(policy(ERR, hold_rule))
    decisions = run.tick(10, err=0.01, gate=0.5)
    assert acts(decisions) == [("page", None), ("hold", None)]
    assert (decisions[0].severity, decisions[0].dedup_key) == ("error", "coalmine/api/v2/gate")
    assert (run.state.phase, run.state.canary_percent) == (P.CANARY, 10)


def test_auto_rollback_off_pages_and_holds() -> None:
    """ "Rolling back needs a tripped `rollback` rule and auto-rollback on (or an operator's `rollback`), and is allowed at any hour."

    Auto-rollback off: the trip pages critical and holds; the page resolves when the rule recovers.
    """
    run = adopted(auto_rollback=False)
    run.tick(10, err=1.0)
    decisions = run.tick(30, err=1.0)
    assert acts(decisions) == [("page", None), ("hold", None)]
    assert (decisions[0].severity, decisions[0].dedup_key) == ("critical", ERR_KEY)
    assert (run.state.phase, run.state.canary_percent) == (P.CANARY, 10)
    assert run.state.expected == Deployment("v1", "v2", 10)
    assert run.tick(40, err=1.0) == []
    resolved = run.tick(50, err=0.01)
    assert acts(resolved) == [("resolve", None)]
    assert resolved[0].dedup_key == ERR_KEY


def test_operator_rollback_rolls_back_without_a_trip() -> None:
    """ "Rolling back needs a tripped `rollback` rule and auto-rollback on (or an operator's `rollback`), and is allowed at any hour."

    An operator's rollback of a healthy canary emits rollback at 0%; with nothing to roll back it warns.
    """
    run = adopted()
    run.tick(20, err=0.01)
    decisions = run.command(25, "rollback")
    assert acts(decisions) == [("rollback", 0)]
    assert decisions[0].actor == "operator"
    assert run.state.phase is P.ROLLED_BACK
    assert run.state.expected == Deployment("v1")
    assert acts(run.command(30, "rollback")) == [("warn", None)]


def test_rollback_is_allowed_at_any_hour() -> None:
    """ "Rolling back needs a tripped `rollback` rule and auto-rollback on (or an operator's `rollback`), and is allowed at any hour."

    Saturday 03:00 Los Angeles, outside every window: the trip still rolls back.
    """
    run = Timeline(policy(extra=WINDOWS), base=SATURDAY_NIGHT)
    run.deploy(0, "v1", "v2", 10)
    run.tick(10, err=1.0)
    decisions = run.tick(30, err=1.0)
    assert acts(decisions) == [("rollback", 0), ("page", None)]
    assert decisions[0].t == SATURDAY_NIGHT + timedelta(seconds=30)
    assert run.state.phase is P.ROLLED_BACK


# ---- Exact semantics: traffic changes ----------------------------------------------------


def test_every_traffic_change_starts_a_warmup_and_clears_breach_tracking() -> None:
    """ "Every traffic change — adoption included — starts a warm-up and clears every rule's breach tracking."

    Warm-up after adoption and after 50% judges nothing; a breach begun at 10% restarts at 50%.
    """
    lat = "  - {name: lat, source: prometheus, query: lat, above: 1, for: 60s, on_breach: page}"
    run = adopted(policy(ERR, lat))
    assert run.state.warmup_until == run.at(10)
    assert run.tick(5, err=1.0, lat=2) == []
    assert run.state.rules["err"].status is RuleStatus.WARMUP
    assert run.state.rules["err"].breached_since is None
    run.tick(10, err=0.01, lat=2)
    assert run.state.rules["lat"].breached_since == run.at(10)
    assert acts(run.tick(60, err=0.01, lat=2)) == [("set_traffic", 50)]
    assert run.state.warmup_until == run.at(70)
    assert run.state.rules["lat"].breached_since is None
    assert run.tick(65, err=1.0, lat=2) == []
    assert run.state.rules["err"].breached_since is None
    assert run.tick(70, err=0.01, lat=2) == []  # would have tripped at 70 without the clearing
    assert run.state.rules["lat"].breached_since == run.at(70)
    assert run.tick(129, err=0.01, lat=2) == []
    paged = run.tick(130, err=0.01, lat=2)
    assert acts(paged) == [("page", None)]
    assert (paged[0].dedup_key, paged[0].breached_since) == ("coalmine/api/v2/lat", run.at(70))


def test_adopted_split_below_the_first_weight_is_the_first_step() -> None:
    """ "An adopted split below the first step's weight is the first step."

    Adopted at 5% (first weight 10), it holds the first step's 60s and then goes to 50%.
    """
    run = adopted(percent=5)
    assert (run.state.step, run.state.canary_percent) == (0, 5)
    assert run.tick(59, err=0.01) == []
    assert acts(run.tick(60, err=0.01)) == [("set_traffic", 50)]


# ---- Exact semantics: pause, resume, promote ----------------------------------------------


def test_pause_keeps_the_hold_clock_running() -> None:
    """ "Pause: the hold clock keeps running and rollback triggers still act; only advancing stops."

    Paused from 10s to 200s, the canary advances at the first tick after resume, not 60s later.
    """
    run = adopted()
    run.command(10, "pause")
    assert acts(run.tick(60, err=0.01)) == [("hold", None)]
    assert run.tick(190, err=0.01) == []
    run.command(200, "resume")
    assert acts(run.tick(201, err=0.01)) == [("set_traffic", 50)]


def test_rollback_triggers_still_act_while_paused() -> None:
    """ "Pause: the hold clock keeps running and rollback triggers still act; only advancing stops."

    A rollback rule tripping on a paused canary rolls it back and pages critical.
    """
    run = adopted()
    run.command(5, "pause")
    run.tick(10, err=1.0)
    decisions = run.tick(30, err=1.0)
    assert acts(decisions) == [("rollback", 0), ("page", None)]
    assert decisions[1].severity == "critical"
    assert run.state.phase is P.ROLLED_BACK


def test_resume_continues() -> None:
    """ "`resume` continues."

    After resume the paused canary's rollout goes on: 50% then promotion.
    """
    run = adopted()
    run.command(10, "pause")
    run.tick(60, err=0.01)
    assert acts(run.command(70, "resume")) == [("resume", None)]
    assert acts(run.tick(80, err=0.01)) == [("set_traffic", 50)]
    assert acts(run.tick(170, err=0.01)) == [("promote", 100)]


def test_operator_promote_advances_one_step_at_once() -> None:
    """ "An operator `promote` advances one step at once, skipping the hold, the deployment window, auto-promote and inconclusive gates, but is refused (with a `warn`) while any gating rule is breaching."

    One promote is one step: 10% → 50% at its t, and the 50% hold starts there.
    """
    run = adopted()
    decisions = run.command(5, "promote")
    assert acts(decisions) == [("set_traffic", 50)]
    assert decisions[0].t == run.at(5)
    assert run.state.step_started_at == run.at(5)
    assert run.tick(94, err=0.01) == []
    assert acts(run.tick(95, err=0.01)) == [("promote", 100)]


def test_operator_promote_is_refused_with_a_warn_while_a_hold_rule_breaches() -> None:
    """ "An operator `promote` advances one step at once, skipping the hold, the deployment window, auto-promote and inconclusive gates, but is refused (with a `warn`) while any gating rule is breaching."

    A breaching `hold` rule refuses promote with a warn; a breaching `page` rule does not.
    """
    pg = "  - {name: pg, source: prometheus, query: pg, above: 1, for: 5m, on_breach: page}"
    run = adopted(policy(ERR, GATE, pg))
    run.tick(20, err=0.01, gate=0.5, pg=5)
    refused = run.command(25, "promote")
    assert acts(refused) == [("warn", None)]
    assert refused[0].rule == "gate"
    assert run.state.canary_percent == 10
    run.tick(30, err=0.01, gate=0.1, pg=5)
    assert acts(run.command(35, "promote")) == [("set_traffic", 50)]


def test_promote_while_already_at_100_does_nothing() -> None:
    """ "`promote` while already at 100% does nothing."

    During the post-promotion watch promote emits nothing and changes nothing.
    """
    run = promoted()
    before = run.state.to_json()
    assert run.command(160, "promote") == []
    assert run.state.to_json() == before


@pytest.mark.parametrize("how", ["pause", "drift"])
def test_operator_promote_is_refused_while_paused_or_stood_down(how: str) -> None:
    """ "An operator `promote` advances one step at once, skipping the hold, the deployment window, auto-promote and inconclusive gates, but is refused (with a `warn`) while any gating rule is breaching."

    Team reading: a paused or stood-down rollout refuses promote with a warn and stays put.
    """
    run = adopted()
    if how == "pause":
        run.command(10, "pause")
    else:
        run.deploy(10, "v1", "v2", 30)
    phase = run.state.phase
    assert acts(run.command(20, "promote")) == [("warn", None)]
    assert run.state.phase is phase
    assert run.state.step == 0


# ---- Exact semantics: drift and resume ----------------------------------------------------


def test_drift_stops_traffic_changes_and_automatic_rollback() -> None:
    """ "Drift: coalmine stops changing traffic and stops automatic rollback for that rollout, keeps evaluating and exporting, and warns once."

    Stood down, a healthy canary never advances and a tripped one pages critical instead of rolling back.
    """
    run = adopted()
    run.deploy(20, "v1", "v2", 30)
    assert run.tick(100, err=0.01) == []
    run.tick(110, err=1.0)
    decisions = run.tick(130, err=1.0)
    assert acts(decisions) == [("page", None), ("hold", None)]
    assert (decisions[0].severity, decisions[0].dedup_key) == ("critical", ERR_KEY)
    assert run.state.phase is P.STOOD_DOWN
    assert run.state.expected == Deployment("v1", "v2", 10)


def test_drift_keeps_evaluating_and_warns_once() -> None:
    """ "Drift: coalmine stops changing traffic and stops automatic rollback for that rollout, keeps evaluating and exporting, and warns once."

    Rule values keep updating while stood down; a second, different hand change does not warn again.
    """
    run = adopted()
    assert acts(run.deploy(20, "v1", "v2", 30)) == [("warn", None)]
    assert run.deploy(40, "v1", "v2", 40) == []
    run.tick(50, err=0.02)
    track = run.state.rules["err"]
    assert (track.status, track.value, track.evaluated_at) == (RuleStatus.OK, 0.02, run.at(50))
    assert run.state.live == Deployment("v1", "v2", 40)
    assert run.tick(60, err=0.03) == []
    assert run.state.rules["err"].value == 0.03


def test_resume_after_drift_adopts_the_live_split_as_a_new_step() -> None:
    """ "`resume` adopts the live split as a new step whose hold counts from the resume."

    Hand-set to 40%, resumed at 300s: step 1 of 3 at 40% with a warm-up, advancing at 360s.
    """
    run = adopted()
    run.deploy(20, "v1", "v2", 40)
    resumed = run.command(300, "resume")
    assert acts(resumed) == [("resume", 40)]
    assert (run.state.phase, run.state.step, run.state.canary_percent) == (P.CANARY, 0, 40)
    assert run.state.expected == Deployment("v1", "v2", 40)
    assert run.state.step_started_at == run.at(300)
    assert run.state.warmup_until == run.at(310)
    assert run.tick(359, err=0.01) == []
    assert acts(run.tick(360, err=0.01)) == [("set_traffic", 50)]


def test_resume_after_drift_to_the_canary_alone_adopts_it_as_promoted() -> None:
    """ "`resume` adopts the live split as a new step whose hold counts from the resume."

    Team reading: the canary set to 100% by hand is adopted as promoted; the watch counts from resume.
    """
    run = adopted()
    run.deploy(20, "v2")
    assert acts(run.command(30, "resume")) == [("resume", 100)]
    assert (run.state.phase, run.state.promoted_at) == (P.PROMOTED, run.at(30))
    assert run.tick(149) == []
    assert acts(run.tick(150)) == [("complete", None)]
    assert (run.state.phase, run.state.stable) == (P.IDLE, "v2")


def test_resume_after_drift_to_another_split_starts_a_new_rollout() -> None:
    """ "`resume` adopts the live split as a new step whose hold counts from the resume."

    Team reading: live is now v3 over v1, so the v2 rollout ends and v3 is adopted as a new one.
    """
    run = adopted()
    run.deploy(20, "v1", "v3", 10)
    decisions = run.command(30, "resume")
    assert acts(decisions) == [("resume", None), ("start", 10)]
    assert decisions[1].canary == "v3"
    assert (run.state.phase, run.state.canary, run.state.stable) == (P.CANARY, "v3", "v1")
    assert run.state.step_started_at == run.at(30)


def test_resume_after_drift_to_one_version_ends_the_rollout() -> None:
    """ "`resume` adopts the live split as a new step whose hold counts from the resume."

    Team reading: v1 alone at 100% (a rollback by hand) ends the rollout, idle on v1.
    """
    run = adopted()
    run.deploy(20, "v1")
    assert acts(run.command(30, "resume")) == [("resume", None)]
    assert (run.state.phase, run.state.stable, run.state.canary) == (P.IDLE, "v1", None)
    assert run.deploy(40, "v1") == []
    assert run.tick(200, err=0.01) == []


def test_a_new_split_after_a_rollback_is_a_new_rollout() -> None:
    """ "A new split after a rollback or a completed rollout is a new rollout."

    After v2 is rolled back, v3 at 10% is adopted afresh; v2's rollback page is never resolved.
    """
    run = adopted()
    run.tick(10, err=1.0)
    run.tick(30, err=1.0)
    assert run.state.phase is P.ROLLED_BACK
    assert run.deploy(40, "v1") == []
    started = run.deploy(100, "v1", "v3", 10)
    assert acts(started) == [("start", 10)]
    assert (run.state.phase, run.state.canary, run.state.started_at) == (
        P.CANARY,
        "v3",
        run.at(100),
    )
    assert run.state.rules == {}
    run.tick(110, err=1.0)
    decisions = run.tick(130, err=1.0)
    assert acts(decisions) == [("rollback", 0), ("page", None)]
    assert decisions[1].dedup_key == "coalmine/api/v3/err"


def test_a_new_split_after_a_completed_rollout_is_a_new_rollout() -> None:
    """ "A new split after a rollback or a completed rollout is a new rollout."

    After v2 completes and is stable, v3 at 10% over v2 starts a rollout from the first step.
    """
    run = promoted()
    assert acts(run.tick(270)) == [("complete", None)]
    assert run.deploy(280, "v2") == []
    started = run.deploy(300, "v2", "v3", 10)
    assert acts(started) == [("start", 10)]
    assert (run.state.phase, run.state.canary, run.state.stable, run.state.step) == (
        P.CANARY,
        "v3",
        "v2",
        0,
    )
    assert acts(run.tick(360, err=0.01)) == [("set_traffic", 50)]


# ---- Exact semantics: pages across phases --------------------------------------------------


def test_a_rollbacks_page_stays_open() -> None:
    """ "A rollback's page stays open for a person to resolve; every other page is resolved when its rule recovers, when its phase ends (canary rules at promotion), or when the rollout ends."

    After the rollback, later ticks, recovery and a new rollout never resolve v2's critical page.
    """
    run = adopted()
    run.tick(10, err=1.0)
    run.tick(30, err=1.0)
    later = [*run.tick(40, err=0.01), *run.deploy(50, "v1"), *run.deploy(60, "v1", "v3", 10)]
    later += run.tick(120, err=0.01)
    assert [d for d in later if d.action == "resolve"] == []


def test_other_pages_are_resolved_when_the_rollout_ends() -> None:
    """ "A rollback's page stays open for a person to resolve; every other page is resolved when its rule recovers, when its phase ends (canary rules at promotion), or when the rollout ends."

    Rolling back resolves the open `hold` page under its key, but not the rollback's own page.
    """
    hold_rule = "  - {name: gate, source: prometheus, query: gate, above: 0.2, on_breach: hold}"
    run = adopted(policy(ERR, hold_rule))
    assert acts(run.tick(10, err=1.0, gate=0.5)) == [("page", None), ("hold", None)]
    decisions = run.tick(30, err=1.0, gate=0.5)
    assert [(d.action, d.rule, d.dedup_key) for d in decisions] == [
        ("rollback", "err", None),
        ("page", "err", ERR_KEY),
        ("resolve", "gate", "coalmine/api/v2/gate"),
    ]


def test_a_canary_page_is_resolved_at_promotion() -> None:
    """ "A rollback's page stays open for a person to resolve; every other page is resolved when its rule recovers, when its phase ends (canary rules at promotion), or when the rollout ends."

    A still-breaching canary `page` rule's page is resolved, under its key, as the canary is promoted.
    """
    pg = "  - {name: pg, source: prometheus, query: pg, above: 1, on_breach: page}"
    run = adopted(policy(ERR, pg))
    paged = run.tick(20, err=0.01, pg=5)
    assert acts(paged) == [("page", None)]
    assert (paged[0].severity, paged[0].dedup_key) == ("error", "coalmine/api/v2/pg")
    assert acts(run.tick(60, err=0.01, pg=5)) == [("set_traffic", 50)]
    decisions = run.tick(150, err=0.01, pg=5)
    assert acts(decisions) == [("resolve", None), ("promote", 100)]
    assert decisions[0].dedup_key == "coalmine/api/v2/pg"


def test_an_inconclusive_page_is_resolved_at_promotion() -> None:
    """ "A rollback's page stays open for a person to resolve; every other page is resolved when its rule recovers, when its phase ends (canary rules at promotion), or when the rollout ends."

    The warning page of an inconclusive gate is resolved when an operator promotes to 100%.
    """
    two_steps = "  - {weight: 10, hold: 60s}\n  - {weight: 100}"
    run = adopted(policy(steps=two_steps, page_after="30s"))
    assert run.tick(0) == []
    paged = run.tick(30)
    assert acts(paged) == [("page", None)]
    assert (paged[0].severity, paged[0].dedup_key) == ("warning", ERR_KEY + "/inconclusive")
    decisions = run.command(40, "promote")
    assert acts(decisions) == [("resolve", None), ("promote", 100)]
    assert decisions[0].dedup_key == ERR_KEY + "/inconclusive"


# ---- Exact semantics: promote, rollback, watch, commands ------------------------------------


def test_promotion_emits_promote_at_100_percent() -> None:
    """ "Promotion emits `promote` with `canary_percent: 100`; a rollback emits `rollback` with `canary_percent: 0`."

    Automatic promotion is one `promote` decision at 100%, and the expected deployment is v2 alone.
    """
    run = adopted()
    run.tick(60, err=0.01)
    decisions = run.tick(150, err=0.01)
    assert [(d.action, d.canary_percent, d.canary, d.stable) for d in decisions] == [
        ("promote", 100, "v2", "v1")
    ]
    assert run.state.expected == Deployment("v2")


def test_rollback_emits_rollback_at_0_percent() -> None:
    """ "Promotion emits `promote` with `canary_percent: 100`; a rollback emits `rollback` with `canary_percent: 0`."

    An automatic rollback is one `rollback` decision at 0% naming the rule, and v1 is expected alone.
    """
    run = adopted()
    run.tick(10, err=1.0)
    decisions = run.tick(30, err=1.0)
    rollbacks = [d for d in decisions if d.action == "rollback"]
    assert [(d.canary_percent, d.rule, d.canary, d.stable) for d in rollbacks] == [
        (0, "err", "v2", "v1")
    ]
    assert run.state.expected == Deployment("v1")


@pytest.mark.parametrize("last_tick", [270, 275])
def test_the_watch_ends_at_the_first_tick_at_or_after_promotion_plus_watch(last_tick: int) -> None:
    """ "The post-promotion watch ends at the first tick at or after promotion + `watch`: open pages are resolved and the canary becomes the stable version."

    Promoted at 150s with a 120s watch: a tick at 269s changes nothing; the next resolves and completes.
    """
    post = (
        "  - {name: post_err, source: prometheus, query: post, above: 0.01, on_breach: page,"
        " phases: [post_promotion]}"
    )
    run = Timeline(policy(ERR, post))
    run.deploy(0, "v1", "v2", 10)
    run.tick(60, err=0.01)
    assert acts(run.tick(150, err=0.01)) == [("promote", 100)]
    paged = run.tick(160, post_err=0.5)
    assert acts(paged) == [("page", None)]
    assert paged[0].dedup_key == "coalmine/api/v2/post_err"
    assert run.tick(269, post_err=0.5) == []
    assert run.state.phase is P.PROMOTED
    decisions = run.tick(last_tick, post_err=0.5)
    assert acts(decisions) == [("resolve", None), ("complete", None)]
    assert decisions[0].dedup_key == "coalmine/api/v2/post_err"
    assert all(d.t == run.at(last_tick) for d in decisions)
    assert (run.state.phase, run.state.stable, run.state.canary) == (P.IDLE, "v2", None)
    assert run.state.expected == Deployment("v2")
    assert run.tick(last_tick + 10, post_err=0.5) == []


def test_commands_are_applied_at_their_t() -> None:
    """ "Commands are applied at their `t` even when no observation shares it."

    Pause, resume and promote between ticks carry their own t, and the new hold counts from it.
    """
    run = adopted()
    run.tick(40, err=0.01)
    assert [d.t for d in run.command(45, "pause")] == [run.at(45)]
    assert [d.t for d in run.command(47, "resume")] == [run.at(47)]
    decisions = run.command(52, "promote")
    assert [(d.action, d.t) for d in decisions] == [("set_traffic", run.at(52))]
    assert (run.state.step_started_at, run.state.warmup_until) == (run.at(52), run.at(62))
    assert run.tick(141, err=0.01) == []
    assert acts(run.tick(142, err=0.01)) == [("promote", 100)]


# ---- Operator switches --------------------------------------------------------------------


def test_auto_promote_off_stops_before_each_advance() -> None:
    """ "`false`: stop before each advance until an operator promotes" (`COALMINE_AUTO_PROMOTE`)

    Each step holds after its hold until an operator promotes it, 10% → 50% → 100%.
    """
    run = adopted(auto_promote=False)
    assert acts(run.tick(60, err=0.01)) == [("hold", None)]
    assert run.tick(70, err=0.01) == []
    assert acts(run.command(75, "promote")) == [("set_traffic", 50)]
    assert run.tick(164, err=0.01) == []
    held = run.tick(165, err=0.01)
    assert acts(held) == [("hold", None)]
    assert "auto-promote" in held[0].reason
    assert run.state.canary_percent == 50
    assert acts(run.command(170, "promote")) == [("promote", 100)]


def test_auto_rollback_off_holds_until_an_operator_rolls_back() -> None:
    """ "`false`: page and hold instead of rolling back" (`COALMINE_AUTO_ROLLBACK`)

    The tripped canary pages critical, holds past its hold time, and rolls back only on command.
    """
    run = adopted(auto_rollback=False)
    run.tick(10, err=1.0)
    assert acts(run.tick(30, err=1.0)) == [("page", None), ("hold", None)]
    held = run.tick(60, err=1.0)
    assert acts(held) == [("hold", None)]
    assert held[0].rule == "err"
    assert run.state.canary_percent == 10
    # Only the rollback is pinned: whether the held critical page resolves here is open.
    assert acts(run.command(70, "rollback")[:1]) == [("rollback", 0)]
    assert run.state.phase is P.ROLLED_BACK


def test_dry_run_marks_traffic_decisions_and_keeps_the_expected_deployment() -> None:
    """ "evaluate, journal and notify, never change traffic" (`COALMINE_DRY_RUN`)

    set_traffic and promote are marked dry_run; the untouched live split is not drift.
    """
    run = adopted(dry_run=True)
    adopted_split = Deployment("v1", "v2", 10)
    decisions = run.tick(60, err=0.01)
    assert [(d.action, d.canary_percent, d.dry_run) for d in decisions] == [
        ("set_traffic", 50, True)
    ]
    assert run.state.expected == adopted_split
    assert run.deploy(61, "v1", "v2", 10) == []
    assert run.state.phase is P.CANARY
    decisions = run.tick(150, err=0.01)
    assert [(d.action, d.canary_percent, d.dry_run) for d in decisions] == [("promote", 100, True)]
    assert run.state.expected == adopted_split
    assert run.deploy(151, "v1", "v2", 10) == []
    assert run.state.phase is P.PROMOTED
    assert acts(run.tick(270)) == [("complete", None)]
    assert run.deploy(271, "v1", "v2", 10) == []  # neither drift nor a new rollout
    assert (run.state.phase, run.state.stable) == (P.IDLE, "v1")


def test_dry_run_says_so_in_every_decision_and_never_calls_the_canary_stable() -> None:
    """Every dry-run decision is marked and its reason starts DRY RUN; v2 never becomes stable."""
    run = adopted(dry_run=True)
    decisions = run.tick(60, err=0.01) + run.tick(150, err=0.01) + run.tick(270)
    assert [d.action for d in decisions] == ["set_traffic", "promote", "complete"]
    assert all(d.dry_run and d.reason.startswith("DRY RUN") for d in decisions)
    assert "traffic unchanged" in decisions[0].reason
    assert "would now be the stable version" in decisions[2].reason
    assert "live is still v2 at 10% over v1" in decisions[2].reason
    assert run.state.stable == "v1"


def test_dry_run_rollback_is_marked_and_its_page_is_real() -> None:
    """ "evaluate, journal and notify, never change traffic" (`COALMINE_DRY_RUN`)

    A dry-run rollback and its page (sent for real) say dry run; the unchanged split is no drift.
    """
    run = adopted(dry_run=True)
    run.tick(10, err=1.0)
    decisions = run.tick(30, err=1.0)
    assert [(d.action, d.canary_percent, d.dry_run) for d in decisions] == [
        ("rollback", 0, True),
        ("page", None, True),
    ]
    assert decisions[1].reason.startswith("DRY RUN: ")
    assert run.state.expected == Deployment("v1", "v2", 10)
    assert run.deploy(40, "v1", "v2", 10) == []
    assert run.state.phase is P.ROLLED_BACK


# ---- Team readings where DESIGN.md is silent -----------------------------------------------


def test_hold_decisions_come_after_the_hold_once_per_change_of_blockers() -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    Team reading: no hold before the hold elapses, then one per change in the set of blockers.
    """
    run = adopted(policy(ERR, GATE))
    assert run.tick(30, gate=0.1) == []  # err inconclusive, but the hold is still running
    first = run.tick(60, gate=0.1)
    assert acts(first) == [("hold", None)]
    assert first[0].rule == "err"
    assert run.tick(70, gate=0.1) == []
    both = run.tick(80)
    assert acts(both) == [("hold", None)]
    assert "err" in both[0].reason
    assert "gate" in both[0].reason
    assert run.tick(90) == []
    assert acts(run.tick(100, err=0.01)) == [("hold", None)]
    assert acts(run.tick(110, err=0.01, gate=0.1)) == [("set_traffic", 50)]


@pytest.mark.parametrize("trip", ["rollback rule, auto-rollback off", "hold rule"])
def test_a_trip_after_the_hold_has_elapsed_emits_one_hold(trip: str) -> None:
    """ "Advancing to the next step needs all of: the step's `hold` elapsed; every gating rule's latest evaluation conclusive and not breaching; inside a deployment window; not paused; auto-promote on."

    Team reading, one hold per change of blockers: a trip at 70s, after the 60s hold, holds once.
    """
    hold_rule = "  - {name: gate, source: prometheus, query: gate, above: 0.2, on_breach: hold}"
    values: dict[str, float | None]
    if trip == "hold rule":
        run = adopted(policy(ERR, hold_rule))
        run.tick(50, err=0.01, gate=0.1)
        values = {"err": 0.01, "gate": 0.5}
    else:
        run = adopted(auto_rollback=False)
        values = {"err": 1.0}
        run.tick(50, **values)
    decisions = run.tick(70, **values)
    assert acts(decisions) == [("page", None), ("hold", None)]
    assert run.tick(80, **values) == []


def test_the_engine_never_mutates_the_state_it_is_given() -> None:
    """ "The engine is a pure function of (policy, rollout state, observations, commands, now)."

    Adoption, advancing, trips, drift and every command return a new state and leave theirs as it was.
    """
    engine = Engine(policy(ERR, GATE))
    state = engine.new_state("api")
    actions: list[str] = []

    def apply(outcome_of: Callable[[RolloutState], Outcome]) -> None:
        nonlocal state
        before = state.to_json()
        outcome = outcome_of(state)
        assert state.to_json() == before
        assert outcome.state is not state
        actions.extend(d.action for d in outcome.decisions)
        state = outcome.state

    def tick(seconds: int, err: float) -> None:
        observations = [Observation("err", "canary", err, 1000), Observation("gate", "canary", 0.1)]
        apply(lambda s: engine.tick(s, T0 + timedelta(seconds=seconds), observations))

    def command(seconds: int, kind: CommandKind) -> None:
        apply(lambda s: engine.command(s, Command(kind), T0 + timedelta(seconds=seconds)))

    def deploy(seconds: int, percent: int) -> None:
        live = Deployment("v1", "v2", percent)
        apply(lambda s: engine.observe_deployment(s, live, T0 + timedelta(seconds=seconds)))

    deploy(0, 10)
    tick(10, 0.01)
    tick(60, 0.01)
    command(70, "pause")
    command(80, "resume")
    deploy(90, 30)
    tick(130, 1.0)
    tick(150, 1.0)
    command(160, "promote")
    command(170, "resume")
    command(180, "rollback")
    # Every kind of change happened, so there was something to mutate.
    assert {"start", "set_traffic", "pause", "resume", "warn", "page", "hold", "rollback"} <= set(
        actions
    )
