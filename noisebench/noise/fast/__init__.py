"""Fast paths of the noise engine (issue 7): fused Triton kernel on CUDA, graph-capturable noise, CPU noise table.

Chosen automatically by the engine (``runtime.NoiseState.perturb`` and ``intercept.noise_output``); the reference
path in ``noisebench.noise.models`` stays the definition of each model. ``NOISEBENCH_FAST=auto|off|force``.
"""
from .dispatch import FAST_KINDS, MODES, covers, set_mode
from .table import set_cpu_generator

__all__ = ["FAST_KINDS", "MODES", "covers", "set_mode", "set_cpu_generator"]
