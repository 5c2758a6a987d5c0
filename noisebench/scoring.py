"""GSM8K answer extraction and scoring, shared by the GRPO reward and the lm-eval task filters.

Why one module: the reward the policy is trained on and the accuracy the leaderboard reports must grade
the same text the same way. Definitions (they follow the study's verl reward, ``verl/utils/reward_score/gsm8k.py``):

- **strict**: the number after the LAST ``#### `` marker (``#### (-?[0-9.,]+)``), commas and ``$`` stripped.
  verl also looks only at the last 300 characters; we search the whole text, which agrees whenever the
  final marker sits at the end (always, with our stop sequences and length caps).
- **flexible**: the last number anywhere in the text (lm-eval's ``flexible-extract``).

A prediction is right when its parsed number equals the gold number numerically (``1800`` == ``1800.0``).
"""
from __future__ import annotations

import re
from typing import Optional

#: The study's instruction appended to each question (verl ``examples/data_preprocess/gsm8k.py``).
PROMPT_SUFFIX = 'Let\'s think step by step and output the final answer after "####".'

STRICT_RE = re.compile(r"#### ?(\-?[0-9\.\,\$]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def make_prompt(question: str) -> str:
    """The study's prompt: the question, a space, then the ``####`` instruction."""
    return f"{question.strip()} {PROMPT_SUFFIX}"


def _clean(num: str) -> Optional[str]:
    num = num.replace(",", "").replace("$", "").strip()
    num = num.rstrip(".")
    if not num or num in {"-", "."}:
        return None
    return num


def extract_strict(text: str) -> Optional[str]:
    """Number after the last ``####`` marker, or None when the model never wrote one."""
    matches = STRICT_RE.findall(text)
    if not matches:
        return None
    return _clean(matches[-1])


def extract_flexible(text: str) -> Optional[str]:
    """Last number anywhere in the text, or None."""
    matches = FLEXIBLE_RE.findall(text)
    if not matches:
        return None
    a, b = matches[-1]
    return _clean(a or b)


def gold_answer(answer_field: str) -> str:
    """The gold number of a GSM8K-format ``answer`` field (the text after its ``####``)."""
    got = extract_strict(answer_field)
    if got is None:
        raise ValueError(f"answer field has no '#### <number>' line: {answer_field[-80:]!r}")
    return got


def _same_number(pred: Optional[str], gold: str) -> bool:
    if pred is None:
        return False
    try:
        return float(pred) == float(gold)
    except ValueError:
        return pred == gold


def score(text: str, gold: str, mode: str = "strict") -> tuple[float, Optional[str]]:
    """Grade one completion: returns (1.0 or 0.0, the parsed number or None).

    Args:
        text (str): the model's completion.
        gold (str): the gold number (see :func:`gold_answer`), or a full GSM8K answer field.
        mode (str): ``"strict"`` or ``"flexible"``.
    """
    if mode not in ("strict", "flexible"):
        raise ValueError(f"scoring mode {mode!r} is not one of ['strict', 'flexible']")
    if "####" in gold:
        gold = gold_answer(gold)
    pred = extract_strict(text) if mode == "strict" else extract_flexible(text)
    return (1.0 if _same_number(pred, gold) else 0.0), pred


def gsm8k_reward(completions, answer, **_) -> list[float]:
    """TRL reward function: strict 0/1 per completion (``answer`` arrives repeated per generation)."""
    out = []
    for comp, ans in zip(completions, answer):
        text = comp if isinstance(comp, str) else comp[-1]["content"]
        out.append(score(text, ans, "strict")[0])
    return out
