"""Noise x mitigation: does a fix against the rollout/training mismatch make a harmful arm harmless?

Rows are noisy arms (an untreated experiment: a noise preset, a chip, or the clean baseline itself), columns the
fixes the records hold for the section (``none`` first). A cell is a row of the ranking: its Δ clean [95% CI] and
training verdict are the ranking's own (same pooled seed variance, same Holm family: the ranking's rows), so an arm
never reads differently in two places of one board.

A rescue needs two things: the verdicts flip (untreated degraded, treated equivalent or improved) and the fix itself
measurably helps: its gain, treated minus untreated over the seeds both ran (same warm start and data order, so
paired), Student t on n - 1 df, Holm-adjusted across this section's gains (their own family), is significantly above 0.
A flip alone is no evidence: an arm whose true harm lies just inside the margin is called degraded in one arm and
equivalent in its untreated twin by chance, with a fix that does nothing (tests/test_leaderboard_mitigations.py
measures how often). The untreated arm diverged: a treated arm that finishes and is equivalent is a rescue by itself.
A significant gain that leaves the arm still degraded (or inconclusive) is a partial rescue, said as such: the fix
works, the chip is still not harmless.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from . import stats
from .board import Section

NONE = "none"
BAD = ("degraded", "diverged")
GOOD = ("equivalent", "improved")
NO_VERDICT = ("n/a", "too few seeds", "refused", "")
#: rollout_corr metrics shown per cell (verl's names without the prefix), in this order.
MISMATCH_KEYS = ("k3_kl", "rollout_is_eff_sample_size")
SHARE_KEYS = ("rollout_is_truncated_fraction", "rollout_rs_masked_fraction")


def paired_gain(treated: dict, untreated: dict, alpha: float = stats.ALPHA) -> tuple[float, float, float, float, int]:
    """(gain, lo, hi, p, n): mean of treated - untreated over the seeds both have a finite score for, its (1 - alpha)
    Student-t CI on n - 1 df and two-sided p; NaNs with fewer than 2 shared seeds."""
    seeds = sorted(s for s in set(treated) & set(untreated)
                   if math.isfinite(treated[s]) and math.isfinite(untreated[s]))
    n = len(seeds)
    if n < 2:
        return math.nan, math.nan, math.nan, math.nan, n
    d = np.array([treated[s] - untreated[s] for s in seeds])
    se = float(d.std(ddof=1) / math.sqrt(n))
    lo, hi = stats.t_interval(d.mean(), se, n - 1, 1 - alpha)
    return float(d.mean()), float(lo), float(hi), float(stats.diff_pvalue(d.mean(), se, n - 1)), n


def rescue(untreated: str, treated: str, gain: float, p_gain: float, alpha: float = stats.ALPHA) -> str:
    """The rescue verdict of one fix on one arm from the two training verdicts and the fix's Holm-adjusted gain."""
    untreated = "equivalent" if untreated == "baseline" else untreated  # the clean arm: a fix can only be not needed
    if untreated in NO_VERDICT or treated in NO_VERDICT:
        return "n/a"
    significant = p_gain < alpha  # False for NaN
    if untreated in BAD:
        if treated in GOOD:
            if untreated == "diverged" or (significant and gain > 0):
                return "rescued"
            return "not rescued (verdict flips, gain not significant)"
        if significant and gain < 0:   # already harmed, and the fix harms it further
            return "made worse"
        if significant and gain > 0:   # the fix helps measurably, yet the arm stays worse than the baseline
            return f"partly rescued (still {treated})"
        return f"not rescued (still {treated})" if treated in BAD else f"not rescued ({treated})"
    if treated in BAD:
        if treated == "diverged" or (significant and gain < 0):
            return "made worse"
        return "not needed (treated degraded, loss not significant)"
    return "not needed" + (" (untreated inconclusive)" if untreated == "inconclusive" else "")


def _per_seed(runs: pd.DataFrame, group: str, col: str = "final_clean") -> dict:
    ok = runs[(runs.group == group) & (runs.status == "ok") & ~runs.duplicate]
    return {int(s): float(np.nanmean(g[col].to_numpy(float))) if g[col].notna().any() else math.nan
            for s, g in ok.groupby("seed")}


def matrix(sec: Section, runs: pd.DataFrame, alpha: float = stats.ALPHA) -> pd.DataFrame:
    """One row per (noisy arm, fix) cell of the section, ``none`` included; empty when no run of the section has a
    fix (or the section has no baseline: no verdicts to hold against each other)."""
    exps = sec.exps
    if exps.empty or not sec.has_baseline or not (exps.mitigation != NONE).any():
        return pd.DataFrame()
    untreated = exps[exps.mitigation == NONE]
    treated = exps[exps.mitigation != NONE]
    order = {g: k for k, g in enumerate(exps.group)}
    cells = []
    for r in treated.itertuples():
        twin = untreated[(untreated.experiment == r.untreated)
                         & (untreated.is_baseline | ((untreated.noise == r.noise) & (untreated.ops == r.ops)
                                                     & (untreated.phases == r.phases)))]
        u = twin.iloc[0] if not twin.empty else None
        arm_group = u.group if u is not None else f"(no untreated {r.untreated})"
        gain = paired_gain(_per_seed(runs, r.group), _per_seed(runs, u.group)) if u is not None else (
            math.nan, math.nan, math.nan, math.nan, 0)
        cells.append({"arm": r.untreated, "arm_group": arm_group, "mitigation": r.mitigation, "row": r._asdict(),
                      "untreated_verdict": u.verdict_clean if u is not None else "n/a",
                      "gain": gain[0], "gain_lo": gain[1], "gain_hi": gain[2], "p_gain": gain[3], "n_pairs": gain[4],
                      "order": order[u.group] if u is not None else len(order) + order[r.group]})
    for g in {c["arm_group"] for c in cells}:
        hit = untreated[untreated.group == g]
        if not hit.empty:
            cells.append({"arm": hit.experiment.iloc[0], "arm_group": g, "mitigation": NONE,
                          "row": next(hit.itertuples())._asdict(), "untreated_verdict": hit.verdict_clean.iloc[0],
                          "gain": math.nan, "gain_lo": math.nan, "gain_hi": math.nan, "p_gain": math.nan,
                          "n_pairs": 0, "order": order[g]})
    out = pd.DataFrame(cells)
    out["p_gain_holm"] = stats.holm(out.p_gain.where(out.mitigation != NONE), alpha)
    out["rescue"] = [rescue(c.untreated_verdict, c.row["verdict_clean"], c.gain, c.p_gain_holm, alpha)
                     if c.mitigation != NONE else "" for c in out.itertuples()]
    out["is_none"] = out.mitigation != NONE
    out = out.sort_values(["order", "arm_group", "is_none", "mitigation"], kind="stable").drop(columns="is_none")
    return out.reset_index(drop=True)
