"""Synthetic GSM8K-format task: deterministic disjoint splits, GSM8K answer format, correct worked arithmetic."""
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from noisebench.scoring import gold_answer
from noisebench.testbeds.arith import ArithSpec, make_splits
from noisebench.testbeds.tiny_arith import arith_spec

CONF = Path(__file__).resolve().parents[1] / "conf/testbed/tiny_arith.yaml"
LINE = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


@pytest.fixture(scope="module")
def default_splits():
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    return make_splits(arith_spec(cfg))


def test_default_splits_sizes_disjoint_and_unique(default_splits):
    train, test = default_splits["train"], default_splits["test"]
    assert len(test) >= 1000 and len(train) >= 10000
    q_train, q_test = {p.question for p in train}, {p.question for p in test}
    assert len(q_train) == len(train) and len(q_test) == len(test)
    assert not q_train & q_test


def test_splits_are_deterministic_and_test_ignores_n_train():
    spec = ArithSpec(n_train=3000, n_test=1000, seed=7)
    a, b = make_splits(spec), make_splits(spec)
    assert [p.record() for p in a["train"]] == [p.record() for p in b["train"]]
    assert [p.record() for p in a["test"]] == [p.record() for p in b["test"]]
    bigger = make_splits(ArithSpec(n_train=5000, n_test=1000, seed=7))
    assert [p.record() for p in bigger["test"]] == [p.record() for p in a["test"]]
    other = make_splits(ArithSpec(n_train=3000, n_test=1000, seed=8))
    same = sum(x.question == y.question for x, y in zip(other["test"], a["test"]))
    assert same < 10


def test_every_answer_is_gsm8k_format_and_arithmetically_right(default_splits):
    n_ops = []
    for p in default_splits["train"] + default_splits["test"]:
        rec = p.record()
        assert set(rec) == {"question", "answer"} and rec["question"].endswith("?")
        lines = rec["answer"].split("\n")
        assert re.fullmatch(r"#### \d+", lines[-1]), lines[-1]
        assert int(gold_answer(rec["answer"])) == p.result
        prev = None
        for line in lines[:-1]:
            a, op, b, c = LINE.match(line).groups()
            a, b, c = int(a), int(b), int(c)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[op] == c
            assert prev is None or a == prev  # each step continues from the last result
            prev = c
        assert prev == p.result and p.result >= 0
        assert re.search(rf"\b{lines[0].split()[0]}\b", rec["question"])  # the start value is in the question
        n_ops.append(len(lines) - 1)
    assert set(n_ops) == {1, 2, 3}


def test_difficulty_knobs_change_the_problems():
    easy = make_splits(ArithSpec(n_train=500, n_test=500, max_ops=1, ops=("add",), seed=1))["test"]
    assert all(len(p.steps) == 1 and " + " in p.steps[0] for p in easy)
    div = make_splits(ArithSpec(n_train=500, n_test=500, ops=("div",), max_start=60, seed=1))["test"]
    assert sum(" / " in s for p in div for s in p.steps) > 100


@pytest.mark.parametrize("bad,match", [
    (dict(ops=("add", "pow")), r"ops.*valid choices: \['add', 'sub', 'mul', 'div'\]"),
    (dict(min_ops=3, max_ops=2), "min_ops"),
    (dict(max_operand=1), "max_operand"),
])
def test_bad_spec_names_the_key(bad, match):
    with pytest.raises(ValueError, match=match):
        ArithSpec(**bad).validate()


def test_too_small_problem_space_is_a_clear_error():
    with pytest.raises(ValueError, match="too few distinct problems"):
        make_splits(ArithSpec(n_train=100000, n_test=1000, max_ops=1, max_start=2, max_operand=2, ops=("add",)))
