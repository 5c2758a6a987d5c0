"""Noise as graph ops in compiled code: Inductor fuses it into neighbouring kernels, CUDA graphs replay it.

Why: in a decode step the opaque noise op is one extra kernel per noised op (a few us each, ~200 per token for a
28-layer model), which costs more than the noise. Here the noise is ``y (1 + s n)`` written with a keyed normal
draw, ``noisebench::keyed_randn(seed, size)``, whose seed is a device scalar advanced in the graph itself
(``seed.add_(1)`` per call), so every replay of a captured graph draws fresh noise and the global RNG is never used.
Under Inductor the draw is lowered to one fused op: on CUDA inline PTX (``PHILOX7_ASM``: the fast kernel's Philox-7
generator by flat index, ``definition.reference_normals_flat``), elsewhere Inductor's own Philox
(``prims.inductor_random``, ``tl.randn``); under other backends (aot_eager) it runs eagerly from a private generator
seeded by the seed's value.
Training graphs use the same draw: forward noise is ``y + (noisy(y) - y).detach()`` (straight-through
gradient), and backward noise is ``InlineMark``, an identity whose backward is ``g (1 + b n)`` with ``b`` a device
scalar that the engine sets to the scale when the phase in force is train_backward (or global) and to 0 otherwise,
at every phase change: so the backward phase is still read at run time, by the GPU, with no host work per op, and
0 leaves gradients bitwise clean. The forward scale is a device scalar too (``inj.spec.scale`` changes apply at the
next phase change without recompiling). Telemetry is not recorded on this path (host code does not run per op).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import dispatch

INLINE_KINDS = ("relative_gaussian", "absolute_gaussian")
MODES = ("auto", "kernel", "fused", "off")
MODE = "auto"   # set by set_mode (noisebench.noise.configure_engine)


def set_mode(mode: str) -> None:
    """How compiled graphs draw the noise: ``auto`` (per tensor, see ``_use_kernel``), ``kernel``, ``fused``, or
    ``off`` (compiled graphs call the opaque op, which runs the eager engine)."""
    global MODE
    if mode not in MODES:
        raise ValueError(f"compiled-noise mode {mode!r} unknown; valid choices: {list(MODES)}")
    MODE = mode


KERNEL_MIN_NUMEL = 1 << 20   # ``auto``: smaller tensors always take the fused draw (see ``_use_kernel``)


def _use_kernel(t: Tensor, training: bool = False) -> bool:
    """How a compiled graph draws the noise of ``t`` (decided at trace time from its static size). ``kernel``: on
    CUDA the fused Triton kernel called from the graph (``kernels.graph_noise``: Philox4x32-7, 8 normals a call, one
    read and one write: an extra pass and an extra launch); ``fused``: the draw as a graph op that Inductor fuses
    into the neighbouring kernels (no launch, no pass): on CUDA ``PHILOX7_ASM`` (one Philox-7 call per four
    elements), else Inductor's own ``randn`` (one Philox4x32-10 call per element: compute-bound at training sizes);
    ``auto`` (default): ``fused`` for tensors under ``KERNEL_MIN_NUMEL`` elements (decode steps, where an extra launch
    costs more than the draw) and, where the PTX draw serves, in ``training`` graphs (one Philox-7 call per four
    elements inside kernels that run anyway costs less device time than the kernel's extra pass); the kernel for the
    other large tensors (in a decode step, the lm_head's logits, whose draw would dominate the kernel it is fused
    into). CPU tensors (forced fast path) always use ``fused``."""
    if MODE == "fused" or t.device.type != "cuda":
        return False
    if MODE == "auto" and (t.numel() < KERNEL_MIN_NUMEL or
                           (training and FUSED_DRAW == "philox7" and t.numel() < PHILOX7_MAX_NUMEL)):
        return False
    k = dispatch._KERNELS   # imported on install, outside any compiled region
    return bool(k) and k.graph_noise is not None


SEEDS: Dict[str, Tensor] = {}   # device type -> 0-d int64 seed (static address; changed only in place)
SCALES: Dict[str, Tensor] = {}  # device type -> float32 [2]: forward scale, backward scale (0 when not live)
_BWD_OFFSET = 1 << 40           # backward draws use seed + 2**40: never the key of a forward draw
_LAST_SCALES: list = [None]
_KIND = {"relative_gaussian": 0, "absolute_gaussian": 1}
_MASK = (1 << 62) - 1


@torch.library.custom_op("noisebench::keyed_randn", mutates_args=())
def keyed_randn(seed: Tensor, size: List[int]) -> Tensor:
    """Standard normals of shape ``size`` (float32, on ``seed``'s device) determined by the value of ``seed``."""
    g = torch.Generator(device=seed.device).manual_seed(int(seed.item()) & _MASK)
    return torch.randn(size, generator=g, device=seed.device, dtype=torch.float32)


@keyed_randn.register_fake
def _keyed_randn_fake(seed: Tensor, size: List[int]) -> Tensor:
    return torch.empty(size, device=seed.device, dtype=torch.float32)


# The compiled route's draw as one PTX block of Inductor's ``inline_asm_elementwise``, four elements an instance
# (``pack=4``): definition.reference_normals_flat, i.e. element e takes Philox4x32-7 block e >> 3 (key
# ``kernel_key(seed)``), word (e >> 1) & 3, and the cosine (e even) or sine (e odd) of that word's 16-bit Box-Muller
# pair, with the hardware lg2/sqrt/cos/sin approximations. When the four elements of an instance are e0..e0+3 with
# e0 % 4 == 0 (Triton's usual layout: a thread holds runs of 4 or 8 contiguous elements) they share one Philox call
# (one call for four normals, against Inductor's ``tl.randn``: a Philox-10 call plus accurate log and cosine per
# element); any other grouping takes the slow branch, one call per element, with the same result.
_ROUND = ("mul.hi.u32 h0, c0, 0xD2511F53; mul.lo.u32 l0, c0, 0xD2511F53; mul.hi.u32 h1, c2, 0xCD9E8D57; "
          "mul.lo.u32 l1, c2, 0xCD9E8D57; xor.b32 c0, h1, c1; xor.b32 c0, c0, k0; mov.b32 c1, l1; "
          "xor.b32 c2, h0, c3; xor.b32 c2, c2, k1; mov.b32 c3, l0; add.u32 k0, k0, 0x9E3779B9; "
          "add.u32 k1, k1, 0xBB67AE85; ")


def _philox(e: str) -> str:
    """PTX: c0..c3 = Philox4x32-7 of block ``e`` >> 3 under the key (kk0, kk1)."""
    return (f"mov.b32 k0, kk0; mov.b32 k1, kk1; shr.u32 c0, {e}, 3; mov.b32 c1, 0; mov.b32 c2, 0; mov.b32 c3, 0; "
            + _ROUND * 7)


def _box_muller(w: str, cos_out: str, sin_out: str) -> str:
    """PTX: the Box-Muller pair of word ``w``'s 16-bit halves (lo: radius, hi: angle), as in definition.py."""
    return (f"and.b32 t, {w}, 0xFFFF; cvt.rn.f32.u32 u, t; fma.rn.f32 u, u, 0f37800000, 0f37000000; "
            f"shr.u32 t, {w}, 16; cvt.rn.f32.u32 th, t; fma.rn.f32 th, th, 0f38C90FDB, 0fC0490F12; "
            "lg2.approx.f32 lg, u; mul.f32 lg, lg, 0fBFB17218; sqrt.approx.f32 r, lg; "
            f"cos.approx.f32 cs, th; sin.approx.f32 sn, th; mul.f32 {cos_out}, r, cs; mul.f32 {sin_out}, r, sn; ")


def _one(k: int) -> str:
    """PTX (slow branch): output $k from element $(8+k) alone."""
    e = f"${8 + k}"
    return (_philox(e) + f"shr.u32 t, {e}, 1; and.b32 t, t, 1; setp.ne.u32 b0, t, 0; "
            f"shr.u32 t, {e}, 2; and.b32 t, t, 1; setp.ne.u32 b1, t, 0; "
            "selp.b32 w, c1, c0, b0; selp.b32 t, c3, c2, b0; selp.b32 w, t, w, b1; "
            + _box_muller("w", "nc", "ns") + f"and.b32 t, {e}, 1; setp.ne.u32 b0, t, 0; selp.f32 ${k}, ns, nc, b0; ")


PHILOX7_ASM = (
    "{ .reg .b32 kk0, kk1, k0, k1, c0, c1, c2, c3, h0, l0, h1, l1, t, w, v; "
    ".reg .f32 u, th, lg, r, cs, sn, nc, ns; .reg .pred p, b0, b1; "
    "mov.b64 {kk0, kk1}, $4; and.b32 kk1, kk1, 0x3FFFFFFF; or.b32 kk1, kk1, 0x40000000; "
    "and.b32 t, $8, 3; setp.eq.u32 p, t, 0; add.u32 t, $8, 1; setp.eq.and.u32 p, t, $9, p; "
    "add.u32 t, $8, 2; setp.eq.and.u32 p, t, $10, p; add.u32 t, $8, 3; setp.eq.and.u32 p, t, $11, p; "
    "@!p bra NB_SLOW; "
    + _philox("$8") +
    "and.b32 t, $8, 4; setp.ne.u32 b1, t, 0; selp.b32 w, c2, c0, b1; selp.b32 v, c3, c1, b1; "
    + _box_muller("w", "$0", "$1") + _box_muller("v", "$2", "$3") +
    "bra.uni NB_DONE; NB_SLOW: "
    + "".join(_one(k) for k in range(4)) +
    "NB_DONE: }"
)
PHILOX7_CONSTRAINTS = "=r,=r,=r,=r,l,l,l,l,r,r,r,r"
PHILOX7_MAX_NUMEL = 2 ** 31   # the element index travels as int32


def _register_inductor_lowering() -> str:
    """Let Inductor fuse the keyed draw into the kernels around it (private API). On CUDA the draw is
    ``PHILOX7_ASM`` (Inductor's ``inline_asm_elementwise``): ``definition.reference_normals_flat``, the fused
    kernel's generator laid out by flat index. Elsewhere (CPU, or a torch whose Triton backend lacks inline
    asm) Inductor's own Philox (``prims.inductor_random``). Returns which: "philox7" (CUDA) / "inductor" / "" (the
    draw stays an extern op)."""
    try:
        from torch._inductor import ir
        from torch._inductor.codegen.triton import TritonOverrides
        from torch._inductor.lowering import lowerings, register_lowering
        from torch._inductor.virtualized import ops
        inductor_random = lowerings[torch.ops.prims.inductor_random.default]
    except Exception:  # pragma: no cover - depends on torch internals
        return _register_inductor_decomp()
    asm = hasattr(TritonOverrides, "inline_asm_elementwise") and not torch.version.hip

    @register_lowering(torch.ops.noisebench.keyed_randn.default, type_promotion_kind=None)
    def _lower(seed, size):
        size = [int(v) for v in size]
        device = seed.get_device()
        if not (asm and device is not None and device.type == "cuda" and math.prod(size) < PHILOX7_MAX_NUMEL):
            return inductor_random(size, seed, "randn")
        flat = ir.FixedLayout(device, torch.float32, size, ir.FlexibleLayout.contiguous_strides(size)).make_indexer()
        seed_loader = seed.make_loader()

        def inner_fn(index):
            return ops.inline_asm_elementwise(seed_loader([]), ops.index_expr(flat(index), torch.int32),
                                              asm=PHILOX7_ASM, constraints=PHILOX7_CONSTRAINTS,
                                              dtype=torch.float32, is_pure=True, pack=4)
        out = ir.Pointwise.create(device=device, dtype=torch.float32, inner_fn=inner_fn, ranges=size)
        out.realize()   # as Inductor's own random ops: computed once, fused into its consumer
        return out
    return "philox7" if asm else "inductor"


def _register_inductor_decomp() -> str:
    """Fallback: decompose the keyed draw into Inductor's fused Philox (``prims.inductor_random``)."""
    try:
        from torch._inductor.decomposition import register_decomposition

        @register_decomposition([torch.ops.noisebench.keyed_randn.default])
        def _decomp(seed, size):
            return torch.ops.prims.inductor_random(list(size), seed, "randn")
        return "inductor"
    except Exception:  # pragma: no cover - depends on torch internals
        return ""


FUSED_DRAW = _register_inductor_lowering()
FUSABLE = bool(FUSED_DRAW)


def draw(seed: Tensor, shape) -> Tensor:
    """The fused route's standard normals for a tensor of ``shape``, keyed by the device scalar ``seed`` (a module
    function so that benchmarks can swap the draw for a diagnostic before compiling: ``rollout_throughput --draws``)."""
    return torch.ops.noisebench.keyed_randn(seed, list(shape))


def reset(seed: Optional[int]) -> None:
    """Create (once) and set in place the seed scalars of the CPU and the current CUDA device."""
    value = (int(seed or 0) & _MASK)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for typ in devices:
        t = SEEDS.get(typ)
        if t is None:
            dev = torch.device("cuda", torch.cuda.current_device()) if typ == "cuda" else torch.device("cpu")
            t = SEEDS[typ] = torch.zeros((), dtype=torch.int64, device=dev)
            torch._dynamo.mark_static_address(t)
            SCALES[typ] = torch.zeros(2, dtype=torch.float32, device=dev)
            torch._dynamo.mark_static_address(SCALES[typ])
            _LAST_SCALES[0] = None
        t.fill_(value)


def set_scales(fwd: float, bwd: float) -> None:
    """Set the device scale scalars read by compiled graphs (called by the engine at every phase change; a fill
    kernel only when a value changes)."""
    if not SCALES or _LAST_SCALES[0] == (fwd, bwd):
        return
    _LAST_SCALES[0] = (fwd, bwd)
    for typ, t in SCALES.items():
        if typ == "cuda" or dispatch.MODE == "force":
            d = t.data        # its own version counter: graphs that saved ``t`` for backward stay valid
            d[0].fill_(fwd)   # fills, not a host-to-device copy: no stream synchronisation
            d[1].fill_(bwd)


def applicable(y: Tensor, spec) -> bool:
    """Trace-time test: compiled, a Gaussian model, a float tensor on a device with a seed scalar (CUDA, or CPU when
    the fast path is forced)."""
    if MODE == "off" or dispatch.MODE == "off":
        return False
    if spec is None or spec.type not in INLINE_KINDS or y.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    s = SEEDS.get(y.device.type)
    if s is None or s.device != y.device:
        return False
    return y.device.type == "cuda" or dispatch.MODE == "force"


def _noisy(y: Tensor, n: Tensor, scale: Tensor, relative: bool) -> Tensor:
    yf = y.float()
    return (yf + (scale * n) * yf if relative else yf + scale * n).to(y.dtype)


ST_FUNCTION = True
"""Forward noise drawn by the graph kernel in a graph that needs gradients: one autograd.Function with an identity
backward (True), or ``y + (noisy - y).detach()`` (False: its consumers read ``y`` and the noisy copy, half an extra
pass per noised tensor; kept for A/B benchmarks)."""


class KernelNoise(torch.autograd.Function):
    """Forward noise from the graph kernel with a straight-through gradient, as one op in the graph."""

    @staticmethod
    def forward(ctx, y: Tensor, seed: Tensor, scales: Tensor, kind: int) -> Tensor:
        return torch.ops.noisebench.graph_noise(y, seed, scales, kind, 0).view(y.shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None, None, None


def noise(y: Tensor, spec) -> Tensor:
    """``y (1 + s n)`` or ``y + s n`` in float32, cast back; n from the device seed, advanced once per call. With
    grad enabled the gradient is straight-through (the noise is a measurement error, not part of the function)."""
    typ = y.device.type
    s = SEEDS[typ]
    s.add_(1)
    grad = torch.is_grad_enabled() and y.requires_grad
    if _use_kernel(y, grad):
        if grad and ST_FUNCTION:
            return KernelNoise.apply(y, s, SCALES[typ], _KIND[spec.type])
        out = torch.ops.noisebench.graph_noise(y.detach(), s, SCALES[typ], _KIND[spec.type], 0).view(y.shape)
    else:
        n = draw(s, y.shape)
        out = _noisy(y, n, SCALES[typ][0], spec.type == "relative_gaussian")
    return y + (out - y).detach() if grad else out


class InlineMark(torch.autograd.Function):
    """Identity in forward; in backward the gradient gets ``g (1 + b n)`` (relative) or ``g + b n`` (absolute) with
    ``b`` = ``SCALES[..][1]`` read when backward runs and ``n`` keyed by the seed this call took in forward."""

    @staticmethod
    def forward(ctx, x: Tensor, seed: Tensor, scales: Tensor, relative: bool) -> Tensor:
        ctx.save_for_backward(seed, scales)
        ctx.relative = relative
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        seed, scales = ctx.saved_tensors
        if _use_kernel(g, True):
            out = torch.ops.noisebench.graph_noise(g, seed, scales, 0 if ctx.relative else 1, 1).view(g.shape)
            return out, None, None, None
        n = draw(seed, g.shape)
        return _noisy(g, n, scales[1], ctx.relative), None, None, None


def mark(x: Tensor, spec) -> Tensor:
    """Backward noise for ``x`` in a compiled training graph (see ``InlineMark``); takes one seed per call."""
    typ = x.device.type
    s = SEEDS[typ]
    s.add_(1)
    return InlineMark.apply(x, s + _BWD_OFFSET, SCALES[typ], spec.type == "relative_gaussian")
