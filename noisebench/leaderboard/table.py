"""Records -> pandas: one row per run with its noise setting, training setting and headline numbers."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from .metrics import num, run_metrics, run_setting

# Relative error RMS of rounding to a format (round-to-nearest-even, 10M standard-normal values; shared/notes/field.md).
ROUND_RMS = {"bf16": 1.66e-3, "fp16": 2.1e-4, "fp8_e4m3": 2.7e-2, "fp8_e5m2": 5.3e-2}
BF16_RMS, FP8_RMS = ROUND_RMS["bf16"], ROUND_RMS["fp8_e4m3"]
RELATIVE_TYPES = ("relative_gaussian", "systematic_bias")  # scale = relative error RMS, comparable to rounding
CLEAN_TYPES = (None, "none", "off")
BASELINE = "baseline"
TREATMENT_EXTRA = ("mitigation", "chip")  # config groups that treat a run besides noise and AQN (record.TREATMENT_KEYS)


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
    scale = math.nan if clean or ntype == "round" else num(noise.get("scale"))
    if ntype in RELATIVE_TYPES:
        rel_rms = abs(scale)
    elif ntype == "round" and noise.get("rounding", "nearest") == "nearest":
        rel_rms = ROUND_RMS.get(noise.get("round_format"), math.nan)
    else:
        rel_rms = math.nan
    aqn = rec.get("aqn") or {}
    aqn_on = bool(aqn.get("enabled")) if isinstance(aqn, dict) else bool(aqn)
    ops = "" if clean else ",".join(str(o) for o in (noise.get("ops") or []))
    if ops and set(map(str, noise.get("ops") or [])) & ATTN_SETS and not _attention_noised(rec):
        ops += " (no attn products)"  # the engine that made the record did not reach inside SDPA
    phases = "" if clean else ",".join(str(p) for p in (noise.get("phases") or []))
    if aqn_on:
        label = ("" if clean else label + " + ") + f"aqn({aqn.get('sigma_start')}->{aqn.get('sigma_end')})"
    chip = (rec.get("config") or {}).get("chip")
    if isinstance(chip, dict) and chip:
        chip_rms = chip_error(rec)
        tag = f"chip {chip.get('name', '?')}" + ("" if math.isnan(chip_rms) else f" ({chip_rms / BF16_RMS:.2g}× bf16)")
        label = tag if label == "none" else f"{label} + {tag}"
        if math.isnan(rel_rms):  # the noise has no relative scale of its own: the row's scale is the chip's
            rel_rms = chip_rms
        if clean:  # where the chip acts, when no noise names its own ops and phases
            ops = ",".join(str(o) for o in chip.get("ops") or ["linear", "matmul", "bmm"])
            phases = ",".join(str(p) for p in chip.get("phases") or ["all"])
    return {"noise": label, "noise_type": "none" if clean else str(ntype), "scale": scale, "rel_rms": rel_rms,
            "ops": ops, "phases": phases, "aqn": aqn_on, "clean": clean and not aqn_on}


def chip_error(rec: dict) -> float:
    """Relative RMS error of the record's chip profile on the reference GEMM (``noise.chip_scale``), K the testbed's
    hidden size when its config names one; NaN when the profile cannot be read. Imported here, not at the top: it
    loads torch, which a board without chip records never needs."""
    cfg = rec.get("config") or {}
    k = ((cfg.get("testbed") or {}).get("model") or {}).get("hidden_size")
    try:
        from noisebench.noise.chip_scale import chip_rel_rms

        return chip_rel_rms(cfg["chip"], k if isinstance(k, int) else None)
    except (ValueError, TypeError, KeyError):
        return math.nan


#: Op sets that cover attention's QK^T and PV (through SDPA's decomposition; eager attention calls matmul itself).
ATTN_SETS = {"matmul", "matmul_family", "extended"}


def _attention_noised(rec: dict) -> bool:
    """Whether the run's telemetry shows attention products noised (records of engines before the decomposition
    name ``matmul_family`` but show none)."""
    tel = rec.get("telemetry") or {}
    return any("/attn_qk/" in k or "/matmul/" in k for k in tel)


def _treated(rec: dict) -> bool:
    """A mitigation or chip preset is a treatment even with noise off: such a run never pools into the baseline."""
    cfg = rec.get("config") or {}
    for key in TREATMENT_EXTRA:
        v = cfg.get(key)
        if v and not (isinstance(v, dict) and not v.get("enabled", True)) and v != "none":
            return True
    return False


def mitigation_fields(rec: dict, experiment: str) -> dict:
    """The run's fix (the record's ``mitigation.name``, ``none`` when off) and the experiment of its untreated twin:
    the run's experiment without its ``+<fix>`` (``noisebench.train.run_record.arm_name``)."""
    block = rec.get("mitigation") or {}
    cfg = (rec.get("config") or {}).get("mitigation") or {}
    on = bool(block.get("enabled", cfg.get("enabled", False))) if isinstance(block, dict) else False
    name = str(block.get("name") or "mitigated") if on else "none"
    untreated = experiment.replace(f"+{name}", "", 1) if on and f"+{name}" in experiment else experiment
    return {"mitigation": name, "untreated": untreated}


def runs_frame(records: list[dict]) -> pd.DataFrame:
    """One row per run record, sorted; duplicates of (testbed, row group, seed) keep the latest finished.

    Every clean run (noise off, no AQN, no other treatment) of one training setting belongs to that setting's
    baseline group, whatever its experiment name; other runs group by setting, experiment and noise.
    """
    rows = []
    for rec in records:
        final = rec.get("final") or {}
        per_item = final.get("per_item")
        nf = noise_fields(rec)
        fp, st = run_setting(rec)
        rows.append({
            "testbed": str(rec.get("testbed")), "experiment": str(rec.get("experiment")), "seed": int(rec["seed"]),
            "status": rec.get("status"), "run_id": str(rec.get("run_id")), **nf,
            "baseline_eligible": nf["clean"] and not _treated(rec), "setting": fp, "setting_dict": st,
            **run_metrics(rec), "final_step": final.get("step"),
            "per_item": None if per_item is None else np.asarray(per_item, dtype=float),
            "steps": num(rec.get("steps")), "wall_time_s": num(rec.get("wall_time_s")),
            "finished_at": str(rec.get("finished_at") or ""), "error": rec.get("error"),
            "eval_task": rec.get("eval_task"), "path": rec.get("_path", ""),
            "overrides": tuple(rec.get("overrides") or ()),
            **mitigation_fields(rec, str(rec.get("experiment"))),
        })
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    df["group"] = [json.dumps([r.setting, BASELINE] if r.baseline_eligible else
                              [r.setting, r.experiment, r.noise, _key(r.scale), r.ops, r.phases])
                   for r in df.itertuples()]
    df = df.sort_values(["testbed", "group", "seed", "finished_at", "run_id"], kind="stable")
    finished = df.status.isin(["ok", "diverged"])
    df["duplicate"] = finished & df[finished].duplicated(["testbed", "group", "seed"], keep="last").reindex(
        df.index, fill_value=False)
    return df.reset_index(drop=True)


RUN_COLUMNS = ["testbed", "experiment", "seed", "status", "run_id", "noise", "noise_type", "scale", "rel_rms", "ops",
               "phases", "aqn", "clean", "baseline_eligible", "setting", "setting_dict", "final_acc", "final_flex",
               "final_clean", "final_clean_flex", "auc_clean", "curve", "curve_clean", "reward_last", "k3",
               "rollout_corr", "final_step", "per_item", "steps", "wall_time_s", "finished_at", "error", "eval_task",
               "path", "overrides", "mitigation", "untreated"]


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
