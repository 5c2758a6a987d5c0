"""Synthetic result records with known true effects: for the leaderboard's tests and for demo boards."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from noisebench.record import write_record


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


def make_record(testbed: str, experiment: str, seed: int, per_item, noise: dict | None = None,
                status: str = "ok", steps: int = 20, eval_every: int = 5, start_acc: float = 0.1,
                reward: float | None = None, mean_kl: float = 1e-4, wall_time_s: float = 60.0,
                aqn: dict | None = None) -> dict:
    """A record in the real schema (noisebench.record) whose final per-item vector is ``per_item``.

    The curve climbs linearly from ``start_acc`` to the final accuracy; a ``diverged`` record stops half-way with no
    final per-item vector, as a NaN run does.
    """
    per_item = None if per_item is None else [int(v) for v in per_item]
    final_acc = float(np.mean(per_item)) if per_item else None
    last = steps if status == "ok" else steps // 2
    grid = list(range(0, last + 1, eval_every))
    curve = [{"step": s, "acc": (start_acc + (final_acc - start_acc) * s / steps) if final_acc is not None
              else start_acc, "acc_flexible": None, "acc_stderr": None, "acc_clean": None,
              "acc_clean_flexible": None} for s in grid]
    rew = (final_acc if final_acc is not None else start_acc) if reward is None else reward
    rec = {
        "run_id": f"{experiment}-s{seed}", "testbed": testbed, "experiment": experiment, "seed": seed,
        "status": status, "noise": noise or {"type": "none", "scale": 0.0, "ops": [], "phases": []},
        "aqn": aqn or {"enabled": False}, "config": {}, "versions": {}, "git_commit": None,
        "eval_task": f"noisebench_{testbed}", "n_test": len(per_item) if per_item else None, "curve": curve,
        "final": None if status != "ok" else {"step": steps, "acc": final_acc, "acc_flexible": final_acc,
                                              "acc_clean": None, "per_item": per_item, "per_item_clean": None},
        "reward_curve": [{"step": s, "reward": (rew if status == "ok" else float("nan")) * s / max(steps, 1)}
                         for s in range(1, last + 1)],
        "mismatch": {"mean_kl": mean_kl, "mean_abs_prob_diff": None, "max_abs_prob_diff": None,
                     "mean_abs_logp_diff": None, "per_step": []},
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
