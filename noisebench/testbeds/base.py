"""The Testbed record every consumer receives, the testbeds' error type, and config-node helpers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence


class TestbedError(RuntimeError):
    """A testbed cannot be built or loaded for a reason the user can fix (its message says how)."""

    __test__ = False  # not a pytest test class


@dataclass
class Testbed:
    """Everything the trainer and the evaluation need from one testbed (docs/ARCHITECTURE.md, "Contract: testbeds").

    Attributes:
        name: testbed name, e.g. ``tiny_arith``.
        model: a transformers PreTrainedModel on the requested device.
        tokenizer: its tokenizer (left padding for generation).
        model_path: folder with the ``save_pretrained`` model + tokenizer, or a hub id (kind=hf).
        train_dataset: datasets.Dataset with columns ``prompt`` (str) and ``answer`` (gold number str).
        eval_task: lm-eval task name (``noisebench_arith`` / ``noisebench_gsm8k``).
        eval_data_files: ``{"test": abs path}`` of a GSM8K-schema jsonl (question, answer).
        max_prompt_length, max_completion_length: token limits for GRPO rollouts and evaluation.
        use_chat_template: whether ``prompt`` was rendered through the tokenizer's chat template.
        meta: build facts: warm-start seconds, greedy strict/flexible accuracy, cache folder, ...
    """

    __test__ = False

    name: str
    model: Any
    tokenizer: Any
    model_path: str
    train_dataset: Any
    eval_task: str
    eval_data_files: dict
    max_prompt_length: int
    max_completion_length: int
    use_chat_template: bool = False
    meta: dict = field(default_factory=dict)


def to_plain(cfg: Any) -> dict:
    """An OmegaConf node or mapping as a plain, resolved dict."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(cfg, Mapping):
        raise TypeError(f"testbed config must be a mapping or DictConfig, got {type(cfg).__name__}")
    return {k: to_plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}


def require(cfg: Mapping, keys: Sequence[str], where: str = "testbed") -> None:
    """Raise ValueError naming every missing key."""
    missing = [k for k in keys if k not in cfg or cfg[k] is None]
    if missing:
        raise ValueError(f"{where} is missing keys {missing} (see conf/testbed/*.yaml for documented examples)")
