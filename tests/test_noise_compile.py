"""torch.compile(fullgraph=True) with noise on: no graph break, eager's noise statistics, backward phase at run time."""
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from noisebench.noise import NoiseInjector, NoiseSpec  # noqa: E402


def tiny(layers=2, hidden=64, attn="eager"):
    cfg = Qwen2Config(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(cfg)


IDS = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))


def step(model, inj, fwd="train_forward", bwd="train_backward"):
    model.zero_grad(set_to_none=True)
    with inj.phase(fwd):
        out = model(input_ids=IDS, labels=IDS)
    with inj.phase(bwd):
        out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.logits.detach(), grads


def _counts(tel, stat="calls"):
    return {k: v for k, v in tel.items() if k.endswith(stat)}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def eager_then_compiled(model, compiled, inj):
    """Telemetry of one eager step, then of one compiled step of the same model (counters reset in between)."""
    step(model, inj)
    eager = inj.telemetry()
    inj.reset_telemetry()
    step(compiled, inj)
    return eager, inj.telemetry()


def test_aot_eager_fullgraph_matches_eager_and_reads_backward_phase_at_run_time():
    model = tiny()
    spec = NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["all"], telemetry_rate=1.0)
    inj = NoiseInjector(spec)
    inj.attach(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)   # fullgraph: any graph break raises
    with inj:
        eager, comp = eager_then_compiled(model, compiled, inj)
        frames = counter.frame_count
        assert _counts(comp) == _counts(eager) and _counts(comp, "elements") == _counts(eager, "elements")
        for key, value in comp.items():
            if key.endswith("rel_err_rms"):
                assert value == pytest.approx(1e-2, rel=0.15) and eager[key] == pytest.approx(1e-2, rel=0.15), key
        inj.spec.scale = 3e-2                                     # scale read at run time: no recompile
        inj.reset_telemetry()
        a = step(compiled, inj)
        b = step(compiled, inj)
        assert counter.frame_count == frames
        assert not torch.equal(a[0], b[0])                        # fresh noise on every call
        assert inj.telemetry()["noise/train_forward/linear/fwd/rel_err_rms"] == pytest.approx(3e-2, rel=0.15)
        inj.reset_telemetry()
        step(compiled, inj, bwd="eval")                           # same compiled graph, backward outside the phase
        assert not any("/bwd/" in k for k in inj.telemetry())
        assert counter.frame_count == frames


def test_compiled_off_is_bitwise_clean():
    model = tiny()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    clean = step(compiled, NoiseInjector(NoiseSpec()))
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["all"], phases=["rollout"]))
    inj.attach(model)
    with inj:
        off = step(compiled, inj)
        on = step(compiled, inj, fwd="rollout")
    assert torch.equal(clean[0], off[0]) and all(torch.equal(a, b) for a, b in zip(clean[1], off[1]))
    assert not torch.equal(clean[0], on[0])


@pytest.mark.slow  # ~30 s of inductor compilation on 2 cores
def test_inductor_fullgraph_noise():
    model = tiny(layers=1, hidden=32, attn="sdpa")
    spec = NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["matmul_family", "rms_norm"], telemetry_rate=1.0)
    inj = NoiseInjector(spec)
    inj.attach(model)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    with inj:
        eager, comp = eager_then_compiled(model, compiled, inj)
    assert torch.equal(rng, torch.get_rng_state())               # inductor did not draw from the global RNG
    assert _counts(comp) == _counts(eager)
    assert comp["noise/train_forward/linear/fwd/rel_err_rms"] == pytest.approx(1e-2, rel=0.15)
    assert comp["noise/train_backward/linear/bwd/rel_err_rms"] == pytest.approx(1e-2, rel=0.15)


def test_decomposed_sdpa_compiles_fullgraph_with_eager_counts_and_stays_fused_when_off():
    """matmul_family on an sdpa model: the decomposition traces without a graph break, counts what eager counts
    (attention's products included), and a phase without noise keeps the fused SDPA (bitwise the clean graph)."""
    model = tiny(attn="sdpa")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    clean = step(compiled, NoiseInjector(NoiseSpec()))
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["extended"], phases=["train_forward",
                                  "train_backward"], telemetry_rate=1.0))
    inj.attach(model)
    with inj:
        eager, comp = eager_then_compiled(model, compiled, inj)
    off_inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["extended"], phases=["rollout"]))
    off_inj.attach(model)
    with off_inj:
        off = step(compiled, off_inj)
    assert _counts(comp) == _counts(eager)
    assert comp["noise/train_forward/attn_qk/fwd/calls"] == comp["noise/train_forward/attn_pv/fwd/calls"] == 2
    assert comp["noise/train_backward/attn_pv/bwd/calls"] == 4
    assert comp["noise/train_forward/attn_qk/fwd/rel_err_rms"] == pytest.approx(1e-2, rel=0.15)
    assert torch.equal(clean[0], off[0]) and all(torch.equal(a, b) for a, b in zip(clean[1], off[1]))
