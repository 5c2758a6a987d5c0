"""Noise as graph ops in compiled no-grad code: Inductor fuses it into neighbouring kernels, CUDA graphs replay it.

Why: in a decode step the opaque noise op is one extra kernel per noised op (a few us each, ~200 per token for a
28-layer model), which costs more than the noise. Here the noise is ``y (1 + s n)`` written with a keyed normal
draw, ``noisebench::keyed_randn(seed, size)``, whose seed is a device scalar advanced in the graph itself
(``seed.add_(1)`` per call), so every replay of a captured graph draws fresh noise and the global RNG is never used.
Under Inductor the draw decomposes to Inductor's own fused Philox (``prims.inductor_random``, ``tl.randn``); under
other backends (aot_eager) it runs eagerly from a private generator seeded by the seed's value.
Only for no-grad graphs (rollouts, evaluation): training graphs keep the opaque op, whose backward phase is read at
run time. Telemetry is not recorded on this path (host code does not run on replay).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import dispatch

INLINE_KINDS = ("relative_gaussian", "absolute_gaussian")
ENABLED = os.environ.get("NOISEBENCH_FAST_INLINE", "1").strip() not in ("0", "false", "off", "")
SEEDS: Dict[str, Tensor] = {}   # device type -> 0-d int64 seed (static address; changed only in place)
_MASK = (1 << 62) - 1


@torch.library.custom_op("noisebench::keyed_randn", mutates_args=())
def keyed_randn(seed: Tensor, size: List[int]) -> Tensor:
    """Standard normals of shape ``size`` (float32, on ``seed``'s device) determined by the value of ``seed``."""
    g = torch.Generator(device=seed.device).manual_seed(int(seed.item()) & _MASK)
    return torch.randn(size, generator=g, device=seed.device, dtype=torch.float32)


@keyed_randn.register_fake
def _keyed_randn_fake(seed: Tensor, size: List[int]) -> Tensor:
    return torch.empty(size, device=seed.device, dtype=torch.float32)


def _register_inductor_decomp() -> bool:
    """Let Inductor lower the keyed draw to its fused Philox (private API: without it the draw stays an extern op)."""
    try:
        from torch._inductor.decomposition import register_decomposition

        @register_decomposition([torch.ops.noisebench.keyed_randn.default])
        def _decomp(seed, size):
            return torch.ops.prims.inductor_random(list(size), seed, "randn")
        return True
    except Exception:  # pragma: no cover - depends on torch internals
        return False


FUSABLE = _register_inductor_decomp()


def reset(seed: Optional[int]) -> None:
    """Create (once) and set in place the seed scalars of the CPU and the current CUDA device."""
    value = (int(seed or 0) & _MASK)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for typ in devices:
        t = SEEDS.get(typ)
        if t is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if typ == "cuda" else torch.device("cpu")
            t = SEEDS[typ] = torch.zeros((), dtype=torch.int64, device=dev)
            torch._dynamo.mark_static_address(t)
        t.fill_(value)


def applicable(y: Tensor, spec) -> bool:
    """Trace-time test: compiled, no grad, a Gaussian model, a float tensor on a device with a seed scalar."""
    if not ENABLED or dispatch.MODE == "off" or torch.is_grad_enabled():
        return False
    if spec is None or spec.type not in INLINE_KINDS or y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    s = SEEDS.get(y.device.type)
    if s is None or s.device != y.device:
        return False
    return y.device.type == "cuda" or dispatch.MODE == "force"


def noise(y: Tensor, spec) -> Tensor:
    """``y (1 + s n)`` or ``y + s n`` in float32, cast back; n from the device seed, advanced once per call."""
    s = SEEDS[y.device.type]
    s.add_(1)
    n = torch.ops.noisebench.keyed_randn(s, list(y.shape))
    yf = y.float()
    out = yf + (spec.scale * n) * yf if spec.type == "relative_gaussian" else yf + spec.scale * n
    return out.to(y.dtype)
