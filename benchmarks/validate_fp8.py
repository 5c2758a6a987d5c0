"""The accumulation emulator against real FP8 GEMMs (torch._scaled_mm, fast accumulation on and off), same codes.

Inputs are drawn like activations and weights (``normal``: N(0,1) activations, N(0, 0.02) weights; ``heavy``: the
same from a Student t with 3 degrees of freedom, outliers as in real activations), quantized to e4m3 with one
float32 scale per tensor exactly as _scaled_mm takes them (codes = e4m3(x * s), s = 448 / amax; scale_a, scale_b =
1 / s are the dequantization multipliers; B column-major). The reference is the same codes' product in float64.
Each candidate's error is measured against it element by element, two ways:
  rel: |y - ref| / max(|ref|, 0.01 * RMS(ref))   (relative, floored so cancellations do not dominate)
  abs: |y - ref| / RMS(ref)                        (absolute, normalised by the output's RMS)
with RMS, max and 99.9th percentile of each. Candidates: _scaled_mm with use_fast_accum True/False, the definition
(``accumulate.accumulate``, float64 on the GPU, M in pieces to bound memory) for a grid of settings (chunk, bits,
rounding, promotion), and the Triton kernel (``chip_gemm``) where it covers the setting. A setting agrees with a
real variant when every statistic's ratio is within 10%. The DeepSeek-V3 anchor: K = 4096, max relative error of a
~14-bit accumulator (~2%) and of promotion every 128 elements.

    python benchmarks/validate_fp8.py --out $OUT/validate.json
"""
from __future__ import annotations

import argparse
import inspect
import itertools
import json
import math
import time

import torch

from noisebench.noise import accumulate
from noisebench.noise.accumulate import GemmArith

SHAPES = {"q/o": (1536, 1536), "k/v": (1536, 256), "gate/up": (1536, 8960), "down": (8960, 1536),
          "lm_head": (1536, 151936)}   # name -> (K, N)
STATS = ("rel_rms", "rel_max", "rel_p999", "abs_rms", "abs_max", "abs_p999")
GRID = dict(chunk=(4, 8, 16, 32, 64, 128), bits=(12, 13, 14, 15, 23), rounding=("toward_zero", "rne"),
            promote=(None, 128))
FIXED = {   # the settings run on every shape (name -> chunk, bits, rounding, promote[, alignment])
    "fast_accum_aligned_c32": (32, 13, "toward_zero", None, "max_exponent"),   # conf/chip/fp8_fast_accum.yaml
    "promote128_aligned_c32": (32, 13, "toward_zero", 128, "max_exponent"),    # fp8_promote128, tensor scales
    "fast_accum_c4": (4, 13, "toward_zero", None),        # exact chunk sums, as first fitted
    "fast_accum_c32": (32, 13, "toward_zero", None),      # the same at a tensor-core chunk
    "promote128_c4": (4, 13, "toward_zero", 128),
    "promote128_c32": (32, 13, "toward_zero", 128),
    "fp32_c32": (32, 23, "rne", None),
}


def arith_of(chunk, bits, rounding, promote, alignment="exact") -> GemmArith:
    return GemmArith(in_format="fp8_e4m3", in_scaling="tensor", chunk=chunk, acc_mantissa_bits=bits,
                     acc_rounding=rounding, promote_every=promote, out_format="fp32", acc_alignment=alignment)


def draw(kind: str, m: int, k: int, n: int, dev, seed: int) -> tuple:
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "normal":
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.02
    else:
        t = torch.distributions.StudentT(3.0)
        torch.manual_seed(seed)
        x, w = t.sample((m, k)), t.sample((n, k)) * 0.02
    return x.to(dev), w.to(dev)


def quantize_tensor(x: torch.Tensor) -> tuple:
    """(codes float32, inv 0-dim float32, fp8 tensor): _scaled_mm's per-tensor recipe."""
    s = (448.0 / x.abs().amax().double()).float()
    q8 = (x * s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q8.float(), (1.0 / s.double()).float(), q8


def stats(y: torch.Tensor, ref: torch.Tensor) -> dict:
    err = (y.double() - ref).abs().flatten()
    rms = ref.square().mean().sqrt()
    rel = err / torch.clamp(ref.abs().flatten(), min=0.01 * rms.item())
    out = {}
    for name, e in (("rel", rel), ("abs", err / rms)):
        q = e.float() if e.numel() <= 16_000_000 else e[torch.randperm(e.numel(), device=e.device)[:16_000_000]]
        out[f"{name}_rms"] = e.square().mean().sqrt().item()
        out[f"{name}_max"] = e.max().item()
        out[f"{name}_p999"] = torch.quantile(q.float(), 0.999).item()
    return out


def definition(ca, cb, ia, ib, arith, budget=8e9) -> torch.Tensor:
    """``accumulate.accumulate`` on the GPU (float64 chunk sums), M in pieces of at most ``budget`` bytes."""
    nc = -(-ca.shape[-1] // arith.chunk)
    per_row = cb.shape[-1] * 8 * (arith.chunk * 4 if arith.acc_alignment == "max_exponent" else nc * 2)
    rows = max(1, int(budget // per_row))
    return torch.cat([accumulate.accumulate(ca[i:i + rows], cb, arith, ia, ib) for i in range(0, ca.shape[0], rows)])


def agreement(emul: dict, real: dict) -> tuple:
    """(agrees: every statistic within 10%, worst |log ratio|)."""
    logs = [abs(math.log(max(emul[s], 1e-300) / max(real[s], 1e-300))) for s in STATS]
    return all(x <= math.log(1.1) for x in logs), max(logs)


def run_case(shape, kind, m, k, n, dev, grid: bool, kernel, seed=0) -> dict:
    x, w = draw(kind, m, k, n, dev, seed)
    ca, ia, a8 = quantize_tensor(x)
    cw, ib, w8 = quantize_tensor(w)
    cb = cw.t()
    ref = (ca.double() @ cb.double()) * (ia.double() * ib.double())
    res = dict(shape=shape, inputs=kind, M=m, K=k, N=n, real={}, fixed={}, grid=[])
    if dev.type == "cuda" and hasattr(torch, "_scaled_mm"):
        for fast in (True, False):
            try:
                y = torch._scaled_mm(a8, w8.t(), scale_a=ia, scale_b=ib, out_dtype=torch.float32,
                                     use_fast_accum=fast)
                res["real"][f"fast_accum_{'on' if fast else 'off'}"] = stats(y, ref)
            except Exception as e:   # a torch or GPU without FP8 GEMMs: recorded, the rest still runs
                res["real"][f"fast_accum_{'on' if fast else 'off'}"] = dict(error=f"{type(e).__name__}: {e}"[:300])
    for name, setting in FIXED.items():
        arith = arith_of(*setting)
        y = definition(ca, cb, ia, ib, arith)
        res["fixed"][name] = stats(y, ref)
        if kernel is not None:
            yk = kernel(ca, cb, ia, ib, arith)
            if yk is not None:
                res["fixed"][name + "_kernel"] = dict(**stats(yk, ref), equal_to_definition=(yk == y).double()
                                                      .mean().item())
    if grid:
        for chunk, bits, rounding, promote in itertools.product(*GRID.values()):
            if promote is not None and promote % chunk:
                continue
            y = definition(ca, cb, ia, ib, arith_of(chunk, bits, rounding, promote))
            res["grid"].append(dict(chunk=chunk, bits=bits, rounding=rounding, promote=promote, **stats(y, ref)))
        for rname, r in res["real"].items():
            if "error" in r:
                continue
            scored = sorted(((agreement(g, r)[1], agreement(g, r)[0], g) for g in res["grid"]), key=lambda t: t[0])
            res[f"best_for_{rname}"] = [dict(setting=f"c{g['chunk']}/b{g['bits']}/{g['rounding']}/p{g['promote']}",
                                             worst_log_ratio=s, agrees=ok) for s, ok, g in scored[:3]]
            res[f"agreeing_with_{rname}"] = [f"c{g['chunk']}/b{g['bits']}/{g['rounding']}/p{g['promote']}"
                                             for s, ok, g in scored if ok]
    return res


def fmt_row(label: str, s: dict) -> str:
    if "error" in s:
        return f"| {label} | " + s["error"][:80] + " |" * len(STATS)
    extra = f" (= def {s['equal_to_definition']:.3f})" if "equal_to_definition" in s else ""
    return f"| {label}{extra} | " + " | ".join(f"{s[k]:.3g}" for k in STATS) + " |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="M")
    p.add_argument("--n-cap", type=int, default=4096, help="at most this many output columns per shape (lm_head)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--grid-shapes", default="q/o,down", help="shapes that run the whole settings grid")
    p.add_argument("--grid-tokens", type=int, default=256, help="M for the grid runs")
    p.add_argument("--grid-n-cap", type=int, default=1024)
    p.add_argument("--inputs", default="normal,heavy")
    p.add_argument("--anchor-mn", type=int, default=512, help="M = N for the K=4096 anchor")
    p.add_argument("--no-kernel", action="store_true", help="skip the Triton kernel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if "inv_a" not in inspect.signature(accumulate.accumulate).parameters:
        raise SystemExit("validate_fp8.py needs accumulate.accumulate(codes, codes, arith, inv_a, inv_b) (the codes "
                         "API); this checkout's accumulate.py predates it")
    dev = torch.device(a.device)
    kernel = None
    if not a.no_kernel:
        try:
            from noisebench.noise.fast.chip_gemm import _interpreting, chip_gemm
            kernel = chip_gemm if (dev.type == "cuda" or _interpreting()) else None
        except ImportError:
            pass
    t0 = time.perf_counter()
    cases = []
    grid_shapes = a.grid_shapes.split(",") if a.grid_shapes else []
    for shape in a.shapes.split(","):
        k, n = SHAPES[shape]
        for kind in a.inputs.split(","):
            cases.append(run_case(shape, kind, a.tokens, k, min(n, a.n_cap), dev, False, kernel))
            if shape in grid_shapes:
                cases.append(run_case(shape + " (grid)", kind, a.grid_tokens, k, min(n, a.grid_n_cap), dev, True,
                                      None, seed=1))
            print(f"[{time.perf_counter() - t0:.0f}s] {shape} {kind}", flush=True)
    anchor = run_case("anchor K=4096", "normal", a.anchor_mn, 4096, a.anchor_mn, dev, False, kernel, seed=2)
    print(f"[{time.perf_counter() - t0:.0f}s] anchor", flush=True)

    print(f"\n{torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("rel: |err| / max(|ref|, 0.01 RMS(ref)); abs: |err| / RMS(ref); ref: the same e4m3 codes in float64\n")
    for c in cases + [anchor]:
        print(f"### {c['shape']}, {c['inputs']} inputs, M x K x N = {c['M']} x {c['K']} x {c['N']}\n")
        print("| candidate | " + " | ".join(STATS) + " |\n|" + "---|" * (len(STATS) + 1))
        for name, s in c["real"].items():
            print(fmt_row(f"real {name}", s))
        for name, s in c["fixed"].items():
            print(fmt_row(f"emulated {name}", s))
        for rname in c["real"]:
            if f"best_for_{rname}" in c:
                best = ", ".join(f"{b['setting']} ({b['worst_log_ratio']:.3f}{' agrees' if b['agrees'] else ''})"
                                 for b in c[f"best_for_{rname}"])
                print(f"\nclosest to real {rname} (worst |log ratio| over the 6 statistics; 0.095 = 10%): {best}")
                print(f"settings within 10% on every statistic: {c[f'agreeing_with_{rname}'] or 'none'}")
        print()
    print("DeepSeek-V3 anchor (K=4096; ~2% max relative error at ~14 bits, promotion removes most of it):")
    for name, s in list(anchor["real"].items()) + list(anchor["fixed"].items()):
        if "rel_max" in s:
            print(f"  {name}: max rel {s['rel_max']:.4f}, max abs/RMS {s['abs_max']:.4f}")
    wall = time.perf_counter() - t0
    print(f"\nwall {wall:.0f}s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=str(dev), torch=torch.__version__, cases=cases, anchor=anchor, wall_s=wall,
                           stats_definition="rel: |err|/max(|ref|, 0.01 RMS(ref)); abs: |err|/RMS(ref)"), f, indent=1)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
