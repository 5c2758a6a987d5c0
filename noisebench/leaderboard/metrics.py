"""One run's headline numbers from its record, and the training setting it ran in (what comparisons must share).

Two harms are kept apart. Training harm: the checkpoints scored with noise off (``acc_clean``; for a run whose
evaluation is clean anyway, its only score is the clean one): final accuracy and the area under the clean learning
curve, so slowed learning counts. Deployment harm: the same checkpoints scored under the eval phase's noise (``acc``).
"""
from __future__ import annotations

import math

import numpy as np

from noisebench.record import setting, setting_fingerprint

REWARD_WINDOW = 10  # steps averaged for the training reward: one step's batch mean is too noisy to compare
#: float32 evaluation of exp(r) - r - 1 resolves nothing below this (k3 of a clean run lands at about -1.5e-10).
K3_RESOLUTION = 1e-8
ROLLOUT_CORR = "rollout_corr/"  # verl's mismatch metrics, kept in the record's ``mismatch`` block under their names


def num(x) -> float:
    """A float, NaN for None or non-numbers (records write NaN/inf as null)."""
    try:
        return float(x) if x is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def eval_is_noisy(rec: dict, point: dict | None = None) -> bool:
    """Whether this checkpoint's ``acc`` was scored under noise (the record says so; older ones: from the spec)."""
    if point is not None and point.get("noisy_eval") is not None:
        return bool(point["noisy_eval"])
    noise = rec.get("noise") or {}
    if noise.get("type") in (None, "none", "off"):
        return False
    phases = noise.get("phases") or []
    return "eval" in phases or "all" in phases


def clean_value(rec: dict, point: dict | None, key: str = "acc") -> float:
    """Clean-evaluated score of a checkpoint: ``<key>_clean`` if scored, else ``<key>`` when the eval was clean."""
    if not point:
        return math.nan
    clean_key = "acc_clean" if key == "acc" else "acc_clean_flexible"
    if point.get(clean_key) is not None:
        return num(point[clean_key])
    return math.nan if eval_is_noisy(rec, point) else num(point.get(key))


def curve_auc(steps, values) -> float:
    """Area under a learning curve divided by its step span: the mean accuracy over training (NaN if incomplete)."""
    s, v = np.asarray(steps, float), np.asarray(values, float)
    if s.size < 2 or not np.isfinite(v).all() or s[-1] <= s[0]:
        return math.nan
    return float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(s)) / (s[-1] - s[0]))


def run_metrics(rec: dict) -> dict:
    """Headline numbers of one run (fractions): clean/noisy final strict and flex accuracy, clean AUC, reward, k3."""
    final = rec.get("final") or {}
    curve = sorted((c for c in rec.get("curve") or [] if c.get("step") is not None), key=lambda c: int(c["step"]))
    last = curve[-1] if curve else None
    final_point = {**(last or {}), **final} if final else None
    rewards = [num(r.get("reward")) for r in sorted(rec.get("reward_curve") or [], key=lambda r: r.get("step", 0))]
    tail = [r for r in rewards[-REWARD_WINDOW:] if math.isfinite(r)]
    clean_curve = [clean_value(rec, c) for c in curve]
    mm = rec.get("mismatch") or {}
    return {
        "final_acc": num(final.get("acc")), "final_flex": num(final.get("acc_flexible")),
        "final_clean": clean_value(rec, final_point), "final_clean_flex": clean_value(rec, final_point, "acc_flexible"),
        "auc_clean": curve_auc([int(c["step"]) for c in curve], clean_curve),
        "curve": [(int(c["step"]), num(c.get("acc"))) for c in curve],
        "curve_clean": [(int(c["step"]), v) for c, v in zip(curve, clean_curve)],
        "reward_last": float(np.mean(tail)) if tail else math.nan,
        "k3": num(mm.get("mean_k3_kl")),
        "rollout_corr": {k[len(ROLLOUT_CORR):]: num(v) for k, v in mm.items() if k.startswith(ROLLOUT_CORR)},
    }


def run_setting(rec: dict) -> tuple[str, dict]:
    """(fingerprint, setting dict) of a record, computed from its config (the stored fingerprint may predate a
    change of the formula; the config is the record's own)."""
    cfg = rec.get("config") or {}
    fp = setting_fingerprint(cfg)
    return str(fp), setting(cfg)


def _flat(d, prefix: str = "") -> dict:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def setting_diff(base: dict, other: dict, limit: int = 4) -> str:
    """Why two settings differ, for the board: ``trainer.max_steps 60 vs 5; eval.limit null vs 50`` (first few keys)."""
    a, b = _flat(base), _flat(other)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    show = [f"{k} {_show(a.get(k))} vs {_show(b.get(k))}" for k in keys[:limit]]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(show) + more if show else "no difference in the stored setting (fingerprints differ)"


def _show(v) -> str:
    if v is None:
        return "null"
    text = str(v)
    return text if len(text) <= 24 else text[:21] + "..."
