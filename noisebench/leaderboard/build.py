"""Build every testbed's leaderboard: load records, compute the table, write markdown + plots, log to wandb."""
from __future__ import annotations

import os
from pathlib import Path

from noisebench.record import load_records, write_atomic

from . import markdown, reference
from .board import DEFAULT_MARGIN_PTS, sections
from .plots import make_plots
from .table import runs_frame
from .wandb_table import log_leaderboard_table


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic write that leaves an unchanged file untouched (no mtime churn for git or file watchers)."""
    if path.exists() and path.read_text() == text:
        return
    write_atomic(path, text)


def build_leaderboards(results_dir: str | os.PathLike = "results", out_dir: str | os.PathLike = "leaderboards",
                       n_boot: int = 2000, seed: int = 0, testbeds: list[str] | None = None,
                       reference_dir: str | os.PathLike | None = None, plots: bool = True,
                       log_wandb: bool = True, margin_pts: float | None = None) -> list[Path]:
    """Regenerate ``<out_dir>/<testbed>.md`` (and its PNGs) for every testbed found in the records under results_dir.

    Args:
        results_dir: folder searched recursively for ``record.json`` files.
        out_dir: where the boards go; created if needed.
        n_boot: bootstrap resamples for single-seed delta CIs (fixed RNG: reruns are byte-identical).
        seed: RNG seed of the bootstraps.
        testbeds: only these testbeds (default: all found). An unknown name raises ValueError listing those found.
        reference_dir: folder of external reference YAMLs (default ``<out_dir>/reference``, else the repository's
            ``leaderboards/reference``).
        plots: also write the PNG plots.
        log_wandb: log each board's table to the active wandb run, if any (a no-op otherwise).
        margin_pts: equivalence margin in accuracy points; default: ``leaderboard.margin_pts`` of the records' config
            (one value for all, else an error), else 2.

    Returns:
        The paths written (markdown first, then its plots), testbeds in sorted order.
    """
    if n_boot < 100:
        raise ValueError(f"n_boot={n_boot}: use at least 100 bootstrap resamples")
    out = Path(out_dir)
    records = load_records(results_dir)
    margin = declared_margin(records) if margin_pts is None else float(margin_pts)
    if not margin > 0:
        raise ValueError(f"leaderboard.margin_pts={margin}: the equivalence margin must be a positive number of points")
    runs_all = runs_frame(records) if records else None
    found = sorted(runs_all.testbed.unique()) if runs_all is not None else []
    if testbeds:
        unknown = sorted(set(testbeds) - set(found))
        if unknown:
            raise ValueError(f"testbed(s) {unknown} have no records under {results_dir}; found: {found}")
        found = [t for t in found if t in testbeds]
    refs = [reference.load_reference(p) for p in reference.find_reference_files(reference_dir, out)]
    written: list[Path] = []
    if found:
        out.mkdir(parents=True, exist_ok=True)
    for tb in found:
        runs = runs_all[runs_all.testbed == tb].reset_index(drop=True)
        secs = sections(runs, n_boot=n_boot, seed=seed, margin_pts=margin)
        notes = ([f"{int(runs.duplicate.sum())} duplicate record(s) of the same row and seed ignored (the latest "
                  "finished one is kept)."] if runs.duplicate.any() else [])
        main = secs[0] if secs else None
        pngs = make_plots(tb, runs[runs.setting == main.fingerprint], main.exps, out) if plots and main else []
        for stale in (out / f"{tb}_curves.png", out / f"{tb}_tolerance.png"):
            if plots and stale.exists() and stale not in pngs:
                stale.unlink()
        text = markdown.render(tb, runs, secs, notes, [p.name for p in pngs], refs, str(results_dir), str(out_dir),
                               n_boot, seed, margin)
        md = out / f"{tb}.md"
        _write_if_changed(md, text)
        written += [md, *pngs]
        if log_wandb and main is not None:
            log_leaderboard_table(main.exps, key=f"leaderboard/{tb}")
    return written


def declared_margin(records: list[dict]) -> float:
    """The equivalence margin the runs were made under (``leaderboard.margin_pts`` in their config), else 2 points."""
    found = {float(m) for r in records
             if (m := ((r.get("config") or {}).get("leaderboard") or {}).get("margin_pts")) is not None}
    if len(found) > 1:
        raise ValueError(f"records declare different leaderboard.margin_pts {sorted(found)}: pass one with --margin")
    return found.pop() if found else DEFAULT_MARGIN_PTS
