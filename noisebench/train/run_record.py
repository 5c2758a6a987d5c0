"""The result record of one run (schema: ``noisebench.record``), assembled from its history and provenance."""
from __future__ import annotations

import math
import time
from pathlib import Path

from omegaconf import OmegaConf

from noisebench.record import setting_fingerprint
from noisebench.train.callbacks import RunHistory
from noisebench.train import mitigation
from noisebench.train.mismatch import aggregate
from noisebench.train.provenance import git_commit, hydra_overrides, noise_engine, versions


def build_record(cfg, spec, history: RunHistory, status: str, run_dir: Path, telemetry: dict, tb_name: str,
                 eval_task: str, steps: int, started: str, error: str | None) -> dict:
    final = {}
    if history.curve:
        last = max(history.curve, key=lambda c: c["step"])
        final = {k: last.get(k) for k in ("step", "acc", "acc_flexible", "acc_clean", "acc_clean_flexible")}
        if history.final_items.get("step") == last["step"]:
            final["per_item"] = history.final_items.get("per_item")
            final["per_item_clean"] = history.final_items.get("per_item_clean")
    # Run-level mismatch: mean of each per-step statistic; *_max / *_min keep the extreme ("kl" -> "mean_kl").
    mismatch = {}
    for k in sorted({k for m in history.mismatch for k in m if k != "step"}):
        vals = [m[k] for m in history.mismatch if m.get(k) is not None and math.isfinite(m[k])]
        name = k if k.startswith(("abs", "is_", "rollout_corr/")) else f"mean_{k}"  # verl's names kept as they are
        mismatch[name] = aggregate(k, vals) if vals else None
    mismatch["per_step"] = history.mismatch
    return {
        "run_id": f"{tb_name}/{cfg.experiment}/{run_dir.name}",
        "testbed": tb_name,
        "experiment": arm_name(cfg),
        "seed": int(cfg.seed),
        "status": status,
        "noise": spec.to_dict() if spec is not None else OmegaConf.to_container(cfg.noise, resolve=True),
        "noise_engine": noise_engine(),
        "aqn": OmegaConf.to_container(cfg.aqn, resolve=True),
        "mitigation": mitigation.record_block(mitigation.of_config(cfg)),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "setting_fingerprint": setting_fingerprint(OmegaConf.to_container(cfg, resolve=True)),
        "versions": versions(),
        "git_commit": git_commit(),
        "eval_task": eval_task,
        "n_test": (history.curve[-1].get("n") if history.curve else None),
        "curve": history.curve,
        "final": final,
        "reward_curve": history.reward_curve,
        "mismatch": mismatch,
        "telemetry": telemetry,
        "steps": steps,
        "max_steps": int(cfg.trainer.max_steps),
        "wall_time_s": history.wall_time_s,
        "torch_threads": _torch_threads(),
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "diverged_at": history.diverged_at,
        "error": error,
        "run_dir": str(run_dir),
        "overrides": hydra_overrides(),
    }


def _torch_threads() -> int:
    """Threads the run computed with (wall times compare only at equal threads; a parallel launcher splits cores)."""
    import torch

    return torch.get_num_threads()


def arm_name(cfg) -> str:
    """The record's experiment: the preset's name, ``+<fix>`` with a mitigation and ``+<chip>`` with a chip profile,
    so the board never pools a treated arm with its untreated twin (or a chip run with the baseline)."""
    name = mitigation.experiment_name(str(cfg.experiment), mitigation.of_config(cfg))
    return f"{name}+{cfg.chip.name}" if cfg.get("chip") is not None else name
