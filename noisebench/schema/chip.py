"""Schema of the ``chip`` group (conf/chip): a chip's matrix-unit arithmetic, the fields of
``noisebench.noise.accumulate.GemmArith`` plus where it applies. The choices repeat ``noisebench.noise.formats`` and
``accumulate``'s tuples (importing them would load torch before the check); tests/test_chip_config.py keeps them equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from noisebench.schema.fields import bounded, choices

ChipFormat = choices("ChipFormat", ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3",
                                    "fp4_e2m1"])
Scaling = choices("Scaling", ["none", "tensor", "block", "mx"])
InRounding = choices("InRounding", ["nearest", "stochastic"])
AccRounding = choices("AccRounding", ["rne", "toward_zero"])
Overflow = choices("Overflow", ["saturate", "inf"])
ReductionOrder = choices("ReductionOrder", ["fixed", "random"])
AccAlignment = choices("AccAlignment", ["exact", "max_exponent", "max_exponent_unnormalized"])
ChipOp = choices("ChipOp", ["linear", "matmul", "bmm", "softmax", "silu", "gelu", "rsqrt"])
ChipPhase = choices("ChipPhase", ["rollout", "reference", "train_forward", "train_backward", "eval", "all"])


@dataclass
class ChipConfig:
    """``chip`` (conf/chip; ``chip=none`` leaves it null: no chip). Names as in the literature: inputs quantized
    to ``in_format`` with ``in_scaling`` scales (blocks of ``scale_block`` along K), products summed ``chunk`` at a
    time into an accumulator of ``acc_mantissa_bits`` rounded by ``acc_rounding``, promoted to fp32 every
    ``promote_every`` elements (null: never), output rounded to ``out_format``; ``overflow`` for every step.
    Backward GEMMs run the same arithmetic with the incoming gradient in ``grad_format`` (null: ``in_format``).
    ``matmul`` also covers attention's QK^T and PV (SDPA is decomposed)."""

    name: str = MISSING                            # the profile, as records and boards name it
    provenance: str = MISSING                      # where the numbers come from (paper, datasheet, measurement)
    in_format: ChipFormat = ChipFormat.bf16
    in_scaling: Scaling = Scaling.none
    scale_block: int = bounded(32, ge=1)
    in_rounding: InRounding = InRounding.nearest
    chunk: int = bounded(32, ge=1)
    acc_mantissa_bits: int = bounded(23, ge=1, le=52)
    acc_rounding: AccRounding = AccRounding.rne
    promote_every: Optional[int] = bounded(None, ge=1)   # a multiple of chunk (checked by GemmArith)
    out_format: ChipFormat = ChipFormat.fp32
    overflow: Overflow = Overflow.saturate
    reduction_order: ReductionOrder = ReductionOrder.fixed   # random: each call adds the K chunks in a drawn order
    acc_alignment: AccAlignment = AccAlignment.exact   # max_exponent: products cut below the largest exponent, summed;
    # max_exponent_unnormalized: the H200's FP8 adder bit for bit (GemmArith)
    grad_format: Optional[ChipFormat] = None       # the gradient operand of backward GEMMs; null: in_format
    ops: List[ChipOp] = field(default_factory=lambda: ["linear", "matmul", "bmm"])  # + softmax/silu/gelu, rsqrt
    phases: List[ChipPhase] = field(default_factory=lambda: ["all"])
    exp_degree: Optional[int] = bounded(None, ge=1, le=12)  # softmax/silu/tanh-gelu exp: range reduction + poly
    rsqrt_table_bits: Optional[int] = bounded(None, ge=1, le=16)  # rsqrt seed table of 2**bits; null: exact rsqrt
    rsqrt_newton: int = bounded(1, ge=0, le=4)     # Newton-Raphson steps after the table seed
