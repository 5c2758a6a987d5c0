"""The stock ``lm_eval`` command a record holds re-scores the run's final checkpoint item for item."""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import REPO, compose


@pytest.mark.slow
def test_record_lm_eval_command_rescores_the_final_checkpoint(tmp_path, cache_dir):
    from noisebench.train.runner import run

    over = [f"results_dir={tmp_path / 'results'}", f"cache_dir={cache_dir}", "logger=none", "device=cpu",
            "leaderboard.enabled=false", "trainer.max_steps=1", "trainer.prompts_per_step=2",
            "trainer.num_generations=4", "eval.eval_every=1", "eval.limit=8", "eval.batch_size=4",
            "testbed.warmstart.steps=0", "testbed.max_completion_length=12", "+exp=baseline"]
    rec = run(compose(over), tmp_path / "run")
    assert rec["status"] == "ok" and rec["lm_eval_command"]
    cmd = shlex.split(rec["lm_eval_command"])
    lm_eval = os.path.join(os.path.dirname(sys.executable), "lm_eval")
    cmd[0] = lm_eval if os.path.exists(lm_eval) else cmd[0]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (samples,) = [p for p in (tmp_path / "run" / "eval").rglob("samples_noisebench_arith_*.jsonl")
                  if "stock_step" in str(p)]
    rows = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    strict = sorted((r["doc_id"], int(round(float(r["exact_match"])))) for r in rows if r["filter"] == "strict-match")
    assert [v for _, v in strict] == rec["final"]["per_item"] and len(strict) == 8
