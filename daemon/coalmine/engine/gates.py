"""What blocks advancing, and when a webhook rule is called (DESIGN.md "Webhook rules").

Advancing needs the step's hold elapsed and no :class:`Blocker`: every gating rule conclusive
and not breaching, inside a deployment window, not paused, auto-promote on, no incident freeze.

A webhook rule is a rule like any other (its value is 0 on a 2xx answer, the HTTP status
otherwise), except that a call is an action in the world (a smoke test, a load test), so the
engine says at which ticks the shell makes it:

- ``every_tick``: every tick of the rule's phases;
- ``before_advance`` (the default): at a tick where the step's hold has elapsed and every other
  gate passed at the previous tick (conclusive and not breaching, inside a deployment window,
  not paused, auto-promote on, no incident freeze), and then at every tick while its latest call
  failed. Only a call at the current tick lets the canary advance;
- ``after_promotion``: from the first tick after promotion's warm-up until a call passes;
- ``after_rollback``: from the first tick after a rollback until a call passes; a failing one
  pages critical.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from coalmine.engine import texts
from coalmine.engine.lifecycle import RolloutPhase
from coalmine.engine.model import format_time
from coalmine.engine.state import RolloutState, RuleStatus, RuleTrack

if TYPE_CHECKING:
    from coalmine.engine.core import Engine
    from coalmine.engine.judge import CompiledRule

_FAILING = (RuleStatus.BREACHING, RuleStatus.INCONCLUSIVE)
_EMPTY = RuleTrack()
P = RolloutPhase


@dataclass(slots=True)
class Blocker:
    """One reason the canary may not advance; ``key`` identifies it across ticks."""

    key: str
    reason: str
    rule: CompiledRule | None = None


def due(
    engine: Engine, rule: CompiledRule, s: RolloutState, now: datetime, frozen: str | None
) -> bool:
    """Whether the shell calls the webhook ``rule`` at this tick (the state before it)."""
    track = s.rules.get(rule.name)
    if rule.when == "every_tick":
        return True
    if rule.when == "before_advance":
        if track is not None and track.status in _FAILING:
            return True  # keep calling while it fails: it may recover, or trip
        return (
            s.phase is RolloutPhase.CANARY
            and s.step_started_at is not None
            and now >= s.step_started_at + engine.hold(s.step)
            and not blockers(engine, s, now, frozen, webhooks=False, words=False)
        )
    if track is not None and track.status is RuleStatus.OK:
        return False  # passed once in this phase: done
    return s.warmup_until is None or now >= s.warmup_until


def blockers(
    engine: Engine,
    s: RolloutState,
    now: datetime,
    frozen: str | None,
    *,
    webhooks: bool = True,
    words: bool = True,
) -> list[Blocker]:
    """Why the canary may not advance at ``now`` once its hold has elapsed (none: it may).
    ``webhooks=False`` leaves ``before_advance`` webhooks out: whether they are due.
    ``words=False`` leaves every reason empty: the keys alone, for a tick that only needs to
    know whether they changed (writing the reasons costs more than finding the blockers)."""
    found = []
    if s.phase is P.PAUSED:
        found.append(Blocker("paused", "paused by an operator"))
    waiting: list[CompiledRule] = []
    for rule in engine._canary_rules:
        if not rule.gating:
            continue
        track = s.rules.get(rule.name, _EMPTY)
        if rule.when == "before_advance" and (not webhooks or track.evaluated_at != now):
            waiting.append(rule)  # only a call at this tick counts
        elif track.status is RuleStatus.BREACHING:
            why = f"{rule.name} breaching ({texts.value_text(rule, track)})" if words else ""
            found.append(Blocker(f"breaching:{rule.name}", why, rule))
        elif not track.status.passes_gate:
            why = f"{rule.name} {texts.inconclusive_text(track)}" if words else ""
            found.append(Blocker(f"inconclusive:{rule.name}", why, rule))
    if not engine.windows.inside(now):
        why = ""
        if words:
            opening = engine.windows.next_opening(now)
            when = f"; next opens {format_time(opening)}" if opening else ""
            why = f"outside the deployment windows{when}"
        found.append(Blocker("window", why))
    if not engine.options.auto_promote:
        found.append(
            Blocker("auto_promote", "auto-promote is off: waiting for an operator's promote")
        )
    if frozen is not None:
        found.append(Blocker(f"freeze:{frozen}", frozen))
    if webhooks and waiting and not found:
        names = ", ".join(r.name for r in waiting)
        why = f"{names} not called yet: called once every other gate passes" if words else ""
        found.append(Blocker("before_advance", why, waiting[0]))
    return found


def waiting_for(
    engine: Engine, s: RolloutState, now: datetime, frozen: str | None = None
) -> list[str]:
    """What keeps a canary from advancing at ``now``, in words (empty: nothing does); the
    hold still running is not listed (shown as time remaining)."""
    if s.phase not in (P.CANARY, P.PAUSED):
        return []
    return [b.reason for b in blockers(engine, s, now, frozen)]
