"""Chip profiles in a model: the model's GEMMs (``F.linear``, ``matmul``/``@``, ``bmm``, attention's QK^T and PV)
computed with a chip's arithmetic (``accumulate.gemm``) forward and backward, softmax/silu/tanh-gelu with its
approximate exp and rsqrt with its table-and-Newton rsqrt (``transcendental``), as one TorchFunctionMode.

Backward: a covered GEMM ``y = a @ b`` is an autograd.Function whose backward computes ``grad_a = g @ b^T`` and
``grad_b = a^T @ g`` as chip GEMMs too (scales along each backward GEMM's own K; the gradient operand ``g`` in the
profile's ``grad_format``), where the profile is live when ``backward()`` runs (phase ``train_backward``, read as the
noise engine reads it: the installed injector's phase context at run time); elsewhere the backward is torch's own on
the clean operands, bitwise. The elementwise ops (softmax, silu, gelu, rsqrt) keep torch's gradient of the clean op
(straight-through): a chip's approximate exp changes values, and its backward kernels are not modelled here.

The mode composes with ``NoiseInjector``: installed outside it (entered first), each covered call made by the
injector's handler comes here, so noise models act on the chip's outputs (entered inside it, the chip would overwrite
the noise). A profile whose ``phases`` do not include the phase in force leaves every call untouched, bitwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.overrides import TorchFunctionMode

from . import formats, transcendental
from .accumulate import (DEFINITION, GemmArith, Paths, accumulate as accumulate_codes, b_arith,
                         gemm as _definition_gemm, quantize_codes)
from .fast import chip_cpu, dispatch, exp_cpu, quantize_cpu
from .attention import PARTS, decomposed_sdpa, sdpa_arguments
from .runtime import STATE
from .spec import PHASES

CHIP_OPS = ("linear", "matmul", "bmm", "softmax", "silu", "gelu", "rsqrt")
GEMM_OPS = ("linear", "matmul", "bmm")
EXP_OPS = ("softmax", "silu", "gelu")
_SPELLINGS = {F.linear: "linear", torch.matmul: "matmul", Tensor.matmul: "matmul", Tensor.__matmul__: "matmul",
              Tensor.__rmatmul__: "rmatmul", torch.bmm: "bmm", Tensor.bmm: "bmm", F.softmax: "softmax",
              torch.softmax: "softmax", Tensor.softmax: "softmax", F.silu: "silu", F.gelu: "gelu",
              torch.rsqrt: "rsqrt", Tensor.rsqrt: "rsqrt", F.scaled_dot_product_attention: "sdpa"}
# the compiled CPU loops for each stage of a chip GEMM, bitwise the definitions (noise/fast/*_cpu.py)
CPU_PATHS = Paths(quantize_cpu.quantize_codes, chip_cpu.accumulate, quantize_cpu.quantize_owned,
                  chip_cpu.accumulate_out, chip_cpu.gemm)
_ARITH_KEYS = tuple(f.name for f in dataclasses.fields(GemmArith) if f.name != "b_format")   # b_format: per GEMM
_PROFILE_KEYS = ("name", "ops", "phases", "provenance", "exp_degree", "grad_format", "rsqrt_table_bits",
                 "rsqrt_newton")


@dataclass(frozen=True)
class ChipProfile:
    """A named GEMM arithmetic and where it applies (``ops`` from ``CHIP_OPS``, ``phases`` from the noise engine's
    phases or ``all``). ``grad_format``: format of the incoming gradient in backward GEMMs (None: ``in_format``).
    ``exp_degree``: softmax, silu and tanh-gelu compute exp by ``transcendental.exp_poly`` of that degree (where
    ``ops`` names them; None: torch's exp). ``rsqrt_table_bits``/``rsqrt_newton``: rsqrt by
    ``transcendental.rsqrt_approx`` (where ``ops`` names it; None: torch's rsqrt)."""

    name: str
    arith: GemmArith
    ops: tuple = GEMM_OPS
    phases: tuple = ("all",)
    provenance: str = ""
    exp_degree: Optional[int] = None
    grad_format: Optional[str] = None
    rsqrt_table_bits: Optional[int] = None
    rsqrt_newton: int = 1

    def __post_init__(self) -> None:
        for key, values, valid in (("ops", self.ops, CHIP_OPS), ("phases", self.phases, PHASES + ("all",))):
            bad = [v for v in values if v not in valid]
            if bad or not values:
                raise ValueError(f"chip.{key}: {list(values)} is not valid; valid choices: {list(valid)}")
        if self.exp_degree is not None and not 1 <= int(self.exp_degree) <= 12:
            raise ValueError(f"chip.exp_degree must be null or in 1..12, got {self.exp_degree!r}")
        if self.grad_format is not None:
            formats.get(self.grad_format)
        if self.rsqrt_table_bits is not None:
            transcendental._check_rsqrt(self.rsqrt_table_bits, self.rsqrt_newton)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChipProfile":
        """From a ``chip`` config node (conf/chip/*.yaml) as a plain dict; unknown keys are refused by name."""
        known = set(_ARITH_KEYS) | set(_PROFILE_KEYS)
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"chip: unknown key(s) {bad}; valid keys: {sorted(known)}")
        arith = GemmArith(**{k: (str(v) if isinstance(v, str) else v) for k, v in d.items() if k in _ARITH_KEYS})
        grad = d.get("grad_format")
        return cls(name=str(d.get("name", "chip")), arith=arith, ops=tuple(str(o) for o in d.get("ops", GEMM_OPS)),
                   phases=tuple(str(p) for p in d.get("phases", ("all",))), provenance=str(d.get("provenance", "")),
                   exp_degree=d.get("exp_degree"), grad_format=None if grad is None else str(grad),
                   rsqrt_table_bits=d.get("rsqrt_table_bits"), rsqrt_newton=int(d.get("rsqrt_newton", 1)))

    def live(self, phase: Optional[str]) -> bool:
        """Whether the profile applies in ``phase`` (``all``: always, also outside any phase)."""
        return "all" in self.phases or phase in self.phases

    def backward_possible(self) -> bool:
        """Whether a backward could run under the chip: its phases name ``train_backward`` (or ``all``)."""
        return "all" in self.phases or "train_backward" in self.phases

    @property
    def grad_arith(self) -> GemmArith:
        """The arithmetic that quantizes a gradient operand: ``arith`` with ``grad_format`` as input format."""
        if self.grad_format is None:
            return self.arith
        return dataclasses.replace(self.arith, in_format=self.grad_format)


def _operands(op: str, args: tuple, kwargs: dict):
    """(a, b, bias) with ``a @ b`` the product, or None for calls this model does not cover (1-D operands,
    non-float tensors, unknown keywords)."""
    if op == "linear":
        names = ("input", "weight", "bias")
        if len(args) > 3 or any(k not in names for k in kwargs):
            return None
        x, w, b = (list(args) + [kwargs.get(n) for n in names[len(args):]])[:3]
        if not (isinstance(w, Tensor) and w.dim() == 2):
            return None
        a, bm, bias = x, w.t(), b
    else:
        if kwargs or len(args) != 2:
            return None
        a, bm = (args[1], args[0]) if op == "rmatmul" else args
        bias = None
    if not all(isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2 for t in (a, bm)):
        return None
    if a.shape[-1] == 1:    # an outer product sums nothing; RoPE's angle table is one, and chips build it in fp32
        return None
    return a, bm, bias


def _approx(op: str, args: tuple, kwargs: dict, profile: "ChipProfile"):
    """softmax / silu / gelu with the polynomial exp, rsqrt with the table-and-Newton one, or None for spellings
    (and settings) this model does not cover."""
    x = args[0] if args else kwargs.get("input")
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        return None
    if op == "rsqrt":
        if profile.rsqrt_table_bits is None or len(args) + len(kwargs) != 1:
            return None
        return transcendental.rsqrt_approx(x, int(profile.rsqrt_table_bits), int(profile.rsqrt_newton))
    if profile.exp_degree is None:
        return None
    degree = int(profile.exp_degree)
    exp = exp_cpu.exp_poly if x.device.type == "cpu" and dispatch.MODE != "off" else transcendental.exp_poly
    if op == "silu":
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return None if inplace else transcendental.silu(x, degree, exp)
    if op == "gelu":    # erf-gelu ('none') computes no exp: left to torch
        approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return transcendental.gelu_tanh(x, degree, exp) if approximate == "tanh" else None
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype = kwargs.get("dtype", args[3] if len(args) > 3 and not isinstance(args[3], int) else None)
    if len(args) == 3 and isinstance(args[2], torch.dtype):   # torch.softmax(x, dim, dtype)
        dtype = args[2]
    return None if dim is None else transcendental.softmax(x, dim, degree, dtype, exp)


def _clean(kind: str, a: Tensor, b: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The covered call as torch computes it, from its operands (``b`` transposed back for linear)."""
    if kind == "linear":
        return F.linear(a, b.t(), bias)
    return torch.bmm(a, b) if kind == "bmm" else torch.matmul(a, b)


class ChipGemm(torch.autograd.Function):
    """``a @ b (+ bias)`` with a given forward (``run``: the chip's values, or torch's where the forward is not live)
    and the chip's backward GEMMs where ``back.live()`` holds when the backward runs; torch's own backward elsewhere
    (recomputed on the clean operands, so bitwise torch's gradients)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, bias: Optional[Tensor], run: Callable[[], Tensor], back: "_Backward"):
        ctx.save_for_backward(a, b, bias)
        ctx.back = back
        return run()

    @staticmethod
    def backward(ctx, g: Tensor):
        a, b, bias = ctx.saved_tensors
        need_a, need_b, need_bias = ctx.needs_input_grad[:3]
        with torch._C.DisableTorchFunction():     # the backward's own ops are not the model's calls
            if not ctx.back.live():
                return (*_torch_grads(ctx.back.kind, a, b, bias, g, (need_a, need_b, need_bias)), None, None)
            ga, gb = chip_grads(a, b, g, ctx.back.profile, ctx.back.gen, need_a, need_b)
            gbias = g.reshape(-1, g.shape[-1]).sum(0).to(bias.dtype) if need_bias else None
        return ga, gb, gbias, None, None


class StraightThrough(torch.autograd.Function):
    """An elementwise op's chip values forward, torch's gradient of the op ``clean(x)`` backward, redone
    from ``x`` there (torch's own backward kernel on the same clean output, so the same bits): the forward keeps
    no clean output beside the chip's and makes no ``clean + (y - clean)`` passes (in a chip step with the
    polynomial exp those passes over the softmax and SiLU outputs cost more than the ops)."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Callable[[], Tensor], clean: Callable[[Tensor], Tensor]):
        ctx.save_for_backward(x)
        ctx.clean = clean
        return values()          # (not an argument: an argument returned would be a view, not writable in place)

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        with torch._C.DisableTorchFunction(), torch.enable_grad():   # the backward's own ops, not the model's calls
            leaf = x.detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(ctx.clean(leaf), leaf, g)
        return gx, None, None


@dataclass
class _Backward:
    kind: str                                  # linear | matmul | bmm: which torch call the clean backward redoes
    profile: ChipProfile
    live: Callable[[], bool]                   # read when backward runs: the phase in force then
    gen: Optional[torch.Generator]


def _torch_grads(kind: str, a: Tensor, b: Tensor, bias: Optional[Tensor], g: Tensor, needs: tuple) -> tuple:
    """Torch's gradients of the covered call: the call redone on detached copies and differentiated by autograd,
    so every kernel is the one plain torch's backward runs."""
    leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip((a, b, bias), needs)]
    with torch.enable_grad():
        y = _clean(kind, *leaves)
        wanted = [t for t, n in zip(leaves, needs) if n]
        got = iter(torch.autograd.grad(y, wanted, g))
    return tuple(next(got) if n else None for n in needs)


@functools.lru_cache(maxsize=None)
def _kernel():
    """The Triton chip GEMM modules (emulating, native FP8), imported once; None without Triton (the definition
    then runs)."""
    try:
        from .fast import chip_gemm, fp8_native
    except ImportError:
        return None
    return chip_gemm, fp8_native


def gemm(a: Tensor, b: Tensor, arith: GemmArith, gen: Optional[torch.Generator] = None,
         bias: Optional[Tensor] = None, qb=None) -> Tensor:
    """``accumulate.gemm``, on CUDA through a Triton kernel where one covers ``arith`` (engine switch ``fast`` not
    ``off``; fixed reduction order). First the GPU's own FP8 tensor core, where its adder is ``arith``'s
    (noise/fast/fp8_native.py) and ``native_verified`` found it so on this device: bitwise the definition. Else the
    emulating kernel (noise/fast/chip_gemm.py) on tensor-core chunks: it sums a chunk as the tensor core does, so it
    equals the definition except where a chunk's sum is not exact in float32 (then by at most an accumulator ulp of
    sum |a b|); the aligning adder's per-product cuts it computes exactly (tests/test_chip_gemm_cuda.py)."""
    kernels = _kernel() if a.is_cuda and dispatch.MODE != "off" else None
    if kernels is not None and (b.dim() == 2 or a.shape[:-2] == b.shape[:-2]):
        kernel, native = kernels
        if native.supported(arith, a.device) is None and _native_ready(arith, a.device):
            ca, inv_a = quantize_codes(a, arith, -1, gen)
            cb, inv_b = qb if isinstance(qb, tuple) else quantize_codes(b, b_arith(arith), -2, gen)
            big = ca.numel() // ca.shape[-1] * cb.shape[-1] >= 1 << 22
            return native.fp8_gemm(ca, cb, inv_a, inv_b, arith, bias,
                                   config=None if big else native.SMALL_CONFIG).float()
        if kernel.supported(arith) is None:
            ca, inv_a = quantize_codes(a, arith, -1, gen)
            cb, inv_b = qb if isinstance(qb, tuple) else quantize_codes(b, b_arith(arith), -2, gen)
            big = ca.numel() // ca.shape[-1] * cb.shape[-1] >= 1 << 22
            y = kernel.chip_gemm(ca, cb, inv_a, inv_b, arith, bias, config=None if big else kernel.small_config(arith))
            if y is not None:
                return y.float()
    return _definition_gemm(a, b, arith, gen, bias, qb=qb, paths=_paths(a))


def _paths(t: Tensor) -> Paths:
    """The compiled CPU paths for CPU tensors unless the engine's fast switch is off; the definitions otherwise."""
    return CPU_PATHS if t.device.type == "cpu" and dispatch.MODE != "off" else DEFINITION


_VERIFIED: dict = {}      # (A's format, B's format, device index) -> native_verified's answer


def _native_ready(arith: GemmArith, device: torch.device) -> bool:
    key = (arith.in_format, arith.b_format or arith.in_format, device.index or 0)
    if key not in _VERIFIED:
        if torch.cuda.is_current_stream_capturing():   # the check syncs: a graph captured first emulates
            return False
        _VERIFIED[key] = native_verified(*key)
    return _VERIFIED[key]


def native_verified(a_format: str, b_format: str, index: int) -> bool:
    """Whether CUDA device ``index``'s FP8 tensor core (``fp8_native``) equals the definition of the adder it is
    taken for (``max_exponent_unnormalized``) bitwise, on 64 x 1024 x 64 codes over the formats' whole range
    (subnormals, zeros, both signs), the definition on the CPU. ``gemm`` asks once per process and format pair; a
    GPU, driver or Triton whose tensor core sums otherwise keeps the emulating path, with a warning."""
    _, native = _kernel()
    arith = GemmArith(in_format=a_format, b_format=b_format, chunk=32, acc_mantissa_bits=13,
                      acc_rounding="toward_zero", acc_alignment="max_exponent_unnormalized", out_format="fp32",
                      overflow="saturate")
    gen = torch.Generator().manual_seed(0)

    def codes(shape, fmt):
        x = torch.randn(*shape, generator=gen) * torch.exp2(torch.randint(-16, 12, shape, generator=gen).float())
        return formats.quantize(x.masked_fill(torch.rand(*shape, generator=gen) < 0.05, 0.0), fmt)

    ca, cb = codes((64, 1024), a_format), codes((1024, 64), b_format)
    want = accumulate_codes(ca, cb, arith)
    dev = torch.device("cuda", index)
    got = native.fp8_gemm(ca.to(dev), cb.to(dev), None, None, arith, config=native.SMALL_CONFIG)
    same = bool(torch.equal(got.cpu(), want))
    if not same:
        warnings.warn(f"chip: the FP8 tensor core of {torch.cuda.get_device_name(dev)} ({a_format} x {b_format}) "
                      f"differs from the max_exponent_unnormalized adder's definition; the FP8 profiles emulate it")
    return same


def chip_grads(a: Tensor, b: Tensor, g: Tensor, profile: ChipProfile, gen: Optional[torch.Generator] = None,
               need_a: bool = True, need_b: bool = True) -> tuple:
    """The chip's gradients of ``y = a @ b`` (torch.matmul broadcasting, both operands >= 2-D) for the incoming
    gradient ``g``: ``grad_a = g @ b^T`` and ``grad_b = a^T @ g``, each ``accumulate.gemm`` with ``g`` quantized to
    the profile's ``grad_format`` (the other operand to ``in_format``), scales along that GEMM's own K. Where one
    operand is 2-D and the other batched, the batch is folded into K, as torch's matmul folds it (linear's weight
    gradient sums over all tokens in one GEMM); a broadcast batch dim is summed afterwards (plain sum), as torch does.
    Returns (grad_a, grad_b) in a's and b's dtypes (None where not needed)."""
    arith, garith = profile.arith, profile.grad_arith

    left = dataclasses.replace(garith, b_format=arith.in_format)   # B's own format, for adders that read it
    right = dataclasses.replace(arith, b_format=garith.in_format)

    def grad_left(lhs: Tensor, rhs: Tensor) -> Tensor:    # lhs is the gradient: rhs quantized as an input
        return gemm(lhs, rhs, left, gen, qb=_paths(rhs).quantize_codes(rhs, arith, -2, gen))

    def grad_right(lhs: Tensor, rhs: Tensor) -> Tensor:   # rhs is the gradient
        return gemm(lhs, rhs, right, gen, qb=_paths(rhs).quantize_codes(rhs, garith, -2, gen))

    ga = gb = None
    k, n = a.shape[-1], b.shape[-1]
    if need_a:
        if a.dim() == 2 and b.dim() > 2:       # fold b's batch into K: [M, batch*N] @ [batch*N, K]
            ga = grad_left(g.movedim(-2, 0).reshape(a.shape[0], -1), b.transpose(-1, -2).reshape(-1, k))
        else:
            ga = grad_left(g, b.transpose(-1, -2)).sum_to_size(a.shape)
        ga = ga.to(a.dtype)
    if need_b:
        if b.dim() == 2 and a.dim() > 2:       # fold a's batch into K (the tokens): [K, batch*M] @ [batch*M, N]
            gb = grad_right(a.reshape(-1, k).t(), g.reshape(-1, n))
        else:
            gb = grad_right(a.transpose(-1, -2), g).sum_to_size(b.shape)
        gb = gb.to(b.dtype)
    return ga, gb


def chip_call(func, op: str, args: tuple, kwargs: dict, profile: ChipProfile,
              gen: Optional[torch.Generator] = None, weights: Optional["WeightCodes"] = None,
              fwd_live: bool = True, bwd_live: Optional[Callable[[], bool]] = None):
    """One covered call under ``profile``. Elementwise ops: the chip's values where ``fwd_live``, torch's gradient
    (straight-through). GEMMs: the chip's values where ``fwd_live`` (else torch's), and, where ``bwd_live`` is
    given and a gradient is needed, ``ChipGemm``'s backward gated by it; else torch's gradient (straight-through).
    ``weights``: quantized linear weights reused across calls (``WeightCodes``), for deterministic input rounding
    only."""
    if op not in GEMM_OPS and op != "rmatmul":
        y = _approx(op, args, kwargs, profile) if fwd_live else None
        if y is None:
            return func(*args, **kwargs)
        x = args[0] if args else kwargs.get("input")
        if not (torch.is_grad_enabled() and x.requires_grad):
            return y                         # (in torch's dtype: _approx's results are)
        if args and y.dtype == x.dtype:
            return StraightThrough.apply(x, lambda: y, lambda t: func(t, *args[1:], **kwargs))
        clean = func(*args, **kwargs)
        y = y.to(clean.dtype)
        return clean + (y - clean).detach() if clean.requires_grad else y
    ab = _operands(op, args, kwargs)
    if ab is None:
        return func(*args, **kwargs)
    a, b, bias = ab
    kind = "matmul" if op == "rmatmul" else op
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (a, b, bias))

    def chip_values() -> Tensor:
        qb = None
        w = (args[1] if len(args) > 1 else kwargs.get("weight")) if op == "linear" else None
        if isinstance(w, torch.nn.Parameter) and weights is not None and profile.arith.in_rounding == "nearest":
            qb = weights.get(w, b, profile.arith)
        dtype = torch.promote_types(a.dtype, b.dtype)
        return gemm(a, b, profile.arith, gen, bias, qb=qb).to(dtype)

    if needs_grad and bwd_live is not None:
        run = chip_values if fwd_live else (lambda: func(*args, **kwargs))
        return ChipGemm.apply(a, b, bias, run, _Backward(kind, profile, bwd_live, gen))
    if not fwd_live:
        return func(*args, **kwargs)
    if needs_grad or a.dtype != b.dtype:
        clean = func(*args, **kwargs)            # torch's gradient (and its dtype checks)
        y = chip_values().to(clean.dtype)
        return clean + (y - clean).detach() if clean.requires_grad else y
    return chip_values()


def _phase_in_force() -> Optional[str]:
    owner = getattr(STATE, "owner", None)
    return owner.current_phase if owner is not None else STATE.effective_phase()


_ACTIVE: list = []        # ChipModes entered in this process, innermost last
_SUSPENDED = [0]          # > 0: every chip off (``suspended``)
_STEPS = [0]              # optimizer steps taken in this process (``WeightCodes``)


def _count_step(optimizer, args, kwargs) -> None:
    _STEPS[0] += 1


register_optimizer_step_post_hook(_count_step)


class WeightCodes:
    """Quantized linear weights, reused until the weight changes: an in-place update bumps the tensor's version
    counter, except a fused optimizer's (torch's fused AdamW, transformers' default on CUDA), so the cache is also
    emptied after every optimizer step of the process. An entry holds its weight, so its id is not reused."""

    def __init__(self):
        self.codes: dict = {}
        self.step = _STEPS[0]

    def get(self, w: Tensor, b: Tensor, arith: GemmArith) -> tuple:
        """(codes, inv) of ``b`` (``w`` as the GEMM's right operand) under ``arith``."""
        if self.step != _STEPS[0] or len(self.codes) > 4096:
            self.codes.clear()
            self.step = _STEPS[0]
        key = (id(w), w._version, w.data_ptr())
        if key not in self.codes:
            self.codes[key] = (w, _paths(b).quantize_codes(b, arith, -2))
        return self.codes[key][1]


@contextlib.contextmanager
def suspended():
    """Every chip off for the block: the reference arithmetic. A chip run's clean evaluation scores its checkpoint
    this way, so "clean" means the GPU's arithmetic (training harm), never the chip's (deployment harm)."""
    _SUSPENDED[0] += 1
    try:
        yield
    finally:
        _SUSPENDED[0] -= 1


def live_in(phase: str) -> bool:
    """Whether an entered chip applies in ``phase`` (and none is suspended)."""
    return not _SUSPENDED[0] and any(m.profile.live(phase) for m in _ACTIVE)


class ChipMode(TorchFunctionMode):
    """Runs the model's covered calls with ``profile``'s arithmetic while entered (this thread only). ``phase``: a
    callable naming the phase in force; default: the installed injector's phase context (held even when its noise
    is off), else the noise engine's (``runtime.STATE``). It is read at each forward call and again when a
    covered GEMM's backward runs (the trainer runs ``backward()`` in phase ``train_backward``)."""

    def __init__(self, profile: ChipProfile, seed: int = 0, phase: Optional[Callable[[], Optional[str]]] = None):
        super().__init__()
        self.profile = profile
        self.phase = phase or _phase_in_force
        self.seed = seed
        self.gens: dict = {}        # stochastic input rounding: one generator per device, seeded alike
        self.weights = WeightCodes()  # quantized linear weights (chip_call)

    def __enter__(self):
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        return super().__exit__(*exc)

    def _gen(self, t: Tensor) -> Optional[torch.Generator]:
        if self.profile.arith.in_rounding != "stochastic":
            return None
        if t.device not in self.gens:
            self.gens[t.device] = torch.Generator(device=t.device).manual_seed(self.seed)
        return self.gens[t.device]

    def _bwd_live(self) -> bool:
        return self.profile.live(self.phase())

    def _call(self, func, op: str, args: tuple, kwargs: dict, fwd_live: bool):
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        bwd = self._bwd_live if self.profile.backward_possible() else None
        return chip_call(func, op, args, kwargs, self.profile, None if first is None else self._gen(first),
                         self.weights, fwd_live, bwd)

    def _attention_covered(self) -> bool:
        ops = self.profile.ops
        return "matmul" in ops or ("softmax" in ops and self.profile.exp_degree is not None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _SPELLINGS.get(func)
        if op is None or "out" in kwargs or _SUSPENDED[0]:
            return func(*args, **kwargs)
        if op == "sdpa":
            if not self._attention_covered():
                return func(*args, **kwargs)
        elif (op if op != "rmatmul" else "matmul") not in self.profile.ops:
            return func(*args, **kwargs)
        fwd_live = self.profile.live(self.phase())
        gemm_op = op in GEMM_OPS or op in ("rmatmul", "sdpa")
        if not fwd_live and not (gemm_op and self.profile.backward_possible() and torch.is_grad_enabled()):
            return func(*args, **kwargs)
        if op == "sdpa":
            return decomposed_sdpa(lambda f, label, a, kw: self._part(f, label, a, kw, fwd_live),
                                   **sdpa_arguments(args, kwargs), group_queries=not torch.is_grad_enabled())
        return self._call(func, op, args, kwargs, fwd_live)

    def _part(self, func, label: str, args: tuple, kwargs: dict, fwd_live: bool):
        """One part of a decomposed SDPA call (attention.PARTS): QK^T and PV as the chip's matmul, the softmax as
        its approximate one, where the profile covers their op."""
        op = PARTS[label]
        if op not in self.profile.ops:
            return func(*args, **kwargs)
        return self._call(func, op, args, kwargs, fwd_live)
