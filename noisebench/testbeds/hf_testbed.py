"""The real testbed (kind=hf): a transformers checkpoint (hub id or local path, or random Qwen2.5-1.5B) + GSM8K."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from noisebench.scoring import gold_answer, make_prompt
from noisebench.testbeds import cache
from noisebench.testbeds.base import Testbed, TestbedError, check_schema
from noisebench.testbeds.gsm8k import gsm8k_problems, load_gsm8k, write_records

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def validate(cfg: Mapping) -> None:
    """Refuse missing, unknown or out-of-range keys by name."""
    check_schema(cfg)  # keys, types, choices (dtype, model_init), ranges
    if not (cfg.get("model_path") or cfg.get("model_id")) and cfg.get("model_init", "pretrained") == "pretrained":
        raise ValueError("testbed needs model_path (a local folder) or model_id (a hub id) when model_init=pretrained")


def _source(cfg: Mapping) -> str:
    return str(Path(cfg["model_path"]).expanduser()) if cfg.get("model_path") else cfg["model_id"]


def model_problems(cfg: Mapping) -> list[str]:
    """Why the model or tokenizer would not load, checked without loading weights."""
    if cfg.get("model_init", "pretrained") == "random":
        tok = cfg.get("tokenizer_path")
        if tok and not Path(tok).expanduser().is_dir():
            return [f"testbed.tokenizer_path={tok} is not a folder (null uses the built-in byte-level tokenizer)"]
        return []
    if cfg.get("model_path"):
        path = Path(cfg["model_path"]).expanduser()
        if not (path / "config.json").is_file():
            return [f"testbed.model_path={path} holds no config.json: not a saved transformers model folder. Point it "
                    f"at a local copy of {cfg.get('model_id') or 'the model'} (e.g. made with `huggingface-cli "
                    f"download {cfg.get('model_id') or '<id>'} --local-dir DIR` on a connected machine)."]
        return []
    from huggingface_hub import constants, try_to_load_from_cache
    if isinstance(try_to_load_from_cache(cfg["model_id"], "config.json"), str):
        return []
    if constants.is_offline_mode():
        return [f"model {cfg['model_id']!r} is not in the local Hugging Face cache and the hub is offline "
                f"(HF_HUB_OFFLINE=1). Download it on a connected machine and set testbed.model_path to its folder."]
    try:
        from huggingface_hub import HfApi
        HfApi().model_info(cfg["model_id"], timeout=10)
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        return [f"model {cfg['model_id']!r} is neither cached locally nor reachable on the hub "
                f"({type(e).__name__}). Set testbed.model_path to a local copy."]
    return []


def check(cfg: Mapping) -> list[str]:
    """Human-readable problems that would stop :func:`load` (config, model, data); nothing is loaded."""
    try:
        validate(cfg)
    except ValueError as e:
        return [str(e)]
    return model_problems(cfg) + gsm8k_problems(cfg["data"])


def _tokenizer(cfg: Mapping, train_rows: list[dict]):
    from transformers import AutoTokenizer
    if cfg.get("model_init", "pretrained") == "random" and not cfg.get("tokenizer_path"):
        from noisebench.testbeds.tokenizer import build_tokenizer
        texts = [make_prompt(r["question"]) for r in train_rows] + [r["answer"] for r in train_rows]
        return build_tokenizer(texts, 512)
    src = cfg.get("tokenizer_path") or _source(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise TestbedError(f"tokenizer {src!r} could not be loaded ({type(e).__name__}: {str(e)[:200]}). "
                           f"Set testbed.model_path (or tokenizer_path) to a local model folder.") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _model(cfg: Mapping, tokenizer, cache_dir, device: str):
    """(model, model_path): pretrained from hub/local, or random Qwen2.5-1.5B saved once under the cache."""
    from transformers import AutoModelForCausalLM
    dtype = DTYPES[cfg["dtype"]]
    if cfg.get("model_init", "pretrained") == "random":
        from noisebench.testbeds.tiny import qwen2_5_1_5b_random
        key = cache.config_hash({k: cfg.get(k) for k in ("model_init", "tokenizer_path", "dtype", "seed", "data")})
        folder = Path(cache_dir).expanduser().resolve() / "testbeds" / f"{cfg['name']}-random-{key}"
        model = qwen2_5_1_5b_random(int(cfg["seed"]), dtype, tokenizer, device)
        cache.cached_build(folder, lambda tmp: (model.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
        return model, str(folder)
    src = _source(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    except (OSError, ValueError) as e:
        raise TestbedError(f"model {src!r} could not be loaded ({type(e).__name__}: {str(e)[:200]}). If the hub "
                           f"is unreachable, set testbed.model_path to a local copy of the model folder.") from None
    return model.to(device), src


def load(cfg: Mapping, cache_dir, device: str = "cpu") -> Testbed:
    """The GSM8K testbed for ``cfg``; raises :class:`TestbedError` (one paragraph) when model or data is missing."""
    from datasets import Dataset

    validate(cfg)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    recs, files = load_gsm8k(cfg["data"])
    tokenizer = _tokenizer(cfg, recs["train"])
    tokenizer.padding_side = "left"
    model, model_path = _model(cfg, tokenizer, cache_dir, device)
    prompts = [make_prompt(r["question"]) for r in recs["train"]]
    if cfg.get("use_chat_template"):
        if not tokenizer.chat_template:
            raise TestbedError(f"testbed.use_chat_template=true but tokenizer of {model_path!r} has no chat "
                               f"template; set use_chat_template=false or use an instruct model's tokenizer.")
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    train = Dataset.from_dict({"prompt": prompts, "answer": [gold_answer(r["answer"]) for r in recs["train"]]})
    test = files["test"] or write_records(
        recs["test"], Path(cache_dir).expanduser().resolve() / "data" / f"gsm8k-{cache.config_hash(cfg['data'])}"
        / "test.jsonl")
    return Testbed(name=cfg["name"], model=model, tokenizer=tokenizer, model_path=model_path, train_dataset=train,
                   eval_task=cfg["eval_task"], eval_data_files={"test": str(Path(test).resolve())},
                   max_prompt_length=int(cfg["max_prompt_length"]),
                   max_completion_length=int(cfg["max_completion_length"]),
                   use_chat_template=bool(cfg.get("use_chat_template")),
                   meta={"model_init": cfg.get("model_init", "pretrained"), "n_train": len(train),
                         "n_test": len(recs["test"])})
