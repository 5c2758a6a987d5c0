"""`noisebench-eval`: a checkpoint scored under a noise spec and clean, without training (a real lm-eval run)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_noisebench_eval_scores_noisy_and_clean(tmp_path, cache_dir):
    cmd = [sys.executable, "-c", "from noisebench.cli import eval_main; eval_main()",
           "testbed.warmstart.steps=0", "noise=relative_gaussian", "noise.scale=0.3", "eval.limit=24",
           "eval.batch_size=24", "testbed.max_completion_length=16", f"results_dir={tmp_path}",
           f"cache_dir={cache_dir}", "device=cpu"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "noisy, n=24" in out.stdout and "clean" in out.stdout
    (rec_path,) = tmp_path.rglob("eval_record.json")
    rec = json.loads(rec_path.read_text())
    assert len(rec["per_item"]) == len(rec["per_item_clean"]) == 24
    assert rec["telemetry"]["noise/eval/linear/fwd/calls"] > 0
    assert rec["acc"] == sum(rec["per_item"]) / 24
