"""The live daemon: one loop per watched script around the pure engine.

Each tick of a script, in order: apply any traffic change still pending (after a crash or a
failed call), read the live deployment, apply queued operator commands, fetch every active
rule's observation for both versions concurrently (each with a timeout), run the engine, then
persist state, journal entries, notifications and traffic intents in one transaction, and only
then call Cloudflare. When the store cannot commit, progress waits for its durable intent, but
the rest goes on: the state in memory, and a tick's decisions (a rollback, its critical page)
carried out at once and kept by :mod:`coalmine.guard` until the store takes them.

Loops run at ``analysis.interval`` while a canary is active and, otherwise, at
``COALMINE_DRIFT_INTERVAL`` (``COALMINE_DISCOVERY_INTERVAL`` without the account-wide signal),
on a fixed schedule: no overlapping polls, no drift, missed ticks coalesced. Not every tick
reads the live deployment: :mod:`coalmine.cloudflare.discovery` says when.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
import structlog

from coalmine.cloudflare.actuator import (
    Actuator,
    Applied,
    intent_for,
    intents_for,
    refusal_resolved,
    stuck_page,
    withdrawal,
)
from coalmine.cloudflare.client import (
    CloudflareClient,
    CloudflareError,
    LiveDeployment,
    Version,
    to_engine,
)
from coalmine.cloudflare.discovery import Watch
from coalmine.engine import Command, Decision, Engine, Observation, RolloutPhase, RolloutState
from coalmine.errors import StoreError
from coalmine.guard import Guard
from coalmine.notify.outbox import Outbox, notifications
from coalmine.pending import (
    CommandFailed,
    CommandQueued,
    Pending,
    answer_forwarded,
    forward,
    take_forwarded,
)
from coalmine.policy import Policy, Rule
from coalmine.progress import lease_fields, progress, rollout_links, rules_view
from coalmine.replicas import LeaseKeeper
from coalmine.schedule import scheduled
from coalmine.server.health import Health
from coalmine.server.metrics import Metrics
from coalmine.sources import Source, Target, observe
from coalmine.sources.pagerduty import IncidentFreeze
from coalmine.store.base import StateStore
from coalmine.store.leases import ACTING_FOR, LeaseLost
from coalmine.store.records import Intent, NewEntry

log = structlog.get_logger("coalmine")
__all__ = ["CommandFailed", "CommandQueued", "ScriptLoop", "Shared"]


HISTORY = 120  # values kept per rule for the status page: an hour at a 30s interval
STUCK_PAGE_AFTER = timedelta(minutes=2)  # page when a traffic change stays unapplied this long
ACTIVE = (RolloutPhase.CANARY, RolloutPhase.PAUSED, RolloutPhase.PROMOTED, RolloutPhase.STOOD_DOWN)


@dataclass
class Shared:
    """What every script's loop uses."""

    store: StateStore
    cloudflare: CloudflareClient
    actuator: Actuator
    sources: dict[str, Source]
    metrics: Metrics
    health: Health
    outbox: Outbox
    clock: Callable[[], datetime]
    discovery_interval: timedelta
    guard: Guard  # rollbacks and their pages when the store cannot record
    fetch_timeout: float = 20.0
    public_url: str = "http://127.0.0.1:9300"  # links in pages point here
    # Deployment reads in flight at once, over all loops. The rest wait here, at no cost:
    # waiting in httpcore's pool instead, each request start and end rescans every waiting
    # request, so 1,000 loops reading at once take seconds of CPU each and never catch up.
    # 20 is httpx's kept-alive connections: none is opened and closed again.
    reads: anyio.Semaphore = field(default_factory=lambda: anyio.Semaphore(20))
    freeze: IncidentFreeze | None = None  # PagerDuty's incidents, for policies with a freeze
    leases: LeaseKeeper | None = None  # replicas on PostgreSQL: act only on leased scripts
    on_canary: Callable[[str, bool], None] = lambda script, live: None  # tells the budget plan
    watch: Watch = field(default_factory=Watch)  # when each script reads its deployment


class ScriptLoop:
    """One Worker script's rollout, polled on schedule."""

    def __init__(
        self, script: str, policy: Policy, engine: Engine, state: RolloutState, shared: Shared
    ) -> None:
        self.script = script
        self.policy = policy
        self.engine = engine
        self.state = state
        self.recent: list[Decision] = []
        # each rule's recent canary values, for the status page's charts
        self.history: dict[str, deque[tuple[datetime, float | None]]] = {}
        self._shared = shared
        self._rules: dict[str, Rule] = {r.name: r for r in policy.rules}
        self._versions: dict[str, Version] = {}
        self._pending: list[Pending] = []
        self._stuck_paged = False
        self._blocked: str | None = None
        self._refusal: str | None = None  # why Cloudflare refused a change for good
        self._change_error: tuple[str, str] | None = None  # (kind, error) of a failed change
        self._frozen_reason: str | None = None  # the incident freeze at the last tick
        self._wake = anyio.Event()
        self._next_policy: tuple[Policy, Engine] | None = None  # reloaded, not in use yet
        self._stopping = False
        self._epoch: int | None = None  # the lease epoch this loop last acted under
        self._durable: tuple[object, ...] | None = None  # state.durable() last committed
        shared.watch.add(script, self, (state.stable, state.canary))

    def wake(self) -> None:
        """Tick now instead of at the next scheduled time."""
        self._wake.set()

    @property
    def interval(self) -> timedelta:
        """The poll period for the rollout's phase."""
        return self._shared.watch.idle_interval if self.idle else self.policy.analysis.interval

    @property
    def idle(self) -> bool:
        """No rollout under way: the script is only watched for a new split."""
        return self.state.phase not in ACTIVE

    async def run(self, phase: float = 1.0) -> None:
        """Tick forever on schedule; a failed tick is logged and the next one comes.

        The schedule runs on the monotonic clock (a wall-clock step cannot stall it); ``now``
        handed to the engine is the wall clock. The second tick comes ``phase`` (0 < phase ≤ 1)
        of an interval after the first, and the rest one interval apart: loops started
        together with different phases stay out of step, so their calls do not all go at once.
        """
        due = anyio.current_time()
        share = phase
        while not self._stopping:
            lateness = anyio.current_time() - due
            self._shared.metrics.tick_lateness.observe(max(0.0, lateness))
            await self.tick_safely(scheduled(self._shared.clock(), lateness, self.interval))
            step = self.interval.total_seconds()
            due += step * share
            share = 1.0
            while due <= anyio.current_time():  # coalesce missed ticks
                due += step
            with anyio.move_on_after(due - anyio.current_time()):
                await self._wake.wait()
            if self._wake.is_set():
                self._wake = anyio.Event()
                due = anyio.current_time()

    def stop(self) -> None:
        """Stop after the current tick (the script is no longer governed by any policy)."""
        self._stopping = True
        self._shared.watch.remove(self.script)
        self._wake.set()

    def use_policy(self, policy: Policy, engine: Engine) -> None:
        """Judge by ``policy`` from the next tick on; the rollout keeps its state. A running
        rollout whose steps the new policy changes keeps its policy until it ends (its step
        would mean another weight)."""
        self._next_policy = (policy, engine)
        self._switch_policy()

    def _switch_policy(self) -> None:
        if self._next_policy is None:
            return
        policy, engine = self._next_policy
        weights = [s.weight for s in policy.steps]
        if self.state.phase in ACTIVE and weights != [s.weight for s in self.policy.steps]:
            return
        self.policy, self.engine, self._next_policy = policy, engine, None
        self._rules = {r.name: r for r in policy.rules}

    async def submit(self, command: Command, timeout: float = 30.0) -> list[Decision]:
        """Queue an operator command, wake the loop, and return its decisions once applied."""
        leases = self._shared.leases
        if leases is not None and leases.fence(self.script) is None:
            return await forward(leases, self.script, command, timeout)
        pending = Pending(command)
        self._pending.append(pending)
        self._wake.set()
        with anyio.move_on_after(timeout):
            await pending.done.wait()
        if not pending.done.is_set():
            if pending.taken:
                raise CommandQueued("a tick in progress is applying it; see `coalmine status`")
            self._pending.remove(pending)  # withdrawn: a retry must not apply it twice
            raise CommandFailed(f"not applied within {timeout:g}s and withdrawn; nothing changed")
        if pending.error is not None:
            raise CommandFailed(pending.error)
        return pending.decisions

    async def version_problem(self, version: str) -> tuple[int, str] | None:
        """Why ``version`` cannot be started, as an HTTP status and message, or None: 404 with
        Cloudflare's message when it does not exist, 503 when Cloudflare could not say."""
        try:
            await self._shared.cloudflare.version(self.script, version)
        except CloudflareError as exc:
            if exc.status in (400, 404):
                return 404, f"no version {version!r} of {self.script!r}: {exc.detail}"
            return 503, f"cannot check version {version!r} with Cloudflare: {exc}; try again"
        return None

    async def tick_safely(self, now: datetime) -> None:
        """One tick; remote and store failures are logged, reported in /health, never raised."""
        guard = self._shared.guard
        try:
            await guard.watch(now)
            if not await self._lease_gate():
                return
            # replicas: every call of the tick is made for this script, so a replica whose
            # lease lapsed while it was paused mid-tick sends nothing more (the request hook)
            acting = ACTING_FOR.set(self.script)
            try:
                await self.tick(now)
            finally:
                ACTING_FOR.reset(acting)
            guard.report()
        except LeaseLost as exc:
            log.warning("lease lost; stepping down", script=self.script, error=str(exc))
            self._epoch = None
        except StoreError as exc:
            guard.report()
            self._shared.health.store_ok = False
            log.error("state store failed; tick not recorded", script=self.script, error=str(exc))
        except CloudflareError as exc:
            log.warning("cloudflare call failed; tick skipped", script=self.script, error=str(exc))
        except Exception as exc:  # a bug must not stop the other scripts or the next tick
            log.exception("internal error; tick skipped", script=self.script, error=repr(exc))
            self._shared.metrics.internal_errors.inc()
        finally:  # a canary started or ended: the budget plan follows
            self._shared.on_canary(self.script, self.state.phase in ACTIVE)

    async def _lease_gate(self) -> bool:
        """Whether this replica may tick the script; a new holder first reloads its state
        (the tick then reconciles open intents before judging)."""
        leases = self._shared.leases
        if leases is None:
            return True
        fence = leases.fence(self.script)
        if fence is None:
            self._epoch = None
            return False
        if fence.epoch != self._epoch:
            saved = (await self._shared.store.states()).get(self.script)
            if saved is not None:
                self.state = RolloutState.from_json(saved)
            self._versions, self._stuck_paged, self._epoch = {}, False, fence.epoch
            self._shared.actuator.forget(self.script)  # the last holder may have left intents
            self._shared.watch.force(self.script)
            log.info("lease taken; state reloaded", script=self.script, epoch=fence.epoch)
        self._pending += await take_forwarded(leases, self.script)
        return True

    async def tick(self, now: datetime) -> list[Decision]:
        """Reconcile, observe, decide, persist, act."""
        self._switch_policy()
        stuck = await self._apply_pending(now)
        # while a change is still pending the live split is in between: judging it as drift
        # would be wrong, but rules are still evaluated, so a rollback can still be decided
        live = None if stuck else await self._read_live()
        before = self.state
        pending, self._pending = self._pending, []
        if self._refusal is not None and (pending or before.phase not in ACTIVE):
            await self._clear_refusal(now)  # an operator acted, or the rollout is over
        self._blocked = (
            "a traffic change is still being applied"
            if stuck
            else self._refusal or self._shared.guard.blocked
        )
        for item in pending:
            item.taken = True
        try:
            return await self._decide(live, before, pending, now)
        except BaseException as exc:
            for item in pending:
                if not item.done.is_set():
                    item.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    item.done.set()
            raise
        finally:
            if self._shared.leases is not None:
                await answer_forwarded(self._shared.leases, pending)

    async def _read_live(self) -> LiveDeployment | None:
        """The deployment serving traffic now, read once a slot among the loops is free, when
        due (:meth:`Watch.due`); otherwise the one last read."""
        watch, now = self._shared.watch, self._shared.clock()
        if not watch.due(self.script, not self.idle, self.interval, now, bool(self._pending)):
            return watch.last(self.script)
        async with self._shared.reads:
            return await self._shared.cloudflare.current(self.script)

    async def reconcile(self) -> None:
        """At start, apply what a crash left open as a tick does: a change applied now counts
        its step's hold from now, one refused for good is withdrawn (the first tick retries)."""
        with suppress(StoreError):  # logged by the tick that meets it again
            await self._apply_pending(self._shared.clock())

    async def _apply_pending(self, now: datetime) -> bool:
        """Apply open traffic intents; True when one is still not applied (paged after a while)."""
        shared = self._shared
        stuck: tuple[Intent, Exception] | None = None
        try:
            outcomes = await shared.actuator.reconcile(self.script)
        except StoreError as exc:  # open intents unknown: hold (a rollback still goes through)
            log.error("state store unreadable; holding", script=self.script, error=str(exc))
            return True
        for intent, applied in outcomes:
            failed = isinstance(applied, Exception)
            shared.metrics.actuator_calls.labels(self.script, "error" if failed else "ok").inc()
            if isinstance(applied, Applied) and applied.refused:
                await self._withdraw(intent, applied, now)
            elif (
                isinstance(applied, Applied)
                and not applied.superseded
                and intent.kind != "rollback"
                and intent.created_at < now
            ):
                # decided at an earlier tick, live only now: its step counts from now
                state = self.engine.traffic_took_effect(self.state, now).state
                with suppress(StoreError):  # the state goes on in memory; the next commit has it
                    await shared.store.commit(self.script, state.to_json(), [], [], now)
                self.state = state
            if isinstance(applied, Exception):
                stuck = (intent, applied)
                self._change_error = (intent.kind, str(applied))
                log.warning(
                    "traffic change not applied yet",
                    script=self.script,
                    kind=intent.kind,
                    error=str(applied),
                )
        if (
            stuck is not None
            and not self._stuck_paged
            and now - stuck[0].created_at >= STUCK_PAGE_AFTER
        ):
            await self._notify_stuck(now, *stuck)
        elif stuck is None and self._stuck_paged:
            await self._notify_stuck(now)
        if stuck is None:
            self._change_error = None
        return stuck is not None

    async def _notify_stuck(
        self, now: datetime, intent: Intent | None = None, error: Exception | None = None
    ) -> None:
        """Page (critical) that a traffic change cannot be applied, or resolve that page."""
        note = stuck_page(self.script, intent, error)
        state = self.state.to_json()
        try:
            await self._shared.store.commit(self.script, state, [], [note], now)
        except StoreError:  # a critical page: sent directly, kept until the store is back
            await self._shared.guard.keep(self.script, state, [], [note], now, [])
        self._stuck_paged = intent is not None
        self._shared.outbox.wake()

    async def _withdraw(self, intent: Intent, applied: Applied, now: datetime) -> None:
        """Cloudflare refused a change for good: restore the rollout to its state before the
        tick that decided it, hold there (rules still judged, rollbacks still made) until an
        operator acts, and page once with Cloudflare's reason."""
        saved = intent.body.get("state_before")
        state = RolloutState.from_json(saved) if isinstance(saved, dict) else self.state
        if (state.canary, state.stable) == (self.state.canary, self.state.stable):
            state.rules = dict(self.state.rules)  # what rules saw since stays: a `for` runs on
        entry, page, self._refusal = withdrawal(intent, applied, state.phase.value, now)
        await self._shared.store.commit(self.script, state.to_json(), [entry], [page], now)
        self.state = state
        self._shared.outbox.wake()
        log.error("traffic change refused for good; withdrawn", script=self.script, why=entry.body)

    async def _clear_refusal(self, now: datetime) -> None:
        """Resolve the refusal's page: an operator acted or the rollout ended."""
        self._refusal = None
        note = refusal_resolved(self.script)
        await self._shared.store.commit(self.script, self.state.to_json(), [], [note], now)
        self._shared.outbox.wake()

    async def _decide(
        self,
        live: LiveDeployment | None,
        before: RolloutState,
        pending: list[Pending],
        now: datetime,
    ) -> list[Decision]:
        state, decisions = self.state, []
        frozen = self._frozen_reason = await self._frozen()
        if live is not None:
            if len(live.versions) > 1 and any(v not in self._versions for v, _ in live.versions):
                self._versions = await self._shared.cloudflare.versions(self.script)
            outcome = self.engine.observe_deployment(state, to_engine(live, self._versions), now)
            state, decisions = outcome.state, outcome.decisions
        for item in pending:
            outcome = self.engine.command(state, item.command, now, frozen=frozen)
            state, item.decisions = outcome.state, outcome.decisions
            decisions += outcome.decisions
        observations = await self._observe(state, now, frozen)
        outcome = self.engine.tick(state, now, observations, blocked=self._blocked, frozen=frozen)
        state, decisions = outcome.state, decisions + outcome.decisions
        with anyio.CancelScope(shield=True, deadline=anyio.current_time() + 60):
            # a stop (SIGTERM) lets the tick's write and traffic change finish
            return await self._record_and_act(before, state, decisions, pending, now, live)
        return decisions

    async def _record_and_act(
        self,
        before: RolloutState,
        state: RolloutState,
        decisions: list[Decision],
        pending: list[Pending],
        now: datetime,
        live: LiveDeployment | None,
    ) -> list[Decision]:
        shared = self._shared
        await self._persist(before, state, decisions, now, live)
        for item in pending:
            item.done.set()
        if decisions:
            shared.outbox.wake()
            self.recent = (self.recent + decisions)[-50:]
            for d in decisions:
                # a rollback or a page needs a person's eyes: log it where they look
                level = log.warning if d.action in ("rollback", "page") else log.info
                extra: dict[str, Any] = {"dry_run": True} if d.dry_run else {}
                if d.requested_by:
                    extra["requested_by"] = d.requested_by
                level(
                    d.reason,
                    script=self.script,
                    action=d.action,
                    rule=d.rule,
                    canary=d.canary,
                    **extra,
                )
        shared.metrics.record(state, self.engine.rules, decisions)
        self._remember(before, state, now)
        if any(intent_for(d) for d in decisions):  # apply now, not at the next tick
            for intent, result in await shared.actuator.reconcile(self.script):
                failed = isinstance(result, Exception)
                shared.metrics.actuator_calls.labels(self.script, "error" if failed else "ok").inc()
                if isinstance(result, Applied) and result.refused:
                    await self._withdraw(intent, result, now)
                elif failed:
                    self._change_error = (intent.kind, str(result))
                    log.warning(
                        "traffic change failed; retrying next tick",
                        script=self.script,
                        kind=intent.kind,
                        error=str(result),
                    )
        if shared.guard.store.kept:  # pages the store could not queue: sent directly
            await shared.guard.send_pages()
        return decisions

    def now(self) -> datetime:
        """The daemon's clock."""
        return self._shared.clock()

    def _remember(self, before: RolloutState, state: RolloutState, now: datetime) -> None:
        """Keep the rules' latest values (a new canary starts afresh)."""
        if state.canary != before.canary:
            self.history = {}
        for name, track in state.rules.items():
            kept = self.history.setdefault(name, deque(maxlen=HISTORY))
            kept.append((now, track.value))

    async def _persist(
        self,
        before: RolloutState,
        state: RolloutState,
        decisions: Sequence[Decision],
        now: datetime,
        live: LiveDeployment | None,
    ) -> None:
        durable, store = state.durable(), self._shared.guard.store  # failing: commit to retry
        if not decisions and store.ok and self._durable == durable == before.durable():
            self.state = state  # nothing a restart needs changed: no commit (docs/reliability.md)
            return
        entries = [
            NewEntry(d.t, self.script, d.requested_by or d.actor, d.action, d.to_dict())
            for d in decisions
        ]
        intents = intents_for(decisions, live, before.to_json()) if decisions else []
        links = rollout_links(self._shared.public_url, self.script)
        notes = notifications(decisions, before, links)
        try:
            await self._shared.store.commit(
                self.script, state.to_json(), entries, notes, now, intents
            )
            self._durable = durable
        except StoreError as exc:
            if any(intent.kind != "rollback" for intent in intents):
                raise  # progress waits for its durable intent; the next tick decides again
            # The rest goes on without the store: the rollout's state in memory (a rule's
            # breach keeps counting towards its rollback), decisions carried out now (a
            # rollback, its page) and kept, in order, until the store takes them.
            if entries or notes:
                await self._shared.guard.keep(
                    self.script, state.to_json(), entries, notes, now, intents
                )
            elif self._shared.guard.store.lost is None:  # a lost store was logged once
                log.warning(
                    "state store failed; the rollout's state is kept in memory",
                    script=self.script,
                    error=str(exc),
                )
        self.state = state

    async def _frozen(self) -> str | None:
        """Why no canary may start or advance now (an incident freeze), or None."""
        freeze = self.policy.freeze
        if freeze is None:
            return None
        if self._shared.freeze is None:
            return "incident freeze unknown: no PagerDuty API configured; not advancing"
        return await self._shared.freeze.check(freeze.pagerduty_services)

    async def _observe(
        self, state: RolloutState, now: datetime, frozen: str | None
    ) -> list[Observation]:
        rules = [self._rules[r.name] for r in self.engine.active_rules(state, now, frozen)]
        canary, stable = state.canary, state.stable
        if not rules or canary is None or stable is None:
            return []
        where = (state.step + 1, state.canary_percent, state.phase.value)  # webhooks say so
        targets = [
            Target(self.script, "canary", canary, canary, stable, *where),
            Target(self.script, "stable", stable, canary, stable, *where),
        ]
        pairs = [
            (rule, target)
            for rule in rules
            for target in (targets[:1] if rule.source == "webhook" else targets)
        ]  # a webhook is called once, not per version
        return await observe(self._shared.sources, pairs, now, self._shared.fetch_timeout)

    def describe(self) -> dict[str, Any]:
        """The rollout as the admin API shows it (and ``coalmine status`` and ``GET /``)."""
        s = self.state
        return {
            "script": self.script,
            "policy": self.policy.name,
            "phase": s.phase.value,
            "canary": s.canary,
            "stable": s.stable,
            "canary_percent": s.canary_percent,
            "step": s.step + 1 if s.phase in ACTIVE else 0,
            "steps": [step.weight for step in self.policy.steps],
            "rules": rules_view(self.engine, s),
            "recent_decisions": [d.to_dict() for d in self.recent[-20:]],
            **progress(
                self.state,
                self.policy,
                self.engine,
                self._shared.clock(),
                self._blocked,
                self._frozen_reason,
                self._change_error or (("traffic", self._refusal) if self._refusal else None),
            ),
            **lease_fields(self._shared.leases, self.script),
        }
