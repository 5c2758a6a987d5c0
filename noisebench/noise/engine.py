"""Engine switches: which implementation draws the noise and how covered calls are caught. They change speed and
which random numbers are drawn, never the noise model or its statistics, so they live apart from ``NoiseSpec``.

``configure_engine`` sets them at run time (the runner passes the Hydra group ``engine``); ``engine_from_env`` reads
the same switches from ``NOISEBENCH_*`` variables, for use inside other frameworks (``install_from_env``, the vLLM
plugin), where the environment is the only channel into the worker processes.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

from .fast import dispatch, inline, table
from .intercept import INTERCEPTS

# switch -> (valid choices, environment variable)
SWITCHES = {
    "fast": (dispatch.MODES, "NOISEBENCH_FAST"),
    "compiled": (inline.MODES, "NOISEBENCH_FAST_INLINE"),
    "cpu_rng": (table.GENERATORS, "NOISEBENCH_CPU_RNG"),
    "cpu_table_log2": (None, "NOISEBENCH_CPU_TABLE_LOG2"),
    "intercept": (INTERCEPTS, "NOISEBENCH_INTERCEPT"),
}
_ENV_ALIASES = {"compiled": {"1": "auto", "true": "auto", "on": "auto", "0": "off", "false": "off"}}
_INTERCEPT = ["mode"]   # NoiseInjector's default when none is passed


def _check(values: Dict[str, Any]) -> None:
    """Raise naming the switch and its valid choices, before anything is changed."""
    for key, value in values.items():
        if key not in SWITCHES:
            raise ValueError(f"configure_engine: unknown switch {key!r}; valid switches: {list(SWITCHES)}")
        choices = SWITCHES[key][0]
        if choices is None:
            if isinstance(value, bool) or not isinstance(value, int) or not 10 <= value <= 30:
                raise ValueError(f"configure_engine: {key}={value!r} must be an integer in [10, 30]")
        elif value not in choices:
            raise ValueError(f"configure_engine: {key}={value!r} unknown; valid choices: {list(choices)}")


def configure_engine(fast: Optional[str] = None, compiled: Optional[str] = None, cpu_rng: Optional[str] = None,
                     cpu_table_log2: Optional[int] = None, intercept: Optional[str] = None) -> Dict[str, Any]:
    """Set the engine switches given (None leaves a switch as it is); returns them all (``engine_config()``).

    Args:
        fast: eager fused Triton kernel: ``auto`` (CUDA when Triton is there), ``off`` (reference models always),
            ``force`` (also CPU tensors under Triton's interpreter, for tests).
        compiled: how compiled graphs draw: ``auto`` (per tensor), ``kernel``, ``fused``, ``off`` (opaque op).
        cpu_rng: CPU Gaussian normals: ``icdf16``, ``randn`` (torch.randn), ``table`` (shared, correlated).
        cpu_table_log2: size of the ``table`` generator's table, 2**n normals.
        intercept: default interception of new injectors: ``mode`` or ``patch`` (eager code only).
    """
    given = {k: v for k, v in dict(fast=fast, compiled=compiled, cpu_rng=cpu_rng, cpu_table_log2=cpu_table_log2,
                                   intercept=intercept).items() if v is not None}
    _check(given)
    if "fast" in given:
        dispatch.set_mode(given["fast"])
    if "compiled" in given:
        inline.set_mode(given["compiled"])
    if "cpu_rng" in given or "cpu_table_log2" in given:
        table.set_cpu_generator(given.get("cpu_rng", table.name()), given.get("cpu_table_log2"))
    if "intercept" in given:
        _INTERCEPT[0] = given["intercept"]
    return engine_config()


def engine_config() -> Dict[str, Any]:
    """The switches in force (for run records: the same spec and switches reproduce a run's draws bitwise)."""
    return {"fast": dispatch.MODE, "compiled": inline.MODE, "cpu_rng": table.name(),
            "cpu_table_log2": table.log2_size(), "intercept": _INTERCEPT[0]}


def default_intercept() -> str:
    """The interception a ``NoiseInjector`` uses when none is passed."""
    return _INTERCEPT[0]


def engine_from_env(environ: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The switches the environment sets (``NOISEBENCH_FAST``, ``NOISEBENCH_FAST_INLINE``, ``NOISEBENCH_CPU_RNG``,
    ``NOISEBENCH_CPU_TABLE_LOG2``, ``NOISEBENCH_INTERCEPT``), checked; unset or empty variables are left out."""
    env = os.environ if environ is None else environ
    out: Dict[str, Any] = {}
    for key, (_, var) in SWITCHES.items():
        raw = env.get(var, "").strip().lower()
        if not raw:
            continue
        if key == "cpu_table_log2":
            try:
                out[key] = int(raw)
            except ValueError:
                raise ValueError(f"{var}={raw!r} must be an integer in [10, 30]") from None
        else:
            out[key] = _ENV_ALIASES.get(key, {}).get(raw, raw)
    for key, value in out.items():
        try:
            _check({key: value})
        except ValueError as err:
            raise ValueError(f"{SWITCHES[key][1]}: {err}") from None
    return out
