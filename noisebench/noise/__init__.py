"""noisebench.noise: operator-level accelerator-numerics noise for PyTorch, forward and backward, phase-scoped."""
from .spec import BIT_FIELDS, DEFAULT_EXCLUDE, NOISE_TYPES, OP_SETS, OPS, PHASES, ROUND_FORMATS, ROUNDING_MODES, NoiseSpec
from .injector import NoiseInjector
from .engine import configure_engine, engine_config, engine_from_env
from .env import install_from_env, spec_from_env
from .module_level import ModuleNoiseInjector

__all__ = ["NoiseSpec", "NoiseInjector", "ModuleNoiseInjector", "install_from_env", "spec_from_env", "configure_engine",
           "engine_config", "engine_from_env", "PHASES", "OPS",
           "OP_SETS", "NOISE_TYPES", "ROUND_FORMATS", "ROUNDING_MODES", "BIT_FIELDS", "DEFAULT_EXCLUDE"]
