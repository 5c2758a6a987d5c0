"""Approximate transcendentals (noisebench/noise/transcendental.py): exp's measured ulp error falls with the
polynomial's degree as the Taylor remainder predicts, and softmax/silu/tanh-gelu built on it stay within that error;
rsqrt's follows its table and Newton's squaring; under a chip profile that names them, a model's calls use them."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from noisebench.noise import transcendental as T
from noisebench.noise.accumulate import GemmArith
from noisebench.noise.chip import ChipMode, ChipProfile


def test_ulp_error_follows_the_taylor_remainder():
    """Relative error ~ (ln2/2)**(d+1) / (d+1)! in float32 ulps (2**-23 relative, to a factor 2 by the ulp's
    place in its binade); degree 7 reaches float32's own rounding (about 1 ulp)."""
    for d in (3, 4, 5):
        bound = (math.log(2) / 2) ** (d + 1) / math.factorial(d + 1) / 2.0 ** -24
        assert bound / 4 < T.exp_max_ulp(d) < 1.5 * bound, d
    assert T.exp_max_ulp(7) < 2 and T.exp_max_ulp(3) > 1000
    x = torch.tensor([-200.0, 0.0, 100.0])
    assert T.exp_poly(x, 5).tolist() == [0.0, 1.0, math.inf]


def test_softmax_and_silu_with_the_polynomial():
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(64, 33, generator=g)
    rel = T.exp_max_ulp(3) * 2.0 ** -23                      # relative error of one exp
    s = T.softmax(x, -1, 3)
    assert (s - torch.softmax(x, -1)).abs().max() <= 2.5 * rel * torch.softmax(x, -1).max()
    assert (s.sum(-1) - 1).abs().max() < 1e-5
    assert (T.silu(x, 3) - F.silu(x)).abs().max() <= 2 * rel * x.abs().max()
    assert T.softmax(x.bfloat16(), 0, 6).dtype == torch.bfloat16
    assert T.softmax(x.bfloat16(), 0, 6, torch.float32).dtype == torch.float32
    with pytest.raises(ValueError, match="degree"):
        T.exp_poly(x, 0)


def test_profile_routes_softmax_and_silu():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 16, generator=g)
    prof = ChipProfile(name="e", arith=GemmArith(), ops=("softmax", "silu"), exp_degree=3)
    with ChipMode(prof):
        assert torch.equal(F.softmax(x, dim=-1), T.softmax(x, -1, 3))
        assert torch.equal(x.softmax(-1), T.softmax(x, -1, 3))
        assert torch.equal(F.silu(x), T.silu(x, 3))
        assert F.softmax(x, dim=-1, dtype=torch.float64).dtype == torch.float64
    with ChipMode(ChipProfile(name="g", arith=GemmArith(), ops=("softmax",))):   # no exp_degree: torch's
        assert torch.equal(F.softmax(x, dim=-1), torch.softmax(x, -1))


@pytest.mark.parametrize("fast", ["auto", "off"])
def test_chip_values_forward_and_torchs_gradient_backward(fast):
    """Straight-through (``chip.StraightThrough``): under a profile with the polynomial exp and the rsqrt table, the
    forward gives the approximation's values and the backward torch's own gradient of the clean op, bit for bit,
    for softmax (two spellings, a dtype), silu, tanh-gelu and rsqrt; the output takes in-place writes and the
    gradient flows on into earlier ops."""
    from noisebench.noise.fast import dispatch
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 40, generator=g) * 4
    pos = x0.abs() + 0.1
    w = torch.randn(6, 40, generator=g)
    prof = ChipProfile(name="e", arith=GemmArith(), ops=("softmax", "silu", "gelu", "rsqrt"), exp_degree=3,
                       rsqrt_table_bits=8, rsqrt_newton=1)
    cases = [(lambda t: F.softmax(t, dim=-1), lambda t: T.softmax(t, -1, 3), x0),
             (lambda t: t.softmax(0), lambda t: T.softmax(t, 0, 3), x0),
             (lambda t: torch.softmax(t, -1, torch.float64), lambda t: T.softmax(t, -1, 3, torch.float64), x0),
             (F.silu, lambda t: T.silu(t, 3), x0),
             (lambda t: F.gelu(t, approximate="tanh"), lambda t: T.gelu_tanh(t, 3), x0),
             (torch.rsqrt, lambda t: T.rsqrt_approx(t, 8, 1), pos)]
    old = dispatch.MODE
    dispatch.set_mode(fast)
    try:
        for i, (op, approx, x) in enumerate(cases):
            leaf = x.clone().requires_grad_(True)
            with ChipMode(prof):
                y = op(leaf * 1.0)                            # an earlier op: the gradient must flow through
            y.mul_(1.0)                                       # writable in place, as the noise engine writes
            (y.double() * w).sum().backward()
            ref = x.clone().requires_grad_(True)
            (op(ref * 1.0).double() * w).sum().backward()    # torch's own, no chip
            assert torch.equal(y.detach(), approx(x)), i
            assert not torch.equal(y.detach(), op(x)), i      # the chip's values, not torch's
            assert torch.equal(leaf.grad, ref.grad), i
    finally:
        dispatch.set_mode(old)


def test_rsqrt_ulp_error_follows_the_table_and_newton_squaring():
    """The table seed's max relative error e0 = (sqrt(1+h) - 1) / (sqrt(1+h) + 1), h = 2**-(bits-1), and one Newton
    step's (3/2) e0**2, in float32 ulps (2**-24 relative at the bottom of a binade, where the max lands): measured
    table 8: 32475 ulp (theory 32641), + 1 step 94.7 (95.3), + 2 steps 2.0 (float32's own rounding); table 6 + 1
    step 1481 (1489). Each step squares the error: log(err_1) ~ 2 log(err_0) + log(3/2)."""
    ulp = 2.0 ** -24
    for bits in (6, 8, 10):
        e0 = T.rsqrt_seed_error(bits)
        assert 0.97 * e0 / ulp < T.rsqrt_max_ulp(bits, 0) <= e0 / ulp + 1, bits
        one = T.rsqrt_max_ulp(bits, 1)
        assert 0.95 * 1.5 * e0 ** 2 / ulp < one <= 1.5 * e0 ** 2 / ulp + 2, bits
    assert T.rsqrt_max_ulp(8, 2) < 3 and T.rsqrt_max_ulp(4, 2) > 40       # 4 bits: 1.5 (1.5 e0^2)^2 = 42.5 ulp
    x = torch.tensor([0.0, -0.0, -1.0, math.inf, math.nan, 1e-40, 4.0, 2.0 ** 100])
    got = T.rsqrt_approx(x, 8, 2)
    assert got[0] == math.inf and got[2].isnan() and got[3] == 0 and got[4].isnan()
    assert torch.allclose(got[5:], x[5:].double().rsqrt().float(), rtol=3e-7)
    assert T.rsqrt_approx(x.bfloat16(), 8, 1).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="table_bits"):
        T.rsqrt_approx(x, 0, 1)


def test_gelu_tanh_with_the_polynomial_and_erf_gelu_untouched():
    """tanh-gelu's tanh is 1 - 2/(exp(2z)+1) with exp_poly: within the exp's relative error of torch's tanh-gelu
    (degree 3: |err| <= 2 rel |x|, measured 1.0e-4 max; degree 7: 3.0e-7); erf-gelu computes no exp and stays
    torch's, bitwise."""
    x = 4 * torch.randn(64, 33, generator=torch.Generator().manual_seed(2))
    rel = T.exp_max_ulp(3) * 2.0 ** -23
    err = (T.gelu_tanh(x, 3) - F.gelu(x, approximate="tanh")).abs()
    assert (err <= 2 * rel * x.abs() + 1e-6).all() and err.max() > 1e-5
    assert (T.gelu_tanh(x, 7) - F.gelu(x, approximate="tanh")).abs().max() < 1e-5
    prof = ChipProfile(name="e", arith=GemmArith(), ops=("gelu",), exp_degree=3)
    with ChipMode(prof):
        assert torch.equal(F.gelu(x, approximate="tanh"), T.gelu_tanh(x, 3))
        assert torch.equal(F.gelu(x), torch._C._nn.gelu(x))


def test_profile_routes_rsqrt_in_a_model():
    """Under a profile naming rsqrt, torch.rsqrt and Tensor.rsqrt compute rsqrt_approx, and Qwen2RMSNorm's output
    is its definition with it, bitwise; the tiny Qwen2's logits move by about the seed's error (table 8, no Newton:
    e0 = 1.95e-3; measured 9.0e-4 relative; 1 step 1.8e-6) and by float32 rounding alone after 2 Newton steps
    (measured 2.2e-7)."""
    from test_chip_model import IDS, tiny

    x = torch.rand(8, 16, generator=torch.Generator().manual_seed(3)) + 0.1
    seed_only = ChipProfile(name="r", arith=GemmArith(), ops=("rsqrt",), rsqrt_table_bits=8, rsqrt_newton=0)
    with ChipMode(seed_only):
        assert torch.equal(torch.rsqrt(x), T.rsqrt_approx(x, 8, 0)) and torch.equal(x.rsqrt(), T.rsqrt_approx(x, 8, 0))
    model = tiny()
    norm = model.model.norm
    h = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), ChipMode(seed_only):
        got = norm(h)
    want = norm.weight * (h * T.rsqrt_approx(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon, 8, 0))
    assert torch.equal(got, want.detach())
    with torch.no_grad():
        clean = model(IDS).logits
        with ChipMode(seed_only):
            coarse = model(IDS).logits
        with ChipMode(dataclasses.replace(seed_only, rsqrt_newton=2)):
            fine = model(IDS).logits
    rel = lambda y: ((y - clean).norm() / clean.norm()).item()  # noqa: E731
    assert 1e-4 < rel(coarse) < T.rsqrt_seed_error(8) and rel(fine) < 1e-6
