"""Not a timing: the aligning adder (``acc_alignment: max_exponent``) fitted to recorded real FP8 GEMM errors.

``validate_fp8.py`` draws its inputs on the CPU from fixed seeds, so the very codes an H200 multiplied can be rebuilt
here and summed by the emulator; its JSON (``docs/data/h200_validate_fp8.json``, one H200 run) holds the real
``torch._scaled_mm`` error statistics. Prints emulated / real for each statistic: (1) a grid of group sizes and bits
on the grid case (q/o, both input kinds) against fast accumulation, (2) the profile's setting on every shape (the
first ``--rows`` x ``--cols`` of the same codes: RMS and p99.9 comparable, a subset's max is not), (3) the K = 4096
anchor, each with and without promotion every 128 (against fast accumulation off).

    python benchmarks/fit_fp8_adder.py                          # about 5 minutes on 2 CPU cores
    python benchmarks/fit_fp8_adder.py --alignment max_exponent_unnormalized --chunks 32 --bits 13
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import validate_fp8 as V
from noisebench.noise.accumulate import GemmArith, accumulate

STATS = ("rel_rms", "abs_rms", "rel_p999", "abs_p999", "rel_max", "abs_max")


ALIGNMENT = ["max_exponent"]   # --alignment


def adder(chunk: int, bits: int, promote=None) -> GemmArith:
    return GemmArith(in_format="fp8_e4m3", in_scaling="tensor", chunk=chunk, acc_mantissa_bits=bits,
                     acc_rounding="toward_zero", acc_alignment=ALIGNMENT[0], promote_every=promote)


def ratios(kind: str, m: int, k: int, n: int, arith: GemmArith, real: dict, rows=None, cols=None) -> dict:
    """emulated / real per statistic on validate_fp8's inputs (seed 0), optionally on a rows x cols corner."""
    x, w = V.draw(kind, m, k, n, torch.device("cpu"), 0)
    ca, ia, _ = V.quantize_tensor(x)
    cw, ib, _ = V.quantize_tensor(w)
    ca, cb = ca[:rows], cw[:cols].t()
    ref = (ca.double() @ cb.double()) * (ia.double() * ib.double())
    st = V.stats(accumulate(ca, cb, arith, ia, ib), ref)
    return {s: round(st[s] / real[s], 2) for s in STATS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", default=str(Path(__file__).resolve().parents[1] / "docs/data/h200_validate_fp8.json"))
    p.add_argument("--chunks", default="8,16,32")
    p.add_argument("--bits", default="12,13,14")
    p.add_argument("--profile", default="32,13", help="chunk,bits of conf/chip/fp8_fast_accum.yaml")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--cols", type=int, default=1024)
    p.add_argument("--alignment", default="max_exponent", choices=["max_exponent", "max_exponent_unnormalized"],
                   help="the adder: fitted (conf/chip's) or the H200's bit-exact one (docs/chips.md)")
    a = p.parse_args()
    ALIGNMENT[0] = a.alignment
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rec = json.loads(Path(a.real).read_text())
    print(f"real figures: {rec['device']}, torch {rec['torch']}")
    chunk, bits = (int(v) for v in a.profile.split(","))
    for c in rec["cases"]:
        if not c["grid"]:
            continue
        for ch in (int(v) for v in a.chunks.split(",")):
            for b in (int(v) for v in a.bits.split(",")):
                r = ratios(c["inputs"], c["M"], c["K"], c["N"], adder(ch, b), c["real"]["fast_accum_on"])
                worst = max(abs(math.log(v)) for v in r.values())
                print(f"grid {c['shape']} {c['inputs']}: {ch} products, {b} bits vs fast accum on: {r} "
                      f"(worst {math.exp(worst):.2f}x)", flush=True)
        r = ratios(c["inputs"], c["M"], c["K"], c["N"], adder(16, bits, 128), c["real"]["fast_accum_off"])
        print(f"grid {c['shape']} {c['inputs']}: 16 products, {bits} bits, promoted every 128 vs fast accum off: {r}")
    for c in rec["cases"]:
        if c["grid"]:
            continue
        r = ratios(c["inputs"], c["M"], c["K"], c["N"], adder(chunk, bits), c["real"]["fast_accum_on"], a.rows,
                   a.cols)
        print(f"profile {c['shape']} {c['inputs']} K={c['K']} ({a.rows} x {a.cols}) vs fast accum on: {r}", flush=True)
    an = rec["anchor"]
    for promote, target in ((None, "fast_accum_on"), (128, "fast_accum_off")):
        r = ratios(an["inputs"], an["M"], an["K"], an["N"], adder(16, bits, promote), an["real"][target])
        print(f"anchor K={an['K']}: 16 products, {bits} bits, promote {promote} vs {target}: {r}; real abs max "
              f"{an['real'][target]['abs_max']:.4g}", flush=True)


if __name__ == "__main__":
    main()
