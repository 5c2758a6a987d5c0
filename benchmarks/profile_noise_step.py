"""Where a noisy training step's extra time goes: host time, device time and kernels, clean against noisy.

The same workload as ``noise_overhead.py`` (``common.step_args``, ``decoder_stack``, ``make_steps``), with ``--paths``
(reference, fast: eager; compiled: torch.compile default mode; compiled-cg: reduce-overhead, CUDA graphs;
compiled-at: max-autotune-no-cudagraphs, Inductor's Triton GEMM templates, which can take pointwise epilogues such as
the ``fused`` variant's draws: noise in the matmul epilogue) and
``--variants``, timed in ``--rounds`` interleaved rounds. One row per variant: the median wall time of a fwd+bwd step,
the host time (until the step's last launch returns, before the synchronisation), the device time (the step's
kernels summed, torch.profiler), kernels per step, the ratio against clean, and how much the forward output moved
against clean (0 for clean and off: the noise is really there or not). A step whose host time reaches its device
time is host-bound: the GPU waits on Python. ``--tables`` adds the profiler's top operators for the noisy variants.

Variants: ``clean`` (no injector); ``off`` (installed, every op covered, no phase of the step enabled: the cost of
the interception alone; ``off-attached`` the same with the module hooks on the attached model only); ``noisy``
(relative Gaussian on ``--ops`` in train_forward/train_backward, the engine's defaults); ``no-launch`` (noisy, but
the cached kernels are not launched: the engine's Python alone); ``st-add``
(compiled forward noise as ``y + (noisy - y).detach()`` instead of one straight-through op); ``fused`` (compiled
graphs fuse every draw into Inductor's kernels, engine switch ``compiled=fused``; ``noisy`` has the default
``auto``, which in training graphs on CUDA also fuses); ``attached`` (noisy, with the module hooks on the
attached model only, not global: ``NoiseInjector(hooks="attached")``); ``patch`` and ``off-patch`` (as
``attached`` and ``off-attached``, with the covered spellings patched instead of the TorchFunctionMode:
``intercept="patch"``, what the trainer uses; eager paths only); ``no-tele`` (telemetry sampling off).
    python benchmarks/profile_noise_step.py --layers 4 --tokens 8192 --ops linear --paths fast,compiled \
        --variants off,no-launch,noisy
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from noisebench.noise import NoiseInjector, NoiseSpec
from noisebench.noise.fast import inline, set_mode
from noisebench.noise.fast.dispatch import kernels

from common import decoder_stack, device_name, interleave, make_steps, step_args, sync

VARIANTS = ("clean", "off", "off-attached", "off-patch", "no-launch", "noisy", "st-add", "fused", "attached", "patch",
            "no-tele")
EAGER_ONLY = ("off-patch", "patch")   # intercept="patch" refuses compiled code
PATHS = ("reference", "fast", "compiled", "compiled-cg", "compiled-at")
COMPILE_MODES = {"compiled": None, "compiled-cg": "reduce-overhead", "compiled-at": "max-autotune-no-cudagraphs"}


def train_step(model, x, inj, marks: list = None) -> None:
    """One fwd+bwd step of ``common.make_steps``; ``marks`` gets the host time when the forward returned."""
    make_steps(model, x, inj)["fwd+bwd"](marks)


def timings(model, x, inj, device: str, n: int = 10, warmup: int = 3) -> tuple:
    """Median (wall ms, host ms, host forward ms) of a step: host = until the step returns, before the device is
    synchronised; host forward = until the forward returns."""
    wall, host, fwd = [], [], []
    for i in range(n + warmup):
        marks = []
        sync(device)
        t = time.perf_counter()
        train_step(model, x, inj, marks)
        h = time.perf_counter()
        sync(device)
        if i >= warmup:
            wall.append(1000 * (time.perf_counter() - t))
            host.append(1000 * (h - t))
            fwd.append(1000 * (marks[0] - t))
    return statistics.median(wall), statistics.median(host), statistics.median(fwd)


def cprofile(model, x, inj, steps: int = 5) -> None:
    """cProfile over noisy steps, with backward run on the calling thread (autograd multithreading off) so that the
    engine's backward hooks are seen too; prints the top functions by own time."""
    import cProfile
    import pstats
    pr = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        train_step(model, x, inj)
        pr.enable()
        for _ in range(steps):
            train_step(model, x, inj)
        pr.disable()
    print(f"cProfile, {steps} steps (autograd on the main thread):")
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def device_kernels(fn, device: str, steps: int = 3) -> tuple:
    """(device ms per step summed over kernels, kernels per step, the profiler's key averages)."""
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels) if kernels else 0.0
    return total_us / 1000 / steps, len(kernels) / steps, prof.key_averages()


def configure(variant: str) -> dict:
    """Set the engine switches a variant names; returns its NoiseSpec keywords."""
    inline.ST_FUNCTION = variant != "st-add"
    inline.set_mode("fused" if variant == "fused" else "auto")
    if kernels() is not None:
        kernels()._direct = _no_launch if variant == "no-launch" else _DIRECT
    if variant == "clean":
        return {"type": "none"}
    if variant in ("off", "off-attached", "off-patch"):   # installed, every op covered, no phase of the step enabled
        return {"type": "relative_gaussian", "ops": ["all"], "phases": ["eval"]}
    return {"type": "relative_gaussian", **({"telemetry_rate": 0.0} if variant == "no-tele" else {})}


def under(model, variant: str, inj, fn):
    """``fn()`` with ``variant``'s engine switches set and ``inj`` attached to ``model`` (as the trainer does: module
    scopes by name) and installed."""
    configure(variant)
    inj.attach(model)
    try:
        with inj:
            return fn()
    finally:
        inj.detach(model)


def _no_launch(*args) -> None:
    """``no-launch``: the engine's host work without the cached kernels' launches (Python cost alone)."""


_DIRECT = kernels()._direct if kernels() is not None else None


def main() -> None:
    def extend(p):
        p.add_argument("--variants", default="clean,noisy", help=f"comma list of {list(VARIANTS)}")
        p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median of their medians)")
        p.add_argument("--tables", action="store_true", help="profiler tables for the noisy variants")
        p.add_argument("--cprofile", action="store_true", help="cProfile of the eager noisy variant's host work")
    a = step_args(__doc__.splitlines()[0], extend, PATHS, {"variants": VARIANTS})
    variants = ["clean"] + [v for v in a.variants.split(",") if v != "clean"]   # the ratio's base first
    torch._dynamo.config.recompile_limit = 64   # variants flip engine switches that compiled graphs guard on
    model = decoder_stack(a)
    x = torch.randn(a.tokens // a.seq, a.seq, a.hidden, device=a.device, dtype=next(model.parameters()).dtype)
    print(f"device={a.device} ({device_name(a.device)}) "
          f"torch={torch.__version__} layers={a.layers} tokens={a.tokens} ops={a.ops} scale={a.scale}")
    for path in a.paths.split(","):
        set_mode("off" if path == "reference" else "auto")
        torch._dynamo.reset()
        runner = model if path in ("reference", "fast") else \
            torch.compile(model, fullgraph=True, mode=COMPILE_MODES[path])
        here = [v for v in variants if path in ("reference", "fast") or v not in EAGER_ONLY]
        injs = {}
        for variant in here:
            kw = configure(variant)
            injs[variant] = NoiseInjector(NoiseSpec(**{"scale": a.scale, "ops": a.ops.split(","),
                                                       "phases": ["train_forward", "train_backward"], **kw}),
                                           hooks="attached" if variant.endswith(("attached", "patch")) else "global",
                                           intercept="patch" if variant in EAGER_ONLY else "mode")
        res = interleave({v: lambda v=v, inj=inj: under(model, v, inj, lambda: timings(runner, x, inj, a.device))
                          for v, inj in injs.items()}, a.rounds)
        print(f"\n[{path}] {'variant':<10} {'wall ms':>8} {'host ms':>8} {'host fwd':>8} {'device ms':>9} "
              f"{'kernels':>8} {'ratio':>6} {'out rel':>8}", flush=True)
        ref = None
        for variant, inj in injs.items():
            def profiled(variant=variant, inj=inj):
                dev, nk, avg = device_kernels(lambda: train_step(runner, x, inj), a.device)
                if a.cprofile and variant == "noisy" and path in ("reference", "fast"):
                    cprofile(runner, x, inj)
                with inj.phase("train_forward"):
                    return dev, nk, avg, runner(inputs_embeds=x).last_hidden_state.detach().float()
            dev, nk, avg, out = under(model, variant, inj, profiled)
            ref = out if ref is None else ref
            rel = ((out - ref).std() / ref.std()).item()   # the forward output's change against clean
            wall, host, fwd = (statistics.median(r[i] for r in res[variant]) for i in range(3))
            base = statistics.median(r[0] for r in res["clean"])
            print(f"[{path}] {variant:<10} {wall:8.2f} {host:8.2f} {fwd:8.2f} {dev:9.2f} {nk:8.0f} {wall / base:6.2f} "
                  f"{rel:8.1e}  (rounds: {', '.join(f'{r[0]:.1f}' for r in res[variant])})", flush=True)
            if a.tables and variant not in ("clean", "off"):
                print(avg.table(sort_by="self_cpu_time_total", row_limit=12))
                if a.device.startswith("cuda"):
                    print(avg.table(sort_by="self_cuda_time_total", row_limit=15))
        configure("noisy")


if __name__ == "__main__":
    main()
