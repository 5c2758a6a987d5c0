"""Not a timing: why importance-sampling fixes stall GRPO under noise that is redrawn every call.

TRL's IS correction (noisebench ``mitigation=tis_*``/``mis_*``) computes the old policy's log-probs in an extra
forward; under per-call noise in the reference and training phases that forward and the training forward differ, so
PPO's ratio new/old is no longer 1. Part 1 measures that ratio on the default testbed's warm start (64 sampled
completions, noise in ``reference`` then ``train_forward``); part 2 (``--grpo-steps N``) runs ``+exp=e4_5e-2`` with
and without ``mitigation=tis_token`` for N steps on the CPU and prints TRL's gradient norm per step.

    python benchmarks/ppo_ratio_noise.py --cache .cache --grpo-steps 8      # about 4 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_LOG_PATCH = """
import sys, trl
orig = trl.GRPOTrainer.log
def log(self, logs, *a, **k):
    if "grad_norm" in logs:
        print("GRADNORM", self.state.global_step, round(float(logs["grad_norm"]), 4), flush=True)
    return orig(self, logs, *a, **k)
trl.GRPOTrainer.log = log
from noisebench.cli import main
sys.argv = ["noisebench"] + sys.argv[1:]
main()
"""


def ratio_table(cache: str, scales) -> None:
    from omegaconf import OmegaConf

    from noisebench.noise import NoiseInjector, NoiseSpec
    from noisebench.testbeds import load_testbed

    cfg = OmegaConf.load(ROOT / "conf/testbed/tiny_sharpen.yaml").testbed
    tb = load_testbed(cfg, cache_dir=cache)
    model, tok = tb.model.eval(), tb.tokenizer
    torch.manual_seed(0)
    enc = tok([p["prompt"] for p in tb.train_dataset.select(range(64))], return_tensors="pt", padding=True,
              padding_side="left")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=True, pad_token_id=tok.pad_token_id)
    start = enc.input_ids.shape[1]
    comp = out[:, start:]
    mask = (comp != tok.pad_token_id).float()
    att = torch.cat([enc.attention_mask, mask.long()], 1)

    def logps():
        with torch.no_grad():
            lg = model(out, attention_mask=att).logits[:, start - 1:-1].float()
        return torch.log_softmax(lg, -1).gather(-1, comp[..., None])[..., 0]

    for scale in scales:
        spec = NoiseSpec(type="relative_gaussian", scale=scale, ops=["matmul_family"],
                         phases=["reference", "train_forward"], seed=0)
        with NoiseInjector(spec) as inj:
            with inj.phase("reference"):
                old = logps()
            with inj.phase("train_forward"):
                new = logps()
        r = torch.exp(new - old)
        n = mask.sum()
        print(f"scale {scale:g}: |log ratio| mean {((new - old).abs() * mask).sum() / n:.4f}; tokens outside "
              f"[0.8, 1.2] {100 * (((r > 1.2) | (r < 0.8)).float() * mask).sum() / n:.2f}%; ratio > 3 "
              f"{100 * ((r > 3).float() * mask).sum() / n:.2f}%; max ratio {(r * mask).max():.3g}", flush=True)


def grad_norms(cache: str, steps: int) -> None:
    for fix in ("none", "tis_token"):
        cmd = [sys.executable, "-c", _LOG_PATCH, "+exp=e4_5e-2", f"mitigation={fix}", "seed=0",
               f"trainer.max_steps={steps}", f"eval.eval_every={steps}", "eval.limit=50", "threads=2", "logger=none",
               "leaderboard.enabled=false", f"cache_dir={cache}", "results_dir=/tmp/ppo_ratio_noise"]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
        norms = [line.split()[2] for line in out.splitlines() if line.startswith("GRADNORM")]
        print(f"e4_5e-2 mitigation={fix}: grad norm per step {', '.join(norms)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="testbed cache root (default: noisebench's)")
    p.add_argument("--scales", default="0,1e-2,5e-2,1e-1")
    p.add_argument("--grpo-steps", type=int, default=0, help="also run N GRPO steps with and without tis_token")
    a = p.parse_args()
    ratio_table(a.cache, [float(s) for s in a.scales.split(",")])
    if a.grpo_steps:
        grad_norms(a.cache or str(Path.home() / ".cache/noisebench"), a.grpo_steps)


if __name__ == "__main__":
    main()
