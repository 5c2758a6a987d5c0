"""The real warm start of the shipped tiny_arith config (~2.5 min on 2 cores): accuracy inside the target band."""
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from noisebench.testbeds import load_testbed  # noqa: E402
from noisebench.testbeds.arith import make_splits  # noqa: E402
from noisebench.testbeds.tiny_arith import arith_spec  # noqa: E402
from noisebench.testbeds.warmstart import greedy_accuracy  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf/testbed/tiny_arith.yaml"


@pytest.mark.slow
def test_warm_start_lands_in_the_band_grpo_needs(tmp_path):
    cfg = OmegaConf.load(CONF)
    tb = load_testbed(cfg, cache_dir=tmp_path)  # a fresh cache: this really trains
    m = tb.meta
    print(f"\nwarm start: {m['sft_seconds']:.0f} s SFT, {m['build_seconds']:.0f} s build; greedy strict "
          f"{m['acc_strict']:.3f}, flexible {m['acc_flexible']:.3f}, '####' rate {m['format_rate']:.3f}")
    # Issue 3's band: room for GRPO to climb, but the model already does some arithmetic in the right format.
    assert 0.05 <= m["acc_strict"] <= 0.60
    # The headroom is the format: many right answers are written "The answer is N.", not "#### N".
    assert m["acc_flexible"] >= m["acc_strict"] + 0.10
    assert 0.1 <= m["format_rate"] <= 0.6
    # The model saved in the cache grades the same as the one graded during the build (bitwise save/load).
    test = make_splits(arith_spec(OmegaConf.to_container(cfg)))["test"][: m["eval_items"]]
    torch.set_num_threads(2)
    again = greedy_accuracy(tb.model, tb.tokenizer, test, tb.max_completion_length)
    assert (again["acc_strict"], again["acc_flexible"]) == (m["acc_strict"], m["acc_flexible"])
