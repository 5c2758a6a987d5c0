"""torch's own BLAS dgemm (MKL in torch's Linux x86 wheels), called from the compiled chip loops by its address.

Numba's ``np.dot`` calls SciPy's OpenBLAS, which at the chip's K = 32 chunk sums runs ~1.45x slower than the MKL
torch already carries (one thread, 170 x 32 x 384: 80 against 55 GFLOP/s). libtorch_cpu exports MKL's Fortran
``dgemm_``; the loops take its address as an integer argument, so they stay cached on disk. The integer arguments
are stored as int64, which an LP64 BLAS (its low four bytes, little-endian) and an ILP64 one read alike. Where
torch has no MKL (macOS, ARM wheels) or the address fails a check product, ``address()`` is 0 and the loops keep
``np.dot``. Exact chunk sums are the same bits from either BLAS.
"""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import numpy as np
import torch

from .jit_cpu import numba

try:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:                      # the definition runs instead (chip_cpu)
    numba = None

_FOUND: list = []                        # [dgemm_'s address or 0, the library (MKL's) or None]


def _resolve() -> list:
    if _FOUND:
        return _FOUND
    addr, lib = 0, None
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        lib.MKL_Set_Num_Threads_Local.argtypes = [ctypes.c_int]     # MKL's, not another BLAS's dgemm_
        lib.MKL_Get_Max_Threads.restype = ctypes.c_int
        addr = ctypes.cast(lib.dgemm_, ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        addr, lib = 0, None
    if addr and (numba is None or sys.byteorder != "little" or not _checks(addr)):
        addr, lib = 0, None
    _FOUND[:] = [addr, lib]
    return _FOUND


def address() -> int:
    """MKL's ``dgemm_`` in torch's library, or 0 (the loops then call ``np.dot``)."""
    return _resolve()[0]


def serial() -> None:
    """This thread's MKL calls on one thread: the loops split rows among torch's threads themselves."""
    lib = _resolve()[1]
    if lib is not None:
        lib.MKL_Set_Num_Threads_Local(1)


def threads() -> Optional[int]:
    """How many threads this thread's MKL calls may use; None where the loops call ``np.dot``."""
    lib = _resolve()[1]
    return None if lib is None else lib.MKL_Get_Max_Threads()


def _checks(addr: int) -> bool:
    """The address multiplies: a small product with strided rows, against NumPy (integers: exact either way)."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(-9, 9, (5, 7)).astype(np.float64), rng.integers(-9, 9, (7, 6)).astype(np.float64)
    c = np.full((5, 8), np.nan)
    dgemm(addr, a, b[:, :], c[:, :6], workspace())
    return bool(np.array_equal(c[:, :6], a @ b)) and bool(np.isnan(c[:, 6:]).all())


if numba is not None:
    @intrinsic
    def _call13(typingctx, fn, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13):
        """``fn(p1, ..., p13)``: a void C function at address ``fn`` called with 13 pointers (given as integers)."""
        sig = types.void(fn, p1, p2, p3, p4, p5, p6, p7, p8, p9, p10, p11, p12, p13)

        def codegen(context, builder, signature, args):
            vp = ir.IntType(8).as_pointer()
            f = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [vp] * 13).as_pointer())
            builder.call(f, [builder.inttoptr(x, vp) for x in args[1:]])
            return context.get_dummy_value()
        return sig, codegen

    @numba.njit(cache=True, nogil=True)
    def workspace():
        """dgemm_'s scalar arguments: m, n, k, lda, ldb, ldc (int64), 'N', alpha 1.0, beta 0.0."""
        w = np.zeros(9, np.int64)
        w[6] = 78                                   # 'N'
        w[7] = 0x3FF0000000000000                   # alpha: 1.0's bits (beta: 0.0's)
        return w

    @numba.njit(cache=True, nogil=True)
    def dgemm(addr, a, b, c, w):
        """Row-major ``c[m, n] = a[m, k] @ b[k, n]`` (rows contiguous) as column-major ``c^T = b^T a^T``."""
        if c.size == 0 or a.shape[1] == 0:             # (BLAS rejects a leading dimension of 0)
            c[:] = 0.0
            return
        w[0], w[1], w[2] = b.shape[1], a.shape[0], a.shape[1]
        w[3], w[4], w[5] = b.strides[0] // 8, a.strides[0] // 8, c.strides[0] // 8
        p = w.ctypes.data
        _call13(addr, p + 48, p + 48, p, p + 8, p + 16, p + 56, b.ctypes.data, p + 24, a.ctypes.data, p + 32,
                p + 64, c.ctypes.data, p + 40)
