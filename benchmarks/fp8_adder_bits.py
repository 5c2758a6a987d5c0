"""Not a timing: is the GPU's FP8 fast accumulation the aligning adder bit for bit, or only in its statistics?

``fp8_fast_accum``'s adder (``acc_alignment: max_exponent``: 32 products and the accumulator aligned to the largest
one's leading bit, cut to 13 fraction bits toward zero) reproduces the H200's error statistics within 1-3%
(docs/chips.md). If it were also the hardware's bits, the chip kernel could run those profiles on the tensor core
itself. This script measures the share of output elements equal, bit for bit, between the hardware and models of
the adder, on e4m3 codes of two kinds (``wide``: the format's whole range with subnormals and zeros; ``normal``:
N(0, 1) * 100): the hardware as a plain Triton FP8 GEMM (``tl.dot(a, b, acc)``, one 32-element wgmma after another
into a float32 accumulator, Triton's sm_90 default of no promotion) and as cuBLAS (``torch._scaled_mm``, fast
accumulation on). Models: the definition (``accumulate``), and a grid over the cut's bits, the group of products,
where the alignment exponent comes from (``lead``: the largest product's leading bit; ``exp0``/``exp1``: the
largest sum of the two inputs' exponents, + 0 or 1), whether the accumulator joins the alignment, and how a sum
outside it is rounded to float32.

    python benchmarks/fp8_adder_bits.py --out $OUT/fp8_adder_bits.json      # CUDA, sm_89 or later; ~1 min
    python benchmarks/fp8_adder_bits.py --save docs/data/h200_fp8_fast_accum_bits.npz     # the recorded outputs
    python benchmarks/fp8_adder_bits.py --save-mixed docs/data/h200_fp8_mixed_bits.npz    # e5m2 and mixed operands
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from noisebench.noise import formats
from noisebench.noise.accumulate import GemmArith, accumulate, code_exponents

@triton.jit
def _fp8_gemm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr):
    """C = A @ B of fp8 codes, one 32-element tensor-core dot after another into a float32 accumulator."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, 32)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, 32):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < M, other=0.0)
        b = tl.load(b_ptr + rn[None, :] * K + (k0 + rk)[:, None], mask=rn[None, :] < N, other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# (A's format, B's format) beyond e4m3 x e4m3: a backward GEMM's e5m2 gradient against an e4m3 operand, either side
MIXED = (("fp8_e5m2", "fp8_e4m3"), ("fp8_e4m3", "fp8_e5m2"), ("fp8_e5m2", "fp8_e5m2"))


def triton_fp8(ca: torch.Tensor, w: torch.Tensor, fa: str = "fp8_e4m3", fb: str = "fp8_e4m3") -> torch.Tensor:
    a8, w8 = ca.to(FP8[fa]).contiguous(), w.to(FP8[fb]).contiguous()
    m, k = a8.shape
    c = torch.empty(m, w8.shape[0], device=ca.device)
    _fp8_gemm[(triton.cdiv(m, 64), triton.cdiv(w8.shape[0], 64))](a8, w8, c, m, w8.shape[0], k, BM=64, BN=64)
    return c


def cublas_fp8(ca: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    one = torch.tensor(1.0, device=ca.device)
    return torch._scaled_mm(ca.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn).t(), scale_a=one, scale_b=one,
                            out_dtype=torch.float32, use_fast_accum=True)


def _lead(x: torch.Tensor) -> torch.Tensor:
    return (torch.frexp(x.abs())[1] - 1).double()


def model(ca, cb, bits: int, group: int, align: str, acc_in: bool, fin: str) -> torch.Tensor:
    """One adder model on float64 codes ca [M, K] @ cb [K, N]; float32 result."""
    low = torch.full((), -1e4, dtype=torch.float64, device=ca.device)
    ea, eb = code_exponents(ca, "fp8_e4m3"), code_exponents(cb, "fp8_e4m3")
    acc = torch.zeros(ca.shape[0], cb.shape[1], dtype=torch.float64, device=ca.device)
    for c0 in range(0, ca.shape[1], group):
        p = ca[:, c0:c0 + group, None] * cb[None, c0:c0 + group, :]
        if align == "lead":
            e = _lead(p).amax(1)
        else:
            e = (ea[:, c0:c0 + group, None] + eb[None, c0:c0 + group, :]).amax(1) + int(align[-1])
        e = torch.where(p.abs().amax(1) == 0, low, e)
        if acc_in:
            e = torch.maximum(e, torch.where(acc == 0, low, _lead(acc)))
        unit = torch.exp2(e.clamp(min=-200) - bits)
        s = torch.trunc(p / unit[:, None, :]).sum(1) * unit
        if acc_in:
            acc = s + torch.trunc(acc / unit) * unit
        else:
            tot = acc + s
            f = tot.float()
            if fin == "rz":                   # float32 toward zero: one step back where nearest went outward
                f = torch.where(f.double().abs() > tot.abs(), torch.nextafter(f, torch.zeros_like(f)), f)
            acc = f.double()
    return acc.float()


def codes(kind: str, shape: tuple, gen: torch.Generator, fmt: str = "fp8_e4m3") -> torch.Tensor:
    if kind == "wide":                        # e4m3: 2**-14 ... 2**8; e5m2: 2**-18 ... 2**14 (subnormals, near max)
        lo, hi = (-14, 9) if fmt == "fp8_e4m3" else (-18, 15)
        x = torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(lo, hi, shape, generator=gen).float())
        x = x.masked_fill(torch.rand(*shape, generator=gen) < 0.05, 0.0)
    else:
        x = torch.randn(*shape, generator=gen) * 100
    return formats.quantize(x, fmt)


def recorded_sets() -> dict:
    """The inputs saved with the hardware's outputs (``--save``): e4m3 codes of both kinds at K = 32, 64, 512 (256
    rows each), and probes of two products (columns 0 and 1) and, at K = 64, a third in the second wgmma (column
    32), over random positive e4m3 values with random signs on one product."""
    sets = {}
    for kind in ("wide", "normal"):
        for k in (32, 64, 512):
            gen = torch.Generator().manual_seed(100 + k)
            sets[f"{kind}_{k}"] = (codes(kind, (256, k), gen), codes(kind, (256, k), gen))
    vals = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals) & (vals > 0)]
    gen = torch.Generator().manual_seed(1)

    def pick():
        return vals[torch.randint(0, len(vals), (512,), generator=gen)]

    def sign():
        return torch.where(torch.rand(512, generator=gen) < 0.5, -1.0, 1.0)

    for name, k in (("pair", 32), ("pair_k64", 64)):
        a, w = torch.zeros(512, k), torch.zeros(512, k)
        a[:, 0] = pick()
        a[:, 1] = pick() * sign()
        w[:, 0] = pick()
        w[:, 1] = pick()
        if k == 64:
            a[:, 32] = pick()
            w[:, 32] = pick() * sign()
        sets[name] = (a, w)
    return sets


def save(path: str, dev: torch.device, keep: int = 128) -> None:
    """The hardware's outputs on ``recorded_sets`` (the Triton GEMM), the first ``keep`` x ``keep`` of each, with
    their codes as e4m3 bytes: what ``tests/test_chip_accumulate.py`` checks the exact adder against."""
    import numpy as np

    arrs = {}
    for name, (a, w) in recorded_sets().items():
        y = triton_fp8(a.to(dev), w.to(dev)).cpu()
        arrs[f"{name}_a"] = a[:keep].to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        arrs[f"{name}_w"] = w[:keep].to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        arrs[f"{name}_y"] = y[:keep, :keep].numpy()
    np.savez_compressed(path, **arrs)
    print(f"wrote {path}")


def mixed_sets() -> dict:
    """Inputs for ``--save-mixed``: each ``MIXED`` pair, codes of both kinds at K = 32 and 512 (128 rows)."""
    sets = {}
    for (fa, fb), kind, k in itertools.product(MIXED, ("wide", "normal"), (32, 512)):
        gen = torch.Generator().manual_seed(200 + k)
        sets[f"{fa[-4:]}x{fb[-4:]}_{kind}_{k}"] = (fa, fb, codes(kind, (128, k), gen, fa), codes(kind, (128, k), gen, fb))
    return sets


def save_mixed(path: str, dev: torch.device) -> None:
    """The hardware's outputs on ``mixed_sets`` (the Triton GEMM) with their codes as bytes, and the share of them
    each adder model gives bit for bit (printed): the measurement behind e5m2 gradients on the tensor core."""
    import numpy as np

    arrs = {}
    for name, (fa, fb, a, w) in mixed_sets().items():
        y = triton_fp8(a.to(dev), w.to(dev), fa, fb).cpu()
        arrs[f"{name}_a"] = a.to(FP8[fa]).view(torch.uint8).numpy()
        arrs[f"{name}_w"] = w.to(FP8[fb]).view(torch.uint8).numpy()
        arrs[f"{name}_y"] = y.numpy()
        shares = {}
        for alignment in ("max_exponent_unnormalized", "max_exponent"):
            arith = GemmArith(in_format=fa, b_format=fb, chunk=32, acc_mantissa_bits=13, acc_rounding="toward_zero",
                              acc_alignment=alignment, out_format="fp32")
            shares[alignment] = (accumulate(a.double(), w.t().double(), arith) == y).double().mean().item()
        print(json.dumps(dict(set=name, equal=shares)), flush=True)
    np.savez_compressed(path, **arrs)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", default="32,64,512,1536", help="comma list of K")
    p.add_argument("--size", type=int, default=64, help="M = N")
    p.add_argument("--out", default=None)
    p.add_argument("--save", default=None, help="write the recorded sets' outputs here (.npz) and stop")
    p.add_argument("--save-mixed", default=None, help="write e5m2 and mixed sets' outputs here (.npz) and stop")
    a = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise SystemExit("fp8_adder_bits.py needs a CUDA GPU with FP8 tensor cores (sm_89 or later)")
    dev = torch.device("cuda")
    if a.save:
        save(a.save, dev)
        return
    if a.save_mixed:
        save_mixed(a.save_mixed, dev)
        return
    definition = GemmArith(in_format="fp8_e4m3", chunk=32, acc_mantissa_bits=13, acc_rounding="toward_zero",
                           acc_alignment="max_exponent", out_format="fp32")
    grid = [g for g in itertools.product((12, 13, 14, 15), (16, 32), ("lead", "exp0", "exp1"), (True, False),
                                         ("rn", "rz")) if not (g[3] and g[4] == "rz")]
    rows = []
    for kind, k in itertools.product(("wide", "normal"), [int(v) for v in a.ks.split(",")]):
        gen = torch.Generator().manual_seed(k)
        ca, w = codes(kind, (a.size, k), gen).to(dev), codes(kind, (a.size, k), gen).to(dev)
        hw = {"triton": triton_fp8(ca, w), "cublas": cublas_fp8(ca, w)}
        ref = accumulate(ca, w.t(), definition)
        row = dict(kind=kind, K=k, **{f"{h}_equal_definition": (y == ref).double().mean().item()
                                      for h, y in hw.items()},
                   triton_equal_cublas=(hw["triton"] == hw["cublas"]).double().mean().item())
        shares = {}
        for g in grid:
            y = model(ca.double(), w.t().double(), *g)
            shares[" ".join(map(str, g))] = (y == hw["triton"]).double().mean().item()
        row["best_models_vs_triton (bits group align acc_in fin)"] = sorted(shares.items(), key=lambda kv: -kv[1])[:4]
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
