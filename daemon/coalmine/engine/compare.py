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

The confidence interval reported with every evaluation inverts the same construction: the grid
ratios ``rho0`` whose two-sided mixture (uniform over the whole grid) against ``rho0`` stays
below ``1 / (1 - confidence)``. It is a confidence *sequence*: valid at every check at once.

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


@dataclass(frozen=True, slots=True)
class Evidence:
    """The counts of both versions since the step began, and the test's log-likelihoods.

    ``loglik[k]`` is the log-likelihood of the canary's share of events at ``GRID[k]`` (up to a
    constant shared by every ratio), ``null_loglik`` the same at ``max_ratio``; both start at 0.
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

    def add(
        self,
        max_ratio: float,
        canary_events: float,
        canary_samples: float,
        stable_events: float,
        stable_samples: float,
        end: datetime,
    ) -> Evidence:
        """The evidence with one more window counted (counts must be finite and >= 0)."""
        loglik, null = self.loglik, self.null_loglik
        events = canary_events + stable_events
        a = canary_samples / stable_samples if stable_samples > 0 else 0.0
        if events > 0 and _SPLIT_MIN < a < _SPLIT_MAX:
            log_a = math.log(a)
            current = loglik or (0.0,) * len(GRID)
            loglik = tuple(
                ll + canary_events * (lr + log_a) - events * math.log1p(r * a)
                for ll, lr, r in zip(current, _LOG_GRID, GRID, strict=True)
            )
            null += canary_events * (math.log(max_ratio) + log_a) - events * math.log1p(
                max_ratio * a
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
        )

    # ---- what the evidence says -----------------------------------------------------------

    def e_value(self, max_ratio: float) -> float:
        """The mixture likelihood ratio against "canary <= max_ratio x stable" (>= 0)."""
        if not self.loglik:
            return 1.0
        terms = [
            ll - self.null_loglik
            for ll, r in zip(self.loglik, GRID, strict=True)
            if max_ratio < r <= max_ratio * ALTERNATIVES_UP_TO
        ]
        return math.exp(min(_log_mean_exp(terms), _LOG_CAP))

    def estimate(self) -> float | None:
        """The canary's event rate over the stable's (pooled since the step began).

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
        sequence). Bounds fall on the grid, rounded outwards; with ``max_ratio``, a breach of
        it raises ``low`` to it, so that a breaching rule never reports a lower bound under
        its threshold.
        """
        if not self.loglik:
            return 0.0, math.inf
        bar = math.log(1.0 / (1.0 - confidence))
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
        if max_ratio is not None and self.e_value(max_ratio) >= 1.0 / (1.0 - confidence):
            low_ratio = max(low_ratio, max_ratio)
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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Evidence:
        """The inverse of :meth:`to_json`."""
        until = data.get("covered_until")
        return cls(
            float(data["canary_events"]),
            float(data["canary_samples"]),
            float(data["stable_events"]),
            float(data["stable_samples"]),
            tuple(float(v) for v in data["loglik"]),
            float(data["null_loglik"]),
            datetime.fromisoformat(until) if until else None,
            int(data.get("windows", 0)),
        )


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


def _log_mean_exp(values: Iterable[float]) -> float:
    values = list(values)
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values) / len(values))
