"""Typed configs: the schemas of conf/*.yaml (registered with Hydra's ConfigStore), their rules, and the check
that turns a bad value into one line and exit code 2 before a run starts."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from noisebench.schema.nodes import (AQNConfig, EvalConfig, EvalOnlyConfig, LeaderboardConfig, LoggerConfig,
                                     NoiseConfig, RootConfig, TrainerConfig, VLLMTrainerConfig)
from noisebench.schema.rules import ConfigError, check
from noisebench.schema.testbed import HFTestbed, TestbedConfig, TinyTestbed

__all__ = ["register", "check", "ConfigError", "RootConfig", "EvalOnlyConfig", "NoiseConfig", "TrainerConfig",
           "VLLMTrainerConfig", "EvalConfig", "LoggerConfig", "AQNConfig", "LeaderboardConfig", "TestbedConfig",
           "TinyTestbed", "HFTestbed"]


def register() -> None:
    """Store the schemas under the names the conf/ defaults lists use (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="root", node=RootConfig)            # conf/config.yaml: - /schema/root
    cs.store(group="schema", name="eval_only", node=EvalOnlyConfig)   # conf/eval_only.yaml
    cs.store(group="schema/testbed", name="tiny", node=TinyTestbed)   # conf/testbed/*: - /schema/testbed/tiny@...
    cs.store(group="schema/testbed", name="hf", node=HFTestbed)
    cs.store(group="schema/trainer", name="vllm", node=VLLMTrainerConfig)  # conf/trainer/grpo_qwen.yaml
