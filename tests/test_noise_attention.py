"""Attention's products under matmul_family: SDPA decomposed into QK^T, softmax, PV when a part is noisy; untouched
otherwise; the decomposition matches SDPA; counts and realized noise of the parts; eager attention as before."""
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from noisebench.noise import NoiseInjector, NoiseSpec  # noqa: E402
from noisebench.noise.attention import covered_parts, decomposed_sdpa  # noqa: E402

L = 2
IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny(attn):
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(cfg)


def step(model, inj=None, fwd="train_forward", bwd="train_backward"):
    model.zero_grad(set_to_none=True)
    ctx = inj.phase if inj is not None else (lambda name: torch.enable_grad())
    with ctx(fwd):
        out = model(input_ids=IDS, labels=IDS)
    with ctx(bwd):
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.logits.detach(), grads


def _plain(func, label, args, kwargs):
    return func(*args, **kwargs)


def _qkv(shape_q, shape_kv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape_q, generator=g).to(dtype), torch.randn(*shape_kv, generator=g).to(dtype),
            torch.randn(*shape_kv, generator=g).to(dtype))


def _cases():
    g = torch.Generator().manual_seed(1)
    dead = torch.ones(12, 12, dtype=torch.bool).tril()
    dead[4] = False                                              # a fully masked row: SDPA gives zeros there
    return [
        ("plain", (2, 4, 12, 8), (2, 4, 12, 8), {}),
        ("causal", (2, 4, 12, 8), (2, 4, 12, 8), {"is_causal": True}),
        ("causal, fewer queries", (2, 4, 5, 8), (2, 4, 12, 8), {"is_causal": True}),
        ("bool mask, dead row", (2, 4, 12, 8), (2, 4, 12, 8), {"attn_mask": dead}),
        ("float mask", (2, 4, 12, 8), (2, 4, 12, 8), {"attn_mask": torch.randn(2, 1, 12, 12, generator=g)}),
        ("scale", (2, 4, 12, 8), (2, 4, 12, 8), {"scale": 0.3, "is_causal": True}),
        ("gqa", (2, 4, 12, 8), (2, 2, 12, 8), {"enable_gqa": True, "is_causal": True}),
        ("3-d", (6, 12, 8), (6, 12, 8), {"is_causal": True}),
    ]


@pytest.mark.parametrize("name,sq,skv,kw", _cases(), ids=[c[0] for c in _cases()])
def test_decomposition_matches_sdpa(name, sq, skv, kw):
    q, k, v = _qkv(sq, skv)
    for t in (q, k, v):
        t.requires_grad_(True)
    gy = torch.randn(*sq[:-1], skv[-1], generator=torch.Generator().manual_seed(2))
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    ref_grads = torch.autograd.grad(ref, (q, k, v), gy)
    got = decomposed_sdpa(_plain, q, k, v, **kw)
    grads = torch.autograd.grad(got, (q, k, v), gy)
    assert (got - ref).abs().max().item() < 1e-5, name
    assert all((a - b).abs().max().item() < 1e-5 for a, b in zip(grads, ref_grads)), name
    if name.startswith("bool"):
        assert torch.equal(got[:, :, 4], torch.zeros_like(got[:, :, 4]))


@pytest.mark.parametrize("kw", [{"is_causal": True}, {"attn_mask": torch.rand(2, 1, 5, 12) > 0.3},
                                {"attn_mask": torch.randn(2, 4, 5, 12)}], ids=["causal", "bool mask", "float mask"])
def test_grouped_queries_are_the_repeated_keys_result(kw):
    """GQA with each key/value head's query heads as rows of one product: the same outputs as key/value repeated
    per query head, for 5 queries against 12 keys (so the causal mask's rows are the queries', not the group's)."""
    q, k, v = _qkv((2, 4, 5, 8), (2, 2, 12, 8))
    rep = decomposed_sdpa(_plain, q, k, v, enable_gqa=True, **kw)
    got = decomposed_sdpa(_plain, q, k, v, enable_gqa=True, group_queries=True, **kw)
    assert got.shape == rep.shape == (2, 4, 5, 8)
    assert (got - rep).abs().max().item() < 1e-6
    assert (got - F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)).abs().max().item() < 1e-5


def test_decomposition_in_bf16_is_as_close_to_float32_as_sdpa():
    """Scores and softmax in float32 (as fused kernels keep them): the decomposition adds no rounding of its own."""
    q, k, v = _qkv((2, 4, 64, 32), (2, 4, 64, 32))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    half = [t.bfloat16() for t in (q, k, v)]
    sdpa_err = (F.scaled_dot_product_attention(*half, is_causal=True).float() - exact).abs().mean().item()
    ours = decomposed_sdpa(_plain, *half, is_causal=True)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - exact).abs().mean().item() < 1.1 * sdpa_err


def test_which_parts_a_spec_covers():
    parts = lambda ops: covered_parts(NoiseSpec(type="relative_gaussian", ops=ops).resolved_ops())  # noqa: E731
    assert parts(["matmul_family"]) == {"attn_qk", "attn_pv"}
    assert parts(["extended"]) == {"attn_qk", "attn_pv", "attn_softmax"}
    assert parts(["all"]) == set()                    # sdpa covered: noised as one op
    assert parts(["linear"]) == set() and parts(["linear", "softmax"]) == {"attn_softmax"}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_scale_zero_matches_clean_to_float_tolerance(attn):
    model = tiny(attn)
    clean = step(model)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=0.0, ops=["extended"]))
    inj.attach(model)
    with inj:
        zero = step(model, inj)
    tel = inj.telemetry()
    assert ("noise/train_forward/attn_qk/fwd/calls" in tel) == (attn == "sdpa")
    assert (clean[0] - zero[0]).abs().max().item() < 1e-5
    assert all((clean[1][n] - zero[1][n]).abs().max().item() < 1e-5 for n in clean[1])


@pytest.mark.parametrize("intercept", ["mode", "patch"])
def test_sdpa_untouched_where_no_noise_applies(intercept):
    """Off, or noise only in phases that do not run: SDPA runs fused, results bitwise those without the library."""
    model = tiny("sdpa")
    clean = step(model)
    for spec in (NoiseSpec(type="none"), NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["rollout"])):
        inj = NoiseInjector(spec, intercept=intercept)
        inj.attach(model)
        with inj:
            off = step(model, inj)
            with torch.no_grad(), inj.phase("eval"):
                evald = model(input_ids=IDS).logits
        inj.detach(model)
        assert torch.equal(off[0], clean[0]) and all(torch.equal(off[1][n], clean[1][n]) for n in clean[1])
        assert torch.equal(evald, clean[0])
        assert not any("attn" in key for key in inj.telemetry())


def _calls(tel, phase, direction):
    pre = f"noise/{phase}/"
    return {k.split("/")[2]: v for k, v in tel.items()
            if k.startswith(pre) and k.endswith("/calls") and k.split("/")[3] == direction}


def test_counts_layers_times_calls_and_both_interceptions_agree():
    model = tiny("sdpa")
    runs = {}
    for intercept in ("mode", "patch"):
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["extended"], seed=5,
                                      telemetry_rate=1.0), intercept=intercept)
        inj.attach(model)
        with inj:
            runs[intercept] = step(model, inj), step(model, inj), inj.telemetry()
        inj.detach(model)
    (a1, a2, ta), (b1, b2, tb) = runs["mode"], runs["patch"]
    assert ta == tb and all(torch.equal(x[0], y[0]) for x, y in ((a1, b1), (a2, b2)))
    steps = 2
    fwd, bwd = _calls(ta, "train_forward", "fwd"), _calls(ta, "train_backward", "bwd")
    assert {k: fwd[k] for k in ("attn_qk", "attn_pv", "attn_softmax")} == {
        "attn_qk": L * steps, "attn_pv": L * steps, "attn_softmax": L * steps}
    assert {k: bwd[k] for k in ("attn_qk", "attn_pv", "attn_softmax")} == {            # q and k; p and v; scores
        "attn_qk": 2 * L * steps, "attn_pv": 2 * L * steps, "attn_softmax": L * steps}
    assert "sdpa" not in fwd and "matmul" not in fwd and fwd["linear"] == (7 * L + 1) * steps
    with torch.no_grad():                                   # rollout: one forward per generated token
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["rollout"]))
        inj.attach(model)
        with inj, inj.phase("rollout"):
            model.generate(IDS, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    tel = inj.telemetry()
    assert tel["noise/rollout/attn_qk/fwd/calls"] == tel["noise/rollout/attn_pv/fwd/calls"] == 3 * L
    assert "noise/rollout/attn_softmax/fwd/calls" not in tel                          # matmul_family: no softmax


def test_eager_attention_products_still_noised_as_matmul():
    model = tiny("eager")
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, telemetry_rate=1.0))
    inj.attach(model)
    with inj:
        noisy = step(model, inj)
    tel = inj.telemetry()
    assert tel["noise/train_forward/matmul/fwd/calls"] == 2 * L
    assert tel["noise/train_backward/matmul/bwd/calls"] == 4 * L
    assert not any("attn_" in k for k in tel) and not torch.equal(noisy[0], step(model)[0])


def test_realized_noise_of_the_products_is_the_scale():
    """rel_err_rms (sqrt(sum err^2 / sum y^2) over the sampled elements, measured on the tensors themselves) of QK^T
    and PV, forward and backward (q, k, p and v gradients), is the relative model's scale."""
    scale = 2e-2
    q, k, v = _qkv((4, 8, 64, 32), (4, 4, 64, 32), seed=3)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=scale, telemetry_rate=1.0), global_phase=True)
    with inj:
        for i in range(12):
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
            out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(i)))
    tel = inj.telemetry()
    for op in ("attn_qk", "attn_pv"):
        for d in ("fwd", "bwd"):
            key = f"noise/global/{op}/{d}/rel_err_rms"
            assert tel[key] == pytest.approx(scale, rel=0.03), key
        assert tel[f"noise/global/{op}/fwd/calls"] == 12 and tel[f"noise/global/{op}/bwd/calls"] == 24


def test_an_sdpa_signature_it_does_not_know_raises_instead_of_running_unnoised():
    """torch rejects unknown keywords before dispatch today; a keyword a later torch adds must not run fused and
    silently unnoised under a spec that covers attention's products."""
    from noisebench.noise.attention import sdpa_arguments
    q, k, v = _qkv((1, 2, 4, 8), (1, 2, 4, 8))
    assert sdpa_arguments((q, k, v, None, 0.0), {"is_causal": True})["is_causal"] is True
    with pytest.raises(TypeError, match=r"cannot decompose.*\['future_flag'\].*Add 'sdpa'"):
        sdpa_arguments((q, k, v), {"future_flag": True})
