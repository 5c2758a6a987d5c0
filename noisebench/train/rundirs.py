"""Run folders: ``<results>/<testbed>/<experiment>/<YYYYmmdd-HHMMSS>-s<seed>``, and finding the one to resume.

Registered as OmegaConf resolvers (``nb_run_dir``, ``nb_run_subdir``) so Hydra's own run/sweep dirs are the run
folders: `.hydra/`, the log, checkpoints, eval samples, wandb files and record.json all live together.

Each run writes ``run.json`` at start: the fingerprint of what shapes its training and scores
(:func:`noisebench.record.run_fingerprint`) and its wandb run id. ``resume=true`` continues the latest run of the
same testbed/experiment/seed that has a valid checkpoint and the same fingerprint, and refuses a different config
naming the keys that differ: a launch that died before its first checkpoint, or a typo that changed the noise,
must never make a run silently start over or mix two settings in one curve.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from noisebench.record import RECORD_NAME, run_fingerprint, run_setting, write_atomic
from noisebench.testbeds import cache
from noisebench.train.checkpoints import CHECKPOINT_MARKER, checkpoint_problems, mark_checkpoint  # noqa: F401

log = logging.getLogger("noisebench")

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
#: Statuses that end a run for good: resuming would only repeat them.
FINAL = ("ok", "diverged")


def _is_true(x) -> bool:
    return str(x).lower() in ("true", "1", "yes")


# ---- run.json ------------------------------------------------------------------------------------------------------
def read_run_file(run_dir: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def differences(a, b, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (``noise.scale: 0.01 -> 0.02``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} -> {b!r}"]


def begin_run(run_dir: str | os.PathLike, config: dict, resume: bool, main: bool = True) -> dict:
    """Check a resumed run's config against the one it started with, or record this run's; returns ``run.json``.

    Raises ValueError naming every key that differs when ``resume`` continues a run of another config."""
    run_dir = Path(run_dir)
    want = {"fingerprint": run_fingerprint(config), "setting": json.loads(json.dumps(run_setting(config)))}
    have = read_run_file(run_dir)
    if resume and have is not None and (run_dir / CHECKPOINTS).is_dir():
        if have.get("fingerprint") != want["fingerprint"]:
            diff = differences(have.get("setting") or {}, want["setting"])
            raise ValueError(f"resume=true: {run_dir} was run with another config; differing keys (run -> now): "
                             + "; ".join(diff[:12]) + ". Launch without resume=true to start a new run, or with "
                             "the run's own values to continue it.")
        return have
    if resume and have is None and (run_dir / CHECKPOINTS).is_dir():
        log.warning("resume=true: %s has no %s (a run from before fingerprints); its config is not checked",
                    run_dir, RUN_FILE)
    info = {**want, "wandb_id": (have or {}).get("wandb_id") or uuid.uuid4().hex[:12],
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if main:
        write_atomic(run_dir / RUN_FILE, json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def _step(p: Path) -> int:
    try:
        return int(p.name.split("-")[-1])
    except ValueError:
        return -1


def last_good_checkpoint(run_dir: str | os.PathLike, quarantine: bool = False) -> Path | None:
    """Newest checkpoint of the run that is complete and intact; ``quarantine`` renames the damaged newer ones to
    ``corrupt-checkpoint-N`` (out of the trainer's sight, which would otherwise rotate or reuse them)."""
    ckpts = Path(run_dir) / CHECKPOINTS
    if not ckpts.is_dir():
        return None
    for c in sorted((p for p in ckpts.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0), key=_step, reverse=True):
        bad = checkpoint_problems(c)
        if not bad:
            return c
        if quarantine:
            dest = c.with_name(f"corrupt-{c.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            log.warning("checkpoint %s is damaged (%s); resuming from an earlier one, kept as %s",
                        c.name, "; ".join(bad[:2]), dest.name)
            shutil.move(str(c), str(dest))
    return None


def resume_point(run_dir: str | os.PathLike, resume: bool, main: bool = True):
    """``(checkpoint or None, RunHistory)`` to continue ``run_dir`` from: the last good checkpoint and the history
    cut back to its step (evaluations and steps after it are redone); a fresh history when there is none."""
    from noisebench.train.callbacks import PROGRESS_FILE, RunHistory

    run_dir = Path(run_dir)
    ckpt = last_good_checkpoint(run_dir, quarantine=main) if resume else None
    if ckpt is None or not (run_dir / PROGRESS_FILE).exists():
        if resume and (run_dir / CHECKPOINTS).is_dir():
            log.warning("resume=true: no complete checkpoint in %s; training from step 0", run_dir)
        return None, RunHistory()
    history = RunHistory.load(run_dir / PROGRESS_FILE)
    history.truncate(_step(ckpt))
    history.diverged_at = None
    log.info("resuming from %s", ckpt)
    return str(ckpt), history


# ---- which folder -------------------------------------------------------------------------------------------------
def find_resumable(results_dir: str, testbed: str, experiment: str, seed,
                   fingerprint: str | None = None) -> Path | None:
    """Latest run folder of (testbed, experiment, seed) that is not final (``ok``/``diverged``), has a complete
    checkpoint and, given a ``fingerprint``, the same one; when no folder matches, the latest one with a checkpoint
    (so that the runner refuses it naming the differences rather than silently starting over)."""
    parent = Path(results_dir) / testbed / experiment
    if not parent.is_dir():
        return None
    other = None
    for d in sorted(parent.glob(f"*-s{seed}"), reverse=True):
        rec = d / RECORD_NAME
        try:
            if rec.exists() and json.loads(rec.read_text()).get("status") in FINAL:
                continue
        except (OSError, ValueError):
            pass
        if last_good_checkpoint(d) is None:
            continue  # died before its first checkpoint (or a launch that failed): nothing to continue
        if fingerprint is None or (read_run_file(d) or {}).get("fingerprint") == fingerprint:
            return d
        other = other or d
    return other


def _fingerprint_of(root) -> str | None:
    """The run fingerprint of a composed Hydra config (its task part), None when it cannot be resolved yet."""
    try:
        # every key but Hydra's own, as the runner hashes the job's config (run_setting picks what matters)
        cfg = {k: OmegaConf.to_container(root[k], resolve=True) if isinstance(root[k], DictConfig) else root[k]
               for k in root if k != "hydra"}
        return run_fingerprint(cfg)
    except Exception:  # noqa: BLE001 -- a config that does not resolve fails later with its own clear error
        return None


@functools.lru_cache(maxsize=None)
def _subdir(results_dir: str, testbed: str, experiment: str, seed, resume, fingerprint, job: int | None) -> str:
    if _is_true(resume):
        found = find_resumable(results_dir, testbed, experiment, seed, fingerprint)
        if found is not None:
            return str(found.relative_to(results_dir))
    # Several processes of one run (accelerate launch) must agree on the folder: share a stamp through the env.
    stamp = os.environ.get("NOISEBENCH_RUN_STAMP") or time.strftime("%Y%m%d-%H%M%S")
    # Jobs of one sweep that share experiment and seed (a noise.scale sweep) start within a second: number them.
    return f"{testbed}/{experiment}/{stamp}{f'.{job}' if job else ''}-s{seed}"


def _sweep_job(root) -> int | None:
    """Hydra's job number within a multirun (None for a single run)."""
    try:
        return int(root.hydra.job.num) if str(root.hydra.mode) == "RunMode.MULTIRUN" else None
    except Exception:  # noqa: BLE001 -- compose API, or no hydra node: a single run
        return None


def run_subdir(results_dir: str, testbed: str, experiment: str, seed, resume, *, _root_=None) -> str:
    """Folder of this run relative to results_dir (cached: Hydra may resolve the dir more than once)."""
    fp = _fingerprint_of(_root_) if _root_ is not None and _is_true(resume) else None
    job = _sweep_job(_root_) if _root_ is not None else None
    return _subdir(str(results_dir), str(testbed), str(experiment), seed, resume, fp, job)


def run_dir(results_dir: str, testbed: str, experiment: str, seed, resume, *, _root_=None) -> str:
    return str(Path(results_dir) / run_subdir(results_dir, testbed, experiment, seed, resume, _root_=_root_))


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("nb_run_dir"):
        OmegaConf.register_new_resolver("nb_run_dir", run_dir)
    if not OmegaConf.has_resolver("nb_run_subdir"):
        OmegaConf.register_new_resolver("nb_run_subdir", run_subdir)
