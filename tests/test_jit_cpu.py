"""Numba's CPU target for the chip's loops (``noisebench.noise.fast.jit_cpu``): 512-bit vectors where the host has
AVX-512, the user's own Numba settings respected, and the same bits from the loops at either width."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")
from noisebench.noise.fast import jit_cpu  # noqa: E402

# one process: which features Numba compiles for, and a digest of the compiled loops' results on fixed inputs
PROBE = r"""
import hashlib, sys, torch, yaml
from noisebench.noise.fast import chip_cpu, exp_cpu, jit_cpu, quantize_cpu
from noisebench.noise.chip import ChipProfile
print(jit_cpu.target_features())
digest = hashlib.sha256()
g = torch.Generator().manual_seed(0)
x, w = torch.randn(96, 200, generator=g) * 3, torch.randn(200, 72, generator=g)
for name in ("fp8_fast_accum", "fp8_promote128", "gpu_bf16", "mxfp8", "mxfp4"):
    arith = ChipProfile.from_dict(yaml.safe_load(open(f"conf/chip/{name}.yaml"))).arith
    ca, ia = quantize_cpu.quantize_codes(x, arith, -1)
    cb, ib = quantize_cpu.quantize_codes(w, arith, -2)
    digest.update(ca.numpy().tobytes())
    digest.update(chip_cpu.accumulate(ca, cb, arith, ia, ib).numpy().tobytes())
digest.update(exp_cpu.exp_poly(torch.randn(10_000, generator=g) * 30, 5).numpy().tobytes())
print(digest.hexdigest())
"""


def _probe(**env) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CPU_", "NOISEBENCH_WIDE"))}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=root,
                         env={**base, "OMP_NUM_THREADS": "1", **env}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.split()[-2:]


def _avx512() -> bool:
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get("avx512f")) and llvm.get_host_cpu_name() not in jit_cpu._NARROW


@pytest.mark.skipif(not _avx512(), reason="no AVX-512 (or an early AVX-512 core): LLVM's width is kept")
def test_wide_vectors_on_avx512_and_the_same_bits_as_narrow():
    wide_features, wide = _probe()
    narrow_features, narrow = _probe(NOISEBENCH_WIDE_VECTORS="0")
    assert wide_features.endswith(",-prefer-256-bit") and "prefer-256-bit" not in narrow_features
    assert wide == narrow                     # every loop's bits at 512 and at 256 bits a vector


def test_the_users_numba_cpu_features_win():
    import llvmlite.binding as llvm
    own = llvm.get_host_cpu_features().flatten()
    features, _ = _probe(NUMBA_CPU_FEATURES=own)
    assert features == own
    if not _avx512():
        assert jit_cpu.wide_features() is None
