"""The chip GEMM kernel (``noisebench.noise.fast.chip_gemm``) against the definition (``accumulate.accumulate``).

Bitwise where the tensor core's chunk sums are exact (small-integer codes: every partial sum is an integer below
2**24); on random fp8 codes the share of equal elements and the largest difference in accumulator ulps of
sum |a b|. On CUDA directly; on CPU through Triton's interpreter in a child process (TRITON_INTERPRET must be set
before Triton loads).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from noisebench.noise import accumulate, formats

triton = pytest.importorskip("triton") if __name__ != "__main__" else __import__("triton")
from noisebench.noise.fast import chip_gemm as cg  # noqa: E402

CODES_API = "inv_a" in inspect.signature(accumulate.accumulate).parameters
needs_codes_api = pytest.mark.skipif(not CODES_API, reason="accumulate.accumulate predates the codes API (inv_a)")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (in_scaling, scale_block, chunk, acc bits, acc rounding, promote_every, out_format, bias, batched)
EXACT_CASES = [
    ("none", 32, 32, 7, "toward_zero", None, "fp32", False, False),
    ("none", 32, 32, 7, "rne", None, "fp32", True, False),
    ("none", 32, 16, 4, "rne", 64, "bf16", True, True),
    ("none", 32, 128, 10, "toward_zero", 128, "fp32", False, False),
    ("none", 32, 64, 23, "rne", None, "bf16", True, False),
    ("tensor", 32, 32, 13, "toward_zero", None, "fp32", False, True),
    ("tensor", 32, 16, 6, "rne", 128, "bf16", True, False),
    ("block", 128, 32, 5, "toward_zero", 128, "fp32", True, False),
    ("block", 64, 64, 8, "rne", 64, "bf16", False, True),
    ("mx", 32, 32, 23, "rne", None, "fp32", False, False),
    ("mx", 32, 16, 6, "toward_zero", 64, "bf16", True, True),
]
RANDOM_CASES = [   # fp8 e4m3 codes of normal inputs: fast-accum-like, promote-128, MX-like
    ("tensor", 32, 32, 13, "toward_zero", None, "fp32", False, False),
    ("block", 128, 32, 13, "toward_zero", 128, "fp32", False, False),
    ("mx", 32, 32, 23, "rne", None, "fp32", False, False),
    ("none", 32, 32, 10, "rne", None, "fp32", False, False),
]

# the aligning adder (acc_alignment max_exponent) on random fp8 codes: every product exact in float32, so the
# kernel equals the definition bitwise on any codes (fp8_fast_accum, fp8_promote128 and two variants)
ALIGNED_CASES = [
    ("tensor", 32, 32, 13, "toward_zero", None, "fp32", False, False, "max_exponent"),
    ("block", 128, 32, 13, "toward_zero", 128, "bf16", True, False, "max_exponent"),
    ("none", 32, 16, 10, "rne", None, "bf16", True, True, "max_exponent"),
    ("tensor", 32, 64, 13, "rne", 128, "fp32", False, False, "max_exponent"),
]


def _arith(case) -> accumulate.GemmArith:
    scaling, block, chunk, bits, rounding, promote, out = case[:7]
    return accumulate.GemmArith(in_format="fp8_e4m3", in_scaling=scaling, scale_block=block, chunk=chunk,
                                acc_mantissa_bits=bits, acc_rounding=rounding, promote_every=promote,
                                out_format=out, acc_alignment=case[9] if len(case) > 9 else "exact")


def _inputs(case, m, k, n, exact: bool, device: str, gen: torch.Generator):
    """Codes, scales and bias for ``case``: integer codes in [-16, 16] (exact chunk sums) or e4m3 codes of
    N(0, 1) * 100 (the format's whole range)."""
    scaling, block, _, _, _, _, _, with_bias, batched = case[:9]
    lead = (2,) if batched else ()
    if exact:
        ca = torch.randint(-16, 17, (*lead, m, k), generator=gen).float()
        cb = torch.randint(-16, 17, (*lead, k, n), generator=gen).float()
    else:
        ca = formats.quantize(torch.randn(*lead, m, k, generator=gen) * 100, "fp8_e4m3")
        cb = formats.quantize(torch.randn(*lead, k, n, generator=gen) * 100, "fp8_e4m3")
    nb = -(-k // block)
    ia = ib = None
    if scaling == "tensor":
        ia, ib = torch.rand((), generator=gen) + 0.1, torch.rand((), generator=gen) + 0.1
    elif scaling == "block":
        ia, ib = torch.rand(*lead, m, nb, generator=gen) + 0.1, torch.rand(*lead, nb, n, generator=gen) + 0.1
    elif scaling == "mx":
        ia = 2.0 ** torch.randint(-4, 5, (*lead, m, nb), generator=gen).float()
        ib = 2.0 ** torch.randint(-4, 5, (*lead, nb, n), generator=gen).float()
    bias = torch.randn(n, generator=gen) * 10 if with_bias else None
    move = (lambda t: None if t is None else t.to(device))
    return move(ca), move(cb), move(ia), move(ib), move(bias)


def _definition(ca, cb, ia, ib, arith, bias):
    y = accumulate.accumulate(ca, cb, arith, ia, ib)
    if bias is not None:
        y = y + bias.float()
    return y if arith.out_format == "fp32" else formats.quantize(y, arith.out_format, "nearest", arith.overflow)


# Largest difference allowed on random codes, in accumulator ulps of sum_k |a_k b_k| (``compare``): one. A partial
# sum is at most sum_k |a_k b_k|, so a narrow accumulator rounding one step the other way (where the float32 chunk
# sums differ in their last bit) costs at most one unit, and the tensor core's inexact chunk sums of whole-range e4m3
# codes a fraction. Measured at K=1536: H200 0.055 (13 bits, toward zero; 1.31 ulps of the output's own binade) and
# 0.37 (MX, 23 bits, RNE: 32768 of the output's ulps where cancellation left it near 0); the interpreter 0 and 0.44.
ULP_LIMIT = 1.0


def compare(cases, exact: bool, device: str, m=48, k=320, n=40, nan: bool = False) -> list[dict]:
    """Per case: share of elements bitwise equal to the definition (NaN equal to NaN), the largest difference in
    accumulator ulps of sum_k |a_k b_k| (the scaled products' magnitudes, float64), which bounds every partial sum: a
    difference the chunk sums or the accumulator's steps make is measured against what was summed, not against
    what cancellation leaves of the output (an output near 0 makes any such difference millions of its own ulps).
    ``nan``: one NaN code in A's row 3 and one in B's column 5 (that row and column of the product must be NaN)."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for case in cases:
        arith = _arith(case)
        ca, cb, ia, ib, bias = _inputs(case, m, k, n, exact, device, gen)
        if nan:
            ca[..., 3, k // 2] = float("nan")
            cb[..., k - 1, 5] = float("nan")
        ref = _definition(ca, cb, ia, ib, arith, bias).float()
        y = cg.chip_gemm(ca, cb, ia, ib, arith, bias)
        assert y is not None and y.shape == ref.shape
        y = y.float()
        mag = torch.matmul(formats.dequantize(ca.abs(), None if ia is None else ia.abs(), -1, case[1]).double(),
                           formats.dequantize(cb.abs(), None if ib is None else ib.abs(), -2, case[1]).double())
        ulp = (mag.float() * 2.0 ** -arith.acc_mantissa_bits).clamp_min(torch.finfo(torch.float32).tiny)
        diff = (y - ref).abs().nan_to_num(0.0)
        same = (y == ref) | (y.isnan() & ref.isnan())
        out.append(dict(case=list(case), equal=same.double().mean().item(),
                        nan=y.isnan().double().mean().item(),
                        max_acc_ulps=(diff / ulp).max().item(), max_abs=diff.max().item()))
    return out


@needs_codes_api
@needs_cuda
def test_exact_chunk_sums_match_the_definition_bitwise_cuda():
    for r in compare(EXACT_CASES, True, "cuda"):
        assert r["equal"] == 1.0, r
    # a NaN code's row and column stay NaN through every accumulator (the tensor core's canonical NaN is one whose
    # payload a narrow accumulator's nearest-even rounding can carry into the sign)
    for r in compare(EXACT_CASES, True, "cuda", m=20, k=160, n=12, nan=True):
        assert r["equal"] == 1.0 and r["nan"] > 0.0, r
    # K not a whole number of MX blocks: the scales are loaded in the kernel's loop, not applied before it
    for r in compare([c for c in EXACT_CASES if c[0] == "mx"], True, "cuda", m=20, k=300, n=12):
        assert r["equal"] == 1.0, r


@needs_codes_api
@needs_cuda
def test_mx_scales_before_the_kernel_equal_scales_in_its_loop_cuda():
    """MX codes prescaled by their powers of two (K a whole number of blocks) give the bits the kernel's in-loop
    scaling gives, on whole-range e4m3 codes with E8M0 scales from 2**-127 to 2**127 (float32 subnormal and overflowed
    scaled codes, NaN scales)."""
    gen = torch.Generator().manual_seed(3)
    for case in [c for c in EXACT_CASES + RANDOM_CASES if c[0] == "mx"]:
        arith = _arith(case)
        ca, cb, _, _, bias = _inputs(case, 64, 256, 48, False, "cuda", gen)
        lead = ca.shape[:-2]
        ia = 2.0 ** torch.randint(-127, 128, (*lead, 64, 8), generator=gen).float()
        ib = 2.0 ** torch.randint(-127, 128, (*lead, 8, 48), generator=gen).float()
        ia[..., 0, 1] = float("nan")
        ia, ib = ia.cuda(), ib.cuda()
        before = cg.chip_gemm(ca, cb, ia, ib, arith, bias, prescale=True)
        inside = cg.chip_gemm(ca, cb, ia, ib, arith, bias, prescale=False)
        assert before.isnan().any()
        assert torch.equal(before.nan_to_num(0.5, 7.0, -7.0), inside.nan_to_num(0.5, 7.0, -7.0)), case


@needs_codes_api
@needs_cuda
def test_random_fp8_codes_nearly_match_the_definition_cuda():
    for r in compare(RANDOM_CASES, False, "cuda", m=128, k=1536, n=128):
        print(r)
        assert r["equal"] >= 0.99 and r["max_acc_ulps"] <= ULP_LIMIT, r


@needs_codes_api
@needs_cuda
def test_large_shape_and_transposed_weight_cuda():
    """A Qwen-sized K with the weight as a transposed view (a linear's W^T), batch dims flattened into rows."""
    arith = _arith(EXACT_CASES[5])
    gen = torch.Generator().manual_seed(1)
    ca = torch.randint(-8, 9, (2, 300, 1536), generator=gen).float().cuda()
    w = torch.randint(-8, 9, (520, 1536), generator=gen).float().cuda()
    ia, ib = torch.tensor(0.5).cuda(), torch.tensor(0.25).cuda()
    y = cg.chip_gemm(ca, w.t(), ia, ib, arith)
    assert y.shape == (2, 300, 520)
    assert torch.equal(y, _definition(ca, w.t(), ia, ib, arith, None))


@needs_codes_api
@needs_cuda
def test_aligning_adder_matches_the_definition_bitwise_cuda():
    for r in compare(ALIGNED_CASES, False, "cuda", m=96, k=1536, n=80):
        assert r["equal"] == 1.0 and r["nan"] == 0.0, r
    for r in compare(ALIGNED_CASES[:2], False, "cuda", nan=True):
        assert r["equal"] == 1.0 and r["nan"] > 0.0, r


@needs_codes_api
@needs_cuda
def test_a_float32_accumulator_rounds_each_add_to_nearest_cuda():
    """gpu_bf16's accumulator: each exact chunk sum added in float32 to nearest, as the definition adds. Integer
    codes times a power of two per chunk (2**-20 ... 2**20): every chunk sum is exact, and the adds are not, so an
    accumulation inside the tensor core shows (Triton folds a plain ``acc + tl.dot(a, b)`` into the dot: with
    ``exact=0`` 9% of these outputs equal the definition on an H200)."""
    gen = torch.Generator().manual_seed(7)
    m, k, n = 64, 640, 48
    arith = accumulate.GemmArith(in_format="bf16", chunk=32, acc_mantissa_bits=23, acc_rounding="rne",
                                 out_format="fp32", overflow="inf")
    spread = torch.exp2(torch.randint(-20, 21, (k // 32,), generator=gen).float()).repeat_interleave(32)
    ca = torch.randint(-16, 17, (m, k), generator=gen).float() * spread
    cb = torch.randint(-16, 17, (k, n), generator=gen).float()
    ref = _definition(ca, cb, None, None, arith, None)
    y = cg.chip_gemm(ca.cuda(), cb.cuda(), None, None, arith).cpu()
    assert torch.equal(y, ref), (y != ref).double().mean().item()


def test_unsupported_arithmetic_returns_none():
    base = _arith(EXACT_CASES[0])
    for change in (dict(chunk=8), dict(acc_mantissa_bits=30), dict(out_format="fp16"), dict(in_format="fp16"),
                   dict(acc_alignment="max_exponent", in_format="bf16"),
                   dict(acc_alignment="max_exponent", acc_mantissa_bits=20),
                   dict(acc_alignment="max_exponent", in_scaling="mx")):
        arith = accumulate.GemmArith(**{**base.__dict__, **change})
        assert cg.supported(arith) is not None
        assert cg.chip_gemm(torch.zeros(4, 64), torch.zeros(64, 4), None, None, arith) is None


def _interpreter_takes_loop_bounds() -> bool:
    """Triton <= 3.6's interpreter turns a runtime loop bound into a 1-element array, which NumPy >= 2.4 refuses
    to make a Python int (NumPy 2.4.6 here, and the same error on the GPU machine; 2.3.5 and 1.26 work)."""
    old = tuple(int(v) for v in triton.__version__.split(".")[:2]) <= (3, 6)
    return not (old and tuple(int(v) for v in __import__("numpy").__version__.split(".")[:2]) >= (2, 4))


@needs_codes_api
@pytest.mark.skipif(not _interpreter_takes_loop_bounds(), reason="Triton <= 3.6's interpreter with NumPy >= 2.4")
def test_interpreter_matches_the_definition():
    """The same comparisons on CPU in Triton's interpreter (numpy float32 dots: chunk sums of random codes are
    rounded there too)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    for r in res["exact"]:
        assert r["equal"] == 1.0, r
    for r in res["exact_nan"]:
        assert r["equal"] == 1.0 and r["nan"] > 0.0, r
    for r in res["random"]:
        assert r["equal"] >= 0.99 and r["max_acc_ulps"] <= ULP_LIMIT, r
    for r in res["aligned"]:
        assert r["equal"] == 1.0 and r["nan"] == 0.0, r
    for r in res["aligned_nan"]:
        assert r["equal"] == 1.0 and r["nan"] > 0.0, r


if __name__ == "__main__":   # the interpreter's run: TRITON_INTERPRET=1 python tests/test_chip_gemm_cuda.py
    print(json.dumps(dict(exact=compare(EXACT_CASES, True, "cpu"),
                          exact_nan=compare(EXACT_CASES, True, "cpu", m=20, k=160, n=12, nan=True),
                          random=compare(RANDOM_CASES, False, "cpu", m=32, k=1536, n=32),
                          aligned=compare(ALIGNED_CASES, False, "cpu", m=40, k=544, n=36),
                          aligned_nan=compare(ALIGNED_CASES[:2], False, "cpu", m=20, k=160, n=12, nan=True))))
