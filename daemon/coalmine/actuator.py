"""Carrying out traffic decisions exactly once, through Cloudflare's deployments API.

The engine's ``set_traffic``, ``promote`` and ``rollback`` decisions become *intents*, stored in
the same transaction as the state that decided them. Then, for each open intent: read the live
deployment; if it already serves what the intent asks (a crash after the call, before the
journal), just record that; otherwise create the deployment, read it back to verify, and record
the result with a journal entry. After a crash the open intents are reconciled this way before
anything else, so each change is applied once, neither repeated nor skipped. In dry-run mode
no intent is ever created.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from coalmine.cloudflare import CloudflareClient, CloudflareError, LiveDeployment
from coalmine.engine import Decision
from coalmine.store import Intent, NewEntry, NewIntent, Store

TRAFFIC_ACTIONS = ("set_traffic", "promote", "rollback")


def intent_for(decision: Decision) -> NewIntent | None:
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
    body = {"versions": versions, "message": message[:50], "decided_at": decision.t.isoformat()}
    return NewIntent(decision.script, decision.action, body)


class Actuator:
    """Applies stored intents against the live deployment."""

    def __init__(
        self, client: CloudflareClient, store: Store, clock: Callable[[], datetime]
    ) -> None:
        self._client = client
        self._store = store
        self._clock = clock

    async def apply(self, intent: Intent) -> LiveDeployment:
        """Make the live deployment what the intent says (once), verify, and record it."""
        versions = [(str(v), float(p)) for v, p in intent.body["versions"]]
        live = await self._client.current(intent.script)
        if live is not None and live.matches(versions):
            outcome = "already live"
            result = live
        else:
            result = await self._client.deploy(
                intent.script, versions, intent.body["message"], rollback=intent.kind == "rollback"
            )
            check = await self._client.current(intent.script)
            if check is None or not check.matches(versions):
                got = check.versions if check else "nothing"
                raise CloudflareError(f"deployment not live after creating it: read back {got}")
            outcome = "applied"
        now = self._clock()
        entry = NewEntry(
            t=now,
            script=intent.script,
            actor="coalmine",
            action="applied",
            body={
                "intent": intent.id,
                "kind": intent.kind,
                "outcome": outcome,
                "deployment_id": result.id,
                "versions": [[v, p] for v, p in result.versions],
            },
        )
        self._store.finish_intent(
            intent.id, {"deployment_id": result.id, "outcome": outcome}, now, entry
        )
        return result

    async def reconcile(
        self, script: str | None = None
    ) -> list[tuple[Intent, LiveDeployment | Exception]]:
        """Apply every open intent (of one script, or all), oldest first; report each outcome."""
        outcomes: list[tuple[Intent, LiveDeployment | Exception]] = []
        for intent in self._store.open_intents():
            if script is not None and intent.script != script:
                continue
            try:
                outcomes.append((intent, await self.apply(intent)))
            except CloudflareError as exc:
                outcomes.append((intent, exc))
                break  # keep order: a later change must not overtake a failed one
        return outcomes
