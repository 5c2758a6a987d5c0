"""What the benchmark scripts share: timing, the workloads they time, and their flags.

Each script imports this as ``common`` (``python benchmarks/<script>.py`` puts this folder first on the path), so no
script imports another. Timing is interleaved because the hosts these run on drift (clocks, other processes, a warm
or a cold machine): every variant runs once per round, in turn, a drift hits all alike, and each figure is a median.
Ratios are taken only against a clean variant timed in the same process: hosts differ too much between runs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Iterable, TypeVar

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # random-weight models only: never reach the hub
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")   # as the noisebench CLI runs torch (noisebench/cli.py)

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model, StaticCache  # noqa: E402

from noisebench.noise.fast import inline  # noqa: E402

T = TypeVar("T")

# --- devices and timing -------------------------------------------------------------------------------------------


def sync(device: str) -> None:
    """Wait for the device's queued work, so that host timers measure it (a no-op on CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


def interleave(variants: dict[str, Callable[[], T]], rounds: int, warmup: int = 0,
               report: Callable[[int, str, T], None] | None = None) -> dict[str, list[T]]:
    """label -> what its callable returned in each of ``rounds`` rounds, after ``warmup`` untimed rounds; each round
    calls every variant once, in turn. ``report(round, label, result)`` sees every call (warm-ups too), so that
    partial figures survive a timeout."""
    out: dict[str, list[T]] = {k: [] for k in variants}
    for r in range(warmup + rounds):
        for label, fn in variants.items():
            res = fn()
            if report is not None:
                report(r, label, res)
            if r >= warmup:
                out[label].append(res)
    return out


def timed_steps(fn: Callable[[], object], steps: int, warmup: int, device: str) -> list[float]:
    """Wall seconds of each of ``steps`` calls of ``fn`` after ``warmup`` untimed ones, the device synchronised
    around each."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def cuda_us(fn: Callable[[], object], reps: int = 50) -> float:
    """Median device microseconds of ``fn`` (CUDA events around each call; 3 untimed calls first)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def graph_us(fn: Callable[[], object], reps: int = 20, inner: int = 10) -> float:
    """Median device microseconds of one ``fn`` call without the host's launch work: ``inner`` calls captured in a
    CUDA graph, each replay timed by CUDA events (3 untimed calls first, on a side stream as capture wants)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(times)


# --- flags --------------------------------------------------------------------------------------------------------


def check_lists(p: argparse.ArgumentParser, a: argparse.Namespace, valid: dict[str, Iterable[str]]) -> None:
    """Every comma-list flag in ``valid`` (dest -> its choices) names only valid choices; else argparse's error,
    naming the flag and the choices, before any work."""
    for dest, choices in valid.items():
        bad = [v for v in getattr(a, dest).split(",") if v not in choices]
        if bad:
            p.error(f"--{dest.replace('_', '-')}: unknown {bad}; valid choices: {list(choices)}")


# --- the training-step workload: a Qwen2.5-1.5B-shaped decoder stack, fwd+bwd and forward-only -------------------

STEP_PATHS = ("reference", "fast", "compiled", "none")


def step_args(description: str, extend: Callable[[argparse.ArgumentParser], None] | None = None,
              paths: tuple = STEP_PATHS, lists: dict[str, Iterable[str]] | None = None) -> argparse.Namespace:
    """The training-step workload's flags, with defaults filled in per device; ``extend(parser)`` adds a script's
    own, ``paths`` are its valid ``--paths``, ``lists`` its other comma-list flags to check (dest -> choices)."""
    p = argparse.ArgumentParser(description=description)
    if extend is not None:
        extend(p)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=None, help="tokens per step (batch x seq); default 8192 GPU, 1024 CPU")
    p.add_argument("--seq", type=int, default=1024, help="sequence length (tokens are split into sequences of it)")
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=8960)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--ops", default="matmul_family", help="comma list of ops / op sets")
    p.add_argument("--scale", type=float, default=1e-3)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the stack (fullgraph); same as --paths compiled")
    p.add_argument("--paths", default=None, help=f"comma list of {list(paths)} (default: reference,fast,compiled on "
                   "CUDA, reference on CPU)")
    p.add_argument("--cpu-small", action="store_true", help="tiny CPU shapes: 2 layers, hidden 256, 512 tokens")
    a = p.parse_args()
    if a.cpu_small:
        a.device, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads = "cpu", 2, 256, 1024, 4, 2
        a.tokens, a.seq = a.tokens or 512, 256
    a.tokens = a.tokens or (8192 if a.device.startswith("cuda") else 1024)
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    if a.paths is None:
        gpu = a.device.startswith("cuda")
        a.paths = "compiled" if a.compile else ("reference,fast,compiled" if gpu else "reference")
    check_lists(p, a, {"paths": paths, **(lists or {})})
    return a


def decoder_stack(a: argparse.Namespace) -> Qwen2Model:
    """The stack ``step_args`` describes: HF Qwen2 layers, random weights (seed 0), no lm_head."""
    cfg = Qwen2Config(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=1024,
                      max_position_embeddings=max(a.seq, 2048))
    cfg._attn_implementation = a.attn
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    return Qwen2Model(cfg).to(device=a.device, dtype=dtype)


def make_steps(model, x, inj) -> dict:
    """Closures for one fwd+bwd step and one forward-only step, noisy when ``inj`` is installed. The fwd+bwd step
    appends the host time at which its forward returned to ``marks`` when given."""
    def train(marks: list | None = None):
        with inj.phase("train_forward"):
            out = model(inputs_embeds=x).last_hidden_state
        if marks is not None:
            marks.append(time.perf_counter())
        with inj.phase("train_backward"):
            out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    def forward():
        with torch.no_grad(), inj.phase("rollout"):
            model(inputs_embeds=x)
    return {"fwd+bwd": train, "fwd": forward}


# --- the rollout workload: greedy decoding with a static KV cache -------------------------------------------------

SHAPES = {  # the embedded testbed's tiny Qwen2 and Qwen2.5-1.5B
    "testbed": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=492),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
}


def _ones(seed, shape):
    return torch.ones(list(shape), device=seed.device, dtype=torch.float32)


def _inductor_randn(seed, shape):
    return torch.ops.prims.inductor_random(list(shape), seed, "randn")


# Compiled graphs' fused draw: the engine's; Inductor's own tl.randn (Philox4x32-10 and accurate math per element);
# ones (a diagnostic: the noise's other costs without the normals).
DRAWS = {"engine": inline.draw, "inductor": _inductor_randn, "none": _ones}


def rollout_args(description: str, new: int, repeats: int, repeats_help: str) -> argparse.ArgumentParser:
    """A parser with the rollout workload's flags (``new`` and ``repeats`` its defaults); the script adds its own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=new)
    p.add_argument("--scale", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    p.add_argument("--mode", default="reduce-overhead", help="torch.compile mode for the decode step")
    return p


def causal_lm(shape: str, device: str, dtype: torch.dtype, max_positions: int = 256) -> Qwen2ForCausalLM:
    """A ``SHAPES`` model with random weights (seed 0), tied embeddings, sdpa attention."""
    cfg = Qwen2Config(**SHAPES[shape], tie_word_embeddings=True, max_position_embeddings=max_positions)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def decode_model(shape: str, a: argparse.Namespace) -> tuple:
    """(model in eval mode, prompts): bf16 on GPU, float32 on CPU; ``a.batch`` random prompts of ``a.prompt``
    tokens (seed 1)."""
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = causal_lm(shape, a.device, dtype, max(256, a.prompt + a.new)).eval()
    prompts = torch.randint(3, model.config.vocab_size, (a.batch, a.prompt), device=a.device,
                            generator=torch.Generator(a.device).manual_seed(1))
    return model, prompts


def decode_step(model, tok, cache_position, cache):
    logits = model(input_ids=tok, cache_position=cache_position, past_key_values=cache, use_cache=True).logits
    return logits[:, -1].argmax(-1, keepdim=True)


def rollout(model, prompts, a, step, steps: int | None = None, ctx=None) -> tuple:
    """Prefill eagerly, then ``steps`` (default ``a.new - 1``) decode steps through ``step``, inside ``ctx`` when
    given (e.g. a profiler); returns (tokens, decode seconds). The cache always holds ``a.prompt + a.new`` tokens, so
    shorter rollouts reuse the compiled step."""
    cache = StaticCache(config=model.config, max_cache_len=a.prompt + a.new)
    with torch.no_grad():
        pos = torch.arange(a.prompt, device=a.device)
        logits = model(input_ids=prompts, cache_position=pos, past_key_values=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out = [tok]
        sync(a.device)
        with ctx if ctx is not None else contextlib.nullcontext():
            t0 = time.perf_counter()
            for i in range(a.new - 1 if steps is None else steps):
                cp = torch.tensor([a.prompt + i], device=a.device)
                tok = step(model, tok, cp, cache).clone()
                out.append(tok)
            sync(a.device)
            dt = time.perf_counter() - t0
    return torch.cat(out, 1), dt


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
