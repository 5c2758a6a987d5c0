"""Run folders: ``<results>/<testbed>/<experiment>/<YYYYmmdd-HHMMSS>-s<seed>``, and finding the one to resume.

Registered as OmegaConf resolvers (``nb_run_dir``, ``nb_run_subdir``) so Hydra's own run/sweep dirs are the run
folders: `.hydra/`, the log, checkpoints, eval samples, wandb files and record.json all live together.
"""
from __future__ import annotations

import functools
import json
import os
import time
from pathlib import Path

from omegaconf import OmegaConf


def _is_true(x) -> bool:
    return str(x).lower() in ("true", "1", "yes")


def find_resumable(results_dir: str, testbed: str, experiment: str, seed) -> Path | None:
    """Latest run folder of (testbed, experiment, seed) whose record is missing or not final (`ok`)."""
    parent = Path(results_dir) / testbed / experiment
    if not parent.is_dir():
        return None
    for d in sorted(parent.glob(f"*-s{seed}"), reverse=True):
        rec = d / "record.json"
        if rec.exists():
            try:
                if json.loads(rec.read_text()).get("status") == "ok":
                    continue
            except (OSError, json.JSONDecodeError):
                pass
        return d
    return None


@functools.lru_cache(maxsize=None)
def run_subdir(results_dir: str, testbed: str, experiment: str, seed, resume) -> str:
    """Folder of this run relative to results_dir (cached: Hydra may resolve the dir more than once)."""
    if _is_true(resume):
        found = find_resumable(results_dir, testbed, experiment, seed)
        if found is not None:
            return str(found.relative_to(results_dir))
    # Several processes of one run (accelerate launch) must agree on the folder: share a stamp through the env.
    stamp = os.environ.get("NOISEBENCH_RUN_STAMP") or time.strftime("%Y%m%d-%H%M%S")
    return f"{testbed}/{experiment}/{stamp}-s{seed}"


def run_dir(results_dir: str, testbed: str, experiment: str, seed, resume) -> str:
    return str(Path(results_dir) / run_subdir(results_dir, testbed, experiment, seed, resume))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("nb_run_dir"):
        OmegaConf.register_new_resolver("nb_run_dir", run_dir)
    if not OmegaConf.has_resolver("nb_run_subdir"):
        OmegaConf.register_new_resolver("nb_run_subdir", run_subdir)
