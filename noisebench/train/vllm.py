"""vLLM rollouts (``trainer.args.use_vllm=true``): get the run's rollout noise into vLLM, and nothing else.

Where vLLM's forward runs decides how its noise gets there (TRL 1.16, ``trl/generation/vllm_generation.py``):

- ``colocate``: TRL builds ``vllm.LLM(..., distributed_executor_backend="external_launcher")``, and vLLM then turns
  its V1 multiprocessing off: the engine and its model run inside the trainer process, on the thread that calls
  ``generate``. NoisyGRPOTrainer already wraps that call in the ``rollout`` phase, so the run's own injector noises
  vLLM's ``F.linear`` calls. vLLM's general plugin must then stay inert in this process (it would install a second,
  phase-less injector), so :func:`vllm_rollouts` sets ``NOISEBENCH_NOISE_ENABLED=0`` while the trainer builds its LLM
  (vLLM loads plugins then, once per process). :func:`check_rollout_noise` fails the run after the first rollout if
  the rollout phase saw no noisy call, instead of training silently clean.
- ``server``: vLLM runs in other processes (``trl vllm-serve`` / ``vllm serve``). Its plugin
  (``noisebench.noise.vllm_plugin:register``, entry point ``vllm.general_plugins``) installs the engine in each of
  them from the environment; :func:`server_env` gives that environment (the spec restricted to ``rollout``) and
  :func:`server_command` the whole command line. Nothing in the trainer can check the server's noise.

Eager mode: the engine reseeds a per-device generator on every noisy call from Python. A CUDA graph replays the
captured kernels without re-running that Python (and capture refuses a seed change), and vLLM's compiled model
dispatches without Dynamo guards, so a TorchFunctionMode installed later is never consulted. Rollout noise in vLLM
therefore needs ``enforce_eager`` (no CUDA graphs, no torch.compile): ``trainer.vllm_enforce_eager`` (default true).
TRL 1.16 has no option for it in colocate mode, so :func:`vllm_rollouts` adds it to TRL's ``LLM(...)`` call.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shlex
from typing import Iterator, Optional

from omegaconf import DictConfig, OmegaConf

from noisebench.train.callbacks import phase_telemetry

log = logging.getLogger("noisebench")

MODES = ("colocate", "server")
ENV_SPEC = "NOISEBENCH_NOISE_SPEC"
ENV_ENABLED = "NOISEBENCH_NOISE_ENABLED"
STUDY_ENV_PREFIXES = ("NOISEBENCH_NOISE_", "VERL_NOISY_OPS_")


def use_vllm(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "trainer.args.use_vllm", default=False))


def vllm_mode(cfg: DictConfig) -> str:
    """``colocate`` or ``server`` (TRL's ``vllm_mode``); anything else is refused by name."""
    mode = str(OmegaConf.select(cfg, "trainer.args.vllm_mode", default="colocate"))
    if mode not in MODES:
        raise ValueError(f"trainer.args.vllm_mode={mode!r}; valid choices: {list(MODES)}")
    return mode


def enforce_eager(cfg: DictConfig) -> bool:
    return bool(OmegaConf.select(cfg, "trainer.vllm_enforce_eager", default=True))


def rollout_noised(spec) -> bool:
    return spec is not None and spec.enabled and "rollout" in spec.resolved_phases()


def rollout_spec(spec):
    """The run's spec restricted to the ``rollout`` phase (what vLLM's processes may apply), or None."""
    if not rollout_noised(spec):
        return None
    from noisebench.noise import NoiseSpec

    return NoiseSpec.from_dict({**spec.to_dict(), "phases": ["rollout"]})


def server_env(spec) -> dict[str, str]:
    """Environment for the vLLM server's processes: the rollout-only spec, or noise explicitly off (so a stray
    ``VERL_NOISY_OPS_ENABLED=1`` in the shell cannot noise a clean run's server)."""
    rs = rollout_spec(spec)
    if rs is None:
        return {ENV_ENABLED: "0"}
    return {ENV_SPEC: json.dumps(rs.to_dict(), sort_keys=True)}


def check_eager(cfg: DictConfig, spec) -> None:
    """Refuse rollout noise in vLLM with CUDA graphs / torch.compile on (see the module docstring)."""
    if use_vllm(cfg) and rollout_noised(spec) and not enforce_eager(cfg):
        raise ValueError("trainer.vllm_enforce_eager=false with rollout noise on: vLLM's CUDA graphs and compiled "
                         "model would replay or skip the per-call noise. Set trainer.vllm_enforce_eager=true, or "
                         "take `rollout` out of noise.phases.")


def server_command(cfg: DictConfig, spec, model: str) -> str:
    """The shell line that starts the vLLM server for this run (TRL's own ``vllm serve`` command builder)."""
    from trl.scripts.vllm_serve import ScriptArguments, build_command

    t = cfg.trainer.args
    tb = cfg.testbed
    args = ScriptArguments(model=str(model), enforce_eager=enforce_eager(cfg),
                           port=int(OmegaConf.select(t, "vllm_server_port", default=8000) or 8000),
                           max_model_len=int(tb.max_prompt_length) + int(tb.max_completion_length),
                           dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(
                               str(OmegaConf.select(tb, "dtype", default="bf16")), "auto"))
    cmd = build_command(args)
    env = {"VLLM_SERVER_DEV_MODE": "1", **server_env(spec)}
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " " + shlex.join(
        ["vllm", *cmd[cmd.index("serve"):]])


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _eager_llm() -> Iterator[None]:
    """Add ``enforce_eager=True`` to the ``LLM(...)`` that TRL's colocate mode builds (TRL 1.16 exposes no option)."""
    from trl.generation import vllm_generation

    original = getattr(vllm_generation, "LLM", None)
    if original is None:  # vLLM not installed: TRL raises its own ImportError when it gets there
        yield
        return
    vllm_generation.LLM = functools.partial(original, enforce_eager=True)
    try:
        yield
    finally:
        vllm_generation.LLM = original


@contextlib.contextmanager
def vllm_rollouts(cfg: DictConfig, spec, model_path: Optional[str] = None) -> Iterator[None]:
    """Wrap the construction of the GRPOTrainer (where TRL builds its vLLM engine or client).

    No-op unless ``trainer.args.use_vllm``. Keeps vLLM's plugin inert in this process, forces eager mode where
    needed, and in server mode logs the command that starts the server for ``model_path``.
    """
    if not use_vllm(cfg):
        yield
        return
    mode = vllm_mode(cfg)
    check_eager(cfg, spec)
    stray = sorted(k for k in os.environ if k.startswith(STUDY_ENV_PREFIXES) and k != ENV_ENABLED)
    if stray:
        log.warning("ignored in the trainer process (the config's noise spec rules here): %s", stray)
    if mode == "server":
        log.warning("vLLM server mode: rollout noise is applied by the server, which must be started with\n  %s",
                    server_command(cfg, spec, model_path or "MODEL_FOLDER"))
    eager = _eager_llm() if (mode == "colocate" and enforce_eager(cfg)) else contextlib.nullcontext()
    with _env({ENV_ENABLED: "0"}), eager:
        yield


def rollout_noise_calls(injector) -> int:
    """Noisy calls counted under the ``rollout`` phase so far (rollouts run no backward: all forward)."""
    if injector is None:
        return 0
    return int(phase_telemetry(injector.telemetry()).get("noise/rollout/calls", 0))


def check_rollout_noise(injector, mode: str) -> None:
    """After the first vLLM rollout: in colocate mode the rollout phase must have seen noisy calls."""
    spec = getattr(injector, "spec", None)
    if not rollout_noised(spec):
        return
    if mode == "server":
        log.warning("vLLM server mode: the trainer cannot see the server's noise; check its log for the "
                    "noisebench plugin and start it with the command printed at startup")
        return
    if rollout_noise_calls(injector) == 0:
        raise RuntimeError("rollout noise did not reach vLLM: its forward ran outside this process or thread "
                           "(multiprocessing on?) or through captured graphs. Keep trainer.vllm_enforce_eager=true "
                           "and vllm_mode=colocate, or use server mode with the plugin.")
