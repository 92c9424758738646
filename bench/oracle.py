"""What the best test could do: oracles for the compare judge's benchmark (bench/judge.py).

The compare rule promises at most ``1 - confidence`` false trips per rollout whenever the canary
is no worse than ``max_ratio`` x stable, for any stable rate (Poisson counts). The oracles below
keep that promise too, but are told what the rule cannot know: the regression's ratio at every
minute and (for two of them) when it began. They bound how fast *any* test with the same
guarantee can be on the benchmark's scenarios, and so say whether a target is reachable at all.

Every oracle tests the canary's share of each window's events, as the rule does. Conditioning
on the total is no loss here: the likelihood ratio of "canary ``rho`` x stable" against its
nearest null (the Kullback-Leibler projection onto ``ratio = max_ratio``, which keeps each
window's expected total) is exactly the conditional binomial ratio, and the conditional test
is the uniformly most powerful unbiased test of a ratio of Poisson rates.

- :func:`sprt_trip`, *knows the onset and the ratio*: Wald's sequential probability ratio
  test, the product of the windows' likelihood ratios since the onset, tripping at
  ``1 / (1 - confidence)``. Valid by Ville's inequality; among tests with its guarantee, close
  to the smallest expected delay (Wald-Wolfowitz; asymptotically optimal as a power-one test,
  Lai). Achievable only by a test that is told when the fault starts.
- :func:`sr_trip`, *knows the ratio, not the onset*: the Shiryaev-Roberts e-detector with the
  exact alternative (for a ramp: its shape from each candidate start), every window of the
  planned canary a candidate start with weight ``1 / horizon``, tripping at
  ``1 / (1 - confidence)``: the same per-rollout guarantee as the rule, without the cost of
  not knowing the ratio. What a change detector could do with a perfect prior.
- :func:`np_floor`, *a floor no test can beat*: at each minute after the onset, the most
  powerful test at level ``1 - confidence`` for that minute alone (Neyman-Pearson: the exact
  alternative's likelihood ratio since the onset, its critical value the ``confidence``
  quantile of the same statistic under the nearest null, on the same event totals). A test
  whose false trips over the rollout are at most ``1 - confidence`` trips before that minute
  under the null at most as often, so it cannot catch more than half the regressions by that
  minute unless this test does. The first minute at which it catches half is a lower bound on
  any such test's median delay, even one told the onset and the ratio. (Under that null each
  window's event total has the same Poisson law as under the alternative, so drawing the null on
  the alternative's totals is exact; the critical value is estimated from the canaries run.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


def window_llr(
    canary_events: int, canary_requests: int, stable_events: int, stable_requests: int,
    ratio: float, max_ratio: float,
) -> float:  # fmt: skip
    """One window's log likelihood ratio of the canary's share of events: ``ratio`` against
    ``max_ratio`` (0 when the window says nothing, or the ratio is within the null)."""
    events = canary_events + stable_events
    if events == 0 or canary_requests <= 0 or stable_requests <= 0 or ratio <= max_ratio:
        return 0.0
    a = canary_requests / stable_requests
    theta1, theta0 = ratio * a / (1 + ratio * a), max_ratio * a / (1 + max_ratio * a)
    return canary_events * math.log(theta1 / theta0) + stable_events * math.log(
        (1 - theta1) / (1 - theta0)
    )


Window = tuple[int, int, int, int]  # canary events, canary requests, stable events, requests


def sprt_trip(
    windows: Sequence[Window], ratio_at: Callable[[int], float], onset: int, max_ratio: float,
    bar: float, first: int = 1,
) -> int | None:  # fmt: skip
    """The window (0-based) at which the SPRT started at window ``onset`` trips, or None;
    ``ratio_at(k)``: the canary's true ratio in window ``k``; judged from window ``first``."""
    total, log_bar = 0.0, math.log(bar)
    for k in range(onset, len(windows)):
        total += window_llr(*windows[k], ratio_at(k), max_ratio)
        if k >= first and total >= log_bar:
            return k
    return None


def sr_trip(
    windows: Sequence[Window], ratio_since: Callable[[int], float], max_ratio: float, bar: float,
    horizon: int, first: int = 1,
) -> int | None:  # fmt: skip
    """The window at which the Shiryaev-Roberts detector with the known alternative trips, or
    None; ``ratio_since(m)``: the regression's ratio ``m`` windows after its onset (constant
    for a step, rising for a ramp); every window up to ``horizon`` a start of weight
    ``1 / horizon``."""
    log_bar, log_w = math.log(bar), -math.log(horizon)
    constant = all(ratio_since(m) == ratio_since(0) for m in range(len(windows)))
    if constant:  # R(t) = (R(t-1) + w) LR_t: one number
        state = -math.inf
        for k, window in enumerate(windows):
            if k < horizon:
                state = _logaddexp(state, log_w)
            state += window_llr(*window, ratio_since(0), max_ratio)
            if k >= first and state >= log_bar:
                return k
        return None
    starts: list[float] = []  # a ramp: each start has its own alternative at each window
    for k, window in enumerate(windows):
        if k < horizon:
            starts.append(log_w)
        starts = [
            s + window_llr(*window, ratio_since(k - j), max_ratio) for j, s in enumerate(starts)
        ]
        if k >= first and _log_sum_exp(starts) >= log_bar:
            return k
    return None


def np_floor(
    canaries: Sequence[Sequence[Window]], ratio_at: Callable[[int], float], onset: int,
    max_ratio: float, confidence: float, seed: int,
) -> int | None:  # fmt: skip
    """The first window (0-based) by which the most powerful fixed-time test at level
    ``1 - confidence`` (knowing onset and ratio) catches at least half the ``canaries``, or
    None. The null's statistic is drawn on each canary's own event totals with the canary's
    share at ``max_ratio``."""
    rng = random.Random(f"oracle/{seed}")
    alternative: list[list[float]] = []
    null: list[list[float]] = []
    for windows in canaries:
        alt_path, null_path = [0.0], [0.0]
        for k in range(onset, len(windows)):
            ce, cr, se, sr = windows[k]
            events = ce + se
            a = cr / sr if sr > 0 else 0.0
            theta0 = max_ratio * a / (1 + max_ratio * a)
            drawn = sum(1 for _ in range(events) if rng.random() < theta0)
            alt_path.append(alt_path[-1] + window_llr(ce, cr, se, sr, ratio_at(k), max_ratio))
            null_path.append(
                null_path[-1] + window_llr(drawn, cr, events - drawn, sr, ratio_at(k), max_ratio)
            )
        alternative.append(alt_path[1:])
        null.append(null_path[1:])
    for i in range(len(alternative[0]) if alternative else 0):
        ranked = sorted(path[i] for path in null)
        critical = ranked[min(len(ranked) - 1, math.ceil(confidence * len(ranked)) - 1)]
        caught = sum(1 for path in alternative if path[i] > critical)
        if 2 * caught >= len(alternative):
            return onset + i
    return None


def _logaddexp(x: float, y: float) -> float:
    top = max(x, y)
    if top == -math.inf:
        return top
    return top + math.log(math.exp(x - top) + math.exp(y - top))


def _log_sum_exp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(v - top) for v in values))
