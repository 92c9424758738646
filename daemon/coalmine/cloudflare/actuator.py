"""Carrying out traffic decisions exactly once, through Cloudflare's deployments API.

The engine's ``set_traffic``, ``promote`` and ``rollback`` decisions become *intents*, stored in
the same transaction as the state that decided them. Then, for each open intent: read the live
deployment; if it already serves what the intent asks (a crash after the call, before the
journal), just record that; otherwise create the deployment, read it back to verify, and record
the result with a journal entry. After a crash the open intents are reconciled this way before
anything else, so each change is applied once, neither repeated nor skipped. In dry-run mode
no intent is ever created. With replicas, every write is preceded by a look at the script's
lease in the database: a replica that lost it (paused, cut off, taken over) sends nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from coalmine.cloudflare.client import CloudflareClient, CloudflareError, LiveDeployment
from coalmine.engine import Decision
from coalmine.store.base import StateStore
from coalmine.store.leases import ACTING_FOR
from coalmine.store.records import Intent, NewEntry, NewIntent

TRAFFIC_ACTIONS = ("set_traffic", "promote", "rollback")


def intents_for(decisions: Sequence[Decision], live: LiveDeployment | None) -> list[NewIntent]:
    """The traffic changes a tick's decisions ask for, each recording the split it starts from
    (the live one read at the start of the tick, then the previous change's target)."""
    out: list[NewIntent] = []
    current = [list(v) for v in live.versions] if live is not None else None
    for decision in decisions:
        intent = intent_for(decision, current)
        if intent is not None:
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


@dataclass(frozen=True, slots=True)
class Applied:
    """What became of an intent: ``applied``, ``already live``, or ``superseded: ...``."""

    live: LiveDeployment
    outcome: str

    @property
    def superseded(self) -> bool:
        """The change was dropped because the live deployment moved on without coalmine."""
        return self.outcome.startswith("superseded")


class Actuator:
    """Applies stored intents against the live deployment."""

    def __init__(
        self,
        client: CloudflareClient,
        store: StateStore,
        clock: Callable[[], datetime],
        fence: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._clock = clock
        # replicas: raises LeaseLost unless this replica still holds the script's lease
        self._fence = fence

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
                await self._fence(intent.script)
            result = await self._client.deploy(
                intent.script, versions, intent.body["message"], rollback=intent.kind == "rollback"
            )
            if self._fence is not None:  # lost meanwhile (paused?): the new holder verifies
                await self._fence(intent.script)
            check = await self._client.current(intent.script)
            if check is None or not check.matches(versions):
                got = check.versions if check else "nothing"
                raise CloudflareError(f"deployment not live after creating it: read back {got}")
            outcome = "applied"
        await self._finish(intent, result, outcome)
        return Applied(result, outcome)

    async def _finish(self, intent: Intent, live: LiveDeployment, outcome: str) -> None:
        now = self._clock()
        entry = NewEntry(
            t=now,
            script=intent.script,
            actor="coalmine",
            action="applied" if not outcome.startswith("superseded") else "superseded",
            body={
                "intent": intent.id,
                "kind": intent.kind,
                "outcome": outcome,
                "deployment_id": live.id,
                "versions": [[v, p] for v, p in live.versions],
            },
        )
        await self._store.finish_intent(
            intent.id, {"deployment_id": live.id, "outcome": outcome}, now, entry
        )

    async def reconcile(
        self, script: str | None = None
    ) -> list[tuple[Intent, Applied | Exception]]:
        """Apply every open intent (of one script, or all), oldest first; report each outcome."""
        outcomes: list[tuple[Intent, Applied | Exception]] = []
        for intent in await self._store.open_intents():
            if script is not None and intent.script != script:
                continue
            try:
                outcomes.append((intent, await self.apply(intent)))
            except CloudflareError as exc:
                outcomes.append((intent, exc))
                break  # keep order: a later change must not overtake a failed one
        return outcomes
