"""Typed schemas of the testbeds (``conf/testbed``): the keys both kinds share, then one class per kind.

A testbed file names its kind's schema first in its defaults list (``- /testbed/schema_tiny@testbed``), so the
``testbed`` node takes that class before the file's values merge in. A new key of the tiny testbed is declared
once, here, with its type and a default (optional sections default to null: the builder's default); a testbed file
sets it only where its value differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

from omegaconf import MISSING

from noisebench.schema.fields import bounded, choices

Kind = choices("Kind", ["tiny", "hf"])
ArithOp = choices("ArithOp", ["add", "sub", "mul", "div"])
Dtype = choices("Dtype", ["bf16", "fp16", "fp32"])
ModelInit = choices("ModelInit", ["pretrained", "random"])
Mistake = choices("Mistake", ["sub_adds", "mul_swap", "triple_doubles"])  # noisebench.testbeds.arith.MISTAKES


@dataclass
class TestbedConfig:
    """Keys every testbed has (``noisebench.testbeds.base.Testbed``)."""

    __test__ = False  # not a pytest test class

    name: str = MISSING
    kind: Kind = MISSING
    eval_task: str = MISSING                        # lm-eval task under tasks/
    seed: int = bounded(MISSING, ge=0)
    max_prompt_length: int = bounded(MISSING, ge=1)
    max_completion_length: int = bounded(MISSING, ge=1)


# --- kind: tiny (noisebench/testbeds/tiny_arith.py) ---------------------------------------------------------------

@dataclass
class ArithData:
    """``testbed.data``: the synthetic task (``noisebench.testbeds.arith.ArithSpec``)."""

    n_train: int = bounded(MISSING, ge=1)
    n_test: int = bounded(MISSING, ge=1)
    min_ops: int = bounded(MISSING, ge=1)           # <= max_ops (rules.py)
    max_ops: int = bounded(MISSING, ge=1)
    max_start: int = bounded(MISSING, ge=2)
    max_operand: int = bounded(MISSING, ge=2)
    max_factor: int = bounded(MISSING, ge=2)
    ops: List[ArithOp] = MISSING


@dataclass
class TokenizerConfig:
    vocab_size: int = bounded(MISSING, ge=1)


@dataclass
class TinyModel:
    """``testbed.model``: Qwen2Config keys of the tiny model (``noisebench.testbeds.tiny.TINY_KEYS``)."""

    hidden_size: int = bounded(MISSING, ge=1)
    intermediate_size: int = bounded(MISSING, ge=1)
    num_hidden_layers: int = bounded(MISSING, ge=1)
    num_attention_heads: int = bounded(MISSING, ge=1)
    num_key_value_heads: int = bounded(MISSING, ge=1)
    max_position_embeddings: int = bounded(MISSING, ge=1)
    tie_word_embeddings: bool = MISSING
    rope_theta: float = bounded(MISSING, gt=0)
    rms_norm_eps: float = bounded(MISSING, gt=0)


@dataclass
class AnswerFormat:
    """``testbed.warmstart.format``: how often SFT solutions end ``#### N``."""

    marked_topics: int = bounded(MISSING, ge=0)
    marked_share: float = bounded(MISSING, ge=0, le=1)
    unmarked_share: float = bounded(MISSING, ge=0, le=1)


@dataclass
class Mistakes:
    """``testbed.warmstart.mistakes``: share of SFT problems worked under consistent wrong rules."""

    share: float = bounded(MISSING, ge=0, le=1)
    rules: List[Mistake] = MISSING                  # wrong rules applied together on those problems


@dataclass
class Warmstart:
    """``testbed.warmstart``: SFT before GRPO (``noisebench/testbeds/warmstart.py``); steps 0 = random init."""

    steps: int = bounded(MISSING, ge=0)
    batch_size: int = bounded(MISSING, ge=1)
    lr: float = bounded(MISSING, gt=0)
    warmup_steps: int = bounded(MISSING, ge=0)
    weight_decay: float = bounded(MISSING, ge=0)
    num_threads: int = bounded(MISSING, ge=1)
    eval_items: int = bounded(MISSING, ge=0)
    eval_batch_size: int = bounded(MISSING, ge=1)
    format: Optional[AnswerFormat] = None           # null: every solution ends "#### N"
    mistakes: Optional[Mistakes] = None             # null: every solution is right


@dataclass
class TinyTestbed(TestbedConfig):
    """``kind: tiny``: task, tokenizer and model built in code and warm-started on CPU (cached by config hash)."""

    data: ArithData = MISSING
    tokenizer: TokenizerConfig = MISSING
    model: TinyModel = MISSING
    warmstart: Warmstart = MISSING


# --- kind: hf (noisebench/testbeds/hf_testbed.py) -----------------------------------------------------------------

@dataclass
class GSM8KData:
    """``testbed.data`` of an hf testbed; precedence: data_files > data_dir > hub."""

    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    data_dir: Optional[str] = None
    data_files: Optional[Dict[str, str]] = None     # {train: path, test: path}


@dataclass
class HFTestbed(TestbedConfig):
    """``kind: hf``: a transformers checkpoint (hub id, local folder, or random weights) plus GSM8K."""

    model_id: Optional[str] = None
    model_path: Optional[str] = None                # wins over model_id
    model_init: ModelInit = ModelInit.pretrained
    tokenizer_path: Optional[str] = None
    dtype: Dtype = Dtype.bf16
    use_chat_template: bool = False
    data: GSM8KData = MISSING


KIND_SCHEMAS = {"tiny": TinyTestbed, "hf": HFTestbed}
