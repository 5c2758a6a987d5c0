"""Real GRPO runs on the embedded testbed (untrained weights, shrunk budget): phases, resume, NaN, wandb, multirun."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import TrainerCallback

from conftest import REPO, compose, small_run_overrides

PHASES = ["rollout", "reference", "train_forward", "train_backward", "eval"]
FAST = ["testbed.max_completion_length=12", "testbed.warmstart.steps=0"]


def _run(tmp_path, cache, extra, name="run", steps=2, callbacks=None):
    from noisebench.train.runner import run

    cfg = compose(small_run_overrides(tmp_path, cache, steps=steps, warm=False) + FAST + extra)
    return run(cfg, tmp_path / name, callbacks=callbacks)


def _phase_calls(telemetry: dict, phase: str) -> float:
    from noisebench.train.callbacks import phase_telemetry

    return phase_telemetry(telemetry).get(f"noise/{phase}/calls", 0.0)


@pytest.mark.slow
def test_phase_gating_and_mismatch_in_real_grpo_steps(tmp_path, cache_dir):
    base = _run(tmp_path, cache_dir, ["+exp=baseline"], "base")
    noisy = _run(tmp_path, cache_dir, ["+exp=e4d"], "e4d")
    assert base["status"] == noisy["status"] == "ok"
    # the baseline draws no noise at all; e4d draws in every enabled phase, forward and backward
    assert all(v == 0 for k, v in base["telemetry"].items() if k.endswith(("/calls", "/elements")))
    for phase in PHASES:
        assert _phase_calls(noisy["telemetry"], phase) > 0, phase
    assert any(k.startswith("noise/train_backward/") and "/bwd/" in k for k in noisy["telemetry"])
    # realized relative error of the forward matmuls is the spec's scale
    rms = [v for k, v in noisy["telemetry"].items() if k.startswith("noise/rollout/linear/fwd/rel_err_rms")]
    assert rms and abs(rms[0] - 1e-2) / 1e-2 < 0.1
    # rollout vs training log-probs: float-rounding level clean, clearly larger with e4d noise
    mb, mn = base["mismatch"]["abs_logp_diff_mean"], noisy["mismatch"]["abs_logp_diff_mean"]
    assert mb < 1e-5 and mn > 100 * mb
    assert len(base["curve"]) == 2 and base["curve"][0]["step"] == 0  # step 0 and the end
    assert len(base["final"]["per_item"]) == base["n_test"] == 48


@pytest.mark.slow
def test_phase_restriction_rollout_only(tmp_path, cache_dir):
    rec = _run(tmp_path, cache_dir, ["+exp=e4d_rollout_only"], steps=1)
    assert _phase_calls(rec["telemetry"], "rollout") > 0 and _phase_calls(rec["telemetry"], "eval") > 0
    for phase in ["reference", "train_forward", "train_backward"]:
        assert _phase_calls(rec["telemetry"], phase) == 0, phase
    from noisebench.noise.fast import table
    assert rec["noise_engine"]["cpu_rng"] == table.name()   # which generator drew the noise (for bitwise reruns)


class _Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated kill at step 3")


@pytest.mark.slow
def test_resume_after_kill_matches_straight_run(tmp_path, cache_dir):
    straight = _run(tmp_path, cache_dir, ["+exp=e4c"], "straight", steps=4)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, cache_dir, ["+exp=e4c"], "killed", steps=4, callbacks=[_Crash()])
    progress = json.loads((tmp_path / "killed" / "progress.json").read_text())
    assert [c["step"] for c in progress["curve"]] == [0, 2]  # finished work kept on disk
    resumed = _run(tmp_path, cache_dir, ["+exp=e4c", "resume=true"], "killed", steps=4)
    assert resumed["status"] == "ok" and resumed["steps"] == 4
    for key in ("curve", "reward_curve"):
        strip = lambda rows: [{k: v for k, v in r.items() if k not in ("eval_seconds", "step_time_s")} for r in rows]
        assert strip(resumed[key]) == strip(straight[key]), key
    assert resumed["final"]["per_item"] == straight["final"]["per_item"]
    assert resumed["mismatch"]["per_step"] == straight["mismatch"]["per_step"]


@pytest.mark.slow
def test_exponent_bitflips_end_as_diverged_with_partial_curve(tmp_path, cache_dir):
    rec = _run(tmp_path, cache_dir, ["+exp=bitflip_exponent", "noise.scale=0.05", "noise.phases=[rollout,train_forward,train_backward]"],
               steps=4)
    assert rec["status"] == "diverged", rec.get("error")
    assert rec["curve"] and rec["curve"][0]["step"] == 0  # step-0 evaluation survives
    assert (Path(rec["run_dir"]) / "record.json").exists()


@pytest.mark.slow
def test_wandb_offline_files_written(tmp_path, cache_dir):
    rec = _run(tmp_path, cache_dir, ["+exp=e4c", "logger=wandb"], steps=1)
    runs = list((Path(rec["run_dir"]) / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    from noisebench.train.callbacks import phase_telemetry

    per_phase = phase_telemetry(rec["telemetry"])  # what each step logs to wandb
    assert per_phase["noise/rollout/calls"] > 0 and per_phase["noise/train_backward/elements"] > 0


@pytest.mark.slow
def test_cli_multirun_writes_records_and_leaderboard(tmp_path, cache_dir):
    over = small_run_overrides(tmp_path, cache_dir, steps=1, warm=False) + FAST
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", "-m", "+exp=baseline,e4d", *over],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = sorted((tmp_path / "results").rglob("record.json"))
    assert len(recs) == 2
    exps = {json.loads(p.read_text())["experiment"] for p in recs}
    assert exps == {"baseline", "e4d"}
    board = (tmp_path / "boards" / "tiny_sharpen.md").read_text()
    assert "e4d" in board and "baseline" in board
    assert "Runs made with: `noisebench -m +exp=baseline,e4d " in board  # the sweep command, rebuilt from records


@pytest.mark.slow
def test_joblib_launcher_runs_seeds_side_by_side_with_cores_split(tmp_path, cache_dir):
    """A sweep through Hydra's joblib launcher: each seed a process of its own, the machine's cores split among them."""
    import os

    over = small_run_overrides(tmp_path, cache_dir, steps=1, warm=False) + FAST
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", "-m", "seed=0,1", "hydra/launcher=joblib",
                          "hydra.launcher.n_jobs=2"] + over, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    recs = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("record.json")]
    assert sorted(r["seed"] for r in recs) == [0, 1] and {r["status"] for r in recs} == {"ok"}
    assert {r["torch_threads"] for r in recs} == {max(1, (os.cpu_count() or 1) // 2)}
