"""The compiled CPU exp (``noisebench.noise.fast.exp_cpu``) against ``transcendental.exp_poly``, bitwise: every
degree, the clamp's ends, the results that underflow to subnormals and to zero or overflow to inf, NaN and inf
inputs, and bfloat16/float16 tensors; and the softmax a chip computes with it."""
from __future__ import annotations

import math

import pytest
import torch

from noisebench.noise import transcendental

pytest.importorskip("numba")
from noisebench.noise.fast import exp_cpu  # noqa: E402

EDGES = [-104.0, -103.99, -104.01, -150.0, -103.3, -100.0, -88.7, -87.3, 88.72, 88.73, 89.0, 89.01, 200.0,
         0.0, -0.0, 1e-40, -1e-40, 0.5 * math.log(2), -0.5 * math.log(2), math.inf, -math.inf, math.nan]


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    nan = want.isnan()
    return bool(torch.equal(got.isnan(), nan)) and bool(torch.equal(got.masked_fill(nan, 0).view(torch.int32),
                                                                    want.masked_fill(nan, 0).view(torch.int32)))


@pytest.mark.parametrize("degree", range(1, 13))
def test_compiled_exp_is_the_definition_bitwise(degree):
    g = torch.Generator().manual_seed(degree)
    x = torch.cat([torch.rand(200_000, generator=g) * 230 - 125, torch.randn(100_000, generator=g),
                   torch.tensor(EDGES)])
    want = transcendental.exp_poly(x, degree)
    got = exp_cpu.exp_poly(x, degree)
    assert _same_bits(got, want)
    assert bool((want == 0).any() & want.isinf().any() & (want.abs() < 2.0 ** -126).logical_and(want > 0).any())
    for dt in (torch.bfloat16, torch.float16):          # rounded back to the input's dtype, as the definition
        h = x.to(dt)
        assert torch.equal(exp_cpu.exp_poly(h, degree).float().nan_to_num(7.0),
                           transcendental.exp_poly(h, degree).float().nan_to_num(7.0))


def test_a_degree_three_exp_is_really_approximate():
    """Not float32 exp: degree 3 moves most values off it by many ulps, as the definition does."""
    x = torch.linspace(-20, 20, 10_001)
    got = exp_cpu.exp_poly(x, 3)
    assert (got != torch.exp(x)).float().mean() > 0.9
    assert _same_bits(transcendental.softmax(x.reshape(1, -1), -1, 3, exp=exp_cpu.exp_poly),
                      transcendental.softmax(x.reshape(1, -1), -1, 3))
