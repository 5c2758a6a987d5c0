"""Testbeds: build or load a model + tokenizer + GRPO prompts + eval data for one ``conf/testbed`` config.

Two kinds: ``tiny`` (synthetic GSM8K-format task, a ~1M-parameter Qwen2 and tokenizer built in code and warm-started
on CPU, cached by config hash) and ``hf`` (a transformers checkpoint such as Qwen2.5-1.5B-Instruct plus GSM8K).
"""
from __future__ import annotations

import os
from typing import Any

from noisebench.testbeds.base import Testbed, TestbedError, to_plain
from noisebench.testbeds.cache import default_cache_dir
from noisebench.testbeds.gsm8k import GSM8KUnavailable, load_gsm8k

__all__ = ["Testbed", "TestbedError", "GSM8KUnavailable", "load_testbed", "check_reachable", "default_cache_dir",
           "load_gsm8k", "KINDS"]
KINDS = ("tiny", "hf")


def _kind(cfg: dict) -> str:
    kind = cfg.get("kind")
    if kind not in KINDS:
        raise ValueError(f"testbed.kind={kind!r}; valid choices: {list(KINDS)}")
    return kind


def load_testbed(cfg: Any, cache_dir=None, device: str = "cpu") -> Testbed:
    """Build (or load from cache) the testbed described by ``cfg``.

    Args:
        cfg: the ``testbed`` config node (OmegaConf DictConfig or dict), e.g. ``conf/testbed/tiny_arith.yaml``.
        cache_dir: cache root; None means ``$NOISEBENCH_CACHE`` or ``~/.cache/noisebench``.
        device (str): where the model ends up (and where the tiny warm start trains on its first build).

    Returns:
        Testbed: see :class:`noisebench.testbeds.base.Testbed`.

    Raises:
        ValueError: a config key is missing, unknown or invalid (the message names it and the valid choices).
        TestbedError: the model or data cannot be reached (one paragraph saying how to fix it).
    """
    cfg = to_plain(cfg)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    cache_dir = cache_dir or default_cache_dir()
    if _kind(cfg) == "tiny":
        from noisebench.testbeds import tiny_arith
        return tiny_arith.load(cfg, cache_dir, device)
    from noisebench.testbeds import hf_testbed
    return hf_testbed.load(cfg, cache_dir, device)


def check_reachable(cfg: Any) -> list[str]:
    """Human-readable reasons why :func:`load_testbed` would fail, found without loading any weights.

    Checks the config keys, then for ``kind: hf`` the model (local folder, or hub cache / hub) and GSM8K (local
    files or hub). An empty list means nothing blocking was found. Used by the dry run.
    """
    try:
        cfg = to_plain(cfg)
        kind = _kind(cfg)
    except (TypeError, ValueError) as e:
        return [str(e)]
    if kind == "tiny":
        from noisebench.testbeds import tiny_arith
        try:
            tiny_arith.validate(cfg)
        except (TypeError, ValueError) as e:
            return [str(e)]
        return []
    from noisebench.testbeds import hf_testbed
    return hf_testbed.check(cfg)
