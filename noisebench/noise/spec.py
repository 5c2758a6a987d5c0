"""NoiseSpec: the declarative, validated description of one noise setting (no torch import)."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

NOISE_TYPES = ("none", "relative_gaussian", "absolute_gaussian", "systematic_bias", "bitflip", "round")

OPS = ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "sdpa",
       "softmax", "silu", "gelu", "layer_norm", "rms_norm")

# ``matmul_family`` is the study's E4 set (it noised matmul/bmm/linear). It covers attention's two products however
# attention runs: ``torch.matmul`` calls under eager attention, a decomposed SDPA call otherwise (attention.py), unless
# ``sdpa`` is named too (then the fused call is noised as one op). ``extended`` is E5.
OP_SETS: Dict[str, tuple] = {
    "matmul_family": ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum"),
    "extended": ("linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "softmax", "silu", "gelu"),
    "all": OPS,
}

PHASES = ("rollout", "reference", "train_forward", "train_backward", "eval")
ROUND_FORMATS = ("bf16", "fp16", "fp8_e4m3", "fp8_e5m2")
ROUNDING_MODES = ("nearest", "stochastic")
BIT_FIELDS = ("mantissa", "exponent", "sign", "all")

# Position-embedding computation is excluded by default: chips (and vLLM) compute RoPE cos/sin once into a cache,
# and transformers < 5.24 computes the angles with ``@``, where relative noise becomes a phase error growing with
# position (noise-under-compile.md). Patterns are matched (re.search) against qualified module names and class names.
DEFAULT_EXCLUDE = [r"(?i)rotary", r"(?i)pos(ition)?_?emb"]


def _choices(name: str, values, valid) -> None:
    bad = [v for v in values if v not in valid]
    if bad:
        raise ValueError(f"NoiseSpec.{name}: unknown value(s) {bad}; valid choices: {list(valid)}")


@dataclass
class NoiseSpec:
    """One noise setting. Usable as a Hydra structured config (``OmegaConf.structured(NoiseSpec)``).

    Attributes:
        type: noise model, one of ``NOISE_TYPES`` (formulas in ``noisebench.noise.models``).
        scale: sigma for the Gaussian models, the relative bias for ``systematic_bias``, the per-element flip
            probability for ``bitflip``; ignored by ``round``.
        ops: op names from ``OPS`` and/or set names from ``OP_SETS`` (``matmul_family``, ``extended``, ``all``).
        phases: phases from ``PHASES`` where noise applies, or ``["all"]``. Forward noise needs the forward's phase
            here; backward noise needs ``train_backward`` here and in force when ``backward()`` runs.
        include: module-name regexes; when non-empty only ops inside a matching module are noised.
        exclude: module-name regexes whose ops are never noised (default: rotary / position embeddings).
        layers: optional inclusive ``[lo, hi]`` decoder-layer index range (modules named ``...layers.<i>``); when
            set, ops outside those layers (lm_head, embeddings, final norm) are not noised. Needs ``attach(model)``.
        seed: seed of the noise stream; the distributed rank (env ``RANK``) is mixed in.
        round_format: target format of ``round``, one of ``ROUND_FORMATS``.
        rounding: ``nearest`` (round-to-nearest-even, as torch's casts) or ``stochastic``.
        bits: which bits ``bitflip`` may flip, one of ``BIT_FIELDS``.
        per_channel: ``systematic_bias`` only: bias ``scale * z_c``, z_c ~ N(0,1) fixed per last-dim channel.
        telemetry_rate: fraction of noised calls on which the realized relative error is measured (0 = never).
    """

    type: str = "none"
    scale: float = 0.0
    ops: List[str] = field(default_factory=lambda: ["matmul_family"])
    phases: List[str] = field(default_factory=lambda: ["all"])
    include: List[str] = field(default_factory=list)
    exclude: List[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    layers: Optional[List[int]] = None
    seed: int = 0
    round_format: str = "bf16"
    rounding: str = "nearest"
    bits: str = "mantissa"
    per_channel: bool = False
    telemetry_rate: float = 0.0625

    @property
    def enabled(self) -> bool:
        """True unless the spec is type ``none``."""
        return self.type != "none"

    def resolved_ops(self) -> frozenset:
        """The op names the spec selects, with set names expanded."""
        out = set()
        for name in self.ops:
            out.update(OP_SETS.get(name, (name,)))
        return frozenset(out)

    def resolved_phases(self) -> frozenset:
        """The phase names the spec enables, with ``all`` expanded."""
        return frozenset(PHASES) if "all" in self.phases else frozenset(self.phases)

    def __post_init__(self) -> None:
        self.validate()

    def _fields(self) -> tuple:
        return tuple(tuple(v) if isinstance(v, list) else v for v in dataclasses.astuple(self))

    def validate(self) -> "NoiseSpec":
        """Check every field; raise ``ValueError`` naming the bad key and the valid choices. Returns self.

        Construction validates; a later call re-checks only when a field changed since (the injector and the
        runner call it again on the way to the kernel, and a test may change ``scale`` in place)."""
        state = self._fields()
        if self.__dict__.get("_valid") == state:
            return self
        self._check()
        self.__dict__["_valid"] = state
        return self

    def _check(self) -> None:
        _choices("type", [self.type], NOISE_TYPES)
        if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
            raise ValueError(f"NoiseSpec.scale must be a finite number >= 0, got {self.scale!r}")
        if self.type == "bitflip" and self.scale > 1:
            raise ValueError(f"NoiseSpec.scale is a flip probability for bitflip and must be <= 1, got {self.scale}")
        if isinstance(self.ops, str) or isinstance(self.phases, str):
            raise ValueError("NoiseSpec.ops and NoiseSpec.phases must be lists of names, not a string")
        _choices("ops", list(self.ops), OPS + tuple(OP_SETS))
        _choices("phases", list(self.phases), PHASES + ("all",))
        if self.enabled and not self.ops:
            raise ValueError(f"NoiseSpec.ops is empty while type={self.type!r}; valid choices: "
                             f"{list(OPS) + list(OP_SETS)}")
        if self.enabled and not self.phases:
            raise ValueError(f"NoiseSpec.phases is empty while type={self.type!r}; valid choices: "
                             f"{list(PHASES) + ['all']}")
        for key in ("include", "exclude"):
            for pat in getattr(self, key):
                try:
                    re.compile(pat)
                except re.error as err:
                    raise ValueError(f"NoiseSpec.{key}: bad regex {pat!r}: {err}") from None
        if self.layers is not None:
            lay = list(self.layers)
            if len(lay) != 2 or not all(isinstance(i, int) and i >= 0 for i in lay) or lay[0] > lay[1]:
                raise ValueError(f"NoiseSpec.layers must be [lo, hi] with 0 <= lo <= hi, got {self.layers!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"NoiseSpec.seed must be an int, got {self.seed!r}")
        _choices("round_format", [self.round_format], ROUND_FORMATS)
        _choices("rounding", [self.rounding], ROUNDING_MODES)
        _choices("bits", [self.bits], BIT_FIELDS)
        if not 0.0 <= float(self.telemetry_rate) <= 1.0:
            raise ValueError(f"NoiseSpec.telemetry_rate must be in [0, 1], got {self.telemetry_rate!r}")

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict of the fields (lists copied), for records and loggers."""
        return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Any) -> "NoiseSpec":
        """Build (and so validate) a spec from a dict or an OmegaConf node; unknown keys raise naming the valid
        keys; a key set to None takes the spec's default (the Hydra schema leaves optional keys null)."""
        if d is None:
            return cls()
        if isinstance(d, cls):
            return d
        if not isinstance(d, dict):
            from omegaconf import OmegaConf  # DictConfig from Hydra
            d = OmegaConf.to_container(d, resolve=True)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"NoiseSpec: unknown key(s) {unknown}; valid keys: {names}")
        kw = {k: v for k, v in d.items() if v is not None}
        for key in ("ops", "phases", "include", "exclude"):  # accept "a,b" shorthand and tuples
            if isinstance(kw.get(key), str):
                kw[key] = [s.strip() for s in kw[key].split(",") if s.strip()]
            elif kw.get(key) is not None:
                kw[key] = [str(v) if isinstance(v, str) else v for v in kw[key]]  # str(): a schema's StrEnum
        for key in ("type", "round_format", "rounding", "bits"):
            if isinstance(kw.get(key), str):
                kw[key] = str(kw[key])
        if kw.get("layers") is not None:
            kw["layers"] = [int(i) for i in kw["layers"]]
        if "scale" in kw:
            kw["scale"] = float(kw["scale"])
        return cls(**kw)
