"""The chip GEMM on the CPU, compiled: ``accumulate.accumulate``'s arithmetic as Numba loops over the outputs.

The definition spends ~7 torch calls per K chunk (each a pass over [M, N] in memory) and, for the aligning adders,
[M, chunk, N] temporaries per chunk; here each output row keeps its accumulator in cache across all chunks. Exact
chunk sums still come from MKL (float64, all chunks of a row tile in one batched matmul: exact sums, so any order
gives the definition's bits); what follows (scales, the accumulator's rounding, promotion) is one loop. The aligning
adders' per-product cuts are one loop over M, chunk and N with no temporaries. Bitwise the definition on every
profile (tests/test_chip_cpu.py). Without Numba, ``accumulate`` is the definition.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .. import formats
from ..accumulate import GemmArith, Operands, accumulate as definition, block_scales, operands

try:
    import numba
except ImportError:                      # the definition runs instead
    numba = None

_TILE_BYTES = 1 << 20                    # a row tile's float64 chunk sums stay in L2


def _jit(fn=None, *, finite: bool = False):
    # one thread: rows are split among torch's threads in Python threads (``_split_rows``), and an OpenMP pool per
    # process spins against the other runs of a parallel sweep (hydra/launcher=joblib). ``finite``: the loop sees
    # no NaN (inf/NaN codes take the definition), so np.maximum needs no NaN check (LLVM's nnan, nothing else)
    if fn is None:
        return lambda f: _jit(f, finite=finite)
    flags = {"nnan"} if finite else False
    return numba.njit(cache=True, nogil=True, fastmath=flags)(fn) if numba is not None else fn


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


@_jit
def _finish(acc, total, per, out_row):
    for n in range(acc.shape[0]):
        out_row[n] = total[n] if per > 0 else np.float32(acc[n])


@_jit
def _round_chunks(sums, seq, per, scales, drop, rne, out, row0):
    """Chunk sums [nc, R, N] (float64, scaled) added in ``seq``'s order into a float64 accumulator rounded to
    52 - drop mantissa bits by masking its bit pattern (RNE: half an ulp less one plus the kept LSB first; a NaN
    left as the definition leaves it), promoted into a float32 total every ``per`` chunks (0: never; ``scales``
    [G, R, N] float32 multiply the promoted term where it has rows), into ``out[row0 + r]``."""
    nc, rows, n_out = sums.shape
    mask = ~((np.int64(1) << drop) - 1)
    half = ((np.int64(1) << (drop - 1)) - 1) if drop > 0 else np.int64(0)
    for r in range(rows):
        acc = np.zeros(n_out, np.float64)
        iv = acc.view(np.int64)
        total = np.zeros(n_out, np.float32)
        for pos in range(nc):
            c = seq[pos]
            for n in range(n_out):
                acc[n] += sums[c, r, n]
            if drop > 0:
                for n in range(n_out):
                    v = iv[n]
                    if rne:
                        if acc[n] != acc[n]:
                            acc[n] = np.nan
                            continue
                        v += ((v >> drop) & 1) + half
                    iv[n] = v & mask
            _promote(acc, total, scales, seq, pos, per, r)
        _finish(acc, total, per, out[row0 + r])


@_jit
def _exponents(x, emin, out):
    """``accumulate.code_exponents`` from the float64 bits of codes (normal in float64: fp8/fp6/fp4/bf16/fp16
    codes always are): floor(log2 |c|), at least ``emin``; zero -1e4."""
    xb = x.reshape(-1).view(np.int64)
    o = out.reshape(-1)
    for i in range(xb.shape[0]):
        e = max(float(((xb[i] >> 52) & 2047) - 1023), emin)
        o[i] = -1e4 if (xb[i] << 1) == 0 else e


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
        o[i] = -1e4 if (xb[i] & 0x7FFFFFFF) == 0 else max(np.float32(f - 127), emin)
    return field < 255


@_jit
def _cut(x, rne):
    return np.rint(x) if rne else np.trunc(x)


@_jit(finite=True)
def _aligned(a, b, ea, eb, rows_per_batch, seq, ch, per, scales, bits, rne, unnormalized, out, row0, row1):
    """The aligning adders (``accumulate.aligned_sum``; ``aligned_sum_unnormalized`` where ``unnormalized``) on
    codes a [R, K] and b [Bt, K, N] (``mx`` scales already applied: powers of two, so every product is the
    definition's exactly; exponents ea, eb for the unnormalized adder), chunks of ``ch`` in ``seq``'s order,
    promotion as ``_round_chunks``. Exponents and powers of two come from float64 bit patterns (frexp and ldexp
    are library calls, several per output per chunk): the same values for every normal float64, and zero kept
    apart, as the definition keeps it. The per-product loops run in a and b's dtype: float32 (eight lanes) where
    ``_lanes`` proved every product, cut term and chunk sum exact there, float64 otherwise."""
    rows, k_len = a.shape
    n_out = b.shape[2]
    nc = seq.shape[0]
    for r in range(row0, row1):
        bi = r // rows_per_batch if b.shape[0] > 1 else 0
        acc = np.zeros(n_out, np.float64)
        accb = acc.view(np.int64)
        total = np.zeros(n_out, np.float32)
        big = np.empty(n_out, b.dtype)
        shift = np.empty(n_out, np.int64)
        down = np.empty(n_out, np.float64)
        downb = down.view(np.int64)
        down_l = np.empty(n_out, b.dtype)  # the same powers of two in the lanes' dtype
        up = np.empty(n_out, np.float64)
        upb = up.view(np.int64)
        s_l = np.empty(n_out, b.dtype)     # the chunk's cut products
        s = np.empty(n_out, np.float64)
        sb = s.view(np.int64)
        for pos in range(nc):
            c = seq[pos]
            k0, k1 = c * ch, min(c * ch + ch, k_len)
            if unnormalized:                  # the largest unnormalized exponent, the accumulator's leading bit
                for n in range(n_out):
                    e_acc = float(((accb[n] >> 52) & 2047) - 1023)
                    big[n] = -1e4 if acc[n] == 0 else e_acc
                k = k0
                while k + 4 <= k1:            # four products an output a pass: big loaded and stored once
                    e0, e1, e2, e3 = ea[r, k], ea[r, k + 1], ea[r, k + 2], ea[r, k + 3]
                    for n in range(n_out):            # np.maximum vectorizes; a conditional did not
                        big[n] = np.maximum(np.maximum(np.maximum(big[n], e0 + eb[bi, k, n]),
                                                       np.maximum(e1 + eb[bi, k + 1, n], e2 + eb[bi, k + 2, n])),
                                            e3 + eb[bi, k + 3, n])
                    k += 4
                for k in range(k, k1):        # (a zero code's -1e4 stays below -5e3 whatever it is added to)
                    e = ea[r, k]
                    for n in range(n_out):
                        big[n] = np.maximum(big[n], e + eb[bi, k, n])
                for n in range(n_out):
                    shift[n] = np.int64(big[n]) - bits if big[n] > -5e3 else 0
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
            _promote(acc, total, scales, seq, pos, per, r)
        _finish(acc, total, per, out[r])


def _batched(t: Tensor, lead: torch.Size) -> Tensor:
    """[batch, ..., ...] of a B-side tensor: one matrix for all of A's batch (2-D) or one per batch of A's rows."""
    if t.dim() == 2:
        return t.unsqueeze(0)
    return t.expand(*lead, *t.shape[-2:]).reshape(-1, *t.shape[-2:])


def accumulate(ca: Tensor, cb: Tensor, arith: GemmArith, inv_a: Optional[Tensor] = None,
               inv_b: Optional[Tensor] = None, order: Optional[Tensor] = None) -> Tensor:
    """``accumulate.accumulate`` (same arguments, same float32 result bit for bit), compiled, on CPU tensors where
    A's batch holds B's (B 2-D or broadcast to A's batch); the definition itself elsewhere or without Numba."""
    lead = ca.shape[:-2]
    adder = arith.acc_alignment != "exact"
    adder32 = adder and _lanes(arith) is np.float32          # its own pass finds inf/NaN codes
    if (numba is None or ca.device.type != "cpu" or cb.device.type != "cpu" or ca.dim() < 2 or cb.dim() < 2
            or torch.broadcast_shapes(lead, cb.shape[:-2]) != lead
            or (adder and not adder32 and not (ca.isfinite().all() and cb.isfinite().all()))):
        return definition(ca, cb, arith, inv_a, inv_b, order)      # (an adder on inf/NaN codes: rare, exact there)
    m, n_out = ca.shape[-2], cb.shape[-1]
    rows = ca.numel() // max(ca.shape[-1], 1)
    nc = -(-ca.shape[-1] // arith.chunk)
    seq = np.arange(nc, dtype=np.int64) if order is None else order.numpy().astype(np.int64)
    per = arith.promote_every // arith.chunk if arith.promote_every is not None else 0
    out = torch.empty(rows, n_out, dtype=torch.float32)
    if adder32:                                                      # float32 codes as they come, K unpadded
        scales = _rows(block_scales(inv_a, inv_b), lead, rows, n_out) if arith.in_scaling == "block" else _NONE
        if not _adder32(ca, cb, arith, lead, rows, seq, per, scales, out.numpy()):
            return definition(ca, cb, arith, inv_a, inv_b, order)  # (an inf/NaN code: rare, exact there)
    else:
        op = operands(ca, cb, arith, inv_a, inv_b)
        scales = _rows(op.scales, lead, rows, n_out) if op.scales is not None else _NONE
        run = _adder if adder else _exact
        run(op, arith, lead, rows, seq, per, scales, out.numpy())
    y = out.reshape(*lead, m, n_out)
    if arith.in_scaling == "tensor":
        y = y * (inv_a.float() * inv_b.float())
    return y


_NONE = np.zeros((0, 0, 0), np.float32)                # no block scales


def _rows(scales: Tensor, lead, rows: int, n_out: int) -> np.ndarray:
    """Block scales [..., G, M, N] as the loops read them: [G, rows, N]."""
    s = scales.expand(*lead, *scales.shape[-3:]) if scales.dim() > 3 else scales
    return s.movedim(-3, 0).reshape(s.shape[-3], rows, n_out).contiguous().numpy()


def _adder32(ca: Tensor, cb: Tensor, arith: GemmArith, lead, rows: int, seq, per: int, scales, out) -> bool:
    """The aligning adders on float32 lanes (``_lanes``), straight from the float32 codes; False (nothing
    computed) where a code is inf or NaN."""
    a = ca.reshape(rows, -1).float().contiguous().numpy()
    b = _batched(cb, lead).float().contiguous().numpy()
    ea, eb = np.empty(a.shape, np.float32), np.empty(b.shape, np.float32)
    fa, fb = formats.get(arith.in_format), formats.get(arith.b_format or arith.in_format)
    if not (_exponents32(a, np.float32(fa.emin), ea) and _exponents32(b, np.float32(fb.emin), eb)):
        return False
    _split_rows(_aligned, rows, a.shape[1] * b.shape[2], a, b, ea, eb, max(ca.shape[-2], 1), seq, arith.chunk, per,
                scales, arith.acc_mantissa_bits, arith.acc_rounding == "rne",
                arith.acc_alignment == "max_exponent_unnormalized", out)
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
        _POOL[:] = [ThreadPoolExecutor(threads, thread_name_prefix="chip_cpu"), threads, os.getpid()]
    cuts = [rows * i // threads for i in range(threads + 1)]
    done = [_POOL[0].submit(kernel, *args, r0, r1) for r0, r1 in zip(cuts[:-1], cuts[1:])]
    for d in done:
        d.result()


def _code_exponents(codes: Tensor, fmt: str) -> np.ndarray:
    x = np.ascontiguousarray(codes.numpy())
    out = np.empty(x.shape, np.float64)
    _exponents(x, float(formats.get(fmt).emin), out)
    return out


def _adder(op: Operands, arith: GemmArith, lead, rows: int, seq, per: int, scales, out) -> None:
    """The aligning adders on float64 lanes: every product formed in the loop (MX scales multiplied into the codes
    first)."""
    m, n_out, ch = op.a64.shape[-2], op.b64.shape[-1], arith.chunk
    a_in, b_in = op.a64.reshape(rows, -1), _batched(op.b64, lead)
    unnorm = arith.acc_alignment == "max_exponent_unnormalized"
    ea, eb = np.zeros((0, 0), np.float64), np.zeros((0, 0, 0), np.float64)
    if unnorm:
        ea, eb = _code_exponents(a_in, arith.in_format), _code_exponents(b_in, arith.b_format or arith.in_format)
    if op.ia is not None:
        a_in = (op.a64.unflatten(-1, (op.nc, ch)) * op.ia.unsqueeze(-1)).reshape(rows, -1)
        ib = _batched(op.ib, lead).unsqueeze(-2).expand(-1, -1, ch, -1).reshape(-1, op.nc * ch, n_out)
        b_in = b_in * ib
    _aligned(a_in.contiguous().numpy(), b_in.contiguous().numpy(), ea, eb, max(m, 1), seq, ch, per, scales,
             arith.acc_mantissa_bits, arith.acc_rounding == "rne", unnorm, out, 0, rows)


def _lanes(arith: GemmArith) -> type:
    """float32 for the adder's per-product loops where that is exact: codes of narrow formats (every product of
    two codes, at most 24 significant bits, normal in float32 whatever the power of two it is scaled by), no MX
    scales in the codes, and a chunk's cut products (each below 2**(bits + 2)) summing below 2**24."""
    fa, fb = formats.get(arith.in_format), formats.get(arith.b_format or arith.in_format)
    narrow = all(f.max < 2.0 ** 20 and f.emin - f.mbits >= -40 for f in (fa, fb))
    exact = (fa.mbits + fb.mbits + 2 <= 24
             and arith.acc_mantissa_bits + 2 + math.ceil(math.log2(arith.chunk)) <= 24)
    return np.float32 if arith.in_scaling != "mx" and narrow and exact else np.float64


def _exact(op: Operands, arith: GemmArith, lead, rows: int, seq, per: int, scales, out) -> None:
    """Exact chunk sums: float64 batched matmuls over cache-sized tiles (of rows under one B, of whole batches
    under one B per batch), each tile's rounding scan one ``_round_chunks`` call."""
    m, n_out, ch, nc = op.a64.shape[-2], op.b64.shape[-1], arith.chunk, op.nc
    b3 = _batched(op.b64, lead)
    bch = b3.reshape(b3.shape[0], nc, ch, n_out)                       # [batch or 1, nc, ch, N]
    ib = _batched(op.ib, lead).unsqueeze(-2) if op.ib is not None else None     # [batch or 1, nc, 1, N]
    mb = m if b3.shape[0] > 1 else rows              # one B: all of A's rows are one batch
    a4 = op.a64.reshape(-1, mb, nc, ch).transpose(1, 2).contiguous()  # [batch, nc, rows, ch]: BLAS strides
    ia = op.ia.reshape(-1, mb, nc).transpose(1, 2).unsqueeze(-1) if op.ia is not None else None
    step = max(1, _TILE_BYTES // (8 * nc * max(n_out, 1)))           # rows of chunk sums a tile holds
    if b3.shape[0] == 1:
        tiles = [(0, 1, r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    else:
        per_tile = max(1, step // max(m, 1))
        tiles = [(b0, min(a4.shape[0], b0 + per_tile), 0, m) for b0 in range(0, a4.shape[0], per_tile)]
    drop, rne = 52 - arith.acc_mantissa_bits, arith.acc_rounding == "rne"
    for b0, b1, r0, r1 in tiles:
        bs = slice(b0, b1) if bch.shape[0] > 1 else slice(0, 1)
        sums = torch.matmul(a4[b0:b1, :, r0:r1], bch[bs])             # [batches, nc, rows, N], exact
        if ia is not None:                                            # MX: exact powers of two, A's then B's
            sums.mul_(ia[b0:b1, :, r0:r1]).mul_(ib[bs])
        sums = sums.transpose(0, 1).reshape(nc, -1, n_out)          # [nc, batches * rows, N]
        row0 = b0 * m + r0
        sc = np.ascontiguousarray(scales[:, row0:row0 + sums.shape[1]]) if scales.shape[1] else scales
        _round_chunks(sums.numpy(), seq, per, sc, drop, rne, out, row0)
