"""The FP8 profiles on the GPU's own FP8 tensor core (``noisebench.noise.fast.fp8_native``) against the definition.

The native path is taken only where the hardware is the definition: ``max_exponent_unnormalized`` (chunk 32, 13 bits,
toward zero), which reproduces recorded H200 outputs bit for bit (tests/test_chip_accumulate.py). These tests run
the kernel on the GPU against the definition on the same codes: e4m3 forward, e5m2 gradients against e4m3 operands
on either side, block scales with promotion, ragged K, Qwen2.5-1.5B's K, NaN codes.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from noisebench.noise import accumulate, formats

pytest.importorskip("triton")
from noisebench.noise.fast import fp8_native  # noqa: E402

needs_sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                                reason="needs an sm_90 GPU (the FP8 wgmma whose adder was measured)")
# (A's format, B's format, in_scaling, promote_every, out_format, bias): fp8_fast_accum forward and backward,
# fp8_promote128 forward and backward, promotion every 64
CASES = [
    ("fp8_e4m3", "fp8_e4m3", "tensor", None, "fp32", False),
    ("fp8_e5m2", "fp8_e4m3", "tensor", None, "bf16", True),
    ("fp8_e4m3", "fp8_e5m2", "none", None, "fp32", False),
    ("fp8_e5m2", "fp8_e5m2", "none", None, "fp32", False),
    ("fp8_e4m3", "fp8_e4m3", "block", 128, "bf16", True),
    ("fp8_e5m2", "fp8_e4m3", "block", 128, "fp32", False),
    ("fp8_e4m3", "fp8_e4m3", "tensor", 64, "fp32", False),
]


def _arith(case) -> accumulate.GemmArith:
    fa, fb, scaling, promote, out, _ = case
    return accumulate.GemmArith(in_format=fa, b_format=fb, in_scaling=scaling, scale_block=promote or 32, chunk=32,
                                acc_mantissa_bits=13, acc_rounding="toward_zero", promote_every=promote,
                                out_format=out, acc_alignment="max_exponent_unnormalized")


def _codes(shape, fmt, gen):
    """Codes over ``fmt``'s whole range and past it (saturated): N(0, 1) times 2**U{-18..13}, 5% zeros."""
    x = torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-18, 14, shape, generator=gen).float())
    return formats.quantize(x.masked_fill(torch.rand(*shape, generator=gen) < 0.05, 0.0), fmt)


def compare(case, m, k, n, tiles, nan=False) -> list[dict]:
    """The kernel at each tile in ``tiles`` against the definition (on the GPU) on the same codes: share of equal
    elements (NaN equal to NaN) and the largest absolute difference."""
    fa, fb, scaling, promote, _, with_bias = case
    arith = _arith(case)
    gen = torch.Generator().manual_seed(k + n)
    ca, cb = _codes((m, k), fa, gen), _codes((k, n), fb, gen)
    if nan:
        ca[3, k // 2] = float("nan")
        cb[k - 1, 5] = float("nan")
    ia = ib = None
    if scaling == "tensor":
        ia, ib = torch.rand((), generator=gen) + 0.1, torch.rand((), generator=gen) + 0.1
    elif scaling == "block":
        nb = -(-k // promote)
        ia, ib = torch.rand(m, nb, generator=gen) + 0.1, torch.rand(nb, n, generator=gen) + 0.1
    bias = torch.randn(n, generator=gen) * 10 if with_bias else None
    ca, cb, ia, ib, bias = (None if t is None else t.cuda() for t in (ca, cb, ia, ib, bias))
    y = accumulate.accumulate(ca, cb, arith, ia, ib)
    if bias is not None:
        y = y + bias
    ref = y if arith.out_format == "fp32" else formats.quantize(y, arith.out_format, "nearest", arith.overflow)
    rows = []
    for tile in tiles:
        if promote and promote % tile[2]:
            continue
        got = fp8_native.fp8_gemm(ca, cb, ia, ib, arith, bias, config=tile).float()
        same = (got == ref) | (got.isnan() & ref.isnan())
        rows.append(dict(case=list(case), shape=[m, k, n], tile=list(tile), equal=same.double().mean().item(),
                         nan=got.isnan().double().mean().item(),
                         max_abs=(got - ref).abs().nan_to_num(0.0).max().item()))
    return rows


@needs_sm90
def test_the_fp8_tensor_core_is_the_unnormalized_adder_cuda():
    """Element for element: every tile on the forward case, two on the rest; ragged K (not a multiple of 32 or of
    a tile's K), Qwen2.5-1.5B's K (1536, 8960), NaN codes. This is the measurement the native path rests on."""
    for i, case in enumerate(CASES):
        tiles = fp8_native.CONFIGS if i == 0 else (fp8_native.SMALL_CONFIG, fp8_native.CONFIGS[0])
        for m, k, n in ((96, 1536, 80), (40, 200, 72), (64, 8960, 48)):
            for r in compare(case, m, k, n, tiles):
                print(r)
                assert r["equal"] == 1.0 and r["nan"] == 0.0, r
        for r in compare(case, 20, 160, 12, (fp8_native.SMALL_CONFIG,), nan=True):
            assert r["equal"] == 1.0 and r["nan"] > 0.0, r


@needs_sm90
def test_the_fp8_tensor_core_at_qwen_sizes_cuda():
    """fp8_fast_accum's GEMMs at Qwen2.5-1.5B's shapes (256 tokens), the tuned tile: forward (e4m3, q/o and down)
    and a weight gradient (e4m3 activations against e5m2 gradients, K = the tokens)."""
    for case, (m, k, n) in (((*CASES[0][:4], "bf16", True), (256, 1536, 1536)),
                            ((*CASES[0][:4], "bf16", False), (256, 8960, 1536)),
                            (CASES[2], (1536, 256, 8960))):
        arith = _arith(case)
        gen = torch.Generator().manual_seed(m + k)
        ca = formats.quantize(torch.randn(m, k, generator=gen) * 30, case[0]).cuda()
        cb = formats.quantize(torch.randn(k, n, generator=gen) * 30, case[1]).cuda()
        inv = None if case[2] == "none" else torch.tensor(0.01, device="cuda")
        ref = accumulate.accumulate(ca, cb, arith, inv, inv)
        got = fp8_native.fp8_gemm(ca, cb, inv, inv, dataclasses.replace(arith, out_format="fp32"), None)
        assert torch.equal(got, ref), (case, (got != ref).double().mean().item())


@needs_sm90
def test_the_engine_takes_the_tensor_core_once_verified_cuda():
    """``chip.gemm`` runs an unnormalized-adder GEMM on the tensor core after ``native_verified`` (which passes on
    this GPU) and gives the definition's bits; ``engine.fast=off`` (dispatch off) gives the same."""
    from noisebench.noise import chip
    from noisebench.noise.fast import dispatch

    assert chip.native_verified("fp8_e4m3", "fp8_e4m3", torch.cuda.current_device())
    assert chip.native_verified("fp8_e5m2", "fp8_e4m3", torch.cuda.current_device())
    arith = _arith(("fp8_e4m3", "fp8_e4m3", "tensor", None, "bf16", False))
    a, b = torch.randn(300, 1536, device="cuda"), torch.randn(1536, 256, device="cuda") / 40
    fast = chip.gemm(a, b, arith)
    assert chip._VERIFIED[("fp8_e4m3", "fp8_e4m3", torch.cuda.current_device())]
    mode, dispatch.MODE = dispatch.MODE, "off"
    try:
        slow = chip.gemm(a, b, arith)
    finally:
        dispatch.MODE = mode
    assert torch.equal(fast, slow)


def test_the_native_path_is_declined_where_it_is_not_the_adder():
    base = _arith(("fp8_e4m3", "fp8_e4m3", "tensor", None, "bf16", False))
    assert fp8_native.supported(base, torch.device("cpu")) is not None
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        dev = torch.device("cuda")
        assert fp8_native.supported(base, dev) is None
        for change in (dict(acc_mantissa_bits=14), dict(acc_rounding="rne"), dict(acc_alignment="max_exponent"),
                       dict(chunk=16), dict(overflow="inf"), dict(promote_every=96), dict(in_format="bf16"),
                       dict(b_format="fp6_e3m2"), dict(in_scaling="block", scale_block=32, promote_every=32)):
            arith = dataclasses.replace(base, **change)
            assert fp8_native.supported(arith, dev) is not None, change
