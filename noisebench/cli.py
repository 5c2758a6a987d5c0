"""Console entry points: ``noisebench`` (train + evaluate + record + leaderboard) and ``noisebench-eval``.

Thin Hydra wrappers; the work is in ``noisebench.train.runner`` and ``noisebench.evaluate``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from noisebench import __version__
from noisebench.resources import resource_dir
from noisebench.schema import register
from noisebench.schema.preflight import preflight
from noisebench.train.rundirs import register_resolvers

CONF_DIR = os.environ.get("NOISEBENCH_CONF_DIR") or str(resource_dir("conf"))  # the package's, or the checkout's
log = logging.getLogger("noisebench")

register_resolvers()
register()  # the schemas conf/ names in its defaults lists


def threads_per_run(cfg: DictConfig) -> int | None:
    """Torch threads for this run: ``threads`` when set; under a parallel launcher (``hydra/launcher=joblib``) the
    machine's cores split evenly among its ``n_jobs`` runs, so N runs fill N cores instead of oversubscribing them
    (two runs of 2 threads on 2 cores made evaluation ~50x slower); otherwise torch's default (None)."""
    if str(cfg.get("threads", "auto")) != "auto":
        return int(cfg.threads)
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
    if n_jobs is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    cores = os.cpu_count() or 1
    jobs = cores if int(n_jobs) < 0 else min(int(n_jobs), cores)
    return max(1, cores // max(1, jobs))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    threads = threads_per_run(cfg)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if cfg.dry_run:
        from noisebench.train.plan import dry_run

        return dry_run(cfg)
    from noisebench.train.runner import run

    single = HydraConfig.get().mode != RunMode.MULTIRUN  # a multirun rebuilds once, at its end (Hydra callback)
    record = run(cfg, HydraConfig.get().runtime.output_dir, leaderboard=single)
    final = (record.get("final") or {}).get("acc")
    log.info("%s/%s seed %s: status %s, final accuracy %s, record %s", record["testbed"], record["experiment"],
             record["seed"], record["status"], final, Path(record["run_dir"]) / "record.json")
    return final


def main() -> None:
    """``noisebench`` (and ``python -m noisebench``): exits non-zero when a dry run finds problems, 2 on a bad
    config value."""
    if sys.argv[1:] == ["--version"]:  # Hydra owns every other argument
        print(f"noisebench {__version__}")
        return
    preflight(CONF_DIR, "config")
    _main()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval_only")
def _eval_main(cfg: DictConfig) -> float | None:
    from noisebench.evaluate_only import evaluate_only

    return evaluate_only(cfg, HydraConfig.get().runtime.output_dir)


def eval_main() -> None:
    """``noisebench-eval``: evaluate any checkpoint or hub model under any noise spec, without training."""
    preflight(CONF_DIR, "eval_only", prog="noisebench-eval")
    _eval_main()


if __name__ == "__main__":
    sys.exit(main())
