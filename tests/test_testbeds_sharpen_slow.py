"""The default job on the default testbed (tiny_sharpen), as a user runs it: GRPO must raise correctness, not only
the answer format (the instrument's premise: a chip's harm to learning can only show where learning happens)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_job_raises_clean_correctness(tmp_path, cache_dir):
    over = [f"results_dir={tmp_path / 'results'}", f"cache_dir={cache_dir}", "leaderboard.enabled=false",
            "logger=none", "device=cpu"]
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", *over], cwd=tmp_path, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    rec = json.loads(next((tmp_path / "results").rglob("record.json")).read_text())
    curve = {c["step"]: c for c in rec["curve"]}
    steps = sorted(curve)
    flex = [curve[s]["acc_clean_flexible"] for s in steps]
    strict = [curve[s]["acc_clean"] for s in steps]
    print(f"\nclean last-number accuracy by step {dict(zip(steps, flex))}; wall {rec['wall_time_s']:.0f} s")
    assert steps[0] == 0 and steps[-1] == 40
    assert flex[-1] - flex[0] >= 0.15 and strict[-1] - strict[0] >= 0.15  # correctness, with the format
    half = steps.index(20)
    assert flex[half + 1] > flex[half]  # still climbing at the halfway step
    # Every warm-start solution ends "#### N": the gain is not the format (strict = last number at step 0).
    assert abs(strict[0] - flex[0]) < 0.02
