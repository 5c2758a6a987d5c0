"""The Testbed record every consumer receives, the testbeds' error type, and the config helpers (plain dict,
schema check for use without Hydra)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


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
    """A testbed config (OmegaConf node, mapping, or a testbed file read raw) as a plain, resolved dict.

    A file read raw may carry its Hydra ``defaults`` list, and a global-package file nests its keys under
    ``testbed:``; neither is a testbed key. A section the schema makes optional and the file leaves out composes as
    null; the builders read null as absent, and so must the cache hash: such sections are dropped.
    """
    plain = _plain(cfg)
    if "kind" not in plain and isinstance(plain.get("testbed"), dict):
        plain = plain["testbed"]
    plain.pop("defaults", None)
    return plain


def _plain(cfg: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        for *parents, last in _null_sections(cfg):
            node = plain
            for key in parents:
                node = node[key]
            node.pop(last, None)
        return plain
    if not isinstance(cfg, Mapping):
        raise TypeError(f"testbed config must be a mapping or DictConfig, got {type(cfg).__name__}")
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}


def _null_sections(node, path=()) -> list[tuple]:
    """Paths of the structured sub-configs set to null under ``node``."""
    from omegaconf import DictConfig

    out = []
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            out += [path + (key,)] if child._is_none() else _null_sections(child, path + (key,))
    return out


def check_schema(cfg: Mapping) -> None:
    """Check a plain testbed config against its kind's schema (``noisebench/schema/testbed.py``): missing, unknown
    and mistyped keys, choices, ranges. The Hydra path checks this at composition; this is for use without Hydra.

    Raises:
        ValueError: naming the key (``testbed.<key>``) and what is valid.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    from noisebench.schema.rules import check_node, check_testbed, omegaconf_message
    from noisebench.schema.testbed import KIND_SCHEMAS

    if cfg.get("kind") not in KIND_SCHEMAS:
        raise ValueError(f"testbed.kind={cfg.get('kind')!r}; valid choices: {list(KIND_SCHEMAS)}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(KIND_SCHEMAS[cfg["kind"]]), cfg)
    except (ConfigAttributeError, ConfigKeyError) as err:  # an unknown key
        where, _, key = f"testbed.{err.full_key}".rpartition(".")
        valid = list(err.parent_node.keys()) if err.parent_node is not None else []
        raise ValueError(f"{where} has unknown keys [{key!r}]; valid keys: {valid}") from None
    except OmegaConfBaseException as err:
        raise ValueError(omegaconf_message(err, "testbed.")) from None
    check_node(node, "testbed.")
    check_testbed(node)
