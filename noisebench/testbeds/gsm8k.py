"""GSM8K for the real testbed: from the hub (``openai/gsm8k``, config ``main``) or local files the user names.

Why several sources: most machines that run noisebench have no dataset hub (this project's own machines included),
so a local folder (``train.jsonl``/``test.jsonl`` as in openai/grade-school-math, or the hub's parquet files) or
explicit files must work, and when nothing is reachable the user gets one paragraph saying what to do, not a trace.
Precedence: ``data_files`` > ``data_dir`` > hub.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from noisebench.scoring import gold_answer
from noisebench.testbeds.base import TestbedError

SPLITS = ("train", "test")
DATA_KEYS = ("hub_id", "hub_config", "data_dir", "data_files")
HOW_TO_FIX = ("Either make the hub reachable (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE, or pre-download with "
              "`datasets.load_dataset('openai/gsm8k', 'main')` on a connected machine and copy its cache), or point "
              "testbed.data.data_dir at a folder holding train.jsonl and test.jsonl (one {\"question\", \"answer\"} "
              "object a line, as in github.com/openai/grade-school-math), e.g. `testbed.data.data_dir=/data/gsm8k` "
              "or the environment variable NOISEBENCH_GSM8K_DIR, or name the files with "
              "`testbed.data.data_files={train: a.jsonl, test: b.jsonl}`.")


class GSM8KUnavailable(TestbedError):
    """GSM8K could be loaded neither from the local files named nor from the hub."""


def _find_local(folder: Path, split: str) -> Optional[Path]:
    for pattern in (f"{split}.jsonl", f"{split}.json", f"{split}.parquet", f"main/{split}-*.parquet",
                    f"{split}-*.parquet", f"data/{split}-*.parquet"):
        hits = sorted(folder.glob(pattern))
        if hits:
            return hits[0]
    return None


def local_files(data: Mapping) -> Optional[dict]:
    """``{"train": Path, "test": Path}`` named by ``data_files`` or found in ``data_dir``; None if neither is set.

    Raises:
        GSM8KUnavailable: a named folder or file does not exist or lacks a split.
    """
    if data.get("data_files"):
        files = {s: Path(str(data["data_files"].get(s, ""))).expanduser() for s in SPLITS}
        missing = [f"{s}={p}" for s, p in files.items() if not p.is_file()]
        if missing:
            raise GSM8KUnavailable(f"testbed.data.data_files names files that do not exist: {missing}. {HOW_TO_FIX}")
        return files
    if data.get("data_dir"):
        folder = Path(str(data["data_dir"])).expanduser()
        if not folder.is_dir():
            raise GSM8KUnavailable(f"testbed.data.data_dir={folder} is not a folder. {HOW_TO_FIX}")
        files = {s: _find_local(folder, s) for s in SPLITS}
        missing = [s for s, p in files.items() if p is None]
        if missing:
            raise GSM8KUnavailable(f"testbed.data.data_dir={folder} has no file for split(s) {missing} "
                                   f"(looked for <split>.jsonl, <split>.parquet, main/<split>-*.parquet). {HOW_TO_FIX}")
        return files
    return None


def _read(path: Path) -> list[dict]:
    if path.suffix in (".jsonl", ".json"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    from datasets import load_dataset
    return load_dataset("parquet", data_files=str(path), split="train").to_list()


def _check_schema(rows: list[dict], where: str) -> list[dict]:
    if not rows:
        raise GSM8KUnavailable(f"{where} holds no records. {HOW_TO_FIX}")
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r:
            raise GSM8KUnavailable(f"{where} record {i} lacks 'question'/'answer' (has {sorted(r)}). {HOW_TO_FIX}")
        try:
            gold_answer(r["answer"])
        except ValueError as e:
            raise GSM8KUnavailable(f"{where} record {i}: {e}. GSM8K answers end with '#### <number>'.") from None
    return [{"question": r["question"], "answer": r["answer"]} for r in rows]


def load_gsm8k(data: Mapping) -> tuple[dict[str, list[dict]], dict[str, Optional[Path]]]:
    """Load GSM8K's train and test records.

    Args:
        data (Mapping): the testbed's ``data`` section (keys ``DATA_KEYS``).

    Returns:
        (records, files): ``{"train": [...], "test": [...]}`` of ``{"question", "answer"}``, and the local
        jsonl file of each split when it was read from one (so evaluation can point at it), else None.

    Raises:
        GSM8KUnavailable: with a one-paragraph message when neither source works.
    """
    unknown = sorted(set(data) - set(DATA_KEYS))
    if unknown:
        raise ValueError(f"testbed.data has unknown keys {unknown}; valid keys: {list(DATA_KEYS)}")
    files = local_files(data)
    if files is not None:
        recs = {s: _check_schema(_read(p), str(p)) for s, p in files.items()}
        return recs, {s: (p.resolve() if p.suffix == ".jsonl" else None) for s, p in files.items()}
    hub_id, hub_config = data.get("hub_id") or "openai/gsm8k", data.get("hub_config") or "main"
    try:
        from datasets import load_dataset
        ds = load_dataset(hub_id, hub_config)
    except Exception as e:  # noqa: BLE001 - any failure here means "not reachable"; say why in one line
        reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise GSM8KUnavailable(f"GSM8K could not be loaded from the hub ({hub_id!r}, config {hub_config!r}) and no "
                               f"local files were named: {type(e).__name__}: {reason}. {HOW_TO_FIX}") from None
    return {s: _check_schema(ds[s].to_list(), f"{hub_id}[{s}]") for s in SPLITS}, {s: None for s in SPLITS}


def gsm8k_problems(data: Mapping) -> list[str]:
    """Why GSM8K would not load, without reading it (empty list when it looks reachable)."""
    try:
        if local_files(data) is not None:
            return []
    except GSM8KUnavailable as e:
        return [str(e)]
    hub_id, hub_config = data.get("hub_id") or "openai/gsm8k", data.get("hub_config") or "main"
    try:
        from datasets import load_dataset_builder
        load_dataset_builder(hub_id, hub_config)
    except Exception as e:  # noqa: BLE001
        return [f"GSM8K not reachable on the hub ({hub_id!r}, {hub_config!r}) nor in its local cache "
                f"({type(e).__name__}) and testbed.data names no local files. {HOW_TO_FIX}"]
    return []


def write_records(rows: list[dict], path: Path) -> Path:
    """Write GSM8K-schema records as jsonl (for evaluation when the split did not come from a jsonl file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path
