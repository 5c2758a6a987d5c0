"""Where a compiled noisy decode step's time goes: kernels per step and device time, clean vs each inline noise mode.

    python benchmarks/profile_rollout.py --models testbed,qwen2.5-1.5b
    python benchmarks/profile_rollout.py --models testbed --device cpu --batch 4 --new 8 --mode default   # smoke

For each model shape (random weights, ``common.decode_model``) and each variant -- clean; noisy with the engine's
default (``auto``: the graph kernel for large tensors, draws fused into Inductor's kernels for small ones); the graph
kernel for every tensor (``kernel``); fused draws for every tensor (``fused``); ``auto`` with the fused draws replaced
by ones (``none``, a diagnostic) -- the decode step is compiled afresh (``fullgraph``, ``--mode``), timed (tokens/s,
median of ``--repeats`` rollouts) and profiled over ``--steps`` decode steps with torch.profiler: device kernels per
step, device busy time per step, wall time per step, and the top kernels. Kernels replayed from CUDA graphs are
reported individually by CUPTI.
"""
from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from noisebench.noise import NoiseInjector, NoiseSpec
from noisebench.noise.fast import inline

from common import DRAWS, SHAPES, check_lists, decode_model, decode_step, one_rollout, rollout_args, sync

VARIANTS = ("clean", "auto", "kernel", "fused", "none")


def parse() -> argparse.Namespace:
    p = rollout_args(__doc__.splitlines()[0], new=64, repeats=2, repeats_help="timed rollouts per variant (median)")
    p.add_argument("--models", default="testbed,qwen2.5-1.5b", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    p.add_argument("--steps", type=int, default=8, help="profiled decode steps (at most --new - 1)")
    p.add_argument("--out", default="", help="folder for each variant's full kernel table (device us/step, name)")
    a = p.parse_args()
    if a.steps > a.new - 1:
        p.error(f"--steps {a.steps}: at most --new - 1 = {a.new - 1} (the profiled steps reuse the rollout's cache)")
    check_lists(p, a, {"models": SHAPES, "variants": VARIANTS})
    return a


def _set_variant(v: str) -> None:
    """``none``: the engine's default with the fused draws replaced by ones (diagnostic: the noise without normals)."""
    inline.set_mode("auto" if v in ("clean", "none") else v)
    inline.draw = DRAWS["none" if v == "none" else "engine"]


def _category(name: str) -> str:
    """Kernel family of a profiled kernel name (for a per-family device-time table across variants)."""
    low = name.lower()
    if any(k in low for k in ("gemm", "cutlass", "nvjet", "sm90_", "cublas", "gemv")):
        return "gemm"
    if any(k in low for k in ("flash", "attention", "fmha", "sdpa")):
        return "attention"
    if "graph_noise" in low:
        return "noise kernel"
    if low.startswith("triton_") and ("red" in low.split("_")[1] or "per" in low.split("_")[1]):
        return "triton reduction"
    if low.startswith("triton_"):
        return "triton pointwise"
    return "other"


def profile_steps(model, prompts, a, step, inj, label: str = "") -> tuple:
    """(tokens/s, kernels/step, device us/step, wall us/step, top kernels, top host) for ``step`` under ``inj`` (or
    clean): one warm-up rollout, ``a.repeats`` timed ones, then ``a.steps`` decode steps under torch.profiler."""
    tps = []
    for i in range(a.repeats + 1):
        _, dt = one_rollout(model, prompts, a, step, inj)
        if i:
            tps.append(a.batch * (a.new - 1) / dt)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device.startswith("cuda") else [])
    prof = profile(activities=acts)
    _, wall = one_rollout(model, prompts, a, step, inj, steps=a.steps, ctx=prof)
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per, cat, ncat = Counter(), Counter(), Counter()
    for e in kern:
        per[e.name] += e.device_time
        cat[_category(e.name)] += e.device_time
        ncat[_category(e.name)] += 1
    n = a.steps
    if a.out:
        with open(Path(a.out) / f"kernels-{label}.tsv", "w") as f:
            for k, t in per.most_common():
                f.write(f"{t / n:.2f}\t{k}\n")
    host = Counter()
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            host[e.key] = e.self_cpu_time_total
    return (statistics.median_high(tps), len(kern) / n, sum(e.device_time for e in kern) / n, 1e6 * wall / n,
            per.most_common(6), host.most_common(5), {k: (ncat[k] / n, cat[k] / n) for k in cat})


def main() -> None:
    a = parse()
    print(f"device={a.device} torch={torch.__version__} batch={a.batch} prompt={a.prompt} new={a.new} "
          f"mode={a.mode}; profile over {a.steps} decode steps (wall includes profiler overhead)")
    for name in a.models.split(","):
        model, prompts = decode_model(name, a)
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=a.scale, ops=["matmul_family"],
                                      phases=["rollout"]))
        inj.attach(model)
        print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params")
        print(f"{'variant':<15} {'tok/s':>9} {'x clean':>8} {'kernels/step':>13} {'device us/step':>15} "
              f"{'wall us/step':>13}")
        base = None
        tops, fams = {}, {}
        for v in a.variants.split(","):
            _set_variant(v)
            torch._dynamo.reset()
            step = torch.compile(decode_step, fullgraph=True, mode=a.mode)
            from torch._dynamo.utils import counters
            counters.clear()
            tps, nk, busy, wall, top, host, cats = profile_steps(model, prompts, a, step,
                                                                 None if v == "clean" else inj, v)
            skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
            base = tps if v == "clean" else base
            ratio = f"{tps / base:.3f}" if base else "-"
            print(f"{v:<15} {tps:9.0f} {ratio:>8} {nk:13.1f} {busy:15.1f} {wall:13.1f}  cudagraph skips {skips}, "
                  f"frames {dict(counters['stats'])}")
            tops[v] = top, host
            fams[v] = cats
        names = sorted({k for c in fams.values() for k in c})
        print(f"  {'kernels/step, us/step':<22}" + "".join(f"{v:>22}" for v in fams))
        for k in names:
            print(f"  {k:<22}" + "".join(f"{fams[v].get(k, (0, 0))[0]:>9.1f} {fams[v].get(k, (0, 0))[1]:>10.1f}us"
                                         for v in fams))
        for v, (top, host) in tops.items():
            print(f"  top kernels, {v}: " + "; ".join(f"{k[:60]} {t / a.steps:.1f}us" for k, t in top))
            print(f"  top host (self CPU), {v}: " + "; ".join(f"{k[:50]} {t / a.steps:.1f}us" for k, t in host))
        inj.detach(model)
        del model
        sync(a.device)
    _set_variant("auto")


if __name__ == "__main__":
    main()
