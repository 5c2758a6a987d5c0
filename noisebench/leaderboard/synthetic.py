"""Synthetic result records with known true effects: for the leaderboard's tests and for demo boards."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from noisebench.record import setting_fingerprint, write_record


def item_difficulty(n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Per-item success probabilities of the baseline, spread over [0.2, 0.8] (mean 0.5)."""
    return rng.uniform(0.2, 0.8, n_items)


def arm_matrix(p: np.ndarray, n_seeds: int, effect: float, rng: np.random.Generator, seed_sd: float = 0.0,
               item_sd: float = 0.0) -> np.ndarray:
    """0/1 matrix (seeds, items): y ~ Bernoulli(p_i + effect + effect_i + u_s).

    ``effect`` is the true delta (population mean over items and seeds: the clip never binds for |effect| <= 0.1,
    seed_sd <= 0.03); ``seed_sd`` the sd of a whole run's shift (seed-to-seed training variance); ``item_sd`` the sd of
    an item-specific part of the effect.
    """
    eff_i = effect + item_sd * rng.standard_normal(p.size)
    u = seed_sd * rng.standard_normal(n_seeds)
    prob = np.clip(p[None, :] + eff_i[None, :] + u[:, None], 0.0, 1.0)
    return (rng.random((n_seeds, p.size)) < prob).astype(np.int8)


def board_scores(n_boards: int, deltas, seeds: int, seed_sd: float, n_items: int, rng: np.random.Generator,
                 base_acc: float = 0.5, base_seeds: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Run-level accuracies of many simulated boards at once: (baseline (B, R_b), arms (B, k, R)).

    Each run's accuracy is Binomial(n_items, base_acc + delta + u) / n_items with u ~ N(0, seed_sd) its seed's shift:
    the run-to-run variance holds both seed variance and each run's item-level binomial noise, as on a real board.
    """
    deltas = np.asarray(deltas, float)
    rb = seeds if base_seeds is None else base_seeds

    def runs(shape, delta):
        p = np.clip(base_acc + delta + seed_sd * rng.standard_normal(shape), 0.0, 1.0)
        return rng.binomial(n_items, p) / n_items

    return runs((n_boards, rb), 0.0), runs((n_boards, deltas.size, seeds), deltas[None, :, None])


def paired_board_scores(n_boards: int, d_untreated: float, d_treated: float, seeds: int, sd: float, shared: float,
                        rng: np.random.Generator, base_acc: float = 0.89) -> tuple[np.ndarray, ...]:
    """Run-level scores of many boards of baseline, an untreated arm and its treated twin, each (B, seeds).

    A run's score is ``base_acc + delta + sd * (sqrt(shared) z_s + sqrt(1 - shared) e)``: ``z_s`` is the seed's part
    common to every arm (same warm start and data order), so treated - untreated pairs by seed; ``e`` is the run's own.
    """
    z = rng.standard_normal((n_boards, 1, seeds))
    e = rng.standard_normal((n_boards, 3, seeds))
    runs = base_acc + np.array([0.0, d_untreated, d_treated])[None, :, None] + sd * (
        np.sqrt(shared) * z + np.sqrt(1 - shared) * e)
    return runs[:, 0], runs[:, 1], runs[:, 2]


def make_record(testbed: str, experiment: str, seed: int, per_item, noise: dict | None = None,
                status: str = "ok", steps: int = 20, eval_every: int = 5, start_acc: float = 0.1,
                reward: float | None = None, mean_kl: float = 1e-4, wall_time_s: float = 60.0,
                aqn: dict | None = None, per_item_clean=None, config: dict | None = None,
                mitigation: str | None = None, rollout_corr: dict | None = None) -> dict:
    """A record in the real schema (noisebench.record) whose final per-item vector is ``per_item``.

    The curve climbs linearly from ``start_acc`` to the final accuracy (and, when ``per_item_clean`` is given, a
    clean curve to the clean final accuracy, as ``eval.clean_too`` writes); a ``diverged`` record stops half-way with
    no final per-item vector, as a NaN run does. ``config`` is the composed config (its setting is fingerprinted).
    ``mitigation``: the fix's name (the record's ``mitigation`` block, on); ``rollout_corr``: verl's mismatch metrics
    without their prefix, as the run's means.
    """
    per_item = None if per_item is None else [int(v) for v in per_item]
    clean = None if per_item_clean is None else [int(v) for v in per_item_clean]
    final_acc = float(np.mean(per_item)) if per_item else None
    clean_acc = float(np.mean(clean)) if clean else None
    last = steps if status == "ok" else steps // 2
    noise = noise or {"type": "none", "scale": 0.0, "ops": [], "phases": []}
    noisy_eval = noise["type"] != "none" and bool({"eval", "all"} & set(noise.get("phases") or []))

    def lerp(end, s):
        return start_acc + (end - start_acc) * s / steps if end is not None else start_acc

    curve = [{"step": s, "acc": lerp(final_acc, s), "acc_flexible": lerp(final_acc, s), "acc_stderr": None,
              "noisy_eval": noisy_eval, "acc_clean": lerp(clean_acc, s) if clean else None,
              "acc_clean_flexible": lerp(clean_acc, s) if clean else None} for s in range(0, last + 1, eval_every)]
    rew = (final_acc if final_acc is not None else start_acc) if reward is None else reward
    cfg = config or {}
    if mitigation is not None:  # the composed config carries the group, as a real treated run's does
        cfg = {**cfg, "mitigation": {"enabled": True}}
    rec = {
        "run_id": f"{experiment}-s{seed}", "testbed": testbed, "experiment": experiment, "seed": seed,
        "status": status, "noise": noise, "aqn": aqn or {"enabled": False}, "config": cfg,
        "setting_fingerprint": setting_fingerprint(cfg), "versions": {}, "git_commit": None,
        "eval_task": f"noisebench_{testbed}", "n_test": len(per_item) if per_item else None, "curve": curve,
        "final": None if status != "ok" else {"step": steps, "acc": final_acc, "acc_flexible": final_acc,
                                              "acc_clean": clean_acc, "acc_clean_flexible": clean_acc,
                                              "per_item": per_item, "per_item_clean": clean},
        "reward_curve": [{"step": s, "reward": (rew if status == "ok" else float("nan")) * s / max(steps, 1)}
                         for s in range(1, last + 1)],
        "mismatch": {"mean_kl": mean_kl, "mean_k3_kl": mean_kl, "per_step": [],
                     **{f"rollout_corr/{k}": v for k, v in (rollout_corr or {}).items()}},
        "mitigation": {"enabled": mitigation is not None, "name": mitigation or "none"},
        "telemetry": {}, "steps": last, "max_steps": steps, "wall_time_s": wall_time_s,
        "started_at": "2026-01-01T00:00:00", "finished_at": f"2026-01-01T01:{seed % 60:02d}:00",
        "error": "FloatingPointError: loss is nan" if status == "diverged" else None,
    }
    return rec


def write_run(root: str | os.PathLike, rec: dict) -> Path:
    """Write a record where the runner would: ``<root>/<testbed>/<experiment>/<run_id>/record.json``."""
    path = Path(root) / rec["testbed"] / rec["experiment"] / rec["run_id"] / "record.json"
    write_record(path, rec)
    return path
