"""NoiseInjector on a tiny HF Qwen2: off is bitwise clean, phases gate exactly, counts, targeting, seeds, resume."""
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

from noisebench.noise import PHASES, ModuleNoiseInjector, NoiseInjector, NoiseSpec  # noqa: E402

L = 2


def tiny_qwen2(attn="sdpa", seed=0):
    cfg = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=L,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg)


IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def step(model, inj=None, fwd="train_forward", bwd="train_backward"):
    """One forward+backward; returns logits and parameter gradients (cleared afterwards)."""
    model.zero_grad(set_to_none=True)
    ctx = inj.phase if inj is not None else (lambda name: torch.enable_grad())
    with ctx(fwd):
        out = model(input_ids=IDS, labels=IDS)
    with ctx(bwd):
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), grads


def _equal(a, b):
    return torch.equal(a[0], b[0]) and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _no_engine_left():
    return (torch._C._len_torch_function_stack() == 0
            and not torch.nn.modules.module._global_forward_hooks
            and not torch.nn.modules.module._global_forward_pre_hooks)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_off_is_bitwise_clean(attn):
    model = tiny_qwen2(attn)
    clean = step(model)
    # type none, installed and attached
    inj = NoiseInjector(NoiseSpec(type="none"))
    inj.attach(model)
    with inj:
        assert _equal(clean, step(model, inj))
    inj.detach(model)
    # noise on, but only in phases that do not run here
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["all"], phases=["rollout", "eval"]))
    inj.attach(model)
    with inj:
        assert _equal(clean, step(model, inj))
        assert _equal(clean, step(model, inj, fwd=None, bwd=None))   # no context, ordinary injector
        noisy = step(model, inj, fwd="eval", bwd="eval")
        assert not torch.equal(clean[0], noisy[0])
    assert inj.telemetry()["noise/eval/linear/fwd/calls"] == 7 * L + 1
    inj.detach(model)
    assert _no_engine_left()
    assert _equal(clean, step(model))                                  # torch exactly as before


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_model_counts_every_enabled_op(attn):
    model = tiny_qwen2(attn)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-3, ops=["all"], telemetry_rate=1.0))
    inj.attach(model)
    with inj:
        step(model, inj)
    t = inj.telemetry()
    fwd = {k.split("/")[2]: v for k, v in t.items() if k.startswith("noise/train_forward/") and k.endswith("/calls")}
    bwd = {k.split("/")[2]: v for k, v in t.items() if k.startswith("noise/train_backward/") and k.endswith("/calls")}
    n_lin_inputs = sum(1 + (m.bias is not None) + 1 for m in model.modules() if isinstance(m, torch.nn.Linear))
    expect_fwd = {"linear": 7 * L + 1, "rms_norm": 2 * L + 1, "silu": L}
    expect_bwd = {"linear": n_lin_inputs, "rms_norm": 2 * (2 * L + 1), "silu": L}   # norm: input + weight grads
    if attn == "eager":
        expect_fwd.update(matmul=2 * L, softmax=L)
        expect_bwd.update(matmul=4 * L, softmax=L)
    else:
        expect_fwd.update(sdpa=L)
        expect_bwd.update(sdpa=3 * L)
    assert fwd == expect_fwd and bwd == expect_bwd
    for key, value in t.items():
        if key.endswith("rel_err_rms"):
            assert value == pytest.approx(1e-3, rel=0.15), key
    # the lm_head alone, through include targeting
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-3, ops=["linear"], include=["lm_head"]))
    inj.attach(model)
    with inj:
        step(model, inj)
    assert inj.telemetry()["noise/train_forward/linear/fwd/calls"] == 1
    assert inj.telemetry()["noise/train_backward/linear/bwd/calls"] == 2


def _lin_case(inj, fwd, bwd):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lin = torch.nn.Linear(32, 32)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with inj.phase(fwd):
        y = lin(x)
    with inj.phase(bwd):
        y.sum().backward()
    return y.detach(), x.grad


def test_phases_gate_exactly():
    ref_y, ref_g = _lin_case(NoiseInjector(NoiseSpec()), None, None)
    fwd_phases = [p for p in PHASES if p != "train_backward"]
    for enabled in fwd_phases:
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], phases=[enabled]))
        with inj:
            for run in fwd_phases + [None]:
                y, g = _lin_case(inj, run, run)
                assert torch.equal(y, ref_y) == (run != enabled), (enabled, run)
                assert torch.equal(g, ref_g)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], phases=["train_backward"]))
    with inj:
        y, g = _lin_case(inj, "train_forward", "train_backward")
        assert torch.equal(y, ref_y) and not torch.equal(g, ref_g)
        for bwd in ["eval", "rollout", "train_forward", None]:           # backward follows the phase in force
            y, g = _lin_case(inj, "train_forward", bwd)
            assert torch.equal(g, ref_g), bwd
    assert {k.rsplit("/", 1)[0] for k in inj.telemetry()} == {"noise/train_backward/linear/bwd"}
    assert inj.telemetry()["noise/train_backward/linear/bwd/calls"] == 3        # one backward: x, weight, bias
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"], phases=["train_forward"]))
    with inj:
        y, g = _lin_case(inj, "train_forward", "train_backward")
        assert not torch.equal(y, ref_y) and torch.equal(g, ref_g)


def test_global_phase_noises_everything_outside_contexts():
    ref_y, ref_g = _lin_case(NoiseInjector(NoiseSpec()), None, None)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"]), global_phase=True)
    with inj:
        y, g = _lin_case(inj, None, None)
        assert not torch.equal(y, ref_y) and not torch.equal(g, ref_g)
        y, g = _lin_case(inj, "eval", "train_backward")               # inside contexts the phase rules apply
    t = inj.telemetry()
    assert t["noise/global/linear/fwd/calls"] == 1 and t["noise/global/linear/bwd/calls"] == 3
    assert t["noise/eval/linear/fwd/calls"] == 1 and t["noise/train_backward/linear/bwd/calls"] == 3


def test_same_seed_reproduces_and_global_rng_untouched():
    model = tiny_qwen2()
    spec = dict(type="relative_gaussian", scale=1e-2, ops=["all"], seed=3)
    runs = []
    for seed in (3, 3, 4):
        inj = NoiseInjector({**spec, "seed": seed})
        inj.attach(model)
        torch.manual_seed(123)
        before = torch.get_rng_state()
        with inj:
            runs.append(step(model, inj))
        assert torch.equal(before, torch.get_rng_state())               # global CPU RNG never advanced
        inj.detach(model)
    assert _equal(runs[0], runs[1]) and not torch.equal(runs[0][0], runs[2][0])


def test_state_dict_resumes_the_noise_stream():
    model = tiny_qwen2()
    spec = NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["all"])
    inj = NoiseInjector(spec)
    inj.attach(model)
    with inj:
        step(model, inj)
        second = step(model, inj)
    inj.detach(model)
    inj = NoiseInjector(spec)
    inj.attach(model)
    with inj:
        step(model, inj)
    inj.detach(model)
    saved = inj.state_dict()
    resumed = NoiseInjector(NoiseSpec.from_dict(saved["spec"]))
    resumed.load_state_dict(saved)
    resumed.attach(model)
    with resumed:
        assert _equal(second, step(model, resumed))


def _old_rope_forward(self, x, position_ids):
    """transformers < 5.24 RoPE: angles through ``@`` (the trap of noise-under-compile.md)."""
    inv = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1)
    freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


@pytest.mark.parametrize("attach", [True, False])
def test_rotary_excluded_by_default(monkeypatch, attach):
    monkeypatch.setattr(modeling_qwen2.Qwen2RotaryEmbedding, "forward", _old_rope_forward)
    model = tiny_qwen2("sdpa")                        # sdpa: the only `@` left is the rotary one
    counts = {}
    for name, exclude in [("default", None), ("none", [])]:
        kw = {} if exclude is None else {"exclude": exclude}
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["matmul_family"], **kw))
        if attach:
            inj.attach(model)
        with inj:
            step(model, inj)
        counts[name] = inj.telemetry().get("noise/train_forward/matmul/fwd/calls", 0.0)
        inj.detach(model)
    assert counts == {"default": 0.0, "none": 1.0}


def test_layer_range_and_regex_targeting():
    model = tiny_qwen2()
    cases = [(dict(layers=[0, 0]), 7), (dict(layers=[1, 1]), 7), (dict(include=[r"\.mlp$"]), 3 * L),
             (dict(exclude=[r"self_attn$"]), 3 * L + 1)]
    for kw, expected in cases:
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear", "rms_norm"], **kw))
        inj.attach(model)
        with inj:
            step(model, inj)
        assert inj.telemetry()["noise/train_forward/linear/fwd/calls"] == expected, kw
        inj.detach(model)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["rms_norm"], layers=[1, 1]))
    inj.attach(model)
    with inj:
        step(model, inj)
    t = inj.telemetry()
    assert t["noise/train_forward/rms_norm/fwd/calls"] == 2                  # the two norms of layer 1
    assert t["noise/train_backward/rms_norm/bwd/calls"] == 4                 # their input and weight grads


def test_only_one_injector_and_torch_restored():
    a = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2))
    b = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2))
    with a:
        with pytest.raises(RuntimeError, match="another NoiseInjector"):
            b.install()
        with pytest.raises(ValueError, match="valid choices"):
            with a.phase("training"):
                pass
    assert _no_engine_left()
    x = torch.randn(4, 4)
    assert torch.equal(F.linear(x, x), x @ x.T)


def test_module_level_injector_reproduces_the_study():
    model = tiny_qwen2()
    clean = step(model)
    inj = ModuleNoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["rollout"], telemetry_rate=1.0))
    assert inj.register_hooks(model) == 2 * L + 1                          # every Qwen2RMSNorm
    with torch.no_grad(), inj.phase("rollout"):
        noisy = model(input_ids=IDS).logits
    assert not torch.equal(noisy, clean[0])
    assert _equal(clean, step(model, inj, "train_forward", "train_backward"))   # phase off: clean
    t = inj.telemetry()
    assert t["noise/rollout/module:model.norm/fwd/calls"] == 1
    assert t["noise/rollout/module:model.norm/fwd/rel_err_rms"] == pytest.approx(1e-2, rel=0.1)
    inj.remove_hooks()
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, clean[0])


def test_rollout_generation_is_noised_and_counted():
    model = tiny_qwen2()
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-1, ops=["linear"], phases=["rollout"]))
    inj.attach(model)
    gen_kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        clean = model.generate(IDS, **gen_kw)
        with inj, inj.phase("rollout"):
            noisy = model.generate(IDS, **gen_kw)
    assert clean.shape == noisy.shape
    assert inj.telemetry()["noise/rollout/linear/fwd/calls"] == 4 * (7 * L + 1)   # one forward per new token
    with torch.no_grad():
        assert torch.equal(clean, model.generate(IDS, **gen_kw))


def test_rank_changes_the_stream(monkeypatch):
    outs = []
    for rank in ("0", "0", "1"):
        monkeypatch.setenv("RANK", rank)
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"]), global_phase=True)
        with inj:
            outs.append(_lin_case(inj, None, None))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])


@pytest.mark.parametrize("shape", [(7, 16), (3, 5, 16), (16,)])
@pytest.mark.parametrize("bias", [True, False])
def test_noisy_linear_node_gradients_bitwise_when_backward_not_live(shape, bias):
    """Linear with backward noise runs as one autograd node with torch's own gradient formulas: outside
    train_backward its gradients are bitwise torch's; inside, each input gradient is noised once."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(12, 16, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    gy = torch.randn(*(shape[:-1] + (12,)), generator=g)

    def grads(inj=None, bwd_phase=None):
        for t in leaves:
            t.grad = None
        if inj is None:
            F.linear(x, w, b).backward(gy)
        else:
            with inj:
                with inj.phase("train_forward"):
                    y = F.linear(x, w, b)
                assert type(y.grad_fn).__name__ == "NoisyLinearBackward"
                with inj.phase(bwd_phase):
                    y.backward(gy)
        return [t.grad.clone() for t in leaves]

    clean = grads()
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["train_forward", "train_backward"]))
    assert all(torch.equal(a, c) for a, c in zip(grads(inj, None), clean))
    noisy = grads(inj, "train_backward")
    for a, c in zip(noisy, clean):
        assert 2e-3 < ((a - c) / c).std().item() < 5e-2
    assert inj.telemetry()["noise/train_backward/linear/bwd/calls"] == len(leaves)


def test_reinstalling_does_not_recompile():
    """The global module hooks keep their ids across installs: Dynamo guards on them, so fresh ids recompiled every
    compiled model at every install (a rollout that installs per generation recompiled its decode step each time)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    model = tiny_qwen2()
    f = torch.compile(model, backend="eager", fullgraph=True)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-3, phases=["rollout"]))
    counters.clear()
    with torch.no_grad():
        for _ in range(3):
            with inj, inj.phase("rollout"):
                f(input_ids=IDS)
            f(input_ids=IDS)
    assert counters["stats"]["unique_graphs"] == 2          # one clean graph, one noisy graph
    assert _no_engine_left()
    torch._dynamo.reset()


def test_attached_hooks_give_global_hooks_results_without_global_hooks(monkeypatch):
    """``hooks="attached"`` hooks only the attached model's modules that can matter (the rotary embedding under the
    default exclude): the same noisy logits and gradients as global hooks, no global hook registered, the exclusion
    still in force (without it RoPE's angles are noised), and the same hook ids at every install (no recompile)."""
    from noisebench.noise import norms
    monkeypatch.setattr(modeling_qwen2.Qwen2RotaryEmbedding, "forward", _old_rope_forward)   # angles through `@`
    model = tiny_qwen2()
    spec = dict(type="relative_gaussian", scale=1e-2, seed=4)
    got, hook_ids = {}, []
    for hooks in ("global", "attached", "attached"):
        inj = NoiseInjector(NoiseSpec(**spec), hooks=hooks)
        inj.attach(model)
        with inj:
            if hooks == "attached":
                assert not torch.nn.modules.module._global_forward_hooks
                hooked = {type(m) for m in model.modules() if m._forward_hooks}
                assert hooked == {modeling_qwen2.Qwen2RotaryEmbedding}
                hook_ids.append(sorted(model.model.rotary_emb._forward_hooks))
            got[hooks] = step(model, inj)
        inj.detach(model)
        assert _no_engine_left() and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert hook_ids[0] == hook_ids[1]
    assert _equal(got["global"], got["attached"]) and not _equal(got["global"], step(model))
    inj = NoiseInjector(NoiseSpec(**spec, exclude=[]), hooks="attached")
    inj.attach(model)
    with inj:
        unexcluded = step(model, inj)[0]
    inj.detach(model)
    assert not torch.equal(unexcluded, got["attached"][0])
    with pytest.raises(ValueError, match="hooks='everywhere'.*global.*attached"):
        NoiseInjector(NoiseSpec(**spec), hooks="everywhere")
    assert norms.HOOKS == ("global", "attached")


def test_hooks_skip_only_classes_that_cannot_matter():
    """The global hooks ignore module classes whose every module is neutral and not a noised norm (issue 7: Dynamo
    guards on what the hooks read, once per module otherwise); scoped or noised classes keep their hooks."""
    from noisebench.noise import norms
    model = tiny_qwen2()
    Q = modeling_qwen2
    cases = [(dict(ops=["matmul_family"]), {torch.nn.Linear, Q.Qwen2DecoderLayer, Q.Qwen2RMSNorm}, {Q.Qwen2RotaryEmbedding}),
             (dict(ops=["linear", "rms_norm"]), {torch.nn.Linear}, {Q.Qwen2RMSNorm, Q.Qwen2RotaryEmbedding}),
             (dict(ops=["linear"], layers=[0, 0]), {torch.nn.Linear}, {Q.Qwen2DecoderLayer})]
    for kw, skipped, kept in cases:
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, **kw))
        inj.attach(model)
        with inj:
            assert skipped <= norms._SKIP and not (kept & norms._SKIP), kw
        inj.detach(model)
        with inj:                                     # nothing attached: no class is skipped
            assert norms._SKIP == frozenset()


@pytest.mark.parametrize("bias", [True, False])
def test_noisy_linear_under_autocast_matches_autocast_linear(bias):
    """Mixed precision (float32 parameters, bf16 autocast): the one-node linear casts its arguments as autocast
    does, so its backward (run outside autocast) multiplies bf16 by bf16, and at scale 0 its output and float32
    gradients are bitwise autocast's own linear."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 16, generator=g, requires_grad=True)
    w = torch.randn(12, 16, generator=g, requires_grad=True)
    b = torch.randn(12, generator=g, requires_grad=True) if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    gy = torch.randn(6, 5, 12, generator=g)

    def run(scale=None):
        for t in leaves:
            t.grad = None
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=scale or 0.0), global_phase=True)
        with inj if scale is not None else torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = F.linear(x, w, b)
                assert scale is None or type(y.grad_fn).__name__ == "NoisyLinearBackward"
            y.float().backward(gy)
        return [y.detach()] + [t.grad.clone() for t in leaves]

    clean, zero, noisy = run(), run(0.0), run(1e-2)
    assert clean[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in clean[1:])
    assert all(torch.equal(a, c) for a, c in zip(zero, clean))
    for a, c in zip(noisy[1:], clean[1:]):
        assert 2e-3 < ((a - c) / c).std().item() < 5e-2


def _spelling_objects():
    from noisebench.noise import intercept
    return [(owner, name, vars(owner).get(name) if isinstance(owner, type) else getattr(owner, name))
            for owner, name, _ in intercept.SPELLINGS]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patch_interception_is_bitwise_the_mode(attn):
    """``intercept="patch"`` (only covered spellings run Python: issue 7) must draw exactly what the mode draws: same
    logits, gradients and telemetry for every covered op of a full model, forward and backward; and on exit every
    patched attribute is the object it was (inherited Tensor methods deleted again, not shadowed)."""
    model = tiny_qwen2(attn)
    before = _spelling_objects()
    runs = {}
    for intercept in ("mode", "patch"):
        inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["all"], seed=7, telemetry_rate=1.0),
                            intercept=intercept)
        inj.attach(model)
        with inj:
            assert (torch._C._len_torch_function_stack() == 1) == (intercept == "mode")
            runs[intercept] = step(model, inj), inj.telemetry()
        inj.detach(model)
        assert _no_engine_left()
        after = _spelling_objects()
        assert all(a[2] is b[2] for a, b in zip(before, after)), [a[1] for a, b in zip(before, after) if a[2] is not b[2]]
    (mode, t_mode), (patch, t_patch) = runs["mode"], runs["patch"]
    assert _equal(mode, patch)
    assert t_mode == t_patch and t_mode["noise/train_forward/linear/fwd/calls"] == 7 * L + 1
    assert not _equal(mode, step(model))   # the noise is there


def test_patch_interception_spares_other_threads_and_refuses_compile():
    """Like the mode, the patches act on the installing thread only; compiling under them raises, naming the
    choice that works (Dynamo traces ``@`` and Tensor methods past patched attributes: it would run unnoised)."""
    import threading
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    clean = lin(x).detach()
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2), global_phase=True, intercept="patch")
    with inj:
        assert not torch.equal(lin(x).detach(), clean)
        other = []
        t = threading.Thread(target=lambda: other.append(lin(x).detach()))
        t.start()
        t.join()
        assert torch.equal(other[0], clean)
        with pytest.raises(Exception, match="intercept='mode'"):
            torch.compile(lambda v: v @ v.t(), backend="eager")(x)
    assert torch.equal(torch.compile(lambda v: lin(v), backend="eager")(x).detach(), clean)   # uninstalled: fine
    with pytest.raises(ValueError, match=r"intercept='patches'.*\['mode', 'patch'\]"):
        NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2), intercept="patches")
