"""The fused noise kernel alone: device time per call against a plain device copy, and host time per launch.

Usage (GPU):  python benchmarks/kernel_bandwidth.py [--numel 16777216,67108864] [--dtype bf16]

Prints, per size, the median device time (CUDA events, 50 calls) of:
  copy        ``torch.clone`` (one read + one write: the floor for any separate noise pass)
  v1          the engine's first kernel, kept as a yardstick: one Philox4x32-10 call per 4 elements (``tl.randn4x``)
  kernel      the engine's kernel: one Philox4x32-7 call per 8 elements, 16-bit Box-Muller, fast math, the eight
              slices of a program loaded before the draws
  inplace     the same writing into its input (what eager linear outputs and gradients use)
  precise     the same with libdevice's accurate log/sin/cos (to see what the fast math buys)
  ip sS wW    in place with S programs sharing each block of elements (same draws) and W warps a program (the
              engine runs kernels.EAGER_SPLIT programs a block for tensors of 1M elements or more)
and the host time of one launch (1000 launches of a 4096-element tensor, no sync in between): Triton's launcher
against the engine's direct launch of the cached compiled kernel (``kernels.launch``).
"""
from __future__ import annotations

import argparse
import time

import torch
import triton
import triton.language as tl

from noisebench.noise.fast import kernels as K

from common import cuda_us


@triton.jit(do_not_specialize=["seed"])
def _v1_kernel(x_ptr, y_ptr, numel, seed, scale, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    Q: tl.constexpr = BLOCK // 4
    lane = tl.arange(0, Q)
    offs = pid.to(tl.int64) * BLOCK + lane
    r0, r1, r2, r3 = tl.randn4x(seed, pid * Q + lane)
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    tl.store(y_ptr + offs, (x + scale * r0 * x).to(y_ptr.dtype.element_ty), mask=m)
    m = offs + Q < numel
    x = tl.load(x_ptr + offs + Q, mask=m).to(tl.float32)
    tl.store(y_ptr + offs + Q, (x + scale * r1 * x).to(y_ptr.dtype.element_ty), mask=m)
    m = offs + 2 * Q < numel
    x = tl.load(x_ptr + offs + 2 * Q, mask=m).to(tl.float32)
    tl.store(y_ptr + offs + 2 * Q, (x + scale * r2 * x).to(y_ptr.dtype.element_ty), mask=m)
    m = offs + 3 * Q < numel
    x = tl.load(x_ptr + offs + 3 * Q, mask=m).to(tl.float32)
    tl.store(y_ptr + offs + 3 * Q, (x + scale * r3 * x).to(y_ptr.dtype.element_ty), mask=m)


def v1(x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x)
    _v1_kernel[(triton.cdiv(x.numel(), 4096),)](x, out, x.numel(), K.kernel_key(12345), 1e-3, BLOCK=4096,
                                                num_warps=4)
    return out


_CTR = {}


def kernel(x: torch.Tensor, inplace: bool = False, fast: bool = True, split: int = 1, warps: int = 4) -> torch.Tensor:
    out = x if inplace else torch.empty_like(x)
    ctr = _CTR.get(x.device)
    if ctr is None:
        ctr = _CTR[x.device] = torch.zeros(1, dtype=torch.int64, device=x.device)
    n = x.numel()
    K._noise_kernel[(split * triton.cdiv(n, K.BLOCK),)](x, out, ctr, ctr, ctr, n, split * triton.cdiv(n, K.BLOCK),
                                                K.kernel_key(7),
                                                1e-3, KIND=0, USE_CTR=False, TELE=False, FAST=fast, ROUNDS=K.ROUNDS,
                                                BLOCK=K.BLOCK, SPLIT=split, num_warps=warps)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", default="2097152,12582912,16777216,67108864,73400320",
                   help="sizes; the defaults include the training-step workload's tensors (8192 x 256, x 1536, x 8960)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    a = p.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} dtype {a.dtype}")
    print(f"{'numel':>10} {'variant':<12} {'us':>9} {'GB/s':>7} {'x copy':>7}")
    for numel in (int(v) for v in a.numel.split(",")):
        x = torch.randn(numel, device="cuda", dtype=dtype)
        nbytes = 2 * numel * x.element_size()
        base = cuda_us(lambda: x.clone())
        for name, fn in (("copy", lambda: x.clone()), ("v1", lambda: v1(x)), ("kernel", lambda: kernel(x)),
                         ("inplace", lambda: kernel(x, inplace=True)), ("precise", lambda: kernel(x, fast=False)),
                         *((f"ip s{sp} w{w}", lambda sp=sp, w=w: kernel(x, inplace=True, split=sp, warps=w))
                           for sp, w in ((2, 4), (4, 4), (8, 4), (1, 8), (2, 8)))):
            us = cuda_us(fn)
            print(f"{numel:>10} {name:<12} {us:9.1f} {nbytes / us / 1e3:7.0f} {us / base:7.2f}")
    small = torch.randn(4096, device="cuda", dtype=dtype)
    ctr = torch.zeros(1, dtype=torch.int64, device="cuda")
    done = torch.zeros(1, dtype=torch.int32, device="cuda")
    engine = lambda: K.launch(small, "relative_gaussian", 1e-3, 5, ctr, done, False, out=small)  # noqa: E731
    def via_launcher():
        ok, K._DIRECT["ok"] = K._DIRECT["ok"], False
        try:
            engine()
        finally:
            K._DIRECT["ok"] = ok
    for name, fn in (("torch add", lambda: small.add(1.0)), ("kernel, Triton's launcher", lambda: kernel(small, True)),
                     ("engine (direct launch)", engine), ("engine via Triton's launcher", via_launcher)):
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(1000):
            fn()
        host = (time.perf_counter() - t) * 1e3
        torch.cuda.synchronize()
        print(f"host time per launch, {name}: {host:.1f} us")


if __name__ == "__main__":
    main()
