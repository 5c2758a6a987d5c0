"""Faults a long run meets, through the real CLI: kill -9 at random points then resume, Ctrl-C, SIGTERM in the warm
start, a damaged checkpoint. Each kill runs ``noisebench`` under this file's driver (``python tests/test_faults.py
POINT SEED -- ARGS``), which SIGKILLs its own process at the chosen point: no cleanup code can run, as with an OOM
killer or a node failure.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO  # noqa: E402

POINTS = ("train", "save", "eval")  # "record" always comes last: it is the one point after all training
STEPS = 2


def _args(results: Path, cache: Path, *extra: str) -> list[str]:
    """The smallest run that has an evaluation and a checkpoint at every step (two to fall back on); ``extra``
    overrides replace the defaults of the same key."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [a for a in _defaults(results, cache) if a.split("=", 1)[0] not in keys] + list(extra)


def _defaults(results: Path, cache: Path) -> list[str]:
    return [f"results_dir={results}", f"cache_dir={cache}", f"leaderboard.out_dir={results.parent / 'boards'}",
            f"trainer.max_steps={STEPS}", "trainer.prompts_per_step=2", "trainer.num_generations=4",
            "eval.eval_every=1", "eval.limit=4", "eval.batch_size=2", "logger=none", "device=cpu",
            "testbed.warmstart.steps=0", "testbed.max_completion_length=12", "+exp=e4c"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _cli(args, point: str | None = None, seed: int = 0, **kw):
    cmd = ([sys.executable, __file__, point, str(seed), "--"] if point else [sys.executable, "-m", "noisebench.cli"])
    return subprocess.Popen(cmd + list(args), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _finish(proc, timeout=600) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _comparable(rec: dict) -> dict:
    drop = ("eval_seconds", "step_time_s")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    return {"curve": strip(rec["curve"]), "reward_curve": strip(rec["reward_curve"]), "steps": rec["steps"],
            "per_item": rec["final"]["per_item"], "mismatch": rec["mismatch"]["per_step"],
            "telemetry": rec["telemetry"], "status": rec["status"]}


@pytest.mark.slow
def test_kill9_at_random_points_then_resume_equals_a_straight_run(tmp_path, cache_dir):
    seed = int(os.environ.get("NOISEBENCH_FAULT_SEED", "5"))
    rng = random.Random(seed)
    points = rng.sample(POINTS, len(POINTS)) + ["record"]
    straight = _cli(_args(tmp_path / "straight", cache_dir))  # runs beside the faulted ones
    results = tmp_path / "faults"
    for i, point in enumerate(points):
        rc, out = _finish(_cli(_args(results, cache_dir, "resume=true"), point, seed * 100 + i))
        assert rc == -signal.SIGKILL, f"kill at {point} never happened (rc {rc}):\n{out[-3000:]}"
        for rec in results.rglob("record.json"):  # a kill leaves no final record behind
            assert json.loads(rec.read_text())["status"] != "ok"
    # the newest checkpoint of the run to continue is damaged too: resume must fall back to the one before
    from noisebench.train.rundirs import last_good_checkpoint

    (run,) = [d for d in results.glob("*/*/*-s0") if last_good_checkpoint(d) is not None][-1:]
    newest = last_good_checkpoint(run)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    rc, out = _finish(_cli(_args(results, cache_dir, "resume=true")))
    assert rc == 0, out[-3000:]
    assert list((run / "checkpoints").glob(f"corrupt-{newest.name}-*")), "damaged checkpoint not set aside"
    records = [json.loads(p.read_text()) for p in results.rglob("record.json")]
    assert [r["status"] for r in records].count("ok") == 1
    resumed = next(r for r in records if r["status"] == "ok")
    assert resumed["run_dir"] == str(run)
    rc, out = _finish(straight)
    assert rc == 0, out[-3000:]
    (ref,) = [json.loads(p.read_text()) for p in (tmp_path / "straight").rglob("record.json")]
    assert _comparable(resumed) == _comparable(ref)
    assert [c["step"] for c in resumed["curve"]] == list(range(STEPS + 1))
    print(f"fault seed {seed}: killed at {points}, then a truncated {newest.name}; resumed record == straight run")


def _wait_for(cond, proc, timeout=300.0, every=0.2):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(every)
    return False


@pytest.mark.slow
def test_sigint_mid_run_records_interrupted_with_step0_eval(tmp_path, cache_dir):
    results = tmp_path / "results"
    proc = _cli(_args(results, cache_dir, "trainer.max_steps=200"))

    def trained_a_step():
        for p in results.rglob("progress.json"):
            try:
                h = json.loads(p.read_text())
            except ValueError:
                continue
            return bool(h["curve"]) and bool(h["reward_curve"])
        return False

    assert _wait_for(trained_a_step, proc), _finish(proc)[1][-3000:]
    proc.send_signal(signal.SIGINT)
    rc, out = _finish(proc)
    assert rc == 130, out[-3000:]
    (rec,) = [json.loads(p.read_text()) for p in results.rglob("record.json")]
    assert rec["status"] == "interrupted" and rec["error"] == "interrupted by SIGINT"
    assert rec["curve"][0]["step"] == 0 and 1 <= rec["steps"] < 200
    assert len(rec["final"]["per_item"]) == 4


@pytest.mark.slow
def test_sigterm_during_warm_start_leaves_no_temp_folder(tmp_path, cache_dir):
    cache = tmp_path / "cache"  # a cold cache: this launch builds the testbed
    proc = _cli(_args(tmp_path / "results", cache, "testbed.warmstart.steps=400"))
    building = lambda: any((cache / "testbeds").glob("*.tmp-*"))  # noqa: E731
    assert _wait_for(building, proc, every=0.05), _finish(proc)[1][-3000:]
    time.sleep(1.0)  # into the build
    proc.send_signal(signal.SIGTERM)
    rc, out = _finish(proc)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert not list((cache / "testbeds").glob("*.tmp-*"))
    assert not list((tmp_path / "results").rglob("record.json"))  # died before training: nothing to record


@pytest.mark.slow
def test_multirun_goes_on_past_a_diverged_run_and_counts_it(tmp_path, cache_dir):
    """A sweep over the flip rate: exponent flips at 5% diverge, at 1e-9 nothing flips; the sweep finishes both,
    says how they ended and exits with the diverged code (3), in a folder of its own for each job."""
    args = [a for a in _args(tmp_path / "results", cache_dir, "trainer.max_steps=4", "eval.eval_every=4")
            if a != "+exp=e4c"]
    rc, out = _finish(_cli(["-m", "+exp=bitflip_exponent", "noise.scale=1e-9,0.05",
                            "noise.phases=[rollout,train_forward,train_backward]", *args]))
    statuses = sorted(json.loads(p.read_text())["status"] for p in (tmp_path / "results").rglob("record.json"))
    assert statuses == ["diverged", "ok"], out[-3000:]
    assert rc == 3, out[-3000:]
    assert "2 runs: 1 diverged, 1 ok" in out


def test_the_next_build_removes_temp_folders_of_killed_builds(tmp_path):
    """kill -9 runs no cleanup: the next build of the same cache entry deletes temp folders of dead processes."""
    from noisebench.testbeds import cache

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = tmp_path / f"tb-abc.tmp-{gone.pid}"
    orphan.mkdir()
    (orphan / "weights").write_text("half")
    live = tmp_path / f"tb-abc.tmp-{os.getppid()}"  # a build still running elsewhere is left alone
    live.mkdir()
    folder = cache.cached_build(tmp_path / "tb-abc", lambda d: (d / "weights").write_text("whole"))
    assert not orphan.exists() and live.exists()
    assert not cache.problems(folder) and (folder / "weights").read_text() == "whole"


# ---- driver: run the CLI and SIGKILL this process at one point ------------------------------------------------------
def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(point: str, seed: int) -> None:
    rng = random.Random(seed)
    from noisebench.train.trainer import NoisyGRPOTrainer

    if point == "train":  # inside the forward of a random training step (the first one left if it is done)
        step = rng.randint(1, STEPS)
        orig = NoisyGRPOTrainer._compute_loss

        def compute_loss(self, model, inputs):
            if self.state.global_step + 1 >= step:
                _die()
            return orig(self, model, inputs)

        NoisyGRPOTrainer._compute_loss = compute_loss
    elif point == "save":  # weights, optimizer and RNG state written; trainer state and seal not yet
        orig_save = NoisyGRPOTrainer._save_rng_state

        def save_rng_state(self, output_dir):
            orig_save(self, output_dir)
            _die()

        NoisyGRPOTrainer._save_rng_state = save_rng_state
    elif point == "eval":  # in the middle of lm-eval's generation: batch 1 or 2 of the first evaluation
        from lm_eval.models.huggingface import HFLM

        batch, seen = rng.randint(1, 2), [0]
        orig_gen = HFLM._model_generate

        def model_generate(self, *a, **kw):
            seen[0] += 1
            if seen[0] >= batch:
                _die()
            return orig_gen(self, *a, **kw)

        HFLM._model_generate = model_generate
    elif point == "record":  # the record's temp file written and synced, not yet renamed into place
        real_replace = os.replace

        def replace(src, dst, *a, **kw):
            if Path(dst).name == "record.json":
                _die()
            return real_replace(src, dst, *a, **kw)

        os.replace = replace
    else:
        raise ValueError(f"fault point {point!r} is not one of {[*POINTS, 'record']}")


if __name__ == "__main__":
    point, seed, sep, *cli_args = sys.argv[1:]
    _arm(point, int(seed))
    from noisebench.cli import main

    sys.argv = ["noisebench", *cli_args]
    main()
