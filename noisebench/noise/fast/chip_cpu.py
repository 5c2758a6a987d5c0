"""The chip GEMM on the CPU, compiled: ``accumulate.accumulate``'s arithmetic as Numba loops over the outputs.

The definition spends ~7 torch calls per K chunk (each a pass over [M, N] in memory) and, for the aligning adders,
[M, chunk, N] temporaries per chunk; here each output row keeps its accumulator in cache across all chunks. Exact
chunk sums come from BLAS (a float64 dgemm per chunk of a block of rows, called from the loop: exact sums, so any
order gives the definition's bits), each added and rounded while it is in cache, with no Python between chunks.
The aligning adders' per-product cuts are one loop over M, chunk and N with no temporaries. Bitwise the definition on every
profile (tests/test_chip_cpu.py). Without Numba, ``accumulate`` is the definition.
"""
from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import formats
from . import blas_cpu, quantize_cpu
from ..accumulate import (GemmArith, Operands, accumulate as definition, b_arith, block_scales, chunk_order,
                          chunk_scales, operands)

from .jit_cpu import numba              # None without Numba: the definition runs instead

_BLOCK_BYTES = 1 << 19                   # a row block's float64 chunk sums (and its accumulators), near L2
_CAST_ONCE_BYTES = 1 << 23               # B cast to float64 once where it fits; else a chunk at a time per block
_ROW_BLOCK = 32                          # the adders' rows per pass over a chunk
_NAN_BITS = np.int64(0x7FF8000000000000)  # float64's NaN, as the definition writes it
_ZERO_EXP = np.int16(-10000)               # a zero code's exponent: any sum with it loses every maximum


def _jit(fn=None, *, finite: bool = False, inline: str = "never"):
    # one thread: rows are split among torch's threads in Python threads (``_split_rows``), and an OpenMP pool per
    # process spins against the other runs of a parallel sweep (hydra/launcher=joblib). ``finite``: the loop sees
    # no NaN (inf/NaN codes take the definition), so np.maximum needs no NaN check (LLVM's nnan, nothing else)
    if fn is None:
        return lambda f: _jit(f, finite=finite, inline=inline)
    flags = {"nnan"} if finite else False
    return (numba.njit(cache=True, nogil=True, fastmath=flags, inline=inline)(fn) if numba is not None
            else fn)


@_jit
def _promote(acc, total, scales, seq, pos, per, r):
    """Where chunk ``seq[pos]`` ends its promotion group (``per`` chunks; 0: never): float32(acc), times the
    group's block scales for row ``r`` where ``scales`` has rows, added into the float32 total; acc cleared."""
    c = seq[pos]
    if per == 0 or (pos + 1 < seq.shape[0] and seq[pos + 1] // per == c // per):
        return
    scaled = scales.shape[1] > 0
    for n in range(acc.shape[0]):
        t = np.float32(acc[n])
        if scaled:
            t = t * scales[c // per, r, n]
        total[n] += t
        acc[n] = 0.0


@_jit(inline="always")
def _code(v, g):
    """A float32 value on a format's grid: ``quantize_cpu._round`` under ``g`` = (round?, the format's ``_grid``)
    (``_grid_of``), or v as it is where ``g`` says it is on its grid already (codes, fp32)."""
    rnd, drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u = g
    return quantize_cpu._round(v, drop, nearest, narrow, saturate, fmax, past, small, c, inv_u, u) if rnd else v


@_jit
def _finish(acc, total, per, out_row, bias, og):
    """A row's float32 result (the total where promoted), then the GEMM's epilogue while the row is in cache:
    ``bias`` added where it has elements (a float32 add, as ``accumulate.gemm`` adds it) and the output put on
    ``og``'s grid (``_code``): the bits of those stages run apart, without their passes over the whole output."""
    biased = bias.shape[0] > 0
    for n in range(acc.shape[0]):
        v = total[n] if per > 0 else np.float32(acc[n])
        if biased:
            v = v + bias[n]
        out_row[n] = v
    if og[0]:                            # (a loop of its own: the rounding's branches kept out of the sums' loop)
        for n in range(acc.shape[0]):
            out_row[n] = _code(out_row[n], og)


@_jit
def _cast_chunk(b, bb, c, ch, gb, dst):
    """Chunk ``c`` of B's batch ``bb`` (b [nb, K, N] codes, or raw values rounded by ``gb``) as float64 in ``dst``
    [ch, N], zero-padded past K."""
    k_len = b.shape[1]
    for j in range(ch):
        k = c * ch + j
        d = dst[j]
        if k < k_len:
            src = b[bb, k]
            for n in range(d.shape[0]):
                d[n] = _code(src[n], gb)
        else:
            d[:] = 0.0


@_jit
def _cast_b(b, ch, gb, dst):
    """B (one batch) as float64 chunks ``dst`` [nc, ch, N]."""
    for c in range(dst.shape[0]):
        _cast_chunk(b, 0, c, ch, gb, dst[c])


@_jit
def _exact_rows(a, b, b64, ia, ib, seq, ch, mb, tile, per, scales, drop, rne, gemm, bias, og, ga, gb, out, row0,
                row1):
    """Exact chunk sums for rows row0 ... row1 - 1 of a [rows, K] (float32 codes, ``mb`` rows a batch) against b
    [nb, K, N] (B cast once into ``b64`` [nc, ch, N] where it has rows; else each chunk cast as a block reads it),
    a block of ``tile`` rows at a time: each chunk's codes cast to float64 in cache, its sums one BLAS dgemm (exact,
    so BLAS's order gives the definition's bits), then added in ``seq``'s order as the definition adds them
    (``mx`` scales ia [nb, nc, mb], ib [nb or 1, nc, N]; promotion into the float32 total with block ``scales``
    [G, rows, N]), while the block's sums, accumulators and totals stay in cache. ``gemm``: MKL's dgemm_ address
    (``blas_cpu``), or 0 for np.dot. ``bias``, ``og``: the epilogue (``_finish``). ``ga``, ``gb``: a and b are raw
    inputs that the casts round (``_code``), or codes."""
    k_len, n_out, nc = a.shape[1], b.shape[2], seq.shape[0]
    mx = ia.shape[0] > 0
    cast = b64.shape[0] == 0
    by_rows = a.strides[1] <= a.strides[0]
    bc = np.empty((ch, n_out), np.float64)
    mask = ~((np.int64(1) << drop) - 1)
    half = ((np.int64(1) << (drop - 1)) - 1) if drop > 0 else np.int64(0)
    a_t, part = np.empty((tile, ch), np.float64), np.empty((tile, n_out), np.float64)
    accs, totals = np.empty((tile, n_out), np.float64), np.empty((tile, n_out), np.float32)
    ivs = accs.view(np.int64)
    w = blas_cpu.workspace()
    r0 = row0
    while r0 < row1:
        bt = r0 // mb
        r1 = min(row1, (bt + 1) * mb, r0 + tile)      # a block stays in one batch (one B)
        nr = r1 - r0
        bb = 0 if b.shape[0] == 1 else bt
        bs = 0 if ib.shape[0] == 1 else bt
        at, pt = (a_t, part) if nr == tile else (np.empty((nr, ch), np.float64), np.empty((nr, n_out), np.float64))
        accs[:nr] = 0.0
        totals[:nr] = 0.0
        for pos in range(nc):
            c = seq[pos]
            if by_rows:
                for i in range(nr):
                    src, dst = a[r0 + i], at[i]
                    for j in range(ch):
                        k = c * ch + j
                        dst[j] = _code(src[k], ga) if k < k_len else 0.0
            else:                                     # A stored K-major (a weight gradient's): read it down columns
                for j in range(ch):
                    k = c * ch + j
                    for i in range(nr):
                        at[i, j] = _code(a[r0 + i, k], ga) if k < k_len else 0.0
            if cast:
                _cast_chunk(b, bb, c, ch, gb, bc)
            if gemm:
                blas_cpu.dgemm(gemm, at, bc if cast else b64[c], pt, w)
            else:
                np.dot(at, bc if cast else b64[c], pt)
            for i in range(nr):                    # (2-D indexing: a row's views cost refcounts, ~8 ms a GEMM)
                if mx:                                # the scales into the sums first: then one pass adds and rounds
                    sa = ia[bt, c, r0 + i - bt * mb]
                    for n in range(n_out):
                        pt[i, n] = pt[i, n] * sa * ib[bs, c, n]
                if drop > 0 and rne:
                    for n in range(n_out):
                        x = accs[i, n] + pt[i, n]
                        v = np.float64(x).view(np.int64)
                        ivs[i, n] = (v + (((v >> drop) & 1) + half)) & mask if x == x else _NAN_BITS
                elif drop > 0:
                    for n in range(n_out):
                        ivs[i, n] = np.float64(accs[i, n] + pt[i, n]).view(np.int64) & mask
                else:
                    for n in range(n_out):
                        accs[i, n] += pt[i, n]
                if per > 0:                           # (a call a row and chunk: ~70 ns, a third of a GEMM at N = 128)
                    _promote(accs[i], totals[i], scales, seq, pos, per, r0 + i)
        for i in range(nr):
            _finish(accs[i], totals[i], per, out[r0 + i], bias, og)
        r0 = r1


@_jit
def _exponents(x, emin, out):
    """``accumulate.code_exponents`` from the float64 bits of codes (normal in float64: fp8/fp6/fp4/bf16/fp16
    codes always are): floor(log2 |c|), at least ``emin``; zero ``_ZERO_EXP``. int16: sums of two stay exact,
    and sixteen lanes a register take their maximum twice as fast as float32's eight."""
    xb = x.reshape(-1).view(np.int64)
    o = out.reshape(-1)
    for i in range(xb.shape[0]):
        e = max(((xb[i] >> 52) & 2047) - 1023, emin)
        o[i] = _ZERO_EXP if (xb[i] << 1) == 0 else np.int16(e)


@_jit
def _exponents32(x, emin, out):
    """``_exponents`` from float32 codes' bits (a float32 subnormal lies below every narrow format's emin);
    False where a code is inf or NaN."""
    xb = x.reshape(-1).view(np.int32)
    o = out.reshape(-1)
    field = 0
    for i in range(xb.shape[0]):
        f = (xb[i] >> 23) & 255
        field = max(field, f)
        o[i] = _ZERO_EXP if (xb[i] & 0x7FFFFFFF) == 0 else np.int16(max(f - 127, emin))
    return field < 255


@_jit
def _cut(x, rne):
    return np.rint(x) if rne else np.trunc(x)


@_jit(finite=True)
def _aligned(a, b, ea, eb, rows_per_batch, seq, ch, per, scales, bits, rne, unnormalized, bias, og, out, row0,
             row1):
    """The aligning adders (``accumulate.aligned_sum``; ``aligned_sum_unnormalized`` where ``unnormalized``) on
    codes a [R, K] and b [Bt, K, N] (``mx`` scales already applied: powers of two, so every product is the
    definition's exactly; exponents ea, eb for the unnormalized adder), chunks of ``ch`` in ``seq``'s order,
    promotion and epilogue as ``_exact_rows``. Exponents and powers of two come from float64 bit patterns (frexp
    and ldexp are library calls, several per output per chunk): the same values for every normal float64, and zero
    kept apart, as the definition keeps it. The per-product loops run in a and b's dtype: float32 (eight lanes) where
    ``_lanes`` proved every product, cut term and chunk sum exact there, float64 otherwise."""
    rows, k_len = a.shape
    n_out = b.shape[2]
    nc = seq.shape[0]
    # a block of rows at a time, chunk by chunk, so a chunk's B and exponents (ch x N) stay in cache across the
    # block's rows: row by row over all of K, a long K (a weight gradient's tokens) streamed B from memory per row
    blk = max(1, min(_ROW_BLOCK, row1 - row0))
    accs = np.empty((blk, n_out), np.float64)
    accsb = accs.view(np.int64)
    totals = np.empty((blk, n_out), np.float32)
    big = np.empty(n_out, b.dtype)
    ebig = np.empty(n_out, np.int16)       # the unnormalized adder's largest exponent
    shift = np.empty(n_out, np.int64)
    down = np.empty(n_out, np.float64)
    downb = down.view(np.int64)
    down_l = np.empty(n_out, b.dtype)      # the same powers of two in the lanes' dtype
    up = np.empty(n_out, np.float64)
    upb = up.view(np.int64)
    s_l = np.empty(n_out, b.dtype)         # the chunk's cut products
    s = np.empty(n_out, np.float64)
    sb = s.view(np.int64)
    for rb0 in range(row0, row1, blk):
        rb1 = min(rb0 + blk, row1)
        accs[:] = 0.0
        totals[:] = 0.0
        for pos in range(nc):
            c = seq[pos]
            k0, k1 = c * ch, min(c * ch + ch, k_len)
            for r in range(rb0, rb1):
                bi = r // rows_per_batch if b.shape[0] > 1 else 0
                acc, accb, total = accs[r - rb0], accsb[r - rb0], totals[r - rb0]
                if unnormalized:                  # the largest unnormalized exponent, the accumulator's leading bit
                    for n in range(n_out):
                        e_acc = np.int16(((accb[n] >> 52) & 2047) - 1023)
                        ebig[n] = _ZERO_EXP if acc[n] == 0 else e_acc
                    k = k0
                    while k + 4 <= k1:            # four products an output a pass: big loaded and stored once
                        e0, e1, e2, e3 = ea[r, k], ea[r, k + 1], ea[r, k + 2], ea[r, k + 3]
                        for n in range(n_out):            # np.maximum vectorizes; a conditional did not
                            x = max(ebig[n], np.int16(e0 + eb[bi, k, n]))
                            y = max(np.int16(e1 + eb[bi, k + 1, n]), np.int16(e2 + eb[bi, k + 2, n]))
                            ebig[n] = max(max(x, y), np.int16(e3 + eb[bi, k + 3, n]))
                        k += 4
                    for k in range(k, k1):        # (a zero code's _ZERO_EXP stays below -5000 whatever it meets)
                        e = ea[r, k]
                        for n in range(n_out):
                            ebig[n] = max(ebig[n], np.int16(e + eb[bi, k, n]))
                    for n in range(n_out):
                        shift[n] = np.int64(ebig[n]) - bits if ebig[n] > -5000 else 0
                else:                             # the largest |term|'s leading bit
                    for n in range(n_out):
                        big[n] = abs(acc[n])
                    for k in range(k0, k1):
                        av = abs(a[r, k])
                        for n in range(n_out):
                            big[n] = np.maximum(big[n], av * abs(b[bi, k, n]))
                    for n in range(n_out):
                        down[n] = big[n]                  # (scratch: big's float64 bits)
                        e2 = ((downb[n] >> 52) & 2047) - 1023
                        shift[n] = e2 - bits if big[n] != 0 else -1 - bits
                for n in range(n_out):
                    downb[n] = (1023 - shift[n]) << 52
                    upb[n] = (1023 + shift[n]) << 52
                    down_l[n] = down[n]
                    s_l[n] = 0.0
                k = k0                            # four products an output a pass, one loop per rounding so each
                while k + 4 <= k1:                # vectorizes; the cut terms are integers, so any order sums exactly
                    a0, a1, a2, a3 = a[r, k], a[r, k + 1], a[r, k + 2], a[r, k + 3]
                    if rne:
                        for n in range(n_out):
                            d = down_l[n]
                            s_l[n] += ((np.rint(a0 * b[bi, k, n] * d) + np.rint(a1 * b[bi, k + 1, n] * d))
                                       + (np.rint(a2 * b[bi, k + 2, n] * d) + np.rint(a3 * b[bi, k + 3, n] * d)))
                    else:
                        for n in range(n_out):
                            d = down_l[n]
                            s_l[n] += ((np.trunc(a0 * b[bi, k, n] * d) + np.trunc(a1 * b[bi, k + 1, n] * d))
                                       + (np.trunc(a2 * b[bi, k + 2, n] * d) + np.trunc(a3 * b[bi, k + 3, n] * d)))
                    k += 4
                for k in range(k, k1):
                    av = a[r, k]
                    if rne:
                        for n in range(n_out):
                            s_l[n] += np.rint(av * b[bi, k, n] * down_l[n])
                    else:
                        for n in range(n_out):
                            s_l[n] += np.trunc(av * b[bi, k, n] * down_l[n])
                for n in range(n_out):
                    s[n] = (np.float64(s_l[n]) + _cut(acc[n] * down[n], rne)) * up[n]
                if unnormalized:                  # the sum's own bits + 1 kept (zero stays itself)
                    for n in range(n_out):
                        ks = ((sb[n] >> 52) & 2047) - 1023 - bits
                        downb[n] = (1023 - ks) << 52
                        upb[n] = (1023 + ks) << 52
                    for n in range(n_out):
                        acc[n] = _cut(s[n] * down[n], rne) * up[n] if s[n] != 0 else s[n]
                else:
                    for n in range(n_out):
                        acc[n] = s[n]
                if per > 0:
                    _promote(acc, total, scales, seq, pos, per, r)
        for r in range(rb0, rb1):
            _finish(accs[r - rb0], totals[r - rb0], per, out[r], bias, og)


def _batched(t: Tensor, lead: torch.Size) -> Tensor:
    """[batch, ..., ...] of a B-side tensor: one matrix for all of A's batch (2-D) or one per batch of A's rows."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def accumulate(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a: Optional[Tensor] = None,
               inv_b: Optional[Tensor] = None, order: Optional[Tensor] = None) -> Tensor:
    """``accumulate.accumulate`` (same arguments, same float32 result bit for bit), compiled, on CPU tensors where
    A's batch holds B's (B 2-D or broadcast to A's batch); the definition itself elsewhere or without Numba."""
    if _compiled(ca, cb) and _swaps(ca, cb, arith):
        return _swapped(ca, cb, arith, inv_a, inv_b, order)
    return _accumulate(ca, cb, arith, inv_a, inv_b, order)


def _swaps(ca: Tensor, cb: Tensor, arith: GemmArith) -> bool:
    """Whether an adder runs as (B^T A^T)^T (``_swapped``): fewer outputs a row than ``_SWAP_BELOW``, more rows."""
    rows = ca.numel() // max(ca.shape[-1], 1)
    return arith.acc_alignment != "exact" and cb.shape[-1] < _SWAP_BELOW and rows > cb.shape[-1]


def _per_column(bias: Optional[Tensor], n_out: int) -> bool:
    """Whether the loops can add ``bias``: none, or one value per output column."""
    return bias is None or (bias.dim() == 1 and bias.numel() == n_out)


def accumulate_out(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a: Optional[Tensor] = None,
                   inv_b: Optional[Tensor] = None, order: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None) -> Tensor:
    """``accumulate`` and then ``accumulate.gemm``'s epilogue, the bias added and the output rounded to
    ``arith.out_format`` (``Paths.accumulate_out``): the same bits as those stages apart. The loops do the epilogue
    in their last pass over each row, where the row is in cache, instead of two more passes over the whole output
    (a fresh sum's pages and its rounding cost ~0.5-0.8 ns an element in a chip step). Not where tensor scales
    multiply the sum first, a swapped adder (its rows are the output's columns) or a bias that is not one per
    column: there the stages run apart."""
    if (_compiled(ca, cb) and arith.in_scaling != "tensor" and not _swaps(ca, cb, arith)
            and arith.overflow in formats.OVERFLOWS and _per_column(bias, cb.shape[-1])):
        return _accumulate(ca, cb, arith, inv_a, inv_b, order, epilogue=True, bias=bias)
    return _epilogue(accumulate(ca, cb, arith, inv_a, inv_b, order), arith, bias)


def _epilogue(y: Tensor, arith: GemmArith, bias: Optional[Tensor]) -> Tensor:
    """``accumulate.gemm``'s epilogue on a float32 sum it owns."""
    if bias is not None:
        y = y + bias.detach().float()
    if arith.out_format == "fp32":
        return y
    return quantize_cpu.quantize_owned(y, arith.out_format, "nearest", arith.overflow)


_NO_BIAS = np.zeros(0, np.float32)
_CODES = (False, *quantize_cpu._grid("bf16", "nearest", "inf"))   # (``_code``) values already on their grid
_NO_EPILOGUE = (_NO_BIAS, _CODES)
_RAW = (torch.float32, torch.bfloat16, torch.float16)


def _grid_of(fmt: str, rounding: str, overflow: str) -> tuple:
    """``_code``'s grid for a format: fp32 values are on it as they are."""
    return _CODES if fmt == "fp32" else (True, *quantize_cpu._grid(fmt, rounding, overflow))


def _epilogue_args(arith: GemmArith, bias: Optional[Tensor]) -> tuple:
    """(bias, og) as ``_finish`` reads them."""
    b = _NO_BIAS if bias is None else bias.detach().float().contiguous().numpy()
    return b, _grid_of(arith.out_format, "nearest", arith.overflow)


def gemm(a: Tensor, b: Tensor, arith: GemmArith, gen: Optional[torch.Generator] = None,
         bias: Optional[Tensor] = None, qb: Optional[tuple] = None) -> Optional[Tensor]:
    """``accumulate.gemm`` as one stage (``Paths.gemm``) where the inputs are unscaled and the chunk sums exact
    (gpu_bf16, approx_exp_acc10): the loop rounds each raw input to its code as it casts a chunk to float64, instead
    of a pass over each input that writes codes for the loop to read again, and does the epilogue
    (``accumulate_out``). The same bits. None where it does not cover ``arith`` or the operands: the stages run."""
    codes_b = qb is not None
    if (arith.in_scaling != "none" or arith.acc_alignment != "exact" or a.dtype not in _RAW
            or (not codes_b and b.dtype not in _RAW) or (codes_b and (not isinstance(qb, tuple) or qb[1] is not None))
            or arith.in_rounding != "nearest" or arith.overflow not in formats.OVERFLOWS
            or not _compiled(a, b) or not _per_column(bias, b.shape[-1])):
        return None
    ga = _grid_of(arith.in_format, arith.in_rounding, arith.overflow)
    gb = _CODES if codes_b else _grid_of(b_arith(arith).in_format, arith.in_rounding, arith.overflow)
    cb = qb[0] if codes_b else b.detach().float()
    order = chunk_order(arith, a.shape[-1], gen)             # (nearest rounding draws nothing before it)
    return _accumulate(a.detach().float(), cb, arith, None, None, order, epilogue=True, bias=bias,
                       rounding=(ga, gb))


def _compiled(ca: Tensor, cb: Tensor) -> bool:
    """Whether the compiled loops take ``ca @ cb``: Numba here, CPU tensors, A's batch holding B's."""
    return (numba is not None and ca.device.type == "cpu" and cb.device.type == "cpu" and ca.dim() >= 2
            and cb.dim() >= 2 and torch.broadcast_shapes(ca.shape[:-2], cb.shape[:-2]) == ca.shape[:-2])


_SWAP_BELOW = 64                         # an adder's outputs a row fewer than this (and more rows): its loops run
                                         # along N (attention's P @ V: N = 32, 0.45 ns a product against 0.2)


def _swapped(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a, inv_b, order) -> Tensor:
    """``ca @ cb`` as (cb^T @ ca^T)^T, so the adders' lanes run along the longer side: each output is the same sum
    of the same products in the same chunks (products commute, scales multiply the same way, the adders' cuts do
    not depend on which operand is A), so the bits are the same; B's format becomes A's."""
    lead, m, n_out = ca.shape[:-2], ca.shape[-2], cb.shape[-1]
    swap = dataclasses.replace(arith, in_format=arith.b_format or arith.in_format, b_format=arith.in_format)
    if cb.dim() == 2:                              # one B: A's batch folds into its rows, B^T holds no batch
        ca = ca.reshape(-1, ca.shape[-1])
        if inv_a is not None and inv_a.dim() > 1:
            inv_a = inv_a.reshape(-1, inv_a.shape[-1])
    else:                                          # B^T must hold A^T's batch: broadcast it
        cb = cb.expand(*lead, *cb.shape[-2:])
        if inv_b is not None and inv_b.dim() > 1:
            inv_b = inv_b.expand(*lead, *inv_b.shape[-2:])
    t = (lambda x: x) if arith.in_scaling == "tensor" else (lambda x: None if x is None else x.mT)
    y = _accumulate(cb.mT, ca.mT, swap, t(inv_b), t(inv_a), order)
    return y.mT.reshape(*lead, m, n_out).contiguous()


def _accumulate(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a: Optional[Tensor] = None,
                inv_b: Optional[Tensor] = None, order: Optional[Tensor] = None, epilogue: bool = False,
                bias: Optional[Tensor] = None, rounding: tuple = (_CODES, _CODES)) -> Tensor:
    """``epilogue``: the bias added and the output rounded too (``accumulate_out``; no tensor scales).
    ``rounding``: ``gemm``'s raw inputs and how the exact loop makes their codes."""
    lead = ca.shape[:-2]
    adder = arith.acc_alignment != "exact"
    adder32 = adder and _lanes(arith) is np.float32          # its own pass finds inf/NaN codes
    epi = _epilogue_args(arith, bias) if epilogue else _NO_EPILOGUE

    def by_definition():                                          # (an adder on inf/NaN codes: rare, exact there)
        y = definition(ca, cb, arith, inv_a, inv_b, order)
        return _epilogue(y, arith, bias) if epilogue else y

    if not _compiled(ca, cb) or (adder and not adder32 and not (ca.isfinite().all() and cb.isfinite().all())):
        return by_definition()
    m, n_out = ca.shape[-2], cb.shape[-1]
    rows = ca.numel() // max(ca.shape[-1], 1)
    nc = -(-ca.shape[-1] // arith.chunk)
    seq = np.arange(nc, dtype=np.int64) if order is None else order.numpy().astype(np.int64)
    per = arith.promote_every // arith.chunk if arith.promote_every is not None else 0
    out = torch.empty(rows, n_out, dtype=torch.float32)
    if adder32:                                                      # float32 codes as they come, K unpadded
        scales = _rows(block_scales(inv_a, inv_b), lead, rows, n_out) if arith.in_scaling == "block" else _NONE
        if not _adder32(ca, cb, arith, lead, rows, seq, per, scales, epi, out.numpy()):
            return by_definition()
    elif adder:
        op = operands(ca, cb, arith, inv_a, inv_b)
        scales = _rows(op.scales, lead, rows, n_out) if op.scales is not None else _NONE
        _adder(op, arith, lead, rows, seq, per, scales, epi, out.numpy())
    else:
        _exact(ca, cb, arith, inv_a, inv_b, lead, rows, seq, per, epi, rounding, out.numpy())
    y = out.reshape(*lead, m, n_out)
    if arith.in_scaling == "tensor":
        y = y * (inv_a.float() * inv_b.float())
    return y


_NONE = np.zeros((0, 0, 0), np.float32)                # no block scales


def _rows(scales: Tensor, lead, rows: int, n_out: int) -> np.ndarray:
    """Block scales [..., G, M, N] as the loops read them: [G, rows, N]."""
    s = scales.expand(*lead, *scales.shape[-3:]) if scales.dim() > 3 else scales
    return s.movedim(-3, 0).reshape(s.shape[-3], rows, n_out).contiguous().numpy()


def _adder32(ca: Tensor, cb: Tensor, arith: GemmArith, lead, rows: int, seq, per: int, scales, epi, out) -> bool:
    """The aligning adders on float32 lanes (``_lanes``), straight from the float32 codes; False (nothing
    computed) where a code is inf or NaN."""
    a = ca.reshape(rows, -1).float().contiguous().numpy()
    b = _batched(cb, lead).float().contiguous().numpy()
    ea, eb = np.empty(a.shape, np.int16), np.empty(b.shape, np.int16)
    fa, fb = formats.get(arith.in_format), formats.get(arith.b_format or arith.in_format)
    if not (_exponents32(a, fa.emin, ea) and _exponents32(b, fb.emin, eb)):
        return False
    _split_rows(_aligned, rows, a.shape[1] * b.shape[2], a, b, ea, eb, max(ca.shape[-2], 1), seq, arith.chunk, per,
                scales, arith.acc_mantissa_bits, arith.acc_rounding == "rne",
                arith.acc_alignment == "max_exponent_unnormalized", *epi, out)
    return True


_POOL: list = []                                         # [ThreadPoolExecutor, its workers, the owning pid]


def _split_rows(kernel, rows: int, per_row: int, *args) -> None:
    """``kernel(*args, row0, row1)`` over all rows, split among torch's thread count in Python threads (the loops
    release the GIL): no OpenMP pool of Numba's spinning beside torch's, one worker under a parallel sweep."""
    threads = torch.get_num_threads()
    if threads < 2 or rows < 2 * threads or rows * per_row < 1 << 20:
        kernel(*args, 0, rows)
        return
    if not _POOL or _POOL[1:] != [threads, os.getpid()]:    # a forked child inherits the pool but not its threads
        if _POOL and _POOL[2] == os.getpid():
            _POOL[0].shutdown()
        _POOL[:] = [ThreadPoolExecutor(threads, thread_name_prefix="chip_cpu", initializer=blas_cpu.serial),
                    threads, os.getpid()]
    cuts = [rows * i // threads for i in range(threads + 1)]
    done = [_POOL[0].submit(kernel, *args, r0, r1) for r0, r1 in zip(cuts[:-1], cuts[1:])]
    for d in done:
        d.result()


def _code_exponents(codes: Tensor, fmt: str) -> np.ndarray:
    x = np.ascontiguousarray(codes.numpy())
    out = np.empty(x.shape, np.int16)
    _exponents(x, formats.get(fmt).emin, out)
    return out


def _adder(op: Operands, arith: GemmArith, lead, rows: int, seq, per: int, scales, epi, out) -> None:
    """The aligning adders on float64 lanes: every product formed in the loop (MX scales multiplied into the codes
    first)."""
    m, n_out, ch = op.a64.shape[-2], op.b64.shape[-1], arith.chunk
    a_in, b_in = op.a64.reshape(rows, -1), _batched(op.b64, lead)
    unnorm = arith.acc_alignment == "max_exponent_unnormalized"
    ea, eb = np.zeros((0, 0), np.int16), np.zeros((0, 0, 0), np.int16)
    if unnorm:
        ea, eb = _code_exponents(a_in, arith.in_format), _code_exponents(b_in, arith.b_format or arith.in_format)
    if op.ia is not None:
        a_in = (op.a64.unflatten(-1, (op.nc, ch)) * op.ia.unsqueeze(-1)).reshape(rows, -1)
        ib = _batched(op.ib, lead).unsqueeze(-2).expand(-1, -1, ch, -1).reshape(-1, op.nc * ch, n_out)
        b_in = b_in * ib
    _aligned(a_in.contiguous().numpy(), b_in.contiguous().numpy(), ea, eb, max(m, 1), seq, ch, per, scales,
             arith.acc_mantissa_bits, arith.acc_rounding == "rne", unnorm, *epi, out, 0, rows)


def _lanes(arith: GemmArith) -> type:
    """float32 for the adder's per-product loops where that is exact: codes of narrow formats (every product of
    two codes, at most 24 significant bits, normal in float32 whatever the power of two it is scaled by), no MX
    scales in the codes, and a chunk's cut products (each below 2**(bits + 2)) summing below 2**24."""
    fa, fb = formats.get(arith.in_format), formats.get(arith.b_format or arith.in_format)
    narrow = all(f.max < 2.0 ** 20 and f.emin - f.mbits >= -40 for f in (fa, fb))
    exact = (fa.mbits + fb.mbits + 2 <= 24
             and arith.acc_mantissa_bits + 2 + math.ceil(math.log2(arith.chunk)) <= 24)
    return np.float32 if arith.in_scaling != "mx" and narrow and exact else np.float64


_BLAS: list = []                         # the BLAS that Numba's np.dot calls, held to one thread (once)


def _one_blas_thread() -> None:
    """Where torch has no MKL (``blas_cpu``), np.dot in the loops calls SciPy's BLAS (Numba takes its dgemm from
    scipy.linalg.cython_blas), whose own pool would start a thread per core in every process of a parallel sweep and
    spin beside torch's threads: held to one thread, as the loops split rows among torch's threads themselves."""
    if not _BLAS:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library, so the controller finds it)
        from threadpoolctl import ThreadpoolController

        home = os.path.dirname(scipy.__file__)            # its wheels' BLAS lies in scipy.libs beside it
        libs = [lc for lc in ThreadpoolController().lib_controllers
                if lc.user_api == "blas" and lc.filepath.startswith(home)]
        for lc in libs:
            lc.set_num_threads(1)
        _BLAS.append(libs)


def _exact(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a, inv_b, lead, rows: int, seq, per: int, epi, rounding,
           out) -> None:
    """Exact chunk sums (``_exact_rows``), rows split among torch's threads."""
    ch, k, m, n_out = arith.chunk, ca.shape[-1], ca.shape[-2], cb.shape[-1]
    nc = -(-k // ch)
    ia, ib, block = chunk_scales(inv_a, inv_b, arith, nc)
    scales = _rows(block, lead, rows, n_out) if block is not None else _NONE
    b3 = _batched(cb, lead).contiguous()                              # [batch or 1, K, N]
    mb = m if b3.shape[0] > 1 else rows              # one B: all of A's rows are one batch
    a2 = ca.reshape(rows, k)
    if a2.stride(-1) != 1 and a2.stride(0) != 1:
        a2 = a2.contiguous()
    ia3 = ia.reshape(-1, mb, nc).transpose(1, 2).contiguous().numpy() if ia is not None else np.zeros((0, 0, 0))
    ib3 = _batched(ib, lead).contiguous().numpy() if ib is not None else np.zeros((0, 0, 0))
    tile = max(8, min(512, _BLOCK_BYTES // (8 * max(n_out, 1))))
    b64 = np.zeros((0, 0, 0))
    if b3.shape[0] == 1 and rows > tile and nc * ch * n_out * 8 <= _CAST_ONCE_BYTES:
        b64 = np.empty((nc, ch, n_out))               # one B that several blocks read: cast once
        _cast_b(b3.numpy(), ch, rounding[1], b64)
    gemm = blas_cpu.address()
    if not gemm:
        _one_blas_thread()
    _split_rows(_exact_rows, rows, k * n_out, a2.numpy(), b3.numpy(), b64, ia3, ib3, seq, ch, mb, tile, per, scales,
                52 - arith.acc_mantissa_bits, arith.acc_rounding == "rne", gemm, *epi, *rounding, out)
