"""Typed schema of ``mitigation`` (conf/mitigation): the fix applied against the rollout/training mismatch.

Two independent parts, so they combine (``mitigation=[tis_token,fp32_lm_head]`` merges both files):
- importance sampling on the ratio exp(logp_train - logp_sampler), TRL's four modes
  (``vllm_importance_sampling_mode`` = ``<importance_sampling>_<is_mode>``) with its bounds [clip_min, clip_max];
- ``fp32_lm_head``: the output projection computed in float32 (noisebench/train/lm_head.py says how with tied
  embeddings, and why the chip's noise then leaves it alone).
Every key defaults to "off", so a file sets only its own part. :func:`mitigation_name` gives the arm its label.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from noisebench.schema.fields import bounded, choices

ISLevel = choices("ISLevel", ["none", "token", "sequence"])
ISMode = choices("ISMode", ["truncate", "mask"])

# The bounds each mode ships with (verl's threshold 2.0; its rejection sampling's lower bound is 1 / upper).
DEFAULT_BOUNDS = {"truncate": (None, 2.0), "mask": (0.5, 2.0)}
# TRL keys the mitigation decides; a trainer recipe must not set them itself (one place decides the arm).
TRL_KEYS = ("vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
            "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min", "cast_lm_head_to_fp32")


@dataclass
class MitigationConfig:
    """``mitigation`` (conf/mitigation)."""

    enabled: bool = False                         # true in every file but none.yaml (the board's clean-run test)
    importance_sampling: ISLevel = ISLevel.none   # none | token | sequence (a sequence's weight: product over tokens)
    is_mode: ISMode = ISMode.truncate             # truncate: clip the weight to the bounds; mask: weight 0 outside them
    clip_max: Optional[float] = bounded(2.0, gt=0)   # upper bound C (TIS cap); null: none (mask with a lower bound)
    clip_min: Optional[float] = bounded(None, ge=0)  # lower bound; null: none
    fp32_lm_head: bool = False                    # lm_head in float32 in rollout, reference and training


def mitigation_problem(cfg: Any) -> Optional[tuple[str, str]]:
    """(key, message) of the first rule the composed config's mitigation breaks, else None."""
    m = cfg.get("mitigation")
    if m is None:
        return None
    on = m.importance_sampling != "none" or bool(m.fp32_lm_head)
    if bool(m.enabled) != on:
        return "mitigation.enabled", (f"is {m.enabled} while importance_sampling={m.importance_sampling} and "
                                      f"fp32_lm_head={m.fp32_lm_head}: choose a mitigation file (none, tis_token, "
                                      "tis_seq, mis_seq, fp32_lm_head) rather than switching parts by hand")
    if m.importance_sampling != "none":
        if m.clip_max is None and m.clip_min is None:
            return "mitigation.clip_max", "and mitigation.clip_min are both null: importance sampling needs a bound"
        if m.clip_max is not None and m.clip_min is not None and m.clip_min >= m.clip_max:
            return "mitigation.clip_min", f"must be < mitigation.clip_max ({m.clip_max}), got {m.clip_min}"
    trainer = cfg.get("trainer")
    args = (trainer.get("args") if trainer is not None else None) or {}
    for key in ("vllm_importance_sampling_correction", "cast_lm_head_to_fp32"):
        if args.get(key):
            return f"trainer.args.{key}", "is chosen by the mitigation group, not the trainer recipe: set it false " \
                                          "there and choose mitigation=tis_token|tis_seq|mis_seq|fp32_lm_head"
    return None


def mitigation_name(m: dict | None) -> str:
    """The arm's label: ``none``, ``tis_token``, ``tis_seq``, ``mis_seq``, ``mis_token``, ``fp32_lm_head``, joined by
    ``+``; bounds other than the mode's defaults are written out, e.g. ``tis_token(C=5)``, ``mis_seq[0.8,1.25]``."""
    m = m or {}
    parts = []
    level = str(m.get("importance_sampling") or "none")
    if level != "none":
        mode = str(m.get("is_mode") or "truncate")
        name = ("tis_" if mode == "truncate" else "mis_") + ("token" if level == "token" else "seq")
        lo, hi = m.get("clip_min"), m.get("clip_max")
        if (lo, hi) != DEFAULT_BOUNDS[mode]:
            name += f"(C={hi:g})" if mode == "truncate" and lo is None and hi is not None else f"[{lo},{hi}]"
        parts.append(name)
    if m.get("fp32_lm_head"):
        parts.append("fp32_lm_head")
    return "+".join(parts) or "none"
