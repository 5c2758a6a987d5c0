"""Overhead of the noise engine on a Qwen2.5-1.5B-shaped HF Qwen2 decoder stack: clean vs noisy in one process.

Usage:
    python benchmarks/noise_overhead.py --cpu-small                 # tiny shapes, a quick CPU figure
    python benchmarks/noise_overhead.py --layers 4 --tokens 8192    # on a GPU: bf16, sdpa, 1.5B widths
    python benchmarks/noise_overhead.py --grpo --paths none         # CPU: the embedded testbed's real GRPO step

For each noise model it times forward+backward (phases train_forward / train_backward) and forward-only
(phase rollout, no_grad), clean and noisy in alternating blocks of steps, and prints median step times and their
ratio. ``--paths`` repeats this for the reference path (engine switch ``fast=off``), the fast path (fused Triton
kernel, CUDA) and the compiled stack (torch.compile fullgraph, fast path inside), each against its own clean twin;
``--grpo`` times the embedded testbed's real GRPO step (TRL) with e4c against baseline; ``--cpu-rng`` picks the CPU
normal generator of both (``engine.cpu_rng``; the GRPO-like step can also run ``all`` in turn).
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from noisebench.noise import NoiseInjector, NoiseSpec
from noisebench.noise.fast import set_cpu_generator, set_mode
from noisebench.noise.fast.table import name as table_name

from common import causal_lm, decoder_stack, interleave, make_steps, step_args, timed_steps

MODELS = ["relative_gaussian", "absolute_gaussian", "systematic_bias", "bitflip", "round"]


def _own_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default=",".join(MODELS), help="comma list of noise types")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--intercept", default="patch", choices=["patch", "mode"],
                   help="NoiseInjector(intercept=...) on the eager paths (patch: what the trainer uses; compiled paths "
                        "always use the mode)")
    p.add_argument("--hooks", default="attached", choices=["attached", "global"],
                   help="NoiseInjector(hooks=...) (attached: what the trainer uses)")
    p.add_argument("--cpu-rng", default="icdf16", choices=["icdf16", "randn", "table", "all"],
                   help="CPU normal generator (engine.cpu_rng) for the grpo-like step and the --grpo runs (icdf16: "
                        "the default; randn: torch.randn; table: opt-in shared noise table; all: each in turn, "
                        "grpo-like step only)")
    p.add_argument("--grpo", action="store_true",
                   help="time the embedded testbed's real GRPO step (NoisyGRPOTrainer, conf/ defaults) with +exp=e4c "
                        "against +exp=baseline; see --grpo-steps, --grpo-pairs")
    p.add_argument("--grpo-steps", type=int, default=7,
                   help="trainer steps per run (the first and the last, which saves a checkpoint, are not timed)")
    p.add_argument("--grpo-pairs", type=int, default=2, help="baseline/e4c run pairs, alternated")
    p.add_argument("--grpo-exp", default="e4c", help="the noisy experiment preset (conf/exp/)")
    p.add_argument("--grpo-like", action="store_true",
                   help="also time a GRPO-shaped step on the tiny testbed's model (hidden 128, 4 layers, vocab 492): "
                        "rollout generate 128 x 48 tokens (phase rollout) + train fwd+bwd on 128 x 112 tokens")


def time_pair(fn, inj, a, blocks: int = 2) -> tuple:
    """Median seconds of ``fn`` clean and noisy: alternating blocks of steps (warm-ups untimed), the injector
    installed once per noisy block, so drift hits both alike and install costs stay outside the timed steps."""
    per_block = max(1, -(-a.steps // blocks))

    def noisy():
        inj.install()
        try:
            return timed_steps(fn, per_block, a.warmup, a.device)
        finally:
            inj.uninstall()
    res = interleave({"clean": lambda: timed_steps(fn, per_block, a.warmup, a.device), "noisy": noisy}, blocks)
    return tuple(statistics.median(itertools.chain.from_iterable(res[k])) for k in ("clean", "noisy"))


def grpo_like(a: argparse.Namespace) -> None:
    """A whole GRPO step without TRL's bookkeeping: rollout generation, then a policy-gradient fwd+bwd."""
    model = causal_lm("testbed", "cpu", torch.float32)
    prompts = torch.randint(3, model.config.vocab_size, (128, 64))
    gen_kw = dict(max_new_tokens=48, min_new_tokens=48, do_sample=True, pad_token_id=0, eos_token_id=None)

    def step(inj):
        with torch.no_grad(), inj.phase("rollout"):
            seqs = model.generate(prompts, **gen_kw)
        with inj.phase("train_forward"):
            logp = model(input_ids=seqs).logits[:, 63:-1].float().log_softmax(-1)
            loss = -logp.gather(-1, seqs[:, 64:, None]).mean()
        with inj.phase("train_backward"):
            loss.backward()
        model.zero_grad(set_to_none=True)

    print("grpo-like step (tiny testbed shapes, 128 sequences, 48 new tokens), fp32 cpu:")
    default = table_name()
    for rng in (["icdf16", "randn", "table"] if a.cpu_rng == "all" else [a.cpu_rng]):
        set_cpu_generator(rng)
        for kind in a.models.split(","):
            scale = {"bitflip": 1e-4, "round": 0.0}.get(kind, a.scale)
            inj = NoiseInjector(NoiseSpec(type=kind, scale=scale, ops=a.ops.split(","), phases=["all"]))
            inj.attach(model)
            c, n = time_pair(lambda: step(inj), inj,
                             argparse.Namespace(device="cpu", warmup=1, steps=max(3, a.steps // 3)))
            print(f"{kind:<18} {'step':<8} {c * 1e3:9.1f} {n * 1e3:9.1f} {n / c:6.2f}  cpu-rng={rng}")
            inj.detach(model)
    set_cpu_generator(default)


def grpo(a: argparse.Namespace) -> None:
    """The embedded testbed's GRPO step, whole (TRL's generate, reward, reference and policy passes, optimizer):
    ``noisebench +exp=<noisy>`` against ``+exp=baseline``, alternated run by run, per-step wall times from a
    trainer callback. Uses the warm-start cache (built on first use, ~2-3 min on 2 cores)."""
    import tempfile
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from transformers import TrainerCallback

    from noisebench.resources import resource_dir
    from noisebench.schema import register
    from noisebench.train.rundirs import register_resolvers
    from noisebench.train.runner import run

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    if a.cpu_rng == "all":
        raise SystemExit("--grpo: --cpu-rng all is for --grpo-like only; pick one of icdf16, randn, table")
    register_resolvers()
    register()   # the schemas conf/ names in its defaults lists
    conf = resource_dir("conf")
    tmp = Path(tempfile.mkdtemp(prefix="nb_grpo_bench_"))
    times = {"baseline": [], a.grpo_exp: []}
    for pair in range(a.grpo_pairs):
        for exp in times:
            over = [f"+exp={exp}", f"trainer.max_steps={a.grpo_steps}", "logger=none", "device=cpu",
                    "eval.eval_every=100000", "eval.limit=8", f"results_dir={tmp}", f"seed={pair}",
                    f"leaderboard.out_dir={tmp / 'boards'}", f"engine.cpu_rng={a.cpu_rng}"]
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                cfg = compose(config_name="config", overrides=over)
            timer = StepTimer()
            rec = run(cfg, tmp / f"{exp}-{pair}", callbacks=[timer])
            times[exp] += timer.times[1:-1]   # first: warm-up; last: also saves the checkpoint
            print(f"  run {exp} seed {pair}: status {rec['status']}, step s {[round(t, 2) for t in timer.times]}",
                  flush=True)
    c, n = statistics.median(times["baseline"]), statistics.median(times[a.grpo_exp])
    print(f"GRPO step, embedded testbed (conf defaults: {torch.get_num_threads()} threads, torch {torch.__version__}):"
          f" baseline {c:.2f} s, {a.grpo_exp} {n:.2f} s, ratio x{n / c:.2f} (median of {len(times['baseline'])} "
          f"steps each; target <= x1.5)")


def run_path(a: argparse.Namespace, model, path: str) -> None:
    """One table: every noise model, fwd+bwd and fwd, clean vs noisy, on the reference, fast or compiled path."""
    set_mode("off" if path == "reference" else "auto")
    torch._dynamo.reset()
    runner = torch.compile(model, fullgraph=True) if path == "compiled" else model
    intercept = "mode" if path == "compiled" else a.intercept
    batch = max(1, a.tokens // a.seq)
    x = torch.randn(batch, a.tokens // batch, a.hidden, device=a.device, dtype=next(model.parameters()).dtype,
                    requires_grad=False)
    print(f"\n[path={path}] device={a.device} dtype={a.dtype} layers={a.layers} hidden={a.hidden} "
          f"intermediate={a.intermediate} tokens={batch}x{a.tokens // batch} attn={a.attn} ops={a.ops} "
          f"scale={a.scale} intercept={intercept} hooks={a.hooks} threads={torch.get_num_threads()} "
          f"torch={torch.__version__}"
          + (f" gpu={torch.cuda.get_device_name()}" if a.device.startswith("cuda") else ""))
    print(f"{'model':<18} {'mode':<8} {'clean ms':>9} {'noisy ms':>9} {'ratio':>6}")
    off = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=a.scale, ops=["all"], phases=["eval"]),
                        hooks=a.hooks, intercept=intercept)
    off.attach(model)   # installed, every op covered, but no phase of the step enabled: the "off" cost
    c, n = time_pair(make_steps(runner, x, off)["fwd+bwd"], off, a)
    print(f"{'installed, off':<18} {'fwd+bwd':<8} {c * 1e3:9.2f} {n * 1e3:9.2f} {n / c:6.2f}")
    off.detach(model)
    for kind in a.models.split(","):
        scale = {"bitflip": 1e-4, "round": 0.0}.get(kind, a.scale)
        spec = NoiseSpec(type=kind, scale=scale, ops=a.ops.split(","), phases=["all"], telemetry_rate=1 / 16)
        inj = NoiseInjector(spec, hooks=a.hooks, intercept=intercept)
        inj.attach(model)
        for mode, fn in make_steps(runner, x, inj).items():
            try:
                c, n = time_pair(fn, inj, a)
                print(f"{kind:<18} {mode:<8} {c * 1e3:9.2f} {n * 1e3:9.2f} {n / c:6.2f}")
            except Exception as err:  # e.g. a model the compiled path cannot trace: say so, keep the table going
                inj.uninstall()
                print(f"{kind:<18} {mode:<8} failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
        inj.detach(model)
    set_mode("auto")


def main() -> None:
    a = step_args(__doc__.splitlines()[0], _own_flags)
    paths = [p for p in a.paths.split(",") if p != "none"]   # "none": only the --grpo / --grpo-like tables
    model = decoder_stack(a) if paths else None
    for path in paths:
        run_path(a, model, path)
    if a.grpo_like:
        grpo_like(a)
    if a.grpo:
        grpo(a)


if __name__ == "__main__":
    main()
