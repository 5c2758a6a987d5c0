"""Qwen2 model configs built in code: the tiny testbed model and a random-weight Qwen2.5-1.5B for GPU smoke tests.

Why Qwen2ForCausalLM even for the tiny model: the study's model is Qwen2.5-1.5B-Instruct, so the tiny one shares
its operator mix (RMSNorm, SwiGLU MLP, grouped-query attention, rotary embeddings, tied embeddings). Noise injected
into the same kinds of ops at the same places is then a like-for-like rehearsal, only smaller.
"""
from __future__ import annotations

from typing import Mapping

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

#: Qwen/Qwen2.5-1.5B-Instruct's architecture (its config.json), for randomly initialised smoke-test models.
QWEN2_5_1_5B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", use_sliding_window=False,
                    bos_token_id=151643, eos_token_id=151645)

TINY_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "max_position_embeddings", "tie_word_embeddings", "rope_theta", "rms_norm_eps")


def tiny_config(model_cfg: Mapping, tokenizer) -> Qwen2Config:
    """A small Qwen2Config from the testbed's ``model`` section, sized to ``tokenizer``.

    Args:
        model_cfg (Mapping): keys among ``TINY_KEYS``; anything else is refused by name.
        tokenizer: the testbed tokenizer; sets vocab size and the eos/pad ids.
    """
    unknown = sorted(set(model_cfg) - set(TINY_KEYS))
    if unknown:
        raise ValueError(f"testbed.model has unknown keys {unknown}; valid keys: {list(TINY_KEYS)}")
    return Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None, use_sliding_window=False,
                       hidden_act="silu", **dict(model_cfg))


def random_model(config: Qwen2Config, seed: int, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    """A Qwen2ForCausalLM with weights drawn from ``seed`` (transformers' own init), the global RNG left untouched."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.to(dtype)


def qwen2_5_1_5b_random(seed: int, dtype: torch.dtype = torch.bfloat16, tokenizer=None,
                        device: str = "cpu") -> Qwen2ForCausalLM:
    """Random-weight model of the real Qwen2.5-1.5B architecture and vocabulary (1.54B parameters).

    For GPU smoke tests of the full recipe where the hub is unreachable: it is the real model's size and op mix,
    but says nothing about accuracy. With a small tokenizer its ids are a subset of the 151936-entry vocabulary;
    eos/pad then follow that tokenizer so generation stops where the tokenizer expects.
    """
    cfg = dict(QWEN2_5_1_5B)
    if tokenizer is not None:
        cfg.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    config = Qwen2Config(**cfg, pad_token_id=cfg["eos_token_id"] if tokenizer is None else tokenizer.pad_token_id)
    with torch.device(device):
        return random_model(config, seed, dtype)
