"""Checkpoint evaluation through lm-evaluation-harness: noisy and clean, per-item vectors, saved samples.

Why lm-eval and not a scorer of our own: the headline number should come from the tool the field trusts. The
grading itself (strict = number after the LAST ``####``) lives in ``noisebench.scoring`` and is wired into the
task YAMLs of ``tasks/noisebench`` (``tasks/noisebench/README.md``), so reward and evaluation agree.

Traps handled here (shared notes lm-eval.md, trl-grpo.md): ``simple_evaluate`` reseeds python/numpy/torch, so
the caller's RNG is forked and restored; HFLM calls ``model.eval()``, so train mode is put back; a tokenizer
*path* can be silently rebuilt by ``AutoTokenizer``, so tokenizer objects are passed; ``use_cache`` is never used
(its key ignores the checkpoint and the noise); one torch thread avoids OpenMP oversubscription on shared cores.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from noisebench.noise import chip

TASKS_DIR_ENV = "NOISEBENCH_TASKS_DIR"
STRICT, FLEXIBLE = "strict-match", "flexible-extract"
METRIC = "exact_match"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@dataclass
class EvalResult:
    """One task scored on one checkpoint. ``per_item*`` are 0/1 lists ordered by ``doc_ids`` (ascending).

    ``clean`` holds the same checkpoint scored with noise off when ``clean_too`` was asked and this one was noisy.
    """

    task: str
    acc: float
    acc_flexible: float
    acc_stderr: Optional[float]
    acc_flexible_stderr: Optional[float]
    per_item: list[int]
    per_item_flexible: list[int]
    doc_ids: list[int]
    n: int
    noisy: bool
    samples_path: Optional[str]
    results_path: Optional[str]
    seconds: float
    task_version: Any = None
    clean: Optional["EvalResult"] = None

    def to_dict(self) -> dict:
        """Plain dict for the result record (``clean`` nested the same way)."""
        return asdict(self)


def tasks_dir() -> Path:
    """The folder of task YAMLs: ``$NOISEBENCH_TASKS_DIR``, else the package's own copy (a wheel) or the checkout's
    ``tasks/`` (noisebench.resources)."""
    from noisebench.resources import resource_dir

    path = Path(os.environ[TASKS_DIR_ENV]) if os.environ.get(TASKS_DIR_ENV) else resource_dir("tasks")
    if not (path / "noisebench").is_dir():
        raise FileNotFoundError(f"noisebench task YAMLs not found in {path}; set {TASKS_DIR_ENV} to the repo's tasks/")
    return path


def load_checkpoint(path: str | os.PathLike, device: str = "cpu"):
    """Load a saved (or hub-cached) causal LM and its tokenizer for evaluation.

    Why the tokenizer check: ``AutoTokenizer`` may rebuild a custom tokenizer differently from its
    ``tokenizer.json`` (trl-grpo.md); when the two loaders disagree on a probe, the file's own tokenizer wins.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    path = str(path)
    model = AutoModelForCausalLM.from_pretrained(path).to(device)
    tok = AutoTokenizer.from_pretrained(path)
    if Path(path, "tokenizer.json").is_file():
        raw = PreTrainedTokenizerFast.from_pretrained(path)
        probe = 'Ava has 12 apples.\n She eats 3.  #### 9\n\n"####" -1,800'
        if raw(probe)["input_ids"] != tok(probe)["input_ids"]:
            tok = raw
    return model, tok


def _git_hash_quietly() -> Optional[str]:
    """lm-eval's ``get_git_commit_hash`` for its results.json, without the ``fatal: not a git repository`` that git
    prints when it runs outside a checkout (an installed noisebench run from any folder)."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@contextlib.contextmanager
def _quiet_git(evaluator):
    original = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_hash_quietly
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def _preserved(model, num_threads: Optional[int]):
    """Leave the caller's RNG streams (python, numpy, torch CPU + initialised CUDA), thread count and train mode as found."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    threads = torch.get_num_threads()
    training = getattr(model, "training", None)
    try:
        with torch.random.fork_rng(devices=devices):
            if num_threads:
                torch.set_num_threads(num_threads)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_num_threads(threads)
        if isinstance(model, torch.nn.Module) and training is not None:
            model.train(training)


def _eval_noise_on(injector) -> bool:
    """Whether ``phase("eval")`` of this injector noises anything (duck-typed: no ``spec`` means yes)."""
    spec = getattr(injector, "spec", None)
    if spec is None or not hasattr(spec, "resolved_phases"):
        return True
    return bool(spec.enabled and "eval" in spec.resolved_phases())


@contextlib.contextmanager
def _noisy(injector):
    """Run in ``phase("eval")``; an injector not yet installed is installed for the block only."""
    if injector is None:        # a chip alone: its own phase test (``chip.live_in``) decided
        yield
    elif getattr(injector, "installed", True):
        with injector.phase("eval"):
            yield
    else:
        with injector, injector.phase("eval"):
            yield


@contextlib.contextmanager
def _clean(injector):
    """Noise off, and any chip (``noise.chip.suspended``). An installed injector that would noise here (a phase in force, or ``global_phase``/
    ``default_phase`` outside contexts) is lifted for the block and put back after, its stream position kept;
    call it where no torch mode was pushed after the injector's."""
    live = getattr(injector, "current_phase", None) is not None or getattr(injector, "default_phase", None) is not None
    with chip.suspended():
        if live and getattr(injector, "installed", False):
            injector.uninstall()
            try:
                yield
            finally:
                injector.install()
        else:
            yield


def _per_item(samples: list[dict], filt: str) -> tuple[list[int], list[int]]:
    rows = sorted((s for s in samples if s["filter"] == filt), key=lambda s: s["doc_id"])
    return [int(s["doc_id"]) for s in rows], [int(round(float(s[METRIC]))) for s in rows]


def _stderr(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None


def _save(res: dict, task: str, tracker, output_dir: Path) -> tuple[str, str]:
    """Write results + per-sample jsonl as lm-eval's CLI does (aggregated first, then samples, on copies)."""
    before = set(output_dir.iterdir())
    samples = copy.deepcopy(res["samples"])
    tracker.save_results_aggregated(results={k: v for k, v in res.items() if k != "samples"}, samples=samples)
    tracker.save_results_samples(task_name=task, samples=samples[task])
    new = sorted(set(output_dir.iterdir()) - before)
    results = next((str(p) for p in new if p.name.startswith("results")), None)
    samples_file = next((str(p) for p in new if p.name.startswith(f"samples_{task}")), None)
    if samples_file is None or results is None:
        raise RuntimeError(f"lm-eval did not write its results/samples files into {output_dir}")
    return samples_file, results


def _run(lm, task: str, data_files, limit, max_gen_toks, seed, phase, output_dir, label,
         apply_chat_template) -> EvalResult:
    from lm_eval import evaluator
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    meta = {"data_files": {k: str(v) for k, v in data_files.items()}} if data_files else None
    tm = TaskManager(include_path=str(tasks_dir()), include_defaults=False, metadata=meta)
    if task not in tm.all_tasks:
        raise ValueError(f"task {task!r} is not one of {sorted(t for t in tm.all_tasks if t != 'noisebench')}")
    if apply_chat_template is None:
        cfg = tm.load([task])["tasks"][task].config  # cheap: index + one small data read
        apply_chat_template = bool((cfg.metadata or {}).get("apply_chat_template", False))
    tracker = None
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        tracker = EvaluationTracker(output_path=str(output_dir / "results.json"))  # ".json": files land in output_dir
    t0 = time.perf_counter()
    with phase, _quiet_git(evaluator):
        res = evaluator.simple_evaluate(
            model=lm, tasks=[task], task_manager=tm, limit=limit, log_samples=True, bootstrap_iters=1000,
            gen_kwargs={"max_gen_toks": int(max_gen_toks)} if max_gen_toks else None,
            apply_chat_template=apply_chat_template, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed, model_args={"pretrained": label},
            evaluation_tracker=tracker)
    seconds = time.perf_counter() - t0
    out = res["results"][task]
    doc_ids, strict = _per_item(res["samples"][task], STRICT)
    doc_ids_f, flexible = _per_item(res["samples"][task], FLEXIBLE)
    acc, acc_f = float(out[f"{METRIC},{STRICT}"]), float(out[f"{METRIC},{FLEXIBLE}"])
    if doc_ids != doc_ids_f or abs(acc - float(np.mean(strict))) > 1e-9 or abs(acc_f - float(np.mean(flexible))) > 1e-9:
        raise RuntimeError(f"{task}: lm-eval's aggregate disagrees with its own per-sample scores")
    samples_path = results_path = None
    if tracker is not None:
        samples_path, results_path = _save(res, task, tracker, output_dir)
    return EvalResult(task=task, acc=acc, acc_flexible=acc_f, acc_stderr=_stderr(out.get(f"{METRIC}_stderr,{STRICT}")),
                      acc_flexible_stderr=_stderr(out.get(f"{METRIC}_stderr,{FLEXIBLE}")), per_item=strict,
                      per_item_flexible=flexible, doc_ids=doc_ids, n=len(doc_ids), noisy=False,
                      samples_path=samples_path, results_path=results_path, seconds=seconds,
                      task_version=res.get("versions", {}).get(task))


def evaluate_checkpoint(model, tokenizer=None, task: str = "noisebench_arith", data_files: Optional[dict] = None,
                        limit: Optional[int | float] = None, batch_size: int = 256, max_gen_toks: Optional[int] = 64,
                        injector=None, noisy: bool = True, output_dir: Optional[str | os.PathLike] = None,
                        seed: int = 1234, clean_too: bool = False, apply_chat_template: Optional[bool] = None,
                        num_threads: Optional[int] = 1, device: str = "cpu") -> EvalResult:
    """Score one checkpoint on one noisebench task with lm-eval, greedily, at a fixed batch size.

    Args:
        model: a ``transformers`` causal LM in memory (not copied, not reloaded), a saved folder / hub id (loaded
            with :func:`load_checkpoint`), or a ready ``lm_eval.api.model.LM`` (e.g. lm-eval's ``VLLM``; then
            ``tokenizer``/``batch_size`` are unused).
        tokenizer: the tokenizer object (required with an in-memory model: a path may be rebuilt wrongly).
        task (str): a task of ``tasks/noisebench`` (``noisebench_arith``, ``noisebench_gsm8k``, ...).
        data_files (dict | None): ``{"test": path.jsonl}``; None: the task's env var, else the hub (gsm8k only).
        limit (int | float | None): first ``limit`` items (a float < 1: that fraction); None: all.
        batch_size (int): fixed, because noise draws depend on batch composition. Default: 256
        max_gen_toks (int | None): new-token cap; None: the task YAML's. Default: 64
        injector: a ``noisebench.noise.NoiseInjector`` (duck-typed: anything with a ``phase(name)`` context
            manager). With ``noisy`` the whole generation runs in ``phase("eval")`` (installed for the call if
            it was not); whether that noises anything is the spec's ``phases``.
        noisy (bool): False scores clean: no phase entered and an installed injector lifted for the call.
        output_dir: where lm-eval's ``results_*.json`` and ``samples_<task>_*.jsonl`` go (clean run: ``clean/``).
        seed (int): seeds lm-eval sets inside the evaluation; the caller's RNG state is restored after.
        clean_too (bool): when this run is noisy, also score with noise off into ``result.clean``.
        apply_chat_template (bool | None): None: as the task's ``metadata.apply_chat_template`` says.
        num_threads (int | None): torch threads during evaluation (restored after); None leaves them alone.
        device (str): only for a model given as a path.

    Returns:
        EvalResult: strict/flexible accuracy, lm-eval's stderr, per-item 0/1 vectors by doc id, file paths.
    """
    from lm_eval.api.model import LM

    if isinstance(model, (str, os.PathLike)):
        label = str(model)
        model, loaded_tok = load_checkpoint(model, device=device)
        tokenizer = tokenizer or loaded_tok
    else:
        label = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    if not isinstance(model, LM) and tokenizer is None:
        raise ValueError("evaluate_checkpoint: pass the tokenizer object with an in-memory model")
    # HFLM may pick a pad token; give the caller's tokenizer back as it came
    restore_pad = not isinstance(model, LM) and tokenizer.pad_token is None
    is_noisy = bool(noisy and ((injector is not None and _eval_noise_on(injector)) or chip.live_in("eval")))
    # a model loaded here is unknown to the injector: attach it for the call, so module-name targeting (layers,
    # include/exclude by name) applies in eval as in training, and an injector with hooks="attached" hooks it at all
    attach = (is_noisy and hasattr(injector, "is_attached") and not isinstance(model, LM)
              and not injector.is_attached(model))
    if attach:
        injector.attach(model)
    args = dict(task=task, data_files=data_files, limit=limit, max_gen_toks=max_gen_toks, seed=seed,
                label=label, apply_chat_template=apply_chat_template)
    try:
        with _preserved(model, num_threads):
            if isinstance(model, LM):
                lm = model
            else:
                from lm_eval.models.huggingface import HFLM

                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # calls model.eval()
            result = _run(lm, phase=_noisy(injector) if is_noisy else _clean(injector), output_dir=output_dir, **args)
            result.noisy = is_noisy
            if clean_too and is_noisy:
                clean_dir = Path(output_dir) / "clean" if output_dir is not None else None
                result.clean = _run(lm, phase=_clean(injector), output_dir=clean_dir, **args)
    finally:
        if restore_pad:
            tokenizer.pad_token = None
        if attach:
            injector.detach(model)
    return result
