"""Chip profiles in a model: the model's GEMMs (``F.linear``, ``matmul``/``@``, ``bmm``) computed with a chip's
arithmetic (``accumulate.gemm``), and softmax/silu with its approximate exp (``transcendental``), as one
TorchFunctionMode.

The profile decides the forward values; gradients are torch's own (straight-through: the chip's forward error is
``(chip - clean).detach()`` added to the clean product), so backward GEMMs are not yet the chip's. The mode composes
with ``NoiseInjector``: installed outside it (entered first), each covered call made by the injector's handler comes
here, so noise models act on the chip's outputs (entered inside it, the chip would overwrite the noise). A profile
whose ``phases`` do not include the phase in force leaves every call untouched, bitwise.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import transcendental
from .accumulate import GemmArith, gemm, quantize_input
from .runtime import STATE
from .spec import PHASES

CHIP_OPS = ("linear", "matmul", "bmm", "softmax", "silu")
GEMM_OPS = ("linear", "matmul", "bmm")
_SPELLINGS = {F.linear: "linear", torch.matmul: "matmul", Tensor.matmul: "matmul", Tensor.__matmul__: "matmul",
              Tensor.__rmatmul__: "rmatmul", torch.bmm: "bmm", Tensor.bmm: "bmm", F.softmax: "softmax",
              torch.softmax: "softmax", Tensor.softmax: "softmax", F.silu: "silu"}
_ARITH_KEYS = tuple(f.name for f in dataclasses.fields(GemmArith))


@dataclass(frozen=True)
class ChipProfile:
    """A named GEMM arithmetic and where it applies (``ops`` from ``CHIP_OPS``, ``phases`` from the noise engine's
    phases or ``all``); ``exp_degree``: softmax and silu compute exp by ``transcendental.exp_poly`` of that degree
    (where ``ops`` names them; None: torch's exp)."""

    name: str
    arith: GemmArith
    ops: tuple = GEMM_OPS
    phases: tuple = ("all",)
    provenance: str = ""
    exp_degree: Optional[int] = None

    def __post_init__(self) -> None:
        for key, values, valid in (("ops", self.ops, CHIP_OPS), ("phases", self.phases, PHASES + ("all",))):
            bad = [v for v in values if v not in valid]
            if bad or not values:
                raise ValueError(f"chip.{key}: {list(values)} is not valid; valid choices: {list(valid)}")
        if self.exp_degree is not None and not 1 <= int(self.exp_degree) <= 12:
            raise ValueError(f"chip.exp_degree must be null or in 1..12, got {self.exp_degree!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChipProfile":
        """From a ``chip`` config node (conf/chip/*.yaml) as a plain dict; unknown keys are refused by name."""
        known = set(_ARITH_KEYS) | {"name", "ops", "phases", "provenance", "exp_degree"}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"chip: unknown key(s) {bad}; valid keys: {sorted(known)}")
        arith = GemmArith(**{k: (str(v) if isinstance(v, str) else v) for k, v in d.items() if k in _ARITH_KEYS})
        return cls(name=str(d.get("name", "chip")), arith=arith, ops=tuple(str(o) for o in d.get("ops", GEMM_OPS)),
                   phases=tuple(str(p) for p in d.get("phases", ("all",))), provenance=str(d.get("provenance", "")),
                   exp_degree=d.get("exp_degree"))

    def live(self, phase: Optional[str]) -> bool:
        """Whether the profile applies in ``phase`` (``all``: always, also outside any phase)."""
        return "all" in self.phases or phase in self.phases


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


def _approx(op: str, args: tuple, kwargs: dict, degree: int):
    """softmax / silu with the polynomial exp, or None for spellings this model does not cover."""
    x = args[0] if args else kwargs.get("input")
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        return None
    if op == "silu":
        inplace = kwargs.get("inplace", args[1] if len(args) > 1 else False)
        return None if inplace else transcendental.silu(x, degree)
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    dtype = kwargs.get("dtype", args[3] if len(args) > 3 and not isinstance(args[3], int) else None)
    if len(args) == 3 and isinstance(args[2], torch.dtype):   # torch.softmax(x, dim, dtype)
        dtype = args[2]
    return None if dim is None else transcendental.softmax(x, dim, degree, dtype)


def chip_call(func, op: str, args: tuple, kwargs: dict, profile: ChipProfile,
              gen: Optional[torch.Generator] = None, weights: Optional[dict] = None):
    """One covered call under ``profile``: the chip's values, torch's gradient (straight-through). ``weights``: a
    cache of quantized linear weights, keyed by the tensor and its version counter (an optimizer step's in-place
    update bumps it), for deterministic input rounding only."""
    if op in ("softmax", "silu"):
        if profile.exp_degree is None:
            return func(*args, **kwargs)
        y = _approx(op, args, kwargs, int(profile.exp_degree))
        if y is None:
            return func(*args, **kwargs)
        clean = func(*args, **kwargs)
    else:
        ab = _operands(op, args, kwargs)
        if ab is None:
            return func(*args, **kwargs)
        a, b, bias = ab
        clean = func(*args, **kwargs)
        qb = None
        w = (args[1] if len(args) > 1 else kwargs.get("weight")) if op == "linear" else None
        if isinstance(w, torch.nn.Parameter) and weights is not None and profile.arith.in_rounding == "nearest":
            key = (id(w), w._version, w.data_ptr())   # the cache holds w: its id is not reused while cached
            hit = weights.get(key)
            if hit is None:
                if len(weights) > 4096:
                    weights.clear()
                hit = weights[key] = (w, quantize_input(b, profile.arith, -2).to(torch.float64))
            qb = hit[1]
        y = gemm(a, b, profile.arith, gen, bias, qb=qb)
    y = y.to(clean.dtype)
    if clean.requires_grad:
        return clean + (y - clean).detach()
    return y


def _phase_in_force() -> Optional[str]:
    owner = getattr(STATE, "owner", None)
    return owner.current_phase if owner is not None else STATE.effective_phase()


class ChipMode(TorchFunctionMode):
    """Runs the model's covered GEMMs with ``profile``'s arithmetic while entered (this thread only). ``phase``: a
    callable naming the phase in force; default: the installed injector's phase context (held even when its noise
    is off), else the noise engine's (``runtime.STATE``)."""

    def __init__(self, profile: ChipProfile, seed: int = 0, phase: Optional[Callable[[], Optional[str]]] = None):
        super().__init__()
        self.profile = profile
        self.phase = phase or _phase_in_force
        self.seed = seed
        self.gens: dict = {}        # stochastic input rounding: one generator per device, seeded alike
        self.weights: dict = {}     # quantized linear weights (chip_call)

    def _gen(self, t: Tensor) -> Optional[torch.Generator]:
        if self.profile.arith.in_rounding != "stochastic":
            return None
        if t.device not in self.gens:
            self.gens[t.device] = torch.Generator(device=t.device).manual_seed(self.seed)
        return self.gens[t.device]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = _SPELLINGS.get(func)
        if op is None or (op if op != "rmatmul" else "matmul") not in self.profile.ops or "out" in kwargs \
                or not self.profile.live(self.phase()):
            return func(*args, **kwargs)
        first = next((v for v in (*args, *kwargs.values()) if isinstance(v, Tensor)), None)
        return chip_call(func, op, args, kwargs, self.profile, None if first is None else self._gen(first),
                         self.weights)
