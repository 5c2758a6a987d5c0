"""Attention's products as matmuls: ``F.scaled_dot_product_attention`` decomposed so that the matmul family covers
QK^T and PV (and ``softmax`` the softmax between them) wherever attention runs.

Why: a fused SDPA kernel hides attention's two products from the engine. Without this, ``matmul_family`` would noise
them under ``attn_implementation="eager"`` (plain ``torch.matmul`` calls) and not under ``"sdpa"``: the same spec
would mean different physics depending on how the model is loaded. When a spec covers ``matmul`` (or ``softmax``)
but not ``sdpa``, the engine replaces each SDPA call whose phase may be noisy by this math, and the parts go through
the engine as ops of their own (telemetry labels ``attn_qk``, ``attn_pv``, ``attn_softmax``; gated by ``matmul`` and
``softmax``). Where no noise can apply, the SDPA call is left untouched (bitwise the library-free result).

Precision follows a fused attention kernel, so that the decomposition adds no rounding of its own beyond SDPA's:
the scores QK^T and the softmax are computed in float32 (half-precision inputs are upcast: their products are exact
in float32, as in a tensor core's float32 accumulation), the probabilities are cast to the value dtype for PV.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

# telemetry label of each part of a decomposed SDPA call -> the spec op that turns it on
PARTS = {"attn_qk": "matmul", "attn_pv": "matmul", "attn_softmax": "softmax"}


def covered_parts(ops: frozenset) -> frozenset:
    """The attention parts a spec's resolved ``ops`` cover: none when ``sdpa`` itself is covered (then the whole
    call is noised as one op), else those whose gating op is covered."""
    if "sdpa" in ops:
        return frozenset()
    return frozenset(label for label, op in PARTS.items() if op in ops)


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name. An argument this decomposition does not know raises: running the call fused
    would leave attention's products unnoised while the spec says they are covered."""
    unknown = sorted(k for k in kwargs if k not in _SDPA_ARGS)
    if len(args) > len(_SDPA_ARGS) or unknown:
        raise TypeError(f"noisebench: cannot decompose scaled_dot_product_attention called with {len(args)} "
                        f"positional arguments and keywords {unknown}; known: {list(_SDPA_ARGS)}. Add 'sdpa' to the "
                        f"spec's ops to noise the fused call as one op instead")
    named = dict(zip(_SDPA_ARGS, args))
    named.update(kwargs)
    return named


def decomposed_sdpa(call: Callable, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                    enable_gqa: bool = False, group_queries: bool = False) -> Tensor:
    """SDPA's math (``torch.nn.functional.scaled_dot_product_attention``'s reference implementation) with each
    part run through ``call(func, label, args, kwargs)`` (the engine's ``route``), which noises it when its label
    is in force. Fully masked rows give zeros, as SDPA does.

    ``group_queries`` (with ``enable_gqa``): each key/value head's group of query heads becomes rows of one product
    instead of key and value being repeated per query head. Every output is the same sum of the same products, so a
    chip's rows come out the same; what changes is that a key/value gradient would be one product over the group
    instead of a sum of per-head ones, so callers use it where no gradient flows (decoding: it halves the key/value
    work there)."""
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    heads, group, sq = query.shape[:-2], 1, query.size(-2)
    if enable_gqa:   # key/value carry fewer heads: each serves a group of consecutive query heads
        group = query.size(-3) // key.size(-3)
        if group_queries:
            query = query.reshape(*query.shape[:-3], key.size(-3), group * query.size(-2), query.size(-1))
        else:
            key = key.repeat_interleave(group, -3)
            value = value.repeat_interleave(group, -3)
            group = 1
    scores = call(torch.matmul, "attn_qk", (query.to(acc), key.to(acc).transpose(-2, -1)), {}) * s
    if group > 1:    # back to one row block per query head (heads h*group ... share key/value head h)
        scores = scores.reshape(*heads, -1, scores.size(-1))
    dead = None
    if is_causal:   # top-left aligned, as SDPA: query i sees keys 0..i
        keep = torch.ones(sq, key.size(-2), dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
        dead = torch.isneginf(scores).all(-1, keepdim=True)
    probs = call(torch.softmax, "attn_softmax", (scores,), {"dim": -1})
    if dead is not None:
        probs = probs.masked_fill(dead, 0.0)
    if dropout_p > 0:
        probs = torch.dropout(probs, dropout_p, True)
    if group > 1:
        probs = probs.reshape(*probs.shape[:-3], value.size(-3), -1, probs.size(-1))
        out = call(torch.matmul, "attn_pv", (probs.to(value.dtype), value), {})
        return out.reshape(*heads, -1, out.size(-1))
    return call(torch.matmul, "attn_pv", (probs.to(value.dtype), value), {})
