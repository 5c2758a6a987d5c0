"""Process-global noise state read by the mode, hooks and opaque ops: phase, scope, RNG stream, telemetry."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch import Tensor

from . import attention, models
from .fast import dispatch as fast
from .fast import inline
from .spec import NoiseSpec

_MASK64 = (1 << 64) - 1
_SAMPLE_ELEMS = 4096
GLOBAL_PHASE = "global"  # telemetry label of noise applied outside any phase context by a global injector
DIRECTIONS = ("fwd", "bwd")
_GAUSSIAN = ("relative_gaussian", "absolute_gaussian")
# How one tensor's noise is computed (``NoiseState.path``): in compiled code as graph ops Inductor fuses (``inline``)
# or as the opaque op that calls the engine when the graph runs (``graph_op``); in eager code by the fused Triton
# kernel (``kernel``) or the reference models of ``models.py`` (``reference``).
PATHS = ("inline", "graph_op", "kernel", "reference")


_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """splitmix64 over the parts: a well-spread 63-bit seed from (seed, rank, stream, ...)."""
    h = _GOLDEN
    for p in parts:
        h = _splitmix(((h ^ (int(p) & _MASK64)) + _GOLDEN) & _MASK64)
    return h >> 1


class NoiseState:
    """What the interception layer consults. Plain process-global attributes (not thread-local): CUDA runs backward
    on autograd worker threads and must see the phase set by the main thread.

    Read at trace time by the TorchFunctionMode (``fwd_ops``, ``bwd_ops``, scope depths) so Dynamo specialises a
    graph per phase set; read at run time by the opaque ops (phase for backward gating, counters, generators).
    """

    def __init__(self) -> None:
        self.owner = None                      # the installed NoiseInjector
        self.spec: Optional[NoiseSpec] = None
        self.phase: Optional[str] = None      # active phase context
        self.default_phase: Optional[str] = None  # in force outside contexts: None, GLOBAL_PHASE or a phase name
        self.ops: frozenset = frozenset()      # the spec's ops, plus the attention parts they cover (attention.py)
        self.fwd_ops: frozenset = frozenset()  # ops noised in the forward right now
        self.bwd_ops: frozenset = frozenset()  # ops whose inputs are marked for backward noise
        self.excl_depth = 0                    # >0: inside an excluded module
        self.incl_depth = 0                    # >0: inside an included module
        self.need_incl = False                 # include regexes / layer range given
        self.counters = {"fwd": 0, "bwd": 0}
        self.rank = 0
        self._gens: Dict[torch.device, torch.Generator] = {}
        self._bias_cache: Dict[tuple, Tensor] = {}
        self._period = 0
        self.fast_kind = False
        self._base = [0, 0]
        self.reset_telemetry()

    # -- configuration -------------------------------------------------------------------------------------------
    def configure(self, spec: Optional[NoiseSpec], default_phase: Optional[str]) -> None:
        """Point the state at ``spec`` (None = inert) and recompute what is in force."""
        self.spec = spec
        self.default_phase = default_phase
        self.phase = None
        self.excl_depth = self.incl_depth = 0
        self.need_incl = bool(spec and (spec.include or spec.layers is not None))
        self.rank = int(os.environ.get("RANK", "0") or 0)
        rate = float(spec.telemetry_rate) if spec else 0.0
        self._period = max(1, int(round(1.0 / rate))) if rate > 0 else 0
        self._bias_cache.clear()
        self.fast_kind = bool(spec is not None and spec.enabled and fast.kind_covered(spec))
        ops = spec.resolved_ops() if spec is not None else frozenset()
        self.ops = ops | attention.covered_parts(ops)
        seed = spec.seed if spec else 0
        self._base = [mix_seed(seed, self.rank, d) for d in range(len(DIRECTIONS))]  # per-call: one splitmix round
        if spec is not None:  # device-side streams of the fast paths (restart only when the seed changes)
            _restart_device_streams(mix_seed(seed, self.rank, len(DIRECTIONS)))
        self.refresh()

    def effective_phase(self) -> Optional[str]:
        """The phase label in force: the context's, else the default (None, ``global`` or a phase name)."""
        return self.phase if self.phase is not None else self.default_phase

    def phase_on(self, phase: Optional[str]) -> bool:
        """Whether noise applies in ``phase`` under the current spec."""
        if self.spec is None or not self.spec.enabled or phase is None:
            return False
        return phase == GLOBAL_PHASE or phase in self.spec.resolved_phases()

    def refresh(self) -> None:
        """Recompute ``fwd_ops``/``bwd_ops`` after a phase or spec change (Dynamo guards on these)."""
        spec = self.spec
        if spec is None or not spec.enabled:
            self.fwd_ops = self.bwd_ops = frozenset()
            return
        ph = self.effective_phase()
        ops = self.ops
        self.fwd_ops = ops if (ph != "train_backward" and self.phase_on(ph)) else frozenset()
        # Mark inputs whenever a later backward could be noisy: forward under any phase (or global default).
        bwd_possible = ph is not None and (self.default_phase == GLOBAL_PHASE or "train_backward" in spec.resolved_phases())
        self.bwd_ops = ops if bwd_possible else frozenset()
        inline.set_scales(spec.scale, spec.scale if self.bwd_live() else 0.0)   # compiled graphs read these

    def path(self, t: Tensor) -> str:
        """The one decision of how ``t``'s noise is computed, one of ``PATHS``. Compiled code: graph ops that Inductor
        fuses where the inline draw serves (Gaussian models on CUDA, or CPU when the fast path is forced), else the
        opaque op, which runs the eager decision when the graph runs. Eager code: the fused kernel where it
        implements the model for ``t`` (dtype, size, device), else the reference models."""
        if torch.compiler.is_compiling():
            return "inline" if inline.applicable(t, self.spec) else "graph_op"
        return "kernel" if self.fast_kind and fast.tensor_ok(t) else "reference"

    def writes_in_place(self, t: Tensor) -> bool:
        """Whether ``perturb(t, inplace=True)`` writes into ``t`` itself: the fused kernel takes it, or (reference
        path) a Gaussian model on a contiguous CPU float32 tensor, which saves a fresh multi-MB output per call whose
        page faults cost about as much as the addcmul."""
        if self.path(t) == "kernel":
            return t.is_contiguous()
        return (self.spec is not None and self.spec.type in _GAUSSIAN and t.device.type == "cpu"
                and models.writable(t, True))

    def bwd_live(self) -> bool:
        """Run-time check in backward: the phase in force now is train_backward (enabled), or global."""
        ph = self.effective_phase()
        return (ph == "train_backward" or ph == GLOBAL_PHASE) and self.phase_on(ph)

    def blocked(self) -> bool:
        """True inside an excluded module, or outside every included module when includes are given."""
        return self.excl_depth > 0 or (self.need_incl and self.incl_depth == 0)

    # -- random stream -------------------------------------------------------------------------------------------
    def next_seed(self, direction: str) -> int:
        """The 63-bit key of the next draw of ``direction`` (advances its counter): the reference path seeds its
        generator with it, the fast path feeds it to Philox, so both consume the stream one call at a time."""
        n = self.counters[direction]
        self.counters[direction] = n + 1
        base = self._base[0 if direction == "fwd" else 1]
        return _splitmix((base + (n + 1) * _GOLDEN) & _MASK64) >> 1

    def generator(self, device: torch.device, direction: str) -> torch.Generator:
        """The device's private generator, re-seeded for the next draw of ``direction`` (global RNG untouched)."""
        gen = self._gens.get(device)
        if gen is None:
            gen = self._gens[device] = torch.Generator(device=device)
        gen.manual_seed(self.next_seed(direction))
        return gen

    # -- the noise itself ----------------------------------------------------------------------------------------
    def perturb(self, t: Tensor, op: str, direction: str, inplace: bool = False) -> Tensor:
        """Apply the spec's noise model to ``t`` (an op output or a gradient) and return the result. ``inplace``: the
        fast path, and the reference path's Gaussian models on float32 tensors, may write into ``t`` (callers
        guarantee nothing else reads the clean ``t``); otherwise the result is a new tensor."""
        spec = self.spec
        if direction == "bwd" and not self.bwd_live() or spec is None or not spec.enabled:
            return t.clone()
        phase = self.effective_phase()
        kind, n_pert = spec.type, t.numel()
        capture = t.is_cuda and fast.capturing(t)
        key = (phase, op, direction)
        sample = not capture and self._tick(key)   # host code does not run on graph replays: no telemetry there
        clean = None                               # the sampled clean elements, when taken before the write
        if self.path(t) == "kernel":   # fused Triton kernel (fast/), its own Philox draws
            seed = self.next_seed(direction) if kind != "systematic_bias" else 0
            tele = self._slot(key, t) if sample else None   # the kernel adds the sampled error sums itself
            out = fast.perturb(t, kind, spec.scale, seed, direction, capture, inplace=inplace, tele=tele)
            sample = False
        elif capture and kind in ("relative_gaussian", "absolute_gaussian", "bitflip") or (
                capture and kind == "round" and spec.rounding == "stochastic"):
            raise RuntimeError(f"noise type {kind!r} cannot be captured in a CUDA graph by the reference path (it "
                               f"re-seeds a torch.Generator per call); graph-capturable types on the fast path: "
                               f"{sorted(fast.FAST_KINDS)} (needs Triton), plus round with rounding='nearest'")
        elif kind in _GAUSSIAN:
            if sample and inplace:
                clean = self._head(t).clone()   # the write below may be in place
            fn = models.relative_gaussian if kind == "relative_gaussian" else models.absolute_gaussian
            out = fn(t, spec.scale, self.generator(t.device, direction), inplace=inplace)
        elif kind == "systematic_bias":
            bias = self._channel_bias(t) if spec.per_channel else None
            out = models.systematic_bias(t, spec.scale, bias)
        elif kind == "bitflip":
            out, n_pert = models.bitflip(t, spec.scale, spec.bits, self.generator(t.device, direction))
        else:  # round
            gen = self.generator(t.device, direction) if spec.rounding == "stochastic" else None
            out = models.round_format(t, spec.round_format, spec.rounding, gen)
        if not capture:
            self.elements[key] = self.elements.get(key, 0) + n_pert
            if sample:
                self._sample(key, t, out, clean)
        return out

    def perturb_many(self, ts: list, op: str, direction: str) -> list:
        """``perturb`` each tensor of ``ts`` in place where the fast path takes them all (one kernel launch for up to
        three tensors, each drawing what its own call would); otherwise one ``perturb`` call each."""
        if not (ts and len(ts) <= 3 and all(t.is_contiguous() and self.path(t) == "kernel" for t in ts)
                and len({t.device for t in ts}) == 1) or not (direction == "fwd" or self.bwd_live()):
            return [self.perturb(t, op, direction, inplace=True) for t in ts]
        key = (self.effective_phase(), op, direction)
        if fast.capturing(ts[0]):
            teles = [None] * len(ts)
        else:
            teles = [self._slot(key, t) if self._tick(key) else None for t in ts]
            self.elements[key] = self.elements.get(key, 0) + sum(t.numel() for t in ts)
        kind = self.spec.type
        seeds = [self.next_seed(direction) if kind != "systematic_bias" else 0 for _ in ts]
        fast.perturb_many(ts, kind, self.spec.scale, seeds, direction, teles)
        return ts

    def _channel_bias(self, t: Tensor) -> Tensor:
        c = t.shape[-1] if t.dim() else 1
        key = (c, t.device)
        if key not in self._bias_cache:
            self._bias_cache[key] = models.channel_bias(c, self.spec.scale, mix_seed(self.spec.seed, 7, c), t.device)
        return self._bias_cache[key]

    # -- telemetry -----------------------------------------------------------------------------------------------
    def reset_telemetry(self) -> None:
        """Forget counts and error sums (the random stream is not affected)."""
        self.calls: Dict[tuple, int] = {}
        self.elements: Dict[tuple, int] = {}
        self.err_sums: Dict[tuple, Tensor] = {}

    def _tick(self, key: tuple) -> bool:
        """Count a call of ``key``; True when this call's realized error is sampled (every ``1/telemetry_rate``)."""
        n = self.calls.get(key, 0)
        self.calls[key] = n + 1
        return bool(self._period) and n % self._period == 0

    def _slot(self, key: tuple, t: Tensor) -> Tensor:
        """The float32 [sum err^2, sum y^2] accumulator of ``key`` on ``t``'s device (created zeroed)."""
        acc = self.err_sums.get(key)
        if acc is None or acc.device != t.device:
            acc = self.err_sums[key] = torch.zeros(2, dtype=torch.float32, device=t.device)
        return acc

    @staticmethod
    def _head(t: Tensor) -> Tensor:
        """The elements telemetry samples: the first 4096, as float32."""
        return t.detach().reshape(-1)[:_SAMPLE_ELEMS].float()

    def _sample(self, key: tuple, t: Tensor, out: Tensor, clean: Optional[Tensor] = None) -> None:
        """Reference path: add the realized error of the first 4096 elements to the key's accumulator; ``clean``: the
        clean elements, copied before an in-place write (default: read from ``t``)."""
        ref = clean if clean is not None else self._head(t)
        err = self._head(out) - ref
        self._slot(key, t).add_(torch.stack([err.square().sum(), ref.square().sum()]))

    def telemetry(self) -> Dict[str, float]:
        """Flat ``noise/<phase>/<op>/<fwd|bwd>/{calls,elements,rel_err_rms}``; rel_err_rms = sqrt(sum err^2 /
        sum y^2) over the sampled elements (equals the RMS relative error for relative models, finite at y = 0)."""
        out: Dict[str, float] = {}
        for key, n in self.calls.items():
            base = "noise/" + "/".join(key)
            out[base + "/calls"] = float(n)
            out[base + "/elements"] = float(self.elements[key])
            if key in self.err_sums:
                e, r = self.err_sums[key].tolist()
                out[base + "/rel_err_rms"] = (e / r) ** 0.5 if r > 0 else float("nan")
        return out


def _restart_device_streams(seed: int) -> None:
    """Restart the device-side streams (fused-kernel graph counters, compiled-graph seeds) when ``seed`` differs from
    the last one: a fresh process with a fixed seed reproduces its draws, and re-installing the same seed continues
    the stream (replays of graphs captured earlier keep drawing fresh noise instead of repeating it)."""
    if torch.cuda.is_available() and fast.MODE != "off":
        fast.kernels()   # import (and register the graph op) outside any compiled region
    if seed != _LAST_SEED[0] or not inline.SEEDS:
        fast.reset_counters()
        inline.reset(seed)
        _LAST_SEED[0] = seed


_LAST_SEED: list = [None]
STATE = NoiseState()
