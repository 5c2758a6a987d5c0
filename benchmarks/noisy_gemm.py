"""A linear with its output noise in the GEMM epilogue: the kernel ``epilogue_gemm.py`` times.

Kept here, outside the package, because it loses: on every Qwen2.5-1.5B shape it is slower than cuBLAS plus the
engine's separate noise pass (docs/performance.md). It stays for a GEMM that could carry it (a persistent,
warp-specialised one whose epilogue overlaps the next tile's main loop).

Why it was tried: a separate noise pass reads and writes every output once more (x1.10 of a compiled training step's
device time on an H200); here each program writes its output tile, then reloads it while it is still in L2 (a barrier
between), noises it and writes it again, so DRAM sees about one write. Inductor's own route (max-autotune templates
with its ``randn`` in the epilogue) spends a Philox4x32-10 call per element; this keeps the engine's 8 normals a call.

The draws are tile-local, so they are not the elementwise kernel's (``noisebench/noise/fast/definition.py``); written
in NumPy in ``reference_normals``: tile t (row-major over BM x BN output tiles) draws Philox4x32-ROUNDS blocks with key
k and counter t * (BM/8 * BN) + r * BN + c for r < BM/8, c < BN; word j's 16-bit halves give, as in the elementwise
kernel, the cosine and sine of one Box-Muller pair, which noise rows r + (2j) BM/8 and r + (2j + 1) BM/8 of the tile.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from noisebench.noise.fast.definition import ROUNDS, kernel_key, philox_normals
from noisebench.noise.fast.kernels import _fast_math, _pair   # the engine's Box-Muller and fast-math switch
from noisebench.noise.fast.tiles import grouped_tile

BM, BN, BK, GROUP_M = 128, 128, 64, 8   # BM and BN fix the draws (see the module docstring); BK and GROUP_M do not


@triton.jit
def _epilogue_slice(c_ptr, rows, cols, M, N, scm, n, scale, KIND: tl.constexpr):
    m = (rows[:, None] < M) & (cols[None, :] < N)
    ptrs = c_ptr + rows[:, None].to(tl.int64) * scm + cols[None, :]
    y = tl.load(ptrs, mask=m).to(tl.float32)
    out = y + (scale * n) * y if KIND == 0 else y + scale * n
    tl.store(ptrs, out.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=m)


@triton.jit(do_not_specialize=["seed"])
def _linear_noise_kernel(a_ptr, w_ptr, c_ptr, M, N, K, sam, swn, scm, seed, scale, NOISE: tl.constexpr,
                         KIND: tl.constexpr, FAST: tl.constexpr, ROUNDS: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, K_TILES: tl.constexpr,
                         PRECISION: tl.constexpr):
    """C = A W^T (A: M x K, W: N x K, both with unit stride along K; C: M x N, unit column stride), then, with
    NOISE, ``C (1 + s n)`` (KIND 0) or ``C + s n`` (KIND 1) with the tile-local draws of the module docstring.
    PRECISION: ``ieee`` for float32 inputs (torch's float32 matmul does not use TF32 by default), else ``tf32``
    (ignored for 16-bit inputs)."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, M, N, BM, BN, GROUP_M)
    n_n = tl.cdiv(N, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * sam + rk[None, :]
    w_ptrs = w_ptr + rn[None, :].to(tl.int64) * swn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K_TILES):   # a constexpr bound (Triton's CPU interpreter cannot range over a runtime scalar)
        kk = k * BK + rk
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(w_ptrs, mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BK
        w_ptrs += BK
    cm = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None].to(tl.int64) * scm + rn[None, :],
             acc.to(c_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=cm)
    if NOISE:
        tl.debug_barrier()   # the tile's stores are visible to the whole program: reload it (from L2) and noise it
        R: tl.constexpr = BM // 8
        r = tl.arange(0, R)
        ctr = (pid_m * n_n + pid_n) * (R * BN) + r[:, None] * BN + tl.arange(0, BN)[None, :]
        w0, w1, w2, w3 = tl.randint4x(seed, ctr, ROUNDS)
        n0, n1 = _pair(w0, FAST)
        n2, n3 = _pair(w1, FAST)
        n4, n5 = _pair(w2, FAST)
        n6, n7 = _pair(w3, FAST)
        base = pid_m * BM + r
        _epilogue_slice(c_ptr, base, rn, M, N, scm, n0, scale, KIND)
        _epilogue_slice(c_ptr, base + R, rn, M, N, scm, n1, scale, KIND)
        _epilogue_slice(c_ptr, base + 2 * R, rn, M, N, scm, n2, scale, KIND)
        _epilogue_slice(c_ptr, base + 3 * R, rn, M, N, scm, n3, scale, KIND)
        _epilogue_slice(c_ptr, base + 4 * R, rn, M, N, scm, n4, scale, KIND)
        _epilogue_slice(c_ptr, base + 5 * R, rn, M, N, scm, n5, scale, KIND)
        _epilogue_slice(c_ptr, base + 6 * R, rn, M, N, scm, n6, scale, KIND)
        _epilogue_slice(c_ptr, base + 7 * R, rn, M, N, scm, n7, scale, KIND)


def linear_noise(x: Tensor, w: Tensor, seed: int, scale: float, kind: str = "relative_gaussian",
                 noise: bool = True, num_warps: int = 8, num_stages: int = 3) -> Tensor:
    """``F.linear(x, w)`` (no bias) with the output noise applied in the epilogue (``noise=False``: the same GEMM
    without it, for A/B). ``seed``: the engine's 63-bit per-call seed."""
    if kind not in ("relative_gaussian", "absolute_gaussian"):
        raise ValueError(f"kind={kind!r}; valid choices: ['relative_gaussian', 'absolute_gaussian']")
    a = x.reshape(-1, x.shape[-1])
    a = a if a.stride(-1) == 1 else a.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _linear_noise_kernel[grid](a, w, c, M, N, K, a.stride(0), w.stride(0), c.stride(0),
                               kernel_key(seed), float(scale), NOISE=bool(noise),
                               KIND=0 if kind == "relative_gaussian" else 1, FAST=_fast_math(x.device), ROUNDS=ROUNDS,
                               BM=BM, BN=BN, BK=BK, GROUP_M=GROUP_M,
                               K_TILES=triton.cdiv(K, BK), PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                               num_warps=num_warps, num_stages=num_stages)
    return c.view(*x.shape[:-1], N)


def reference_normals(seed: int, M: int, N: int) -> np.ndarray:
    """float64 M x N normals the epilogue draws under the engine seed ``seed`` (the module docstring's map)."""
    R, n_m, n_n = BM // 8, -(-M // BM), -(-N // BN)
    t = np.arange(n_m * n_n, dtype=np.uint64)[:, None, None]
    ctr = t * np.uint64(R * BN) + np.arange(R, dtype=np.uint64)[None, :, None] * np.uint64(BN) + \
        np.arange(BN, dtype=np.uint64)[None, None, :]
    tiles = np.stack(philox_normals(kernel_key(seed), ctr), axis=1)   # (tile, slice, r, c): row slice * R + r
    full = tiles.reshape(n_m, n_n, BM, BN).transpose(0, 2, 1, 3).reshape(n_m * BM, n_n * BN)
    return full[:M, :N]
