"""Speed of the chip GEMM kernel (``noisebench.noise.fast.chip_gemm``) against cuBLAS bf16 in the same process.

Qwen2.5-1.5B's linear shapes at ``--tokens`` rows: cuBLAS bf16 (``torch.matmul``), torch._scaled_mm fp8 with fast
accumulation on and off (where this torch and GPU have it), and the kernel for four chip profiles: ``gpu_bf16``
(the reference: bf16 inputs, chunk 32, float32 RNE accumulator: one float32 add per chunk), ``fp8_fast_accum``
(tensor scales, chunk 32, 13-bit accumulator, toward zero, never promoted), ``fp8_promote128`` (128-element block
scales, promoted every 128; chunk 32, 13 bits toward zero), ``mxfp8`` and ``mxfp4`` (MX scales, chunk 32, 23-bit
RNE accumulator) and ``approx_exp_acc10``'s GEMM (bf16, chunk 16, 10-bit RNE accumulator); bf16 output everywhere. The weight is a linear's (N x K, used transposed). Each figure is the median of ``--reps`` CUDA
event timings of a CUDA graph replaying 10 calls (device time: the host's launch work, 70-165 us a call, which the
per-call figures ``call_ms`` also hold, is left out; calls over 50 ms are timed per call only) after warm-up calls;
the kernel's block config is the fastest of ``chip_gemm.CONFIGS`` for the shape.
Target (issue 22, item 6): every chip profile >= 0.5x cuBLAS bf16 throughput. The shipped conf/chip profiles
fp8_fast_accum and fp8_promote128 use the aligning adder fitted to the H200 (per-product cuts, ``acc_alignment:
max_exponent``), which no tensor-core dot computes: the kernel cuts every product on CUDA cores (the ``_aligned``
rows); the exact-chunk-sum variants (chunk 32) are what a tensor-core dot per chunk can do. The ``_native`` rows
are those profiles with the H200's exact adder (``max_exponent_unnormalized``) on the FP8 tensor core itself
(``noise/fast/fp8_native.py``, sm_90 only).

    python benchmarks/chip_gemm.py --out $OUT/chip_gemm.json
"""
from __future__ import annotations

import argparse
import json
import math
import time

import torch

from common import cuda_us, graph_us
from noisebench.noise import formats
from noisebench.noise.accumulate import GemmArith
from noisebench.noise.fast import chip_gemm as cg, fp8_native

SHAPES = {"q/o": (1536, 1536), "k/v": (1536, 256), "gate/up": (1536, 8960), "down": (8960, 1536),
          "lm_head": (1536, 151936)}   # name -> (K, N)
PROFILES = {
    "gpu_bf16": GemmArith(in_format="bf16", chunk=32, acc_mantissa_bits=23, acc_rounding="rne", out_format="bf16",
                          overflow="inf"),
    "fp8_fast_accum": GemmArith(in_format="fp8_e4m3", in_scaling="tensor", chunk=32, acc_mantissa_bits=13,
                                acc_rounding="toward_zero", out_format="bf16"),
    "fp8_promote128": GemmArith(in_format="fp8_e4m3", in_scaling="block", scale_block=128, chunk=32,
                                acc_mantissa_bits=13, acc_rounding="toward_zero", promote_every=128,
                                out_format="bf16"),
    "mxfp8": GemmArith(in_format="fp8_e4m3", in_scaling="mx", scale_block=32, chunk=32, acc_mantissa_bits=23,
                       acc_rounding="rne", out_format="bf16"),
}
PROFILES["mxfp4"] = GemmArith(**{**PROFILES["mxfp8"].__dict__, "in_format": "fp4_e2m1"})
PROFILES["approx_exp_acc10"] = GemmArith(in_format="bf16", chunk=16, acc_mantissa_bits=10, acc_rounding="rne",
                                         out_format="bf16", overflow="inf")
# the fitted aligning adder (chip.acc_alignment=max_exponent): per-product cuts on CUDA cores, no tensor-core dot
PROFILES["fp8_fast_accum_aligned"] = GemmArith(**{**PROFILES["fp8_fast_accum"].__dict__,
                                                  "acc_alignment": "max_exponent"})
PROFILES["fp8_promote128_aligned"] = GemmArith(**{**PROFILES["fp8_promote128"].__dict__,
                                                  "acc_alignment": "max_exponent"})
# the shipped conf/chip fp8 profiles: the H200's own adder, on its FP8 tensor core (noise/fast/fp8_native.py)
for _name in ("fp8_fast_accum", "fp8_promote128"):
    PROFILES[f"{_name}_native"] = GemmArith(**{**PROFILES[_name].__dict__,
                                               "acc_alignment": "max_exponent_unnormalized"})


def e4m3_grid(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to e4m3 values (saturated), as bf16: codes the kernel takes."""
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.bfloat16)


def codes(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """``x``'s codes in ``fmt`` as bf16 (e4m3 values for the fp8 profiles)."""
    return x.bfloat16() if fmt == "bf16" else formats.quantize(x.float(), fmt).to(torch.bfloat16)


def scales(name: str, m: int, k: int, n: int, dev) -> tuple:
    """Dequantization multipliers for profile ``name``: 0-dim, per 128-block (B's as a view of an N-major
    tensor, as a linear's weight scales are stored) or MX powers of two."""
    g = torch.Generator(device=dev).manual_seed(0)
    if name in ("gpu_bf16", "approx_exp_acc10"):
        return None, None
    if name.startswith("fp8_fast_accum"):
        return torch.tensor(0.01, device=dev), torch.tensor(0.002, device=dev)
    blk = 128 if name.startswith("fp8_promote128") else 32
    nb = -(-k // blk)
    ia = torch.rand(m, nb, device=dev, generator=g) + 0.5
    ib = (torch.rand(n, nb, device=dev, generator=g) + 0.5).t()
    if name.startswith("mx"):
        ia, ib = torch.exp2(torch.round(ia * 4 - 4)), torch.exp2(torch.round(ib * 4 - 4))
    return ia, ib


def bench_shape(label: str, m: int, k: int, n: int, reps: int, profiles: list[str]) -> dict:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    a = e4m3_grid(torch.randn(m, k, device=dev) * 50)
    w = e4m3_grid(torch.randn(n, k, device=dev) * 50)
    row = dict(shape=label, M=m, K=k, N=n)
    flop = 2.0 * m * k * n
    variants = {"cublas_bf16": lambda: torch.matmul(a, w.t())}
    if hasattr(torch, "_scaled_mm"):
        a8, w8 = a.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
        one = torch.tensor(1.0, device=dev)
        for fast in (True, False):
            variants[f"scaled_mm_fp8_fast{int(fast)}"] = (
                lambda fast=fast: torch._scaled_mm(a8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                   use_fast_accum=fast))
    for name in profiles:
        ia, ib = scales(name, m, k, n, dev)
        arith = PROFILES[name]
        x, y = (a, w) if arith.in_format == "fp8_e4m3" else (codes(a, arith.in_format), codes(w, arith.in_format))
        run = fp8_native.fp8_gemm if name.endswith("_native") else cg.chip_gemm
        variants[f"chip_{name}"] = lambda arith=arith, ia=ia, ib=ib, x=x, y=y, run=run: run(x, y.t(), ia, ib, arith)
    for vname, fn in variants.items():
        try:
            tuned = fp8_native._TUNED if vname.endswith("_native") else cg._TUNED
            t0, before = time.perf_counter(), set(tuned)
            fn()                              # compiles and tunes the kernel on its first call
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            call_ms = cuda_us(fn, reps) / 1e3
            ms = graph_us(fn, reps) / 1e3 if call_ms < 50 else call_ms   # the aligning adder: host work is noise
            row[vname] = dict(ms=ms, tflops=flop / ms / 1e9, call_ms=call_ms, first_call_s=first)
            row[vname].update({"config (BM, BN, [BK,] warps, stages)": list(tuned[key])
                               for key in set(tuned) - before})
        except Exception as e:                # a torch or GPU without this variant: recorded, not fatal
            row[vname] = dict(error=f"{type(e).__name__}: {str(e)[:200]}")
    base = row["cublas_bf16"].get("ms")
    call_base = row["cublas_bf16"].get("call_ms")
    for vname in variants:
        if "ms" in row[vname] and base:
            row[vname]["ratio_to_bf16"] = base / row[vname]["ms"]
            row[vname]["call_ratio_to_bf16"] = call_base / row[vname]["call_ms"]
    return row


def table(rows: list[dict], names: list[str]) -> str:
    head = "| shape | M x K x N | " + " | ".join(names) + " |"
    lines = ["TFLOP/s of device time (ratio to cuBLAS bf16 in this process)", "", head,
             "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = []
        for v in names:
            d = r.get(v, {})
            cells.append(f"{d['tflops']:.0f} ({d['ratio_to_bf16']:.2f}x)" if "tflops" in d else "n/a")
        lines.append(f"| {r['shape']} | {r['M']} x {r['K']} x {r['N']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="M: rows of the activations")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"comma list of {list(PROFILES)}")
    p.add_argument("--out", default=None, help="JSON path for the figures")
    p.add_argument("--configs", default=None,
                   help="tiles the tuner tries instead of chip_gemm.CONFIGS, 'BM,BN,warps,stages;...'")
    a = p.parse_args()
    if a.configs:
        try:
            tiles = tuple(tuple(int(v) for v in c.split(",")) for c in a.configs.split(";"))
        except ValueError:
            tiles = ()
        if not tiles or any(len(t) != 4 for t in tiles):
            p.error(f"--configs: {a.configs!r} is not 'BM,BN,warps,stages;...'")
        cg.CONFIGS = tiles
    if not torch.cuda.is_available():
        raise SystemExit("chip_gemm.py needs CUDA")
    shapes, profiles = a.shapes.split(","), a.profiles.split(",")
    for bad in [s for s in shapes if s not in SHAPES] + [q for q in profiles if q not in PROFILES]:
        p.error(f"unknown shape or profile {bad!r}")
    t0 = time.perf_counter()
    rows = []
    for s in shapes:
        k, n = SHAPES[s]
        rows.append(bench_shape(s, a.tokens, k, n, a.reps, profiles))
        print(f"[{time.perf_counter() - t0:.0f}s] {s}: " + ", ".join(
            f"{v}={d['ratio_to_bf16']:.2f}x" for v, d in rows[-1].items() if isinstance(d, dict) and
            "ratio_to_bf16" in d), flush=True)
    names = [v for v in rows[0] if isinstance(rows[0][v], dict)]
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {cg.triton.__version__}\n")
    print(table(rows, names))
    summary = {}
    for v in names:
        ratios = [r[v]["ratio_to_bf16"] for r in rows if "ratio_to_bf16" in r.get(v, {})]
        if ratios:
            summary[v] = dict(min_ratio=min(ratios), geomean_ratio=math.exp(sum(map(math.log, ratios)) / len(ratios)))
    for v in names:
        calls = [r[v]["call_ratio_to_bf16"] for r in rows if "call_ratio_to_bf16" in r.get(v, {})]
        if v in summary and calls:
            summary[v]["call_geomean_ratio"] = math.exp(sum(map(math.log, calls)) / len(calls))
    print("\n| variant | min ratio | geomean ratio | >= 0.5x on every shape | geomean ratio per call (host work in) |"
          "\n|---|---|---|---|---|")
    for v, d in summary.items():
        print(f"| {v} | {d['min_ratio']:.2f} | {d['geomean_ratio']:.2f} | {d['min_ratio'] >= 0.5} | "
              f"{d.get('call_geomean_ratio', float('nan')):.2f} |")
    for r in rows:
        for v in names:
            if "error" in r.get(v, {}):
                print(f"{r['shape']} {v}: {r[v]['error']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                           triton=cg.triton.__version__, tokens=a.tokens, rows=rows, summary=summary,
                           wall_s=time.perf_counter() - t0), f, indent=1)
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
