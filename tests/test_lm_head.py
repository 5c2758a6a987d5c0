"""The unfused training lm_head equals TRL's fused kernel, and the noise engine sees it (forward and backward)."""
from __future__ import annotations

import torch
from trl.kernels import ChunkedLogProbFunction

from noisebench.noise import NoiseInjector, NoiseSpec
from noisebench.train.lm_head import UnfusedLogProbs


def _inputs(seed=0, n=37, h=16, v=50):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


def test_unfused_matches_trl_fused_values_and_grads():
    outs = ("log_probs", "entropy")
    res = []
    for fn in (ChunkedLogProbFunction, UnfusedLogProbs):
        hidden, weight, targets = _inputs()
        lp, ent, *_ = fn.apply(hidden, weight, None, targets, 0.7, 16, None, 1.0, outs)
        (lp.sum() + 0.3 * ent.sum()).backward()
        res.append((lp.detach(), ent.detach(), hidden.grad, weight.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_engine_noises_unfused_head_forward_and_backward():
    spec = NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], phases=["train_forward", "train_backward"])
    inj = NoiseInjector(spec)
    hidden, weight, targets = _inputs()
    clean_lp = UnfusedLogProbs.apply(hidden, weight, None, targets, 1.0, 16)[0].detach()
    with inj:
        with inj.phase("train_forward"):
            lp = UnfusedLogProbs.apply(hidden, weight, None, targets, 1.0, 16)[0]
        with inj.phase("train_backward"):
            lp.sum().backward()
    t = inj.telemetry()
    assert t["noise/train_forward/linear/fwd/calls"] == 1
    assert sum(v for k, v in t.items() if k.startswith("noise/train_backward/linear/bwd/") and k.endswith("/calls")) >= 1
    assert not torch.equal(lp.detach(), clean_lp)
