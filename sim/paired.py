"""Is a leaderboard difference more than noise? Paired comparisons over seeds.

Two algorithms run with the same seeds share each seed's initial model, cohort plans and batch
order, so their per-seed results are paired: the paired t-test on the differences removes what
the seed contributes to both. Comparing every algorithm of a setting with its first is several
tests at once, so their p-values are Holm-corrected (Holm 1979: controls the family-wise error
rate without assuming independence). Student's t distribution is computed here (regularised
incomplete beta by its continued fraction) so that the leaderboard needs no SciPy.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence


class Paired(NamedTuple):
    """``a - b`` over paired seeds: mean difference, its 95 % t-interval, the two-sided p-value."""

    n: int
    mean: float
    low: float
    high: float
    p: float


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf_two_sided(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile (0.5 < q < 1) of Student's t, by bisection on the distribution function."""
    low, high = 0.0, 1.0
    while t_sf_two_sided(high, df) / 2 > 1 - q:
        high *= 2
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_sf_two_sided(mid, df) / 2 > 1 - q else (low, mid)
    return 0.5 * (low + high)


def paired_t(a: Sequence[float], b: Sequence[float]) -> Paired:
    """The paired t-test and 95 % interval of ``mean(a - b)``; ``a[i]`` and ``b[i]`` come from the same seed.
    With fewer than 2 pairs there is no test (interval and p-value are NaN)."""
    if len(a) != len(b):
        raise ValueError(f"paired_t: a and b must pair up, got {len(a)} and {len(b)} values")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n if n else math.nan
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    if sd == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        return Paired(n, mean, mean, mean, p)
    se = sd / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    return Paired(n, mean, mean - half, mean + half, t_sf_two_sided(mean / se, n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order; NaN stays NaN."""
    order = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    m = len(order)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted
