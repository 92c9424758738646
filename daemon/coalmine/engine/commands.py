"""An operator's commands: pause, resume (after a pause or a drift), promote, rollback, start.

Each is a function of the engine's configuration, one call's working copy of the state and the
command; a command that cannot apply emits a ``warn`` and changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from coalmine.durations import format_duration
from coalmine.engine import texts
from coalmine.engine.lifecycle import Event, RolloutPhase, allowed, transition
from coalmine.engine.model import Command, Deployment
from coalmine.engine.state import RuleStatus, RuleTrack

if TYPE_CHECKING:
    from coalmine.engine.core import Engine, Run

P = RolloutPhase
_EMPTY = RuleTrack()


def pause(engine: Engine, run: Run, _: Command) -> None:
    s = run.s
    if s.phase is P.PAUSED:
        return  # already paused: nothing to do, not an error
    if not allowed(s.phase, Event.PAUSE):
        run.emit("warn", f"pause refused: the rollout is {s.phase.value}, not a running canary")
        return
    s.phase = transition(s.phase, Event.PAUSE)
    s.hold_reason = None
    run.emit(
        "pause",
        "paused by an operator: advancing stops; the hold clock and rollback triggers keep running",
    )


def resume(engine: Engine, run: Run, _: Command) -> None:
    s = run.s
    if s.phase is P.PAUSED:
        s.phase = transition(s.phase, Event.RESUME)
        s.hold_reason = None
        run.emit("resume", "resumed by an operator")
    elif s.phase is P.STOOD_DOWN and s.live is not None:
        adopt_after_drift(engine, run, s.live)
    elif s.phase in (P.CANARY, P.PROMOTED):
        return  # not paused: already running, nothing to do
    else:
        run.emit(
            "warn",
            f"resume refused: the rollout is {s.phase.value}, neither paused nor stood down",
        )


def adopt_after_drift(engine: Engine, run: Run, live: Deployment) -> None:
    s = run.s
    same_versions = live.is_split and (live.canary, live.stable) == (s.canary, s.stable)
    if same_versions:
        s.phase = transition(s.phase, Event.ADOPT_SPLIT)
        s.stood_down_from = None
        s.step = engine._step_for(live.canary_percent)
        engine._traffic_changed(run, live.canary_percent, adopted=live)
        run.emit(
            "resume",
            f"resumed after drift: adopted {live.describe()} as step "
            f"{s.step + 1}/{len(engine._weights)}, hold counts from now",
            canary_percent=live.canary_percent,
        )
    elif not live.is_split and live.stable == s.canary:
        s.phase = transition(s.phase, Event.ADOPT_PROMOTED)
        s.stood_down_from, s.step, s.promoted_at = None, len(engine._weights) - 1, run.now
        engine._end_canary_phase(run)
        engine._traffic_changed(run, 100, adopted=live)
        run.emit(
            "resume",
            f"resumed after drift: {live.describe()} adopted as promoted; "
            f"post-promotion watch {format_duration(engine._watch)} from now",
            canary_percent=100,
        )
    else:
        engine._resolve_all(run, "rollout ended by hand")
        s.phase = transition(s.phase, Event.FINISH)
        s.stable = live.stable
        engine._reset(run, keep_expected=True)
        s.expected = live
        run.emit(
            "resume",
            f"resumed after drift: the rollout ended by hand; live is {live.describe()}",
        )
        if live.is_split:
            engine._adopt(run, live, "adopted the live split as a new rollout")


def promote(engine: Engine, run: Run, _: Command) -> None:
    s = run.s
    if s.phase is P.PROMOTED:
        return  # already at 100%: nothing to do
    if s.phase is not P.CANARY:
        hint = {
            P.PAUSED: "; resume first",
            P.STOOD_DOWN: "; resume adopts the live split first",
        }
        run.emit("warn", f"promote refused: the rollout is {s.phase.value}{hint.get(s.phase, '')}")
        return
    if run.frozen is not None:
        run.emit("warn", f"promote refused: {run.frozen}")
        return
    breaching = [
        r
        for r in engine._canary_rules
        if r.gating and s.rules.get(r.name, _EMPTY).status is RuleStatus.BREACHING
    ]
    if breaching:
        rule = breaching[0]
        track = s.rules[rule.name]
        run.emit_rule(
            "warn",
            f"promote refused: {rule.name} is breaching ({texts.value_text(rule, track)})",
            rule,
            track,
        )
        return
    engine._advance(run, "operator promote")


def rollback(engine: Engine, run: Run, _: Command) -> None:
    s = run.s
    if not allowed(s.phase, Event.ROLLBACK):
        run.emit("warn", f"rollback refused: the rollout is {s.phase.value}; nothing to roll back")
        return
    run.emit("rollback", f"rolled back {s.canary} by an operator", canary_percent=0)
    engine._end_rollout(run, Event.ROLLBACK)


def start(engine: Engine, run: Run, command: Command) -> None:
    s = run.s
    version = command.version
    if not allowed(s.phase, Event.START):
        run.emit("warn", f"start refused: a rollout is already {s.phase.value}")
        return
    if s.stable is None or not version or version == s.stable:
        why = (
            "no live deployment seen yet"
            if s.stable is None
            else f"{version!r} is the stable version"
        )
        run.emit("warn", f"start refused: {why}")
        return
    if run.frozen is not None:
        run.emit("warn", f"start refused: {run.frozen}")
        return
    s.phase = transition(s.phase, Event.START)
    s.canary, s.step, s.started_at, s.promoted_at, s.rules = version, 0, run.now, None, {}
    s.stood_down_from = None
    run.emit("start", f"started canary {version} over {s.stable} by an operator")
    engine._traffic_changed(run, engine._weights[0])
    run.emit(
        "set_traffic",
        f"step 1/{len(engine._weights)}: {version} to {engine._weights[0]}%",
        canary_percent=engine._weights[0],
    )
