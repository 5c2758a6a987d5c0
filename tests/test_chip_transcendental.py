"""Approximate exp (noisebench/noise/transcendental.py): its measured ulp error falls with the polynomial's degree
as the Taylor remainder predicts, and softmax/silu built on it stay within that error; under a chip profile that
names them, a model's softmax and silu calls use it."""
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
