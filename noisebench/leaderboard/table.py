"""Records -> pandas: one row per run, then one row per experiment with its statistics against the baseline."""
from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pandas as pd

from . import stats

# Relative error RMS of rounding to a format (round-to-nearest-even, 10M standard-normal values; shared/notes/field.md).
ROUND_RMS = {"bf16": 1.66e-3, "fp16": 2.1e-4, "fp8_e4m3": 2.7e-2, "fp8_e5m2": 5.3e-2}
BF16_RMS, FP8_RMS = ROUND_RMS["bf16"], ROUND_RMS["fp8_e4m3"]
RELATIVE_TYPES = ("relative_gaussian", "systematic_bias")  # scale = relative error RMS, comparable to rounding
CLEAN_TYPES = (None, "none", "off")
BASELINE = "baseline"


def _num(x) -> float:
    """A float, NaN for None or non-numbers (records write NaN/inf as null)."""
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def noise_fields(rec: dict) -> dict:
    """Normalise the record's noise spec + AQN into display fields and a grouping key."""
    noise = rec.get("noise") or {}
    ntype = noise.get("type")
    clean = ntype in CLEAN_TYPES
    label = "none" if clean else str(ntype)
    if ntype == "round":
        label += f"({noise.get('round_format', '?')}{', stochastic' if noise.get('rounding') == 'stochastic' else ''})"
    elif ntype == "bitflip":
        label += f"({noise.get('bits', 'mantissa')})"
    elif ntype == "systematic_bias" and noise.get("per_channel"):
        label += "(per-channel)"
    scale = math.nan if clean or ntype == "round" else _num(noise.get("scale"))
    if ntype in RELATIVE_TYPES:
        rel_rms = abs(scale)
    elif ntype == "round" and noise.get("rounding", "nearest") == "nearest":
        rel_rms = ROUND_RMS.get(noise.get("round_format"), math.nan)
    else:
        rel_rms = math.nan
    aqn = rec.get("aqn") or {}
    aqn_on = bool(aqn.get("enabled")) if isinstance(aqn, dict) else bool(aqn)
    ops = "" if clean else ",".join(str(o) for o in (noise.get("ops") or []))
    phases = "" if clean else ",".join(str(p) for p in (noise.get("phases") or []))
    if aqn_on:
        label = ("" if clean else label + " + ") + f"aqn({aqn.get('sigma_start')}->{aqn.get('sigma_end')})"
    return {"noise": label, "noise_type": "none" if clean else str(ntype), "scale": scale, "rel_rms": rel_rms,
            "ops": ops, "phases": phases, "aqn": aqn_on, "clean": clean and not aqn_on}


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run record, sorted; duplicates of (testbed, experiment, noise, seed) keep the latest finished."""
    rows = []
    for rec in records:
        final = rec.get("final") or {}
        curve = [(int(c["step"]), _num(c.get("acc"))) for c in rec.get("curve") or [] if c.get("step") is not None]
        rewards = [_num(r.get("reward")) for r in rec.get("reward_curve") or []]
        per_item = final.get("per_item")
        nf = noise_fields(rec)
        rows.append({
            "testbed": str(rec.get("testbed")), "experiment": str(rec.get("experiment")), "seed": int(rec["seed"]),
            "status": rec.get("status"), "run_id": str(rec.get("run_id")), **nf,
            "final_acc": _num(final.get("acc")), "final_acc_clean": _num(final.get("acc_clean")),
            "final_step": final.get("step"),
            "per_item": None if per_item is None else np.asarray(per_item, dtype=float),
            "curve": sorted(curve), "final_reward": rewards[-1] if rewards else math.nan,
            "mean_kl": _num((rec.get("mismatch") or {}).get("mean_kl")),
            "steps": _num(rec.get("steps")), "wall_time_s": _num(rec.get("wall_time_s")),
            "finished_at": str(rec.get("finished_at") or ""), "error": rec.get("error"),
            "eval_task": rec.get("eval_task"), "path": rec.get("_path", ""),
            "overrides": tuple(rec.get("overrides") or ()),
        })
    cols = ["testbed", "experiment", "seed", "status", "run_id", "noise", "noise_type", "scale", "rel_rms", "ops",
            "phases", "aqn", "clean", "final_acc", "final_acc_clean", "final_step", "per_item", "curve",
            "final_reward", "mean_kl", "steps", "wall_time_s", "finished_at", "error", "eval_task", "path",
            "overrides"]
    df = pd.DataFrame(rows, columns=cols)
    df["group"] = df.apply(lambda r: json.dumps([r.experiment, r.noise, _key(r.scale), r.ops, r.phases]), axis=1)
    df = df.sort_values(["testbed", "group", "seed", "finished_at", "run_id"], kind="stable")
    finished = df.status.isin(["ok", "diverged"])
    df["duplicate"] = finished & df[finished].duplicated(["testbed", "group", "seed"], keep="last").reindex(
        df.index, fill_value=False)
    return df.reset_index(drop=True)


def sweep_commands(runs: pd.DataFrame) -> list[str]:
    """The ``noisebench`` command lines that made these runs, rebuilt from each record's Hydra overrides.

    Runs whose overrides differ only in ``+exp`` and ``seed`` fold into one multirun command
    (``noisebench -m +exp=a,b seed=0,1``), so the header names how to reproduce the board's runs.
    """
    groups: dict[tuple, tuple[set, set]] = {}
    for ov in runs.get("overrides", pd.Series(dtype=object)):
        if not ov:
            continue
        exps = {o.split("=", 1)[1] for o in ov if o.startswith("+exp=")}
        seeds = {o.split("=", 1)[1] for o in ov if o.startswith("seed=")}
        rest = tuple(sorted(o for o in ov if not o.startswith(("+exp=", "seed="))))
        e, s = groups.setdefault(rest, (set(), set()))
        e.update(exps)
        s.update(seeds)
    out = []
    for rest, (exps, seeds) in sorted(groups.items()):
        parts = ["noisebench"]
        if len(exps) > 1 or len(seeds) > 1:
            parts.append("-m")
        if exps:
            parts.append("+exp=" + ",".join(sorted(exps)))
        if seeds:
            parts.append("seed=" + ",".join(sorted(seeds, key=lambda x: (len(x), x))))
        out.append(" ".join(parts + list(rest)))
    return out


def _key(x: float):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def mean_curve(curves: list[list[tuple[int, float]]]) -> pd.DataFrame:
    """Seed curves -> DataFrame(step, mean, lo, hi, n): mean and min/max band over the seeds that reached a step."""
    long = pd.DataFrame([(s, a) for c in curves for s, a in c], columns=["step", "acc"]).dropna()
    if long.empty:
        return pd.DataFrame(columns=["step", "mean", "lo", "hi", "n"])
    g = long.groupby("step")["acc"]
    return pd.DataFrame({"mean": g.mean(), "lo": g.min(), "hi": g.max(), "n": g.size()}).reset_index()


def _matrix(vectors: list, n_items: int | None) -> np.ndarray | None:
    """Stack per-item vectors of the same length; None when missing or of another length than the baseline's."""
    vs = [v for v in vectors if v is not None]
    if not vs or len(vs) != len(vectors) or len({len(v) for v in vs}) != 1:
        return None
    if n_items is not None and len(vs[0]) != n_items:
        return None
    return np.vstack(vs)


def experiments_frame(runs: pd.DataFrame, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05):
    """One testbed's runs -> (experiments DataFrame ranked by delta, notes list).

    The baseline is the ``baseline`` experiment with noise off, all its seeds. Each experiment's delta CI uses an RNG
    seeded by (seed, CRC of the experiment's key), so adding an experiment never moves another row's numbers.
    """
    notes: list[str] = []
    done = runs[runs.status.isin(["ok", "diverged"]) & ~runs.duplicate]
    if runs.duplicate.any():
        notes.append(f"{int(runs.duplicate.sum())} duplicate record(s) of the same experiment and seed ignored "
                     "(the latest finished one is kept).")
    base_runs = done[(done.experiment == BASELINE) & done.clean & (done.status == "ok")]
    base_Y, n_items = None, None
    if base_runs.empty:
        notes.append("No baseline: no `baseline` experiment with noise off and status ok in this testbed, "
                     "so no deltas are given.")
    else:
        lengths = sorted({len(v) for v in base_runs.per_item if v is not None})
        n_items = lengths[0] if len(lengths) == 1 else None
        base_Y = _matrix(list(base_runs.per_item), n_items)
        if base_Y is None:
            notes.append(f"Baseline per-item vectors are missing or differ in length ({lengths}): no deltas.")
    rows = []
    for group, g in done.groupby("group", sort=True):
        first = g.iloc[0]
        ok = g[g.status == "ok"]
        n_div = int((g.status == "diverged").sum())
        Y = _matrix(list(ok.per_item), None) if not ok.empty else None
        acc = stats.accuracy_ci(Y, alpha) if Y is not None else None
        mc = mean_curve(list(ok.curve))
        best = mc.loc[mc["mean"].idxmax()] if not mc.empty and mc["mean"].notna().any() else None
        is_base = first.experiment == BASELINE and bool(first.clean)
        cmp = None
        if base_Y is not None and Y is not None and not is_base:
            if Y.shape[1] != base_Y.shape[1]:
                notes.append(f"`{first.experiment}`: per-item vectors have {Y.shape[1]} items, the baseline's "
                             f"{base_Y.shape[1]}: no delta.")
            else:
                rng = np.random.default_rng([seed, zlib.crc32(group.encode())])
                cmp = stats.compare(Y, base_Y, n_boot=n_boot, alpha=alpha, rng=rng)
        elif Y is None and not ok.empty:
            notes.append(f"`{first.experiment}`: some runs lack per-item vectors: no CI or delta.")
        d = cmp.delta if cmp else None
        rows.append({
            "experiment": first.experiment, "group": group, "is_baseline": is_base, "noise": first.noise,
            "noise_type": first.noise_type, "scale": first.scale, "rel_rms": first.rel_rms,
            "x_bf16": first.rel_rms / BF16_RMS, "x_fp8": first.rel_rms / FP8_RMS,
            "ops": first.ops, "phases": first.phases, "aqn": first.aqn,
            "n_seeds": len(g), "seeds": ",".join(str(s) for s in sorted(g.seed)), "n_diverged": n_div,
            "n_items": Y.shape[1] if Y is not None else math.nan,
            "acc": acc.estimate if acc else ok.final_acc.mean(), "acc_lo": acc.lo if acc else math.nan,
            "acc_hi": acc.hi if acc else math.nan, "acc_clean": ok.final_acc_clean.mean(),
            "best_acc": best["mean"] if best is not None else math.nan,
            "best_step": int(best["step"]) if best is not None else None,
            "delta": d.estimate if d else math.nan, "delta_lo": d.lo if d else math.nan,
            "delta_hi": d.hi if d else math.nan, "delta_method": d.method if d else "",
            "delta_df": d.df if d and d.df is not None else math.nan,
            "mcnemar_p": cmp.mcnemar_midp if cmp and cmp.mcnemar_midp is not None else math.nan,
            "verdict": "baseline" if is_base else stats.verdict(d.lo if d else None, d.hi if d else None, n_div > 0),
            "final_reward": ok.final_reward.mean(), "mean_kl": ok.mean_kl.mean(),
            "steps_min": g.steps.min(), "steps_max": g.steps.max(), "wall_time_s": g.wall_time_s.mean(),
        })
    df = pd.DataFrame(rows)
    if df.empty:
        return df, notes
    df["sort_delta"] = np.where(df.is_baseline, 0.0, df.delta)
    df = df.sort_values(["sort_delta", "experiment", "group"], ascending=[False, True, True], na_position="last",
                        kind="stable").drop(columns="sort_delta").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df, notes


def thresholds(exps: pd.DataFrame) -> pd.DataFrame:
    """Per noise type swept over >= 2 scales (same ops, phases, AQN): the smallest scale with delta CI below 0."""
    if exps.empty or "delta" not in exps:
        return pd.DataFrame()
    sw = exps[~exps.is_baseline & exps.scale.notna() & (exps.noise_type != "none")]
    rows = []
    for (noise, ops, phases, aqn), g in sw.groupby(["noise", "ops", "phases", "aqn"], sort=True):
        if g.scale.nunique() < 2:
            continue
        g = g.sort_values("scale")
        bad = g[(g.delta_hi < 0) | (g.verdict == "diverged")]
        first = bad.iloc[0] if not bad.empty else None
        rows.append({"noise": noise, "ops": ops, "phases": phases,
                     "scales": ", ".join(f"{s:.0e}" for s in sorted(g.scale.unique())),
                     "threshold": first.scale if first is not None else math.nan,
                     "x_bf16": first.rel_rms / BF16_RMS if first is not None else math.nan,
                     "untested": g.delta_hi.isna().all()})
    return pd.DataFrame(rows)
