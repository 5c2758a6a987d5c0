"""The column registry of a leaderboard row: title, number format, direction and legend text, defined once."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from .metrics import K3_RESOLUTION


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


def _delta(m: str):
    """Render a delta column: +x.x [lo, hi] in points, the baseline as the reference."""
    def fmt(r) -> str:
        if r.is_baseline:
            return "0 (ref)"
        d = getattr(r, f"d_{m}")
        if _nan(d):
            return "n/a"
        lo, hi = getattr(r, f"d_{m}_lo"), getattr(r, f"d_{m}_hi")
        return signed_pct(d) if _nan(lo) else f"{signed_pct(d)} [{signed_pct(lo)}, {signed_pct(hi)}]"
    return fmt


def _pair(a, b) -> str:
    """strict / flexible accuracy, n/a when the run was not scored that way."""
    return "n/a" if _nan(a) else f"{pct(a)} / {pct(b)}"


def _verdict(m: str):
    def fmt(r) -> str:
        v = getattr(r, f"verdict_{m}")
        return f"**{v}**" if v in ("degraded", "diverged") else v
    return fmt


def _mde(r) -> str:
    """The training-harm MDE, the deployment one for records made without clean evaluation."""
    v = r.mde_clean if not _nan(r.mde_clean) else r.mde_noisy
    return "—" if r.is_baseline or _nan(v) else f"{100 * v:.1f}"


def k3(x) -> str:
    """k3 KL estimate; below float32 resolution of exp(r) - r - 1 (clean runs land at about -1e-10) it is ~0."""
    if _nan(x):
        return "—"
    return f"<{sci(K3_RESOLUTION)}" if x < K3_RESOLUTION else sci(x)


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
    Column("rank", "#", lambda r: r["rank"], "rank by the training-harm delta (deployment harm where no clean scores); "
           "only the baseline and rows that differ from it (degraded / improved) get a number"),
    Column("experiment", "experiment", lambda r: f"`{r.experiment}`", "experiment name (`+exp=NAME` preset); "
           "`baseline` pools every clean run of the setting"),
    Column("noise", "noise", lambda r: r.noise, "noise model (NoiseSpec.type, with its format/bits/variant) and AQN"),
    Column("scale", "scale", lambda r: sci(r.scale), "NoiseSpec.scale (sigma, relative bias or flip probability)"),
    Column("x_bf16", "× bf16", lambda r: times(r.x_bf16),
           "relative error RMS in units of bf16 rounding (1.66e-3); only for relative noise and rounding"),
    Column("ops", "ops", lambda r: r.ops or "—", "noisy operators (names or sets); \"(no attn products)\": the "
           "records name a set that covers attention QK^T and PV, but their telemetry shows none noised (made "
           "before the engine decomposed SDPA)"),
    Column("phases", "phases", lambda r: r.phases or "—", "phases where noise applies"),
    Column("seeds", "seeds", _seeds, "number of runs (their seeds); diverged runs are counted here"),
    Column("clean", "clean acc % strict / flex", lambda r: _pair(r.clean, r.flex),
           "final accuracy of the checkpoints scored with noise off (strict `#### N` / last number), seed mean", True),
    Column("d_clean", "Δ clean (pts)", _delta("clean"),
           "**training harm**: clean final strict accuracy minus the baseline's [95% CI]", True),
    Column("d_auc", "Δ clean AUC (pts)", _delta("auc"),
           "training harm over time: area under the clean learning curve / steps, minus the baseline's [95% CI]", True),
    Column("d_flex", "Δ clean flex (pts)", _delta("flex"), "clean final last-number accuracy minus the baseline's "
           "[95% CI]", True),
    Column("noisy", "noisy acc % strict / flex", lambda r: _pair(r.noisy, r.noisy_flex),
           "final accuracy scored under the eval phase's noise (= clean when eval is not a noisy phase)", True),
    Column("d_noisy", "Δ noisy (pts)", _delta("noisy"),
           "**deployment harm**: noisy final strict accuracy minus the baseline's [95% CI]", True),
    Column("mde", "MDE (pts)", _mde, "smallest true training-harm delta these seeds detect with 80% power (alpha 0.05 "
           "two-sided), from the pooled seed SD and the row's and baseline's seed counts", False),
    Column("verdict_clean", "training verdict", _verdict("clean"), "verdict on Δ clean (see the verdicts below)"),
    Column("verdict_auc", "learning verdict", _verdict("auc"), "verdict on Δ clean AUC: slowed learning, even "
           "where the final score catches up"),
    Column("verdict_noisy", "deployment verdict", _verdict("noisy"), "verdict on Δ noisy"),
    Column("note", "note", lambda r: r.note or "", "what a row's statistics rest on when not the pooled default"),
    Column("reward_last", "reward (last 10)", lambda r: "—" if _nan(r.reward_last) else f"{r.reward_last:.3f}",
           "mean training reward over the last 10 steps, mean over seeds", True),
    Column("k3", "mismatch KL (k3)", lambda r: k3(r.k3), "rollout-vs-training KL, k3 estimator mean(exp(r) - r - 1) "
           "(non-negative; record mismatch.mean_k3_kl), mean over seeds", False),
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
