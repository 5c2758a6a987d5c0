"""Approximate transcendentals as a chip without exact units computes them, in float32, with each approximation's
error measured in ulps: exp by range reduction and a polynomial, and the ops built on it (softmax, silu, tanh-gelu);
rsqrt by a table estimate refined by Newton-Raphson steps (the norms' op).

exp(x) = 2**n * p(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite: ln 2 split in two float32 constants so
r is accurate), |r| <= ln 2 / 2, p the Taylor polynomial of ``degree`` evaluated by Horner in float32. Its
relative error is about |r|**(degree+1) / (degree+1)!: degree 3 ~6e-4 (thousands of ulps), 6 ~1 ulp.

rsqrt(x) = 2**-q * rsqrt(y), x = y * 2**(2q), y in [1, 4): the estimate of rsqrt(y) is read from a table of
2**table_bits entries indexed by the exponent's parity (y < 2 or not) and the leading table_bits - 1 mantissa bits,
each entry the minimax constant of its interval (relative error e0 <= (sqrt(hi) - sqrt(lo)) / (sqrt(hi) + sqrt(lo)),
about 2**-(table_bits+1)); each Newton step r <- r (3/2 - x r**2 / 2) maps a relative error e to -(3/2) e**2, so the
error squares per step until float32's own rounding (a few ulps) is reached.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

_LN2_HI = 0.693145751953125          # ln 2 to 16 bits: n * _LN2_HI is exact in float32 for |n| < 2**8
_LN2_LO = 1.428606765330187e-06      # ln 2 - _LN2_HI
_INV_LN2 = 1.4426950408889634


def exp_poly(x: Tensor, degree: int) -> Tensor:
    """exp(x) by range reduction and a degree-``degree`` polynomial, float32 throughout; result in x's dtype."""
    if not 1 <= int(degree) <= 12:
        raise ValueError(f"exp degree must be in 1..12, got {degree!r}")
    x32 = x.float().clamp(-104.0, 89.0)             # below: 0 after scaling; above: inf, as float32 exp
    n = torch.round(x32 * _INV_LN2)
    r = (x32 - n * _LN2_HI) - n * _LN2_LO
    p = torch.full_like(r, 1.0 / math.factorial(degree))
    for k in range(degree - 1, -1, -1):
        p = p * r + 1.0 / math.factorial(k)
    out = torch.ldexp(p, n)                          # float32: 2**n exact for |n| <= 127, 0/inf beyond
    return out.to(x.dtype) if x.dtype != torch.float32 else out


@lru_cache(maxsize=None)
def exp_max_ulp(degree: int) -> float:
    """Max error of ``exp_poly`` in float32 ulps of the exact result, over 2**20 points of [-80, 80]."""
    x = torch.linspace(-80.0, 80.0, 2 ** 20, dtype=torch.float32)
    exact = torch.exp(x.double())
    _, e = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), e - 24)
    return float(((exp_poly(x, degree).double() - exact).abs() / ulp).max())


def softmax(x: Tensor, dim: int, degree: int, dtype=None, exp=exp_poly) -> Tensor:
    """softmax along ``dim`` with ``exp_poly``: exp(x - max) over its sum, in float32; result in ``dtype`` (or x's).
    ``exp``: an implementation of ``exp_poly`` with its bits (the compiled CPU one), here and below."""
    x32 = x.float()
    e = exp(x32 - x32.amax(dim, keepdim=True), degree)
    return (e / e.sum(dim, keepdim=True)).to(dtype or x.dtype)


def silu(x: Tensor, degree: int, exp=exp_poly) -> Tensor:
    """x * sigmoid(x) = x / (1 + exp(-x)) with ``exp_poly``, in float32; result in x's dtype."""
    x32 = x.float()
    return (x32 / (1.0 + exp(-x32, degree))).to(x.dtype)


def gelu_tanh(x: Tensor, degree: int, exp=exp_poly) -> Tensor:
    """gelu's tanh approximation with ``exp_poly``: tanh(z) = 1 - 2 / (exp(2z) + 1), in float32; result in x's
    dtype (erf-gelu, ``approximate='none'``, has no exp and is not modelled)."""
    x32 = x.float()
    z = 0.7978845608028654 * (x32 + 0.044715 * x32 * x32 * x32)
    t = 1.0 - 2.0 / (exp(2.0 * z, degree) + 1.0)
    return (0.5 * x32 * (1.0 + t)).to(x.dtype)


def _check_rsqrt(table_bits: int, newton: int) -> None:
    if not 1 <= int(table_bits) <= 16 or not 0 <= int(newton) <= 4:
        raise ValueError(f"rsqrt table_bits must be in 1..16 and newton in 0..4, got {table_bits!r}, {newton!r}")


@lru_cache(maxsize=None)
def rsqrt_table(table_bits: int) -> Tensor:
    """The float32 seeds: entry (parity, i) covers y in [lo, hi) = 2**parity * [1 + i h, 1 + (i+1) h),
    h = 2**-(table_bits-1), and holds 2 / (sqrt(lo) + sqrt(hi)), the constant of least max relative error there."""
    _check_rsqrt(table_bits, 0)
    n = 2 ** (table_bits - 1)
    i = torch.arange(n, dtype=torch.float64)
    lo = torch.cat([1 + i / n, 2 * (1 + i / n)])
    hi = torch.cat([1 + (i + 1) / n, 2 * (1 + (i + 1) / n)])
    return (2.0 / (lo.sqrt() + hi.sqrt())).float()


def rsqrt_seed_error(table_bits: int) -> float:
    """The table's max relative error e0 (before Newton), from the interval ends: the widest relative interval,
    y in [1, 1 + 2**-(table_bits-1)), bounds it."""
    lo, hi = 1.0, 1.0 + 2.0 ** -(table_bits - 1)
    return (math.sqrt(hi) - math.sqrt(lo)) / (math.sqrt(hi) + math.sqrt(lo))


def rsqrt_approx(x: Tensor, table_bits: int, newton: int) -> Tensor:
    """1/sqrt(x) by the table seed and ``newton`` Newton-Raphson steps, float32 throughout; result in x's dtype.
    Special values as IEEE rsqrt: +0 -> inf, x < 0 -> nan, inf -> 0, nan -> nan (subnormals are normalised)."""
    _check_rsqrt(table_bits, newton)
    x32 = x.float()
    m, e = torch.frexp(x32)                        # x = m 2**e, m in [0.5, 1)
    e = e - 1                                      # x = (2m) 2**e, 2m in [1, 2)
    parity = e & 1                                 # two's complement: the parity of negative exponents too
    half = 2 ** (table_bits - 1)
    top = ((2.0 * m - 1.0) * half).floor().clamp(0, half - 1).to(torch.int64)
    idx = (parity.to(torch.int64) * half + top).clamp(0, 2 * half - 1)
    r = torch.ldexp(rsqrt_table(table_bits).to(x32.device)[idx], -((e - parity) >> 1).float())
    for _ in range(int(newton)):
        r = r * (1.5 - 0.5 * (x32 * r) * r)
    r = torch.where(x32 == 0, torch.full_like(r, math.inf), r)
    r = torch.where(torch.isinf(x32) & (x32 > 0), torch.zeros_like(r), r)
    r = torch.where((x32 < 0) | torch.isnan(x32), torch.full_like(r, math.nan), r)
    return r.to(x.dtype) if x.dtype != torch.float32 else r


@lru_cache(maxsize=None)
def rsqrt_max_ulp(table_bits: int, newton: int) -> float:
    """Max error of ``rsqrt_approx`` in float32 ulps of the exact result, over 2**20 log-spaced points of
    [2**-60, 2**60] (every binade pair and table entry many times over)."""
    x = torch.exp2(torch.linspace(-60.0, 60.0, 2 ** 20, dtype=torch.float64)).float()
    exact = x.double().rsqrt()
    _, e = torch.frexp(exact)
    ulp = torch.ldexp(torch.ones_like(exact), e - 24)
    return float(((rsqrt_approx(x, table_bits, newton).double() - exact).abs() / ulp).max())
