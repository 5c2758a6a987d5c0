"""Rollout/training mismatch: the log-probs the sampler saw against the log-probs the trainer computes.

This is the quantity a chip's numerics change in RL: rollouts run on the (noisy) inference path, the loss on the
(noisy) training path, and GRPO silently assumes both are the same policy. Metric names follow verl's
``rollout_corr/*`` and TRL's ``sampling/*`` families (shared/notes/field.md).

On TRL's transformers path ``_generate_single_turn`` returns no log-probs, so :class:`SampledLogprobRecorder` keeps
them during ``generate`` through a ``LogitsProcessor``: O(batch x vocab) memory, not batch x length x vocab.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor


class SampledLogprobRecorder(LogitsProcessor):
    """Records, per generated position, the sampling log-prob of the token that was then drawn.

    Custom logits processors run on the raw logits, before the temperature / top-k / top-p warpers, so the row kept
    is ``log_softmax(logits / temperature)``: the same distribution TRL's trainer scores the tokens under.
    At step t the processor sees the token sampled at step t-1 as ``input_ids[:, -1]`` and gathers it from the row it
    kept; the last token is gathered in :meth:`finish` from the final sequences.
    """

    def __init__(self, temperature: float = 1.0):
        self.temperature = max(float(temperature), 1e-6)
        self._row: torch.Tensor | None = None
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self._row is not None:
            self._steps.append(self._row.gather(1, input_ids[:, -1:]).squeeze(1))
        self._row = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, completion_ids: list[list[int]]) -> list[list[float]]:
        """Per completion (already cut after EOS), the sampling log-prob of each of its tokens."""
        if self._row is None:
            return [[] for _ in completion_ids]
        n = len(self._steps)
        last = torch.tensor([ids[n] if len(ids) > n else 0 for ids in completion_ids], device=self._row.device)
        steps = self._steps + [self._row.gather(1, last[:, None]).squeeze(1)]
        table = torch.stack(steps, dim=1).cpu()  # (batch, generated length)
        self._row, self._steps = None, []
        return [table[i, : len(ids)].tolist() for i, ids in enumerate(completion_ids)]


@torch.no_grad()
def mismatch_stats(sampling_logps: torch.Tensor, train_logps: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Token-level rollout vs training statistics over ``mask`` (completion tokens).

    Returns:
        dict: ``kl`` (mean of logp_rollout - logp_train, verl ``rollout_corr/kl``), ``k3_kl`` (mean of
        exp(r) - r - 1 with r = logp_train - logp_rollout), ``abs_logp_diff_mean`` / ``abs_logp_diff_max``
        (TRL ``sampling/sampling_logp_difference``), ``abs_prob_diff_mean`` / ``abs_prob_diff_max`` (verl
        ``training/rollout_probs_diff_*``), ``is_ratio_mean`` / ``is_ratio_min`` / ``is_ratio_max``
        (exp(logp_train - logp_rollout)).
    """
    m = mask.bool() & torch.isfinite(sampling_logps) & torch.isfinite(train_logps)
    if not m.any():
        return {}
    lr = sampling_logps.float()[m]
    lt = train_logps.detach().float()[m]
    d = lt - lr
    absd = d.abs()
    pdiff = (lt.exp() - lr.exp()).abs()
    ratio = d.exp()
    return {
        "kl": float((lr - lt).mean()),
        "k3_kl": float((ratio - d - 1).mean()),
        "abs_logp_diff_mean": float(absd.mean()),
        "abs_logp_diff_max": float(absd.max()),
        "abs_prob_diff_mean": float(pdiff.mean()),
        "abs_prob_diff_max": float(pdiff.max()),
        "is_ratio_mean": float(ratio.mean()),
        "is_ratio_min": float(ratio.min()),
        "is_ratio_max": float(ratio.max()),
    }


def aggregate(key: str, values: list[float]) -> float:
    """Combine one statistic over micro-batches or steps: extremes stay extremes (``*_max``, ``*_min``), else mean."""
    if key.endswith("_max"):
        return float(max(values))
    if key.endswith("_min"):
        return float(min(values))
    return float(sum(values) / len(values))
