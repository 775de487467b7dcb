"""The statistics every evaluation reports: the one place confidence intervals and correlations come from.

* :func:`bootstrap_ci`: a seeded bootstrap CI of any statistic (default: the mean) through
  :func:`scipy.stats.bootstrap`. The default method is the **percentile** bootstrap (what
  ``rm eval`` has always reported); ``method="BCa"`` or ``"basic"`` are passed through.
* :func:`proportion_ci`: a CI for a share ``k / n`` (Wilson score interval by default, through
  :meth:`scipy.stats.binomtest(...).proportion_ci`; ``"exact"`` is Clopper-Pearson).
* :func:`pearson`, :func:`spearman`: :func:`scipy.stats.pearsonr` / :func:`scipy.stats.spearmanr`,
  returning ``None`` where the correlation is undefined (fewer than 2 points, or a constant input).

Degenerate inputs never raise and never warn:

* no values: ``bootstrap_ci`` returns ``(nan, nan)``;
* one value, or all values equal: every resample has the same statistic, so the CI is
  ``(v, v)`` with ``v = statistic(values)`` (scipy would return NaN for BCa and warn).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "proportion_ci", "pearson", "spearman", "rankdata"]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    statistic: Callable = np.mean,
    confidence: float = 0.95,
    n_resamples: int = 9999,
    seed: int = 0,
    method: str = "percentile",
    batch: int | None = 200,
) -> tuple[float, float]:
    """Bootstrap CI ``(low, high)`` of ``statistic(values)`` (seeded, so reproducible).

    ``statistic`` must accept an ``axis`` keyword (as numpy reductions do) to be vectorised;
    others work too, more slowly. ``batch`` bounds memory (resamples computed at once).
    See the module docstring for empty, single and constant inputs.
    """
    from scipy import stats

    v = np.asarray(values, dtype=np.float64).ravel()
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if v.size == 0:
        return (math.nan, math.nan)
    if v.size == 1 or bool(np.all(v == v[0])):
        s = float(statistic(v))
        return (s, s)
    res = stats.bootstrap(
        (v,),
        statistic,
        confidence_level=confidence,
        n_resamples=n_resamples,
        method=method,
        batch=batch,
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def proportion_ci(successes: int, n: int, confidence: float = 0.95, method: str = "wilson") -> tuple[float, float]:
    """CI of the share ``successes / n``: ``"wilson"`` (default), ``"wilsoncc"`` or ``"exact"``
    (Clopper-Pearson), as :meth:`scipy.stats.binomtest(...).proportion_ci`. ``n == 0`` → ``(nan, nan)``."""
    from scipy import stats

    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method=method)
    return (float(ci.low), float(ci.high))


def _pair(x: Sequence[float], y: Sequence[float], name: str) -> tuple[np.ndarray, np.ndarray] | None:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {a.shape} vs {b.shape}")
    a, b = a.ravel(), b.ravel()
    if a.size < 2 or bool(np.all(a == a[0])) or bool(np.all(b == b[0])):
        return None
    return a, b


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation (:func:`scipy.stats.pearsonr`); ``None`` when undefined."""
    from scipy import stats

    ab = _pair(x, y, "pearson")
    return None if ab is None else float(np.clip(stats.pearsonr(*ab).statistic, -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (:func:`scipy.stats.spearmanr`, ties get average ranks); ``None`` when undefined."""
    from scipy import stats

    ab = _pair(x, y, "spearman")
    return None if ab is None else float(np.clip(stats.spearmanr(*ab).statistic, -1.0, 1.0))


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values get the average of the ranks they span (:func:`scipy.stats.rankdata`)."""
    from scipy import stats

    return np.asarray(stats.rankdata(np.asarray(x, dtype=np.float64), method="average"), dtype=np.float64)
