"""Fused elementwise noise kernel (Triton): one read, one write per element, Philox noise from integer keys."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096   # elements per program. Fixed on purpose: the element -> (Philox counter, lane) map depends on it, so
               # the draws for a given key never depend on launch tuning.
KINDS = {"relative_gaussian": 0, "absolute_gaussian": 1, "systematic_bias": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = 4 * (2 ** 31 - 1)   # Philox counters are 32-bit, one per 4 elements
_KEY_MASK, _KEY_BIT = (1 << 62) - 1, 1 << 62   # keys always >= 2**62: Triton then always types them int64


@triton.jit
def _one(x_ptr, y_ptr, offs, numel, r, scale, KIND: tl.constexpr):
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    if KIND == 0:
        out = x + (scale * r) * x          # relative_gaussian: y (1 + s n)
    elif KIND == 1:
        out = x + scale * r                # absolute_gaussian: y + s n
    else:
        out = x * scale                    # systematic_bias: y (1 + s), the host passes 1 + s
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(x_ptr, y_ptr, ctr_ptr, done_ptr, numel, nprog, seed, scale,
                  KIND: tl.constexpr, USE_CTR: tl.constexpr, BLOCK: tl.constexpr):
    """Program p covers elements [p*BLOCK, (p+1)*BLOCK) as four contiguous quarters; Philox counter p*Q + i gives the
    four normals of lane i, one per quarter (so loads stay contiguous and vectorised).

    USE_CTR (graph capture): the key also mixes in a device counter ``ctr``; the last program to finish (ticket on
    ``done``) advances it, so every replay of a captured graph draws fresh noise without host involvement.
    """
    pid = tl.program_id(0)
    Q: tl.constexpr = BLOCK // 4
    lane = tl.arange(0, Q)
    offs = pid.to(tl.int64) * BLOCK + lane
    if KIND == 2:
        _one(x_ptr, y_ptr, offs, numel, 0.0, scale, KIND)
        _one(x_ptr, y_ptr, offs + Q, numel, 0.0, scale, KIND)
        _one(x_ptr, y_ptr, offs + 2 * Q, numel, 0.0, scale, KIND)
        _one(x_ptr, y_ptr, offs + 3 * Q, numel, 0.0, scale, KIND)
    else:
        if USE_CTR:
            v = tl.load(ctr_ptr)
            key = seed + v * 2654435761
        else:
            key = seed
        r0, r1, r2, r3 = tl.randn4x(key, pid * Q + lane)
        _one(x_ptr, y_ptr, offs, numel, r0, scale, KIND)
        _one(x_ptr, y_ptr, offs + Q, numel, r1, scale, KIND)
        _one(x_ptr, y_ptr, offs + 2 * Q, numel, r2, scale, KIND)
        _one(x_ptr, y_ptr, offs + 3 * Q, numel, r3, scale, KIND)
        if USE_CTR:
            ticket = tl.atomic_add(done_ptr, 1, sem="acq_rel")
            last = ticket == nprog - 1
            tl.store(ctr_ptr, v + 1, mask=last)
            tl.store(done_ptr, 0, mask=last)


def launch(x: Tensor, kind: str, scale: float, seed: int, ctr: Tensor, done: Tensor, use_ctr: bool) -> Tensor:
    """Noisy copy of ``x`` (same shape and dtype, contiguous). ``seed``: the call's 63-bit key; ``ctr``/``done``:
    one-element int64/int32 device tensors, read and advanced only when ``use_ctr`` (inside a CUDA graph capture)."""
    xc = x.contiguous()
    out = torch.empty_like(xc, memory_format=torch.contiguous_format)
    n = xc.numel()
    if n == 0:
        return out
    nprog = triton.cdiv(n, BLOCK)
    arg = 1.0 + float(scale) if kind == "systematic_bias" else float(scale)
    key = (int(seed) & _KEY_MASK) | _KEY_BIT
    _noise_kernel[(nprog,)](xc, out, ctr, done, n, nprog, key, arg, KIND=KINDS[kind], USE_CTR=bool(use_ctr),
                            BLOCK=BLOCK, num_warps=4)
    return out
