"""Overhead of the noise engine on a Qwen2.5-1.5B-shaped HF Qwen2 decoder stack: clean vs noisy in one process.

Usage:
    python benchmarks/noise_overhead.py --cpu-small                 # tiny shapes, a quick CPU figure
    python benchmarks/noise_overhead.py --layers 4 --tokens 8192    # on a GPU: bf16, sdpa, 1.5B widths

For each noise model it times forward+backward (phases train_forward / train_backward) and forward-only
(phase rollout, no_grad), clean and noisy interleaved step by step, and prints median step times and their ratio.
``--paths`` (issue 7) repeats this for the reference path (``NOISEBENCH_FAST=off``), the fast path (fused Triton
kernel, CUDA) and the compiled stack (torch.compile fullgraph, fast path inside), each against its own clean twin;
``--cpu-rng`` picks the CPU normal generator of the GRPO-like step (``noisebench.noise.fast.table``); ``--grpo`` times
the embedded testbed's real GRPO step (TRL) with e4c against baseline, under the CPU generator in force
(``NOISEBENCH_CPU_RNG``, default icdf16).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2Model  # noqa: E402

from noisebench.noise import NoiseInjector, NoiseSpec  # noqa: E402
from noisebench.noise.fast import set_cpu_generator, set_mode  # noqa: E402
from noisebench.noise.fast.table import name as table_name  # noqa: E402

MODELS = ["relative_gaussian", "absolute_gaussian", "systematic_bias", "bitflip", "round"]


PATHS = ("reference", "fast", "compiled", "none")


def parse(extend=None, description: str = None, paths: tuple = PATHS) -> argparse.Namespace:
    """The workload's flags; ``extend(parser)`` adds a calling script's own, ``paths`` are its valid ``--paths``."""
    p = argparse.ArgumentParser(description=description or __doc__.splitlines()[0])
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
    p.add_argument("--models", default=",".join(MODELS), help="comma list of noise types")
    p.add_argument("--ops", default="matmul_family", help="comma list of ops / op sets")
    p.add_argument("--scale", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the stack (fullgraph); same as --paths compiled")
    p.add_argument("--paths", default=None, help="comma list of reference,fast,compiled (default: all three on CUDA, "
                   "reference on CPU)")
    p.add_argument("--intercept", default="patch", choices=["patch", "mode"],
                   help="NoiseInjector(intercept=...) on the eager paths (patch: what the trainer uses; compiled paths "
                        "always use the mode)")
    p.add_argument("--hooks", default="attached", choices=["attached", "global"],
                   help="NoiseInjector(hooks=...) (attached: what the trainer uses)")
    p.add_argument("--cpu-rng", default="icdf16", choices=["icdf16", "randn", "table", "all"],
                   help="CPU normal generator for the grpo-like step (icdf16: the default; randn: torch.randn; "
                        "table: opt-in shared noise table)")
    p.add_argument("--cpu-small", action="store_true", help="tiny CPU shapes: 2 layers, hidden 256, 512 tokens")
    p.add_argument("--grpo", action="store_true",
                   help="time the embedded testbed's real GRPO step (NoisyGRPOTrainer, conf/ defaults) with +exp=e4c "
                        "against +exp=baseline (issue 7 item 4); see --grpo-steps, --grpo-pairs")
    p.add_argument("--grpo-steps", type=int, default=7,
                   help="trainer steps per run (the first and the last, which saves a checkpoint, are not timed)")
    p.add_argument("--grpo-pairs", type=int, default=2, help="baseline/e4c run pairs, alternated")
    p.add_argument("--grpo-exp", default="e4c", help="the noisy experiment preset (conf/exp/)")
    p.add_argument("--grpo-like", action="store_true",
                   help="also time a GRPO-shaped step on the tiny testbed's model (hidden 128, 4 layers, vocab 492): "
                        "rollout generate 128 x 48 tokens (phase rollout) + train fwd+bwd on 128 x 112 tokens")
    a = p.parse_args()
    if a.cpu_small:
        a.device, a.layers, a.hidden, a.intermediate, a.heads, a.kv_heads = "cpu", 2, 256, 1024, 4, 2
        a.tokens, a.seq = a.tokens or 512, 256
    a.tokens = a.tokens or (8192 if a.device.startswith("cuda") else 1024)
    a.dtype = a.dtype or ("bf16" if a.device.startswith("cuda") else "fp32")
    if a.paths is None:
        gpu = a.device.startswith("cuda")
        a.paths = "compiled" if a.compile else ("reference,fast,compiled" if gpu else "reference")
    bad = [x for x in a.paths.split(",") if x not in paths]
    if bad:
        p.error(f"--paths: unknown {bad}; valid choices: {list(paths)}")
    return a


def build(a: argparse.Namespace) -> Qwen2Model:
    cfg = Qwen2Config(hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=1024,
                      max_position_embeddings=max(a.seq, 2048))
    cfg._attn_implementation = a.attn
    torch.manual_seed(0)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    return Qwen2Model(cfg).to(device=a.device, dtype=dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_steps(model, x, inj):
    """Closures for one fwd+bwd step and one forward-only step, noisy when ``inj`` is installed. The fwd+bwd step
    appends the host time at which its forward returned to ``marks`` when given (profile_noise_step.py)."""
    def train(marks: list = None):
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


def time_pair(fn, inj, a, blocks: int = 2) -> tuple:
    """Median seconds of ``fn`` clean and noisy: alternating blocks of steps (warm-ups untimed), the injector
    installed once per noisy block, so drift hits both alike and install costs stay outside the timed steps."""
    clean, noisy = [], []
    per_block = max(1, -(-a.steps // blocks))
    for _ in range(blocks):
        for installed, store in ((False, clean), (True, noisy)):
            if installed:
                inj.install()
            try:
                for i in range(a.warmup + per_block):
                    _sync(a.device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(a.device)
                    if i >= a.warmup:
                        store.append(time.perf_counter() - t0)
            finally:
                if installed:
                    inj.uninstall()
    return statistics.median(clean), statistics.median(noisy)


def grpo_like(a: argparse.Namespace) -> None:
    """A whole GRPO step without TRL's bookkeeping: rollout generation, then a policy-gradient fwd+bwd."""
    from transformers import Qwen2ForCausalLM
    cfg = Qwen2Config(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=492, tie_word_embeddings=True, max_position_embeddings=256)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    prompts = torch.randint(3, 492, (128, 64))
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

    from noisebench.train.rundirs import register_resolvers
    from noisebench.train.runner import run

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._t = [], None

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    register_resolvers()
    conf = Path(__file__).resolve().parents[1] / "conf"
    tmp = Path(tempfile.mkdtemp(prefix="nb_grpo_bench_"))
    times = {"baseline": [], a.grpo_exp: []}
    for pair in range(a.grpo_pairs):
        for exp in times:
            over = [f"+exp={exp}", f"trainer.max_steps={a.grpo_steps}", "logger=none", "device=cpu",
                    "eval.eval_every=100000", "eval.limit=8", f"results_dir={tmp}", f"seed={pair}",
                    f"leaderboard.out_dir={tmp / 'boards'}"]
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
    a = parse()
    paths = [p for p in a.paths.split(",") if p != "none"]   # "none": only the --grpo / --grpo-like tables
    model = build(a) if paths else None
    for path in paths:
        run_path(a, model, path)
    if a.grpo_like:
        grpo_like(a)
    if a.grpo:
        grpo(a)


if __name__ == "__main__":
    main()
