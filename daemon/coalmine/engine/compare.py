"""The canary-vs-stable judge: an anytime-valid test of "canary event rate <= max_ratio x stable".

docs/statistics.md explains the method for an SRE; in short:

A Cloudflare gradual deployment serves both versions side by side. Within one counting window
let the canary serve ``n_c`` requests and the stable ``n_s``, with ``x_c`` and ``x_s`` events
(errors, slow requests). Model each version's events as a Poisson count with mean
``p * requests``. Given the window's total ``x_c + x_s``, the canary's share is binomial with

    theta(rho) = rho * a / (rho * a + 1),   a = n_c / n_s,   rho = p_canary / p_stable,

whatever the absolute rates are: conditioning on the total removes the unknown stable rate and
the traffic level, exactly as in Lindon & Malek (NeurIPS 2022, "Anytime-valid inference for
multinomial count data"). The null hypothesis is ``rho <= max_ratio``.

For each alternative ``rho' > max_ratio`` the likelihood ratio ``L(rho') / L(max_ratio)``,
multiplied up window by window, is a non-negative supermartingale under every ``rho`` in the
null (each window's factor has expectation <= 1 when ``rho <= max_ratio < rho'``). A mixture of
them over a prior on ``rho'`` is one too, so by Ville's inequality the probability that it
*ever* reaches ``1 / (1 - confidence)`` is at most ``1 - confidence``: it may be checked after
every window without inflating false alarms. The prior is uniform over a log-spaced grid of
ratios from just above ``max_ratio`` to 16 x ``max_ratio``; a grid instead of Lindon & Malek's
conjugate Dirichlet because the split ``a`` changes from window to window.

That mixture, multiplied up since the canary started, is slow to see a regression that begins
late: a healthy hour must first be outweighed. So the rule also runs a change detector, the
e-detector of Shin, Ramdas & Rinaldo (2023, "E-detectors: a nonparametric framework for
sequential change detection") in its Shiryaev-Roberts form, over the same per-window likelihood
ratios: for each alternative ``rho'``,

    R(t) = (R(t-1) + w_t) * LR_t(rho'),   R(0) = 0,

the sum over every possible start ``j`` of ``w_j`` times the product of the ratios since ``j``.
Under the null ``E[R(t) | past] <= R(t-1) + w_t``, so ``R(t) + sum_{j > t} w_j`` is a
non-negative supermartingale starting at ``sum_j w_j <= 1``: by Ville's inequality the mixture
over ``rho'`` *ever* reaching ``1 / (1 - confidence)`` has probability at most ``1 - confidence``,
over the whole canary however long it runs. The weights split that budget (:func:`change_weight`):
0.5 on ``j = 1`` (the since-start test above), 0.1 on the first windows after traffic changes
(halving from one change to the next), 0.35 evenly over the first ``horizon`` windows (the
policy's canary holds, in windows), 0.05 on the rest, decaying as ``1 / (m (m + 1))``. A change
at window ``j`` then trips once the evidence since ``j`` reaches about
``log(horizon / (0.35 x (1 - confidence)))``, counted from the change, not from the start. The
alternatives are mixed with weights in inverse proportion to the ratio
(:func:`alternative_weights`), not evenly: any prior keeps the guarantee, and this one spends
more of it where evidence is scarce. docs/statistics.md compares all this with oracles told the
onset and the ratio: what no test with this guarantee could beat.

Evidence carries across traffic changes: each window's ratio uses that window's own split
``a``, so windows at 10% and at 50% multiply into one valid test.

The confidence interval reported with every evaluation inverts the since-start construction: the
grid ratios ``rho0`` whose two-sided mixture (uniform over the whole grid) against ``rho0`` stays
below ``1 / (0.5 x (1 - confidence))`` (its share of the budget, so that a lower bound above
``max_ratio`` always comes with a breach). It is a confidence *sequence*: valid at every check
at once.

Everything here is pure and cheap: one ``log1p`` per grid point per window that saw events.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# log-spaced ratios 2^(k/4), k = -40..40: 1/1024 .. 1024, steps of about 19%
GRID: tuple[float, ...] = tuple(2.0 ** (k / 4) for k in range(-40, 41))
_LOG_GRID: tuple[float, ...] = tuple(math.log(r) for r in GRID)
ALTERNATIVES_UP_TO = 16.0  # alternatives span (max_ratio, 16 * max_ratio]
_SPLIT_MIN, _SPLIT_MAX = 1e-9, 1e9  # canary/stable requests outside this: not a split
_LOG_CAP = 700.0  # e-values beyond e^700 are all "certain" (and exp() would overflow)
DEFAULT_HORIZON = 120  # windows, when the policy's holds say nothing (an hour of 30 s windows)


# Shares of the false-alarm budget (sum 1), chosen by measuring (docs/statistics.md): half on
# the start keeps a regression present from the start nearly as fast as the since-start test
# alone; a traffic change is at most one or two per canary, so 0.1 covers them.
SINCE_START, AT_STEPS, PLANNED, LATER = 0.5, 0.1, 0.35, 0.05
# Evidence started before 2026-12-03 keeps the split and the even prior it started with
# (``Evidence.scheme`` 0), so that a canary in flight across an upgrade keeps its guarantee.
_SHARES = {0: (0.4, 0.2, 0.3, 0.1), 1: (SINCE_START, AT_STEPS, PLANNED, LATER)}
SCHEME = 1


def change_weight(j: int, horizon: int, step: int = 0, scheme: int = SCHEME) -> float:
    """The share of the false-alarm budget on a change starting at window ``j`` (from 1);
    ``step`` > 0 when window ``j`` is the first of the ``step``-th traffic change.

    0.5 on the start (the since-start test); 0.1 on the first windows of traffic changes
    (0.05, 0.025, ... for the first, second, ...: a fault that shows under more load); 0.35
    evenly over the first ``horizon`` windows; 0.05 over the rest as ``1 / (m (m + 1))``.
    Whatever the path, they sum to at most 1. ``scheme`` 0: the split before 2026-12-03
    (0.4, 0.2, 0.3, 0.1), kept for evidence that started under it.
    """
    start, at_steps, planned_share, later_share = _SHARES[scheme]
    span = max(1, horizon)
    planned = planned_share / span if j <= span else 0.0
    later = later_share / ((j - span) * (j - span + 1)) if j > span else 0.0
    at_step = at_steps * 0.5**step if step > 0 else 0.0
    return (start if j == 1 else 0.0) + at_step + planned + later


@dataclass(frozen=True, slots=True)
class Evidence:
    """The counts of both versions since the canary started, and the tests' statistics.

    ``loglik[k]`` is the log-likelihood of the canary's share of events at ``GRID[k]`` (up to a
    constant shared by every ratio), ``null_loglik`` the same at ``max_ratio``; both start at 0.
    ``detector[k]`` is ``log R(t)`` of the change detector for the alternative ``GRID[k]``.
    ``covered_until`` is the end of the last window counted: windows never overlap.
    """

    canary_events: float = 0.0
    canary_samples: float = 0.0
    stable_events: float = 0.0
    stable_samples: float = 0.0
    loglik: tuple[float, ...] = ()
    null_loglik: float = 0.0
    covered_until: datetime | None = None
    windows: int = 0
    detector: tuple[float, ...] = ()
    steps: int = 0  # traffic changes the evidence carried across
    scheme: int = SCHEME  # the detector's budget split and prior (0: before 2026-12-03)

    def add(
        self,
        max_ratio: float,
        canary_events: float,
        canary_samples: float,
        stable_events: float,
        stable_samples: float,
        end: datetime,
        horizon: int = DEFAULT_HORIZON,
        new_step: bool = False,
    ) -> Evidence:
        """The evidence with one more window counted (counts must be finite and >= 0);
        ``horizon``: the canary's planned length in windows, ``new_step``: the window is the
        first after a traffic change (both shape the detector's weights)."""
        loglik, null = self.loglik, self.null_loglik
        events = canary_events + stable_events
        a = canary_samples / stable_samples if stable_samples > 0 else 0.0
        window = (0.0,) * len(GRID)  # this window's log-likelihood ratios against max_ratio
        if events > 0 and _SPLIT_MIN < a < _SPLIT_MAX:
            log_a = math.log(a)
            here = canary_events * (math.log(max_ratio) + log_a) - events * math.log1p(
                max_ratio * a
            )
            window = tuple(
                canary_events * (lr + log_a) - events * math.log1p(r * a) - here
                for lr, r in zip(_LOG_GRID, GRID, strict=True)
            )
            current = loglik or (0.0,) * len(GRID)
            loglik = tuple(ll + w + here for ll, w in zip(current, window, strict=True))
            null += here
        steps = self.steps + 1 if new_step and self.windows > 0 else self.steps
        at_step = steps if steps > self.steps else 0
        log_w = math.log(change_weight(self.windows + 1, horizon, at_step, self.scheme))
        detector = tuple(
            min(_logaddexp(d, log_w), _LOG_CAP) + w
            for d, w in zip(self.detector or (-math.inf,) * len(GRID), window, strict=True)
        )
        # A window where one version served nothing (or next to nothing) says nothing about
        # the ratio: every event is the other version's whatever the ratio. Its counts count.
        return Evidence(
            self.canary_events + canary_events,
            self.canary_samples + canary_samples,
            self.stable_events + stable_events,
            self.stable_samples + stable_samples,
            loglik,
            null,
            end,
            self.windows + 1,
            detector,
            steps,
            self.scheme,
        )

    # ---- what the evidence says -----------------------------------------------------------

    def alarm(self, max_ratio: float) -> float:
        """The change detector's mixture over alternatives (>= 0): its reaching
        ``1 / (1 - confidence)`` rejects "canary <= max_ratio x stable" at some point.

        The alternatives are weighted in inverse proportion to the ratio (see
        :func:`alternative_weights`): small regressions need every nat, gross ones have plenty.
        """
        if not self.detector:  # evidence from before the detector: the since-start test alone
            return self.e_value(max_ratio) * _SHARES[self.scheme][0]
        terms: list[float] = []
        weights = alternative_weights(max_ratio, even=self.scheme == 0)
        for d, r in zip(self.detector, GRID, strict=True):
            if max_ratio < r <= max_ratio * ALTERNATIVES_UP_TO:
                terms.append(d + weights[len(terms)])
        return math.exp(min(_log_sum_exp(terms), _LOG_CAP))

    def e_value(self, max_ratio: float) -> float:
        """The since-start mixture likelihood ratio against "canary <= max_ratio x stable"."""
        if not self.loglik:
            return 1.0
        terms = [
            ll - self.null_loglik
            for ll, r in zip(self.loglik, GRID, strict=True)
            if max_ratio < r <= max_ratio * ALTERNATIVES_UP_TO
        ]
        return math.exp(min(_log_mean_exp(terms), _LOG_CAP))

    def estimate(self) -> float | None:
        """The canary's event rate over the stable's (pooled since the canary started).

        None when neither version had an event (nothing to compare); +Inf when only the
        canary had events.
        """
        if self.canary_samples <= 0 or self.stable_samples <= 0:
            return None
        canary_rate = self.canary_events / self.canary_samples
        stable_rate = self.stable_events / self.stable_samples
        if stable_rate == 0:
            return None if canary_rate == 0 else math.inf
        return canary_rate / stable_rate

    def interval(self, confidence: float, max_ratio: float | None = None) -> tuple[float, float]:
        """Confidence bounds for the ratio: (low, high), 0 and +Inf when unbounded.

        Each bound is the same one-sided test as the rule's, run against every grid ratio:
        ``low`` is the largest ratio the canary is shown to exceed, ``high`` the smallest it is
        shown to stay under, each at ``confidence`` and at every check at once (a confidence
        sequence). Bounds fall on the grid, rounded outwards; with ``max_ratio``, ``low`` is at
        least ``max_ratio`` exactly when the rule breaches (a breach raises it to
        ``max_ratio``; without one it stays under), so a report never contradicts its verdict.
        """
        if not self.loglik:
            return 0.0, math.inf
        bar = math.log(1.0 / (_SHARES[self.scheme][0] * (1.0 - confidence)))  # its share
        ll = self.loglik
        best = max(range(len(GRID)), key=ll.__getitem__)  # the likeliest ratio: never rejected

        def rejects(k: int, upwards: bool) -> bool:
            return _log_e(ll, ll[k], k, upwards) >= bar

        # The log-likelihood is concave in log(ratio), so each test rejects on one side of the
        # likeliest ratio and not on the other: bisect for the edge instead of trying all 81.
        low = _edge(0, best, lambda k: rejects(k, True))
        high = _edge(len(GRID) - 1, best, lambda k: rejects(k, False))
        low_ratio = GRID[low] if low is not None else 0.0
        high_ratio = GRID[high] if high is not None else math.inf
        if max_ratio is not None and self.alarm(max_ratio) >= 1.0 / (1.0 - confidence):
            low_ratio = max(low_ratio, max_ratio)
        elif max_ratio is not None and low_ratio >= max_ratio:
            # the interval's even mixture rejected where the rule's weighted one does not yet:
            # lowering a lower bound keeps it valid, and the report agrees with the decision
            low_ratio = max((r for r in GRID if r < max_ratio), default=0.0)
        return low_ratio, high_ratio

    # ---- persistence ----------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (times as RFC 3339)."""
        return {
            "canary_events": self.canary_events,
            "canary_samples": self.canary_samples,
            "stable_events": self.stable_events,
            "stable_samples": self.stable_samples,
            "loglik": list(self.loglik),
            "null_loglik": self.null_loglik,
            "covered_until": self.covered_until.isoformat() if self.covered_until else None,
            "windows": self.windows,
            "detector": [_finite(d) for d in self.detector],
            "steps": self.steps,
            "scheme": self.scheme,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        """The inverse of :meth:`to_json`."""
        until = data.get("covered_until")
        scheme = int(data.get("scheme", 0))  # saved before schemes: the first
        if scheme not in _SHARES:
            raise ValueError(f"unknown change-detector scheme {scheme}")
        return cls(
            float(data["canary_events"]),
            float(data["canary_samples"]),
            float(data["stable_events"]),
            float(data["stable_samples"]),
            tuple(float(v) for v in data["loglik"]),
            float(data["null_loglik"]),
            datetime.fromisoformat(until) if until else None,
            int(data.get("windows", 0)),
            tuple(-math.inf if d is None else float(d) for d in data.get("detector", ())),
            int(data.get("steps", 0)),
            scheme,
        )


def alternative_weights(max_ratio: float, even: bool = False) -> list[float]:
    """The log prior weights of the detector's alternatives ``GRID[k]`` in ``(max_ratio, 16 x
    max_ratio]``, in grid order: proportional to ``max_ratio / GRID[k]``, summing to 1.

    A small regression earns little evidence per event, a gross one much more, so the small
    ones get more of the prior: measured (docs/statistics.md), this shortens the late and slow
    cases a little and costs the gross ones nothing at 30 s resolution.
    """
    ratios = [r for r in GRID if max_ratio < r <= max_ratio * ALTERNATIVES_UP_TO]
    if even:  # evidence of scheme 0
        return [-math.log(len(ratios))] * len(ratios)
    total = sum(max_ratio / r for r in ratios)
    return [math.log(max_ratio / r / total) for r in ratios]


def _edge(outer: int, inner: int, rejects: Callable[[int], bool]) -> int | None:
    """The grid index nearest ``inner`` that still rejects, searching from ``outer``; None
    when even ``outer`` does not (the evidence does not bound the ratio on that side)."""
    if not rejects(outer):
        return None
    while abs(inner - outer) > 1:  # invariant: outer rejects, inner does not
        middle = (outer + inner) // 2
        if rejects(middle):
            outer = middle
        else:
            inner = middle
    return outer


def _log_e(loglik: tuple[float, ...], null: float, k: int, upwards: bool) -> float:
    """The log e-value against "ratio <= GRID[k]" (upwards) or "ratio >= GRID[k]"."""
    span = round(4 * math.log2(ALTERNATIVES_UP_TO))  # grid steps in the alternatives' span
    alternatives = loglik[k + 1 : k + 1 + span] if upwards else loglik[max(0, k - span) : k]
    if not alternatives:
        return 0.0
    return _log_mean_exp(ll - null for ll in alternatives)


def _logaddexp(x: float, y: float) -> float:
    top = max(x, y)
    if top == -math.inf:
        return top
    return top + math.log(math.exp(x - top) + math.exp(y - top))


def _finite(value: float) -> float | None:
    return None if value == -math.inf else value


def _log_sum_exp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))


def _log_mean_exp(values: Iterable[float]) -> float:
    values = list(values)
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))
