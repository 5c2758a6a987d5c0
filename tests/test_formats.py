"""Number formats (noisebench/noise/formats.py) against the OCP MX v1.0 / OCP FP8 specification's definitions:
element encodings, rounding to the grid, overflow, the E8M0 shared scale, and unbiased stochastic rounding."""
import math

import pytest
import torch

from noisebench.noise import formats as F

OCP = {  # name: (max normal, min normal, min subnormal, NaN codes, inf codes), from the spec's format tables
    "fp8_e4m3": (448.0, 2.0 ** -6, 2.0 ** -9, 2, 0),
    "fp8_e5m2": (57344.0, 2.0 ** -14, 2.0 ** -16, 6, 2),
    "fp6_e3m2": (28.0, 0.25, 0.0625, 0, 0),
    "fp6_e2m3": (7.5, 1.0, 0.125, 0, 0),
    "fp4_e2m1": (6.0, 1.0, 0.5, 0, 0),
}


def _codes(name):
    f = F.FORMATS[name]
    return torch.arange(2 ** (1 + f.ebits + f.mbits))


@pytest.mark.parametrize("name", sorted(OCP))
def test_encodings_match_the_spec_tables(name):
    vmax, vnorm, vsub, nans, infs = OCP[name]
    v = F.decode(_codes(name), name)
    fin = v[torch.isfinite(v)]
    assert fin.max().item() == vmax and F.FORMATS[name].max == vmax
    assert fin[fin > 0].min().item() == vsub
    assert 2.0 ** F.FORMATS[name].emin == vnorm
    assert int(torch.isnan(v).sum()) == nans and int(torch.isinf(v).sum()) == infs


def test_fp4_values_are_the_spec_list():
    assert F.decode(torch.arange(8), "fp4_e2m1").tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]


@pytest.mark.parametrize("name", sorted(OCP) + ["bf16", "fp16"])
@pytest.mark.parametrize("rounding", F.ROUNDINGS)
def test_grid_points_are_fixed_and_midpoints_round_as_defined(name, rounding):
    f = F.FORMATS[name]
    pos = F.decode(torch.arange(0, 2 ** (f.ebits + f.mbits)), name)      # every non-negative code, in order
    codes = torch.arange(pos.numel())
    keep = torch.isfinite(pos)
    pos, codes = pos[keep], codes[keep]
    g = torch.Generator().manual_seed(0)
    assert torch.equal(F.quantize(pos, name, rounding, gen=g).double(), pos)          # the grid is closed
    assert torch.equal(F.quantize(-pos, name, rounding, gen=g).double(), -pos)
    mid = (pos[:-1] + pos[1:]) / 2
    q = F.quantize(mid, name, rounding, gen=g).double()
    if rounding == "nearest":        # ties to the even code (mantissa LSB 0)
        even_lo = codes[:-1] % 2 == 0
        assert torch.equal(q, torch.where(even_lo, pos[:-1], pos[1:]))
    elif rounding == "toward_zero":
        assert torch.equal(q, pos[:-1])
    else:
        assert bool(((q == pos[:-1]) | (q == pos[1:])).all())


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                        ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_nearest_matches_torch_cpu_cast_in_range(name, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(100_000, generator=g) * torch.exp(3 * torch.randn(100_000, generator=g))
    x = x.clamp(-F.FORMATS[name].max, F.FORMATS[name].max)
    assert torch.equal(F.quantize(x, name), x.to(dtype).float())


def test_overflow_is_a_parameter_not_torch_cast():
    x = torch.tensor([464.0, 465.0, 1e6, math.inf, -1e6, math.nan])
    sat = F.quantize(x, "fp8_e4m3", overflow="saturate")
    assert sat[:5].tolist() == [448.0, 448.0, 448.0, 448.0, -448.0] and math.isnan(sat[5])
    nan = F.quantize(x, "fp8_e4m3", overflow="inf")   # e4m3 has no inf: NaN; 464 is a tie that RNE sends to 448
    assert nan[0].item() == 448.0 and bool(torch.isnan(nan[1:]).all())
    inf = F.quantize(torch.tensor([61439.0, 61440.0, -1e9]), "fp8_e5m2", overflow="inf")
    assert inf.tolist() == [57344.0, math.inf, -math.inf]
    assert F.quantize(torch.tensor([7.0, 100.0]), "fp4_e2m1").tolist() == [6.0, 6.0]


@pytest.mark.parametrize("amax,fmt,expected", [
    (6.0, "fp4_e2m1", 0), (7.99, "fp4_e2m1", 0), (8.0, "fp4_e2m1", 1), (0.7, "fp4_e2m1", -3),
    (448.0, "fp8_e4m3", 0), (1.0, "fp8_e4m3", -8), (1.0, "fp8_e5m2", -15), (30.0, "fp6_e3m2", 0),
    (0.0, "fp8_e4m3", -127), (2.0 ** -140, "fp4_e2m1", -127), (2.0 ** 120, "fp8_e4m3", 112)])
def test_mx_shared_exponent(amax, fmt, expected):
    assert F.mx_shared_exponent(torch.tensor([amax], dtype=torch.float64), fmt).item() == expected


def test_mx_shared_exponent_beyond_e8m0_is_nan():
    assert math.isnan(F.mx_shared_exponent(torch.tensor([2.0 ** 130], dtype=torch.float64), "fp4_e2m1").item())


def test_mx_blocks_follow_the_spec_conversion():
    # MXFP4: amax 7 -> X = 2**(2 - 2) = 1; 7 -> 8 by RNE then clamped to 6; 2.5 -> 2 (tie to even); -0.3 -> -0.5;
    # 0.25 -> 0 (tie to even between 0 and 0.5); 0.75 -> 1; 5 -> 4 (tie); 1.25 -> 1 (tie)
    vals = [7.0, 2.5, -0.3, 0.25, 0.75, 5.0, 1.25]
    want = [6.0, 2.0, -0.5, 0.0, 1.0, 4.0, 1.0]
    x = torch.tensor(vals + [0.0] * 25)
    got = F.quantize_mx(x, "mxfp4_e2m1")
    assert got[:7].tolist() == want and bool((got[7:] == 0).all())
    assert (F.quantize_mx(x * 2.0 ** -20, "mxfp4_e2m1") * 2.0 ** 20)[:7].tolist() == want   # scale is exact
    # MXFP8 e4m3: amax 1000 -> X = 2**(9 - 8) = 2; 1000/2 = 500 rounds to 512 > 448: clamped, times X = 896
    assert F.quantize_mx(torch.tensor([1000.0, 3.0] + [0.0] * 30), "mxfp8_e4m3")[:2].tolist() == [896.0, 3.0]
    # MXFP6 e3m2: amax 30 -> X = 1; 30 -> 32 clamped to 28
    assert F.quantize_mx(torch.tensor([30.0] + [0.0] * 31), "mxfp6_e3m2")[0].item() == 28.0


def test_mx_blocks_are_independent_along_dim():
    x = torch.cat([torch.full((32,), 0.1), torch.full((32,), 100.0)]).reshape(1, 64)
    q = F.quantize_mx(x, "mxfp8_e4m3")
    assert torch.equal(q[0, :32], F.quantize_mx(x[0, :32], "mxfp8_e4m3"))
    assert torch.equal(F.quantize_mx(x.t(), "mxfp8_e4m3", dim=0), q.t())
    assert q.shape == x.shape and F.quantize_mx(torch.ones(3, 40), "mxfp4_e2m1").shape == (3, 40)  # padded tail


def test_stochastic_rounding_is_exactly_unbiased_just_above_a_grid_point():
    # fp16 at 1 + 2**-23: the dropped fraction is 2**-13 of an ulp. Drawing u in float32 and rounding x/ulp + u
    # rounds up with probability ~1.83e-4 (1.5x too often); integer bits give 2**-13 = 1.22e-4 exactly.
    n = 4_000_000
    x = torch.full((n,), 1.0 + 2.0 ** -23)
    q = F.quantize(x, "fp16", "stochastic", gen=torch.Generator().manual_seed(0))
    ups = int((q > 1).sum())
    p = 2.0 ** -13
    assert set(q.unique().tolist()) <= {1.0, 1.0 + 2.0 ** -10}
    assert abs(ups - n * p) < 5 * math.sqrt(n * p)       # mean 488, sd 22; float32 u gives ~732


def test_stochastic_rounding_mean_is_the_value():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, generator=g)
    q = F.quantize(x.repeat(20_000, 1), "fp8_e4m3", "stochastic", gen=g)
    lo = F.quantize(x, "fp8_e4m3", "toward_zero")
    spread = (q - lo).abs().max(0).values                 # the ulp at x (0 where x is on the grid)
    se = spread / math.sqrt(20_000) / 2 + 1e-12           # sd of the mean of a two-point draw <= ulp / 2 / sqrt(n)
    assert bool(((q.double().mean(0) - x.double()).abs() < 5 * se.double()).all())


def test_bad_names_are_refused_with_choices():
    with pytest.raises(ValueError, match="valid choices"):
        F.quantize(torch.ones(2), "fp7")
    with pytest.raises(ValueError, match="rounding"):
        F.quantize(torch.ones(2), "fp16", "up")


@pytest.mark.parametrize("name", sorted(F.FORMATS))
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize("overflow", F.OVERFLOWS)
def test_float32_bit_path_is_the_general_definition(name, rounding, overflow):
    """Float32 inputs take integer operations on the bit pattern (and, below a narrow format's smallest normal, a
    float32 add or floor); the float64 definition (taken for float64 inputs) must give the same bits on every
    float32 pattern class: random patterns (all exponents, NaNs, subnormals), infinities, signed zeros, values that
    round past max, the format's own subnormals and ties."""
    g = torch.Generator().manual_seed(0)
    pats = torch.randint(-2 ** 31, 2 ** 31, (400_000,), generator=g, dtype=torch.int64).to(torch.int32)
    edges = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 3.4028234663852886e38, 3.3961e38, 3.3962e38,
                          -3.39e38, 1e-45, -1e-45, 1e-40, 2.0 ** -126, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
                          448.0, 464.0, 480.0, 61440.0, 7.0, 30.0, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -17, 0.25])
    wide = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-40, 20, (50_000,), generator=g).float())
    x = torch.cat([pats.view(torch.float32), edges, torch.randn(10_000, generator=g) * 1e-38, wide])
    fast = F.quantize(x, name, rounding, overflow)
    slow = F.quantize(x.double(), name, rounding, overflow).float()
    nan = torch.isnan(slow)
    assert torch.equal(nan, torch.isnan(fast)) and int(nan.sum()) > 1000
    assert torch.equal(fast[~nan].view(torch.int32), slow[~nan].view(torch.int32))
