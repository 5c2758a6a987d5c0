"""One physics on every device: number formats, MX quantization, code-domain quantization and the chip GEMM give the
same bits on CUDA as on the CPU for the same inputs, edge values included (e4m3's 448/464/480, inf, NaN, float32
and format subnormals, -0.0). Skipped without CUDA; ``NOISEBENCH_DEVICE_UNDER_TEST=cpu`` runs it against the CPU
itself (a check that the test runs, not of a device)."""
import math
import os

import pytest
import torch
import yaml

from conftest import REPO
from noisebench.noise import formats as F
from noisebench.noise.accumulate import GemmArith, accumulate, chunk_order, gemm, quantize_codes

DEV = os.environ.get("NOISEBENCH_DEVICE_UNDER_TEST", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs CUDA")

EDGES = [0.0, -0.0, 448.0, -448.0, 464.0, 465.0, 480.0, 496.0, 512.0, 57344.0, 61439.0, 61440.0, 65504.0, 65520.0,
         6.0, 7.0, 7.5, 28.0, 30.0, 0.25, 0.75, 1.25, 2.5, 5.0, math.inf, -math.inf, math.nan,
         2.0 ** -6, 2.0 ** -9, 2.0 ** -10, 3 * 2.0 ** -11, 2.0 ** -14, 2.0 ** -16, 2.0 ** -17, 2.0 ** -24,
         2.0 ** -25, 2.0 ** -126, 2.0 ** -127, 1e-40, -1e-45, 3.4028234663852886e38, 1.0 + 2.0 ** -23, 1.0 + 2.0 ** -8]


def _inputs(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 20, (n,), generator=g).float())
    e = torch.tensor(EDGES, dtype=torch.float32)
    return torch.cat([e, -e, x])


def _same(cpu: torch.Tensor, dev: torch.Tensor) -> None:
    """Bitwise equal, NaN where NaN (payloads aside); -0.0 differs from 0.0."""
    dev = dev.cpu()
    assert cpu.dtype == dev.dtype and cpu.shape == dev.shape
    nan = torch.isnan(cpu)
    assert torch.equal(nan, torch.isnan(dev))
    c, d = cpu.float()[~nan], dev.float()[~nan]
    assert torch.equal(c.view(torch.int32), d.view(torch.int32)), (c != d).sum().item()


@pytest.mark.parametrize("name", sorted(F.FORMATS))
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
@pytest.mark.parametrize("overflow", F.OVERFLOWS)
def test_quantize_is_the_same_on_the_device(name, rounding, overflow):
    x = _inputs()
    bits = None
    if rounding == "stochastic":        # one draw, made on the CPU, used on both
        bits = torch.randint(0, 2 ** F.SR_BITS, x.shape, generator=torch.Generator().manual_seed(1))
    want = F.quantize(x, name, rounding, overflow, bits=bits)
    _same(want, F.quantize(x.to(DEV), name, rounding, overflow, bits=None if bits is None else bits.to(DEV)))
    if name == "fp8_e4m3" and overflow == "saturate" and rounding == "nearest":
        assert want[EDGES.index(464.0)].item() == 448.0 and want[EDGES.index(480.0)].item() == 448.0


@pytest.mark.parametrize("name", sorted(F.MX_FORMATS))
@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
def test_quantize_mx_is_the_same_on_the_device(name, rounding):
    x = _inputs(n=64 * 96 - 2 * len(EDGES)).reshape(64, 96)     # rows of 96: edges, then randoms
    for dim in (-1, 0):
        _same(F.quantize_mx(x, name, dim, rounding=rounding), F.quantize_mx(x.to(DEV), name, dim, rounding=rounding))


@pytest.mark.parametrize("scaling", ["none", "tensor", "block", "mx"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_quantize_codes_is_the_same_on_the_device(scaling, fmt):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 256, generator=g) * torch.exp(3 * torch.randn(48, 1, generator=g))
    x[0, :8] = torch.tensor([448.0, 464.0, 480.0, -0.0, 1e-40, 2.0 ** -9, 0.0, -2.0 ** -10])
    arith = GemmArith(in_format=fmt, in_scaling=scaling, scale_block=32, promote_every=32 if scaling == "block"
                      else None)
    for k_dim in (-1, -2):
        codes, inv = quantize_codes(x, arith, k_dim)
        dcodes, dinv = quantize_codes(x.to(DEV), arith, k_dim)
        _same(codes, dcodes)
        assert (inv is None) == (dinv is None)
        if inv is not None:
            _same(inv, dinv)


def _profiles():
    out = []
    for p in sorted((REPO / "conf" / "chip").glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        if isinstance(d, dict) and "in_format" in d:
            keys = {f for f in GemmArith.__dataclass_fields__}
            out.append(pytest.param(GemmArith(**{k: v for k, v in d.items() if k in keys}), id=p.stem))
    return out


@pytest.mark.parametrize("arith", _profiles())
@pytest.mark.parametrize("order", ["fixed", "random"])
def test_gemm_is_the_same_on_the_device(arith, order):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 24, 320, generator=g) * torch.exp(2 * torch.randn(2, 24, 1, generator=g))
    b, bias = torch.randn(320, 40, generator=g) / 16, torch.randn(40, generator=g)
    a[0, 0, :4] = torch.tensor([1e4, -0.0, 1e-40, 3e-3])
    if order == "fixed":
        _same(gemm(a, b, arith, bias=bias), gemm(a.to(DEV), b.to(DEV), arith, bias=bias.to(DEV)))
        return
    arith = GemmArith(**{**arith.__dict__, "reduction_order": "random"})
    perm = chunk_order(arith, 320, torch.Generator().manual_seed(4))     # drawn on the CPU, used on both
    (ca, ia), (cb, ib) = quantize_codes(a, arith, -1), quantize_codes(b, arith, -2)
    dev = [None if t is None else t.to(DEV) for t in (ca, ia, cb, ib)]
    _same(accumulate(ca, cb, arith, ia, ib, perm), accumulate(dev[0], dev[2], arith, dev[1], dev[3], perm))


@pytest.mark.parametrize("name", ["fp8_fast_accum", "fp8_promote128"])
def test_engine_gemms_of_the_fp8_profiles_are_the_cpu_definition(name):
    """``chip.gemm`` and ``chip.chip_grads`` on the device (on CUDA the Triton kernel) give the CPU definition's
    bits: the aligning adder's sums are exact, so nothing may differ. Forward at a tuned size (>= 2**22 outputs) and
    the two backward GEMMs with e5m2 gradients against e4m3 operands."""
    from noisebench.noise import chip
    profile = chip.ChipProfile.from_dict(yaml.safe_load((REPO / "conf" / "chip" / f"{name}.yaml").read_text()))
    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 512, 256, generator=g) * torch.exp(torch.randn(8, 512, 1, generator=g))
    w = torch.randn(1024, 256, generator=g) / 16
    _same(chip.gemm(a, w.t(), profile.arith), chip.gemm(a.to(DEV), w.t().to(DEV), profile.arith))
    x, b, grad = a[:2, :96], w.t()[:, :320], torch.randn(2, 96, 320, generator=g) * 1e-3
    want = chip.chip_grads(x, b, grad, profile)
    got = chip.chip_grads(x.to(DEV), b.to(DEV), grad.to(DEV), profile)
    for c, d in zip(want, got):
        _same(c, d)
