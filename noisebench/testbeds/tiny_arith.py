"""Build (once, cached) and load the embedded testbed: arith task + tiny Qwen2 + byte-level BPE + warm start."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping

import torch

from noisebench.scoring import gold_answer, make_prompt
from noisebench.testbeds import cache
from noisebench.testbeds.arith import ArithSpec, make_splits, write_jsonl
from noisebench.testbeds.base import Testbed, check_schema
from noisebench.testbeds.tiny import random_model, tiny_config
from noisebench.testbeds.tokenizer import build_tokenizer
from noisebench.testbeds.warmstart import (FORMAT_KEYS, MISTAKE_KEYS, WARMSTART_KEYS, check_keys, greedy_accuracy,
                                           marked_topics, sft_pairs, train_sft)

TOP_KEYS = ("name", "kind", "eval_task", "seed", "max_prompt_length", "max_completion_length", "data", "tokenizer",
            "model", "warmstart")
#: The keys that shape what is built; only they enter the cache hash (changing e.g. ``eval_task`` reuses the cache).
BUILD_KEYS = ("kind", "seed", "max_completion_length", "data", "tokenizer", "model", "warmstart")


def validate(cfg: Mapping) -> None:
    """Refuse missing or unknown keys by name before any work."""
    check_schema(cfg)
    check_keys(cfg, TOP_KEYS, "testbed")
    check_keys(cfg["warmstart"], WARMSTART_KEYS, "testbed.warmstart")
    if cfg["warmstart"].get("format") is not None:
        check_keys(cfg["warmstart"]["format"], FORMAT_KEYS, "testbed.warmstart.format")
        marked_topics(int(cfg["warmstart"]["format"]["marked_topics"]), int(cfg["seed"]))
    if cfg["warmstart"].get("mistakes") is not None:
        check_keys(cfg["warmstart"]["mistakes"], MISTAKE_KEYS, "testbed.warmstart.mistakes")
    arith_spec(cfg).validate()


def arith_spec(cfg: Mapping) -> ArithSpec:
    data = dict(cfg["data"])
    check_keys(data, ArithSpec.__dataclass_fields__, "testbed.data")
    data["ops"] = tuple(data.get("ops", ArithSpec.ops))
    return ArithSpec(**{**data, "seed": int(cfg["seed"])})


def cache_folder(cfg: Mapping, cache_dir) -> Path:
    """Where this config's build lives: ``<cache_dir>/testbeds/<name>-<hash of BUILD_KEYS>``."""
    key = cache.config_hash({k: cfg.get(k) for k in BUILD_KEYS})
    return Path(cache_dir).expanduser().resolve() / "testbeds" / f"{cfg['name']}-{key}"


def _build(cfg: Mapping, out: Path, device: str, log=print) -> None:
    """Generate data, train the tokenizer, init + warm-start the model, grade it, save everything under ``out``."""
    t0 = time.perf_counter()
    seed, w = int(cfg["seed"]), cfg["warmstart"]
    threads = torch.get_num_threads()
    torch.set_num_threads(int(w.get("num_threads", threads)))
    try:
        splits = make_splits(arith_spec(cfg))
        write_jsonl(splits["train"], out / "train.jsonl")
        write_jsonl(splits["test"], out / "test.jsonl")
        pairs = sft_pairs(splits["train"], w.get("format"), seed, w.get("mistakes"))
        corpus = [t for pair in pairs for t in pair] + [p.answer for p in splits["train"]]
        tokenizer = build_tokenizer(corpus, int(cfg["tokenizer"]["vocab_size"]))
        model = random_model(tiny_config(cfg["model"], tokenizer), seed)
        meta = {"built_on": device, "torch_threads": torch.get_num_threads(),
                "n_params": sum(p.numel() for p in model.parameters())}
        if int(w["steps"]) > 0:
            log(f"noisebench: warm-starting {cfg['name']} ({w['steps']} SFT steps on {device}) into {out.parent}")
            meta.update(train_sft(model, tokenizer, pairs, w, seed, device, log=log))
            n_eval = int(w.get("eval_items", 1000))
            if n_eval > 0:
                meta.update(greedy_accuracy(model, tokenizer, splits["test"][:n_eval],
                                            int(cfg["max_completion_length"]), int(w.get("eval_batch_size", 250)),
                                            device))
        model.to("cpu").save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
        meta["build_seconds"] = time.perf_counter() - t0
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    finally:
        torch.set_num_threads(threads)


def load(cfg: Mapping, cache_dir, device: str = "cpu", log=print) -> Testbed:
    """The tiny testbed for ``cfg``, built on ``device`` the first time and loaded from the cache afterwards."""
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

    validate(cfg)
    folder = cache_folder(cfg, cache_dir)
    t0 = time.perf_counter()
    cache.cached_build(folder, lambda tmp: _build(cfg, tmp, device, log), log=log)
    meta = json.loads((folder / "meta.json").read_text())
    meta.update(cache_folder=str(folder), load_seconds=time.perf_counter() - t0)
    model_path = folder / "model"
    # PreTrainedTokenizerFast, not AutoTokenizer: the contract promises the exact saved tokenizer object.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(model_path)
    model = Qwen2ForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    rows = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
    train = Dataset.from_dict({"prompt": [make_prompt(r["question"]) for r in rows],
                               "answer": [gold_answer(r["answer"]) for r in rows]})
    return Testbed(name=cfg["name"], model=model, tokenizer=tokenizer, model_path=str(model_path),
                   train_dataset=train, eval_task=cfg["eval_task"],
                   eval_data_files={"test": str(folder / "test.jsonl")},
                   max_prompt_length=int(cfg["max_prompt_length"]),
                   max_completion_length=int(cfg["max_completion_length"]),
                   use_chat_template=False, meta=meta)
