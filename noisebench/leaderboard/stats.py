"""Statistics of the leaderboard: pooled seed variance, difference and equivalence tests, MDE, Holm, verdicts.

The unit of analysis is one run's score (its final clean accuracy, area under its clean curve, ...): seed-to-seed
training variance and each run's own item-level (binomial) noise are both inside the run-to-run variance, so run-level
means carry every source of chance that changes when a run is repeated. Inference is about these test items (all
arms of a testbed score the same items). Arm ``a`` has ``R_a`` runs with mean ``m_a`` and seed variance ``s_a^2``.

Balanced-design closed form (one-way ANOVA): arms share one seed variance, estimated by pooling the arms' variances,

    s_p^2 = sum_a (R_a - 1) s_a^2 / sum_a (R_a - 1)          with  df = sum_a (R_a - 1),

and delta = m_a - m_base has standard error s_p * sqrt(1/R_a + 1/R_base) on a Student t with that df. With 15 arms of
6 seeds the pool has 75 degrees of freedom, where a per-row Welch interval on 2 seeds has about 1.

Pooling assumes the arms' seed variances are alike. Each arm is checked against the pool of the others (one-sided F
test of its variance ratio, Bonferroni over the arms: Cochran's C in spirit), the most outlying arm leaves the pool
and the check repeats on the rest (arms that collapse spread more across seeds, and several of them in the "others"
would hide each other); an outlying arm is compared by Welch-Satterthwaite with its own variance. Levene's (Brown-Forsythe) test over all arms goes in the header.

Verdicts: ``degraded`` / ``improved`` when the Holm-adjusted two-sided p of the difference is below alpha (the
unadjusted CI then lies outside 0 too); else ``equivalent`` when both one-sided tests against the margin reject at
alpha (TOST: the 1 - 2 alpha CI lies inside +-margin); else ``inconclusive``. ``diverged`` when a seed ended NaN/inf;
``too few seeds`` when the arm or the baseline has fewer than 2 runs (items-only intervals are not enough).
Every function taking arrays broadcasts, so the tests simulate thousands of boards at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


# ---- vectorised building blocks -------------------------------------------------------------------------------------

def pooled_variance(s2, df, axis=-1):
    """(s_p^2, df_p): df-weighted mean of the arms' variances along ``axis``, and the summed df."""
    s2, df = np.asarray(s2, float), np.asarray(df, float)
    dfp = df.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dfp > 0, (s2 * df).sum(axis=axis) / np.where(dfp > 0, dfp, 1), np.nan), dfp


def t_interval(d, se, df, level: float):
    """Two-sided ``level`` CI d +- t_{(1+level)/2, df} se."""
    half = stats.t.ppf(0.5 + level / 2, df) * se
    return d - half, d + half


def diff_pvalue(d, se, df):
    """Two-sided p of H0: delta = 0 (a zero se gives p 0 for a non-zero delta, 1 for a zero one)."""
    d, se = np.asarray(d, float), np.asarray(se, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(se > 0, np.abs(d) / np.where(se > 0, se, 1), np.where(d == 0, 0.0, np.inf))
    return 2 * stats.t.sf(z, df)


def tost_pvalue(d, se, df, margin):
    """p of the two one-sided tests (H0: delta <= -margin or delta >= margin): the larger of the two p-values."""
    d, se = np.asarray(d, float), np.asarray(se, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        safe = np.where(se > 0, se, 1)
        lo = np.where(se > 0, (d + margin) / safe, np.where(d > -margin, np.inf, -np.inf))
        hi = np.where(se > 0, (margin - d) / safe, np.where(d < margin, np.inf, -np.inf))
    return np.maximum(stats.t.sf(lo, df), stats.t.sf(hi, df))


def mde(se, df, alpha: float = ALPHA, power: float = POWER):
    """Minimum detectable effect of a two-sided test at ``alpha`` with ``power``: (t_{1-alpha/2} + t_power) se."""
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * np.asarray(se, float)


def satterthwaite(components):
    """(se, df) of a sum of independent variance components given as (variance, df) pairs."""
    var = sum(v for v, _ in components)
    den = sum(v * v / d for v, d in components if v > 0 and d > 0)
    return math.sqrt(var), (var * var / den if den > 0 else math.inf)


def holm(pvalues, alpha: float = ALPHA) -> np.ndarray:
    """Holm-adjusted p-values (statsmodels ``multipletests``); NaN entries stay NaN and are not counted."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method="holm")[1]
    return out


# ---- one board ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pool:
    """Pooled seed variance of one metric over the arms of one setting (values in fractions)."""

    s2: float  # pooled variance (NaN when no arm has 2 runs)
    df: float  # sum (R_a - 1) over the pooled arms
    n_arms: int  # arms in the pool
    outlying: dict  # arm -> F-test p (Bonferroni-adjusted) for arms left out of the pool
    levene_p: float  # Brown-Forsythe test over all arms with >= 2 runs (NaN with < 2 such arms)
    cochran_c: float  # largest arm variance / sum of the arms' variances

    @property
    def sd(self) -> float:
        return math.sqrt(self.s2) if self.s2 == self.s2 else math.nan


def pool_arms(values: dict, alpha: float = ALPHA) -> Pool:
    """Pool the seed variances of ``values`` (arm -> run scores); arms with outlying variance are left out.

    An arm is outlying when its variance is significantly larger than the pool of the other arms still pooled (F
    test, Bonferroni over them at ``alpha``), removed one at a time, the most significant first, until none is; its
    comparisons then use Welch with its own variance.
    """
    arms = {k: np.asarray(v, float)[np.isfinite(np.asarray(v, float))] for k, v in values.items()}
    arms = {k: v for k, v in arms.items() if v.size >= 2}
    if not arms:
        return Pool(math.nan, 0.0, 0, {}, math.nan, math.nan)
    names = sorted(arms)
    s2 = np.array([arms[k].var(ddof=1) for k in names])
    df = np.array([arms[k].size - 1 for k in names], float)
    outlying = {}
    keep = np.ones(len(names), bool)
    while keep.sum() >= 3:   # one at a time, largest first: several wide arms would mask each other in one pass
        best = None
        for i in np.flatnonzero(keep):
            rest = keep.copy()
            rest[i] = False
            s2r, dfr = pooled_variance(s2[rest], df[rest])
            if s2r > 0:
                p = min(1.0, int(keep.sum()) * float(stats.f.sf(s2[i] / s2r, df[i], dfr)))
                if p < alpha and (best is None or p < best[1]):
                    best = (i, p)
        if best is None:
            break
        keep[best[0]] = False
        outlying[names[best[0]]] = best[1]
    s2p, dfp = pooled_variance(s2[keep], df[keep])
    lev = math.nan
    if len(names) >= 2 and any(np.ptp(arms[k]) > 0 for k in names):
        lev = float(stats.levene(*[arms[k] for k in names], center="median").pvalue)
    total = s2.sum()
    return Pool(float(s2p), float(dfp), int(keep.sum()), outlying, lev, float(s2.max() / total) if total > 0 else
                math.nan)


@dataclass(frozen=True)
class Comparison:
    """Arm minus baseline on one metric: estimate, CIs, tests and MDE (fractions, not points)."""

    delta: float
    se: float
    df: float
    lo: float  # (1 - alpha) CI
    hi: float
    p: float  # two-sided difference test, before Holm
    p_tost: float  # equivalence against +-margin
    mde: float  # at 80% power, alpha two-sided
    method: str  # "pooled" | "Welch" (outlying variance)
    enough_seeds: bool  # both sides have >= 2 runs


def compare(a, b, pool: Pool, arm: str, base: str, margin: float, alpha: float = ALPHA) -> Comparison | None:
    """Arm scores ``a`` against baseline scores ``b`` with the board's pool; None when a side has no finite score.

    An arm (or baseline) the pool left out contributes its own variance (Welch-Satterthwaite); an arm with one run
    has no variance of its own and uses the pool's, and is marked not ``enough_seeds``.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return None
    d = float(a.mean() - b.mean())
    sides = [(a, arm in pool.outlying), (b, base in pool.outlying)]
    if not any(out for _, out in sides):
        if not pool.df > 0:
            return Comparison(d, math.nan, 0.0, math.nan, math.nan, math.nan, math.nan, math.nan, "pooled", False)
        se, df, method = math.sqrt(pool.s2 * (1 / a.size + 1 / b.size)), pool.df, "pooled"
    else:
        comps = [((x.var(ddof=1) if out else pool.s2) / x.size, (x.size - 1) if out else pool.df) for x, out in sides]
        (se, df), method = satterthwaite(comps), "Welch"
    lo, hi = t_interval(d, se, df, 1 - alpha)
    return Comparison(d, se, float(df), float(lo), float(hi), float(diff_pvalue(d, se, df)),
                      float(tost_pvalue(d, se, df, margin)), float(mde(se, df, alpha)), method,
                      a.size >= 2 and b.size >= 2)


def classify(delta, p_holm, p_tost, alpha: float = ALPHA):
    """Verdicts of rows with enough seeds (vectorised): degraded / improved, else equivalent, else inconclusive."""
    delta, p_holm, p_tost = np.broadcast_arrays(np.asarray(delta, float), np.asarray(p_holm, float),
                                                np.asarray(p_tost, float))
    return np.where(p_holm < alpha, np.where(delta < 0, "degraded", "improved"),
                    np.where(p_tost < alpha, "equivalent", "inconclusive"))


# ---- single-seed pairs: items only ----------------------------------------------------------------------------------

def paired_bootstrap(a, b, n_boot: int = 2000, alpha: float = ALPHA, rng=None) -> tuple[float, float, float]:
    """(mean(a - b), lo, hi): percentile CI resampling items (a, b: one 0/1 value per item, same order).

    Only shown for a single-seed pair, where no seed variance exists to pool: it covers item sampling, not
    seed-to-seed variance, so such a row gets no verdict. Resampling n items is a multinomial draw of how often each
    distinct per-item difference appears, so the cost does not grow with the number of items.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two equal-length 1-D vectors, got {a.shape} and {b.shape}")
    rng = np.random.default_rng(0) if rng is None else rng
    vals, counts = np.unique(a - b, return_counts=True)
    boot = rng.multinomial(a.size, counts / a.size, size=n_boot) @ vals / a.size
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float((a - b).mean()), float(lo), float(hi)
