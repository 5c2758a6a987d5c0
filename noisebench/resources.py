"""Where the configs, lm-eval task YAMLs and reference figures are, installed or not.

A wheel ships them inside the package (``noisebench/conf``, ``noisebench/tasks``, ``noisebench/reference``: the
build maps the checkout's top-level ``conf/``, ``tasks/`` and ``leaderboards/reference/`` there, see
pyproject.toml). A source checkout (an editable install, or ``PYTHONPATH`` pointing at it) keeps them where they are
edited, beside the package. Imports nothing of noisebench, so any layer may ask.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

IN_CHECKOUT = {"conf": "conf", "tasks": "tasks", "reference": "leaderboards/reference"}  # name -> source folder


def package_dir() -> Path:
    return Path(str(importlib.resources.files("noisebench")))


def checkout_root() -> Path | None:
    """The source checkout this package runs from (its pyproject.toml beside the package), else None."""
    root = package_dir().parent
    return root if (root / "pyproject.toml").is_file() and (root / "noisebench").is_dir() else None


def resource_dir(name: str) -> Path:
    """The folder of ``name`` (``conf``, ``tasks`` or ``reference``): the package's own copy when installed from a
    wheel, else the checkout's source folder. The path may not exist (callers say what is missing and how to fix
    it); ``NOISEBENCH_CONF_DIR``/``NOISEBENCH_TASKS_DIR`` overrides are read by the callers."""
    if name not in IN_CHECKOUT:
        raise ValueError(f"unknown resource {name!r}; valid choices: {sorted(IN_CHECKOUT)}")
    packaged = package_dir() / name
    if packaged.is_dir():
        return packaged
    root = checkout_root()
    return (root / IN_CHECKOUT[name]) if root is not None else packaged
