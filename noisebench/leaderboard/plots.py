"""Leaderboard plots (matplotlib Agg): accuracy vs step with seed bands, and delta vs noise scale (tolerance)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .board import primary_metric  # noqa: E402
from .table import BF16_RMS, FP8_RMS, mean_curve  # noqa: E402

STYLE = {"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "svg.hashsalt": "noisebench"}


def save_png(fig, path: Path) -> None:
    """Write the figure only if its bytes changed (no Software/date metadata), atomically, so reruns do not churn."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    data = buf.getvalue()
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def curves_plot(testbed: str, runs: pd.DataFrame, exps: pd.DataFrame, path: Path) -> Path | None:
    """Seed-mean accuracy vs step per row, min-max band over seeds; the baseline drawn black and thick.

    The clean curves (training harm) when the rows were scored clean, else the noisy ones.
    """
    ok = runs[runs.status.isin(["ok", "diverged"]) & ~runs.duplicate]
    if ok.empty or exps.empty:
        return None
    clean = primary_metric(exps) == "clean"
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        cmap = plt.get_cmap("tab10")
        for k, r in enumerate(exps.sort_values(["is_baseline", "experiment", "group"],
                                               ascending=[False, True, True]).itertuples()):
            mc = mean_curve(list(ok[ok.group == r.group]["curve_clean" if clean else "curve"]))
            if mc.empty:
                continue
            color = "black" if r.is_baseline else cmap((k - 1) % 10)
            label = f"{r.experiment} ({r.n_seeds} seed{'s' if r.n_seeds > 1 else ''})"
            ax.plot(mc.step, 100 * mc["mean"], color=color, lw=2.2 if r.is_baseline else 1.3, label=label,
                    marker="o", ms=3)
            if r.n_seeds > 1:
                ax.fill_between(mc.step, 100 * mc.lo, 100 * mc.hi, color=color, alpha=0.15, lw=0)
        ax.set(xlabel="training step", ylabel=f"{'clean' if clean else 'noisy'}-evaluated strict accuracy (%)",
               title=f"{testbed}: accuracy vs step (band: min–max over seeds)")
        _finish(fig, ax, path)
    return path


def _finish(fig, ax, path: Path) -> None:
    """Shared styling tail of every plot: grid, legend, tight layout, deterministic PNG."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_png(fig, path)


def tolerance_plot(testbed: str, exps: pd.DataFrame, path: Path) -> Path | None:
    """Delta vs scale (log x) with 95% CI bars, one line per noise setting swept over >= 2 scales; None if no sweep.

    The training-harm delta (clean evaluation) when scored, else the deployment one.
    """
    m = primary_metric(exps)
    d, lo, hi = exps[f"d_{m}"], exps[f"d_{m}_lo"], exps[f"d_{m}_hi"]
    exps = exps.assign(delta=d, delta_lo=lo.fillna(d), delta_hi=hi.fillna(d))
    sw = exps[~exps.is_baseline & exps.scale.notna() & (exps.scale > 0) & exps.delta.notna()]
    groups = [(k, g.sort_values("scale")) for k, g in sw.groupby(["noise", "ops", "phases", "aqn"], sort=True)
              if g.scale.nunique() >= 2]
    if not groups:
        return None
    relative = False
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for (noise, ops, phases, _), g in groups:
            relative |= g.rel_rms.notna().any()
            yerr = [100 * (g.delta - g.delta_lo), 100 * (g.delta_hi - g.delta)]
            ax.errorbar(g.scale, 100 * g.delta, yerr=yerr, marker="o", ms=4, capsize=3,
                        label=f"{noise} [{ops}; {phases}]")
        ax.axhline(0, color="black", lw=0.8)
        if relative:
            for x, name in ((BF16_RMS, "bf16 rounding"), (FP8_RMS, "fp8 e4m3 rounding")):
                ax.axvline(x, color="grey", ls="--", lw=0.8)
                ax.annotate(name, (x, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                            va="top", ha="right", color="grey")
        ax.set_xscale("log")
        ax.set(xlabel="noise scale", ylabel=f"Δ {m} accuracy vs baseline (pts, 95% CI)",
               title=f"{testbed}: tolerance to noise scale")
        _finish(fig, ax, path)
    return path


def make_plots(testbed: str, runs: pd.DataFrame, exps: pd.DataFrame, out_dir: Path) -> list[Path]:
    """All plots of one testbed, written next to its markdown; returns the paths written (sorted by kind)."""
    if exps.empty:
        return []
    made = [curves_plot(testbed, runs, exps, out_dir / f"{testbed}_curves.png"),
            tolerance_plot(testbed, exps, out_dir / f"{testbed}_tolerance.png")]
    return [p for p in made if p is not None]
