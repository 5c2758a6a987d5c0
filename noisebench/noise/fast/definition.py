"""The fused kernel's noise, defined in NumPy (no Triton needed): what ``kernels.py`` must draw for a given seed.

Program p = e // BLOCK covers BLOCK elements as SLICES contiguous slices of Q; lane i draws one Philox4x32-ROUNDS block
(key = the call's seed, counter p*Q + i); word j's 16-bit halves (lo, hi) give radius sqrt(-2 ln((lo + 1/2) / 2^16))
and angle 2 pi (hi + 1/2) / 2^16 - pi, whose cosine and sine are the normals of slices 2j and 2j + 1.
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 8192   # elements per program. Fixed on purpose: the element -> (Philox counter, lane) map depends on it, so
               # the draws for a given key never depend on launch tuning.
SLICES = 8     # normals per Philox block (4 words x 2 halves)
Q = BLOCK // SLICES
ROUNDS = 7
_KEY_MASK, _KEY_BIT = (1 << 62) - 1, 1 << 62   # keys always >= 2**62: Triton then always types them int64
_TWO_PI = 2.0 * math.pi


def kernel_key(seed: int) -> int:
    """The key the kernel receives for the engine's 63-bit per-call seed."""
    return (int(seed) & _KEY_MASK) | _KEY_BIT


_PHILOX = (0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85)


def philox_normals(key: int, ctr: np.ndarray) -> list:
    """The eight float64 normals of each Philox4x32-ROUNDS block (key ``key``, counters ``ctr``, uint64 < 2**32):
    word j's 16-bit halves (lo, hi) give the cosine (normal 2j) and sine (normal 2j + 1) of one Box-Muller pair."""
    M32 = np.uint64(0xFFFFFFFF)
    c0, c1 = ctr & M32, ctr >> np.uint64(32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64((key >> 32) & 0xFFFFFFFF)
    A, B, KA, KB = (np.uint64(v) for v in _PHILOX)
    for _ in range(ROUNDS):
        pa, pb = A * c0, B * c2                              # < 2**64: exact in uint64
        c0, c1, c2, c3 = ((pb >> np.uint64(32)) ^ c1 ^ k0) & M32, pb & M32, ((pa >> np.uint64(32)) ^ c3 ^ k1) & M32, \
            pa & M32
        k0, k1 = (k0 + KA) & M32, (k1 + KB) & M32
    out = []
    for w in (c0, c1, c2, c3):
        u = ((w & np.uint64(0xFFFF)).astype(np.float64) + 0.5) / 65536.0
        th = ((w >> np.uint64(16)).astype(np.float64) + 0.5) * (_TWO_PI / 65536.0) - math.pi
        r = np.sqrt(-2.0 * np.log(u))
        out += [r * np.cos(th), r * np.sin(th)]
    return out


def reference_normals(seed: int, numel: int) -> np.ndarray:
    """float64 normals the kernel draws for ``numel`` elements under the engine seed ``seed`` (no graph counter)."""
    nprog = -(-numel // BLOCK)
    normals = philox_normals(kernel_key(seed), np.arange(nprog * Q, dtype=np.uint64))
    out = np.stack([n.reshape(nprog, Q) for n in normals], axis=1)   # (program, slice, lane)
    return out.reshape(-1)[:numel]


def reference_normals_flat(seed: int, numel: int) -> np.ndarray:
    """float64 normals of the compiled route's fused draw (``inline.PHILOX7_ASM``) for ``numel`` elements: element e
    takes block e >> 3 and its normal e & 7 (word (e >> 1) & 3; cosine when e is even, sine when odd). The same
    generator as the kernel's, laid out by flat index (a pointwise op cannot see the kernel's slices)."""
    normals = philox_normals(kernel_key(seed), np.arange(-(-numel // SLICES), dtype=np.uint64))
    return np.stack(normals, axis=1).reshape(-1)[:numel]
