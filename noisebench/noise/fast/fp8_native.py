"""The FP8 profiles on the GPU's own FP8 tensor core, bitwise their definition where the hardware is the model.

``acc_alignment: max_exponent_unnormalized`` (chunk 32, 13 bits, toward zero) is how the H200's FP8 wgmma sums its
32 products and the accumulator, bit for bit on recorded outputs (docs/chips.md). Emulating that adder costs ~100x
(every product cut on CUDA cores); on a GPU that computes it, a chain of fp8 ``tl.dot``s (Triton's sm_90 default:
fast accumulation over the whole K) is the definition at tensor-core speed. What the tensor core does not do, the
kernel does as the definition does: block scales and promotion into a float32 total (``add.rn``, which Triton cannot
fold into the next dot), tensor scales, bias and the output rounding.

Whether a given GPU, driver and compiler sum this way is a measurement, not an assumption: ``noise/chip.py`` checks
the kernel against the definition once per process and format pair before it uses this path.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
import triton.testing
from torch import Tensor

from .chip_gemm import BF16_MAX, _add_acc, _as_batched, _finish, _ones
from .tiles import grouped_tile

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# the one arithmetic the tensor core computes: (acc_alignment, chunk, acc_mantissa_bits, acc_rounding)
ADDER = ("max_exponent_unnormalized", 32, 13, "toward_zero")
# (BM, BN, BK, num_warps, num_stages); a tile's BK must divide the promotion it runs
# (small tiles fill the GPU's 132 SMs on narrow outputs such as k/v's N=256; BK 256 halves the loop's overhead)
CONFIGS = ((128, 128, 128, 8, 3), (128, 256, 128, 8, 3), (128, 128, 64, 4, 4), (64, 128, 128, 4, 4),
           (128, 64, 128, 4, 4), (128, 128, 128, 4, 4), (64, 64, 128, 4, 4), (64, 64, 256, 4, 3),
           (128, 128, 256, 8, 3), (64, 128, 256, 4, 3))
SMALL_CONFIG = (64, 64, 64, 4, 3)
_TUNED: dict = {}


@triton.jit
def _promote(total, acc, sa_ptrs, sb_ptrs, g, s_sak, s_sbk, mm, mn, SCALING: tl.constexpr):
    """total + acc (block scales applied first: float32(acc) * float32(inv_a * inv_b)), added to nearest."""
    if SCALING == 2:
        sa = tl.load(sa_ptrs + g * s_sak, mask=mm, other=1.0)
        sb = tl.load(sb_ptrs + g * s_sbk, mask=mn, other=1.0)
        acc = acc * (sa[:, None] * sb[None, :])
    return _add_acc(total, acc, 0, True, 3)   # inline add.rn: `total + tl.dot(...)` would become a tensor-core add


@triton.jit
def _fp8_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K,
                s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn,
                s_sab, s_sam, s_sak, s_sbb, s_sbk, s_sbn,
                SCALING: tl.constexpr, PROMOTE: tl.constexpr, HAS_BIAS: tl.constexpr,
                OUT_BF16: tl.constexpr, SATURATE: tl.constexpr, BF16_MAX: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
    """C[b] = A[b] @ B[b] of fp8 codes: each ``tl.dot`` of BK elements chains BK / 32 wgmmas into the float32
    accumulator in K order. PROMOTE: elements per promotion (0: never; a multiple of BK). SCALING 0 none,
    1 tensor, 2 block (scales at promotion)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_row = a_ptr + bid * s_ab + rm[:, None].to(tl.int64) * s_am
    b_col = b_ptr + bid * s_bb + rn[None, :].to(tl.int64) * s_bn
    a_ptrs = a_row + rk[None, :] * s_ak
    b_ptrs = b_col + rk[:, None] * s_bk
    sa_ptrs = sa_ptr + bid * s_sab + rm.to(tl.int64) * s_sam
    sb_ptrs = sb_ptr + bid * s_sbb + rn.to(tl.int64) * s_sbn
    mm, mn = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    total = tl.zeros((BM, BN), dtype=tl.float32)
    n_full = K // BK
    for i in range(0, n_full):
        a = tl.load(a_ptrs, mask=mm[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mn[None, :], other=0.0)
        acc = tl.dot(a, b, acc)               # the tensor core's own adder (no promotion: sm_90's default)
        if PROMOTE > 0:
            if ((i + 1) * BK) % PROMOTE == 0:
                total = _promote(total, acc, sa_ptrs, sb_ptrs, ((i + 1) * BK) // PROMOTE - 1, s_sak, s_sbk, mm, mn,
                                 SCALING)
                acc = tl.zeros((BM, BN), dtype=tl.float32)
        a_ptrs += BK * s_ak
        b_ptrs += BK * s_bk
    # the rest of K one 32-element wgmma at a time, in whole chunks as the definition pads them
    r32 = tl.arange(0, 32)
    for k0 in range(n_full * BK, K, 32):
        kk = k0 + r32
        a = tl.load(a_row + kk[None, :] * s_ak, mask=mm[:, None] & (kk[None, :] < K), other=0.0)
        b = tl.load(b_col + kk[:, None] * s_bk, mask=(kk[:, None] < K) & mn[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        if PROMOTE > 0:
            if (k0 + 32) % PROMOTE == 0:
                total = _promote(total, acc, sa_ptrs, sb_ptrs, (k0 + 32) // PROMOTE - 1, s_sak, s_sbk, mm, mn,
                                 SCALING)
                acc = tl.zeros((BM, BN), dtype=tl.float32)
    if PROMOTE > 0:
        if (tl.cdiv(K, 32) * 32) % PROMOTE != 0:   # the last, partial promotion group
            total = _promote(total, acc, sa_ptrs, sb_ptrs, K // PROMOTE, s_sak, s_sbk, mm, mn, SCALING)
        y = total
    else:
        y = acc
    c_ptrs = c_ptr + bid * s_cb + rm[:, None].to(tl.int64) * s_cm + rn[None, :] * s_cn
    _finish(y, c_ptrs, sa_ptr, sb_ptr, bias_ptr, rn, mm, mn, SCALING, HAS_BIAS, OUT_BF16, SATURATE, BF16_MAX)


def supported(arith, device: torch.device) -> Optional[str]:
    """None when ``device``'s FP8 tensor core computes ``arith`` (as measured on an H200); else why not."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) != (9, 0):
        return "not an sm_90 GPU (the adder was measured on an H200)"
    got = (arith.acc_alignment, arith.chunk, arith.acc_mantissa_bits, arith.acc_rounding)
    if got != ADDER:
        return f"(acc_alignment, chunk, acc_mantissa_bits, acc_rounding) {got} is not the FP8 wgmma's {ADDER}"
    b_format = arith.b_format or arith.in_format
    if arith.in_format not in FP8 or b_format not in FP8:
        return f"formats {arith.in_format!r} x {b_format!r} are not fp8 e4m3/e5m2"
    if arith.in_scaling not in ("none", "tensor", "block"):
        return f"in_scaling {arith.in_scaling!r}"
    if arith.in_scaling == "block" and arith.promote_every != arith.scale_block:
        return "block scales need promote_every == scale_block"
    if arith.promote_every is not None and arith.promote_every % 64:
        return f"promote_every {arith.promote_every} is not a multiple of 64"
    if arith.overflow != "saturate" or arith.out_format not in ("fp32", "bf16") or arith.reduction_order != "fixed":
        return "overflow to inf, another output format or a random reduction order"
    return None


def _launch(a, b, c, sa, sb, bias, dims, consts, cfg):
    bm, bn, bk, warps, stages = cfg
    grid = (triton.cdiv(dims[0], bm) * triton.cdiv(dims[1], bn), a.shape[0])
    _fp8_kernel[grid](a, b, c, sa, sb, bias, *dims, *a.stride(), *b.stride(), *c.stride(), *sa.stride(),
                      *sb.stride(), **consts, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
                      enable_fp_fusion=False)  # no FMA: the definition scales, then adds


def fp8_gemm(codes_a: Tensor, codes_b: Tensor, inv_a: Optional[Tensor], inv_b: Optional[Tensor], arith,
             bias: Optional[Tensor] = None, *, config: Optional[tuple] = None) -> Optional[Tensor]:
    """``codes_a @ codes_b`` (+ bias) under ``arith`` on the tensor core; None where ``supported`` declines.

    Args as ``chip_gemm.chip_gemm``'s: codes on ``arith.in_format``'s grid (A) and ``arith.b_format``'s (B) in any
    float dtype (cast to fp8 here, exactly), CUDA tensors; config (BM, BN, BK, num_warps, num_stages), default
    the fastest of ``CONFIGS`` for this shape, timed on its first call.
    Returns [..., M, N], bfloat16 for ``out_format`` bf16 (RNE), else float32.
    """
    if supported(arith, codes_a.device) is not None:
        return None
    k, n = codes_a.shape[-1], codes_b.shape[-1]
    if codes_b.shape[-2] != k:
        raise ValueError(f"fp8_gemm: shapes {tuple(codes_a.shape)} @ {tuple(codes_b.shape)} do not multiply")
    block = arith.in_scaling == "block"
    a, b, inv_a, inv_b, lead = _as_batched(codes_a, codes_b, inv_a, inv_b, block)
    a, b = a.to(FP8[arith.in_format]), b.to(FP8[arith.b_format or arith.in_format])
    m, dev = a.shape[1], a.device
    if block:
        sa, sb = inv_a.float(), inv_b.float()
    elif arith.in_scaling == "tensor":
        sa, sb = inv_a.float().reshape(1, 1, 1), inv_b.float().reshape(1, 1, 1)
    else:
        sa = sb = _ones(dev)
    bf16 = arith.out_format == "bf16"
    c = torch.empty(a.shape[0], m, n, dtype=torch.bfloat16 if bf16 else torch.float32, device=dev)
    bias_t = bias.detach().float().contiguous() if bias is not None else c
    consts = dict(SCALING={"none": 0, "tensor": 1, "block": 2}[arith.in_scaling],
                  PROMOTE=arith.promote_every or 0, HAS_BIAS=bias is not None, OUT_BF16=bf16,
                  SATURATE=True, BF16_MAX=BF16_MAX)
    args = (a, b, c, sa, sb, bias_t, (m, n, k), consts)
    _launch(*args, config or _tune(args))
    return c.reshape(*lead, n)


def _tune(args) -> tuple:
    """The fastest of ``CONFIGS`` whose K divides the promotion, for this shape (timed once, then cached)."""
    a, b, _, _, _, _, dims, consts = args
    key = (a.shape[0], dims, tuple(sorted(consts.items())), a.stride(), b.stride(), a.dtype, b.dtype)
    if key not in _TUNED:
        times = {}
        for cfg in CONFIGS:
            if consts["PROMOTE"] % cfg[2]:
                continue
            try:
                times[cfg] = triton.testing.do_bench(lambda: _launch(*args, cfg), warmup=5, rep=20)
            except Exception:                 # out of shared memory or registers on this GPU: not a candidate
                continue
        _TUNED[key] = min(times, key=times.get)
    return _TUNED[key]
