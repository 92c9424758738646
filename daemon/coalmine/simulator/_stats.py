"""The statistics the traffic model needs: lognormals by median and p99, mixtures, sampling.

Pure functions on floats and a caller's ``random.Random``; no numpy (not a dependency).
Counts are sampled exactly for small means and by the normal approximation for large ones,
which is all a simulated Worker needs: noisy thin traffic, steady heavy traffic.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from functools import cache
from statistics import NormalDist

_STANDARD = NormalDist()
Z99 = _STANDARD.inv_cdf(0.99)
_EXACT_BELOW = 30.0  # a mean under this is sampled exactly; above, the normal approximation


@cache
def lognormal(median: float, p99: float) -> tuple[float, float]:
    """The (mu, sigma) of the lognormal with this median and 99th percentile."""
    if median <= 0 or p99 < median:
        raise ValueError(f"need 0 < median <= p99, got median={median}, p99={p99}")
    return math.log(median), math.log(p99 / median) / Z99


def lognormal_cdf(x: float, median: float, p99: float) -> float:
    """P(X <= x) for the lognormal with this median and p99."""
    if x <= 0:
        return 0.0
    mu, sigma = lognormal(median, p99)
    if sigma == 0:
        return 1.0 if x >= median else 0.0
    return 0.5 * (1.0 + math.erf((math.log(x) - mu) / (sigma * math.sqrt(2.0))))


def lognormal_mean(median: float, p99: float) -> float:
    """The mean of the lognormal with this median and p99."""
    _, sigma = lognormal(median, p99)
    return median * math.exp(sigma * sigma / 2.0)


def lognormal_quantile(q: float, median: float, p99: float) -> float:
    """The q-quantile (0 < q < 1) of the lognormal with this median and p99."""
    mu, sigma = lognormal(median, p99)
    return math.exp(mu + sigma * _STANDARD.inv_cdf(q))


@cache
def fractions_below(bounds: tuple[float, ...], median: float, p99: float) -> tuple[float, ...]:
    """P(X <= bound) for each bound: the share of a histogram's cumulative buckets."""
    return tuple(lognormal_cdf(b, median, p99) for b in bounds)


def mixture_quantile(q: float, parts: Sequence[tuple[float, float, float]]) -> float:
    """The q-quantile of a mixture of lognormals given as (weight, median, p99).

    The answer lies between the parts' own q-quantiles, so bisection on the log scale between
    them converges quickly; one part is answered in closed form.
    """
    live = [(w, m, p) for w, m, p in parts if w > 0]
    if not live:
        raise ValueError("a mixture needs a part with positive weight")
    if len(live) == 1 or len({(m, p) for _, m, p in live}) == 1:
        return lognormal_quantile(q, live[0][1], live[0][2])
    total = sum(w for w, _, _ in live)
    each = [lognormal_quantile(q, m, p) for _, m, p in live]
    low, high = math.log(min(each)), math.log(max(each))
    for _ in range(60):
        mid = (low + high) / 2.0
        x = math.exp(mid)
        below = sum(w * lognormal_cdf(x, m, p) for w, m, p in live) / total
        if below < q:
            low = mid
        else:
            high = mid
    return math.exp((low + high) / 2.0)


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson count with this mean."""
    if mean <= 0:
        return 0
    if mean < _EXACT_BELOW:
        # Knuth: multiply uniforms until the product drops below e^-mean.
        limit, product, count = math.exp(-mean), rng.random(), 0
        while product > limit:
            product *= rng.random()
            count += 1
        return count
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


def binomial(rng: random.Random, n: int, p: float) -> int:
    """A binomial count: successes in ``n`` trials of probability ``p``."""
    if n <= 0 or p <= 0:
        return 0
    if p >= 1:
        return n
    if n <= 64:
        return sum(1 for _ in range(n) if rng.random() < p)
    mean, variance = n * p, n * p * (1 - p)
    if variance < _EXACT_BELOW:
        return min(n, poisson(rng, mean)) if p < 0.5 else n - min(n, poisson(rng, n - mean))
    return min(n, max(0, round(rng.gauss(mean, math.sqrt(variance)))))
