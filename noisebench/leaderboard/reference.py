"""External reference figures (the original study's published numbers) as data, and their markdown sections."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import yaml

from noisebench.resources import resource_dir

from .columns import pct, sci, times
from .table import BF16_RMS, FP8_RMS

REFERENCE_DIR = resource_dir("reference")  # the project's own copy: in the package (a wheel) or the checkout
FULL_REFERENCE_TESTBEDS = ("qwen2_5_1_5b_gsm8k",)  # testbeds whose setting the reference figures come from
TAG = "EXTERNAL"


def find_reference_files(reference_dir: str | Path | None, out_dir: str | Path) -> list[Path]:
    """Reference YAMLs: ``reference_dir`` if given, else ``<out_dir>/reference``, else the repository's copy."""
    if reference_dir is not None:
        cands = [Path(reference_dir)]
    else:
        cands = [Path(out_dir) / "reference", REFERENCE_DIR]
    for d in cands:
        files = sorted(d.glob("*.yaml")) if d.is_dir() else []
        if files:
            return files
    return []


def load_reference(path: str | Path) -> dict:
    """Read one reference YAML and check the keys the boards use (``baseline.final_ood_acc``, ``runs[].curve``)."""
    with open(path) as f:
        ref = yaml.safe_load(f)
    for key in ("source", "testbed", "baseline", "runs"):
        if key not in (ref or {}):
            raise KeyError(f"reference file {path}: missing key {key!r} (needs source, testbed, baseline, runs)")
    for run in ref["runs"]:
        if "curve" not in run or "name" not in run:
            raise KeyError(f"reference file {path}: run {run!r} lacks 'name' or 'curve'")
    ref["_file"] = Path(path).name
    return ref


def reference_frame(ref: dict) -> pd.DataFrame:
    """One row per published run: final accuracy/reward (percent as published) and delta vs the study's baseline."""
    base = float(ref["baseline"]["final_ood_acc"])
    rows = [{"run": ref["baseline"].get("name", "baseline"), "noise": "none", "scale": math.nan, "ops": "—",
             "phases": "—", "final_step": ref["testbed"].get("steps"), "acc": base, "reward": math.nan,
             "delta": 0.0}]
    for run in ref["runs"]:
        noise = run.get("noise") or {}
        last = max(run["curve"])
        acc, reward = run["curve"][last]
        scale = float(noise.get("scale", math.nan))
        rows.append({"run": run["name"], "noise": noise.get("type", "?"), "scale": scale,
                     "ops": ",".join(noise.get("ops", [])), "phases": ",".join(noise.get("phases", [])),
                     "final_step": last, "acc": float(acc), "reward": math.nan if reward is None else float(reward),
                     "delta": float(acc) - base})
    return pd.DataFrame(rows)


def _one_run_halfwidth(acc_pct: float, n: int) -> float:
    """95% CI half-width (points) of one run's accuracy on n items: why a few tenths of a point are noise."""
    p = acc_pct / 100
    return 196 * math.sqrt(p * (1 - p) / n)


def _n_test(ref: dict) -> int | None:
    text = str(ref["testbed"].get("dataset", ""))
    digits = [int(t) for t in text.replace("(", " ").replace(",", " ").split() if t.isdigit()]
    return digits[-1] if digits else None


def _describe(planned: dict) -> str:
    """``type=..., scale=..., ops=a,b`` of a planned run, then its note."""
    items = [f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}"
             for k, v in sorted((planned.get("noise") or {}).items())]
    return "; ".join(items + ([planned["note"]] if planned.get("note") else []))


def full_section(ref: dict) -> list[str]:
    """The long external section for the testbed the study ran on: finals, curves, planned runs, a caveat."""
    df = reference_frame(ref)
    tb = ref["testbed"]
    lines = [f"## Reference: the original study ({TAG}, not produced by noisebench)", "",
             f"> **External figures**, copied as published into `leaderboards/reference/{ref['_file']}`; not runs of "
             "this project, no per-item data, so no confidence intervals or significance can be computed for them.",
             f"> Source: {ref['source']}. Setting: {tb.get('model')}, {tb.get('dataset')}, {tb.get('algorithm')}, "
             f"{tb.get('steps')} steps, {tb.get('hardware')}.", ""]
    table = pd.DataFrame({
        "run (external)": [f"{TAG}: `{r}`" for r in df.run], "noise": df.noise, "scale": df.scale.map(sci),
        "× bf16": (df.scale / BF16_RMS).map(times), "× fp8": (df.scale / FP8_RMS).map(times), "ops": df.ops,
        "phases": df.phases, "final acc %": df.acc.map(lambda x: f"{x:.2f}"),
        "final reward %": df.reward.map(lambda x: "—" if math.isnan(x) else f"{x:.1f}"),
        "Δ vs study baseline (pts)": df.delta.map(lambda x: f"{x:+.2f}"), "at step": df.final_step.astype(str)})
    lines += [table.to_markdown(index=False, disable_numparse=True), ""]
    steps = sorted({s for run in ref["runs"] for s in run["curve"]})
    curve = pd.DataFrame({"run (external)": [f"{TAG}: `{run['name']}`" for run in ref["runs"]],
                          **{f"step {s}": [pct(run["curve"][s][0] / 100) if s in run["curve"] else "—"
                                           for run in ref["runs"]] for s in steps}})
    lines += ["Published accuracy curve (strict accuracy %, with noise on):", "",
              curve.to_markdown(index=False, disable_numparse=True), ""]
    n = _n_test(ref)
    if n:
        hw = _one_run_halfwidth(float(ref["baseline"]["final_ood_acc"]), n)
        lines += [f"Reading them: on {n} test items one run's accuracy near {ref['baseline']['final_ood_acc']}% has "
                  f"a 95% CI of about ±{hw:.1f} points (binomial), before any seed-to-seed variance; the published "
                  f"deltas ({', '.join(f'{d:+.2f}' for d in df.delta[1:])}) are well inside it.", ""]
    planned = ref.get("planned") or []
    if planned:
        lines += ["Planned in the study, not run there: " + "; ".join(
            f"`{p['name']}` ({_describe(p)})" for p in planned) + ".", ""]
    return lines


def short_section(ref: dict) -> list[str]:
    """A few lines for every other board: the published finals, marked external and not comparable."""
    df = reference_frame(ref)
    finals = "; ".join(f"`{r.run}` {r.acc:.2f}%" + ("" if r.delta == 0 else f" ({r.delta:+.2f})")
                       for r in df.itertuples())
    tb = ref["testbed"]
    return ["## Reference (external, not comparable)", "",
            f"> {TAG}: the original study ({tb.get('model')}, {tb.get('dataset')}, {tb.get('hardware')}) published "
            f"final strict accuracies {finals}. Another model, task and scale: not comparable with this board's rows; "
            f"shown for orientation only (data: `leaderboards/reference/{ref['_file']}`).", ""]
