"""Rules Hydra's types cannot express: ranges (``bounded`` fields) and rules across fields. Each failure is a
``ConfigError`` naming the key and the valid range or choices.

The CLI runs them on each composed config before Hydra starts the run (``preflight``); ``testbeds.base.check_schema``
runs the testbed's on a config read without Hydra. The noise rules restate a few of ``NoiseSpec``'s (bitflip scale,
layers, regexes) because the engine's check would load torch first; NoiseSpec keeps its own for use without Hydra.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from noisebench.schema.fields import describe, out_of_range
from noisebench.schema.mitigation import mitigation_problem
from noisebench.schema.testbed import KIND_SCHEMAS, TestbedConfig


class ConfigError(ValueError):
    """A config value breaks a rule; ``key`` is its dotted path."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


def omegaconf_message(err: OmegaConfBaseException, prefix: str = "") -> str:
    """One line from an OmegaConf type, choice or key error: ``key: what is wrong; valid ...``."""
    key = f"{prefix}{err.full_key}"
    msg = str(err.msg).splitlines()[0]
    choice = re.fullmatch(r"Invalid value '(.*)', expected one of \[(.*)\]", msg)
    if choice:
        return f"{key}={choice[1]!r}; valid choices: {choice[2].split(', ')}"
    typed = re.fullmatch(r"Value '(.*)' of type '.*' could not be converted to (\w+)", msg)
    if typed:
        kind = typed[2].lower()
        return f"{key}={typed[1]!r} is not {'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if isinstance(err, (ConfigAttributeError, ConfigKeyError)) and err.parent_node is not None:
        hint = ""
        if OmegaConf.get_type(err.parent_node) is TestbedConfig:  # a testbed file that names no kind schema
            hint = " (a testbed file starts its defaults list with its kind's schema: - /schema/testbed/tiny@...)"
        return f"{key}: unknown key; valid keys: {list(err.parent_node.keys())}{hint}"
    return f"{key}: {msg}"


def check(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first unset key, broken range or cross-field rule of a composed config."""
    check_node(cfg)
    threads = str(cfg.get("threads", "auto"))
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise ConfigError("threads", f"must be auto or a whole number >= 1, got {threads!r}")
    _noise(cfg)
    if mitigation_problem(cfg):
        raise ConfigError(*mitigation_problem(cfg))
    _eval_limit(cfg)
    check_testbed(cfg.testbed)
    if cfg.get("trainer") is not None:
        _batch_split(cfg.trainer)


def check_node(node: DictConfig, prefix: str = "") -> None:
    """Unset (``???``) keys and the ranges of every ``bounded`` field under a structured node."""
    missing = sorted(prefix + k for k in OmegaConf.missing_keys(node) if not k.startswith("hydra."))
    if missing:
        raise ConfigError(missing[0], f"has no value (set it on the command line or in its conf/ file; "
                                      f"all unset: {missing})")
    for key, value, meta in _bounded(node, prefix):
        if out_of_range(value, meta):
            raise ConfigError(key, f"must be {describe(meta)}, got {value!r}")


def _bounded(node: DictConfig, prefix: str) -> Iterator[tuple[str, Any, dict]]:
    """(dotted key, value, bounds) of every bounded field under a structured node, depth first."""
    kind = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else {}
    for name in node:
        if name == "hydra" and not prefix:
            continue
        child = node._get_node(name)
        if isinstance(child, DictConfig):
            if not child._is_none():
                yield from _bounded(child, f"{prefix}{name}.")
        elif name in fields and fields[name].metadata:
            yield f"{prefix}{name}", node[name], fields[name].metadata


def _noise(cfg: DictConfig) -> None:
    n = cfg.get("noise")
    if n is None:
        return
    if n.type == "bitflip" and n.scale > 1:
        raise ConfigError("noise.scale", f"is a flip probability for noise.type=bitflip: must be <= 1, got {n.scale}")
    if n.type != "none":
        for key in ("ops", "phases"):
            if not n[key]:
                raise ConfigError(f"noise.{key}", f"is empty while noise.type={n.type}; name at least one")
    if n.layers is not None:
        lay = list(n.layers)
        if len(lay) != 2 or lay[0] < 0 or lay[0] > lay[1]:
            raise ConfigError("noise.layers", f"must be [lo, hi] with 0 <= lo <= hi, got {lay}")
    for key in ("include", "exclude"):
        for pattern in n[key] or []:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"noise.{key}", f"bad regex {pattern!r}: {err}") from None


def _eval_limit(cfg: DictConfig) -> None:
    limit = cfg.eval.limit
    ok = limit is None or (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) \
        or (isinstance(limit, float) and 0 < limit < 1)
    if not ok:
        raise ConfigError("eval.limit", f"must be null, a number of items >= 1 or a fraction in (0, 1), got {limit!r}")


def _batch_split(t: DictConfig) -> None:
    """One optimizer step's completions split evenly over processes and accumulation steps (TRL's generation batch
    is per-device x WORLD_SIZE x gradient_accumulation_steps); ``accelerate launch`` sets WORLD_SIZE before this."""
    completions = t.prompts_per_step * t.num_generations
    ga = int(t.args.get("gradient_accumulation_steps") or 1)
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if completions % (world * ga):
        raise ConfigError("trainer.prompts_per_step", f"{t.prompts_per_step} x trainer.num_generations "
                                                      f"{t.num_generations} = {completions} completions a step do not "
                                                      f"split over WORLD_SIZE={world} x trainer.args."
                                                      f"gradient_accumulation_steps={ga}: choose values whose product "
                                                      f"divides {completions}")


def check_testbed(tb: DictConfig, prefix: str = "testbed.") -> None:
    """The testbed's rules across fields: its schema matches its kind; ``data.min_ops <= data.max_ops``."""
    schema = KIND_SCHEMAS[str(tb.kind)]
    if not issubclass(OmegaConf.get_type(tb), schema):
        raise ConfigError(f"{prefix}kind", f"{tb.kind} needs a testbed file built on the {schema.__name__} schema "
                                           f"(defaults: - /schema/testbed/{tb.kind}@...); this one is "
                                           f"{OmegaConf.get_type(tb).__name__}")
    if tb.kind == "tiny" and tb.data.min_ops > tb.data.max_ops:
        raise ConfigError(f"{prefix}data.min_ops", f"must be <= {prefix}data.max_ops ({tb.data.max_ops}), "
                                                   f"got {tb.data.min_ops}")
