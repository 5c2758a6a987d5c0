"""``dry_run=true``: compose everything, check the model and data are reachable, print the plan, train nothing.

Exits with one clear message (no traceback) when something is missing, so a user on a cluster learns in seconds,
not after a queue wait, that the hub is offline, a local path is wrong or the batch does not split over the GPUs.
Run it under the same launcher as the real run (``accelerate launch ... -m noisebench.cli ... dry_run=true``) to
see the plan per rank; nothing here initialises CUDA contexts beyond counting devices or loads any weights.
"""
from __future__ import annotations

import importlib.util
import sys

from omegaconf import DictConfig, OmegaConf

from noisebench.train.builders import noise_spec, per_device_batch, slow_chip_note
from noisebench.train.distributed import rank, sharding_problem, strategy, world_size


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- a dry run must not die on a broken CUDA install
        return 0


def _model_source(tb: DictConfig) -> str:
    if tb.get("kind") != "hf":
        return f"built in code ({tb.get('kind')})"
    if OmegaConf.select(tb, "model_init", default="pretrained") == "random":
        return "random init, Qwen2.5-1.5B architecture (testbed.model_init=random)"
    return f"local folder {tb.model_path}" if tb.get("model_path") else f"hub {tb.get('model_id')}"


def _data_source(tb: DictConfig) -> str:
    data = tb.get("data") or {}
    if tb.get("kind") != "hf":
        return "generated (synthetic)"
    if data.get("data_files"):
        return f"files {OmegaConf.to_container(data.data_files)}"
    if data.get("data_dir"):
        return f"folder {data.data_dir}"
    return f"hub {data.get('hub_id')} ({data.get('hub_config')})"


def _rollout_lines(cfg: DictConfig, spec) -> list[str]:
    from noisebench.train import vllm

    if not vllm.use_vllm(cfg):
        return ["rollout engine  transformers generate (in the trainer process, noised by the run's injector)"]
    mode = vllm.vllm_mode(cfg)
    eager = "eager (no CUDA graphs, no torch.compile)" if vllm.enforce_eager(cfg) else "CUDA graphs + torch.compile"
    lines = [f"rollout engine  vLLM {mode}, {eager}"]
    if mode == "colocate":
        util = OmegaConf.select(cfg, "trainer.args.vllm_gpu_memory_utilization", default=None)
        lines.append(f"                in the trainer process (gpu_memory_utilization {util}); rollout noise from the "
                     f"run's injector, vLLM's plugin kept inert here")
    else:
        model = cfg.testbed.get("model_path") or cfg.testbed.get("model_id") or "MODEL_FOLDER"
        lines.append("                start the server on other GPUs first (rollout noise via the plugin):")
        lines.append("                  " + vllm.server_command(cfg, spec, model))
    return lines


def _names(values) -> list[str]:
    return [str(getattr(v, "value", v)) for v in values]   # enum members of the structured config as their names


def _chip_lines(cfg: DictConfig) -> list[str]:
    chip = cfg.get("chip")
    if chip is None:
        return ["chip            none (torch's arithmetic)"]
    from noisebench.noise.chip import ChipProfile

    prof = ChipProfile.from_dict(OmegaConf.to_container(chip, resolve=True))   # the engine's reading, defaults too
    a = prof.arith
    promoted = f"promoted every {a.promote_every}" if a.promote_every else "never promoted"
    lines = [f"chip            {prof.name}: {a.in_format} inputs ({a.in_scaling} scales), chunk {a.chunk}, "
             f"{a.acc_mantissa_bits}-bit {a.acc_rounding} accumulator, {promoted}, {a.acc_alignment} alignment; "
             f"phases {_names(prof.phases)}"]
    device = str(cfg.device) if str(cfg.device) != "auto" else ("cuda" if _gpus() else "cpu")
    note = slow_chip_note(cfg, device)
    return lines + ([f"                warning: {note}"] if note else [])


def plan_lines(cfg: DictConfig, spec=None) -> list[str]:
    t, e, tb = cfg.trainer, cfg.eval, cfg.testbed
    world = world_size()
    steps = int(t.max_steps)
    every = int(e.eval_every)
    evals = sorted({0, *range(every, steps + 1, every), steps})
    n = cfg.noise
    ga = int(OmegaConf.select(t, "args.gradient_accumulation_steps", default=1) or 1)
    try:
        micro = f"{per_device_batch(cfg)} completions per device per micro-step x {world} process(es) x {ga} " \
                f"accumulation step(s)"
    except ValueError as exc:
        micro = f"does not split: {exc}"
    seed = f"noise seed {spec.seed} mixed with RANK={rank()} (each rank draws its own stream)" if spec else "-"
    lines = [
        f"experiment      {cfg.experiment} (seed {cfg.seed})",
        f"testbed         {tb.name}: model {_model_source(tb)}; data {_data_source(tb)}; eval task {tb.eval_task}",
        f"noise           {_names([n.type])[0]} scale {n.scale} ops {_names(n.ops)} phases {_names(n.phases)}; {seed}",
        *_chip_lines(cfg),
        f"aqn             {'on' if cfg.aqn.enabled else 'off'}",
        f"steps           {steps} x {t.prompts_per_step} prompts x {t.num_generations} generations "
        f"= {int(t.prompts_per_step) * int(t.num_generations)} completions a step; "
        f"{tb.max_prompt_length}+{tb.max_completion_length} tokens",
        f"batch           {micro}",
        f"processes       {world} (WORLD_SIZE), {strategy()}; GPUs visible here: {_gpus()}; device={cfg.device}",
        *_rollout_lines(cfg, spec),
        f"eval schedule   steps {evals} (every {every}); limit {e.limit}; backend {e.backend}; clean_too "
        f"{e.clean_too}; on rank 0",
        f"results         {cfg.results_dir}/{tb.name}/{cfg.experiment}/",
    ]
    return lines


def problems(cfg: DictConfig, spec) -> list[str]:
    """Everything that would stop the run, found without loading weights."""
    from noisebench.testbeds import check_reachable
    from noisebench.train import vllm

    out = []
    try:
        per_device_batch(cfg)
    except ValueError as exc:
        out.append(str(exc))
    if vllm.use_vllm(cfg):
        try:
            vllm.vllm_mode(cfg)
            vllm.check_eager(cfg, spec)
        except ValueError as exc:
            out.append(str(exc))
        if importlib.util.find_spec("vllm") is None:
            out.append("trainer.args.use_vllm=true but vLLM is not installed: `pip install noisebench[vllm]` "
                       "(or set trainer.args.use_vllm=false for transformers generate)")
    problem = sharding_problem()
    if problem:
        out.append(problem)
    out += list(check_reachable(cfg.testbed))
    return out


def dry_run(cfg: DictConfig) -> None:
    spec, found = None, []
    try:
        spec = noise_spec(cfg)
    except ValueError as exc:
        found.append(f"noise spec: {exc}")
    found += problems(cfg, spec)
    print("noisebench dry run -- nothing will be trained")
    for line in plan_lines(cfg, spec):
        print("  " + line)
    if found:
        print(f"NOT READY ({len(found)} problem{'s' if len(found) > 1 else ''}):\n"
              + "\n".join(f"  - {p}" for p in found), file=sys.stderr)
        sys.exit(2)
    print("ready: model, data and config check out")
