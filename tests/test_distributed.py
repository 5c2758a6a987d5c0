"""The distributed path on CPU: the same code as 2 processes through ``accelerate launch`` (torchrun, gloo).

Multi-GPU machines are not lent to CI; DDP on CPU runs every line noisebench adds for several ranks (the shared run
folder, rank-0-only evaluation and record, per-rank noise streams, the batch split over ranks) on the real launcher.
The run goes through this file's driver (``accelerate launch tests/test_distributed.py OUT -- ARGS``), which reports
per rank what the trainer actually did: completions per micro-step and a probe of the rank's noise stream.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import REPO, compose  # noqa: E402


def _args(tmp: Path, cache: Path) -> list[str]:
    return [f"results_dir={tmp / 'results'}", f"cache_dir={cache}", f"leaderboard.out_dir={tmp / 'boards'}",
            "trainer.max_steps=2", "trainer.prompts_per_step=2", "trainer.num_generations=4", "eval.eval_every=2",
            "eval.limit=8", "eval.batch_size=8", "logger=none", "device=cpu", "testbed.warmstart.steps=0",
            "testbed.max_completion_length=12", "+exp=e4c"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(injector) -> list[float]:
    """Noise the stream adds to one fixed matmul in the rollout phase, at the stream's current position."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 16, generator=g), torch.randn(16, 16, generator=g)
    with injector.phase("rollout"):
        y = torch.nn.functional.linear(x, w)
    return (y - x @ w.T).flatten().tolist()


@pytest.mark.slow
def test_two_cpu_processes_through_accelerate(tmp_path, cache_dir):
    if shutil.which("accelerate") is None:
        pytest.skip("accelerate CLI not on PATH")
    out = tmp_path / "ranks"
    out.mkdir()
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           __file__, str(out), "--", *_args(tmp_path, cache_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "NOISEBENCH_RUN_STAMP": "20260101-000000"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    records = sorted((tmp_path / "results").rglob("record.json"))
    assert len(records) == 1  # rank 0 alone writes it, into the one folder both ranks share
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "ok" and rec["steps"] == 2 and [c["step"] for c in rec["curve"]] == [0, 2]
    board = (tmp_path / "boards" / "tiny_sharpen.md").read_text()
    assert sum(1 for line in board.splitlines() if line.startswith("|") and "`e4c`" in line) == 1

    ranks = {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert all(ranks[r]["world_size"] == 2 and ranks[r]["backend"] == "gloo" for r in ranks)
    # per-rank noise streams: they differ from each other, and each is the stream a fresh process of that rank
    # draws again (what makes a distributed run reproducible run to run)
    assert ranks[0]["probe"] != ranks[1]["probe"]
    assert all(any(abs(v) > 0 for v in ranks[r]["probe"]) for r in ranks)
    from noisebench.noise import NoiseInjector
    from noisebench.train.runner import noise_spec

    cfg = compose(_args(tmp_path, cache_dir))
    for r in (0, 1):
        os.environ["RANK"] = str(r)
        try:
            with NoiseInjector(noise_spec(cfg), hooks="attached", intercept="patch") as inj:
                assert _probe(inj) == ranks[r]["probe"], f"rank {r}'s noise stream does not reproduce"
        finally:
            os.environ.pop("RANK", None)
    # the batch split the plan printed is the one each rank trained with
    os.environ["WORLD_SIZE"] = "2"
    try:
        from noisebench.train.plan import plan_lines

        (batch,) = [line for line in plan_lines(cfg) if line.startswith("batch")]
    finally:
        os.environ.pop("WORLD_SIZE", None)
    per_device = int(re.search(r"(\d+) completions per device", batch).group(1))
    assert "x 2 process(es)" in batch and per_device == 4  # 2 prompts x 4 generations over 2 ranks
    for r in ranks:
        assert ranks[r]["micro_batches"] and set(ranks[r]["micro_batches"]) == {per_device}, ranks[r]


# ---- driver: one rank of the launch -----------------------------------------------------------------------------
if __name__ == "__main__":
    out_dir, sep, *cli_args = sys.argv[1:]
    import torch.distributed as dist

    from noisebench.train.trainer import NoisyGRPOTrainer

    seen: dict = {"micro_batches": []}
    train, compute_loss = NoisyGRPOTrainer.train, NoisyGRPOTrainer._compute_loss

    def probed_train(self, *a, **kw):
        seen["probe"] = _probe(self.injector)  # before any draw of this rank: the stream's first numbers
        self.injector.reset_telemetry()
        return train(self, *a, **kw)

    def counted_loss(self, model, inputs):
        seen["micro_batches"].append(int(inputs["completion_ids"].shape[0]))
        return compute_loss(self, model, inputs)

    NoisyGRPOTrainer.train, NoisyGRPOTrainer._compute_loss = probed_train, counted_loss
    from noisebench.cli import main

    sys.argv = ["noisebench", *cli_args]
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    rank = int(os.environ.get("RANK", 0))
    seen.update(world_size=dist.get_world_size() if dist.is_initialized() else 1,
                backend=dist.get_backend() if dist.is_initialized() else None)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    sys.exit(code)
