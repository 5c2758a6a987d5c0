"""The board's statistics checked in simulation against known true effects (noisebench.leaderboard.stats).

Boards are simulated thousands at a time with numpy (run-level accuracies, synthetic.board_scores) and analysed
with the same vectorised functions the board calls, so each test takes about a second.
"""
import math

import numpy as np
import pytest

from noisebench.leaderboard import stats
from noisebench.leaderboard.synthetic import board_scores

N_BOARDS = 2000
MC = 3 * math.sqrt(0.05 * 0.95 / N_BOARDS)  # 3 Monte Carlo SDs of a rate near 5% over 2000 boards: 1.5 points
MARGIN = 0.02


def holm_rows(p):
    """Holm step-down adjustment of each row of p at once (multipletests calls gc.collect() per call: too slow for
    thousands of boards); checked against statsmodels below."""
    k = p.shape[1]
    order = np.argsort(p, axis=1)
    ps = np.take_along_axis(p, order, axis=1)
    adj = np.minimum(1.0, np.maximum.accumulate(ps * (k - np.arange(k)), axis=1))
    out = np.empty_like(adj)
    np.put_along_axis(out, order, adj, axis=1)
    return out


def analyse(base, arms, alpha=0.05, margin=MARGIN):
    """The board's closed form on simulated boards: pooled s2 over baseline + arms, per-arm delta, CI, p, TOST."""
    all_arms = np.concatenate([base[:, None, :], arms], axis=1)  # (B, k + 1, R)
    s2p, dfp = stats.pooled_variance(all_arms.var(axis=2, ddof=1), np.full(all_arms.shape[1],
                                                                          all_arms.shape[2] - 1.0))
    d = arms.mean(axis=2) - base.mean(axis=1, keepdims=True)
    se = np.sqrt(s2p[:, None] * (1 / arms.shape[2] + 1 / base.shape[1]))
    lo, hi = stats.t_interval(d, se, dfp, 1 - alpha)
    return d, se, dfp, lo, hi, stats.diff_pvalue(d, se, dfp), stats.tost_pvalue(d, se, dfp, margin)


def test_pooled_ci_covers_the_true_delta_at_the_stated_level():
    """2000 boards, 8 arms + baseline, 6 seeds each, 1.2-point seed SD plus binomial noise on 1000 items."""
    deltas = np.array([0.0, -0.01, -0.02, -0.05, 0.0, 0.01, -0.1, 0.0])
    base, arms = board_scores(N_BOARDS, deltas, 6, 0.012, 1000, np.random.default_rng(0))
    d, se, dfp, lo, hi, _, _ = analyse(base, arms)
    assert dfp == 45  # 9 arms x (6 - 1): the pooled df
    covered = (lo <= deltas) & (deltas <= hi)
    assert 0.93 <= covered[:, 0].mean() <= 0.97, covered[:, 0].mean()  # one comparison over 2000 boards
    assert 0.94 <= covered.mean() <= 0.96, covered.mean()  # all eight (binomial SD 0.2 points)


def test_equivalence_error_rates_at_the_design_power():
    """True delta 0: `equivalent` at least 80% of the time (the design has ~92% TOST power at a 2-point margin);
    true delta = the margin: `equivalent` at most alpha + MC error (TOST's size), on either side."""
    rng = np.random.default_rng(1)
    seeds, sd, n_items = 6, 0.006, 4000  # run-to-run SD about 1.0 point with the items' binomial noise
    base, arms = board_scores(N_BOARDS, [0.0, -MARGIN, MARGIN], seeds, sd, n_items, rng)
    d, se, dfp, lo, hi, p, p_tost = analyse(base, arms)
    holm = holm_rows(p)
    assert all(np.allclose(holm[i], stats.holm(p[i])) for i in range(5))
    verdicts = stats.classify(d, holm, p_tost)
    assert (verdicts[:, 0] == "equivalent").mean() >= 0.80, (verdicts[:, 0] == "equivalent").mean()
    assert (verdicts[:, 0] == "degraded").mean() + (verdicts[:, 0] == "improved").mean() <= 0.05 + MC
    for k in (1, 2):
        assert (verdicts[:, k] == "equivalent").mean() <= 0.05 + MC, k
    # TOST is the 90% CI inside the margin: the same decision.
    lo90, hi90 = stats.t_interval(d, se, dfp, 0.90)
    assert np.array_equal(p_tost < 0.05, (lo90 > -MARGIN) & (hi90 < MARGIN))


def test_holm_keeps_the_boards_familywise_error_at_alpha():
    """15 arms with no effect (the size of the planned sweep): some row flagged on about 40% of boards without the
    correction, on at most alpha + MC error with Holm."""
    base, arms = board_scores(N_BOARDS, np.zeros(15), 6, 0.0124, 1000, np.random.default_rng(6))
    d, se, dfp, lo, hi, p, p_tost = analyse(base, arms)
    raw = (p < 0.05).any(axis=1).mean()
    flagged = np.isin(stats.classify(d, holm_rows(p), p_tost), ["degraded", "improved"]).any(axis=1).mean()
    assert raw >= 0.3 and flagged <= 0.05 + MC, (raw, flagged)


def test_mde_is_the_effect_found_with_80_percent_power():
    rng = np.random.default_rng(2)
    probe_base, probe = board_scores(400, [0.0], 6, 0.012, 1000, rng)
    _, se, dfp, *_ = analyse(probe_base, probe)
    effect = -float(np.median(stats.mde(se[:, 0], dfp)))  # about 2.1 points at this design
    base, arms = board_scores(N_BOARDS, [effect], 6, 0.012, 1000, rng)
    d, _, _, _, _, p, _ = analyse(base, arms)
    power = ((p[:, 0] < 0.05) & (d[:, 0] < 0)).mean()
    assert 0.76 <= power <= 0.84, (effect, power)


def test_items_only_intervals_are_overconfident_with_seed_variance():
    """Why single-seed pairs get no verdict: a binomial-over-items CI ignores the seed variance and flags null arms.

    Seed variance 1.17 pt^2 against 0.6 pt^2 of item noise, about the proportions measured on tiny_arith.
    """
    rng = np.random.default_rng(3)
    base, arms = board_scores(N_BOARDS, [0.0], 1, 0.0108, 4000, rng)
    d = arms[:, 0, 0] - base[:, 0]
    se_items = np.sqrt((arms[:, 0, 0] * (1 - arms[:, 0, 0]) + base[:, 0] * (1 - base[:, 0])) / 4000)
    fpr = (np.abs(d) > 1.96 * se_items).mean()
    assert fpr >= 0.17, fpr


def test_pool_and_compare_match_the_closed_form_and_statsmodels_ols():
    """The pooled CI is the one-way ANOVA contrast: statsmodels OLS with arm dummies gives the same interval."""
    sm = pytest.importorskip("statsmodels.formula.api")
    import pandas as pd

    rng = np.random.default_rng(4)
    values = {"base": 0.5 + 0.01 * rng.standard_normal(6), "a": 0.47 + 0.01 * rng.standard_normal(6),
              "b": 0.51 + 0.01 * rng.standard_normal(6), "c": 0.5 + 0.01 * rng.standard_normal(4)}
    pool = stats.pool_arms(values)
    assert pool.df == 5 + 5 + 5 + 3 and not pool.outlying
    cmp = stats.compare(values["a"], values["base"], pool, "a", "base", MARGIN)
    df = pd.DataFrame([(k, v) for k, vs in values.items() for v in vs], columns=["arm", "y"])
    fit = sm.ols("y ~ C(arm, Treatment('base'))", df).fit()
    name = "C(arm, Treatment('base'))[T.a]"
    lo, hi = fit.conf_int().loc[name]
    assert (cmp.delta, cmp.lo, cmp.hi, cmp.p) == pytest.approx((fit.params[name], lo, hi, fit.pvalues[name]),
                                                                rel=1e-9)
    assert cmp.df == fit.df_resid and cmp.method == "pooled"


def test_outlying_arm_leaves_the_pool_and_gets_welch():
    rng = np.random.default_rng(5)
    values = {k: 0.5 + 0.01 * rng.standard_normal(6) for k in ("base", "a", "b", "c", "d")}
    values["wild"] = 0.5 + 0.12 * rng.standard_normal(6)  # a seed SD 12x the others
    pool = stats.pool_arms(values)
    assert list(pool.outlying) == ["wild"] and pool.df == 25 and pool.levene_p < 0.05 and pool.cochran_c > 0.9
    cmp = stats.compare(values["wild"], values["base"], pool, "wild", "base", MARGIN)
    assert cmp.method == "Welch" and 5 <= cmp.df < 7  # dominated by the arm's own 5 df
    tame = stats.compare(values["a"], values["base"], pool, "a", "base", MARGIN)
    assert tame.method == "pooled" and tame.df == 25


def test_holm_adjusts_across_the_board():
    from statsmodels.stats.multitest import multipletests

    p = np.array([0.01, 0.04, 0.30, np.nan, 0.002])
    adj = stats.holm(p)
    assert np.isnan(adj[3])
    assert adj[[0, 1, 2, 4]] == pytest.approx(multipletests(p[[0, 1, 2, 4]], method="holm")[1])
    assert p[1] < 0.05 <= adj[1]  # significant alone, not after correction


def test_single_run_arm_has_no_verdict_and_edge_cases():
    values = {"base": np.array([0.5, 0.51, 0.49]), "one": np.array([0.3])}
    pool = stats.pool_arms(values)
    cmp = stats.compare(values["one"], values["base"], pool, "one", "base", MARGIN)
    assert not cmp.enough_seeds and cmp.delta == pytest.approx(-0.2)
    assert stats.compare(np.array([]), values["base"], pool, "x", "base", MARGIN) is None
    flat = stats.pool_arms({"base": np.full(3, 0.5), "a": np.full(3, 0.5)})  # no spread at all
    cmp = stats.compare(np.full(3, 0.5), np.full(3, 0.5), flat, "a", "base", MARGIN)
    assert cmp.p == 1.0 and cmp.p_tost == 0.0
    assert list(stats.classify([-0.1, 0.1, 0.0, 0.0], [0.01, 0.01, 0.5, 0.5], [0.9, 0.9, 0.01, 0.2])) == [
        "degraded", "improved", "equivalent", "inconclusive"]


def test_paired_bootstrap_matches_index_resampling():
    rng = np.random.default_rng(9)
    a, b = (rng.random(300) < 0.6).astype(int), (rng.random(300) < 0.5).astype(int)
    est, lo, hi = stats.paired_bootstrap(a, b, 4000, rng=np.random.default_rng(1))
    idx = np.random.default_rng(2).integers(0, 300, (4000, 300))
    slow = np.quantile((a - b)[idx].mean(1), [0.025, 0.975])
    assert lo == pytest.approx(slow[0], abs=0.01) and hi == pytest.approx(slow[1], abs=0.01)
    assert est == pytest.approx((a - b).mean())
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_bootstrap(a, b[:10])


def test_pool_leaves_out_every_wide_arm_and_few_homogeneous_ones():
    """15 arms of SD 0.6 and 5 arms of SD 3 (collapsed arms spread more across seeds), 6 seeds each: the one-at-a-time
    removal leaves out all five wide arms on 89% of boards (1000 boards; one pass over all arms: 0%, each wide arm
    tested against a pool the other four inflate), a homogeneous arm 0.04 times per board; with 20 homogeneous arms
    any arm is left out on 4.9% of boards (nominal 5%)."""
    from noisebench.leaderboard.stats import pool_arms

    rng = np.random.default_rng(0)
    wide_found, narrow_out = [], 0
    for _ in range(300):
        values = {f"n{i}": rng.normal(0, 0.6, 6) for i in range(15)}
        values.update({f"w{i}": rng.normal(0, 3.0, 6) for i in range(5)})
        pool = pool_arms(values)
        wide_found.append(sum(k.startswith("w") for k in pool.outlying))
        narrow_out += sum(k.startswith("n") for k in pool.outlying)
    assert np.mean(np.array(wide_found) == 5) > 0.8
    assert np.mean(wide_found) > 4.7
    assert narrow_out / 300 < 0.08
    homogeneous = [len(pool_arms({f"n{i}": rng.normal(0, 0.6, 6) for i in range(20)}).outlying) for _ in range(300)]
    assert np.mean(np.array(homogeneous) > 0) < 0.09        # 300 boards: 0.05 + 3 MC standard errors
