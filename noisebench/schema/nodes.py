"""Typed schemas of the config groups (Hydra structured configs) and of the two root configs.

Values live in ``conf/*.yaml``; these dataclasses give each key its type, choices and range, so a bad override is
refused at composition (type, choice, unknown key) or right after it (range, ``noisebench.schema.rules``), before
anything is imported or built. ``MISSING`` marks a key every group file must set.
The choices of the noise keys repeat ``noisebench.noise.spec``'s tuples (importing ``noisebench.noise`` would load
torch before the check); ``tests/test_config.py`` keeps the two equal.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from noisebench.schema.chip import ChipConfig
from noisebench.schema.fields import bounded, choices
from noisebench.schema.mitigation import MitigationConfig
from noisebench.schema.testbed import TestbedConfig

NoiseType = choices("NoiseType", ["none", "relative_gaussian", "absolute_gaussian", "systematic_bias", "bitflip",
                                  "round"])
Op = choices("Op", ["linear", "matmul", "mm", "bmm", "addmm", "baddbmm", "einsum", "sdpa", "softmax", "silu", "gelu",
                    "layer_norm", "rms_norm", "matmul_family", "extended", "all"])  # op names, then set names
Phase = choices("Phase", ["rollout", "reference", "train_forward", "train_backward", "eval", "all"])
RoundFormat = choices("RoundFormat", ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2"])
Rounding = choices("Rounding", ["nearest", "stochastic"])
BitField = choices("BitField", ["mantissa", "exponent", "sign", "all"])
Device = choices("Device", ["auto", "cpu", "cuda"])
EvalBackend = choices("EvalBackend", ["hf", "vllm"])
WandbMode = choices("WandbMode", ["online", "offline", "disabled"])
# noise-engine switches: the same choices as noisebench.noise.engine.SWITCHES (a test keeps them equal)
FastMode = choices("FastMode", ["auto", "off", "force"])
CompiledDraw = choices("CompiledDraw", ["auto", "kernel", "fused", "off"])
CpuRng = choices("CpuRng", ["randn", "icdf16", "table"])
Intercept = choices("Intercept", ["mode", "patch"])


@dataclass
class NoiseConfig:
    """``noise`` (conf/noise, conf/ops, conf/phases): the fields of ``noisebench.noise.NoiseSpec``.

    ``include``, ``exclude`` and ``telemetry_rate`` left null take NoiseSpec's defaults (one place for them).
    """

    type: NoiseType = MISSING
    scale: float = bounded(MISSING, ge=0)          # bitflip: a probability, <= 1 (rules.py)
    ops: List[Op] = MISSING
    phases: List[Phase] = MISSING
    seed: int = bounded(MISSING, ge=0)
    round_format: RoundFormat = RoundFormat.bf16
    rounding: Rounding = Rounding.nearest
    bits: BitField = BitField.mantissa
    per_channel: bool = False
    include: Optional[List[str]] = None            # module-name regexes; only ops inside a match are noised
    exclude: Optional[List[str]] = None            # module-name regexes never noised (default: rotary embeddings)
    layers: Optional[List[int]] = None             # inclusive [lo, hi] decoder-layer range
    telemetry_rate: Optional[float] = bounded(None, ge=0, le=1)


@dataclass
class TrainerConfig:
    """``trainer`` (conf/trainer): GRPO settings noisebench computes from; ``args`` go verbatim into
    ``trl.GRPOConfig``, so any of its keys is accepted there (TRL checks them)."""

    max_steps: int = bounded(MISSING, ge=1)
    prompts_per_step: int = bounded(MISSING, ge=1)
    num_generations: int = bounded(MISSING, ge=2)  # GRPO normalises rewards within a group: needs two or more
    save_total_limit: int = bounded(MISSING, ge=1)  # resume needs a checkpoint left on disk
    unfused_lm_head: bool = False
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class VLLMTrainerConfig(TrainerConfig):
    """A recipe that may roll out in vLLM (``trainer.args.use_vllm``); its file names this schema first, so the
    recipes that never do carry no vLLM key (their setting fingerprint stays as it was)."""

    vllm_enforce_eager: bool = MISSING             # noisebench/train/vllm.py says why it must be true under noise


@dataclass
class EvalConfig:
    """``eval`` (conf/eval): lm-eval checkpoint evaluation."""

    eval_every: int = bounded(MISSING, ge=1)       # also the checkpoint interval
    limit: Any = None                              # null, items (int >= 1) or a fraction (0 < float < 1); rules.py
    batch_size: int = bounded(MISSING, ge=1)
    max_gen_toks: Optional[int] = bounded(None, ge=1)
    clean_too: bool = False
    backend: EvalBackend = EvalBackend.hf


@dataclass
class LoggerConfig:
    """``logger`` (conf/logger): wandb."""

    enabled: bool = MISSING
    mode: WandbMode = WandbMode.offline
    project: str = "noisebench"
    entity: Optional[str] = None


@dataclass
class AQNConfig:
    """``aqn`` (conf/aqn): QeRL's adaptive quantization noise on RMSNorm weights in rollout."""

    enabled: bool = MISSING
    sigma_start: float = bounded(MISSING, gt=0)
    sigma_end: float = bounded(MISSING, gt=0)
    num_stages: int = bounded(MISSING, ge=3)       # the schedule divides by num_stages - 2
    seed: int = MISSING


@dataclass
class LeaderboardConfig:
    """``leaderboard`` (conf/config.yaml): boards regenerated after runs."""

    enabled: bool = True
    out_dir: str = MISSING
    bootstrap: int = bounded(MISSING, ge=1)
    margin_pts: Optional[float] = bounded(None, gt=0)  # equivalence margin in points; null: the board's default


@dataclass
class EngineConfig:
    """``engine``: noise-engine switches (speed, which random numbers are drawn; never the statistics)."""

    fast: FastMode = FastMode.auto
    compiled: CompiledDraw = CompiledDraw.auto
    cpu_rng: CpuRng = CpuRng.icdf16
    cpu_table_log2: int = bounded(24, ge=10, le=30)
    intercept: Optional[Intercept] = None           # null: the runner picks


@dataclass
class RootConfig:
    """``conf/config.yaml``: one training run (``noisebench``)."""

    experiment: str = MISSING
    seed: int = bounded(MISSING, ge=0)
    resume: bool = False
    dry_run: bool = False
    device: Device = Device.auto
    threads: str = "auto"                       # torch threads per run: auto or a number >= 1 (rules.py)
    results_dir: str = MISSING
    cache_dir: str = MISSING
    leaderboard: LeaderboardConfig = field(default_factory=LeaderboardConfig)
    trainer: TrainerConfig = MISSING
    eval: EvalConfig = MISSING
    testbed: TestbedConfig = MISSING
    noise: NoiseConfig = MISSING
    aqn: AQNConfig = MISSING
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)
    chip: Optional[ChipConfig] = None           # conf/chip: a chip's GEMM arithmetic; null (chip=none): none
    logger: LoggerConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)


@dataclass
class EvalOnlyConfig:
    """``conf/eval_only.yaml``: score one checkpoint under a noise spec (``noisebench-eval``)."""

    checkpoint: Optional[str] = None
    experiment: str = MISSING
    trainer: Optional[TrainerConfig] = None   # unused: present because testbed files may override the trainer
    seed: int = bounded(MISSING, ge=0)
    device: Device = Device.auto
    results_dir: str = MISSING
    cache_dir: str = MISSING
    eval: EvalConfig = MISSING
    testbed: TestbedConfig = MISSING
    noise: NoiseConfig = MISSING
    engine: EngineConfig = field(default_factory=EngineConfig)
