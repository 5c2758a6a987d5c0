"""Rounding onto a chip's formats on the CPU, compiled: ``formats.quantize`` (nearest, toward zero) and
``accumulate.quantize_codes`` (no, tensor, block and MX scales) as one Numba pass, where the definition makes 8-12 torch
passes over the tensor (abs, shifts, masks, where, copysign; in the default job's fp8 step they cost more than the
GEMMs' sums). Each value goes through the definition's own operations in the same order and precision, so the bits
are the definition's (tests/test_quantize_cpu.py, on random bit patterns). Stochastic rounding, other devices and
machines without Numba take the definition.
"""
from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import formats
from ..accumulate import GemmArith, quantize_codes as codes_definition

from .jit_cpu import numba              # None without Numba: the definition runs instead


def _jit(fn=None, *, inline: str = "never"):
    # one thread, as chip_cpu's loops; IEEE division (1 / 0 = inf, as torch), not Python's ZeroDivisionError
    if fn is None:
        return lambda f: _jit(f, inline=inline)
    return numba.njit(cache=True, nogil=True, error_model="numpy", inline=inline)(fn) if numba is not None else fn


@functools.lru_cache(maxsize=None)
def _grid(fmt, rounding: str, overflow: str) -> tuple:
    """A format's constants as the element function reads them, float32 where the definition computes in float32."""
    f = formats.get(fmt)
    narrow = f.ebits != 8                              # bf16 and fp32 share float32's exponent range
    u = 2.0 ** (f.emin - f.mbits) if narrow else 1.0   # the subnormal spacing (unused for bf16 and fp32)
    return (23 - f.mbits, rounding == "nearest", narrow, overflow == "saturate", np.float32(f.max),
            np.float32(np.inf if f.has_inf else np.nan), np.float32(2.0 ** f.emin), np.float32(u * 2.0 ** 23),
            np.float32(1 / u), np.float32(u))


@_jit(inline="always")                   # inlined, so constant flags fold away in the caller's loop
def _round(v, drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u):
    """One float32 value as ``formats._quantize_f32`` (``narrow``) or ``formats._quantize_e8`` rounds it: the
    same integer operations on its bit pattern (int32 wrap-around kept by truncating int64 to int32), the same
    float32 arithmetic below 2**emin, the same NaN, overflow and sign rules."""
    mask = ~((np.int64(1) << drop) - 1)
    if narrow:
        ia = np.int64(np.float32(v).view(np.int32)) & 0x7FFFFFFF
        a = np.int32(ia).view(np.float32)
        if nearest:
            ia = ia + (((ia >> drop) & 1) + ((np.int64(1) << (drop - 1)) - 1))
        r = np.int32(ia & mask).view(np.float32)
        if a < small:
            r = (a + c) - c if nearest else np.floor(a * inv_u) * u
        if r > fmax:                                   # clamp_max / where(v > max): NaN compares false
            r = fmax if saturate else past
        if v != v:
            r = v
        return np.copysign(r, v)
    iv = np.int64(np.float32(v).view(np.int32))
    if drop:
        if nearest:
            iv = iv + (((iv >> drop) & 1) + ((np.int64(1) << (drop - 1)) - 1))
        iv = iv & mask
    r = np.int32(iv).view(np.float32)
    if v != v:
        r = v
    if saturate and np.isinf(r):
        r = np.copysign(fmax, v)
    return r


@_jit
def _quantize(x, out, drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u):
    for i in range(x.shape[0]):
        out[i] = _round(x[i], drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u)


@_jit
def _scale(m, mx, emax, fmax, eps):
    """A block's (multiplier, inv) from its amax ``m`` (NaN if an element is): tensor/block s = float32(max /
    max(m, eps)) (1 where m is not > 0) and float32(1 / s); ``mx`` (``formats.mx_shared_exponent``) 2**-e and
    2**e for e = floor(log2 m) - emax, at least -127 (-127 for m = 0); NaN inv and multiplier 1 where m is
    not finite or e > 127."""
    if not mx:
        s = np.float64(np.float32(np.float64(fmax) / max(m, eps))) if m > 0 else 1.0
        return s, np.float32(1.0 / s)
    if not np.isfinite(m):
        return 1.0, np.float32(np.nan)
    e = max(((np.float64(m).view(np.int64) >> 52) & 2047) - 1023 - emax, -127) if m > 0 else -127
    if e > 127:
        return 1.0, np.float32(np.nan)
    return np.int64((1023 - e) << 52).view(np.float64), np.float32(np.int64((1023 + e) << 52).view(np.float64))


@_jit
def _scaled(x, blk, mx, emax, eps, out, inv, drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u):
    """``quantize_scaled_codes``' tensor, block and MX scales on float32 x [P, K, Q], blocks of ``blk`` along K: per
    block and column q, amax (NaN if any element is), its multiplier and inv (``_scale``), codes =
    round(float32(x * multiplier)) with the product in float64; inv [P, nb, Q]. As ``_scaled_rows``: amax as the
    largest |x| bit pattern, unsigned offsets, constant flags for the narrow formats' nearest rounding, so the
    loops over a row's Q columns vectorize."""
    xi = x.view(np.int32)
    k_len, q_len = x.shape[1], x.shape[2]
    top = np.empty(q_len, np.int32)
    s = np.empty(q_len, np.float64)
    for p in range(x.shape[0]):
        xp, xip, op, ip = x[p], xi[p], out[p], inv[p]
        for b in range(ip.shape[0]):
            k0 = b * blk
            n = min(k_len - k0, blk)
            top[:] = 0
            for j in range(n):
                xir = xip[np.uint64(k0 + j)]
                for q in range(q_len):
                    top[q] = max(top[q], np.int32(xir[q] & 0x7FFFFFFF))
            ib = ip[b]
            for q in range(q_len):
                m = np.nan if top[q] > 0x7F800000 else np.float64(np.int32(top[q]).view(np.float32))
                s[q], ib[q] = _scale(m, mx, emax, fmax, eps)
            for j in range(n):
                k = np.uint64(k0 + j)
                xr, orow = xp[k], op[k]
                if narrow and nearest:
                    for q in range(q_len):
                        orow[q] = _round(np.float32(np.float64(xr[q]) * s[q]), drop, True, True, saturate, fmax,
                                         past, small, c, inv_u, u)
                else:
                    for q in range(q_len):
                        orow[q] = _round(np.float32(np.float64(xr[q]) * s[q]), drop, nearest, narrow, saturate,
                                         fmax, past, small, c, inv_u, u)


@_jit
def _scaled_rows(x, blk, mx, emax, eps, out, inv, drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u):
    """``_scaled`` for blocks along the contiguous dim (x [P, K]; inv [P, nb]): amax as the largest |x| bit
    pattern (an integer maximum, which vectorizes; above inf's pattern is a NaN)."""
    xi = x.view(np.int32)
    k_len = x.shape[1]
    for p in range(x.shape[0]):
        # a row's views once (a block's three slices cost ~2 ns an element in refcounts), unsigned offsets into
        # them (a signed index numba cannot prove >= 0 gets a wrap-around check that keeps the loop scalar), and
        # the narrow formats' nearest rounding with constant flags (folded once _round is inlined): 1.7-2.2 ->
        # ~0.8 ns an element
        xr, xir, orow, ir = x[p], xi[p], out[p], inv[p]
        for b in range(inv.shape[1]):
            k0 = b * blk
            n = min(k_len - k0, blk)
            top = np.int32(0)
            for j in range(n):
                top = max(top, np.int32(xir[np.uint64(k0 + j)] & 0x7FFFFFFF))
            m = np.nan if top > 0x7F800000 else np.float64(np.int32(top).view(np.float32))
            sc, ir[b] = _scale(m, mx, emax, fmax, eps)
            if narrow and nearest:
                for j in range(n):
                    k = np.uint64(k0 + j)
                    orow[k] = _round(np.float32(np.float64(xr[k]) * sc), drop, True, True, saturate, fmax, past,
                                     small, c, inv_u, u)
            else:
                for j in range(n):
                    k = np.uint64(k0 + j)
                    orow[k] = _round(np.float32(np.float64(xr[k]) * sc), drop, nearest, narrow, saturate, fmax,
                                     past, small, c, inv_u, u)


def _covered(x: Tensor, rounding: str, overflow: str) -> bool:
    return (numba is not None and x.device.type == "cpu" and x.numel() > 0 and rounding in ("nearest", "toward_zero")
            and overflow in formats.OVERFLOWS)


def quantize(x: Tensor, fmt, rounding: str = "nearest", overflow: str = "saturate",
             gen: Optional[torch.Generator] = None, bits: Optional[Tensor] = None) -> Tensor:
    """``formats.quantize`` (same arguments, same values bit for bit), compiled for float32, bfloat16 and float16
    CPU tensors under nearest and toward-zero rounding; the definition otherwise."""
    if not _covered(x, rounding, overflow) or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return formats.quantize(x, fmt, rounding, overflow, gen, bits)
    x32 = x.detach().float().contiguous()
    out = torch.empty_like(x32)
    _quantize(x32.view(-1).numpy(), out.view(-1).numpy(), *_grid(fmt, rounding, overflow))
    return out


def quantize_owned(x: Tensor, fmt, rounding: str = "nearest", overflow: str = "saturate",
                   gen: Optional[torch.Generator] = None, bits: Optional[Tensor] = None) -> Tensor:
    """``quantize``, rounding ``x`` in place where it is a contiguous float32 CPU tensor: for a sum its caller
    owns (``accumulate.gemm``'s). A second output-sized tensor's fresh pages cost more than the rounding itself
    (~0.6-1.9 against ~0.35 ns an element in a chip step)."""
    if _covered(x, rounding, overflow) and x.dtype == torch.float32 and x.is_contiguous() and not x.requires_grad:
        flat = x.view(-1).numpy()
        _quantize(flat, flat, *_grid(fmt, rounding, overflow))
        return x
    return quantize(x, fmt, rounding, overflow, gen, bits)


def quantize_codes(x: Tensor, arith: GemmArith, k_dim: int,
                   gen: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``accumulate.quantize_codes`` (same arguments, same codes and scales bit for bit), compiled on CPU tensors
    for no, tensor, block and MX scales along the last two dims; the definition otherwise."""
    fmt, scaling = arith.in_format, arith.in_scaling
    narrow_in = x.dtype in (torch.float32, torch.bfloat16, torch.float16)   # (mx and none read float64 as is)
    if (not _covered(x, arith.in_rounding, arith.overflow) or k_dim not in (-1, -2) or x.dim() < 2
            or (fmt == "fp32" and scaling == "none") or (scaling in ("mx", "none") and not narrow_in)):
        return codes_definition(x, arith, k_dim, gen)
    if scaling == "none":
        return quantize(x, fmt, arith.in_rounding, arith.overflow), None
    x32 = x.detach().float().contiguous()
    if scaling == "tensor":                  # one block: the whole tensor
        x3, blk = x32.reshape(1, -1, 1), x32.numel()
    else:                                    # [P, K, Q], blocks along K
        x3, blk = x32.reshape(-1, x32.shape[k_dim], 1 if k_dim == -1 else x32.shape[-1]), arith.scale_block
    nb = -(-x3.shape[1] // blk)
    out = torch.empty_like(x3)
    inv = torch.empty(x3.shape[0], nb, x3.shape[2], dtype=torch.float32)
    grid = _grid(fmt, arith.in_rounding, arith.overflow)
    how = (scaling == "mx", formats.get(fmt).emax, formats.AMAX_EPS)
    if x3.shape[2] == 1:                     # blocks along the contiguous dim (A's K, or the whole tensor)
        _scaled_rows(x3[..., 0].numpy(), blk, *how, out[..., 0].numpy(), inv[..., 0].numpy(), *grid)
    else:
        _scaled(x3.numpy(), blk, *how, out.numpy(), inv.numpy(), *grid)
    codes = out.reshape(x.shape)
    if scaling == "tensor":
        return codes, inv.reshape(())
    shape = (*x.shape[:-1], nb) if k_dim == -1 else (*x.shape[:-2], nb, x.shape[-1])
    return codes, inv.reshape(shape)
