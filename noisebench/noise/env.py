"""install_from_env: switch the engine on from environment variables, inside any framework's worker processes.

Variables (``NOISEBENCH_NOISE_*`` win over the study's ``VERL_NOISY_OPS_*`` aliases):
    NOISEBENCH_NOISE_SPEC        JSON object of NoiseSpec fields (the whole spec at once)
    NOISEBENCH_NOISE_<FIELD>     one field: TYPE, SCALE, OPS (comma list), PHASES, INCLUDE, EXCLUDE, LAYERS ("lo,hi"),
                                 SEED, ROUND_FORMAT, ROUNDING, BITS, PER_CHANNEL (0/1), TELEMETRY_RATE
    NOISEBENCH_NOISE_ENABLED     0 switches everything off
    VERL_NOISY_OPS_ENABLED       1 -> on with type relative_gaussian, ops matmul_family, scale 1e-4 unless given
    VERL_NOISY_OPS_SCALE         alias of SCALE
    VERL_NOISY_OPS_TYPE          alias of TYPE
    VERL_NOISY_OPS_ALL_OPS       1 -> ops ``extended`` + ``layer_norm`` (the study's E5 switch)
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Optional

from .engine import configure_engine, engine_from_env
from .injector import NoiseInjector
from .runtime import STATE
from .spec import NoiseSpec

PREFIX = "NOISEBENCH_NOISE_"
STUDY_DEFAULT_SCALE = 1e-4
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_ENV_INJECTOR: Optional[NoiseInjector] = None


def _flag(value: str, key: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{key}={value!r} is not a boolean; valid choices: {sorted(_TRUE | _FALSE)}")


def _number(kind: type, value: str, key: str):
    """``kind(value)``, or a ValueError naming the variable (a bare ``float('abc')`` error names none)."""
    try:
        return kind(value.strip())
    except ValueError:
        raise ValueError(f"{key}={value!r} is not {'an integer' if kind is int else 'a number'}") from None


def spec_from_env(environ: Optional[Mapping[str, str]] = None) -> Optional[NoiseSpec]:
    """The spec the environment asks for, or None when noise is not switched on there."""
    env = os.environ if environ is None else environ
    if PREFIX + "ENABLED" in env and not _flag(env[PREFIX + "ENABLED"], PREFIX + "ENABLED"):
        return None
    fields = {f.name: f for f in dataclasses.fields(NoiseSpec)}
    d: dict = {}
    study_on = "VERL_NOISY_OPS_ENABLED" in env and _flag(env["VERL_NOISY_OPS_ENABLED"], "VERL_NOISY_OPS_ENABLED")
    if study_on:
        d.update(type="relative_gaussian", scale=STUDY_DEFAULT_SCALE, ops=["matmul_family"])
        if env.get("VERL_NOISY_OPS_TYPE"):
            d["type"] = env["VERL_NOISY_OPS_TYPE"].strip()
        if env.get("VERL_NOISY_OPS_SCALE"):
            d["scale"] = _number(float, env["VERL_NOISY_OPS_SCALE"], "VERL_NOISY_OPS_SCALE")
        if env.get("VERL_NOISY_OPS_ALL_OPS") and _flag(env["VERL_NOISY_OPS_ALL_OPS"], "VERL_NOISY_OPS_ALL_OPS"):
            d["ops"] = ["extended", "layer_norm"]
    if env.get(PREFIX + "SPEC"):
        try:
            d.update(json.loads(env[PREFIX + "SPEC"]))
        except json.JSONDecodeError as err:
            raise ValueError(f"{PREFIX}SPEC is not a JSON object of NoiseSpec fields: {err}") from None
    known = {PREFIX + "SPEC", PREFIX + "ENABLED"}
    for key, value in env.items():
        if not key.startswith(PREFIX) or key in known:
            continue
        name = key[len(PREFIX):].lower()
        if name not in fields:
            raise ValueError(f"{key}: unknown noise field {name!r}; valid: {sorted(fields)} (+ SPEC, ENABLED)")
        if name in ("ops", "phases", "include", "exclude", "layers"):
            d[name] = [s.strip() for s in value.split(",") if s.strip()]
            if name == "layers":
                d[name] = [_number(int, s, key) for s in d[name]]
        elif name == "per_channel":
            d[name] = _flag(value, key)
        elif name == "seed":
            d[name] = _number(int, value, key)
        elif name in ("scale", "telemetry_rate"):
            d[name] = _number(float, value, key)
        else:
            d[name] = value.strip()
    if d.get("type", "none") == "none":
        return None
    return NoiseSpec.from_dict(d)


def install_from_env(environ: Optional[Mapping[str, str]] = None,
                     default_phase: Optional[str] = None) -> Optional[NoiseInjector]:
    """Install a process-wide injector if the environment switches noise on; return it (or None).

    Idempotent: a second call returns the injector already installed. Outside any phase context the noise
    applies to every covered op call, forward and backward (``global``), as in the study; ``default_phase``
    instead makes calls outside contexts count as that phase (the vLLM plugin passes ``rollout``).
    """
    global _ENV_INJECTOR
    if _ENV_INJECTOR is not None and _ENV_INJECTOR.installed:
        return _ENV_INJECTOR
    configure_engine(**engine_from_env(environ))   # engine switches: NOISEBENCH_FAST, _CPU_RNG, ... (engine.py)
    spec = spec_from_env(environ)
    if spec is None:
        return None
    if STATE.owner is not None:
        raise RuntimeError("install_from_env: another NoiseInjector is already installed in this process")
    _ENV_INJECTOR = NoiseInjector(spec, global_phase=default_phase is None, default_phase=default_phase).install()
    return _ENV_INJECTOR


def current() -> Optional[NoiseInjector]:
    """The injector installed in this process (by install_from_env or otherwise), if any."""
    return STATE.owner
