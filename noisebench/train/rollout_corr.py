"""verl's ``rollout_corr/*`` metrics: how far the sampler's policy is from the trainer's, and what a correction does.

Pure functions of (sampler log-probs, trainer log-probs, completion mask), each (batch, length). The definitions are
verl's (``verl/trainer/ppo/rollout_corr_helper.py``: ``compute_offpolicy_metrics``, ``compute_is_metrics``,
``compute_rollout_rejection_mask``) so a chip team can read noisebench's numbers next to its own verl logs:

- ``kl``            mean over tokens of logp_rollout - logp_train (direct estimator of KL(rollout || train))
- ``k3_kl``         mean over tokens of exp(r) - r - 1, r = logp_train - logp_rollout (non-negative)
- ``log_ppl_diff``  mean over sequences of (mean_t logp_rollout - mean_t logp_train); ``log_ppl_abs_diff`` its |.|
- ``chi2_token``    mean over tokens of rho^2, minus 1 (rho = exp(r), r clamped to +-20)
- ``chi2_seq``      mean over sequences of (prod_t rho_t)^2, minus 1 (sum of r clamped to +-20)
- ``rollout_is_eff_sample_size``  1 / mean((w / mean(w))^2) over tokens, w the importance weight at the correction's
                                  level (token rho, or the sequence product broadcast to its tokens) clamped to
                                  [1/C, C] (verl clamps with the reciprocal of its threshold C)
Shares of what the correction touches (TRL's modes, ``vllm_importance_sampling_mode``; verl's names where it has them):
- ``rollout_is_truncated_fraction``   share of tokens whose weight a ``truncate`` correction clips (weight > upper,
                                       or < lower when a lower bound is set)
- ``rollout_rs_masked_fraction``       share of tokens a ``mask`` correction drops (weight outside [lower, upper])
- ``rollout_rs_seq_masked_fraction``   share of sequences with at least one dropped token
A sequence-level weight applies to every token of its sequence, so it truncates or masks all of them.
Tokens whose sampler log-prob is not finite (vLLM's unscored tokens) are left out, as TRL does.
"""
from __future__ import annotations

import math

import torch

SAFETY_BOUND = 20.0  # verl: exp(+-20) bounds the exponentiated log-ratios
PREFIX = "rollout_corr/"
LEVELS = ("token", "sequence")
MODES = ("truncate", "mask")


def _valid(sampling_logps: torch.Tensor, train_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.bool() & torch.isfinite(sampling_logps) & torch.isfinite(train_logps)


def _log_ratio(sampling_logps, train_logps, valid) -> torch.Tensor:
    """r = logp_train - logp_rollout in float64 (exact enough to test against hand values), 0 off the mask."""
    r = train_logps.detach().double() - sampling_logps.detach().double()
    return torch.where(valid, r, torch.zeros_like(r))


@torch.no_grad()
def offpolicy_metrics(sampling_logps: torch.Tensor, train_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """``kl``, ``k3_kl``, ``log_ppl_diff``, ``log_ppl_abs_diff``, ``chi2_token``, ``chi2_seq`` (module docstring);
    empty when no token is valid."""
    valid = _valid(sampling_logps, train_logps, mask)
    if not valid.any():
        return {}
    r = _log_ratio(sampling_logps, train_logps, valid)
    n_tok = valid.sum()
    rows = valid.any(-1)                       # sequences with at least one valid token
    per_seq = valid.sum(-1).clamp(min=1)
    log_ppl_diff = (-r.sum(-1) / per_seq)[rows]  # mean_t logp_rollout - mean_t logp_train
    rho = r.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()
    seq_sum = r.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)[rows]
    return {
        "kl": float((-r)[valid].sum() / n_tok),
        "k3_kl": float((r.exp() - r - 1)[valid].sum() / n_tok),
        "log_ppl_diff": float(log_ppl_diff.mean()),
        "log_ppl_abs_diff": float(log_ppl_diff.abs().mean()),
        "chi2_token": float(rho.square()[valid].mean() - 1.0),
        "chi2_seq": float((2.0 * seq_sum).exp().mean() - 1.0),
    }


def _level_log_weights(r: torch.Tensor, valid: torch.Tensor, level: str) -> torch.Tensor:
    """log of the importance weight each token carries: its own r, or its sequence's sum of r."""
    if level == "token":
        return r
    if level == "sequence":
        return r.sum(-1, keepdim=True).expand_as(r)
    raise ValueError(f"level={level!r} is not one of {list(LEVELS)}")


@torch.no_grad()
def correction_metrics(sampling_logps: torch.Tensor, train_logps: torch.Tensor, mask: torch.Tensor,
                       level: str = "token", mode: str = "truncate", upper: float | None = 2.0,
                       lower: float | None = None) -> dict[str, float]:
    """Effective sample size and the shares a correction at ``level`` / ``mode`` / [``lower``, ``upper``] touches.

    Args:
        level: ``token`` or ``sequence`` (the weight's granularity).
        mode: ``truncate`` (weights clipped to the bounds) or ``mask`` (weights outside them set to 0).
        upper, lower: the bounds (None: unbounded on that side); ``upper`` also sets verl's ESS clamp [1/upper,
            upper] (2.0, verl's default threshold, when None).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(MODES)}")
    valid = _valid(sampling_logps, train_logps, mask)
    if not valid.any():
        return {}
    r = _log_ratio(sampling_logps, train_logps, valid)
    logw = _level_log_weights(r, valid, level)
    hi = math.log(upper) if upper is not None else math.inf
    lo = math.log(lower) if lower is not None and lower > 0 else -math.inf
    outside = ((logw > hi) | (logw < lo)) & valid
    share = int(outside.sum()) / int(valid.sum())
    c = upper if upper is not None else 2.0
    w = logw.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp(1.0 / c, c)
    w_mean = w[valid].mean()
    ess = 1.0 / float((w[valid] / (w_mean + 1e-8)).square().mean())
    rows = valid.any(-1)
    return {
        "rollout_is_eff_sample_size": ess,
        "rollout_is_truncated_fraction": share if mode == "truncate" else 0.0,
        "rollout_rs_masked_fraction": share if mode == "mask" else 0.0,
        "rollout_rs_seq_masked_fraction": int(outside.any(-1).sum()) / int(rows.sum()) if mode == "mask" else 0.0,
    }


def rollout_corr_metrics(sampling_logps: torch.Tensor, train_logps: torch.Tensor, mask: torch.Tensor,
                         **correction) -> dict[str, float]:
    """Every metric above under verl's ``rollout_corr/`` prefix; ``correction``: :func:`correction_metrics`'s
    level / mode / upper / lower."""
    out = offpolicy_metrics(sampling_logps, train_logps, mask)
    out.update(correction_metrics(sampling_logps, train_logps, mask, **correction))
    return {PREFIX + k: v for k, v in out.items()}
