"""The fused kernel's side of the engine: whether it may take a tensor (mode, Triton, device, dtype), its launches,
and the device counters that keep CUDA-graph replays fresh. Which path a call takes is decided in
``runtime.NoiseState.path``."""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

MODES = ("auto", "off", "force")
FAST_KINDS = frozenset(("relative_gaussian", "absolute_gaussian", "systematic_bias"))
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

MODE = "auto"            # set by set_mode (noisebench.noise.configure_engine)
_KERNELS = None          # the kernels module once imported; False when Triton is missing
_COUNTERS: Dict[torch.device, Tuple[Tensor, Tensor]] = {}


def set_mode(mode: str) -> None:
    """``auto``: fast path on CUDA when Triton is there (and the chip's compiled CPU GEMM, ``chip_cpu``, on the
    CPU); ``off``: always the reference path (and the chip's torch definition); ``force``: also on CPU
    tensors when Triton runs its interpreter (``TRITON_INTERPRET=1``; slow, for tests)."""
    global MODE
    if mode not in MODES:
        raise ValueError(f"fast-path mode {mode!r} unknown; valid choices: {list(MODES)}")
    MODE = mode


def kernels():
    """The Triton kernels module, or None when Triton cannot be imported (then everything takes the reference path)."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import kernels as k
            _KERNELS = k
        except ImportError:
            _KERNELS = False
    return _KERNELS or None


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def device_ok(device: torch.device) -> bool:
    """Whether the fast path may run on ``device`` under the current mode."""
    if MODE == "off":
        return False
    if device.type == "cuda":
        return kernels() is not None
    return MODE == "force" and device.type == "cpu" and interpreting() and kernels() is not None


def kind_covered(spec) -> bool:
    """Whether the fused kernel implements ``spec``'s noise model at all."""
    return spec.type in FAST_KINDS and not (spec.type == "systematic_bias" and spec.per_channel)


def tensor_ok(t: Tensor) -> bool:
    """Whether the fused kernel may take ``t`` (dtype, size, device under the current mode)."""
    return t.dtype in _DTYPES and t.numel() < 8 * (2 ** 31 - 1) and device_ok(t.device)


def covers(spec, t: Tensor) -> bool:
    """True when the fused kernel implements ``spec``'s model for ``t``; anything else takes the reference path."""
    return kind_covered(spec) and tensor_ok(t)


def capturing(t: Tensor) -> bool:
    """Whether ``t``'s device stream is being captured into a CUDA graph (host code will not run on replay)."""
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _norm(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def counters(device: torch.device) -> Tuple[Tensor, Tensor]:
    """(ctr int64[2], done int32[2]) on ``device``: slot 0 forward, slot 1 backward. Allocated once and only ever
    changed in place, so pointers baked into captured graphs stay valid."""
    device = _norm(device)
    got = _COUNTERS.get(device)
    if got is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("noisebench fast path: first noise call on this device happens inside a CUDA graph "
                               "capture; run one step outside capture first (torch.compile's cudagraphs does)")
        got = _COUNTERS[device] = (torch.zeros(2, dtype=torch.int64, device=device),
                                   torch.zeros(2, dtype=torch.int32, device=device))
        ctr, done = got
        _SLOTS[device] = {"fwd": (ctr[0:1], done[0:1]), "bwd": (ctr[1:2], done[1:2])}
    return got


_SLOTS: Dict[torch.device, dict] = {}   # device -> direction -> (ctr, done) one-element views (made once)


def _slots(device: torch.device) -> dict:
    """The direction -> (ctr, done) views of ``device`` (also under its unnormalised spelling, e.g. ``cuda``)."""
    slots = _SLOTS.get(device)
    if slots is None:
        counters(device)
        slots = _SLOTS.setdefault(device, _SLOTS[_norm(device)])
    return slots


def reset_counters() -> None:
    """Zero the graph-replay counters in place (on install), so captured noise is reproducible from a fixed seed."""
    for ctr, done in _COUNTERS.values():
        ctr.zero_()
        done.zero_()


def perturb(t: Tensor, kind: str, scale: float, seed: int, direction: str, capture: bool, inplace: bool = False,
            tele: Optional[Tensor] = None) -> Tensor:
    """Apply ``kind`` to ``t`` with the fused kernel. ``seed``: the call's key from the engine's counters (the same
    key the reference path would seed its generator with); ``capture``: mix in the device counter of ``direction``;
    ``inplace``: write into ``t`` when it is contiguous; ``tele``: float32 [2] accumulator for sampled telemetry."""
    ctr, done = _slots(t.device)[direction]
    return kernels().launch(t, kind, scale, seed, ctr, done, capture, out=t if inplace and t.is_contiguous() else None,
                            tele=tele)


def perturb_many(ts: list, kind: str, scale: float, seeds: list, direction: str, teles: list) -> None:
    """In-place ``perturb`` of up to three contiguous tensors on one device, one kernel launch."""
    capture = capturing(ts[0])
    if len(ts) == 1:
        perturb(ts[0], kind, scale, seeds[0], direction, capture, inplace=True, tele=teles[0])
        return
    ctr, done = _slots(ts[0].device)[direction]
    kernels().launch_many(ts, kind, scale, seeds, ctr, done, capture, teles)


def state() -> Dict[str, list]:
    """Device counters as lists (for logs; a sync)."""
    return {str(d): c[0].tolist() for d, c in _COUNTERS.items()}
