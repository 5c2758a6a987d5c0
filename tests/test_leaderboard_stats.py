"""The leaderboard's statistics, checked by simulation against known true effects (noisebench.leaderboard.stats)."""
import numpy as np
import pytest
from scipy import stats as sps

from noisebench.leaderboard import stats
from noisebench.leaderboard.synthetic import arm_matrix, item_difficulty

N_SIM = 300  # binomial sd of a 95% coverage estimate: 1.3 points


def simulate(n_sim, n_items, seeds, effect, seed_sd, item_sd=0.05, seed=0, method="auto"):
    """Fresh items and runs per replicate; returns (covered, flagged_degraded, flagged_any) rates and CI widths."""
    rng = np.random.default_rng(seed)
    cov = deg = sig = 0
    widths = []
    for _ in range(n_sim):
        p = item_difficulty(n_items, rng)
        ya = arm_matrix(p, seeds[0], effect, rng, seed_sd, item_sd)
        yb = arm_matrix(p, seeds[1], 0.0, rng, seed_sd, 0.0)
        if method == "items":  # what an items-only bootstrap on seed-averaged vectors would say
            d = stats.paired_bootstrap(ya.mean(0), yb.mean(0), 1000, rng=rng)
        else:
            d = stats.compare(ya, yb, n_boot=1000, rng=rng).delta
        cov += d.lo <= effect <= d.hi
        v = stats.verdict(d.lo, d.hi)
        deg += v == "degraded"
        sig += v != "no significant change"
        widths.append(d.hi - d.lo)
    return cov / n_sim, deg / n_sim, sig / n_sim, float(np.mean(widths))


def test_single_seed_paired_bootstrap_covers_and_has_nominal_false_positive_rate():
    cov, _, fpr, _ = simulate(N_SIM, 500, (1, 1), 0.0, seed_sd=0.0, seed=1)
    assert 0.92 <= cov <= 0.98, cov
    assert fpr <= 0.08, fpr
    cov, _, _, _ = simulate(N_SIM, 500, (1, 1), -0.03, seed_sd=0.0, seed=2)
    assert 0.92 <= cov <= 0.98, cov


def test_known_degradation_is_flagged():
    # -8 points on GSM8K's 1319 items, one seed per arm: about 4.4 standard errors.
    _, deg, _, _ = simulate(200, 1319, (1, 1), -0.08, seed_sd=0.0, seed=3)
    assert deg >= 0.95, deg
    # three seeds per arm with a 1-point seed-to-seed spread: still found nearly always.
    _, deg, _, _ = simulate(200, 1319, (3, 3), -0.08, seed_sd=0.01, seed=4)
    assert deg >= 0.9, deg


def test_seed_variance_needs_the_hierarchical_ci():
    """Two groups of identical-procedure runs (true delta 0) with a 4-point seed-to-seed spread, 3 seeds each.

    An items-only bootstrap calls them different far more often than 5%; the seeds x items CI stays near nominal.
    """
    cov_h, _, fpr_h, w_h = simulate(N_SIM, 500, (3, 3), 0.0, seed_sd=0.04, seed=5)
    cov_i, _, fpr_i, w_i = simulate(N_SIM, 500, (3, 3), 0.0, seed_sd=0.04, seed=5, method="items")
    assert 0.90 <= cov_h <= 0.99, cov_h
    assert fpr_h <= 0.10, fpr_h
    assert fpr_i >= 0.25, fpr_i  # the contrast: items-only is overconfident
    assert w_h > 1.5 * w_i


@pytest.mark.parametrize("seeds,seed_sd,effect", [((3, 3), 0.0, 0.0), ((2, 2), 0.03, -0.05), ((2, 2), 0.06, 0.0),
                                                  ((1, 3), 0.03, 0.0), ((3, 1), 0.06, 0.0), ((2, 3), 0.01, 0.0),
                                                  ((5, 5), 0.02, 0.05)])
def test_hierarchical_ci_coverage_with_and_without_seed_effects(seeds, seed_sd, effect):
    cov, _, _, _ = simulate(N_SIM, 500, seeds, effect, seed_sd=seed_sd, seed=6)
    assert 0.90 <= cov <= 0.99, cov


def test_a_third_seed_buys_power():
    """2 seeds per arm cannot bound seed variance (S2 has 1 df), so -8 points is found only sometimes; 3 seeds do."""
    _, deg2, _, _ = simulate(200, 1000, (2, 2), -0.08, seed_sd=0.0, seed=10)
    _, deg3, _, _ = simulate(200, 1000, (3, 3), -0.08, seed_sd=0.0, seed=10)
    assert deg3 >= 0.95 and deg3 > deg2 + 0.2, (deg2, deg3)


def test_accuracy_ci_covers_the_population_accuracy():
    rng = np.random.default_rng(7)
    hits = {1: 0, 3: 0}
    for _ in range(N_SIM):
        p = item_difficulty(500, rng)  # population mean accuracy 0.5
        for r in hits:
            ci = stats.accuracy_ci(arm_matrix(p, r, 0.0, rng, seed_sd=0.03 if r > 1 else 0.0))
            hits[r] += ci.lo <= 0.5 <= ci.hi
    assert all(0.90 <= h / N_SIM <= 0.99 for h in hits.values()), hits


def test_mcnemar_exact_matches_binomial_test_and_midp_is_smaller():
    rng = np.random.default_rng(8)
    a = (rng.random(400) < 0.55).astype(int)
    b = (rng.random(400) < 0.45).astype(int)
    n01, n10 = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    exact, mid = stats.mcnemar(a, b)
    assert exact == pytest.approx(sps.binomtest(min(n01, n10), n01 + n10, 0.5).pvalue, rel=1e-9)
    assert 0 < mid < exact
    assert stats.mcnemar(a, a) == (1.0, 1.0)


def test_paired_bootstrap_matches_index_resampling_and_is_deterministic():
    rng = np.random.default_rng(9)
    a, b = (rng.random(300) < 0.6).astype(int), (rng.random(300) < 0.5).astype(int)
    fast = stats.paired_bootstrap(a, b, 4000, rng=np.random.default_rng(1))
    again = stats.paired_bootstrap(a, b, 4000, rng=np.random.default_rng(1))
    assert (fast.lo, fast.hi) == (again.lo, again.hi)
    idx = np.random.default_rng(2).integers(0, 300, (4000, 300))
    slow = np.quantile((a - b)[idx].mean(1), [0.025, 0.975])
    assert fast.lo == pytest.approx(slow[0], abs=0.01) and fast.hi == pytest.approx(slow[1], abs=0.01)
    assert fast.estimate == pytest.approx((a - b).mean())


def test_verdicts_and_bad_input():
    assert stats.verdict(-0.1, -0.01) == "degraded"
    assert stats.verdict(0.01, 0.1) == "improved"
    assert stats.verdict(-0.01, 0.01) == "no significant change"
    assert stats.verdict(0.01, 0.1, diverged=True) == "diverged"
    with pytest.raises(ValueError, match="differ in length"):
        stats.compare(np.ones((2, 10)), np.ones((2, 11)))
    with pytest.raises(ValueError, match="different lengths"):
        stats.accuracy_ci([[1, 0, 1], [1, 0]])
