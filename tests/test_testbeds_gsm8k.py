"""GSM8K loader and the kind=hf testbed, offline: local folder / files, clear errors, check_reachable."""
import json
import os
from pathlib import Path

import pytest
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from noisebench.scoring import gold_answer, make_prompt  # noqa: E402
from noisebench.testbeds import GSM8KUnavailable, TestbedError, check_reachable, load_gsm8k, load_testbed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "conf/testbed/qwen2_5_1_5b_gsm8k.yaml"
NO_HUB = "noisebench-test/does-not-exist"  # fails offline and online alike


def gsm8k_dir() -> Path:
    env = os.environ.get("NOISEBENCH_GSM8K_DIR")
    folder = Path(env) if env else ROOT.parent / "shared/data/gsm8k"
    if not (folder / "test.jsonl").is_file():
        pytest.skip(f"real GSM8K not found in {folder} (set NOISEBENCH_GSM8K_DIR)")
    return folder


def test_local_folder_loads_both_splits():
    folder = gsm8k_dir()
    recs, files = load_gsm8k({"data_dir": str(folder)})
    assert (len(recs["train"]), len(recs["test"])) == (7473, 1319)
    assert files["test"] == (folder / "test.jsonl").resolve()
    first = json.loads((folder / "test.jsonl").read_text().splitlines()[0])
    assert recs["test"][0] == first


def test_named_files_and_schema_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n")
    recs, _ = load_gsm8k({"data_files": {"train": str(good), "test": str(good)}})
    assert recs["test"] == [{"question": "1+1?", "answer": "1+1=2\n#### 2"}]
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    with pytest.raises(GSM8KUnavailable, match="####"):
        load_gsm8k({"data_files": {"train": str(good), "test": str(bad)}})


@pytest.mark.parametrize("data,match", [
    ({"data_dir": "/nonexistent/gsm8k"}, "data_dir=/nonexistent/gsm8k is not a folder"),
    ({"data_files": {"train": "/x/train.jsonl", "test": "/x/test.jsonl"}}, "do not exist"),
    ({"hub_id": NO_HUB, "hub_config": "main"}, "could not be loaded from the hub"),
])
def test_unreachable_data_is_one_clear_paragraph(data, match):
    with pytest.raises(GSM8KUnavailable, match=match) as err:
        load_gsm8k(data)
    msg = str(err.value)
    assert isinstance(err.value, TestbedError) and "\n" not in msg and "data_dir" in msg and len(msg) < 1500


def _qwen(**over):
    cfg = OmegaConf.load(QWEN).testbed  # a global-package file: testbed keys live under `testbed:`
    for k, v in over.items():
        OmegaConf.update(cfg, k, v)
    return cfg


def test_shipped_qwen_config_keys():
    cfg = OmegaConf.to_container(_qwen(**{"data.data_dir": None}), resolve=True)
    assert cfg["model_id"] == "Qwen/Qwen2.5-1.5B-Instruct" and cfg["dtype"] == "bf16" and cfg["use_chat_template"]
    assert (cfg["max_prompt_length"], cfg["max_completion_length"]) == (512, 1024)
    g = OmegaConf.load(QWEN.parents[1] / "trainer" / "grpo_qwen.yaml")  # the study's recipe, selected by the testbed
    assert (g.args.learning_rate, g.num_generations, g.args.beta, g.prompts_per_step) == (1e-6, 5, 0.001, 64)


def test_check_reachable_names_each_missing_piece(tmp_path):
    found = check_reachable(_qwen(model_path=str(tmp_path / "nomodel"), **{"data.data_dir": str(tmp_path / "no")}))
    assert len(found) == 2 and "model_path" in found[0] and "no config.json" in found[0] and "data_dir" in found[1]
    found = check_reachable(_qwen(**{"data.hub_id": NO_HUB, "data.data_dir": None}))
    assert any("Qwen/Qwen2.5-1.5B-Instruct" in p for p in found) or os.environ.get("HF_HUB_OFFLINE") != "1"
    assert any("GSM8K not reachable" in p for p in found)
    assert check_reachable(_qwen(model_init="random", **{"data.data_dir": str(gsm8k_dir())})) == []
    assert "valid choices" in check_reachable(_qwen(dtype="int3"))[0]


def test_hf_kind_loads_a_local_model_with_chat_template(tmp_path):
    """The hf path end to end, offline: the tiny model saved on disk stands in for Qwen2.5."""
    tiny = OmegaConf.load(ROOT / "conf/testbed/tiny_arith.yaml")
    tiny.data.n_train, tiny.data.n_test, tiny.warmstart.steps = 500, 100, 0
    local = load_testbed(tiny, cache_dir=tmp_path).model_path
    folder = gsm8k_dir()
    tb = load_testbed(_qwen(model_path=local, dtype="fp32", **{"data.data_dir": str(folder)}), cache_dir=tmp_path)
    assert tb.eval_task == "noisebench_gsm8k" and tb.eval_data_files["test"] == str((folder / "test.jsonl").resolve())
    assert len(tb.train_dataset) == 7473 and tb.use_chat_template
    q = json.loads((folder / "train.jsonl").read_text().splitlines()[0])
    want = "<|im_start|>user\n" + make_prompt(q["question"]) + "<|im_end|>\n<|im_start|>assistant\n"
    assert tb.train_dataset[0] == {"prompt": want, "answer": gold_answer(q["answer"])}
    plain = load_testbed(_qwen(model_path=local, dtype="fp32", use_chat_template=False,
                               **{"data.data_dir": str(folder)}), cache_dir=tmp_path)
    assert plain.train_dataset[0]["prompt"] == make_prompt(q["question"])


def test_hf_kind_unreachable_model_is_a_clear_error(tmp_path):
    with pytest.raises(TestbedError, match="model_path"):
        load_testbed(_qwen(model_path=str(tmp_path), **{"data.data_dir": str(gsm8k_dir())}), cache_dir=tmp_path)
