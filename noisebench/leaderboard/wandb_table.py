"""Log a leaderboard table to the active wandb run as a ``wandb.Table``; a no-op when wandb is not in use."""
from __future__ import annotations

import sys

import pandas as pd

from .columns import COLUMNS, render_rows


def log_leaderboard_table(df: pd.DataFrame, key: str = "leaderboard") -> bool:
    """Log the formatted leaderboard rows (same columns as the markdown) under ``key``.

    Why the sys.modules check: a process that never imported wandb has no active run, and importing wandb just to
    find that out would cost a second of start-up for every ``noisebench-leaderboard`` call.

    Returns:
        True if a table was logged, False if wandb is off (not imported, no active run, or disabled mode).
    """
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None or df is None or df.empty or getattr(run, "disabled", False):
        return False
    view = render_rows(df, COLUMNS)
    for m in ("clean", "noisy"):  # numeric deltas, so wandb can sort and plot them
        view.insert(len(view.columns), f"delta_{m}_pts", (100 * df[f"d_{m}"]).round(3).tolist())
    run.log({key: wandb.Table(dataframe=view)})
    return True
