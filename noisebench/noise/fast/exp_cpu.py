"""``transcendental.exp_poly`` on the CPU, compiled: one Numba pass over the tensor where the definition makes
2 * degree + 7 torch passes (clamp, round, the reduction's products, Horner's steps, ldexp), each through memory;
under approx_exp_acc10 they were a sixth of the chip's forward and backward. Each value goes through the
definition's float32 operations in the same order (Numba contracts no multiply-add without fastmath), so the bits
are the definition's (tests/test_exp_cpu.py). Other devices and dtypes, and machines without Numba, take the
definition.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from .. import transcendental

from .jit_cpu import numba              # None without Numba: the definition runs instead


def _jit(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


@lru_cache(maxsize=None)
def _coefficients(degree: int) -> np.ndarray:
    """Horner's constants as the definition reads them (float32): 1/degree!, then 1/(degree-1)! ... 1/0!."""
    return np.array([1.0 / math.factorial(k) for k in range(degree, -1, -1)], dtype=np.float32)


@_jit
def _pow2(n):
    """2**n in float32 from its bits, for n in -150 ... 128 (the clamp's range): ldexp's factor, exact, a subnormal
    below -126, 0 at -150 (half the smallest subnormal: to even) and inf at 128. (pow() is a library call.)"""
    if n >= -126:
        return np.int32((n + 127) << 23).view(np.float32)
    return np.int32(1 << (n + 149)).view(np.float32) if n >= -149 else np.float32(0.0)


@_jit
def _exp(x, out, coef):
    """Blocks of values at a time, Horner's steps as loops over a block (they vectorize; a loop over the
    coefficients inside one over the values did not)."""
    inv_ln2, hi, lo = np.float32(transcendental._INV_LN2), np.float32(transcendental._LN2_HI), \
        np.float32(transcendental._LN2_LO)
    blk = 1024
    r = np.empty(blk, np.float32)
    p = np.empty(blk, np.float32)
    s = np.empty(blk, np.float32)
    for b0 in range(0, x.shape[0], blk):
        xs, os = x[b0:b0 + blk], out[b0:b0 + blk]
        m = xs.shape[0]
        for i in range(m):
            v = min(max(xs[i], np.float32(-104.0)), np.float32(89.0))
            n = np.float32(np.rint(v * inv_ln2))          # torch.round: half to even
            r[i] = (v - n * hi) - n * lo
            s[i] = _pow2(np.int32(n))
            p[i] = coef[0]
        for j in range(1, coef.shape[0]):
            c = coef[j]
            for i in range(m):
                p[i] = p[i] * r[i] + c
        for i in range(m):
            os[i] = p[i] * s[i] if xs[i] == xs[i] else xs[i]   # NaN stays NaN, as clamp and every step keep it


def exp_poly(x: Tensor, degree: int) -> Tensor:
    """``transcendental.exp_poly`` (same arguments, same bits), compiled for float32, bfloat16 and float16 CPU
    tensors; the definition otherwise."""
    if (numba is None or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16)
            or not 1 <= int(degree) <= 12):
        return transcendental.exp_poly(x, degree)
    x32 = x.detach().float().contiguous()
    out = torch.empty_like(x32)
    _exp(x32.view(-1).numpy(), out.view(-1).numpy(), _coefficients(int(degree)))
    return out.to(x.dtype) if x.dtype != torch.float32 else out
