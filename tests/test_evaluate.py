"""Checkpoint evaluation: real lm-eval runs on the tiny model, the arith split and the real GSM8K test file."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
from pathlib import Path

for _k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_k, "1")

import numpy as np
import pytest
import torch
from lm_eval.api.model import LM

from noisebench import scoring
from noisebench.evaluate import EvalResult, evaluate_checkpoint, load_checkpoint, tasks_dir

GSM8K_DIR = Path(os.environ.get("NOISEBENCH_GSM8K_DIR", Path(__file__).resolve().parents[2] / "shared/data/gsm8k"))
needs_gsm8k = pytest.mark.skipif(not (GSM8K_DIR / "test.jsonl").is_file(),
                                 reason=f"real GSM8K test file absent: {GSM8K_DIR}/test.jsonl")


class ScriptLM(LM):
    """A model-free lm-eval backend: answers each request with ``answer_fn(doc, doc_id)``.

    It runs lm-eval's real request building, filters, metric and aggregation, with text we choose.
    """

    def __init__(self, answer_fn):
        super().__init__()
        self.answer_fn = answer_fn

    def generate_until(self, requests, disable_tqdm: bool = False):
        return [self.answer_fn(r.doc, r.doc_id) for r in requests]

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.fixture(scope="module")
def testbed(tmp_path_factory):
    """The embedded testbed, shrunk: no warm start (random weights test the plumbing), fewer train problems."""
    from omegaconf import OmegaConf

    from noisebench.testbeds import load_testbed

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/testbed/tiny_arith.yaml")
    cfg.warmstart.steps, cfg.data.n_train = 0, 2000
    return load_testbed(cfg, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def arith_file(testbed) -> Path:
    return Path(testbed.eval_data_files["test"])


@pytest.fixture(scope="module")
def tiny(testbed):
    """(model, tokenizer) of the testbed: a 1M-parameter Qwen2 and its byte-level BPE tokenizer."""
    return testbed.model, testbed.tokenizer


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _gold(doc, doc_id):
    return doc["answer"]  # the reference solution, "#### N" last


# ---- grading: the task's filters + metric equal noisebench.scoring --------------------------------------------

@needs_gsm8k
def test_gold_answers_score_100_on_all_real_gsm8k_test_items(tmp_path):
    res = evaluate_checkpoint(ScriptLM(_gold), task="noisebench_gsm8k", data_files={"test": GSM8K_DIR / "test.jsonl"},
                              output_dir=tmp_path)
    assert res.n == 1319 and res.doc_ids == list(range(1319))
    assert res.acc == 1.0 and res.acc_flexible == 1.0 and sum(res.per_item) == sum(res.per_item_flexible) == 1319


def test_gold_answers_score_100_on_arith_split(arith_file):
    res = evaluate_checkpoint(ScriptLM(_gold), task="noisebench_arith", data_files={"test": arith_file})
    assert res.n == 1000 and res.acc == 1.0 and res.acc_flexible == 1.0


def test_wrong_answers_score_0_and_mixed_answers_score_by_doc_id(arith_file):
    def off_by_one(doc, doc_id):
        return f"#### {int(scoring.gold_answer(doc['answer'])) + 1}"

    assert evaluate_checkpoint(ScriptLM(off_by_one), task="noisebench_arith", data_files={"test": arith_file},
                               limit=100).acc == 0.0

    def every_third(doc, doc_id):  # right for doc ids divisible by 3; lm-eval reorders requests, we must not
        return doc["answer"] if doc_id % 3 == 0 else off_by_one(doc, doc_id)

    res = evaluate_checkpoint(ScriptLM(every_third), task="noisebench_arith", data_files={"test": arith_file},
                              limit=200)
    assert res.per_item == [int(i % 3 == 0) for i in range(200)]
    assert res.acc == pytest.approx(67 / 200, abs=0) and res.acc == np.mean(res.per_item)
    p = res.acc  # lm-eval's own stderr of a mean: sample std / sqrt(n)
    assert res.acc_stderr == pytest.approx(math.sqrt(p * (1 - p) * 200 / 199 / 200), rel=1e-12)


EDGE = [  # (completion, gold): strict must take the LAST "####", flexible the last number; numbers compare by value
    ("#### $1,800", "1800"), ("####1800", "1800"), ("#### 1800.00", "1800"), ("The answer is 1800.", "1800"),
    ("#### 1800\nCheck: 2 + 2", "1800"), ("#### 5\nNo wait.\n#### 7", "7"), ("#### 5\nNo wait.\n#### 7", "5"),
    ("#### -3", "-3"), ("#### -0", "0"), ("#### 2.50", "2.5"), ("no number at all", "4"), ("#### 12,345,678", "12345678"),
    ("#### 0.1", "0.10"), ("#### 1.2.3", "1.2.3"), ("####", "0"), ("x = 3 * 4 = 12\n#### 12", "12"),
]


def test_task_grading_equals_scoring_module_on_edge_cases(tmp_path):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"work\n#### {g}"}) + "\n"
                            for i, (_, g) in enumerate(EDGE)))
    res = evaluate_checkpoint(ScriptLM(lambda doc, i: EDGE[i][0]), task="noisebench_gsm8k", data_files={"test": data})
    assert res.per_item == [int(scoring.score(t, g, "strict")[0]) for t, g in EDGE]
    assert res.per_item_flexible == [int(scoring.score(t, g, "flexible")[0]) for t, g in EDGE]
    assert res.per_item[5:7] == [1, 0] and 0 < sum(res.per_item) < len(EDGE)  # last "####", not lm-eval's first


# ---- the real model path ----------------------------------------------------------------------------------------

def test_tiny_model_on_arith_structure_files_rng_and_train_mode(tiny, arith_file, tmp_path):
    model, tok = tiny
    model.train()
    threads = torch.get_num_threads()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    expected = random.random(), np.random.rand(), torch.rand(3)
    random.setstate(states[0]), np.random.set_state(states[1]), torch.set_rng_state(states[2])

    res = evaluate_checkpoint(model, tok, task="noisebench_arith", data_files={"test": arith_file}, limit=64,
                              batch_size=32, max_gen_toks=24, output_dir=tmp_path)

    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert model.training and torch.get_num_threads() == threads and tok.padding_side == "left"
    assert isinstance(res, EvalResult) and res.n == 64 and res.doc_ids == list(range(64)) and not res.noisy
    assert set(res.per_item) <= {0, 1} and set(res.per_item_flexible) <= {0, 1}
    assert res.acc == np.mean(res.per_item) and res.acc_flexible == np.mean(res.per_item_flexible)
    assert res.seconds > 0 and res.task_version == 1.0 and isinstance(res.to_dict()["per_item"], list)
    samples = _rows(Path(res.samples_path))
    assert len(samples) == 2 * 64 and {s["filter"] for s in samples} == {"strict-match", "flexible-extract"}
    questions = {r["question"] for r in _rows(arith_file)}
    prompts = [s["arguments"]["gen_args_0"]["arg_0"] for s in samples]
    assert all(p.endswith(scoring.PROMPT_SUFFIX) for p in prompts)
    assert prompts[0] == scoring.make_prompt(samples[0]["doc"]["question"]) and samples[0]["doc"]["question"] in questions
    assert all(s["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == 24 for s in samples)
    agg = json.loads(Path(res.results_path).read_text())["results"]["noisebench_arith"]
    assert agg["exact_match,strict-match"] == res.acc and "exact_match_stderr,strict-match" in agg


def test_saved_path_matches_in_memory_and_batch_size_does_not_change_greedy_answers(tiny, arith_file, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    m2, t2 = load_checkpoint(tmp_path / "ckpt")
    probe = "Ava has 12 apples.\nShe eats 3.  #### 9"
    assert t2(probe)["input_ids"] == tok(probe)["input_ids"] and t2.decode(t2(probe)["input_ids"]) == probe
    kw = dict(task="noisebench_arith", data_files={"test": arith_file}, limit=48, max_gen_toks=16)
    a = evaluate_checkpoint(model, tok, batch_size=48, output_dir=tmp_path / "a", **kw)
    b = evaluate_checkpoint(str(tmp_path / "ckpt"), batch_size=16, output_dir=tmp_path / "b", **kw)
    resps = [[s["resps"] for s in _rows(Path(r.samples_path))] for r in (a, b)]
    assert resps[0] == resps[1] and a.per_item == b.per_item


@needs_gsm8k
def test_tiny_model_on_real_gsm8k_file_with_limit(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setenv("NOISEBENCH_GSM8K_DIR", str(GSM8K_DIR))  # data located through the env var, no data_files
    res = evaluate_checkpoint(model, tok, task="noisebench_gsm8k", limit=6, max_gen_toks=8, output_dir=tmp_path)
    assert res.n == 6 and res.doc_ids == list(range(6)) and res.acc == np.mean(res.per_item)
    gold = _rows(GSM8K_DIR / "test.jsonl")[:6]
    samples = sorted((s for s in _rows(Path(res.samples_path)) if s["filter"] == "strict-match"),
                     key=lambda s: s["doc_id"])
    assert [s["arguments"]["gen_args_0"]["arg_0"] for s in samples] == [scoring.make_prompt(g["question"]) for g in gold]
    assert [float(s["target"]) for s in samples] == [float(scoring.gold_answer(g["answer"])) for g in gold]


def test_chat_template_is_applied_to_the_prompt(tiny, arith_file, tmp_path):
    model, tok = tiny
    res = evaluate_checkpoint(model, tok, task="noisebench_gsm8k_chat", data_files={"test": arith_file}, limit=2,
                              max_gen_toks=4, output_dir=tmp_path)
    s = next(r for r in _rows(Path(res.samples_path)) if r["doc_id"] == 0)
    want = tok.apply_chat_template([{"role": "user", "content": scoring.make_prompt(s["doc"]["question"])}],
                                   tokenize=False, add_generation_prompt=True)
    assert s["arguments"]["gen_args_0"]["arg_0"] == want and want.startswith("<|im_start|>user\n")


class RecordingInjector:
    """Duck-typed injector (only ``phase``): counts model forwards made while its phase is active."""

    def __init__(self, model):
        self.active, self.inside, self.outside = None, 0, 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.active == "eval":
            self.inside += 1
        else:
            self.outside += 1

    @contextlib.contextmanager
    def phase(self, name):
        self.active = name
        try:
            yield self
        finally:
            self.active = None


def test_duck_typed_injector_generation_inside_eval_phase_and_clean_too_outside(tiny, arith_file):
    model, tok = tiny
    inj = RecordingInjector(model)
    try:
        res = evaluate_checkpoint(model, tok, task="noisebench_arith", data_files={"test": arith_file}, limit=8,
                                  max_gen_toks=4, injector=inj, noisy=True, clean_too=True)
    finally:
        inj.handle.remove()
    assert res.noisy and res.clean is not None and not res.clean.noisy and res.clean.n == 8
    assert inj.inside > 0 and inj.outside == inj.inside  # one noisy pass in the phase, one clean pass outside


def _strict_resps(res: EvalResult) -> list:
    return [s["resps"] for s in sorted(_rows(Path(res.samples_path)), key=lambda s: s["doc_id"])
            if s["filter"] == "strict-match"]


def test_real_noise_injector_changes_answers_reproducibly_and_clean_stays_clean(tiny, arith_file, tmp_path):
    from noisebench.noise import NoiseInjector, NoiseSpec

    model, tok = tiny
    kw = dict(task="noisebench_arith", data_files={"test": arith_file}, limit=16, max_gen_toks=8, batch_size=16)
    plain = evaluate_checkpoint(model, tok, output_dir=tmp_path / "plain", **kw)
    spec = NoiseSpec(type="relative_gaussian", scale=0.3, ops=["matmul_family"], phases=["eval"], seed=0)
    inj = NoiseInjector(spec)
    start = inj.state_dict()
    a = evaluate_checkpoint(model, tok, injector=inj, clean_too=True, output_dir=tmp_path / "a", **kw)
    assert a.noisy and not inj.installed  # installed for the call only
    assert inj.telemetry()["noise/eval/linear/fwd/calls"] > 0
    changed = sum(x != y for x, y in zip(_strict_resps(a), _strict_resps(plain)))
    assert changed >= 8  # random model at scale 0.3: most answers change (15 of 16 with this seed)
    assert _strict_resps(a.clean) == _strict_resps(plain)
    inj.load_state_dict(start)  # same stream position, same batch size and order -> the same noisy answers
    b = evaluate_checkpoint(model, tok, injector=inj, output_dir=tmp_path / "b", **kw)
    assert _strict_resps(b) == _strict_resps(a)
    with NoiseInjector(spec, global_phase=True) as glob:  # noises every call outside phases...
        c = evaluate_checkpoint(model, tok, injector=glob, noisy=False, output_dir=tmp_path / "c", **kw)
        assert glob.installed  # ...so a clean evaluation lifts it for the call and puts it back
    assert _strict_resps(c) == _strict_resps(plain) and not c.noisy
    off = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=0.1, phases=["rollout"]))
    assert not evaluate_checkpoint(model, tok, injector=off, **kw).noisy  # spec has no eval phase: clean
    # a model the injector does not know is attached for the call: layer targeting needs its module names, and an
    # injector with hooks="attached" would otherwise hook nothing (no op inside layer 0: no noise at all)
    first = NoiseInjector(NoiseSpec(**{**spec.to_dict(), "layers": [0, 0]}), hooks="attached")
    d = evaluate_checkpoint(model, tok, injector=first, output_dir=tmp_path / "d", **kw)
    assert d.noisy and first.telemetry()["noise/eval/linear/fwd/calls"] > 0
    assert _strict_resps(d) != _strict_resps(plain)
    assert not first.is_attached(model) and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_input_errors_name_the_problem(tiny, arith_file, monkeypatch):
    model, tok = tiny
    with pytest.raises(ValueError, match="noisebench_arith"):
        evaluate_checkpoint(model, tok, task="gsm8k", data_files={"test": arith_file})
    monkeypatch.delenv("NOISEBENCH_ARITH_DIR", raising=False)
    with pytest.raises(ValueError, match="NOISEBENCH_ARITH_DIR"):
        evaluate_checkpoint(model, tok, task="noisebench_arith", limit=2)
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_checkpoint(model, None, task="noisebench_arith", data_files={"test": arith_file})
    assert (tasks_dir() / "noisebench" / "_default_template_yaml").is_file()


def test_a_chip_run_scores_noisy_on_the_chip_and_clean_on_the_reference_arithmetic(tiny, arith_file, tmp_path):
    """With a chip live in eval and no injector, the evaluation is noisy (the chip's arithmetic: deployment) and its
    clean score is the reference arithmetic's (``chip.suspended``: training harm), never the chip's twice."""
    from omegaconf import OmegaConf

    from noisebench.noise import chip

    model, tok = tiny
    kw = dict(task="noisebench_arith", data_files={"test": arith_file}, limit=16, max_gen_toks=8, batch_size=16)
    plain = evaluate_checkpoint(model, tok, output_dir=tmp_path / "plain", **kw)
    conf = Path(__file__).resolve().parents[1] / "conf" / "chip" / "mxfp4.yaml"
    profile = chip.ChipProfile.from_dict(OmegaConf.to_container(OmegaConf.load(conf)))
    with chip.ChipMode(profile):
        assert chip.live_in("eval")
        res = evaluate_checkpoint(model, tok, injector=None, clean_too=True, output_dir=tmp_path / "chip", **kw)
        with chip.suspended():
            assert not chip.live_in("eval")
    assert not chip.live_in("eval")
    assert res.noisy and res.clean is not None
    assert _strict_resps(res.clean) == _strict_resps(plain)
    assert sum(x != y for x, y in zip(_strict_resps(res), _strict_resps(plain))) >= 4   # fp4 inputs move answers
