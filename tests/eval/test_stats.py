"""eval/stats.py: bootstrap and proportion CIs, correlations equal to scipy, degenerate inputs."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from alignforge.eval.stats import bootstrap_ci, pearson, proportion_ci, rankdata, spearman


def _shares(n, p=0.7, seed=123):
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_bootstrap_ci_contains_the_mean_and_narrows_with_n():
    small, big = _shares(100), _shares(1600)
    a, b = bootstrap_ci(small, n_resamples=2000), bootstrap_ci(big, n_resamples=2000)
    assert a[0] < small.mean() < a[1] and b[0] < big.mean() < b[1]
    # width ~ 3.92 * sqrt(p(1-p)/n): 16x the data -> about a quarter of the width
    wa, wb = a[1] - a[0], b[1] - b[0]
    assert 0.18 < wb / wa < 0.35
    for v, w in ((small, wa), (big, wb)):
        se = math.sqrt(v.mean() * (1 - v.mean()) / len(v))
        assert 0.8 * 3.92 * se < w < 1.2 * 3.92 * se


def test_bootstrap_ci_is_seeded_and_matches_scipy_percentile():
    v = _shares(300)
    a = bootstrap_ci(v, n_resamples=1000, seed=5)
    assert a == bootstrap_ci(v, n_resamples=1000, seed=5)
    assert a != bootstrap_ci(v, n_resamples=1000, seed=6)
    ref = sps.bootstrap((v,), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(5))
    assert a == (ref.confidence_interval.low, ref.confidence_interval.high)


def test_bootstrap_ci_other_statistic_and_confidence():
    v = np.arange(1.0, 101.0)  # median 50.5
    lo, hi = bootstrap_ci(v, statistic=np.median, n_resamples=1000)
    assert lo < 50.5 < hi
    lo90, hi90 = bootstrap_ci(v, statistic=np.median, n_resamples=1000, confidence=0.5)
    assert lo <= lo90 and hi90 <= hi and (hi90 - lo90) < (hi - lo)


def test_bootstrap_ci_degenerate_inputs_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bootstrap_ci(np.ones(30)) == (1.0, 1.0)
        assert bootstrap_ci(np.zeros(5), method="BCa") == (0.0, 0.0)
        assert bootstrap_ci([0.25]) == (0.25, 0.25)
        lo, hi = bootstrap_ci([])
        assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.5)


def test_proportion_ci_wilson_by_hand():
    # Wilson: (p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = 0.3, n = 10
    z, p, n = sps.norm.ppf(0.975), 0.3, 10
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert proportion_ci(3, 10) == pytest.approx((c - h, c + h), rel=1e-9)
    lo, hi = proportion_ci(0, 20)
    assert lo == pytest.approx(0.0, abs=1e-12) and 0.1 < hi < 0.2  # Wilson upper bound for 0/20 = 0.161
    assert proportion_ci(0, 20) != proportion_ci(0, 20, method="exact")
    assert all(math.isnan(x) for x in proportion_ci(0, 0))
    with pytest.raises(ValueError):
        proportion_ci(5, 3)


def test_correlations_equal_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=50)
    y = 0.5 * x + rng.normal(size=50)
    assert pearson(x, y) == pytest.approx(sps.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic, abs=1e-12)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    # ties: ranks 1, 2.5, 2.5, 4 vs 1..4 -> 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert rankdata([3, 1, 2, 2]).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_correlations_undefined_are_none():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pearson([1, 1, 1], [1, 2, 3]) is None
        assert spearman([1, 2, 3], [4, 4, 4]) is None
        assert pearson([1], [2]) is None and spearman([], []) is None
    with pytest.raises(ValueError, match="shapes differ"):
        pearson([1, 2], [1, 2, 3])
