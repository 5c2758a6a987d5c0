"""The chip GEMM on Hopper, in Gluon: ``chip_gemm``'s arithmetic with the tensor core kept busy while CUDA cores
round.

In Triton a chunk's ``tl.dot`` must finish before its sum is added into the accumulator, so the tensor core idles
through every add and the Triton kernel stays at 0.27-0.50x cuBLAS bf16 (docs/performance.md). Gluon exposes
wgmma's asynchrony: chunk i+1's wgmma runs while chunk i's sum is added and rounded
(``warpgroup_mma_wait(num_outstanding=1)``), and TMA fills a ring of shared-memory stages ahead of both.

The per-chunk arithmetic is the Triton kernel's own jit functions (``chip_round``) on the same bf16
wgmma chunk sums, so the result equals the Triton kernel's bitwise (tests/test_chip_gemm_cuda.py). Covered: what
``chip_gemm.supported`` covers except the aligning adder (it cuts every product: no tensor-core dot) and
batched operands (attention's bmm), on compute capability 9.x, with TMA-aligned rows (K and N multiples of 8).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .chip_round import _add_acc, _round_rne

# (BM, BN, num_warps, stages, chunks a stage): the accumulator, the chunk sum being added and the one in flight live
# in registers ((128, 256) spills: four float32 tiles of 128 values a thread); 4-tuples are one chunk a stage
CONFIGS = ((64, 128, 4, 4, 1), (64, 128, 4, 3, 2), (128, 128, 8, 4, 1), (128, 128, 8, 3, 2), (64, 64, 4, 4, 2),
           (128, 64, 8, 3, 2), (64, 256, 8, 2, 2))


@gluon.constexpr_function
def _mma_layout(BM, BN, num_warps):
    """wgmma's accumulator layout: warps stacked along M first (16 rows each), the widest instruction N that fits."""
    warps = [4, 1]
    while warps[0] * warps[1] != num_warps:
        if BM > 16 * warps[0]:
            warps[0] *= 2
        else:
            warps[1] *= 2
    max_n = max(BN // triton.cdiv(num_warps, triton.cdiv(BM, 16)), 8)
    n = 256
    while n > max_n or BN % n:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps, instr_shape=[16, n, 16])


@gluon.jit
def _load(a_desc, b_desc, a_s, b_s, bars, stage, off_m, off_n, pred,
          CHUNK: gl.constexpr, CPS: gl.constexpr, STAGES: gl.constexpr, B_T: gl.constexpr):
    """TMA of stage ``stage``'s CPS chunks (A and B tiles of CHUNK along K each) into its ring slot, one barrier for
    the stage (past K: TMA's zero fill)."""
    slot = stage % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, CPS * (a_desc.block_type.nbytes + b_desc.block_type.nbytes), pred=pred)
    for j in gl.static_range(CPS):
        k = (stage * CPS + j) * CHUNK
        tma.async_copy_global_to_shared(a_desc, [off_m, k], bar, a_s.index(slot * CPS + j), pred=pred)
        if B_T:
            tma.async_copy_global_to_shared(b_desc, [off_n, k], bar, b_s.index(slot * CPS + j), pred=pred)
        else:
            tma.async_copy_global_to_shared(b_desc, [k, off_n], bar, b_s.index(slot * CPS + j), pred=pred)


@gluon.jit
def _stage_wait(bars, i, CPS: gl.constexpr, STAGES: gl.constexpr):
    """Before chunk i's wgmma: where i opens a stage, wait for that stage's loads."""
    if i % CPS == 0:
        mbarrier.wait(bars.index((i // CPS) % STAGES), (i // (CPS * STAGES)) & 1)


@gluon.jit
def _refill(a_desc, b_desc, a_s, b_s, bars, i, n_stages, off_m, off_n,
            CHUNK: gl.constexpr, CPS: gl.constexpr, STAGES: gl.constexpr, B_T: gl.constexpr):
    """After chunk i - 1's wgmma is done: where it closed a stage, that slot is free; load the stage STAGES on."""
    if i % CPS == 0:
        stage = i // CPS - 1 + STAGES
        _load(a_desc, b_desc, a_s, b_s, bars, stage, off_m, off_n, stage < n_stages, CHUNK, CPS, STAGES, B_T)


@gluon.jit
def _mma(a_s, b_s, buf, spare, B_T: gl.constexpr):
    """Chunk sum of buffer ``buf`` into fresh registers (``spare``'s are reused, its value ignored), async."""
    if B_T:
        out = warpgroup_mma(a_s.index(buf), b_s.index(buf).permute((1, 0)), spare, use_acc=False, is_async=True)
    else:
        out = warpgroup_mma(a_s.index(buf), b_s.index(buf), spare, use_acc=False, is_async=True)
    return out


@gluon.jit
def _consume(acc, total, s, c, sa_ptrs, sb_ptrs, s_sak, s_sbk, mm, mn, NBLK,
             SCALING: gl.constexpr, SBLOCK: gl.constexpr, CHUNK: gl.constexpr, DROP: gl.constexpr,
             RNE: gl.constexpr, EXACT: gl.constexpr, PROMOTE: gl.constexpr):
    """Chunk ``c``'s sum ``s`` added into the accumulator as ``chip_gemm._chip_gemm_kernel`` adds it, then the
    promotion when ``c`` closes a group."""
    if SCALING == 3:                          # MX: powers of two, exact on the chunk sum
        blk = gl.minimum((c * CHUNK) // SBLOCK, NBLK - 1)
        sa = gl.load(sa_ptrs + blk * s_sak, mask=mm, other=1.0)
        sb = gl.load(sb_ptrs + blk * s_sbk, mask=mn, other=1.0)
        s = s * (sa[:, None] * sb[None, :])
    acc = _add_acc(acc, s, DROP, RNE, EXACT)
    if PROMOTE > 0:
        if (c + 1) % PROMOTE == 0:
            if SCALING == 2:                  # block scales: float32(acc) * float32(inv_a * inv_b), then the add
                g = gl.minimum(c // PROMOTE, NBLK - 1)   # a padding chunk's group: 0 times a real scale
                sa = gl.load(sa_ptrs + g * s_sak, mask=mm, other=1.0)
                sb = gl.load(sb_ptrs + g * s_sbk, mask=mn, other=1.0)
                total = total + acc * (sa[:, None] * sb[None, :])
            else:
                total = total + acc
            acc = gl.zeros_like(acc)
    return acc, total


@gluon.jit
def _chip_gemm_hopper(a_desc, b_desc, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, NBLK,
                      s_cm, s_cn, s_sam, s_sak, s_sbk, s_sbn,
                      SCALING: gl.constexpr, SBLOCK: gl.constexpr, CHUNK: gl.constexpr, DROP: gl.constexpr,
                      RNE: gl.constexpr, EXACT: gl.constexpr, PROMOTE: gl.constexpr, HAS_BIAS: gl.constexpr,
                      OUT_BF16: gl.constexpr, SATURATE: gl.constexpr, BF16_MAX: gl.constexpr,
                      B_T: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr,
                      CPS: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr):
    """C = A @ B under the chip arithmetic (``chip_gemm._chip_gemm_kernel``'s constants); B_T: B is given as its
    [N, K] transpose (a linear's weight). A ring of STAGES stages of CPS chunks each: one barrier wait and one
    refill per stage, one async wgmma per chunk."""
    layout: gl.constexpr = _mma_layout(BM, BN, num_warps)
    pid = gl.program_id(0)
    n_m, n_n = gl.cdiv(M, BM), gl.cdiv(N, BN)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = gl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    off_m, off_n = pid_m * BM, pid_n * BN
    rm = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    rn = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    mm, mn = rm < M, rn < N
    sa_ptrs = sa_ptr + rm.to(gl.int64) * s_sam
    sb_ptrs = sb_ptr + rn.to(gl.int64) * s_sbn

    a_s = gl.allocate_shared_memory(a_desc.dtype, [STAGES * CPS] + a_desc.block_type.shape, a_desc.layout)
    b_s = gl.allocate_shared_memory(b_desc.dtype, [STAGES * CPS] + b_desc.block_type.shape, b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    n_chunks = gl.cdiv(K, CHUNK)
    if PROMOTE > 0:                           # whole promotion groups; chunks past K are zeros and change nothing
        n_chunks = gl.cdiv(n_chunks, PROMOTE) * PROMOTE
    # an even count, for the loop's pairs: a padding chunk sums to +0, and acc + 0 == acc for every acc the adds
    # can leave (never -0: they start from +0 and round x - x to +0)
    n_chunks = gl.cdiv(n_chunks, 2) * 2
    n_stages = gl.cdiv(n_chunks, CPS)         # a last stage's chunks past n_chunks are loaded, never summed
    for i in gl.static_range(STAGES):
        _load(a_desc, b_desc, a_s, b_s, bars, i, off_m, off_n, i < n_stages, CHUNK, CPS, STAGES, B_T)

    acc = gl.zeros((BM, BN), gl.float32, layout)
    total = gl.zeros((BM, BN), gl.float32, layout)
    # Chunks in pairs, two register tiles: the pair's first wgmma runs while the previous pair's second sum is
    # added, its second while the first sum is added; every wgmma is waited for within its own iteration, and each
    # writes the tile whose sum was just added. A wgmma still in flight across the loop's back edge, or a copy of
    # its tile, makes ptxas serialise every wgmma (C7514).
    mbarrier.wait(bars.index(0), 0)
    p0 = _mma(a_s, b_s, 0, gl.zeros((BM, BN), gl.float32, layout), B_T)
    _stage_wait(bars, 1, CPS, STAGES)
    p1 = _mma(a_s, b_s, 1 % (CPS * STAGES), gl.zeros((BM, BN), gl.float32, layout), B_T)
    d0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0, ))
    _refill(a_desc, b_desc, a_s, b_s, bars, 1, n_stages, off_m, off_n, CHUNK, CPS, STAGES, B_T)
    acc, total = _consume(acc, total, d0, 0, sa_ptrs, sb_ptrs, s_sak, s_sbk, mm, mn, NBLK,
                          SCALING, SBLOCK, CHUNK, DROP, RNE, EXACT, PROMOTE)
    d1 = warpgroup_mma_wait(num_outstanding=0, deps=(p1, ))
    _refill(a_desc, b_desc, a_s, b_s, bars, 2, n_stages, off_m, off_n, CHUNK, CPS, STAGES, B_T)
    for c in range(2, n_chunks, 2):          # chunks c and c + 1
        _stage_wait(bars, c, CPS, STAGES)
        p0 = _mma(a_s, b_s, c % (CPS * STAGES), d0, B_T)
        acc, total = _consume(acc, total, d1, c - 1, sa_ptrs, sb_ptrs, s_sak, s_sbk, mm, mn, NBLK,
                              SCALING, SBLOCK, CHUNK, DROP, RNE, EXACT, PROMOTE)
        _stage_wait(bars, c + 1, CPS, STAGES)
        p1 = _mma(a_s, b_s, (c + 1) % (CPS * STAGES), d1, B_T)
        d0 = warpgroup_mma_wait(num_outstanding=1, deps=(p0, ))
        _refill(a_desc, b_desc, a_s, b_s, bars, c + 1, n_stages, off_m, off_n, CHUNK, CPS, STAGES, B_T)
        acc, total = _consume(acc, total, d0, c, sa_ptrs, sb_ptrs, s_sak, s_sbk, mm, mn, NBLK,
                              SCALING, SBLOCK, CHUNK, DROP, RNE, EXACT, PROMOTE)
        d1 = warpgroup_mma_wait(num_outstanding=0, deps=(p1, ))
        _refill(a_desc, b_desc, a_s, b_s, bars, c + 2, n_stages, off_m, off_n, CHUNK, CPS, STAGES, B_T)
    acc, total = _consume(acc, total, d1, n_chunks - 1, sa_ptrs, sb_ptrs, s_sak, s_sbk, mm, mn, NBLK,
                          SCALING, SBLOCK, CHUNK, DROP, RNE, EXACT, PROMOTE)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    y = total if PROMOTE > 0 else acc
    if SCALING == 1:
        y = y * (gl.load(sa_ptr) * gl.load(sb_ptr))
    if HAS_BIAS:
        y = y + gl.load(bias_ptr + rn, mask=mn, other=0.0)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(gl.int64) * s_cm + rn[None, :] * s_cn
    if OUT_BF16:
        if SATURATE:                          # past bf16's max: the max (NaN stays NaN)
            y = gl.where(y > BF16_MAX, BF16_MAX, gl.where(y < -BF16_MAX, -BF16_MAX, y))
        y = gl.where(y != y, y, _round_rne(y, 16))
        gl.store(c_ptrs, y.to(gl.bfloat16), mask=mm[:, None] & mn[None, :])
    else:
        gl.store(c_ptrs, y, mask=mm[:, None] & mn[None, :])


@functools.lru_cache(maxsize=None)
def _capability(dev: torch.device) -> tuple:
    return torch.cuda.get_device_capability(dev)


def usable(a: Tensor, b: Tensor, arith) -> Optional[str]:
    """None when this kernel computes ``a @ b`` (bf16 codes: a [1, M, K], b [1, K, N]) under ``arith``; else why
    not (``chip_gemm`` then launches its Triton kernel)."""
    if not (a.is_cuda and _capability(a.device)[0] == 9):
        return "not a Hopper GPU"
    if arith.acc_alignment == "max_exponent":
        return "the aligning adder"
    if a.shape[0] != 1 or b.shape[0] != 1:
        return "batched operands"
    if a.stride(-1) != 1 or a.shape[-1] % 8 or a.stride(-2) % 8:
        return "A's rows are not TMA-aligned"
    if not (b.stride(-1) == 1 and b.stride(-2) % 8 == 0) and not (b.stride(-2) == 1 and b.stride(-1) % 8 == 0):
        return "B is neither row- nor column-major with aligned strides"
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return "operands not 16-byte aligned"
    return None


def launch(a: Tensor, b: Tensor, c: Tensor, sa: Tensor, sb: Tensor, bias: Tensor, dims: tuple, consts: dict,
           cfg: tuple) -> None:
    """``chip_gemm._launch``'s arguments (a [1, M, K], b [1, K, N], c [1, M, N] bf16 codes) on this kernel;
    ``cfg`` = (BM, BN, num_warps, stages[, chunks a stage])."""
    bm, bn, warps, stages = cfg[:4]
    cps = cfg[4] if len(cfg) > 4 else 1
    m, n, k, nblk = dims
    chunk = consts["CHUNK"]
    a2, b2, c2 = a[0], b[0], c[0]
    a_desc = TensorDescriptor.from_tensor(a2, [bm, chunk], gl.NVMMASharedLayout.get_default_for([bm, chunk],
                                                                                                 gl.bfloat16))
    b_t = b2.stride(-1) != 1
    if b_t:                                   # a linear's weight: B is the [N, K] tensor read transposed
        bt = b2.t()
        b_desc = TensorDescriptor.from_tensor(bt, [bn, chunk], gl.NVMMASharedLayout.get_default_for([bn, chunk],
                                                                                                     gl.bfloat16))
    else:
        b_desc = TensorDescriptor.from_tensor(b2, [chunk, bn], gl.NVMMASharedLayout.get_default_for([chunk, bn],
                                                                                                     gl.bfloat16))
    kw = {key: v for key, v in consts.items() if key not in ("UPCAST", "ALIGNED")}
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _chip_gemm_hopper[grid](a_desc, b_desc, c2, sa, sb, bias, m, n, k, nblk, c2.stride(0), c2.stride(1),
                            sa.stride(-2), sa.stride(-1), sb.stride(-2), sb.stride(-1), **kw, B_T=b_t, BM=bm, BN=bn,
                            STAGES=stages, CPS=cps, GROUP_M=8, num_warps=warps,
                            enable_fp_fusion=False)   # no FMA: the definition rounds twice
