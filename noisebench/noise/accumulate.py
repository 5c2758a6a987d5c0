"""A GEMM as a chip computes it: quantized inputs, products summed in chunks along K into a narrow accumulator,
promoted to float32 every so many elements, the output rounded to its format.

This is the plain definition (unfused torch, vectorised over M and N, a Python loop over K chunks) that faster
paths are tested against. Within a chunk the products are summed exactly (float64: a chunk of fp8/bf16 products
fits in its 53 bits); what a chip loses, it loses when a chunk's sum is added to the running partial sum, rounded
to ``acc_mantissa_bits`` (the alignment-and-truncate of tensor-core adders, Khattak & Mikaitis arXiv 2512.07004);
the promoted total is a float32 sum, rounded to nearest as CUDA cores do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import formats

ACC_ROUNDINGS = ("rne", "toward_zero")


@dataclass(frozen=True)
class GemmArith:
    """One chip's matrix-unit arithmetic, named as the literature names it.

    in_format: format of both inputs (``formats.FORMATS`` names; ``fp32`` leaves float32 inputs as they are).
    in_scaling: ``none`` | ``tensor`` | ``block`` | ``mx`` (``formats.quantize_scaled``; scales along K).
    scale_block: block length along K for ``block``/``mx`` scales (MX: 32).
    in_rounding: ``nearest`` | ``stochastic`` for the inputs.
    chunk: products summed exactly before each add into the accumulator (a tensor-core instruction's K).
    acc_mantissa_bits: stored mantissa bits of the accumulator (float32: 23; Hopper FP8 fast accumulation: ~13).
    acc_rounding: ``rne`` | ``toward_zero`` for each add into the accumulator.
    promote_every: K elements after which the accumulator is added into a float32 total and cleared (a multiple of
        ``chunk``); None: never (the accumulator holds the whole sum).
    out_format: format of the output (``fp32``, ``bf16``, ...), rounded to nearest.
    overflow: ``saturate`` | ``inf`` for every rounding step (``formats.quantize``).
    """

    in_format: str = "bf16"
    in_scaling: str = "none"
    scale_block: int = formats.MX_BLOCK
    in_rounding: str = "nearest"
    chunk: int = 32
    acc_mantissa_bits: int = 23
    acc_rounding: str = "rne"
    promote_every: Optional[int] = None
    out_format: str = "fp32"
    overflow: str = "saturate"

    def __post_init__(self) -> None:
        formats.get(self.in_format)
        formats.get(self.out_format)
        for key, value, valid in (("in_scaling", self.in_scaling, formats.SCALINGS),
                                  ("in_rounding", self.in_rounding, ("nearest", "stochastic")),
                                  ("acc_rounding", self.acc_rounding, ACC_ROUNDINGS),
                                  ("overflow", self.overflow, formats.OVERFLOWS)):
            if value not in valid:
                raise ValueError(f"GemmArith.{key}={value!r} is not valid; valid choices: {list(valid)}")
        if self.chunk < 1 or not 1 <= self.acc_mantissa_bits <= 52:
            raise ValueError(f"GemmArith: chunk must be >= 1 and acc_mantissa_bits in 1..52, got "
                             f"{self.chunk}, {self.acc_mantissa_bits}")
        if self.promote_every is not None and (self.promote_every < self.chunk or self.promote_every % self.chunk):
            raise ValueError(f"GemmArith.promote_every must be a multiple of chunk={self.chunk} or null, got "
                             f"{self.promote_every}")


def quantize_input(x: Tensor, arith: GemmArith, k_dim: int, gen: Optional[torch.Generator] = None) -> Tensor:
    """A GEMM operand as the chip stores it, scales taken along the reduction dim ``k_dim``."""
    if arith.in_format == "fp32" and arith.in_scaling == "none":
        return x.detach().float()
    return formats.quantize_scaled(x, arith.in_format, arith.in_scaling, dim=k_dim, block=arith.scale_block,
                                   rounding=arith.in_rounding, overflow=arith.overflow, gen=gen)


def round_acc(acc: Tensor, bits: int, rounding: str) -> Tensor:
    """float64 ``acc`` rounded in place to ``bits`` stored mantissa bits (``rne`` or ``toward_zero``) by masking
    its bit pattern: exact, with float64's exponent range (an accumulator that drops low bits, never overflows
    here). Returns ``acc``."""
    drop = 52 - bits
    if drop <= 0:
        return acc
    iv = acc.view(torch.int64)
    if rounding == "rne":                        # add half an ulp less one, plus the kept LSB: ties go to even
        iv.add_(((iv >> drop) & 1).add_((1 << (drop - 1)) - 1))
    iv.bitwise_and_(~((1 << drop) - 1))
    return acc


def chunk_sums(a64: Tensor, b64: Tensor, chunk: int) -> Tensor:
    """The products of each K chunk summed: [..., K/chunk, M, N] (K zero-padded to a multiple of ``chunk``), one
    batched matmul; exact while a chunk's sum fits float64's 53 bits (fp8 and MX inputs always do)."""
    k = a64.shape[-1]
    pad = (-k) % chunk
    if pad:
        a64 = torch.nn.functional.pad(a64, (0, pad))
        b64 = torch.nn.functional.pad(b64, (0, 0, 0, pad))
    nc = (k + pad) // chunk
    a = a64.reshape(*a64.shape[:-1], nc, chunk).movedim(-2, -3)        # [..., nc, M, chunk]
    b = b64.reshape(*b64.shape[:-2], nc, chunk, b64.shape[-1])         # [..., nc, chunk, N]
    return a @ b


def accumulate(qa: Tensor, qb: Tensor, arith: GemmArith) -> Tensor:
    """``qa @ qb`` (already quantized, [..., M, K] @ [..., K, N]) summed as ``arith`` sums it; float32 result
    before the output rounding. Each chunk's exact sum is added to the accumulator and the sum rounded
    (``round_acc``); every ``promote_every`` elements (and at the end) the accumulator is added into a float32
    total (one float32 add, nearest) and cleared."""
    parts = chunk_sums(qa.to(torch.float64), qb.to(torch.float64), arith.chunk)   # no copy for float64 qb
    k = qa.shape[-1]
    acc = torch.zeros_like(parts[..., 0, :, :])
    total = torch.zeros(acc.shape, dtype=torch.float32, device=qa.device)
    for i in range(parts.shape[-3]):
        round_acc(acc.add_(parts[..., i, :, :]), arith.acc_mantissa_bits, arith.acc_rounding)
        done = (i + 1) * arith.chunk
        if arith.promote_every is not None and (done % arith.promote_every == 0 or done >= k):
            total.add_(acc.float())              # float32 add, round to nearest
            acc.zero_()
    return total if arith.promote_every is not None else acc.float()


def gemm(a: Tensor, b: Tensor, arith: GemmArith, gen: Optional[torch.Generator] = None,
         bias: Optional[Tensor] = None, qb: Optional[Tensor] = None) -> Tensor:
    """``a @ b (+ bias)`` under ``arith``: inputs quantized (scales along K), summed by ``accumulate``, the bias
    added to the float32 sum (the GEMM's epilogue, before the output's rounding), output rounded to
    ``arith.out_format``. Returns float32 values on ``out_format``'s grid. ``qb``: ``b`` already quantized
    (``quantize_input(b, arith, -2)``, any float dtype), e.g. a weight reused across calls."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not multiply")
    qa = quantize_input(a, arith, -1, gen)
    if qb is None:
        qb = quantize_input(b, arith, -2, gen)
    y = accumulate(qa, qb, arith)
    if bias is not None:
        y = y + bias.detach().float()
    if arith.out_format == "fp32":
        return y
    return formats.quantize(y, arith.out_format, "nearest", arith.overflow)
