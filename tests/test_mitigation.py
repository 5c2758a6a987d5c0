"""The mitigation group: composition, TRL's options, the fp32 lm_head with tied embeddings, and real GRPO steps
(no-op with noise off; TRL's own truncation and masking acting on the transformers path under rollout noise)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import compose, small_run_overrides

FAST = ["testbed.max_completion_length=12", "testbed.warmstart.steps=0"]


@pytest.mark.parametrize("choice, expect", [
    ("tis_token", ("token", "truncate", 2.0, None, False)),
    ("tis_seq", ("sequence", "truncate", 2.0, None, False)),
    ("mis_seq", ("sequence", "mask", 2.0, 0.5, False)),
    ("fp32_lm_head", ("none", "truncate", 2.0, None, True)),
    ("[tis_token,fp32_lm_head]", ("token", "truncate", 2.0, None, True)),
])
def test_group_composes_with_e4d(choice, expect):
    cfg = compose(["+exp=e4d", f"mitigation={choice}"])
    m = cfg.mitigation
    assert (m.importance_sampling, m.is_mode, m.clip_max, m.clip_min, m.fp32_lm_head) == expect
    assert cfg.noise.scale == 1e-2   # the noise arm is untouched


def test_default_is_none_and_names():
    from noisebench.schema.mitigation import mitigation_name
    from noisebench.train.mitigation import record_block

    cfg = compose([])
    assert record_block(dict(cfg.mitigation))["name"] == "none"
    names = {c: mitigation_name(dict(compose([f"mitigation={c}"]).mitigation))
             for c in ("tis_token", "tis_seq", "mis_seq", "fp32_lm_head", "tis_token_fp32_head")}
    assert names == {"tis_token": "tis_token", "tis_seq": "tis_seq", "mis_seq": "mis_seq",
                     "fp32_lm_head": "fp32_lm_head", "tis_token_fp32_head": "tis_token+fp32_lm_head"}
    assert mitigation_name({"importance_sampling": "token", "clip_max": 5.0}) == "tis_token(C=5)"


def test_grpo_args_for_both_paths():
    from noisebench.train.mitigation import grpo_args

    m = dict(compose(["mitigation=mis_seq"]).mitigation)
    assert grpo_args(m, use_vllm=True) == {
        "vllm_importance_sampling_correction": True, "cast_lm_head_to_fp32": False,
        "vllm_importance_sampling_mode": "sequence_mask", "vllm_importance_sampling_clip_max": 2.0,
        "vllm_importance_sampling_clip_min": 0.5}
    assert grpo_args(None, use_vllm=False) == {"vllm_importance_sampling_correction": False,
                                               "cast_lm_head_to_fp32": False}
    fp32 = dict(compose(["mitigation=fp32_lm_head"]).mitigation)
    assert grpo_args(fp32, use_vllm=True)["cast_lm_head_to_fp32"] is True    # TRL's cast on vLLM's path
    assert grpo_args(fp32, use_vllm=False)["cast_lm_head_to_fp32"] is False  # noisebench's own head here


def test_bad_values_are_refused_with_the_key():
    from noisebench.schema import ConfigError, check

    with pytest.raises(ConfigError, match="mitigation.clip_min"):
        check(compose(["mitigation=mis_seq", "mitigation.clip_min=3"]))
    with pytest.raises(ConfigError, match="mitigation.enabled"):
        check(compose(["mitigation=none", "mitigation.importance_sampling=token"]))
    with pytest.raises(ConfigError, match="trainer.args.vllm_importance_sampling_correction"):
        check(compose(["+trainer.args.vllm_importance_sampling_correction=true"]))


def test_mitigation_is_a_treatment_not_the_setting():
    from omegaconf import OmegaConf

    from noisebench.leaderboard.table import _treated
    from noisebench.record import run_fingerprint, setting_fingerprint

    none, tis = (OmegaConf.to_container(compose(["+exp=e4d", f"mitigation={m}"]), resolve=True)
                 for m in ("none", "tis_token"))
    assert setting_fingerprint(none) == setting_fingerprint(tis)        # same setting: comparable on one board
    assert run_fingerprint(none) != run_fingerprint(tis)                # resume never crosses arms
    old = {k: v for k, v in none.items() if k != "mitigation"}          # a config from before the group
    assert run_fingerprint(old) == run_fingerprint(none)                # unmitigated runs keep their fingerprint
    from noisebench.train.rundirs import _fingerprint_of
    # resume finds a run by the fingerprint of its composed config: arms apart, unmitigated runs as before
    fp_none, fp_tis = (_fingerprint_of(compose(["+exp=e4d", f"mitigation={m}"])) for m in ("none", "tis_token"))
    before = OmegaConf.create({k: v for k, v in OmegaConf.to_container(compose(["+exp=e4d"]), resolve=True).items()
                               if k not in ("mitigation", "hydra")})
    assert fp_none != fp_tis and fp_none == _fingerprint_of(before)
    clean = OmegaConf.to_container(compose([]), resolve=True)
    assert not _treated({"config": clean})                              # the default still pools into the baseline
    assert _treated({"config": OmegaConf.to_container(compose(["mitigation=fp32_lm_head"]), resolve=True)})


# ---- fp32 lm_head with tied embeddings -------------------------------------------------------------------------

def _tied_bf16_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def test_fp32_head_rollout_logits_are_fp32_from_the_shared_weight():
    from noisebench.train.lm_head import fp32_output_head

    model = _tied_bf16_model()
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        h = model.model(ids).last_hidden_state
        assert model(ids).logits.dtype == torch.bfloat16
        with fp32_output_head(model):
            logits = model(ids).logits
        assert model(ids).logits.dtype == torch.bfloat16   # restored on exit
    assert logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(h.float(), model.lm_head.weight.float()))


def test_fp32_head_training_step_keeps_the_tie():
    from trl.trainer.utils import add_fused_lm_head

    from noisebench.train.lm_head import fp32_log_probs

    model = _tied_bf16_model()
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    ids = torch.randint(0, 97, (3, 10))
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[:, :-1].float()
        ref = torch.log_softmax(F.linear(h, model.lm_head.weight.float()), -1).gather(-1, ids[:, 1:, None])[..., 0]
        bf16 = model(ids, labels=ids, fused_lm_head=True).log_probs
    with fp32_log_probs():
        out = model(ids, labels=ids, fused_lm_head=True)
    assert out.log_probs.dtype == torch.float32
    err32, err16 = (out.log_probs.detach() - ref).abs().max(), (bf16.float() - ref).abs().max()
    assert err32 < 1e-5 < err16   # bf16 head: ~1e-2 off; fp32 head: float rounding
    before = model.lm_head.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    (-(out.log_probs.sum())).backward()
    assert torch.isfinite(model.lm_head.weight.grad.float()).all()
    opt.step()
    assert model.lm_head.weight is model.model.embed_tokens.weight            # still one Parameter
    assert model.lm_head.weight.dtype == torch.bfloat16                       # not cast in place
    assert not torch.equal(model.lm_head.weight.detach(), before)             # and it trained


def test_fp32_head_is_exempt_from_the_chip_noise():
    from noisebench.noise import NoiseInjector, NoiseSpec
    from noisebench.train.lm_head import fp32_output_head

    model = _tied_bf16_model().float()
    h = torch.randn(4, 32)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], phases=["rollout"]))
    clean = F.linear(h, model.lm_head.weight)
    with inj, inj.phase("rollout"), torch.no_grad():
        noisy = model.lm_head(h)
        with fp32_output_head(model):
            exempt = model.lm_head(h)
    assert not torch.equal(noisy, clean) and torch.equal(exempt, clean)
    assert inj.telemetry()["noise/rollout/linear/fwd/calls"] == 1


# ---- real GRPO steps -------------------------------------------------------------------------------------------

def _train(tmp_path, cache, extra, steps=2, advantages=False):
    """A few real GRPO steps of the tiny testbed (untrained weights): per-step TRL metrics, final weights, trainer.

    ``advantages``: replace the batch's advantages by fixed nonzero values before the loss. The untrained model earns
    no reward, so its advantages are all 0 and the policy term (where the importance weight acts) vanishes; fixed
    advantages make every weight reach the loss and the gradient."""
    from transformers import set_seed

    from noisebench.testbeds import load_testbed
    from noisebench.train.builders import make_injector, make_trainer, noise_spec

    cfg = compose(small_run_overrides(tmp_path, cache, steps=steps, warm=False) + FAST + extra)
    spec = noise_spec(cfg)
    set_seed(int(cfg.seed))
    tb = load_testbed(cfg.testbed, cache_dir=cfg.cache_dir, device="cpu")
    injector = make_injector(cfg, spec)
    trainer = make_trainer(cfg, tb, spec, injector, None, [], tmp_path / "run", "cpu")
    losses, compute = [], trainer._compute_loss

    def keep_loss(model, inputs):  # the loss at full precision (Trainer logs it rounded to 4 digits)
        if advantages:
            n = inputs["advantages"].shape[0]
            inputs = {**inputs, "advantages": torch.linspace(-1.0, 1.5, n, device=inputs["advantages"].device)}
        loss = compute(model, inputs)
        losses.append(float(loss.detach()))
        return loss

    trainer._compute_loss = keep_loss
    with injector:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h, loss in zip(logs, losses):
        h["loss"] = loss
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return logs, weights, trainer


@pytest.mark.slow
def test_every_mitigation_is_a_noop_without_noise(tmp_path, cache_dir):
    """Noise off: the sampler and trainer log-probs agree to float rounding, so every importance weight is 1 within
    ~1e-6 and nothing is truncated or masked; the fp32 head on an fp32 model computes the same products. The loss
    agrees with mitigation=none to float tolerance for the IS arms (measured |dloss| <= 1.2e-7 on 0.27, the ratio
    ~1 +- 1.4e-6) and bitwise for fp32_lm_head (weights too)."""
    base_logs, base_w, _ = _train(tmp_path / "none", cache_dir, ["+exp=baseline"], advantages=True)
    assert all(abs(h["loss"]) > 1e-3 for h in base_logs)   # the policy term is live
    for choice in ("tis_token", "tis_seq", "mis_seq", "fp32_lm_head"):
        logs, w, trainer = _train(tmp_path / choice, cache_dir, ["+exp=baseline", f"mitigation={choice}"],
                                  advantages=True)
        assert len(logs) == len(base_logs) == 2
        for a, b in zip(logs, base_logs):
            if choice == "fp32_lm_head":
                assert a["loss"] == b["loss"]
            else:
                assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), choice
        diff = max(float((w[n] - base_w[n]).abs().max()) for n in w)
        if choice == "fp32_lm_head":
            assert diff == 0.0
            assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight
        else:  # Adam normalises each component: where its gradient is a near-cancelling sum, a 1e-6 change of
            # the summands moves the update by a share of the learning rate (measured: 1.6e-6 at lr 3e-5)
            assert diff < 0.2 * trainer.args.learning_rate, (choice, diff)
            # TRL's correction ran on the transformers path, with ratios of 1 to float rounding
            for h in logs:
                assert abs(h["sampling/importance_sampling_ratio/min"] - 1) < 1e-5, choice
                assert abs(h["sampling/importance_sampling_ratio/max"] - 1) < 1e-5, choice
                assert h["rollout_corr/rollout_rs_masked_fraction"] == 0.0
                assert h["rollout_corr/rollout_is_truncated_fraction"] == 0.0


@pytest.mark.slow
def test_trl_truncates_and_masks_on_the_transformers_path_under_rollout_noise(tmp_path, cache_dir):
    """Rollout-only noise (the chip samples, the GPU trains): with a cap C=1 TRL's token truncation must cut every
    weight above 1 (its logged max ratio is exactly 1) and our share reads about half the tokens; a tight sequence
    mask drops some sequences (TRL's min ratio 0)."""
    logs, _, _ = _train(tmp_path / "tis", cache_dir, ["+exp=e4d_rollout_only", "mitigation=tis_token",
                                                      "mitigation.clip_max=1.0"], steps=1)
    h = logs[0]
    assert h["sampling/importance_sampling_ratio/max"] == 1.0 and h["sampling/importance_sampling_ratio/min"] < 1
    assert 0.2 < h["rollout_corr/rollout_is_truncated_fraction"] < 0.8
    assert h["rollout_corr/k3_kl"] > 0
    logs, _, _ = _train(tmp_path / "mis", cache_dir, ["+exp=e4d_rollout_only", "mitigation=mis_seq",
                                                      "mitigation.clip_min=0.99", "mitigation.clip_max=1.01"], steps=1)
    h = logs[0]
    assert h["sampling/importance_sampling_ratio/min"] == 0.0          # masked sequences carry weight 0
    assert 0 < h["rollout_corr/rollout_rs_seq_masked_fraction"] <= 1


@pytest.mark.slow
def test_record_carries_the_arm_and_rollout_corr(tmp_path, cache_dir):
    from noisebench.train.runner import run

    cfg = compose(small_run_overrides(tmp_path, cache_dir, steps=1, warm=False) + FAST
                  + ["+exp=e4d", "mitigation=tis_seq", "eval.limit=8", "eval.batch_size=8"])
    rec = run(cfg, tmp_path / "run")
    assert rec["status"] == "ok" and rec["experiment"] == "e4d+tis_seq"
    assert rec["mitigation"]["name"] == "tis_seq" and rec["mitigation"]["importance_sampling"] == "sequence"
    mm = rec["mismatch"]
    for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_abs_diff", "rollout_is_eff_sample_size",
              "rollout_is_truncated_fraction", "rollout_rs_masked_fraction"):
        assert f"rollout_corr/{k}" in mm and f"rollout_corr/{k}" in mm["per_step"][0], k
    assert mm["rollout_corr/k3_kl"] > 0 and 0 < mm["rollout_corr/rollout_is_eff_sample_size"] <= 1
