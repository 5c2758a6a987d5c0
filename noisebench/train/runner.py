"""One experiment, top to bottom: testbed -> noisy GRPO (TRL) -> lm-eval checkpoints -> result record.

The only place that chains the stages. Reads a composed Hydra config (conf/config.yaml); see README for keys.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from noisebench.record import RECORD_NAME, setting_fingerprint, write_record
from noisebench.train.callbacks import NoisebenchCallback, RunHistory
from noisebench.train.outcome import signal_name
from noisebench.train.rescore import lm_eval_command
from noisebench.train.rundirs import begin_run, resume_point
from noisebench.train.mismatch import aggregate

log = logging.getLogger("noisebench")

OFFLINE_ENV = {"HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("noisebench", "torch", "transformers", "trl", "lm_eval", "accelerate", "datasets", "hydra-core"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


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


def grpo_config(cfg: DictConfig, tb, run_dir: Path, device: str):
    from trl import GRPOConfig

    t = cfg.trainer
    args = OmegaConf.to_container(t.args, resolve=True)
    if device == "cpu":
        args["use_cpu"] = True
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


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1) or 1)


def is_main_process() -> bool:
    """Rank 0 (``accelerate launch`` sets RANK): the only one that evaluates and writes the record."""
    return int(os.environ.get("RANK", 0) or 0) == 0


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


def noise_engine() -> dict:
    """Which noise paths drew this run's noise (same statistics, different draws): for reproducing it bitwise."""
    from noisebench.noise.fast import dispatch, inline, table
    return {"fast_mode": dispatch.MODE, "cpu_rng": table.name(), "compiled_noise": inline.MODE}


def build_record(cfg, spec, history: RunHistory, status: str, run_dir: Path, telemetry: dict, tb_name: str,
                 eval_task: str, steps: int, started: str, error: str | None) -> dict:
    final = {}
    if history.curve:
        last = max(history.curve, key=lambda c: c["step"])
        final = {k: last.get(k) for k in ("step", "acc", "acc_flexible", "acc_clean", "acc_clean_flexible")}
        if history.final_items.get("step") == last["step"]:
            final["per_item"] = history.final_items.get("per_item")
            final["per_item_clean"] = history.final_items.get("per_item_clean")
    # Run-level mismatch: mean of each per-step statistic; *_max / *_min keep the extreme ("kl" -> "mean_kl").
    mismatch = {}
    for k in sorted({k for m in history.mismatch for k in m if k != "step"}):
        vals = [m[k] for m in history.mismatch if m.get(k) is not None and math.isfinite(m[k])]
        mismatch[k if k.startswith(("abs", "is_")) else f"mean_{k}"] = aggregate(k, vals) if vals else None
    mismatch["per_step"] = history.mismatch
    return {
        "run_id": f"{tb_name}/{cfg.experiment}/{run_dir.name}",
        "testbed": tb_name,
        "experiment": str(cfg.experiment),
        "seed": int(cfg.seed),
        "status": status,
        "noise": spec.to_dict() if spec is not None else OmegaConf.to_container(cfg.noise, resolve=True),
        "noise_engine": noise_engine(),
        "aqn": OmegaConf.to_container(cfg.aqn, resolve=True),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "setting_fingerprint": setting_fingerprint(OmegaConf.to_container(cfg, resolve=True)),
        "versions": versions(),
        "git_commit": git_commit(),
        "eval_task": eval_task,
        "n_test": (history.curve[-1].get("n") if history.curve else None),
        "curve": history.curve,
        "final": final,
        "reward_curve": history.reward_curve,
        "mismatch": mismatch,
        "telemetry": telemetry,
        "steps": steps,
        "max_steps": int(cfg.trainer.max_steps),
        "wall_time_s": history.wall_time_s,
        "started_at": started,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "diverged_at": history.diverged_at,
        "error": error,
        "run_dir": str(run_dir),
        "overrides": hydra_overrides(),
    }


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of this run (None outside a Hydra app, e.g. in tests calling run())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return None


def _looks_diverged(exc: BaseException) -> bool:
    msg = str(exc).lower()
    return any(s in msg for s in ("nan", "inf", "probability tensor"))


def rebuild_leaderboard(cfg: DictConfig) -> list:
    """Regenerate the markdown boards (and the wandb Table while a wandb run is active)."""
    from noisebench.leaderboard import build_leaderboards

    paths = build_leaderboards(cfg.results_dir, cfg.leaderboard.out_dir, n_boot=int(cfg.leaderboard.bootstrap))
    for p in paths:
        log.info("leaderboard: %s", p)
    return paths


def run(cfg: DictConfig, run_dir: str | os.PathLike, leaderboard: bool = False, callbacks: list | None = None) -> dict:
    """Run one experiment into ``run_dir``; returns the result record (also written to run_dir/record.json).

    ``leaderboard=True`` rebuilds the boards after the record is written (single runs; a multirun rebuilds once at
    its end through the Hydra callback). ``callbacks``: extra ``transformers.TrainerCallback`` objects."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%dT%H:%M:%S")

    from transformers import set_seed

    from noisebench.noise import NoiseInjector
    from noisebench.scoring import gsm8k_reward
    from noisebench.testbeds import load_testbed
    from noisebench.train.aqn import AQN, AQNConfig
    from noisebench.train.tracking import Tracker
    from noisebench.train.trainer import NoisyGRPOTrainer
    from noisebench.train.plan import sharded, strategy
    from noisebench.train.vllm import vllm_rollouts

    spec = noise_spec(cfg)
    begin_run(run_dir, OmegaConf.to_container(cfg, resolve=True), bool(cfg.resume), main=is_main_process())
    if sharded() and world_size() > 1:
        raise ValueError(f"{strategy()} shards the weights, but checkpoint evaluation runs lm-eval on rank 0 alone: "
                         f"use conf/accelerate/ddp.yaml or deepspeed_zero2.yaml")
    aqn_cfg = AQNConfig(**OmegaConf.to_container(cfg.aqn, resolve=True))
    device = pick_device(str(cfg.device))
    set_seed(int(cfg.seed))

    tb = load_testbed(cfg.testbed, cache_dir=cfg.cache_dir, device=device)
    injector = NoiseInjector(spec, hooks=injector_hooks(cfg), intercept=injector_intercept(cfg))
    aqn = AQN(aqn_cfg) if aqn_cfg.enabled else None

    ckpt, history = resume_point(run_dir, bool(cfg.resume), main=is_main_process())

    if not tb.model.config._name_or_path:  # built in memory (model_init=random): TRL loads the reference model
        tb.model.config._name_or_path = tb.model.name_or_path = str(tb.model_path)  # (and vLLM its config) from here
    main = is_main_process()  # other ranks train but neither evaluate nor write the record (same run_dir)
    tracker = Tracker(cfg, run_dir, tags=[tb.name, spec.type]) if main else None
    evaluator = make_evaluator(cfg, tb, injector, run_dir) if main else skip_evaluation
    callback = NoisebenchCallback(evaluator, int(cfg.eval.eval_every), history,
                                  run_dir if main else run_dir / f"rank{os.environ.get('RANK')}",
                                  on_step=tracker.log if main else None, show_progress=main)
    callback.run_dir.mkdir(parents=True, exist_ok=True)
    with vllm_rollouts(cfg, spec, tb.model_path):  # no-op unless trainer.args.use_vllm
        trainer = NoisyGRPOTrainer(
            model=tb.model, reward_funcs=gsm8k_reward, args=grpo_config(cfg, tb, run_dir, device),
            train_dataset=tb.train_dataset, processing_class=tb.tokenizer, callbacks=[callback, *(callbacks or [])],
            injector=injector, aqn=aqn, unfused_lm_head=bool(cfg.trainer.get("unfused_lm_head", False)),
        )
    callback.trainer = trainer
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every step's full log dict; the progress bar and wandb carry it

    status, error, interrupt = "ok", None, None
    try:
        with injector:
            trainer.train(resume_from_checkpoint=ckpt)
            if history.diverged_at is None and trainer.state.global_step not in {c["step"] for c in history.curve}:
                callback._eval(trainer.model, trainer.state.global_step)  # e.g. stopped early
        if history.diverged_at is not None:
            status = "diverged"
    except (RuntimeError, ValueError, FloatingPointError) as exc:  # NaN sampling, inf logits, ...
        status = "diverged" if _looks_diverged(exc) else "failed"
        error = f"{type(exc).__name__}: {exc}"
        if status == "diverged" and history.diverged_at is None:  # a failed run did not diverge
            history.diverged_at = trainer.state.global_step
        log.error("run ended %s at step %d: %s", status, trainer.state.global_step, error)
        log.debug(traceback.format_exc())
    except Exception as exc:  # anything else still leaves a record and keeps the partial curve
        status, error = "failed", f"{type(exc).__name__}: {exc}"
        log.error("run failed at step %d:\n%s", trainer.state.global_step, traceback.format_exc())
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (outcome.interrupts_raise): record, then re-raise
        status, error, interrupt = "interrupted", f"interrupted by {signal_name(exc)}", exc
        log.warning("run interrupted by %s at step %d; writing the record", signal_name(exc), trainer.state.global_step)

    telemetry = injector.telemetry()
    if aqn is not None:
        telemetry["aqn/last_sigma"] = aqn.last_sigma
    record = build_record(cfg, spec, history, status, run_dir, telemetry, tb.name, tb.eval_task,
                          int(trainer.state.global_step), started, error)
    record["lm_eval_command"] = lm_eval_command(cfg, tb, run_dir, record["final"].get("step"))
    if not main:
        if interrupt is not None:
            raise interrupt
        return record
    write_record(run_dir / RECORD_NAME, record)
    if leaderboard and cfg.leaderboard.enabled and interrupt is None:  # a SIGTERM's grace period is short
        try:
            rebuild_leaderboard(cfg)
        except Exception:  # noqa: BLE001 -- a board that fails to render must not lose the finished run
            log.error("leaderboard rebuild failed:\n%s", traceback.format_exc())
    tracker.finish(record)
    if interrupt is not None:
        raise interrupt
    return record
