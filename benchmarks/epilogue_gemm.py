"""Where noise in the GEMM epilogue wins: device time of a noisy linear output, per shape.

Usage (GPU):  python benchmarks/epilogue_gemm.py [--shapes 8192x1536x8960,...] [--configs 8x3,4x4]

For each M x K x N (x: M x K, W: N x K, bf16) prints the median device time (triton.testing.do_bench) of:
  cublas        F.linear (cuBLAS), clean
  cublas+pass   F.linear, then the engine's elementwise noise kernel in place (what eager linears do now)
  triton        noisy_gemm.py's Triton GEMM, clean (warps x stages per --configs)
  triton+epi    the same GEMM with the noise in its epilogue (tile reloaded from L2, noised, written again)
and the ratio of the best epilogue time to cublas+pass (< 1: the epilogue wins for that shape), plus a check that
the epilogue's noise is there (realized relative std at scale 0.05).
The default shapes are the forward linears of a Qwen2.5-1.5B layer at 8192 tokens (q/o 1536->1536, k/v 1536->256,
gate/up 1536->8960, down 8960->1536).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from noisebench.noise.fast import kernels

from noisy_gemm import BK, BM, BN, linear_noise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="8192x1536x8960,8192x8960x1536,8192x1536x1536,8192x1536x256")
    p.add_argument("--configs", default="8x3,4x4", help="comma list of WARPSxSTAGES for the Triton GEMM")
    p.add_argument("--scale", type=float, default=1e-3)
    a = p.parse_args()
    ctr = torch.zeros(1, dtype=torch.int64, device="cuda")
    done = torch.zeros(1, dtype=torch.int32, device="cuda")
    configs = [tuple(int(v) for v in c.split("x")) for c in a.configs.split(",")]
    print(f"{torch.cuda.get_device_name()} torch={torch.__version__} scale={a.scale} tile={BM}x{BN}x{BK}",
          flush=True)
    print(f"{'M x K x N':<18} {'cublas':>8} {'+pass':>8} " + " ".join(
        f"{'tri ' + f'{w}x{s}':>9} {'epi ' + f'{w}x{s}':>9}" for w, s in configs) + f" {'best epi/+pass':>15} {'rel std':>8}",
        flush=True)
    for shape in a.shapes.split(","):
        M, K, N = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
        w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).bfloat16()
        t_cublas = do_bench(lambda: F.linear(x, w))

        def cublas_pass():
            y = F.linear(x, w)
            kernels.launch(y, "relative_gaussian", a.scale, 12345, ctr, done, False, out=y)
        t_pass = do_bench(cublas_pass)
        row, best = [], float("inf")
        for warps, stages in configs:
            t_tri = do_bench(lambda: linear_noise(x, w, 1, a.scale, noise=False, num_warps=warps, num_stages=stages))
            t_epi = do_bench(lambda: linear_noise(x, w, 1, a.scale, num_warps=warps, num_stages=stages))
            row += [t_tri, t_epi]
            best = min(best, t_epi)
        ref = linear_noise(x, w, 7, 0.05, noise=False).float()
        got = linear_noise(x, w, 7, 0.05).float()
        big = ref.abs() > ref.abs().median()
        rel = ((got - ref)[big] / ref[big]).std().item()
        print(f"{shape:<18} {t_cublas * 1e3:8.1f} {t_pass * 1e3:8.1f} " + " ".join(f"{t * 1e3:9.1f}" for t in row)
              + f" {best / t_pass:15.2f} {rel:8.1e}", flush=True)
    print("(times in us; rel std: realized relative noise of the epilogue at scale 0.05 against the same GEMM "
          "without it, expect ~0.05)")


if __name__ == "__main__":
    main()
