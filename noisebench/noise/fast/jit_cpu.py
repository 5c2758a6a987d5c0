"""Numba for the chip's CPU loops, its CPU target set up once: 512-bit vectors where the host has AVX-512.

LLVM compiles for 256-bit vectors on Intel's AVX-512 server cores (its ``prefer-256-bit`` tuning: 512-bit
instructions lowered the clock of the first of them, Skylake-SP to Cooper Lake, which keep LLVM's choice here). The
chip's loops are arithmetic on arrays in cache, where twice the lanes pays: the FP8 aligning adder on an Emerald
Rapids VM, one thread, 0.17-0.21 -> 0.12-0.16 ns a product. The loops' results do not depend on the width (no
reassociation is allowed: no fastmath beyond ``nnan``), so the bits are the same either way.

Numba fixes its CPU target when it makes it (at the first ``njit`` in the process), so every compiled loop of the
engine takes ``numba`` from here. Where something else compiled with Numba first, LLVM's choice stays. A user's
``NUMBA_CPU_NAME`` or ``NUMBA_CPU_FEATURES`` wins, and ``NOISEBENCH_WIDE_VECTORS=0`` keeps LLVM's choice.
"""
from __future__ import annotations

import os

try:
    import numba
    from numba.core import config
except ImportError:                      # the definitions run instead
    numba = None

# Intel's first AVX-512 server cores (and Xeon Phi), whose clock drops under 512-bit instructions
_NARROW = ("skylake-avx512", "cascadelake", "cooperlake", "knl", "knm")


def wide_features() -> str | None:
    """The host's LLVM feature string with ``-prefer-256-bit``, or None where it should not change: no AVX-512,
    an early AVX-512 core, the user's own Numba CPU settings, or ``NOISEBENCH_WIDE_VECTORS=0``."""
    if (numba is None or os.environ.get("NOISEBENCH_WIDE_VECTORS", "1") == "0"
            or config.CPU_NAME is not None or config.CPU_FEATURES is not None):
        return None
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    if not features.get("avx512f") or llvm.get_host_cpu_name() in _NARROW:
        return None
    return features.flatten() + ",-prefer-256-bit"


def _configure() -> None:
    from numba.core import registry
    made = "_toplevel_target_context" in registry.cpu_target.__dict__   # (a cached property once made)
    wide = None if made else wide_features()
    if wide is not None:
        config.CPU_FEATURES = wide        # read when Numba makes its CPU target; kept across reload_config()


def target_features() -> str:
    """The LLVM features Numba's CPU target compiles for in this process (what records and tests can check)."""
    from numba.core import registry
    return registry.cpu_target.target_context.codegen()._tm_features


if numba is not None:
    _configure()
