"""Tiny tokenizer and model built in code: exact round trip, identical ids via AutoTokenizer, Auto* reloads."""
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen2ForCausalLM  # noqa: E402

from noisebench.scoring import make_prompt  # noqa: E402
from noisebench.testbeds.arith import make_splits  # noqa: E402
from noisebench.testbeds.tiny import QWEN2_5_1_5B, qwen2_5_1_5b_random, random_model, tiny_config  # noqa: E402
from noisebench.testbeds.tiny_arith import arith_spec  # noqa: E402
from noisebench.testbeds.tokenizer import build_tokenizer  # noqa: E402
from noisebench.testbeds.warmstart import sft_pairs  # noqa: E402

CONF = Path(__file__).resolve().parents[1] / "conf/testbed/tiny_arith.yaml"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Default config: whole corpus, tokenizer, random model saved with save_pretrained."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF))
    splits = make_splits(arith_spec(cfg))
    pairs = sft_pairs(splits["train"], cfg["warmstart"]["format"], cfg["seed"])
    corpus = [t for pair in pairs for t in pair] + [p.answer for p in splits["train"] + splits["test"]] + \
             [make_prompt(p.question) for p in splits["test"]]
    tok = build_tokenizer(corpus, cfg["tokenizer"]["vocab_size"])
    model = random_model(tiny_config(cfg["model"], tok), seed=0)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return cfg, corpus, tok, model, out


def test_round_trip_on_whole_corpus(built):
    _, corpus, tok, _, _ = built
    ids = tok(corpus, add_special_tokens=False)["input_ids"]
    assert tok.batch_decode(ids) == corpus
    assert len(tok) == 512


def test_auto_tokenizer_gives_identical_ids(built):
    _, corpus, tok, _, out = built
    auto = AutoTokenizer.from_pretrained(out)
    fast = PreTrainedTokenizerFast.from_pretrained(out)
    sample = corpus[::7]
    want = tok(sample, add_special_tokens=False)["input_ids"]
    assert auto(sample, add_special_tokens=False)["input_ids"] == want
    assert fast(sample, add_special_tokens=False)["input_ids"] == want
    assert auto.eos_token == fast.eos_token == "<|endoftext|>" and auto.pad_token_id == tok.pad_token_id
    assert auto.decode(want[0]) == sample[0]


def test_digits_are_single_tokens_and_no_bos(built):
    _, _, tok, _, _ = built
    pieces = tok.convert_ids_to_tokens(tok("x 12345 = 9876", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if any(c.isdigit() for c in p)] == list("12345") + list("9876")
    assert tok("7")["input_ids"] == tok("7", add_special_tokens=False)["input_ids"]


def test_model_reloads_with_auto_classes_bitwise(built):
    cfg, _, tok, model, out = built
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, Qwen2ForCausalLM)
    assert loaded.config.vocab_size == len(tok) and loaded.config.num_key_value_heads == 2
    x = tok(["Ava has 3 apples."], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**x).logits, loaded(**x).logits)
    n = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n < 2e6  # "tiny": about a million parameters


def test_random_model_depends_only_on_seed(built):
    cfg, _, tok, _, _ = built
    state = torch.random.get_rng_state()
    a = random_model(tiny_config(cfg["model"], tok), seed=3)
    b = random_model(tiny_config(cfg["model"], tok), seed=3)
    c = random_model(tiny_config(cfg["model"], tok), seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_unknown_model_key_is_named(built):
    _, _, tok, _, _ = built
    with pytest.raises(ValueError, match="hidden_sise"):
        tiny_config({"hidden_sise": 8}, tok)


def test_qwen2_5_1_5b_random_has_the_real_architecture(built):
    _, _, tok, _, _ = built
    model = qwen2_5_1_5b_random(seed=0, tokenizer=tok, device="meta")  # shapes only, no memory
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (QWEN2_5_1_5B["hidden_size"], 28, 12, 2, 151936)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == 1.54  # "1.54B" on the model card
    assert c.eos_token_id == tok.eos_token_id
