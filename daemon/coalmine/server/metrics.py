"""coalmine's own /metrics: registered on an injected registry, never a global one.

Names follow the exporter conventions (prefix ``coalmine_``, base units, ``_total`` counters,
``_info`` for build info) and carry the measured values, not just verdicts: per rule its
latest value, threshold, sample count and whether it breaches.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from coalmine import __version__
from coalmine.cloudflare.plan import Plan
from coalmine.engine import Decision, RolloutPhase, RolloutState
from coalmine.engine.judge import CompiledRule
from coalmine.engine.state import RuleStatus


class Budget(Protocol):
    """A rate budget that can say how much is left (a Cloudflare token bucket)."""

    @property
    def tokens(self) -> float:
        """Calls that could go now."""
        ...


class Metrics:
    """Every metric coalmine exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.leases = LeaseMetrics(registry)  # exported alone too (no samples), for the alerts
        self._shown: dict[str, tuple[object, ...]] = {}  # per script: what record() exported
        self.build = Info("coalmine_build", "coalmine's version.", registry=registry)
        self.build.info({"version": __version__})
        self.phase = Gauge(
            "coalmine_rollout_phase",
            "1 for the phase each script's rollout is in.",
            ["script", "phase"],
            registry=registry,
        )
        self.weight = Gauge(
            "coalmine_canary_weight_percent",
            "Traffic percent on the canary.",
            ["script"],
            registry=registry,
        )
        self.step = Gauge(
            "coalmine_rollout_step",
            "Current step (1-based; 0 when idle).",
            ["script"],
            registry=registry,
        )
        self.rule_value = Gauge(
            "coalmine_rule_value",
            "A rule's latest value per version (NaN when none); for a compare rule, "
            "the canary/stable rate ratio (canary) and the stable's event rate (stable).",
            ["script", "rule", "version"],
            registry=registry,
        )
        self.rule_threshold = Gauge(
            "coalmine_rule_threshold", "A rule's threshold.", ["script", "rule"], registry=registry
        )
        self.rule_samples = Gauge(
            "coalmine_rule_samples",
            "Requests behind the canary's latest value.",
            ["script", "rule"],
            registry=registry,
        )
        self.rule_interval = Gauge(
            "coalmine_rule_ratio_bound",
            "A compare rule's confidence bounds on the canary/stable rate ratio "
            "(bound low or high; +Inf when unbounded).",
            ["script", "rule", "bound"],
            registry=registry,
        )
        self.rule_breaching = Gauge(
            "coalmine_rule_breaching",
            "1 when the canary's latest value breaches.",
            ["script", "rule"],
            registry=registry,
        )
        self.rule_inconclusive = Gauge(
            "coalmine_rule_inconclusive",
            "1 when the latest evaluation is inconclusive.",
            ["script", "rule"],
            registry=registry,
        )
        self.decisions = Counter(
            "coalmine_decisions_total",
            "Decisions made, by action.",
            ["script", "action"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "coalmine_rollbacks_total",
            "Rollbacks, automatic or by an operator.",
            ["script"],
            registry=registry,
        )
        self.source_latency = Histogram(
            "coalmine_source_request_duration_seconds",
            "Latency of calls to metrics sources and APIs.",
            ["source"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=registry,
        )
        self.source_errors = Counter(
            "coalmine_source_errors_total",
            "Failed calls to sources and APIs, by kind.",
            ["source", "kind"],
            registry=registry,
        )
        self.actuator_calls = Counter(
            "coalmine_actuator_calls_total",
            "Traffic changes applied, by result.",
            ["script", "result"],
            registry=registry,
        )
        self.notifications = Counter(
            "coalmine_notifications_total",
            "Notification delivery attempts.",
            ["channel", "result"],
            registry=registry,
        )
        self.outbox_backlog = Gauge(
            "coalmine_outbox_backlog", "Notifications waiting for delivery.", registry=registry
        )
        self.journal_verified = Gauge(
            "coalmine_journal_verified",
            "1 when the decision journal's hash chain verified at the last check, 0 when broken.",
            registry=registry,
        )
        self.journal_entries = Gauge(
            "coalmine_journal_entries",
            "Entries in the decision journal at the last check.",
            registry=registry,
        )
        self.store = Info(
            "coalmine_store",
            "The state store's identity: the id it was created with (the journal's genesis).",
            registry=registry,
        )
        self.store_created = Gauge(
            "coalmine_store_created_timestamp_seconds",
            "When the state store (and its journal) was created; it changes when the journal"
            " restarted from zero.",
            registry=registry,
        )
        self.store_lost = Gauge(
            "coalmine_store_lost",
            "1 while the state store's file is deleted or replaced under the daemon.",
            registry=registry,
        )
        self.store_kept = Gauge(
            "coalmine_store_kept_records",
            "Records (ticks that rolled back, traffic-change outcomes) waiting in memory for the"
            " state store.",
            registry=registry,
        )
        self.internal_errors = Counter(
            "coalmine_internal_errors_total",
            "Ticks skipped because of an unexpected error (a bug; see the logs).",
            registry=registry,
        )
        self.tick_lateness = Histogram(
            "coalmine_tick_lateness_seconds",
            "How late each evaluation started against its schedule.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=registry,
        )

        self.budget_left = Gauge(
            "coalmine_cloudflare_budget_tokens",
            "Cloudflare calls coalmine may send now, per API budget (rest, graphql); 0 while a"
            " 429's retry-after blocks it.",
            ["api"],
            registry=registry,
        )

        self.budget_planned = Gauge(
            "coalmine_cloudflare_budget_planned",
            "Cloudflare requests per 5 minutes the budget plan needs for the scripts watched and"
            " the canaries live now, per API budget (rest, graphql); replicas: the scripts this"
            " replica holds.",
            ["api"],
            registry=registry,
        )
        self.budget_limit = Gauge(
            "coalmine_cloudflare_budget_limit",
            "The configured Cloudflare limit per 5 minutes, per API budget (rest, graphql);"
            " replicas: this replica's share of it, the limit over the live replicas. The plan"
            " fits when planned stays under it (REST: less the rollbacks' reserve).",
            ["api"],
            registry=registry,
        )
        self.budget_reserve = Gauge(
            "coalmine_cloudflare_budget_reserve",
            "Cloudflare requests per API budget kept for rollbacks: never planned.",
            ["api"],
            registry=registry,
        )
        self.budget_token_planned = Gauge(
            "coalmine_cloudflare_budget_token_planned",
            "The budget plan of every watched script, whichever replica holds it, per API budget:"
            " what the Cloudflare token spends in all (alone: the same as planned).",
            ["api"],
            registry=registry,
        )
        self.budget_token_limit = Gauge(
            "coalmine_cloudflare_budget_token_limit",
            "The configured Cloudflare limit per 5 minutes, per API budget: the token's whole,"
            " which the live replicas share.",
            ["api"],
            registry=registry,
        )
        self.budget_more_canaries = Gauge(
            "coalmine_cloudflare_budget_more_canaries",
            "How many more canaries could start at once with the budget plan still fitting"
            " (0 when it does not fit).",
            registry=registry,
        )

    def record_plan(self, plan: Plan) -> None:
        """Export the budget plan."""
        for budget in (plan.rest, plan.graphql):
            self.budget_planned.labels(budget.api).set(round(budget.planned, 1))
            self.budget_limit.labels(budget.api).set(budget.limit)
            self.budget_reserve.labels(budget.api).set(round(budget.reserve, 1))
        for budget in plan.token or (plan.rest, plan.graphql):
            self.budget_token_planned.labels(budget.api).set(round(budget.planned, 1))
            self.budget_token_limit.labels(budget.api).set(budget.limit)
        self.budget_more_canaries.set(plan.more_canaries)

    def watch_budgets(self, budgets: Mapping[str, Budget]) -> None:
        """Export each budget's tokens left, read at every scrape."""
        for api, budget in budgets.items():
            self.budget_left.labels(api).set_function(_reader(budget))

    def observe_call(self, source: str, seconds: float, error: str | None) -> None:
        """A source or API call finished (the hook sources and clients are given)."""
        self.source_latency.labels(source).observe(seconds)
        if error is not None:
            self.source_errors.labels(source, error).inc()

    def record(
        self, state: RolloutState, rules: tuple[CompiledRule, ...], decisions: list[Decision]
    ) -> None:
        """Export a script's state after a tick (the gauges only when a value changed: most
        ticks change none, and a labelled gauge costs a lookup and a lock per value)."""
        script = state.script
        for d in decisions:
            self.decisions.labels(script, d.action).inc()
            if d.action == "rollback":
                self.rollbacks.labels(script).inc()
        shown = (state.phase, state.canary_percent, state.step, rules, _tracks(state, rules))
        if self._shown.get(script) == shown:
            return
        self._shown[script] = shown
        for phase in RolloutPhase:
            self.phase.labels(script, phase.value).set(1 if state.phase is phase else 0)
        self.weight.labels(script).set(
            state.canary_percent if state.phase is not RolloutPhase.PROMOTED else 100
        )
        active = state.phase not in (RolloutPhase.IDLE, RolloutPhase.ROLLED_BACK)
        self.step.labels(script).set(state.step + 1 if active else 0)
        for rule in rules:
            track = state.rules.get(rule.name)
            self.rule_threshold.labels(script, rule.name).set(rule.threshold)
            if track is None:
                continue
            self.rule_value.labels(script, rule.name, "canary").set(_value(track.value))
            self.rule_value.labels(script, rule.name, "stable").set(_value(track.stable_value))
            self.rule_samples.labels(script, rule.name).set(_value(track.samples))
            if rule.compares:
                self.rule_interval.labels(script, rule.name, "low").set(_value(track.interval_low))
                self.rule_interval.labels(script, rule.name, "high").set(
                    _value(track.interval_high)
                )
            self.rule_breaching.labels(script, rule.name).set(1 if track.breaching else 0)
            self.rule_inconclusive.labels(script, rule.name).set(
                1 if track.status is RuleStatus.INCONCLUSIVE else 0
            )


def _tracks(state: RolloutState, rules: tuple[CompiledRule, ...]) -> tuple[object, ...]:
    """What :meth:`Metrics.record` exports of each rule's track (None: no track yet)."""
    out: list[object] = []
    for rule in rules:
        track = state.rules.get(rule.name)
        out.append(
            None
            if track is None
            else (
                track.value,
                track.stable_value,
                track.samples,
                track.interval_low,
                track.interval_high,
                track.breaching,
                track.status,
            )
        )
    return tuple(out)


def _reader(budget: Budget) -> Callable[[], float]:
    return lambda: budget.tokens


def _value(value: float | None) -> float:
    return float("nan") if value is None else value


class LeaseMetrics:
    """What /metrics says about leases."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.held = Gauge(
            "coalmine_lease_held",
            "1 when this replica holds the script's lease (script `*outbox`: the outbox's).",
            ["script"],
            registry=registry,
        )
        self.epoch = Gauge(
            "coalmine_lease_epoch",
            "The fencing epoch of each lease, whoever holds it.",
            ["script"],
            registry=registry,
        )
        self.acquired = Counter(
            "coalmine_lease_acquired",
            "Leases this replica took (at start or over from another replica).",
            ["script"],
            registry=registry,
        )
        self.lost = Counter(
            "coalmine_lease_lost",
            "Leases this replica lost without giving them back (expired, or taken over).",
            ["script"],
            registry=registry,
        )
        self.replicas = Gauge(
            "coalmine_replicas_live",
            "Replicas with a live heartbeat (0: one process alone, on SQLite).",
            registry=registry,
        )
        self.id_conflict = Gauge(
            "coalmine_replica_id_conflict",
            "1 while another live process uses this replica's id (this one then acts on nothing).",
            registry=registry,
        )
