"""Number formats as pure functions: rounding a tensor onto a floating-point grid (bf16, fp16, fp8, OCP MX element
formats, an accumulator of any mantissa width), with per-tensor, per-block or MX (E8M0 shared exponent) scales.

The engine owns the physics: the grid, the rounding and what happens past the largest finite value are computed
here, never inherited from torch's casts (torch 2.11's CUDA cast to e4m3 gives NaN for |x| >= 464 where its CPU cast
saturates at 448). The math runs in float64, where every step is exact for float32 and narrower inputs: |x| / ulp
is a power-of-two scaling, ``floor``/``round`` (half to even) act on an exact value, and the result times ulp is
exact again. So the result is the same on every device and torch version. Names follow the OCP Microscaling
Formats (MX) v1.0 specification and microsoft/microxcaling (``emax``, ``mbits`` without the implicit bit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

ROUNDINGS = ("nearest", "stochastic", "toward_zero")
OVERFLOWS = ("saturate", "inf")      # past max: clamp to it (``satfinite``), or +-inf (NaN in formats without inf)
SCALINGS = ("none", "tensor", "block", "mx")
AMAX_EPS = 1e-12                    # smallest amax a tensor/block scale divides by (torchao float8's EPS)
SR_BITS = 52                         # random bits per stochastic rounding: P(up) = ceil(f * 2**52) / 2**52, exactly f
                                     # whenever the dropped fraction f has <= 52 bits (float32 inputs, normal range)


@dataclass(frozen=True)
class Format:
    """A binary floating-point grid: ``mbits`` stored mantissa bits, smallest normal exponent ``emin`` (subnormals
    below it, spaced ``2**(emin - mbits)``), largest finite value ``max``, and whether the format encodes infinity."""

    name: str
    ebits: int
    mbits: int
    emin: int
    max: float
    has_inf: bool

    @property
    def emax(self) -> int:
        """Exponent of the largest normal binade (OCP MX's ``emax_elem``)."""
        return math.floor(math.log2(self.max))

    @property
    def bias(self) -> int:
        return 1 - self.emin


FORMATS = {f.name: f for f in (
    Format("fp32", 8, 23, -126, float(torch.finfo(torch.float32).max), True),
    Format("bf16", 8, 7, -126, float(torch.finfo(torch.bfloat16).max), True),
    Format("fp16", 5, 10, -14, 65504.0, True),
    Format("fp8_e4m3", 4, 3, -6, 448.0, False),        # OCP FP8 E4M3: S.1111.111 is NaN, no inf
    Format("fp8_e5m2", 5, 2, -14, 57344.0, True),      # OCP FP8 E5M2: IEEE-style inf and NaN
    Format("fp6_e3m2", 3, 2, -2, 28.0, False),         # OCP MX FP6: no inf, no NaN
    Format("fp6_e2m3", 2, 3, 0, 7.5, False),
    Format("fp4_e2m1", 2, 1, 0, 6.0, False),           # OCP MX FP4: 0, 0.5, 1, 1.5, 2, 3, 4, 6
)}
MX_FORMATS = {"mxfp8_e4m3": "fp8_e4m3", "mxfp8_e5m2": "fp8_e5m2", "mxfp6_e3m2": "fp6_e3m2",
              "mxfp6_e2m3": "fp6_e2m3", "mxfp4_e2m1": "fp4_e2m1"}
MX_BLOCK = 32                        # OCP MX v1.0: k = 32 elements share one scale
_TWO52 = 2.0 ** 52
E8M0_EMAX = 127                      # E8M0 scale exponents -127..127; code 0xFF is NaN


def get(fmt) -> Format:
    """A ``Format`` from itself or its name; a clear error naming the valid choices otherwise."""
    if isinstance(fmt, Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown number format {fmt!r}; valid choices: {sorted(FORMATS)}")
    return FORMATS[fmt]


def _check(name: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; valid choices: {list(valid)}")


def pow2(k: Tensor) -> Tensor:
    """2**k in float64, built from its bits (exact; ``torch.ldexp`` computes 2**k in the default float dtype)."""
    return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)


def _ldexp(a: Tensor, k: Tensor) -> Tensor:
    """a * 2**k, exact for float64 ``a`` while the result stays a float64 normal (|k| <= 1022 here)."""
    return a * pow2(k)


def _out_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def quantize(x: Tensor, fmt, rounding: str = "nearest", overflow: str = "saturate",
             gen: Optional[torch.Generator] = None, bits: Optional[Tensor] = None) -> Tensor:
    """``x`` rounded onto ``fmt``'s grid (values, not codes), in float32 (float64 inputs stay float64).

    rounding: ``nearest`` (ties to even), ``toward_zero`` (truncation), ``stochastic`` (round up with probability
    equal to the dropped fraction of an ulp: an integer of ``SR_BITS`` random bits is compared with the fraction
    scaled by ``2**SR_BITS``, both exact in float64, so nothing rounds the random number itself).
    overflow: what a result beyond ``fmt.max`` becomes: ``saturate`` (+-max, as ``cvt.satfinite``; infinities too)
    or ``inf`` (+-inf where the format has it, NaN where it has none, as e4m3's S.1111.111). NaN stays NaN.
    A value rounds past max only if its rounded magnitude exceeds max: under nearest-even e4m3 maps 464 to 448.
    bits: the stochastic draw supplied (int64 in [0, 2**SR_BITS), ``x``'s shape), e.g. drawn on one device and used
    on another, so that devices can be compared on the same draw; ``gen`` is then unused.
    """
    f = get(fmt)
    _check("rounding", rounding, ROUNDINGS)
    _check("overflow", overflow, OVERFLOWS)
    if rounding != "stochastic" and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        if f.ebits == 8:
            return _quantize_e8(x.detach().float(), f, rounding, overflow)
        return _quantize_f32(x.detach().float(), f, rounding, overflow)
    xd = x.detach().to(torch.float64)
    a = xd.abs()
    # log2 of the grid spacing at a: floor(log2 a) from the float64 exponent field, clamped below at emin (0 too)
    # and above at 1023, so that inf times 2**-step stays inf
    step = (a.view(torch.int64) >> 52).clamp_(f.emin + 1023, 2046).sub_(1023 + f.mbits)
    t = _ldexp(a, -step)                                # exact: a power-of-two scaling; t < 2**(mbits + 1)
    if rounding == "nearest":    # half to even: adding 2**52 leaves no fraction bits (t < 2**52: exact; inf and
        q = (t + _TWO52) - _TWO52                        # NaN pass through); torch.round is slower
    elif rounding == "toward_zero":
        q = torch.floor(t)
    else:
        q = torch.floor(t)
        r = bits.to(t.device) if bits is not None else \
            torch.randint(0, 2 ** SR_BITS, t.shape, generator=gen, device=t.device, dtype=torch.int64)
        q = q + (r.to(torch.float64) < (t - q) * 2.0 ** SR_BITS).to(q.dtype)
    v = _ldexp(q, step)                                 # NaN stays NaN through every step
    if overflow == "saturate":
        v = v.clamp_max_(f.max)
    else:
        v = torch.where(v > f.max, torch.full_like(v, math.inf if f.has_inf else math.nan), v)
    return torch.copysign(v, xd).to(_out_dtype(x))


def _quantize_e8(x: Tensor, f: Format, rounding: str, overflow: str) -> Tensor:
    """``quantize`` for a format with float32's exponent range (bf16, fp32) on float32 ``x``, by integer operations
    on its bit pattern (the same values, several times faster): below the kept mantissa bits, nearest-even adds
    half an ulp less one plus the kept LSB and masks, toward zero masks; a carry moves into the exponent as rounding
    up into the next binade (or to inf past max) does, subnormals included. NaN stays NaN; saturate maps inf
    (rounded or given) to +-max."""
    drop = 23 - f.mbits
    iv = x.view(torch.int32)
    if drop:
        if rounding == "nearest":
            iv = iv + (((iv >> drop) & 1) + ((1 << (drop - 1)) - 1))
        iv = iv & ~((1 << drop) - 1)
    v = iv.view(torch.float32)
    v = torch.where(torch.isnan(x), x, v)
    if overflow == "saturate":
        v = torch.where(torch.isinf(v), torch.copysign(torch.full_like(v, f.max), x), v)
    return v


def _quantize_f32(x: Tensor, f: Format, rounding: str, overflow: str) -> Tensor:
    """``quantize`` for a narrower format (emin >= -126) on float32 ``x`` in float32 and int32 (the same values as
    the float64 definition, tested on random bit patterns): at and above 2**emin the mantissa is cut by integer
    operations on the bit pattern as in ``_quantize_e8``; below it the grid spacing is u = 2**(emin - mbits), and
    nearest-even is (a + C) - C with C = u * 2**23 (float32 addition rounds a to a multiple of u: [C, 2C) has
    ulp u), toward zero floor(a / u) * u (power-of-two scalings, exact)."""
    drop = 23 - f.mbits
    ia = x.view(torch.int32) & 0x7FFFFFFF
    a = ia.view(torch.float32)
    if rounding == "nearest":
        ia = ia + (((ia >> drop) & 1) + ((1 << (drop - 1)) - 1))
    v = (ia & ~((1 << drop) - 1)).view(torch.float32)
    u = 2.0 ** (f.emin - f.mbits)
    if rounding == "nearest":
        c = u * 2.0 ** 23
        sub = (a + c) - c
    else:
        sub = torch.floor(a * (1 / u)) * u
    v = torch.where(a < 2.0 ** f.emin, sub, v)
    if overflow == "saturate":
        v = v.clamp_max_(f.max)
    else:
        v = torch.where(v > f.max, torch.full_like(v, math.inf if f.has_inf else math.nan), v)
    v = torch.where(torch.isnan(x), x, v)
    return torch.copysign(v, x)


def _blocks(x: Tensor, dim: int, block: int):
    """``x`` with ``dim`` moved last and split into blocks of ``block`` (zero-padded): (blocked, restore)."""
    xm = x.movedim(dim, -1)
    n = xm.shape[-1]
    pad = (-n) % block
    if pad:
        xm = torch.nn.functional.pad(xm, (0, pad))
    xb = xm.reshape(*xm.shape[:-1], -1, block)

    def restore(y: Tensor) -> Tensor:
        return y.reshape(*xm.shape)[..., :n].movedim(-1, dim)
    return xb, restore


def mx_shared_exponent(amax: Tensor, fmt) -> Tensor:
    """OCP MX v1.0 shared scale exponent of blocks with absolute maxima ``amax``: floor(log2(amax)) - emax_elem,
    clamped below at -127 (an all-zero block takes -127); above 127 the E8M0 scale is NaN (returned as NaN)."""
    f = get(fmt)
    _, e2 = torch.frexp(amax.to(torch.float64))
    e = (e2 - 1 - f.emax).to(torch.float64)
    e = torch.where(amax > 0, e, torch.full_like(e, -E8M0_EMAX)).clamp_min(-E8M0_EMAX)
    return torch.where((e > E8M0_EMAX) | ~torch.isfinite(amax.to(torch.float64)), torch.full_like(e, math.nan), e)


def quantize_mx(x: Tensor, fmt: str, dim: int = -1, block: int = MX_BLOCK, rounding: str = "nearest",
                overflow: str = "saturate", gen: Optional[torch.Generator] = None) -> Tensor:
    """OCP MX block quantization along ``dim``: each block of ``block`` elements shares the scale
    X = 2**shared_exp (``mx_shared_exponent``); elements are ``quantize(V / X)`` in the element format (normals
    clamped to max under ``saturate``, as the spec's conversion does) times X. ``fmt``: an ``MX_FORMATS`` name or an
    element format name."""
    elem = get(MX_FORMATS.get(fmt, fmt))
    xb, restore = _blocks(x.detach().to(torch.float64), dim, block)
    se = mx_shared_exponent(xb.abs().amax(-1, keepdim=True), elem)
    scaled = _ldexp(xb, -torch.nan_to_num(se, nan=0.0))       # exact power-of-two scaling
    q = quantize(scaled, elem, rounding, overflow, gen)
    q = torch.where(torch.isnan(se), torch.full_like(q, math.nan), _ldexp(q, torch.nan_to_num(se, nan=0.0)))
    return restore(q).to(_out_dtype(x))


def quantize_scaled_codes(x: Tensor, fmt, scaling: str = "tensor", dim: int = -1, block: int = 128,
                          rounding: str = "nearest", overflow: str = "saturate",
                          gen: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor]]:
    """``x`` as a chip stores a GEMM input, in the code domain: (codes, inv), float32 codes on ``fmt``'s grid (what
    the matrix unit multiplies) and the float32 dequantization multiplier (value = codes * inv, applied outside it).

    ``none``: ``quantize(x)``, inv None. ``tensor``: one scale s = max / max(amax, AMAX_EPS) (float32, 1 where amax
    is 0), codes = q(float32(x * s)), inv = float32(1 / s), 0-dim. ``block``: such a scale per block of ``block``
    elements along ``dim``, inv of ``x``'s shape with ``dim`` of length ceil(n / block). ``mx``: the E8M0 scale
    2**shared_exp per block (``mx_shared_exponent``; NaN beyond E8M0's range), codes = q(x / 2**shared_exp),
    inv = 2**shared_exp.
    float32 products and quotients are computed in float64 and rounded once, which is the float32 operation itself
    (a 2p+2-bit intermediate rounds +, *, / correctly) and holds on every device."""
    _check("scaling", scaling, SCALINGS)
    if scaling == "none":
        return quantize(x, fmt, rounding, overflow, gen).float(), None
    f = get(fmt)
    xd = x.detach().to(torch.float64) if scaling == "mx" else x.detach().float().double()   # recipes scale float32
    if scaling == "tensor":
        xb = xd.reshape(1, -1)
    else:
        xb, _ = _blocks(xd, dim, block)
    amax = xb.abs().amax(-1, keepdim=True)
    if scaling == "mx":
        se = mx_shared_exponent(amax, f)
        se0 = torch.nan_to_num(se, nan=0.0)
        scaled = _ldexp(xb, -se0)                                           # exact power-of-two scaling
        if rounding != "stochastic":     # float32 (the fast path): exact, but for values below 2**-126 that round
            scaled = scaled.float()      # to +-0 on every element grid either way
        q = quantize(scaled, f, rounding, overflow, gen)
        inv = torch.where(torch.isnan(se), se, pow2(se0)).float()          # 2**-127 is a float32 subnormal: exact
    else:
        # amax floored at AMAX_EPS as torchao's float8 recipe does: a block of tiny values (attention probabilities
        # of far-off keys) would make max / amax overflow float32, and its zeros 0 * inf = NaN codes
        s = torch.where(amax > 0, (f.max / amax.clamp(min=AMAX_EPS)).float().double(), torch.ones_like(amax))
        q = quantize((xb * s).float(), f, rounding, overflow, gen)
        inv = (1.0 / s).float()
    codes = q.float()
    if scaling == "tensor":
        return codes.reshape(x.shape), inv.reshape(())
    n = x.shape[dim]
    codes = codes.reshape(*codes.shape[:-2], -1)[..., :n].movedim(-1, dim)
    return codes, inv.squeeze(-1).movedim(-1, dim)


def dequantize(codes: Tensor, inv: Optional[Tensor], dim: int = -1, block: Optional[int] = None) -> Tensor:
    """Values codes * inv (a float32 multiply), ``inv`` as ``quantize_scaled_codes`` gives it: None, 0-dim, or
    per ``block`` elements along ``dim`` (each repeated over its block, the last block cut to ``codes``' length;
    the block length is needed: 200 elements in 7 blocks may be blocks of 29 to 33)."""
    if inv is None:
        return codes
    if inv.dim() and inv.shape[dim] != codes.shape[dim]:
        n = codes.shape[dim]
        if block is None or -(-n // block) != inv.shape[dim]:
            raise ValueError(f"dequantize: {inv.shape[dim]} scales along dim {dim} of {n} elements need their "
                             f"block length (block={block})")
        inv = inv.repeat_interleave(block, dim=dim).narrow(dim, 0, n)
    return (codes.double() * inv.double()).float()


def quantize_scaled(x: Tensor, fmt, scaling: str = "tensor", dim: int = -1, block: int = 128,
                    rounding: str = "nearest", overflow: str = "saturate",
                    gen: Optional[torch.Generator] = None) -> Tensor:
    """``x`` as a chip stores a GEMM input, as values (float32; float64 inputs stay float64): codes * inv of
    ``quantize_scaled_codes``; ``mx`` is ``quantize_mx`` (E8M0 scales, blocks of ``block``)."""
    _check("scaling", scaling, SCALINGS)
    if scaling == "none":
        return quantize(x, fmt, rounding, overflow, gen)
    if scaling == "mx":
        return quantize_mx(x, fmt, dim, block, rounding, overflow, gen)
    codes, inv = quantize_scaled_codes(x, fmt, scaling, dim, block, rounding, overflow, gen)
    return dequantize(codes, inv, dim, block).to(_out_dtype(x))


def decode(codes: Tensor, fmt) -> Tensor:
    """Values (float64) of a format's bit patterns (ints, sign bit at 1 + ebits + mbits - 1), per the OCP
    definitions: exponent field 0 is subnormal; e5m2/fp16/bf16 top exponent field is inf (mantissa 0) or NaN;
    e4m3's S.1111.111 is NaN; fp6/fp4 have no special values."""
    f = get(fmt)
    c = codes.to(torch.int64)
    m = c & ((1 << f.mbits) - 1)
    e = (c >> f.mbits) & ((1 << f.ebits) - 1)
    s = (c >> (f.mbits + f.ebits)) & 1
    frac = m.to(torch.float64) / 2 ** f.mbits
    val = torch.where(e == 0, _ldexp(frac, torch.full_like(e, f.emin)),
                      _ldexp(1 + frac, e - f.bias))
    top = e == (1 << f.ebits) - 1
    if f.has_inf:
        val = torch.where(top, torch.where(m == 0, math.inf, math.nan), val)
    elif f.name == "fp8_e4m3":
        val = torch.where(top & (m == (1 << f.mbits) - 1), math.nan, val)
    return torch.where(s == 1, -val, val)
