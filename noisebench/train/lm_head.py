"""An unfused LM head for training, so the noise engine sees the lm_head projection there as it does in rollout.

TRL's GRPOTrainer always patches the model with a fused log-prob head (``trl.kernels.ChunkedLogProbFunction``)
that computes the projection with ``torch.mm(..., out=tile)`` inside a custom autograd Function: the engine skips
``out=`` calls (inductor's wrapper makes them too) and no TorchFunctionMode is active in a custom backward, so the
lm_head would be clean in training and reference while noisy in rollout -- a mismatch no chip has.
:class:`UnfusedLogProbs` has the same call signature and outputs but materialises the logits through ``F.linear``:
forward and backward noise apply. Cost: N x vocab logits in memory (fine for the embedded testbed's 512-token
vocabulary; for a 152k vocabulary keep TRL's fused head: ``trainer.unfused_lm_head=false``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


class UnfusedLogProbs:
    """Drop-in for ``ChunkedLogProbFunction`` (``.apply`` with the same arguments and 5 outputs)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs",)):
        logits = F.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
        z = logits.float() * logit_scale
        if final_logit_softcapping:
            z = final_logit_softcapping * torch.tanh(z / final_logit_softcapping)
        z = z / temperature
        logp = torch.log_softmax(z, dim=-1)
        logprobs = logp.gather(-1, targets[:, None]).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1) if "entropy" in outputs else None
        with torch.no_grad():
            lsq = torch.logsumexp(2 * logp, dim=-1) if "log_sum_sq_probs" in outputs else None
            mean = z.mean(-1) if "mean_logits" in outputs else None
            top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None
        return logprobs, entropy, lsq, mean, top1


@contextlib.contextmanager
def unfused_lm_head(enabled: bool = True):
    """Swap TRL's fused head for :class:`UnfusedLogProbs` for the duration (trainer phases call this)."""
    if not enabled:
        yield
        return
    import trl.trainer.utils as tu

    prev = tu._ChunkedLogProbFunction
    tu._ChunkedLogProbFunction = UnfusedLogProbs
    try:
        yield
    finally:
        tu._ChunkedLogProbFunction = prev
