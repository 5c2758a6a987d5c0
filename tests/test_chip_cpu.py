"""The compiled CPU chip GEMM (``noisebench.noise.fast.chip_cpu``) against the definition (``accumulate``), bitwise:
every alignment (exact chunks, the fitted and the H200 adders), scaling, rounding, promotion, random reduction
order, batched and broadcast operands, ragged K, NaN and inf codes; and a chip model's forward and backward with
the compiled path equal to the definition's."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from noisebench.noise import accumulate
from noisebench.noise import formats as F
from noisebench.noise.accumulate import GemmArith

pytest.importorskip("numba")
from noisebench.noise.fast import blas_cpu, chip_cpu  # noqa: E402

# (in_format, in_scaling, scale_block, chunk, acc bits, acc rounding, promote_every, alignment)
CASES = [
    ("bf16", "none", 32, 32, 23, "rne", None, "exact"),                         # gpu_bf16
    ("bf16", "none", 32, 16, 10, "rne", None, "exact"),                         # approx_exp_acc10
    ("fp8_e4m3", "mx", 32, 32, 23, "rne", None, "exact"),                       # mxfp8
    ("fp4_e2m1", "mx", 32, 16, 6, "toward_zero", 64, "exact"),
    ("fp8_e4m3", "tensor", 32, 32, 13, "toward_zero", None, "exact"),
    ("fp8_e4m3", "block", 128, 32, 13, "toward_zero", 128, "exact"),
    ("fp8_e4m3", "tensor", 32, 32, 13, "toward_zero", None, "max_exponent_unnormalized"),   # fp8_fast_accum
    ("fp8_e4m3", "block", 128, 32, 13, "toward_zero", 128, "max_exponent_unnormalized"),    # fp8_promote128
    ("fp8_e5m2", "none", 32, 16, 9, "rne", 64, "max_exponent_unnormalized"),
    ("fp8_e4m3", "mx", 32, 32, 13, "toward_zero", None, "max_exponent"),
    ("bf16", "none", 32, 16, 12, "rne", 64, "max_exponent"),
]
SHAPES = [((48, 100), (100, 40)),              # ragged K (zero-padded chunks)
          ((2, 3, 17, 128), (2, 3, 128, 24)),  # batched (attention)
          ((2, 3, 17, 96), (96, 24)),          # one B for every batch
          ((2, 3, 9, 64), (1, 3, 64, 24))]     # B broadcast along a batch dim


def _codes(arith: GemmArith, shape_a, shape_b, gen, specials: bool):
    a = torch.randn(*shape_a, generator=gen) * torch.exp2(torch.randint(-6, 6, shape_a, generator=gen).float())
    b = torch.randn(*shape_b, generator=gen) * 0.1
    if specials:
        a[..., 3, 5] = float("nan")
        a[..., 4, 7] = float("inf")
        b[..., 9, 2] = -float("inf")
    ca, ia = accumulate.quantize_codes(a, arith, -1)
    cb, ib = accumulate.quantize_codes(b, accumulate.b_arith(arith), -2)
    return ca, cb, ia, ib


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal bit patterns, NaN equal to NaN (its payload is not part of a profile's arithmetic)."""
    nan = want.isnan()
    return (got.shape == want.shape and bool(torch.equal(got.isnan(), nan))
            and bool(torch.equal(got.masked_fill(nan, 0).view(torch.int32), want.masked_fill(nan, 0).view(torch.int32))))


@pytest.mark.parametrize("swap", [0, 1 << 30], ids=["as-is", "transposed"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiled_sums_are_the_definition_bitwise(case, swap, monkeypatch):
    """Every shape as it comes and, for the adders, as (B^T A^T)^T (``_swapped``, taken where N is short)."""
    monkeypatch.setattr(chip_cpu, "_SWAP_BELOW", swap)
    fmt, scaling, block, chunk, bits, rounding, promote, alignment = case
    arith = GemmArith(in_format=fmt, in_scaling=scaling, scale_block=block, chunk=chunk, acc_mantissa_bits=bits,
                      acc_rounding=rounding, promote_every=promote, acc_alignment=alignment, out_format="bf16",
                      overflow="inf" if fmt == "bf16" else "saturate")
    gen = torch.Generator().manual_seed(7)
    for shape_a, shape_b in SHAPES:
        for specials, order in ((False, None), (True, None), (False, "random")):
            if specials and scaling != "none":
                continue                       # non-finite codes: unscaled (scales refuse them)
            ca, cb, ia, ib = _codes(arith, shape_a, shape_b, gen, specials)
            seq = None
            if order:
                seq = accumulate.chunk_order(dataclasses.replace(arith, reduction_order="random"),
                                             shape_a[-1], gen)
            want = accumulate.accumulate(ca, cb, arith, ia, ib, seq)
            got = chip_cpu.accumulate(ca, cb, arith, ia, ib, seq)
            assert _same_bits(got, want), (shape_a, shape_b, specials, order,
                                           (got != want).sum().item(), want.numel())
            if specials and alignment == "exact":
                assert want.isnan().any() and want.isinf().any()      # the specials reached the output


@pytest.mark.parametrize("out_format", ["bf16", "fp16", "fp8_e4m3", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_epilogue_in_the_loops_is_gemm_bitwise(case, out_format, monkeypatch):
    """``accumulate.gemm`` with the compiled paths, whose loops add the bias and round the output while each row
    is in cache (``chip_cpu.accumulate_out``), equals the definition's three stages bitwise: with and without a
    bias, outputs past the format's range (saturated or inf), NaN and inf inputs, a swapped adder and tensor
    scales (where the stages run apart); and the loops really did the epilogue where they can."""
    from noisebench.noise.chip import CPU_PATHS
    fmt, scaling, block, chunk, bits, rounding, promote, alignment = case
    gen = torch.Generator().manual_seed(5)
    apart = []
    real = chip_cpu._epilogue
    monkeypatch.setattr(chip_cpu, "_epilogue", lambda *a: apart.append(1) or real(*a))
    for overflow in ("saturate", "inf"):
        arith = GemmArith(in_format=fmt, in_scaling=scaling, scale_block=block, chunk=chunk, acc_mantissa_bits=bits,
                          acc_rounding=rounding, promote_every=promote, acc_alignment=alignment,
                          out_format=out_format, overflow=overflow)
        for (shape_a, shape_b), with_bias in zip(SHAPES[:3] + [((40, 96), (96, 300))], (True, False, False, True)):
            for specials in (False, True):
                if specials and scaling != "none":
                    continue                   # non-finite inputs: unscaled (scales refuse them)
                a = torch.randn(*shape_a, generator=gen) * 8
                b = torch.randn(*shape_b, generator=gen) * 4
                a[..., 0, :] *= 2.0 ** 14                  # past fp8/fp16 (and with the bias, bf16 sums near it)
                if specials:
                    a[..., 3, 5], a[..., 4, 7], b[..., 9, 2] = float("nan"), float("inf"), -float("inf")
                bias = torch.randn(shape_b[-1], generator=gen) * 100 if with_bias else None
                apart.clear()
                want = accumulate.gemm(a, b, arith, bias=bias)
                got = accumulate.gemm(a, b, arith, bias=bias, paths=CPU_PATHS)
                assert _same_bits(got, want), (shape_a, shape_b, overflow, specials, (got != want).sum().item())
                rows = got.numel() // got.shape[-1]
                swapped = alignment != "exact" and shape_b[-1] < chip_cpu._SWAP_BELOW and rows > shape_b[-1]
                finite = all(bool(accumulate.quantize_codes(x, arith, d)[0].isfinite().all())
                             for x, d in ((a, -1), (b, -2)))          # (an adder on inf/NaN codes: the definition)
                if scaling != "tensor" and not swapped and (finite or alignment == "exact"):
                    assert not apart, (shape_a, shape_b)      # the loops did the epilogue
                if out_format != "fp32" and not specials:
                    assert _same_bits(F.quantize(got, out_format, "nearest", overflow), got)     # on the grid


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp8_e4m3", "fp32"])
def test_unscaled_inputs_rounded_in_the_loop_are_gemm_bitwise(fmt, monkeypatch):
    """``chip_cpu.gemm`` (the loop rounds raw inputs to codes as it casts each chunk): the definition's bits for
    both overflow rules, a weight gradient's K-major A, a B cast once and a batched B cast chunk
    by chunk, B's codes given (``qb``), bfloat16 inputs, a random chunk order, a bias and NaN/inf inputs; and it
    runs (returns no None) on all of them."""
    from noisebench.noise.chip import CPU_PATHS
    monkeypatch.setattr(chip_cpu, "_BLOCK_BYTES", 1)        # 8-row blocks: several blocks read one cast B
    gen = torch.Generator().manual_seed(21)
    for order in ("fixed", "random"):
        for overflow in ("saturate", "inf"):
            arith = GemmArith(in_format=fmt, chunk=16, acc_mantissa_bits=10, overflow=overflow, out_format="bf16",
                              reduction_order=order)
            base = torch.randn(130, 100, generator=gen) * 40
            base[3, 5], base[4, 7] = float("nan"), float("inf")
            cases = [(base, torch.randn(100, 48, generator=gen)),                        # B cast once
                     (base.t().contiguous().t(), torch.randn(100, 48, generator=gen)),   # K-major A
                     (base.reshape(2, 65, 100), torch.randn(2, 100, 24, generator=gen)),  # batched B, chunk casts
                     (base.bfloat16(), torch.randn(100, 48, generator=gen).bfloat16())]
            for i, (a, b) in enumerate(cases):
                for qb in (None, accumulate.quantize_codes(b, arith, -2)):
                    bias = torch.randn(b.shape[-1], generator=gen) if i == 0 else None
                    want = accumulate.gemm(a, b, arith, torch.Generator().manual_seed(i), bias=bias, qb=qb)
                    assert chip_cpu.gemm(a, b, arith, torch.Generator().manual_seed(i), bias, qb) is not None
                    got = accumulate.gemm(a, b, arith, torch.Generator().manual_seed(i), bias=bias, qb=qb,
                                          paths=CPU_PATHS)
                    assert _same_bits(got, want), (order, overflow, i, qb is None)
    assert chip_cpu.gemm(base, cases[0][1], dataclasses.replace(arith, in_scaling="mx")) is None   # the stages run


def _blas(which: str, monkeypatch) -> None:
    """The chunk sums' dgemm: torch's MKL (``blas_cpu``, where torch has it) or SciPy's through Numba's np.dot."""
    if which == "np.dot":
        monkeypatch.setattr(blas_cpu, "_FOUND", [0, None])
    elif not blas_cpu.address():
        pytest.skip("torch here has no MKL dgemm_ (the loops call np.dot)")


@pytest.mark.parametrize("blas", ["torch-mkl", "np.dot"])
@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == "exact"], ids=lambda c: "-".join(map(str, c)))
def test_exact_sums_in_row_blocks_are_the_definition_bitwise(case, blas, monkeypatch):
    """Exact chunk sums run a block of rows at a time, each block within one batch (its B): 8-row blocks (the
    smallest) leave ragged blocks at every batch's end, on one and two threads, for every shape, scaling and
    promotion; a long K (a weight gradient's tokens) at the default block size. Either BLAS gives the bits."""
    _blas(blas, monkeypatch)
    fmt, scaling, block, chunk, bits, rounding, promote, alignment = case
    arith = GemmArith(in_format=fmt, in_scaling=scaling, scale_block=block, chunk=chunk, acc_mantissa_bits=bits,
                      acc_rounding=rounding, promote_every=promote, acc_alignment=alignment, out_format="bf16",
                      overflow="inf" if fmt == "bf16" else "saturate")
    gen = torch.Generator().manual_seed(11)
    old = torch.get_num_threads()
    try:
        for threads, block_bytes, (shape_a, shape_b) in (
                *((1, 1, sh) for sh in SHAPES), (2, 1, ((3, 101, 128), (3, 128, 48))),       # split mid-batch
                (2, 1, ((300, 128), (128, 48))), (1, chip_cpu._BLOCK_BYTES, ((100, 4096), (4096, 24)))):
            monkeypatch.setattr(chip_cpu, "_BLOCK_BYTES", block_bytes)
            torch.set_num_threads(threads)
            ca, cb, ia, ib = _codes(arith, shape_a, shape_b, gen, False)
            ca = ca.transpose(-1, -2).contiguous().transpose(-1, -2)       # A as a weight gradient has it
            want = accumulate.accumulate(ca, cb, arith, ia, ib)
            got = chip_cpu.accumulate(ca, cb, arith, ia, ib)
            assert _same_bits(got, want), (threads, shape_a, (got != want).sum().item(), want.numel())
    finally:
        torch.set_num_threads(old)


def test_a_narrow_accumulator_really_rounds():
    """The compiled path is not plain float32 summation: 7 accumulator bits toward zero move most outputs off a
    float64 GEMM by up to 2**-7 of the largest partial sum, and agree with the definition bitwise."""
    arith = GemmArith(in_format="bf16", chunk=16, acc_mantissa_bits=7, acc_rounding="toward_zero")
    gen = torch.Generator().manual_seed(0)
    ca, cb, _, _ = _codes(arith, (64, 256), (256, 32), gen, False)
    got = chip_cpu.accumulate(ca, cb, arith)
    exact = (ca.double() @ cb.double()).float()
    assert (got != exact).double().mean() > 0.5
    assert _same_bits(got, accumulate.accumulate(ca, cb, arith))


def test_a_chip_model_step_is_the_definition_bitwise():
    """A small model's forward and backward under fp8_fast_accum, mxfp8 and a polynomial exp (ChipMode): the same logits and
    gradients with the compiled path (engine switch ``auto``) as with the definition (``off``)."""
    from noisebench.noise.chip import ChipMode, ChipProfile
    from noisebench.noise.fast import dispatch

    def run(profile, mode):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32))
        x = torch.randn(2, 24, 64)
        old = dispatch.MODE
        dispatch.set_mode(mode)
        try:
            with ChipMode(profile):
                y = model(x)
                y.square().mean().backward()
        finally:
            dispatch.set_mode(old)
        return [y.detach()] + [p.grad for p in model.parameters()]

    for profile in (ChipProfile.from_dict(dict(name="fp8_fast_accum", in_format="fp8_e4m3", grad_format="fp8_e5m2",
                                               in_scaling="tensor", chunk=32, acc_mantissa_bits=13,
                                               acc_rounding="toward_zero", acc_alignment="max_exponent_unnormalized",
                                               out_format="bf16", overflow="saturate")),
                    ChipProfile.from_dict(dict(name="mxfp8", in_format="fp8_e4m3", in_scaling="mx", chunk=32,
                                               acc_mantissa_bits=23, acc_rounding="rne", out_format="bf16",
                                               overflow="saturate")),
                    ChipProfile.from_dict(dict(name="approx_exp_acc10", in_format="bf16", chunk=16,
                                               acc_mantissa_bits=10, acc_rounding="rne", out_format="bf16",
                                               overflow="inf", ops=["linear", "silu"], exp_degree=3))):
        fast, slow = run(profile, "auto"), run(profile, "off")
        for f, s in zip(fast, slow):
            assert _same_bits(f.float(), s.float())
        torch.manual_seed(0)
        clean = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.SiLU(), torch.nn.Linear(96, 32))
        assert not torch.equal(fast[0], clean(torch.randn(2, 24, 64)).detach())      # the chip really ran


@pytest.mark.parametrize("fmt,b_fmt", [("fp8_e4m3", None), ("fp8_e5m2", None), ("fp8_e4m3", "fp8_e5m2"),
                                       ("fp16", None)])
def test_the_adders_float32_lanes_are_exact_on_whole_range_codes(fmt, b_fmt):
    """The adders' per-product loops run in float32 for narrow codes (``chip_cpu._lanes``): on codes drawn from
    every finite bit pattern of the format (subnormals, the largest values, both signs, zero), both adders and
    both roundings still give the definition's bits, where products span 2**-48 ... 2**32."""
    dtypes = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp16": torch.float16}
    gen = torch.Generator().manual_seed(11)

    def whole_range(shape, f):
        width = 16 if f == "fp16" else 8
        raw = torch.randint(0, 1 << width, shape, generator=gen, dtype=torch.int32)
        x = raw.to(torch.int16 if width == 16 else torch.uint8).view(dtypes[f]).float()
        return x.masked_fill_(~x.isfinite(), 0.0)

    for alignment in ("max_exponent_unnormalized", "max_exponent"):
        for rounding in ("toward_zero", "rne"):
            arith = GemmArith(in_format=fmt, b_format=b_fmt, in_scaling="none", chunk=32, acc_mantissa_bits=13,
                              acc_rounding=rounding, acc_alignment=alignment, promote_every=None, out_format="bf16",
                              overflow="saturate")
            assert chip_cpu._lanes(arith) is np.float32
            ca, cb = whole_range((40, 160), fmt), whole_range((160, 48), b_fmt or fmt)
            want = accumulate.accumulate(ca, cb, arith)
            got = chip_cpu.accumulate(ca, cb, arith)
            assert _same_bits(got, want), (alignment, rounding, (got != want).sum().item())
            assert want.abs().max() > 2.0 ** 14 and (want != 0).float().mean() > 0.9   # large and non-trivial sums
    wide = GemmArith(in_format="bf16", chunk=32, acc_mantissa_bits=13, acc_alignment="max_exponent")
    mx = GemmArith(in_format=fmt, in_scaling="mx", chunk=32, acc_mantissa_bits=13, acc_alignment="max_exponent")
    assert chip_cpu._lanes(wide) is chip_cpu._lanes(mx) is np.float64    # bf16 range, MX scales


def test_rows_split_among_threads_are_the_definition_bitwise():
    """With two torch threads a large adder GEMM's rows are split between two Python threads (``_split_rows``):
    the same bits as the definition, for one B and for one B per batch (rows offset into their batch)."""
    arith = GemmArith(in_format="fp8_e4m3", in_scaling="tensor", chunk=32, acc_mantissa_bits=13,
                      acc_rounding="toward_zero", acc_alignment="max_exponent_unnormalized", out_format="bf16",
                      overflow="saturate")
    gen = torch.Generator().manual_seed(3)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape_a, shape_b in (((300, 128), (128, 64)), ((3, 101, 128), (3, 128, 48))):
            ca, cb, ia, ib = _codes(arith, shape_a, shape_b, gen, False)
            assert ca.numel() // ca.shape[-1] * ca.shape[-1] * cb.shape[-1] >= 1 << 20   # large enough to split
            assert _same_bits(chip_cpu.accumulate(ca, cb, arith, ia, ib), accumulate.accumulate(ca, cb, arith, ia, ib))
    finally:
        torch.set_num_threads(old)



def test_a_forked_child_splits_rows_in_its_own_threads():
    """A process forked after the row-split pool exists (a worker of a fork-based launcher) gets its own threads
    instead of queueing work for its parent's workers, which the child does not have (it would wait forever). The
    kernel here is plain Python writing NumPy rows: torch's own OpenMP is not fork-safe, whatever this module does."""
    import multiprocessing
    import threading

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        meet = threading.Barrier(2)                # both workers alive at once: two idle threads stay behind
        chip_cpu._split_rows(_meet, 64, 1 << 20, meet)
        assert len(chip_cpu._POOL[0]._threads) == 2
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.apply_async(_split_in_child).get(timeout=60)
    finally:
        torch.set_num_threads(old)
    assert np.array_equal(got, np.arange(64.0))


def _meet(barrier, row0, row1):
    barrier.wait(timeout=30)


def _fill_rows(out, row0, row1):
    out[row0:row1] = np.arange(row0, row1)


def _split_in_child():
    torch.set_num_threads(2)                     # (a forked child starts with one)
    assert torch.get_num_threads() == 2
    out = np.zeros(64)
    chip_cpu._split_rows(_fill_rows, 64, 1 << 20, out)
    return out


def test_torch_mkl_dgemm_from_the_loops_is_the_product():
    """``blas_cpu.dgemm`` (MKL's dgemm_ by address, row-major through column-major) gives NumPy's product on
    integer matrices (exact either way): rows strided in C, one row, K = 0 (zeros, where BLAS would reject the
    leading dimension); the columns past C's view untouched."""
    if not blas_cpu.address():
        pytest.skip("torch here has no MKL dgemm_ (the loops call np.dot)")
    rng = np.random.default_rng(1)
    for m, k, n in ((5, 7, 6), (1, 32, 384), (170, 32, 384), (3, 0, 4)):
        a, b = (rng.integers(-99, 99, s).astype(np.float64) for s in ((m, k), (k, n)))
        c = np.full((m, n + 3), np.nan)
        blas_cpu.dgemm(blas_cpu.address(), a, b, c[:, :n], blas_cpu.workspace())
        assert np.array_equal(c[:, :n], a @ b) and np.isnan(c[:, n:]).all(), (m, k, n)


def test_exact_sums_hold_scipy_blas_to_one_thread(monkeypatch):
    """Where the loops call np.dot (SciPy's BLAS, through Numba), it runs on one thread: rows are split among
    torch's threads by the loops themselves, and a pool per process would start a thread per core under a
    parallel sweep."""
    from threadpoolctl import threadpool_info

    _blas("np.dot", monkeypatch)
    arith = GemmArith(in_format="bf16", chunk=32, acc_mantissa_bits=23, out_format="bf16", overflow="inf")
    gen = torch.Generator().manual_seed(5)
    ca, cb, _, _ = _codes(arith, (64, 96), (96, 16), gen, False)
    assert _same_bits(chip_cpu.accumulate(ca, cb, arith), accumulate.accumulate(ca, cb, arith))
    import scipy

    home = scipy.__file__.rsplit("/", 1)[0]
    scipy_blas = [i for i in threadpool_info() if i["user_api"] == "blas" and i["filepath"].startswith(home)]
    if not scipy_blas:
        pytest.skip("SciPy's BLAS is not a separate library here (a shared system BLAS)")
    assert all(i["num_threads"] == 1 for i in scipy_blas), scipy_blas


def test_exact_sums_hold_torch_mkl_to_one_thread_in_their_workers_only(monkeypatch):
    """Where the loops call torch's MKL, each row-split worker's MKL runs on one thread (two workers on two
    threads each would oversubscribe the cores), while the caller's thread keeps torch's count for torch's own
    GEMMs."""
    _blas("torch-mkl", monkeypatch)
    arith = GemmArith(in_format="bf16", chunk=32, acc_mantissa_bits=23, out_format="bf16", overflow="inf")
    gen = torch.Generator().manual_seed(5)
    ca, cb, _, _ = _codes(arith, (300, 128), (128, 48), gen, False)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if chip_cpu._POOL:                         # a fresh pool: its workers start through the initializer
            chip_cpu._POOL[0].shutdown()
            chip_cpu._POOL.clear()
        assert _same_bits(chip_cpu.accumulate(ca, cb, arith), accumulate.accumulate(ca, cb, arith))
        workers = [chip_cpu._POOL[0].submit(blas_cpu.threads) for _ in range(4)]
        assert len(chip_cpu._POOL[0]._threads) == 2
        assert [w.result() for w in workers] == [1] * 4
        assert blas_cpu.threads() == 2
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("alignment", ["max_exponent", "max_exponent_unnormalized"])
def test_mixed_formats_transposed_are_the_definition_bitwise(alignment, monkeypatch):
    """A backward GEMM's operands in two formats (e4m3 A, e5m2 B), each with its own subnormal codes: transposed,
    B's format becomes A's (the unnormalized adder counts a subnormal at its own format's smallest normal
    exponent), and the bits are the definition's."""
    arith = GemmArith(in_format="fp8_e4m3", b_format="fp8_e5m2", chunk=32, acc_mantissa_bits=13,
                      acc_rounding="toward_zero", acc_alignment=alignment, out_format="bf16", overflow="saturate")
    gen = torch.Generator().manual_seed(13)
    for swap in (0, 1 << 30):
        monkeypatch.setattr(chip_cpu, "_SWAP_BELOW", swap)
        for shape_a, shape_b in SHAPES:
            a = torch.randn(*shape_a, generator=gen) * torch.exp2(torch.randint(-9, 4, shape_a, generator=gen).float())
            b = torch.randn(*shape_b, generator=gen) * torch.exp2(torch.randint(-17, 4, shape_b, generator=gen).float())
            ca, cb = F.quantize(a, "fp8_e4m3"), F.quantize(b, "fp8_e5m2")
            assert bool((ca.abs() < 2.0 ** -6).logical_and(ca != 0).any())       # e4m3 subnormals in A
            assert bool((cb.abs() < 2.0 ** -14).logical_and(cb != 0).any())      # e5m2 subnormals in B
            want = accumulate.accumulate(ca, cb, arith)
            assert _same_bits(chip_cpu.accumulate(ca, cb, arith), want), (swap, shape_a)
