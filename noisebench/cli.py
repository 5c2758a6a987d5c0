"""Console entry points: ``noisebench`` (train + evaluate + record + leaderboard) and ``noisebench-eval``.

Thin Hydra wrappers; the work is in ``noisebench.train.runner`` and ``noisebench.evaluate``.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# torch's CPU allocator on transparent huge pages (its large blocks madvised): a fresh tensor costs a page fault per
# 2 MB instead of per 4 KB. torch reads this at its first allocation, so it is set before anything imports torch.
# The chip's CPU paths write fresh code and float64 tensors every GEMM (2-core VM: a fresh 40 MB tensor written
# 26 -> 7 ms; the gpu_bf16 chip step ~9% faster, the clean step unchanged within noise; tests/test_allocator.py)
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from noisebench import __version__, console  # noqa: E402
from noisebench.resources import resource_dir  # noqa: E402
from noisebench.schema import register  # noqa: E402
from noisebench.schema.preflight import preflight  # noqa: E402
from noisebench.train.outcome import TALLY, interrupt_code, interrupts_raise, signal_name  # noqa: E402
from noisebench.train.rundirs import register_resolvers  # noqa: E402

CONF_DIR = os.environ.get("NOISEBENCH_CONF_DIR") or str(resource_dir("conf"))  # the package's, or the checkout's
log = logging.getLogger("noisebench")

register_resolvers()
register()  # the schemas conf/ names in its defaults lists


def threads_per_run(cfg: DictConfig) -> int | None:
    """Torch threads for this run: ``threads`` when set; under a parallel launcher (``hydra/launcher=joblib``) the
    machine's cores split evenly among its ``n_jobs`` runs, so N runs fill N cores instead of oversubscribing them
    (two runs of 2 threads on 2 cores made evaluation ~50x slower); otherwise torch's default (None)."""
    if str(cfg.get("threads", "auto")) != "auto":
        return int(cfg.threads)
    n_jobs = OmegaConf.select(HydraConfig.get(), "launcher.n_jobs", default=None)
    if n_jobs is None or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    cores = os.cpu_count() or 1
    jobs = cores if int(n_jobs) < 0 else min(int(n_jobs), cores)
    return max(1, cores // max(1, jobs))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> float | None:
    threads = threads_per_run(cfg)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if cfg.dry_run:
        from noisebench.train.plan import dry_run

        return dry_run(cfg)
    from noisebench.train.runner import run

    console.setup_libraries()  # in every process a launcher starts, too
    from noisebench.testbeds import warmstart
    from noisebench.train.distributed import is_main_process

    warmstart.progress_hook = console.WarmStartBar() if is_main_process() else None  # the warm start's bar, with ETA
    single = HydraConfig.get().mode != RunMode.MULTIRUN  # a multirun rebuilds once, at its end (Hydra callback)
    name = f"{cfg.experiment} seed {cfg.seed}"
    try:
        record = run(cfg, HydraConfig.get().runtime.output_dir, leaderboard=single)
    except Exception:  # noqa: BLE001 -- failed before training: a multirun goes on to its next run
        if single:
            raise
        log.exception("%s failed before training", name)
        TALLY.add(name, "failed")
        return None
    TALLY.add(name, record["status"])
    final = (record.get("final") or {}).get("acc")
    log.info("%s/%s seed %s: status %s, final accuracy %s, record %s", record["testbed"], record["experiment"],
             record["seed"], record["status"], final, Path(record["run_dir"]) / "record.json")
    return final


def main() -> None:
    """``noisebench`` (and ``python -m noisebench``): exit codes in ``noisebench.train.outcome`` (0 ok, 2 a bad config
    value, 3 diverged, 4 failed, 130/143 interrupted)."""
    if sys.argv[1:] == ["--version"]:  # Hydra owns every other argument
        print(f"noisebench {__version__}")
        return
    preflight(CONF_DIR, "config")
    console.setup()
    try:
        with interrupts_raise():
            _main()
    except KeyboardInterrupt as exc:  # the run's record is written (status interrupted) before this propagates
        log.warning("interrupted by %s; continue with resume=true", signal_name(exc))
        sys.exit(interrupt_code(exc))
    if len(TALLY.runs) > 1:
        log.info("multirun: %s", TALLY.summary())
    sys.exit(TALLY.exit_code())


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval_only")
def _eval_main(cfg: DictConfig) -> float | None:
    from noisebench.evaluate_only import evaluate_only

    return evaluate_only(cfg, HydraConfig.get().runtime.output_dir)


def eval_main() -> None:
    """``noisebench-eval``: evaluate any checkpoint or hub model under any noise spec, without training."""
    preflight(CONF_DIR, "eval_only", prog="noisebench-eval")
    console.setup()
    _eval_main()


if __name__ == "__main__":
    sys.exit(main())
