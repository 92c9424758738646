"""Where a rollout stands, as the admin API, ``coalmine status`` and the status page show it:
the live split, the hold, what advancing waits for, a traffic change not applied; and the links
a page carries to it."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from coalmine.engine import Engine, RolloutPhase, RolloutState
from coalmine.engine.judge import CompiledRule
from coalmine.engine.model import encode_float, format_time
from coalmine.engine.state import RuleTrack
from coalmine.policy import Policy

if TYPE_CHECKING:
    from coalmine.replicas import LeaseKeeper


def progress(
    s: RolloutState,
    policy: Policy,
    engine: Engine,
    now: datetime,
    blocked: str | None,
    frozen: str | None,
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
        out["waiting_for"] = engine.waiting_for(s, now, frozen)
        if blocked:
            out["waiting_for"].append(blocked)
    if s.phase is RolloutPhase.PROMOTED and s.promoted_at is not None:
        out["watch_ends_at"] = _time(s.promoted_at + policy.post_promotion.watch)
    if change_error is not None or blocked:
        kind, error = change_error or ("traffic", None)
        state = "refused" if error else "pending"
        out["traffic_change"] = {"state": state, "kind": kind, "error": error}
    return out


def lease_fields(leases: LeaseKeeper | None, script: str) -> dict[str, Any]:
    """Which replica holds the script, when replicas share the store (nothing otherwise)."""
    row = leases.table.get(script) if leases is not None else None
    if leases is None or row is None:
        return {}
    live = row.expires_in > 0
    return {"lease": {"holder": row.holder if live else None, "epoch": row.epoch}}


def rules_view(engine: Engine, s: RolloutState) -> dict[str, dict[str, Any]]:
    """Each rule's latest judgement, with its threshold (and a compare rule's evidence)."""
    compiled = {r.name: r for r in engine.rules}
    return {
        name: {
            "status": t.status.value,
            **_rule_bounds(compiled.get(name)),
            "value": t.value,
            "stable_value": t.stable_value,
            "samples": t.samples,
            "breaching": t.breaching,
            "breached_since": t.breached_since.isoformat() if t.breached_since else None,
            "detail": t.detail,
            **_compare_fields(t),
        }
        for name, t in s.rules.items()
    }


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


def _rule_bounds(rule: CompiledRule | None) -> dict[str, Any]:
    """A rule's threshold and direction, so a reader sees the value against its limit."""
    if rule is None:
        return {}
    return {
        "threshold": rule.threshold,
        "operator": ">" if rule.above else "<",
        "on_breach": rule.on_breach,
    }


def _compare_fields(track: RuleTrack) -> dict[str, Any]:
    """A compare rule's interval and counts, for the admin API (nothing for other rules)."""
    ev = track.evidence
    if track.interval_low is None or track.interval_high is None:
        return {}
    return {
        "interval": [encode_float(track.interval_low), encode_float(track.interval_high)],
        "counts": None
        if ev is None
        else {
            "canary_events": ev.canary_events,
            "canary_samples": ev.canary_samples,
            "stable_events": ev.stable_events,
            "stable_samples": ev.stable_samples,
        },
    }
