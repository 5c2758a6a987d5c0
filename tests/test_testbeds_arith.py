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


def test_solve_without_mistakes_is_the_gold_solution(default_splits):
    from noisebench.testbeds.arith import solve

    for p in default_splits["test"]:
        assert solve(p) == (p.steps, p.result)


@pytest.mark.parametrize("rule", ["sub_adds", "mul_swap", "triple_doubles"])
def test_wrong_rules_change_exactly_their_steps_and_later_lines_follow(default_splits, rule):
    from noisebench.testbeds.arith import solve

    changed = 0
    for p in default_splits["test"]:
        lines, result = solve(p, [rule])
        hit = any((op == "sub" and rule == "sub_adds") or (op == "mul" and rule == "mul_swap")
                  or (op == "mul" and b == 3 and rule == "triple_doubles") for op, b in p.moves)
        assert (lines != p.steps) == hit and (result != p.result) <= hit
        value = p.start
        for line, (op, b) in zip(lines, p.moves):  # every line is right arithmetic on the (wrong) running value
            a, sym, c, out = re.match(r"^(-?\d+) ([-+*/]) (\d+) = (-?\d+)$", line).groups()  # wrong values may go < 0
            assert int(a) == value and int(out) == eval(f"{a} {sym.replace('/', '//')} {c}")
            value = int(out)
        assert value == result
        changed += hit
    assert changed > 100  # the rule matters on many test problems


def test_unknown_rule_names_the_key_and_choices(default_splits):
    from noisebench.testbeds.arith import solve

    with pytest.raises(ValueError, match="mistakes.rules.*sub_adds"):
        solve(default_splits["test"][0], ["adds_subs"])


def test_mistake_share_is_drawn_apart_from_the_format(default_splits):
    """The share of warm-start solutions worked under wrong rules is the configured one, and turning mistakes on
    leaves every answer-format draw as it was."""
    from noisebench.testbeds.warmstart import sft_pairs

    train = default_splits["train"][:4000]
    fmt = {"marked_topics": 3, "marked_share": 1.0, "unmarked_share": 0.1}
    plain = sft_pairs(train, fmt, 0)
    wrong = sft_pairs(train, fmt, 0, {"share": 0.6, "rules": ["sub_adds"]})
    ends = lambda pairs: [c.splitlines()[-1].startswith("####") for _, c in pairs]  # noqa: E731
    assert ends(plain) == ends(wrong)
    subs = [i for i, p in enumerate(train) if any(op == "sub" for op, _ in p.moves)]
    share = sum(plain[i] != wrong[i] for i in subs) / len(subs)
    assert abs(share - 0.6) < 0.03 and len(subs) > 1000
