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
``--draws engine,inductor,none`` adds compiled noisy variants whose fused draw is Inductor's own ``randn`` (the
engine's draw before version 30) or ones (a diagnostic: the noise's cost without the normals); ``--no-eager`` times
the compiled variants only. It also checks that the compiled noisy rollout really is noisy: realized noise on one
linear inside a compiled, graph-replayed call, and that tokens differ from the clean rollout's.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, StaticCache  # noqa: E402

from noisebench.noise import NoiseInjector, NoiseSpec, norms  # noqa: E402
from noisebench.noise.fast import inline  # noqa: E402

SHAPES = {  # the embedded testbed's tiny Qwen2 (noise_overhead.py --grpo-like) and Qwen2.5-1.5B
    "testbed": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=492),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="testbed,qwen2.5-1.5b", help=f"comma list of {list(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--scale", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one rollout per variant each; median)")
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for the decode step")
    p.add_argument("--hooks", default="attached",
                   help="comma list of NoiseInjector(hooks=...) settings, one compiled noisy variant each (the first "
                        f"is also eager noisy's; the trainer uses attached): {list(norms.HOOKS)}")
    p.add_argument("--no-eager", action="store_true", help="time the compiled variants only")
    p.add_argument("--draws", default="engine",
                   help="comma list of fused-draw variants, one compiled noisy variant each beyond the first: "
                        f"{list(DRAWS)} (engine: what the engine draws; inductor: Inductor's own tl.randn, the "
                        "engine's draw before version 30; none: a diagnostic with the draw replaced by ones, so that "
                        "the noise's other costs are timed without the normals)")
    a = p.parse_args()
    for key, val, valid in (("--hooks", a.hooks, norms.HOOKS), ("--draws", a.draws, DRAWS)):
        bad = [v for v in val.split(",") if v not in valid]
        if bad:
            p.error(f"{key}: unknown {bad}; valid choices: {list(valid)}")
    bad = [m for m in a.models.split(",") if m not in SHAPES]
    if bad:
        p.error(f"--models: unknown {bad}; valid choices: {list(SHAPES)}")
    return a


def _ones(seed, shape):
    return torch.ones(list(shape), device=seed.device, dtype=torch.float32)


def _inductor_randn(seed, shape):
    return torch.ops.prims.inductor_random(list(shape), seed, "randn")


DRAWS = {"engine": inline.draw, "inductor": _inductor_randn, "none": _ones}


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


def build(name: str, a) -> Qwen2ForCausalLM:
    cfg = Qwen2Config(**SHAPES[name], tie_word_embeddings=True, max_position_embeddings=max(256, a.prompt + a.new))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    return Qwen2ForCausalLM(cfg).to(device=a.device, dtype=dtype).eval()


def rollout(model, prompts, a, step, steps: int = None, ctx=None) -> tuple:
    """Prefill eagerly, then ``steps`` (default ``a.new - 1``) decode steps through ``step``, inside ``ctx`` when
    given (e.g. a profiler); returns (tokens, decode seconds). The cache always holds ``a.prompt + a.new`` tokens, so
    shorter rollouts reuse the compiled step."""
    cache = StaticCache(config=model.config, max_cache_len=a.prompt + a.new)
    with torch.no_grad():
        pos = torch.arange(a.prompt, device=a.device)
        logits = model(input_ids=prompts, cache_position=pos, past_key_values=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out = [tok]
        _sync(a.device)
        with ctx if ctx is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            for i in range(a.new - 1 if steps is None else steps):
                cp = torch.tensor([a.prompt + i], device=a.device)
                tok = step(model, tok, cp, cache).clone()
                out.append(tok)
            _sync(a.device)
            dt = time.perf_counter() - t0
    return torch.cat(out, 1), dt


def decode_step(model, tok, cache_position, cache):
    logits = model(input_ids=tok, cache_position=cache_position, past_key_values=cache, use_cache=True).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_rollout(model, prompts, a, step, inj, **kw) -> tuple:
    """One rollout (tokens, decode seconds), under ``inj`` in phase rollout when given (installed for it only);
    ``kw`` as ``rollout``'s."""
    if inj is not None:
        inj.install()
        inj.set_phase("rollout")
    try:
        return rollout(model, prompts, a, step, **kw)
    finally:
        if inj is not None:
            inj.set_phase(None)
            inj.uninstall()


def timed_interleaved(model, prompts, a, variants) -> dict:
    """label -> (median decode tokens/s, tokens). One warm-up rollout per variant (compilation, graph capture), then
    ``a.repeats`` rounds that time each variant once in turn: a drift of the machine over the run (clocks, other
    processes) hits every variant alike instead of whichever happened to run last."""
    times, toks = {k: [] for k in variants}, {}
    for r in range(a.repeats + 1):
        for label, (step, inj) in variants.items():
            t0 = time.perf_counter()
            toks[label], dt = one_rollout(model, prompts, a, step, inj)
            if r:
                times[label].append(dt)
            print(f"  round {r}{' (warm-up)' if not r else ''} {label}: {time.perf_counter() - t0:.1f} s, "
                  f"{a.batch * (a.new - 1) / dt:.0f} tok/s", flush=True)   # partial figures survive a timeout
    return {k: (a.batch * (a.new - 1) / sorted(v)[len(v) // 2], toks[k]) for k, v in times.items()}


def fresh_compile(fn, a):
    """``torch.compile`` of a copy of ``fn`` with its own code object, so its Dynamo cache holds only the graphs its
    own variant traces: a rollout that runs only noisy (or only clean) never checks the other variant's guards."""
    import types
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
    print(f"device={a.device} ({torch.cuda.get_device_name() if a.device.startswith('cuda') else 'cpu'}) "
          f"torch={torch.__version__} batch={a.batch} prompt={a.prompt} new={a.new} scale={a.scale} mode={a.mode}")
    print(noise_check(a))
    for name in a.models.split(","):
        model = build(name, a)
        prompts = torch.randint(3, model.config.vocab_size, (a.batch, a.prompt), device=a.device,
                                generator=torch.Generator(a.device).manual_seed(1))
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
