"""Fast paths of the noise engine (issue 7): fused Triton kernel, CUDA-graph / compiled noise, CPU noise table.

Kernel tests run on CUDA; without CUDA they run through Triton's CPU interpreter when Triton is installed (float32
only: the interpreter truncates bf16 casts), else they skip with the reason. The noise-table tests need neither.
"""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the kernels module is first imported

from noisebench.noise import NoiseInjector, NoiseSpec  # noqa: E402
from noisebench.noise.fast import dispatch, inline, table  # noqa: E402

DEV = "cuda" if HAS_CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON) and not (HAS_TRITON and dispatch.interpreting()),
                                  reason="fast path needs CUDA + Triton (or Triton's CPU interpreter); neither here")
needs_cuda = pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and Triton (graph capture)")
DTYPES = [torch.float32, torch.bfloat16] if HAS_CUDA else [torch.float32]


@pytest.fixture(autouse=True)
def _fast_mode():
    cpu_rng = table.name()
    dispatch.set_mode("auto" if HAS_CUDA else "force")
    yield
    dispatch.set_mode("auto")
    table.set_cpu_generator(cpu_rng)


def _linear_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 256, generator=g).to(DEV, dtype)
    w = torch.randn(384, 256, generator=g).to(DEV, dtype)
    return x, w


def _linear_with_clean_weight_grad():
    """float32 linear inputs with ``w`` requiring grad, an output gradient, and the clean weight gradient it gives
    (``w.grad`` left empty)."""
    x, w = _linear_inputs(torch.float32)
    w.requires_grad_(True)
    g_out = torch.randn(x.shape[0], w.shape[0], generator=torch.Generator().manual_seed(5)).to(DEV)
    F.linear(x, w).backward(g_out)
    clean, w.grad = w.grad.clone(), None
    return x, w, g_out, clean


def _noisy_linear(kind, scale, x, w, seed=0, calls=1):
    inj = NoiseInjector(NoiseSpec(type=kind, scale=scale, seed=seed, telemetry_rate=1.0), global_phase=True)
    with inj:
        ys = [F.linear(x, w) for _ in range(calls)]
    return ys, inj.telemetry()


def _rel(y, ref):
    y, ref = y.double(), ref.double()
    big = ref.abs() > 1.0
    return (y - ref)[big] / ref[big]


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,scale", [("relative_gaussian", 1e-2), ("absolute_gaussian", 2e-2)])
def test_fused_kernel_statistics_match_reference_path(kind, scale, dtype):
    x, w = _linear_inputs(dtype)
    ref = F.linear(x, w)
    cpu_rng, cuda_rng = torch.get_rng_state(), (torch.cuda.get_rng_state() if HAS_CUDA else None)
    stats = {}
    for mode in ("fast", "off"):
        dispatch.set_mode(mode if mode == "off" else ("auto" if HAS_CUDA else "force"))
        (y,), tel = _noisy_linear(kind, scale, x, w)
        d = _rel(y, ref) if kind == "relative_gaussian" else (y.double() - ref.double()).flatten()
        stats[mode] = (d.std().item(), d.mean().item(), tel["noise/global/linear/fwd/calls"])
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    if HAS_CUDA:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    tol = 0.05 if dtype == torch.float32 else 0.15   # bf16 rounding (ulp 2**-8) widens the realized spread
    for mode, (std, mean, calls) in stats.items():
        assert std == pytest.approx(scale, rel=tol), (mode, std)
        assert abs(mean) < 6 * scale / math.sqrt(x.shape[0] * w.shape[0] / 4)
        assert calls == 1.0
    assert stats["fast"][0] == pytest.approx(stats["off"][0], rel=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_systematic_bias_fast_is_bitwise_the_reference(dtype):
    x, w = _linear_inputs(dtype)
    (fast,), _ = _noisy_linear("systematic_bias", 3e-3, x, w)
    dispatch.set_mode("off")
    (ref,), _ = _noisy_linear("systematic_bias", 3e-3, x, w)
    assert torch.equal(fast, ref)
    assert not torch.equal(fast, F.linear(x, w))


@needs_kernel
def test_fast_draws_reproducible_per_seed_fresh_per_call():
    x, w = _linear_inputs(torch.float32)
    a, _ = _noisy_linear("relative_gaussian", 1e-2, x, w, seed=3, calls=2)
    b, _ = _noisy_linear("relative_gaussian", 1e-2, x, w, seed=3, calls=2)
    c, _ = _noisy_linear("relative_gaussian", 1e-2, x, w, seed=4, calls=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ref = F.linear(x, w)
    corr = torch.corrcoef(torch.stack([(a[0] - ref).flatten(), (a[1] - ref).flatten()]))[0, 1].item()
    assert abs(corr) < 0.02
    assert not torch.equal(a[0], c[0])


@needs_kernel
@pytest.mark.parametrize("spec", [dict(type="bitflip", scale=0.01), dict(type="round", rounding="stochastic"),
                                  dict(type="systematic_bias", scale=1e-2, per_channel=True)])
def test_uncovered_models_fall_back_to_reference_not_to_no_noise(spec):
    x, w = _linear_inputs(torch.float32)
    assert not dispatch.covers(NoiseSpec(**spec), x)
    inj = NoiseInjector(NoiseSpec(**spec), global_phase=True)
    with inj:
        y = F.linear(x, w)
    assert (y != F.linear(x, w)).float().mean().item() > 0.005


@needs_kernel
def test_fast_training_step_noises_outputs_and_gradients():
    x, w, g_out, clean = _linear_with_clean_weight_grad()
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["train_forward", "train_backward"]))
    with inj:
        with inj.phase("train_forward"):
            y = F.linear(x, w)
        with inj.phase("train_backward"):
            y.backward(g_out)
    # weight grad = noisy(g_out)^T x, then noised itself: relative error of ~1e-2 on the grad, not 0
    rel = _rel(w.grad, clean)
    assert 0.5e-2 < rel.std().item() < 2e-2
    assert inj.telemetry()["noise/train_backward/linear/bwd/calls"] == 1.0


@pytest.mark.slow
@needs_kernel
def test_compiled_no_grad_noise_is_inline_fresh_per_call_and_spares_global_rng():
    torch._dynamo.reset()
    x, w = _linear_inputs(torch.float32)
    ref = F.linear(x, w)
    f = torch.compile(lambda v: F.linear(v, w), fullgraph=True, mode="reduce-overhead" if HAS_CUDA else "default")
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["rollout"]))
    rng = torch.cuda.get_rng_state() if HAS_CUDA else torch.get_rng_state()
    from torch._dynamo.utils import counters
    counters.clear()
    with inj, torch.no_grad(), inj.phase("rollout"):
        ys = [f(x).clone() for _ in range(4)]
    assert torch.equal(torch.cuda.get_rng_state() if HAS_CUDA else torch.get_rng_state(), rng)
    assert dict(counters["inductor"]).get("cudagraph_skips", 0) == 0
    for y in ys:
        assert _rel(y, ref).std().item() == pytest.approx(1e-2, rel=0.05)
    corr = torch.corrcoef(torch.stack([(ys[2] - ref).flatten(), (ys[3] - ref).flatten()]))[0, 1].item()
    assert abs(corr) < 0.02                          # replays draw fresh noise
    assert inline.FUSABLE
    torch._dynamo.reset()


@needs_cuda
def test_cuda_graph_capture_of_fused_kernel_draws_fresh_noise_each_replay():
    x, w = _linear_inputs(torch.float32)
    ref = F.linear(x, w)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2), global_phase=True)
    with inj:
        F.linear(x, w)                                # warm-up outside capture (allocates the device counters)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = F.linear(x, w)
        outs = []
        for _ in range(3):
            graph.replay()
            outs.append(y.clone())
    for o in outs:
        assert _rel(o, ref).std().item() == pytest.approx(1e-2, rel=0.05)
    corr = torch.corrcoef(torch.stack([(outs[0] - ref).flatten(), (outs[1] - ref).flatten()]))[0, 1].item()
    assert abs(corr) < 0.02


@needs_cuda
def test_reference_only_model_under_capture_raises_clearly():
    x, w = _linear_inputs(torch.float32)
    inj = NoiseInjector(NoiseSpec(type="bitflip", scale=1e-3), global_phase=True)
    with inj:
        F.linear(x, w)
        with pytest.raises(RuntimeError, match="cannot be captured"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                F.linear(x, w)


@pytest.mark.parametrize("gen", ["table", "icdf16"])
@pytest.mark.parametrize("kind,scale", [("relative_gaussian", 1e-2), ("absolute_gaussian", 2e-2)])
def test_cpu_noise_generators_statistics_and_reproducibility(kind, scale, gen):
    table.set_cpu_generator(gen, log2_size=20)
    x, w = (t.cpu() for t in _linear_inputs(torch.float32))
    ref = F.linear(x, w)
    dispatch.set_mode("off")
    a, _ = _noisy_linear(kind, scale, x, w, seed=1, calls=2)
    b, _ = _noisy_linear(kind, scale, x, w, seed=1, calls=1)
    d = _rel(a[0], ref) if kind == "relative_gaussian" else (a[0] - ref).flatten()
    assert d.std().item() == pytest.approx(scale, rel=0.05)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], a[1])


def test_icdf16_normals_are_standard_and_independent():
    """The default CPU generator: 65536 N(0, 1) quantiles picked by SFC64 bits keyed per call."""
    z = table.icdf16((1 << 22,), 5)
    assert abs(z.mean().item()) < 5 / 2 ** 11
    assert z.std().item() == pytest.approx(1.0, abs=2e-3)
    assert (z.double() ** 4).mean().item() == pytest.approx(3.0, abs=0.03)
    assert (z.abs() > 3).float().mean().item() == pytest.approx(2.7e-3, rel=0.1)
    assert z.abs().max().item() == pytest.approx(4.3249, abs=1e-3)
    assert torch.equal(z, table.icdf16((1 << 22,), 5))
    other = table.icdf16((1 << 22,), 6)
    assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < 3e-3
    assert abs(torch.corrcoef(torch.stack([z[:-1], z[1:]]))[0, 1].item()) < 3e-3   # neighbours independent


def test_bad_fast_mode_and_cpu_generator_name_the_choices():
    with pytest.raises(ValueError, match="valid choices"):
        dispatch.set_mode("fastest")
    with pytest.raises(ValueError, match="valid choices"):
        table.set_cpu_generator("mersenne")


@needs_kernel
@pytest.mark.parametrize("numel", [1, 8191, 20000, (1 << 20) + 77])   # the last: EAGER_SPLIT programs per block
def test_fused_kernel_draws_are_the_documented_definition(numel):
    """For a fixed seed the kernel's noise is ``kernels.reference_normals`` (Philox4x32-7, 16-bit Box-Muller):
    float64 NumPy vs the kernel, up to fp32 arithmetic and (on CUDA) the hardware log/sin/cos."""
    from noisebench.noise.fast import definition, kernels
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1)).to(DEV)
    ctr, done = torch.zeros(1, dtype=torch.int64, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    y = kernels.launch(x, "absolute_gaussian", 1.0, 987654321, ctr, done, False)
    n = torch.from_numpy(definition.reference_normals(987654321, numel))
    got = y.double().cpu() - x.double().cpu()
    assert (got - n).abs().max().item() < (2e-5 if HAS_CUDA else 1e-6 if numel < 1 << 20 else 2e-6)   # fp32 vs fp64
    assert n.abs().max().item() <= 4.86                       # 16-bit uniforms bound |n|


@needs_kernel
def test_launch_hooks_are_seen_only_when_registered():
    """Triton 3.6 keeps launch hooks as chains that exist even when empty: direct launches must stay on then, and
    step aside (Triton's launcher calls the hooks) once a profiler registers one."""
    from noisebench.noise.fast import kernels
    if kernels._knobs is None:
        pytest.skip("this Triton has no launch hooks")
    chain = kernels._knobs.runtime.launch_enter_hook
    assert not kernels._launch_hooks()
    hook = (lambda *a: None)
    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert kernels._launch_hooks()
        finally:
            chain.remove(hook)
    else:
        kernels._knobs.runtime.launch_enter_hook = hook
        try:
            assert kernels._launch_hooks()
        finally:
            kernels._knobs.runtime.launch_enter_hook = chain
    assert not kernels._launch_hooks()


@needs_cuda
def test_direct_launch_passes_its_check_on_cuda():
    """Eager launches skip Triton's Python launcher once a direct launch has matched it bitwise; a kernel signature
    change that breaks the direct call must fail here, not silently cost ~15 us a launch."""
    from noisebench.noise.fast import kernels
    x = torch.randn(3 * 8192, device=DEV)
    ctr, done = torch.zeros(1, dtype=torch.int64, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    kernels.launch(x, "relative_gaussian", 1e-3, 5, ctr, done, False, out=x)
    assert kernels._DIRECT["ok"] is True


@needs_kernel
@pytest.mark.parametrize("split", [1, 8])
def test_graph_kernel_split_lanes_draw_the_documented_definition(split):
    """The compiled-graph kernel reads key and scale from device scalars; with its lanes split over SPLIT thread
    blocks (small decode-step tensors) it must still draw the definition, element for element."""
    from noisebench.noise.fast import definition, kernels
    numel, seed = 3 * definition.BLOCK + 77, 424242
    x = torch.randn(numel, generator=torch.Generator().manual_seed(2)).to(DEV)
    out = torch.empty_like(x)
    key = torch.tensor(seed, dtype=torch.int64, device=DEV)
    scales = torch.tensor([0.0, 1.0], device=DEV)
    grid = (split * -(-numel // definition.BLOCK),)
    kernels._graph_noise_kernel[grid](x, out, key, scales, numel, KIND=1, SCALE_IDX=1, FAST=0, ROUNDS=definition.ROUNDS,
                                      BLOCK=definition.BLOCK, SPLIT=split, num_warps=4)
    n = torch.from_numpy(definition.reference_normals(seed, numel))
    assert (out.double().cpu() - x.double().cpu() - n).abs().max().item() < 2e-5
    assert kernels.graph_split(64 * 1536) == kernels.SMALL_SPLIT and kernels.graph_split(1 << 24) == 1


@needs_cuda
@pytest.mark.parametrize("seed", [424242, (1 << 40) + 987654321, (1 << 62) - 3])   # forward, backward, high key bits
def test_compiled_fused_draw_is_the_documented_definition_on_cuda(seed):
    """Inductor fuses the compiled route's draw into its kernels as one inline-PTX op, four elements an instance
    (``inline.PHILOX7_ASM``): on CUDA it must draw ``definition.reference_normals_flat`` element for element
    (hardware lg2/cos/sin approximations), whether an instance's four elements are contiguous and aligned (one
    Philox call for four) or not (a transposed or strided consumer: one call each)."""
    from noisebench.noise.fast import definition
    if inline.FUSED_DRAW != "philox7":
        pytest.skip(f"this torch's Inductor has no inline-asm op: the fused draw is {inline.FUSED_DRAW!r}")
    shape = (5, 2 * definition.BLOCK + 4099)       # odd sizes: partial blocks and rows that do not start aligned
    key = torch.tensor(seed, dtype=torch.int64, device="cuda")
    ref = torch.from_numpy(definition.reference_normals_flat(seed, shape[0] * shape[1])).view(shape)
    consumers = {"contiguous": lambda n: n * 1.0, "transposed": lambda n: n.t() * 1.0,
                 "strided": lambda n: n[:, ::3] * 1.0}
    for name, use in consumers.items():
        f = torch.compile(lambda s: use(inline.draw(s, shape)), fullgraph=True)
        got = f(key).double().cpu()
        assert (got - use(ref)).abs().max().item() < 1e-4, name
    n = f(key).double()
    assert abs(n.mean().item()) < 0.02 and n.std().item() == pytest.approx(1.0, abs=0.02)
    torch._dynamo.reset()


def test_documented_noise_definition_is_standard_normal():
    """The definition itself (no kernel needed): moments, tails and independence over 4M draws."""
    from noisebench.noise.fast import definition
    z = torch.from_numpy(definition.reference_normals(5, 1 << 22))
    assert abs(z.mean().item()) < 5 / 2 ** 11                  # 5 sigma of the mean
    assert z.std().item() == pytest.approx(1.0, abs=2e-3)
    assert (z ** 4).mean().item() == pytest.approx(3.0, abs=0.03)
    assert (z.abs() > 3).float().mean().item() == pytest.approx(2.7e-3, rel=0.1)
    s = z.reshape(-1, definition.SLICES, definition.Q)               # the cos/sin halves of one Box-Muller pair
    assert abs(torch.corrcoef(torch.stack([s[:, 0].flatten(), s[:, 1].flatten()]))[0, 1].item()) < 5e-3
    assert abs(torch.corrcoef(torch.stack([s[:, 0].flatten() ** 2, s[:, 1].flatten() ** 2]))[0, 1].item()) < 5e-3
    other = torch.from_numpy(definition.reference_normals(6, 1 << 20))
    assert abs(torch.corrcoef(torch.stack([z[:1 << 20], other]))[0, 1].item()) < 5e-3
    flat = torch.from_numpy(definition.reference_normals_flat(5, 1 << 22))   # the compiled route's layout
    assert torch.equal(flat.sort().values, z.sort().values)          # the same draws, placed by flat index
    assert not torch.equal(flat, z)
    pairs = flat.reshape(-1, 2)                                      # cos/sin of one pair sit side by side
    assert abs(torch.corrcoef(pairs.T ** 2)[0, 1].item()) < 5e-3


@needs_kernel
def test_in_kernel_telemetry_matches_the_reference_sums():
    x, w = _linear_inputs(torch.float32)
    ref = F.linear(x, w)
    (y,), tel = _noisy_linear("relative_gaussian", 1e-2, x, w)
    e = (y.double() - ref.double()).flatten()[:4096]
    expect = (e.square().sum() / ref.double().flatten()[:4096].square().sum()).sqrt().item()
    assert tel["noise/global/linear/fwd/rel_err_rms"] == pytest.approx(expect, rel=1e-4)


@needs_kernel
def test_fast_inplace_forward_noise_keeps_gradients_straight_through():
    """Forward-only noise on linear outputs is written in place by the kernel: outputs noisy, gradients exactly
    those of the clean op evaluated at the same inputs."""
    x, w, g_out, clean = _linear_with_clean_weight_grad()
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["train_forward"]))
    with inj, inj.phase("train_forward"):
        y = F.linear(x, w)
        assert type(y.grad_fn).__name__ != "_StraightThroughBackward"   # no Python node
        y.backward(g_out)
    assert _rel(y.detach(), F.linear(x, w.detach())).std().item() == pytest.approx(1e-2, rel=0.1)
    assert torch.equal(w.grad, clean)


@needs_kernel
def test_one_launch_for_several_tensors_draws_what_separate_launches_draw():
    """A linear's input, weight and bias gradients are noised by one launch; each must get exactly the noise (and
    telemetry sums) of its own launch with its own seed."""
    from noisebench.noise.fast import definition, kernels
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(n, generator=g).to(DEV) for n in (20000, 1, 8192 * 2 + 3)]
    ctr, done = torch.zeros(1, dtype=torch.int64, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)
    seeds = [11, 22, 33]
    teles = [torch.zeros(2, device=DEV), None, torch.zeros(2, device=DEV)]
    sep_tele = [torch.zeros(2, device=DEV), None, torch.zeros(2, device=DEV)]
    sep = [kernels.launch(x, "relative_gaussian", 1e-2, s, ctr, done, False, tele=t)
           for x, s, t in zip(xs, seeds, sep_tele)]
    many = [x.clone() for x in xs]
    kernels.launch_many(many, "relative_gaussian", 1e-2, seeds, ctr, done, False, teles)
    for a, b in zip(sep, many):
        assert torch.equal(a, b)
    for a, b in zip(sep_tele, teles):
        assert (a is None and b is None) or torch.allclose(a, b)
    two = [x.clone() for x in xs[:2]]
    kernels.launch_many(two, "absolute_gaussian", 1e-2, seeds[:2], ctr, done, False, [None, None])
    assert torch.equal(two[0], kernels.launch(xs[0], "absolute_gaussian", 1e-2, 11, ctr, done, False))


@needs_kernel
@pytest.mark.parametrize("inline_mode", ["auto", "kernel"] if HAS_CUDA else ["auto"])
def test_compiled_training_noise_is_inline_and_reads_backward_phase_on_device(inline_mode, monkeypatch):
    """Compiled training graphs get the noise as graph ops (forward straight-through, backward through a device
    scale set at each phase change): realized 1e-2 both ways, bitwise-clean gradients when backward runs outside
    train_backward, a new scale without recompiling, the global RNG untouched. ``kernel``: the draws come from the
    graph kernel (training-sized tensors take it under ``auto``; this one is small), forward noise through
    ``inline.KernelNoise``."""
    from torch._dynamo.testing import CompileCounterWithBackend
    monkeypatch.setattr(inline, "MODE", inline_mode)
    torch._dynamo.reset()
    x, w, gy, clean = _linear_with_clean_weight_grad()
    ref = F.linear(x, w).detach()
    counter = CompileCounterWithBackend("inductor" if HAS_CUDA else "aot_eager")
    f = torch.compile(lambda v, ww: F.linear(v, ww), backend=counter, fullgraph=True)
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, phases=["train_forward", "train_backward"]))
    rng = torch.cuda.get_rng_state() if HAS_CUDA else torch.get_rng_state()
    got = []
    with inj:
        for bwd, scale in (("train_backward", 1e-2), ("eval", 1e-2), ("train_backward", 3e-2)):
            inj.spec.scale = scale
            with inj.phase("train_forward"):
                y = f(x, w)
            with inj.phase(bwd):
                y.backward(gy)
            got.append((_rel(y.detach(), ref).std().item(), w.grad.clone()))
            w.grad = None
    assert torch.equal(torch.cuda.get_rng_state() if HAS_CUDA else torch.get_rng_state(), rng)
    assert counter.frame_count == 1
    assert got[0][0] == pytest.approx(1e-2, rel=0.1) and got[2][0] == pytest.approx(3e-2, rel=0.1)
    assert _rel(got[0][1], clean).std().item() == pytest.approx(1e-2, rel=0.1)
    assert torch.equal(got[1][1], clean)                              # backward outside train_backward: clean
    assert _rel(got[2][1], clean).std().item() == pytest.approx(3e-2, rel=0.1)
    torch._dynamo.reset()
