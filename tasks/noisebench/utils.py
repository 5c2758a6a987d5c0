"""lm-eval hooks of the noisebench tasks: data location, the study's prompt, and grading via noisebench.scoring.

Why hooks rather than Jinja and lm-eval's regex filters: the GRPO reward and the reported accuracy must grade
text identically, so prompt and extraction come from ``noisebench.scoring`` itself (strict = number after the
LAST ``####``; lm-eval's stock gsm8k takes the first). The filters emit a canonical number string, so lm-eval's
plain ``exact_match`` (string equality) equals ``scoring``'s numeric equality (``1800`` == ``1800.0``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import datasets

from noisebench import scoring

INVALID = "[invalid]"

#: dataset key -> (env var holding a folder with test.jsonl, hub fallback (path, name) or None)
SOURCES = {
    "gsm8k": ("NOISEBENCH_GSM8K_DIR", ("openai/gsm8k", "main")),
    "arith": ("NOISEBENCH_ARITH_DIR", None),
}


def _read_jsonl(path: str | os.PathLike) -> datasets.Dataset:
    """Plain file read: no datasets cache and no hub call, so it works offline and sees file edits at once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"noisebench task data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for key in ("question", "answer"):
        if rows and key not in rows[0]:
            raise ValueError(f"{path}: rows need keys 'question' and 'answer' (GSM8K schema); missing {key!r}")
    return datasets.Dataset.from_list(rows)


def load_dataset(dataset: str = "gsm8k", data_files: dict | None = None, **_) -> datasets.DatasetDict:
    """``custom_dataset`` hook: ``data_files`` (TaskManager metadata) > the env var folder > the hub.

    Args:
        dataset (str): which source (a key of ``SOURCES``), set in the task YAML's ``dataset_kwargs``.
        data_files (dict | None): ``{"test": path}``, passed by ``noisebench.evaluate`` as TaskManager metadata
            (lm-eval CLI: ``--metadata '{"data_files": {"test": "/abs/test.jsonl"}}'``).
    """
    if dataset not in SOURCES:
        raise ValueError(f"dataset {dataset!r} is not one of {sorted(SOURCES)}")
    env, hub = SOURCES[dataset]
    if data_files:
        if "test" not in data_files:
            raise ValueError(f"data_files needs a 'test' entry; got keys {sorted(data_files)}")
        return datasets.DatasetDict({split: _read_jsonl(p) for split, p in data_files.items()})
    if os.environ.get(env):
        return datasets.DatasetDict({"test": _read_jsonl(Path(os.environ[env]) / "test.jsonl")})
    if hub is None:
        raise ValueError(f"noisebench task data for {dataset!r}: pass data_files={{'test': path}} "
                         f"or set {env} to a folder holding test.jsonl")
    return datasets.load_dataset(*hub)


def doc_to_text(doc: dict) -> str:
    """The study's prompt, exactly as the GRPO trainer sees it."""
    return scoring.make_prompt(doc["question"])


def canonical(num: str | None) -> str:
    """One string per number value, so string equality is numeric equality (``1,800`` -> ``1800``, ``2.50`` -> ``2.5``)."""
    if num is None:
        return INVALID
    try:
        value = float(num) + 0.0  # + 0.0 folds -0.0 into 0.0
    except ValueError:
        return num  # unparseable (e.g. "1.2.3"): scoring compares such strings verbatim too
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


def doc_to_target(doc: dict) -> str:
    """The gold number (text after the answer field's ``####``), canonical."""
    return canonical(scoring.gold_answer(doc["answer"]))


def strict_filter(resps, docs):
    """``custom`` filter step: the number after the last ``####`` of each response, canonical."""
    return [[canonical(scoring.extract_strict(r)) for r in doc_resps] for doc_resps in resps]


def flexible_filter(resps, docs):
    """``custom`` filter step: the last number of each response, canonical."""
    return [[canonical(scoring.extract_flexible(r)) for r in doc_resps] for doc_resps in resps]
