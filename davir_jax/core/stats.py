"""Small statistics for the report: percentile bootstrap intervals, seed summaries, correlations.

Everything is vectorised over resamples: the resampled item indices form one integer matrix
[resamples, items] (built in chunks so memory stays bounded), and every statistic is a function
over the last axis, so 10,000 resamples of a few hundred held-out items take milliseconds.

The bootstrap resamples ITEMS (held-out examples, or pool examples for a correlation); it says
how much a number would move with another draw of the same number of items, nothing about the
variation between training seeds (the report shows that separately, as the spread over seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy.stats import rankdata

# Elements of one resampled index matrix chunk (int64): ~32 MiB, whatever the item count.
_CHUNK_ELEMENTS = 1 << 22


class Interval(NamedTuple):
    """A point estimate with a percentile bootstrap interval at `level` (lo <= hi)."""

    point: float
    lo: float
    hi: float
    level: float
    n: int  # items resampled

    def excludes_zero(self) -> bool:
        """True when the whole interval lies on one side of 0."""
        return self.lo > 0 or self.hi < 0


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The (1-level)/2 and (1+level)/2 quantiles of `samples` (linear interpolation, as
    np.percentile and scipy.stats.bootstrap's 'percentile' method)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1 - level) / 2
    lo, hi = np.quantile(np.asarray(samples, dtype=np.float64), [alpha, 1 - alpha])
    return float(lo), float(hi)


def bootstrap_samples(
    stat_fn: Callable[..., np.ndarray],
    *arrays: np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
) -> np.ndarray:
    """`stat_fn` on `n_resamples` paired resamples of the items of `arrays` -> float64 [B].

    All arrays have the items on their first axis (the same n); one resample takes the same
    items (with replacement) from every array. `stat_fn(*resampled)` gets arrays of shape
    [b, n, ...] and must return [b] (a statistic over axis 1).
    """
    arrs = [np.asarray(a) for a in arrays]
    if not arrs:
        raise ValueError("bootstrap needs at least one array")
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise ValueError(f"bootstrap arrays differ in length: {[len(a) for a in arrs]}")
    if n == 0:
        raise ValueError("bootstrap needs at least one item")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    for s in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - s)
        idx = rng.integers(0, n, size=(b, n))
        out[s : s + b] = stat_fn(*(a[idx] for a in arrs))
    return out


def bootstrap_ci(
    stat_fn: Callable[..., np.ndarray],
    *arrays: np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Point estimate `stat_fn` on the items as given, with a percentile bootstrap interval
    over paired resamples of the items (see `bootstrap_samples` for `stat_fn`'s contract)."""
    point = float(stat_fn(*(np.asarray(a)[None] for a in arrays))[0])
    samples = bootstrap_samples(stat_fn, *arrays, n_resamples=n_resamples, seed=seed)
    lo, hi = percentile_interval(samples, level)
    return Interval(point, lo, hi, level, len(arrays[0]))


def token_mean(nll: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Token-weighted mean loss over axis -1: sum(nll) / sum(tokens) (nats per token)."""
    return np.sum(nll, axis=-1) / np.sum(n_tokens, axis=-1)


def _paired_diff(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return token_mean(a, t) - token_mean(b, t)


def paired_bootstrap(
    a_nll: np.ndarray,
    b_nll: np.ndarray,
    n_tokens: np.ndarray,
    n_resamples: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Difference of token-weighted mean losses, a minus b, with a paired percentile bootstrap.

    a_nll, b_nll: float [n], each item's summed NLL (nats) under models a and b; n_tokens: [n],
    the item's response tokens (the same tokens for both models). The statistic is
    sum(a)/sum(T) - sum(b)/sum(T); each resample draws n items with replacement and uses the
    same items for a and b. For a mean of per-item values (e.g. a 0/1 correct indicator), pass
    n_tokens = ones.
    """
    a = np.asarray(a_nll, dtype=np.float64)
    b = np.asarray(b_nll, dtype=np.float64)
    t = np.asarray(n_tokens, dtype=np.float64)
    if not (a.shape == b.shape == t.shape) or a.ndim != 1:
        raise ValueError(
            f"paired_bootstrap: shapes differ or are not 1-D: {a.shape}, {b.shape}, {t.shape}"
        )
    if np.any(t <= 0):
        raise ValueError("paired_bootstrap: every item needs n_tokens > 0")
    return bootstrap_ci(_paired_diff, a, b, t, n_resamples=n_resamples, seed=seed, level=level)


def mean_sd(values: np.ndarray | list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (ddof=1; None for fewer than 2 values) and count."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_sd of no values")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else None), int(v.size)


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of x and y along the last axis (nan where either is constant)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    den = np.sqrt(np.sum(xc * xc, axis=-1) * np.sum(yc * yc, axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, np.sum(xc * yc, axis=-1) / np.where(den > 0, den, 1), np.nan)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman correlation along the last axis: Pearson of average ranks (ties share a rank),
    as scipy.stats.spearmanr."""
    return pearson_rows(rankdata(x, axis=-1), rankdata(y, axis=-1))


def dense_ranks(x: np.ndarray) -> tuple[np.ndarray, int]:
    """(code [n], k): each value's index among the k distinct values of x, in sorted order."""
    values, codes = np.unique(np.asarray(x), return_inverse=True)
    return codes.reshape(-1).astype(np.int64), len(values)


def resample_ranks(codes: np.ndarray, k: int) -> np.ndarray:
    """Average ranks (1-based, ties share their mean rank, as rankdata) along the last axis of
    rows of dense codes [b, n] (from `dense_ranks`, then resampled).

    A row's rank of code c is (items with a smaller code) + (items with code c + 1) / 2: one
    bincount per row, O(n) instead of a sort, so Spearman intervals over a 50k-example pool
    stay fast.
    """
    codes = np.atleast_2d(codes)
    b = codes.shape[0]
    offset = k * np.arange(b, dtype=np.int64)[:, None]
    counts = np.bincount((codes + offset).ravel(), minlength=b * k).reshape(b, k)
    avg = np.cumsum(counts, axis=1) - counts + (counts + 1) / 2.0
    return np.take_along_axis(avg, codes, axis=1)


def correlation_samples(
    x: np.ndarray, y: np.ndarray, method: str = "spearman", n_resamples: int = 1000, seed: int = 0
) -> tuple[float, np.ndarray]:
    """Spearman or Pearson correlation of x with y, and its values on `n_resamples` bootstrap
    resamples of the (x, y) pairs (nan for a resample where either side is constant)."""
    if method == "spearman":
        # Resample the dense codes and rank within each resample (ties by average rank).
        (cx, kx), (cy, ky) = dense_ranks(x), dense_ranks(y)
        args = (cx, cy)
        stat = lambda a, b: pearson_rows(resample_ranks(a, kx), resample_ranks(b, ky))  # noqa: E731
    elif method == "pearson":
        args, stat = (np.asarray(x, np.float64), np.asarray(y, np.float64)), pearson_rows
    else:
        raise ValueError(f"method must be spearman or pearson, got {method!r}")
    point = float(stat(args[0][None], args[1][None])[0])
    return point, bootstrap_samples(stat, *args, n_resamples=n_resamples, seed=seed)


def interval(point: float, samples: np.ndarray, n: int, level: float = 0.95) -> Interval:
    """`point` with the percentile interval of the finite `samples` (all nan if none, or if
    the point itself is not finite)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if not np.isfinite(point) or samples.size == 0:
        return Interval(float("nan"), float("nan"), float("nan"), level, n)
    lo, hi = percentile_interval(samples, level)
    return Interval(float(point), lo, hi, level, n)


def correlation_ci(
    x: np.ndarray,
    y: np.ndarray,
    method: str = "spearman",
    absolute: bool = False,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Spearman or Pearson correlation of x with y, with a percentile bootstrap interval over
    items (pairs resampled together). absolute: the interval of |correlation| instead, for
    comparing the strength of two correlations whatever their sign. Constant resamples have no
    correlation and are dropped (all nan if the data itself is constant)."""
    point, samples = correlation_samples(x, y, method, n_resamples, seed)
    if absolute:
        point, samples = abs(point), np.abs(samples)
    return interval(point, samples, len(x), level)


__all__ = [
    "Interval",
    "bootstrap_ci",
    "bootstrap_samples",
    "correlation_ci",
    "correlation_samples",
    "dense_ranks",
    "interval",
    "mean_sd",
    "paired_bootstrap",
    "pearson_rows",
    "percentile_interval",
    "resample_ranks",
    "spearman_rows",
    "token_mean",
]
