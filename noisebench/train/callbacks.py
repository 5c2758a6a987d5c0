"""Trainer callbacks: checkpoint evaluation on schedule, per-step history, divergence detection, progress bar.

Everything a run learns is kept in :class:`RunHistory` and flushed atomically to ``progress.json`` after every step,
so a crash, a kill or a NaN never loses finished work and ``resume=true`` continues from the last checkpoint.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm
from transformers import TrainerCallback

from noisebench.console import eval_summary
from noisebench.record import write_atomic

PROGRESS_FILE = "progress.json"


@dataclass
class RunHistory:
    """Per-step and per-checkpoint history of one run (what the result record is built from)."""

    curve: list[dict] = field(default_factory=list)          # {step, acc, acc_flexible, acc_stderr, acc_clean, ...}
    reward_curve: list[dict] = field(default_factory=list)   # {step, reward, loss, step_time_s}
    mismatch: list[dict] = field(default_factory=list)       # {step, kl, k3_kl, abs_prob_diff_mean, ...}
    final_items: dict = field(default_factory=dict)          # {step, per_item, per_item_clean, ...} of latest eval
    wall_time_s: float = 0.0
    diverged_at: int | None = None

    def truncate(self, step: int) -> None:
        """Drop everything recorded after ``step`` (resuming from the checkpoint of that step)."""
        self.curve = [c for c in self.curve if c["step"] <= step]
        self.reward_curve = [r for r in self.reward_curve if r["step"] <= step]
        self.mismatch = [m for m in self.mismatch if m["step"] <= step]
        if self.final_items.get("step", 0) > step:
            self.final_items = {}

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> "RunHistory":
        return cls(**json.loads(Path(path).read_text()))


def phase_telemetry(telemetry: dict) -> dict[str, float]:
    """Per-phase totals of the injector's flat telemetry (noisy calls and elements so far): a step-level view."""
    out: dict[str, float] = {}
    for key, value in telemetry.items():
        parts = key.split("/")  # noise/<phase>/<op>/<dir>/<stat>
        if len(parts) == 5 and parts[4] in ("calls", "elements"):
            name = f"noise/{parts[1]}/{parts[4]}"
            out[name] = out.get(name, 0.0) + float(value)
    return out


def _finite(x) -> bool:
    return x is None or (isinstance(x, (int, float)) and math.isfinite(x))


class NoisebenchCallback(TrainerCallback):
    """Evaluates checkpoints at step 0, every ``eval_every`` steps and at the end; records reward, loss, mismatch and
    step time every step; stops the run as diverged when loss or reward becomes NaN/inf.

    Args:
        evaluate (callable): ``evaluate(model, step) -> dict`` returning a curve point (with ``per_item``).
        eval_every (int): steps between evaluations.
        history (RunHistory): where everything goes (restored from progress.json on resume).
        run_dir (Path): the run folder (progress.json lands there).
        on_step (callable | None): ``on_step(metrics: dict, step: int)`` for trackers (wandb).
    """

    def __init__(self, evaluate: Callable, eval_every: int, history: RunHistory, run_dir: Path,
                 on_step: Callable | None = None, show_progress: bool = True):
        self.evaluate = evaluate
        self.eval_every = max(1, int(eval_every))
        self.history = history
        self.run_dir = Path(run_dir)
        self.on_step = on_step
        self.show_progress = show_progress
        self.trainer = None  # set by the runner: pop_step_mismatch lives there
        self._t_step = None
        self._t_start = None
        self._wall_before = history.wall_time_s
        self._bar = None
        self._max_steps = None

    # -- helpers --
    def _save(self):
        self.history.wall_time_s = self._wall_before + (time.perf_counter() - self._t_start)
        self.history.save(self.run_dir / PROGRESS_FILE)

    def _eval(self, model, step: int):
        if any(c["step"] == step for c in self.history.curve):
            return
        point = self.evaluate(model, step)
        per_item = point.pop("per_item", None)
        per_item_clean = point.pop("per_item_clean", None)
        self.history.curve.append({"step": step, **point})
        self.history.final_items = {"step": step, "per_item": per_item, "per_item_clean": per_item_clean}
        if self.on_step:
            self.on_step({f"eval/{k}": v for k, v in point.items() if isinstance(v, (int, float))}, step)
        if self.show_progress:
            tqdm.write(eval_summary(step, self._max_steps, point))

    # -- trainer events --
    def on_train_begin(self, args, state, control, model=None, **kw):
        self._t_start = self._t_step = time.perf_counter()
        self._max_steps = state.max_steps
        if self.show_progress:
            self._bar = tqdm(total=state.max_steps, initial=state.global_step, desc="GRPO", dynamic_ncols=True)
        if state.global_step == 0:
            self._eval(model, 0)
            self._save()

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "loss" in logs and not _finite(logs["loss"]):
            self.history.diverged_at = state.global_step
            control.should_training_stop = True
            self._save()
        if "loss" in logs and self.history.reward_curve and self.history.reward_curve[-1]["step"] == state.global_step:
            self.history.reward_curve[-1]["loss"] = logs["loss"]

    def on_step_end(self, args, state, control, model=None, **kw):
        step = state.global_step
        now = time.perf_counter()
        dt, self._t_step = now - self._t_step, now
        mismatch = self.trainer.pop_step_mismatch() if self.trainer is not None else {}
        if mismatch:
            self.history.mismatch.append({"step": step, **mismatch})
        # TRL logs every `logging_steps` (1 here) right after on_step_end; read the trainer's pending metrics now.
        metrics = self.trainer._metrics["train"] if self.trainer is not None else {}
        rewards = metrics.get("reward") or []
        reward = float(sum(rewards) / len(rewards)) if rewards else None
        self.history.reward_curve.append({"step": step, "reward": reward, "step_time_s": dt})
        if not _finite(reward):
            self.history.diverged_at = step
            control.should_training_stop = True
        if self.on_step:
            m = {"train/reward": reward, "train/step_time_s": dt}
            m.update({(k if k.startswith("rollout_corr/") else f"mismatch/{k}"): v for k, v in mismatch.items()})
            injector = getattr(self.trainer, "injector", None)
            if injector is not None:
                m.update(phase_telemetry(injector.telemetry()))
            self.on_step(m, step)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(reward=f"{reward:.3f}" if reward is not None else "-", s_per_step=f"{dt:.2f}")
        if self.history.diverged_at is None and (step % self.eval_every == 0 or step >= state.max_steps):
            self._eval(model, step)
            control.should_save = True
        self._save()

    def on_save(self, args, state, control, **kw):
        """Seal the checkpoint just written (the trainer has rotated old ones already): resume trusts only sealed
        checkpoints whose files still match, so a kill mid-save or a damaged file falls back to the one before.
        progress.json is written first: the step's loss arrives (on_log) after on_step_end saved it, and a resume
        from this checkpoint must find the history complete up to its step."""
        import torch.distributed as dist

        self._save()

        if args.world_size > 1 and dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its RNG state into the folder before it is sealed
        if state.is_world_process_zero:
            from noisebench.train.checkpoints import mark_checkpoint

            mark_checkpoint(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kw):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._t_start is not None:
            self._save()
