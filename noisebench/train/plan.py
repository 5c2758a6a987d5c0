"""``dry_run=true``: compose everything, check the model and data are reachable, print the plan, train nothing.

Exits with one clear message (no traceback) when something is missing, so a user on a cluster learns in seconds,
not after a queue wait, that the hub is offline or a local path is wrong.
"""
from __future__ import annotations

import os
import sys

from omegaconf import DictConfig, OmegaConf


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- a dry run must not die on a broken CUDA install
        return 0


def plan_lines(cfg: DictConfig) -> list[str]:
    t, e, tb = cfg.trainer, cfg.eval, cfg.testbed
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps = int(t.max_steps)
    evals = sorted({0, *range(int(e.eval_every), steps + 1, int(e.eval_every)), steps})
    use_vllm = bool(OmegaConf.select(cfg, "trainer.args.use_vllm", default=False))
    mode = OmegaConf.select(cfg, "trainer.args.vllm_mode", default="colocate")
    n = cfg.noise
    return [
        f"experiment      {cfg.experiment} (seed {cfg.seed})",
        f"testbed         {tb.name}: model {OmegaConf.select(tb, 'model_id', default=None) or tb.get('kind')}, "
        f"eval task {tb.eval_task}",
        f"noise           {n.type} scale {n.scale} ops {list(n.ops)} phases {list(n.phases)}",
        f"aqn             {'on' if cfg.aqn.enabled else 'off'}",
        f"steps           {steps} x {t.prompts_per_step} prompts x {t.num_generations} generations "
        f"= {int(t.prompts_per_step) * int(t.num_generations)} completions a step",
        f"processes       {world} (WORLD_SIZE); GPUs visible here: {_gpus()}; device={cfg.device}",
        f"rollout engine  {'vLLM (' + str(mode) + ')' if use_vllm else 'transformers generate'}",
        f"eval schedule   steps {evals}; limit {e.limit}; backend {e.backend}; clean_too {e.clean_too}",
        f"results         {cfg.results_dir}/{tb.name}/{cfg.experiment}/",
    ]


def dry_run(cfg: DictConfig) -> None:
    from noisebench.testbeds import check_reachable
    from noisebench.train.runner import noise_spec

    problems = []
    try:
        noise_spec(cfg)
    except ValueError as exc:
        problems.append(f"noise spec: {exc}")
    problems += list(check_reachable(cfg.testbed))
    print("noisebench dry run -- nothing will be trained")
    for line in plan_lines(cfg):
        print("  " + line)
    if problems:
        print("NOT READY:\n" + "\n".join(f"  - {p}" for p in problems), file=sys.stderr)
        sys.exit(2)
    print("ready: model, data and config check out")
