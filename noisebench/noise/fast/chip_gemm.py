"""A chip's GEMM arithmetic in one Triton kernel: the accumulator's rounding inside the K loop.

Computes what ``noisebench.noise.accumulate.accumulate`` defines (codes times codes, chunk sums added into a
narrow accumulator, promotion into a float32 total, scales, bias, output rounding) at tensor-core speed: each K tile
of ``chunk`` elements is one ``tl.dot`` of bf16 codes (exact: fp8/MX codes are bf16 values) into a fresh float32
tile; that chunk sum is added to the accumulator in registers and the sum rounded to ``acc_mantissa_bits`` by
integer operations on its float32 bit pattern.

Where it differs from the definition: the tensor core sums a chunk's products in its own way (not exactly; Hopper
keeps few guard bits), so the kernel matches the definition bitwise only when the chunk sums are exact in float32.
The add into the accumulator is exact-then-rounded, as the definition's float64 add is: toward zero through the
hardware's round-toward-zero add (``add.rz``: truncating a truncation is the truncation), round-to-nearest through
TwoSum's error term, which decides the ties the float32 add hid, and a float32 accumulator (23 bits, nearest)
through ``add.rn``, which Triton cannot fold into the dot as it folds ``acc + tl.dot(a, b)``. MX scales multiply
the codes before the kernel where K is a whole number of blocks and N is wide (a float32 multiply rounded to bf16;
the loop then runs as an unscaled one, and the extra pass over A pays for itself), else a chunk's codes inside the
loop before its dot (the same products: one power of two for all of a chunk's products). Accumulators wider than
float32 (more than 23 bits) are not supported (the caller falls back to the definition), nor chunks that are not a
tensor-core K.

The aligning adder (``acc_alignment: max_exponent``) cuts each product before the sum, which no tensor-core
instruction does: for it the kernel forms the chunk's [BM, chunk, BN] products on CUDA cores and cuts and sums them
in float32/int32 (``_aligned_add``), exact for FP8/FP6/FP4 codes, so that path equals the definition bitwise.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.testing
import triton.language as tl
from torch import Tensor

from .tiles import grouped_tile

CHUNKS = (16, 32, 64, 128)                   # tensor-core K tiles of a bf16 dot
SCALINGS = {"none": 0, "tensor": 1, "block": 2, "mx": 3}
BF16_EXACT = ("bf16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1",
              "mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1")
BF16_MAX = float(torch.finfo(torch.bfloat16).max)
# (BM, BN, num_warps, num_stages): three float32 tiles live per program (chunk sum, accumulator, total)
CONFIGS = ((128, 128, 8, 3), (128, 128, 8, 4), (64, 128, 4, 4), (128, 64, 4, 4), (64, 256, 8, 3),
           (128, 256, 8, 3))
# the aligning adder holds a [BM, chunk, BN] float32 tile of products: small tiles
ALIGNED_CONFIGS = ((16, 16, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2), (32, 32, 8, 2), (64, 32, 8, 2))
# fixed tiles for shapes not worth timing (a training step's GEMMs change shape every call: decode, attention)
SMALL_CONFIG, ALIGNED_SMALL_CONFIG = (64, 64, 4, 3), (16, 16, 4, 2)
ALIGNED_FORMATS = ("fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1")   # code products exact in float32
INTERPRET_CONFIG = (32, 32, 4, 1)
_TUNED: dict = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _round_rne(x, DROP: tl.constexpr):
    """float32 ``x`` rounded to 23 - DROP stored mantissa bits, to nearest even, on its bit pattern."""
    iv = x.to(tl.int32, bitcast=True)
    iv = (iv + (((iv >> DROP) & 1) + ((1 << (DROP - 1)) - 1))) & (-(1 << DROP))
    return iv.to(tl.float32, bitcast=True)


@triton.jit
def _add_acc(acc, s, DROP: tl.constexpr, RNE: tl.constexpr, EXACT: tl.constexpr):
    """acc + s rounded to 23 - DROP stored mantissa bits (RNE or toward zero). EXACT: 0 a float32 add then the
    rounding (a double rounding), 1 ``add.rz`` then truncation (toward zero only; CUDA), 2 TwoSum's error term
    decides what the float32 add hid (ties for RNE, a value just under a grid point for toward zero), 3 ``add.rn``
    (23-bit RNE; CUDA): an add Triton cannot see, for it folds ``acc + tl.dot(a, b)`` into the dot, which then
    adds acc inside the tensor core with the tensor core's own rounding, not the definition's."""
    # one return at the end: Triton 3.6 compiles the statements after a return inside a constexpr `if` too
    if EXACT == 3:
        out = tl.inline_asm_elementwise("add.rn.f32 $0, $1, $2;", "=r,r,r", [acc, s], dtype=tl.float32,
                                        is_pure=True, pack=1)
    elif EXACT == 1:
        out = tl.inline_asm_elementwise("add.rz.f32 $0, $1, $2;", "=r,r,r", [acc, s], dtype=tl.float32,
                                        is_pure=True, pack=1)
        if DROP > 0:
            out = (out.to(tl.int32, bitcast=True) & (-(1 << DROP))).to(tl.float32, bitcast=True)
    else:
        x = acc + s
        if RNE and DROP == 0:                 # the float32 add is the rounding
            out = x
        else:
            iv = x.to(tl.int32, bitcast=True)
            if EXACT == 2:                    # TwoSum (Knuth): x + err == acc + s exactly
                bb = x - acc
                err = (acc - (x - bb)) + (s - bb)
                away = ((err > 0) & (x > 0)) | ((err < 0) & (x < 0))
                toward = ((err < 0) & (x > 0)) | ((err > 0) & (x < 0))
            if RNE:
                half = 1 << (DROP - 1)
                bias = ((iv >> DROP) & 1) + (half - 1)
                if EXACT == 2:
                    tie = (iv & ((1 << DROP) - 1)) == half
                    bias = tl.where(tie & away, half, tl.where(tie & toward, 0, bias))
                # a NaN's payload can carry through the exponent into the sign (0x7FFFFFFF -> -0): NaN stays NaN
                iv = tl.where(x != x, iv, (iv + bias) & (-(1 << DROP)))
            else:
                kept = iv & (-(1 << DROP))
                if EXACT == 2:                # x on the grid but the exact sum just inside it: one step down
                    kept = tl.where((kept == iv) & toward, kept - (1 << DROP), kept)
                iv = kept
            out = iv.to(tl.float32, bitcast=True)
    return out


@triton.jit
def _aligned_add(acc, a, b, BITS: tl.constexpr, RNE: tl.constexpr):
    """acc + the chunk's products a[m, k] * b[k, n] as an aligning adder sums them (``accumulate.aligned_sum``):
    every term cut to a multiple of 2**(e - BITS), e the exponent of the largest |term|, then summed. All in float32
    and int32, exactly: code products carry at most 8 significant bits, a cut term is an integer below
    2**(BITS + 1), and chunk + 1 of them sum below 2**24 (``supported`` declines wider sums)."""
    af, bf = a.to(tl.float32), b.to(tl.float32)
    p = af[:, :, None] * bf[None, :, :]       # [BM, CHUNK, BN], exact
    big = tl.maximum(tl.abs(acc), tl.max(tl.abs(p), axis=1))
    ex = (big.to(tl.int32, bitcast=True) >> 23) & 0xFF                     # biased exponent of the leading bit
    ex = tl.maximum(ex, BITS + 1)             # big == 0: every term is 0, any scale does
    inv = ((254 + BITS - ex) << 23).to(tl.float32, bitcast=True)            # 2**-(e - BITS)
    unit = ((ex - BITS) << 23).to(tl.float32, bitcast=True)                 # 2**(e - BITS)
    xp = p * inv[:, None, :]
    xa = acc * inv
    if RNE:                                   # to nearest even: |x| < 2**22, the float32 add rounds at the units
        xp = (xp + 12582912.0) - 12582912.0
        xa = (xa + 12582912.0) - 12582912.0
    whole = tl.sum(xp.to(tl.int32), axis=1) + xa.to(tl.int32)              # float -> int truncates toward zero
    out = whole.to(tl.float32) * unit
    # NaN in: NaN out, and it stays (the definition's float64 sum propagates it)
    nan = (tl.max((af != af).to(tl.int32), axis=1)[:, None] + tl.max((bf != bf).to(tl.int32), axis=0)[None, :]) > 0
    qnan = tl.full(out.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(nan | (acc != acc), qnan, out)


@triton.jit
def _chunk_dot(a, b, UPCAST: tl.constexpr):
    if UPCAST:                                # Triton's interpreter multiplies bf16 tiles as raw 16-bit integers
        s = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        s = tl.dot(a, b)
    return s


@triton.jit
def _finish(y, c_ptrs, sa_ptr, sb_ptr, bias_ptr, rn, mm, mn, SCALING: tl.constexpr, HAS_BIAS: tl.constexpr,
            OUT_BF16: tl.constexpr, SATURATE: tl.constexpr, BF16_MAX: tl.constexpr):
    """The definition's last steps on the float32 result: tensor scales (SCALING 1), bias, the output format."""
    if SCALING == 1:
        y = y * (tl.load(sa_ptr) * tl.load(sb_ptr))
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
    if OUT_BF16:
        if SATURATE:                          # past bf16's max: the max (NaN stays NaN)
            y = tl.where(y > BF16_MAX, BF16_MAX, tl.where(y < -BF16_MAX, -BF16_MAX, y))
        # RNE to 7 bits on the bit pattern, then an exact cast (the interpreter's rtne cast truncates)
        y = tl.where(y != y, y, _round_rne(y, 16))
        tl.store(c_ptrs, y.to(tl.bfloat16), mask=mm[:, None] & mn[None, :])
    else:
        tl.store(c_ptrs, y, mask=mm[:, None] & mn[None, :])


@triton.jit
def _chip_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, NBLK,
                      s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                      s_sab, s_sam, s_sak, s_sbb, s_sbk, s_sbn,
                      SCALING: tl.constexpr, SBLOCK: tl.constexpr, CHUNK: tl.constexpr, DROP: tl.constexpr,
                      RNE: tl.constexpr, EXACT: tl.constexpr, PROMOTE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      OUT_BF16: tl.constexpr, SATURATE: tl.constexpr, BF16_MAX: tl.constexpr,
                      UPCAST: tl.constexpr, ALIGNED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """C[b] = A[b] @ B[b] under the chip arithmetic (module docstring). PROMOTE: chunks per promotion (0: never).
    SCALING 0 none, 1 tensor (0-dim scales at the end), 2 block (scales at promotion), 3 mx (the codes scaled
    before each chunk's dot: all of a chunk's products share one power of two, so the tensor core's sum is the
    scaled sum of the codes' products wherever they stay in float32's normal range)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, CHUNK)
    a_ptrs = a_ptr + bid * s_ab + rm[:, None].to(tl.int64) * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + bid * s_bb + rk[:, None] * s_bk + rn[None, :].to(tl.int64) * s_bn
    sa_ptrs = sa_ptr + bid * s_sab + rm.to(tl.int64) * s_sam
    sb_ptrs = sb_ptr + bid * s_sbb + rn.to(tl.int64) * s_sbn
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    total = tl.zeros((BM, BN), dtype=tl.float32)
    n_chunks = tl.cdiv(K, CHUNK)
    if PROMOTE > 0:                           # whole promotion groups; chunks past K are zeros and change nothing
        n_chunks = tl.cdiv(n_chunks, PROMOTE) * PROMOTE
    for i in range(0, n_chunks):
        kk = i * CHUNK + rk
        a = tl.load(a_ptrs, mask=mm[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptrs, mask=(kk[:, None] < K) & mn[None, :], other=0.0)
        if SCALING == 3:                      # MX: the chunk's codes times their block's powers of two (exact)
            blk = tl.minimum((i * CHUNK) // SBLOCK, NBLK - 1)   # past K the codes are 0 whatever the scale
            sa = tl.load(sa_ptrs + blk * s_sak, mask=mm, other=1.0)
            sb = tl.load(sb_ptrs + blk * s_sbk, mask=mn, other=1.0)
            a = (a.to(tl.float32) * sa[:, None]).to(a.dtype)
            b = (b.to(tl.float32) * sb[None, :]).to(b.dtype)
        if ALIGNED:                           # per-product cuts on CUDA cores (no MX scales: ``supported``)
            if i * CHUNK < K:                 # a padding chunk would cut acc again at its own leading bit
                acc = _aligned_add(acc, a, b, 23 - DROP, RNE)
        else:
            acc = _add_acc(acc, _chunk_dot(a, b, UPCAST), DROP, RNE, EXACT)
        if PROMOTE > 0:
            if (i + 1) % PROMOTE == 0:
                if SCALING == 2:              # block scales: float32(acc) * float32(inv_a * inv_b), then the add
                    g = i // PROMOTE
                    sa = tl.load(sa_ptrs + g * s_sak, mask=mm, other=1.0)
                    sb = tl.load(sb_ptrs + g * s_sbk, mask=mn, other=1.0)
                    total = total + acc * (sa[:, None] * sb[None, :])
                else:
                    total = total + acc
                acc = tl.zeros((BM, BN), dtype=tl.float32)
        a_ptrs += CHUNK * s_ak
        b_ptrs += CHUNK * s_bk
    y = total if PROMOTE > 0 else acc
    c_ptrs = c_ptr + bid * s_cb + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn
    _finish(y, c_ptrs, sa_ptr, sb_ptr, bias_ptr, rn, mm, mn, SCALING, HAS_BIAS, OUT_BF16, SATURATE, BF16_MAX)


def supported(arith) -> Optional[str]:
    """None when the kernel computes ``arith``; else why not (the caller then uses the definition)."""
    if arith.chunk not in CHUNKS:
        return f"chunk {arith.chunk} is not a tensor-core K ({CHUNKS})"
    if arith.acc_mantissa_bits > 23:
        return f"a {arith.acc_mantissa_bits}-bit accumulator is wider than float32's"
    if arith.in_scaling not in SCALINGS:
        return f"in_scaling {arith.in_scaling!r}"
    if arith.in_format not in BF16_EXACT:
        return f"in_format {arith.in_format!r} codes are not all bf16 values"
    if arith.out_format not in ("fp32", "bf16"):
        return f"out_format {arith.out_format!r}"
    if arith.reduction_order != "fixed":
        return "a random reduction order"
    if arith.acc_alignment == "max_exponent_unnormalized":
        return "the unnormalized aligning adder (the kernel cuts as max_exponent does)"
    if arith.acc_alignment == "max_exponent":
        if arith.in_scaling == "mx":
            return "an aligning adder with MX scales (scaled products can leave float32's range)"
        if arith.acc_mantissa_bits + 1 + (arith.chunk + 1).bit_length() > 24:
            return (f"an aligning adder of {arith.acc_mantissa_bits} bits over chunks of {arith.chunk}: its sum of "
                    f"cut terms can pass 2**24 (not float32-exact)")
        if arith.in_format not in ALIGNED_FORMATS:
            return f"an aligning adder on {arith.in_format!r} (products not exact in float32)"
    if arith.in_scaling == "block" and arith.promote_every != arith.scale_block:
        return "block scales need promote_every == scale_block"
    if arith.in_scaling == "mx" and arith.scale_block % arith.chunk:
        return "mx scales need chunk to divide scale_block"
    return None


def small_config(arith) -> tuple:
    """The fixed (BM, BN, num_warps, num_stages) for ``arith`` where timing the configs costs more than it saves."""
    return ALIGNED_SMALL_CONFIG if arith.acc_alignment == "max_exponent" else SMALL_CONFIG


@functools.lru_cache(maxsize=None)
def _ones(dev: torch.device) -> Tensor:
    """The unit scales of an unscaled GEMM (one per device, not a fill kernel per call)."""
    return torch.ones(1, 1, 1, dtype=torch.float32, device=dev)


def _exact_mode(arith, exact: Optional[int]) -> int:
    if exact is not None:
        return exact
    if arith.acc_rounding == "toward_zero":
        return 2 if _interpreting() else 1    # no inline PTX in the interpreter
    if arith.acc_mantissa_bits == 23:
        return 0 if _interpreting() else 3
    return 2


def _batched(x: Tensor, batch: tuple, tail: int) -> Tensor:
    """``x`` broadcast to ``batch`` + its last ``tail`` dims, flattened to one batch dim (a view when it can be)."""
    return x.expand(*batch, *x.shape[x.dim() - tail:]).reshape(-1, *x.shape[x.dim() - tail:])


def _as_batched(codes_a: Tensor, codes_b: Tensor, inv_a, inv_b, scaled: bool) -> tuple:
    """The operands as [B, M, K] @ [B, K, N] (a linear's batch dims become rows; matmul's broadcast batch is
    flattened), their per-block scales alike where ``scaled``, and the result's leading dims: (a, b, inv_a, inv_b,
    lead)."""
    k = codes_a.shape[-1]
    if codes_b.dim() == 2:                    # a linear: the batch dims are rows
        lead = codes_a.shape[:-1]
        a, b = codes_a.reshape(1, -1, k), codes_b.unsqueeze(0)
        if scaled:
            inv_a, inv_b = inv_a.reshape(1, -1, inv_a.shape[-1]), inv_b.unsqueeze(0)
    else:
        batch = torch.broadcast_shapes(codes_a.shape[:-2], codes_b.shape[:-2])
        lead = (*batch, codes_a.shape[-2])
        a, b = _batched(codes_a, batch, 2), _batched(codes_b, batch, 2)
        if scaled:
            inv_a, inv_b = _batched(inv_a, batch, 2), _batched(inv_b, batch, 2)
    return a, b, inv_a, inv_b, lead


PRESCALE_MIN_N = 512   # the pass over A pays where N is wide (H100, M = 4096: N = 256 lost 0.21 -> 0.19x cuBLAS)


def _prescaled(x: Tensor, inv: Tensor, k_dim: int, block: int) -> Tensor:
    """MX codes times their block's power of two, as bf16: the float32 product the kernel's SCALING 3 forms before
    each chunk's dot, rounded once to bf16 on the store (x's layout kept)."""
    xv = x.unflatten(k_dim, (-1, block))
    out = torch.empty_like(xv, dtype=torch.bfloat16)
    torch.mul(xv, inv.float().unsqueeze(k_dim), out=out)
    return out.flatten(k_dim - 1, k_dim)


def _launch(a, b, c, sa, sb, bias, dims, consts, cfg):
    bm, bn, warps, stages = cfg
    M, N, K, nblk = dims
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), a.shape[0])
    _chip_gemm_kernel[grid](a, b, c, sa, sb, bias, M, N, K, nblk, *a.stride(), *b.stride(), *c.stride(),
                            *sa.stride(), *sb.stride(), **consts, BM=bm, BN=bn, GROUP_M=8, num_warps=warps,
                            num_stages=stages, enable_fp_fusion=False)   # no FMA: the definition rounds twice


def chip_gemm(codes_a: Tensor, codes_b: Tensor, inv_a: Optional[Tensor], inv_b: Optional[Tensor], arith,
              bias: Optional[Tensor] = None, *, config: Optional[tuple] = None,
              exact: Optional[int] = None, prescale: Optional[bool] = None) -> Optional[Tensor]:
    """``codes_a @ codes_b`` (+ bias) under ``arith`` (``accumulate.GemmArith``), as ``accumulate.accumulate`` then
    the bias and the output rounding define it; None when the kernel does not cover ``arith`` (``supported``).

    Args:
        codes_a, codes_b: [..., M, K] and [K, N] or [..., K, N] (batch dims broadcast), values on the input format's
            grid in any float dtype (cast to bf16 here, exactly). CUDA tensors (CPU ones under TRITON_INTERPRET=1).
        inv_a, inv_b: dequantization multipliers as ``accumulate.quantize_codes`` gives them: None (``none``),
            0-dim (``tensor``), [..., M, ceil(K/blk)] and [..., ceil(K/blk), N] (``block``, ``mx``).
        bias: [N], added to the float32 result before the output rounding.
        config: (BM, BN, num_warps, num_stages); default: the fastest of ``CONFIGS`` for this shape, timed on the
            first call (a fixed small tile in the interpreter).
        exact: how the add into the accumulator rounds (``_add_acc``); default exact (1 or 2; 3 for 23-bit RNE).
        prescale: ``mx`` scales multiplied into the codes before the kernel where K is a whole number of blocks
            (the same float32 products the loop would form, one pass, no scale loads in the loop); False: in the
            loop; default: before where N >= ``PRESCALE_MIN_N``.

    Returns:
        [..., M, N], bfloat16 for ``out_format`` bf16 (RNE), else float32.
    """
    if supported(arith) is not None:
        return None
    k = codes_a.shape[-1]
    if codes_b.shape[-2] != k:
        raise ValueError(f"chip_gemm: shapes {tuple(codes_a.shape)} @ {tuple(codes_b.shape)} do not multiply")
    n = codes_b.shape[-1]
    scaling = arith.in_scaling
    a, b, inv_a, inv_b, lead = _as_batched(codes_a, codes_b, inv_a, inv_b, scaling in ("block", "mx"))
    if prescale is None:
        prescale = n >= PRESCALE_MIN_N
    if scaling == "mx" and prescale and k % arith.scale_block == 0:   # then the loop loads no scales
        blk, scaling = arith.scale_block, "none"
        a, b = _prescaled(a, inv_a, -1, blk), _prescaled(b, inv_b, -2, blk)
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)
    m, dev = a.shape[1], a.device
    if scaling in ("block", "mx"):
        sa, sb, nblk = inv_a.float(), inv_b.float(), inv_a.shape[-1]
    elif scaling == "tensor":
        sa, sb, nblk = inv_a.float().reshape(1, 1, 1), inv_b.float().reshape(1, 1, 1), 1
    else:
        sa = sb = _ones(dev)
        nblk = 1
    bf16 = arith.out_format == "bf16"
    c = torch.empty(a.shape[0], m, n, dtype=torch.bfloat16 if bf16 else torch.float32, device=dev)
    bias_t = bias.detach().float().contiguous() if bias is not None else c
    consts = dict(SCALING=SCALINGS[scaling], SBLOCK=arith.scale_block, CHUNK=arith.chunk,
                  DROP=23 - arith.acc_mantissa_bits, RNE=arith.acc_rounding == "rne",
                  EXACT=_exact_mode(arith, exact),
                  PROMOTE=0 if arith.promote_every is None else arith.promote_every // arith.chunk,
                  HAS_BIAS=bias is not None, OUT_BF16=bf16,
                  SATURATE=arith.overflow == "saturate", BF16_MAX=BF16_MAX,
                  UPCAST=_interpreting(), ALIGNED=arith.acc_alignment == "max_exponent")
    args = (a, b, c, sa, sb, bias_t, (m, n, k, nblk), consts)
    if config is None:
        config = INTERPRET_CONFIG if _interpreting() else _tune(args)
    _launch(*args, config)
    return c.reshape(*lead, n)


def _tune(args) -> tuple:
    """The fastest of ``CONFIGS`` for this shape and arithmetic (timed once, then cached)."""
    a, b, _, _, _, _, dims, consts = args
    key = (a.shape[0], dims, tuple(sorted(consts.items())), a.stride(), b.stride())
    if key not in _TUNED:
        times = {}
        for cfg in ALIGNED_CONFIGS if consts["ALIGNED"] else CONFIGS:
            try:
                times[cfg] = triton.testing.do_bench(lambda: _launch(*args, cfg), warmup=5, rep=20)
            except Exception:                 # out of shared memory or registers on this GPU: not a candidate
                continue
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]
