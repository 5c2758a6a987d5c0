"""``noisebench-eval``: evaluate one checkpoint under a noise spec (and clean), without training."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from noisebench.record import write_atomic

log = logging.getLogger("noisebench")


def evaluate_only(cfg: DictConfig, out_dir: str | os.PathLike) -> float:
    from noisebench.evaluate import evaluate_checkpoint, load_checkpoint
    from noisebench.noise import NoiseInjector
    from noisebench.testbeds import load_testbed
    from noisebench.train.builders import noise_spec, pick_device

    out_dir = Path(out_dir)
    device = pick_device(str(cfg.device))
    spec = noise_spec(cfg)
    tb = load_testbed(cfg.testbed, cache_dir=cfg.cache_dir, device=device)
    model, tokenizer = tb.model, tb.tokenizer
    if cfg.checkpoint:
        model, tokenizer = load_checkpoint(cfg.checkpoint, device=device)
    injector = NoiseInjector(spec, hooks="attached", intercept="patch")   # lm-eval's HF model runs eager
    injector.attach(model)
    e = cfg.eval
    common = dict(task=tb.eval_task, data_files=tb.eval_data_files, limit=e.limit, batch_size=int(e.batch_size),
                  max_gen_toks=int(e.max_gen_toks or tb.max_completion_length), injector=injector)
    with injector:
        res = evaluate_checkpoint(model, tokenizer, noisy=True, clean_too=bool(e.clean_too), output_dir=out_dir,
                                  **common)
    noisy, clean = res.noisy, res.clean
    summary = {
        "checkpoint": cfg.checkpoint or tb.model_path, "testbed": tb.name, "task": tb.eval_task,
        "noise": spec.to_dict(), "acc": res.acc, "acc_flexible": res.acc_flexible, "n": res.n,
        "acc_clean": clean.acc if clean else (res.acc if not noisy else None),
        "per_item": res.per_item, "per_item_clean": clean.per_item if clean else None,
        "telemetry": injector.telemetry(),
    }
    write_atomic(out_dir / "eval_record.json", json.dumps(summary, indent=1, sort_keys=True))
    msg = f"{tb.eval_task}: accuracy {res.acc:.4f} ({'noisy' if noisy else 'clean'}, n={res.n})"
    if clean is not None:
        msg += f", clean {clean.acc:.4f}, delta {res.acc - clean.acc:+.4f}"
    print(msg)
    log.info("eval record: %s", out_dir / "eval_record.json")
    return res.acc
