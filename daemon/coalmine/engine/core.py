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
from datetime import datetime, timedelta
from typing import Any, Literal

from coalmine.durations import format_duration
from coalmine.engine import commands, gates, texts
from coalmine.engine.gates import Blocker
from coalmine.engine.judge import CompiledRule, judge, judge_compare
from coalmine.engine.lifecycle import Event, RolloutPhase, transition
from coalmine.engine.model import Command, Decision, Deployment, Observation, Options
from coalmine.engine.outages import also_inconclusive, outage_paged
from coalmine.engine.state import RolloutState, RuleStatus, RuleTrack, replace_track
from coalmine.engine.windows import WindowClock
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


class Run:
    """One call's working copy of the state and the decisions it produces."""

    __slots__ = ("actor", "dry_run", "frozen", "now", "out", "s")

    def __init__(
        self,
        state: RolloutState,
        now: datetime,
        dry_run: bool,
        actor: Actor,
        frozen: str | None = None,
    ) -> None:
        self.s = state.copy()
        self.frozen = frozen  # why advancing is frozen (an open incident), or None
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
            interval=texts.interval(rule, track),
            **extra,
        )

    def done(self) -> Outcome:
        return Outcome(self.s, self.out)


class Engine:
    """Decides one script's rollout under one policy. Holds configuration only (and the next
    deployment-window opening it last looked up, see :class:`WindowClock`), never state."""

    def __init__(self, policy: Policy, options: Options | None = None) -> None:
        self.policy = policy
        self.options = options or Options()
        canary_hold = sum((s.hold for s in policy.steps[:-1]), timedelta(0))
        rules = [CompiledRule.of(r, canary_hold) for r in policy.rules]
        self._canary_rules = tuple(r for r in rules if "canary" in r.phases)
        self._post_rules = tuple(r for r in rules if "post_promotion" in r.phases)
        self._after_rollback = tuple(r for r in rules if r.when == "after_rollback")
        self._rules = {r.name: r for r in rules}
        self._source = {r.name: r.source for r in policy.rules}
        self._weights = [s.weight for s in policy.steps]
        self._holds = [s.hold for s in policy.steps]
        self._warmup = policy.analysis.warmup
        self._page_after = policy.analysis.inconclusive_page_after
        self._watch = policy.post_promotion.watch
        self.windows = WindowClock(policy.deployment_windows)
        self._webhooks = any(r.when is not None for r in rules)  # rules due only at some ticks

    def hold(self, step: int) -> timedelta:
        """How long the canary is held at ``step`` (an index into the policy's steps)."""
        return self._holds[step]

    def new_state(self, script: str) -> RolloutState:
        """The state of a script coalmine has not seen yet."""
        return RolloutState(script=script)

    # ---- inputs ---------------------------------------------------------------------------

    def observe_deployment(self, state: RolloutState, live: Deployment, now: datetime) -> Outcome:
        """Take in the live deployment: adopt a new split, or stand down on drift."""
        run = Run(state, now, self.options.dry_run, "coalmine")
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

    def command(
        self, state: RolloutState, command: Command, now: datetime, *, frozen: str | None = None
    ) -> Outcome:
        """Apply an operator's command; a command that cannot apply is a ``warn``.

        ``frozen``: why no canary may start or advance now (an incident freeze), or None.
        """
        run = Run(state, now, self.options.dry_run, "operator", frozen)
        handler = {
            "pause": commands.pause,
            "resume": commands.resume,
            "promote": commands.promote,
            "rollback": commands.rollback,
            "start": commands.start,
        }[command.kind]
        handler(self, run, command)
        if command.requested_by or command.reason:
            run.out = [
                replace(d, requested_by=command.requested_by, request_reason=command.reason)
                for d in run.out
            ]
        return run.done()

    def waiting_for(
        self, state: RolloutState, now: datetime, frozen: str | None = None
    ) -> list[str]:
        """What keeps a canary from advancing at ``now``, in words (empty: nothing does).

        The hold still running is not listed: the caller shows it as time remaining.
        """
        return gates.waiting_for(self, state, now, frozen)

    def tick(
        self,
        state: RolloutState,
        now: datetime,
        observations: Iterable[Observation],
        *,
        blocked: str | None = None,
        frozen: str | None = None,
    ) -> Outcome:
        """Evaluate every active rule on this tick's observations and act on the result.

        ``blocked``: the shell's reason advancing must wait (a traffic change still being
        applied); rules are judged and rollbacks still happen. ``frozen``: why no canary may
        advance now (an open incident, or incidents that could not be checked); rollbacks never
        wait for it.
        """
        run = Run(state, now, self.options.dry_run, "coalmine", frozen)
        s = run.s
        s.last_tick = now
        if s.phase is P.IDLE or self._watch_over(run):
            return run.done()
        if s.phase is P.ROLLED_BACK and not self._after_rollback:
            return run.done()
        canary: dict[str, Observation] = {}
        stable: dict[str, Observation] = {}
        for obs in observations:  # the last of duplicates wins
            (canary if obs.role == "canary" else stable)[obs.rule] = obs
        warming_up = s.warmup_until is not None and now < s.warmup_until
        trips: list[tuple[CompiledRule, RuleTrack]] = []
        tracks = s.rules
        for rule in self._active_rules(s, now, frozen):
            name = rule.name
            prev = tracks.get(name, _EMPTY)
            mine, theirs = canary.get(name), stable.get(name)
            if rule.confidence is not None:  # rule.compares, without the property's call
                track = judge_compare(rule, prev, mine, theirs, now, warming_up, s.step_started_at)
            else:
                track = judge(rule, prev, mine, theirs, now, warming_up)
            # Only a tripped, paged or inconclusive track can page, resolve or roll back: the
            # others (most, at most ticks) skip the call.
            if (
                track.tripped
                or track.paged
                or track.inconclusive_paged
                or track.inconclusive_since is not None
            ):
                track = self._notify(run, rule, prev, track, trips)
            tracks[name] = track
        if trips:
            self._rollback_trips(run, trips)
        if s.phase in (P.CANARY, P.PAUSED):
            self._consider_advancing(run, blocked)
        return run.done()

    def traffic_took_effect(self, state: RolloutState, now: datetime) -> Outcome:
        """A traffic change coalmine decided earlier was only applied now (the API refused it
        for a while): the step's hold, the warm-up and the watch count from now."""
        run = Run(state, now, self.options.dry_run, "coalmine")
        s = run.s
        if s.phase in (P.CANARY, P.PAUSED, P.PROMOTED):
            s.step_started_at = now
            s.warmup_until = now + self._warmup
            s.rules = {name: track.cleared() for name, track in s.rules.items()}
            if s.phase is P.PROMOTED:
                s.promoted_at = now
        return run.done()

    # ---- judging --------------------------------------------------------------------------

    def active_rules(
        self, state: RolloutState, now: datetime | None = None, frozen: str | None = None
    ) -> tuple[CompiledRule, ...]:
        """The rules a tick in this state at ``now`` evaluates (what the shell must fetch):
        every rule of the phase, webhook rules only when they are due (see :mod:`webhooks`)."""
        return self._active_rules(state, now, frozen)

    @property
    def rules(self) -> tuple[CompiledRule, ...]:
        """Every rule of the policy, compiled."""
        return tuple(self._rules.values())

    def _active_rules(
        self, s: RolloutState, now: datetime | None, frozen: str | None
    ) -> tuple[CompiledRule, ...]:
        phase = s.stood_down_from if s.phase is P.STOOD_DOWN else s.phase
        if phase in (P.CANARY, P.PAUSED):
            rules = self._canary_rules
        elif phase is P.PROMOTED:
            rules = self._post_rules
        elif phase is P.ROLLED_BACK:
            rules = self._after_rollback
        else:
            return ()
        if now is None or not self._webhooks:
            return rules
        return tuple(r for r in rules if r.when is None or gates.due(self, r, s, now, frozen))

    def _notify(
        self,
        run: Run,
        rule: CompiledRule,
        prev: RuleTrack,
        track: RuleTrack,
        trips: list[tuple[CompiledRule, RuleTrack]],
    ) -> RuleTrack:
        """Pages, resolves and warnings for one rule's new track; returns the track to keep."""
        paged, inconclusive_paged = track.paged, track.inconclusive_paged
        if rule.shared_hold and track.tripped:
            if track.status is RuleStatus.BREACHING:  # an inconclusive canary decides nothing
                track = self._shared_incident(run, rule, prev, track, trips)
                paged = track.paged
        elif track.tripped and not prev.tripped:
            if rule.on_breach == "rollback":
                trips.append((rule, track))
            elif rule.on_breach == "warn":
                run.emit_rule("warn", texts.trip_text(rule, track, "warning"), rule, track)
            else:
                if not paged:
                    self._page(run, rule, track, rule.severity)
                    paged = True
                if rule.on_breach == "hold":
                    run.emit_rule("hold", texts.trip_text(rule, track, "holding"), rule, track)
        elif paged and track.status is RuleStatus.OK:
            run.emit_rule(
                "resolve",
                f"{rule.name} recovered: {texts.recovered_text(rule, track)}",
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
            since = texts.when(track.inconclusive_since)
            also = also_inconclusive(
                self._source, run.s, rule.name, self._active_rules(run.s, None, None)
            )
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

    def _shared_incident(
        self,
        run: Run,
        rule: CompiledRule,
        prev: RuleTrack,
        track: RuleTrack,
        trips: list[tuple[CompiledRule, RuleTrack]],
    ) -> RuleTrack:
        """A tripped rollback rule with ``shared_incident: hold``, breaching at this tick: hold
        and page while the stable version breaches too; roll back once it no longer does."""
        if track.stable_breaching:
            if not track.shared:
                note = "both versions breach: shared incident; holding instead of rolling back"
                self._page(run, rule, track, "critical", note)
                run.emit_rule("hold", texts.trip_text(rule, track, note), rule, track)
            return replace_track(track, shared=True, paged=True)
        track = replace_track(track, shared=False)
        if not prev.tripped or prev.shared:
            trips.append((rule, track))
        return track

    def _page(
        self, run: Run, rule: CompiledRule, track: RuleTrack, severity: str, note: str = ""
    ) -> None:
        run.emit_rule(
            "page",
            texts.trip_text(rule, track, note or "paging"),
            rule,
            track,
            severity=severity,
            dedup_key=self._key(run.s, rule.name),
        )

    def _rollback_trips(self, run: Run, trips: list[tuple[CompiledRule, RuleTrack]]) -> None:
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
                "hold", texts.trip_text(rule, track, f"{why}: holding for an operator"), rule, track
            )
            return
        rule, track = trips[0]
        run.emit_rule(
            "rollback",
            texts.trip_text(rule, track, f"rolling back {s.canary}"),
            rule,
            track,
            canary_percent=0,
        )
        for rule, track in trips:  # a rollback's page stays open for a person to resolve
            self._page(run, rule, track, "critical", f"rolled back {s.canary}")
        self._end_rollout(run, Event.ROLLBACK)

    # ---- moving traffic -------------------------------------------------------------------

    def _consider_advancing(self, run: Run, blocked: str | None = None) -> None:
        s = run.s
        assert s.step_started_at is not None
        if run.now < s.step_started_at + self._holds[s.step]:
            return
        blockers = gates.blockers(self, s, run.now, run.frozen, words=False)
        if blocked is not None:
            blockers.append(Blocker("shell", blocked))
        if not blockers:
            self._advance(run, "hold elapsed, every gate passing")
            return
        key = "|".join(b.key for b in blockers)
        if key == s.hold_reason:
            return  # said at an earlier tick
        s.hold_reason = key
        if any(d.action == "hold" for d in run.out):
            return  # a trip already said why this tick holds
        blockers = gates.blockers(self, s, run.now, run.frozen)  # the same, now in words
        if blocked is not None:
            blockers.append(Blocker("shell", blocked))
        reason = "not advancing: " + "; ".join(b.reason for b in blockers)
        first = blockers[0].rule
        if first is not None:
            run.emit_rule("hold", reason, first, s.rules.get(first.name, _EMPTY))
        else:
            run.emit("hold", reason)

    def _advance(self, run: Run, why: str) -> None:
        s = run.s
        step = s.step + 1
        weight = self._weights[step]
        if weight == 100:
            s.phase = transition(s.phase, Event.PROMOTE)
            s.step, s.promoted_at = step, run.now
            self._end_canary_phase(run)
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
        self, run: Run, percent: int, *, adopted: Deployment | None = None
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

    def _watch_over(self, run: Run) -> bool:
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

    def _end_rollout(self, run: Run, event: Event) -> None:
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

    def _reset(self, run: Run, *, keep_expected: bool) -> None:
        s = run.s
        s.canary, s.step, s.canary_percent = None, 0, 0
        s.started_at = s.step_started_at = s.warmup_until = s.promoted_at = None
        s.stood_down_from, s.hold_reason, s.rules = None, None, {}
        if not keep_expected and s.stable is not None:
            s.expected = Deployment(s.stable)

    def _end_canary_phase(self, run: Run) -> None:
        """At promotion: canary-only rules end (their pages resolve, their tracks go); a rule
        that also runs after promotion carries on, pages and inconclusive clock included (the
        traffic change that follows clears its breach tracking)."""
        carried = {rule.name for rule in self._post_rules}
        ending = {name for name in run.s.rules if name not in carried}
        self._resolve_all(run, "canary phase ended at promotion", only=ending)
        run.s.rules = {name: t for name, t in run.s.rules.items() if name in carried}

    def _resolve_all(
        self, run: Run, why: str, keep: set[str] | None = None, only: set[str] | None = None
    ) -> None:
        for name, track in sorted(run.s.rules.items()):
            if only is not None and name not in only:
                continue
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

    def _adopt(self, run: Run, live: Deployment, why: str) -> None:
        s = run.s
        assert live.canary is not None
        self._resolve_all(run, "a new rollout started")  # an after_rollback smoke test's page
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


def _with_pages(track: RuleTrack, paged: bool, inconclusive_paged: bool) -> RuleTrack:
    return replace_track(track, paged=paged, inconclusive_paged=inconclusive_paged)
