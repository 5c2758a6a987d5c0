"""Statistics of the leaderboard: CIs of accuracies and of paired deltas, McNemar tests, verdicts.

Data are 0/1 correctness matrices ``Y[seed, item]`` of one arm (one experiment), items in the same order for every arm
of a testbed, so arms are compared item by item (paired). Two sources of chance make two arms look different:

* test-item sampling (which problems happen to be in the test set), and
* seed-to-seed training variance (a whole run lands a few points higher or lower; which items it gets right varies).

With one seed per arm only the first can be measured: the delta CI is a paired bootstrap over items (percentile), and
McNemar's test on the discordant items gives a p-value. With two or more seeds in an arm, the CI must also carry the
seed variance, else two groups of identical baseline runs are called "different" far more often than 5% of the time.
A percentile bootstrap over 2-3 seeds cannot do that (for 2 seeds it returns roughly [min, max], which covers the
mean half of the time), so the seeds x items CI uses the variance components of the crossed design

    y[s, i] = mu + item_i + seed_s + e[s, i]

estimated by moments: with S2_a the variance of arm a's per-seed accuracies (R_a seeds, df R_a - 1) and MSE_a its
item x seed residual mean square,

    Var(delta) = Var_i(per-item mean difference) / C - sum_a MSE_a / (R_a C)   (item part, df C - 1)
               + sum_a S2_a / R_a                                              (seed part, df R_a - 1 each)

(S2_a carries each run's own item noise MSE_a / C, so that share is taken out of the item part, not counted twice),
and a Student t quantile with Welch-Satterthwaite degrees of freedom on these mean squares. With 2 seeds an arm's S2
has 1 degree of freedom, so the t quantile is large: honest, since 2 seeds cannot bound seed-to-seed variance; the
simulation in ``tests/test_leaderboard_stats.py`` checks coverage (and shows the power bought by a third seed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

VERDICTS = ("degraded", "no significant change", "improved", "diverged")


@dataclass(frozen=True)
class Interval:
    """A point estimate with its two-sided CI (fractions, not percent) and how it was made."""

    estimate: float
    lo: float
    hi: float
    method: str
    df: float | None = None  # t degrees of freedom, for the seeds x items method


@dataclass(frozen=True)
class Comparison:
    """An experiment arm against the baseline arm: delta CI and, for single-seed pairs, McNemar p-values."""

    delta: Interval
    mcnemar_p: float | None = None  # exact two-sided binomial test on the discordant items
    mcnemar_midp: float | None = None  # mid-p variant (closer to nominal size, less conservative)


def as_matrix(y, name: str = "per_item") -> np.ndarray:
    """Return a float (seeds, items) matrix; a 1-D vector is one seed. Raise ValueError on empty or ragged input."""
    try:
        arr = np.asarray(y, dtype=float)
    except ValueError as exc:  # ragged lists
        raise ValueError(f"{name}: per-item vectors of one arm have different lengths") from exc
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty (seeds, items) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: per-item values must be finite")
    return arr


def seed_mean_squares(Y: np.ndarray) -> tuple[float, float] | None:
    """(S2, MSE) of one arm: variance of its per-seed accuracies, and its item x seed residual mean square.

    S2 estimates sigma_seed^2 + MSE / C: the spread of whole runs plus each run's own item-level noise. None for one
    seed (nothing to estimate from).
    """
    R, C = Y.shape
    if R < 2:
        return None
    acc = Y.mean(axis=1)
    resid = Y - acc[:, None] - Y.mean(axis=0)[None, :] + Y.mean()
    mse = float((resid**2).sum()) / ((R - 1) * (C - 1)) if C > 1 else 0.0
    return float(acc.var(ddof=1)), mse


def _t_interval(est: float, comps: list[tuple[float, float]], alpha: float, method: str) -> Interval:
    """CI est +- t * sqrt(sum v) with Welch-Satterthwaite df from (variance, df) components."""
    var = sum(v for v, _ in comps)
    den = sum(v * v / d for v, d in comps if v > 0)
    df = var * var / den if den > 0 else math.inf
    half = float(stats.t.ppf(1 - alpha / 2, df)) * math.sqrt(var) if var > 0 else 0.0
    return Interval(est, est - half, est + half, method, df if math.isfinite(df) else None)


def accuracy_ci(y, alpha: float = 0.05) -> Interval:
    """CI of an arm's mean accuracy: Wilson score for one seed, seeds x items variance components for several."""
    Y = as_matrix(y)
    R, C = Y.shape
    if R == 1:
        k = Y[0].sum()
        if np.all((Y == 0) | (Y == 1)):
            ci = stats.binomtest(int(k), C).proportion_ci(1 - alpha, method="wilson")
            return Interval(k / C, float(ci.low), float(ci.high), "wilson")
        comps = [(Y[0].var(ddof=1) / C, C - 1)]
        return _t_interval(float(Y.mean()), comps, alpha, "items (t)")
    s2, mse = seed_mean_squares(Y)
    item = max(Y.mean(axis=0).var(ddof=1) / C - mse / (R * C), 0.0)
    return _t_interval(float(Y.mean()), [(item, C - 1), (s2 / R, R - 1)], alpha, "seeds x items (t)")


def paired_bootstrap(a, b, n_boot: int = 2000, alpha: float = 0.05, rng=None) -> Interval:
    """Percentile CI of mean(a - b) resampling items with replacement (a, b: one value per item, same order).

    Vectorised exactly: resampling n items is a multinomial draw of how often each distinct per-item difference
    (-1, 0, +1 for 0/1 data) appears, so the cost is independent of the number of items.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal-length 1-D vectors, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(0) if rng is None else rng
    vals, counts = np.unique(a - b, return_counts=True)
    n = a.size
    draws = rng.multinomial(n, counts / n, size=n_boot)
    boot = draws @ vals / n
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return Interval(float((a - b).mean()), float(lo), float(hi), "paired bootstrap (items)")


def seeds_items_ci(ya, yb, alpha: float = 0.05) -> Interval:
    """CI of mean accuracy(a) - mean accuracy(b) carrying both item sampling and seed-to-seed variance.

    An arm with one seed borrows the other arm's seed variance (assumes the noise does not change the seed-to-seed
    spread); when neither arm has two seeds this reduces to the items-only t interval.
    """
    A, B = as_matrix(ya, "arm a"), as_matrix(yb, "arm b")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"per-item vectors differ in length: {A.shape[1]} vs {B.shape[1]} items")
    C = A.shape[1]
    d = A.mean(axis=0) - B.mean(axis=0)
    item = d.var(ddof=1) / C
    ra, rb = A.shape[0], B.shape[0]
    seeds = []
    if ra > 1 and rb > 1:
        for Y, r in ((A, ra), (B, rb)):
            s2, mse = seed_mean_squares(Y)
            seeds.append((s2 / r, r - 1))
            item -= mse / (r * C)
    elif ra > 1 or rb > 1:
        Y = A if ra > 1 else B
        s2, mse = seed_mean_squares(Y)
        seeds.append((s2 * (1 / ra + 1 / rb), Y.shape[0] - 1))
        item -= mse * (1 / ra + 1 / rb) / C
    return _t_interval(float(d.mean()), [(max(item, 0.0), C - 1)] + seeds, alpha, "seeds x items (t)")


def mcnemar(a, b) -> tuple[float, float]:
    """Exact McNemar test of paired 0/1 vectors: (two-sided p, mid-p) from the discordant counts."""
    a, b = np.asarray(a), np.asarray(b)
    n01 = int(((a == 1) & (b == 0)).sum())
    n10 = int(((a == 0) & (b == 1)).sum())
    n = n01 + n10
    if n == 0:
        return 1.0, 1.0
    k = min(n01, n10)
    exact = min(1.0, 2 * float(stats.binom.cdf(k, n, 0.5)))
    mid = min(1.0, 2 * float(stats.binom.cdf(k, n, 0.5) - 0.5 * stats.binom.pmf(k, n, 0.5)))
    return exact, mid


def compare(ya, yb, n_boot: int = 2000, alpha: float = 0.05, rng=None) -> Comparison:
    """Experiment arm ``ya`` against baseline arm ``yb``: the method follows the number of seeds (see module doc)."""
    A, B = as_matrix(ya, "experiment"), as_matrix(yb, "baseline")
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"per-item vectors differ in length: {A.shape[1]} vs {B.shape[1]} items")
    if A.shape[0] == 1 and B.shape[0] == 1:
        p, mid = mcnemar(A[0], B[0])
        return Comparison(paired_bootstrap(A[0], B[0], n_boot, alpha, rng), p, mid)
    return Comparison(seeds_items_ci(A, B, alpha))


def verdict(lo: float | None, hi: float | None, diverged: bool = False) -> str:
    """``diverged`` wins; otherwise the delta CI decides: entirely below 0, entirely above 0, or straddling it."""
    if diverged:
        return "diverged"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return "n/a"
    if hi < 0:
        return "degraded"
    if lo > 0:
        return "improved"
    return "no significant change"
