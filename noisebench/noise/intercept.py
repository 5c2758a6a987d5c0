"""Op interception: a TorchFunctionMode that routes covered ops through opaque noise ops, forward and backward.

Design: the mode decides at call (= trace) time whether an op is noised in this phase;
forward noise is the opaque custom op ``noisebench::fwd`` on the op output (straight-through gradient); backward
noise is an identity autograd.Function on each differentiable input whose backward calls the opaque op
``noisebench::bwd`` on the gradient. Both opaque ops read ``runtime.STATE`` when they execute, so under
``torch.compile`` the backward sees the phase in force when ``backward()`` runs, without recompiles.
In eager code the same noise function is called directly (a custom-op call costs ~50-90 us on CPU), so eager and
compiled runs draw from the same stream in the same way.
"""
from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import attention
from .fast import inline as fast_inline
from .runtime import STATE


def _spellings() -> list:
    """Every public spelling of each covered op, as ``(owner, attribute, op name)``. Aten overloads (what compiled
    code calls) are absent on purpose: they must not be noised a second time."""
    T, nnF = torch.Tensor, F
    table = {
        "linear": [(nnF, "linear")],
        "matmul": [(torch, "matmul"), (T, "matmul"), (T, "__matmul__"), (T, "__rmatmul__")],
        "mm": [(torch, "mm"), (T, "mm")],
        "bmm": [(torch, "bmm"), (T, "bmm")],
        "addmm": [(torch, "addmm"), (T, "addmm")],
        "baddbmm": [(torch, "baddbmm"), (T, "baddbmm")],
        "einsum": [(torch, "einsum")],
        "sdpa": [(nnF, "scaled_dot_product_attention")],
        "softmax": [(nnF, "softmax"), (torch, "softmax"), (T, "softmax"), (torch.special, "softmax")],
        "silu": [(nnF, "silu")],
        "gelu": [(nnF, "gelu")],
        "layer_norm": [(nnF, "layer_norm"), (torch, "layer_norm")],
        "rms_norm": [(nnF, "rms_norm")] + ([(torch, "rms_norm")] if hasattr(torch, "rms_norm") else []),
    }
    return [(owner, name, op) for op, spots in table.items() for owner, name in spots]


SPELLINGS = _spellings()


def _op_table() -> dict:
    """Every public spelling of each covered op (the function objects, as the mode sees them) -> op name."""
    return {getattr(owner, name): op for owner, name, op in SPELLINGS}


FUNC_OPS = _op_table()


def _define_noise_op(direction: str):
    """The opaque op ``noisebench::<direction>``: reads the process state when it runs, so under compile the phase,
    scale and counters in force at run time decide (fwd: noise on an op output; bwd: noise on a gradient, applied only
    if the phase in force now is train_backward/global)."""
    @torch.library.custom_op(f"noisebench::{direction}", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
    def noise_op(t: Tensor, op: str) -> Tensor:
        return STATE.perturb(t, op, direction)

    noise_op.register_fake(lambda t, op: torch.empty_like(t))
    return noise_op


fwd_noise = _define_noise_op("fwd")
bwd_noise = _define_noise_op("bwd")


def _fwd_backward(ctx, g):
    return g, None  # straight-through: the noise is a measurement error, not part of the function


fwd_noise.register_autograd(_fwd_backward, setup_context=lambda ctx, inputs, output: None)


class MarkForBackward(torch.autograd.Function):
    """Identity in forward; in backward, the gradient of this input passes through ``noisebench::bwd``."""

    @staticmethod
    def forward(ctx, x: Tensor, op: str) -> Tensor:
        ctx.op = op
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        return backward_noise(g, ctx.op), None


class _StraightThrough(torch.autograd.Function):
    """Eager twin of ``noisebench::fwd`` for outputs that need a gradient (the custom op costs ~80 us a call)."""

    @staticmethod
    def forward(ctx, y: Tensor, op: str) -> Tensor:
        return STATE.perturb(y, op, "fwd")

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def backward_noise(g: Tensor, op: str) -> Tensor:
    """Backward noise on a gradient met in backward (a mark's backward, a norm weight's hook): a direct call in eager
    code; in compiled code the opaque op on either compiled path, since an inline backward draw needs the seed its
    forward took (``inline.InlineMark``)."""
    if STATE.path(g) in ("inline", "graph_op"):
        return torch.ops.noisebench.bwd(g, op)
    return STATE.perturb(g, op, "bwd")


def mark(x, op: str):
    """Mark ``x`` (a tensor, or a list/tuple of tensors) for backward noise if it needs a gradient."""
    if isinstance(x, Tensor):
        if not (x.requires_grad and x.is_floating_point()):
            return x
        if STATE.path(x) == "inline":
            return fast_inline.mark(x, STATE.spec)
        return MarkForBackward.apply(x, op)
    if isinstance(x, (list, tuple)):
        return type(x)(mark(v, op) for v in x)
    return x


# Ops whose autograd node does not save its own output: forward noise may overwrite the output in place (the fast
# path's raw kernel write, or the reference path's write through a detached alias on CPU float32, bypasses autograd,
# so the gradient is straight-through with no Python node).
# softmax and sdpa save their outputs; norms are left out (their saved tensors vary across torch versions).
OUTPUT_UNSAVED = frozenset(("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "silu", "gelu",
                            "attn_qk", "attn_pv"))


def noise_output(y, op: str):
    """Forward noise on an op result (tensors only). Compiled code gets the opaque op; eager code overwrites the
    output in place when the op does not save it and the engine can write into it (``STATE.writes_in_place``), else
    calls the noise directly (no_grad, e.g. rollouts) or through a straight-through autograd.Function: same draws,
    same results."""
    if not (isinstance(y, Tensor) and y.is_floating_point()):
        return y
    path = STATE.path(y)
    if path == "inline":
        return fast_inline.noise(y, STATE.spec)
    if path == "graph_op":
        return torch.ops.noisebench.fwd(y, op)
    if op in OUTPUT_UNSAVED and STATE.writes_in_place(y):
        return STATE.perturb(y, op, "fwd", inplace=True)
    if y.requires_grad:
        return _StraightThrough.apply(y, op)
    return STATE.perturb(y, op, "fwd")


class NoisyLinear(torch.autograd.Function):
    """Eager ``F.linear`` with forward and backward noise in one autograd node (per-input marks plus a
    straight-through node would cost four Python nodes a call). Backward computes the input, weight and bias gradients
    with the formulas of torch's own linear backward (``g @ W``, ``g^T x``, ``sum g``; bitwise the same values)
    and noises each one the op returns, as ``MarkForBackward`` would."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b, fwd: bool) -> Tensor:
        y = F.linear(x, w, b)
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return noise_output(y, "linear") if fwd else y

    @staticmethod
    def backward(ctx, g: Tensor):
        with torch._C.DisableTorchFunction():   # no mode dispatch for the ops below, wherever backward runs
            return NoisyLinear._grads(ctx, g)

    @staticmethod
    def _grads(ctx, g: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        live = STATE.bwd_live()
        gx = gw = gb = None
        g2 = g.reshape(-1, g.shape[-1])
        if need_x:
            gx = torch.mm(g2, w).view(x.shape)
        if need_w:
            gw = torch.mm(g2.t(), x.reshape(-1, x.shape[-1]))
        if need_b and ctx.has_bias:
            gb = g2.sum(0)
        if live:   # one launch for all three on the fast path
            grads = [t for t in (gx, gw, gb) if t is not None]
            noisy = iter(STATE.perturb_many(grads, "linear", "bwd"))
            gx, gw, gb = (next(noisy) if t is not None else None for t in (gx, gw, gb))
        return gx, gw, gb, None


def _autocast(xwb):
    """``(x, w, b)`` cast as autocast would cast a linear's arguments (to the autocast dtype, recorded by autograd),
    when autocast is on for their device: ``NoisyLinear.backward`` runs outside autocast, where a bf16 gradient
    times a float32 weight would be a dtype error (mixed-precision training with float32 master weights)."""
    dev = xwb[0].device.type
    if not torch.is_autocast_enabled(dev):
        return xwb
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in xwb)


def _linear_args(args, kwargs):
    """(input, weight, bias) of an ``F.linear`` call, or None for spellings this fast route does not take."""
    names = ("input", "weight", "bias")
    if len(args) > 3 or any(k not in names for k in kwargs):
        return None
    vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
    x, w, b = vals
    ok = all(isinstance(v, Tensor) and v.is_floating_point() for v in (x, w)) and (b is None or isinstance(b, Tensor))
    return (x, w, b) if ok and w.dim() == 2 and x.dim() >= 1 else None


class NoiseMode(TorchFunctionMode):
    """Routes covered ops through the noise ops. Uncovered ops, ``out=`` calls and in-place spellings pass through
    untouched; when the phase is off the cost is one dict lookup and a set test."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = FUNC_OPS.get(func)
        if op is None or "out" in kwargs:
            return func(*args, **kwargs)
        return route(func, op, args, kwargs)


def route(func, op: str, args: tuple, kwargs: dict):
    """One covered call: decide forward and backward noise for the phase in force, then run it (the mode's and the
    patches' common body)."""
    st = STATE
    fwd = op in st.fwd_ops
    inplace = kwargs.get("inplace", False) or (op == "silu" and len(args) > 1 and args[1] is True)
    bwd = op in st.bwd_ops and torch.is_grad_enabled() and not inplace
    if (fwd or bwd) and st.blocked():
        fwd = bwd = False
    if op == "sdpa" and not (fwd or bwd) and _attention_parts_live(st):
        return attention.decomposed_sdpa(route, **attention.sdpa_arguments(args, kwargs))
    if bwd and op == "linear" and not torch.compiler.is_compiling():
        xwb = _linear_args(args, kwargs)
        if xwb is not None:
            return NoisyLinear.apply(*_autocast(xwb), fwd)
    if bwd:
        args = tuple(mark(a, op) for a in args)
        kwargs = {k: mark(v, op) for k, v in kwargs.items()}
    out = func(*args, **kwargs)
    return noise_output(out, op) if fwd else out


_ATTENTION_PARTS = frozenset(attention.PARTS)


def _attention_parts_live(st) -> bool:
    """Whether a part of attention (``attention.PARTS``) is noised in this call's forward, or its inputs marked for a
    backward that may be noisy: only then is an SDPA call decomposed (otherwise it runs fused, untouched)."""
    live = (_ATTENTION_PARTS & st.fwd_ops) or (torch.is_grad_enabled() and _ATTENTION_PARTS & st.bwd_ops)
    return bool(live) and not st.blocked()


# -- Interception by patching ------------------------------------------------------------------------------------
INTERCEPTS = ("mode", "patch")
"""``mode``: a TorchFunctionMode sees every torch call of the installing thread (eager and compiled code, names bound
at import included), at a Python cost on every call: ~2-4 ms a step on a 4-layer Qwen2.5-1.5B stack, which an eager
step pays whenever its forward is host-bound. ``patch``: the covered spellings themselves (``SPELLINGS``) are replaced
by wrappers while installed, so only covered calls run Python; for eager code only (Dynamo traces ``@`` and Tensor
methods without looking at patched attributes: compiling under it raises), and code that bound a covered function by
name before install (``from torch.nn.functional import linear``) is not seen."""

_BUSY = [0]          # > 0 while a wrapper handles a call: covered calls made inside it (by the op itself or by the
                     # engine) pass through, as calls inside the mode's handler do
_OWNER = [None]      # the installing thread: others pass through (the mode is thread-local too)


def _wrap(func, op: str):
    @functools.wraps(func)
    def patched(*args, **kwargs):
        if (_BUSY[0] or threading.get_ident() != _OWNER[0] or "out" in kwargs
                or not torch._C._is_torch_function_enabled()):
            return func(*args, **kwargs)
        if torch.compiler.is_compiling():
            raise RuntimeError(_COMPILE_ERROR)
        _BUSY[0] += 1
        try:
            return route(func, op, args, kwargs)
        finally:
            _BUSY[0] -= 1
    return patched


_COMPILE_ERROR = ("noisebench: NoiseInjector(intercept='patch') intercepts eager code only and cannot noise code that "
                  "torch.compile traces; use intercept='mode' (the default) for compiled models")


def _refuse_compile(*args, **kwargs) -> None:
    raise RuntimeError(_COMPILE_ERROR)


class Patches:
    """Install / remove the wrappers of ``SPELLINGS`` (``intercept="patch"``); removing restores every attribute
    exactly (inherited Tensor methods are deleted again, not shadowed). While installed, a compilation raises."""

    def __init__(self) -> None:
        self._saved: list = []

    def __enter__(self) -> "Patches":
        _OWNER[0] = threading.get_ident()
        for owner, name, op in SPELLINGS:
            own = vars(owner).get(name, _MISSING) if isinstance(owner, type) else getattr(owner, name)
            self._saved.append((owner, name, own))
            setattr(owner, name, _wrap(getattr(owner, name), op))
        _callbacks().register_start_callback(_refuse_compile)
        return self

    def __exit__(self, *exc) -> None:
        _callbacks().remove_start_callback(_refuse_compile)
        for owner, name, own in reversed(self._saved):
            if own is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
        self._saved = []
        _OWNER[0] = None


_MISSING = object()


def _callbacks():
    from torch._dynamo.callback import callback_handler
    return callback_handler
