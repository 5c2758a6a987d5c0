"""vLLM general plugin: switch the engine on in every vLLM process from the environment, as rollout noise.

Registered as the ``vllm.general_plugins`` entry point ``noisebench`` (pyproject). vLLM calls ``register()`` in each
worker before the model is built; calls outside any phase context then count as phase ``rollout`` (noised only if
``rollout`` is among the spec's phases). Importing this module does not import vLLM.
Untested against a real vLLM here (none can be installed in the workplace). Known gap: vLLM builds its rotary cos/sin
cache in ``RotaryEmbedding.__init__``, outside any module forward, so the default rotary exclusion cannot see it;
that cache's ``einsum``/``matmul`` is noised once at model construction unless ``einsum`` is left out of the ops.
"""
from __future__ import annotations

from typing import Optional

from .env import install_from_env
from .injector import NoiseInjector


def register() -> Optional[NoiseInjector]:
    """Entry point: install from ``NOISEBENCH_NOISE_*`` / ``VERL_NOISY_OPS_*`` with phase ``rollout`` semantics."""
    return install_from_env(default_phase="rollout")
