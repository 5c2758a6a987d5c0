"""The GEMM accumulation model (noisebench/noise/accumulate.py): bitwise against a scalar definition in exact
rational arithmetic, and the published anchor reproduced on CPU at small M, N."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from noisebench.noise.accumulate import (GemmArith, accumulate, chunk_order, gemm, quantize_codes,
                                         quantize_input)
from noisebench.noise import formats as F


def _round_bits(v: Fraction, bits: int, mode: str) -> Fraction:
    """v rounded to ``bits`` stored mantissa bits (unbounded exponent): exact, by integers."""
    if v == 0:
        return v
    a = abs(v)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if Fraction(2) ** e > a:
        e -= 1
    ulp = Fraction(2) ** (e - bits)
    t = a / ulp
    fl = t.numerator // t.denominator
    if mode == "toward_zero":
        q = fl
    else:
        rem = t - fl
        q = fl + (1 if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and fl % 2) else 0)
    return (-1 if v < 0 else 1) * q * ulp


def _scalar_gemm(ca, cb, ia, ib, arith: GemmArith, order=None):
    """The model, one output at a time, in the code domain: exact chunk sums of code products (times the block's
    exact power-of-two scales for mx), rounded adds in ``order``, promotion as a numpy float32 sum (block: float32
    acc times the float32 product of the block's scales), tensor scales as one float32 multiply at the end."""
    m, k = ca.shape
    nc = -(-k // arith.chunk)
    seq = list(range(nc)) if order is None else [int(c) for c in order]
    per = arith.promote_every // arith.chunk if arith.promote_every else None
    f32 = np.float32
    out = np.zeros((m, cb.shape[1]), dtype=np.float32)
    for i in range(m):
        for j in range(cb.shape[1]):
            acc, total = Fraction(0), f32(0)
            for pos, c in enumerate(seq):
                k0 = c * arith.chunk
                part = sum(Fraction(float(ca[i, kk])) * Fraction(float(cb[kk, j]))
                           for kk in range(k0, min(k, k0 + arith.chunk)))
                if arith.in_scaling == "mx":
                    blk = k0 // arith.scale_block
                    part *= Fraction(float(ia[i, blk])) * Fraction(float(ib[blk, j]))
                acc = _round_bits(acc + part, arith.acc_mantissa_bits, arith.acc_rounding)
                if per and (pos + 1 == nc or seq[pos + 1] // per != c // per):
                    term = f32(float(acc))
                    if arith.in_scaling == "block":
                        blk = k0 // arith.scale_block
                        term = f32(term * f32(f32(ia[i, blk]) * f32(ib[blk, j])))
                    total = f32(total + term)
                    acc = Fraction(0)
            y = total if per else f32(float(acc))
            if arith.in_scaling == "tensor":
                y = f32(y * f32(f32(ia) * f32(ib)))
            out[i, j] = y
    return torch.from_numpy(out)


CASES = {  # in_format, in_scaling, scale_block, chunk, bits, rounding, promote
    "none_tz": ("fp8_e4m3", "none", 32, 4, 13, "toward_zero", None),
    "none_bf16_rne": ("bf16", "none", 32, 8, 10, "rne", None),
    "tensor_tz": ("fp8_e4m3", "tensor", 32, 4, 13, "toward_zero", None),
    "tensor_promote": ("fp8_e4m3", "tensor", 32, 4, 13, "toward_zero", 16),
    "tensor_rne23": ("fp8_e5m2", "tensor", 32, 16, 23, "rne", 32),
    "block": ("fp8_e4m3", "block", 16, 4, 13, "toward_zero", 16),
    "block_rne": ("fp8_e4m3", "block", 32, 8, 10, "rne", 32),
    "mx_fp8": ("fp8_e4m3", "mx", 32, 8, 13, "toward_zero", None),
    "mx_fp4_promote": ("fp4_e2m1", "mx", 32, 4, 10, "rne", 32),
}


def _case(name, **kw):
    fmt, scaling, blk, chunk, bits, rounding, promote = CASES[name]
    return GemmArith(in_format=fmt, in_scaling=scaling, scale_block=blk, chunk=chunk, acc_mantissa_bits=bits,
                     acc_rounding=rounding, promote_every=promote, **kw)


def _operands(seed, m=3, k=72, n=2):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.exp(2 * torch.randn(m, k, generator=g))   # blocks of unlike scale
    return a, torch.randn(k, n, generator=g)


@pytest.mark.parametrize("name", sorted(CASES))
def test_accumulate_matches_a_scalar_exact_definition(name):
    arith = _case(name)
    a, b = _operands(len(name))
    (ca, ia), (cb, ib) = quantize_codes(a, arith, -1), quantize_codes(b, arith, -2)
    want = _scalar_gemm(ca, cb, ia, ib, arith)
    assert torch.equal(accumulate(ca, cb, arith, ia, ib), want)
    assert torch.equal(gemm(a, b, arith), want)                       # out_format fp32: gemm is accumulate
    if ia is not None and ia.dim():                                    # scales per block along K
        assert ia.shape == (3, 72 // arith.scale_block + 1) and ib.shape == (72 // arith.scale_block + 1, 2)
    order = chunk_order(_case(name, reduction_order="random"), 72, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(18 if arith.chunk == 4 else -(-72 // arith.chunk)))
    assert torch.equal(accumulate(ca, cb, arith, ia, ib, order), _scalar_gemm(ca, cb, ia, ib, arith, order))


def test_codes_are_on_the_element_grid_and_dequantize_to_the_values():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(4, 96, generator=g) * 30
    for name in ("tensor_tz", "block", "mx_fp8"):
        arith = _case(name)
        codes, inv = quantize_codes(a, arith, -1)
        assert torch.equal(F.quantize(codes, "fp8_e4m3"), codes) and codes.abs().max().item() <= 448
        assert torch.equal(quantize_input(a, arith, -1), F.dequantize(codes, inv, -1, arith.scale_block))
    codes, inv = quantize_codes(a, _case("tensor_tz"), -1)
    assert codes.abs().max().item() == 448 and inv.dim() == 0 and inv.dtype == torch.float32
    assert inv.item() == np.float32(1 / np.float32(448 / np.float32(a.abs().max().item())))
    codes, inv = quantize_codes(a, _case("mx_fp8"), -1)                 # E8M0: powers of two
    assert torch.equal(torch.frexp(inv)[0], torch.full_like(inv, 0.5))
    assert torch.equal(F.dequantize(codes, inv, -1, 32), F.quantize_mx(a, "fp8_e4m3"))
    # a short last block: 200 elements in 7 blocks of 32 (repeating each scale ceil(200 / 7) = 29 times was wrong)
    a = torch.randn(3, 200, generator=g) * torch.linspace(0.01, 100, 200)
    codes, inv = quantize_codes(a, _case("mx_fp8"), -1)
    assert inv.shape == (3, 7)
    assert torch.equal(F.dequantize(codes, inv, -1, 32), F.quantize_mx(a, "fp8_e4m3"))
    with pytest.raises(ValueError, match="block length"):
        F.dequantize(codes, inv, -1)


def test_a_block_of_tiny_values_gets_a_finite_scale():
    """A block whose amax is a float32 subnormal (attention probabilities of far-off keys beside masked zeros) made
    max / amax overflow float32 and its zeros 0 * inf = NaN codes: fp8_promote128's rollouts sampled NaN on the
    H200. The amax is floored at 1e-12 (torchao's float8 EPS): finite codes, zeros kept, inv = 1e-12 / 448."""
    a = torch.zeros(3, 256)
    a[0, :2] = torch.tensor([1e-40, -3e-41])           # block 0 of row 0: two subnormals among zeros
    a[1, 128:130] = torch.tensor([2e-13, 5e-13])        # below the floor, normal
    a[2] = torch.randn(256, generator=torch.Generator().manual_seed(0))
    block = GemmArith(in_format="fp8_e4m3", in_scaling="block", scale_block=128, promote_every=128)
    for name, arith in (("tensor", GemmArith(in_format="fp8_e4m3", in_scaling="tensor")), ("block", block)):
        rows = a[:1] if name == "tensor" else a
        codes, inv = quantize_codes(rows, arith, -1)
        assert torch.isfinite(codes).all() and torch.isfinite(inv).all(), name
        assert torch.equal(codes[rows == 0], torch.zeros_like(codes[rows == 0])), name
    codes, inv = quantize_codes(a, block, -1)
    s_floor = np.float32(448 / 1e-12)                   # the float32 scale of a floored block
    assert inv[0, 0].item() == inv[1, 1].item() == np.float32(1 / s_floor)
    want = F.quantize((a[1, 128:130].double() * float(s_floor)).float(), "fp8_e4m3")
    assert torch.equal(codes[1, 128:130], want) and want.abs().min().item() > 0
    s_normal = (448 / a[2].abs().reshape(2, 128).amax(-1).double()).float()       # unchanged above the floor
    assert torch.equal(inv[2], (1 / s_normal.double()).float())


def _max_rel(arith, a, b):
    (ca, ia), (cb, ib) = quantize_codes(a, arith, -1), quantize_codes(b, arith, -2)
    exact = (ca.double() @ cb.double()) * ia.double() * ib.double()      # the quantized inputs' exact product
    return ((accumulate(ca, cb, arith, ia, ib).double() - exact).abs() / exact.abs()).max().item()


def test_deepseek_anchor_narrow_accumulator_and_promotion():
    """DeepSeek-V3 (H800, FP8 GEMM, K = 4096, random inputs): ~14 retained bits give a max relative error near 2%;
    promoting to fp32 every 128 elements removes it. The model: e4m3 inputs (tensor scale), 13 stored mantissa bits
    (14 with the implicit one) truncated at each add of a 4-product chunk. Inputs are U[0, 1) so that every output
    is far from 0 and an element's relative error is meaningful; the accumulator sums codes (up to 448), the tensor
    scales applied after. Measured here (16x8 outputs): 2.37%, 0.051% with promotion, 0.14% with nearest-even adds;
    14 bits give 1.17%. The band 1.2-3.5% takes "nearly 2%" with room for the draw but excludes the neighbouring
    width (each bit halves truncation's error), and promotion must be at least 10x smaller (it measures 46x). The
    chunk of 4 is what this anchor calibrates (32 gives 0.33%): the GPU comparison against torch._scaled_mm is what
    confirms it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(16, 4096, generator=g), torch.rand(4096, 8, generator=g)
    fast = GemmArith(in_format="fp8_e4m3", in_scaling="tensor", chunk=4, acc_mantissa_bits=13,
                     acc_rounding="toward_zero")
    promoted = GemmArith(**{**fast.__dict__, "promote_every": 128})
    rne = GemmArith(**{**fast.__dict__, "acc_rounding": "rne"})
    e_fast, e_prom, e_rne = _max_rel(fast, a, b), _max_rel(promoted, a, b), _max_rel(rne, a, b)
    assert 0.012 < e_fast < 0.035
    assert e_prom < e_fast / 10
    assert e_rne < e_fast / 5          # the error is truncation's bias, not the width alone


def test_fp32_arith_is_a_float32_sum():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 256, generator=g), torch.randn(256, 7, generator=g)
    y = gemm(a, b, GemmArith(in_format="fp32", chunk=256, acc_mantissa_bits=23))
    assert torch.equal(y, (a.double() @ b.double()).float())     # one chunk: the exact sum rounded once
    yb = gemm(a, b, GemmArith(in_format="bf16", out_format="bf16"))
    assert torch.equal(yb, F.quantize(yb, "bf16")) and (yb - a @ b).abs().max() < 0.05 * (a @ b).abs().max()


def test_mx_inputs_are_scaled_along_k():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(4, 64, generator=g), torch.randn(64, 3, generator=g)
    arith = GemmArith(in_format="fp4_e2m1", in_scaling="mx")
    assert torch.equal(quantize_input(b, arith, -2), F.quantize_mx(b.t(), "fp4_e2m1").t())
    assert torch.equal(quantize_input(a, arith, -1), F.quantize_mx(a, "fp4_e2m1"))


def test_bad_arith_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="promote_every"):
        GemmArith(chunk=32, promote_every=48)
    with pytest.raises(ValueError, match="acc_rounding"):
        GemmArith(acc_rounding="up")
    with pytest.raises(ValueError, match="valid choices"):
        GemmArith(in_format="fp9")
    with pytest.raises(ValueError, match="promote_every must equal scale_block"):
        GemmArith(in_format="fp8_e4m3", in_scaling="block", scale_block=128, chunk=4)
    with pytest.raises(ValueError, match="chunk must divide scale_block"):
        GemmArith(in_format="fp8_e4m3", in_scaling="mx", scale_block=32, chunk=12)
    with pytest.raises(ValueError, match="reduction_order"):
        GemmArith(reduction_order="shuffled")


def _orders_arith(**kw):
    return GemmArith(**{**dict(in_format="fp8_e4m3", in_scaling="none", chunk=4, acc_mantissa_bits=13,
                               acc_rounding="toward_zero", reduction_order="random"), **kw})


def test_fixed_order_is_deterministic_and_random_order_differs_call_to_call():
    a, b = _operands(7, m=4, k=512, n=3)
    fixed = _orders_arith(reduction_order="fixed")
    assert torch.equal(gemm(a, b, fixed), gemm(a, b, fixed))
    gen = torch.Generator().manual_seed(0)
    ys = [gemm(a, b, _orders_arith(), gen) for _ in range(4)]
    assert all(not torch.equal(ys[0], y) for y in ys[1:])            # each call draws its own order
    again = torch.Generator().manual_seed(0)                          # ... reproducible from the seed
    assert all(torch.equal(y, gemm(a, b, _orders_arith(), again)) for y in ys)
    promoted = _orders_arith(promote_every=64)                        # groups moved whole: chunks 16 at a time
    order = chunk_order(promoted, 512, torch.Generator().manual_seed(3)).reshape(8, 16)
    assert torch.equal((order // 16).amin(1), (order // 16).amax(1))
    assert sorted((order // 16)[:, 0].tolist()) == list(range(8)) and (order // 16)[:, 0].tolist() != list(range(8))


def test_a_52_bit_accumulator_sums_exactly_in_every_order():
    a, b = _operands(8, m=4, k=1024, n=3)
    wide = _orders_arith(acc_mantissa_bits=52, in_scaling="tensor")
    gen = torch.Generator().manual_seed(1)
    ys = [gemm(a, b, wide, gen) for _ in range(5)]
    assert all(torch.equal(ys[0], y) for y in ys[1:])
    assert torch.equal(ys[0], gemm(a, b, _orders_arith(acc_mantissa_bits=52, in_scaling="tensor",
                                                       reduction_order="fixed")))


def test_spread_across_orders_is_what_the_accumulator_ulp_predicts():
    """At 13 bits toward zero an add drops acc + part's bits below the accumulator's ulp u. Within a binade acc is
    a multiple of u, so the drop is frac(part / u) * u, a function of the chunk alone: only which chunk meets which
    ulp depends on the order. So the result over random orders is a permutation sum sum_i c[i, pi(i)] with
    c[i, j] = frac(p_j / u_i) * u_i (slot ulps u_i from the K-order running sum), whose variance is
    sum_ij r_ij**2 / (n - 1) (r: c double-centred; Hoeffding). Measured (30 orders, 32 outputs, K = 4096, 1024
    chunks, final ulp 2**-4, sd 0.30 = 4.9 final ulps): pooled variance 1.16x the prediction; the mean drop
    0.93-1.02x sum_i u_i / 2. An independent U(0, u) drop per add would predict sd sqrt(sum u_i**2 / 12), 1.45x
    too large."""
    arith = _orders_arith()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(8, 4096, generator=g), torch.rand(4096, 4, generator=g)
    (ca, _), (cb, _) = quantize_codes(a, arith, -1), quantize_codes(b, arith, -2)
    gen = torch.Generator().manual_seed(1)
    ys = torch.stack([accumulate(ca, cb, arith, order=chunk_order(arith, 4096, gen)).double() for _ in range(30)])
    parts = ca.double().reshape(8, -1, 4).transpose(0, 1) @ cb.double().reshape(-1, 4, 4)   # [1024, 8, 4]: chunk sums
    ulp = torch.exp2(torch.floor(torch.log2(parts.cumsum(0))) - 13)
    pred = torch.zeros(8, 4, dtype=torch.float64)
    for i in range(8):
        for j in range(4):
            c = torch.remainder(parts[None, :, i, j], ulp[:, None, i, j])
            r = c - c.mean(1, keepdim=True) - c.mean(0, keepdim=True) + c.mean()
            pred[i, j] = r.pow(2).sum() / (c.shape[0] - 1)
    ratio = (ys.var(0).mean() / pred.mean()).item()
    assert 0.8 < ratio < 1.25, ratio
    drop = (parts.sum(0) - ys.mean(0)) / (ulp.sum(0) / 2)
    assert 0.85 < drop.min().item() and drop.max().item() < 1.1


@pytest.mark.parametrize("name", ["tensor_promote", "block", "mx_fp8"])
def test_row_tiles_are_the_whole_product(name, monkeypatch):
    """Large outputs are summed a tile of rows at a time (cache-sized); the rows, scales and order must line up."""
    from noisebench.noise import accumulate as A

    arith = _case(name, reduction_order="random")
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(3, 700, 64, generator=g) * 4, torch.randn(64, 200, generator=g)
    (ca, ia), (cb, ib) = quantize_codes(a, arith, -1), quantize_codes(b, arith, -2)
    order = chunk_order(arith, 64, torch.Generator().manual_seed(2))
    tiled = accumulate(ca, cb, arith, ia, ib, order)
    monkeypatch.setattr(A, "_TILE", 1 << 40)
    assert tiled.shape == (3, 700, 200) and torch.equal(tiled, accumulate(ca, cb, arith, ia, ib, order))


def _aligned_scalar(ca, cb, chunk: int, bits: int, mode: str) -> np.ndarray:
    """The aligning adder one output at a time in exact rationals: per chunk, the accumulator and each product cut to
    a multiple of 2**(e - bits), e the leading-bit exponent of the largest |term|, then summed."""
    m, k = ca.shape
    out = np.zeros((m, cb.shape[1]))
    for i in range(m):
        for j in range(cb.shape[1]):
            acc = Fraction(0)
            for k0 in range(0, k, chunk):
                terms = [acc] + [Fraction(float(ca[i, kk])) * Fraction(float(cb[kk, j]))
                                 for kk in range(k0, min(k, k0 + chunk))]
                big = max(abs(t) for t in terms)
                if big == 0:
                    continue
                e = big.numerator.bit_length() - big.denominator.bit_length()
                if Fraction(2) ** e > big:
                    e -= 1
                ulp = Fraction(2) ** (e - bits)
                cut = []
                for t in terms:
                    q = t / ulp
                    fl = q.numerator // q.denominator if q >= 0 else -((-q).numerator // (-q).denominator)
                    if mode == "rne":
                        r = q - fl
                        fl = fl + (1 if r > Fraction(1, 2) or (r == Fraction(1, 2) and fl % 2) else 0) \
                            if q >= 0 else fl - (1 if -r > Fraction(1, 2) or (-r == Fraction(1, 2) and fl % 2) else 0)
                    cut.append(fl * ulp)
                acc = sum(cut)
            out[i, j] = float(acc)
    return out


@pytest.mark.parametrize("mode", ["toward_zero", "rne"])
@pytest.mark.parametrize("chunk,bits", [(16, 13), (4, 8), (8, 20)])
def test_aligning_adder_matches_an_exact_scalar_definition(chunk, bits, mode):
    """acc_alignment=max_exponent: every product and the accumulator cut below the largest exponent of its chunk,
    bitwise the rational definition (e4m3 codes, K not a multiple of the chunk)."""
    g = torch.Generator().manual_seed(chunk * 100 + bits)
    a, b = torch.randn(3, 53, generator=g) * 30, torch.randn(53, 4, generator=g)
    arith = GemmArith(in_format="fp8_e4m3", in_scaling="none", chunk=chunk, acc_mantissa_bits=bits,
                      acc_rounding=mode, acc_alignment="max_exponent")
    ca, _ = quantize_codes(a, arith, -1)
    cb, _ = quantize_codes(b, arith, -2)
    got = accumulate(ca, cb, arith).double().numpy()
    want = _aligned_scalar(ca, cb, chunk, bits, mode).astype(np.float32).astype(np.float64)
    assert np.array_equal(got, want)


H200_FAST_ACCUM_ABS_RMS = 7.08e-4   # torch._scaled_mm, use_fast_accum=True, q/o shape, normal inputs (docs/chips.md)


def test_aligning_adder_reproduces_the_h200_fast_accumulation_error():
    """benchmarks/validate_fp8.py's inputs (x ~ N(0, 1), w ~ N(0, 0.02), e4m3 at per-tensor scales, K = 1536): the
    aligning adder at 32 products (conf/chip/fp8_fast_accum.yaml) and 13 bits toward zero errs as the H200's fast
    accumulation did (RMS |err| / RMS(ref) within 10%; 1.00x on the full 256 x 1024 case), where exact chunk sums
    into a 13-bit truncating accumulator err 1.7x more; with 40 bits nothing of an e4m3 product is cut."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 1536, generator=g), torch.randn(256, 1536, generator=g) * 0.02
    exact = GemmArith(in_format="fp8_e4m3", in_scaling="tensor", chunk=32, acc_mantissa_bits=13,
                      acc_rounding="toward_zero")
    aligned = GemmArith(**{**exact.__dict__, "acc_alignment": "max_exponent"})
    ca, ia = quantize_codes(x, exact, -1)
    cb, ib = quantize_codes(w.t(), exact, -2)
    ref = (ca.double() @ cb.double()) * (ia.double() * ib.double())

    def err(ar):
        y = accumulate(ca, cb, ar, ia, ib).double()
        return ((y - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()

    e_aligned, e_exact = err(aligned), err(exact)
    assert abs(e_aligned / H200_FAST_ACCUM_ABS_RMS - 1) < 0.1, (e_aligned, e_exact)
    assert e_exact / H200_FAST_ACCUM_ABS_RMS > 1.4, (e_aligned, e_exact)
    wide = GemmArith(**{**aligned.__dict__, "acc_mantissa_bits": 40})
    y = accumulate(ca, cb, wide, ia, ib)
    assert torch.equal(y, ((ca.double() @ cb.double()).float() * (ia.float() * ib.float())))


@pytest.mark.parametrize("bits", [6, 7, 10, 13])
def test_a_nan_code_stays_nan_through_a_narrow_nearest_accumulator(bits):
    """A NaN with its payload bits set (a GPU's canonical 0x7FFFFFFF, or all ones) is where nearest-even rounding on
    the bit pattern can carry through the exponent into the sign, leaving 0 and a finite row. Every output of the
    NaN's row is NaN, the other rows are untouched, under every accumulator width and either rounding."""
    g = torch.Generator().manual_seed(5)
    ca = torch.randint(-8, 9, (3, 64), generator=g).float()
    cb = torch.randint(-8, 9, (64, 5), generator=g).float()
    for pattern in (0x7FFFFFFF, -1, 0x7FC00000):            # canonical CUDA NaN, all ones, torch's quiet NaN
        bad = ca.clone()
        bad[1, 21] = torch.tensor(pattern, dtype=torch.int32).view(torch.float32)
        for rounding in ("rne", "toward_zero"):
            arith = GemmArith(in_format="fp32", chunk=16, acc_mantissa_bits=bits, acc_rounding=rounding)
            y = accumulate(bad, cb, arith)
            assert y[1].isnan().all(), (hex(pattern & 0xFFFFFFFF), rounding, y[1])
            assert torch.equal(y[[0, 2]], accumulate(ca, cb, arith)[[0, 2]])


H200_BITS = Path(__file__).resolve().parents[1] / "docs" / "data" / "h200_fp8_fast_accum_bits.npz"
H200_MIXED_BITS = H200_BITS.with_name("h200_fp8_mixed_bits.npz")
FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _h200_shares(path: Path, pair_of) -> tuple:
    """The recorded sets in ``path`` (``<set>_a``, ``_w``: codes as bytes; ``_y``: the H200's float32 outputs) and,
    per (adder, set), the share of outputs the definition gives bit for bit; ``pair_of(set)``: (A's, B's format)."""
    data = np.load(path)
    names = sorted({k.rsplit("_", 1)[0] for k in data.files})
    shares = {}
    for n in names:
        fa, fb = pair_of(n)
        a, w = (torch.from_numpy(data[f"{n}_{t}"]).view(FP8_DTYPES[f]).double() for t, f in (("a", fa), ("w", fb)))
        y = torch.from_numpy(data[f"{n}_y"])
        for alignment in ("max_exponent_unnormalized", "max_exponent"):
            arith = GemmArith(in_format=fa, b_format=fb, chunk=32, acc_mantissa_bits=13, acc_rounding="toward_zero",
                              acc_alignment=alignment, out_format="fp32")
            shares[alignment, n] = (accumulate(a, w.t(), arith) == y).double().mean().item()
    return names, shares


def test_the_unnormalized_adder_is_the_h200_fp8_tensor_core_bit_for_bit():
    """Recorded H200 outputs (``docs/data/h200_fp8_fast_accum_bits.npz``: a plain Triton FP8 GEMM, 32-element wgmmas
    into a float32 accumulator, whose bits equal cuBLAS's fast accumulation; e4m3 codes over the whole range and of
    N(0, 1) * 100, K = 32, 64, 512, and two- and three-product probes; 128 x 128 outputs each) against the
    definition: ``max_exponent_unnormalized`` gives every bit, the fitted ``max_exponent`` adder does not."""
    names, shares = _h200_shares(H200_BITS, lambda n: ("fp8_e4m3", "fp8_e4m3"))
    assert len(names) == 8
    assert all(shares["max_exponent_unnormalized", n] == 1.0 for n in names), shares
    assert all(shares["max_exponent", n] < 0.99 for n in names), shares


def test_the_unnormalized_adder_is_the_h200_tensor_core_on_e5m2_and_mixed_operands():
    """Recorded H200 outputs for the gradients' formats (``docs/data/h200_fp8_mixed_bits.npz``, ``fp8_adder_bits.py
    --save-mixed``: e5m2 x e4m3, e4m3 x e5m2 and e5m2 x e5m2, codes over the whole range and of N(0, 1) * 100, K = 32
    and 512, 128 x 128 outputs each): the backward GEMMs of the FP8 profiles follow the same adder bit for bit."""
    names, shares = _h200_shares(H200_MIXED_BITS, lambda n: tuple(f"fp8_{f}" for f in n.split("_")[0].split("x")))
    assert len(names) == 12
    assert all(shares["max_exponent_unnormalized", n] == 1.0 for n in names), shares
    assert all(shares["max_exponent", n] < 0.9 for n in names), shares


def test_the_unnormalized_adder_by_hand():
    """Chunks worked by hand: the grid is 2**(E - 13), E the largest sum of the inputs' exponents; each product cut
    to it toward zero; the sum cut to 14 significant bits; zeros give zero; NaN propagates."""
    arith = GemmArith(in_format="fp8_e4m3", chunk=32, acc_mantissa_bits=13, acc_rounding="toward_zero",
                      acc_alignment="max_exponent_unnormalized", out_format="fp32")
    # 12 * 10 = 120: exponents 3 + 3 = 6, grid 2**-7, 15360 units; 0.0390625 * 0.75 (exponents -5 - 1) = 3.75 units
    # -> 3; 15363 units fit 14 bits
    a, b = torch.tensor([[12.0, 0.0390625]]), torch.tensor([[10.0], [0.75]])
    assert accumulate(a, b, arith).item() == 120 + 3 * 2.0 ** -7
    # 15 * 15 = 225 = 28800 units (a product's significand may reach 4: 15 bits) + 0.875 * 0.9375 = 105 units:
    # 28905 needs 15 significant bits, cut to 14 -> 28904; the exact sum 225.8203125 is a float32
    a, b = torch.tensor([[15.0, 0.875]]), torch.tensor([[15.0], [0.9375]])
    assert accumulate(a, b, arith).item() == 225 + 104 * 2.0 ** -7
    assert accumulate(torch.zeros(2, 64), torch.zeros(64, 3), arith).eq(0).all()
    a = torch.ones(2, 64)
    a[1, 5] = float("nan")
    y = accumulate(a, torch.ones(64, 3), arith)
    assert y[0].eq(64).all() and y[1].isnan().all()
    with pytest.raises(ValueError, match="in_scaling=mx is not modelled"):
        GemmArith(in_format="fp8_e4m3", in_scaling="mx", acc_alignment="max_exponent_unnormalized")
