"""davir_jax.core.stats against independent oracles: scipy.stats.bootstrap (paired, percentile) for
the paired held-out-loss difference and for correlations, scipy.stats.spearmanr/pearsonr for
the row-wise correlations, and exact properties of the paired difference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from davir_jax.core.stats import (
    bootstrap_ci,
    correlation_ci,
    dense_ranks,
    mean_sd,
    paired_bootstrap,
    pearson_rows,
    resample_ranks,
    spearman_rows,
    token_mean,
)


def _items(n=300, seed=1):
    rng = np.random.default_rng(seed)
    t = rng.integers(5, 80, n)
    a = t * rng.gamma(4.0, 0.3, n)  # summed NLLs: about 1.2 nats/token, skewed
    b = a + t * rng.normal(0.05, 0.2, n)  # b slightly worse on average, correlated with a
    return a, np.abs(b), t


def test_paired_bootstrap_matches_scipy_percentile_bootstrap():
    a, b, t = _items()
    ours = paired_bootstrap(a, b, t, n_resamples=10000, seed=0)

    def stat(x, y, w, axis=-1):
        return np.sum(x, axis) / np.sum(w, axis) - np.sum(y, axis) / np.sum(w, axis)

    ref = sps.bootstrap(
        (a, b, t.astype(float)),
        stat,
        paired=True,
        vectorized=True,
        n_resamples=100000,
        method="percentile",
        confidence_level=0.95,
        random_state=np.random.default_rng(123),
    )
    assert ours.point == pytest.approx(a.sum() / t.sum() - b.sum() / t.sum(), abs=1e-12)
    se = ref.standard_error
    # Monte-Carlo error of a 2.5% quantile of B bootstrap draws of a ~normal statistic with
    # standard error se: sqrt(q(1-q)/B) / phi(1.96) * se = 2.67 se / sqrt(B). For B = 1e4 (ours)
    # and 1e5 (scipy) the endpoints differ by about 0.028 se (one sd); 0.15 se is ~5 sd. Both
    # sides are seeded, so the test is deterministic; it fails for a wrong statistic, unpaired
    # resampling (much wider interval) or a wrong quantile (0.05 instead of 0.025: ~0.32 se).
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=0.15 * se)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=0.15 * se)
    assert ours.n == len(a) and ours.level == 0.95


def test_paired_bootstrap_exact_properties():
    a, _, t = _items(n=200, seed=2)
    same = paired_bootstrap(a, a.copy(), t, n_resamples=2000)
    assert same.point == 0.0 and same.lo == 0.0 and same.hi == 0.0
    assert not same.excludes_zero()
    c = 0.37
    shifted = paired_bootstrap(a + c * t, a, t, n_resamples=2000)
    # A per-token shift of c in every item: every resample's difference is c exactly.
    assert shifted.point == pytest.approx(c, abs=1e-12)
    assert shifted.lo == pytest.approx(c, abs=1e-12) and shifted.hi == pytest.approx(c, abs=1e-12)
    assert shifted.excludes_zero()
    # Antisymmetric: b - a is -(a - b), with the interval mirrored (same resamples).
    x, y, w = _items(n=150, seed=3)
    ab = paired_bootstrap(x, y, w, n_resamples=3000, seed=5)
    ba = paired_bootstrap(y, x, w, n_resamples=3000, seed=5)
    assert ba.point == pytest.approx(-ab.point, abs=1e-12)
    assert ba.lo == pytest.approx(-ab.hi, abs=1e-12) and ba.hi == pytest.approx(-ab.lo, abs=1e-12)


def test_paired_bootstrap_refuses_bad_input():
    with pytest.raises(ValueError, match="shapes differ"):
        paired_bootstrap(np.ones(3), np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match="n_tokens > 0"):
        paired_bootstrap(np.ones(3), np.ones(3), np.array([1, 0, 2]))


def test_bootstrap_ci_of_a_token_mean_and_chunking():
    a, _, t = _items(n=500, seed=4)
    # 10000 resamples of 500 items = 5e6 indices > one chunk: the chunked draw must give the
    # same interval as scipy (same Monte-Carlo tolerance argument as above).
    ours = bootstrap_ci(token_mean, a, t.astype(float), n_resamples=10000, seed=1)
    ref = sps.bootstrap(
        (a, t.astype(float)),
        lambda x, w, axis=-1: np.sum(x, axis) / np.sum(w, axis),
        paired=True,
        vectorized=True,
        n_resamples=100000,
        method="percentile",
        random_state=np.random.default_rng(7),
    )
    assert ours.point == pytest.approx(a.sum() / t.sum(), abs=1e-12)
    se = ref.standard_error
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=0.15 * se)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=0.15 * se)


def test_row_correlations_equal_scipy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 40))
    y = x + rng.normal(size=(6, 40))
    y[2] = np.round(y[2])  # ties: average ranks, as spearmanr
    for i in range(6):
        assert spearman_rows(x, y)[i] == pytest.approx(sps.spearmanr(x[i], y[i])[0], abs=1e-12)
        assert pearson_rows(x, y)[i] == pytest.approx(sps.pearsonr(x[i], y[i])[0], abs=1e-12)
    assert np.isnan(pearson_rows(np.ones(5), np.arange(5.0)))


def test_correlation_ci_matches_scipy_bootstrap():
    rng = np.random.default_rng(3)
    t = rng.integers(3, 200, 150).astype(float)
    s = 0.01 * t + rng.normal(0, 0.8, 150)
    ours = correlation_ci(s, t, "spearman", n_resamples=4000, seed=0)
    ref = sps.bootstrap(
        (s, t),
        lambda a, b: sps.spearmanr(a, b)[0],
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="percentile",
        random_state=np.random.default_rng(11),
    )
    assert ours.point == pytest.approx(sps.spearmanr(s, t)[0], abs=1e-12)
    # Same argument as above with B = 4000 on both sides: one sd of the endpoint difference is
    # 2.67 * sqrt(2 / 4000) se = 0.06 se; 0.3 se is 5 sd.
    se = ref.standard_error
    assert ours.lo == pytest.approx(ref.confidence_interval.low, abs=0.3 * se)
    assert ours.hi == pytest.approx(ref.confidence_interval.high, abs=0.3 * se)
    absolute = correlation_ci(-s, t, "spearman", absolute=True, n_resamples=4000, seed=0)
    assert absolute.point == pytest.approx(abs(ours.point), abs=1e-12)
    # |r| of the negated score on the same resamples: the mirror of the signed interval (r > 0
    # in every resample here, so |.| changes nothing but the sign).
    assert absolute.lo == pytest.approx(ours.lo, abs=1e-12)
    assert absolute.hi == pytest.approx(ours.hi, abs=1e-12)


def test_mean_sd():
    m, sd, n = mean_sd([1.0, 2.0, 4.0])
    assert (m, n) == (pytest.approx(7 / 3), 3)
    assert sd == pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1))
    assert mean_sd([2.5]) == (2.5, None, 1)


def test_resample_ranks_equal_rankdata_on_resamples():
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(size=300), 1)  # many ties
    codes, k = dense_ranks(x)
    idx = rng.integers(0, 300, size=(20, 300))
    np.testing.assert_array_equal(resample_ranks(codes[idx], k), sps.rankdata(x[idx], axis=-1))
