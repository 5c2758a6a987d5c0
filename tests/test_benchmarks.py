"""The benchmark kit (``benchmarks/``): its scripts start and check their flags, its shared timing interleaves, and
the epilogue GEMM kept there draws its documented noise.

The scripts time GPUs; here they only parse (``--help``, a bad choice), which catches a broken import or flag
between the scripts and ``benchmarks/common.py``. The GEMM runs on CUDA, or in Triton's CPU interpreter when Triton is
installed without CUDA; else it skips.
"""
import importlib
import importlib.util
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before the engine's kernels module is first imported

from noisebench.noise.fast import dispatch  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["noise_overhead", "profile_noise_step", "rollout_throughput", "profile_rollout", "fit_fp8_adder",
           "ppo_ratio_noise"]
TRITON_SCRIPTS = ["kernel_bandwidth", "epilogue_gemm"]   # import Triton at the top
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs Triton (CUDA, or its CPU interpreter)")


@pytest.fixture
def bench(monkeypatch):
    """``benchmarks/`` first on the path, as ``python benchmarks/<script>.py`` has it; its modules forgotten after."""
    monkeypatch.syspath_prepend(str(BENCH))
    for name in ("common", "noisy_gemm"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield
    for name in ("common", "noisy_gemm"):
        sys.modules.pop(name, None)


def _run(monkeypatch, script: str, *args: str) -> int:
    monkeypatch.setattr(sys, "argv", [str(BENCH / f"{script}.py"), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(BENCH / f"{script}.py"), run_name="__main__")
    return exit_.value.code


@pytest.mark.parametrize("script", SCRIPTS + [pytest.param(s, marks=needs_triton) for s in TRITON_SCRIPTS])
def test_script_starts_and_prints_its_flags(script, bench, monkeypatch, capsys):
    assert _run(monkeypatch, script, "--help") == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "--" in out


@pytest.mark.parametrize("script, flag, valid", [
    ("profile_noise_step", "--variants", "'clean', 'off'"),
    ("noise_overhead", "--paths", "'reference', 'fast', 'compiled', 'none'"),
    ("rollout_throughput", "--draws", "'engine', 'inductor', 'none'"),
    ("profile_rollout", "--models", "'testbed', 'qwen2.5-1.5b'"),
])
def test_script_rejects_a_bad_choice_naming_the_flag_and_choices(script, flag, valid, bench, monkeypatch, capsys):
    assert _run(monkeypatch, script, flag, "bogus") == 2
    err = capsys.readouterr().err
    assert f"{flag}: unknown ['bogus']; valid choices: [" in err and valid in err


def test_interleave_calls_each_variant_once_a_round_and_keeps_the_timed_rounds(bench):
    common = importlib.import_module("common")
    calls, seen = [], []

    def variant(label):
        def fn():
            calls.append(label)
            return len(calls)
        return fn
    out = common.interleave({"clean": variant("clean"), "noisy": variant("noisy")}, rounds=2, warmup=1,
                            report=lambda r, label, res: seen.append((r, label, res)))
    assert calls == ["clean", "noisy"] * 3
    assert out == {"clean": [3, 5], "noisy": [4, 6]}              # round 0 (calls 1, 2) was the warm-up
    assert seen == [(r, lab, 2 * r + 1 + (lab == "noisy")) for r in range(3) for lab in ("clean", "noisy")]


@pytest.mark.skipif(not (HAS_TRITON and (HAS_CUDA or dispatch.interpreting())),
                    reason="the epilogue GEMM needs CUDA + Triton (or Triton's CPU interpreter); neither here")
@pytest.mark.parametrize("kind", ["relative_gaussian", "absolute_gaussian"])
def test_epilogue_gemm_noise_is_its_documented_definition(kind, bench):
    """Without noise it is the linear; with it, every element (edge tiles included) gets the tile-local draw its
    NumPy definition gives."""
    gemm = importlib.import_module("noisy_gemm")
    dev = "cuda" if HAS_CUDA else "cpu"
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 100, 70, generator=g).to(dev)
    w = torch.randn(150, 70, generator=g).to(dev)
    clean = gemm.linear_noise(x, w, seed=5, scale=0.5, kind=kind, noise=False)
    ref = F.linear(x, w)
    assert clean.shape == ref.shape and torch.allclose(clean, ref, atol=1e-3, rtol=1e-3)
    noisy = gemm.linear_noise(x, w, seed=5, scale=0.5, kind=kind).reshape(200, 150).double().cpu()
    n = torch.from_numpy(gemm.reference_normals(5, 200, 150))
    c = clean.reshape(200, 150).double().cpu()
    expect = c + 0.5 * n * c if kind == "relative_gaussian" else c + 0.5 * n
    assert (noisy - expect).abs().max().item() < 1e-4 * (1 + expect.abs().max().item())
    assert n.std().item() == pytest.approx(1.0, abs=0.02) and abs(n.mean().item()) < 0.02
    other = torch.from_numpy(gemm.reference_normals(6, 200, 150))
    assert abs(torch.corrcoef(torch.stack([n.flatten(), other.flatten()]))[0, 1].item()) < 0.03
