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
from omegaconf import DictConfig

from noisebench.schema import register
from noisebench.schema.preflight import preflight
from noisebench.train.rundirs import register_resolvers

CONF_DIR = os.environ.get("NOISEBENCH_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))
log = logging.getLogger("noisebench")

register_resolvers()
register()  # the schemas conf/ names in its defaults lists


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    if cfg.dry_run:
        from noisebench.train.plan import dry_run

        return dry_run(cfg)
    from noisebench.train.runner import run

    from hydra.types import RunMode

    single = HydraConfig.get().mode != RunMode.MULTIRUN  # a multirun rebuilds once, at its end (Hydra callback)
    record = run(cfg, HydraConfig.get().runtime.output_dir, leaderboard=single)
    final = (record.get("final") or {}).get("acc")
    log.info("%s/%s seed %s: status %s, final accuracy %s, record %s", record["testbed"], record["experiment"],
             record["seed"], record["status"], final, Path(record["run_dir"]) / "record.json")
    return final


def main() -> None:
    """``noisebench``: exits non-zero when a dry run finds problems, 2 on a bad config value."""
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
