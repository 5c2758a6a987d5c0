"""Where a noisy training step's extra time goes: host time, device time and kernels, clean against noisy (issue 7).

Same workload and flags as ``noise_overhead.py`` (it reuses its model and step builders), with ``--paths`` (reference,
fast, compiled) and ``--variants``. For each path it prints one row per variant: the median wall time of a fwd+bwd step,
the host time (until the step's last launch returns, before the synchronisation), the device time (sum of the
step's kernels, from torch.profiler), kernels per step, and the ratio against the clean row. A step whose host time
reaches its device time is host-bound: the GPU waits on Python. ``--tables`` adds the profiler's top operators by
self CPU and by device time for the noisy variants.

Variants: ``clean`` (no injector); ``noisy`` (relative Gaussian on ``--ops``, train phases, the engine's defaults);
``function`` (eager linear through the ``NoisyLinear`` autograd.Function instead of the product node's grad hook);
``st-add`` (compiled forward noise as ``y + (noisy - y).detach()`` instead of one straight-through op); ``fused``
(compiled graphs draw with Inductor's randn instead of the graph kernel); ``no-tele`` (telemetry sampling off).
    python benchmarks/profile_noise_step.py --layers 4 --tokens 8192 --ops linear --paths fast,compiled
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from noise_overhead import _sync, build, make_steps, parse  # noqa: E402

from noisebench.noise import NoiseInjector, NoiseSpec, intercept  # noqa: E402
from noisebench.noise.fast import inline, set_mode  # noqa: E402

VARIANTS = ("clean", "noisy", "function", "st-add", "fused", "no-tele")


def timings(fn, device: str, n: int = 10, warmup: int = 3) -> tuple:
    """Median (wall ms, host ms) of ``fn``: host = until ``fn`` returns, before the device is synchronised."""
    wall, host = [], []
    for i in range(n + warmup):
        _sync(device)
        t = time.perf_counter()
        fn()
        h = time.perf_counter()
        _sync(device)
        if i >= warmup:
            wall.append(1000 * (time.perf_counter() - t))
            host.append(1000 * (h - t))
    return statistics.median(wall), statistics.median(host)


def device_kernels(fn, device: str, steps: int = 3) -> tuple:
    """(device ms per step summed over kernels, kernels per step, the profiler's key averages)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _sync(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels) if kernels else 0.0
    return total_us / 1000 / steps, len(kernels) / steps, prof.key_averages()


def configure(variant: str) -> dict:
    """Set the engine switches a variant names; returns the NoiseSpec keywords."""
    intercept.GRAD_HOOKS = variant != "function"
    inline.ST_FUNCTION = variant != "st-add"
    inline.MODE = "fused" if variant == "fused" else "auto"
    return {"telemetry_rate": 0.0} if variant == "no-tele" else {}


def main() -> None:
    def extend(p):
        p.add_argument("--variants", default="clean,noisy", help=f"comma list of {list(VARIANTS)}")
        p.add_argument("--tables", action="store_true", help="profiler tables for the noisy variants")
    a = parse(extend, __doc__.splitlines()[0])
    variants = a.variants.split(",")
    bad = [v for v in ["clean"] + variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; valid choices: {list(VARIANTS)}")
    variants = ["clean"] + [v for v in variants if v != "clean"]   # the ratio's base first
    paths = [p for p in a.paths.split(",") if p in ("reference", "fast", "compiled")]
    torch._dynamo.config.recompile_limit = 64   # variants flip engine switches that compiled graphs guard on
    model = build(a)
    x = torch.randn(a.tokens // a.seq, a.seq, a.hidden, device=a.device, dtype=next(model.parameters()).dtype)
    ops = a.ops.split(",")
    phases = ["train_forward", "train_backward"]
    print(f"device={a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu'}) "
          f"torch={torch.__version__} layers={a.layers} tokens={a.tokens} ops={ops} scale={a.scale}")
    for path in paths:
        set_mode("off" if path == "reference" else "auto")
        torch._dynamo.reset()
        runner = torch.compile(model, fullgraph=True) if path == "compiled" else model
        print(f"\n[{path}] {'variant':<10} {'wall ms':>8} {'host ms':>8} {'device ms':>9} {'kernels':>8} "
              f"{'ratio':>6}", flush=True)
        base = None
        for variant in variants:
            kw = configure(variant)
            spec = NoiseSpec(type="relative_gaussian", scale=a.scale, ops=ops, phases=phases, **kw) \
                if variant != "clean" else NoiseSpec()
            inj = NoiseInjector(spec)
            inj.attach(model)   # as the trainer does (module scopes by name; hooks skip classes that cannot matter)
            step = make_steps(runner, x, inj)["fwd+bwd"]
            with inj:
                wall, host = timings(step, a.device)
                dev, nk, avg = device_kernels(step, a.device)
            inj.detach(model)
            base = base or wall
            print(f"[{path}] {variant:<10} {wall:8.2f} {host:8.2f} {dev:9.2f} {nk:8.0f} {wall / base:6.2f}",
                  flush=True)
            if a.tables and variant != "clean":
                print(avg.table(sort_by="self_cpu_time_total", row_limit=12))
                if a.device.startswith("cuda"):
                    print(avg.table(sort_by="self_cuda_time_total", row_limit=15))
        configure("noisy")


if __name__ == "__main__":
    main()
