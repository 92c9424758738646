"""The engine: a pure function from (policy, state, inputs, now) to (state, decisions).

Three entry points, each returning an :class:`Outcome` and never touching the state passed in:

- :meth:`Engine.observe_deployment` — the live split as read from Cloudflare: adopts a new
  canary, notices drift;
- :meth:`Engine.command` — an operator's pause / resume / promote / rollback / start;
- :meth:`Engine.tick` — one evaluation: judge every active rule on this tick's observations,
  page, roll back, or advance.

No clock, no I/O, no logging: ``now`` is an argument and decisions are the only output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from coalmine.durations import format_duration
from coalmine.engine.judge import CompiledRule, judge, judge_compare
from coalmine.engine.lifecycle import Event, RolloutPhase, allowed, transition
from coalmine.engine.model import Command, Decision, Deployment, Observation, Options, format_time
from coalmine.engine.outages import also_inconclusive, outage_paged
from coalmine.engine.state import RolloutState, RuleStatus, RuleTrack, replace_track
from coalmine.engine.windows import inside_window, next_opening
from coalmine.policy import Policy

P = RolloutPhase
_EMPTY = RuleTrack()
_TRAFFIC = ("set_traffic", "promote", "rollback")
DRY_RUN = "DRY RUN: "
DRY_RUN_TRAFFIC = "DRY RUN, traffic unchanged: "
Actor = Literal["coalmine", "operator"]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The new state and what was decided, in order."""

    state: RolloutState
    decisions: list[Decision] = field(default_factory=list)


@dataclass(slots=True)
class _Blocker:
    key: str
    reason: str
    rule: CompiledRule | None = None


class _Run:
    """One call's working copy of the state and the decisions it produces."""

    __slots__ = ("actor", "dry_run", "now", "out", "s")

    def __init__(self, state: RolloutState, now: datetime, dry_run: bool, actor: Actor) -> None:
        self.s = state.copy()
        self.now = now
        self.out: list[Decision] = []
        self.dry_run = dry_run
        self.actor: Actor = actor

    def emit(self, action: Any, reason: str, **details: Any) -> None:
        s = self.s
        if self.dry_run:  # every word of a dry run says so: logs, Slack, pages, annotations
            reason = (DRY_RUN_TRAFFIC if action in _TRAFFIC else DRY_RUN) + reason
        self.out.append(
            Decision(
                t=self.now,
                action=action,
                reason=reason,
                script=s.script,
                canary=s.canary,
                stable=s.stable,
                actor=details.pop("actor", self.actor),
                dry_run=self.dry_run,
                **details,
            )
        )

    def emit_rule(
        self, action: Any, reason: str, rule: CompiledRule, track: RuleTrack, **extra: Any
    ) -> None:
        self.emit(
            action,
            reason,
            rule=rule.name,
            value=track.value,
            threshold=rule.threshold,
            window=rule.window,
            samples=track.samples,
            breached_since=track.breached_since,
            stable_value=track.stable_value,
            interval=_interval(rule, track),
            **extra,
        )

    def done(self) -> Outcome:
        return Outcome(self.s, self.out)


class Engine:
    """Decides one script's rollout under one policy. Holds configuration only, never state."""

    def __init__(self, policy: Policy, options: Options | None = None) -> None:
        self.policy = policy
        self.options = options or Options()
        rules = [CompiledRule.of(r) for r in policy.rules]
        self._canary_rules = tuple(r for r in rules if "canary" in r.phases)
        self._post_rules = tuple(r for r in rules if "post_promotion" in r.phases)
        self._rules = {r.name: r for r in rules}
        self._source = {r.name: r.source for r in policy.rules}
        self._weights = [s.weight for s in policy.steps]
        self._holds = [s.hold for s in policy.steps]
        self._warmup = policy.analysis.warmup
        self._page_after = policy.analysis.inconclusive_page_after
        self._watch = policy.post_promotion.watch

    def new_state(self, script: str) -> RolloutState:
        """The state of a script coalmine has not seen yet."""
        return RolloutState(script=script)

    # ---- inputs ---------------------------------------------------------------------------

    def observe_deployment(self, state: RolloutState, live: Deployment, now: datetime) -> Outcome:
        """Take in the live deployment: adopt a new split, or stand down on drift."""
        run = _Run(state, now, self.options.dry_run, "coalmine")
        s = run.s
        live = Deployment.of(live.stable, live.canary, live.canary_percent)
        s.live = live
        if live == s.expected or s.phase is P.STOOD_DOWN:
            return run.done()
        if s.phase in (P.IDLE, P.ROLLED_BACK):
            if live.is_split:
                self._adopt(run, live, "adopted a gradual deployment")
            else:
                s.phase = transition(s.phase, Event.REDEPLOY)
                s.stable, s.canary, s.expected = live.stable, None, live
            return run.done()
        expected = s.expected.describe() if s.expected else "nothing yet"
        s.stood_down_from = s.phase
        s.phase = transition(s.phase, Event.DRIFT)
        run.emit(
            "warn",
            f"drift: live deployment is {live.describe()}, coalmine last set {expected}; "
            "standing down (no traffic changes, no automatic rollback) until `resume`",
        )
        return run.done()

    def command(self, state: RolloutState, command: Command, now: datetime) -> Outcome:
        """Apply an operator's command; a command that cannot apply is a ``warn``."""
        run = _Run(state, now, self.options.dry_run, "operator")
        handler = {
            "pause": self._pause,
            "resume": self._resume,
            "promote": self._operator_promote,
            "rollback": self._operator_rollback,
            "start": self._start,
        }[command.kind]
        handler(run, command)
        if command.requested_by or command.reason:
            run.out = [
                replace(d, requested_by=command.requested_by, request_reason=command.reason)
                for d in run.out
            ]
        return run.done()

    def waiting_for(self, state: RolloutState, now: datetime) -> list[str]:
        """What keeps a canary from advancing at ``now``, in words (empty: nothing does).

        The hold still running is not listed: the caller shows it as time remaining.
        """
        if state.phase not in (P.CANARY, P.PAUSED):
            return []
        return [
            b.reason for b in self._blockers(_Run(state, now, self.options.dry_run, "coalmine"))
        ]

    def tick(
        self,
        state: RolloutState,
        now: datetime,
        observations: Iterable[Observation],
        *,
        blocked: str | None = None,
    ) -> Outcome:
        """Evaluate every active rule on this tick's observations and act on the result.

        ``blocked``: the shell's reason advancing must wait (a traffic change still being
        applied); rules are judged and rollbacks still happen.
        """
        run = _Run(state, now, self.options.dry_run, "coalmine")
        s = run.s
        s.last_tick = now
        if s.phase in (P.IDLE, P.ROLLED_BACK) or self._watch_over(run):
            return run.done()
        canary: dict[str, Observation] = {}
        stable: dict[str, Observation] = {}
        for obs in observations:  # the last of duplicates wins
            (canary if obs.role == "canary" else stable)[obs.rule] = obs
        warming_up = s.warmup_until is not None and now < s.warmup_until
        trips: list[tuple[CompiledRule, RuleTrack]] = []
        for rule in self._active_rules(s):
            prev = s.rules.get(rule.name, _EMPTY)
            mine, theirs = canary.get(rule.name), stable.get(rule.name)
            if rule.compares:
                track = judge_compare(rule, prev, mine, theirs, now, warming_up, s.step_started_at)
            else:
                track = judge(rule, prev, mine, theirs, now, warming_up)
            s.rules[rule.name] = self._notify(run, rule, prev, track, trips)
        if trips:
            self._rollback_trips(run, trips)
        if s.phase in (P.CANARY, P.PAUSED):
            self._consider_advancing(run, blocked)
        return run.done()

    def traffic_took_effect(self, state: RolloutState, now: datetime) -> Outcome:
        """A traffic change coalmine decided earlier was only applied now (the API refused it
        for a while): the step's hold, the warm-up and the watch count from now."""
        run = _Run(state, now, self.options.dry_run, "coalmine")
        s = run.s
        if s.phase in (P.CANARY, P.PAUSED, P.PROMOTED):
            s.step_started_at = now
            s.warmup_until = now + self._warmup
            s.rules = {name: track.cleared() for name, track in s.rules.items()}
            if s.phase is P.PROMOTED:
                s.promoted_at = now
        return run.done()

    # ---- judging --------------------------------------------------------------------------

    def active_rules(self, state: RolloutState) -> tuple[CompiledRule, ...]:
        """The rules a tick in this state evaluates (what the shell must fetch)."""
        return self._active_rules(state)

    @property
    def rules(self) -> tuple[CompiledRule, ...]:
        """Every rule of the policy, compiled."""
        return tuple(self._rules.values())

    def _active_rules(self, s: RolloutState) -> tuple[CompiledRule, ...]:
        phase = s.stood_down_from if s.phase is P.STOOD_DOWN else s.phase
        if phase in (P.CANARY, P.PAUSED):
            return self._canary_rules
        if phase is P.PROMOTED:
            return self._post_rules
        return ()

    def _notify(
        self,
        run: _Run,
        rule: CompiledRule,
        prev: RuleTrack,
        track: RuleTrack,
        trips: list[tuple[CompiledRule, RuleTrack]],
    ) -> RuleTrack:
        """Pages, resolves and warnings for one rule's new track; returns the track to keep."""
        paged, inconclusive_paged = track.paged, track.inconclusive_paged
        if track.tripped and not prev.tripped:
            if rule.on_breach == "rollback":
                trips.append((rule, track))
            elif rule.on_breach == "warn":
                run.emit_rule("warn", _trip_text(rule, track, "warning"), rule, track)
            else:
                if not paged:
                    self._page(run, rule, track, rule.severity)
                    paged = True
                if rule.on_breach == "hold":
                    run.emit_rule("hold", _trip_text(rule, track, "holding"), rule, track)
        elif paged and track.status is RuleStatus.OK:
            run.emit_rule(
                "resolve",
                f"{rule.name} recovered: {_recovered_text(rule, track)}",
                rule,
                track,
                dedup_key=self._key(run.s, rule.name),
            )
            paged = False
        if (
            rule.gating
            and not inconclusive_paged
            and track.inconclusive_since is not None
            and run.now >= track.inconclusive_since + self._page_after
            and not outage_paged(self._source, run.s, rule.name)
        ):
            since = _when(track.inconclusive_since)
            also = also_inconclusive(self._source, run.s, rule.name, self._active_rules(run.s))
            what = (
                f"{self._source[rule.name]} rules {', '.join([rule.name, *also])}"
                if also
                else rule.name
            )
            run.emit_rule(
                "page",
                f"{what} inconclusive since {since} ({track.detail}): the rollout holds",
                rule,
                track,
                severity="warning",
                dedup_key=self._key(run.s, rule.name) + "/inconclusive",
            )
            inconclusive_paged = True
        elif inconclusive_paged and track.inconclusive_since is None:
            run.emit_rule(
                "resolve",
                f"{rule.name} is conclusive again",
                rule,
                track,
                dedup_key=self._key(run.s, rule.name) + "/inconclusive",
            )
            inconclusive_paged = False
        if (paged, inconclusive_paged) == (track.paged, track.inconclusive_paged):
            return track
        return _with_pages(track, paged, inconclusive_paged)

    def _page(
        self, run: _Run, rule: CompiledRule, track: RuleTrack, severity: str, note: str = ""
    ) -> None:
        run.emit_rule(
            "page",
            _trip_text(rule, track, note or "paging"),
            rule,
            track,
            severity=severity,
            dedup_key=self._key(run.s, rule.name),
        )

    def _rollback_trips(self, run: _Run, trips: list[tuple[CompiledRule, RuleTrack]]) -> None:
        s = run.s
        if s.phase is P.STOOD_DOWN or not self.options.auto_rollback:
            why = "stood down after drift" if s.phase is P.STOOD_DOWN else "auto-rollback is off"
            for rule, track in trips:
                self._page(run, rule, track, "critical", f"{why}: not rolling back, holding")
                s.rules[rule.name] = _with_pages(
                    s.rules[rule.name], True, s.rules[rule.name].inconclusive_paged
                )
            rule, track = trips[0]
            run.emit_rule(
                "hold", _trip_text(rule, track, f"{why}: holding for an operator"), rule, track
            )
            return
        rule, track = trips[0]
        run.emit_rule(
            "rollback",
            _trip_text(rule, track, f"rolling back {s.canary}"),
            rule,
            track,
            canary_percent=0,
        )
        for rule, track in trips:  # a rollback's page stays open for a person to resolve
            self._page(run, rule, track, "critical", f"rolled back {s.canary}")
        self._end_rollout(run, Event.ROLLBACK)

    # ---- moving traffic -------------------------------------------------------------------

    def _consider_advancing(self, run: _Run, blocked: str | None = None) -> None:
        s = run.s
        assert s.step_started_at is not None
        if run.now < s.step_started_at + self._holds[s.step]:
            return
        blockers = self._blockers(run)
        if blocked is not None:
            blockers.append(_Blocker("shell", blocked))
        if not blockers:
            self._advance(run, "hold elapsed, every gate passing")
            return
        key = "|".join(b.key for b in blockers)
        if key == s.hold_reason:
            return
        s.hold_reason = key
        if any(d.action == "hold" for d in run.out):
            return  # a trip already said why this tick holds
        reason = "not advancing: " + "; ".join(b.reason for b in blockers)
        first = blockers[0].rule
        if first is not None:
            run.emit_rule("hold", reason, first, s.rules.get(first.name, _EMPTY))
        else:
            run.emit("hold", reason)

    def _blockers(self, run: _Run) -> list[_Blocker]:
        s, now = run.s, run.now
        blockers = []
        if s.phase is P.PAUSED:
            blockers.append(_Blocker("paused", "paused by an operator"))
        for rule in self._canary_rules:
            if not rule.gating:
                continue
            track = s.rules.get(rule.name, _EMPTY)
            if track.status is RuleStatus.BREACHING:
                blockers.append(
                    _Blocker(
                        f"breaching:{rule.name}",
                        f"{rule.name} breaching ({_value_text(rule, track)})",
                        rule,
                    )
                )
            elif not track.status.passes_gate:
                blockers.append(
                    _Blocker(
                        f"inconclusive:{rule.name}",
                        f"{rule.name} {_inconclusive_text(track)}",
                        rule,
                    )
                )
        windows = self.policy.deployment_windows
        if not inside_window(windows, now):
            opening = next_opening(windows, now)
            when = f"; next opens {format_time(opening)}" if opening else ""
            blockers.append(_Blocker("window", f"outside the deployment windows{when}"))
        if not self.options.auto_promote:
            blockers.append(
                _Blocker("auto_promote", "auto-promote is off: waiting for an operator's promote")
            )
        return blockers

    def _advance(self, run: _Run, why: str) -> None:
        s = run.s
        step = s.step + 1
        weight = self._weights[step]
        if weight == 100:
            s.phase = transition(s.phase, Event.PROMOTE)
            s.step, s.promoted_at = step, run.now
            self._resolve_all(run, "canary phase ended at promotion")
            s.rules = {}
            self._traffic_changed(run, 100)
            watch = format_duration(self._watch)
            run.emit(
                "promote",
                f"promoted {s.canary} to 100% ({why}); post-promotion watch {watch}",
                canary_percent=100,
            )
            self._watch_over(run)
            return
        s.phase = transition(s.phase, Event.ADVANCE)
        s.step = step
        self._traffic_changed(run, weight)
        run.emit(
            "set_traffic",
            f"step {step + 1}/{len(self._weights)}: {s.canary} to {weight}% ({why})",
            canary_percent=weight,
        )

    def _traffic_changed(
        self, run: _Run, percent: int, *, adopted: Deployment | None = None
    ) -> None:
        """A new split: restart the hold and the warm-up, forget every breach."""
        s = run.s
        s.canary_percent = percent
        s.step_started_at = run.now
        s.warmup_until = run.now + self._warmup
        s.hold_reason = None
        s.rules = {name: track.cleared() for name, track in s.rules.items()}
        if adopted is not None:
            s.expected = adopted
        elif not run.dry_run:
            assert s.stable is not None
            s.expected = Deployment.of(s.stable, s.canary, percent)

    def _watch_over(self, run: _Run) -> bool:
        s = run.s
        if (
            s.phase is not P.PROMOTED
            or s.promoted_at is None
            or run.now < s.promoted_at + self._watch
        ):
            return False
        promoted = s.canary
        self._resolve_all(run, "post-promotion watch ended")
        ended = f"post-promotion watch of {format_duration(self._watch)} ended: "
        if run.dry_run:  # the canary never carried all traffic: it is not the stable version
            live = f"; live is still {s.live.describe()}" if s.live else ""
            run.emit("complete", f"{ended}{promoted} would now be the stable version{live}")
        else:
            run.emit("complete", f"{ended}{promoted} is the stable version")
        s.phase = transition(s.phase, Event.FINISH)
        if not run.dry_run:
            s.stable = promoted
        self._reset(run, keep_expected=run.dry_run)
        return True

    def _end_rollout(self, run: _Run, event: Event) -> None:
        s = run.s
        # a rollback's page stays open for a person, whoever made the rollback
        keep = (
            {r.name for r in self._rules.values() if r.on_breach == "rollback"}
            if event is Event.ROLLBACK
            else set()
        )
        self._resolve_all(run, "rollout ended", keep=keep)
        s.phase = transition(s.phase, event)
        s.canary_percent = 0
        if event is Event.ROLLBACK and not run.dry_run:
            assert s.stable is not None
            s.expected = Deployment(s.stable)
        s.rules = {}
        s.hold_reason = None
        s.warmup_until = None

    def _reset(self, run: _Run, *, keep_expected: bool) -> None:
        s = run.s
        s.canary, s.step, s.canary_percent = None, 0, 0
        s.started_at = s.step_started_at = s.warmup_until = s.promoted_at = None
        s.stood_down_from, s.hold_reason, s.rules = None, None, {}
        if not keep_expected and s.stable is not None:
            s.expected = Deployment(s.stable)

    def _resolve_all(self, run: _Run, why: str, keep: set[str] | None = None) -> None:
        for name, track in sorted(run.s.rules.items()):
            rule = self._rules.get(name)
            if rule is None:
                continue
            key = self._key(run.s, name)
            if track.paged and name not in (keep or ()):
                run.emit_rule("resolve", f"{name}: {why}", rule, track, dedup_key=key)
            if track.inconclusive_paged:
                run.emit_rule(
                    "resolve", f"{name}: {why}", rule, track, dedup_key=key + "/inconclusive"
                )
            if track.paged or track.inconclusive_paged:
                run.s.rules[name] = _with_pages(track, False, False)

    def _adopt(self, run: _Run, live: Deployment, why: str) -> None:
        s = run.s
        assert live.canary is not None
        s.phase = transition(s.phase, Event.START)
        s.canary, s.stable = live.canary, live.stable
        s.started_at, s.promoted_at, s.stood_down_from, s.rules = run.now, None, None, {}
        s.step = self._step_for(live.canary_percent)
        self._traffic_changed(run, live.canary_percent, adopted=live)
        run.emit(
            "start",
            f"{why}: {live.describe()} as step {s.step + 1}/{len(self._weights)} "
            f"(hold {format_duration(self._holds[s.step])} from now)",
            canary_percent=live.canary_percent,
            actor="coalmine",
        )

    def _step_for(self, percent: int) -> int:
        """The highest step whose weight does not exceed ``percent``; the first if none does."""
        below = [i for i, w in enumerate(self._weights[:-1]) if w <= percent]
        return below[-1] if below else 0

    def _key(self, s: RolloutState, rule: str) -> str:
        return f"coalmine/{s.script}/{s.canary}/{rule}"

    # ---- operator commands ----------------------------------------------------------------

    def _pause(self, run: _Run, _: Command) -> None:
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
            "paused by an operator: advancing stops; "
            "the hold clock and rollback triggers keep running",
        )

    def _resume(self, run: _Run, _: Command) -> None:
        s = run.s
        if s.phase is P.PAUSED:
            s.phase = transition(s.phase, Event.RESUME)
            s.hold_reason = None
            run.emit("resume", "resumed by an operator")
        elif s.phase is P.STOOD_DOWN and s.live is not None:
            self._adopt_after_drift(run, s.live)
        elif s.phase in (P.CANARY, P.PROMOTED):
            return  # not paused: already running, nothing to do
        else:
            run.emit(
                "warn",
                f"resume refused: the rollout is {s.phase.value}, neither paused nor stood down",
            )

    def _adopt_after_drift(self, run: _Run, live: Deployment) -> None:
        s = run.s
        same_versions = live.is_split and (live.canary, live.stable) == (s.canary, s.stable)
        if same_versions:
            s.phase = transition(s.phase, Event.ADOPT_SPLIT)
            s.stood_down_from = None
            s.step = self._step_for(live.canary_percent)
            self._traffic_changed(run, live.canary_percent, adopted=live)
            run.emit(
                "resume",
                f"resumed after drift: adopted {live.describe()} as step "
                f"{s.step + 1}/{len(self._weights)}, hold counts from now",
                canary_percent=live.canary_percent,
            )
        elif not live.is_split and live.stable == s.canary:
            s.phase = transition(s.phase, Event.ADOPT_PROMOTED)
            s.stood_down_from, s.step, s.promoted_at = None, len(self._weights) - 1, run.now
            self._resolve_all(run, "canary phase ended at promotion")
            s.rules = {}
            self._traffic_changed(run, 100, adopted=live)
            run.emit(
                "resume",
                f"resumed after drift: {live.describe()} adopted as promoted; "
                f"post-promotion watch {format_duration(self._watch)} from now",
                canary_percent=100,
            )
        else:
            self._resolve_all(run, "rollout ended by hand")
            s.phase = transition(s.phase, Event.FINISH)
            s.stable = live.stable
            self._reset(run, keep_expected=True)
            s.expected = live
            run.emit(
                "resume",
                f"resumed after drift: the rollout ended by hand; live is {live.describe()}",
            )
            if live.is_split:
                self._adopt(run, live, "adopted the live split as a new rollout")

    def _operator_promote(self, run: _Run, _: Command) -> None:
        s = run.s
        if s.phase is P.PROMOTED:
            return  # already at 100%: nothing to do
        if s.phase is not P.CANARY:
            hint = {
                P.PAUSED: "; resume first",
                P.STOOD_DOWN: "; resume adopts the live split first",
            }
            run.emit(
                "warn", f"promote refused: the rollout is {s.phase.value}{hint.get(s.phase, '')}"
            )
            return
        breaching = [
            r
            for r in self._canary_rules
            if r.gating and s.rules.get(r.name, _EMPTY).status is RuleStatus.BREACHING
        ]
        if breaching:
            rule = breaching[0]
            track = s.rules[rule.name]
            run.emit_rule(
                "warn",
                f"promote refused: {rule.name} is breaching ({_value_text(rule, track)})",
                rule,
                track,
            )
            return
        self._advance(run, "operator promote")

    def _operator_rollback(self, run: _Run, _: Command) -> None:
        s = run.s
        if not allowed(s.phase, Event.ROLLBACK):
            run.emit(
                "warn", f"rollback refused: the rollout is {s.phase.value}; nothing to roll back"
            )
            return
        run.emit("rollback", f"rolled back {s.canary} by an operator", canary_percent=0)
        self._end_rollout(run, Event.ROLLBACK)

    def _start(self, run: _Run, command: Command) -> None:
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
        s.phase = transition(s.phase, Event.START)
        s.canary, s.step, s.started_at, s.promoted_at, s.rules = version, 0, run.now, None, {}
        s.stood_down_from = None
        run.emit("start", f"started canary {version} over {s.stable} by an operator")
        self._traffic_changed(run, self._weights[0])
        run.emit(
            "set_traffic",
            f"step 1/{len(self._weights)}: {version} to {self._weights[0]}%",
            canary_percent=self._weights[0],
        )


def _with_pages(track: RuleTrack, paged: bool, inconclusive_paged: bool) -> RuleTrack:
    return replace_track(track, paged=paged, inconclusive_paged=inconclusive_paged)


def _interval(rule: CompiledRule, track: RuleTrack) -> tuple[float, float] | None:
    if not rule.compares or track.interval_low is None or track.interval_high is None:
        return None
    return track.interval_low, track.interval_high


def _num(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def _value_text(rule: CompiledRule, track: RuleTrack) -> str:
    if rule.compares:
        return _compare_text(rule, track, rule.operator)
    samples = f", {_num(track.samples)} samples" if track.samples is not None else ""
    window = format_duration(rule.window)
    return f"{_num(track.value)} {rule.operator} {_num(rule.threshold)}, window {window}{samples}"


def _compare_text(rule: CompiledRule, track: RuleTrack, operator: str) -> str:
    """``canary/stable rate ratio 4.1 (99% CI 2.4-7.9) > 1.5: canary 23 of 1800, ...``."""
    assert rule.confidence is not None
    ev = track.evidence
    counts = (
        f": canary {_num(ev.canary_events)} of {_num(ev.canary_samples)}, "
        f"stable {_num(ev.stable_events)} of {_num(ev.stable_samples)} since the step began"
        if ev is not None
        else ""
    )
    low, high = track.interval_low, track.interval_high
    ci = (
        f" ({rule.confidence * 100:.4g}% CI {_num(low)}-{_num(high)})"
        if low is not None and high is not None
        else ""
    )
    return (
        f"canary/stable rate ratio {_num(track.value)}{ci} {operator} "
        f"max_ratio {_num(rule.threshold)}{counts}"
    )


def _recovered_text(rule: CompiledRule, track: RuleTrack) -> str:
    if rule.compares:
        return _compare_text(rule, track, "no longer shown above")
    bound = "<=" if rule.above else ">="
    return (
        f"{_num(track.value)} {bound} {_num(rule.threshold)}, window {format_duration(rule.window)}"
    )


def _inconclusive_text(track: RuleTrack) -> str:
    if track.status is RuleStatus.WARMUP:
        return "in warm-up"
    if track.status is RuleStatus.NONE:
        return "not evaluated yet"
    return f"inconclusive ({track.detail})"


def _when(t: datetime) -> str:
    return format_time(t.replace(microsecond=0))


def _trip_text(rule: CompiledRule, track: RuleTrack, consequence: str) -> str:
    since = _when(track.breached_since) if track.breached_since else "now"
    stable = ""
    if rule.compares:
        stable = f" (stable rate {_num(track.stable_value)})"
    elif track.stable_value is not None:
        both = _breaches(rule, track.stable_value)
        stable = (
            f" (stable {_num(track.stable_value)} breaches too: both versions are affected,"
            " a shared incident rather than the canary alone)"
            if both
            else f" (stable {_num(track.stable_value)})"
        )
    return (
        f"{rule.name} tripped: {_value_text(rule, track)}{stable}, breaching since {since} "
        f"(for {format_duration(rule.for_)}): {consequence}"
    )


def _breaches(rule: CompiledRule, value: float) -> bool:
    return value > rule.threshold if rule.above else value < rule.threshold
