"""Fast paths of the noise engine: fused Triton kernel on CUDA, graph-capturable noise, CPU noise table.

Chosen per tensor by the engine (``runtime.NoiseState.path``); the reference path in ``noisebench.noise.models``
stays the definition of each model. Switches: ``noisebench.noise.configure_engine``.
"""
from .dispatch import FAST_KINDS, MODES, covers, set_mode
from .table import set_cpu_generator

__all__ = ["FAST_KINDS", "MODES", "covers", "set_mode", "set_cpu_generator"]
