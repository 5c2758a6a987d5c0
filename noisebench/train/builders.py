"""The pieces one run is made of, each built from the composed config: device, noise spec, injector choice, TRL's
GRPOConfig and trainer, and the checkpoint evaluator. The runner chains them; the dry run and ``noisebench-eval``
build the same pieces, so the three agree on what a config means.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from noisebench.train import mitigation
from noisebench.train.distributed import world_size


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r} is not one of ['auto', 'cpu', 'cuda']")
    return name


def noise_spec(cfg: DictConfig):
    """The validated NoiseSpec of this run; its seed is offset by the run seed (rank offset: inside the engine)."""
    from noisebench.noise import NoiseSpec

    d = OmegaConf.to_container(cfg.noise, resolve=True)
    d["seed"] = int(d.get("seed", 0)) + 1000 * int(cfg.seed)
    spec = NoiseSpec.from_dict(d)
    spec.validate()
    return spec


def make_injector(cfg: DictConfig, spec):
    """The run's noise injector, inert until entered; the engine switches (``engine`` group) applied first, hooks and
    interception chosen for what the run executes (``engine.intercept`` null: the runner's choice)."""
    from omegaconf import OmegaConf

    from noisebench.noise import NoiseInjector, configure_engine

    engine = OmegaConf.to_container(cfg.get("engine") or {}, resolve=True, enum_to_str=True)
    intercept = engine.pop("intercept", None)
    configure_engine(**{k: v for k, v in engine.items() if v is not None})
    return NoiseInjector(spec, hooks=injector_hooks(cfg), intercept=intercept or injector_intercept(cfg))


def make_aqn(cfg: DictConfig):
    """QeRL's adaptive quantization noise on the RMSNorm weights in rollout, or None when ``aqn.enabled`` is off."""
    from noisebench.train.aqn import AQN, AQNConfig

    aqn_cfg = AQNConfig(**OmegaConf.to_container(cfg.aqn, resolve=True))
    return AQN(aqn_cfg) if aqn_cfg.enabled else None


def make_chip(cfg: DictConfig):
    """The run's chip profile (conf/chip) as a mode to enter outside the injector, so noise acts on the chip's
    outputs; a null context with ``chip=none``. Built (and so validated) before any work."""
    import contextlib

    if cfg.get("chip") is None:
        return contextlib.nullcontext()
    from noisebench.noise.chip import ChipMode, ChipProfile
    return ChipMode(ChipProfile.from_dict(OmegaConf.to_container(cfg.chip, resolve=True)), seed=int(cfg.seed))


def slow_chip_note(cfg: DictConfig, device: str, capability: tuple | None = None) -> str | None:
    """A warning before a run whose chip profile will be very slow where it runs, else None: an aligning adder on
    the CPU (every product formed and cut, no BLAS), or the exact FP8 adder on a GPU other than sm_90 (the
    tensor-core path needs the GPU whose adder was measured; elsewhere the definition runs in torch ops).
    ``capability``: the GPU's (major, minor), read from torch when None."""
    chip = cfg.get("chip")
    aligning = ("max_exponent", "max_exponent_unnormalized")
    if chip is None or chip.get("acc_alignment") not in aligning:
        return None
    head = (f"chip {chip.get('name')} uses an aligning adder (acc_alignment={chip.get('acc_alignment')}), which "
            f"cuts every product: ")
    if device == "cpu":
        return (head + "on the CPU a training step costs ~x7-x9.5 of clean with its compiled loops (~x135 in torch "
                "ops, without numba or with engine.fast=off; docs/chips.md, Speed). Run it on a GPU, or add "
                "chip.acc_alignment=exact for a coarser emulation (exact chunk sums, ~x3-x3.7 as gpu_bf16's)")
    if chip.get("acc_alignment") != "max_exponent_unnormalized":
        return None                        # the Triton kernel computes the fitted adder on any CUDA GPU
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability == (9, 0):
        return None                        # the FP8 tensor core, once chip.native_verified has checked it
    return (head + f"on this GPU (compute capability {capability}) it runs as the definition in torch ops, far "
            "slower than the tensor-core path that sm_90 (H100/H200, whose adder was measured) takes. "
            "chip.acc_alignment=max_exponent runs the fitted adder in the Triton kernel")


def injector_hooks(cfg: DictConfig) -> str:
    """Where the run's injector puts its module hooks: on the attached models alone (the trainer attaches policy and
    reference model, the evaluator each checkpoint it loads), so every other module call skips torch's hook path and
    compiled frames its guards (issue 7); globally when vLLM runs colocated, since its model runs under this injector
    and is never attached."""
    return "global" if _vllm_colocated(cfg) else "attached"


def _vllm_colocated(cfg: DictConfig) -> bool:
    """vLLM generates the rollouts in this process, under the run's injector (its model is never attached)."""
    from noisebench.train import vllm

    return vllm.use_vllm(cfg) and vllm.vllm_mode(cfg) == "colocate"


def injector_intercept(cfg: DictConfig) -> str:
    """How the run's injector catches covered calls: by patching the covered spellings (``patch``: only those calls
    run Python, issue 7; bitwise the mode's draws), unless something may compile under it or run code that bound
    torch functions at import: colocated vLLM, ``trainer.args.torch_compile``, or a static generation cache (which
    transformers compiles). Then the TorchFunctionMode (``mode``). A compilation under ``patch`` raises, never runs
    unnoised."""
    args = cfg.trainer.get("args") or {}
    gen = args.get("generation_kwargs") or {}
    compiles = bool(args.get("torch_compile", False)) or str(gen.get("cache_implementation", "")) == "static"
    return "mode" if compiles or _vllm_colocated(cfg) else "patch"


def per_device_batch(cfg: DictConfig) -> int:
    """Completions per device per micro-step, so that one optimizer step sees ``prompts_per_step`` prompts in all:
    TRL's generation batch is per_device x world x gradient_accumulation_steps (steps_per_generation)."""
    t = cfg.trainer
    completions = int(t.prompts_per_step) * int(t.num_generations)
    ga = int(OmegaConf.select(t, "args.gradient_accumulation_steps", default=1) or 1)
    if completions % (world_size() * ga):
        raise ValueError(f"trainer.prompts_per_step x trainer.num_generations = {completions} completions a step do "
                         f"not split over WORLD_SIZE={world_size()} x trainer.args.gradient_accumulation_steps={ga}; "
                         f"choose values whose product divides {completions}")
    return completions // (world_size() * ga)


def grpo_config(cfg: DictConfig, tb, run_dir: Path, device: str):
    from trl import GRPOConfig

    t = cfg.trainer
    args = OmegaConf.to_container(t.args, resolve=True)
    if device == "cpu":
        args["use_cpu"] = True
    args.update(mitigation.grpo_args(mitigation.of_config(cfg), bool(args.get("use_vllm"))))  # the group decides
    return GRPOConfig(
        output_dir=str(run_dir / "checkpoints"),
        max_steps=int(t.max_steps),
        per_device_train_batch_size=per_device_batch(cfg),
        num_generations=int(t.num_generations),
        max_completion_length=int(tb.max_completion_length),
        save_strategy="steps",
        save_steps=int(cfg.eval.eval_every),
        save_total_limit=int(t.save_total_limit),
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        **args,
    )


def make_trainer(cfg: DictConfig, tb, spec, injector, aqn, callbacks: list, run_dir: Path, device: str):
    """TRL's GRPOTrainer (noisebench's phase-bounding subclass) on the testbed, rewarded by the strict GSM8K check."""
    from transformers.trainer_callback import PrinterCallback

    from noisebench.scoring import gsm8k_reward
    from noisebench.train.trainer import NoisyGRPOTrainer
    from noisebench.train.vllm import vllm_rollouts

    if not tb.model.config._name_or_path:  # built in memory (model_init=random): TRL loads the reference model
        tb.model.config._name_or_path = tb.model.name_or_path = str(tb.model_path)  # (and vLLM its config) from here
    with vllm_rollouts(cfg, spec, tb.model_path):  # no-op unless trainer.args.use_vllm
        trainer = NoisyGRPOTrainer(
            model=tb.model, reward_funcs=gsm8k_reward, args=grpo_config(cfg, tb, run_dir, device),
            train_dataset=tb.train_dataset, processing_class=tb.tokenizer, callbacks=callbacks,
            injector=injector, aqn=aqn, unfused_lm_head=bool(cfg.trainer.get("unfused_lm_head", False)),
            mitigation=mitigation.of_config(cfg),
        )
    trainer.remove_callback(PrinterCallback)  # it prints every step's full log dict; the progress bar and wandb carry it
    return trainer


def skip_evaluation(model, step: int) -> dict:
    """Evaluator of ranks other than 0: rank 0 evaluates (the weights are the same on every rank)."""
    return {"acc": float("nan"), "acc_flexible": float("nan"), "per_item": None}


def make_evaluator(cfg: DictConfig, tb, injector, run_dir: Path):
    """``evaluate(model, step) -> curve point`` through lm-eval (noisebench.evaluate)."""
    from noisebench.evaluate import evaluate_checkpoint

    e = cfg.eval
    max_gen = int(e.max_gen_toks or tb.max_completion_length)

    def evaluate(model, step: int) -> dict:
        # noisy=True: the injector's spec decides (noise on only where `eval` is among its phases).
        res = evaluate_checkpoint(model, tb.tokenizer, task=tb.eval_task, data_files=tb.eval_data_files,
                                  limit=e.limit, batch_size=int(e.batch_size), max_gen_toks=max_gen,
                                  injector=injector, noisy=True, clean_too=bool(e.clean_too),
                                  output_dir=run_dir / "eval" / f"step_{step:05d}")
        point = {"acc": res.acc, "acc_flexible": res.acc_flexible, "acc_stderr": res.acc_stderr, "n": res.n,
                 "noisy_eval": res.noisy, "eval_seconds": res.seconds, "per_item": res.per_item,
                 "acc_clean": None, "acc_clean_flexible": None, "per_item_clean": None}
        if e.clean_too:
            clean = res.clean if res.clean is not None else res  # a clean evaluation is its own clean score
            point.update(acc_clean=clean.acc, acc_clean_flexible=clean.acc_flexible, per_item_clean=clean.per_item)
        return point

    return evaluate
