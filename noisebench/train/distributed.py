"""Distributed facts of this process, read from the environment ``accelerate launch`` (or torchrun) sets.

Read at call time, not import time, so a test or a launcher that sets the variables later is seen.
"""
from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", 0) or 0)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1) or 1)


def is_main_process() -> bool:
    """Rank 0: the only one that evaluates and writes the record (the weights are the same on every rank)."""
    return rank() == 0


def strategy() -> str:
    """The distributed strategy ``accelerate launch`` put in the environment (its ACCELERATE_* variables)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"DeepSpeed ZeRO-{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}"
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return f"FSDP{env.get('FSDP_VERSION', '')}"
    return "DDP" if world_size() > 1 else "single process"


def sharded() -> bool:
    """Parameters split over ranks (ZeRO-3, FSDP): rank 0 alone cannot run lm-eval on the model."""
    s = strategy()
    return s.startswith("FSDP") or s == "DeepSpeed ZeRO-3"


def sharding_problem() -> str | None:
    """Why this launch cannot evaluate checkpoints in the loop, or None when it can."""
    if sharded() and world_size() > 1:
        return (f"{strategy()} shards the weights over ranks, but checkpoint evaluation runs lm-eval on rank 0 "
                f"alone: use conf/accelerate/ddp.yaml or deepspeed_zero2.yaml for runs with in-loop evaluation")
    return None
