"""Approximate transcendentals as a chip without an exact exp computes them: exp by range reduction and a
polynomial, in float32, and the ops built on it (softmax, silu), with the approximation's error measured in ulps.

exp(x) = 2**n * p(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite: ln 2 split in two float32 constants so
r is accurate), |r| <= ln 2 / 2, p the Taylor polynomial of ``degree`` evaluated by Horner in float32. Its
relative error is about |r|**(degree+1) / (degree+1)!: degree 3 ~6e-4 (thousands of ulps), 6 ~1 ulp.
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


def softmax(x: Tensor, dim: int, degree: int, dtype=None) -> Tensor:
    """softmax along ``dim`` with ``exp_poly``: exp(x - max) over its sum, in float32; result in ``dtype`` (or x's)."""
    x32 = x.float()
    e = exp_poly(x32 - x32.amax(dim, keepdim=True), degree)
    return (e / e.sum(dim, keepdim=True)).to(dtype or x.dtype)


def silu(x: Tensor, degree: int) -> Tensor:
    """x * sigmoid(x) = x / (1 + exp(-x)) with ``exp_poly``, in float32; result in x's dtype."""
    x32 = x.float()
    return (x32 / (1.0 + exp_poly(-x32, degree))).to(x.dtype)
