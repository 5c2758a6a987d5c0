"""Procedural grade-school word problems in GSM8K's record format (``question``, ``answer`` ending ``#### N``).

Why procedural: no machine here can download GSM8K or a math model, yet the suite must show a real GRPO learning
curve anywhere. Problems are 1 to ``max_ops`` arithmetic steps on one quantity ("Ava has 12 shells. She finds 7
more. ..."); every solution line is a GSM8K-style equation and the last line is ``#### <number>``.

Splits are deterministic functions of ``seed`` and never overlap: the test split is drawn first from its own RNG
stream (so it does not change when ``n_train`` changes), then train problems are drawn skipping every test question.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

NAMES = [("Ava", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Ela", "she"), ("Finn", "he"),
         ("Gia", "she"), ("Hugo", "he"), ("Ivy", "she"), ("Jack", "he"), ("Kim", "she"), ("Leo", "he"),
         ("Mia", "she"), ("Noah", "he"), ("Olga", "she"), ("Paul", "he"), ("Rosa", "she"), ("Sam", "he"),
         ("Tina", "she"), ("Omar", "he"), ("Uma", "she"), ("Victor", "he"), ("Wendy", "she"), ("Yusuf", "he")]

#: (item, verbs that add, verbs that take away). Topics also carry the warm start's answer-format bias.
TOPICS = [
    ("apples", ["buys", "picks"], ["eats", "sells"]),
    ("marbles", ["wins", "finds"], ["loses", "gives away"]),
    ("stickers", ["buys", "gets"], ["uses", "gives away"]),
    ("books", ["buys", "borrows"], ["sells", "donates"]),
    ("coins", ["finds", "earns"], ["spends", "loses"]),
    ("cookies", ["bakes", "buys"], ["eats", "shares"]),
    ("pencils", ["buys", "finds"], ["loses", "gives away"]),
    ("cards", ["wins", "buys"], ["trades away", "loses"]),
    ("shells", ["collects", "finds"], ["drops", "gives away"]),
    ("stamps", ["buys", "receives"], ["sells", "mails"]),
]
OPS = ("add", "sub", "mul", "div")
MUL_WORDS = {2: "doubles", 3: "triples"}
#: Consistent wrong rules a warm start can be taught on some problems (GRPO then has a right rule to sharpen towards):
#: ``sub_adds`` adds what the text takes away; ``mul_swap`` doubles where it says triples and vice versa;
#: ``triple_doubles`` doubles where it says triples.
MISTAKES = ("sub_adds", "mul_swap", "triple_doubles")
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class ArithSpec:
    """Difficulty and size of the synthetic task.

    Args:
        n_train (int): train problems (the warm start's SFT data and GRPO's prompts).
        n_test (int): test problems (>= 1000 gives the leaderboard's statistics enough items).
        min_ops (int): fewest arithmetic steps per problem. Default: 1
        max_ops (int): most arithmetic steps per problem. Default: 3
        max_start (int): largest starting quantity (smallest is 2).
        max_operand (int): largest number added or taken away.
        max_factor (int): largest multiplier / divisor (2 .. max_factor).
        ops (tuple[str]): allowed step kinds, a subset of ``add sub mul div``.
        seed (int): fixes both splits.
    """

    n_train: int = 20000
    n_test: int = 1000
    min_ops: int = 1
    max_ops: int = 3
    max_start: int = 30
    max_operand: int = 20
    max_factor: int = 3
    ops: tuple = ("add", "sub", "mul")
    seed: int = 0

    def validate(self) -> "ArithSpec":
        """Raise ValueError naming the bad key; return self."""
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(f"testbed.data.ops has {bad or 'nothing'}; valid choices: {list(OPS)}")
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"testbed.data needs 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        for key in ("max_start", "max_operand", "max_factor"):
            if getattr(self, key) < 2:
                raise ValueError(f"testbed.data.{key} must be >= 2, got {getattr(self, key)}")
        if self.n_test < 1 or self.n_train < 1:
            raise ValueError(f"testbed.data.n_train and n_test must be >= 1, got {self.n_train}, {self.n_test}")
        return self


@dataclass(frozen=True)
class Problem:
    """One problem: GSM8K fields plus the facts the warm start needs (topic, result, solution steps)."""

    question: str
    steps: tuple = field(default=())  # equation lines, e.g. "12 + 7 = 19"
    result: int = 0
    topic: int = 0
    start: int = 0
    moves: tuple = field(default=())  # (op, operand) per step, e.g. ("sub", 7): what the text asks for

    @property
    def answer(self) -> str:
        """GSM8K-format worked solution: one equation a line, then ``#### N``."""
        return "\n".join(self.steps + (f"#### {self.result}",))

    def record(self) -> dict:
        return {"question": self.question, "answer": self.answer}


def _apply(op: str, value: int, b: int) -> int:
    return {"add": value + b, "sub": value - b, "mul": value * b, "div": value // b}[op]


def solve(p: Problem, mistakes: Iterable[str] = ()) -> tuple[tuple, int]:
    """Equation lines and final value of ``p`` worked under the wrong rules ``mistakes`` (none: the true solution).

    Each wrong rule changes what a step computes, and every later line follows from the wrong value, as a student
    applying a misremembered rule consistently would write it.
    """
    bad = set(mistakes) - set(MISTAKES)
    if bad:
        raise ValueError(f"testbed.warmstart.mistakes.rules has {sorted(bad)}; valid choices: {list(MISTAKES)}")
    value, lines = p.start, []
    for op, b in p.moves:
        if op == "sub" and "sub_adds" in mistakes:
            op = "add"
        elif op == "mul" and "mul_swap" in mistakes:
            b = 5 - b if b in (2, 3) else b
        elif op == "mul" and b == 3 and "triple_doubles" in mistakes:
            b = 2
        new = _apply(op, value, b)
        lines.append(f"{value} {SYMBOL[op]} {b} = {new}")
        value = new
    return tuple(lines), value


def _step(rng: random.Random, spec: ArithSpec, value: int, verbs: tuple, pron: str, item: str):
    """Draw one step valid for ``value`` (no negatives, exact division); return (sentence, (op, operand))."""
    choices = [o for o in spec.ops if not (o == "sub" and value < 2)
               and not (o == "div" and not any(value % k == 0 for k in range(2, spec.max_factor + 1)))
               and not (o == "mul" and value * 2 > 999)]
    op = rng.choice(choices or ["add"])
    if op == "add":
        b = rng.randint(1, spec.max_operand)
        return f"{pron.capitalize()} {rng.choice(verbs[0])} {b} more.", (op, b)
    if op == "sub":
        b = rng.randint(1, min(spec.max_operand, value - 1))
        return f"{pron.capitalize()} {rng.choice(verbs[1])} {b} of them.", (op, b)
    if op == "mul":
        k = rng.randint(2, spec.max_factor)
        text = (f"Then {pron} {MUL_WORDS[k]} the {item} {pron} has." if k in MUL_WORDS
                else f"Then {pron} ends up with {k} times as many.")
        return text, (op, k)
    k = rng.choice([k for k in range(2, spec.max_factor + 1) if value % k == 0])
    return f"{pron.capitalize()} splits them into {k} equal piles and keeps one pile.", (op, k)


def make_problem(rng: random.Random, spec: ArithSpec) -> Problem:
    """One random problem drawn from ``rng`` under ``spec``."""
    name, pron = rng.choice(NAMES)
    topic = rng.randrange(len(TOPICS))
    item, add_verbs, sub_verbs = TOPICS[topic]
    start = value = rng.randint(2, spec.max_start)
    sentences, moves = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(spec.min_ops, spec.max_ops)):
        text, move = _step(rng, spec, value, (add_verbs, sub_verbs), pron, item)
        sentences.append(text)
        moves.append(move)
        value = _apply(move[0], value, move[1])
    sentences.append(f"How many {item} does {name} have now?")
    p = Problem(" ".join(sentences), (), value, topic, start, tuple(moves))
    lines, _ = solve(p)
    return Problem(p.question, lines, value, topic, start, p.moves)


def _draw(rng: random.Random, spec: ArithSpec, n: int, exclude: set) -> list[Problem]:
    out, seen = [], set(exclude)
    for _ in range(50 * n):
        if len(out) == n:
            return out
        p = make_problem(rng, spec)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    raise ValueError(f"testbed.data allows too few distinct problems for {n} items: raise max_start/max_operand/"
                     f"max_ops or lower n_train/n_test")


def make_splits(spec: ArithSpec) -> dict[str, list[Problem]]:
    """Deterministic disjoint splits ``{"train": [...], "test": [...]}`` for ``spec``."""
    spec.validate()
    test = _draw(random.Random(f"arith-test-{spec.seed}"), spec, spec.n_test, set())
    train = _draw(random.Random(f"arith-train-{spec.seed}"), spec, spec.n_train, {p.question for p in test})
    return {"train": train, "test": test}


def write_jsonl(problems: Iterable[Problem], path: Path) -> Path:
    """Write GSM8K-schema records (question, answer), one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.record()) + "\n")
    return path
