"""Engine switches as configuration: configure_engine validates by name and sets them; the environment is read only
by install_from_env; the Hydra group conf/engine/default.yaml holds exactly configure_engine's keys."""
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from noisebench.noise import (NoiseInjector, NoiseSpec, configure_engine, engine_config, engine_from_env,
                              install_from_env)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _restore():
    before = engine_config()
    yield
    configure_engine(**before)


def test_configure_engine_sets_and_reports():
    got = configure_engine(fast="off", compiled="fused", cpu_rng="randn", intercept="patch")
    assert got == engine_config() == {"fast": "off", "compiled": "fused", "cpu_rng": "randn",
                                      "cpu_table_log2": got["cpu_table_log2"], "intercept": "patch"}
    inj = NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2))
    assert inj.intercept == "patch"                                   # the default of new injectors
    assert NoiseInjector(NoiseSpec(), intercept="mode").intercept == "mode"   # an explicit choice wins


@pytest.mark.parametrize("bad,match", [(dict(fast="fastest"), r"fast='fastest'.*\['auto', 'off', 'force'\]"),
                                       (dict(compiled="eager"), r"compiled='eager'.*'kernel', 'fused'"),
                                       (dict(cpu_rng="mersenne"), r"cpu_rng='mersenne'.*'icdf16'"),
                                       (dict(cpu_table_log2=40), r"cpu_table_log2=40.*\[10, 30\]"),
                                       (dict(intercept="patches"), r"intercept='patches'.*\['mode', 'patch'\]")])
def test_bad_switch_names_key_and_choices_and_changes_nothing(bad, match):
    before = engine_config()
    with pytest.raises(ValueError, match=match):
        configure_engine(**{"cpu_rng": "randn", "compiled": "off", **bad})   # the valid ones are not applied either
    assert engine_config() == before


def test_cpu_rng_switch_changes_draws_not_statistics():
    x = torch.ones(1 << 16)
    draws = {}
    for gen in ("icdf16", "randn"):
        configure_engine(cpu_rng=gen)
        with NoiseInjector(NoiseSpec(type="relative_gaussian", scale=1e-2, ops=["linear"]), global_phase=True):
            draws[gen] = torch.nn.functional.linear(x.view(-1, 1), torch.ones(1, 1)).flatten() - 1   # = s n
    assert not torch.equal(draws["icdf16"], draws["randn"])
    for d in draws.values():
        assert d.std().item() == pytest.approx(1e-2, rel=0.02) and abs(d.mean().item()) < 2e-4


def test_environment_is_read_by_install_from_env_only():
    code = ("import os; os.environ['NOISEBENCH_CPU_RNG'] = 'randn'; os.environ['NOISEBENCH_INTERCEPT'] = 'patch'; "
            "import noisebench.noise as n; print(n.engine_config()['cpu_rng'], n.engine_config()['intercept'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.split() == ["icdf16", "mode"]                   # importing reads no environment
    env = {"NOISEBENCH_NOISE_TYPE": "relative_gaussian", "NOISEBENCH_NOISE_SCALE": "1e-3",
           "NOISEBENCH_CPU_RNG": "randn", "NOISEBENCH_INTERCEPT": "patch", "NOISEBENCH_FAST_INLINE": "0"}
    inj = install_from_env(env)
    try:
        assert inj.intercept == "patch"
        assert engine_config()["cpu_rng"] == "randn" and engine_config()["compiled"] == "off"   # "0": off
    finally:
        inj.uninstall()
    with pytest.raises(ValueError, match=r"NOISEBENCH_FAST: .*fast='fastest'.*valid choices"):
        engine_from_env({"NOISEBENCH_FAST": "fastest"})


def test_hydra_group_has_exactly_the_switches():
    cfg = OmegaConf.load(REPO / "conf" / "engine" / "default.yaml")
    params = list(inspect.signature(configure_engine).parameters)
    assert sorted(cfg) == sorted(params)
    applied = configure_engine(**cfg)
    assert all(applied[k] == v for k, v in cfg.items() if v is not None)
