"""A GEMM as a chip computes it: inputs quantized to codes with scales applied outside the matrix unit, products
summed in chunks along K into a narrow accumulator, promoted to float32 every so many elements, the output rounded
to its format.

This is the plain definition (unfused torch, vectorised over M and N, a Python loop over K chunks) that faster
paths (the CUDA kernel) are tested against, bitwise. The matrix unit multiplies codes (values on the element
format's grid, e4m3 up to 448), as torch._scaled_mm and DeepGEMM do: within a chunk the code products are summed
exactly (float64: a chunk of fp8/bf16 products fits in its 53 bits); MX scales (powers of two) multiply each chunk's
sum exactly; what a chip loses, it loses when a chunk's sum is added to the running partial sum, rounded to
``acc_mantissa_bits`` (the alignment-and-truncate of tensor-core adders, Khattak & Mikaitis arXiv 2512.07004);
block scales are applied at promotion, into a float32 total (CUDA-core float32 arithmetic, nearest), and a tensor
scale once at the end.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import formats

ACC_ROUNDINGS = ("rne", "toward_zero")
REDUCTION_ORDERS = ("fixed", "random")
ACC_ALIGNMENTS = ("exact", "max_exponent", "max_exponent_unnormalized")
_TILE = 1 << 16                      # outputs summed at once: acc and a chunk's sum stay in the L2 cache


@dataclass(frozen=True)
class GemmArith:
    """One chip's matrix-unit arithmetic, named as the literature names it.

    in_format: format of both inputs (``formats.FORMATS`` names; ``fp32`` leaves float32 inputs as they are).
    in_scaling: ``none`` | ``tensor`` | ``block`` | ``mx`` (``formats.quantize_scaled_codes``; scales along K).
    scale_block: block length along K for ``block``/``mx`` scales (MX: 32); ``block`` scales are applied at
        promotion (so ``promote_every`` must equal it), ``mx`` scales to each chunk's sum (so ``chunk`` divides it).
    in_rounding: ``nearest`` | ``stochastic`` for the inputs.
    chunk: products summed exactly before each add into the accumulator (a tensor-core instruction's K).
    acc_mantissa_bits: stored mantissa bits of the accumulator (float32: 23; Hopper FP8 fast accumulation: ~13).
    acc_rounding: ``rne`` | ``toward_zero`` for each add into the accumulator.
    promote_every: K elements after which the accumulator is added into a float32 total and cleared (a multiple of
        ``chunk``); None: never (the accumulator holds the whole sum).
    out_format: format of the output (``fp32``, ``bf16``, ...), rounded to nearest.
    overflow: ``saturate`` | ``inf`` for every rounding step (``formats.quantize``).
    reduction_order: ``fixed`` (chunks added in K order) | ``random`` (each call adds them in an order drawn from
        its generator: split-K in a random order, ``chunk_order``).
    acc_alignment: ``exact`` (a chunk's products summed exactly, the sum added to the accumulator and rounded to
        ``acc_mantissa_bits``) | ``max_exponent`` (a tensor core's adder: the chunk's products and the accumulator
        aligned to the largest exponent among them and each cut to ``acc_mantissa_bits`` fraction bits below it,
        toward zero or to nearest by ``acc_rounding``, then summed; Khattak & Mikaitis arXiv 2512.07004) |
        ``max_exponent_unnormalized`` (the adder as the H200's FP8 tensor core computes it, bit for bit on recorded
        outputs: each product aligned by the sum of its inputs' exponents, unnormalized as the multiplier forms it,
        a subnormal input counted at its format's smallest normal exponent, the accumulator by its leading bit;
        each cut to ``acc_mantissa_bits`` fraction bits below the largest; the sum then cut to
        ``acc_mantissa_bits + 1`` significant bits; ``aligned_sum_unnormalized``).
    b_format: the format of B's codes where it is not ``in_format`` (a backward GEMM's other operand); the
        unnormalized adder reads its smallest normal exponent, and ``gemm`` quantizes B to it.
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
    reduction_order: str = "fixed"
    acc_alignment: str = "exact"
    b_format: Optional[str] = None

    def __post_init__(self) -> None:
        formats.get(self.in_format)
        formats.get(self.out_format)
        if self.b_format is not None:
            formats.get(self.b_format)
        for key, value, valid in (("in_scaling", self.in_scaling, formats.SCALINGS),
                                  ("in_rounding", self.in_rounding, ("nearest", "stochastic")),
                                  ("acc_rounding", self.acc_rounding, ACC_ROUNDINGS),
                                  ("overflow", self.overflow, formats.OVERFLOWS),
                                  ("reduction_order", self.reduction_order, REDUCTION_ORDERS),
                                  ("acc_alignment", self.acc_alignment, ACC_ALIGNMENTS)):
            if value not in valid:
                raise ValueError(f"GemmArith.{key}={value!r} is not valid; valid choices: {list(valid)}")
        if self.chunk < 1 or not 1 <= self.acc_mantissa_bits <= 52:
            raise ValueError(f"GemmArith: chunk must be >= 1 and acc_mantissa_bits in 1..52, got "
                             f"{self.chunk}, {self.acc_mantissa_bits}")
        if self.promote_every is not None and (self.promote_every < self.chunk or self.promote_every % self.chunk):
            raise ValueError(f"GemmArith.promote_every must be a multiple of chunk={self.chunk} or null, got "
                             f"{self.promote_every}")
        if self.in_scaling == "block" and self.promote_every != self.scale_block:
            raise ValueError(f"GemmArith: in_scaling=block applies each block's scales when its partial sum is "
                             f"promoted, so promote_every must equal scale_block; got promote_every="
                             f"{self.promote_every}, scale_block={self.scale_block}")
        if self.in_scaling == "mx" and self.acc_alignment == "max_exponent_unnormalized":
            raise ValueError("GemmArith: acc_alignment=max_exponent_unnormalized with in_scaling=mx is not modelled "
                             "(the H200 adder was measured on unscaled FP8 codes); valid: in_scaling none, tensor, "
                             "block")
        if self.in_scaling == "mx" and self.scale_block % self.chunk:
            raise ValueError(f"GemmArith: in_scaling=mx scales each chunk's sum by its block's scales, so chunk must "
                             f"divide scale_block; got chunk={self.chunk}, scale_block={self.scale_block}")


def quantize_codes(x: Tensor, arith: GemmArith, k_dim: int,
                   gen: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor]]:
    """A GEMM operand as the chip stores it: (codes, inv), float32 codes on the element grid and the dequantization
    multiplier (None; 0-dim for ``tensor``; per block along ``k_dim`` for ``block``/``mx``: A [..., M, K/blk],
    B [..., K/blk, N]); ``formats.quantize_scaled_codes``."""
    if arith.in_format == "fp32" and arith.in_scaling == "none":
        return x.detach().float(), None
    return formats.quantize_scaled_codes(x, arith.in_format, arith.in_scaling, dim=k_dim, block=arith.scale_block,
                                         rounding=arith.in_rounding, overflow=arith.overflow, gen=gen)


def quantize_input(x: Tensor, arith: GemmArith, k_dim: int, gen: Optional[torch.Generator] = None) -> Tensor:
    """A GEMM operand's values as the chip stores it (codes * inv, float32), scales along ``k_dim``."""
    codes, inv = quantize_codes(x, arith, k_dim, gen)
    return formats.dequantize(codes, inv, k_dim, arith.scale_block)


def chunk_order(arith: GemmArith, k: int, gen: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """The order (int64 chunk indices, on the CPU) in which one call adds its ceil(k / chunk) chunks: None for
    ``fixed``. ``random``: a permutation drawn from ``gen`` (torch's default generator when None), a fresh draw each
    call; with promotion, the promotion groups in a random order (``randperm``) and the chunks within each group in
    a random order (one ``rand`` key per chunk, sorted within its group), each group's chunks kept together."""
    if arith.reduction_order == "fixed":
        return None
    nc = -(-k // arith.chunk)
    dev = gen.device if gen is not None else torch.device("cpu")
    if arith.promote_every is None:
        return torch.randperm(nc, generator=gen, device=dev).cpu()
    per = arith.promote_every // arith.chunk
    groups = torch.randperm(-(-nc // per), generator=gen, device=dev).cpu()
    keys = torch.rand(nc, generator=gen, device=dev, dtype=torch.float64).cpu()
    within = torch.argsort(torch.arange(nc, dtype=torch.float64).div(per).floor() + keys, stable=True)
    return torch.cat([within[g * per:(g + 1) * per] for g in groups.tolist()])


def aligned_sum(acc: Tensor, prods: Tensor, bits: int, rne: bool) -> Tensor:
    """acc + the sum of ``prods`` along dim -2 as an aligning adder computes it: every term (acc and each product)
    cut to a multiple of 2**(e - bits), e the exponent of the largest |term| (its leading bit), toward zero or to
    nearest even, then summed exactly (float64: the cut terms are integers times one power of two, and their integer
    sum spans at most bits + log2(chunk + 1) + 1 bits)."""
    big = torch.maximum(acc.abs(), prods.abs().amax(-2))
    _, e2 = torch.frexp(big)                        # big = m * 2**e2, 0.5 <= m < 1: the leading bit is 2**(e2 - 1)
    return _cut_sum(acc, prods, e2 - 1 - bits, torch.round if rne else torch.trunc)


def _cut_sum(acc: Tensor, prods: Tensor, k: Tensor, cut) -> Tensor:
    """acc and every product along dim -2 cut to multiples of 2**k by ``cut``, then summed (exact scalings)."""
    whole = cut(prods * formats.pow2(-k).unsqueeze(-2)).sum(-2) + cut(acc * formats.pow2(-k))
    return whole * formats.pow2(k)


def code_exponents(codes: Tensor, fmt: str) -> Tensor:
    """Each code's exponent as a multiplier reads it (float64): floor(log2 |c|), a subnormal at the format's
    smallest normal exponent; zero far below any other (-10**4), so it never sets an alignment."""
    e = (torch.frexp(codes.abs())[1] - 1).to(torch.float64).clamp_(min=formats.get(fmt).emin)
    return e.masked_fill_(codes == 0, -1e4)


def aligned_sum_unnormalized(acc: Tensor, prods: Tensor, e_prods: Tensor, bits: int, rne: bool) -> Tensor:
    """acc + the sum of ``prods`` along dim -2 as the H200's FP8 adder computes it: E the largest of the products'
    unnormalized exponents ``e_prods`` (the sums of their inputs' exponents: a product's significand is in
    [1, 4)) and acc's leading bit; every term cut to a multiple of 2**(E - bits); the exact sum then cut to
    bits + 1 significant bits. Toward zero (the hardware) or to nearest even."""
    low = -1e4
    e_acc = (torch.frexp(acc)[1] - 1).to(torch.float64).masked_fill_(acc == 0, low)
    big = torch.maximum(e_prods.amax(-2), e_acc)
    k = torch.where(big > low / 2, big - bits, torch.zeros_like(big))   # all terms 0: any scale does
    cut = torch.round if rne else torch.trunc
    s = _cut_sum(acc, prods, k, cut)
    ks = (torch.frexp(s)[1] - 1 - bits).to(torch.float64)                 # the sum's own bits + 1 kept
    return cut(s * formats.pow2(-ks)) * formats.pow2(ks)


@dataclass(frozen=True)
class Operands:
    """What ``accumulate`` sums, as every path reads it: float64 codes with K zero-padded to whole chunks, the
    chunk count, ``mx`` scales per chunk (A [..., M, nc], B [..., nc, N]; exact powers of two) and ``block`` scales
    per promotion group ([..., K/blk, M, N], float32: inv_a * inv_b, one float32 multiply)."""

    a64: Tensor
    b64: Tensor
    nc: int
    ia: Optional[Tensor] = None
    ib: Optional[Tensor] = None
    scales: Optional[Tensor] = None


def operands(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a: Optional[Tensor] = None,
             inv_b: Optional[Tensor] = None) -> Operands:
    ch = arith.chunk
    a64, b64 = ca.to(torch.float64), cb.to(torch.float64)
    k = a64.shape[-1]
    nc = -(-k // ch)
    if k % ch:                                   # zero-pad K to whole chunks
        a64 = torch.nn.functional.pad(a64, (0, nc * ch - k))
        b64 = torch.nn.functional.pad(b64, (0, 0, 0, nc * ch - k))
    return Operands(a64, b64, nc, *chunk_scales(inv_a, inv_b, arith, nc))


def chunk_scales(inv_a: Optional[Tensor], inv_b: Optional[Tensor], arith: GemmArith, nc: int) -> tuple:
    """``Operands``' scales for ``nc`` chunks: (ia, ib, scales), ``mx``'s per chunk or ``block``'s per group."""
    ia = ib = scales = None
    if arith.in_scaling == "mx":
        per = arith.scale_block // arith.chunk
        ia = inv_a.to(torch.float64).repeat_interleave(per, -1)[..., :nc]
        ib = inv_b.to(torch.float64).repeat_interleave(per, -2)[..., :nc, :]
    elif arith.in_scaling == "block":
        scales = block_scales(inv_a, inv_b)
    return ia, ib, scales


def block_scales(inv_a: Tensor, inv_b: Tensor) -> Tensor:
    """``block`` scales per promotion group, [..., K/blk, M, N]: float32(inv_a * inv_b), one float32 multiply."""
    return inv_a.float().movedim(-1, -2).unsqueeze(-1) * inv_b.float().unsqueeze(-2)


def accumulate(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a: Optional[Tensor] = None,
               inv_b: Optional[Tensor] = None, order: Optional[Tensor] = None) -> Tensor:
    """``ca @ cb`` of codes ([..., M, K] @ [..., K, N], ``quantize_codes``'s, scales ``inv_a``/``inv_b``) summed as
    ``arith`` sums it; float32 result before the bias and the output rounding.

    Chunk c (K elements c*chunk ... , the last zero-padded) has the exact float64 sum of its code products; for
    ``mx`` times inv_a * inv_b of its block (exact: powers of two). The chunks are added in ``order`` (default
    0, 1, ...) into a float64 accumulator, the sum (a float64 add: exact while acc and the chunk's sum span at most
    53 bits, as fp8/fp6/fp4 codes always do) rounded to ``acc_mantissa_bits`` after each add (by masking its bit
    pattern: exact, with float64's exponent range).
    With promotion, when the next chunk is in another promotion group (c * chunk // promote_every) or none is
    left, float32(acc) is added into a float32 total (nearest) and acc cleared; for ``block`` the promoted term is
    float32(acc) * float32(inv_a_blk * inv_b_blk), two float32 multiplies, then the add (no fused multiply-add).
    Without promotion the total is float32(acc). ``tensor``: the result is total * float32(inv_a * inv_b)."""
    n_out = cb.shape[-1]
    rows = ca.numel() // max(ca.shape[-1], 1)
    step = _TILE // max(n_out, 1)
    if cb.dim() == 2 and rows > 2 * step >= 16:  # rows are independent: a cache-sized tile of them at once
        a2 = ca.reshape(rows, ca.shape[-1])
        i2 = inv_a.reshape(rows, inv_a.shape[-1]) if inv_a is not None and inv_a.dim() else inv_a
        y = torch.cat([accumulate(a2[r:r + step], cb, arith, None if i2 is None else
                                  (i2[r:r + step] if i2.dim() else i2), inv_b, order)
                       for r in range(0, rows, step)])
        return y.reshape(*ca.shape[:-1], n_out)
    ch = arith.chunk
    op = operands(ca, cb, arith, inv_a, inv_b)
    a64, b64, nc, ia, ib, scales = op.a64, op.b64, op.nc, op.ia, op.ib, op.scales
    seq = range(nc) if order is None else order.tolist()
    # one chunk's sum at a time (a matmul with K = chunk into a reused buffer): the [nc, M, N] of all chunks'
    # sums costs nc times the output's memory and a slow batched matmul for small chunks
    a_ch, b_ch = a64.split(ch, -1), b64.split(ch, -2)
    part = torch.matmul(a_ch[0], b_ch[0])
    acc = torch.zeros_like(part)
    iv = acc.view(torch.int64)
    drop = 52 - arith.acc_mantissa_bits
    rne = arith.acc_rounding == "rne"
    promote = arith.promote_every is not None
    total = torch.zeros(acc.shape, dtype=torch.float32, device=ca.device) if promote else None
    per = (arith.promote_every // ch) if promote else 0
    aligned = arith.acc_alignment != "exact"
    if arith.acc_alignment == "max_exponent_unnormalized":       # the multiplier's exponents, per chunk
        ea_ch = code_exponents(a64, arith.in_format).split(ch, -1)
        eb_ch = code_exponents(b64, arith.b_format or arith.in_format).split(ch, -2)
    # RNE on the bit pattern can carry a NaN's payload through the exponent into the sign; NaN needs a NaN or inf
    # code or scale, so only then does each rounding keep its NaNs (one check a call, not one a chunk)
    guard_nan = rne and drop > 0 and not aligned and not all(
        bool(torch.isfinite(t).all()) for t in (a64, b64, ia, ib) if t is not None)
    for pos, c in enumerate(seq):
        if aligned:
            prods = a_ch[c].unsqueeze(-1) * b_ch[c].unsqueeze(-3)          # [..., M, chunk, N], exact
            if ia is not None:
                prods = prods * ia[..., c:c + 1].unsqueeze(-1) * ib[..., c:c + 1, :].unsqueeze(-3)
            if arith.acc_alignment == "max_exponent":
                acc.copy_(aligned_sum(acc, prods, arith.acc_mantissa_bits, rne))   # rounded as it adds
            else:
                e_prods = ea_ch[c].unsqueeze(-1) + eb_ch[c].unsqueeze(-3)
                acc.copy_(aligned_sum_unnormalized(acc, prods, e_prods, arith.acc_mantissa_bits, rne))
        else:
            torch.matmul(a_ch[c], b_ch[c], out=part)
            if ia is not None:
                part.mul_(ia[..., c:c + 1]).mul_(ib[..., c:c + 1, :])
            acc.add_(part)
        if drop > 0 and not aligned:      # mask the dropped bits; RNE first adds half an ulp less one + the kept LSB
            nan = acc.isnan() if guard_nan else None
            if rne:
                iv.add_(((iv >> drop) & 1).add_((1 << (drop - 1)) - 1))
            iv.bitwise_and_(~((1 << drop) - 1))
            if nan is not None:
                acc.masked_fill_(nan, float("nan"))
        if promote and (pos + 1 == nc or seq[pos + 1] // per != c // per):
            term = acc.float()
            if scales is not None:
                term = term * scales[..., c // per, :, :]
            total.add_(term)                     # float32 add, round to nearest
            acc.zero_()
    y = total if promote else acc.float()
    if arith.in_scaling == "tensor":
        y = y * (inv_a.float() * inv_b.float())  # the two scales multiplied first, then the total (float32)
    return y


def b_arith(arith: GemmArith) -> GemmArith:
    """The arithmetic B is quantized under: ``b_format`` where B has its own."""
    return arith if arith.b_format is None else dataclasses.replace(arith, in_format=arith.b_format)


class Paths(NamedTuple):
    """What ``gemm`` runs for each of its three stages: the definitions, or faster paths with the definitions'
    arguments and bits (the compiled CPU loops, ``chip.CPU_PATHS``). ``quantize`` may round its argument in place:
    ``gemm`` passes it the float32 sum it owns. ``accumulate_out``, where given, runs the sum and the epilogue (bias,
    output rounding) as one stage: ``(ca, cb, arith, inv_a, inv_b, order, bias)`` -> the output, the same bits.
    ``gemm``, where given, is all of it in one stage where it covers the call (``gemm``'s arguments but ``paths``):
    the output with the same bits, or None, and the stages run."""

    quantize_codes: Callable[..., tuple]
    accumulate: Callable[..., Tensor]
    quantize: Callable[..., Tensor]
    accumulate_out: Optional[Callable[..., Tensor]] = None
    gemm: Optional[Callable[..., Optional[Tensor]]] = None


DEFINITION = Paths(quantize_codes, accumulate, formats.quantize)


def gemm(a: Tensor, b: Tensor, arith: GemmArith, gen: Optional[torch.Generator] = None,
         bias: Optional[Tensor] = None, qb: Union[Tensor, tuple, None] = None,
         paths: Paths = DEFINITION) -> Tensor:
    """``a @ b (+ bias)`` under ``arith``: inputs quantized to codes (scales along K), summed by ``accumulate`` in
    ``chunk_order``'s order, the bias added to the float32 sum (the GEMM's epilogue, before the output's rounding),
    output rounded to ``arith.out_format``. Returns float32 values on ``out_format``'s grid. ``gen``: stochastic
    input rounding (a, then b) and the random reduction order, drawn in that order. ``qb``: ``b`` already
    quantized, e.g. a weight reused across calls: ``quantize_codes(b, arith, -2)``'s (codes, inv). ``paths``: the
    stages' implementations (``Paths``)."""
    if a.dim() < 2 or b.dim() < 2 or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not multiply")
    y = paths.gemm(a, b, arith, gen, bias, qb) if paths.gemm is not None else None
    if y is not None:
        return y
    ca, inv_a = paths.quantize_codes(a, arith, -1, gen)
    cb, inv_b = qb if qb is not None else paths.quantize_codes(b, b_arith(arith), -2, gen)
    order = chunk_order(arith, a.shape[-1], gen)
    if paths.accumulate_out is not None:
        return paths.accumulate_out(ca, cb, arith, inv_a, inv_b, order, bias)
    y = paths.accumulate(ca, cb, arith, inv_a, inv_b, order)
    if bias is not None:
        y = y + bias.detach().float()
    if arith.out_format == "fp32":
        return y
    return paths.quantize(y, arith.out_format, "nearest", arith.overflow)
