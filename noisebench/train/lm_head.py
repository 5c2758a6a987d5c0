"""The LM head variants the trainer swaps in: unfused (so the noise engine sees the projection in training as it does
in rollout) and float32 (the ``fp32_lm_head`` mitigation, tied embeddings included; see the section below).

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


# ---- fp32 lm_head (mitigation fp32_lm_head) ------------------------------------------------------------------------
# TRL's ``cast_lm_head_to_fp32`` casts the head *module* to float32; with tied embeddings that casts the shared
# Parameter, so the embedding table trains in float32 too (and TRL documents the option for untied heads only).
# Here nothing is cast in place: each call computes the logits from ``weight.float()`` and ``hidden.float()`` with
# autocast off. The Parameter keeps its dtype and stays the one object the embedding and the head share; its
# gradient flows back through the cast. Cost: a float32 copy of the head weight per call.
# The chip's noise models its arithmetic at working precision; an fp32 projection's error (~1e-7 relative) is far
# below any modelled noise, so the head runs exempt from it (the counter an excluded module raises, noise/norms.py),
# forward and backward. Evaluation is not changed: every arm is scored the same way.

@contextlib.contextmanager
def noise_exempt():
    """Ops in the block are neither noised forward nor marked for backward noise (as inside an excluded module)."""
    from noisebench.noise.runtime import STATE

    STATE.excl_depth += 1
    try:
        yield
    finally:
        STATE.excl_depth -= 1


class FP32LogProbs:
    """Wraps a log-prob head (``ChunkedLogProbFunction`` or :class:`UnfusedLogProbs`): same ``.apply``, computed in
    float32 from the shared weight, autocast off, noise-exempt."""

    def __init__(self, inner):
        self.inner = inner

    def apply(self, hidden, weight, bias, *args, **kwargs):
        with torch.autocast(hidden.device.type, enabled=False), noise_exempt():
            return self.inner.apply(hidden.float(), weight.float(), None if bias is None else bias.float(),
                                    *args, **kwargs)


@contextlib.contextmanager
def fp32_log_probs(enabled: bool = True):
    """Training / reference log-probs through :class:`FP32LogProbs` around whichever head is in force."""
    if not enabled:
        yield
        return
    import trl.trainer.utils as tu

    prev = tu._ChunkedLogProbFunction
    tu._ChunkedLogProbFunction = FP32LogProbs(prev)
    try:
        yield
    finally:
        tu._ChunkedLogProbFunction = prev


@contextlib.contextmanager
def fp32_output_head(model, enabled: bool = True):
    """``model``'s output projection (``get_output_embeddings()``, e.g. in ``generate``) returns float32 logits
    computed from its own (possibly tied) weight for the duration."""
    head = model.get_output_embeddings() if enabled else None
    if head is None:
        yield
        return
    had = "forward" in head.__dict__
    prev = head.__dict__.get("forward")

    def forward(hidden):
        with torch.autocast(hidden.device.type, enabled=False), noise_exempt():
            return F.linear(hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float())

    head.forward = forward
    try:
        yield
    finally:
        if had:
            head.forward = prev
        else:
            del head.forward
