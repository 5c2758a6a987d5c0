"""The shared scorer on every real GSM8K gold solution (train 7473 + test 1319), and on hand-made edge cases."""
import json
import os
from pathlib import Path

import pytest

from noisebench.scoring import extract_flexible, extract_strict, gold_answer, gsm8k_reward, make_prompt, score


def gsm8k_dir() -> Path:
    """``$NOISEBENCH_GSM8K_DIR`` or ``/work/shared/data/gsm8k`` beside the checkout (``<repo>/../shared``)."""
    env = os.environ.get("NOISEBENCH_GSM8K_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/gsm8k"


def _records():
    folder = gsm8k_dir()
    if not all((folder / f"{s}.jsonl").is_file() for s in ("train", "test")):
        pytest.skip(f"real GSM8K not found: {folder}/{{train,test}}.jsonl absent (set NOISEBENCH_GSM8K_DIR)")
    rows = []
    for split in ("train", "test"):
        with open(folder / f"{split}.jsonl", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def _gold_by_hand(answer: str) -> str:
    """Independent of scoring.py: GSM8K's final line is '#### <number>' with thousands commas."""
    last = answer.strip().splitlines()[-1]
    assert last.startswith("#### "), last
    return last[5:].strip().replace(",", "")


def test_every_real_gold_solution_scores_one_and_a_perturbed_one_zero():
    rows = _records()
    assert len(rows) == 7473 + 1319
    strict_ok = flex_ok = strict_bad = flex_bad = 0
    for r in rows:
        gold = _gold_by_hand(r["answer"])
        assert float(gold_answer(r["answer"])) == float(gold)
        strict_ok += score(r["answer"], gold, "strict")[0]
        flex_ok += score(r["answer"], gold, "flexible")[0]
        # Perturb: the same solution with the final number off by one.
        wrong = str(int(float(gold)) + 1) if float(gold).is_integer() else str(float(gold) + 1)
        perturbed = r["answer"].rsplit("####", 1)[0] + "#### " + wrong
        strict_bad += score(perturbed, gold, "strict")[0]
        flex_bad += score(perturbed, gold, "flexible")[0]
    assert strict_ok == flex_ok == len(rows)
    assert strict_bad == flex_bad == 0


def test_gold_has_negative_and_thousands_answers():
    """The real set exercises the cases the regexes must handle (else the test above proves less)."""
    golds = [_gold_by_hand(r["answer"]) for r in _records()]
    assert sum(g.startswith("-") for g in golds) >= 1
    assert sum(abs(float(g)) >= 1000 for g in golds) >= 100


@pytest.mark.parametrize("text,strict,flexible", [
    ("so 1,800 in all\n#### 1,800", "1800", "1800"),
    ("#### $1,800", "1800", "1800"),           # verl strips $ and commas after the marker
    ("The answer is 1800.", None, "1800"),
    ("#### 5\n#### 7", "7", "7"),              # the LAST marker counts, as in the study's reward
    ("#### -3", "-3", "-3"),
    ("no number here", None, None),
])
def test_extractors_on_edge_cases(text, strict, flexible):
    assert extract_strict(text) == strict
    assert extract_flexible(text) == flexible


def test_score_and_reward_agree():
    comps = ["12 + 3 = 15\n#### 15", "12 + 3 = 15\nThe answer is 15.", "#### 16"]
    assert gsm8k_reward(comps, ["15", "15", "15"]) == [1.0, 0.0, 0.0]
    assert [score(c, "x\n#### 15", "flexible")[0] for c in comps] == [1.0, 1.0, 0.0]
    assert make_prompt(" Q? ").endswith('after "####".') and make_prompt(" Q? ").startswith("Q? Let's")
    with pytest.raises(ValueError, match="strict"):
        score("1", "1", mode="loose")
