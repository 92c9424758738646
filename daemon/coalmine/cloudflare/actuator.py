"""Carrying out traffic decisions exactly once, through Cloudflare's deployments API.

The engine's ``set_traffic``, ``promote`` and ``rollback`` decisions become *intents*, stored in
the same transaction as the state that decided them. Then, for each open intent: read the live
deployment; if it already serves what the intent asks (a crash after the call, before the
journal), just record that; otherwise create the deployment, read it back to verify, and record
the result with a journal entry. After a crash the open intents are reconciled this way before
anything else, so each change is applied once, neither repeated nor skipped. In dry-run mode
no intent is ever created. With replicas, every write is preceded by a look at the script's
lease in the database: a replica that lost it (paused, cut off, taken over) sends nothing.

A change Cloudflare refuses in a way retrying cannot fix (:func:`cannot_succeed`: a 4xx such
as 10021 invalid request, 100405 Durable Object exports, a version not found) is *withdrawn*:
recorded as ``refused: ...`` and not tried again; the daemon restores the rollout to the state
it had before deciding it (kept in the intent as ``state_before``) and pages once. A rollback
is never withdrawn: it keeps being retried and pages as stuck, because standing still on a
breaching canary is worse than a retry loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from coalmine.cloudflare.client import (
    SECRETS_CHANGED,
    CloudflareClient,
    CloudflareError,
    LiveDeployment,
)
from coalmine.engine import Decision
from coalmine.notify.outbox import plain
from coalmine.store.base import StateStore
from coalmine.store.leases import ACTING_FOR
from coalmine.store.records import Intent, NewEntry, NewIntent, NewNotification


class Fence(Protocol):
    """Raises unless this replica may still write for ``script`` (see replicas.LeaseKeeper)."""

    async def __call__(self, script: str, /, *, rollback: bool = False) -> None: ...


TRAFFIC_ACTIONS = ("set_traffic", "promote", "rollback")
# a script found with no open intent is not asked about again (each tick) until this process
# writes an intent, :meth:`Actuator.forget` is called (a lease taken over) or this long passed
QUIET_RECHECK = timedelta(seconds=60)


# 4xx answers that may succeed later without changing the request: auth being fixed or
# propagating (401, 403), timeouts (408), a concurrent change (409), the budget (429)
RETRYABLE_4XX = frozenset({401, 403, 408, 409, 429})


def cannot_succeed(exc: CloudflareError, kind: str) -> bool:
    """Whether Cloudflare refused the change itself, so that sending it again cannot help.

    Cloudflare answers a request that is wrong (an invalid body, 10021; Durable Object exports
    that differ, 100405; a version that does not exist or is older than the last 100 uploads;
    secrets changed, 10220, for anything but a rollback, which is then forced) with a 4xx.
    """
    if exc.status is None or not 400 <= exc.status < 500 or exc.status in RETRYABLE_4XX:
        return False
    return not (kind == "rollback" and SECRETS_CHANGED in exc.codes)


def intents_for(
    decisions: Sequence[Decision],
    live: LiveDeployment | None,
    state_before: dict[str, Any] | None = None,
) -> list[NewIntent]:
    """The traffic changes a tick's decisions ask for, each recording the split it starts from
    (the live one read at the start of the tick, then the previous change's target) and the
    rollout's state before the tick (restored if Cloudflare refuses the change for good)."""
    out: list[NewIntent] = []
    current = [list(v) for v in live.versions] if live is not None else None
    for decision in decisions:
        intent = intent_for(decision, current)
        if intent is not None:
            if state_before is not None:
                intent.body["state_before"] = state_before
            out.append(intent)
            current = intent.body["versions"]
    return out


def intent_for(decision: Decision, start: list[list[Any]] | None = None) -> NewIntent | None:
    """The traffic change a decision asks for, or None (not a traffic decision, or dry run)."""
    if decision.action not in TRAFFIC_ACTIONS or decision.dry_run:
        return None
    canary, stable = decision.canary, decision.stable
    assert canary is not None
    assert stable is not None
    if decision.action == "rollback":
        versions: list[list[Any]] = [[stable, 100]]
        message = f"coalmine: rollback ({decision.rule or decision.actor})"
    elif decision.action == "promote":
        versions, message = [[canary, 100]], "coalmine: promote to 100%"
    else:
        percent = decision.canary_percent or 0
        versions = [[canary, percent], [stable, 100 - percent]]
        message = f"coalmine: canary to {percent}%"
    body = {
        "versions": versions,
        "from": start,
        "message": message[:50],
        "decided_at": decision.t.isoformat(),
    }
    return NewIntent(decision.script, decision.action, body)


def withdrawal(
    intent: Intent, applied: Applied, phase: str, now: datetime
) -> tuple[NewEntry, NewNotification, str]:
    """What a change refused for good leaves: a ``withdrawn`` journal entry (the rollout back
    in ``phase``), one page (severity error) with Cloudflare's reason, and the reason the
    rollout holds until an operator acts."""
    why = applied.outcome.removeprefix("refused: ")
    what = f"{intent.kind} ({intent.body.get('message')})"
    key = f"coalmine/{intent.script}/refused"
    summary = plain(f"coalmine {intent.script}: Cloudflare refused {what}, withdrawn: {why}")
    event = {
        "event_action": "trigger",
        "dedup_key": key,
        "payload": {
            "summary": summary[:1024],
            "source": "coalmine",
            "severity": "error",
            "component": plain(intent.script),
            "class": "actuator",
            "custom_details": {"intent": intent.id, "kind": intent.kind, "error": why[:500]},
        },
    }
    body = {"intent": intent.id, "kind": intent.kind, "reason": why, "phase": phase}
    entry = NewEntry(now, intent.script, "coalmine", "withdrawn", body)
    hold = f"Cloudflare refused the {what}: {why}; fix it, then resume"
    return entry, NewNotification("pagerduty", event, key), hold


def stuck_page(
    script: str, intent: Intent | None = None, error: Exception | None = None
) -> NewNotification:
    """The critical page that a traffic change cannot be applied (or, without an intent, its
    resolve)."""
    key = f"coalmine/{script}/actuator"
    event: dict[str, Any] = {"event_action": "resolve", "dedup_key": key}
    if intent is not None:
        what = f"{intent.kind} ({intent.body.get('message')})"
        event = {
            "event_action": "trigger",
            "dedup_key": key,
            "payload": {
                "summary": plain(f"coalmine {script}: cannot apply {what}: {error}")[:1024],
                "source": "coalmine",
                "severity": "critical",
                "component": script,
                "class": "actuator",
                "custom_details": {
                    "intent": intent.id,
                    "kind": intent.kind,
                    "error": str(error)[:500],
                },
            },
        }
    return NewNotification("pagerduty", event, key)


def refusal_resolved(script: str) -> NewNotification:
    """The page of a withdrawn change, resolved (an operator acted, or the rollout ended)."""
    key = f"coalmine/{script}/refused"
    return NewNotification("pagerduty", {"event_action": "resolve", "dedup_key": key}, key)


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of an intent: ``applied``, ``already live``, or ``superseded: ...``."""

    live: LiveDeployment | None  # None: refused where no deployment was live
    outcome: str

    @property
    def superseded(self) -> bool:
        """The change was dropped because the live deployment moved on without coalmine."""
        return self.outcome.startswith("superseded")

    @property
    def refused(self) -> bool:
        """Cloudflare refused the change for good: it was withdrawn, not applied."""
        return self.outcome.startswith("refused")


class Actuator:
    """Applies stored intents against the live deployment."""

    def __init__(
        self,
        client: CloudflareClient,
        store: StateStore,
        clock: Callable[[], datetime],
        fence: Fence | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._clock = clock
        # replicas: raises LeaseLost unless this replica still holds the script's lease
        self._fence = fence
        # scripts read with no open intent: the store's intent writes then, and when
        self._quiet: dict[str, tuple[int, datetime]] = {}

    async def apply(self, intent: Intent) -> Applied:
        """Make the live deployment what the intent says (once), verify, and record it."""
        acting = ACTING_FOR.set(intent.script)  # replicas: no call goes out once it is lost
        try:
            return await self._apply(intent)
        finally:
            ACTING_FOR.reset(acting)

    async def _apply(self, intent: Intent) -> Applied:
        versions = [(str(v), float(p)) for v, p in intent.body["versions"]]
        start = intent.body.get("from")
        live = await self._client.current(intent.script)
        if live is not None and live.matches(versions):
            outcome = "already live"
            result = live
        elif (
            intent.kind != "rollback"
            and start is not None
            and live is not None
            and not live.matches([(str(v), float(p)) for v, p in start])
        ):
            # someone changed the split since coalmine decided: do not undo their change;
            # the engine will see the live split differ from what it set (drift) and stand down
            outcome = "superseded: the live deployment changed by hand"
            await self._finish(intent, live, outcome)
            return Applied(live, outcome)
        else:
            if self._fence is not None:  # last look at the lease, right before the write
                await self._fence(intent.script, rollback=intent.kind == "rollback")
            try:
                result = await self._client.deploy(
                    intent.script,
                    versions,
                    intent.body["message"],
                    rollback=intent.kind == "rollback",
                )
            except CloudflareError as exc:
                if not cannot_succeed(exc, intent.kind):
                    raise
                outcome = f"refused: {exc.detail}"
                await self._finish(intent, live, outcome)
                return Applied(live, outcome)
            if self._fence is not None:  # lost meanwhile (paused?): the new holder verifies
                await self._fence(intent.script, rollback=intent.kind == "rollback")
            check = await self._client.current(intent.script)
            if check is None or not check.matches(versions):
                got = check.versions if check else "nothing"
                raise CloudflareError(f"deployment not live after creating it: read back {got}")
            outcome = "applied"
        await self._finish(intent, result, outcome)
        return Applied(result, outcome)

    async def _finish(self, intent: Intent, live: LiveDeployment | None, outcome: str) -> None:
        now = self._clock()
        deployment_id = live.id if live is not None else None
        entry = NewEntry(
            t=now,
            script=intent.script,
            actor="coalmine",
            action=outcome.partition(":")[0] if ":" in outcome else "applied",
            body={
                "intent": intent.id,
                "kind": intent.kind,
                "outcome": outcome,
                "deployment_id": deployment_id,
                "versions": [[v, p] for v, p in live.versions] if live is not None else [],
            },
        )
        await self._store.finish_intent(
            intent.id, {"deployment_id": deployment_id, "outcome": outcome}, now, entry
        )

    def forget(self, script: str) -> None:
        """Read the script's open intents again at its next reconcile (another process may
        have written some: a lease taken over)."""
        self._quiet.pop(script, None)

    async def reconcile(
        self, script: str | None = None
    ) -> list[tuple[Intent, Applied | Exception]]:
        """Apply every open intent (of one script, or all), oldest first; report each outcome.

        A script read with none open is not read again (no store round trip each tick) until
        open intents may have moved in the store (``intent_writes``: an intent written or kept,
        kept records written), :meth:`forget`, or :data:`QUIET_RECHECK` passed. A read during
        which they moved proves nothing: the script stays unquiet."""
        writes: int | None = getattr(self._store, "intent_writes", None)
        now = self._clock()
        if script is not None and writes is not None:
            quiet = self._quiet.get(script)
            since = now - quiet[1] if quiet is not None else QUIET_RECHECK
            if quiet is not None and quiet[0] == writes and timedelta(0) <= since < QUIET_RECHECK:
                return []  # (a clock stepped back: since < 0, read at once)
        outcomes: list[tuple[Intent, Applied | Exception]] = []
        stored = await self._store.open_intents()
        if script is not None and writes is not None:
            still = getattr(self._store, "intent_writes", None) == writes
            if still and not any(intent.script == script for intent in stored):
                self._quiet[script] = (writes, now)
            else:
                self._quiet.pop(script, None)
        for intent in stored:
            if script is not None and intent.script != script:
                continue
            try:
                outcomes.append((intent, await self.apply(intent)))
            except CloudflareError as exc:
                outcomes.append((intent, exc))
                break  # keep order: a later change must not overtake a failed one
        return outcomes
