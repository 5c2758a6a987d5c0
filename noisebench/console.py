"""What a person watching a run sees: noisebench's own lines, one progress bar per long phase, libraries quiet.

Why: the libraries a run drives each talk on their own terms (lm-eval ~5 warnings per evaluation, transformers
FutureWarnings about its own renamed arguments, datasets bars), which buries the lines that matter: a run's
status, each evaluation's accuracy, errors. Only warnings and errors of noisebench and ERROR-level records of the
libraries get through; ``NOISEBENCH_VERBOSE=1`` (or ``verbose=True``) leaves every library as it is, for debugging.

Bars: the warm start (steps with ETA, drawn from ``noisebench.testbeds.warmstart.progress_hook``), training (the
trainer callback's bar) and evaluation (lm-eval's own request bar). Each evaluation ends with one summary line.
"""
from __future__ import annotations

import logging
import os
import warnings

from tqdm.auto import tqdm

#: Libraries whose warnings are about themselves (deprecations, defaults they chose), not about the run.
QUIET_LIBRARIES = ("transformers", "trl", "accelerate", "lm_eval", "datasets", "evaluate", "huggingface_hub",
                   "torch.utils.data", "wandb", "sqlitedict", "httpx", "urllib3", "filelock", "absl")


def verbose() -> bool:
    return os.environ.get("NOISEBENCH_VERBOSE", "").lower() in ("1", "true", "yes")


def is_main_process() -> bool:
    """Rank 0 of an ``accelerate launch`` (or a single process): the one that draws bars."""
    return int(os.environ.get("RANK", 0) or 0) == 0


def setup(verbose_libraries: bool | None = None) -> None:
    """Quiet the libraries' warnings and logs (idempotent; imports none of them)."""
    if verbose_libraries is None:
        verbose_libraries = verbose()
    if not verbose_libraries:
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            for lib in QUIET_LIBRARIES:
                warnings.filterwarnings("ignore", category=category, module=rf"{lib}(\.|$)")
        for lib in QUIET_LIBRARIES:
            logging.getLogger(lib).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def setup_libraries(verbose_libraries: bool | None = None) -> None:
    """The part of :func:`setup` that imports the heavy libraries (call once the config is known to be good, so a
    typo is reported in a second): their own bars off (weights loading, dataset maps)."""
    if verbose_libraries is None:
        verbose_libraries = verbose()
    if not verbose_libraries:
        import datasets
        from transformers.utils import logging as hf_logging

        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()  # "Loading weights" for each model the trainer builds


class WarmStartBar:
    """``progress_hook(step, steps)`` of the warm start: a bar with rate and ETA, opened at the first step."""

    def __init__(self):
        self.bar = None

    def __call__(self, step: int, steps: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=steps, desc="warm start (SFT)", unit="step", dynamic_ncols=True)
        self.bar.update(step - self.bar.n)
        if step >= steps:
            self.bar.close()
            self.bar = None


def eval_summary(step: int, max_steps: int | None, point: dict) -> str:
    """One line per evaluation: accuracy (strict, flexible, clean when scored), items and time."""
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    parts = [f"step {step}" + (f"/{max_steps}" if max_steps else ""), f"accuracy {pct(point.get('acc'))}",
             f"flexible {pct(point.get('acc_flexible'))}"]
    if point.get("acc_clean") is not None:
        parts.append(f"clean {pct(point.get('acc_clean'))}")
    if point.get("n"):
        parts.append(f"{point['n']} items")
    if point.get("eval_seconds") is not None:
        parts.append(f"{point['eval_seconds']:.1f} s")
    return "[noisebench] eval " + ", ".join(parts)
