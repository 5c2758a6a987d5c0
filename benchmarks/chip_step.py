"""What a chip profile costs on the CPU: the default testbed's model (Qwen2, hidden 128, intermediate 384, 4 layers,
4 heads, 2 KV heads, vocabulary 512; random weights) generates ``--new`` tokens for ``--batch`` prompts, then one
forward+backward on the result, clean and under each conf/chip profile (``ChipMode``), timed in the same process in
interleaved rounds. Prints each profile's median seconds and its ratio to clean (issue 22: within x3).

    OMP_NUM_THREADS=1 python benchmarks/chip_step.py --rounds 3
    OMP_NUM_THREADS=1 python benchmarks/chip_step.py --profiles fp8_fast_accum --rounds 1 --profile-ops 25
    OMP_NUM_THREADS=1 python benchmarks/chip_step.py --floor
    OMP_NUM_THREADS=1 python benchmarks/chip_step.py --gemms --profiles gpu_bf16,fp8_fast_accum --batch 128 --prompt 96
    OMP_NUM_THREADS=1 python benchmarks/chip_step.py --profiles fp8_fast_accum --definition --rounds 1
    OMP_NUM_THREADS=1 python benchmarks/chip_step.py --profiles fp8_fast_accum --also acc_alignment=exact

The chip's CPU GEMMs take the compiled paths (``noise/fast/chip_cpu.py``, ``quantize_cpu.py``) unless the engine's
fast switch is off; ``--definition`` adds each profile again with it off (the torch definition), ``--also KEY=VALUE``
each profile with one key changed, timed in the same rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import common  # noqa: F401  (sets the offline environment before transformers loads)
import torch
import yaml
from transformers import Qwen2Config, Qwen2ForCausalLM

from noisebench.noise.chip import ChipMode, ChipProfile
from noisebench.noise.fast import dispatch

REPO = Path(__file__).resolve().parents[1]
TINY_SHARPEN = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True,
                    rope_theta=10000.0, rms_norm_eps=1e-6, use_sliding_window=False, hidden_act="silu")


# the clean step's matrix products (GEMMs and CPU attention), for --profile-ops' share of the step
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def raw(name: str) -> dict:
    return yaml.safe_load((REPO / "conf" / "chip" / f"{name}.yaml").read_text())


def profiles() -> dict:
    out = {}
    for p in sorted((REPO / "conf" / "chip").glob("*.yaml")):
        d = yaml.safe_load(p.read_text())
        if isinstance(d, dict) and "in_format" in d:
            out[p.stem] = ChipProfile.from_dict(d)
    return out


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--profiles", default="all", help="comma list of conf/chip names, or all")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt", type=int, default=40, help="prompt tokens")
    p.add_argument("--new", type=int, default=48, help="generated tokens")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--definition", action="store_true",
                   help="also time each profile with the engine's fast switch off (the torch definition)")
    p.add_argument("--also", action="append", default=[], metavar="KEY=VALUE",
                   help="also time each profile with this profile key set (YAML value), e.g. acc_alignment=exact")
    p.add_argument("--profile-ops", type=int, default=0,
                   help="instead of timing: torch.profiler's top N ops of one chip step per profile")
    p.add_argument("--floor", action="store_true",
                   help="instead: what exact chunk sums cost before any rounding (float64 chunk sums in one "
                        "batched matmul against the clean float32 GEMM) at the model's GEMM shapes")
    p.add_argument("--gemms", action="store_true",
                   help="instead: each profile's compiled chip GEMM (chip_cpu.accumulate on its codes) against the "
                        "clean float32 GEMM at the step's shapes: generation, forward and a weight gradient (K = the "
                        "step's tokens, A transposed as the backward passes it)")
    a = p.parse_args()
    known = profiles()
    a.names = list(known) if a.profiles == "all" else a.profiles.split(",")
    bad = [n for n in a.names if n not in known]
    if bad:
        p.error(f"--profiles: unknown {bad}; valid: {sorted(known)}")
    a.known = known
    a.changes = []
    for item in a.also:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--also: {item!r} is not KEY=VALUE")
        a.changes.append((key, yaml.safe_load(value)))
    return a


def step(model, prompts, a) -> float:
    """One generation of ``a.new`` tokens (greedy) and a forward+backward on the sequences; wall seconds."""
    t0 = time.perf_counter()
    with torch.no_grad():
        seq = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=a.new,
                             min_new_tokens=a.new, do_sample=False, pad_token_id=0)
    logits = model(seq).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def seconds(fn):
    def timed() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return timed


def floor(a, chunk: int = 32) -> None:
    """The chunk sums alone, exact (float64, as ``accumulate.accumulate`` keeps them): all chunks of a GEMM in one
    batched MKL call, [K/chunk, M, chunk] @ [K/chunk, chunk, N], against the clean float32 GEMM. A lower bound on
    any CPU path that keeps the definition's exact chunk sums in MKL, before the accumulator's rounding."""
    rows = (("generation", a.batch), ("fwd/bwd", a.batch * (a.prompt + a.new)))
    h, f, v = TINY_SHARPEN["hidden_size"], TINY_SHARPEN["intermediate_size"], TINY_SHARPEN["vocab_size"]
    shapes = {"q/o": (h, h), "gate/up": (h, f), "down": (f, h), "lm_head": (h, v)}
    print(f"{'rows':<16}{'GEMM':<9}{'K x N':<12}{'clean ms':>10}{'chunk sums ms':>15}{'x clean':>9}")
    for label, m in rows:
        for name, (k, n) in shapes.items():
            a32, b32 = torch.randn(m, k), torch.randn(k, n)
            a64 = a32.double().view(m, k // chunk, chunk).transpose(0, 1)
            b64 = b32.double().view(k // chunk, chunk, n)
            t = common.interleave({"clean": seconds(lambda: a32 @ b32), "sums": seconds(lambda: torch.bmm(a64, b64))},
                                  rounds=51, warmup=3)
            c, s = statistics.median(t["clean"]) * 1e3, statistics.median(t["sums"]) * 1e3
            print(f"{label + ' ' + str(m):<16}{name:<9}{f'{k} x {n}':<12}{c:>10.4f}{s:>15.4f}{s / c:>9.2f}")


def gemms(a) -> None:
    """ms a call and ns a product of ``chip_cpu.accumulate`` on codes of each profile's formats (unscaled: the
    scales' loops are the quantization's, timed in the step) against the clean float32 GEMM, median of 5."""
    import dataclasses

    from noisebench.noise.accumulate import quantize_codes
    from noisebench.noise.fast import chip_cpu

    tokens = a.batch * (a.prompt + a.new)
    h, f = TINY_SHARPEN["hidden_size"], TINY_SHARPEN["intermediate_size"]
    shapes = (("generation", a.batch, h, f), ("forward", tokens, h, f), ("forward", tokens, f, h),
              ("weight grad", h, tokens, f))
    print(f"{'profile':<18}{'GEMM':<13}{'M x K x N':<20}{'clean ms':>9}{'chip ms':>9}{'x clean':>9}{'ns/product':>12}")
    for name in a.names:
        arith = a.known[name].arith
        if arith.in_scaling in ("tensor", "block"):
            arith = dataclasses.replace(arith, in_scaling="none")
        for label, m, k, n in shapes:
            gen = torch.Generator().manual_seed(0)
            x, w = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen) * 0.05
            if label == "weight grad":                  # a^T as the backward passes it: a transposed view
                x = torch.randn(k, m, generator=gen).t()
            ca, ia = quantize_codes(x, arith, -1)
            cb, ib = quantize_codes(w, arith, -2)
            t = common.interleave({"clean": seconds(lambda: x @ w),
                                   "chip": seconds(lambda: chip_cpu.accumulate(ca, cb, arith, ia, ib))},
                                  rounds=5, warmup=1)
            c, g = statistics.median(t["clean"]) * 1e3, statistics.median(t["chip"]) * 1e3
            print(f"{name:<18}{label:<13}{f'{m} x {k} x {n}':<20}{c:>9.2f}{g:>9.2f}{g / c:>9.2f}"
                  f"{g * 1e6 / (m * k * n):>12.3f}")


def main() -> None:
    a = parse()
    torch.set_num_threads(a.threads)
    if a.floor:
        return floor(a)
    if a.gemms:
        return gemms(a)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY_SHARPEN))
    prompts = torch.randint(1, 512, (a.batch, a.prompt), generator=torch.Generator().manual_seed(1))

    def run(mode, fast: str = "auto"):
        def go():
            if mode is None:
                return step(model, prompts, a)
            dispatch.set_mode(fast)
            try:
                with mode:
                    return step(model, prompts, a)
            finally:
                dispatch.set_mode("auto")
        return go

    modes = {n: ChipMode(a.known[n]) for n in a.names}
    for key, value in a.changes:              # a profile with one key changed (ChipProfile checks the key)
        modes.update({f"{n} ({key}={value})": ChipMode(ChipProfile.from_dict({**raw(n), key: value}))
                      for n in a.names})
    if a.profile_ops:
        run(None)()
        with torch.profiler.profile() as prof:
            run(None)()
        ops = prof.key_averages()
        gemm = sum(e.self_cpu_time_total for e in ops if e.key in GEMM_OPS)
        print(f"== clean: GEMMs and attention {gemm / sum(e.self_cpu_time_total for e in ops):.0%} of the step's "
              f"self CPU time")
        for name, mode in modes.items():
            run(mode)()
            with torch.profiler.profile() as prof:
                run(mode)()
            print(f"== {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.profile_ops))
        return
    if a.warmup == 0:                         # the first clean step also pays the process's first-call costs
        print("note: --warmup 0 times each variant's first step; the clean one ran 4.9-5.5 s against 3.3-3.5 s "
              "warmed here, so ratios read ~1.5x low (docs/performance.md)")
    variants = {"clean": run(None), **{n: run(m) for n, m in modes.items()}}
    if a.definition:
        variants.update({f"{n} (definition)": run(m, "off") for n, m in modes.items()})
    times = common.interleave(variants, a.rounds, a.warmup,
                              report=lambda r, label, s: print(f"round {r} {label}: {s:.3f} s", flush=True))
    clean = statistics.median(times["clean"])
    print(f"\nbatch {a.batch}, prompt {a.prompt}, {a.new} new tokens + fwd/bwd, {a.threads} thread(s), "
          f"median of {a.rounds}")
    print(f"{'variant':<30}{'seconds':>9}{'x clean':>9}")
    for label, ts in times.items():
        med = statistics.median(ts)
        print(f"{label:<30}{med:>9.3f}{med / clean:>9.2f}")


if __name__ == "__main__":
    main()
