"""The compiled CPU rounding (``noisebench.noise.fast.quantize_cpu``) against the definitions (``formats.quantize``,
``accumulate.quantize_codes``), bit for bit: every format, both deterministic roundings (inputs: nearest), both
overflow rules, on random float32 bit patterns (NaN, inf, subnormals, both signs) and on bf16/fp16 tensors; tensor,
block and MX scales along either GEMM dim, ragged blocks, batched operands, blocks holding NaN, inf, only zeros or
only float32 subnormals (an MX scale clamped at 2**-127)."""
from __future__ import annotations

import pytest
import torch

from noisebench.noise import accumulate, formats
from noisebench.noise.accumulate import GemmArith

pytest.importorskip("numba")
from noisebench.noise.fast import quantize_cpu  # noqa: E402


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _random_patterns(n: int, gen: torch.Generator) -> torch.Tensor:
    raw = torch.randint(-2 ** 31, 2 ** 31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32)
    near = torch.randn(n // 2, generator=gen) * torch.exp2(torch.randint(-30, 20, (n // 2,), generator=gen).float())
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("nan"), 0.0, -0.0, 2 ** -149,
                            -(2 ** -126), 3.4e38, 448.0, 464.0, -57344.0, 61440.0, 6.0, 6.5, 65504.0, 65520.0])
    return torch.cat([x, near, special])     # every exponent, values near each format's grid, range and specials


@pytest.mark.parametrize("fmt", sorted(formats.FORMATS))
def test_quantize_is_the_definition_bitwise(fmt):
    gen = torch.Generator().manual_seed(5)
    x = _random_patterns(1 << 15, gen)
    assert x.isnan().any() and x.isinf().any() and ((x != 0) & (x.abs() < 2 ** -126)).any()
    for rounding in ("nearest", "toward_zero"):
        for overflow in formats.OVERFLOWS:
            want = formats.quantize(x, fmt, rounding, overflow)
            got = quantize_cpu.quantize(x, fmt, rounding, overflow)
            assert torch.equal(_bits(got), _bits(want)), (rounding, overflow, (_bits(got) != _bits(want)).sum())
            if fmt != "fp32":
                assert not torch.equal(_bits(got), _bits(x))            # it really rounded
    for dtype in (torch.bfloat16, torch.float16):
        y = x[x.isfinite()].to(dtype)
        assert torch.equal(_bits(quantize_cpu.quantize(y, fmt)), _bits(formats.quantize(y, fmt)))


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3", "fp16"])
def test_quantize_owned_rounds_in_place_to_the_definitions_bits(fmt):
    """The output rounding of ``accumulate.gemm``'s own float32 sum writes into the sum (no second tensor) and
    gives the definition's bits; anything else (a transposed view, bf16) gets a new tensor and is left as it was."""
    gen = torch.Generator().manual_seed(6)
    x = _random_patterns(1 << 14, gen)
    for overflow in formats.OVERFLOWS:
        want = formats.quantize(x, fmt, "nearest", overflow)
        own = x.clone()
        got = quantize_cpu.quantize_owned(own, fmt, "nearest", overflow)
        assert got.data_ptr() == own.data_ptr() and torch.equal(_bits(got), _bits(want)), overflow
    t = x[: 128 * 100].reshape(128, 100).t()
    before = t.clone()
    got = quantize_cpu.quantize_owned(t, fmt)
    assert got.data_ptr() != t.data_ptr() and torch.equal(_bits(t), _bits(before))
    assert torch.equal(_bits(got), _bits(formats.quantize(before, fmt)))
    y = x[x.isfinite()].bfloat16()
    got = quantize_cpu.quantize_owned(y, fmt)
    assert got.dtype == torch.float32 and torch.equal(_bits(got), _bits(formats.quantize(y, fmt)))


SHAPES = [((48, 300), -1), ((300, 40), -2), ((2, 3, 17, 200), -1), ((2, 3, 200, 24), -2), ((1, 129), -1)]


@pytest.mark.parametrize("scaling", ["tensor", "block", "mx", "none"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp16", "bf16"])
def test_quantize_codes_is_the_definition_bitwise(scaling, fmt):
    gen = torch.Generator().manual_seed(9)
    for shape, k_dim in SHAPES:
        for overflow_rule in ("saturate", "inf"):
            arith = GemmArith(in_format=fmt, in_scaling=scaling, scale_block=32 if scaling == "mx" else 64, chunk=32,
                              promote_every=64 if scaling == "block" else None,
                              overflow=overflow_rule)
            x = torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-40, 40, shape, generator=gen).float())
            flat = x.view(-1)
            flat[::97] = 0.0
            if scaling != "tensor":
                flat[5], flat[11] = float("nan"), -float("inf")          # a block (or the tensor) with specials
            if x.dim() == 2 and k_dim == -1 and x.shape[0] > 2 and x.shape[-1] > 128:
                x[2, 64:128] = 0.0                                         # an all-zero block
                x[1, 128:192] = torch.randn(64, generator=gen) * 2.0 ** -135   # float32 subnormals
            want_c, want_i = accumulate.quantize_codes(x, arith, k_dim)
            got_c, got_i = quantize_cpu.quantize_codes(x, arith, k_dim)
            assert got_c.shape == want_c.shape and torch.equal(_bits(got_c), _bits(want_c)), (shape, overflow_rule)
            if want_i is None:
                assert got_i is None
            else:
                assert got_i.shape == want_i.shape and torch.equal(_bits(got_i), _bits(want_i)), (shape, overflow_rule)
