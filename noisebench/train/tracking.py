"""wandb tracking, offline by default: files in the run folder, ``wandb sync`` uploads them later.

One wandb run per experiment run: project ``noisebench``, group = experiment, tags = testbed and noise type. A
resumed run continues the same wandb run (its id is kept in the run folder's ``run.json``; ``resume="allow"``), so a
sync uploads one run, not one per launch.
``logger=none`` (or ``logger.enabled=false``) makes every call a no-op.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class Tracker:
    def __init__(self, cfg: DictConfig, run_dir: Path, tags: list[str]):
        self.run = None
        lg = cfg.logger
        if not lg.enabled or lg.mode == "disabled":
            return
        import wandb

        from noisebench.train.rundirs import read_run_file

        os.environ.setdefault("WANDB_SILENT", "true")
        run_id = (read_run_file(run_dir) or {}).get("wandb_id")
        self.run = wandb.init(
            id=run_id, resume="allow" if run_id else None,
            project=lg.project, entity=lg.entity, group=str(cfg.experiment), name=Path(run_dir).name,
            job_type="grpo", tags=[str(t) for t in tags], mode=lg.mode, dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True), reinit="finish_previous",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self, record: dict) -> None:
        if self.run is None:
            return
        final = record.get("final") or {}
        self.run.summary.update({"status": record["status"], "final_acc": final.get("acc"),
                                 "wall_time_s": record.get("wall_time_s"),
                                 **{f"telemetry/{k}": v for k, v in (record.get("telemetry") or {}).items()}})
        self.run.finish(exit_code=0 if record["status"] == "ok" else 1)
        self.run = None
