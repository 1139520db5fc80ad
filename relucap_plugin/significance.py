"""Exact tests on paired per-sample outcomes: is a gap between two attacks more than noise?

Two attacks run on the same samples give paired outcomes. Only the discordant samples say
which is stronger: ``b`` broken by the challenger alone, ``c`` by the reference alone. Under
"equally strong" each discordant sample falls either way with probability 1/2 (McNemar), so the
exact one-sided p-value is the binomial tail ``P(X >= b)`` with ``X ~ Bin(b + c, 1/2)``. Written
here in a few lines (no scipy dependency); :func:`clopper_pearson` gives the exact interval of
a proportion such as the over-report ``b / n``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["ALPHA", "binomial_tail", "clopper_pearson", "mcnemar_exact"]

#: Family-wise significance level of the masking evidence (Bonferroni over the tests made).
ALPHA = 0.05


def binomial_tail(k: int, n: int, p: float = 0.5) -> float:
    """``P(X >= k)`` for ``X ~ Bin(n, p)``, exact."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return min(1.0, math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def mcnemar_exact(b: int, c: int) -> float:
    """One-sided exact McNemar p-value that the challenger (``b`` samples broken by it alone) is
    stronger than the reference (``c`` broken by the reference alone)."""
    _counts(b=b, c=c)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    return binomial_tail(b, b + c)


def _counts(**counts: Any) -> None:
    """Refuse counts that are not ints (a float count has no binomial meaning)."""
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int count, got {type(v).__name__} {v!r:.40}")


def _solve(f, target: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Exact two-sided ``1 - alpha`` interval of a proportion ``k / n`` (Clopper and Pearson)."""
    _counts(k=k, n=n)
    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a number in (0, 1), e.g. 0.05 for a 95% interval; got {alpha!r:.40}")
    lower = 0.0 if k == 0 else _solve(lambda p: binomial_tail(k, n, p), alpha / 2)
    upper = 1.0 if k == n else _solve(lambda p: binomial_tail(k + 1, n, p), 1 - alpha / 2)
    return lower, upper
