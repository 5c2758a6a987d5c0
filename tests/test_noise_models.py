"""Realized noise statistics for every noise model on every op, forward and backward, against clean torch."""
import math

import pytest
import torch
import torch.nn.functional as F

from noisebench.noise import OPS, NoiseInjector, NoiseSpec
from noisebench.noise import models


def _t(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).requires_grad_(True)


# op -> (inputs factory, function). Several spellings are used on purpose (method, operator, functional).
OP_CASES = {
    "linear": (lambda: [_t(64, 96, seed=1), _t(80, 96, seed=2), _t(80, seed=3)], lambda x, w, b: F.linear(x, w, b)),
    "matmul": (lambda: [_t(4, 32, 48, seed=1), _t(48, 40, seed=2)], lambda a, b: a @ b),
    "mm": (lambda: [_t(64, 48, seed=1), _t(48, 72, seed=2)], lambda a, b: a.mm(b)),
    "bmm": (lambda: [_t(4, 32, 48, seed=1), _t(4, 48, 40, seed=2)], lambda a, b: torch.bmm(a, b)),
    "addmm": (lambda: [_t(72, seed=3), _t(64, 48, seed=1), _t(48, 72, seed=2)], lambda c, a, b: torch.addmm(c, a, b)),
    "baddbmm": (lambda: [_t(4, 32, 40, seed=3), _t(4, 32, 48, seed=1), _t(4, 48, 40, seed=2)],
                lambda c, a, b: torch.baddbmm(c, a, b)),
    "einsum": (lambda: [_t(4, 32, 48, seed=1), _t(4, 48, 40, seed=2)], lambda a, b: torch.einsum("bij,bjk->bik", a, b)),
    "sdpa": (lambda: [_t(2, 4, 64, 16, seed=1), _t(2, 4, 64, 16, seed=2), _t(2, 4, 64, 16, seed=3)],
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    "softmax": (lambda: [_t(64, 128, seed=1)], lambda x: x.softmax(-1)),
    "silu": (lambda: [_t(64, 128, seed=1)], lambda x: F.silu(x)),
    "gelu": (lambda: [_t(64, 128, seed=1)], lambda x: F.gelu(x)),
    "layer_norm": (lambda: [_t(64, 128, seed=1), _t(128, seed=2), _t(128, seed=3)],
                   lambda x, w, b: F.layer_norm(x, (128,), w, b)),
    "rms_norm": (lambda: [_t(64, 128, seed=1), _t(128, seed=2)], lambda x, w: F.rms_norm(x, (128,), w)),
}
TYPES = ["relative_gaussian", "absolute_gaussian", "systematic_bias", "bitflip", "round"]
SCALES = {"relative_gaussian": 1e-2, "absolute_gaussian": 1e-3, "systematic_bias": 3e-3, "bitflip": 0.02, "round": 0.0}


def _run(op, spec=None, phase_fwd="train_forward", phase_bwd="train_backward"):
    make, fn = OP_CASES[op]
    inputs = make()
    g_out = torch.Generator().manual_seed(9)
    inj = NoiseInjector(spec) if spec is not None else None
    if inj:
        inj.install()
    try:
        with (inj.phase(phase_fwd) if inj else torch.enable_grad()):
            y = fn(*inputs)
        w = torch.randn(y.shape, generator=g_out)
        with (inj.phase(phase_bwd) if inj else torch.enable_grad()):
            (y * w).sum().backward()
    finally:
        if inj:
            inj.uninstall()
    return y.detach(), [x.grad for x in inputs], (inj.telemetry() if inj else {})


def _check(kind, scale, clean, noisy):
    """Assert the realized statistics of ``noisy`` against ``clean`` for one noise model."""
    clean, noisy = clean.reshape(-1).double(), noisy.reshape(-1).double()
    big = clean.abs() > 1e-6
    rel = (noisy[big] - clean[big]) / clean[big]
    if kind == "relative_gaussian":
        assert rel.std().item() == pytest.approx(scale, rel=0.05)
        assert abs(rel.mean().item()) < 5 * scale / math.sqrt(rel.numel())
    elif kind == "absolute_gaussian":
        diff = noisy - clean
        assert diff.std().item() == pytest.approx(scale, rel=0.05)
    elif kind == "systematic_bias":
        assert rel.mean().item() == pytest.approx(scale, rel=1e-3)
        assert rel.std().item() < 1e-5
    elif kind == "bitflip":
        xor = clean.float().view(torch.int32) ^ noisy.float().view(torch.int32)
        changed = (xor != 0)
        n, k = clean.numel(), changed.sum().item()
        sigma = math.sqrt(n * scale * (1 - scale))
        assert abs(k - n * scale) < 5 * sigma + 1, (k, n * scale)
        flipped = xor[changed]
        assert bool(((flipped & (flipped - 1)) == 0).all())            # exactly one bit per element
        assert bool((flipped.abs() < (1 << 23)).all())                  # mantissa bits only (default)
    else:  # round to bf16, nearest: equals torch's own cast
        assert torch.equal(noisy.float(), clean.float().to(torch.bfloat16).float())


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("op", OPS)
def test_forward_and_backward_statistics(op, kind):
    scale = SCALES[kind]
    y0, g0, _ = _run(op)
    # forward only: backward clean
    y1, g1, tel = _run(op, NoiseSpec(type=kind, scale=scale, ops=[op], phases=["train_forward"], telemetry_rate=1.0))
    _check(kind, scale, y0, y1)
    assert tel[f"noise/train_forward/{op}/fwd/calls"] == 1.0
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)  # straight-through: forward noise leaves the gradient formula clean
    # backward only: forward bitwise clean, every input gradient perturbed
    y2, g2, tel = _run(op, NoiseSpec(type=kind, scale=scale, ops=[op], phases=["train_backward"]))
    assert torch.equal(y0, y2)
    assert tel[f"noise/train_backward/{op}/bwd/calls"] == float(len(g0))
    if kind == "bitflip":  # few elements per gradient: pool them for the rate
        _check(kind, scale, torch.cat([g.reshape(-1) for g in g0]), torch.cat([g.reshape(-1) for g in g2]))
    else:
        for a, b in zip(g0, g2):
            if a.numel() >= 2048 or kind in ("systematic_bias", "round"):
                _check(kind, scale, a, b)
            else:
                assert not torch.equal(a, b)


def test_rel_err_telemetry_matches_scale():
    _, _, tel = _run("linear", NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], telemetry_rate=1.0))
    assert tel["noise/train_forward/linear/fwd/rel_err_rms"] == pytest.approx(1e-2, rel=0.05)
    assert tel["noise/train_backward/linear/bwd/rel_err_rms"] == pytest.approx(1e-2, rel=0.1)
    assert tel["noise/train_forward/linear/fwd/elements"] == 64 * 80


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
def test_round_nearest_equals_torch_cast(fmt):
    x = torch.randn(100_000) * 3
    assert torch.equal(models.round_format(x, fmt, "nearest"), x.to(models.ROUND_DTYPES[fmt]).float())
    xb = x.to(torch.bfloat16)
    assert models.round_format(xb, fmt, "nearest").dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
def test_round_stochastic_representable_and_unbiased(fmt):
    dt = models.ROUND_DTYPES[fmt]
    x = torch.rand(2000) * 4 + 0.5
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([models.round_format(x, fmt, "stochastic", g) for _ in range(400)])
    assert torch.equal(draws, draws.to(dt).float())                 # on the format's grid
    lo = x.to(dt).float()
    ulp = (x.abs().log2().floor() - (-math.log2(torch.finfo(dt).eps))).exp2()
    assert bool(((draws - x).abs() < ulp * 1.0001).all())           # one of the two neighbours
    bias = (draws.mean(0) - x) / ulp                                 # unbiased: mean within ~4 sigma of x
    assert bias.abs().max().item() < 4 * 0.5 / math.sqrt(400)
    assert bool((draws != lo).any())                                 # not simply round-to-nearest


def test_bitflip_rate_and_bit_fields():
    x = torch.randn(200_000)
    g = torch.Generator().manual_seed(1)
    for bits, (lo, hi) in [("mantissa", (0, 23)), ("exponent", (23, 31)), ("sign", (31, 32)), ("all", (0, 32))]:
        out, k = models.bitflip(x, 1e-3, bits, g)
        xor = x.view(torch.int32) ^ out.view(torch.int32)
        assert int((xor != 0).sum()) == k
        assert abs(k - 200) < 5 * math.sqrt(200)
        pos = torch.log2(xor[xor != 0].double().abs()).round()
        pos[xor[xor != 0] == torch.iinfo(torch.int32).min] = 31
        assert pos.min().item() >= lo and pos.max().item() < hi
    xb = x.to(torch.bfloat16)
    out, k = models.bitflip(xb, 0.01, "mantissa", g)
    xor = xb.view(torch.int16) ^ out.view(torch.int16)
    assert out.dtype == torch.bfloat16 and int((xor != 0).sum()) == k
    assert int(xor.abs().max()) < (1 << 7)                           # bf16 has 7 mantissa bits


def test_per_channel_bias_fixed_per_channel():
    spec = NoiseSpec(type="systematic_bias", scale=1e-2, ops=["linear"], per_channel=True, phases=["train_forward"])
    y0, _, _ = _run("linear")
    y1, _, _ = _run("linear", spec)
    y2, _, _ = _run("linear", spec)
    rel = (y1 - y0) / y0                                            # [64 rows, 80 channels]
    assert torch.equal(y1, y2)                                      # deterministic from the seed
    assert (rel - rel[0]).abs().max().item() < 1e-5                 # same bias down every channel
    assert rel[0].std().item() == pytest.approx(1e-2, rel=0.35)     # sizes ~ scale * N(0, 1) over 80 channels
    assert (rel[0] > 0).any() and (rel[0] < 0).any()                # both signs


def test_bf16_outputs_are_perturbed_in_float32():
    x = torch.randn(256, 256).to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    out = models.relative_gaussian(x, 1e-1, g)
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - x.float()) / x.float())
    assert rel.std().item() == pytest.approx(0.1, rel=0.05)


@pytest.mark.parametrize("kind", ["relative_gaussian", "absolute_gaussian"])
def test_cpu_inplace_reference_write_is_the_same_noise_and_straight_through(kind):
    """The reference path writes a float32 CPU linear output in place (no fresh multi-MB tensor): same values as the
    out-of-place model for the same generator seed, gradient straight-through, telemetry still sees the clean value."""
    fn = getattr(models, kind)
    y = torch.randn(300, 70, generator=torch.Generator().manual_seed(3))
    ref = fn(y, 1e-2, torch.Generator().manual_seed(9))
    inp = y.clone()
    out = fn(inp, 1e-2, torch.Generator().manual_seed(9), inplace=True)
    assert out.data_ptr() == inp.data_ptr() and torch.equal(out, ref)

    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(48, 32, requires_grad=True)
    g = torch.randn(64, 48)
    F.linear(x, w).backward(g)
    clean_gx, clean_gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    inj = NoiseInjector(NoiseSpec(type=kind, scale=1e-2, ops=["linear"], phases=["train_forward"], telemetry_rate=1.0))
    with inj, inj.phase("train_forward"):
        y_noisy = F.linear(x, w)
    y_clean = F.linear(x, w).detach()
    assert y_noisy.requires_grad and not torch.equal(y_noisy.detach(), y_clean)
    y_noisy.backward(g)
    assert torch.equal(x.grad, clean_gx) and torch.equal(w.grad, clean_gw)   # no backward phase: clean gradients
    rel = inj.telemetry()["noise/train_forward/linear/fwd/rel_err_rms"]
    expect = 1e-2 if kind == "relative_gaussian" else 1e-2 / y_clean.square().mean().sqrt().item()
    assert rel == pytest.approx(expect, rel=0.1)


def test_cpu_inplace_write_keeps_a_view_outputs_node():
    """F.linear of a 3-D input with a bias returns a view of its addmm; the in-place reference write must not bump its
    version, or autograd rebuilds the node as AsStridedBackward (a zero-filled base-sized gradient and a copy on
    every backward). Gradients stay those of the clean op (forward noise only)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(12, 16, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True)
    gy = torch.randn(3, 5, 12, generator=g)
    F.linear(x, w, b).backward(gy)
    clean = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], phases=["train_forward"]))
    with inj, inj.phase("train_forward"):
        y = F.linear(x, w, b)
    assert type(y.grad_fn).__name__ == "ViewBackward0"
    assert not torch.equal(y.detach(), F.linear(x, w, b).detach())
    y.backward(gy)
    assert all(torch.equal(t.grad, c) for t, c in zip((x, w, b), clean))


@pytest.mark.parametrize("mode", ["nearest", "stochastic"])
@pytest.mark.parametrize("fmt,limit", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_saturates_on_every_device(fmt, limit, mode):
    """Out-of-range values saturate to the format's largest finite value on CPU and CUDA alike (torch's CUDA cast
    gives NaN there), and NaN stays NaN."""
    from noisebench.noise.models import round_format

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        y = torch.tensor([limit * 1.05, -limit * 40, limit, 1.0, float("nan")], device=dev)
        gen = torch.Generator(device=dev).manual_seed(0)
        out = round_format(y, fmt, mode, gen).cpu()
        assert out[:4].tolist() == [limit, -limit, limit, 1.0]
        assert torch.isnan(out[4])
