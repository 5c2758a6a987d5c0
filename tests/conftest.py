"""Shared fixtures: the real Hydra config, composed then shrunk (lightning-hydra-template style)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_GSM8K = Path(os.environ.get("NOISEBENCH_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One warm-start cache for the whole session (NOISEBENCH_CACHE reuses a developer's own cache)."""
    env = os.environ.get("NOISEBENCH_TEST_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("nb_cache")


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """The real config tree composed with Hydra's compose API (no run dir, no callbacks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from noisebench.schema import register
    from noisebench.train.rundirs import register_resolvers

    register_resolvers()
    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


def small_run_overrides(tmp_path: Path, cache: Path, steps: int = 4, warm: bool = True) -> list[str]:
    """A GRPO run shrunk to seconds: few steps, few prompts, short evaluations, no wandb."""
    out = [
        f"results_dir={tmp_path / 'results'}", f"cache_dir={cache}", f"leaderboard.out_dir={tmp_path / 'boards'}",
        f"trainer.max_steps={steps}", "trainer.prompts_per_step=4", "trainer.num_generations=4",
        "eval.eval_every=2", "eval.limit=48", "eval.batch_size=48", "logger=none", "device=cpu",
    ]
    if not warm:
        out.append("testbed.warmstart.steps=0")
    return out
