"""Every preset composes; bad overrides fail with Hydra's clear errors; noise specs are validated."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

PRESETS = sorted(p.stem for p in (REPO / "conf" / "exp").glob("*.yaml"))
STUDY = {"baseline": ("none", 0.0), "e4b": ("relative_gaussian", 1e-4), "e4c": ("relative_gaussian", 1e-3),
         "e4d": ("relative_gaussian", 1e-2), "e5": ("relative_gaussian", 1e-3)}


def test_all_study_presets_exist():
    for name in ["baseline", "e4b", "e4c", "e4d", "e5", "e6", "aqn", "aqn_e4d"]:
        assert name in PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_validates(name):
    from noisebench.train.builders import noise_spec

    cfg = compose([f"+exp={name}"])
    assert cfg.experiment == name
    spec = noise_spec(cfg)
    assert spec.type == cfg.noise.type
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if name in STUDY:
        assert (cfg.noise.type, float(cfg.noise.scale)) == STUDY[name]
        if name != "baseline":
            assert list(cfg.noise.phases) == ["rollout", "reference", "train_forward", "train_backward", "eval"]
    if name == "e5":
        assert list(cfg.noise.ops) == ["extended"]
    if name.startswith("aqn"):
        assert cfg.aqn.enabled


def test_default_is_embedded_baseline():
    cfg = compose()
    assert cfg.testbed.name == "tiny_arith" and cfg.noise.type == "none" and cfg.experiment == "baseline"
    assert cfg.trainer.args.bf16 is False and cfg.trainer.args.gradient_checkpointing is False


def test_run_seed_offsets_noise_seed():
    from noisebench.train.builders import noise_spec

    a = noise_spec(compose(["+exp=e4c", "seed=0"]))
    b = noise_spec(compose(["+exp=e4c", "seed=1"]))
    assert a.seed != b.seed


def test_bad_noise_type_names_key_and_choices():
    from noisebench.train.builders import noise_spec

    with pytest.raises(ValueError) as err:
        noise_spec(compose(["noise.type=gaussian"]))
    assert "type" in str(err.value) and "relative_gaussian" in str(err.value)


def test_bad_group_choice_is_a_clear_hydra_error():
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", "+exp=nope", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "Could not find 'exp/nope'" in out.stderr and "e4c" in out.stderr  # Hydra lists the available options
    assert "Traceback" not in out.stderr


def test_cfg_job_prints_composed_config():
    out = subprocess.run([sys.executable, "-m", "noisebench.cli", "+exp=e4c", "--cfg", "job"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.experiment == "e4c" and cfg.noise.scale == 1e-3


def test_run_injector_hooks_only_global_for_colocated_vllm():
    """The run's injector hooks the attached models alone, except with colocated vLLM (its model is never
    attached, so only global hooks reach it); a bad vllm_mode is refused by name."""
    from noisebench.train.builders import injector_hooks

    qwen = ["+exp=e4c", "testbed=qwen2_5_1_5b_gsm8k", "trainer=grpo_qwen"]
    assert injector_hooks(compose(["+exp=e4c"])) == "attached"
    assert injector_hooks(compose(qwen)) == "attached"
    assert injector_hooks(compose(qwen + ["trainer.args.use_vllm=true"])) == "global"   # colocate is the default
    assert injector_hooks(compose(qwen + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=server"])) == "attached"
    with pytest.raises(ValueError, match="vllm_mode.*colocate"):
        injector_hooks(compose(qwen + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=remote"]))


def test_run_injector_patches_unless_something_compiles_or_vllm_is_colocated():
    """The run's injector patches the covered spellings (eager TRL training and HF generation), and keeps the mode
    where code may be compiled under it (TRL's torch_compile, a static generation cache) or is colocated vLLM's."""
    from noisebench.train.builders import injector_intercept

    qwen = ["+exp=e4c", "testbed=qwen2_5_1_5b_gsm8k", "trainer=grpo_qwen"]
    assert injector_intercept(compose(["+exp=e4c"])) == "patch"
    assert injector_intercept(compose(qwen)) == "patch"
    assert injector_intercept(compose(qwen + ["trainer.args.use_vllm=true"])) == "mode"
    assert injector_intercept(compose(qwen + ["trainer.args.use_vllm=true", "trainer.args.vllm_mode=server"])) == "patch"
    assert injector_intercept(compose(["+exp=e4c", "+trainer.args.torch_compile=true"])) == "mode"
    assert injector_intercept(compose(["+exp=e4c", "+trainer.args.generation_kwargs.cache_implementation=static"])) \
        == "mode"
