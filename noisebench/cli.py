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

from noisebench import console
from noisebench.train.outcome import TALLY, interrupt_code, interrupts_raise, signal_name
from noisebench.train.rundirs import register_resolvers

CONF_DIR = os.environ.get("NOISEBENCH_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))
log = logging.getLogger("noisebench")

register_resolvers()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    if cfg.dry_run:
        from noisebench.train.plan import dry_run

        return dry_run(cfg)
    from noisebench.train.runner import run

    console.setup_libraries()

    from hydra.types import RunMode

    single = HydraConfig.get().mode != RunMode.MULTIRUN  # a multirun rebuilds once, at its end (Hydra callback)
    name = f"{cfg.experiment} seed {cfg.seed}"
    try:
        record = run(cfg, HydraConfig.get().runtime.output_dir, leaderboard=single)
    except Exception:  # noqa: BLE001 -- failed before training: a multirun goes on to its next run
        if single:
            raise
        log.exception("%s failed before training", name)
        TALLY.add(name, "failed")
        return None
    TALLY.add(name, record["status"])
    final = (record.get("final") or {}).get("acc")
    log.info("%s/%s seed %s: status %s, final accuracy %s, record %s", record["testbed"], record["experiment"],
             record["seed"], record["status"], final, Path(record["run_dir"]) / "record.json")
    return final


def main() -> None:
    """``noisebench``: exit codes in ``noisebench.train.outcome`` (0 ok, 3 diverged, 4 failed, 130/143 interrupted)."""
    console.setup()
    try:
        with interrupts_raise():
            _main()
    except KeyboardInterrupt as exc:  # the run's record is written (status interrupted) before this propagates
        log.warning("interrupted by %s; continue with resume=true", signal_name(exc))
        sys.exit(interrupt_code(exc))
    if len(TALLY.runs) > 1:
        log.info("multirun: %s", TALLY.summary())
    sys.exit(TALLY.exit_code())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval_only")
def _eval_main(cfg: DictConfig) -> float | None:
    from noisebench.evaluate_only import evaluate_only

    return evaluate_only(cfg, HydraConfig.get().runtime.output_dir)


def eval_main() -> None:
    """``noisebench-eval``: evaluate any checkpoint or hub model under any noise spec, without training."""
    console.setup()
    _eval_main()


if __name__ == "__main__":
    sys.exit(main())
