"""Hydra callback that rebuilds the leaderboards once at the end of a multirun (``noisebench -m ...``).

Registered in ``conf/config.yaml`` under ``hydra.callbacks.leaderboard`` with ``_target_:
noisebench.leaderboard.hydra_callback.LeaderboardCallback``. Single runs rebuild from ``noisebench.cli`` instead.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)


class LeaderboardCallback(Callback):
    """Rebuild ``<out_dir>/<testbed>.md`` from ``results_dir`` when every job of a multirun has returned.

    Args:
        results_dir: folder with the runs' record.json files; relative paths are taken from the launch directory.
        out_dir: leaderboard folder.
        enabled: False turns the callback into a no-op (``leaderboard.enabled=false``).
        n_boot: bootstrap resamples for single-seed delta CIs.
    """

    def __init__(self, results_dir: str | os.PathLike = "results", out_dir: str | os.PathLike = "leaderboards",
                 enabled: bool = True, n_boot: int = 2000) -> None:
        # Kept as given (the board's header prints them in its remake command); resolved against the launch
        # directory only if the working directory has changed by the end of the multirun.
        self.results_dir, self.out_dir = str(results_dir), str(out_dir)
        self.launch_dir = os.getcwd()
        self.enabled = bool(enabled)
        self.n_boot = int(n_boot)
        self.written: list[Path] = []

    def on_multirun_end(self, config: Any = None, **kwargs: Any) -> None:
        """Called by Hydra on the launching machine after all jobs. A failure is logged, never raised: the runs'
        records are already safe on disk and ``noisebench-leaderboard`` can rebuild the boards later."""
        if not self.enabled:
            return
        from noisebench.leaderboard import build_leaderboards

        results, out = self.results_dir, self.out_dir
        if os.getcwd() != self.launch_dir:
            results, out = (str(Path(self.launch_dir, p)) for p in (results, out))
        try:
            self.written = build_leaderboards(results, out, n_boot=self.n_boot)
        except Exception:  # noqa: BLE001 -- a board must never turn a finished sweep into a failure
            log.exception("leaderboard rebuild failed; rerun: noisebench-leaderboard --results %s --out %s",
                          self.results_dir, self.out_dir)
            return
        for p in self.written:
            log.info("leaderboard: %s", p)
