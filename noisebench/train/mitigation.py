"""The ``mitigation`` group (noisebench/schema/mitigation.py) turned into TRL's options.

One choice drives both rollout paths. On vLLM's, TRL does everything itself: ``vllm_importance_sampling_*`` and
``cast_lm_head_to_fp32`` go into ``GRPOConfig``. On the transformers path TRL's correction code is gated on
``use_vllm``; ``NoisyGRPOTrainer`` opens that gate around the correction alone and feeds it the sampler log-probs it
records (noisebench/train/trainer.py), and computes the fp32 head itself (noisebench/train/lm_head.py).
"""
from __future__ import annotations

from typing import Any

from noisebench.schema.mitigation import DEFAULT_BOUNDS, mitigation_name

OFF = {"enabled": False, "importance_sampling": "none", "is_mode": "truncate",
       "clip_max": DEFAULT_BOUNDS["truncate"][1], "clip_min": None, "fp32_lm_head": False}
# What the rollout_corr/* shares are computed for when no correction is on: verl's default (token TIS, C = 2), so an
# unmitigated arm shows how much that fix would touch.
METRIC_DEFAULT = {"level": "token", "mode": "truncate", "upper": 2.0, "lower": None}


def of_config(cfg) -> dict | None:
    """The composed config's ``mitigation`` as a plain dict (None for a config without the group)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.mitigation, resolve=True) if "mitigation" in cfg else None


def resolve(m: dict | None) -> dict[str, Any]:
    """The mitigation with every key set (absent keys off)."""
    return {**OFF, **{k: v for k, v in (m or {}).items() if k in OFF}}


def trl_mode(m: dict) -> str | None:
    """TRL's ``vllm_importance_sampling_mode`` (``token_truncate``, ``sequence_mask``, ...), None when off."""
    m = resolve(m)
    return None if m["importance_sampling"] == "none" else f"{m['importance_sampling']}_{m['is_mode']}"


def grpo_args(m: dict | None, use_vllm: bool) -> dict[str, Any]:
    """``GRPOConfig`` keys of the mitigation (they replace any the trainer recipe carries). The fp32 head goes to
    TRL only on the vLLM path: on the transformers path noisebench computes it (tied embeddings stay tied)."""
    m = resolve(m)
    mode = trl_mode(m)
    out: dict[str, Any] = {"vllm_importance_sampling_correction": mode is not None,
                           "cast_lm_head_to_fp32": bool(m["fp32_lm_head"] and use_vllm)}
    if mode is not None:
        out.update(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=m["clip_max"],
                   vllm_importance_sampling_clip_min=m["clip_min"])
    return out


def metric_correction(m: dict | None) -> dict[str, Any]:
    """``rollout_corr.correction_metrics``'s level / mode / bounds for this arm."""
    m = resolve(m)
    if m["importance_sampling"] == "none":
        return dict(METRIC_DEFAULT)
    return {"level": m["importance_sampling"], "mode": m["is_mode"], "upper": m["clip_max"], "lower": m["clip_min"]}


def record_block(m: dict | None) -> dict[str, Any]:
    """The record's ``mitigation`` block: every key and the arm's label (``name``)."""
    m = resolve(m)
    return {**m, "name": mitigation_name(m)}


def experiment_name(experiment: str, m: dict | None) -> str:
    """The record's experiment: ``e4d`` unmitigated, ``e4d+tis_token`` with a fix, so the board never pools a
    mitigated arm with its unmitigated twin (it groups non-baseline runs by experiment and noise)."""
    m = resolve(m)
    return f"{experiment}+{mitigation_name(m)}" if m["enabled"] else experiment
