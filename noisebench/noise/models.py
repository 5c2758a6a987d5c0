"""Noise models: pure functions of a tensor (and a generator); math in float32, result cast back to the input dtype."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import formats
from .fast import table as _table

ROUND_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _randn(y: Tensor, gen: torch.Generator) -> Tensor:
    """float32 N(0, 1) of ``y``'s shape, for the caller to consume at once: on CPU the result may be a per-thread
    scratch buffer (icdf16) or a view of the shared table, which later calls overwrite or reuse."""
    # CPU randn is single-threaded (~3.5 ns an element on this project's CPUs) and dominates Gaussian noise cost;
    # not split over Python threads: they lose to MKL's worker threads, which keep spinning right after a matmul.
    if y.device.type == "cpu" and _table.name() != "randn":  # cheaper CPU generators (fast/table.py)
        if _table.name() == "icdf16":
            return _table.icdf16(y.shape, gen.initial_seed(), scratch=True)
        n = _table.normals(y.shape, gen.initial_seed())
        if n is not None:
            return n
    return torch.randn(y.shape, generator=gen, device=y.device, dtype=torch.float32)


def _back(out: Tensor, y: Tensor) -> Tensor:
    return out if out.dtype == y.dtype else out.to(y.dtype)


def writable(y: Tensor, inplace: bool) -> bool:
    """Whether the result may be written into ``y`` itself: asked for, float32 (the math's dtype) and contiguous."""
    return inplace and y.dtype == torch.float32 and y.is_contiguous()


_set_versions = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)


def _hidden_write(y: Tensor, write) -> Tensor:
    """``write(alias)`` into ``y``'s storage through a detached alias, keeping ``y``'s version counter: the in-place
    write is the noise's, not part of the function, and callers only pass tensors nothing has saved yet. A bumped
    version would make autograd rebuild a view output's node as AsStridedBackward (a zero-filled base-sized gradient
    and a copy per backward call)."""
    version = y._version
    write(y.detach())
    if _set_versions is not None and y._version != version:
        _set_versions((y,), (version,))
    return y


def relative_gaussian(y: Tensor, scale: float, gen: torch.Generator, inplace: bool = False) -> Tensor:
    """``y * (1 + scale * n)``, n ~ N(0, 1) i.i.d. per element (the study's model).

    One randn and one fused ``addcmul`` (``y + scale * y * n``); mixed-dtype inputs are promoted to float32
    element-wise, so bf16 outputs are perturbed in float32 and rounded once on the way back. ``inplace``: write into
    ``y``'s storage when it is float32 and contiguous, through a detached alias (no autograd record: the caller owns
    that choice), and return ``y`` itself; same values.
    """
    if writable(y, inplace):
        return _hidden_write(y, lambda d: d.addcmul_(d, _randn(y, gen), value=scale))
    return _back(torch.addcmul(y, y, _randn(y, gen), value=scale), y)


def absolute_gaussian(y: Tensor, scale: float, gen: torch.Generator, inplace: bool = False) -> Tensor:
    """``y + scale * n``, n ~ N(0, 1): an error independent of the value's size (fixed-point / analog noise).
    ``inplace`` as in ``relative_gaussian``."""
    if writable(y, inplace):
        return _hidden_write(y, lambda d: d.add_(_randn(y, gen), alpha=scale))
    return _back(torch.add(y, _randn(y, gen), alpha=scale), y)


def systematic_bias(y: Tensor, scale: float, channel_bias: Optional[Tensor] = None) -> Tensor:
    """``y * (1 + scale)``; with ``channel_bias`` b (shape [C], last dim): ``y * (1 + b_c)``.

    Deterministic: a chip whose multiplier is off by a fixed relative amount, globally or per output lane.
    """
    if channel_bias is None:
        return (y.float() * (1.0 + scale)).to(y.dtype)
    return (y.float() * (1.0 + channel_bias)).to(y.dtype)


def channel_bias(channels: int, scale: float, seed: int, device) -> Tensor:
    """The per-channel relative bias ``scale * z_c``, z_c ~ N(0, 1), drawn once from ``seed`` (CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(channels, generator=g, dtype=torch.float32)).to(device)


def bit_range(dtype: torch.dtype, bits: str) -> Tuple[int, int]:
    """Half-open range of bit positions (LSB = 0) of ``bits`` (mantissa|exponent|sign|all) in ``dtype``."""
    fi = torch.finfo(dtype)
    mant = int(round(-math.log2(fi.eps)))
    width = fi.bits
    ranges = {"mantissa": (0, mant), "exponent": (mant, width - 1), "sign": (width - 1, width), "all": (0, width)}
    return ranges[bits]


def bitflip(y: Tensor, p: float, bits: str, gen: torch.Generator) -> Tuple[Tensor, int]:
    """Each element, with probability ``p``, gets one bit of its stored representation flipped (silent data
    corruption). The bit is uniform over ``bits`` of ``y``'s own dtype (bf16 flips bf16 bits, not float32 ones).

    Sparse draw: k ~ Binomial(n, p) positions, then a bit per position, so cost is one copy plus O(k).
    Returns the corrupted tensor and the number of elements flipped.
    """
    out = y.contiguous().clone() if p > 0 else y.clone()
    n = out.numel()
    if p <= 0 or n == 0:
        return out, 0
    dev = out.device
    k = int(torch.binomial(torch.tensor(float(n), dtype=torch.float64, device=dev),
                           torch.tensor(float(p), dtype=torch.float64, device=dev), generator=gen).item())
    if k == 0:
        return out, 0
    pos = torch.randperm(n, generator=gen, device=dev)[:k] if k > n // 64 else \
        torch.unique(torch.randint(n, (k,), generator=gen, device=dev))
    lo, hi = bit_range(y.dtype, bits)
    ity = _INT_VIEW[y.element_size()]
    bit = torch.randint(lo, hi, (pos.numel(),), generator=gen, device=dev, dtype=ity)
    iv = out.view(-1).view(ity)
    iv[pos] = torch.bitwise_xor(iv[pos], torch.bitwise_left_shift(torch.ones_like(bit), bit))
    return out, int(pos.numel())


def round_format(y: Tensor, fmt: str, mode: str, gen: Optional[torch.Generator] = None) -> Tensor:
    """Emulate storing ``y`` in ``fmt`` (bf16, fp16, fp8_e4m3, fp8_e5m2) and reading it back.

    ``nearest``: torch's own cast (round-to-nearest-even) of the clamped value below.
    ``stochastic``: ``formats.quantize``: round up with probability equal to the dropped fraction of an ulp (ulp
    the format's spacing at y, subnormal spacing below the smallest normal), decided by comparing an integer of
    ``formats.SR_BITS`` random bits with that fraction, so E[result] = y exactly (a float32 ``u`` added to
    ``y / ulp`` would itself be rounded and round up too often).
    FP8 values beyond the format's largest finite value saturate to it, as hardware conversions with ``satfinite``
    do, on every device: torch's own cast saturates on CPU but gives NaN on CUDA, which would make one spec two
    physics. bf16/fp16 overflow to inf, as IEEE casts do.
    """
    dt = ROUND_DTYPES[fmt]
    if mode == "stochastic":
        overflow = "saturate" if fmt.startswith("fp8") else "inf"
        return formats.quantize(y, fmt, "stochastic", overflow, gen).to(y.dtype)
    if fmt.startswith("fp8"):
        lim = torch.finfo(dt).max
        y = y.clamp(-lim, lim)
    return y.to(dt).to(y.dtype)
