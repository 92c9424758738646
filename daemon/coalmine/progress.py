"""Where a rollout stands, as the admin API, ``coalmine status`` and the status page show it:
the live split, the hold, what advancing waits for, a traffic change not applied; and the links
a page carries to it."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import quote

from coalmine.engine import Engine, RolloutPhase, RolloutState
from coalmine.engine.model import format_time
from coalmine.policy import Policy


def progress(
    s: RolloutState,
    policy: Policy,
    engine: Engine,
    now: datetime,
    blocked: str | None,
    change_error: tuple[str, str | None] | None,
) -> dict[str, Any]:
    """The rollout object's progress fields (``change_error``: a change's kind and error)."""
    options = engine.options
    live = s.live
    out: dict[str, Any] = {
        "dry_run": options.dry_run,
        "auto_promote": options.auto_promote,
        "auto_rollback": options.auto_rollback,
        "live": None
        if live is None
        else {
            "stable": live.stable,
            "canary": live.canary,
            "canary_percent": live.canary_percent,
        },
        "started_at": _time(s.started_at),
        "step_started_at": _time(s.step_started_at),
        "hold_remaining_seconds": None,
        "next_step_at": None,
        "next_percent": None,
        "waiting_for": [],
        "watch_ends_at": None,
        "traffic_change": None,
    }
    steps = policy.steps
    if s.phase in (RolloutPhase.CANARY, RolloutPhase.PAUSED) and s.step + 1 < len(steps):
        out["next_percent"] = steps[s.step + 1].weight
        if s.step_started_at is not None:
            due = s.step_started_at + steps[s.step].hold
            out["next_step_at"] = _time(due)
            out["hold_remaining_seconds"] = max(0.0, (due - now).total_seconds())
        out["waiting_for"] = engine.waiting_for(s, now)
        if blocked:
            out["waiting_for"].append(blocked)
    if s.phase is RolloutPhase.PROMOTED and s.promoted_at is not None:
        out["watch_ends_at"] = _time(s.promoted_at + policy.post_promotion.watch)
    if change_error is not None or blocked:
        kind, error = change_error or ("traffic", None)
        state = "refused" if error else "pending"
        out["traffic_change"] = {"state": state, "kind": kind, "error": error}
    return out


def rollout_links(public_url: str, script: str) -> dict[str, str]:
    """Where a person reads a rollout: its API object and the status page."""
    base = public_url.rstrip("/")
    name = quote(script, safe="")
    return {
        "coalmine rollout (API)": f"{base}/api/v1/rollouts/{name}",
        "coalmine status page": f"{base}/#{name}",  # the page's section for the script
    }


def _time(t: datetime | None) -> str | None:
    return format_time(t) if t is not None else None
