"""One experiment, top to bottom: testbed -> noisy GRPO (TRL) -> lm-eval checkpoints -> result record.

The only place that chains the stages; the pieces are built in ``builders``, the record assembled in
``run_record``. Reads a composed Hydra config (conf/config.yaml); see README for keys.
"""
from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from noisebench.record import RECORD_NAME, write_record
from noisebench.train.builders import (make_aqn, make_chip, make_evaluator, make_injector, make_trainer, noise_spec,
                                       pick_device, skip_evaluation, slow_chip_note)
from noisebench.train.callbacks import NoisebenchCallback
from noisebench.train.distributed import is_main_process, rank, sharding_problem
from noisebench.train.outcome import signal_name
from noisebench.train.rescore import lm_eval_command
from noisebench.train.run_record import build_record
from noisebench.train.rundirs import begin_run, resume_point

log = logging.getLogger("noisebench")

OFFLINE_ENV = {"HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_SILENT": "true"}


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

    from noisebench.testbeds import load_testbed
    from noisebench.train.tracking import Tracker

    # setup: everything the config can get wrong is refused here, before the testbed is built
    spec = noise_spec(cfg)
    chip = make_chip(cfg)
    begin_run(run_dir, OmegaConf.to_container(cfg, resolve=True), bool(cfg.resume), main=is_main_process())
    problem = sharding_problem()
    if problem:
        raise ValueError(problem)
    aqn = make_aqn(cfg)
    device = pick_device(str(cfg.device))
    note = slow_chip_note(cfg, device)
    if note and is_main_process():
        log.warning(note)
    cfg.device = device  # the record's config holds the device that ran (part of the setting runs are compared in)
    set_seed(int(cfg.seed))

    tb = load_testbed(cfg.testbed, cache_dir=cfg.cache_dir, device=device)
    injector = make_injector(cfg, spec)

    ckpt, history = resume_point(run_dir, bool(cfg.resume), main=is_main_process())

    main = is_main_process()  # other ranks train but neither evaluate nor write the record (same run_dir)
    tracker = Tracker(cfg, run_dir, tags=[tb.name, spec.type]) if main else None
    evaluator = make_evaluator(cfg, tb, injector, run_dir) if main else skip_evaluation
    callback = NoisebenchCallback(evaluator, int(cfg.eval.eval_every), history,
                                  run_dir if main else run_dir / f"rank{rank()}",
                                  on_step=tracker.log if main else None, show_progress=main)
    callback.run_dir.mkdir(parents=True, exist_ok=True)
    trainer = make_trainer(cfg, tb, spec, injector, aqn, [callback, *(callbacks or [])], run_dir, device)
    callback.trainer = trainer

    status, error, interrupt = "ok", None, None
    try:
        with chip, injector:
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

    # record: written by rank 0 alone, whatever the status, with the partial curve
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
