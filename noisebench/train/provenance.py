"""What a record needs to reproduce its run: package versions, the source commit, the noise engine, the overrides."""
from __future__ import annotations

import platform
import subprocess

from noisebench.resources import checkout_root

PACKAGES = ("noisebench", "torch", "transformers", "trl", "lm_eval", "accelerate", "datasets", "hydra-core")


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_commit() -> str | None:
    """The commit of the source checkout this package runs from; None when installed from a wheel (a venv inside some
    other repository must not report that repository's commit) or when git is missing. Prints nothing."""
    root = checkout_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def noise_engine() -> dict:
    """Which noise paths drew this run's noise (same statistics, different draws): for reproducing it bitwise."""
    from noisebench.noise import engine_config

    return engine_config()


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of this run (None outside a Hydra app, e.g. in tests calling run())."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return None
