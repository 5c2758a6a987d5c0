"""A chip profile's GEMM error as one number on the noise rows' scale: the relative RMS error of a reference GEMM.

The board states relative noise as its RMS relative error (``relative_gaussian`` with scale s perturbs each output by
s RMS), so a chip is put on the same axis by the error its arithmetic makes on one GEMM: inputs N(0, 1) of shape
(M, K) @ (K, N), computed with the profile's ``accumulate.gemm`` and compared with the float64 product,

    rel_rms = sqrt(mean((y_chip - y_exact)^2)) / sqrt(mean(y_exact^2)),

the normwise relative error (per-element ratios blow up where an exact output is near 0). It counts input
quantization, accumulation and output rounding together, as the model feels them; approximate exp (softmax, silu) is
not a GEMM and is not in the number. Fixed seed and shapes: the same profile always gives the same figure.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Mapping

import torch

from .accumulate import GemmArith, gemm
from .chip import GEMM_OPS, ChipProfile

REF_K = 128  # K when the testbed names no hidden size (the tiny testbeds' hidden size)
REF_MN = 128  # rows of A and columns of B: 16384 outputs put the RMS within about 1% (1 / sqrt(2 * 16384))
REF_SEED = 0


@lru_cache(maxsize=None)
def gemm_rel_rms(arith: GemmArith, k: int = REF_K, mn: int = REF_MN, seed: int = REF_SEED) -> float:
    """Relative RMS output error of ``arith`` on the reference GEMM (module docstring); cached per arithmetic."""
    if k < 1 or mn < 1:
        raise ValueError(f"gemm_rel_rms: k and mn must be >= 1, got {k}, {mn}")
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(mn, k, generator=gen, dtype=torch.float64)
    b = torch.randn(k, mn, generator=gen, dtype=torch.float64)
    exact = a @ b
    # stochastic input rounding draws from its own seeded generator: the figure stays fixed
    y = gemm(a.float(), b.float(), arith, gen=torch.Generator().manual_seed(seed + 1)).double()
    return float((y - exact).square().mean().sqrt() / exact.square().mean().sqrt())


def chip_rel_rms(chip: Mapping[str, Any], k: int | None = None) -> float:
    """The reference GEMM's relative RMS error under a ``chip`` config node (a record's ``config.chip``); 0.0 for a
    profile that covers no GEMM (its ``ops`` name only softmax/silu); ``k``: the testbed's hidden size, else 128."""
    profile = ChipProfile.from_dict(dict(chip))
    if not set(profile.ops) & set(GEMM_OPS):
        return 0.0
    k = REF_K if k is None or not (isinstance(k, int) and k > 0) else k
    out = gemm_rel_rms(profile.arith, k)
    return out if math.isfinite(out) else math.nan
