"""load_testbed on the tiny testbed: contract fields, cache reuse, rebuild on config change / corruption / partial."""
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM  # noqa: E402

from noisebench.scoring import gold_answer, make_prompt  # noqa: E402
from noisebench.testbeds import check_reachable, load_testbed  # noqa: E402
from noisebench.testbeds.cache import MARKER, problems  # noqa: E402
from noisebench.testbeds.tiny_arith import cache_folder  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf/testbed/tiny_arith.yaml"


def small_cfg(**over):
    """The shipped config, shrunk: random init (warmstart.steps 0), small splits."""
    cfg = OmegaConf.load(CONF)
    cfg.data.n_train, cfg.data.n_test, cfg.warmstart.steps = 2000, 300, 0
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_contract_fields(tmp_path):
    tb = load_testbed(small_cfg(), cache_dir=tmp_path)
    assert tb.name == "tiny_arith" and tb.eval_task == "noisebench_arith"
    assert isinstance(tb.model, Qwen2ForCausalLM) and isinstance(tb.tokenizer, PreTrainedTokenizerFast)
    assert (Path(tb.model_path) / "config.json").is_file() and (Path(tb.model_path) / "tokenizer.json").is_file()
    assert tb.train_dataset.column_names == ["prompt", "answer"] and len(tb.train_dataset) == 2000
    test_path = Path(tb.eval_data_files["test"])
    assert test_path.is_absolute()
    rows = [json.loads(x) for x in test_path.read_text().splitlines()]
    assert len(rows) == 300 and all(set(r) == {"question", "answer"} for r in rows)
    train_rows = [json.loads(x) for x in (test_path.parent / "train.jsonl").read_text().splitlines()]
    assert tb.train_dataset[0] == {"prompt": make_prompt(train_rows[0]["question"]),
                                   "answer": gold_answer(train_rows[0]["answer"])}
    assert not {r["question"] for r in rows} & {r["question"] for r in train_rows}
    longest = max(len(tb.tokenizer(p)["input_ids"]) for p in tb.train_dataset["prompt"])
    assert longest <= tb.max_prompt_length
    longest_gold = max(len(tb.tokenizer("\n" + r["answer"])["input_ids"]) for r in rows) + 1
    assert longest_gold <= tb.max_completion_length
    assert tb.meta["n_params"] == sum(p.numel() for p in tb.model.parameters())
    assert "acc_strict" not in tb.meta  # steps 0: random init, nothing graded


def test_cache_is_reused_then_rebuilt_on_change_corruption_or_partial(tmp_path):
    cfg = small_cfg()
    first = load_testbed(cfg, cache_dir=tmp_path)
    folder = Path(first.model_path).parent
    marker_mtime = (folder / MARKER).stat().st_mtime_ns
    w0 = weights(first.model)

    again = load_testbed(cfg, cache_dir=tmp_path)  # reuse: nothing rebuilt
    assert (folder / MARKER).stat().st_mtime_ns == marker_mtime and same(w0, weights(again.model))

    # Keys outside the build (the GRPO recipe) keep the cache; build keys (seed) make a new one.
    assert cache_folder(OmegaConf.to_container(small_cfg(**{"grpo.learning_rate": 1.0})), tmp_path) == folder
    other = load_testbed(small_cfg(seed=1), cache_dir=tmp_path)
    assert Path(other.model_path).parent != folder and not same(w0, weights(other.model))

    # Corrupt: truncate the weights. The marker's checksums catch it; the rebuild is bitwise the first build.
    st = folder / "model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    assert any("checksum" in p for p in problems(folder))
    rebuilt = load_testbed(cfg, cache_dir=tmp_path)
    assert problems(folder) == [] and same(w0, weights(rebuilt.model))

    # Partial: a build that died before writing its marker.
    (folder / MARKER).unlink()
    assert problems(folder) and load_testbed(cfg, cache_dir=tmp_path).model is not None
    assert problems(folder) == [] and not list(tmp_path.glob("testbeds/*.tmp-*"))


def test_short_sft_trains_and_grades(tmp_path):
    """The SFT path itself (30 steps): loss falls from ~ln(vocab) and the greedy grading lands in meta."""
    t0 = time.perf_counter()
    tb = load_testbed(small_cfg(**{"warmstart.steps": 30, "warmstart.eval_items": 40}), cache_dir=tmp_path)
    m = tb.meta
    assert m["sft_steps"] == 30 and m["sft_final_loss"] < 0.6 * torch.log(torch.tensor(512.0)).item()
    assert m["eval_items"] == 40 and 0.0 <= m["acc_strict"] <= m["acc_flexible"] + 1e-9
    assert m["build_seconds"] <= time.perf_counter() - t0
    assert torch.get_num_threads() >= 1  # restored (set_num_threads is process-global)


@pytest.mark.parametrize("over,match", [
    ({"kind": "gguf"}, r"testbed.kind='gguf'; valid choices: \['tiny', 'hf'\]"),
    ({"warmstart.stepz": 3}, r"testbed.warmstart has unknown keys \['stepz'\]"),
    ({"data.ops": ["add", "pow"]}, r"testbed.data.ops"),
    ({"warmstart.format.marked_topics": 11}, r"marked_topics"),
])
def test_bad_config_is_named(tmp_path, over, match):
    cfg = small_cfg(**over)
    problems_found = check_reachable(cfg)
    assert len(problems_found) == 1 and re.search(match, problems_found[0])
    with pytest.raises(ValueError, match=match):
        load_testbed(cfg, cache_dir=tmp_path)


def test_check_reachable_is_clean_for_the_shipped_config():
    assert check_reachable(OmegaConf.load(CONF)) == []
