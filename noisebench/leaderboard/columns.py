"""The column registry of a leaderboard row: title, number format, direction and legend text, defined once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def sci(x) -> str:
    """1e-02, 2.5e-03: scientific with a trimmed mantissa (stable, short)."""
    if _nan(x):
        return "—"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{exp}"


def pct(x) -> str:
    return "—" if _nan(x) else f"{100 * x:.1f}"


def signed_pct(x) -> str:
    return "—" if _nan(x) else f"{100 * x:+.1f}"


def times(x) -> str:
    return "—" if _nan(x) else f"{x:.2g}×"


def pvalue(p) -> str:
    if _nan(p):
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _acc(r) -> str:
    if _nan(r.acc_lo):
        return pct(r.acc)
    return f"{pct(r.acc)} [{pct(r.acc_lo)}, {pct(r.acc_hi)}]"


def _delta(r) -> str:
    if r.is_baseline:
        return "0 (reference)"
    if _nan(r.delta):
        return "—"
    return f"{signed_pct(r.delta)} [{signed_pct(r.delta_lo)}, {signed_pct(r.delta_hi)}]"


def _best(r) -> str:
    return "—" if _nan(r.best_acc) else f"{pct(r.best_acc)} @ {int(r.best_step)}"


def _seeds(r) -> str:
    div = f", {r.n_diverged} diverged" if r.n_diverged else ""
    return f"{r.n_seeds} ({r.seeds}){div}"


def _steps(r) -> str:
    if _nan(r.steps_min):
        return "—"
    lo, hi = int(r.steps_min), int(r.steps_max)
    return str(lo) if lo == hi else f"{lo}–{hi}"


@dataclass(frozen=True)
class Column:
    """One leaderboard column: ``fmt`` renders a row, ``higher_is_better`` puts an arrow in the title."""

    key: str
    title: str
    fmt: Callable[[pd.Series], str]
    help: str
    higher_is_better: bool | None = None

    @property
    def header(self) -> str:
        arrow = {True: " ↑", False: " ↓", None: ""}[self.higher_is_better]
        return self.title + arrow


COLUMNS = (
    Column("rank", "#", lambda r: str(r["rank"]), "rank by delta vs baseline (baseline row sits at delta 0)"),
    Column("experiment", "experiment", lambda r: f"`{r.experiment}`", "experiment name (`+exp=NAME` preset)"),
    Column("noise", "noise", lambda r: r.noise, "noise model (NoiseSpec.type, with its format/bits/variant) and AQN"),
    Column("scale", "scale", lambda r: sci(r.scale), "NoiseSpec.scale (sigma, relative bias or flip probability)"),
    Column("x_bf16", "× bf16", lambda r: times(r.x_bf16),
           "relative error RMS in units of bf16 rounding (1.66e-3); only for relative noise and rounding"),
    Column("x_fp8", "× fp8", lambda r: times(r.x_fp8), "the same in units of fp8 e4m3 rounding (2.7e-2)"),
    Column("ops", "ops", lambda r: r.ops or "—", "noisy operators (names or sets)"),
    Column("phases", "phases", lambda r: r.phases or "—", "phases where noise applies"),
    Column("seeds", "seeds", _seeds, "number of runs (their seeds); diverged runs are counted here"),
    Column("acc", "final acc %", _acc, "final strict accuracy, mean over seeds [95% CI]", True),
    Column("best", "best acc % @ step", _best, "best seed-mean accuracy over the checkpoints, and its step", True),
    Column("delta", "Δ vs baseline (pts)", _delta, "final accuracy minus the baseline's, points [95% CI]", True),
    Column("mcnemar_p", "McNemar p", lambda r: pvalue(r.mcnemar_p),
           "single-seed pairs only: exact McNemar mid-p on the items the two runs disagree on"),
    Column("verdict", "verdict", lambda r: f"**{r.verdict}**" if r.verdict in ("degraded", "diverged") else r.verdict,
           "degraded / improved: delta CI entirely below / above 0; diverged: a seed ended NaN/inf"),
    Column("final_reward", "final reward", lambda r: "—" if _nan(r.final_reward) else f"{r.final_reward:.3f}",
           "mean training reward of the last step, mean over seeds", True),
    Column("mean_kl", "mismatch KL", lambda r: sci(r.mean_kl),
           "mean rollout/training KL over the run (record mismatch.mean_kl), mean over seeds", False),
    Column("steps", "steps", _steps, "training steps done (range over seeds)"),
    Column("wall", "wall min/run", lambda r: "—" if _nan(r.wall_time_s) else f"{r.wall_time_s / 60:.1f}",
           "wall time per run in minutes, mean over seeds", False),
)


def render_rows(df: pd.DataFrame, columns=COLUMNS) -> pd.DataFrame:
    """Format every row with the registry: a DataFrame of strings with the registry's headers."""
    data = {c.header: [c.fmt(r) for _, r in df.iterrows()] for c in columns}
    return pd.DataFrame(data, columns=[c.header for c in columns])


def legend(columns=COLUMNS) -> list[str]:
    """Legend lines, one per column, from the registry."""
    return [f"- **{c.header}**: {c.help}" for c in columns]
