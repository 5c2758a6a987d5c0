"""Runs -> one row per arm, compared with the baseline of its own training setting (pooled seed variance, Holm, TOST).

Rows are compared only within a training setting (``record.setting_fingerprint``): a smoke run with fewer steps or an
``eval.limit`` forms its own section and never mixes into a sweep's pool. A setting without a clean baseline gets no
deltas: its rows say which keys differ from the main setting, whose baseline they cannot be held against.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import stats
from .metrics import setting_diff
from .table import BASELINE, BF16_RMS, FP8_RMS

#: Compared metrics: row key -> run column. clean/auc = training harm, noisy = deployment harm, flex = last number.
METRICS = {"clean": "final_clean", "auc": "auc_clean", "noisy": "final_acc", "flex": "final_clean_flex"}
VERDICT_METRICS = ("clean", "auc", "noisy")  # each gets its own Holm family and verdict column
DEFAULT_MARGIN_PTS = 2.0


@dataclass
class Section:
    """One training setting of a testbed: its rows, pools and how it differs from the main setting."""

    fingerprint: str
    main: bool
    exps: pd.DataFrame
    pools: dict = field(default_factory=dict)  # metric -> stats.Pool
    diff: str = ""  # keys that differ from the main setting (empty for the main one)
    has_baseline: bool = False
    notes: list = field(default_factory=list)


def main_setting(runs: pd.DataFrame) -> str | None:
    """The setting with the most clean baseline runs (then most runs): the sweep, not a smoke test."""
    done = runs[runs.status.isin(["ok", "diverged"]) & ~runs.duplicate]
    if done.empty:
        return None
    score = done.groupby("setting").agg(base=("baseline_eligible", "sum"), n=("run_id", "size"))
    return str(score.sort_values(["base", "n"], ascending=False, kind="stable").index[0])


def sections(runs: pd.DataFrame, n_boot: int = 2000, seed: int = 0, alpha: float = stats.ALPHA,
             margin_pts: float = DEFAULT_MARGIN_PTS) -> list[Section]:
    """Every training setting of one testbed's runs as a section, the main setting first."""
    main = main_setting(runs)
    if main is None:
        return []
    done = runs[runs.status.isin(["ok", "diverged"]) & ~runs.duplicate]
    main_dict = done[done.setting == main].setting_dict.iloc[0]
    out = []
    for fp in [main] + sorted(set(done.setting) - {main}):
        g = done[done.setting == fp]
        diff = "" if fp == main else setting_diff(main_dict, g.setting_dict.iloc[0])
        out.append(_section(g, fp, fp == main, diff, n_boot, seed, alpha, margin_pts))
    return out


def _section(done: pd.DataFrame, fp: str, main: bool, diff: str, n_boot: int, seed: int, alpha: float,
             margin_pts: float) -> Section:
    base_group = json.dumps([fp, BASELINE])
    base = done[(done.group == base_group) & (done.status == "ok")]
    sec = Section(fp, main, pd.DataFrame(), diff=diff, has_baseline=not base.empty)
    ok = done[done.status == "ok"]
    for m, col in METRICS.items():
        sec.pools[m] = stats.pool_arms({k: g[col].to_numpy(float) for k, g in ok.groupby("group")}, alpha)
    rows = [_arm_row(g, grp, grp == base_group, base, sec, n_boot, seed, alpha, margin_pts)
            for grp, g in done.groupby("group", sort=True)]
    exps = pd.DataFrame(rows)
    if not sec.has_baseline:
        why = f"differs from the main setting in {diff}" if diff else "no clean `baseline` run in this setting"
        for m in VERDICT_METRICS:
            exps[f"verdict_{m}"] = "refused"
        exps["note"] = [f"no baseline here: {why}"] * len(exps)
    else:
        for m in VERDICT_METRICS:
            eligible = exps.n_diverged.eq(0) & exps[f"enough_{m}"] & ~exps.is_baseline
            exps[f"p_holm_{m}"] = stats.holm(exps[f"p_{m}"].where(eligible))
            exps[f"verdict_{m}"] = [_verdict(r, m, alpha) for r in exps.itertuples()]
        exps["note"] = [_note(r, sec, alpha) for r in exps.itertuples()]
    sec.exps = _rank(exps)
    return sec


def _arm_row(g: pd.DataFrame, group: str, is_base: bool, base: pd.DataFrame, sec: Section, n_boot: int, seed: int,
             alpha: float, margin_pts: float) -> dict:
    first = g.iloc[0]
    ok = g[g.status == "ok"]
    row = {"experiment": BASELINE if is_base else first.experiment, "group": group, "setting": sec.fingerprint,
           "is_baseline": is_base, "pooled_names": ",".join(sorted(set(g.experiment))), "noise": first.noise,
           "noise_type": first.noise_type, "scale": first.scale, "rel_rms": first.rel_rms,
           "x_bf16": first.rel_rms / BF16_RMS, "x_fp8": first.rel_rms / FP8_RMS, "ops": first.ops,
           "phases": first.phases, "aqn": first.aqn, "n_seeds": len(g), "n_ok": len(ok),
           "seeds": ",".join(str(s) for s in sorted(g.seed)), "n_diverged": int((g.status == "diverged").sum()),
           "noisy_flex": ok.final_flex.mean(), "reward_last": ok.reward_last.mean(), "k3": ok.k3.mean(),
           "steps_min": g.steps.min(), "steps_max": g.steps.max(), "wall_time_s": g.wall_time_s.mean(),
           "unshared_seeds": ",".join(str(s) for s in sorted(set(g.seed) - set(base.seed))) if not is_base else "",
           "mitigation": "none" if is_base else first.mitigation, "untreated": BASELINE if is_base else first.untreated,
           "rollout_corr": _mean_dicts(ok.rollout_corr)}
    for m, col in METRICS.items():
        vals = ok[col].to_numpy(float)
        row[m] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
        cmp = None
        if sec.has_baseline and not is_base:
            cmp = stats.compare(vals, base[col].to_numpy(float), sec.pools[m], group, json.dumps([sec.fingerprint,
                                BASELINE]), margin_pts / 100, alpha)
        row.update({f"d_{m}": cmp.delta if cmp else math.nan, f"d_{m}_lo": cmp.lo if cmp else math.nan,
                    f"d_{m}_hi": cmp.hi if cmp else math.nan, f"p_{m}": cmp.p if cmp else math.nan,
                    f"p_tost_{m}": cmp.p_tost if cmp else math.nan, f"mde_{m}": cmp.mde if cmp else math.nan,
                    f"method_{m}": cmp.method if cmp else "", f"df_{m}": cmp.df if cmp else math.nan,
                    f"enough_{m}": bool(cmp and cmp.enough_seeds)})
    if (sec.has_baseline and not is_base and len(ok) == 1 and len(base) == 1 and not sec.pools["noisy"].df > 0
            and ok.per_item.iloc[0] is not None and base.per_item.iloc[0] is not None
            and len(ok.per_item.iloc[0]) == len(base.per_item.iloc[0])):
        rng = np.random.default_rng([seed, zlib.crc32(group.encode())])  # adding a row never moves another's CI
        _, lo, hi = stats.paired_bootstrap(ok.per_item.iloc[0], base.per_item.iloc[0], n_boot, alpha, rng)
        row.update(d_noisy_lo=lo, d_noisy_hi=hi, method_noisy="items only")
    return row


def _mean_dicts(dicts) -> dict:
    """Per key, the mean over the seeds that logged it (``rollout_corr/*``: runs made before it have none)."""
    keys = sorted({k for d in dicts if isinstance(d, dict) for k in d})
    out = {}
    for k in keys:
        vals = np.array([d[k] for d in dicts if isinstance(d, dict) and k in d], float)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan
    return out


def _verdict(r, m: str, alpha: float) -> str:
    if r.is_baseline:
        return "baseline"
    if r.n_diverged:
        return "diverged"
    if math.isnan(getattr(r, f"d_{m}")):
        return "n/a"
    if not getattr(r, f"enough_{m}"):
        return "too few seeds"
    return str(stats.classify(getattr(r, f"d_{m}"), getattr(r, f"p_holm_{m}"), getattr(r, f"p_tost_{m}"), alpha))


def _note(r, sec: Section, alpha: float) -> str:
    """What a reader must know about this row's statistics, said on the row."""
    notes = []
    if r.is_baseline and "," in r.pooled_names:
        notes.append(f"pools {r.pooled_names.replace(',', ', ')}")
    outl = sorted({m for m, p in sec.pools.items() if m in VERDICT_METRICS and r.group in p.outlying})
    if outl:
        notes.append("Welch: seed variance outlying (" + ", ".join(outl) + ")")
    for m in VERDICT_METRICS:
        if not r.is_baseline and getattr(r, f"p_{m}") < alpha <= getattr(r, f"p_holm_{m}"):
            notes.append(f"{m}: p {getattr(r, f'p_{m}'):.3f} alone, {getattr(r, f'p_holm_{m}'):.3f} after Holm")
    if r.unshared_seeds and sec.has_baseline:
        notes.append(f"seeds {r.unshared_seeds} not in the baseline")
    if getattr(r, "method_noisy", "") == "items only":
        notes.append("single-seed pair: CI over items only")
    return "; ".join(notes)


def primary_metric(exps: pd.DataFrame) -> str:
    """clean (training harm) when some row has a clean delta, else noisy (records made without clean evaluation)."""
    return "clean" if "d_clean" in exps and exps.d_clean.notna().any() else "noisy"


def _rank(exps: pd.DataFrame) -> pd.DataFrame:
    """Sort by the primary delta; rank numbers only on the baseline and rows that differ from it."""
    if exps.empty:
        return exps
    m = primary_metric(exps)
    exps["sort_delta"] = np.where(exps.is_baseline, 0.0, exps[f"d_{m}"])
    exps = exps.sort_values(["sort_delta", "experiment", "group"], ascending=[False, True, True], na_position="last",
                            kind="stable").drop(columns="sort_delta").reset_index(drop=True)
    ranked = exps.is_baseline | exps[f"verdict_{m}"].isin(["degraded", "improved"])
    exps.insert(0, "rank", [str(k) if r else "—" for k, r in zip(ranked.cumsum(), ranked)])
    return exps


def thresholds(sec: Section) -> pd.DataFrame:
    """Per noise setting swept over >= 2 scales: the smallest scale whose training (and deployment) harm is shown."""
    exps = sec.exps
    if exps.empty or not sec.has_baseline:
        return pd.DataFrame()
    sw = exps[~exps.is_baseline & exps.scale.notna() & (exps.noise_type != "none")]
    rows = []
    for (noise, ops, phases, aqn), g in sw.groupby(["noise", "ops", "phases", "aqn"], sort=True):
        if g.scale.nunique() < 2:
            continue
        g = g.sort_values("scale")
        row = {"noise": noise, "ops": ops, "phases": phases,
               "scales": ", ".join(f"{s:.0e}" for s in sorted(g.scale.unique()))}
        for m in VERDICT_METRICS:
            bad = g[g[f"verdict_{m}"].isin(["degraded", "diverged"])]
            first = bad.iloc[0] if not bad.empty else None
            row.update({f"th_{m}": first.scale if first is not None else math.nan,
                        f"th_{m}_x_bf16": first.rel_rms / BF16_RMS if first is not None else math.nan,
                        f"th_{m}_d": first[f"d_{m}"] if first is not None else math.nan,
                        f"th_{m}_lo": first[f"d_{m}_lo"] if first is not None else math.nan,
                        f"th_{m}_hi": first[f"d_{m}_hi"] if first is not None else math.nan,
                        f"th_{m}_tested": g[f"d_{m}"].notna().any(),
                        f"th_{m}_mde": g[f"mde_{m}"].max()})
        rows.append(row)
    return pd.DataFrame(rows)
