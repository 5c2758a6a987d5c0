"""Fused elementwise noise kernel (Triton): one read, one write per element, counter-based Gaussian noise.

The noise for element ``e`` of a call with key ``k`` (written in NumPy in ``definition.reference_normals``):
  program p = e // BLOCK covers BLOCK elements as 8 contiguous slices of Q = BLOCK // 8; lane i of the program draws
  one Philox4x32 block (``ROUNDS`` rounds, key k, counter p*Q + i) = four 32-bit words; word j is split into two
  16-bit halves (lo, hi) that give one Box-Muller pair: radius sqrt(-2 ln((lo + 1/2) / 2^16)), angle
  2 pi (hi + 1/2) / 2^16 - pi; the pair's cosine and sine are the normals of slices 2j and 2j + 1.
Why this generator: with one Philox-10 call per element (``tl.randn``) the kernel is bound by integer
arithmetic, not memory; here one 7-round call feeds eight elements. Philox4x32-7 passes BigCrush (Salmon et al.,
SC'11; 10 rounds is their safety margin). 16-bit uniforms bound |n| at 4.85 (P(|N(0,1)| > 4.85) = 1.2e-6) and
shift the variance by < 1e-4 relative: immaterial for simulated arithmetic noise, and stated in the README.
On CUDA the logarithm, sine and cosine use the hardware approximations (|error| ~ 1e-6 on n).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

try:  # fast hardware math (lg2/sin/cos.approx); absent in Triton's CPU interpreter
    from triton.language.extra import libdevice as _libdevice
except ImportError:  # pragma: no cover - depends on the Triton build
    _libdevice = None

from .definition import BLOCK, Q, ROUNDS, SLICES, kernel_key, reference_normals  # noqa: F401  (the definition)

TELE_ELEMS = 4096   # telemetry sample: the first 4096 elements of a call (as the reference path samples)
KINDS = {"relative_gaussian": 0, "absolute_gaussian": 1, "systematic_bias": 2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_NUMEL = SLICES * (2 ** 31 - 1)   # Philox counters are int32, one per SLICES elements


@triton.jit
def _pair(word, FAST: tl.constexpr):
    """Box-Muller on the two 16-bit halves of a 32-bit word: two independent N(0, 1) values. FAST: 0 accurate
    log/sin/cos, 1 libdevice's fast versions, 2 the same hardware approximations as inline PTX."""
    lo = (word & 0xFFFF).to(tl.float32)
    hi = (word >> 16).to(tl.float32)
    u = (lo + 0.5) * (1.0 / 65536.0)
    th = (hi + 0.5) * (6.283185307179586 / 65536.0) - 3.141592653589793
    if FAST == 1:     # libdevice's fast (hardware-approximate) functions
        r = tl.sqrt(-2.0 * _libdevice.fast_logf(u))
        return r * _libdevice.fast_cosf(th), r * _libdevice.fast_sinf(th)
    elif FAST == 2:   # the same PTX instructions inline: for kernels Inductor re-emits (no module globals there)
        lg = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [u], dtype=tl.float32, is_pure=True, pack=1)
        r = tl.sqrt(-1.3862943611198906 * lg)   # -2 ln(u) = -2 ln(2) log2(u)
        c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [th], dtype=tl.float32, is_pure=True, pack=1)
        s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [th], dtype=tl.float32, is_pure=True, pack=1)
        return r * c, r * s
    else:
        r = tl.sqrt(-2.0 * tl.log(u))
        return r * tl.cos(th), r * tl.sin(th)


@triton.jit
def _load(x_ptr, offs, numel):
    return tl.load(x_ptr + offs, mask=offs < numel).to(tl.float32)


@triton.jit
def _store(y_ptr, tele_ptr, offs, numel, x, n, scale, KIND: tl.constexpr, TELE: tl.constexpr, is_first):
    m = offs < numel
    if KIND == 0:
        out = x + (scale * n) * x          # relative_gaussian: y (1 + s n)
    elif KIND == 1:
        out = x + scale * n                # absolute_gaussian: y + s n
    else:
        out = x * scale                    # systematic_bias: y (1 + s), the host passes 1 + s
    cast = out.to(y_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(y_ptr + offs, cast, mask=m)
    if TELE:
        if is_first:   # realized error on the call's first TELE_ELEMS elements (program 0, slices 0-3)
            d = tl.where(m, cast.to(tl.float32) - x, 0.0)
            tl.atomic_add(tele_ptr, tl.sum(d * d, axis=0))
            tl.atomic_add(tele_ptr + 1, tl.sum(tl.where(m, x * x, 0.0), axis=0))


@triton.jit
def _program(x_ptr, y_ptr, tele_ptr, pid, numel, key, scale, is_first,
             KIND: tl.constexpr, TELE: tl.constexpr, FAST: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr,
             SPLIT: tl.constexpr, part):
    """One program's BLOCK elements of one tensor (program ``pid`` of that tensor, Philox key ``key``), or, with
    SPLIT > 1, part ``part`` of its lanes (lanes [part * Q/SPLIT, (part + 1) * Q/SPLIT)): the same draws for the same
    elements, spread over more thread blocks. The eight slices are loaded before the draws and stores: ``x`` and
    ``y`` may be one buffer, so a load written after a store would wait for it."""
    QQ: tl.constexpr = BLOCK // 8
    LANES: tl.constexpr = QQ // SPLIT
    lane = part * LANES + tl.arange(0, LANES)
    offs = pid.to(tl.int64) * BLOCK + lane
    x0, x1 = _load(x_ptr, offs, numel), _load(x_ptr, offs + QQ, numel)
    x2, x3 = _load(x_ptr, offs + 2 * QQ, numel), _load(x_ptr, offs + 3 * QQ, numel)
    x4, x5 = _load(x_ptr, offs + 4 * QQ, numel), _load(x_ptr, offs + 5 * QQ, numel)
    x6, x7 = _load(x_ptr, offs + 6 * QQ, numel), _load(x_ptr, offs + 7 * QQ, numel)
    if KIND == 2:
        n0, n1, n2, n3, n4, n5, n6, n7 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    else:
        w0, w1, w2, w3 = tl.randint4x(key, pid * QQ + lane, ROUNDS)
        n0, n1 = _pair(w0, FAST)
        n2, n3 = _pair(w1, FAST)
        n4, n5 = _pair(w2, FAST)
        n6, n7 = _pair(w3, FAST)
    _store(y_ptr, tele_ptr, offs, numel, x0, n0, scale, KIND, TELE, is_first)
    _store(y_ptr, tele_ptr, offs + QQ, numel, x1, n1, scale, KIND, TELE, is_first)
    _store(y_ptr, tele_ptr, offs + 2 * QQ, numel, x2, n2, scale, KIND, TELE, is_first)
    _store(y_ptr, tele_ptr, offs + 3 * QQ, numel, x3, n3, scale, KIND, TELE, is_first)
    _store(y_ptr, tele_ptr, offs + 4 * QQ, numel, x4, n4, scale, KIND, False, is_first)
    _store(y_ptr, tele_ptr, offs + 5 * QQ, numel, x5, n5, scale, KIND, False, is_first)
    _store(y_ptr, tele_ptr, offs + 6 * QQ, numel, x6, n6, scale, KIND, False, is_first)
    _store(y_ptr, tele_ptr, offs + 7 * QQ, numel, x7, n7, scale, KIND, False, is_first)


@triton.jit
def _advance(ctr_ptr, done_ptr, v, nprog):
    """Graph capture: the last program to finish (ticket on ``done``) advances the device counter."""
    ticket = tl.atomic_add(done_ptr, 1, sem="acq_rel")
    last = ticket == nprog - 1
    tl.store(ctr_ptr, v + 1, mask=last)
    tl.store(done_ptr, 0, mask=last)


@triton.jit(do_not_specialize=["seed"])
def _noise_kernel(x_ptr, y_ptr, ctr_ptr, done_ptr, tele_ptr, numel, nprog, seed, scale,
                  KIND: tl.constexpr, USE_CTR: tl.constexpr, TELE: tl.constexpr, FAST: tl.constexpr,
                  ROUNDS: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """Program p covers elements [p*BLOCK, (p+1)*BLOCK) as 8 contiguous slices; Philox counter p*Q + i gives the
    eight normals of lane i, one per slice (so loads stay contiguous and vectorised). ``x_ptr`` may equal ``y_ptr``.

    USE_CTR (graph capture): the key also mixes in a device counter ``ctr``; the last program to finish (ticket on
    ``done``) advances it, so every replay of a captured graph draws fresh noise without host involvement.
    TELE: program 0 adds sum(err^2) and sum(y^2) over the first 4096 elements to ``tele_ptr[0:2]``.
    SPLIT programs share each BLOCK (part ``pid % SPLIT`` of its lanes): the same draws, more programs in flight.
    """
    pid = tl.program_id(0)
    key = seed
    if USE_CTR:
        v = tl.load(ctr_ptr)
        key = seed + v * 2654435761
    _program(x_ptr, y_ptr, tele_ptr, pid // SPLIT, numel, key, scale, pid // SPLIT == 0, KIND, TELE, FAST, ROUNDS,
             BLOCK, SPLIT, pid % SPLIT)
    if KIND != 2:
        if USE_CTR:
            _advance(ctr_ptr, done_ptr, v, nprog)


@triton.jit(do_not_specialize=["s0", "s1", "s2", "k0", "k1", "k2"])
def _noise_kernel3(x0, t0, n0, p0, s0, k0, x1, t1, n1, p1, s1, k1, x2, t2, n2, s2, k2, ctr_ptr, done_ptr, nprog, scale,
                   KIND: tl.constexpr, USE_CTR: tl.constexpr, TELE: tl.constexpr, FAST: tl.constexpr,
                   ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """Up to three tensors noised in place by one launch (a linear's input, weight and bias gradients): programs
    [0, p0) take tensor 0, [p0, p0 + p1) tensor 1, the rest tensor 2; each tensor draws exactly what a launch of
    ``_noise_kernel`` with its own seed would. ``k*``: 1 when that tensor's call is sampled for telemetry."""
    pid = tl.program_id(0)
    key0, key1, key2 = s0, s1, s2
    if USE_CTR:
        v = tl.load(ctr_ptr)
        key0, key1, key2 = s0 + v * 2654435761, s1 + v * 2654435761, s2 + v * 2654435761
    if pid < p0:
        _program(x0, x0, t0, pid, n0, key0, scale, (pid == 0) & (k0 != 0), KIND, TELE, FAST,
                 ROUNDS, BLOCK, 1, 0)
    elif pid < p0 + p1:
        q = pid - p0
        _program(x1, x1, t1, q, n1, key1, scale, (q == 0) & (k1 != 0), KIND, TELE, FAST, ROUNDS,
                 BLOCK, 1, 0)
    else:
        q = pid - p0 - p1
        _program(x2, x2, t2, q, n2, key2, scale, (q == 0) & (k2 != 0), KIND, TELE, FAST, ROUNDS,
                 BLOCK, 1, 0)
    if KIND != 2:
        if USE_CTR:
            _advance(ctr_ptr, done_ptr, v, nprog)


_COMPILED: dict = {}      # our specialization key -> Triton CompiledKernel (launched directly: see _direct)
_DIRECT = {"ok": None}   # None: not checked yet; False: direct launches disabled (mismatch or missing API)


@triton.jit
def _graph_noise_kernel(x_ptr, y_ptr, seed_ptr, scales_ptr, numel, KIND: tl.constexpr, SCALE_IDX: tl.constexpr,
                        FAST: tl.constexpr, ROUNDS: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """The same noise for compiled graphs: key and scale read from device scalars (an in-graph seed advanced per call,
    the engine's forward/backward scale), so Inductor launches it from generated code and CUDA graphs replay it.
    SPLIT thread blocks share each BLOCK of elements (same draws): decode-step tensors are a few BLOCKs."""
    pid = tl.program_id(0)
    key = (tl.load(seed_ptr) & 0x3FFFFFFFFFFFFFFF) | 0x4000000000000000
    scale = tl.load(scales_ptr + SCALE_IDX)
    _program(x_ptr, y_ptr, x_ptr, pid // SPLIT, numel, key, scale, pid == 0, KIND, False, FAST, ROUNDS, BLOCK,
             SPLIT, pid % SPLIT)


EAGER_SPLIT = 2   # eager launches of tensors of SMALL_NUMEL elements or more: programs per BLOCK (more programs in
                  # flight hide memory latency on large in-place tensors; benchmarks/kernel_bandwidth.py)
SMALL_SPLIT = 8   # thread blocks per BLOCK for tensors under SMALL_NUMEL elements (128 lanes each, one per thread)
SMALL_NUMEL = 1 << 20


def graph_split(numel: int) -> int:
    """Thread blocks per BLOCK of elements: several for small tensors (decode steps: 64 x 1536 is 12 BLOCKs, which
    would keep 12 of 132 SMs busy with 8 Philox calls a thread), one for large ones (bandwidth-bound)."""
    return SMALL_SPLIT if numel < SMALL_NUMEL else 1


def _define_graph_noise():
    """``noisebench::graph_noise(x, seed, scales, kind, scale_idx)``: a ``torch.library.triton_op``, which Inductor
    calls straight from its generated code (no Python per call), unlike an opaque custom op."""
    from torch.library import triton_op, wrap_triton

    @triton_op("noisebench::graph_noise", mutates_args=())
    def graph_noise(x: Tensor, seed: Tensor, scales: Tensor, kind: int, scale_idx: int) -> Tensor:
        xc = x.contiguous()
        out = torch.empty_like(xc)
        n = xc.numel()
        if n:
            split = graph_split(n)
            wrap_triton(_graph_noise_kernel)[(split * ((n + BLOCK - 1) // BLOCK),)](
                xc, out, seed, scales, n, KIND=kind, SCALE_IDX=scale_idx,
                FAST=2 if xc.device.type == "cuda" else 0, ROUNDS=ROUNDS, BLOCK=BLOCK, SPLIT=split, num_warps=4)
        return out
    return graph_noise


try:
    graph_noise = _define_graph_noise()
except Exception:  # pragma: no cover - torch without triton_op: compiled graphs use Inductor's randn instead
    graph_noise = None


def _spec_key(args: tuple, consts: tuple, device_index: int) -> tuple:
    """Everything Triton 3.x specializes a launch on (argument dtypes, 16-byte pointer alignment, integers equal to 1
    or divisible by 16, 32- vs 64-bit integers), plus the constexprs and the device: a superset, so one key never
    maps to two different compiled kernels."""
    key = [device_index, consts]
    for a in args:
        if isinstance(a, Tensor):
            key.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, int):
            key.append((a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31))
    return tuple(key)


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)   # the raw handle, no Stream object (~3 us less)


def _direct(kernel, nprog: int, args: tuple, consts: tuple, device: torch.device) -> None:
    """Launch an already compiled kernel without Triton's Python launcher (binding and specialization cost ~20 us a
    call, a large share of a noisy call's host time). Same call the launcher makes (Triton 3.x)."""
    stream = _raw_stream(device.index)
    kernel.run(nprog, 1, 1, stream, kernel.function, kernel.packed_metadata, None, None, None, *args, *consts)


def _check_direct(device: torch.device) -> bool:
    """Once per process: a direct launch must give bitwise the launcher's result, else direct launches stay off."""
    try:
        x = torch.linspace(-3, 3, 3 * BLOCK + 5, device=device)
        ctr = torch.zeros(1, dtype=torch.int64, device=device)
        done = torch.zeros(1, dtype=torch.int32, device=device)
        a, b = torch.empty_like(x), torch.empty_like(x)
        nprog = triton.cdiv(x.numel(), BLOCK)
        consts = (0, False, False, _fast_math(device), ROUNDS, BLOCK, 1)
        kern = _noise_kernel[(nprog,)](x, a, ctr, done, ctr, x.numel(), nprog, kernel_key(11), 0.5, *consts,
                                       num_warps=4)
        _direct(kern, nprog, (x, b, ctr, done, ctr, x.numel(), nprog, kernel_key(11), 0.5), consts, device)
        return bool(torch.equal(a, b))
    except Exception:  # pragma: no cover - depends on the Triton version
        return False


try:
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - Triton before 3.4 has no knobs (and no launch hooks to honour here)
    _knobs = None


def _launch_hooks() -> bool:
    """Whether a launch hook is registered (a profiler that wants each launch's metadata): then launches go through
    Triton's launcher, which calls them. Triton 3.6 keeps the hooks as chains, present and empty by default, so an
    empty chain counts as no hook (a test for None alone would turn direct launches off for good)."""
    if _knobs is None:
        return False
    rt = _knobs.runtime
    return any(h is not None and bool(getattr(h, "calls", True)) for h in (rt.launch_enter_hook, rt.launch_exit_hook))


def _fast_math(device: torch.device) -> int:
    """The kernels' FAST constexpr for eager launches: libdevice's hardware approximations on CUDA."""
    return int(device.type == "cuda" and _libdevice is not None)


def _run(kernel, nprog: int, args: tuple, consts: tuple, dev: torch.device) -> None:
    """Launch ``kernel`` over ``nprog`` programs: directly when this specialization was compiled before (and direct
    launches passed their check), else through Triton's launcher, caching what it compiled."""
    direct = dev.type == "cuda" and dev.index == torch.cuda.current_device() and not _launch_hooks()
    if direct:
        if _DIRECT["ok"] is None:
            _DIRECT["ok"] = _check_direct(dev)
        direct = _DIRECT["ok"]
    if direct:
        spec = (id(kernel),) + _spec_key(args, consts, dev.index)   # module-level kernels: ids never reused
        kern = _COMPILED.get(spec)
        if kern is not None:
            _direct(kern, nprog, args, consts, dev)
            return
    kern = kernel[(nprog,)](*args, *consts, num_warps=4)
    if direct:
        _COMPILED[spec] = kern


def launch(x: Tensor, kind: str, scale: float, seed: int, ctr: Tensor, done: Tensor, use_ctr: bool,
           out: Tensor = None, tele: Tensor = None) -> Tensor:
    """Noisy copy of ``x`` (same shape and dtype). ``out``: where to write (``x`` itself for in-place; must then be
    contiguous); default a new contiguous tensor. ``seed``: the call's 63-bit key; ``ctr``/``done``: one-element
    int64/int32 device tensors, read and advanced only when ``use_ctr`` (inside a CUDA graph capture); ``tele``:
    a float32 [2] device tensor to add the telemetry sums to (None: no telemetry)."""
    xc = x if x.is_contiguous() else x.contiguous()
    if out is None:
        out = torch.empty_like(xc, memory_format=torch.contiguous_format)
    n = xc.numel()
    if n == 0:
        return out
    split = EAGER_SPLIT if n >= SMALL_NUMEL else 1
    nprog = split * ((n + BLOCK - 1) // BLOCK)
    arg = 1.0 + float(scale) if kind == "systematic_bias" else float(scale)
    dev = xc.device
    args = (xc, out, ctr, done, tele if tele is not None else ctr, n, nprog, kernel_key(seed), arg)
    consts = (KINDS[kind], bool(use_ctr), tele is not None, _fast_math(dev), ROUNDS, BLOCK, split)
    _run(_noise_kernel, nprog, args, consts, dev)
    return out


def launch_many(xs: list, kind: str, scale: float, seeds: list, ctr: Tensor, done: Tensor, use_ctr: bool,
                teles: list) -> None:
    """Noise up to three contiguous tensors in place with one launch (each as ``launch`` would with its seed);
    ``teles[i]``: the float32 [2] accumulator of tensor i, or None when that call is not sampled."""
    assert 1 <= len(xs) <= 3 and all(x.is_contiguous() for x in xs)
    dev = xs[0].device
    segs = []
    for i in range(3):
        if i < len(xs) and xs[i].numel():
            x, n = xs[i], xs[i].numel()
            t = teles[i] if teles[i] is not None else ctr
            segs.append((x, t, n, (n + BLOCK - 1) // BLOCK, kernel_key(seeds[i]), int(teles[i] is not None)))
        else:
            segs.append(None)
    live = [g for g in segs if g is not None]
    if not live:
        return
    filler = live[0]
    segs = [g if g is not None else (filler[0], filler[1], 0, 0, kernel_key(0), 0) for g in segs]
    nprog = sum(g[3] for g in segs)
    args = (*segs[0], *segs[1], *(segs[2][:3] + segs[2][4:]), ctr, done, nprog,
            1.0 + float(scale) if kind == "systematic_bias" else float(scale))
    consts = (KINDS[kind], bool(use_ctr), any(t is not None for t in teles), _fast_math(dev), ROUNDS, BLOCK)
    _run(_noise_kernel3, nprog, args, consts, dev)
