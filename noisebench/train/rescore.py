"""The stock ``lm_eval`` command that re-scores a run's checkpoint, written into its record.

Why: anyone should be able to check a number on the board with the field's own tool and nothing of ours but the
task folder. The command names what the in-process evaluation passes in memory: the testbed's test file (task
metadata), the task folder, the fixed batch size (padding changes greedy outputs), the generation cap and lm-eval's
seeds. It scores the checkpoint clean, so it reproduces ``acc`` of runs whose noise spares the ``eval`` phase and
``acc_clean`` (``eval.clean_too=true``) of the others.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

#: Seeds noisebench.evaluate.evaluate_checkpoint gives lm-eval (python, numpy, torch, fewshot).
EVAL_SEED = 1234


def lm_eval_command(cfg, tb, run_dir: str | Path, step: int | None) -> str | None:
    """``lm_eval ...`` for ``<run_dir>/checkpoints/checkpoint-<step>`` (None before the first checkpoint)."""
    if not step:
        return None
    from noisebench.evaluate import tasks_dir

    e = cfg.eval
    ckpt = Path(run_dir) / "checkpoints" / f"checkpoint-{step}"
    if not ckpt.is_dir():  # e.g. interrupted between the evaluation and the checkpoint of that step
        return None
    cmd = ["lm_eval", "--model", "hf", "--model_args", f"pretrained={ckpt}", "--include_path", str(tasks_dir()),
           "--tasks", str(tb.eval_task), "--batch_size", str(int(e.batch_size)),
           "--gen_kwargs", f"max_gen_toks={int(e.max_gen_toks or tb.max_completion_length)}",
           "--seed", ",".join([str(EVAL_SEED)] * 4), "--log_samples",
           "--output_path", str(Path(run_dir) / "eval" / f"stock_step_{step:05d}")]
    if tb.eval_data_files:
        cmd += ["--metadata", json.dumps({"data_files": {k: str(v) for k, v in tb.eval_data_files.items()}})]
    if e.limit is not None:
        cmd += ["--limit", str(e.limit)]
    return shlex.join(cmd)
