"""Rollout tokens/s with noise: eager vs torch.compile + CUDA graphs (static KV cache), clean vs noisy, one process.

Usage:
    python benchmarks/rollout_throughput.py                     # GPU: testbed shape, then Qwen2.5-1.5B shape
    python benchmarks/rollout_throughput.py --models testbed --device cpu --new 8 --batch 4 --mode default  # smoke

Variants are timed in interleaved rounds (median of ``--repeats``), and the compiled clean and noisy steps are
separate compilations (as in a real run, which is either noisy or clean). Greedy decoding (no sampling, so the global
RNG plays no part) of ``--new`` tokens after a ``--prompt``-token prefill,
with an HF ``StaticCache``. The compiled variant compiles one decode step with ``fullgraph=True`` (a graph break
raises) and ``mode="reduce-overhead"`` (CUDA graphs); the noisy variants run under a NoiseInjector in phase rollout
(relative Gaussian on the matmul family), so compiled noisy uses the engine's inline, graph-capturable noise. The
model is attached and the module hooks sit on it alone (``--hooks attached``, as in the trainer); ``--hooks
attached,global`` adds a compiled noisy variant with global hooks, which every compiled frame guards on.
``--draws engine,inductor,none`` adds compiled noisy variants whose fused draw is Inductor's own ``randn`` (one
Philox4x32-10 call and accurate math per element) or ones (a diagnostic: the noise's cost without the normals);
``--no-eager`` times the compiled variants only. It also checks that the compiled noisy rollout really is noisy:
realized noise on one linear inside a compiled, graph-replayed call, and that tokens differ from the clean rollout's.
"""
from __future__ import annotations

import statistics
import time
import types

import torch
import torch.nn.functional as F

from noisebench.noise import NoiseInjector, NoiseSpec, norms
from noisebench.noise.fast import inline

from common import (DRAWS, SHAPES, check_lists, decode_model, decode_step, device_name, interleave, one_rollout,
                    rollout_args)


def parse():
    p = rollout_args(__doc__.splitlines()[0], new=128, repeats=3,
                     repeats_help="timed rounds (one rollout per variant each; median)")
    p.add_argument("--models", default="testbed,qwen2.5-1.5b", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--hooks", default="attached",
                   help="comma list of NoiseInjector(hooks=...) settings, one compiled noisy variant each (the first "
                        f"is also eager noisy's; the trainer uses attached): {list(norms.HOOKS)}")
    p.add_argument("--no-eager", action="store_true", help="time the compiled variants only")
    p.add_argument("--draws", default="engine",
                   help="comma list of fused-draw variants, one compiled noisy variant each beyond the first: "
                        f"{list(DRAWS)} (engine: what the engine draws; inductor: Inductor's own tl.randn; none: a "
                        "diagnostic with the draw replaced by ones, so that the noise's other costs are timed without "
                        "the normals)")
    a = p.parse_args()
    check_lists(p, a, {"hooks": norms.HOOKS, "draws": DRAWS, "models": SHAPES})
    return a


def with_draw(step, name: str):
    """``step`` run with ``inline.draw`` set to the draw ``name`` (set before every call: Dynamo guards on it, and
    each variant's compiled step traced its own)."""
    def run(*args):
        inline.draw = DRAWS[name]
        try:
            return step(*args)
        finally:
            inline.draw = DRAWS["engine"]
    return run


def timed_interleaved(model, prompts, a, variants) -> dict:
    """label -> (median decode tokens/s, tokens). One warm-up rollout per variant (compilation, graph capture), then
    ``a.repeats`` rounds that time each variant once in turn."""
    def call(step, inj):
        t0 = time.perf_counter()
        toks, dt = one_rollout(model, prompts, a, step, inj)
        return toks, dt, time.perf_counter() - t0

    def report(r, label, res):   # partial figures survive a timeout
        print(f"  round {r}{' (warm-up)' if not r else ''} {label}: {res[2]:.1f} s, "
              f"{a.batch * (a.new - 1) / res[1]:.0f} tok/s", flush=True)
    res = interleave({k: lambda v=v: call(*v) for k, v in variants.items()}, a.repeats, warmup=1, report=report)
    return {k: (a.batch * (a.new - 1) / statistics.median_high(r[1] for r in v), v[-1][0]) for k, v in res.items()}


def fresh_compile(fn, a):
    """``torch.compile`` of a copy of ``fn`` with its own code object, so its Dynamo cache holds only the graphs its
    own variant traces: a rollout that runs only noisy (or only clean) never checks the other variant's guards."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{fresh_compile.n}")
    fresh_compile.n += 1
    clone = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return torch.compile(clone, fullgraph=True, mode=a.mode)


fresh_compile.n = 0


def noise_check(a) -> str:
    """Realized noise of a linear inside a compiled (``a.mode``) no-grad call, replayed three times."""
    x = torch.randn(256, 512, device=a.device)
    w = torch.randn(384, 512, device=a.device)
    ref = F.linear(x, w)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["rollout"]))
    f = torch.compile(lambda v: F.linear(v, w), fullgraph=True, mode=a.mode)
    with inj, torch.no_grad(), inj.phase("rollout"):
        ys = [f(x).clone() for _ in range(4)]
    rel = [((y - ref)[ref.abs() > 1] / ref[ref.abs() > 1]).std().item() for y in ys[1:]]
    d = [(y - ref).flatten() for y in ys[1:3]]
    corr = torch.corrcoef(torch.stack(d))[0, 1].item()
    return f"noise check (scale 1e-2, compiled {a.mode}): realized rel std {[round(r, 5) for r in rel]}, " \
           f"corr between replays {corr:+.3f}"


def main() -> None:
    a = parse()
    from torch._dynamo.utils import counters
    print(f"device={a.device} ({device_name(a.device)}) "
          f"torch={torch.__version__} batch={a.batch} prompt={a.prompt} new={a.new} scale={a.scale} mode={a.mode}")
    print(noise_check(a))
    for name in a.models.split(","):
        model, prompts = decode_model(name, a)
        spec = NoiseSpec(type="relative_gaussian", scale=a.scale, ops=["matmul_family"], phases=["rollout"])
        injs = {}
        for hooks in a.hooks.split(","):
            injs[hooks] = NoiseInjector(spec, hooks=hooks)
            injs[hooks].attach(model)
        torch._dynamo.reset()
        counters.clear()
        first = next(iter(injs))
        variants = {} if a.no_eager else {"eager clean": (decode_step, None),
                                          "eager noisy": (decode_step, injs[first])}
        variants["compiled clean"] = (fresh_compile(decode_step, a), None)
        for h, inj in injs.items():
            variants["compiled noisy" + ("" if h == first else f" ({h})")] = (fresh_compile(decode_step, a), inj)
        for d in [d for d in a.draws.split(",") if d != "engine"]:
            variants[f"compiled noisy [{d}]"] = (with_draw(fresh_compile(decode_step, a), d), injs[first])
        res = timed_interleaved(model, prompts, a, variants)
        skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
        same = {k: (res[k][1] == res["compiled clean"][1]).float().mean().item() for k in res}
        print(f"\n{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, graph breaks: none "
              f"(fullgraph), cudagraph skips: {skips}, recompiles/frames: {dict(counters['stats'])}")
        print(f"{'variant':<26} {'tokens/s':>10}  {'tokens equal to compiled clean':>30}")
        for k, (tps, _) in res.items():
            print(f"{k:<26} {tps:10.0f}  {same[k]:30.3f}")
        cc, cn = res["compiled clean"][0], res["compiled noisy"][0]
        print(f"compiled noisy (hooks {first}) / compiled clean = {cn / cc:.3f} (target >= 0.9)" +
              ("" if a.no_eager else f"; compiled noisy / eager noisy = {cn / res['eager noisy'][0]:.2f} (target >= 2)"))
        for k in res:
            if k.startswith("compiled noisy "):
                print(f"{k} / compiled clean = {res[k][0] / cc:.3f}")
        for inj in injs.values():
            inj.detach(model)
        del model


if __name__ == "__main__":
    main()
